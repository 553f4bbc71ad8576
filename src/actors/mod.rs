//! Every actix actor of roomcast, one per file.
//!
//! - [`password_hasher`]: `PasswordHasher`, a `SyncArbiter` pool that runs argon2id
//!   off the event loop.
//! - [`authenticator`]: `Authenticator`, the supervised actors every auth decision
//!   goes through (tokens, API keys, sessions), reached through `AuthPool`.
//! - [`room_registry`]: `RoomRegistry` (supervised), room id → running room actor.
//! - [`room`]: `RoomActor` (supervised), a room's sequence, recent-event ring,
//!   group commit and fan-out to subscribers.
//! - [`fanout_shard`]: `FanoutShard` (supervised), one per HTTP worker arbiter:
//!   delivers rooms' batches to that arbiter's connections, in parallel with the
//!   other shards.
//! - [`live_state`]: what a room actor keeps for a live room (controls, pinned
//!   message, reserved sequence numbers); not an actor.
//! - [`session_registry`]: `SessionRegistry` (supervised), user id → user session.
//! - [`user_session`]: `UserSession`, one online user's connections and presence.
//! - [`poll_hub`]: `PollHub` (supervised), wakes the long-polls waiting on this
//!   node (one room subscription per room with waiters); keeps no poll state.
//! - [`commit_batcher`]: `CommitBatcher` (supervised), the group commit across
//!   rooms on SQLite: one transaction and one log sync for many rooms' batches.
//! - [`retention`]: `RetentionSweeper` (supervised), prunes history past each
//!   room's retention.
//! - [`connection`]: `Connection`, one WebSocket: auth, frames, subscriptions,
//!   catch-up, heartbeats.
//! - [`sweep`]: `ConnectionSweep` (supervised), one per arbiter: the heartbeats
//!   and deadlines of that arbiter's connections, instead of timers per connection.
//! - [`supervision`]: turns a panic inside an actor's future into a stop its
//!   supervisor sees (and restarts).

pub mod authenticator;
pub mod commit_batcher;
pub mod connection;
pub mod fanout_shard;
pub mod live_state;
pub mod password_hasher;
pub mod poll_hub;
pub mod retention;
pub mod room;
pub mod room_registry;
pub mod session_registry;
pub mod supervision;
pub mod sweep;
pub mod user_session;
