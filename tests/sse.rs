//! `GET /sse`, Server-Sent Events, over a real HTTP client reading the raw stream,
//! on SQLite and PostgreSQL: the framing (`retry:`, `event:`, `data:`, `id:`,
//! comment heartbeats), resuming with `Last-Event-ID` with no gap and no duplicate
//! (also while senders race), authentication errors, user notifications on the
//! stream, and sign-out ending the stream with its close code.

mod common;

use std::time::{Duration, Instant};

use common::{
    rooms::{create_room, join, send_http},
    sse::{Sse, WAIT},
    unique_name, Account, TestServer,
};
use roomcast::{proto::v1 as pb, protocol::close};

async fn room_with_member(server: &TestServer) -> (Account, Account, String) {
    let owner = server.sign_up(&unique_name("owner")).await;
    let reader = server.sign_up(&unique_name("reader")).await;
    let room = create_room(server, &owner, pb::RoomKind::Public).await;
    join(server, &reader, &room).await;
    (owner, reader, room)
}

both_backends!(framing_ids_heartbeats_and_resume, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| {
        s.realtime.sse_heartbeat_interval_ms = 100;
        s.realtime.sse_retry_ms = 1500;
    })
    .await;
    let (owner, reader, room) = room_with_member(&server).await;
    for i in 0..3 {
        send_http(&server, &owner, &room, &format!("m{i}"), "").await;
    }
    let mut sse = Sse::open(
        &server,
        &format!("rooms={room}:0"),
        &reader.access_token,
        None,
    )
    .await;
    let authenticated = sse.next(WAIT).await.expect("authenticated");
    assert_eq!(authenticated.event, "authenticated");
    assert_eq!(sse.retry, Some(1500));
    let subscribed = sse.next_named("subscribed").await;
    assert_eq!(subscribed.json()["subscribed"]["roomId"], room.as_str());
    assert_eq!(sse.messages(3).await, vec![1, 2, 3]);
    let resumed = sse.next_named("resumed").await;
    assert_eq!(resumed.json()["resumed"]["toSeq"], "3");
    // Heartbeats are comments, at the configured interval.
    let before = sse.comments.len();
    let quiet_until = Instant::now() + Duration::from_millis(500);
    while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
        if let Some(event) = sse.next(left).await {
            assert_ne!(event.event, "message", "unexpected {event:?}");
        }
    }
    assert!(
        sse.comments[before..].iter().any(|c| c == "heartbeat"),
        "comments: {:?}",
        sse.comments
    );
    // Live events, then the client goes away.
    send_http(&server, &owner, &room, "m3", "").await;
    assert_eq!(sse.messages(1).await, vec![4]);
    let last_id = sse.last_id.clone().expect("an id");
    drop(sse);
    for i in 4..7 {
        send_http(&server, &owner, &room, &format!("m{i}"), "").await;
    }
    // Last-Event-ID resumes: nothing missing, nothing repeated.
    let mut sse = Sse::open(
        &server,
        &format!("rooms={room}"),
        &reader.access_token,
        Some(&last_id),
    )
    .await;
    assert_eq!(sse.messages(3).await, vec![5, 6, 7]);
    send_http(&server, &owner, &room, "m7", "").await;
    assert_eq!(sse.messages(1).await, vec![8]);
});

both_backends!(
    concurrent_senders_gapless_across_a_reconnect,
    |backend| async move {
        const SENDERS: usize = 4;
        const EACH: usize = 25;
        let server = TestServer::spawn_with(backend, |s| {
            s.realtime.send_rate_per_sec = 1000;
            s.realtime.send_burst = 1000;
        })
        .await;
        let (owner, reader, room) = room_with_member(&server).await;
        let mut sse = Sse::open(
            &server,
            &format!("rooms={room}:0"),
            &reader.access_token,
            None,
        )
        .await;
        sse.next_named("subscribed").await;
        let mut senders = Vec::new();
        for s in 0..SENDERS {
            let (server_url, token, room) =
                (server.url(""), owner.access_token.clone(), room.clone());
            let rpc = server.rpc_as(&token);
            let _ = server_url;
            senders.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let _: pb::SendMessageResponse = rpc
                        .call_proto(
                            "RoomService/SendMessage",
                            &pb::SendMessageRequest {
                                room_id: room.clone(),
                                text: format!("s{s}-{i}"),
                                ..Default::default()
                            },
                        )
                        .await
                        .expect("send");
                }
            }));
        }
        let mut seen = sse.messages(30).await;
        let last_id = sse.last_id.clone().expect("an id");
        drop(sse);
        for sender in senders {
            sender.await.unwrap();
        }
        let mut sse = Sse::open(
            &server,
            &format!("rooms={room}"),
            &reader.access_token,
            Some(&last_id),
        )
        .await;
        seen.extend(sse.messages(SENDERS * EACH - 30).await);
        let expected: Vec<u64> = (1..=(SENDERS * EACH) as u64).collect();
        assert_eq!(seen, expected);
        // Nothing more arrives.
        while let Some(e) = sse.next(Duration::from_millis(300)).await {
            assert_ne!(e.event, "message", "duplicate: {e:?}");
        }
    }
);

both_backends!(errors_notifications_and_sign_out, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let (owner, reader, room) = room_with_member(&server).await;
    // No token, a bad token, a bad cursor: HTTP errors before any stream.
    let response = server
        .http()
        .get(server.url(&format!("/sse?rooms={room}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = server
        .http()
        .get(server.url(&format!("/sse?rooms={room}&access_token=nonsense")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = server
        .http()
        .get(server.url(&format!("/sse?rooms={room}")))
        .bearer_auth(&reader.access_token)
        .header("Last-Event-ID", "not-ours!")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // A room the reader may not read: an error event naming it; the stream goes on.
    let private = create_room(&server, &owner, pb::RoomKind::Private).await;
    let query = format!(
        "rooms={private},{room}&access_token={}",
        reader.access_token
    );
    let response = server
        .http()
        .get(server.url(&format!("/sse?{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = Sse::from_response(response);
    // The subscriptions run side by side: their replies come in any order, and
    // best-effort pushes (the reader's own presence in the room it subscribed to)
    // may come between them.
    let mut replies = Vec::new();
    while replies.len() < 3 {
        let event = sse.next(WAIT).await.expect("replies");
        if event.event == "error" {
            assert_eq!(event.json()["error"]["roomId"], private.as_str());
        }
        if !["authenticated", "presence"].contains(&event.event.as_str()) {
            replies.push(event.event);
        }
    }
    replies.sort();
    assert_eq!(replies, ["error", "notificationsSubscribed", "subscribed"]);
    // A mention is a notification: it arrives with a cursor id.
    send_http(
        &server,
        &owner,
        &room,
        &format!("hi @{}", reader.username),
        "",
    )
    .await;
    let mention = sse.next_named("notification").await;
    assert!(mention.id.is_some());
    // Signing out ends the stream with the documented code.
    let _: pb::SignOutResponse = server
        .rpc_as(&reader.access_token)
        .call_proto(
            "AuthService/SignOut",
            &pb::SignOutRequest { all_sessions: true },
        )
        .await
        .unwrap();
    let closed = sse.next_named("close").await;
    assert_eq!(closed.json()["code"], close::SIGNED_OUT);
    assert!(sse.next(WAIT).await.is_none(), "the stream ends");
});

both_backends!(publish_to_user_and_disconnect_user, |backend| async move {
    let (server, admin) = common::TestServer::spawn_with_admin(backend, |_| {}).await;
    let key: pb::CreateApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest {
                name: "shop backend".into(),
            },
        )
        .await
        .expect("create an API key");
    let backend_rpc = server.rpc_as(&key.secret);
    let user = server.sign_up(&unique_name("shopper")).await;
    // Offline first: the notification is stored and replayed from cursor 0.
    let _: pb::PublishToUserResponse = backend_rpc
        .call_proto(
            "PublishService/PublishToUser",
            &pb::PublishToUserRequest {
                user_id: user.user_id.clone(),
                sender: "shop".into(),
                text: "your order shipped".into(),
                ..Default::default()
            },
        )
        .await
        .expect("publish to user");
    let mut sse = Sse::open(&server, "notifications=0", &user.access_token, None).await;
    let first = sse.next_named("notification").await;
    assert_eq!(first.json()["notification"]["text"], "your order shipped");
    assert_eq!(first.json()["notification"]["seq"], "1");
    // Live.
    let _: pb::PublishToUserResponse = backend_rpc
        .call_proto(
            "PublishService/PublishToUser",
            &pb::PublishToUserRequest {
                user_id: user.user_id.clone(),
                sender: "shop".into(),
                text: "delivered".into(),
                ..Default::default()
            },
        )
        .await
        .expect("publish to user");
    let second = sse.next_named("notification").await;
    assert_eq!(second.json()["notification"]["seq"], "2");
    let id = second.id.expect("a cursor");
    // The backend disconnects the user: the stream ends with 4504 and the reason.
    let _: pb::DisconnectUserResponse = backend_rpc
        .call_proto(
            "PublishService/DisconnectUser",
            &pb::DisconnectUserRequest {
                user_id: user.user_id.clone(),
                reason: "account on hold".into(),
                ..Default::default()
            },
        )
        .await
        .expect("disconnect user");
    let closed = sse.next_named("close").await;
    assert_eq!(closed.json()["code"], close::DISCONNECTED);
    assert_eq!(closed.json()["reason"], "account on hold");
    assert!(sse.next(WAIT).await.is_none(), "the stream ends");
    // Resuming from the last id replays nothing old.
    let mut sse = Sse::open(&server, "", &user.access_token, Some(&id)).await;
    let subscribed = sse.next_named("notificationsSubscribed").await;
    assert_eq!(subscribed.json()["notificationsSubscribed"]["lastSeq"], "2");
    while let Some(e) = sse.next(Duration::from_millis(300)).await {
        assert_ne!(e.event, "notification", "duplicate: {e:?}");
    }
});

/// The admin API lists an SSE stream (transport `sse`, its rooms), and a client
/// that goes away leaves no connection behind (noticed at the latest when the
/// next heartbeat cannot be written).
async fn connections_of(
    server: &TestServer,
    admin: &Account,
    user: &Account,
) -> Vec<pb::LiveConnection> {
    let listed: pb::ListConnectionsResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AdminService/ListConnections",
            &pb::ListConnectionsRequest {
                user_id: user.user_id.clone(),
            },
        )
        .await
        .expect("list connections");
    listed.connections
}

both_backends!(
    listed_while_open_gone_when_the_client_leaves,
    |backend| async move {
        let (server, admin) = common::TestServer::spawn_with_admin(backend, |s| {
            s.realtime.sse_heartbeat_interval_ms = 200;
        })
        .await;
        let (_owner, reader, room) = room_with_member(&server).await;
        // A plain socket: the test decides exactly when the client is gone.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "GET /sse?rooms={room} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            reader.access_token
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains("event: subscribed") {
            let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
                .await
                .expect("the stream answers")
                .unwrap();
            assert!(n > 0, "the stream ended early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let listed = connections_of(&server, &admin, &reader).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].transport, "sse");
        assert_eq!(listed[0].subscriptions, vec![room.clone()]);
        drop(socket);
        assert!(
            common::eventually(WAIT, || async {
                connections_of(&server, &admin, &reader).await.is_empty()
            })
            .await,
            "the stream's connection ends with its client"
        );
    }
);
