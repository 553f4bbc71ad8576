//! `GET /ws`: the WebSocket upgrade. Picks the subprotocol (`roomcast.v1.json`, the
//! default, or `roomcast.v1.proto`), takes an access token from the
//! `Authorization` header or the `access_token` query parameter when given, and
//! hands the socket to a [`Connection`] actor.

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use actix_web_actors::ws;

use super::connect::{bearer_token, error_response};
use crate::{
    actors::connection::Connection,
    domain::AppState,
    error::ApiError,
    protocol::{FrameCodec, SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO},
};

/// The subprotocol to answer with; `Err` when the client offered only unknown ones.
fn choose_codec(req: &HttpRequest) -> Result<FrameCodec, ApiError> {
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(FrameCodec::Json);
    }
    for protocol in &offered {
        match protocol.as_str() {
            SUBPROTOCOL_JSON => return Ok(FrameCodec::Json),
            SUBPROTOCOL_PROTO => return Ok(FrameCodec::Proto),
            _ => {}
        }
    }
    Err(ApiError::invalid(format!(
        "unsupported WebSocket subprotocol(s) {offered:?}; use {SUBPROTOCOL_JSON} or {SUBPROTOCOL_PROTO}"
    )))
}

fn query_token(req: &HttpRequest) -> Option<String> {
    web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("access_token").cloned())
        .filter(|t| !t.is_empty())
}

/// Upgrades to a WebSocket served by a new [`Connection`].
pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let codec = match choose_codec(&req) {
        Ok(codec) => codec,
        Err(e) => return error_response(&e, None),
    };
    let token = match bearer_token(req.headers()) {
        Ok(token) => token.or_else(|| query_token(&req)),
        Err(e) => return error_response(&e, None),
    };
    let protocol = match codec {
        FrameCodec::Json => SUBPROTOCOL_JSON,
        FrameCodec::Proto => SUBPROTOCOL_PROTO,
    };
    let offered_any = req.headers().contains_key(header::SEC_WEBSOCKET_PROTOCOL);
    let max_frame = state.settings.realtime.max_frame_bytes;
    let actor = Connection::new(state.get_ref().clone(), codec, token);
    let mut builder = ws::WsResponseBuilder::new(actor, &req, stream).frame_size(max_frame);
    let protocols = [protocol];
    if offered_any {
        builder = builder.protocols(&protocols);
    }
    match builder.start() {
        Ok(response) => response,
        Err(e) => error_response(
            &ApiError::invalid(format!("WebSocket handshake failed: {e}")),
            None,
        ),
    }
}
