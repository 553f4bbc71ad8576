//! The HTTP surface: what happens before HTTP ([`accept`]), who the client is behind
//! a reverse proxy ([`client_addr`]), the RPC route table over
//! the Connect codec, health checks, the WebSocket upgrade ([`ws`]), Server-Sent
//! Events ([`sse`]), TLS termination ([`tls`]). Handlers stay
//! thin: extract, call [`crate::domain`], encode.
//! [`configure`] is used by the server and by the tests alike.

pub mod accept;
pub mod client_addr;
pub mod connect;
mod draining;
mod health;
mod request_context;
mod routes;
pub mod sse;
pub mod tls;
pub mod web_client;
pub mod ws;

use actix_cors::Cors;
use actix_web::{http::header, web};

use crate::settings::CorsSettings;

pub use draining::close_keep_alive_while_draining;
pub use request_context::request_context;
pub use routes::configure as rpc_routes;

/// Mounts every route. The [`crate::domain::AppState`] must be in the app data.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz));
    cfg.route("/readyz", web::get().to(health::readyz));
    cfg.route(ws::WS_PATH, web::get().to(ws::not_an_upgrade));
    cfg.route(sse::SSE_PATH, web::get().to(sse::open));
    web_client::configure(cfg);
    routes::configure(cfg);
    cfg.default_service(web::to(routes::unknown_rpc));
}

/// CORS for browser clients on other origins; permissive only where configured.
pub fn cors(settings: &CorsSettings) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods(["GET", "POST", "OPTIONS"])
        .allowed_headers([
            header::CONTENT_TYPE,
            // Connect clients may gzip request bodies (see `connect`).
            header::CONTENT_ENCODING,
            header::AUTHORIZATION,
            header::ACCEPT,
            header::HeaderName::from_static("connect-protocol-version"),
            header::HeaderName::from_static("connect-timeout-ms"),
            header::HeaderName::from_static("x-user-agent"),
            header::HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([header::HeaderName::from_static("x-request-id")])
        .max_age(settings.max_age_secs);
    for origin in &settings.allowed_origins {
        cors = if origin == "*" {
            cors.allow_any_origin()
        } else {
            cors.allowed_origin(origin)
        };
    }
    cors
}
