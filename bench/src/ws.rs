//! The WebSocket client of senders and publishers (tokio-tungstenite): one
//! connection in the bench's codec, frames in and out. Subscribers, the thousands of
//! connections that mostly read, use the leaner [`crate::lean`] client.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use roomcast::proto::v1 as pb;
use tokio::{
    net::TcpStream,
    time::{timeout_at, Instant},
};
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest as _, protocol::WebSocketConfig, Message},
    WebSocketStream,
};

use crate::{Codec, REPLY_TIMEOUT};
use pb::server_frame::Kind as Out;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// What reading the next server frame gave.
pub(crate) enum Incoming {
    Frame(Box<pb::ServerFrame>),
    /// The connection ended: close code and reason (1006 when it just broke).
    Closed(u16, String),
}

/// One WebSocket connection in the bench's codec.
pub(crate) struct Conn {
    pub(crate) ws: Ws,
    pub(crate) codec: Codec,
}

impl Conn {
    /// Connects to `addr` with `token` in the upgrade request and waits for
    /// `authenticated`.
    pub(crate) async fn open(addr: SocketAddr, codec: Codec, token: &str) -> Result<Self> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let socket = connect(addr, deadline).await?;
        let subprotocol = codec.subprotocol();
        let mut request = format!("ws://{addr}/ws").into_client_request()?;
        let headers = request.headers_mut();
        headers.insert("sec-websocket-protocol", subprotocol.parse()?);
        headers.insert("authorization", format!("Bearer {token}").parse()?);
        let upgrade =
            tokio_tungstenite::client_async_with_config(request, socket, Some(client_config()));
        let (ws, response) = timeout_at(deadline, upgrade)
            .await
            .map_err(|_| anyhow!("WebSocket upgrade timed out"))?
            .context("WebSocket upgrade")?;
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        ensure!(
            chosen == Some(subprotocol),
            "the server chose subprotocol {chosen:?}, not {subprotocol}"
        );
        let mut conn = Self { ws, codec };
        while !authenticated(conn.next(deadline).await?)? {}
        Ok(conn)
    }

    pub(crate) async fn next(&mut self, deadline: Instant) -> Result<Incoming> {
        timeout_at(deadline, read_frame(&mut self.ws, self.codec))
            .await
            .map_err(|_| anyhow!("no frame from the server in time"))?
    }
}

/// A TCP connection to `addr` by `deadline`, with Nagle's algorithm off.
pub(crate) async fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    let socket = timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("TCP connect to {addr} timed out"))?
        .with_context(|| format!("TCP connect to {addr}"))?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// What a frame read while waiting for `authenticated` says: `true` once it came,
/// `false` to read on, an error when the server refused or closed.
pub(crate) fn authenticated(incoming: Incoming) -> Result<bool> {
    match incoming {
        Incoming::Frame(frame) => match frame.kind {
            Some(Out::Authenticated(_)) => Ok(true),
            Some(Out::Error(e)) => bail!("authentication failed: {}: {}", e.code, e.message),
            _ => Ok(false),
        },
        Incoming::Closed(code, reason) => bail!("closed before authenticating: {code} {reason}"),
    }
}

/// The generator's read buffer per connection. tungstenite's default, 128 KiB, is
/// zero-filled up to its capacity before every socket read (`FrameCodec::read_in`):
/// about 100 KiB of memset per read, which made the generator, not the server, the
/// bottleneck past ~100k frames/s and cost it a page-faulted 128 KiB per connection
/// in the storm. Server frames here are small (a live batch of a window is a few
/// KiB); a larger frame still arrives whole, the buffer grows for it.
const READ_BUFFER_BYTES: usize = 8 * 1024;

fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES)
}

pub(crate) fn encode_frame(codec: Codec, frame: &pb::ClientFrame) -> Message {
    match codec {
        Codec::Proto => Message::binary(frame.encode_to_vec()),
        // Serializing a generated pbjson type into a String cannot fail.
        Codec::Json => Message::text(serde_json::to_string(frame).unwrap_or_default()),
    }
}

/// Reads the next server frame; WebSocket pings are answered by tungstenite.
/// Cancel-safe: a frame is consumed and returned in the same poll.
pub(crate) async fn read_frame<S>(stream: &mut S, codec: Codec) -> Result<Incoming>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                let frame = pb::ServerFrame::decode(bytes).context("undecodable protobuf frame")?;
                return Ok(Incoming::Frame(Box::new(frame)));
            }
            Some(Ok(Message::Text(text))) => {
                let frame: pb::ServerFrame =
                    serde_json::from_str(text.as_str()).context("undecodable JSON frame")?;
                if codec == Codec::Proto {
                    bail!("a text frame on a {} connection", codec.subprotocol());
                }
                return Ok(Incoming::Frame(Box::new(frame)));
            }
            Some(Ok(Message::Close(close))) => {
                let (code, reason) = close
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Ok(Incoming::Closed(code, reason));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Ok(Incoming::Closed(1006, e.to_string())),
            None => return Ok(Incoming::Closed(1006, "stream ended".into())),
        }
    }
}

// ---------------------------------------------------------------------------
// Clock, payloads, statistics, /proc
