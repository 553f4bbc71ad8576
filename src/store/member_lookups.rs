//! Membership-and-ban lookups of one room that arrive while another is in flight,
//! answered together by one statement.
//!
//! A subscription or send by a user the access cache does not know yet reads that
//! user's membership and ban in the room ([`Store::member_facts`]). When thousands
//! of users connect at once (a stream starting, a server restarting), each lookup
//! alone is a round trip to the database; on SQLite that is a hand-off to sqlx's
//! worker thread and back, two thread switches for a one-row read, and it was most
//! of the cost of a connection storm's subscriptions. Here the first lookup of a
//! room runs at once; lookups of that room that arrive while it is in flight wait
//! for it to finish and then go together, up to [`USERS_PER_QUERY`] per
//! statement. A quiet room's lookup adds no wait.
//!
//! Each lookup's statement starts after the lookup was asked for, so an answer is
//! never older than the access cache's ticket taken before asking (see
//! [`super::cache`]).
//!
//! The statements run in a task of their own (spawned on the caller's runtime), so
//! a caller that gives up (a connection closing mid-subscribe) never strands the
//! lookups that were waiting for its statement.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use tokio::sync::oneshot;

use super::{rooms::MemberAndBan, Store, StoreError, StoreResult};
use crate::ids::{RoomId, UserId};

/// Most users one statement looks up: the statement's text depends on the count,
/// so batches are cut into power-of-two chunks of at most this many (a handful
/// of texts stay prepared in each connection's statement cache).
pub(super) const USERS_PER_QUERY: usize = 64;

/// One lookup waiting for its answer.
struct Waiter {
    user: UserId,
    reply: oneshot::Sender<StoreResult<MemberAndBan>>,
}

/// The rooms with a lookup in flight, and per room the lookups waiting for the
/// next statement.
#[derive(Default)]
pub(super) struct MemberLookups {
    rooms: Mutex<HashMap<RoomId, Vec<Waiter>>>,
}

impl std::fmt::Debug for MemberLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberLookups")
            .field("rooms_in_flight", &self.lock().len())
            .finish()
    }
}

impl MemberLookups {
    fn lock(&self) -> MutexGuard<'_, HashMap<RoomId, Vec<Waiter>>> {
        // A panic while the map was held leaves it consistent (every change is
        // one insert, push or remove): keep going.
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store {
    /// `user`'s membership in `room` and their ban there (in force or not), read
    /// together with the other lookups of the room that are waiting (see the
    /// module docs).
    pub(super) async fn member_and_ban(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> StoreResult<MemberAndBan> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run the batch on (not seen in the server): alone.
            return self.member_and_ban_alone(room, user).await;
        };
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            user: user.clone(),
            reply,
        };
        let first = {
            let mut rooms = self.member_lookups.lock();
            match rooms.get_mut(room) {
                Some(waiting) => {
                    waiting.push(waiter);
                    None
                }
                None => {
                    rooms.insert(room.clone(), Vec::new());
                    Some(waiter)
                }
            }
        };
        if let Some(first) = first {
            runtime.spawn(self.clone().answer_lookups(room.clone(), vec![first]));
        }
        // The task is gone without answering only when its runtime shut down.
        answer
            .await
            .unwrap_or(Err(StoreError::Database(sqlx::Error::PoolClosed)))
    }

    /// Answers `batch`, then whatever waited for it, until no lookup of `room`
    /// is left; then forgets the room (the next lookup starts afresh).
    async fn answer_lookups(self, room: RoomId, mut batch: Vec<Waiter>) {
        // Dropped before the loop ends (the runtime shutting down): the waiting
        // lookups are dropped too (their callers get an error), and the room is
        // forgotten so that later lookups do not wait for a task that is gone.
        struct Abandon<'a> {
            store: &'a Store,
            room: &'a RoomId,
            armed: bool,
        }
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if self.armed {
                    self.store.member_lookups.lock().remove(self.room);
                }
            }
        }
        let mut guard = Abandon {
            store: &self,
            room: &room,
            armed: true,
        };
        loop {
            let users: Vec<UserId> = batch.iter().map(|w| w.user.clone()).collect();
            match self.members_and_bans(&room, &users).await {
                Ok(found) => {
                    for waiter in batch {
                        // The same user twice (two connections): both get it.
                        let answer = found.get(&waiter.user).cloned().unwrap_or_default();
                        let _ = waiter.reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    // Each lookup gets its own error (errors do not clone): asked
                    // alone, a failing database fails each the same way.
                    tracing::debug!(room = %room, error = %e, "batched member lookup failed");
                    for waiter in batch {
                        let answer = self.member_and_ban_alone(&room, &waiter.user).await;
                        let _ = waiter.reply.send(answer);
                    }
                }
            }
            let mut rooms = self.member_lookups.lock();
            let next = rooms.get_mut(&room).map(std::mem::take).unwrap_or_default();
            if next.is_empty() {
                rooms.remove(&room);
                guard.armed = false;
                return;
            }
            batch = next;
        }
    }

    async fn member_and_ban_alone(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> StoreResult<MemberAndBan> {
        let mut found = self
            .members_and_bans(room, std::slice::from_ref(user))
            .await?;
        Ok(found.remove(user).unwrap_or_default())
    }

    /// The memberships and bans of `users` in `room`: one statement per chunk of
    /// [`USERS_PER_QUERY`]; users without either are absent from the answer.
    async fn members_and_bans(
        &self,
        room: &RoomId,
        users: &[UserId],
    ) -> StoreResult<HashMap<UserId, MemberAndBan>> {
        self.timed("member_and_ban", async move |conn| {
            let mut found = HashMap::new();
            for chunk in super::messages::pow2_chunks(users, USERS_PER_QUERY) {
                found.extend(super::rooms::members_and_bans_in(conn, room, chunk).await?);
            }
            Ok(found)
        })
        .await
    }
}
