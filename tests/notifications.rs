//! NotificationService and the user notification stream, over real HTTP and
//! WebSocket clients, on SQLite and PostgreSQL: mentions, invitations (listed,
//! accepted, declined, notified), kicks and bans, the read cursor and unread
//! count, retention, and a gapless per-user sequence under concurrent publishers
//! with a WebSocket subscriber that sees every sequence exactly once.

mod common;

use std::time::Duration;

use common::{
    eventually, expect_error,
    rooms::{create_room, join},
    unique_name,
    ws::{Incoming, WsClient, WsCodec},
    Account, Backend, Codec, TestServer,
};
use roomcast::proto::v1 as pb;

use pb::{client_frame::Kind as In, server_frame::Kind as Out, NotificationKind as Kind};

const WAIT: Duration = Duration::from_secs(10);

async fn list(server: &TestServer, account: &Account, after: u64) -> pb::ListNotificationsResponse {
    server
        .rpc_as(&account.access_token)
        .call(
            Codec::Json,
            "NotificationService/ListNotifications",
            &pb::ListNotificationsRequest {
                after_seq: after,
                limit: 0,
            },
        )
        .await
        .expect("list notifications")
}

/// Waits until `account` has `n` notifications; answers them.
async fn wait_for(server: &TestServer, account: &Account, n: usize) -> Vec<pb::Notification> {
    eventually(WAIT, || async {
        list(server, account, 0).await.notifications.len() >= n
    })
    .await;
    let seen = list(server, account, 0).await.notifications;
    assert_eq!(
        seen.len(),
        n,
        "notifications of {}: {seen:?}",
        account.username
    );
    seen
}

async fn send(server: &TestServer, account: &Account, room: &str, text: &str) -> u64 {
    common::rooms::send_http(server, account, room, text, "")
        .await
        .message
        .expect("a message")
        .seq
}

both_backends!(mentions_notify_members, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let alice = server.sign_up(&unique_name("alice")).await;
    let bob = server.sign_up(&unique_name("bob")).await;
    let outsider = server.sign_up(&unique_name("out")).await;
    let room = create_room(&server, &alice, pb::RoomKind::Public).await;
    join(&server, &bob, &room).await;

    let text = format!(
        "hey @{} and @{}, also @{} and @nosuchuser",
        bob.username.to_uppercase(),
        outsider.username,
        alice.username
    );
    let seq = send(&server, &alice, &room, &text).await;
    let got = wait_for(&server, &bob, 1).await;
    let n = &got[0];
    assert_eq!(n.kind, Kind::Mention as i32);
    assert_eq!(
        (n.seq, n.room_id.as_str(), n.room_seq),
        (1, room.as_str(), seq)
    );
    assert_eq!(n.sender, alice.user_id);
    assert_eq!(n.text, text);
    assert!(!n.read);
    // Not a member: no notification; the sender does not notify themself.
    send(&server, &alice, &room, "sync point").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(list(&server, &outsider, 0).await.notifications.is_empty());
    assert!(list(&server, &alice, 0).await.notifications.is_empty());
});

async fn invite(server: &TestServer, by: &Account, room: &str, user: &Account) {
    let _: pb::InviteMemberResponse = server
        .rpc_as(&by.access_token)
        .call_proto(
            "RoomService/InviteMember",
            &pb::InviteMemberRequest {
                room_id: room.into(),
                user_id: user.user_id.clone(),
            },
        )
        .await
        .expect("invite");
}

both_backends!(
    invitations_listed_accepted_declined_and_notified,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let owner = server.sign_up(&unique_name("owner")).await;
        let guest = server.sign_up(&unique_name("guest")).await;
        let first = create_room(&server, &owner, pb::RoomKind::Private).await;
        let url = server.ws_url("/ws");
        let mut ws =
            WsClient::connect_authenticated(&url, WsCodec::Proto, &guest.access_token).await;
        let reply = ws
            .request(In::SubscribeNotifications(pb::SubscribeNotifications {
                since_seq: Some(0),
            }))
            .await;
        assert!(
            matches!(reply.kind, Some(Out::NotificationsSubscribed(_))),
            "{reply:?}"
        );

        invite(&server, &owner, &first, &guest).await;
        // Inviting again does not notify again.
        invite(&server, &owner, &first, &guest).await;
        // An invitation made with CreateRoom notifies too.
        let second: String = server
            .rpc_as(&owner.access_token)
            .call_proto::<_, pb::CreateRoomResponse>(
                "RoomService/CreateRoom",
                &pb::CreateRoomRequest {
                    kind: pb::RoomKind::Private as i32,
                    title: "test room".into(),
                    member_ids: vec![guest.user_id.clone()],
                    ..Default::default()
                },
            )
            .await
            .expect("create a room with an invitation")
            .room
            .unwrap()
            .id;

        // Arrives live as a notification.
        for room in [&first, &second] {
            let n = ws
                .push_matching(WAIT, |k| match k {
                    Out::Notification(n) => Some(n.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(
                (n.kind, n.room_id.as_str(), n.sender.as_str()),
                (
                    Kind::Invitation as i32,
                    room.as_str(),
                    owner.user_id.as_str()
                )
            );
            assert_eq!(n.text, "test room");
        }
        assert!(matches!(
            ws.next_push(Duration::from_millis(300)).await,
            Incoming::Timeout
        ));

        let rpc = server.rpc_as(&guest.access_token);
        let listed: pb::ListInvitationsResponse = rpc
            .call(
                Codec::Json,
                "NotificationService/ListInvitations",
                &pb::ListInvitationsRequest {
                    page_size: 1,
                    page_token: String::new(),
                },
            )
            .await
            .unwrap();
        assert_eq!(listed.invitations.len(), 1);
        assert!(!listed.next_page_token.is_empty());
        let rest: pb::ListInvitationsResponse = rpc
            .call(
                Codec::Json,
                "NotificationService/ListInvitations",
                &pb::ListInvitationsRequest {
                    page_size: 1,
                    page_token: listed.next_page_token.clone(),
                },
            )
            .await
            .unwrap();
        assert_eq!(rest.invitations.len(), 1);
        assert!(rest.next_page_token.is_empty());
        let mut rooms: Vec<String> = listed
            .invitations
            .iter()
            .chain(&rest.invitations)
            .map(|i| i.room_id.clone())
            .collect();
        rooms.sort();
        let mut expected = vec![first.clone(), second.clone()];
        expected.sort();
        assert_eq!(rooms, expected);
        let inv = &listed.invitations[0];
        assert_eq!(
            (
                inv.room_kind,
                inv.room_title.as_str(),
                inv.invited_by.as_str()
            ),
            (
                pb::RoomKind::Private as i32,
                "test room",
                owner.user_id.as_str()
            )
        );

        // Accept joins; decline does not.
        let accepted: pb::AcceptInvitationResponse = rpc
            .call(
                Codec::Proto,
                "NotificationService/AcceptInvitation",
                &pb::AcceptInvitationRequest {
                    room_id: first.clone(),
                },
            )
            .await
            .unwrap();
        assert_eq!(accepted.room.unwrap().id, first);
        let _: pb::DeclineInvitationResponse = rpc
            .call(
                Codec::Proto,
                "NotificationService/DeclineInvitation",
                &pb::DeclineInvitationRequest {
                    room_id: second.clone(),
                },
            )
            .await
            .unwrap();
        let left: pb::ListInvitationsResponse = rpc
            .call(
                Codec::Json,
                "NotificationService/ListInvitations",
                &pb::ListInvitationsRequest::default(),
            )
            .await
            .unwrap();
        assert!(left.invitations.is_empty());
        common::rooms::send_http(&server, &guest, &first, "I am in", "").await;
        expect_error(
            rpc.call::<_, pb::SendMessageResponse>(
                Codec::Json,
                "RoomService/SendMessage",
                &pb::SendMessageRequest {
                    room_id: second.clone(),
                    text: "no".into(),
                    ..Default::default()
                },
            )
            .await,
            "not_found",
            404,
        );
        // No invitation (any more): not_found.
        for method in ["AcceptInvitation", "DeclineInvitation"] {
            let (status, body) = rpc
                .call_json(
                    &format!("NotificationService/{method}"),
                    serde_json::json!({"roomId": second}),
                )
                .await;
            assert_eq!(
                (status, body["code"].as_str()),
                (404, Some("not_found")),
                "{method}: {body}"
            );
        }
    }
);

both_backends!(kicks_and_bans_notify_the_user, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let owner = server.sign_up(&unique_name("owner")).await;
    let member = server.sign_up(&unique_name("member")).await;
    let a = create_room(&server, &owner, pb::RoomKind::Public).await;
    let b = create_room(&server, &owner, pb::RoomKind::Public).await;
    join(&server, &member, &a).await;
    join(&server, &member, &b).await;
    let rpc = server.rpc_as(&owner.access_token);
    let _: pb::KickMemberResponse = rpc
        .call_proto(
            "RoomService/KickMember",
            &pb::KickMemberRequest {
                room_id: a.clone(),
                user_id: member.user_id.clone(),
                reason: "spam".into(),
            },
        )
        .await
        .unwrap();
    let _: pb::BanMemberResponse = rpc
        .call_proto(
            "RoomService/BanMember",
            &pb::BanMemberRequest {
                room_id: b.clone(),
                user_id: member.user_id.clone(),
                reason: "more spam".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let got = wait_for(&server, &member, 2).await;
    let mut got: Vec<(i32, String, String)> = got
        .into_iter()
        .map(|n| (n.kind, n.room_id, n.text))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (Kind::Kicked as i32, a.clone(), "spam".to_string()),
            (Kind::Banned as i32, b.clone(), "more spam".to_string())
        ]
    );
});

both_backends!(
    read_cursor_unread_count_and_api_keys,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let user = server.sign_up(&unique_name("reader")).await;
        let key: pb::CreateApiKeyResponse = server
            .rpc_as(&admin.access_token)
            .call_proto(
                "AuthService/CreateApiKey",
                &pb::CreateApiKeyRequest { name: "k".into() },
            )
            .await
            .unwrap();
        for i in 0..3 {
            let _: pb::PublishToUserResponse = server
                .rpc_as(&key.secret)
                .call_proto(
                    "PublishService/PublishToUser",
                    &pb::PublishToUserRequest {
                        user_id: user.user_id.clone(),
                        sender: "app".into(),
                        text: format!("n{i}"),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
        let rpc = server.rpc_as(&user.access_token);
        let count = || async {
            rpc.call::<_, pb::CountUnreadNotificationsResponse>(
                Codec::Json,
                "NotificationService/CountUnreadNotifications",
                &pb::CountUnreadNotificationsRequest {},
            )
            .await
            .unwrap()
        };
        let c = count().await;
        assert_eq!((c.unread_count, c.read_seq, c.last_seq), (3, 0, 3));
        let mark = |up_to: u64| {
            let rpc = rpc.clone();
            async move {
                rpc.call::<_, pb::MarkNotificationsReadResponse>(
                    Codec::Proto,
                    "NotificationService/MarkNotificationsRead",
                    &pb::MarkNotificationsReadRequest { up_to_seq: up_to },
                )
                .await
                .unwrap()
            }
        };
        let m = mark(2).await;
        assert_eq!((m.read_seq, m.unread_count), (2, 1));
        // Never backwards; never past the newest.
        assert_eq!(mark(1).await.read_seq, 2);
        assert_eq!(mark(u64::MAX).await.read_seq, 3);
        assert_eq!(count().await.unread_count, 0);
        let page = list(&server, &user, 1).await;
        assert_eq!(
            page.notifications
                .iter()
                .map(|n| (n.seq, n.read))
                .collect::<Vec<_>>(),
            vec![(2, true), (3, true)]
        );
        assert_eq!((page.last_seq, page.read_seq, page.has_more), (3, 3, false));
        // An API key has no notification stream.
        expect_error(
            server
                .rpc_as(&key.secret)
                .call::<_, pb::ListNotificationsResponse>(
                    Codec::Json,
                    "NotificationService/ListNotifications",
                    &pb::ListNotificationsRequest::default(),
                )
                .await,
            "permission_denied",
            403,
        );
        expect_error(
            rpc.call::<_, pb::ListNotificationsResponse>(
                Codec::Json,
                "NotificationService/ListNotifications",
                &pb::ListNotificationsRequest {
                    after_seq: 0,
                    limit: 100_000,
                },
            )
            .await,
            "invalid_argument",
            400,
        );
    }
);

both_backends!(retention_drops_old_notifications, |backend| async move {
    let (server, admin) =
        TestServer::spawn_with_admin(backend, |s| s.notifications.retention_secs = 1).await;
    let user = server.sign_up(&unique_name("forgetful")).await;
    let key: pb::CreateApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest { name: "k".into() },
        )
        .await
        .unwrap();
    let publish = |text: &'static str| {
        let rpc = server.rpc_as(&key.secret);
        let user_id = user.user_id.clone();
        async move {
            rpc.call::<_, pb::PublishToUserResponse>(
                Codec::Proto,
                "PublishService/PublishToUser",
                &pb::PublishToUserRequest {
                    user_id,
                    sender: "app".into(),
                    text: text.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    publish("old").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let fresh = publish("fresh").await.notification.unwrap();
    assert_eq!(
        fresh.seq, 2,
        "sequences continue past removed notifications"
    );
    let page = list(&server, &user, 0).await;
    assert_eq!(
        page.notifications
            .iter()
            .map(|n| n.text.as_str())
            .collect::<Vec<_>>(),
        vec!["fresh"]
    );
});

/// Publishers racing for one user's stream; each gets a distinct sequence, the
/// sequence has no gap, and a subscriber sees each exactly once, in order.
async fn gapless_under_concurrent_publishers(backend: Backend) {
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 25;
    let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
    let user = server.sign_up(&unique_name("popular")).await;
    let key: pb::CreateApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest { name: "k".into() },
        )
        .await
        .unwrap();
    let mut ws =
        WsClient::connect_authenticated(&server.ws_url("/ws"), WsCodec::Json, &user.access_token)
            .await;
    let reply = ws
        .request(In::SubscribeNotifications(pb::SubscribeNotifications {
            since_seq: Some(0),
        }))
        .await;
    assert!(matches!(reply.kind, Some(Out::NotificationsSubscribed(_))));

    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let rpc = server.rpc_as(&key.secret);
        let user_id = user.user_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..EACH {
                let resp: pb::PublishToUserResponse = rpc
                    .call(
                        Codec::Proto,
                        "PublishService/PublishToUser",
                        &pb::PublishToUserRequest {
                            user_id: user_id.clone(),
                            sender: "race".into(),
                            text: format!("{p}-{i}"),
                            idempotency_key: format!("{p}-{i}"),
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("publish");
                seqs.push(resp.notification.unwrap().seq);
            }
            seqs
        }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.expect("publisher"));
    }
    acknowledged.sort_unstable();
    let total = PUBLISHERS * EACH;
    assert_eq!(
        acknowledged,
        (1..=total).collect::<Vec<_>>(),
        "distinct and gapless"
    );

    let mut delivered = Vec::new();
    while delivered.len() < total as usize {
        match ws.next_push(WAIT).await {
            Incoming::Frame(pb::ServerFrame {
                kind: Some(Out::Notification(n)),
                ..
            }) => delivered.push(n.seq),
            Incoming::Frame(_) => {}
            other => panic!("after {} notifications: {other:?}", delivered.len()),
        }
    }
    assert_eq!(
        delivered,
        (1..=total).collect::<Vec<_>>(),
        "every sequence once, in order"
    );
    assert!(
        matches!(
            ws.next_push(Duration::from_millis(300)).await,
            Incoming::Timeout
        ),
        "no duplicate after the last"
    );

    // Listed page by page: the same sequence.
    let mut listed = Vec::new();
    let mut after = 0;
    loop {
        let page = list(&server, &user, after).await;
        listed.extend(page.notifications.iter().map(|n| n.seq));
        after = listed.last().copied().unwrap_or(0);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(listed, (1..=total).collect::<Vec<_>>());
}

both_backends!(gapless_sequence, gapless_under_concurrent_publishers);

both_backends!(resubscribe_replaces_the_cursor, |backend| async move {
    let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
    let user = server.sign_up(&unique_name("again")).await;
    let key: pb::CreateApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest { name: "k".into() },
        )
        .await
        .unwrap();
    let publish = |text: String| {
        let rpc = server.rpc_as(&key.secret);
        let user_id = user.user_id.clone();
        async move {
            let _: pb::PublishToUserResponse = rpc
                .call(
                    Codec::Proto,
                    "PublishService/PublishToUser",
                    &pb::PublishToUserRequest {
                        user_id,
                        sender: "app".into(),
                        text,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
    };
    for i in 1..=3 {
        publish(format!("n{i}")).await;
    }
    let mut ws =
        WsClient::connect_authenticated(&server.ws_url("/ws"), WsCodec::Json, &user.access_token)
            .await;
    // Two subscribes back to back: each gets exactly one reply; the second wins.
    for (id, since) in [(101, 0), (102, 2)] {
        ws.send_frame(&pb::ClientFrame {
            id,
            kind: Some(In::SubscribeNotifications(pb::SubscribeNotifications {
                since_seq: Some(since),
            })),
        })
        .await;
    }
    let mut replies = Vec::new();
    while replies.len() < 2 {
        match ws.next_frame(WAIT).await {
            Incoming::Frame(f) if f.id == 101 || f.id == 102 => replies.push(f),
            Incoming::Frame(_) => {}
            other => panic!("waiting for the replies: {other:?}"),
        }
    }
    assert_eq!(replies[0].id, 101);
    match &replies[0].kind {
        Some(Out::NotificationsSubscribed(_)) => {}
        Some(Out::Error(e)) => assert_eq!(e.code, "aborted"),
        other => panic!("unexpected first reply: {other:?}"),
    }
    assert!(
        matches!(replies[1].kind, Some(Out::NotificationsSubscribed(_))),
        "{:?}",
        replies[1]
    );
    // After the second reply: only the second subscription's stream.
    publish("n4".into()).await;
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        match ws.next_frame(WAIT).await {
            Incoming::Frame(pb::ServerFrame {
                kind: Some(Out::Notification(n)),
                ..
            }) => seqs.push(n.seq),
            Incoming::Frame(_) => {}
            other => panic!("after {seqs:?}: {other:?}"),
        }
    }
    assert_eq!(seqs, vec![3, 4]);
    assert!(matches!(
        ws.next_frame(Duration::from_millis(300)).await,
        Incoming::Timeout
    ));
});

both_backends!(
    the_sweeper_removes_expired_notifications,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |s| {
            s.notifications.retention_secs = 1;
            s.rooms.retention_sweep_secs = 1;
        })
        .await;
        let user = server.sign_up(&unique_name("quiet")).await;
        let key: pb::CreateApiKeyResponse = server
            .rpc_as(&admin.access_token)
            .call_proto(
                "AuthService/CreateApiKey",
                &pb::CreateApiKeyRequest { name: "k".into() },
            )
            .await
            .unwrap();
        let _: pb::PublishToUserResponse = server
            .rpc_as(&key.secret)
            .call_proto(
                "PublishService/PublishToUser",
                &pb::PublishToUserRequest {
                    user_id: user.user_id.clone(),
                    sender: "app".into(),
                    text: "expires".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        // Stored rows, whatever their age (reads hide expired ones; the sweep removes
        // them for a user who gets nothing new).
        let user_id = roomcast::ids::UserId(user.user_id.clone());
        let stored = || async {
            server
                .state()
                .store
                .notifications_after(&user_id, 0, i64::MIN, 10)
                .await
                .expect("read the store")
                .len()
        };
        assert_eq!(stored().await, 1);
        assert!(
            eventually(Duration::from_secs(10), || async { stored().await == 0 }).await,
            "the sweeper removed the expired notification"
        );
        // The cursor is untouched: the user's sequence goes on.
        let count: pb::CountUnreadNotificationsResponse = server
            .rpc_as(&user.access_token)
            .call_proto(
                "NotificationService/CountUnreadNotifications",
                &pb::CountUnreadNotificationsRequest {},
            )
            .await
            .unwrap();
        assert_eq!((count.last_seq, count.unread_count), (1, 0));
    }
);

both_backends!(
    an_edit_notifies_only_newly_mentioned_users,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let alice = server.sign_up(&unique_name("alice")).await;
        let bob = server.sign_up(&unique_name("bob")).await;
        let carol = server.sign_up(&unique_name("carol")).await;
        let room = create_room(&server, &alice, pb::RoomKind::Public).await;
        join(&server, &bob, &room).await;
        join(&server, &carol, &room).await;
        let seq = send(&server, &alice, &room, &format!("hi @{}", bob.username)).await;
        wait_for(&server, &bob, 1).await;
        let edit = |text: String| {
            let rpc = server.rpc_as(&alice.access_token);
            let room = room.clone();
            async move {
                let _: pb::EditMessageResponse = rpc
                    .call_proto(
                        "RoomService/EditMessage",
                        &pb::EditMessageRequest {
                            room_id: room,
                            seq,
                            text,
                        },
                    )
                    .await
                    .expect("edit");
            }
        };
        edit(format!("hi @{} and @{}", bob.username, carol.username)).await;
        let got = wait_for(&server, &carol, 1).await;
        assert_eq!(got[0].kind, Kind::Mention as i32);
        assert_eq!(got[0].room_seq, seq, "about the edited message");
        assert!(got[0].text.contains(&carol.username));
        // Editing again (both still mentioned, and once more with a typo fixed) does not
        // notify anyone twice.
        edit(format!("hi @{} and @{}!", bob.username, carol.username)).await;
        // A marker published after the edit: once it arrives, the edit's hook is done.
        let marker = send(
            &server,
            &alice,
            &room,
            &format!("@{} @{} ping", bob.username, carol.username),
        )
        .await;
        let bobs = wait_for(&server, &bob, 2).await;
        let carols = wait_for(&server, &carol, 2).await;
        assert_eq!(
            bobs.iter().map(|n| n.room_seq).collect::<Vec<_>>(),
            vec![seq, marker]
        );
        assert_eq!(
            carols.iter().map(|n| n.room_seq).collect::<Vec<_>>(),
            vec![seq, marker]
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(list(&server, &bob, 0).await.notifications.len(), 2);
        assert_eq!(list(&server, &carol, 0).await.notifications.len(), 2);
        // Alice mentioning herself in an edit is not notified.
        edit(format!("hi @{}", alice.username)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(list(&server, &alice, 0).await.notifications.is_empty());
    }
);
