//! AdminService over real sockets: who may call it, and what each action does as a
//! client sees it; access rules taking effect without a restart; the audit log.

mod common;

use std::time::Duration;

use common::{
    admin_call, expect_error,
    rooms::{create_room, join, send_http},
    ws::{Incoming, WsClient, WsCodec},
    Account, Backend, TestServer, PASSWORD,
};
use roomcast::{
    ids::UserId,
    model::Role,
    proto::v1::{self as pb, admin_service},
};
use serde_json::json;

use pb::server_frame::Kind as Out;

/// How long a push or a close may take to arrive.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

fn ws_url(server: &TestServer) -> String {
    server.ws_url("/ws")
}

/// Waits for the server to close `ws`; answers the close code.
async fn closed_with(ws: &mut WsClient) -> u16 {
    loop {
        match ws.next_push(PUSH_TIMEOUT).await {
            Incoming::Closed(code, _) => return code,
            Incoming::Frame(_) => continue,
            Incoming::Timeout => panic!("the connection was not closed"),
        }
    }
}

async fn create_api_key(server: &TestServer, admin: &Account) -> String {
    let reply: pb::CreateApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call_proto(
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest { name: "ops".into() },
        )
        .await
        .expect("create an API key");
    reply.secret
}

async fn make_guest(server: &TestServer, name: &str) -> Account {
    let account = server.sign_up(name).await;
    server
        .state()
        .store
        .set_user_role(&UserId(account.user_id.clone()), Role::Guest)
        .await
        .expect("make a guest");
    account
}

both_backends!(
    every_admin_rpc_is_admin_only,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let member = server.sign_up("mallory").await;
        let guest = make_guest(&server, "gordon").await;
        let key = create_api_key(&server, &admin).await;
        assert!(!admin_service::UNARY_METHODS.is_empty());
        for method in admin_service::UNARY_METHODS {
            let path = format!("AdminService/{method}");
            for (who, token) in [
                ("member", &member.access_token),
                ("guest", &guest.access_token),
            ] {
                let (status, body) = server.rpc_as(token).call_json(&path, json!({})).await;
                assert_eq!(
                    (status, body["code"].as_str()),
                    (403, Some("permission_denied")),
                    "{who} calling {method}: {body}"
                );
            }
            let (status, body) = server.rpc().call_json(&path, json!({})).await;
            assert_eq!(
                (status, body["code"].as_str()),
                (401, Some("unauthenticated")),
                "no credential calling {method}: {body}"
            );
            // Admins and API keys pass; an empty request may still be invalid.
            for (who, token) in [("admin", &admin.access_token), ("API key", &key)] {
                let (status, body) = server.rpc_as(token).call_json(&path, json!({})).await;
                assert!(
                    status == 200 || body["code"] == "invalid_argument",
                    "{who} calling {method}: {status} {body}"
                );
            }
        }
        // The read-only ones answer for real.
        let config: pb::GetConfigResponse =
            admin_call(&server, &admin, "GetConfig", &pb::GetConfigRequest {}).await;
        assert!(config.toml.contains("[auth]"), "{}", config.toml);
        assert!(
            config.toml.contains("admin_password = \"********\""),
            "{}",
            config.toml
        );
        assert!(!config.toml.contains(PASSWORD));
    }
);

both_backends!(
    revoked_sessions_close_live_sockets,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let user = server.sign_up("rita").await;
        let mut ws =
            WsClient::connect_authenticated(&ws_url(&server), WsCodec::Json, &user.access_token)
                .await;
        let reply: pb::RevokeUserSessionsResponse = admin_call(
            &server,
            &admin,
            "RevokeUserSessions",
            &pb::RevokeUserSessionsRequest {
                user_id: user.user_id.clone(),
            },
        )
        .await;
        assert_eq!(reply.sessions_revoked, 1);
        assert_eq!(closed_with(&mut ws).await, 4501);
        let old = server
            .rpc_as(&user.access_token)
            .call_proto::<_, pb::GetMeResponse>("UserService/GetMe", &pb::GetMeRequest {})
            .await;
        expect_error(old, "unauthenticated", 401);
        // Not suspended: signing in again works.
        server.sign_in("rita", PASSWORD).await;
        let unknown = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::RevokeUserSessionsResponse>(
                "AdminService/RevokeUserSessions",
                &pb::RevokeUserSessionsRequest {
                    user_id: "u_nobody".into(),
                },
            )
            .await;
        expect_error(unknown, "not_found", 404);
    }
);

both_backends!(
    suspended_accounts_are_locked_out_until_reinstated,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let user = server.sign_up("sam").await;
        let mut ws =
            WsClient::connect_authenticated(&ws_url(&server), WsCodec::Proto, &user.access_token)
                .await;
        let _: pb::SuspendUserResponse = admin_call(
            &server,
            &admin,
            "SuspendUser",
            &pb::SuspendUserRequest {
                user_id: user.user_id.clone(),
                reason: "spam".into(),
            },
        )
        .await;
        assert_eq!(closed_with(&mut ws).await, 4501);
        let sign_in = server
            .rpc()
            .call_proto::<_, pb::SignInResponse>(
                "AuthService/SignIn",
                &pb::SignInRequest {
                    username: "sam".into(),
                    password: PASSWORD.into(),
                },
            )
            .await;
        let message = expect_error(sign_in, "permission_denied", 403);
        assert!(message.contains("suspended"), "{message}");
        let refresh = server
            .rpc()
            .call_proto::<_, pb::RefreshResponse>(
                "AuthService/Refresh",
                &pb::RefreshRequest {
                    refresh_token: user.refresh_token.clone(),
                },
            )
            .await;
        expect_error(refresh, "unauthenticated", 401);
        let old = server
            .rpc_as(&user.access_token)
            .call_proto::<_, pb::GetMeResponse>("UserService/GetMe", &pb::GetMeRequest {})
            .await;
        let message = expect_error(old, "unauthenticated", 401);
        assert!(message.contains("suspended"), "{message}");
        // An admin cannot suspend themselves.
        let own = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::SuspendUserResponse>(
                "AdminService/SuspendUser",
                &pb::SuspendUserRequest {
                    user_id: admin.user_id.clone(),
                    reason: String::new(),
                },
            )
            .await;
        expect_error(own, "failed_precondition", 400);

        let _: pb::ReinstateUserResponse = admin_call(
            &server,
            &admin,
            "ReinstateUser",
            &pb::ReinstateUserRequest {
                user_id: user.user_id.clone(),
            },
        )
        .await;
        let again = server.sign_in("sam", PASSWORD).await;
        let _: pb::GetMeResponse = server
            .rpc_as(&again.access_token)
            .call_proto("UserService/GetMe", &pb::GetMeRequest {})
            .await
            .expect("a reinstated user's new token works");
        let twice = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::ReinstateUserResponse>(
                "AdminService/ReinstateUser",
                &pb::ReinstateUserRequest {
                    user_id: user.user_id.clone(),
                },
            )
            .await;
        expect_error(twice, "not_found", 404);

        // Both actions are in the audit log, newest first, by the admin.
        let log: pb::ListAuditLogResponse = admin_call(
            &server,
            &admin,
            "ListAuditLog",
            &pb::ListAuditLogRequest::default(),
        )
        .await;
        let actions: Vec<(&str, &str, &str)> = log
            .entries
            .iter()
            .map(|e| (e.action.as_str(), e.target.as_str(), e.actor_id.as_str()))
            .collect();
        assert_eq!(
            actions,
            vec![
                (
                    "reinstate_user",
                    user.user_id.as_str(),
                    admin.user_id.as_str()
                ),
                (
                    "suspend_user",
                    user.user_id.as_str(),
                    admin.user_id.as_str()
                ),
            ]
        );
        assert_eq!(log.entries[1].detail, "spam");
    }
);

both_backends!(
    deleted_rooms_remove_subscribers_and_are_gone,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let owner = server.sign_up("olga").await;
        let reader = server.sign_up("ravi").await;
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        join(&server, &reader, &room).await;
        send_http(&server, &owner, &room, "hello", "c1").await;
        let mut ws =
            WsClient::connect_authenticated(&ws_url(&server), WsCodec::Json, &reader.access_token)
                .await;
        ws.subscribe(&room, None).await.expect("subscribe");

        let stats: pb::GetRoomStatsResponse = admin_call(
            &server,
            &admin,
            "GetRoomStats",
            &pb::GetRoomStatsRequest {
                room_id: room.clone(),
            },
        )
        .await;
        assert_eq!((stats.members, stats.members_online), (2, 1));
        assert!(
            stats.last_seq >= 1 && stats.messages_last_minute >= 1,
            "{stats:?}"
        );
        assert!(stats.loaded);

        let listed: pb::ListConnectionsResponse = admin_call(
            &server,
            &admin,
            "ListConnections",
            &pb::ListConnectionsRequest {
                user_id: reader.user_id.clone(),
            },
        )
        .await;
        assert_eq!(listed.connections.len(), 1, "{listed:?}");
        let conn = &listed.connections[0];
        assert_eq!(conn.user_id, reader.user_id);
        assert_eq!(conn.transport, "websocket+json");
        assert_eq!(conn.subscriptions, vec![room.clone()]);
        assert!(!conn.session_id.is_empty() && conn.connected_at.is_some());
        assert_eq!(conn.remote_address, "127.0.0.1", "the peer's address");

        let _: pb::DeleteRoomResponse = admin_call(
            &server,
            &admin,
            "DeleteRoom",
            &pb::DeleteRoomRequest {
                room_id: room.clone(),
                reason: "off-topic".into(),
            },
        )
        .await;
        let removed = ws
            .push_matching(PUSH_TIMEOUT, |kind| match kind {
                Out::Removed(r) => Some(r.clone()),
                _ => None,
            })
            .await;
        assert_eq!(removed.room_id, room);
        assert_eq!(removed.reason, pb::RemovedReason::RoomDeleted as i32);
        assert_eq!(removed.message, "off-topic");

        let get = server
            .rpc_as(&owner.access_token)
            .call_proto::<_, pb::GetRoomResponse>(
                "RoomService/GetRoom",
                &pb::GetRoomRequest {
                    room_id: room.clone(),
                },
            )
            .await;
        expect_error(get, "not_found", 404);
        let history = server
            .rpc_as(&owner.access_token)
            .call_proto::<_, pb::ListMessagesResponse>(
                "RoomService/ListMessages",
                &pb::ListMessagesRequest {
                    room_id: room.clone(),
                    ..Default::default()
                },
            )
            .await;
        expect_error(history, "not_found", 404);
        let resubscribe = ws
            .subscribe(&room, Some(0))
            .await
            .expect_err("room is gone");
        assert_eq!(resubscribe.code, "not_found");
        let stats = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::GetRoomStatsResponse>(
                "AdminService/GetRoomStats",
                &pb::GetRoomStatsRequest { room_id: room },
            )
            .await;
        expect_error(stats, "not_found", 404);
    }
);

both_backends!(
    announcements_reach_every_live_socket,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let key = create_api_key(&server, &admin).await;
        let a = server.sign_up("amy").await;
        let b = server.sign_up("bob").await;
        let mut json_ws =
            WsClient::connect_authenticated(&ws_url(&server), WsCodec::Json, &a.access_token).await;
        let mut proto_ws =
            WsClient::connect_authenticated(&ws_url(&server), WsCodec::Proto, &b.access_token)
                .await;
        let reply: pb::AnnounceResponse = server
            .rpc_as(&key)
            .call_proto(
                "AdminService/Announce",
                &pb::AnnounceRequest {
                    text: "  maintenance at 02:00 UTC ".into(),
                },
            )
            .await
            .expect("announce with an API key");
        assert_eq!(reply.users_reached, 2);
        for ws in [&mut json_ws, &mut proto_ws] {
            let got = ws
                .push_matching(PUSH_TIMEOUT, |kind| match kind {
                    Out::Announcement(a) => Some(a.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(got.text, "maintenance at 02:00 UTC");
            assert!(got.sender_id.starts_with("k_"), "{got:?}");
        }
        let empty = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::AnnounceResponse>(
                "AdminService/Announce",
                &pb::AnnounceRequest { text: "  ".into() },
            )
            .await;
        expect_error(empty, "invalid_argument", 400);
    }
);

async fn try_send_rpc(
    server: &TestServer,
    who: &Account,
    room: &str,
    id: &str,
) -> Result<(), String> {
    server
        .rpc_as(&who.access_token)
        .call_proto::<_, pb::SendMessageResponse>(
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.into(),
                text: "hi".into(),
                client_message_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .map(|_| ())
        .map_err(|e| e.code)
}

both_backends!(
    deny_rule_on_send_for_guests_applies_without_restart,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let owner = server.sign_up("oscar").await;
        let guest = server.sign_up("gina").await;
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        join(&server, &guest, &room).await;
        server
            .state()
            .store
            .set_user_role(&UserId(guest.user_id.clone()), Role::Guest)
            .await
            .expect("make a guest");
        let mut guest_ws =
            WsClient::connect_authenticated(&ws_url(&server), WsCodec::Json, &guest.access_token)
                .await;
        try_send_rpc(&server, &guest, &room, "g1")
            .await
            .expect("guests may send");
        guest_ws
            .send_message(&room, "hi", "g2")
            .await
            .expect("guests may send");

        let created: pb::CreateAccessRuleResponse = admin_call(
            &server,
            &admin,
            "CreateAccessRule",
            &pb::CreateAccessRuleRequest {
                role: "guest".into(),
                operation: "roomcast.v1.RoomService/SendMessage".into(),
                effect: "deny".into(),
                priority: 10,
                description: "read-only guests".into(),
            },
        )
        .await;
        let rule = created.rule.expect("the rule");
        assert!(rule.id.starts_with("ar_"));

        assert_eq!(
            try_send_rpc(&server, &guest, &room, "g3").await,
            Err("permission_denied".into())
        );
        let refused = guest_ws
            .send_message(&room, "hi", "g4")
            .await
            .expect_err("denied");
        assert_eq!(refused.code, "permission_denied");
        assert!(refused.message.contains(&rule.id), "{refused:?}");
        // Members are not affected, and the guest still reads.
        try_send_rpc(&server, &owner, &room, "o1")
            .await
            .expect("members still send");
        guest_ws
            .subscribe(&room, Some(0))
            .await
            .expect("guests still subscribe");

        // A higher-priority allow reopens it; deleting both restores the default.
        let allow: pb::CreateAccessRuleResponse = admin_call(
            &server,
            &admin,
            "CreateAccessRule",
            &pb::CreateAccessRuleRequest {
                role: "guest".into(),
                operation: "ws:send".into(),
                effect: "allow".into(),
                priority: 20,
                description: String::new(),
            },
        )
        .await;
        guest_ws
            .send_message(&room, "hi", "g5")
            .await
            .expect("allowed again over the socket");
        assert_eq!(
            try_send_rpc(&server, &guest, &room, "g6").await,
            Err("permission_denied".into())
        );
        let listed: pb::ListAccessRulesResponse = admin_call(
            &server,
            &admin,
            "ListAccessRules",
            &pb::ListAccessRulesRequest {},
        )
        .await;
        let order: Vec<i64> = listed.rules.iter().map(|r| r.priority).collect();
        assert_eq!(order, vec![20, 10]);

        let updated: pb::UpdateAccessRuleResponse = admin_call(
            &server,
            &admin,
            "UpdateAccessRule",
            &pb::UpdateAccessRuleRequest {
                id: rule.id.clone(),
                role: "guest".into(),
                operation: "roomcast.v1.RoomService/SendMessage".into(),
                effect: "allow".into(),
                priority: 10,
                description: "guests may talk again".into(),
            },
        )
        .await;
        assert_eq!(updated.rule.expect("rule").effect, "allow");
        try_send_rpc(&server, &guest, &room, "g7")
            .await
            .expect("allowed after the update");

        for id in [rule.id.clone(), allow.rule.expect("rule").id] {
            let _: pb::DeleteAccessRuleResponse = admin_call(
                &server,
                &admin,
                "DeleteAccessRule",
                &pb::DeleteAccessRuleRequest { id },
            )
            .await;
        }
        let gone = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::DeleteAccessRuleResponse>(
                "AdminService/DeleteAccessRule",
                &pb::DeleteAccessRuleRequest { id: rule.id },
            )
            .await;
        expect_error(gone, "not_found", 404);

        // Rules cannot name the admin API.
        let sneaky = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::CreateAccessRuleResponse>(
                "AdminService/CreateAccessRule",
                &pb::CreateAccessRuleRequest {
                    role: "member".into(),
                    operation: "roomcast.v1.AdminService/GetConfig".into(),
                    effect: "allow".into(),
                    priority: 1,
                    description: String::new(),
                },
            )
            .await;
        expect_error(sneaky, "invalid_argument", 400);

        let log: pb::ListAuditLogResponse = admin_call(
            &server,
            &admin,
            "ListAuditLog",
            &pb::ListAuditLogRequest {
                action: "create_access_rule".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(log.entries.len(), 2, "{log:?}");
    }
);

both_backends!(
    moderation_actions_are_audited_and_paged,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let owner = server.sign_up("mona").await;
        let target = server.sign_up("tom").await;
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        join(&server, &target, &room).await;
        let seq = send_http(&server, &target, &room, "spam", "t1")
            .await
            .message
            .expect("the stored message")
            .seq;
        let owner_rpc = server.rpc_as(&owner.access_token);
        let user_id = target.user_id.clone();
        let _: pb::MuteMemberResponse = owner_rpc
            .call_proto(
                "RoomService/MuteMember",
                &pb::MuteMemberRequest {
                    room_id: room.clone(),
                    user_id: user_id.clone(),
                    duration_seconds: 60,
                },
            )
            .await
            .expect("mute");
        let _: pb::UnmuteMemberResponse = owner_rpc
            .call_proto(
                "RoomService/UnmuteMember",
                &pb::UnmuteMemberRequest {
                    room_id: room.clone(),
                    user_id: user_id.clone(),
                },
            )
            .await
            .expect("unmute");
        let _: pb::SetMemberRoleResponse = owner_rpc
            .call_proto(
                "RoomService/SetMemberRole",
                &pb::SetMemberRoleRequest {
                    room_id: room.clone(),
                    user_id: user_id.clone(),
                    role: pb::MemberRole::Moderator as i32,
                },
            )
            .await
            .expect("promote");
        let _: pb::SetMemberRoleResponse = owner_rpc
            .call_proto(
                "RoomService/SetMemberRole",
                &pb::SetMemberRoleRequest {
                    room_id: room.clone(),
                    user_id: user_id.clone(),
                    role: pb::MemberRole::Member as i32,
                },
            )
            .await
            .expect("demote");
        let _: pb::DeleteMessageResponse = owner_rpc
            .call_proto(
                "RoomService/DeleteMessage",
                &pb::DeleteMessageRequest {
                    room_id: room.clone(),
                    seq,
                },
            )
            .await
            .expect("moderator delete");
        let _: pb::KickMemberResponse = owner_rpc
            .call_proto(
                "RoomService/KickMember",
                &pb::KickMemberRequest {
                    room_id: room.clone(),
                    user_id: user_id.clone(),
                    reason: "be nice".into(),
                },
            )
            .await
            .expect("kick");
        let _: pb::BanMemberResponse = owner_rpc
            .call_proto(
                "RoomService/BanMember",
                &pb::BanMemberRequest {
                    room_id: room.clone(),
                    user_id: user_id.clone(),
                    reason: "again".into(),
                    duration_seconds: 0,
                },
            )
            .await
            .expect("ban");
        let _: pb::UnbanMemberResponse = owner_rpc
            .call_proto(
                "RoomService/UnbanMember",
                &pb::UnbanMemberRequest {
                    room_id: room.clone(),
                    user_id: user_id.clone(),
                },
            )
            .await
            .expect("unban");

        // Pages of 3, newest first, until the end.
        let mut entries = Vec::new();
        let mut token = String::new();
        for _ in 0..10 {
            let page: pb::ListAuditLogResponse = admin_call(
                &server,
                &admin,
                "ListAuditLog",
                &pb::ListAuditLogRequest {
                    page_size: 3,
                    page_token: token.clone(),
                    action: String::new(),
                },
            )
            .await;
            assert!(page.entries.len() <= 3);
            entries.extend(page.entries);
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            vec![
                "unban",
                "ban",
                "kick",
                "delete_message",
                "set_member_role",
                "set_member_role",
                "unmute",
                "mute"
            ]
        );
        for e in &entries {
            assert_eq!(e.actor_id, owner.user_id, "{e:?}");
            assert_eq!(e.room_id, room, "{e:?}");
            assert!(e.at.is_some());
        }
        assert_eq!(entries[2].detail, "be nice");
        assert_eq!(entries[4].detail, "moderator -> member");
        assert_eq!(entries[3].target, format!("seq {seq}"));
        let bad = server
            .rpc_as(&admin.access_token)
            .call_proto::<_, pb::ListAuditLogResponse>(
                "AdminService/ListAuditLog",
                &pb::ListAuditLogRequest {
                    page_token: "bm9wZQ".into(),
                    ..Default::default()
                },
            )
            .await;
        expect_error(bad, "invalid_argument", 400);
    }
);

/// The shared secret of the external application in these tests.
const EXTERNAL_SECRET: &str = "my-app-shared-secret-of-at-least-32-bytes";

both_backends!(
    suspended_external_users_are_refused_at_once,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |s| {
            let ext = &mut s.auth.external;
            ext.enabled = true;
            ext.algorithm = "HS256".into();
            ext.secret = EXTERNAL_SECRET.into();
        })
        .await;
        let token = common::sign_roomcast_token(
            EXTERNAL_SECRET,
            &json!({"sub": "viewer-1", "name": "Viewer", "exp": common::now_secs() + 600}),
        );
        let get_me = || async {
            server
                .rpc_as(&token)
                .call_proto::<_, pb::GetMeResponse>("UserService/GetMe", &pb::GetMeRequest {})
                .await
        };
        // Twice: the second is answered from the authenticator's cache.
        let me = get_me()
            .await
            .expect("an external token")
            .user
            .expect("user");
        get_me().await.expect("an external token, cached");
        let mut ws = WsClient::connect_authenticated(&ws_url(&server), WsCodec::Json, &token).await;

        let _: pb::SuspendUserResponse = admin_call(
            &server,
            &admin,
            "SuspendUser",
            &pb::SuspendUserRequest {
                user_id: me.id.clone(),
                reason: String::new(),
            },
        )
        .await;
        assert_eq!(closed_with(&mut ws).await, 4501);
        let message = expect_error(get_me().await, "unauthenticated", 401);
        assert!(message.contains("suspended"), "{message}");

        let _: pb::ReinstateUserResponse = admin_call(
            &server,
            &admin,
            "ReinstateUser",
            &pb::ReinstateUserRequest { user_id: me.id },
        )
        .await;
        get_me().await.expect("reinstated: the token works again");
    }
);

both_backends!(
    rules_written_by_another_node_apply_after_the_refresh_interval,
    |backend: Backend| async move {
        let server =
            TestServer::spawn_with(backend, |s| s.auth.access_rules_refresh_ms = 100).await;
        let owner = server.sign_up("nina").await;
        let room = create_room(&server, &owner, pb::RoomKind::Public).await;
        try_send_rpc(&server, &owner, &room, "n1")
            .await
            .expect("members send");
        // Another node sharing the store adds a rule: this node has no word of it
        // but re-reads the rules every 100 ms.
        server
            .state()
            .store
            .create_access_rule(
                &roomcast::store::AccessRuleFields {
                    role: "member".into(),
                    operation: "*".into(),
                    effect: "deny".into(),
                    priority: 1,
                    description: String::new(),
                },
                &UserId("u_elsewhere".into()),
            )
            .await
            .expect("write a rule");
        let mut n = 0;
        let applied = common::eventually(Duration::from_secs(10), || {
            n += 1;
            let id = format!("n-{n}");
            let (server, owner, room) = (&server, &owner, &room);
            async move {
                try_send_rpc(server, owner, room, &id).await == Err("permission_denied".into())
            }
        })
        .await;
        assert!(applied, "the rule never applied");
    }
);
