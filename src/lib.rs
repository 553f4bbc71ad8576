//! # roomcast
//!
//! A self-hosted real-time messaging server: chat rooms with gapless, durable history
//! and resume-without-loss, delivered over WebSocket; accounts and tokens; an API
//! described in proto3 and served over HTTP by the Connect protocol's unary rules.
//!
//! ## Layout
//!
//! - [`settings`]: the one configuration tree (defaults → file → environment).
//! - [`proto`]: the generated protobuf types; `src/proto/**/*.proto` is the source of truth.
//! - [`store`]: sqlx persistence on SQLite or PostgreSQL, with per-backend migrations.
//! - [`actors`]: every actix actor, one per file: the auth actors, the room registry
//!   and room actors, user sessions, WebSocket connections.
//! - [`domain`]: the operations behind each RPC, shared by HTTP and WebSocket, with
//!   the access rules every RPC and frame passes and the audit log of moderation and
//!   admin actions (`domain::access_rules`, `domain::audit`, `domain::admin`).
//! - [`http`]: the route table, the Connect codec (one extractor/responder for every
//!   RPC), the error mapping, the WebSocket upgrade, health checks.
//! - [`app`]: starts the actors and the HTTP server, and shuts them down in order.
//! - [`error`]: `ApiError`, the Connect error code and message every request answers with.
//! - [`ids`], [`model`]: id newtypes and domain enums.

pub mod actors;
pub mod app;
pub mod domain;
pub mod error;
pub mod http;
pub mod ids;
pub mod model;
pub mod proto;
pub mod protocol;
pub mod settings;
pub mod store;
pub mod telemetry;
