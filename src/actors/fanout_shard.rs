//! [`FanoutShard`]: one per HTTP worker arbiter, started (under supervision) by the
//! first connection on that arbiter that subscribes to a room. It holds, per room,
//! the subscribers whose connections live on its arbiter, and delivers each batch a
//! room hands it to them: a room with subscribers on every worker sends each shard
//! one message per batch (the batch encoded once per codec, bytes shared), and the
//! shards write to their connections in parallel, each on its own thread. A shard
//! never waits for a connection: one whose queue is full is dropped from the shard
//! and told it lagged (the same handling as a room's own delivery), so a slow
//! consumer delays neither its shard's other connections nor the other shards.
//!
//! The room stays the one place that decides who is subscribed: it adds and removes
//! subscribers here in the same order as it hands out batches (one mailbox, FIFO),
//! and learns from [`ShardLagged`] which ones the shard dropped.
//!
//! A WebSocket subscription's position ([`DirectSub`]) is shared with the shard
//! (the connection is on the same thread): while the connection has the
//! subscription live and a batch is exactly the next one, the shard writes the
//! shared bytes straight into the connection's transport, with no message to the
//! connection actor. Anything else (the subscription is subscribing or catching
//! up, the batch does not follow on, an SSE stream) goes to the connection as a
//! [`RoomPush`] and is handled there as before, so the connection actor still owns
//! the subscription's phases; the sequence check keeps the two paths in order (a
//! batch handed to the actor holds back every later one until the actor wrote it).

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    rc::Rc,
    sync::Arc,
};

use actix::{
    Actor, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler, Message, Recipient,
    Supervised, Supervisor, WrapFuture as _,
};

use super::{
    room::{ConnectionId, EventBatch, RoomPush, Subscriber},
    supervision::guarded,
};
use crate::{
    ids::RoomId,
    protocol::{close, FrameCodec},
    ws::transport::Pusher,
};

/// Adds a subscriber of `room_id` (its connection lives on this shard's arbiter).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddSubscriber {
    pub room_id: RoomId,
    pub subscriber: Subscriber,
}

/// Removes a subscriber of `room_id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveSubscriber {
    pub room_id: RoomId,
    pub conn_id: ConnectionId,
}

/// Forgets every subscriber of a room (it restarted or was deleted, and told
/// them itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DropRoom {
    pub room_id: RoomId,
}

/// Delivers a batch of a room to the shard's subscribers of that room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliverBatch {
    pub batch: Arc<EventBatch>,
    /// A live room: a lagging subscriber moves to the tail (see `RoomPush::Lagged`).
    pub live: bool,
    /// Where to report the subscribers the shard dropped.
    pub room: Recipient<ShardLagged>,
    /// Counts the batch as queued to a shard until it is dropped: `QueuedBatch::new(&batch)`.
    pub queued: QueuedBatch,
}

/// A [`DeliverBatch`] on its way to a shard, counted in
/// `roomcast_fanout_shard_queued_batches` and `…_queued_events` from the room's
/// send until the message is dropped: when the shard has written the batch to its
/// connections, or the message was lost with a stopped shard's mailbox. Both are
/// single atomic additions, so the gauges cost the hot path nothing worth
/// measuring; a number that stays high means shards fall behind their rooms.
pub struct QueuedBatch {
    events: i64,
}

impl QueuedBatch {
    /// Counts one batch of `batch`'s events as queued.
    pub fn new(batch: &EventBatch) -> Self {
        let events = i64::try_from(batch.events.len()).unwrap_or(i64::MAX);
        let metrics = crate::metrics::metrics();
        metrics.fanout_shard_queued_batches.inc();
        metrics.fanout_shard_queued_events.inc_by(events);
        metrics.fanout_shard_batches.inc();
        Self { events }
    }
}

impl Drop for QueuedBatch {
    fn drop(&mut self) {
        let metrics = crate::metrics::metrics();
        metrics.fanout_shard_queued_batches.dec();
        metrics.fanout_shard_queued_events.dec_by(self.events);
    }
}

/// The shard dropped a subscriber whose queue was full (and told it it lagged).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShardLagged {
    pub conn_id: ConnectionId,
    /// The registration the shard held (`Subscriber::registration`): a newer one
    /// of the same connection stays.
    pub registration: u64,
}

/// Where one room subscription of a connection stands: the last sequence written to
/// the client, and whether the subscription is live. The connection actor owns it
/// (it is the subscription's only record of that position); the shard of its
/// arbiter writes through it (see the module docs).
pub struct DirectSub {
    conn_id: ConnectionId,
    room_id: RoomId,
    delivered: Cell<u64>,
    live: Cell<bool>,
    /// The connection's socket; `None`: an SSE stream, always reached by message.
    pusher: Option<Pusher>,
    codec: FrameCodec,
}

impl DirectSub {
    /// A subscription position at `delivered`, not live; registered with the
    /// arbiter's shard when `pusher` is given.
    pub fn new(
        conn_id: ConnectionId,
        room_id: RoomId,
        pusher: Option<Pusher>,
        codec: FrameCodec,
        delivered: u64,
    ) -> Rc<Self> {
        let sub = Rc::new(Self {
            conn_id,
            room_id,
            delivered: Cell::new(delivered),
            live: Cell::new(false),
            pusher,
            codec,
        });
        if sub.pusher.is_some() {
            DIRECT.with(|direct| {
                direct
                    .borrow_mut()
                    .insert((sub.conn_id, sub.room_id.clone()), sub.clone())
            });
        }
        sub
    }

    /// The last sequence written to the client.
    pub fn delivered(&self) -> u64 {
        self.delivered.get()
    }

    pub fn set_delivered(&self, seq: u64) {
        self.delivered.set(seq);
    }

    /// Whether the shard may write the next batch itself (the subscription is live).
    pub fn set_live(&self, live: bool) {
        self.live.set(live);
    }

    /// The subscription ended: the shard writes nothing more through it.
    pub fn end(&self) {
        self.live.set(false);
        if self.pusher.is_some() {
            let key = (self.conn_id, self.room_id.clone());
            // `try_with`: a connection dropped while the thread ends finds the
            // registry gone already.
            let _ = DIRECT.try_with(|direct| {
                let mut direct = direct.borrow_mut();
                // Only this subscription's own entry (a newer one may have taken
                // its place).
                if direct
                    .get(&key)
                    .is_some_and(|sub| std::ptr::eq(&**sub, self))
                {
                    direct.remove(&key);
                }
            });
        }
    }

    /// Writes `batch` to the client when the subscription is live and the batch is
    /// exactly the next one (as the connection actor would: one `batch` frame, or
    /// one frame per event); `false`: the connection actor must handle it.
    fn write(&self, batch: &EventBatch, as_batch: bool) -> bool {
        let Some(pusher) = &self.pusher else {
            return false;
        };
        let (Some(first), Some(last)) = (batch.events.first(), batch.events.last()) else {
            return false;
        };
        let (first, last) = (first.seq, last.seq);
        if !self.live.get()
            || first != self.delivered.get().saturating_add(1)
            || last - first + 1 != batch.events.len() as u64
            || pusher.is_closed()
        {
            return false;
        }
        let written = if batch.sends_as_batch(as_batch) {
            pusher.write(batch.batch_wire(self.codec))
        } else if let [event] = &batch.events[..] {
            pusher.write(event.frame.wire(self.codec))
        } else {
            // Several events as single frames: one system call for all of them.
            pusher.write_all(
                batch
                    .events
                    .iter()
                    .map(|event| event.frame.wire(self.codec)),
            )
        };
        self.delivered.set(last);
        if let Err(full) = written {
            // As the connection does when a write overflows its queue: close; the
            // connection actor stops once the writer is done.
            tracing::debug!(conn = self.conn_id, %full, "write queue over budget; closing");
            self.live.set(false);
            pusher.close(
                Some(close::TOO_SLOW),
                "the connection cannot keep up; reconnect and resume",
            );
        }
        true
    }
}

/// Whether `next` continues `prev`: the same room, its first event right after
/// `prev`'s last, and the same kind of room.
fn follows_on(prev: &DeliverBatch, next: &DeliverBatch) -> bool {
    let (Some(last), Some(first)) = (prev.batch.events.last(), next.batch.events.first()) else {
        return false;
    };
    prev.batch.room_id == next.batch.room_id
        && prev.live == next.live
        && last.seq.checked_add(1) == Some(first.seq)
}

/// A subscriber as the shard holds it.
struct Entry {
    subscriber: Subscriber,
    /// Its position, when the connection shares it (a WebSocket).
    direct: Option<Rc<DirectSub>>,
}

/// One arbiter's share of every room's subscribers.
#[derive(Default)]
pub struct FanoutShard {
    rooms: HashMap<RoomId, HashMap<ConnectionId, Entry>>,
    /// Batches received and not yet written, in arrival order (see
    /// [`FanoutShard::drain`]).
    pending: Vec<DeliverBatch>,
    /// A drain is scheduled.
    draining: bool,
}

thread_local! {
    /// The shard of the arbiter this thread runs.
    static LOCAL: RefCell<Option<Addr<FanoutShard>>> = const { RefCell::new(None) };
    /// The subscription positions of this arbiter's WebSocket connections, by
    /// connection and room, for the shard to pick up when the room adds them.
    static DIRECT: RefCell<HashMap<(ConnectionId, RoomId), Rc<DirectSub>>> =
        RefCell::new(HashMap::new());
}

/// The shard of the current arbiter, started on first use. Call it from an actor
/// running on an HTTP worker's arbiter (a connection).
pub fn local_shard() -> Addr<FanoutShard> {
    LOCAL.with(|local| {
        local
            .borrow_mut()
            .get_or_insert_with(|| Supervisor::start(|_| FanoutShard::default()))
            .clone()
    })
}

impl FanoutShard {
    /// Writes every pending batch, merging each run of batches of one room whose
    /// events follow on into one batch. The drain runs after the shard's mailbox
    /// was emptied (and before any subscriber is added or removed, so each batch
    /// still reaches exactly the subscribers the room sent it to). A shard that
    /// fell behind its rooms (it was writing a big batch while they committed
    /// more) so catches up with one write per subscriber for all that queued
    /// meanwhile instead of one per batch: its cost per event falls as its load
    /// rises, and a quiet room's batch, alone in the mailbox, goes out as before.
    fn drain(&mut self) {
        self.draining = false;
        let mut pending = std::mem::take(&mut self.pending).into_iter().peekable();
        while let Some(first) = pending.next() {
            let mut run = vec![first];
            while let Some(next) = pending.next_if(|next| follows_on(&run[run.len() - 1], next)) {
                run.push(next);
            }
            let Some(last) = run.pop() else {
                continue;
            };
            if run.is_empty() {
                self.deliver(last);
                continue;
            }
            let events = run
                .iter()
                .chain([&last])
                .flat_map(|msg| msg.batch.events.iter().cloned())
                .collect();
            let merged = EventBatch::new(last.batch.room_id.clone(), events);
            crate::metrics::metrics()
                .fanout_shard_merged_batches
                .inc_by(run.len() as u64);
            // The earlier batches' queue gauges are released once written.
            let _earlier: Vec<QueuedBatch> = run.into_iter().map(|msg| msg.queued).collect();
            self.deliver(DeliverBatch {
                batch: Arc::new(merged),
                ..last
            });
        }
        // The vector's allocation goes with the batches: an idle shard keeps none.
    }

    fn deliver(&mut self, msg: DeliverBatch) {
        let batch = msg.batch;
        let Some(subscribers) = self.rooms.get_mut(&batch.room_id) else {
            return;
        };
        // Bytes per codec, as single frames and as one batch frame.
        let mut sizes = [[None, None], [None, None]];
        let mut lagged = Vec::new();
        let mut delivered = 0u64;
        let mut direct_writes = 0u64;
        for (conn_id, entry) in subscribers.iter() {
            let sub = &entry.subscriber;
            let bytes = *sizes[sub.codec as usize][usize::from(sub.batch)]
                .get_or_insert_with(|| batch.wire_len(sub.codec, sub.batch));
            if !sub.gauge.try_reserve(bytes) {
                lagged.push(*conn_id);
                continue;
            }
            if let Some(direct) = &entry.direct {
                // The transport charges the gauge itself as it queues.
                sub.gauge.release(bytes);
                if direct.write(&batch, sub.batch) {
                    direct_writes += batch.events.len() as u64;
                    continue;
                }
                if !sub.gauge.try_reserve(bytes) {
                    lagged.push(*conn_id);
                    continue;
                }
            }
            let push = RoomPush::Events {
                batch: batch.clone(),
                bytes,
            };
            if sub.addr.try_send(push).is_err() {
                sub.gauge.release(bytes);
                lagged.push(*conn_id);
                continue;
            }
            delivered += batch.events.len() as u64;
        }
        let metrics = crate::metrics::metrics();
        metrics.messages_delivered.inc_by(delivered + direct_writes);
        metrics.messages_delivered_direct.inc_by(direct_writes);
        for conn_id in lagged {
            if let Some(Entry {
                subscriber: sub, ..
            }) = subscribers.remove(&conn_id)
            {
                tracing::debug!(room = %batch.room_id, conn = conn_id, "subscriber lagged (shard)");
                crate::metrics::metrics().subscribers_lagged.inc();
                sub.addr.do_send(RoomPush::Lagged {
                    room_id: batch.room_id.clone(),
                    tail: msg.live,
                });
                msg.room.do_send(ShardLagged {
                    conn_id,
                    registration: sub.registration,
                });
            }
        }
        if subscribers.is_empty() {
            self.rooms.remove(&batch.room_id);
        }
    }
}

impl Actor for FanoutShard {
    type Context = Context<Self>;
}

impl Supervised for FanoutShard {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // The subscribers stay: the rooms still count on this shard for them.
        tracing::warn!(rooms = self.rooms.len(), "fan-out shard restarting");
    }
}

impl Handler<AddSubscriber> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: AddSubscriber, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                // Batches the room sent before this subscriber are not for it.
                act.drain();
                let conn_id = msg.subscriber.conn_id;
                let direct = DIRECT.with(|direct| {
                    direct
                        .borrow()
                        .get(&(conn_id, msg.room_id.clone()))
                        .cloned()
                });
                let entry = Entry {
                    subscriber: msg.subscriber,
                    direct,
                };
                act.rooms
                    .entry(msg.room_id)
                    .or_default()
                    .insert(conn_id, entry);
            },
        )
    }
}

impl Handler<RemoveSubscriber> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: RemoveSubscriber, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                // Batches the room sent before the removal are still for it.
                act.drain();
                if let Some(subscribers) = act.rooms.get_mut(&msg.room_id) {
                    subscribers.remove(&msg.conn_id);
                    if subscribers.is_empty() {
                        act.rooms.remove(&msg.room_id);
                    }
                }
            },
        )
    }
}

impl Handler<DropRoom> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: DropRoom, _ctx: &mut Self::Context) {
        self.drain();
        self.rooms.remove(&msg.room_id);
    }
}

impl Handler<DeliverBatch> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: DeliverBatch, ctx: &mut Self::Context) {
        self.pending.push(msg);
        if !self.draining {
            self.draining = true;
            // After the mailbox: the batches queued behind this one join it.
            ctx.spawn(
                tokio::task::yield_now()
                    .into_actor(self)
                    .map(|(), act, ctx| guarded(act, ctx, || (), |act, _ctx| act.drain())),
            );
        }
    }
}
