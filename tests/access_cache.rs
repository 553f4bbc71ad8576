//! The access facts the server keeps in memory (room, membership, ban, role, mute,
//! session) never outlive a change: right after a kick, ban, mute, role change,
//! leave, room delete, sign-out or suspension returns, the affected user's very
//! next send, subscription or request is refused, over WebSocket and over HTTP;
//! and right after a join, unban or unmute it is allowed again. Each user first
//! sends successfully, so the facts are cached when the change happens.

mod common;

use common::{
    admin_call,
    rooms::{create_room, join},
    unique_name,
    ws::{WsClient, WsCodec},
    Account, RpcError, TestServer,
};
use roomcast::proto::v1 as pb;

use pb::{MemberRole as Role, RoomKind as Kind};

/// Sends over HTTP as `account`.
async fn send_http(
    server: &TestServer,
    account: &Account,
    room: &str,
    text: &str,
) -> Result<pb::SendMessageResponse, RpcError> {
    server
        .rpc_as(&account.access_token)
        .call_proto(
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.into(),
                text: text.into(),
                ..Default::default()
            },
        )
        .await
}

/// Calls a RoomService moderation RPC as `owner`; panics on an error.
async fn moderate<Req: prost::Message, Resp: prost::Message + Default>(
    server: &TestServer,
    owner: &Account,
    method: &str,
    req: Req,
) -> Resp {
    server
        .rpc_as(&owner.access_token)
        .call_proto(&format!("RoomService/{method}"), &req)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e:?}"))
}

/// Bans `user` from `room` as `owner` (its owner or a moderator).
async fn ban(server: &TestServer, owner: &Account, room: &str, user: &str) {
    let _: pb::BanMemberResponse = moderate(
        server,
        owner,
        "BanMember",
        pb::BanMemberRequest {
            room_id: room.into(),
            user_id: user.into(),
            ..Default::default()
        },
    )
    .await;
}

/// Sends over the WebSocket; answers the error message, or `None` when stored.
async fn ws_send(ws: &mut WsClient, room: &str, text: &str) -> Option<String> {
    ws.send_message(room, text, "")
        .await
        .err()
        .map(|e| e.message)
}

#[track_caller]
fn refused(result: Option<String>, needle: &str) {
    let message = result.unwrap_or_else(|| panic!("the send should be refused ({needle})"));
    assert!(
        message.contains(needle),
        "`{message}` should mention `{needle}`"
    );
}

both_backends!(
    membership_changes_apply_to_the_very_next_send,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let owner = server.sign_up(&unique_name("owner")).await;
        let member = server.sign_up(&unique_name("member")).await;
        let room = create_room(&server, &owner, Kind::Public).await;
        join(&server, &member, &room).await;
        let mut ws = WsClient::connect_authenticated(
            &server.ws_url("/ws"),
            WsCodec::Proto,
            &member.access_token,
        )
        .await;
        assert_eq!(ws_send(&mut ws, &room, "hello").await, None);
        send_http(&server, &member, &room, "hello again")
            .await
            .expect("a member sends");

        // Kick: the next send is refused on both paths, and so is a subscription.
        let _: pb::KickMemberResponse = moderate(
            &server,
            &owner,
            "KickMember",
            pb::KickMemberRequest {
                room_id: room.clone(),
                user_id: member.user_id.clone(),
                reason: String::new(),
            },
        )
        .await;
        refused(ws_send(&mut ws, &room, "after kick").await, "not a member");
        let error = send_http(&server, &member, &room, "after kick")
            .await
            .expect_err("a kicked member may not send");
        assert_eq!(error.code, "permission_denied");

        // Joining again lets the very next send through.
        join(&server, &member, &room).await;
        assert_eq!(ws_send(&mut ws, &room, "back").await, None);

        // Mute, then unmute.
        let _: pb::MuteMemberResponse = moderate(
            &server,
            &owner,
            "MuteMember",
            pb::MuteMemberRequest {
                room_id: room.clone(),
                user_id: member.user_id.clone(),
                duration_seconds: 0,
            },
        )
        .await;
        refused(ws_send(&mut ws, &room, "muted").await, "muted");
        let _: pb::UnmuteMemberResponse = moderate(
            &server,
            &owner,
            "UnmuteMember",
            pb::UnmuteMemberRequest {
                room_id: room.clone(),
                user_id: member.user_id.clone(),
            },
        )
        .await;
        assert_eq!(ws_send(&mut ws, &room, "unmuted").await, None);

        // Ban: the next send and a subscription are refused, naming the ban.
        ban(&server, &owner, &room, &member.user_id).await;
        refused(ws_send(&mut ws, &room, "banned").await, "banned");
        let error = ws
            .subscribe(&room, None)
            .await
            .expect_err("a banned user may not subscribe");
        assert!(error.message.contains("banned"), "{}", error.message);
        let error = send_http(&server, &member, &room, "banned")
            .await
            .expect_err("a banned user may not send");
        assert!(error.message.contains("banned"), "{}", error.message);

        // Unban: subscribing (a public room) is allowed again at once; sending
        // after joining.
        let _: pb::UnbanMemberResponse = moderate(
            &server,
            &owner,
            "UnbanMember",
            pb::UnbanMemberRequest {
                room_id: room.clone(),
                user_id: member.user_id.clone(),
            },
        )
        .await;
        ws.subscribe(&room, None)
            .await
            .expect("an unbanned user may watch a public room");
        refused(ws_send(&mut ws, &room, "not yet").await, "not a member");
        join(&server, &member, &room).await;
        assert_eq!(ws_send(&mut ws, &room, "unbanned").await, None);

        // Leaving applies at once too.
        let _: pb::LeaveRoomResponse = moderate(
            &server,
            &member,
            "LeaveRoom",
            pb::LeaveRoomRequest {
                room_id: room.clone(),
            },
        )
        .await;
        refused(ws_send(&mut ws, &room, "left").await, "not a member");
        ws.close().await;
    }
);

both_backends!(
    role_changes_and_room_deletes_apply_at_once,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let owner = server.sign_up(&unique_name("owner")).await;
        let host = server.sign_up(&unique_name("host")).await;
        let room = create_room(&server, &owner, Kind::Broadcast).await;
        join(&server, &host, &room).await;
        let set_role = |role: Role| pb::SetMemberRoleRequest {
            room_id: room.clone(),
            user_id: host.user_id.clone(),
            role: role as i32,
        };
        let _: pb::SetMemberRoleResponse =
            moderate(&server, &owner, "SetMemberRole", set_role(Role::Moderator)).await;
        send_http(&server, &host, &room, "on air")
            .await
            .expect("a host speaks in a broadcast room");
        let _: pb::SetMemberRoleResponse =
            moderate(&server, &owner, "SetMemberRole", set_role(Role::Member)).await;
        let error = send_http(&server, &host, &room, "off air")
            .await
            .expect_err("a demoted host may not speak");
        assert!(error.message.contains("only hosts"), "{}", error.message);

        // An admin deletes the room: it is gone for the next send.
        let _: pb::SetMemberRoleResponse =
            moderate(&server, &owner, "SetMemberRole", set_role(Role::Moderator)).await;
        send_http(&server, &host, &room, "on air again")
            .await
            .expect("promoted again");
        let _: pb::DeleteRoomResponse = admin_call(
            &server,
            &admin,
            "DeleteRoom",
            &pb::DeleteRoomRequest {
                room_id: room.clone(),
                reason: "closing".into(),
            },
        )
        .await;
        let error = send_http(&server, &host, &room, "after delete")
            .await
            .expect_err("the room is gone");
        assert_eq!(error.code, "not_found");
    }
);

both_backends!(
    sign_out_and_suspension_apply_to_the_very_next_request,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let owner = server.sign_up(&unique_name("owner")).await;
        let room = create_room(&server, &owner, Kind::Public).await;
        for suspend in [false, true] {
            let user = server.sign_up(&unique_name("user")).await;
            join(&server, &user, &room).await;
            send_http(&server, &user, &room, "hello")
                .await
                .expect("a signed-in member sends");
            if suspend {
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
            } else {
                let _: pb::SignOutResponse = server
                    .rpc_as(&user.access_token)
                    .call_proto("AuthService/SignOut", &pb::SignOutRequest::default())
                    .await
                    .expect("sign out");
            }
            let error = send_http(&server, &user, &room, "after")
                .await
                .expect_err("the token no longer works");
            assert_eq!(error.code, "unauthenticated");
            let needle = if suspend { "suspended" } else { "signed out" };
            assert!(error.message.contains(needle), "{}", error.message);
        }
    }
);

both_backends!(
    users_subscribing_at_once_each_get_their_own_membership_and_ban,
    |backend| async move {
        // Lookups of one room's memberships that arrive together are read from
        // the store together (src/store/member_lookups.rs); each user must still
        // get exactly their own facts: members and strangers may watch the
        // public room, banned users are refused naming the ban, and only members
        // may send.
        const EACH: usize = 8;
        let server = TestServer::spawn(backend).await;
        let owner = server.sign_up(&unique_name("owner")).await;
        let room = create_room(&server, &owner, Kind::Public).await;
        let mut users = Vec::new();
        for n in 0..3 * EACH {
            let account = server.sign_up(&unique_name("crowd")).await;
            let kind = n % 3;
            if kind != 2 {
                join(&server, &account, &room).await;
            }
            if kind == 1 {
                ban(&server, &owner, &room, &account.user_id).await;
            }
            users.push((kind, account));
        }
        let url = server.ws_url("/ws");
        let outcomes = futures_util::future::join_all(users.iter().map(|(kind, account)| {
            let (url, room) = (url.clone(), room.clone());
            async move {
                let mut ws =
                    WsClient::connect_authenticated(&url, WsCodec::Proto, &account.access_token)
                        .await;
                let subscribed = ws.subscribe(&room, None).await;
                let sent = ws_send(&mut ws, &room, "hello").await;
                ws.close().await;
                (*kind, subscribed, sent)
            }
        }))
        .await;
        for (kind, subscribed, sent) in outcomes {
            match kind {
                0 => {
                    subscribed.expect("a member may watch");
                    assert_eq!(sent, None, "a member may send");
                }
                1 => {
                    let error = subscribed.expect_err("a banned user may not watch");
                    assert!(error.message.contains("banned"), "{}", error.message);
                    refused(sent, "banned");
                }
                _ => {
                    subscribed.expect("a stranger may watch a public room");
                    refused(sent, "not a member");
                }
            }
        }
    }
);
