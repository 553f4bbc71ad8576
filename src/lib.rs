//! # roomcast
//!
//! A self-hosted real-time messaging server: chat rooms with gapless, durable history
//! and resume-without-loss, delivered over WebSocket; accounts and tokens; an API
//! described in proto3 and served over HTTP by the Connect protocol's unary rules.
//!
//! ## Layout
//!
//! `docs/architecture.md` (in the repository) shows how these fit together and
//! traces one message from the socket through the actors and the store back out
//! to subscribers, file by file.
//!
//! - [`actors`]: every actix actor, one per file (auth, rooms, sessions, connections).
//! - [`admission`]: connection caps: server-wide, per address, per user, unauthenticated.
//! - [`app`]: starts the actors and the HTTP server, and shuts them down in order.
//! - [`cluster`]: the broker everything that crosses nodes goes through (room events,
//!   user pushes, control commands, presence): in-process alone, Redis pub/sub
//!   between nodes; and the per-room cross-node order (holes filled from the store).
//! - [`domain`]: the operations behind each RPC, shared by HTTP and WebSocket, with
//!   the access rules every RPC and frame passes and the audit log of moderation and
//!   admin actions.
//! - [`error`]: `ApiError`, the Connect error code and message every request answers with.
//! - [`http`]: connection accept (h1/h2c), Connect codec, route table, WebSocket upgrade,
//!   Server-Sent Events (`GET /sse`).
//! - [`ids`]: id newtypes and their generation.
//! - [`model`]: domain enums with their stored and protobuf forms.
//! - [`proto`]: the generated protobuf types; `src/proto/**/*.proto` is the source of truth.
//! - [`protocol`]: WebSocket wire details: subprotocols, shared encoded frames, close codes.
//! - [`realtime`]: what push transports share: the `Outlet` a connection writes through
//!   (WebSocket or SSE) and the SSE framing with its resumable cursors.
//! - [`settings`]: the one configuration tree (defaults → file → environment).
//! - [`store`]: sqlx persistence on SQLite or PostgreSQL, with per-backend migrations.
//! - [`metrics`]: Prometheus metrics (one registry, its handles, `/metrics`).
//! - [`telemetry`]: structured logging with `tracing`, as text or JSON lines.
//! - [`ws`]: roomcast's own WebSocket framing: decoder, handshake, transport, echo.

pub mod actors;
pub mod admission;
pub mod app;
pub mod cluster;
pub mod domain;
pub mod error;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod model;
pub mod proto;
pub mod protocol;
pub mod realtime;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod ws;
