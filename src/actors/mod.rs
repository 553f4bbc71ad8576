//! Every actix actor of roomcast, one per file.
//!
//! - [`password_hasher`]: `PasswordHasher`, a `SyncArbiter` pool that runs argon2id
//!   off the event loop.
//! - [`authenticator`]: `Authenticator`, the supervised actors every auth decision
//!   goes through (tokens, API keys, sessions), reached through `AuthPool`.
//! - [`room_registry`]: `RoomRegistry` (supervised), room id → running room actor.
//! - [`room`]: `RoomActor` (supervised), a room's sequence, recent-event ring,
//!   group commit and fan-out to subscribers.
//! - [`session_registry`]: `SessionRegistry` (supervised), user id → user session.
//! - [`user_session`]: `UserSession`, one online user's connections and presence.
//! - [`retention`]: `RetentionSweeper` (supervised), prunes history past each
//!   room's retention.
//! - [`connection`]: `Connection`, one WebSocket: auth, frames, subscriptions,
//!   catch-up, heartbeats.
//! - [`sweep`]: `ConnectionSweep` (supervised), one per arbiter: the heartbeats
//!   and deadlines of that arbiter's connections, instead of timers per connection.
//! - [`supervision`]: turns a panic inside an actor's future into a stop its
//!   supervisor sees (and restarts).

pub mod authenticator;
pub mod connection;
pub mod password_hasher;
pub mod retention;
pub mod room;
pub mod room_registry;
pub mod session_registry;
pub mod supervision;
pub mod sweep;
pub mod user_session;
