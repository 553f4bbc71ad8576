//! [`CommitBatcher`] (supervised): the group commit across rooms on SQLite.
//!
//! SQLite has one writer, and `synchronous = full` syncs the write-ahead log at
//! every commit; when each room commits its own batch, a hundred busy rooms queue
//! a hundred syncs behind one another. Rooms hand their group-commit batch
//! ([`crate::store::Store::append_grouped`]) to this actor instead. While one
//! transaction runs, the batches of every room that arrive wait; the next
//! transaction takes them all (up to `store.group_commit_max_messages` messages)
//! and commits them together, one sync for all, and each room gets its own
//! results back.
//!
//! Failure stays per room: when the shared transaction fails, nothing of it was
//! stored, and each room's batch is committed again in a transaction of its own,
//! so a room gets exactly the answer it would have got alone (and retries its own
//! messages one by one from there, see [`crate::actors::room`]). A room has at most
//! one batch in flight, so a room's batches stay in order.
//!
//! PostgreSQL has no single writer: rooms keep committing concurrently in their own
//! transactions there, and the server does not start this actor.

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, AsyncContext as _,
    Context, Handler, Message, Supervised, Supervisor,
};
use tokio::sync::oneshot;

use super::supervision::catch_panic;
use crate::{
    ids::RoomId,
    store::{Appended, NewMessage, Store, StoreError, StoreResult},
};

/// One room's batch and where its results go.
struct Request {
    room: RoomId,
    messages: Vec<NewMessage>,
    reply: oneshot::Sender<StoreResult<Vec<Appended>>>,
}

/// Commits a room's batch together with whatever other rooms are waiting.
#[derive(Message)]
#[rtype(result = "()")]
struct Commit(Request);

/// The actor; see the module docs.
pub struct CommitBatcher {
    store: Store,
    max_messages: usize,
    queue: Vec<Request>,
    writing: bool,
}

impl CommitBatcher {
    /// Starts the batcher under a supervisor and routes `store`'s grouped appends
    /// through it.
    pub fn start(store: Store, max_messages: usize) {
        let actor_store = store.clone();
        let addr = Supervisor::start(move |_| CommitBatcher {
            store: actor_store,
            max_messages: max_messages.max(1),
            queue: Vec::new(),
            writing: false,
        });
        store.route_grouped_appends(Box::new(move |room, messages| {
            let (reply, answer) = oneshot::channel();
            addr.do_send(Commit(Request {
                room,
                messages,
                reply,
            }));
            Box::pin(async move {
                answer.await.unwrap_or_else(|_| {
                    Err(StoreError::Database(sqlx::Error::Protocol(
                        "the commit batcher stopped before answering".into(),
                    )))
                })
            })
        }));
    }

    /// Starts the next shared transaction, unless one is running.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.queue.is_empty() {
            return;
        }
        let mut messages = 0;
        let mut take = 0;
        for request in &self.queue {
            if take > 0 && messages + request.messages.len() > self.max_messages {
                break;
            }
            messages += request.messages.len();
            take += 1;
        }
        let requests: Vec<Request> = self.queue.drain(..take).collect();
        let (batches, replies): (Vec<_>, Vec<_>) = requests
            .into_iter()
            .map(|r| ((r.room, r.messages), r.reply))
            .unzip();
        self.writing = true;
        let store = self.store.clone();
        ctx.spawn(
            catch_panic(async move { commit(&store, batches).await })
                .into_actor(self)
                .map(move |outcome, act, ctx| {
                    act.writing = false;
                    match outcome {
                        Ok(results) => {
                            for (reply, result) in replies.into_iter().zip(results) {
                                let _ = reply.send(result);
                            }
                            act.flush(ctx);
                        }
                        Err(panicked) => {
                            // The rooms see their replies dropped (an error they
                            // retry); the supervisor restarts the batcher.
                            tracing::error!(error = %panicked, "commit batcher panicked; restarting it");
                            ctx.stop();
                        }
                    }
                }),
        );
    }
}

/// One transaction for every batch; when it fails, one per room.
async fn commit(
    store: &Store,
    batches: Vec<(RoomId, Vec<NewMessage>)>,
) -> Vec<StoreResult<Vec<Appended>>> {
    if batches.len() > 1 {
        match store.append_many(&batches).await {
            Ok(results) => return results.into_iter().map(Ok).collect(),
            Err(e) => tracing::warn!(
                rooms = batches.len(),
                error = %e,
                "shared commit failed; committing each room's batch on its own"
            ),
        }
    }
    let mut results = Vec::with_capacity(batches.len());
    for (room, messages) in &batches {
        results.push(store.append_messages(room, messages).await);
    }
    results
}

impl Actor for CommitBatcher {
    type Context = Context<Self>;
}

impl Supervised for CommitBatcher {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Batches that were waiting are answered with an error by the dropped
        // reply channels; the rooms retry them.
        self.queue.clear();
        self.writing = false;
    }
}

impl Handler<Commit> for CommitBatcher {
    type Result = ();

    fn handle(&mut self, Commit(request): Commit, ctx: &mut Context<Self>) {
        self.queue.push(request);
        self.flush(ctx);
    }
}
