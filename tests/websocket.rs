//! The WebSocket protocol end to end: real clients on real sockets against a server
//! on an ephemeral port, both subprotocols, SQLite and PostgreSQL. These tests prove
//! delivery guarantees 1, 2 and 4: gapless per-room sequences acknowledged after
//! commit, resume without gap or duplicate, and slow consumers that never stall a
//! room yet still receive everything.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    rooms::{create_room, history, join, last_seq, send_http},
    ws::{room_event, Incoming, WsClient, WsCodec},
    Backend, TestServer,
};
use rand::Rng as _;
use roomcast::{
    actors::{room::Restart, room_registry::FindRoom},
    ids::RoomId,
    proto::v1 as pb,
    settings::Settings,
};

use pb::server_frame::Kind as Out;

const IDLE: Duration = Duration::from_secs(30);

fn fast_sends(settings: &mut Settings) {
    settings.realtime.send_rate_per_sec = 100_000;
    settings.realtime.send_burst = 100_000;
}

fn ws_url(server: &TestServer) -> String {
    server.ws_url("/ws")
}

fn assert_exact_sequence(
    events: &[pb::Message],
    from: u64,
    to: u64,
    store: &HashMap<u64, String>,
    who: &str,
) {
    let seqs: Vec<u64> = events.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (from..=to).collect();
    assert_eq!(
        seqs, expected,
        "{who}: must receive exactly {from}..={to} in order"
    );
    for m in events {
        assert_eq!(
            store.get(&m.seq),
            Some(&m.text),
            "{who}: seq {} differs from the store",
            m.seq
        );
    }
}

// ---------------------------------------------------------------------------
// 10 concurrent senders × 200 messages, 20 subscribers joining at random points.
// ---------------------------------------------------------------------------

const SENDERS: usize = 10;
const PER_SENDER: usize = 200;
const SUBSCRIBERS: usize = 20;

async fn concurrent_senders_and_resuming_subscribers(backend: Backend, codec: WsCodec) {
    let server = Arc::new(TestServer::spawn_with(backend, fast_sends).await);
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let account = server
            .sign_up(&common::unique_name(&format!("s{i}x")))
            .await;
        join(&server, &account, &room).await;
        senders.push(account);
    }
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let total = (SENDERS * PER_SENDER) as u64;

    let mut subscriber_tasks = Vec::new();
    for n in 0..SUBSCRIBERS {
        let (server, reader, room) = (server.clone(), reader.clone(), room.clone());
        let delay = Duration::from_millis(rand::thread_rng().gen_range(0..1500));
        let pick = rand::thread_rng().gen_range(0.0..=1.0f64);
        subscriber_tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A resuming client names a sequence it has seen: anywhere in 0..=last.
            let last = last_seq(&server, &reader, &room).await;
            let since = (pick * last as f64) as u64;
            let mut client =
                WsClient::connect_authenticated(&ws_url(&server), codec, &reader.access_token)
                    .await;
            client
                .subscribe(&room, Some(since))
                .await
                .expect("subscribe");
            let events = client.collect_until(&room, total, IDLE).await;
            (n, since, events)
        }));
    }

    let mut sender_tasks = Vec::new();
    for (i, account) in senders.iter().cloned().enumerate() {
        let (server, room) = (server.clone(), room.clone());
        sender_tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            if i % 2 == 0 {
                let mut client =
                    WsClient::connect_authenticated(&ws_url(&server), codec, &account.access_token)
                        .await;
                for j in 0..PER_SENDER {
                    let sent = client
                        .send_message(
                            &room,
                            &format!("sender {i} message {j}"),
                            &format!("{i}-{j}"),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("send {i}-{j}: {e:?}"));
                    acks.push(sent.message.expect("acked message").seq);
                }
            } else {
                for j in 0..PER_SENDER {
                    let sent = send_http(
                        &server,
                        &account,
                        &room,
                        &format!("sender {i} message {j}"),
                        &format!("{i}-{j}"),
                    )
                    .await;
                    acks.push(sent.message.expect("acked message").seq);
                }
            }
            acks
        }));
    }
    let mut acked = Vec::new();
    for task in sender_tasks {
        let acks = task.await.expect("sender task");
        assert!(
            acks.windows(2).all(|w| w[0] < w[1]),
            "one sender's acks are increasing"
        );
        acked.extend(acks);
    }
    acked.sort_unstable();
    assert_eq!(
        acked,
        (1..=total).collect::<Vec<_>>(),
        "acks cover 1..={total} exactly once"
    );

    let store: HashMap<u64, String> = history(&server, &owner, &room)
        .await
        .into_iter()
        .map(|m| (m.seq, m.text))
        .collect();
    assert_eq!(store.len() as u64, total);
    for task in subscriber_tasks {
        let (n, since, events) = task.await.expect("subscriber task");
        assert_exact_sequence(
            &events,
            since + 1,
            total,
            &store,
            &format!("subscriber {n} (since {since})"),
        );
    }
}

ws_matrix!(
    concurrent_senders,
    concurrent_senders_and_resuming_subscribers
);

// ---------------------------------------------------------------------------
// Disconnect and resume; idempotent retries.
// ---------------------------------------------------------------------------

async fn resume_after_disconnect(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, fast_sends).await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let bob = server.sign_up(&common::unique_name("bob")).await;
    let room = create_room(&server, &alice, pb::RoomKind::Private).await;
    let _: pb::InviteMemberResponse = server
        .rpc_as(&alice.access_token)
        .call_proto(
            "RoomService/InviteMember",
            &pb::InviteMemberRequest {
                room_id: room.clone(),
                user_id: bob.user_id.clone(),
            },
        )
        .await
        .expect("invite");
    join(&server, &bob, &room).await;

    let mut bob_ws =
        WsClient::connect_authenticated(&ws_url(&server), codec, &bob.access_token).await;
    assert_eq!(
        bob_ws.subscribe(&room, Some(0)).await.expect("subscribe"),
        0
    );
    for i in 1..=50 {
        send_http(&server, &alice, &room, &format!("m{i}"), &format!("c{i}")).await;
    }
    let first = bob_ws.collect_until(&room, 20, IDLE).await;
    let last_seen = first.iter().map(|m| m.seq).max().expect("some events");
    drop(bob_ws); // mid-stream, without a close frame

    for i in 51..=100 {
        send_http(&server, &alice, &room, &format!("m{i}"), &format!("c{i}")).await;
    }
    // A retry of an acknowledged send returns the original, never a second copy.
    let retry = send_http(&server, &alice, &room, "m7 (retried)", "c7").await;
    assert!(retry.duplicate, "a retry is reported as a duplicate");
    let original = retry.message.expect("the original");
    assert_eq!((original.seq, original.text.as_str()), (7, "m7"));
    let mut ws_alice =
        WsClient::connect_authenticated(&ws_url(&server), codec, &alice.access_token).await;
    let again = ws_alice
        .send_message(&room, "m9 again", "c9")
        .await
        .expect("retry over ws");
    assert!(again.duplicate);
    assert_eq!(again.message.expect("original").seq, 9);

    let mut bob_ws =
        WsClient::connect_authenticated(&ws_url(&server), codec, &bob.access_token).await;
    assert_eq!(
        bob_ws
            .subscribe(&room, Some(last_seen))
            .await
            .expect("resubscribe"),
        100
    );
    let rest = bob_ws.collect_until(&room, 100, IDLE).await;
    let store: HashMap<u64, String> = history(&server, &alice, &room)
        .await
        .into_iter()
        .map(|m| (m.seq, m.text))
        .collect();
    assert_eq!(store.len(), 100, "retries stored nothing");
    assert_exact_sequence(&rest, last_seen + 1, 100, &store, "bob after reconnect");
    match bob_ws.next_push(IDLE).await {
        Incoming::Frame(pb::ServerFrame {
            kind: Some(Out::Resumed(r)),
            ..
        }) => {
            assert_eq!(
                (r.room_id.as_str(), r.from_seq, r.to_seq),
                (room.as_str(), last_seen + 1, 100)
            );
        }
        other => panic!("expected the resumed marker, got {other:?}"),
    }
    // Live delivery continues after the replay.
    send_http(&server, &alice, &room, "live", "c-live").await;
    let live = bob_ws.collect_until(&room, 101, IDLE).await;
    assert_eq!(live.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![101]);
}

ws_matrix!(resume, resume_after_disconnect);

// ---------------------------------------------------------------------------
// Slow consumers.
// ---------------------------------------------------------------------------

/// A client whose socket receive buffer is tiny, so the server's writes back up.
async fn connect_with_small_buffer(server: &TestServer, codec: WsCodec, token: &str) -> WsClient {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(server.addr).await.expect("connect");
    WsClient::from_stream(stream, &ws_url(server), codec, token).await
}

async fn slow_reader_does_not_stall_others(backend: Backend, codec: WsCodec) {
    const MESSAGES: u64 = 600;
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            fast_sends(s);
            s.rooms.max_message_bytes = 16 * 1024;
            s.realtime.outbound_queue_frames = 64;
            s.realtime.outbound_queue_bytes = 256 * 1024;
            s.realtime.max_catch_up_rounds = 1000;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let reader = server.sign_up(&common::unique_name("reader")).await;

    let mut slow = connect_with_small_buffer(&server, codec, &reader.access_token).await;
    slow.subscribe(&room, Some(0))
        .await
        .expect("slow subscribes");
    let mut fast =
        WsClient::connect_authenticated(&ws_url(&server), codec, &reader.access_token).await;
    fast.subscribe(&room, Some(0))
        .await
        .expect("fast subscribes");

    let big = "x".repeat(12 * 1024);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let (server, owner, room, big) = (server.clone(), owner.clone(), room.clone(), big.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..MESSAGES / 4 {
                send_http(
                    &server,
                    &owner,
                    &room,
                    &format!("{t}-{i} {big}"),
                    &format!("{t}-{i}"),
                )
                .await;
            }
        }));
    }
    // The fast reader gets everything while the slow one has read nothing yet.
    let fast_events = fast.collect_until(&room, MESSAGES, IDLE).await;
    for task in tasks {
        task.await.expect("sender");
    }
    let store: HashMap<u64, String> = history(&server, &owner, &room)
        .await
        .into_iter()
        .map(|m| (m.seq, m.text))
        .collect();
    assert_exact_sequence(&fast_events, 1, MESSAGES, &store, "fast reader");

    // Now the slow reader reads: it must get every message in order, through
    // catch-up, or be told to reconnect with the documented code and then resume.
    let mut events = Vec::new();
    let mut lagged = false;
    loop {
        if events
            .last()
            .is_some_and(|m: &pb::Message| m.seq == MESSAGES)
        {
            break;
        }
        match slow.next_push(IDLE).await {
            Incoming::Frame(frame) => {
                if let Some(m) = room_event(&frame) {
                    events.push(m.clone());
                } else if matches!(frame.kind, Some(Out::Lagging(_))) {
                    lagged = true;
                }
            }
            Incoming::Closed(code, reason) => {
                assert_eq!(
                    code, 4000,
                    "a slow consumer is closed only with TOO_SLOW: {reason}"
                );
                let since = events.last().map_or(0, |m| m.seq);
                slow =
                    WsClient::connect_authenticated(&ws_url(&server), codec, &reader.access_token)
                        .await;
                slow.subscribe(&room, Some(since))
                    .await
                    .expect("resubscribe");
                lagged = true;
            }
            Incoming::Timeout => {
                panic!("slow reader stalled at {:?}", events.last().map(|m| m.seq))
            }
        }
    }
    assert!(
        lagged,
        "the slow reader's queue overflowed (the test must exercise catch-up)"
    );
    assert_exact_sequence(&events, 1, MESSAGES, &store, "slow reader");
}

ws_matrix!(slow_consumer, slow_reader_does_not_stall_others);

// ---------------------------------------------------------------------------
// Room actor restarts while messages flow.
// ---------------------------------------------------------------------------

async fn room_restart_loses_nothing(backend: Backend, codec: WsCodec) {
    const MESSAGES: usize = 300;
    let server = Arc::new(TestServer::spawn_with(backend, fast_sends).await);
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut sub =
        WsClient::connect_authenticated(&ws_url(&server), codec, &owner.access_token).await;
    sub.subscribe(&room, Some(0)).await.expect("subscribe");

    let sender = {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        tokio::spawn(async move {
            let mut acked = HashMap::new();
            for i in 0..MESSAGES {
                // A send cut by the restart answers `unavailable`; retrying with the
                // same client message id is always safe.
                for attempt in 0..20 {
                    let result: Result<pb::SendMessageResponse, _> = server
                        .rpc_as(&owner.access_token)
                        .call_proto(
                            "RoomService/SendMessage",
                            &pb::SendMessageRequest {
                                room_id: room.clone(),
                                text: format!("m{i}"),
                                client_message_id: format!("c{i}"),
                                ..Default::default()
                            },
                        )
                        .await;
                    match result {
                        Ok(sent) => {
                            acked.insert(i, sent.message.expect("message").seq);
                            break;
                        }
                        Err(e) if e.code == "unavailable" && attempt < 19 => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("send {i}: {e:?}"),
                    }
                }
            }
            acked
        })
    };
    let room_id = RoomId(room.clone());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let addr = server
            .state()
            .rooms
            .send(FindRoom {
                room_id: room_id.clone(),
            })
            .await
            .expect("registry");
        addr.expect("the room is running")
            .send(Restart)
            .await
            .expect("restart");
    }
    let acked = sender.await.expect("sender");
    assert_eq!(acked.len(), MESSAGES);
    let stored = history(&server, &owner, &room).await;
    assert_eq!(stored.len(), MESSAGES, "each message stored exactly once");
    let store: HashMap<u64, String> = stored.into_iter().map(|m| (m.seq, m.text)).collect();
    for (i, seq) in &acked {
        assert_eq!(
            store.get(seq),
            Some(&format!("m{i}")),
            "acknowledged message {i} is stored at {seq}"
        );
    }
    let events = sub.collect_until(&room, MESSAGES as u64, IDLE).await;
    assert_exact_sequence(
        &events,
        1,
        MESSAGES as u64,
        &store,
        "subscriber across restarts",
    );
}

ws_matrix!(room_restart, room_restart_loses_nothing);

// ---------------------------------------------------------------------------
// Idle rooms retire, and come back on demand with their history intact.
// ---------------------------------------------------------------------------

async fn idle_rooms_retire_and_return(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s| {
        fast_sends(s);
        s.rooms.idle_stop_secs = 1;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let busy = create_room(&server, &owner, pb::RoomKind::Public).await;
    let quiet = create_room(&server, &owner, pb::RoomKind::Public).await;
    send_http(&server, &owner, &quiet, "first", "q1").await;
    send_http(&server, &owner, &busy, "first", "b1").await;
    let mut watcher =
        WsClient::connect_authenticated(&ws_url(&server), codec, &owner.access_token).await;
    watcher.subscribe(&busy, Some(1)).await.expect("subscribe");

    let running = |room: &str| {
        let rooms = server.state().rooms.clone();
        let room_id = RoomId(room.to_owned());
        async move {
            rooms
                .send(FindRoom { room_id })
                .await
                .expect("registry")
                .is_some()
        }
    };
    assert!(running(&quiet).await, "sending started the room's actor");
    assert!(
        common::eventually(Duration::from_secs(10), || async { !running(&quiet).await }).await,
        "a room with no subscribers retires"
    );
    assert!(running(&busy).await, "a room with a subscriber stays");

    // The retired room starts again on the next send and continues its sequence.
    let second = send_http(&server, &owner, &quiet, "second", "q2").await;
    assert_eq!(second.message.expect("message").seq, 2);
    let mut reader =
        WsClient::connect_authenticated(&ws_url(&server), codec, &owner.access_token).await;
    reader.subscribe(&quiet, Some(0)).await.expect("subscribe");
    let events = reader.collect_until(&quiet, 2, IDLE).await;
    assert_eq!(
        events.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        vec!["first", "second"]
    );
}

ws_matrix!(idle_rooms, idle_rooms_retire_and_return);
