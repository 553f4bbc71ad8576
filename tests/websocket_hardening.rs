//! Regression tests of issue 6 (hardening) for subscriptions and delivery, through
//! real WebSocket clients against SQLite and PostgreSQL: removals reach every
//! subscription whatever its phase, the ring replays what the store holds, one bad
//! message fails alone, live-only stays live-only, admission limits answer clearly,
//! pruned history is announced with `gap`, a panicking room restarts without loss,
//! and presence follows connections in order.
//!
//! Faults (a panicking or failing commit) are injected through the room actor's
//! test-only `InjectFault` message (the `fault-injection` feature, on in tests).

mod common;

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use common::{
    rooms::{create_room, history, join, send_http},
    ws::{room_event, Incoming, WsClient, WsCodec},
    Account, Backend, TestServer,
};
use roomcast::{
    actors::{
        room::{InjectFault, RoomActor},
        room_registry::FindRoom,
        user_session::DELAY_OFFLINE_ANNOUNCEMENTS_MS,
    },
    ids::RoomId,
    proto::v1 as pb,
    settings::Settings,
};

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(1500);

fn fast_sends(settings: &mut Settings) {
    settings.realtime.send_rate_per_sec = 100_000;
    settings.realtime.send_burst = 100_000;
}

fn url(server: &TestServer) -> String {
    server.ws_url("/ws")
}

async fn rpc<Req: prost::Message, Resp: prost::Message + Default>(
    server: &TestServer,
    who: &Account,
    method: &str,
    req: &Req,
) -> Resp {
    server
        .rpc_as(&who.access_token)
        .call_proto(method, req)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e:?}"))
}

/// The running actor of a room (the room must have been used).
async fn room_actor(server: &TestServer, room: &str) -> actix::Addr<RoomActor> {
    server
        .state()
        .rooms
        .send(FindRoom {
            room_id: RoomId(room.to_owned()),
        })
        .await
        .expect("registry")
        .expect("the room is running")
}

/// Waits for the replies to requests `ids`, in whatever order they come.
async fn replies(ws: &mut WsClient, ids: std::ops::Range<u64>) -> HashMap<u64, pb::ServerFrame> {
    let mut got = HashMap::new();
    while got.len() < ids.clone().count() {
        match ws.next_frame(WAIT).await {
            Incoming::Frame(frame) if ids.contains(&frame.id) => {
                got.insert(frame.id, frame);
            }
            Incoming::Frame(_) => {}
            other => panic!("waiting for replies {ids:?}: {other:?}"),
        }
    }
    got
}

async fn inject(server: &TestServer, room: &str, fault: InjectFault) {
    room_actor(server, room)
        .await
        .send(fault)
        .await
        .expect("the room takes the fault");
}

/// A client whose socket receive buffer is tiny, so the server's writes back up.
async fn connect_with_small_buffer(server: &TestServer, codec: WsCodec, token: &str) -> WsClient {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(server.addr).await.expect("connect");
    WsClient::from_stream(stream, &url(server), codec, token).await
}

/// A private room owned by `owner` that `member` joined.
async fn private_room_with(server: &TestServer, owner: &Account, member: &Account) -> String {
    let created: pb::CreateRoomResponse = rpc(
        server,
        owner,
        "RoomService/CreateRoom",
        &pb::CreateRoomRequest {
            kind: pb::RoomKind::Private as i32,
            title: "private".into(),
            member_ids: vec![member.user_id.clone()],
            ..Default::default()
        },
    )
    .await;
    let room = created.room.expect("room").id;
    join(server, member, &room).await;
    room
}

// ---------------------------------------------------------------------------
// Item 1: a kicked or banned member whose connection lagged stops reading.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Removal {
    Kick,
    Ban,
}

async fn removed_while_lagging(backend: Backend, codec: WsCodec, how: Removal) {
    const BEFORE: usize = 240;
    const AFTER: usize = 20;
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            fast_sends(s);
            s.rooms.max_message_bytes = 16 * 1024;
            s.realtime.outbound_queue_frames = 8;
            s.realtime.outbound_queue_bytes = 64 * 1024;
            s.realtime.max_catch_up_rounds = 1000;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let member = server.sign_up(&common::unique_name("member")).await;
    let room = private_room_with(&server, &owner, &member).await;

    // The member subscribes, then stops reading while the room fills its queue.
    let mut slow = connect_with_small_buffer(&server, codec, &member.access_token).await;
    slow.subscribe(&room, Some(0)).await.expect("subscribe");
    let big = "x".repeat(12 * 1024);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (server, owner, room, big) = (server.clone(), owner.clone(), room.clone(), big.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..BEFORE / 4 {
                let id = format!("b{t}-{i}");
                send_http(&server, &owner, &room, &format!("{id} {big}"), &id).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("sender");
    }

    // The owner removes the member, then the room goes on.
    match how {
        Removal::Kick => {
            let _: pb::KickMemberResponse = rpc(
                &server,
                &owner,
                "RoomService/KickMember",
                &pb::KickMemberRequest {
                    room_id: room.clone(),
                    user_id: member.user_id.clone(),
                    reason: String::new(),
                },
            )
            .await;
        }
        Removal::Ban => {
            let _: pb::BanMemberResponse = rpc(
                &server,
                &owner,
                "RoomService/BanMember",
                &pb::BanMemberRequest {
                    room_id: room.clone(),
                    user_id: member.user_id.clone(),
                    ..Default::default()
                },
            )
            .await;
        }
    }
    let removed_at = BEFORE as u64;
    for i in 0..AFTER {
        let id = format!("a{i}");
        send_http(&server, &owner, &room, &format!("after removal {i}"), &id).await;
    }

    // The member reads again: it is told it was removed, and reads nothing sent
    // after the removal, nor anything after the `removed` frame.
    let mut lagged = false;
    let mut removed = None;
    loop {
        match slow.next_push(WAIT).await {
            Incoming::Frame(frame) => {
                if let Some(m) = room_event(&frame) {
                    assert!(
                        m.seq <= removed_at,
                        "a removed member read seq {} sent after the removal",
                        m.seq
                    );
                    assert!(removed.is_none(), "an event after `removed`: {m:?}");
                }
                match frame.kind {
                    Some(Out::Lagging(_)) => lagged = true,
                    Some(Out::Removed(r)) => {
                        assert!(removed.is_none(), "one `removed` frame");
                        removed = Some(r);
                        break;
                    }
                    _ => {}
                }
            }
            other => panic!("the removed member must get `removed`; got {other:?}"),
        }
    }
    assert!(
        lagged,
        "the member's queue overflowed (the test must exercise lagging)"
    );
    let removed = removed.expect("removed");
    assert_eq!(removed.room_id, room);
    let reason = match how {
        Removal::Kick => pb::RemovedReason::Kicked,
        Removal::Ban => pb::RemovedReason::Banned,
    };
    assert_eq!(removed.reason, reason as i32);
    loop {
        match slow.next_push(QUIET).await {
            Incoming::Timeout => break,
            Incoming::Frame(frame) => {
                assert!(
                    room_event(&frame).is_none(),
                    "an event after `removed`: {frame:?}"
                );
            }
            Incoming::Closed(code, reason) => panic!("closed {code}: {reason}"),
        }
    }
    // The connection still works.
    let pong = slow.request(In::Ping(pb::Ping {})).await;
    assert!(matches!(pong.kind, Some(Out::Pong(_))));
}

async fn kicked_while_lagging(backend: Backend, codec: WsCodec) {
    removed_while_lagging(backend, codec, Removal::Kick).await
}

ws_matrix!(kicked_while_lagging_stops_reading, kicked_while_lagging);
both_backends!(banned_while_lagging_stops_reading, |backend| async move {
    removed_while_lagging(backend, WsCodec::Json, Removal::Ban).await
});

// ---------------------------------------------------------------------------
// Item 1: typing of a member muted after subscribing; a connection
// re-authenticated with another session's token.
// ---------------------------------------------------------------------------

async fn muted_typing_is_not_relayed(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn(backend).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let member = server.sign_up(&common::unique_name("member")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    join(&server, &member, &room).await;
    let mut owner_ws =
        WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    owner_ws
        .subscribe(&room, None)
        .await
        .expect("owner subscribes");
    let mut member_ws =
        WsClient::connect_authenticated(&url(&server), codec, &member.access_token).await;
    member_ws
        .subscribe(&room, None)
        .await
        .expect("member subscribes");

    let _: pb::MuteMemberResponse = rpc(
        &server,
        &owner,
        "RoomService/MuteMember",
        &pb::MuteMemberRequest {
            room_id: room.clone(),
            user_id: member.user_id.clone(),
            duration_seconds: 0,
        },
    )
    .await;
    let reply = member_ws
        .request(In::Typing(pb::Typing {
            room_id: room.clone(),
        }))
        .await;
    match reply.kind {
        Some(Out::Error(e)) => assert_eq!(e.code, "permission_denied", "{e:?}"),
        other => panic!("a muted member's typing is refused, got {other:?}"),
    }
    loop {
        match owner_ws.next_push(QUIET).await {
            Incoming::Timeout => break,
            Incoming::Frame(frame) => assert!(
                !matches!(frame.kind, Some(Out::Typing(_))),
                "a muted member's typing was relayed: {frame:?}"
            ),
            Incoming::Closed(code, reason) => panic!("closed {code}: {reason}"),
        }
    }
}

ws_matrix!(muted_typing, muted_typing_is_not_relayed);

async fn reauthenticated_connection_follows_its_session(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn(backend).await;
    let first = server.sign_up(&common::unique_name("alice")).await;
    let second = server.sign_in(&first.username, common::PASSWORD).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &first.access_token).await;
    let reply = ws
        .request(In::Authenticate(pb::Authenticate {
            access_token: second.access_token.clone(),
        }))
        .await;
    assert!(
        matches!(reply.kind, Some(Out::Authenticated(_))),
        "{reply:?}"
    );
    let _: pb::SignOutResponse = rpc(
        &server,
        &second,
        "AuthService/SignOut",
        &pb::SignOutRequest {
            all_sessions: false,
        },
    )
    .await;
    loop {
        match ws.next_frame(WAIT).await {
            Incoming::Closed(code, _) => {
                assert_eq!(code, 4501, "signed out");
                break;
            }
            Incoming::Frame(_) => continue,
            Incoming::Timeout => {
                panic!("the connection lives on the signed-out session's token; it must close")
            }
        }
    }
}

ws_matrix!(
    reauthenticated_sign_out,
    reauthenticated_connection_follows_its_session
);

// ---------------------------------------------------------------------------
// Item 8: a replay from the ring shows what the store shows.
// ---------------------------------------------------------------------------

async fn ring_replay_matches_history(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, fast_sends).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let _: pb::SendMessageResponse = rpc(
        &server,
        &owner,
        "RoomService/SendMessage",
        &pb::SendMessageRequest {
            room_id: room.clone(),
            text: "secret".into(),
            metadata: HashMap::from([("k".to_owned(), "v".to_owned())]),
            ..Default::default()
        },
    )
    .await;
    send_http(&server, &owner, &room, "kept", "m2").await;
    send_http(&server, &owner, &room, "edited later", "m3").await;
    let _: pb::EditMessageResponse = rpc(
        &server,
        &owner,
        "RoomService/EditMessage",
        &pb::EditMessageRequest {
            room_id: room.clone(),
            seq: 1,
            text: "secret, edited".into(),
        },
    )
    .await;
    let _: pb::EditMessageResponse = rpc(
        &server,
        &owner,
        "RoomService/EditMessage",
        &pb::EditMessageRequest {
            room_id: room.clone(),
            seq: 3,
            text: "edited now".into(),
        },
    )
    .await;
    let _: pb::DeleteMessageResponse = rpc(
        &server,
        &owner,
        "RoomService/DeleteMessage",
        &pb::DeleteMessageRequest {
            room_id: room.clone(),
            seq: 1,
        },
    )
    .await;
    let stored = history(&server, &owner, &room).await;
    assert_eq!(stored.len(), 6);
    assert!(stored[0].deleted && stored[0].text.is_empty());

    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    ws.subscribe(&room, Some(0)).await.expect("subscribe");
    let replayed = ws.collect_until(&room, 6, WAIT).await;
    assert_eq!(
        replayed, stored,
        "the ring replays exactly what history holds"
    );
}

ws_matrix!(ring_replay, ring_replay_matches_history);

// ---------------------------------------------------------------------------
// Item 9: NUL is refused; a store fault in the middle of a batch fails only the
// message it is about.
// ---------------------------------------------------------------------------

async fn bad_message_fails_alone(backend: Backend, codec: WsCodec) {
    let server = Arc::new(TestServer::spawn_with(backend, fast_sends).await);
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;

    let error = ws
        .send_message(&room, "nul \0 inside", "nul")
        .await
        .expect_err("NUL is refused");
    assert_eq!(error.code, "invalid_argument", "{error:?}");
    assert!(error.message.contains("control characters"), "{error:?}");
    let error = server
        .rpc_as(&owner.access_token)
        .call_proto::<_, pb::SendMessageResponse>(
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.clone(),
                text: "bell \u{7}".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("control characters are refused over HTTP too");
    error.expect("invalid_argument", 400);

    // A batch with one message the store refuses: the others commit.
    ws.send_message(&room, "first", "first")
        .await
        .expect("first");
    inject(
        &server,
        &room,
        InjectFault::FailCommitsWithText("poison".into()),
    )
    .await;
    inject(
        &server,
        &room,
        InjectFault::DelayNextCommit(Duration::from_millis(700)),
    )
    .await;
    let held = {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        tokio::spawn(async move { send_http(&server, &owner, &room, "held", "held").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            let text = if i == 6 {
                "poison".to_owned()
            } else {
                format!("m{i}")
            };
            let result = server
                .rpc_as(&owner.access_token)
                .call_proto::<_, pb::SendMessageResponse>(
                    "RoomService/SendMessage",
                    &pb::SendMessageRequest {
                        room_id: room,
                        text: text.clone(),
                        client_message_id: format!("c{i}"),
                        ..Default::default()
                    },
                )
                .await;
            (text, result)
        }));
    }
    held.await.expect("held");
    let mut failed = Vec::new();
    for task in tasks {
        let (text, result) = task.await.expect("sender");
        match result {
            Ok(_) => assert_ne!(text, "poison"),
            Err(e) => {
                assert_eq!(text, "poison", "only the bad message fails: {e:?}");
                failed.push(text);
            }
        }
    }
    assert_eq!(failed, vec!["poison".to_owned()]);
    let stored = history(&server, &owner, &room).await;
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=13).collect::<Vec<_>>(),
        "gapless, without the bad one"
    );
    assert!(stored.iter().all(|m| m.text != "poison"));
}

ws_matrix!(bad_message, bad_message_fails_alone);

// ---------------------------------------------------------------------------
// Item 10: a live-only subscription that meets a retiring room stays live-only.
// ---------------------------------------------------------------------------

async fn live_only_survives_relocation(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, fast_sends).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    for i in 0..5 {
        send_http(
            &server,
            &owner,
            &room,
            &format!("old {i}"),
            &format!("o{i}"),
        )
        .await;
    }
    inject(&server, &room, InjectFault::RetireOnNextSubscribe).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    let last = ws.subscribe(&room, None).await.expect("subscribe live");
    assert_eq!(last, 5);
    send_http(&server, &owner, &room, "new", "n").await;
    let first = ws
        .push_matching(WAIT, |kind| match kind {
            Out::Message(m) => Some(m.clone()),
            Out::Resumed(r) => panic!("a live-only subscription replays nothing: {r:?}"),
            _ => None,
        })
        .await;
    assert_eq!(first.seq, 6, "live only: the first event is the new one");
}

ws_matrix!(live_only_relocation, live_only_survives_relocation);

// ---------------------------------------------------------------------------
// Item 12 and 7: admission limits.
// ---------------------------------------------------------------------------

async fn admission_limits(backend: Backend, codec: WsCodec) {
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            s.realtime.send_rate_per_sec = 1000;
            s.realtime.send_burst = 1000;
            s.realtime.max_inflight_requests = 2;
            s.realtime.max_subscriptions = 2;
            s.rooms.max_pending_appends = 2;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    ws.send_message(&room, "first", "first")
        .await
        .expect("first");

    // Requests in flight on one connection are bounded.
    inject(
        &server,
        &room,
        InjectFault::DelayNextCommit(Duration::from_millis(800)),
    )
    .await;
    for i in 0..5u64 {
        ws.send_frame(&pb::ClientFrame {
            id: 100 + i,
            kind: Some(In::Send(pb::SendMessageRequest {
                room_id: room.clone(),
                text: format!("burst {i}"),
                client_message_id: format!("burst{i}"),
                ..Default::default()
            })),
        })
        .await;
    }
    let mut sent = 0;
    let mut refused = 0;
    for (_, reply) in replies(&mut ws, 100..105).await {
        match reply.kind {
            Some(Out::Sent(_)) => sent += 1,
            Some(Out::Error(e)) => {
                assert_eq!(e.code, "resource_exhausted", "{e:?}");
                assert!(e.message.contains("max_inflight_requests"), "{e:?}");
                refused += 1;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!((sent, refused), (2, 3), "two in flight, three refused");

    // The room's queue of sends waiting for a commit is bounded.
    inject(
        &server,
        &room,
        InjectFault::DelayNextCommit(Duration::from_millis(800)),
    )
    .await;
    let held = {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        tokio::spawn(async move { send_http(&server, &owner, &room, "held", "held").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            server
                .rpc_as(&owner.access_token)
                .call_proto::<_, pb::SendMessageResponse>(
                    "RoomService/SendMessage",
                    &pb::SendMessageRequest {
                        room_id: room,
                        text: format!("queued {i}"),
                        client_message_id: format!("q{i}"),
                        ..Default::default()
                    },
                )
                .await
        }));
    }
    held.await.expect("held");
    let mut unavailable = 0;
    for task in tasks {
        if let Err(e) = task.await.expect("sender") {
            e.expect("unavailable", 503);
            unavailable += 1;
        }
    }
    assert_eq!(
        unavailable, 4,
        "two wait for the commit, the others are refused"
    );

    // Subscribe frames sent back to back count against max_subscriptions.
    let mut rooms = Vec::new();
    for _ in 0..4 {
        rooms.push(create_room(&server, &owner, pb::RoomKind::Public).await);
    }
    for (i, r) in rooms.iter().enumerate() {
        ws.send_frame(&pb::ClientFrame {
            id: 200 + i as u64,
            kind: Some(In::Subscribe(pb::Subscribe {
                room_id: r.clone(),
                since_seq: None,
            })),
        })
        .await;
    }
    let mut subscribed = 0;
    for (_, reply) in replies(&mut ws, 200..200 + rooms.len() as u64).await {
        match reply.kind {
            Some(Out::Subscribed(_)) => subscribed += 1,
            Some(Out::Error(e)) => assert_eq!(e.code, "resource_exhausted", "{e:?}"),
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!(
        subscribed, 2,
        "at most max_subscriptions, pending ones counted"
    );
}

ws_matrix!(admission, admission_limits);

async fn rate_limit_comes_first(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s| {
        s.realtime.send_rate_per_sec = 1;
        s.realtime.send_burst = 1;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    ws.send_message(&room, "one", "one")
        .await
        .expect("within the limit");
    // Over the limit, the send is refused before the room is even looked up.
    let error = ws
        .send_message("no-such-room", "two", "two")
        .await
        .expect_err("over the limit");
    assert_eq!(error.code, "resource_exhausted", "{error:?}");
}

ws_matrix!(rate_limit_first, rate_limit_comes_first);

async fn catch_ups_are_bounded_and_complete(backend: Backend, codec: WsCodec) {
    const ROOMS: usize = 6;
    const MESSAGES: u64 = 40;
    let server = TestServer::spawn_with(backend, |s| {
        fast_sends(s);
        s.rooms.ring_size = 1;
        s.realtime.max_parallel_reads = 1;
        s.realtime.outbound_queue_bytes = 2048;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let mut rooms = Vec::new();
    for _ in 0..ROOMS {
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        for i in 0..MESSAGES {
            send_http(
                &server,
                &owner,
                &room,
                &format!("{room} {i}"),
                &format!("m{i}"),
            )
            .await;
        }
        rooms.push(room);
    }
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    for (i, room) in rooms.iter().enumerate() {
        ws.send_frame(&pb::ClientFrame {
            id: 10 + i as u64,
            kind: Some(In::Subscribe(pb::Subscribe {
                room_id: room.clone(),
                since_seq: Some(0),
            })),
        })
        .await;
    }
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut resumed = 0;
    while resumed < ROOMS {
        match ws.next_push(WAIT).await {
            Incoming::Frame(frame) => {
                if let Some(m) = room_event(&frame) {
                    seen.entry(m.room_id.clone()).or_default().push(m.seq);
                } else if let Some(Out::Resumed(_)) = frame.kind {
                    resumed += 1;
                } else if let Some(Out::Error(e)) = frame.kind {
                    panic!("no subscription fails: {e:?}");
                }
            }
            other => panic!("catching up {ROOMS} rooms: {other:?}"),
        }
    }
    for room in &rooms {
        assert_eq!(
            seen.get(room).cloned().unwrap_or_default(),
            (1..=MESSAGES).collect::<Vec<_>>(),
            "every event of {room}, once, in order"
        );
    }
}

ws_matrix!(bounded_catch_up, catch_ups_are_bounded_and_complete);

async fn overflowing_cursors(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn(backend).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    send_http(&server, &owner, &room, "hello", "h").await;
    // afterSeq at or past 2^63 lists nothing (it used to wrap to everything).
    let page: pb::ListMessagesResponse = rpc(
        &server,
        &owner,
        "RoomService/ListMessages",
        &pb::ListMessagesRequest {
            room_id: room.clone(),
            after_seq: 1 << 63,
            ..Default::default()
        },
    )
    .await;
    assert!(page.messages.is_empty(), "{page:?}");
    assert_eq!(page.last_seq, 1);
    // A since of u64::MAX is out of range, and the connection keeps working.
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    let error = ws
        .subscribe(&room, Some(u64::MAX))
        .await
        .expect_err("beyond the room's last sequence");
    assert_eq!(error.code, "out_of_range", "{error:?}");
    ws.subscribe(&room, Some(0))
        .await
        .expect("then a valid subscribe");
    let events = ws.collect_until(&room, 1, WAIT).await;
    assert_eq!(events.len(), 1);
}

ws_matrix!(cursor_overflow, overflowing_cursors);

both_backends!(room_quota_per_user, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| s.rooms.max_rooms_per_user = 2).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    create_room(&server, &owner, pb::RoomKind::Public).await;
    create_room(&server, &owner, pb::RoomKind::Private).await;
    let error = server
        .rpc_as(&owner.access_token)
        .call_proto::<_, pb::CreateRoomResponse>(
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public as i32,
                title: "one too many".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("over the quota");
    let message = error.expect("resource_exhausted", 429);
    assert!(message.contains("max_rooms_per_user"), "{message}");
    // Another user has a quota of their own.
    let other = server.sign_up(&common::unique_name("other")).await;
    create_room(&server, &other, pb::RoomKind::Public).await;
});

// ---------------------------------------------------------------------------
// Item 13: history pruned by retention is announced with `gap`.
// ---------------------------------------------------------------------------

async fn pruned_history_is_a_gap(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s| {
        fast_sends(s);
        s.rooms.ring_size = 1;
        s.rooms.retention_sweep_secs = 1;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let created: pb::CreateRoomResponse = rpc(
        &server,
        &owner,
        "RoomService/CreateRoom",
        &pb::CreateRoomRequest {
            kind: pb::RoomKind::Public as i32,
            title: "short-lived".into(),
            retention_seconds: 1,
            ..Default::default()
        },
    )
    .await;
    let room = created.room.expect("room").id;
    for i in 0..5 {
        send_http(
            &server,
            &owner,
            &room,
            &format!("gone {i}"),
            &format!("g{i}"),
        )
        .await;
    }
    assert!(
        common::eventually(Duration::from_secs(15), || async {
            history(&server, &owner, &room).await.is_empty()
        })
        .await,
        "retention prunes the history"
    );
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    ws.subscribe(&room, Some(0)).await.expect("subscribe");
    let gap = ws
        .push_matching(WAIT, |kind| match kind {
            Out::Gap(g) => Some(g.clone()),
            Out::Resumed(r) => panic!("resumed without telling the lost range: {r:?}"),
            Out::Message(m) => panic!("a pruned event was delivered: {m:?}"),
            _ => None,
        })
        .await;
    assert_eq!(
        (gap.room_id.as_str(), gap.from_seq, gap.to_seq),
        (room.as_str(), 1, 5)
    );
    let resumed = ws
        .push_matching(WAIT, |kind| match kind {
            Out::Resumed(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(resumed.to_seq, 5);
    send_http(&server, &owner, &room, "fresh", "fresh").await;
    let next = ws.collect_until(&room, 6, WAIT).await;
    assert_eq!(next.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![6]);
}

ws_matrix!(retention_gap, pruned_history_is_a_gap);

// ---------------------------------------------------------------------------
// Item 14: a room whose task panicked is restarted; nothing is lost.
// ---------------------------------------------------------------------------

async fn panicked_room_restarts_without_loss(backend: Backend, codec: WsCodec) {
    const MESSAGES: u64 = 30;
    let server = TestServer::spawn_with(backend, fast_sends).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut sub = WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    sub.subscribe(&room, Some(0)).await.expect("subscribe");
    let mut sender =
        WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    for i in 1..=MESSAGES {
        if i == 11 {
            inject(&server, &room, InjectFault::PanicInNextCommit).await;
        }
        if i == 21 {
            // A panic in a handler itself, not in a future it spawned.
            inject(&server, &room, InjectFault::PanicInHandler).await;
        }
        // A send caught in the panic is answered with a retryable error; the
        // retry with the same client message id succeeds once the room is back.
        let mut attempts = 0;
        loop {
            match sender
                .send_message(&room, &format!("m{i}"), &format!("c{i}"))
                .await
            {
                Ok(sent) => {
                    assert_eq!(sent.message.expect("message").seq, i);
                    break;
                }
                Err(e) => {
                    assert_eq!(e.code, "unavailable", "{e:?}");
                    attempts += 1;
                    assert!(attempts < 50, "the room never came back: {e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let events = sub.collect_until(&room, MESSAGES, WAIT).await;
    assert_eq!(
        events.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=MESSAGES).collect::<Vec<_>>(),
        "the subscriber continues without gap or duplicate"
    );
}

ws_matrix!(room_panic, panicked_room_restarts_without_loss);

// ---------------------------------------------------------------------------
// Items 14 and 15: presence follows connections, in order.
// ---------------------------------------------------------------------------

async fn online_members(server: &TestServer, who: &Account, room: &str) -> HashMap<String, bool> {
    let page: pb::ListMembersResponse = rpc(
        server,
        who,
        "RoomService/ListMembers",
        &pb::ListMembersRequest {
            room_id: room.to_owned(),
            ..Default::default()
        },
    )
    .await;
    page.members
        .into_iter()
        .map(|m| (m.user_id, m.online))
        .collect()
}

async fn presence_follows_connections(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn(backend).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let member = server.sign_up(&common::unique_name("member")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    join(&server, &member, &room).await;
    let mut observer =
        WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    observer.subscribe(&room, None).await.expect("subscribe");
    let presence_of = |user: String| {
        move |kind: &Out| match kind {
            Out::Presence(p) if p.user_id == user => Some(p.online),
            _ => None,
        }
    };

    // Online, then offline when the last connection closes.
    let ws = WsClient::connect_authenticated(&url(&server), codec, &member.access_token).await;
    assert!(
        observer
            .push_matching(WAIT, presence_of(member.user_id.clone()))
            .await
    );
    ws.close().await;
    assert!(
        !observer
            .push_matching(WAIT, presence_of(member.user_id.clone()))
            .await
    );
    assert!(
        !online_members(&server, &owner, &room).await[&member.user_id],
        "offline once the last connection closed"
    );

    // A quick reconnect while the "offline" of the closed connection is still on
    // its way (held back on purpose): the member ends up online, and stays shown
    // online.
    let ws = WsClient::connect_authenticated(&url(&server), codec, &member.access_token).await;
    assert!(
        observer
            .push_matching(WAIT, presence_of(member.user_id.clone()))
            .await
    );
    DELAY_OFFLINE_ANNOUNCEMENTS_MS.store(600, Ordering::Relaxed);
    ws.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _online = WsClient::connect_authenticated(&url(&server), codec, &member.access_token).await;
    DELAY_OFFLINE_ANNOUNCEMENTS_MS.store(0, Ordering::Relaxed);
    assert!(
        common::eventually(WAIT, || async {
            online_members(&server, &owner, &room).await[&member.user_id]
        })
        .await,
        "the reconnected member is online"
    );
    // Let every presence notice arrive; the last one about the member says online.
    let mut latest = None;
    loop {
        match observer.next_push(QUIET * 2).await {
            Incoming::Frame(pb::ServerFrame {
                kind: Some(Out::Presence(p)),
                ..
            }) if p.user_id == member.user_id => latest = Some(p.online),
            Incoming::Frame(_) => {}
            Incoming::Timeout => break,
            Incoming::Closed(code, reason) => panic!("closed {code}: {reason}"),
        }
    }
    assert_eq!(latest, Some(true), "the last presence notice says online");
    assert!(online_members(&server, &owner, &room).await[&member.user_id]);
}

ws_matrix!(presence, presence_follows_connections);

// A client that read a message from history (ListMessages reads the store) and
// subscribes from it at once may be ahead of the room actor: the store has
// committed the batch, the room has not yet published it. The subscription waits
// for that commit instead of failing with out_of_range, and delivers what follows
// exactly once.
both_backends!(
    subscribing_from_a_committed_but_unpublished_sequence_waits_for_it,
    |backend| async move {
        let server = Arc::new(TestServer::spawn(backend).await);
        let owner = server.sign_up(&common::unique_name("owner")).await;
        let reader = server.sign_up(&common::unique_name("reader")).await;
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        send_http(&server, &owner, &room, "first", "first").await;
        inject(
            &server,
            &room,
            InjectFault::DelayAfterNextCommit(Duration::from_millis(1500)),
        )
        .await;
        let held = {
            let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
            tokio::spawn(async move { send_http(&server, &owner, &room, "second", "second").await })
        };
        // The store shows seq 2 while the room still sits on 1.
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                history(&server, &reader, &room).await.len() == 2
            })
            .await,
            "the second message never reached the store"
        );
        let mut ws =
            WsClient::connect_authenticated(&url(&server), WsCodec::Proto, &reader.access_token)
                .await;
        let subscribed = ws.subscribe(&room, Some(2)).await;
        assert!(
            subscribed.is_ok(),
            "a subscription from a committed sequence must wait for its publication: {subscribed:?}"
        );
        held.await.expect("the held send");
        let third = send_http(&server, &owner, &room, "third", "third").await;
        let next = ws.collect_until(&room, 3, Duration::from_secs(10)).await;
        let seqs: Vec<u64> = next.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![third.message.expect("message").seq]);
    }
);
