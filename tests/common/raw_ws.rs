//! A raw WebSocket client over a plain TCP socket, for tests that must write frame
//! bytes by hand (oversized or malformed headers, unmasked frames, fragments) or
//! must stop reading: the handshake is written by hand, frames are built here.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// A WebSocket key (any 16 bytes in base64 will do).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// What the server answered to a handshake.
#[derive(Debug)]
pub struct HandshakeAnswer {
    pub status: u16,
    /// The whole head and whatever body arrived, as text.
    pub text: String,
}

/// Sends an upgrade request for `path` with `extra` header lines (each ending
/// in `\r\n`) and reads the answer's head (and a body, when not 101).
pub async fn handshake(stream: &mut TcpStream, path: &str, extra: &str) -> HandshakeAnswer {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write the handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("handshake answer in time")
            .expect("read the handshake answer");
        assert!(
            n == 1,
            "connection closed during the handshake: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let mut text = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    if status != 101 {
        let mut body = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body)).await;
        text.push_str(&String::from_utf8_lossy(&body));
    }
    HandshakeAnswer { status, text }
}

/// Connects to `addr` and completes a handshake for `path` (with `extra` headers).
pub async fn connect(addr: std::net::SocketAddr, path: &str, extra: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let answer = handshake(&mut stream, path, extra).await;
    assert_eq!(answer.status, 101, "{}", answer.text);
    stream
}

/// A client frame: FIN as given, masked (with a fixed key) when `masked`.
pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= 0xFFFF {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame header declaring `len` payload bytes (8-byte length form).
pub fn header_declaring(opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![0x80 | opcode, 0x80 | 127];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[1, 2, 3, 4]);
    out
}

/// A frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Reads one server frame; `None` when the connection ended or nothing came in time.
pub async fn read_frame(stream: &mut TcpStream, timeout: Duration) -> Option<ServerFrame> {
    let read = async {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
        let len = match head[1] & 0x7F {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.ok()?;
                u64::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await.ok()?;
                u64::from_be_bytes(ext)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).ok()?];
        stream.read_exact(&mut payload).await.ok()?;
        Some(ServerFrame {
            opcode: head[0] & 0x0F,
            payload,
        })
    };
    tokio::time::timeout(timeout, read).await.ok().flatten()
}

/// Reads frames until a close frame (answering nothing); its code, or `None` when
/// the connection ended without one or nothing came in time.
pub async fn read_close(stream: &mut TcpStream, timeout: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = read_frame(stream, left).await?;
        if frame.opcode == 8 {
            return frame.close_code();
        }
    }
}

/// This process's resident memory, in KiB (Linux).
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
