//! What every push transport shares. The subscription state machine (subscribing →
//! catching up → live → lagging, access re-checks, gap frames, removals, the user
//! notification feed) lives in one actor, [`crate::actors::connection::Connection`];
//! a transport only frames and writes, through an [`Outlet`]:
//!
//! - the WebSocket ([`crate::ws::transport::Transport`]): frames go out as
//!   WebSocket messages; client frames come in on the same socket;
//! - Server-Sent Events ([`sse`]): frames go out as SSE events whose `id:` is a
//!   resumable [`sse::Cursors`] token; the subscriptions are given by the request.

pub mod outlet;
pub mod sse;

pub use outlet::{Cursor, Outlet};
