//! A lean WebSocket client for subscribers, the generator's hot path: thousands of
//! connections that mostly read. tokio-tungstenite costs the generator about as much
//! CPU per delivered event as the server spends delivering it (a waker and a stream
//! poll per frame, its read buffer zero-filled before every read), which made the
//! generator, not the server, set the figures of the live scenarios. This client
//! reads server frames straight out of one growable buffer per connection (no
//! zero-filling, no copy of a payload), answers pings, and writes the few frames a
//! subscriber sends (masked, RFC 6455 §5.3).
//!
//! The handshake is checked as any client checks it: `101 Switching Protocols`,
//! the `Sec-WebSocket-Accept` derived from our key, and the subprotocol asked for.
//! Fragmented messages are reassembled; a masked or malformed server frame, or one
//! past [`MAX_MESSAGE`], ends the connection with an error.

use std::{net::SocketAddr, time::Duration};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures_util::{stream, StreamExt as _};
use prost::Message as _;
use roomcast::proto::v1 as pb;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::{timeout_at, Instant},
};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::{
    api::Account,
    ws::{authenticated, connect, Incoming},
    Codec, REPLY_TIMEOUT,
};
use pb::{client_frame::Kind as In, server_frame::Kind as Out};

/// Spare room kept in the read buffer before each read: a live batch of one window
/// is a few KiB; a larger frame grows the buffer for as long as it is in flight.
const READ_CHUNK: usize = 8 * 1024;
/// The largest message this client takes (the server's default frame limit is far
/// below it).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Bytes of the server's handshake answer we wait for at most.
const MAX_HANDSHAKE: usize = 16 * 1024;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// One subscriber's WebSocket.
pub(crate) struct LeanWs {
    stream: TcpStream,
    buf: BytesMut,
    /// Frames not yet written (a pong, a subscribe, the close).
    out: BytesMut,
    codec: Codec,
    next_id: u64,
    /// A fragmented message being reassembled: its opcode and the bytes so far.
    fragments: Option<(u8, BytesMut)>,
    /// The server's close frame (or the connection's end) was seen.
    closed: bool,
}

impl LeanWs {
    /// Connects to `addr` (the `+batch` subprotocol when `batch`) with `token` in the
    /// upgrade request, or as an anonymous viewer without one; waits for
    /// `authenticated`.
    pub(crate) async fn open(
        addr: SocketAddr,
        codec: Codec,
        batch: bool,
        token: Option<&str>,
    ) -> Result<Self> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let stream = connect(addr, deadline).await?;
        let mut ws = Self {
            stream,
            buf: BytesMut::new(),
            out: BytesMut::new(),
            codec,
            next_id: 1,
            fragments: None,
            closed: false,
        };
        timeout_at(
            deadline,
            ws.handshake(addr, codec.subprotocol_with(batch), token),
        )
        .await
        .map_err(|_| anyhow!("WebSocket upgrade timed out"))??;
        if token.is_none() {
            let id = ws.take_id();
            ws.send(id, In::AuthenticateAnonymous(pb::AuthenticateAnonymous {}))
                .await
                .context("send authenticate_anonymous")?;
        }
        while !authenticated(ws.next(deadline).await?)? {}
        Ok(ws)
    }

    async fn handshake(
        &mut self,
        addr: SocketAddr,
        subprotocol: &str,
        token: Option<&str>,
    ) -> Result<()> {
        let key = generate_key();
        let mut request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {subprotocol}\r\n"
        );
        if let Some(token) = token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        request.push_str("\r\n");
        self.stream
            .write_all(request.as_bytes())
            .await
            .context("send the upgrade request")?;
        let head_len = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            ensure!(
                self.buf.len() < MAX_HANDSHAKE,
                "no end to the server's handshake answer in {MAX_HANDSHAKE} bytes"
            );
            self.buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the connection during the handshake");
            }
        };
        // Frames the server sent right after its answer stay in the buffer.
        let head = self.buf.split_to(head_len);
        let head = std::str::from_utf8(&head).context("a handshake answer that is not UTF-8")?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        ensure!(
            status.starts_with("HTTP/1.1 101"),
            "WebSocket upgrade refused: {status}"
        );
        let header = |name: &str| {
            head.split("\r\n").skip(1).find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        let accept = derive_accept_key(key.as_bytes());
        ensure!(
            header("sec-websocket-accept") == Some(accept.as_str()),
            "the server's Sec-WebSocket-Accept does not match our key"
        );
        let chosen = header("sec-websocket-protocol");
        ensure!(
            chosen == Some(subprotocol),
            "the server chose subprotocol {chosen:?}, not {subprotocol}"
        );
        Ok(())
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends a client frame in the connection's codec.
    async fn send(&mut self, id: u64, kind: In) -> Result<()> {
        let frame = pb::ClientFrame {
            id,
            kind: Some(kind),
        };
        match self.codec {
            Codec::Proto => self.write_frame(OP_BINARY, &frame.encode_to_vec()).await,
            Codec::Json => {
                let text = serde_json::to_vec(&frame).context("encode a JSON frame")?;
                self.write_frame(OP_TEXT, &text).await
            }
        }
    }

    /// Writes one whole frame, masked as a client must.
    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let frame = &mut self.out;
        frame.reserve(payload.len() + 14);
        frame.put_u8(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.put_u8(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.put_u8(0x80 | 126);
                frame.put_u16(n as u16);
            }
            n => {
                frame.put_u8(0x80 | 127);
                frame.put_u64(n as u64);
            }
        }
        let mask: [u8; 4] = rand::random();
        frame.put_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        self.flush().await
    }

    /// Writes what `out` holds. Cancel-safe: what the socket took is taken off
    /// `out` before the next wait, so a cancelled read never leaves half a frame.
    async fn flush(&mut self) -> Result<()> {
        while !self.out.is_empty() {
            let n = self
                .stream
                .write(&self.out)
                .await
                .context("write a frame")?;
            ensure!(n > 0, "the socket took no bytes");
            self.out.advance(n);
        }
        Ok(())
    }

    /// Subscribes live; answers the room's sequence at that moment.
    pub(crate) async fn subscribe_live(&mut self, room_id: &str) -> Result<u64> {
        let id = self.take_id();
        self.send(
            id,
            In::Subscribe(pb::Subscribe {
                room_id: room_id.into(),
                since_seq: None,
            }),
        )
        .await
        .context("send subscribe")?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match self.next(deadline).await? {
                Incoming::Frame(frame) if frame.id == id => {
                    return match frame.kind {
                        Some(Out::Subscribed(s)) => Ok(s.last_seq),
                        Some(Out::Error(e)) => bail!("subscribe: {}: {}", e.code, e.message),
                        other => bail!("unexpected reply to subscribe: {other:?}"),
                    };
                }
                Incoming::Frame(_) => continue,
                Incoming::Closed(code, reason) => {
                    bail!("closed while waiting for the subscription: {code} {reason}")
                }
            }
        }
    }

    async fn next(&mut self, deadline: Instant) -> Result<Incoming> {
        timeout_at(deadline, self.read())
            .await
            .map_err(|_| anyhow!("no frame from the server in time"))?
    }

    /// Reads the next server frame (pings are answered on the way). Cancel-safe:
    /// bytes read stay in the buffer until a whole frame is taken out of it, and a
    /// pong cut short is finished by the next read.
    pub(crate) async fn read(&mut self) -> Result<Incoming> {
        loop {
            if self.closed {
                return Ok(Incoming::Closed(1006, "stream ended".into()));
            }
            // A pong a cancelled read left half written.
            self.flush().await?;
            while let Some((fin, opcode, payload)) = self.take_frame()? {
                match opcode {
                    OP_PING => self.write_frame(OP_PONG, &payload).await?,
                    OP_PONG => {}
                    OP_CLOSE => {
                        self.closed = true;
                        let (code, reason) = if payload.len() >= 2 {
                            let code = u16::from_be_bytes([payload[0], payload[1]]);
                            (code, String::from_utf8_lossy(&payload[2..]).into_owned())
                        } else {
                            (1005, String::new())
                        };
                        return Ok(Incoming::Closed(code, reason));
                    }
                    OP_CONTINUATION => {
                        let Some((_, partial)) = self.fragments.as_mut() else {
                            bail!("a continuation frame without a message to continue");
                        };
                        ensure!(
                            partial.len() + payload.len() <= MAX_MESSAGE,
                            "a message larger than {MAX_MESSAGE} bytes"
                        );
                        partial.extend_from_slice(&payload);
                        if fin {
                            if let Some((first, whole)) = self.fragments.take() {
                                return self.decode(first, whole.freeze());
                            }
                        }
                    }
                    OP_TEXT | OP_BINARY if self.fragments.is_some() => {
                        bail!("a new message inside a fragmented one")
                    }
                    OP_TEXT | OP_BINARY if !fin => {
                        self.fragments = Some((opcode, BytesMut::from(&payload[..])));
                    }
                    OP_TEXT | OP_BINARY => return self.decode(opcode, payload),
                    other => bail!("a frame with reserved opcode {other:#x}"),
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => {
                    self.closed = true;
                    return Ok(Incoming::Closed(1006, "stream ended".into()));
                }
                Ok(_) => {}
                Err(e) => {
                    self.closed = true;
                    return Ok(Incoming::Closed(1006, e.to_string()));
                }
            }
        }
    }

    /// Takes the next whole frame out of the buffer: FIN, opcode and payload.
    fn take_frame(&mut self) -> Result<Option<(bool, u8, Bytes)>> {
        let &[b0, b1, ..] = &self.buf[..] else {
            return Ok(None);
        };
        ensure!(b0 & 0x70 == 0, "a frame with reserved bits set");
        ensure!(b1 & 0x80 == 0, "a masked frame from the server");
        let (header, len) = match b1 & 0x7f {
            126 if self.buf.len() >= 4 => (
                4,
                usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
            ),
            127 if self.buf.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&self.buf[2..10]);
                (
                    10,
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                )
            }
            126 | 127 => return Ok(None),
            n => (2, usize::from(n)),
        };
        ensure!(
            len <= MAX_MESSAGE,
            "a frame of {len} bytes, past {MAX_MESSAGE}"
        );
        if self.buf.len() < header + len {
            self.buf.reserve(header + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(header);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some((b0 & 0x80 != 0, b0 & 0x0f, payload)))
    }

    fn decode(&self, opcode: u8, payload: Bytes) -> Result<Incoming> {
        let frame = match (opcode, self.codec) {
            (OP_BINARY, _) => {
                pb::ServerFrame::decode(payload).context("undecodable protobuf frame")?
            }
            (_, Codec::Json) => {
                serde_json::from_slice(&payload).context("undecodable JSON frame")?
            }
            (_, Codec::Proto) => bail!("a text frame on a {} connection", self.codec.subprotocol()),
        };
        Ok(Incoming::Frame(Box::new(frame)))
    }

    /// Closes the connection (code 1000) and waits a little for the server's close.
    pub(crate) async fn close(mut self) {
        if self.closed {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        if self
            .write_frame(OP_CLOSE, &1000u16.to_be_bytes())
            .await
            .is_err()
        {
            return;
        }
        for _ in 0..1024 {
            match timeout_at(deadline, self.read()).await {
                Ok(Ok(Incoming::Frame(_))) => continue,
                _ => return,
            }
        }
    }
}

/// Opens `count` connections, `concurrency` at a time, for `accounts[n % len]`;
/// each one subscribed live to `room` when given. Answers, per connection in
/// completion order, the connection (with its subscription's start sequence) and how
/// long opening took, or the error.
pub(crate) async fn open_many(
    addr: SocketAddr,
    codec: Codec,
    accounts: &[Account],
    count: usize,
    concurrency: usize,
    room: Option<&str>,
) -> Vec<Result<(LeanWs, u64, Duration)>> {
    stream::iter(0..count)
        .map(|n| {
            let token = accounts[n % accounts.len()].token.clone();
            async move {
                let started = Instant::now();
                let mut ws = LeanWs::open(addr, codec, false, Some(&token)).await?;
                let base = match room {
                    Some(room) => ws.subscribe_live(room).await?,
                    None => 0,
                };
                Ok((ws, base, started.elapsed()))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}
