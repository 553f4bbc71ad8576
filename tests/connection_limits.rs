//! Connection exhaustion and peers that stop reading: a client that sends its
//! headers byte by byte is cut off after `server.header_timeout_ms`; connections
//! past `server.max_connections` get 503; WebSockets past the per-address,
//! per-user and unauthenticated budgets get their HTTP error or close 4503; and a
//! WebSocket client that never reads while its room is busy is dropped within the
//! configured time while everyone else is served, and shutdown stays prompt.

mod common;

use std::time::{Duration, Instant};

use common::{
    raw_ws::{self, frame, read_frame},
    rooms::{create_room, send_http},
    ws::{room_event, Incoming, WsClient, WsCodec},
    Backend, TestServer,
};
use roomcast::proto::v1 as pb;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use pb::server_frame::Kind as Out;

const WAIT: Duration = Duration::from_secs(10);

/// Reads until the peer closes or resets; false when it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut scratch = vec![0u8; 64 * 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_to_end).await.is_ok()
}

#[tokio::test]
async fn slow_headers_are_cut_off_after_the_header_timeout() {
    let server =
        TestServer::spawn_with(Backend::Sqlite, |s| s.server.header_timeout_ms = 300).await;
    // Byte by byte, 50 ms apart: the whole request would take several seconds.
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let started = Instant::now();
    let mut cut_off = false;
    for byte in request {
        if stream.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    if !cut_off {
        // The server answered 408 and closed; reading shows it.
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 408"),
            "a slow client gets 408 or nothing: {text}"
        );
        assert!(
            closed_within(&mut stream, Duration::from_secs(1)).await,
            "the slow connection was closed"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut off after about the header timeout, not after the whole request"
    );
    // A client that connects and sends nothing is dropped too.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    // Others are served meanwhile.
    let status = server
        .http()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz")
        .status();
    assert_eq!(status.as_u16(), 200);
}

#[tokio::test]
async fn slow_headers_of_a_later_request_are_cut_off_too() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.server.header_timeout_ms = 300;
        s.server.request_timeout_ms = 700;
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    // A first request, answered on a keep-alive connection.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("first request");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    // Then the second request, one byte every 100 ms (it would take 6 s), while
    // the keep-alive timer no longer applies.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(30)
    );
    let started = Instant::now();
    let mut cut_off = false;
    for byte in request.as_bytes() {
        if stream.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await
        {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "the trickling connection was closed");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after header + request timeout, not after the whole request ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn connections_past_the_cap_get_503() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| s.server.max_connections = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // Let the server accept them before the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(server.addr).await.expect("connect");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, extra.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("unavailable"), "{text}");
    // A slot comes back when a connection closes.
    drop(held.pop());
    let served = common::eventually(WAIT, || async {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
        answer.starts_with(b"HTTP/1.1 200")
    })
    .await;
    assert!(served, "a connection is served once a slot is free");
}

#[tokio::test]
async fn websocket_budgets_per_address_and_before_authentication() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.realtime.max_connections_per_ip = 2;
        s.realtime.max_unauthenticated = 5;
    })
    .await;
    let _a = raw_ws::connect(server.addr, "/ws", "").await;
    let _b = raw_ws::connect(server.addr, "/ws", "").await;
    let mut third = TcpStream::connect(server.addr).await.expect("connect");
    let answer = raw_ws::handshake(&mut third, "/ws", "").await;
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert!(
        answer.text.contains("resource_exhausted"),
        "{}",
        answer.text
    );

    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.realtime.max_unauthenticated = 1;
    })
    .await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let _waiting = raw_ws::connect(server.addr, "/ws", "").await;
    let mut second = TcpStream::connect(server.addr).await.expect("connect");
    let answer = raw_ws::handshake(&mut second, "/ws", "").await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert!(answer.text.contains("authenticate"), "{}", answer.text);
    // Slots come back when connections close, and authenticating moves a
    // connection out of the unauthenticated budget.
    drop(_waiting);
    let mut authenticated = None;
    for _ in 0..100 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let header = format!("Authorization: Bearer {}\r\n", alice.access_token);
        if raw_ws::handshake(&mut s, "/ws", &header).await.status == 101 {
            authenticated = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut authenticated = authenticated.expect("the slot came back");
    let reply = read_frame(&mut authenticated, WAIT)
        .await
        .expect("authenticated");
    assert!(String::from_utf8_lossy(&reply.payload).contains("authenticated"));
    let _next = raw_ws::connect(server.addr, "/ws", "").await;
}

#[tokio::test]
async fn connections_past_the_per_user_cap_are_closed_with_4503() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.realtime.max_connections_per_user = 2;
    })
    .await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let url = server.ws_url("/ws");
    let first = WsClient::connect_authenticated(&url, WsCodec::Json, &alice.access_token).await;
    let _second = WsClient::connect_authenticated(&url, WsCodec::Json, &alice.access_token).await;
    let mut third = WsClient::connect(&url, WsCodec::Json, Some(&alice.access_token)).await;
    let mut closed = None;
    for _ in 0..3 {
        match third.next_frame(WAIT).await {
            Incoming::Closed(code, reason) => {
                closed = Some((code, reason));
                break;
            }
            Incoming::Frame(frame) => {
                assert!(
                    matches!(&frame.kind, Some(Out::Error(e)) if e.code == "resource_exhausted"),
                    "{frame:?}"
                );
            }
            Incoming::Timeout => break,
        }
    }
    let (code, reason) = closed.expect("the third connection is closed");
    assert_eq!(code, 4503, "{reason}");
    // Another user is not affected, and a slot comes back when one closes.
    let bob = server.sign_up(&common::unique_name("bob")).await;
    WsClient::connect_authenticated(&url, WsCodec::Json, &bob.access_token).await;
    first.close().await;
    let back = common::eventually(WAIT, || async {
        let mut ws = WsClient::connect(&url, WsCodec::Json, Some(&alice.access_token)).await;
        matches!(
            ws.next_frame(WAIT).await,
            Incoming::Frame(pb::ServerFrame {
                kind: Some(Out::Authenticated(_)),
                ..
            })
        )
    })
    .await;
    assert!(back, "a slot comes back when a connection closes");
}

/// A raw WebSocket client with a tiny receive buffer that authenticates and
/// subscribes to `room`, then reads nothing more.
async fn never_reading_subscriber(server: &TestServer, token: &str, room: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let mut stream = socket.connect(server.addr).await.expect("connect");
    let answer = raw_ws::handshake(
        &mut stream,
        "/ws",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    assert_eq!(answer.status, 101, "{}", answer.text);
    let subscribe = format!(r#"{{"id": 1, "subscribe": {{"roomId": "{room}"}}}}"#);
    stream
        .write_all(&frame(true, 1, subscribe.as_bytes(), true))
        .await
        .expect("subscribe");
    // `authenticated`, then `subscribed`.
    for _ in 0..2 {
        let reply = read_frame(&mut stream, WAIT).await.expect("a reply");
        let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert!(reply.get("error").is_none(), "{reply}");
    }
    stream
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_stalls_nobody() {
    const MESSAGES: u64 = 1200;
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.realtime.send_rate_per_sec = 100_000;
        s.realtime.send_burst = 100_000;
        s.realtime.outbound_queue_bytes = 64 * 1024;
        s.realtime.max_write_queue_bytes = 256 * 1024;
        s.realtime.write_stall_timeout_ms = 1000;
        s.realtime.max_catch_up_rounds = 1000;
        s.rooms.max_message_bytes = 8 * 1024;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let mut stuck = never_reading_subscriber(&server, &reader.access_token, &room).await;
    let url = server.ws_url("/ws");
    let mut fast = WsClient::connect_authenticated(&url, WsCodec::Json, &reader.access_token).await;
    fast.subscribe(&room, Some(0)).await.expect("subscribe");

    // More than the kernel's socket buffers hold (up to 4 MiB on Linux), so
    // the server's own queue and its stall detection are what hold the line.
    let big = "x".repeat(7 * 1024);
    let server = std::sync::Arc::new(server);
    let mut senders = Vec::new();
    for t in 0..4 {
        let (server, owner, room, big) = (server.clone(), owner.clone(), room.clone(), big.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..MESSAGES / 4 {
                let id = format!("{t}-{i}");
                send_http(&server, &owner, &room, &format!("{id} {big}"), &id).await;
            }
        }));
    }
    // Everyone else is served in full while the stuck client reads nothing.
    let events = fast.collect_until(&room, MESSAGES, WAIT).await;
    for sender in senders {
        sender.await.expect("sender");
    }
    assert_eq!(events.last().map(|m| m.seq), Some(MESSAGES));
    let pong = fast
        .request(pb::client_frame::Kind::Ping(pb::Ping {}))
        .await;
    assert!(matches!(pong.kind, Some(Out::Pong(_))));

    // The stuck connection is given up on: its queue went over budget or its
    // socket accepted nothing for the stall timeout; either way it ends within
    // a few stall timeouts, having been sent far less than the room's traffic.
    let mut received = 0usize;
    let mut scratch = vec![0u8; 64 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stuck.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await
    .is_ok();
    assert!(ended, "the never-reading connection was closed");
    assert!(
        received < 8 * 1024 * 1024,
        "the server kept {received} bytes for a peer that does not read"
    );

    // Shutdown still reaches everyone promptly: the live client gets 4001.
    let mut other = never_reading_subscriber(&server, &reader.access_token, &room).await;
    let took = tokio::join!(server.stop_gracefully(), async {
        match fast.next_push(WAIT).await {
            Incoming::Closed(code, _) => assert_eq!(code, 4001),
            Incoming::Frame(f) => {
                assert!(room_event(&f).is_none(), "no more events: {f:?}");
            }
            Incoming::Timeout => panic!("no close on shutdown"),
        }
    })
    .0;
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    assert!(closed_within(&mut other, WAIT).await);
}

#[tokio::test]
async fn a_slow_reader_catching_up_a_long_history_is_paced_not_closed() {
    const MESSAGES: u64 = 2000;
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.realtime.send_rate_per_sec = 100_000;
        s.realtime.send_burst = 100_000;
        s.realtime.outbound_queue_bytes = 64 * 1024;
        // More than one catch-up page (256 events), far less than the history
        // (7 MB: more than the kernel's socket buffers take, too).
        s.realtime.max_write_queue_bytes = 2 * 1024 * 1024;
        s.realtime.max_catch_up_rounds = 1000;
        s.rooms.ring_size = 16;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let text = "y".repeat(3500);
    let server = std::sync::Arc::new(server);
    let mut senders = Vec::new();
    for t in 0..4 {
        let (server, owner, room, text) =
            (server.clone(), owner.clone(), room.clone(), text.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..MESSAGES / 4 {
                let id = format!("{t}-{i}");
                send_http(&server, &owner, &room, &text, &id).await;
            }
        }));
    }
    for sender in senders {
        sender.await.expect("sender");
    }
    // A reader with a tiny receive buffer that reads one frame per millisecond:
    // catch-up from the store must wait for it rather than queue everything.
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let mut stream = socket.connect(server.addr).await.expect("connect");
    let header = format!("Authorization: Bearer {}\r\n", reader.access_token);
    let answer = raw_ws::handshake(&mut stream, "/ws", &header).await;
    assert_eq!(answer.status, 101, "{}", answer.text);
    let subscribe = format!(r#"{{"id": 1, "subscribe": {{"roomId": "{room}", "sinceSeq": "0"}}}}"#);
    stream
        .write_all(&frame(true, 1, subscribe.as_bytes(), true))
        .await
        .expect("subscribe");
    let mut next_seq = 1u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next_seq <= MESSAGES {
        assert!(Instant::now() < deadline, "stalled at seq {next_seq}");
        let frame = read_frame(&mut stream, WAIT)
            .await
            .unwrap_or_else(|| panic!("connection ended at seq {next_seq}"));
        assert_ne!(
            frame.opcode,
            8,
            "closed at seq {next_seq}: {:?}",
            frame.close_code()
        );
        if frame.opcode != 1 {
            continue;
        }
        let value: serde_json::Value = serde_json::from_slice(&frame.payload).expect("JSON");
        if let Some(seq) = value["message"]["seq"].as_str() {
            assert_eq!(seq, next_seq.to_string(), "in order, no gap");
            next_seq += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
