//! Users across nodes: several roomcast nodes on one PostgreSQL database (and one
//! Redis), behind nginx, built by the multi-node harness (tests/common/cluster.rs).

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    cluster::{Cluster, NodeKind},
    ws::{Incoming, WsClient, WsCodec},
    Codec,
};
use futures_util::{SinkExt as _, StreamExt as _};
use pb::{client_frame::Kind as In, server_frame::Kind as Out};
use prost::Message as _;
use roomcast::{proto::v1 as pb, settings::Settings};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, Message};

/// The harness itself: in-process and process nodes share one database (an
/// account made on one node signs in on another, and its token works on every
/// node and through nginx), every node stays on its address across a restart,
/// and nginx keeps answering while one node restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_one_database_behind_nginx_and_restart_in_place() {
    let Some(mut cluster) = Cluster::builder(3)
        .node_kind(2, NodeKind::Process)
        .nginx()
        .start()
        .await
    else {
        return;
    };
    let alice = cluster.sign_up(0, &common::unique_name("alice")).await;
    let again = cluster.sign_in(2, &alice.username).await;
    assert_eq!(again.user_id, alice.user_id);
    for index in 0..cluster.len() {
        let me: pb::GetMeResponse = cluster
            .rpc_as(index, &alice.access_token)
            .call(Codec::Json, "UserService/GetMe", &pb::GetMeRequest {})
            .await
            .unwrap_or_else(|e| panic!("GetMe on node {index}: {e}"));
        assert_eq!(me.user.map(|u| u.id), Some(alice.user_id.clone()));
    }
    let addr = cluster.addr(2);
    cluster.restart(2).await;
    assert_eq!(cluster.addr(2), addr, "a restarted node keeps its address");
    cluster.kill(1);
    for _ in 0..6 {
        let me: Result<pb::GetMeResponse, _> = cluster
            .nginx_rpc_as(&again.access_token)
            .call(Codec::Proto, "UserService/GetMe", &pb::GetMeRequest {})
            .await;
        me.unwrap_or_else(|e| panic!("GetMe through nginx with node 1 down: {e}"));
    }
    cluster.start_node(1).await;
    let (status, body) = cluster.readyz(1).await;
    assert_eq!(status, 200, "{body}");
}

// ---------------------------------------------------------------------------
// Rolling restart
// ---------------------------------------------------------------------------

/// Per-client bound on sends, so every loop is bounded in count as well as time.
const MAX_SENDS: usize = 5_000;
/// How long a client keeps retrying one send (or one reconnect) through nginx.
const RETRY_FOR: Duration = Duration::from_secs(30);
/// Bounds the whole load phase.
const LOAD_DEADLINE: Duration = Duration::from_secs(240);

/// What one sender got acknowledged: (seq, client message id).
type Acked = Vec<(u64, String)>;

/// Sends one message at a time over HTTP through nginx; an attempt that fails
/// (refused, cut, 5xx) is retried with the same client message id, as an
/// application would, until acknowledged.
async fn http_sender(
    rpc: common::Rpc,
    room: String,
    tag: String,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) -> Acked {
    let mut acked = Acked::new();
    let deadline = Instant::now() + LOAD_DEADLINE;
    for i in 1..=MAX_SENDS {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let cmid = format!("{tag}-{i}");
        let request = pb::SendMessageRequest {
            room_id: room.clone(),
            text: format!("{tag} {i}"),
            client_message_id: cmid.clone(),
            ..Default::default()
        };
        let give_up = Instant::now() + RETRY_FOR;
        loop {
            let reply: Result<pb::SendMessageResponse, _> = rpc
                .call(Codec::Proto, "RoomService/SendMessage", &request)
                .await;
            match reply {
                Ok(reply) => {
                    let seq = reply.message.expect("an acknowledged message").seq;
                    acked.push((seq, cmid));
                    acks.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    assert!(
                        Instant::now() < give_up,
                        "{tag}: {cmid} not acknowledged within {RETRY_FOR:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    acked
}

fn ws_message(proto: bool, frame: &pb::ClientFrame) -> Message {
    if proto {
        Message::binary(frame.encode_to_vec())
    } else {
        Message::text(serde_json::to_string(frame).expect("JSON"))
    }
}

fn ws_frame(message: &Message) -> Option<pb::ServerFrame> {
    match message {
        Message::Text(text) => Some(serde_json::from_str(text.as_str()).expect("a JSON frame")),
        Message::Binary(bytes) => Some(pb::ServerFrame::decode(bytes.as_ref()).expect("a frame")),
        _ => None,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket through nginx, retrying (a draining node refuses with 503,
/// nginx passes it on; a restarting node refuses the connect).
async fn ws_connect(url: &str, token: &str, proto: bool) -> Ws {
    let give_up = Instant::now() + RETRY_FOR;
    loop {
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
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => return ws,
            Err(e) => {
                assert!(
                    Instant::now() < give_up,
                    "no WebSocket through nginx within {RETRY_FOR:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sends one message at a time over a WebSocket through nginx. When the node
/// closes it (4001 while draining) or the socket breaks, it reconnects through
/// nginx and sends the unacknowledged message again with the same client message
/// id. Counts the closes it saw with 4001.
async fn ws_sender(
    url: String,
    token: String,
    room: String,
    tag: String,
    proto: bool,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) -> (Acked, usize) {
    let mut acked = Acked::new();
    let mut reconnects_asked = 0;
    let deadline = Instant::now() + LOAD_DEADLINE;
    let mut next = 1usize;
    let mut id = 0u64;
    'connections: while next <= MAX_SENDS && Instant::now() < deadline {
        let mut ws = ws_connect(&url, &token, proto).await;
        loop {
            if stop.load(Ordering::Relaxed) || next > MAX_SENDS || Instant::now() > deadline {
                let _ = ws.close(None).await;
                break 'connections;
            }
            let cmid = format!("{tag}-{next}");
            id += 1;
            let frame = pb::ClientFrame {
                id,
                kind: Some(In::Send(pb::SendMessageRequest {
                    room_id: room.clone(),
                    text: format!("{tag} {next}"),
                    client_message_id: cmid.clone(),
                    ..Default::default()
                })),
            };
            if ws.send(ws_message(proto, &frame)).await.is_err() {
                continue 'connections;
            }
            // Read until the reply to `id`, a close, or a broken socket.
            loop {
                let read = tokio::time::timeout(RETRY_FOR, ws.next()).await;
                let message = match read {
                    Ok(Some(Ok(message))) => message,
                    Ok(Some(Err(_)) | None) => continue 'connections,
                    Err(_) => panic!("{tag}: no reply to {cmid} within {RETRY_FOR:?}"),
                };
                if let Message::Close(close) = &message {
                    if close.as_ref().is_some_and(|c| u16::from(c.code) == 4001) {
                        reconnects_asked += 1;
                    }
                    continue 'connections;
                }
                let Some(frame) = ws_frame(&message) else {
                    continue;
                };
                if frame.id != id {
                    continue; // a push (authenticated, ...)
                }
                match frame.kind {
                    Some(Out::Sent(sent)) => {
                        let message = sent.message.expect("sent carries the message");
                        assert_eq!(message.client_message_id, cmid);
                        acked.push((message.seq, cmid));
                        acks.fetch_add(1, Ordering::Relaxed);
                        next += 1;
                    }
                    // Refused (e.g. the node is stopping): the same message again.
                    Some(Out::Error(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                    other => panic!("{tag}: unexpected reply {other:?}"),
                }
                break;
            }
        }
    }
    (acked, reconnects_asked)
}

/// Long-polls the room through nginx from its cursor until `stop` and then until
/// it has `until` (read from `target` once set); answers every (seq, client
/// message id) it received, in order.
async fn poller(
    rpc: common::Rpc,
    room: String,
    poll_id: String,
    target: Arc<AtomicU64>,
) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    let mut after: u64 = 0;
    let deadline = Instant::now() + LOAD_DEADLINE;
    loop {
        let until = target.load(Ordering::Relaxed);
        if until > 0 && after >= until {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "poller stuck at {after} (target {until})"
        );
        let request = pb::PollRequest {
            rooms: vec![pb::PollRoom {
                room_id: room.clone(),
                after_seq: Some(after),
            }],
            wait_ms: 1_000,
            poll_id: poll_id.clone(),
            ..Default::default()
        };
        let reply: Result<pb::PollResponse, _> =
            rpc.call(Codec::Proto, "PushService/Poll", &request).await;
        let Ok(reply) = reply else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        for frame in &reply.events {
            if let Some(Out::Message(m)) = &frame.kind {
                if m.room_id == room {
                    seen.push((m.seq, m.client_message_id.clone()));
                }
            }
        }
        if let Some(cursor) = reply.cursors.iter().find(|c| c.room_id == room) {
            after = after.max(cursor.after_seq);
        }
    }
}

/// A WebSocket subscriber through nginx: subscribes from the start, and after
/// every close (4001 from a draining node) or broken socket reconnects through
/// nginx and resubscribes from the last sequence it has, until it has `target`
/// (read once set); answers every (seq, client message id) it received, in order.
async fn ws_subscriber(
    url: String,
    token: String,
    room: String,
    proto: bool,
    target: Arc<AtomicU64>,
) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    let mut last = 0u64;
    let deadline = Instant::now() + LOAD_DEADLINE;
    let mut id = 0u64;
    'connections: loop {
        assert!(
            Instant::now() < deadline,
            "WebSocket subscriber stuck at {last} (target {})",
            target.load(Ordering::Relaxed)
        );
        let mut ws = ws_connect(&url, &token, proto).await;
        id += 1;
        let subscribe = pb::ClientFrame {
            id,
            kind: Some(In::Subscribe(pb::Subscribe {
                room_id: room.clone(),
                since_seq: Some(last),
            })),
        };
        if ws.send(ws_message(proto, &subscribe)).await.is_err() {
            continue;
        }
        loop {
            let until = target.load(Ordering::Relaxed);
            if until > 0 && last >= until {
                let _ = ws.close(None).await;
                return seen;
            }
            let message = match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(_)) | None) => continue 'connections,
            };
            if matches!(message, Message::Close(_)) {
                continue 'connections;
            }
            let Some(frame) = ws_frame(&message) else {
                continue;
            };
            match frame.kind {
                Some(Out::Message(m)) if m.room_id == room => {
                    last = m.seq;
                    seen.push((m.seq, m.client_message_id));
                }
                // Refused while the node stops: subscribe again elsewhere.
                Some(Out::Error(_)) if frame.id == id => continue 'connections,
                _ => {}
            }
        }
    }
}

/// Every message of the room, oldest first, read from node `index`.
async fn history(cluster: &Cluster, index: usize, token: &str, room: &str) -> Vec<pb::Message> {
    let mut out: Vec<pb::Message> = Vec::new();
    for _ in 0..10_000 {
        let page: pb::ListMessagesResponse = cluster
            .rpc_as(index, token)
            .call(
                Codec::Proto,
                "RoomService/ListMessages",
                &pb::ListMessagesRequest {
                    room_id: room.to_owned(),
                    after_seq: out.last().map_or(0, |m| m.seq),
                    limit: 200,
                    ..Default::default()
                },
            )
            .await
            .expect("ListMessages");
        out.extend(page.messages);
        if !page.has_more {
            return out;
        }
    }
    panic!("history of more than 10,000 pages");
}

/// A rolling restart of three real nodes behind nginx, linked by Redis, under
/// load: HTTP and WebSocket senders (both codecs), long-pollers and WebSocket
/// subscribers (both codecs), all through nginx, while each
/// node in turn gets SIGTERM (drain: not ready, 4001 to its WebSockets spread over
/// the window, keep-alive connections closed, then exit) and is started again.
/// Clients reconnect through nginx and resend what was not acknowledged with the
/// same client message id; pollers resume from their cursors. Afterwards the room
/// holds every acknowledged message once, at the sequence its acknowledgement
/// gave, in a gapless sequence, and every poller and subscriber received exactly
/// that sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_behind_nginx_under_load_loses_and_duplicates_nothing() {
    let Some(mut cluster) = Cluster::builder(3)
        .process_nodes()
        .nginx()
        .redis()
        .configure(|s, _| {
            s.server.drain_spread_ms = 1_000;
            s.server.shutdown_timeout_secs = 10;
            s.realtime.send_rate_per_sec = 100_000;
            s.realtime.send_burst = 100_000;
        })
        .start()
        .await
    else {
        return;
    };
    let owner = cluster.sign_up(0, &common::unique_name("owner")).await;
    let created: pb::CreateRoomResponse = cluster
        .rpc_as(0, &owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public.into(),
                title: "rolling".into(),
                ..Default::default()
            },
        )
        .await
        .expect("CreateRoom");
    let room = created.room.expect("a room").id;
    let mut accounts = Vec::new();
    for i in 0..8 {
        let account = cluster
            .sign_up(i % cluster.len(), &common::unique_name("load"))
            .await;
        let _: pb::JoinRoomResponse = cluster
            .rpc_as(i % cluster.len(), &account.access_token)
            .call(
                Codec::Proto,
                "RoomService/JoinRoom",
                &pb::JoinRoomRequest {
                    room_id: room.clone(),
                },
            )
            .await
            .expect("JoinRoom");
        accounts.push(account);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let target = Arc::new(AtomicU64::new(0));
    let mut http_senders = Vec::new();
    for (i, account) in accounts[0..2].iter().enumerate() {
        http_senders.push(tokio::spawn(http_sender(
            cluster.nginx_rpc_as(&account.access_token),
            room.clone(),
            format!("http{i}"),
            stop.clone(),
            acks.clone(),
        )));
    }
    let mut ws_senders = Vec::new();
    for (i, account) in accounts[2..4].iter().enumerate() {
        ws_senders.push(tokio::spawn(ws_sender(
            cluster.nginx_ws_url(),
            account.access_token.clone(),
            room.clone(),
            format!("ws{i}"),
            i % 2 == 0,
            stop.clone(),
            acks.clone(),
        )));
    }
    let mut pollers = Vec::new();
    for (i, account) in accounts[4..6].iter().enumerate() {
        pollers.push(tokio::spawn(poller(
            cluster.nginx_rpc_as(&account.access_token),
            room.clone(),
            format!("poller{i}"),
            target.clone(),
        )));
    }

    let mut subscribers = Vec::new();
    for (i, account) in accounts[6..8].iter().enumerate() {
        subscribers.push(tokio::spawn(ws_subscriber(
            cluster.nginx_ws_url(),
            account.access_token.clone(),
            room.clone(),
            i % 2 == 0,
            target.clone(),
        )));
    }

    // Load first, then each node in turn: SIGTERM, wait for its exit, start it.
    let wait_for_acks = |n: usize| {
        let acks = acks.clone();
        async move {
            assert!(
                common::eventually(Duration::from_secs(60), || {
                    let acks = acks.clone();
                    async move { acks.load(Ordering::Relaxed) >= n }
                })
                .await,
                "the senders stalled below {n} acknowledgements"
            );
        }
    };
    wait_for_acks(50).await;
    for index in 0..cluster.len() {
        let before = acks.load(Ordering::Relaxed);
        cluster.stop_gracefully(index).await;
        cluster.start_node(index).await;
        wait_for_acks(before + 30).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut acked: Vec<(u64, String)> = Vec::new();
    for sender in http_senders {
        acked.extend(sender.await.expect("an HTTP sender"));
    }
    let mut asked_to_reconnect = 0;
    for sender in ws_senders {
        let (mine, reconnects) = sender.await.expect("a WebSocket sender");
        acked.extend(mine);
        asked_to_reconnect += reconnects;
    }
    assert!(
        asked_to_reconnect >= 1,
        "no WebSocket sender was told to reconnect (4001) by a draining node"
    );

    // The room: gapless, each client message id once, every acknowledgement at
    // its sequence.
    let messages = history(&cluster, 1, &owner.access_token, &room).await;
    let last = messages.last().map_or(0, |m| m.seq);
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "the room has a gap");
    let mut cmids: Vec<&str> = messages
        .iter()
        .map(|m| m.client_message_id.as_str())
        .collect();
    cmids.sort_unstable();
    let total = cmids.len();
    cmids.dedup();
    assert_eq!(cmids.len(), total, "a message was stored twice");
    let stored: BTreeMap<u64, &str> = messages
        .iter()
        .map(|m| (m.seq, m.client_message_id.as_str()))
        .collect();
    for (seq, cmid) in &acked {
        assert_eq!(
            stored.get(seq).copied(),
            Some(cmid.as_str()),
            "acknowledged {cmid} at {seq} is not there"
        );
    }
    assert_eq!(
        acked.len() as u64,
        last,
        "every stored message was acknowledged once"
    );

    // Every poller received the same sequence, once each.
    target.store(last, Ordering::Relaxed);
    let expected: Vec<(u64, String)> = messages
        .iter()
        .map(|m| (m.seq, m.client_message_id.clone()))
        .collect();
    for poller in pollers {
        let seen = poller.await.expect("a poller");
        assert_eq!(seen, expected, "a poller missed or repeated messages");
    }
    // Every WebSocket subscriber too, across its reconnects and resumes.
    for subscriber in subscribers {
        let seen = subscriber.await.expect("a WebSocket subscriber");
        assert_eq!(
            seen, expected,
            "a WebSocket subscriber missed or repeated messages"
        );
    }
}

// ---------------------------------------------------------------------------
// Users across nodes (Redis broker)
// ---------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(10);

/// Two (or more) in-process nodes linked through Redis, with an admin; `None`
/// when PostgreSQL or Redis is missing (reported as skipped).
async fn linked(
    nodes: usize,
    configure: impl Fn(&mut Settings) + Send + Sync + 'static,
) -> Option<Cluster> {
    Cluster::builder(nodes)
        .redis()
        .admin()
        .configure(move |s, _| configure(s))
        .start()
        .await
}

/// An API key of the admin, made on node 0.
async fn api_key(cluster: &Cluster) -> String {
    let admin = cluster.admin(0).await;
    let key: pb::CreateApiKeyResponse = cluster
        .rpc_as(0, &admin.access_token)
        .call(
            Codec::Proto,
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest {
                name: "backend".into(),
            },
        )
        .await
        .expect("CreateApiKey");
    key.secret
}

/// Reads SSE bytes until an event named `name` arrives; its `data:` as JSON, or
/// `None` when the stream ends first.
async fn sse_event(
    response: &mut reqwest::Response,
    buf: &mut String,
    name: &str,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let event = block.lines().find_map(|l| l.strip_prefix("event: "));
            let data = block.lines().find_map(|l| l.strip_prefix("data: "));
            if event == Some(name) {
                return Some(data.map_or(serde_json::Value::Null, |d| {
                    serde_json::from_str(d).expect("data is JSON")
                }));
            }
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("no `{name}` SSE event within {WAIT:?}"));
        match tokio::time::timeout(left, response.chunk()).await {
            Ok(Ok(Some(bytes))) => buf.push_str(std::str::from_utf8(&bytes).expect("UTF-8")),
            Ok(Ok(None)) | Ok(Err(_)) => return None,
            Err(_) => panic!("no `{name}` SSE event within {WAIT:?}"),
        }
    }
}

/// Opens `GET /sse?{query}` on node `index` as `token`, and waits for `notificationsSubscribed`.
async fn open_sse(
    cluster: &Cluster,
    index: usize,
    token: &str,
    query: &str,
) -> (reqwest::Response, String) {
    let mut response = cluster
        .http()
        .get(cluster.url(index, &format!("/sse?{query}")))
        .bearer_auth(token)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("GET /sse");
    assert_eq!(response.status(), 200);
    let mut buf = String::new();
    sse_event(&mut response, &mut buf, "notificationsSubscribed")
        .await
        .expect("the stream subscribes to notifications");
    (response, buf)
}

/// Waits for `ws` to be closed; its close code.
async fn close_code(ws: &mut WsClient) -> u16 {
    loop {
        match ws.next_push(WAIT).await {
            Incoming::Closed(code, _) => return code,
            Incoming::Frame(_) => continue,
            Incoming::Timeout => panic!("the connection was not closed within {WAIT:?}"),
        }
    }
}

/// A user with a WebSocket on node 0 and an SSE stream on node 1, both on the
/// notification stream, gets one PublishToUser (made through node 0's or node 1's
/// API) exactly once on each connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_user_reaches_the_user_on_every_node_once() {
    let Some(cluster) = linked(2, |_| {}).await else {
        return;
    };
    let key = api_key(&cluster).await;
    let user = cluster.sign_up(0, &common::unique_name("carol")).await;
    let mut ws =
        WsClient::connect_authenticated(&cluster.ws_url(0), WsCodec::Proto, &user.access_token)
            .await;
    let reply = ws
        .request(In::SubscribeNotifications(pb::SubscribeNotifications {
            since_seq: None,
        }))
        .await;
    assert!(
        matches!(reply.kind, Some(Out::NotificationsSubscribed(_))),
        "{reply:?}"
    );
    let (mut sse, mut buf) = open_sse(&cluster, 1, &user.access_token, "notifications=live").await;

    for (via, text) in [(0, "paid"), (1, "shipped")] {
        let published: pb::PublishToUserResponse = cluster
            .rpc_as(via, &key)
            .call(
                Codec::Proto,
                "PublishService/PublishToUser",
                &pb::PublishToUserRequest {
                    user_id: user.user_id.clone(),
                    sender: "shop".into(),
                    text: text.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("PublishToUser");
        let seq = published.notification.expect("the notification").seq;
        let pushed = ws
            .push_matching(WAIT, |kind| match kind {
                Out::Notification(n) => Some(n.clone()),
                _ => None,
            })
            .await;
        assert_eq!((pushed.seq, pushed.text.as_str()), (seq, text));
        let event = sse_event(&mut sse, &mut buf, "notification")
            .await
            .expect("the SSE stream is open");
        assert_eq!(event["notification"]["text"], text, "{event}");
        assert_eq!(event["notification"]["seq"], seq.to_string(), "{event}");
    }
    // Once each: nothing more arrives on either connection.
    match ws.next_push(Duration::from_millis(500)).await {
        Incoming::Timeout => {}
        Incoming::Frame(f) if !matches!(f.kind, Some(Out::Notification(_))) => {}
        other => panic!("a second push on the WebSocket: {other:?}"),
    }
}

/// DisconnectUser, a sign-out of every session and an account suspension, each
/// asked of one node, close the user's connections on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_sign_out_and_suspension_close_the_user_on_every_node() {
    let Some(cluster) = linked(2, |_| {}).await else {
        return;
    };
    let key = api_key(&cluster).await;
    let admin = cluster.admin(1).await;
    let user = cluster.sign_up(0, &common::unique_name("dave")).await;
    let connect = |index: usize, token: String| {
        let url = cluster.ws_url(index);
        async move { WsClient::connect_authenticated(&url, WsCodec::Json, &token).await }
    };

    // DisconnectUser through node 0's publish API: both close with 4504.
    let mut on0 = connect(0, user.access_token.clone()).await;
    let mut on1 = connect(1, user.access_token.clone()).await;
    let _: pb::DisconnectUserResponse = cluster
        .rpc_as(0, &key)
        .call(
            Codec::Proto,
            "PublishService/DisconnectUser",
            &pb::DisconnectUserRequest {
                user_id: user.user_id.clone(),
                revoke_sessions: false,
                reason: "bye".into(),
            },
        )
        .await
        .expect("DisconnectUser");
    assert_eq!(close_code(&mut on0).await, 4504);
    assert_eq!(close_code(&mut on1).await, 4504);

    // Sign-out of every session on node 1: the WebSocket on node 0 (another
    // session) and the SSE stream on node 1 close.
    let other = cluster.sign_in(1, &user.username).await;
    let mut on0 = connect(0, user.access_token.clone()).await;
    let (mut sse, mut buf) = open_sse(&cluster, 1, &user.access_token, "notifications=live").await;
    let _: pb::SignOutResponse = cluster
        .rpc_as(1, &other.access_token)
        .call(
            Codec::Proto,
            "AuthService/SignOut",
            &pb::SignOutRequest { all_sessions: true },
        )
        .await
        .expect("SignOut");
    assert_eq!(close_code(&mut on0).await, 4501);
    // The SSE stream gets its `close` event (or simply ends).
    let _ = sse_event(&mut sse, &mut buf, "close").await;
    assert!(
        sse_event(&mut sse, &mut buf, "never").await.is_none(),
        "the signed-out SSE stream on node 1 stays open"
    );

    // An admin on node 1 suspends the account: its connection on node 0 closes.
    let again = cluster.sign_up(0, &common::unique_name("erin")).await;
    let mut on0 = connect(0, again.access_token.clone()).await;
    let _: pb::SuspendUserResponse = cluster
        .rpc_as(1, &admin.access_token)
        .call(
            Codec::Json,
            "AdminService/SuspendUser",
            &pb::SuspendUserRequest {
                user_id: again.user_id.clone(),
                reason: "spam".into(),
            },
        )
        .await
        .expect("SuspendUser");
    assert_eq!(close_code(&mut on0).await, 4501);
}

/// The per-user send limit is one budget for the whole cluster: a burst of 3 and
/// one send a second refuse the sends past the burst even when they alternate
/// between two nodes (each node alone would allow 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_limit_holds_across_nodes() {
    let Some(cluster) = linked(2, |s| {
        s.realtime.send_rate_per_sec = 1;
        s.realtime.send_burst = 3;
    })
    .await
    else {
        return;
    };
    let owner = cluster.sign_up(0, &common::unique_name("owner")).await;
    let created: pb::CreateRoomResponse = cluster
        .rpc_as(0, &owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public.into(),
                title: "limits".into(),
                ..Default::default()
            },
        )
        .await
        .expect("CreateRoom");
    let room = created.room.expect("a room").id;
    let started = Instant::now();
    let mut accepted = 0u64;
    let mut refused = 0u64;
    for i in 0..8 {
        let reply: Result<pb::SendMessageResponse, _> = cluster
            .rpc_as(i % 2, &owner.access_token)
            .call(
                Codec::Proto,
                "RoomService/SendMessage",
                &pb::SendMessageRequest {
                    room_id: room.clone(),
                    text: format!("m{i}"),
                    client_message_id: format!("c{i}"),
                    ..Default::default()
                },
            )
            .await;
        match reply {
            Ok(_) => accepted += 1,
            Err(e) => {
                e.expect("resource_exhausted", 429);
                refused += 1;
            }
        }
    }
    // The burst, plus one token per whole second that passed.
    let allowed = 3 + started.elapsed().as_secs() + 1;
    assert!(
        accepted <= allowed && refused > 0,
        "{accepted} sends accepted ({refused} refused) over two nodes; the cluster allows {allowed}"
    );
}

/// Presence queries on one node see the users connected to the others, and the
/// users of a node that was killed drop out within the presence expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_sees_every_node_and_forgets_a_killed_one() {
    let Some(mut cluster) = Cluster::builder(3)
        .node_kind(2, NodeKind::Process)
        .redis()
        .admin()
        .configure(|s, _| {
            s.cluster.presence_refresh_ms = 200;
            s.cluster.presence_expiry_ms = 1_000;
        })
        .start()
        .await
    else {
        return;
    };
    let key = api_key(&cluster).await;
    let owner = cluster.sign_up(0, &common::unique_name("owner")).await;
    let created: pb::CreateRoomResponse = cluster
        .rpc_as(0, &owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public.into(),
                title: "presence".into(),
                ..Default::default()
            },
        )
        .await
        .expect("CreateRoom");
    let room = created.room.expect("a room").id;
    let mut members = Vec::new();
    for index in [1, 2] {
        let member = cluster.sign_up(index, &common::unique_name("m")).await;
        let _: pb::JoinRoomResponse = cluster
            .rpc_as(index, &member.access_token)
            .call(
                Codec::Proto,
                "RoomService/JoinRoom",
                &pb::JoinRoomRequest {
                    room_id: room.clone(),
                },
            )
            .await
            .expect("JoinRoom");
        members.push(member);
    }
    // One member online on node 1 (in-process), one on node 2 (a process).
    let _on1 = WsClient::connect_authenticated(
        &cluster.ws_url(1),
        WsCodec::Proto,
        &members[0].access_token,
    )
    .await;
    let _on2 = WsClient::connect_authenticated(
        &cluster.ws_url(2),
        WsCodec::Proto,
        &members[1].access_token,
    )
    .await;
    let online = |cluster: &Cluster| {
        let rpc = cluster.rpc_as(0, &key);
        let room = room.clone();
        async move {
            let presence: pb::GetPresenceResponse = rpc
                .call(
                    Codec::Proto,
                    "PublishService/GetPresence",
                    &pb::GetPresenceRequest {
                        room_id: room.clone(),
                    },
                )
                .await
                .expect("GetPresence");
            let counts: pb::GetOnlineCountsResponse = rpc
                .call(
                    Codec::Proto,
                    "PublishService/GetOnlineCounts",
                    &pb::GetOnlineCountsRequest {
                        room_ids: vec![room.clone()],
                    },
                )
                .await
                .expect("GetOnlineCounts");
            (
                presence.online_user_ids,
                counts.online.get(&room).copied().unwrap_or(0),
            )
        }
    };
    let mut both = vec![members[0].user_id.clone(), members[1].user_id.clone()];
    both.sort();
    let deadline = Instant::now() + WAIT;
    loop {
        let (ids, count) = online(&cluster).await;
        if ids == both && count == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 sees {ids:?} ({count}) online, not the members on nodes 1 and 2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // kill -9 node 2: its member is offline within the expiry.
    cluster.kill(2);
    let deadline = Instant::now() + WAIT;
    loop {
        let (ids, count) = online(&cluster).await;
        if ids == vec![members[0].user_id.clone()] && count == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 still sees {ids:?} ({count}) online after node 2 was killed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A ban made through one node refuses the banned user's next send on another
/// node at once, although that node had the user's membership in its access
/// cache: the change is forwarded to every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_node_is_enforced_on_the_others_at_once() {
    let Some(cluster) = linked(2, |_| {}).await else {
        return;
    };
    let owner = cluster.sign_up(0, &common::unique_name("owner")).await;
    let member = cluster.sign_up(1, &common::unique_name("member")).await;
    let created: pb::CreateRoomResponse = cluster
        .rpc_as(0, &owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public.into(),
                title: "moderated".into(),
                ..Default::default()
            },
        )
        .await
        .expect("CreateRoom");
    let room = created.room.expect("a room").id;
    let _: pb::JoinRoomResponse = cluster
        .rpc_as(1, &member.access_token)
        .call(
            Codec::Proto,
            "RoomService/JoinRoom",
            &pb::JoinRoomRequest {
                room_id: room.clone(),
            },
        )
        .await
        .expect("JoinRoom");
    let send = |i: u32| {
        let rpc = cluster.rpc_as(1, &member.access_token);
        let room = room.clone();
        async move {
            rpc.call::<_, pb::SendMessageResponse>(
                Codec::Proto,
                "RoomService/SendMessage",
                &pb::SendMessageRequest {
                    room_id: room,
                    text: format!("hello {i}"),
                    client_message_id: format!("b{i}"),
                    ..Default::default()
                },
            )
            .await
        }
    };
    // Node 1 now holds the membership (and the session) in its cache.
    send(1).await.expect("a member sends on node 1");
    send(2).await.expect("a member sends on node 1 again");
    let _: pb::BanMemberResponse = cluster
        .rpc_as(0, &owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/BanMember",
            &pb::BanMemberRequest {
                room_id: room.clone(),
                user_id: member.user_id.clone(),
                reason: "spam".into(),
                duration_seconds: 0,
            },
        )
        .await
        .expect("BanMember on node 0");
    // The forwarded change crosses Redis in well under a second; the cache has no
    // expiry of its own, so without it node 1 would accept sends indefinitely.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match send(3).await {
            Err(e) => {
                e.expect("permission_denied", 403);
                break;
            }
            Ok(_) => assert!(
                Instant::now() < deadline,
                "node 1 still accepts the banned member's sends"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
