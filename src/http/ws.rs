//! WebSocket upgrades. actix-http hands every `Upgrade: websocket` request to
//! [`upgrade_service`] together with its socket (the HTTP service is built with its
//! upgrade hook in [`crate::app`]); this module answers the handshake itself and
//! takes the socket out of the HTTP/1 dispatcher, so roomcast's own framing
//! ([`crate::ws`]) runs over it:
//!
//! - `GET /ws`: picks the subprotocol (`roomcast.v1.json`, the default, or
//!   `roomcast.v1.proto`), checks `Origin` against `realtime.allowed_origins`, takes
//!   the connection's admission slots, reads an access token from the
//!   `Authorization` header or the `access_token` query parameter, and hands the
//!   socket to a new [`Connection`] actor;
//! - `realtime.echo_path` (off by default): the echo endpoint of [`crate::ws::echo`];
//! - any other path, or a request that is not a valid handshake: a Connect error
//!   answered over HTTP/1.1, then the socket is closed.
//!
//! A plain `GET /ws` without the upgrade headers reaches the route table and gets
//! [`not_an_upgrade`].

use std::{net::IpAddr, sync::Arc, time::Duration};

use actix::{Actor as _, AsyncContext as _};
use actix_codec::Encoder as _;
use actix_codec::Framed;
use actix_http::{
    body::BodySize,
    h1::{self, Codec},
    header::{self, HeaderMap},
    HttpMessage as _, Request, Response, StatusCode,
};
use actix_web::HttpResponse;
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt as _;

use super::{
    accept::WatchedStream,
    client_addr::client_ip,
    connect::{bearer_token, error_response},
};
use crate::{
    actors::connection::Connection,
    admission::{Admission, Refusal},
    domain::AppState,
    error::{ApiError, Code},
    protocol::{self, FrameCodec, SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO},
    ws::{echo, handshake, transport},
};

/// The roomcast WebSocket endpoint.
pub const WS_PATH: &str = "/ws";
/// How long writing a handshake answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The subprotocol to answer with (its codec, and whether it takes `batch` frames);
/// `Err` when the client offered only unknown ones.
fn choose_codec(headers: &HeaderMap) -> Result<(FrameCodec, bool), ApiError> {
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok((FrameCodec::Json, false));
    }
    // The client's order is its preference.
    if let Some(chosen) = offered.iter().find_map(|p| protocol::parse_subprotocol(p)) {
        return Ok(chosen);
    }
    Err(ApiError::invalid(format!(
        "unsupported WebSocket subprotocol(s) {offered:?}; use {SUBPROTOCOL_JSON} or {SUBPROTOCOL_PROTO}"
    )))
}

fn query_token(query: &str) -> Option<String> {
    actix_web::web::Query::<std::collections::HashMap<String, String>>::from_query(query)
        .ok()
        .and_then(|q| q.get("access_token").cloned())
        .filter(|t| !t.is_empty())
}

/// `GET /ws` that reached the route table: it did not ask for a WebSocket upgrade.
pub async fn not_an_upgrade() -> HttpResponse {
    let mut response = error_response(
        &ApiError::invalid(
            "WebSocket handshake failed: /ws needs `Connection: upgrade` and `Upgrade: websocket`",
        ),
        Some(426),
    );
    response.headers_mut().insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    response
}

/// What the upgrade service needs from the server.
#[derive(Clone)]
pub struct UpgradeContext {
    pub state: AppState,
    pub admission: Arc<Admission>,
}

/// The service actix-http calls with every upgrade request and its socket.
pub fn upgrade_service(
    context: UpgradeContext,
) -> impl actix_service::ServiceFactory<
    (Request, Framed<WatchedStream, Codec>),
    Config = (),
    Response = (),
    Error = actix_http::Error,
    InitError = (),
> {
    // One copy of the state per worker, shared by its connections (each clone of an
    // `AppState` clones actor addresses, which allocate).
    let shared = Arc::new(context.state);
    let admission = context.admission;
    actix_service::fn_service(
        move |(req, framed): (Request, Framed<WatchedStream, Codec>)| {
            let state = shared.clone();
            let admission = admission.clone();
            async move {
                upgrade(state, admission, req, framed).await;
                Ok::<_, actix_http::Error>(())
            }
        },
    )
}

/// Answers one upgrade request. An accepted WebSocket goes on after this returns:
/// its connection actor runs on this arbiter, its writer in the connection's task
/// (see [`crate::http::accept::Handover`]) once the HTTP/1 dispatcher, and all it
/// held for the request, is gone.
async fn upgrade(
    state: Arc<AppState>,
    admission: Arc<Admission>,
    req: Request,
    mut framed: Framed<WatchedStream, Codec>,
) {
    let settings = &state.settings;
    let path = req.path().to_owned();
    let echo_path = &settings.realtime.echo_path;
    let is_echo = !echo_path.is_empty() && path == *echo_path;
    if path != WS_PATH && !is_echo {
        let error = ApiError::not_found(format!("no WebSocket endpoint at {path}"));
        return refuse(&mut framed, &error, None).await;
    }
    let accept = match handshake::verify(req.head()) {
        Ok(accept) => accept,
        Err(e) => return refuse(&mut framed, &ApiError::invalid(e.to_string()), None).await,
    };
    if !handshake::origin_allowed(req.head(), &settings.realtime.allowed_origins) {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .unwrap_or("?");
        let error = ApiError::denied(format!(
            "WebSocket connections from origin {origin} are not allowed (realtime.allowed_origins)"
        ));
        return refuse(&mut framed, &error, None).await;
    }
    let limits = transport::Limits {
        max_message: settings.realtime.max_frame_bytes,
        max_queued: settings.realtime.max_write_queue_bytes,
        write_stall: Duration::from_millis(settings.realtime.write_stall_timeout_ms),
    };
    if is_echo {
        let head =
            h1::Message::Item((handshake::switching_protocols(accept, None), BodySize::None));
        if let Err(e) = answer_head(&mut framed, head).await {
            tracing::debug!(error = %e, "echo handshake not written");
            return;
        }
        let parts = framed.into_parts();
        let handover = parts.io.handover();
        let (reader, transport, writer) =
            transport::split(parts.io.into_inner(), parts.read_buf, limits);
        handover.run_after(echo::run(reader, transport, writer));
        return;
    }
    let (codec, batch) = match choose_codec(req.headers()) {
        Ok(chosen) => chosen,
        Err(e) => return refuse(&mut framed, &e, None).await,
    };
    let token = match bearer_token(req.headers()) {
        Ok(token) => token.or_else(|| query_token(req.uri().query().unwrap_or_default())),
        Err(e) => return refuse(&mut framed, &e, None).await,
    };
    let peer: Option<IpAddr> = client_ip(
        req.peer_addr().map(|a| a.ip()),
        req.headers(),
        &settings.server.trusted_proxies,
    );
    if let Some(reason) = state.drain.reason() {
        let error = ApiError::unavailable(format!(
            "this node is draining ({reason}): connect to another node"
        ));
        return refuse(&mut framed, &error, Some(503)).await;
    }
    let ticket = match admission.open_websocket(peer) {
        Ok(ticket) => ticket,
        Err(refusal) => {
            let (error, status) = match refusal {
                Refusal::PerIp(_) => (ApiError::exhausted(refusal.to_string()), Some(429)),
                _ => (ApiError::unavailable(refusal.to_string()), Some(503)),
            };
            tracing::info!(peer = ?peer, %refusal, "WebSocket refused");
            return refuse(&mut framed, &error, status).await;
        }
    };
    let protocol = req
        .headers()
        .contains_key(header::SEC_WEBSOCKET_PROTOCOL)
        .then_some(protocol::subprotocol(codec, batch));
    let response = handshake::switching_protocols(accept, protocol);
    // With a token in the request the answer waits for the connection's first frame
    // (`authenticated`, or the error and the close) and goes out with it in one
    // write; without one the client speaks next, so it goes out now.
    let mut held_answer = BytesMut::new();
    let head = h1::Message::Item((response, BodySize::None));
    let answered = if token.is_some() {
        framed.codec_mut().encode(head, &mut held_answer)
    } else {
        answer_head(&mut framed, head).await
    };
    if let Err(e) = answered {
        tracing::debug!(error = %e, "WebSocket handshake not written");
        return;
    }
    // Whatever the client sent after its request (its first frames) is in the
    // HTTP codec's read buffer: the reader starts with it. Everything else of the
    // request (the codec, its buffers, the request) is dropped with this function.
    let parts = framed.into_parts();
    let handover = parts.io.handover();
    let (reader, transport, writer) =
        transport::split(parts.io.into_inner(), parts.read_buf, limits);
    if !held_answer.is_empty() {
        transport.answer_with_first_frame(held_answer.freeze());
    }
    transport.hold_ticket(ticket);
    let open = crate::metrics::ConnectionGauge::open(
        "websocket",
        match codec {
            FrameCodec::Json => "json",
            FrameCodec::Proto => "proto",
        },
    );
    Connection::create(move |ctx| {
        ctx.add_stream(reader);
        Connection::new(state, codec, token, transport)
            .with_remote_addr(peer)
            .with_batches(batch)
    });
    // The connection lives as long as its writer: the server's graceful shutdown
    // waits for it like for any request in flight.
    handover.run_after(async move {
        writer.run().await;
        drop(open);
    });
}

/// Answers with a Connect error and closes the connection.
async fn refuse(framed: &mut Framed<WatchedStream, Codec>, error: &ApiError, status: Option<u16>) {
    let status = status.unwrap_or_else(|| error.code.http_status());
    let body = serde_json::json!({ "code": error.code.as_str(), "message": error.message });
    let body = Bytes::from(body.to_string());
    let mut response =
        Response::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST));
    response
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .force_close();
    if error.code == Code::ResourceExhausted || error.code == Code::Unavailable {
        response.insert_header((header::RETRY_AFTER, "1"));
    }
    let response = response.body(()).drop_body();
    if let Err(e) = answer(framed, response, body).await {
        tracing::debug!(error = %e, "WebSocket refusal not written");
    }
}

/// Writes an HTTP/1.1 response with a body through the dispatcher's codec.
async fn answer(
    framed: &mut Framed<WatchedStream, Codec>,
    response: Response<()>,
    body: Bytes,
) -> std::io::Result<()> {
    let size = BodySize::Sized(body.len() as u64);
    let mut parts = vec![h1::Message::Item((response, size))];
    if !body.is_empty() {
        parts.push(h1::Message::Chunk(Some(body)));
    }
    parts.push(h1::Message::Chunk(None));
    write_parts(framed, parts).await
}

/// Writes a response head without a body (`101 Switching Protocols`).
async fn answer_head(
    framed: &mut Framed<WatchedStream, Codec>,
    head: h1::Message<(Response<()>, BodySize)>,
) -> std::io::Result<()> {
    write_parts(framed, vec![head]).await
}

/// Feeds `parts` to the dispatcher's codec and flushes them, within
/// [`ANSWER_TIMEOUT`].
async fn write_parts(
    framed: &mut Framed<WatchedStream, Codec>,
    parts: Vec<h1::Message<(Response<()>, BodySize)>>,
) -> std::io::Result<()> {
    let write = async {
        for part in parts {
            framed.feed(part).await?;
        }
        framed.flush().await
    };
    tokio::time::timeout(ANSWER_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
