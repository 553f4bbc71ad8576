//! roomcast's own WebSocket framing, over raw sockets with hand-written frame
//! bytes: declared lengths over the limit are refused from the header (close
//! 1009) without buffering, protocol violations get their close codes, fragments
//! are reassembled, pings answered; the handshake refuses wrong paths, bad
//! requests and foreign origins with HTTP errors; the echo endpoint is off unless
//! configured.

mod common;

use std::time::Duration;

use common::{
    raw_ws::{self, frame, header_declaring, read_close, read_frame},
    Backend, TestServer,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WAIT: Duration = Duration::from_secs(10);

async fn server_with(configure: impl FnOnce(&mut roomcast::settings::Settings)) -> TestServer {
    TestServer::spawn_with(Backend::Sqlite, configure).await
}

#[tokio::test]
async fn a_header_declaring_2_pow_40_bytes_is_refused_at_once_without_buffering() {
    let server = server_with(|s| s.realtime.max_frame_bytes = 64 * 1024).await;
    let ws = raw_ws::connect(server.addr, "/ws", "").await;
    let (mut read, mut write) = ws.into_split();
    let before = raw_ws::rss_kib();
    // The attack: a 2^40-byte binary frame, then bytes as fast as the socket
    // takes them (bounded: 256 MiB, or until the server drops the connection).
    let flood = tokio::spawn(async move {
        write
            .write_all(&header_declaring(2, 1 << 40))
            .await
            .expect("write the header");
        let chunk = vec![0x55u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < 256 * 1024 * 1024 {
            match tokio::time::timeout(Duration::from_secs(5), write.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
        sent
    });
    let head = tokio::time::timeout(WAIT, async {
        let mut head = [0u8; 4];
        read.read_exact(&mut head).await.ok().map(|_| head)
    })
    .await
    .expect("the server answers promptly")
    .expect("a close frame before the connection ends");
    assert_eq!(head[0] & 0x0F, 8, "a close frame: {head:x?}");
    assert_eq!(u16::from_be_bytes([head[2], head[3]]), 1009, "close 1009");
    let sent = flood.await.expect("flood task");
    if let (Some(before), Some(after)) = (before, raw_ws::rss_kib()) {
        // The server runs in this process: before the fix it buffered it all.
        assert!(
            after < before + 64 * 1024,
            "memory grew from {before} KiB to {after} KiB after sending {sent} bytes"
        );
    }
}

#[tokio::test]
async fn a_header_declaring_70000_bytes_without_payload_is_answered_at_once() {
    let server = server_with(|s| s.realtime.max_frame_bytes = 64 * 1024).await;
    let mut ws = raw_ws::connect(server.addr, "/ws", "").await;
    ws.write_all(&header_declaring(1, 70_000))
        .await
        .expect("write the header");
    assert_eq!(
        read_close(&mut ws, Duration::from_secs(3)).await,
        Some(1009)
    );
}

#[tokio::test]
async fn fragments_over_the_limit_together_are_refused() {
    let server = server_with(|s| s.realtime.max_frame_bytes = 1000).await;
    let mut ws = raw_ws::connect(server.addr, "/ws", "").await;
    ws.write_all(&frame(false, 1, &[b' '; 600], true))
        .await
        .expect("first fragment");
    ws.write_all(&header_declaring(0, 600))
        .await
        .expect("second header");
    assert_eq!(read_close(&mut ws, WAIT).await, Some(1009));
}

#[tokio::test]
async fn protocol_violations_close_with_their_codes() {
    let server = server_with(|_| {}).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", frame(true, 1, b"{}", false), 1002),
        ("RSV1", frame(true, 0x41, b"{}", true), 1002),
        ("reserved opcode", frame(true, 3, b"", true), 1002),
        ("fragmented ping", frame(false, 9, b"", true), 1002),
        ("continuation first", frame(true, 0, b"x", true), 1002),
        ("invalid UTF-8", frame(true, 1, &[0xC0, 0xAF], true), 1007),
        (
            "invalid close code",
            frame(true, 8, &[0x03, 0xED], true),
            1002,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut ws = raw_ws::connect(server.addr, "/ws", "").await;
        ws.write_all(&bytes).await.expect("write");
        assert_eq!(read_close(&mut ws, WAIT).await, Some(code), "{name}");
    }
}

#[tokio::test]
async fn fragmented_messages_and_pings_are_served() {
    let server = server_with(|_| {}).await;
    let mut ws = raw_ws::connect(server.addr, "/ws", "").await;
    let request = br#"{"id": 5, "ping": {}}"#;
    let mut bytes = frame(false, 1, &request[..7], true);
    bytes.extend(frame(true, 9, b"are you there", true));
    bytes.extend(frame(false, 0, &request[7..12], true));
    bytes.extend(frame(true, 0, &request[12..], true));
    ws.write_all(&bytes).await.expect("write");
    let pong = read_frame(&mut ws, WAIT).await.expect("pong");
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (0xA, &b"are you there"[..])
    );
    let reply = read_frame(&mut ws, WAIT).await.expect("reply");
    assert_eq!(reply.opcode, 1);
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(reply["id"], "5", "{reply}");
    assert!(reply.get("pong").is_some(), "{reply}");
    // The client starts the close handshake; the server answers with its code.
    ws.write_all(&frame(true, 8, &[0x03, 0xE8], true))
        .await
        .expect("close");
    assert_eq!(read_close(&mut ws, WAIT).await, Some(1000));
}

#[tokio::test]
async fn handshakes_that_cannot_be_served_get_http_errors() {
    let server = server_with(|s| {
        s.realtime.allowed_origins = vec!["https://chat.example.com".into()];
    })
    .await;
    let answer = async |path: &str, extra: &str| {
        let mut stream = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        raw_ws::handshake(&mut stream, path, extra).await
    };
    let a = answer("/nope", "").await;
    assert_eq!(a.status, 404, "{}", a.text);
    assert!(a.text.contains("not_found"), "{}", a.text);
    let a = answer("/ws", "Origin: https://evil.example\r\n").await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert!(a.text.contains("permission_denied"), "{}", a.text);
    let a = answer("/ws", "Origin: https://chat.example.com\r\n").await;
    assert_eq!(a.status, 101, "a listed origin: {}", a.text);
    let a = answer("/ws", "Origin: http://127.0.0.1\r\n").await;
    assert_eq!(a.status, 101, "the server's own origin: {}", a.text);
    let a = answer("/ws", "Sec-WebSocket-Protocol: chat.v9\r\n").await;
    assert_eq!(a.status, 400, "{}", a.text);
    // The echo endpoint is off unless configured.
    let a = answer("/ws-echo", "").await;
    assert_eq!(a.status, 404, "{}", a.text);
    // A plain GET /ws (no upgrade) is told what it lacks.
    let response = server
        .http()
        .get(server.url("/ws"))
        .send()
        .await
        .expect("GET /ws");
    assert_eq!(response.status().as_u16(), 426);
}

/// Reads until `bytes` holds a whole head and a first frame after it; answers the
/// number of reads that took (the head and the frame in one segment: one read).
async fn read_answer_and_first_frame(
    stream: &mut tokio::net::TcpStream,
    bytes: &mut Vec<u8>,
) -> usize {
    let mut reads = 0;
    for _ in 0..64 {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .expect("read the answer");
        assert!(
            n > 0,
            "the connection ended: {:?}",
            String::from_utf8_lossy(bytes)
        );
        bytes.extend_from_slice(&chunk[..n]);
        reads += 1;
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = &bytes[end + 4..];
            if rest.len() >= 2 && rest.len() >= 2 + usize::from(rest[1] & 0x7F).min(125) {
                return reads;
            }
        }
    }
    panic!(
        "no head and frame in 64 reads: {:?}",
        String::from_utf8_lossy(bytes)
    );
}

#[tokio::test]
async fn a_token_in_the_upgrade_request_gets_the_answer_and_its_outcome_in_one_segment() {
    let server = server_with(|_| {}).await;
    let account = server.sign_up("segment").await;
    let request = |token: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: roomcast.v1.json\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
    };
    // A valid token: `101 Switching Protocols` and `authenticated` come together,
    // in one write, so one read takes both. (An in-process server authenticates
    // so fast that the two writes of before often arrived before the first read
    // too; the read count is what a client sees, not proof of one write.)
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    stream
        .write_all(request(&account.access_token).as_bytes())
        .await
        .expect("write the handshake");
    let mut bytes = Vec::new();
    let reads = read_answer_and_first_frame(&mut stream, &mut bytes).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains("authenticated"), "the first frame: {text}");
    assert_eq!(reads, 1, "answer and first frame in one segment: {text}");
    // The connection works on: a ping is answered.
    stream
        .write_all(&frame(true, 0x9, b"after", true))
        .await
        .expect("write a ping");
    let pong = read_frame(&mut stream, WAIT).await.expect("a pong");
    assert_eq!((pong.opcode, &pong.payload[..]), (0xA, &b"after"[..]));

    // A bad token: the answer, the error and the close (4500) arrive, in order.
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    stream
        .write_all(request("not-a-token").as_bytes())
        .await
        .expect("write the handshake");
    let mut bytes = Vec::new();
    read_answer_and_first_frame(&mut stream, &mut bytes).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains("unauthenticated"), "the error frame: {text}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    bytes.extend_from_slice(&rest);
    let close = bytes
        .windows(4)
        .any(|w| w[0] == 0x88 && u16::from_be_bytes([w[2], w[3]]) == 4500);
    assert!(
        close,
        "close 4500 after the error: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[tokio::test]
async fn the_echo_endpoint_echoes_over_the_same_framing() {
    let server = server_with(|s| {
        s.realtime.echo_path = "/ws-echo".into();
        s.realtime.max_frame_bytes = 1000;
    })
    .await;
    let mut ws = raw_ws::connect(server.addr, "/ws-echo", "").await;
    ws.write_all(&frame(true, 2, &[1, 2, 3], true))
        .await
        .expect("write");
    let echo = read_frame(&mut ws, WAIT).await.expect("echo");
    assert_eq!(
        (echo.opcode, echo.payload.as_slice()),
        (2, &[1u8, 2, 3][..])
    );
    ws.write_all(&header_declaring(1, 2000))
        .await
        .expect("write");
    assert_eq!(read_close(&mut ws, WAIT).await, Some(1009));
}
