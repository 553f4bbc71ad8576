//! PublishService, the server publish API, over real HTTP and WebSocket clients, on
//! SQLite and PostgreSQL: who may call it (API key, admin; not a wrong, revoked or
//! member-level credential), publishing to rooms (stored, sequenced, delivered live,
//! idempotent), Broadcast's per-room results, PublishToUser to every connection of a
//! user and to an offline user on return, DisconnectUser's close code, presence,
//! and the errors for unknown rooms and users and oversized payloads.

mod common;

use std::time::Duration;

use common::{
    expect_error,
    rooms::{create_room, join},
    unique_name,
    ws::{Incoming, WsClient, WsCodec},
    Account, Backend, Codec, Rpc, TestServer,
};
use roomcast::{proto::v1 as pb, protocol::close};

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const WAIT: Duration = Duration::from_secs(10);

/// A server with an admin, an API key of that admin, and an RPC client using it.
async fn server_with_key(backend: Backend) -> (TestServer, Account, Rpc, pb::CreateApiKeyResponse) {
    let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
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
    let rpc = server.rpc_as(&key.secret);
    (server, admin, rpc, key)
}

fn publish_req(room_id: &str, text: &str, key: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        room_id: room_id.into(),
        sender: "shop".into(),
        text: text.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn publish(
    rpc: &Rpc,
    req: &pb::PublishRequest,
) -> Result<pb::PublishResponse, common::RpcError> {
    rpc.call(Codec::Json, "PublishService/Publish", req).await
}

both_backends!(auth_matrix, |backend| async move {
    let (server, admin, key_rpc, key) = server_with_key(backend).await;
    let owner = server.sign_up(&unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;

    // The key and the admin's own token may publish.
    let by_key = publish(&key_rpc, &publish_req(&room, "by key", ""))
        .await
        .expect("publish with the key");
    assert_eq!(by_key.message.as_ref().unwrap().sender_id, "bot:shop");
    publish(
        &server.rpc_as(&admin.access_token),
        &publish_req(&room, "by admin", ""),
    )
    .await
    .expect("publish as admin");

    // No credential, a wrong key: unauthenticated.
    expect_error(
        publish(&server.rpc(), &publish_req(&room, "x", "")).await,
        "unauthenticated",
        401,
    );
    let wrong = format!("{}tampered", key.secret);
    expect_error(
        publish(&server.rpc_as(&wrong), &publish_req(&room, "x", "")).await,
        "unauthenticated",
        401,
    );

    // A member's token: permission_denied, on every RPC of the service.
    let member = server.rpc_as(&owner.access_token);
    let msg = expect_error(
        publish(&member, &publish_req(&room, "x", "")).await,
        "permission_denied",
        403,
    );
    assert!(msg.contains("API key"), "{msg}");
    expect_error(
        member
            .call::<_, pb::PublishToUserResponse>(
                Codec::Proto,
                "PublishService/PublishToUser",
                &pb::PublishToUserRequest {
                    user_id: owner.user_id.clone(),
                    sender: "shop".into(),
                    text: "hi".into(),
                    ..Default::default()
                },
            )
            .await,
        "permission_denied",
        403,
    );
    expect_error(
        member
            .call::<_, pb::DisconnectUserResponse>(
                Codec::Proto,
                "PublishService/DisconnectUser",
                &pb::DisconnectUserRequest {
                    user_id: owner.user_id.clone(),
                    ..Default::default()
                },
            )
            .await,
        "permission_denied",
        403,
    );

    // A revoked key: unauthenticated from then on.
    let _: pb::RevokeApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AuthService/RevokeApiKey",
            &pb::RevokeApiKeyRequest {
                id: key.key.as_ref().unwrap().id.clone(),
            },
        )
        .await
        .expect("revoke the key");
    expect_error(
        publish(&key_rpc, &publish_req(&room, "x", "")).await,
        "unauthenticated",
        401,
    );

    // Nothing the refused calls sent was stored.
    let history = common::rooms::history(&server, &owner, &room).await;
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["by key", "by admin"]);
});

both_backends!(
    publish_is_stored_sequenced_live_and_idempotent,
    |backend| async move {
        let (server, _admin, rpc, _key) = server_with_key(backend).await;
        let owner = server.sign_up(&unique_name("owner")).await;
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        let mut ws = WsClient::connect_authenticated(
            &server.ws_url("/ws"),
            WsCodec::Json,
            &owner.access_token,
        )
        .await;
        ws.subscribe(&room, None).await.expect("subscribe");
        common::rooms::send_http(&server, &owner, &room, "from a user", "").await;

        let first = publish(&rpc, &publish_req(&room, "order shipped", "order-42"))
            .await
            .unwrap();
        let m = first.message.unwrap();
        assert_eq!(
            (m.seq, m.sender_id.as_str(), first.duplicate),
            (2, "bot:shop", false)
        );
        // A retry with the same key: the first result, nothing stored twice.
        let retry = publish(&rpc, &publish_req(&room, "order shipped", "order-42"))
            .await
            .unwrap();
        assert!(retry.duplicate);
        assert_eq!(retry.message.unwrap().seq, 2);
        let third = publish(&rpc, &publish_req(&room, "next", "order-43"))
            .await
            .unwrap();
        assert_eq!(third.message.unwrap().seq, 3);

        let live = ws.collect_until(&room, 3, WAIT).await;
        let seqs: Vec<u64> = live.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "delivered live, once each, in order");
        assert_eq!(live[1].text, "order shipped");
        assert_eq!(live[1].sender_id, "bot:shop");
    }
);

both_backends!(unknown_rooms_users_and_bad_payloads, |backend| async move {
    let (server, _admin, rpc, _key) = server_with_key(backend).await;
    let owner = server.sign_up(&unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;

    let msg = expect_error(
        publish(&rpc, &publish_req("r_doesnotexist", "x", "")).await,
        "not_found",
        404,
    );
    assert!(msg.contains("r_doesnotexist"), "{msg}");
    let to_user = |user: &str, text: String| pb::PublishToUserRequest {
        user_id: user.into(),
        sender: "shop".into(),
        text,
        ..Default::default()
    };
    let msg = expect_error(
        rpc.call::<_, pb::PublishToUserResponse>(
            Codec::Json,
            "PublishService/PublishToUser",
            &to_user("u_nobody", "hi".into()),
        )
        .await,
        "not_found",
        404,
    );
    assert!(msg.contains("u_nobody"), "{msg}");
    expect_error(
        rpc.call::<_, pb::DisconnectUserResponse>(
            Codec::Json,
            "PublishService/DisconnectUser",
            &pb::DisconnectUserRequest {
                user_id: "u_nobody".into(),
                ..Default::default()
            },
        )
        .await,
        "not_found",
        404,
    );
    expect_error(
        rpc.call::<_, pb::GetPresenceResponse>(
            Codec::Json,
            "PublishService/GetPresence",
            &pb::GetPresenceRequest {
                room_id: "r_doesnotexist".into(),
            },
        )
        .await,
        "not_found",
        404,
    );

    // Text over rooms.max_message_bytes: invalid_argument naming the limit.
    let max = server.state().settings.rooms.max_message_bytes;
    let big = "x".repeat(max + 1);
    let msg = expect_error(
        publish(&rpc, &publish_req(&room, &big, "")).await,
        "invalid_argument",
        400,
    );
    assert!(msg.contains(&max.to_string()), "{msg}");
    let msg = expect_error(
        rpc.call::<_, pb::PublishToUserResponse>(
            Codec::Json,
            "PublishService/PublishToUser",
            &to_user(&owner.user_id, big),
        )
        .await,
        "invalid_argument",
        400,
    );
    assert!(msg.contains(&max.to_string()), "{msg}");
    // A body over server.max_request_bytes: resource_exhausted before parsing.
    let huge = "y".repeat(server.state().settings.server.max_request_bytes + 1);
    let msg = expect_error(
        publish(&rpc, &publish_req(&room, &huge, "")).await,
        "resource_exhausted",
        429,
    );
    assert!(msg.contains("limit"), "{msg}");
    // A bad sender name.
    let mut bad_sender = publish_req(&room, "x", "");
    bad_sender.sender = "Shop Bot!".into();
    let msg = expect_error(publish(&rpc, &bad_sender).await, "invalid_argument", 400);
    assert!(msg.contains("sender"), "{msg}");
    // Nothing was stored by the refusals.
    assert!(common::rooms::history(&server, &owner, &room)
        .await
        .is_empty());
});

both_backends!(broadcast_reports_each_room, |backend| async move {
    let (server, _admin, rpc, _key) = server_with_key(backend).await;
    let owner = server.sign_up(&unique_name("owner")).await;
    let a = create_room(&server, &owner, pb::RoomKind::Public).await;
    let b = create_room(&server, &owner, pb::RoomKind::Private).await;
    let req = pb::BroadcastRequest {
        room_ids: vec![a.clone(), "r_missing".into(), b.clone(), "bad id!".into()],
        sender: "ci".into(),
        text: "build green".into(),
        idempotency_key: "build-7".into(),
        ..Default::default()
    };
    let resp: pb::BroadcastResponse = rpc
        .call(Codec::Proto, "PublishService/Broadcast", &req)
        .await
        .unwrap();
    assert_eq!((resp.succeeded, resp.failed), (2, 2));
    let rooms: Vec<&str> = resp.results.iter().map(|r| r.room_id.as_str()).collect();
    assert_eq!(
        rooms,
        vec![a.as_str(), "r_missing", b.as_str(), "bad id!"],
        "request order"
    );
    assert_eq!(resp.results[0].message.as_ref().unwrap().seq, 1);
    assert_eq!(resp.results[1].error_code, "not_found");
    assert!(resp.results[1].error_message.contains("r_missing"));
    assert_eq!(resp.results[2].message.as_ref().unwrap().seq, 1);
    assert_eq!(resp.results[3].error_code, "invalid_argument");
    // Retried: duplicates, nothing stored twice.
    let again: pb::BroadcastResponse = rpc
        .call(Codec::Json, "PublishService/Broadcast", &req)
        .await
        .unwrap();
    assert!(again.results[0].duplicate && again.results[2].duplicate);
    assert_eq!(common::rooms::history(&server, &owner, &a).await.len(), 1);
    assert_eq!(common::rooms::history(&server, &owner, &b).await.len(), 1);
    // Too many rooms, or one twice: the whole call is invalid.
    let mut dup = req.clone();
    dup.room_ids = vec![a.clone(), a.clone()];
    expect_error(
        rpc.call::<_, pb::BroadcastResponse>(Codec::Json, "PublishService/Broadcast", &dup)
            .await,
        "invalid_argument",
        400,
    );
    let mut many = req.clone();
    many.room_ids = (0..=server.state().settings.publish.max_broadcast_rooms)
        .map(|i| format!("r_{i}"))
        .collect();
    let msg = expect_error(
        rpc.call::<_, pb::BroadcastResponse>(Codec::Json, "PublishService/Broadcast", &many)
            .await,
        "invalid_argument",
        400,
    );
    assert!(msg.contains("max_broadcast_rooms"), "{msg}");
});

/// The next `notification` push of `ws`.
async fn next_notification(ws: &mut WsClient) -> pb::Notification {
    ws.push_matching(WAIT, |kind| match kind {
        Out::Notification(n) => Some(n.clone()),
        _ => None,
    })
    .await
}

async fn subscribe_notifications(ws: &mut WsClient, since: Option<u64>) -> u64 {
    let reply = ws
        .request(In::SubscribeNotifications(pb::SubscribeNotifications {
            since_seq: since,
        }))
        .await;
    match reply.kind {
        Some(Out::NotificationsSubscribed(s)) => s.last_seq,
        other => panic!("unexpected reply to subscribe_notifications: {other:?}"),
    }
}

async fn publish_to_user(rpc: &Rpc, user: &str, text: &str) -> pb::Notification {
    let resp: pb::PublishToUserResponse = rpc
        .call(
            Codec::Proto,
            "PublishService/PublishToUser",
            &pb::PublishToUserRequest {
                user_id: user.into(),
                sender: "shop".into(),
                text: text.into(),
                data: [("order".to_string(), "42".to_string())].into(),
                ..Default::default()
            },
        )
        .await
        .expect("publish to user");
    resp.notification.expect("a notification")
}

both_backends!(
    publish_to_user_reaches_every_connection_and_the_offline_user,
    |backend| async move {
        let (server, _admin, rpc, _key) = server_with_key(backend).await;
        let user = server.sign_up(&unique_name("buyer")).await;
        let url = server.ws_url("/ws");
        let mut json =
            WsClient::connect_authenticated(&url, WsCodec::Json, &user.access_token).await;
        let mut proto =
            WsClient::connect_authenticated(&url, WsCodec::Proto, &user.access_token).await;
        assert_eq!(subscribe_notifications(&mut json, None).await, 0);
        assert_eq!(subscribe_notifications(&mut proto, None).await, 0);

        let sent = publish_to_user(&rpc, &user.user_id, "your order shipped").await;
        assert_eq!(sent.seq, 1);
        for ws in [&mut json, &mut proto] {
            let got = next_notification(ws).await;
            assert_eq!(
                (got.seq, got.text.as_str(), got.sender.as_str()),
                (1, "your order shipped", "shop")
            );
            assert_eq!(got.kind, pb::NotificationKind::Published as i32);
            assert_eq!(got.data.get("order").map(String::as_str), Some("42"));
            assert!(
                matches!(
                    ws.next_push(Duration::from_millis(300)).await,
                    Incoming::Timeout
                ),
                "exactly once"
            );
        }
        json.close().await;
        proto.close().await;

        // Offline: stored, then received on return from the cursor, then live again.
        publish_to_user(&rpc, &user.user_id, "second").await;
        publish_to_user(&rpc, &user.user_id, "third").await;
        let mut back =
            WsClient::connect_authenticated(&url, WsCodec::Json, &user.access_token).await;
        assert_eq!(subscribe_notifications(&mut back, Some(1)).await, 3);
        assert_eq!(next_notification(&mut back).await.text, "second");
        assert_eq!(next_notification(&mut back).await.text, "third");
        publish_to_user(&rpc, &user.user_id, "fourth").await;
        let live = next_notification(&mut back).await;
        assert_eq!((live.seq, live.text.as_str()), (4, "fourth"));

        // A cursor beyond the last sequence is out_of_range; an API key has no stream.
        let reply = back
            .request(In::SubscribeNotifications(pb::SubscribeNotifications {
                since_seq: Some(99),
            }))
            .await;
        match reply.kind {
            Some(Out::Error(e)) => assert_eq!(e.code, "out_of_range"),
            other => panic!("expected out_of_range, got {other:?}"),
        }
    }
);

both_backends!(
    disconnect_user_closes_every_connection,
    |backend| async move {
        let (server, _admin, rpc, _key) = server_with_key(backend).await;
        let user = server.sign_up(&unique_name("banned")).await;
        let other = server.sign_up(&unique_name("other")).await;
        let url = server.ws_url("/ws");
        let mut a = WsClient::connect_authenticated(&url, WsCodec::Json, &user.access_token).await;
        let mut b = WsClient::connect_authenticated(&url, WsCodec::Proto, &user.access_token).await;
        let mut bystander =
            WsClient::connect_authenticated(&url, WsCodec::Json, &other.access_token).await;

        let resp: pb::DisconnectUserResponse = rpc
            .call(
                Codec::Json,
                "PublishService/DisconnectUser",
                &pb::DisconnectUserRequest {
                    user_id: user.user_id.clone(),
                    revoke_sessions: true,
                    reason: "banned by the shop".into(),
                },
            )
            .await
            .unwrap();
        assert_eq!(resp.sessions_revoked, 1);
        for ws in [&mut a, &mut b] {
            loop {
                match ws.next_frame(WAIT).await {
                    Incoming::Closed(code, reason) => {
                        assert_eq!(code, close::DISCONNECTED);
                        assert_eq!(reason, "banned by the shop");
                        break;
                    }
                    Incoming::Frame(_) => continue,
                    Incoming::Timeout => panic!("the connection was not closed"),
                }
            }
        }
        // The other user stays connected.
        let pong = bystander.request(In::Ping(pb::Ping {})).await;
        assert!(matches!(pong.kind, Some(Out::Pong(_))));
        // Sessions were revoked: the old token no longer works.
        expect_error(
            server
                .rpc_as(&user.access_token)
                .call::<_, pb::GetMeResponse>(
                    Codec::Json,
                    "UserService/GetMe",
                    &pb::GetMeRequest {},
                )
                .await,
            "unauthenticated",
            401,
        );

        // Without revoke_sessions: closed (default reason), but the user may come back.
        let resp: pb::DisconnectUserResponse = rpc
            .call(
                Codec::Proto,
                "PublishService/DisconnectUser",
                &pb::DisconnectUserRequest {
                    user_id: other.user_id.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(resp.sessions_revoked, 0);
        loop {
            match bystander.next_frame(WAIT).await {
                Incoming::Closed(code, reason) => {
                    assert_eq!(code, close::DISCONNECTED);
                    assert!(!reason.is_empty());
                    break;
                }
                Incoming::Frame(_) => continue,
                Incoming::Timeout => panic!("the connection was not closed"),
            }
        }
        let mut back =
            WsClient::connect_authenticated(&url, WsCodec::Json, &other.access_token).await;
        let pong = back.request(In::Ping(pb::Ping {})).await;
        assert!(matches!(pong.kind, Some(Out::Pong(_))));
    }
);

both_backends!(presence_and_online_counts, |backend| async move {
    let (server, _admin, rpc, _key) = server_with_key(backend).await;
    let owner = server.sign_up(&unique_name("owner")).await;
    let guest = server.sign_up(&unique_name("guest")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let empty = create_room(&server, &owner, pb::RoomKind::Public).await;
    join(&server, &guest, &room).await;
    let _ws =
        WsClient::connect_authenticated(&server.ws_url("/ws"), WsCodec::Json, &guest.access_token)
            .await;

    let presence = || async {
        rpc.call::<_, pb::GetPresenceResponse>(
            Codec::Json,
            "PublishService/GetPresence",
            &pb::GetPresenceRequest {
                room_id: room.clone(),
            },
        )
        .await
        .unwrap()
    };
    assert!(
        common::eventually(WAIT, || async {
            presence().await.online_user_ids == vec![guest.user_id.clone()]
        })
        .await,
        "the connected member is online"
    );
    assert_eq!(presence().await.member_count, 2);
    let counts: pb::GetOnlineCountsResponse = rpc
        .call(
            Codec::Proto,
            "PublishService/GetOnlineCounts",
            &pb::GetOnlineCountsRequest {
                room_ids: vec![room.clone(), empty.clone()],
            },
        )
        .await
        .unwrap();
    assert_eq!(counts.online.get(&room), Some(&1));
    assert_eq!(counts.online.get(&empty), Some(&0));
    expect_error(
        rpc.call::<_, pb::GetOnlineCountsResponse>(
            Codec::Proto,
            "PublishService/GetOnlineCounts",
            &pb::GetOnlineCountsRequest {
                room_ids: vec![room.clone(), "r_missing".into()],
            },
        )
        .await,
        "not_found",
        404,
    );
});
