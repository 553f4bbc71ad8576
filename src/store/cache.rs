//! The store's in-memory cache of the facts every request checks: a room's record,
//! a user's membership, ban and invitation there, an access token's session, and
//! a user's record and suspension. Without it a durable send read the room and
//! the membership from the database before its append could commit, and a new
//! connection paid about seven queries to authenticate and subscribe.
//!
//! Exactness: every store write that changes one of these facts drops the entries
//! it touches, after its commit, through [`Store::invalidate_access`](super::Store::invalidate_access) with an
//! [`AccessChange`] (the one way in: another node's changes are forwarded to it
//! the same way). A read that missed fills the cache only if no invalidation ran
//! since it started reading (a generation counter), so a fill that raced a write
//! never brings back what the write replaced.
//!
//! What is cached is only for access decisions: a cached room's `last_seq` and a
//! cached membership's `last_read_seq` are as of when they were read.
//! Time-dependent facts (mute, ban and session expiry) are kept as records and
//! judged at the time of the check. Bounded by `store.access_cache_max_entries`
//! per kind of fact: a full map is cleared (rare; the next reads fill it again).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};

use super::{BanRecord, MemberRecord, RoomRecord, SessionRecord, UserRecord};
use crate::ids::{RoomId, SessionId, UserId};

/// A change to the facts that decide access, which cached copies must not outlive.
/// The store's own writes raise these; a node that learns of another node's write
/// (sharing the database) passes it to [`Store::invalidate_access`](super::Store::invalidate_access) as well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum AccessChange {
    /// The room's settings changed.
    Room { room: RoomId },
    /// The room was deleted (with its memberships, bans and invitations).
    RoomDeleted { room: RoomId },
    /// The user's membership, role, mute, ban or invitation in the room changed.
    Member { room: RoomId, user: UserId },
    /// The user's record, role or suspension changed, or all their sessions ended.
    User { user: UserId },
    /// One session was revoked or its lifetime changed.
    Session { session: SessionId },
}

/// A user's standing in a room, as the store holds it.
#[derive(Debug, Clone)]
pub struct MemberFacts {
    /// The membership, if a member.
    pub member: Option<MemberRecord>,
    /// The ban record, if any, whether or not it is still in force (judge it by
    /// its `expires_at`). Only read for non-members (a ban removes the membership).
    pub ban: Option<BanRecord>,
    /// A pending invitation. Only read for non-members of private rooms.
    pub invited: bool,
}

/// What an access token's check needs: the session, the user and the suspension.
#[derive(Debug, Clone)]
pub struct SessionFacts {
    /// `None`: no such session.
    pub session: Option<SessionRecord>,
    /// `None`: no such user.
    pub user: Option<UserRecord>,
    pub suspended: bool,
}

/// The maps and the generation they were last invalidated at.
#[derive(Default)]
struct Maps {
    /// Bumped by every invalidation; a fill started before the bump is dropped.
    generation: u64,
    rooms: HashMap<RoomId, Arc<RoomRecord>>,
    members: HashMap<(RoomId, UserId), Arc<MemberFacts>>,
    sessions: HashMap<SessionId, Arc<SessionFacts>>,
    user_rooms: HashMap<UserId, Arc<Vec<RoomId>>>,
}

/// Shared by a store and its clones.
pub(crate) struct AccessCache {
    maps: Mutex<Maps>,
    max_entries: usize,
}

/// The generation a read started at; hand it back to fill the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket(u64);

impl std::fmt::Debug for AccessCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessCache")
    }
}

impl AccessCache {
    /// A cache of at most `max_entries` per kind of fact; 0 turns it off.
    pub(crate) fn new(max_entries: usize) -> Self {
        Self {
            maps: Mutex::default(),
            max_entries,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // The maps are plain data: one left by a panicking thread is still whole.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the cache is on.
    pub(crate) fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// Take before reading what a miss fills in.
    pub(crate) fn ticket(&self) -> Ticket {
        Ticket(self.lock().generation)
    }

    pub(crate) fn room(&self, room: &RoomId) -> Option<Arc<RoomRecord>> {
        self.lock().rooms.get(room).cloned()
    }

    pub(crate) fn member(&self, room: &RoomId, user: &UserId) -> Option<Arc<MemberFacts>> {
        self.lock()
            .members
            .get(&(room.clone(), user.clone()))
            .cloned()
    }

    pub(crate) fn session(&self, session: &SessionId) -> Option<Arc<SessionFacts>> {
        self.lock().sessions.get(session).cloned()
    }

    pub(crate) fn user_rooms(&self, user: &UserId) -> Option<Arc<Vec<RoomId>>> {
        self.lock().user_rooms.get(user).cloned()
    }

    pub(crate) fn fill_room(&self, ticket: Ticket, room: RoomRecord) {
        let max = self.max_entries;
        self.fill(ticket, |maps| {
            bounded_insert(&mut maps.rooms, max, room.id.clone(), Arc::new(room));
        });
    }

    pub(crate) fn fill_member(
        &self,
        ticket: Ticket,
        room: RoomId,
        user: UserId,
        facts: MemberFacts,
    ) {
        let max = self.max_entries;
        self.fill(ticket, |maps| {
            bounded_insert(&mut maps.members, max, (room, user), Arc::new(facts));
        });
    }

    pub(crate) fn fill_session(&self, ticket: Ticket, id: SessionId, facts: SessionFacts) {
        let max = self.max_entries;
        self.fill(ticket, |maps| {
            bounded_insert(&mut maps.sessions, max, id, Arc::new(facts));
        });
    }

    pub(crate) fn fill_user_rooms(&self, ticket: Ticket, user: UserId, rooms: Vec<RoomId>) {
        let max = self.max_entries;
        self.fill(ticket, |maps| {
            bounded_insert(&mut maps.user_rooms, max, user, Arc::new(rooms));
        });
    }

    fn fill(&self, ticket: Ticket, insert: impl FnOnce(&mut Maps)) {
        if !self.enabled() {
            return;
        }
        let mut maps = self.lock();
        if maps.generation == ticket.0 {
            insert(&mut maps);
        }
    }

    /// Drops every entry `change` may have made wrong.
    pub(crate) fn invalidate(&self, change: &AccessChange) {
        let mut maps = self.lock();
        maps.generation = maps.generation.wrapping_add(1);
        match change {
            AccessChange::Room { room } => {
                maps.rooms.remove(room);
            }
            AccessChange::RoomDeleted { room } => {
                maps.rooms.remove(room);
                maps.members.retain(|(r, _), _| r != room);
                maps.user_rooms.retain(|_, rooms| !rooms.contains(room));
            }
            AccessChange::Member { room, user } => {
                maps.members.remove(&(room.clone(), user.clone()));
                maps.user_rooms.remove(user);
            }
            AccessChange::User { user } => {
                maps.sessions.retain(|_, facts| {
                    facts.session.as_ref().is_some_and(|s| s.user_id != user.0)
                        && facts.user.as_ref().is_some_and(|u| u.id != *user)
                });
            }
            AccessChange::Session { session } => {
                maps.sessions.remove(session);
            }
        }
    }
}

/// Inserts, clearing the map first when it is full.
fn bounded_insert<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    key: K,
    value: V,
) {
    if map.len() >= max && !map.contains_key(&key) {
        map.clear();
    }
    map.insert(key, value);
}
