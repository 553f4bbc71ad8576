//! A WebSocket client for the roomcast protocol, over a real socket: either
//! subprotocol, request/reply matching by frame id, pushes kept in arrival order.

use std::{collections::VecDeque, time::Duration};

use futures_util::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use roomcast::proto::v1 as pb;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest as _, protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

/// How long a reply may take before the test fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// The two subprotocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsCodec {
    Json,
    Proto,
}

impl WsCodec {
    pub fn subprotocol(self) -> &'static str {
        match self {
            WsCodec::Json => "roomcast.v1.json",
            WsCodec::Proto => "roomcast.v1.proto",
        }
    }
}

/// What reading the next frame gave.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a test helper; frames are read one at a time
pub enum Incoming {
    Frame(pb::ServerFrame),
    /// The server closed the connection with this code and reason.
    Closed(u16, String),
    /// Nothing arrived in time.
    Timeout,
}

/// One WebSocket connection to a test server.
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub codec: WsCodec,
    next_id: u64,
    /// Pushes (and replies nobody waited for) in arrival order.
    pub pushes: VecDeque<pb::ServerFrame>,
    pub closed: Option<(u16, String)>,
}

impl WsClient {
    /// Connects to `url` (`ws://.../ws?...`), offering `codec`'s subprotocol and, when
    /// given, `Authorization: Bearer <token>`.
    pub async fn connect(url: &str, codec: WsCodec, token: Option<&str>) -> Self {
        let mut request = url.into_client_request().expect("a valid ws url");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            codec.subprotocol().parse().expect("header value"),
        );
        if let Some(token) = token {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header value"),
            );
        }
        let (stream, response) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        assert_eq!(
            chosen,
            Some(codec.subprotocol()),
            "the server picks the offered subprotocol"
        );
        Self {
            stream,
            codec,
            next_id: 1,
            pushes: VecDeque::new(),
            closed: None,
        }
    }

    /// Upgrades an already connected socket (e.g. one with a tiny receive buffer)
    /// and waits for `authenticated`.
    pub async fn from_stream(stream: TcpStream, url: &str, codec: WsCodec, token: &str) -> Self {
        Self::over(MaybeTlsStream::Plain(stream), url, codec, token).await
    }

    /// Upgrades an already connected socket, plain or TLS (`wss://`), and waits
    /// for `authenticated`.
    pub async fn over(
        stream: MaybeTlsStream<TcpStream>,
        url: &str,
        codec: WsCodec,
        token: &str,
    ) -> Self {
        let mut request = url.into_client_request().expect("a valid ws url");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            codec.subprotocol().parse().expect("header value"),
        );
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header value"),
        );
        let (stream, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap_or_else(|e| panic!("upgrade {url}: {e}"));
        Self::from_upgraded(stream, codec).await
    }

    /// Wraps a WebSocket the caller upgraded itself (with a token) and waits for
    /// `authenticated`.
    pub async fn from_upgraded(
        stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
        codec: WsCodec,
    ) -> Self {
        let mut client = Self {
            stream,
            codec,
            next_id: 1,
            pushes: VecDeque::new(),
            closed: None,
        };
        match client.next_frame(REPLY_TIMEOUT).await {
            Incoming::Frame(pb::ServerFrame {
                kind: Some(Out::Authenticated(_)),
                ..
            }) => client,
            other => panic!("expected `authenticated`, got {other:?}"),
        }
    }

    /// Connects offering `codec`'s `+batch` subprotocol (the client takes `batch`
    /// frames) over `stream` when given (e.g. one with a tiny receive buffer), with
    /// `token` in the upgrade request when given; waits for `authenticated` then.
    pub async fn connect_batched(
        url: &str,
        codec: WsCodec,
        token: Option<&str>,
        stream: Option<TcpStream>,
    ) -> Self {
        let subprotocol = format!("{}+batch", codec.subprotocol());
        let mut request = url.into_client_request().expect("a valid ws url");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            subprotocol.parse().expect("header value"),
        );
        if let Some(token) = token {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header value"),
            );
        }
        let (stream, response) = match stream {
            Some(stream) => {
                tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await
            }
            None => tokio_tungstenite::connect_async(request).await,
        }
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        assert_eq!(
            chosen,
            Some(subprotocol.as_str()),
            "the server picks +batch"
        );
        let mut client = Self {
            stream,
            codec,
            next_id: 1,
            pushes: VecDeque::new(),
            closed: None,
        };
        if token.is_some() {
            match client.next_frame(REPLY_TIMEOUT).await {
                Incoming::Frame(pb::ServerFrame {
                    kind: Some(Out::Authenticated(_)),
                    ..
                }) => {}
                other => panic!("expected `authenticated`, got {other:?}"),
            }
        }
        client
    }

    /// Connects with a token in the upgrade request and waits for `authenticated`.
    pub async fn connect_authenticated(url: &str, codec: WsCodec, token: &str) -> Self {
        let mut client = Self::connect(url, codec, Some(token)).await;
        match client.next_frame(REPLY_TIMEOUT).await {
            Incoming::Frame(pb::ServerFrame {
                kind: Some(Out::Authenticated(_)),
                ..
            }) => client,
            other => panic!("expected `authenticated`, got {other:?}"),
        }
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send a frame");
    }

    /// Sends a client frame in this connection's codec.
    pub async fn send_frame(&mut self, frame: &pb::ClientFrame) {
        let message = match self.codec {
            WsCodec::Json => Message::text(serde_json::to_string(frame).expect("encode JSON")),
            WsCodec::Proto => Message::binary(frame.encode_to_vec()),
        };
        self.send_raw(message).await;
    }

    /// Reads the next server frame (pings are answered by the library).
    pub async fn next_frame(&mut self, timeout: Duration) -> Incoming {
        if let Some((code, reason)) = &self.closed {
            return Incoming::Closed(*code, reason.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Incoming::Timeout,
                Ok(next) => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    let frame: pb::ServerFrame = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("undecodable JSON frame ({e}): {text}"));
                    return Incoming::Frame(frame);
                }
                Some(Ok(Message::Binary(bytes))) => {
                    let frame =
                        pb::ServerFrame::decode(bytes.as_ref()).expect("decodable protobuf frame");
                    return Incoming::Frame(frame);
                }
                Some(Ok(Message::Close(close))) => {
                    let (code, reason) = close_parts(close);
                    self.closed = Some((code, reason.clone()));
                    return Incoming::Closed(code, reason);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    self.closed = Some((1006, e.to_string()));
                    return Incoming::Closed(1006, e.to_string());
                }
                None => {
                    self.closed = Some((1006, "stream ended".into()));
                    return Incoming::Closed(1006, "stream ended".into());
                }
            }
        }
    }

    /// Sends a request and waits for the frame answering it; pushes that arrive
    /// first are kept in [`WsClient::pushes`].
    pub async fn request(&mut self, kind: In) -> pb::ServerFrame {
        let id = self.next_id;
        self.next_id += 1;
        self.send_frame(&pb::ClientFrame {
            id,
            kind: Some(kind),
        })
        .await;
        self.await_reply(id).await
    }

    /// Waits for the frame with `id`.
    pub async fn await_reply(&mut self, id: u64) -> pb::ServerFrame {
        loop {
            match self.next_frame(REPLY_TIMEOUT).await {
                Incoming::Frame(frame) if frame.id == id => return frame,
                Incoming::Frame(frame) => self.pushes.push_back(frame),
                other => panic!("waiting for the reply to request {id}: {other:?}"),
            }
        }
    }

    /// Subscribes; answers `last_seq` from the `subscribed` reply or the error.
    pub async fn subscribe(&mut self, room_id: &str, since: Option<u64>) -> Result<u64, pb::Error> {
        let reply = self
            .request(In::Subscribe(pb::Subscribe {
                room_id: room_id.to_owned(),
                since_seq: since,
            }))
            .await;
        match reply.kind {
            Some(Out::Subscribed(s)) => Ok(s.last_seq),
            Some(Out::Error(e)) => Err(e),
            other => panic!("unexpected reply to subscribe: {other:?}"),
        }
    }

    /// Sends a message; answers the acknowledgement or the error.
    pub async fn send_message(
        &mut self,
        room_id: &str,
        text: &str,
        client_message_id: &str,
    ) -> Result<pb::SendMessageResponse, pb::Error> {
        let reply = self
            .request(In::Send(pb::SendMessageRequest {
                room_id: room_id.to_owned(),
                text: text.to_owned(),
                client_message_id: client_message_id.to_owned(),
                ..Default::default()
            }))
            .await;
        match reply.kind {
            Some(Out::Sent(sent)) => Ok(sent),
            Some(Out::Error(e)) => Err(e),
            other => panic!("unexpected reply to send: {other:?}"),
        }
    }

    /// The next push, from the backlog or the socket.
    pub async fn next_push(&mut self, timeout: Duration) -> Incoming {
        if let Some(frame) = self.pushes.pop_front() {
            return Incoming::Frame(frame);
        }
        self.next_frame(timeout).await
    }

    /// Reads pushes until the room's message events reach `last_seq`; answers the
    /// events (message, edited, deleted) of that room in arrival order. Panics on a
    /// close or when nothing arrives for `idle`.
    pub async fn collect_until(
        &mut self,
        room_id: &str,
        last_seq: u64,
        idle: Duration,
    ) -> Vec<pb::Message> {
        let mut events = Vec::new();
        let mut seen_last = 0;
        while seen_last < last_seq {
            match self.next_push(idle).await {
                Incoming::Frame(frame) => {
                    if let Some(m) = room_event(&frame).filter(|m| m.room_id == room_id) {
                        seen_last = seen_last.max(m.seq);
                        events.push(m.clone());
                    }
                }
                other => {
                    panic!("collecting {room_id} up to {last_seq} (at {seen_last}): {other:?}")
                }
            }
        }
        events
    }

    /// The next push for which `pick` answers `Some`, skipping others; panics when
    /// the connection closes or nothing matching arrives for `timeout`.
    pub async fn push_matching<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Out) -> Option<T>,
    ) -> T {
        loop {
            match self.next_push(timeout).await {
                Incoming::Frame(pb::ServerFrame {
                    kind: Some(kind), ..
                }) => {
                    if let Some(found) = pick(&kind) {
                        return found;
                    }
                }
                Incoming::Frame(_) => continue,
                other => panic!("waiting for a push: {other:?}"),
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// The history event a push carries, if it is one.
pub fn room_event(frame: &pb::ServerFrame) -> Option<&pb::Message> {
    match &frame.kind {
        Some(Out::Message(m) | Out::Edited(m) | Out::Deleted(m)) => Some(m),
        _ => None,
    }
}

fn close_parts(close: Option<CloseFrame>) -> (u16, String) {
    match close {
        Some(frame) => (u16::from(frame.code), frame.reason.to_string()),
        None => (1005, String::new()),
    }
}

/// Runs `$body(backend, codec)` for SQLite and PostgreSQL, each with the JSON and
/// the binary subprotocol: a module `$name` with four tests.
#[macro_export]
macro_rules! ws_matrix {
    ($name:ident, $body:ident) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite_json() {
                $body(
                    $crate::common::Backend::Sqlite,
                    $crate::common::ws::WsCodec::Json,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite_proto() {
                $body(
                    $crate::common::Backend::Sqlite,
                    $crate::common::ws::WsCodec::Proto,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres_json() {
                if $crate::common::postgres_available() {
                    $body(
                        $crate::common::Backend::Postgres,
                        $crate::common::ws::WsCodec::Json,
                    )
                    .await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres_proto() {
                if $crate::common::postgres_available() {
                    $body(
                        $crate::common::Backend::Postgres,
                        $crate::common::ws::WsCodec::Proto,
                    )
                    .await;
                }
            }
        }
    };
}
