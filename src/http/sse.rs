//! `GET /sse`: Server-Sent Events. A thin handler: it reads the cursors (query and
//! `Last-Event-ID`), authenticates the caller (so a bad token is an HTTP error, not
//! an event), takes an admission slot like a WebSocket, and hands the stream to a
//! [`Connection`] actor over an [`SseOutlet`]; the actor runs the same subscription
//! state machine as for a WebSocket. See `docs/sse.md`.
//!
//! Query parameters:
//! - `rooms=a,b:41`: the rooms; `room:seq` resumes after `seq` (otherwise live only);
//! - `notifications=live|off|<seq>`: the user's notification feed (default `live`
//!   for a user, `off` for an API key, which has no notifications);
//! - `access_token=...`: when the client cannot set `Authorization` (`EventSource`);
//! - `last_event_id=...`: like the `Last-Event-ID` header, which wins when both are set.

use std::sync::Arc;

use actix::{Actor as _, AsyncContext as _};
use actix_web::{http::header, web, HttpRequest, HttpResponse};

use super::{
    client_addr::client_ip,
    connect::{bearer_token, error_response},
};
use crate::{
    actors::{authenticator::Authenticate, connection::Connection},
    admission::{Admission, Refusal},
    domain::{AppState, Credential},
    error::ApiError,
    proto::v1 as pb,
    protocol::FrameCodec,
    realtime::sse::{Cursors, SseOutlet},
};

/// The SSE endpoint.
pub const SSE_PATH: &str = "/sse";

/// What a stream subscribes to, from the request.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    /// Rooms in the order given, each with the sequence to resume after.
    rooms: Vec<(String, Option<u64>)>,
    /// `None`: no notification feed; `Some(None)`: live only; `Some(Some(seq))`.
    notifications: Option<Option<u64>>,
    explicit_notifications: bool,
    /// `batch=true`: the rooms' busy periods arrive as `batch` events (docs/sse.md).
    batch: bool,
}

fn parse(query: &str, last_event_id: Option<&str>) -> Result<Request, ApiError> {
    let pairs: Vec<(String, String)> = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|e| ApiError::invalid(format!("malformed query: {e}")))?
        .into_inner();
    let mut request = Request {
        notifications: Some(None),
        ..Default::default()
    };
    let mut event_id = last_event_id.map(str::to_owned);
    for (key, value) in pairs {
        match key.as_str() {
            "rooms" => {
                for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    let (room, since) = match item.rsplit_once(':') {
                        Some((room, seq)) => {
                            let seq = seq.parse::<u64>().map_err(|_| {
                                ApiError::invalid(format!(
                                    "rooms: `{item}` is not `room` or `room:seq`"
                                ))
                            })?;
                            (room, Some(seq))
                        }
                        None => (item, None),
                    };
                    if room.is_empty() {
                        return Err(ApiError::invalid(format!("rooms: `{item}` names no room")));
                    }
                    if request.rooms.iter().any(|(r, _)| r == room) {
                        return Err(ApiError::invalid(format!("rooms: {room} is listed twice")));
                    }
                    request.rooms.push((room.to_owned(), since));
                }
            }
            "notifications" => {
                request.explicit_notifications = true;
                request.notifications = match value.as_str() {
                    "live" | "" => Some(None),
                    "off" => None,
                    seq => Some(Some(seq.parse::<u64>().map_err(|_| {
                        ApiError::invalid("notifications must be `live`, `off` or a sequence")
                    })?)),
                };
            }
            "batch" => {
                request.batch = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => return Err(ApiError::invalid("batch must be `true` or `false`")),
                };
            }
            "last_event_id" if event_id.is_none() => event_id = Some(value),
            _ => {}
        }
    }
    if let Some(id) = event_id.filter(|id| !id.trim().is_empty()) {
        let cursors = Cursors::decode(&id)
            .ok_or_else(|| ApiError::invalid("Last-Event-ID is not a cursor this server issued"))?;
        for (room, since) in &mut request.rooms {
            if let Some(seq) = cursors.rooms.get(room) {
                *since = Some(*seq);
            }
        }
        if let (Some(feed), Some(seq)) = (&mut request.notifications, cursors.notifications) {
            *feed = Some(seq);
        }
    }
    Ok(request)
}

/// `GET /sse`.
pub async fn open(
    req: HttpRequest,
    state: web::Data<AppState>,
    admission: Option<web::Data<Arc<Admission>>>,
) -> HttpResponse {
    match open_stream(&req, state.get_ref().clone(), admission).await {
        Ok(response) => response,
        Err((error, status)) => error_response(&error, status),
    }
}

async fn open_stream(
    req: &HttpRequest,
    state: AppState,
    admission: Option<web::Data<Arc<Admission>>>,
) -> Result<HttpResponse, (ApiError, Option<u16>)> {
    let plain = |e: ApiError| (e, None);
    if let Some(reason) = state.drain.reason() {
        // As for WebSockets: a draining node takes no new streams (503, so nginx
        // passes the request to another node; see deploy/nginx/roomcast.conf).
        return Err((
            ApiError::unavailable(format!(
                "this node is draining ({reason}): connect to another node"
            )),
            Some(503),
        ));
    }
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok());
    let mut request = parse(req.query_string(), last_event_id).map_err(plain)?;
    let max = state.settings.realtime.max_subscriptions;
    if request.rooms.len() > max {
        return Err(plain(ApiError::invalid(format!(
            "a stream may subscribe to at most {max} rooms (realtime.max_subscriptions)"
        ))));
    }
    let token = bearer_token(req.headers())
        .map_err(plain)?
        .or_else(|| {
            web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
                .ok()
                .and_then(|q| q.get("access_token").cloned())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            plain(ApiError::unauthenticated(
                "an access token is required (Authorization header or access_token)",
            ))
        })?;
    let principal = state
        .auth
        .send(Authenticate {
            bearer: token.clone(),
        })
        .await
        .map_err(plain)?;
    if matches!(principal.credential, Credential::ApiKey(_)) {
        if request.explicit_notifications && request.notifications.is_some() {
            return Err(plain(ApiError::denied(
                "an API key has no notifications; use notifications=off",
            )));
        }
        request.notifications = None;
    }
    let peer = client_ip(
        req.peer_addr().map(|a| a.ip()),
        req.headers(),
        &state.settings.server.trusted_proxies,
    );
    let ticket = match admission {
        Some(admission) => Some(admission.open_websocket(peer).map_err(|refusal| {
            tracing::info!(peer = ?peer, %refusal, "SSE stream refused");
            match refusal {
                Refusal::PerIp(_) => (ApiError::exhausted(refusal.to_string()), Some(429)),
                _ => (ApiError::unavailable(refusal.to_string()), Some(503)),
            }
        })?),
        None => None,
    };
    // The position the stream starts from: every `id:` extends it.
    let mut cursors = Cursors::default();
    for (room, since) in &request.rooms {
        if let Some(seq) = since {
            cursors.rooms.insert(room.clone(), *seq);
        }
    }
    if let Some(Some(seq)) = request.notifications {
        cursors.notifications = Some(seq);
    }
    let mut frames = Vec::new();
    let mut id = 0u64;
    let mut next_id = || {
        id += 1;
        id
    };
    use pb::client_frame::Kind as In;
    for (room_id, since_seq) in request.rooms {
        frames.push(pb::ClientFrame {
            id: next_id(),
            kind: Some(In::Subscribe(pb::Subscribe { room_id, since_seq })),
        });
    }
    if let Some(since_seq) = request.notifications {
        frames.push(pb::ClientFrame {
            id: next_id(),
            kind: Some(In::SubscribeNotifications(pb::SubscribeNotifications {
                since_seq,
            })),
        });
    }
    let (outlet, body, gone) = SseOutlet::new(&state.settings.realtime, cursors, ticket);
    let batch = request.batch;
    Connection::create(move |ctx| {
        ctx.add_stream(gone);
        Connection::with_outlet(state, FrameCodec::Json, Some(token), Box::new(outlet))
            .with_remote_addr(peer)
            .with_initial_frames(frames)
            .with_batches(batch)
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // nginx: do not buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_and_cursors() {
        let r = parse("rooms=a:41,b&notifications=off", None).unwrap();
        assert_eq!(r.rooms, vec![("a".into(), Some(41)), ("b".into(), None)]);
        assert_eq!(r.notifications, None);
        let mut c = Cursors::default();
        c.rooms.insert("b".into(), 7);
        c.notifications = Some(3);
        let r = parse("rooms=a:41,b", Some(&c.encode())).unwrap();
        assert_eq!(r.rooms, vec![("a".into(), Some(41)), ("b".into(), Some(7))]);
        assert_eq!(r.notifications, Some(Some(3)));
        assert!(parse("rooms=a:x", None).is_err());
        assert!(parse("rooms=a,a", None).is_err());
        assert!(parse("rooms=:0", None).is_err());
        assert!(parse("rooms=a", Some("garbage!")).is_err());
    }
}
