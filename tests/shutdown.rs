//! Graceful shutdown under load, with the real binary: `roomcast serve` runs as a
//! child process; WebSocket clients (both subprotocols) are subscribed to a room
//! and sending, HTTP clients send too; then SIGTERM. Every WebSocket client must get
//! close code 4001 ("reconnect elsewhere"), the process must exit cleanly, and
//! after a restart on the same database every acknowledged message must be in the
//! store at the sequence its acknowledgement gave.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{TestDatabase, PASSWORD};
use futures_util::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use roomcast::proto::v1 as pb;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, Message};

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const ROOMCAST: &str = env!("CARGO_BIN_EXE_roomcast");
/// Start-up, shutdown and each client's run are bounded by this.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Acknowledged sends (all clients together) before SIGTERM is sent.
const ACKS_BEFORE_SIGTERM: usize = 150;
/// Upper bound of sends per client, so every loop is bounded in count too.
const MAX_SENDS_PER_CLIENT: usize = 20_000;
const WS_CLIENTS: usize = 4;
const HTTP_CLIENTS: usize = 2;

/// `roomcast serve` on a free loopback port; killed (by its PID) when dropped.
struct Serve {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Serve {
    async fn start(dir: &Path, store_url: &str, name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new(ROOMCAST);
        command.current_dir(dir).arg("serve");
        for (key, _) in std::env::vars() {
            if key.starts_with("ROOMCAST_") {
                command.env_remove(key);
            }
        }
        let child = command
            .env_remove("RUST_LOG")
            .env("ROOMCAST_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("ROOMCAST_SERVER__WORKERS", "2")
            .env("ROOMCAST_STORE__URL", store_url)
            .env("ROOMCAST_AUTH__ARGON2_MEMORY_KIB", "1024")
            .env("ROOMCAST_AUTH__ARGON2_ITERATIONS", "1")
            .env("ROOMCAST_REALTIME__SEND_RATE_PER_SEC", "100000")
            .env("ROOMCAST_REALTIME__SEND_BURST", "100000")
            // Every client of this test signs up from 127.0.0.1: the per-address
            // SignUp/SignIn limits are not what it checks (credential_attacks.rs does).
            .env("ROOMCAST_AUTH__SIGN_UP_IP_PER_HOUR", "0")
            .env("ROOMCAST_AUTH__SIGN_IN_IP_PER_MINUTE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .spawn()
            .expect("spawn roomcast serve");
        let mut serve = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Ok(response) = http.get(format!("{}/readyz", serve.base)).send().await {
                if response.status().is_success() {
                    return serve;
                }
            }
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!(
                    "roomcast serve exited early ({status}): {}",
                    serve.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "roomcast serve did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM {pid}");
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the server") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "roomcast serve did not exit within {STEP_TIMEOUT:?} of SIGTERM:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn rpc(&self, method: &str, token: Option<&str>, body: Value) -> Result<Value, String> {
        let mut request = reqwest::Client::new()
            .post(format!("{}/roomcast.v1.{method}", self.base))
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(10));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        if status == 200 {
            Ok(body)
        } else {
            Err(format!("HTTP {status}: {body}"))
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Outcome {
    /// (seq, client_message_id) of every acknowledged send.
    acked: Vec<(u64, String)>,
    /// The WebSocket close code, for WebSocket clients.
    close_code: Option<u16>,
    /// Why the client stopped, when it was not a close frame.
    ended: Option<String>,
}

fn ws_encode(proto: bool, frame: &pb::ClientFrame) -> Message {
    if proto {
        Message::binary(frame.encode_to_vec())
    } else {
        Message::text(serde_json::to_string(frame).expect("JSON"))
    }
}

fn ws_decode(message: &Message) -> Option<pb::ServerFrame> {
    match message {
        Message::Text(text) => Some(serde_json::from_str(text.as_str()).expect("a JSON frame")),
        Message::Binary(bytes) => Some(pb::ServerFrame::decode(bytes.as_ref()).expect("a frame")),
        _ => None,
    }
}

/// A WebSocket client: subscribes, then sends one message at a time and waits for
/// its acknowledgement, until the server closes the connection.
async fn ws_client(
    url: String,
    token: String,
    room_id: String,
    tag: String,
    proto: bool,
    acks: Arc<AtomicUsize>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut request = url.into_client_request().expect("a ws url");
    let subprotocol = if proto {
        "roomcast.v1.proto"
    } else {
        "roomcast.v1.json"
    };
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        subprotocol.parse().expect("value"),
    );
    headers.insert(
        "authorization",
        format!("Bearer {token}").parse().expect("value"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect the WebSocket");
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    // `pending`: the request id whose reply we wait for, and what it was.
    let mut pending: Option<(u64, Option<String>)> = Some((
        1, None, // the subscribe
    ));
    ws.send(ws_encode(
        proto,
        &pb::ClientFrame {
            id: 1,
            kind: Some(In::Subscribe(pb::Subscribe {
                room_id: room_id.clone(),
                since_seq: None,
            })),
        },
    ))
    .await
    .expect("send subscribe");
    let mut sent = 0usize;
    loop {
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(next) => next,
            Err(_) => {
                outcome.ended = Some("no close frame before the deadline".into());
                return outcome;
            }
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                outcome.ended = Some(format!("socket error before a close frame: {e}"));
                return outcome;
            }
            None => {
                outcome.ended = Some("socket closed without a close frame".into());
                return outcome;
            }
        };
        if let Message::Close(frame) = &message {
            outcome.close_code = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
            return outcome;
        }
        let Some(frame) = ws_decode(&message) else {
            continue;
        };
        let Some((id, cmid)) = &pending else {
            continue;
        };
        if frame.id != *id {
            continue; // a push
        }
        match (&frame.kind, cmid) {
            (Some(Out::Subscribed(_)), None) => {}
            (Some(Out::Sent(reply)), Some(cmid)) => {
                let message = reply.message.as_ref().expect("sent carries the message");
                assert_eq!(&message.client_message_id, cmid);
                outcome.acked.push((message.seq, cmid.clone()));
                acks.fetch_add(1, Ordering::Relaxed);
            }
            // Refused while the server shuts down: not acknowledged, not counted.
            (Some(Out::Error(_)), Some(_)) => {}
            other => panic!("{tag}: unexpected reply {other:?}"),
        }
        if sent == MAX_SENDS_PER_CLIENT {
            pending = None;
            continue;
        }
        sent += 1;
        let cmid = format!("{tag}-{sent}");
        let id = sent as u64 + 1;
        let frame = pb::ClientFrame {
            id,
            kind: Some(In::Send(pb::SendMessageRequest {
                room_id: room_id.clone(),
                text: format!("{tag} says {sent}"),
                client_message_id: cmid.clone(),
                ..Default::default()
            })),
        };
        if let Err(e) = ws.send(ws_encode(proto, &frame)).await {
            // The server may close between our read and this write; the close
            // frame (if it was sent) is still read below.
            pending = None;
            outcome.ended = Some(format!("send failed: {e}"));
            continue;
        }
        pending = Some((id, Some(cmid)));
    }
}

/// An HTTP client sending one message at a time until the server stops answering.
async fn http_client(
    serve_base: String,
    token: String,
    room_id: String,
    tag: String,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) -> Outcome {
    let http = reqwest::Client::new();
    let mut outcome = Outcome::default();
    let deadline = Instant::now() + STEP_TIMEOUT;
    for i in 1..=MAX_SENDS_PER_CLIENT {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let cmid = format!("{tag}-{i}");
        let result = http
            .post(format!("{serve_base}/roomcast.v1.RoomService/SendMessage"))
            .header("content-type", "application/json")
            .bearer_auth(&token)
            .timeout(Duration::from_secs(10))
            .body(
                json!({"roomId": room_id, "text": format!("{tag} says {i}"), "clientMessageId": cmid})
                    .to_string(),
            )
            .send()
            .await;
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                // Refused or cut: the server is gone. Not acknowledged.
                outcome.ended = Some(e.to_string());
                break;
            }
        };
        if response.status().as_u16() != 200 {
            continue;
        }
        let Ok(body) = response.json::<Value>().await else {
            continue;
        };
        let seq = body["message"]["seq"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .expect("an acknowledged send has a seq");
        outcome.acked.push((seq, cmid));
        acks.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

both_backends!(
    sigterm_under_load_closes_with_4001_and_loses_nothing_acknowledged,
    |backend| async move {
        let database = TestDatabase::create(backend).await;
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut serve = Serve::start(dir.path(), &database.url, "first").await;

        // Accounts and a public room everybody joined.
        let mut tokens = Vec::new();
        for i in 0..WS_CLIENTS + HTTP_CLIENTS {
            let reply = serve
                .rpc(
                    "AuthService/SignUp",
                    None,
                    json!({"username": format!("load{i}"), "password": PASSWORD}),
                )
                .await
                .expect("sign up");
            tokens.push(
                reply["tokens"]["accessToken"]
                    .as_str()
                    .expect("a token")
                    .to_owned(),
            );
        }
        let room = serve
            .rpc(
                "RoomService/CreateRoom",
                Some(&tokens[0]),
                json!({"kind": "ROOM_KIND_PUBLIC", "title": "load"}),
            )
            .await
            .expect("create the room");
        let room_id = room["room"]["id"].as_str().expect("a room id").to_owned();
        for token in &tokens[1..] {
            serve
                .rpc(
                    "RoomService/JoinRoom",
                    Some(token),
                    json!({"roomId": room_id}),
                )
                .await
                .expect("join");
        }

        let acks = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ws_url = format!("{}/ws", serve.base.replace("http://", "ws://"));
        let mut ws_tasks = Vec::new();
        for (i, token) in tokens[..WS_CLIENTS].iter().enumerate() {
            ws_tasks.push(tokio::spawn(ws_client(
                ws_url.clone(),
                token.clone(),
                room_id.clone(),
                format!("ws{i}"),
                i % 2 == 1,
                acks.clone(),
            )));
        }
        let mut http_tasks = Vec::new();
        for (i, token) in tokens[WS_CLIENTS..].iter().enumerate() {
            http_tasks.push(tokio::spawn(http_client(
                serve.base.clone(),
                token.clone(),
                room_id.clone(),
                format!("http{i}"),
                stop.clone(),
                acks.clone(),
            )));
        }

        // Under load: SIGTERM once enough sends were acknowledged.
        let deadline = Instant::now() + STEP_TIMEOUT;
        while acks.load(Ordering::Relaxed) < ACKS_BEFORE_SIGTERM {
            assert!(
                Instant::now() < deadline,
                "the clients did not get going:\n{}",
                serve.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        serve.sigterm();
        let status = serve.wait_exit().await;
        stop.store(true, Ordering::Relaxed);
        assert!(
            status.success(),
            "roomcast exited with {status}:\n{}",
            serve.log_text()
        );

        let mut acked: Vec<(u64, String)> = Vec::new();
        for (i, task) in ws_tasks.into_iter().enumerate() {
            let outcome = tokio::time::timeout(STEP_TIMEOUT, task)
                .await
                .expect("the WebSocket client finished")
                .expect("the WebSocket client did not panic");
            assert_eq!(
                outcome.close_code,
                Some(4001),
                "WebSocket client {i} must be closed with 4001 ({:?}); server log:\n{}",
                outcome.ended,
                serve.log_text()
            );
            acked.extend(outcome.acked);
        }
        for task in http_tasks {
            let outcome = tokio::time::timeout(STEP_TIMEOUT, task)
                .await
                .expect("the HTTP client finished")
                .expect("the HTTP client did not panic");
            acked.extend(outcome.acked);
        }
        assert!(acked.len() >= ACKS_BEFORE_SIGTERM);

        // Restart on the same database: every acknowledged send is there, at its seq.
        let serve = Serve::start(dir.path(), &database.url, "second").await;
        let signed_in = serve
            .rpc(
                "AuthService/SignIn",
                None,
                json!({"username": "load0", "password": PASSWORD}),
            )
            .await
            .expect("sign in after the restart");
        let token = signed_in["tokens"]["accessToken"]
            .as_str()
            .expect("a token")
            .to_owned();
        let mut stored: BTreeMap<u64, String> = BTreeMap::new();
        let mut after = 0u64;
        for _ in 0..10_000 {
            let page = serve
                .rpc(
                    "RoomService/ListMessages",
                    Some(&token),
                    json!({"roomId": room_id, "afterSeq": after.to_string(), "limit": 200}),
                )
                .await
                .expect("list messages");
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            for m in &messages {
                let seq: u64 = m["seq"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("a seq");
                let cmid = m["clientMessageId"].as_str().unwrap_or_default().to_owned();
                stored.insert(seq, cmid);
                after = seq;
            }
            if page["hasMore"].as_bool() != Some(true) {
                break;
            }
        }
        for (seq, cmid) in &acked {
            assert_eq!(
                stored.get(seq),
                Some(cmid),
                "acknowledged send {cmid} at seq {seq} is missing after the restart"
            );
        }
        // And the stored history is gapless.
        let seqs: Vec<u64> = stored.keys().copied().collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "the history has a gap");
        drop(serve);
        drop(database);
    }
);
