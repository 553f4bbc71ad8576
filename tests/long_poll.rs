//! Long-polling (`PushService.Poll`) over real HTTP on SQLite and PostgreSQL: a
//! poll behind the room answers at once (bounded page, `more`), a poll with
//! nothing new waits and wakes on a commit, times out empty at the cap (and before
//! the request's deadline), a newer poll with the same poll id ends the older, a
//! client that goes away mid-wait leaves no waiter (the `roomcast_poll_waiters`
//! gauge), a kicked or banned user reads nothing more (an `error` frame for the
//! room: not_found for a private room, permission_denied for a ban), notifications
//! wake a poll, and bad requests get clear errors.

mod common;

use std::time::{Duration, Instant};

use common::{
    expect_error,
    poll::{self, cursor, errors, notifications, request, seqs},
    rooms::{create_room, join, send_http},
    unique_name, Account, TestServer,
};
use roomcast::{domain::push::SUPERSEDED, proto::v1 as pb};

/// The metrics are process-wide: the test that watches the waiter gauge fall to
/// zero runs alone (write), every other test holds the read side.
static GAUGE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Long enough that a poll answering "at once" or "on a wake-up" is clearly not
/// answering at its timeout.
const LONG_WAIT_MS: u32 = 20_000;

async fn room_with_reader(server: &TestServer, kind: pb::RoomKind) -> (Account, Account, String) {
    let owner = server.sign_up(&unique_name("owner")).await;
    let reader = server.sign_up(&unique_name("reader")).await;
    let room = create_room(server, &owner, kind).await;
    if kind == pb::RoomKind::Private {
        let _: pb::InviteMemberResponse = server
            .rpc_as(&owner.access_token)
            .call_proto(
                "RoomService/InviteMember",
                &pb::InviteMemberRequest {
                    room_id: room.clone(),
                    user_id: reader.user_id.clone(),
                },
            )
            .await
            .expect("invite");
    }
    join(server, &reader, &room).await;
    (owner, reader, room)
}

/// The `roomcast_poll_waiters` gauge as /metrics shows it.
async fn waiters_gauge(server: &TestServer) -> i64 {
    server.metric("roomcast_poll_waiters", &[]).await as i64
}

async fn hub_waiters(server: &TestServer) -> usize {
    server
        .state()
        .polls
        .send(roomcast::actors::poll_hub::CountWaiters)
        .await
        .expect("the poll hub answers")
}

/// Waits until `n` polls wait on the server's hub.
async fn until_waiting(server: &TestServer, n: usize) {
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            hub_waiters(server).await == n
        })
        .await,
        "expected {n} waiting polls, have {}",
        hub_waiters(server).await
    );
}

both_backends!(answers_at_once_when_behind, |backend| async move {
    let _gauge = GAUGE.read().await;
    let server = TestServer::spawn(backend).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    for i in 0..5 {
        send_http(&server, &owner, &room, &format!("m{i}"), "").await;
    }
    let started = Instant::now();
    let mut req = request(&[(&room, Some(0))], LONG_WAIT_MS);
    req.limit = 3;
    let first = poll::poll(&server, &reader.access_token, &req)
        .await
        .expect("poll");
    assert_eq!(seqs(&first, &room), vec![1, 2, 3]);
    assert!(first.more, "two more are waiting");
    assert_eq!(cursor(&first, &room), Some(3));
    let req = request(&[(&room, Some(3))], LONG_WAIT_MS);
    let second = poll::poll(&server, &reader.access_token, &req)
        .await
        .expect("poll");
    assert_eq!(seqs(&second, &room), vec![4, 5]);
    assert!(!second.more);
    assert_eq!(cursor(&second, &room), Some(5));
    assert!(
        started.elapsed() < Duration::from_millis(u64::from(LONG_WAIT_MS) / 2),
        "polls behind the room answer without waiting"
    );
    // The same in JSON, as curl sends it.
    let (status, body) = server
        .rpc_as(&reader.access_token)
        .call_json(
            "PushService/Poll",
            serde_json::json!({"rooms": [{"roomId": room, "afterSeq": "4"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"][0]["message"]["seq"], "5");
    assert_eq!(body["cursors"][0]["afterSeq"], "5");
});

both_backends!(waits_then_wakes_on_a_commit, |backend| async move {
    let _gauge = GAUGE.read().await;
    let server = TestServer::spawn(backend).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    send_http(&server, &owner, &room, "before", "").await;
    // Caught up: the poll waits.
    let waiting = {
        let server_req = request(&[(&room, Some(1))], LONG_WAIT_MS);
        let rpc = server.rpc_as(&reader.access_token);
        tokio::spawn(async move {
            let started = Instant::now();
            let r: pb::PollResponse = rpc
                .call_proto("PushService/Poll", &server_req)
                .await
                .expect("poll");
            (r, started.elapsed())
        })
    };
    until_waiting(&server, 1).await;
    let sent_at = Instant::now();
    send_http(&server, &owner, &room, "wake up", "").await;
    let (response, took) = waiting.await.unwrap();
    assert_eq!(seqs(&response, &room), vec![2]);
    assert_eq!(cursor(&response, &room), Some(2));
    assert!(
        took < Duration::from_millis(u64::from(LONG_WAIT_MS) / 2),
        "woken by the commit ({:?} after the send started), not by the timeout",
        sent_at.elapsed()
    );
    // A live start (no cursor) waits for what comes after the poll began.
    let waiting = {
        let req = request(&[(&room, None)], LONG_WAIT_MS);
        let rpc = server.rpc_as(&reader.access_token);
        tokio::spawn(async move {
            rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                .await
                .expect("poll")
        })
    };
    until_waiting(&server, 1).await;
    send_http(&server, &owner, &room, "third", "").await;
    let response = waiting.await.unwrap();
    assert_eq!(seqs(&response, &room), vec![3]);
    until_waiting(&server, 0).await;
});

both_backends!(times_out_empty_at_the_cap, |backend| async move {
    let _gauge = GAUGE.read().await;
    let server = TestServer::spawn_with(backend, |s| s.poll.max_wait_ms = 300).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    send_http(&server, &owner, &room, "only", "").await;
    let started = Instant::now();
    let response = poll::poll(
        &server,
        &reader.access_token,
        &request(&[(&room, Some(1))], 60_000),
    )
    .await
    .expect("poll");
    let took = started.elapsed();
    assert!(response.events.is_empty(), "{response:?}");
    assert!(!response.more);
    assert_eq!(cursor(&response, &room), Some(1), "the cursor stays");
    assert!(response.ended.is_none());
    assert!(
        took >= Duration::from_millis(300),
        "waited the cap: {took:?}"
    );
    // A live start that times out still says where the room was.
    let response = poll::poll(
        &server,
        &reader.access_token,
        &request(&[(&room, None)], 100),
    )
    .await
    .expect("poll");
    assert_eq!(cursor(&response, &room), Some(1));
    // wait_ms 0 answers at once.
    let response = poll::poll(
        &server,
        &reader.access_token,
        &request(&[(&room, Some(1))], 0),
    )
    .await
    .expect("poll");
    assert!(response.events.is_empty());
    // A shorter request deadline than the wait: an empty answer, not deadline_exceeded.
    let server = TestServer::spawn(backend).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    send_http(&server, &owner, &room, "only", "").await;
    let response = server
        .http()
        .post(server.url("/roomcast.v1.PushService/Poll"))
        .header("content-type", "application/json")
        .header("connect-timeout-ms", "700")
        .bearer_auth(&reader.access_token)
        .body(
            serde_json::json!({"rooms": [{"roomId": room, "afterSeq": "1"}], "waitMs": 20000})
                .to_string(),
        )
        .send()
        .await
        .expect("poll");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body.get("events").is_none(), "{body}");
});

both_backends!(
    a_newer_poll_with_the_same_id_ends_the_older,
    |backend| async move {
        let _gauge = GAUGE.read().await;
        let server = TestServer::spawn(backend).await;
        let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
        let other = server.sign_up(&unique_name("other")).await;
        join(&server, &other, &room).await;
        let spawn_poll = |token: &str, poll_id: &str| {
            let mut req = request(&[(&room, Some(0))], LONG_WAIT_MS);
            req.poll_id = poll_id.to_owned();
            let rpc = server.rpc_as(token);
            tokio::spawn(async move {
                rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                    .await
                    .expect("poll")
            })
        };
        let older = spawn_poll(&reader.access_token, "tab-1");
        // Another user's poll with the same id is not the same poller.
        let strangers = spawn_poll(&other.access_token, "tab-1");
        until_waiting(&server, 2).await;
        let newer = spawn_poll(&reader.access_token, "tab-1");
        let ended = tokio::time::timeout(Duration::from_secs(10), older)
            .await
            .expect("the older poll answers at once")
            .unwrap();
        let end = ended.ended.clone().expect("ended");
        assert_eq!(end.code, SUPERSEDED);
        assert!(ended.events.is_empty());
        assert_eq!(cursor(&ended, &room), Some(0), "the cursors stay as given");
        until_waiting(&server, 2).await;
        send_http(&server, &owner, &room, "hello", "").await;
        let newer = newer.await.unwrap();
        assert_eq!(seqs(&newer, &room), vec![1]);
        assert!(newer.ended.is_none());
        let strangers = strangers.await.unwrap();
        assert_eq!(seqs(&strangers, &room), vec![1]);
        // A bad poll id is refused.
        let mut req = request(&[(&room, Some(0))], 0);
        req.poll_id = "no spaces".into();
        expect_error(
            poll::poll(&server, &reader.access_token, &req).await,
            "invalid_argument",
            400,
        );
    }
);

both_backends!(
    a_client_that_goes_away_leaves_no_waiter,
    |backend| async move {
        const CLIENTS: usize = 5;
        let _gauge = GAUGE.write().await;
        let server = TestServer::spawn(backend).await;
        let (_owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
        // Servers of tests that ran before leave nothing behind either.
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                waiters_gauge(&server).await == 0
            })
            .await,
            "the gauge starts at 0"
        );
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            // Each on its own HTTP client, so its connection closes when dropped.
            let http = reqwest::Client::new();
            let url = server.url("/roomcast.v1.PushService/Poll");
            let token = reader.access_token.clone();
            let mut req = request(&[(&room, Some(0))], LONG_WAIT_MS);
            req.notifications = i % 2 == 0;
            clients.push(tokio::spawn(async move {
                use prost::Message as _;
                let _ = http
                    .post(url)
                    .header("content-type", "application/proto")
                    .bearer_auth(token)
                    .body(req.encode_to_vec())
                    .send()
                    .await;
            }));
        }
        until_waiting(&server, CLIENTS).await;
        assert_eq!(waiters_gauge(&server).await, CLIENTS as i64);
        let dropped_at = Instant::now();
        for client in &clients {
            client.abort();
        }
        for client in clients {
            let _ = client.await;
        }
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                waiters_gauge(&server).await == 0
            })
            .await,
            "waiters left behind: {}",
            waiters_gauge(&server).await
        );
        assert!(
            dropped_at.elapsed() < Duration::from_millis(u64::from(LONG_WAIT_MS) / 2),
            "released when the clients left, not at the poll's timeout"
        );
        assert_eq!(hub_waiters(&server).await, 0);
    }
);

both_backends!(a_kicked_user_reads_no_more, |backend| async move {
    let _gauge = GAUGE.read().await;
    let server = TestServer::spawn(backend).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Private).await;
    let public = create_room(&server, &owner, pb::RoomKind::Public).await;
    send_http(&server, &owner, &room, "secret 1", "").await;
    let first = poll::poll(
        &server,
        &reader.access_token,
        &request(&[(&room, Some(0)), (&public, Some(0))], 0),
    )
    .await
    .expect("poll");
    assert_eq!(seqs(&first, &room), vec![1]);
    // Waiting when the kick lands: the poll answers with the room's error.
    let waiting = {
        let req = request(&[(&room, Some(1)), (&public, Some(0))], LONG_WAIT_MS);
        let rpc = server.rpc_as(&reader.access_token);
        tokio::spawn(async move {
            rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                .await
                .expect("poll")
        })
    };
    until_waiting(&server, 1).await;
    let _: pb::KickMemberResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/KickMember",
            &pb::KickMemberRequest {
                room_id: room.clone(),
                user_id: reader.user_id.clone(),
                reason: "bye".into(),
            },
        )
        .await
        .expect("kick");
    send_http(&server, &owner, &room, "secret 2", "").await;
    let response = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the kick ends the wait")
        .unwrap();
    // As for a WebSocket subscribe: a private room is invisible to non-members.
    let errs = errors(&response);
    assert_eq!(errs.len(), 1, "{response:?}");
    assert_eq!(errs[0].code, "not_found");
    assert_eq!(errs[0].room_id, room);
    assert!(
        seqs(&response, &room).is_empty(),
        "nothing of the room after the kick"
    );
    assert_eq!(
        cursor(&response, &room),
        None,
        "the room is dropped from the cursors"
    );
    assert_eq!(
        cursor(&response, &public),
        Some(0),
        "the other room goes on"
    );
    // Every later poll of the room: the same.
    let again = poll::poll(
        &server,
        &reader.access_token,
        &request(&[(&room, Some(1))], 0),
    )
    .await
    .expect("poll");
    assert_eq!(errors(&again)[0].code, "not_found");
    assert!(seqs(&again, &room).is_empty());
    // Banned from the public room while waiting: permission_denied.
    let waiting = {
        let req = request(&[(&public, Some(0))], LONG_WAIT_MS);
        let rpc = server.rpc_as(&reader.access_token);
        tokio::spawn(async move {
            rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                .await
                .expect("poll")
        })
    };
    until_waiting(&server, 1).await;
    let _: pb::BanMemberResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/BanMember",
            &pb::BanMemberRequest {
                room_id: public.clone(),
                user_id: reader.user_id.clone(),
                reason: "spam".into(),
                ..Default::default()
            },
        )
        .await
        .expect("ban");
    let response = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the ban ends the wait")
        .unwrap();
    let errs = errors(&response);
    assert_eq!(errs.len(), 1, "{response:?}");
    assert_eq!(errs[0].code, "permission_denied");
    assert_eq!(errs[0].room_id, public);
    assert_eq!(cursor(&response, &public), None);
    // Unknown rooms and cursors beyond the end are the room's errors too.
    let open = create_room(&server, &owner, pb::RoomKind::Public).await;
    let odd = poll::poll(
        &server,
        &reader.access_token,
        &request(&[("r_nope", Some(0)), (&open, Some(99))], LONG_WAIT_MS),
    )
    .await
    .expect("poll");
    let codes: Vec<String> = errors(&odd).into_iter().map(|e| e.code).collect();
    assert_eq!(codes, vec!["not_found", "out_of_range"]);
});

both_backends!(notifications_wake_a_poll, |backend| async move {
    let _gauge = GAUGE.read().await;
    let server = TestServer::spawn(backend).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    // Notifications only, from the user's current position.
    let waiting = {
        let req = pb::PollRequest {
            notifications: true,
            wait_ms: LONG_WAIT_MS,
            ..Default::default()
        };
        let rpc = server.rpc_as(&reader.access_token);
        tokio::spawn(async move {
            rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                .await
                .expect("poll")
        })
    };
    until_waiting(&server, 1).await;
    // A mention is a notification.
    send_http(
        &server,
        &owner,
        &room,
        &format!("hi @{}", reader.username),
        "",
    )
    .await;
    let response = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken by the notification")
        .unwrap();
    let found = notifications(&response);
    assert_eq!(found.len(), 1, "{response:?}");
    assert_eq!(found[0].kind, pb::NotificationKind::Mention as i32);
    assert_eq!(response.notifications_seq, found[0].seq);
    // Resuming from the cursor: nothing again.
    let req = pb::PollRequest {
        notifications: true,
        notifications_after_seq: Some(response.notifications_seq),
        ..Default::default()
    };
    let again = poll::poll(&server, &reader.access_token, &req)
        .await
        .expect("poll");
    assert!(notifications(&again).is_empty());
});

both_backends!(bad_requests_get_clear_errors, |backend| async move {
    let _gauge = GAUGE.read().await;
    let (server, admin) = TestServer::spawn_with_admin(backend, |s| s.poll.max_rooms = 2).await;
    let (_owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    let token = &reader.access_token;
    let nothing = pb::PollRequest::default();
    expect_error(
        poll::poll(&server, token, &nothing).await,
        "invalid_argument",
        400,
    );
    let twice = request(&[(&room, Some(0)), (&room, Some(0))], 0);
    expect_error(
        poll::poll(&server, token, &twice).await,
        "invalid_argument",
        400,
    );
    let many = request(&[("r_a", None), ("r_b", None), ("r_c", None)], 0);
    expect_error(
        poll::poll(&server, token, &many).await,
        "invalid_argument",
        400,
    );
    let mut big = request(&[(&room, Some(0))], 0);
    big.limit = 100_000;
    expect_error(
        poll::poll(&server, token, &big).await,
        "invalid_argument",
        400,
    );
    let beyond = pb::PollRequest {
        notifications: true,
        notifications_after_seq: Some(5),
        ..Default::default()
    };
    expect_error(
        poll::poll(&server, token, &beyond).await,
        "out_of_range",
        400,
    );
    // No token; an API key (it has no rooms to read).
    expect_error(
        server
            .rpc()
            .call_proto::<_, pb::PollResponse>("PushService/Poll", &request(&[(&room, None)], 0))
            .await,
        "unauthenticated",
        401,
    );
    let key: pb::CreateApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest { name: "k".into() },
        )
        .await
        .expect("an API key");
    expect_error(
        poll::poll(&server, &key.secret, &request(&[(&room, None)], 0)).await,
        "permission_denied",
        403,
    );
    // Access rules govern the service like any other.
    let _: pb::CreateAccessRuleResponse = common::admin_call(
        &server,
        &admin,
        "CreateAccessRule",
        &pb::CreateAccessRuleRequest {
            role: "member".into(),
            operation: "roomcast.v1.PushService/*".into(),
            effect: "deny".into(),
            priority: 10,
            description: "no long-polling for members".into(),
        },
    )
    .await;
    expect_error(
        poll::poll(&server, token, &request(&[(&room, None)], 0)).await,
        "permission_denied",
        403,
    );
});

both_backends!(waiting_polls_per_user_are_bounded, |backend| async move {
    let _gauge = GAUGE.read().await;
    let server = TestServer::spawn_with(backend, |s| s.poll.max_waiting_per_user = 2).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    let other = server.sign_up(&unique_name("other")).await;
    join(&server, &other, &room).await;
    let spawn_poll = |token: &str, poll_id: &str| {
        let mut req = request(&[(&room, Some(0))], LONG_WAIT_MS);
        req.poll_id = poll_id.to_owned();
        let rpc = server.rpc_as(token);
        tokio::spawn(async move {
            rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                .await
        })
    };
    let first = spawn_poll(&reader.access_token, "a");
    let second = spawn_poll(&reader.access_token, "b");
    until_waiting(&server, 2).await;
    // A third poller of the same user is refused; the limit is per user.
    let mut req = request(&[(&room, Some(0))], LONG_WAIT_MS);
    req.poll_id = "c".into();
    let refused = poll::poll(&server, &reader.access_token, &req).await;
    let message = expect_error(refused, "resource_exhausted", 429);
    assert!(message.contains("poll.max_waiting_per_user"), "{message}");
    let strangers = spawn_poll(&other.access_token, "a");
    until_waiting(&server, 3).await;
    // A poll that replaces one with the same poll_id does not add up.
    let replacing = spawn_poll(&reader.access_token, "a");
    let ended = first.await.unwrap().expect("poll");
    assert_eq!(ended.ended.expect("ended").code, SUPERSEDED);
    until_waiting(&server, 3).await;
    send_http(&server, &owner, &room, "for everyone", "").await;
    for waiting in [second, strangers, replacing] {
        let response = waiting.await.unwrap().expect("poll");
        assert_eq!(seqs(&response, &room), vec![1]);
    }
});

both_backends!(draining_the_node_ends_waiting_polls, |backend| async move {
    let _gauge = GAUGE.read().await;
    let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
    let (_owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    let waiting = {
        let req = request(&[(&room, Some(0))], LONG_WAIT_MS);
        let rpc = server.rpc_as(&reader.access_token);
        tokio::spawn(async move {
            rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                .await
                .expect("poll")
        })
    };
    until_waiting(&server, 1).await;
    let _: pb::DrainNodeResponse = common::admin_call(
        &server,
        &admin,
        "DrainNode",
        &pb::DrainNodeRequest {
            reason: "maintenance".into(),
        },
    )
    .await;
    let response = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the drain ends the wait")
        .unwrap();
    let ended = response.ended.clone().expect("ended");
    assert_eq!(ended.code, u32::from(roomcast::protocol::close::SHUTDOWN));
    assert_eq!(cursor(&response, &room), Some(0));
    until_waiting(&server, 0).await;
    // While draining, a poll with nothing new does not wait: it ends at once.
    let started = Instant::now();
    let response = poll::poll(
        &server,
        &reader.access_token,
        &request(&[(&room, Some(0))], LONG_WAIT_MS),
    )
    .await
    .expect("poll");
    assert_eq!(
        response.ended.expect("ended").code,
        u32::from(roomcast::protocol::close::SHUTDOWN)
    );
    assert!(started.elapsed() < Duration::from_millis(u64::from(LONG_WAIT_MS) / 2));
});

// A live room's comments live in its ring, not in the store: a poll reads them from
// the room (its real last sequence, not the store's reserved block), waits and
// wakes on a new comment, and gets a `gap` for what the ring no longer holds.
both_backends!(a_live_room_is_polled_from_its_ring, |backend| async move {
    let _gauge = GAUGE.read().await;
    let server = TestServer::spawn_with(backend, |s| s.rooms.live.ring_size = 4).await;
    let owner = server.sign_up(&unique_name("host")).await;
    let viewer = server.sign_up(&unique_name("viewer")).await;
    let created: pb::CreateRoomResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public as i32,
                title: "live".into(),
                live: Some(pb::LiveControls::default()),
                ..Default::default()
            },
        )
        .await
        .expect("create a live room");
    let room = created.room.expect("room").id;
    let start = poll::poll(&server, &viewer.access_token, &request(&[(&room, None)], 0))
        .await
        .expect("first poll");
    let start = cursor(&start, &room).expect("a cursor for the live room");

    // Behind: answered at once from the ring.
    for i in 0..3 {
        send_http(&server, &owner, &room, &format!("c{i}"), "").await;
    }
    let behind = poll::poll(
        &server,
        &viewer.access_token,
        &request(&[(&room, Some(start))], LONG_WAIT_MS),
    )
    .await
    .expect("poll behind");
    assert_eq!(
        seqs(&behind, &room),
        vec![start + 1, start + 2, start + 3],
        "{behind:?}"
    );
    let at = cursor(&behind, &room).expect("cursor");
    assert_eq!(at, start + 3);

    // Nothing new: waits, and a new comment wakes it.
    let waiting = {
        let req = request(&[(&room, Some(at))], LONG_WAIT_MS);
        let rpc = server.rpc_as(&viewer.access_token);
        tokio::spawn(async move {
            let started = Instant::now();
            let reply: Result<pb::PollResponse, _> = rpc.call_proto("PushService/Poll", &req).await;
            (reply, started.elapsed())
        })
    };
    until_waiting(&server, 1).await;
    send_http(&server, &owner, &room, "wake", "").await;
    let (woken, took) = waiting.await.expect("poll task");
    let woken = woken.expect("woken poll");
    assert_eq!(seqs(&woken, &room), vec![at + 1]);
    assert!(
        took < Duration::from_millis(u64::from(LONG_WAIT_MS) / 2),
        "woken by the comment, not by the cap"
    );

    // The ring (4) lost what a slow poller missed: a gap, then the ring.
    for i in 0..10 {
        send_http(&server, &owner, &room, &format!("burst{i}"), "").await;
    }
    let late = poll::poll(
        &server,
        &viewer.access_token,
        &request(&[(&room, Some(at + 1))], 0),
    )
    .await
    .expect("late poll");
    let last = at + 11;
    let gap = late
        .events
        .iter()
        .find_map(|f| match &f.kind {
            Some(pb::server_frame::Kind::Gap(g)) => Some((g.from_seq, g.to_seq)),
            _ => None,
        })
        .expect("a gap frame");
    assert_eq!(gap, (at + 2, last - 4));
    assert_eq!(seqs(&late, &room), (last - 3..=last).collect::<Vec<_>>());
    assert_eq!(cursor(&late, &room), Some(last));
});

/// Spawns a waiting poll of `token` on `room` after `after`.
fn spawn_poll(
    server: &TestServer,
    token: &str,
    room: &str,
    after: u64,
    poll_id: &str,
) -> tokio::task::JoinHandle<pb::PollResponse> {
    let mut req = request(&[(room, Some(after))], LONG_WAIT_MS);
    req.poll_id = poll_id.to_owned();
    let rpc = server.rpc_as(token);
    tokio::spawn(async move {
        rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
            .await
            .expect("poll")
    })
}

// Signing out ends the session's waiting poll at once (`ended` 4501), not at its
// timeout; a poll of the user's other session keeps waiting and still gets what
// comes next.
both_backends!(
    signing_out_ends_the_sessions_waiting_polls,
    |backend| async move {
        let _gauge = GAUGE.read().await;
        let server = TestServer::spawn(backend).await;
        let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
        let other_session = server.sign_in(&reader.username, common::PASSWORD).await;
        let signed_out = spawn_poll(&server, &reader.access_token, &room, 0, "tab-1");
        let other = spawn_poll(&server, &other_session.access_token, &room, 0, "tab-2");
        until_waiting(&server, 2).await;

        let _: pb::SignOutResponse = server
            .rpc_as(&reader.access_token)
            .call_proto("AuthService/SignOut", &pb::SignOutRequest::default())
            .await
            .expect("sign out");
        let response = tokio::time::timeout(Duration::from_secs(10), signed_out)
            .await
            .expect("the sign-out ends the wait")
            .unwrap();
        let ended = response.ended.clone().expect("ended");
        assert_eq!(ended.code, u32::from(roomcast::protocol::close::SIGNED_OUT));
        assert!(response.events.is_empty());
        assert_eq!(
            cursor(&response, &room),
            Some(0),
            "the cursors stay as given"
        );
        until_waiting(&server, 1).await;

        send_http(&server, &owner, &room, "after the sign-out", "").await;
        let response = tokio::time::timeout(Duration::from_secs(10), other)
            .await
            .expect("the other session's poll is woken")
            .unwrap();
        assert!(response.ended.is_none());
        assert_eq!(seqs(&response, &room), vec![1]);
        // The signed-out token polls no more.
        let refused = poll::poll(
            &server,
            &reader.access_token,
            &request(&[(&room, Some(1))], 0),
        )
        .await
        .expect_err("a signed-out token is refused");
        assert_eq!(refused.code, "unauthenticated");
    }
);

/// How many times the store was asked for a room's history (`messages_after`),
/// from /metrics.
async fn history_reads(server: &TestServer) -> u64 {
    server
        .metric(
            "roomcast_store_query_duration_seconds_count",
            &[("query", "messages_after")],
        )
        .await as u64
}

// A woken poll is served from the room's ring of recent events: many wake-ups of
// many pollers read no history from the store, and each poller still gets every
// message once, in order. A cursor older than the ring is read from the store.
both_backends!(woken_polls_are_served_from_the_ring, |backend| async move {
    let _gauge = GAUGE.write().await;
    let server = TestServer::spawn_with(backend, |s| s.rooms.ring_size = 8).await;
    let (owner, reader, room) = room_with_reader(&server, pb::RoomKind::Public).await;
    send_http(&server, &owner, &room, "first", "").await;
    let before = history_reads(&server).await;
    const POLLERS: usize = 3;
    const MESSAGES: u64 = 4;
    for n in 1..=MESSAGES {
        let polls: Vec<_> = (0..POLLERS)
            .map(|i| spawn_poll(&server, &reader.access_token, &room, n, &format!("p{i}")))
            .collect();
        until_waiting(&server, POLLERS).await;
        send_http(&server, &owner, &room, &format!("m{n}"), "").await;
        for poll in polls {
            let response = poll.await.unwrap();
            assert_eq!(seqs(&response, &room), vec![n + 1]);
            assert_eq!(cursor(&response, &room), Some(n + 1));
        }
        until_waiting(&server, 0).await;
    }
    assert_eq!(
        history_reads(&server).await,
        before,
        "woken polls read the ring, not the store"
    );
    // Past the ring (8 events): the store answers, in order.
    for i in 0..10 {
        send_http(&server, &owner, &room, &format!("more{i}"), "").await;
    }
    let response = poll::poll(
        &server,
        &reader.access_token,
        &request(&[(&room, Some(0))], 0),
    )
    .await
    .expect("poll");
    assert_eq!(seqs(&response, &room), (1..=15).collect::<Vec<_>>());
    assert!(
        history_reads(&server).await > before,
        "an old cursor reads the store"
    );
});
