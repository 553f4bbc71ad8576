//! Every push transport against the same server, on SQLite and PostgreSQL: one
//! room, concurrent senders, and one client on each transport (WebSocket JSON,
//! WebSocket binary, SSE, long-poll); each client is dropped mid-stream and resumes
//! by its cursor, and every client ends with the same gapless sequence, nothing
//! missing or repeated. A user connected on WebSocket, SSE and long-poll at once
//! gets one PublishToUser notification on all three, gets the next one on return
//! after being offline, and DisconnectUser ends all three.

mod common;

use std::time::{Duration, Instant};

use common::{
    poll::{notifications, Poller},
    rooms::{create_room, join},
    sse::Sse,
    unique_name,
    ws::{room_event, Incoming, WsClient, WsCodec},
    Account, TestServer,
};
use roomcast::{actors::poll_hub::CountWaiters, proto::v1 as pb, protocol::close};

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const WAIT: Duration = Duration::from_secs(15);
const SENDERS: usize = 4;
const EACH: usize = 25;
const TOTAL: u64 = (SENDERS * EACH) as u64;

async fn hub_waiters(server: &TestServer) -> usize {
    server.state().polls.send(CountWaiters).await.expect("hub")
}

async fn until_waiting(server: &TestServer, n: usize) {
    assert!(
        common::eventually(WAIT, || async { hub_waiters(server).await == n }).await,
        "expected {n} waiting polls"
    );
}

/// The room's events on a WebSocket until `upto`, in arrival order.
async fn ws_until(ws: &mut WsClient, room: &str, upto: u64) -> Vec<u64> {
    ws.collect_until(room, upto, WAIT)
        .await
        .into_iter()
        .map(|m| m.seq)
        .collect()
}

async fn ws_client(
    server: &TestServer,
    codec: WsCodec,
    reader: &Account,
    room: &str,
    since: u64,
) -> WsClient {
    let mut ws =
        WsClient::connect_authenticated(&server.ws_url("/ws"), codec, &reader.access_token).await;
    ws.subscribe(room, Some(since)).await.expect("subscribe");
    ws
}

/// A WebSocket client: reads to `drop_at`, drops the socket, resumes after the
/// last sequence it has, reads to the end.
async fn websocket_run(
    server: &TestServer,
    codec: WsCodec,
    reader: &Account,
    room: &str,
    drop_at: u64,
) -> Vec<u64> {
    let mut ws = ws_client(server, codec, reader, room, 0).await;
    let mut seen = ws_until(&mut ws, room, drop_at).await;
    drop(ws);
    let last = *seen.last().expect("some events");
    let mut ws = ws_client(server, codec, reader, room, last).await;
    if last < TOTAL {
        seen.extend(ws_until(&mut ws, room, TOTAL).await);
    }
    // Nothing more (no duplicate) arrives.
    match ws.next_push(Duration::from_millis(300)).await {
        Incoming::Frame(frame) => assert!(room_event(&frame).is_none(), "extra event {frame:?}"),
        Incoming::Timeout => {}
        other => panic!("{other:?}"),
    }
    seen
}

/// An SSE client: reads to `drop_at`, drops the stream, resumes with
/// `Last-Event-ID`, reads to the end.
async fn sse_run(server: &TestServer, reader: &Account, room: &str, drop_at: u64) -> Vec<u64> {
    let mut sse = Sse::open(
        server,
        &format!("rooms={room}:0&notifications=off"),
        &reader.access_token,
        None,
    )
    .await;
    let mut seen = sse.messages_until(drop_at).await;
    let id = sse.last_id.clone().expect("an id");
    drop(sse);
    let mut sse = Sse::open(
        server,
        &format!("rooms={room}&notifications=off"),
        &reader.access_token,
        Some(&id),
    )
    .await;
    if *seen.last().expect("some") < TOTAL {
        seen.extend(sse.messages_until(TOTAL).await);
    }
    while let Some(event) = sse.next(Duration::from_millis(300)).await {
        assert_ne!(event.event, "message", "duplicate {:?}", event.data);
    }
    seen
}

/// A long-poll client: polls to `drop_at`, abandons a poll mid-wait (the request
/// is dropped), polls on from its cursors to the end.
async fn long_poll_run(
    server: &TestServer,
    reader: &Account,
    room: &str,
    drop_at: u64,
) -> Vec<u64> {
    let mut poller = Poller {
        token: reader.access_token.clone(),
        ..Default::default()
    };
    poller.rooms.insert(room.to_owned(), Some(0));
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT * 2;
    let mut dropped = false;
    while seen.last().is_none_or(|s| *s < TOTAL) {
        assert!(Instant::now() < deadline, "long-poll stuck at {seen:?}");
        if !dropped && seen.last().is_some_and(|s| *s >= drop_at) {
            dropped = true;
            // A poll abandoned by its client: its answer is never read, so the
            // cursors stay where they were.
            let abandoned = {
                let req = poller.request(5_000);
                let rpc = server.rpc_as(&reader.access_token);
                tokio::spawn(async move {
                    let _ = rpc
                        .call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                        .await;
                })
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
            abandoned.abort();
            let _ = abandoned.await;
        }
        let response = poller.poll(server, 5_000).await.expect("poll");
        seen.extend(common::poll::seqs(&response, room));
    }
    let response = poller.poll(server, 200).await.expect("poll");
    assert!(response.events.is_empty(), "extra events {response:?}");
    seen
}

both_backends!(
    every_transport_ends_with_the_same_gapless_sequence,
    |backend| async move {
        let server = TestServer::spawn_with(backend, |s| {
            s.realtime.send_rate_per_sec = 1000;
            s.realtime.send_burst = 1000;
        })
        .await;
        let owner = server.sign_up(&unique_name("owner")).await;
        let reader = server.sign_up(&unique_name("reader")).await;
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        join(&server, &reader, &room).await;
        let mut senders = Vec::new();
        for s in 0..SENDERS {
            let rpc = server.rpc_as(&owner.access_token);
            let room = room.clone();
            senders.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let _: pb::SendMessageResponse = rpc
                        .call_proto(
                            "RoomService/SendMessage",
                            &pb::SendMessageRequest {
                                room_id: room.clone(),
                                text: format!("s{s}-{i}"),
                                client_message_id: format!("s{s}-{i}"),
                                ..Default::default()
                            },
                        )
                        .await
                        .expect("send");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        let (json, proto, sse, long_poll) = tokio::join!(
            websocket_run(&server, WsCodec::Json, &reader, &room, 20),
            websocket_run(&server, WsCodec::Proto, &reader, &room, 40),
            sse_run(&server, &reader, &room, 60),
            long_poll_run(&server, &reader, &room, 30),
        );
        for sender in senders {
            sender.await.unwrap();
        }
        let expected: Vec<u64> = (1..=TOTAL).collect();
        assert_eq!(json, expected, "WebSocket JSON");
        assert_eq!(proto, expected, "WebSocket binary");
        assert_eq!(sse, expected, "SSE");
        assert_eq!(long_poll, expected, "long-poll");
    }
);

async fn publish_to_user(rpc: &common::Rpc, user: &Account, text: &str) -> u64 {
    let reply: pb::PublishToUserResponse = rpc
        .call_proto(
            "PublishService/PublishToUser",
            &pb::PublishToUserRequest {
                user_id: user.user_id.clone(),
                sender: "shop".into(),
                text: text.into(),
                ..Default::default()
            },
        )
        .await
        .expect("publish to user");
    reply.notification.expect("a notification").seq
}

fn ws_notification(frame: &Out) -> Option<pb::Notification> {
    match frame {
        Out::Notification(n) => Some(n.clone()),
        _ => None,
    }
}

both_backends!(
    one_user_on_every_transport_gets_each_notification,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let key: pb::CreateApiKeyResponse = server
            .rpc_as(&admin.access_token)
            .call_proto(
                "AuthService/CreateApiKey",
                &pb::CreateApiKeyRequest {
                    name: "backend".into(),
                },
            )
            .await
            .expect("an API key");
        let backend_rpc = server.rpc_as(&key.secret);
        let user = server.sign_up(&unique_name("user")).await;

        // Online on all three.
        let mut ws = WsClient::connect_authenticated(
            &server.ws_url("/ws"),
            WsCodec::Json,
            &user.access_token,
        )
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
        let mut sse = Sse::open(&server, "notifications=live", &user.access_token, None).await;
        sse.next_named("notificationsSubscribed").await;
        let mut poller = Poller {
            token: user.access_token.clone(),
            notifications: Some(None),
            ..Default::default()
        };
        let waiting = {
            let req = poller.request(20_000);
            let rpc = server.rpc_as(&user.access_token);
            tokio::spawn(async move {
                rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                    .await
                    .expect("poll")
            })
        };
        until_waiting(&server, 1).await;
        let seq = publish_to_user(&backend_rpc, &user, "first").await;
        assert_eq!(seq, 1);
        let on_ws = ws.push_matching(WAIT, ws_notification).await;
        assert_eq!((on_ws.seq, on_ws.text.as_str()), (1, "first"));
        let on_sse = sse.next_named("notification").await;
        assert_eq!(on_sse.json()["notification"]["seq"], "1");
        let sse_id = sse.last_id.clone().expect("an id");
        let polled = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the poll wakes")
            .unwrap();
        poller.advance(&polled);
        let found = notifications(&polled);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].seq, found[0].text.as_str()), (1, "first"));

        // Offline on all three; the next one waits in the store.
        ws.close().await;
        drop(sse);
        publish_to_user(&backend_rpc, &user, "while away").await;
        let mut ws = WsClient::connect_authenticated(
            &server.ws_url("/ws"),
            WsCodec::Proto,
            &user.access_token,
        )
        .await;
        let reply = ws
            .request(In::SubscribeNotifications(pb::SubscribeNotifications {
                since_seq: Some(1),
            }))
            .await;
        assert!(
            matches!(reply.kind, Some(Out::NotificationsSubscribed(_))),
            "{reply:?}"
        );
        let on_ws = ws.push_matching(WAIT, ws_notification).await;
        assert_eq!((on_ws.seq, on_ws.text.as_str()), (2, "while away"));
        let mut sse = Sse::open(
            &server,
            "notifications=live",
            &user.access_token,
            Some(&sse_id),
        )
        .await;
        let on_sse = sse.next_named("notification").await;
        assert_eq!(on_sse.json()["notification"]["seq"], "2");
        let polled = poller.poll(&server, 20_000).await.expect("poll");
        let found = notifications(&polled);
        assert_eq!(found.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![2]);

        // DisconnectUser: the WebSocket closes with 4504, the SSE stream ends with a
        // `close` event 4504, the pending poll answers `ended` 4504.
        let waiting = {
            let req = poller.request(20_000);
            let rpc = server.rpc_as(&user.access_token);
            tokio::spawn(async move {
                rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                    .await
                    .expect("poll")
            })
        };
        until_waiting(&server, 1).await;
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
        loop {
            match ws.next_frame(WAIT).await {
                Incoming::Closed(code, reason) => {
                    assert_eq!(code, close::DISCONNECTED);
                    assert_eq!(reason, "account on hold");
                    break;
                }
                Incoming::Frame(_) => continue,
                Incoming::Timeout => panic!("the WebSocket stays open"),
            }
        }
        let closed = sse.next_named("close").await;
        assert_eq!(closed.json()["code"], close::DISCONNECTED);
        let polled = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("the poll ends")
            .unwrap();
        let ended = polled.ended.expect("ended");
        assert_eq!(ended.code, u32::from(close::DISCONNECTED));
        assert_eq!(ended.reason, "account on hold");
        assert!(polled.events.is_empty());
    }
);
