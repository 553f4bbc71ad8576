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
    Codec,
};
use futures_util::{SinkExt as _, StreamExt as _};
use pb::{client_frame::Kind as In, server_frame::Kind as Out};
use prost::Message as _;
use roomcast::proto::v1 as pb;
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

/// A rolling restart of three real nodes behind nginx, under load: HTTP and
/// WebSocket senders (both codecs) and long-pollers, all through nginx, while each
/// node in turn gets SIGTERM (drain: not ready, 4001 to its WebSockets spread over
/// the window, keep-alive connections closed, then exit) and is started again.
/// Clients reconnect through nginx and resend what was not acknowledged with the
/// same client message id; pollers resume from their cursors. Afterwards the room
/// holds every acknowledged message once, at the sequence its acknowledgement
/// gave, in a gapless sequence, and every poller received exactly that sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_behind_nginx_under_load_loses_and_duplicates_nothing() {
    let Some(mut cluster) = Cluster::builder(3)
        .process_nodes()
        .nginx()
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
    for i in 0..6 {
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
}
