//! RoomService's rooms, membership and moderation RPCs over real HTTP, as clients
//! see them: every kind of room, who may see, join, leave, invite, list and
//! moderate, pagination, and the Connect code and HTTP status of every refusal.
//! Each test runs against SQLite and PostgreSQL; the users of one test alternate
//! between the JSON and the binary codec.

mod common;

use std::time::Duration;

use common::{expect_error, unique_name, Codec, Rpc, RpcError, TestServer};
use roomcast::proto::v1 as pb;
use serde::{de::DeserializeOwned, Serialize};

use pb::{MemberRole as Role, RoomKind as Kind};

/// The seconds of the largest protobuf timestamp (9999-12-31T23:59:59Z): how a
/// mute without expiry shows.
const FOREVER_SECS: i64 = 253_402_300_799;

/// A signed-up user calling RoomService in one codec.
#[derive(Clone)]
struct Client {
    rpc: Rpc,
    id: String,
    codec: Codec,
}

/// Signs up a fresh user named after `name`.
async fn user(server: &TestServer, name: &str, codec: Codec) -> Client {
    let account = server.sign_up(&unique_name(name)).await;
    Client {
        rpc: server.rpc_as(&account.access_token),
        id: account.user_id,
        codec,
    }
}

impl Client {
    async fn call<Req, Resp>(&self, method: &str, req: Req) -> Result<Resp, RpcError>
    where
        Req: prost::Message + Serialize,
        Resp: prost::Message + Default + DeserializeOwned,
    {
        self.rpc
            .call(self.codec, &format!("RoomService/{method}"), &req)
            .await
    }

    async fn create(
        &self,
        kind: Kind,
        title: &str,
        members: &[&str],
    ) -> Result<pb::Room, RpcError> {
        let resp: pb::CreateRoomResponse = self
            .call(
                "CreateRoom",
                pb::CreateRoomRequest {
                    kind: kind as i32,
                    title: title.into(),
                    member_ids: members.iter().map(|m| m.to_string()).collect(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(resp.room.expect("CreateRoom answers a room"))
    }

    /// Creates a room that must be created.
    async fn room(&self, kind: Kind, title: &str, members: &[&str]) -> pb::Room {
        self.create(kind, title, members)
            .await
            .unwrap_or_else(|e| panic!("create {kind:?} room `{title}`: {e}"))
    }

    async fn get(&self, room: &str) -> Result<pb::Room, RpcError> {
        let resp: pb::GetRoomResponse = self
            .call(
                "GetRoom",
                pb::GetRoomRequest {
                    room_id: room.into(),
                },
            )
            .await?;
        Ok(resp.room.expect("GetRoom answers a room"))
    }

    async fn join(&self, room: &str) -> Result<pb::Room, RpcError> {
        let resp: pb::JoinRoomResponse = self
            .call(
                "JoinRoom",
                pb::JoinRoomRequest {
                    room_id: room.into(),
                },
            )
            .await?;
        Ok(resp.room.expect("JoinRoom answers a room"))
    }

    async fn leave(&self, room: &str) -> Result<pb::LeaveRoomResponse, RpcError> {
        self.call(
            "LeaveRoom",
            pb::LeaveRoomRequest {
                room_id: room.into(),
            },
        )
        .await
    }

    async fn invite(&self, room: &str, user: &str) -> Result<pb::InviteMemberResponse, RpcError> {
        self.call(
            "InviteMember",
            pb::InviteMemberRequest {
                room_id: room.into(),
                user_id: user.into(),
            },
        )
        .await
    }

    async fn list_rooms(
        &self,
        filter: pb::RoomFilter,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListRoomsResponse, RpcError> {
        self.call(
            "ListRooms",
            pb::ListRoomsRequest {
                filter: filter as i32,
                page_size,
                page_token: page_token.into(),
            },
        )
        .await
    }

    /// Every page of ListRooms, checking that only the last page has no token.
    async fn all_rooms(&self, filter: pb::RoomFilter, page_size: u32) -> Vec<pb::Room> {
        let mut rooms = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .list_rooms(filter, page_size, &token)
                .await
                .expect("ListRooms");
            assert!(page.rooms.len() <= page_size as usize);
            rooms.extend(page.rooms);
            if page.next_page_token.is_empty() {
                return rooms;
            }
            token = page.next_page_token;
        }
    }

    async fn list_members(
        &self,
        room: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListMembersResponse, RpcError> {
        self.call(
            "ListMembers",
            pb::ListMembersRequest {
                room_id: room.into(),
                page_size,
                page_token: page_token.into(),
            },
        )
        .await
    }

    /// Every member, one page.
    async fn members(&self, room: &str) -> Vec<pb::Member> {
        let page = self.list_members(room, 0, "").await.expect("ListMembers");
        assert!(page.next_page_token.is_empty());
        page.members
    }

    async fn member(&self, room: &str, user: &str) -> Option<pb::Member> {
        self.members(room)
            .await
            .into_iter()
            .find(|m| m.user_id == user)
    }

    async fn update(&self, req: pb::UpdateRoomRequest) -> Result<pb::Room, RpcError> {
        let resp: pb::UpdateRoomResponse = self.call("UpdateRoom", req).await?;
        Ok(resp.room.expect("UpdateRoom answers a room"))
    }

    async fn kick(
        &self,
        room: &str,
        user: &str,
        reason: &str,
    ) -> Result<pb::KickMemberResponse, RpcError> {
        self.call(
            "KickMember",
            pb::KickMemberRequest {
                room_id: room.into(),
                user_id: user.into(),
                reason: reason.into(),
            },
        )
        .await
    }

    async fn ban(
        &self,
        room: &str,
        user: &str,
        seconds: u64,
    ) -> Result<pb::BanMemberResponse, RpcError> {
        self.call(
            "BanMember",
            pb::BanMemberRequest {
                room_id: room.into(),
                user_id: user.into(),
                reason: "spam".into(),
                duration_seconds: seconds,
            },
        )
        .await
    }

    async fn unban(&self, room: &str, user: &str) -> Result<pb::UnbanMemberResponse, RpcError> {
        self.call(
            "UnbanMember",
            pb::UnbanMemberRequest {
                room_id: room.into(),
                user_id: user.into(),
            },
        )
        .await
    }

    async fn mute(
        &self,
        room: &str,
        user: &str,
        seconds: u64,
    ) -> Result<pb::MuteMemberResponse, RpcError> {
        self.call(
            "MuteMember",
            pb::MuteMemberRequest {
                room_id: room.into(),
                user_id: user.into(),
                duration_seconds: seconds,
            },
        )
        .await
    }

    async fn unmute(&self, room: &str, user: &str) -> Result<pb::UnmuteMemberResponse, RpcError> {
        self.call(
            "UnmuteMember",
            pb::UnmuteMemberRequest {
                room_id: room.into(),
                user_id: user.into(),
            },
        )
        .await
    }

    async fn set_role(
        &self,
        room: &str,
        user: &str,
        role: Role,
    ) -> Result<pb::SetMemberRoleResponse, RpcError> {
        self.call(
            "SetMemberRole",
            pb::SetMemberRoleRequest {
                room_id: room.into(),
                user_id: user.into(),
                role: role as i32,
            },
        )
        .await
    }

    async fn send(&self, room: &str, text: &str) -> Result<pb::SendMessageResponse, RpcError> {
        self.call(
            "SendMessage",
            pb::SendMessageRequest {
                room_id: room.into(),
                text: text.into(),
                ..Default::default()
            },
        )
        .await
    }
}

/// Asserts a Connect error's code, HTTP status and that its message mentions `needle`.
#[track_caller]
fn expect_refusal<T: std::fmt::Debug>(
    result: Result<T, RpcError>,
    code: &str,
    status: u16,
    needle: &str,
) {
    let message = expect_error(result, code, status);
    assert!(
        message.contains(needle),
        "message `{message}` should mention `{needle}`"
    );
}

fn role_of(room: &pb::Room) -> Role {
    Role::try_from(room.my_role).unwrap_or(Role::Unspecified)
}

both_backends!(creates_every_kind_of_room, |backend| async move {
    let server = TestServer::spawn(backend).await;
    for codec in Codec::ALL {
        let owner = user(&server, "owner", codec).await;
        let friend = user(&server, "friend", codec).await;
        let req = pb::CreateRoomRequest {
            kind: Kind::Public as i32,
            title: "  Lobby  ".into(),
            topic: " General chat\nwelcome ".into(),
            retention_seconds: 86_400,
            member_ids: vec![friend.id.clone()],
            live: None,
        };
        let resp: pb::CreateRoomResponse =
            owner.call("CreateRoom", req).await.expect("public room");
        let public = resp.room.expect("room");
        assert_eq!(public.kind, Kind::Public as i32);
        assert_eq!(public.title, "Lobby");
        assert_eq!(public.topic, "General chat\nwelcome");
        assert_eq!(public.retention_seconds, 86_400);
        assert_eq!(public.created_by, owner.id);
        assert!(public.created_at.is_some());
        assert_eq!(
            (public.last_seq, public.member_count),
            (0, 1),
            "member_ids are ignored for public rooms"
        );
        assert_eq!(role_of(&public), Role::Owner);

        let private = owner.room(Kind::Private, "Team", &[&friend.id]).await;
        assert_eq!(
            (private.kind, private.member_count),
            (Kind::Private as i32, 1)
        );
        // The friend is invited, not a member: they see the room but must join.
        let seen = friend
            .get(&private.id)
            .await
            .expect("an invitee may see the room");
        assert_eq!(
            (seen.title.as_str(), role_of(&seen)),
            ("Team", Role::Unspecified)
        );

        let direct = owner.room(Kind::Direct, "", &[&friend.id]).await;
        assert_eq!(
            (direct.kind, direct.member_count, direct.title.as_str()),
            (Kind::Direct as i32, 2, "")
        );
        assert_eq!(
            role_of(&friend.get(&direct.id).await.expect("direct")),
            Role::Member
        );

        let broadcast = owner.room(Kind::Broadcast, "News", &[&friend.id]).await;
        assert_eq!(
            (broadcast.kind, broadcast.member_count),
            (Kind::Broadcast as i32, 1)
        );
        assert_eq!(role_of(&broadcast), Role::Owner);
    }
});

both_backends!(create_room_rejects_bad_input, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let a = user(&server, "alice", Codec::Json).await;
    let b = user(&server, "bob", Codec::Proto).await;
    expect_refusal(
        a.create(Kind::Unspecified, "x", &[]).await,
        "invalid_argument",
        400,
        "kind",
    );
    expect_refusal(
        b.create(Kind::Unspecified, "x", &[]).await,
        "invalid_argument",
        400,
        "kind",
    );
    expect_refusal(
        a.create(Kind::Public, "   ", &[]).await,
        "invalid_argument",
        400,
        "title is required",
    );
    expect_refusal(
        a.create(Kind::Public, &"x".repeat(101), &[]).await,
        "invalid_argument",
        400,
        "title must be at most 100",
    );
    expect_refusal(
        a.create(Kind::Public, "two\nlines", &[]).await,
        "invalid_argument",
        400,
        "title",
    );
    let long_topic: Result<pb::CreateRoomResponse, _> = a
        .call(
            "CreateRoom",
            pb::CreateRoomRequest {
                kind: Kind::Public as i32,
                title: "t".into(),
                topic: "x".repeat(1001),
                ..Default::default()
            },
        )
        .await;
    expect_refusal(
        long_topic,
        "invalid_argument",
        400,
        "topic must be at most 1000",
    );
    // Private rooms: every invitee must exist, and the reply names the missing one.
    expect_refusal(
        a.create(Kind::Private, "p", &[&b.id, "u_nobody"]).await,
        "not_found",
        404,
        "u_nobody",
    );
    expect_refusal(
        a.create(Kind::Private, "p", &[&b.id, "not an id"]).await,
        "invalid_argument",
        400,
        "member_ids[1]",
    );
    // Direct rooms: exactly one other existing user.
    expect_refusal(
        a.create(Kind::Direct, "", &[]).await,
        "invalid_argument",
        400,
        "exactly one",
    );
    expect_refusal(
        a.create(Kind::Direct, "", &[&b.id, "u_other"]).await,
        "invalid_argument",
        400,
        "exactly one",
    );
    expect_refusal(
        a.create(Kind::Direct, "", &[&a.id]).await,
        "invalid_argument",
        400,
        "member_ids[0]",
    );
    expect_refusal(
        a.create(Kind::Direct, "", &["u_nobody"]).await,
        "not_found",
        404,
        "u_nobody",
    );
    // No credentials at all.
    let anonymous: Result<pb::CreateRoomResponse, _> = server
        .rpc()
        .call(
            Codec::Json,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: Kind::Public as i32,
                title: "x".into(),
                ..Default::default()
            },
        )
        .await;
    expect_error(anonymous, "unauthenticated", 401);
    // Nothing was created by the refused calls.
    assert!(a.all_rooms(pb::RoomFilter::Mine, 100).await.is_empty());
});

both_backends!(direct_rooms_are_one_per_pair, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let a = user(&server, "alice", Codec::Json).await;
    let b = user(&server, "bob", Codec::Proto).await;
    let c = user(&server, "carol", Codec::Json).await;
    let first = a.room(Kind::Direct, "", &[&b.id]).await;
    let again = a.room(Kind::Direct, "ignored", &[&b.id]).await;
    let reverse = b.room(Kind::Direct, "", &[&a.id]).await;
    assert_eq!(
        (again.id.as_str(), reverse.id.as_str()),
        (first.id.as_str(), first.id.as_str())
    );
    assert_eq!(
        (role_of(&first), role_of(&reverse)),
        (Role::Owner, Role::Member)
    );
    assert_eq!(reverse.member_count, 2);

    // Nobody else sees it, joins it or is invited to it.
    expect_refusal(c.get(&first.id).await, "not_found", 404, "not found");
    expect_refusal(c.join(&first.id).await, "not_found", 404, "not found");
    expect_refusal(
        a.invite(&first.id, &c.id).await,
        "failed_precondition",
        400,
        "direct",
    );
    expect_refusal(
        a.kick(&first.id, &b.id, "").await,
        "failed_precondition",
        400,
        "direct",
    );
    expect_refusal(
        a.set_role(&first.id, &b.id, Role::Owner).await,
        "failed_precondition",
        400,
        "direct",
    );
    let c_direct = c.room(Kind::Direct, "", &[&a.id]).await;
    assert_ne!(c_direct.id, first.id);

    // Either side may leave; asking for the pair's room again brings them back.
    b.leave(&first.id).await.expect("the other user leaves");
    expect_refusal(b.get(&first.id).await, "not_found", 404, "not found");
    a.leave(&first.id)
        .await
        .expect("the owner of a direct room may leave too");
    let back = b.room(Kind::Direct, "", &[&a.id]).await;
    assert_eq!(
        (back.id.as_str(), back.member_count),
        (first.id.as_str(), 1)
    );
    assert_eq!(role_of(&back), Role::Member);
    let owner_back = a.room(Kind::Direct, "", &[&b.id]).await;
    assert_eq!(
        (role_of(&owner_back), owner_back.member_count),
        (Role::Owner, 2)
    );
});

both_backends!(private_rooms_need_an_invitation, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let owner = user(&server, "owner", Codec::Json).await;
    let member = user(&server, "member", Codec::Proto).await;
    let outsider = user(&server, "outsider", Codec::Json).await;
    let room = owner.room(Kind::Private, "Secret", &[&member.id]).await;
    member.join(&room.id).await.expect("invited at creation");

    // To outsiders the room does not exist.
    expect_refusal(outsider.get(&room.id).await, "not_found", 404, &room.id);
    expect_refusal(outsider.join(&room.id).await, "not_found", 404, &room.id);
    expect_refusal(
        outsider.list_members(&room.id, 0, "").await,
        "not_found",
        404,
        &room.id,
    );
    expect_refusal(
        outsider.invite(&room.id, &outsider.id).await,
        "not_found",
        404,
        &room.id,
    );
    expect_refusal(outsider.leave(&room.id).await, "not_found", 404, &room.id);
    let public = outsider.all_rooms(pb::RoomFilter::Public, 100).await;
    assert!(
        public.iter().all(|r| r.id != room.id),
        "private rooms are not listed"
    );
    expect_refusal(
        owner.get("r_doesnotexist").await,
        "not_found",
        404,
        "r_doesnotexist",
    );
    expect_refusal(
        owner.get("").await,
        "invalid_argument",
        400,
        "room_id is required",
    );

    // Only owners and moderators invite to a private room.
    expect_refusal(
        member.invite(&room.id, &outsider.id).await,
        "permission_denied",
        403,
        "owners and moderators",
    );
    expect_refusal(
        owner.invite(&room.id, "u_nobody").await,
        "not_found",
        404,
        "u_nobody",
    );
    expect_refusal(
        owner.invite(&room.id, &member.id).await,
        "already_exists",
        409,
        "already a member",
    );
    expect_refusal(
        owner.invite(&room.id, "").await,
        "invalid_argument",
        400,
        "user_id is required",
    );
    owner.invite(&room.id, &outsider.id).await.expect("invite");
    owner
        .invite(&room.id, &outsider.id)
        .await
        .expect("inviting twice is harmless");

    // The invitee sees the room, but reads nothing before joining.
    let seen = outsider
        .get(&room.id)
        .await
        .expect("the invitee sees the room");
    assert_eq!(
        (seen.title.as_str(), role_of(&seen)),
        ("Secret", Role::Unspecified)
    );
    expect_refusal(
        outsider.list_members(&room.id, 0, "").await,
        "permission_denied",
        403,
        "not a member",
    );
    let joined = outsider
        .join(&room.id)
        .await
        .expect("join with the invitation");
    assert_eq!((role_of(&joined), joined.member_count), (Role::Member, 3));
    let again = outsider
        .join(&room.id)
        .await
        .expect("joining twice is not an error");
    assert_eq!(
        (again.id.as_str(), again.member_count),
        (room.id.as_str(), 3)
    );

    // Leaving consumes membership, and the invitation was used up by joining.
    outsider.leave(&room.id).await.expect("leave");
    expect_refusal(outsider.join(&room.id).await, "not_found", 404, &room.id);
});

both_backends!(
    join_and_leave_public_and_broadcast_rooms,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let owner = user(&server, "owner", Codec::Proto).await;
        let b = user(&server, "bob", Codec::Json).await;
        let c = user(&server, "carol", Codec::Proto).await;
        let room = owner.room(Kind::Public, "Lobby", &[]).await;

        // Anyone may read a public room; joining makes a member.
        let peek = b.get(&room.id).await.expect("read without joining");
        assert_eq!((role_of(&peek), peek.member_count), (Role::Unspecified, 1));
        let joined = b.join(&room.id).await.expect("join");
        assert_eq!((role_of(&joined), joined.member_count), (Role::Member, 2));
        assert_eq!(b.join(&room.id).await.expect("idempotent").member_count, 2);
        c.join(&room.id).await.expect("join");
        let mine = b.all_rooms(pb::RoomFilter::Mine, 10).await;
        assert_eq!(
            mine.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            [room.id.as_str()]
        );

        // Leaving: the member goes; leaving again is refused.
        b.leave(&room.id).await.expect("leave");
        let after = b.get(&room.id).await.expect("still readable");
        assert_eq!(
            (role_of(&after), after.member_count),
            (Role::Unspecified, 2)
        );
        expect_refusal(
            b.leave(&room.id).await,
            "permission_denied",
            403,
            "not a member",
        );
        assert!(b.all_rooms(pb::RoomFilter::Mine, 10).await.is_empty());

        // The last owner cannot leave while others remain.
        expect_refusal(
            owner.leave(&room.id).await,
            "failed_precondition",
            400,
            "last owner",
        );
        owner
            .set_role(&room.id, &c.id, Role::Owner)
            .await
            .expect("make a co-owner");
        owner.leave(&room.id).await.expect("another owner remains");
        // An owner alone in the room may leave it.
        c.leave(&room.id).await.expect("the only member leaves");
        assert_eq!(owner.get(&room.id).await.expect("room").member_count, 0);

        // Broadcast rooms are joined the same way.
        let broadcast = owner.room(Kind::Broadcast, "News", &[]).await;
        let joined = b.join(&broadcast.id).await.expect("join a broadcast");
        assert_eq!(role_of(&joined), Role::Member);
        expect_refusal(
            b.join("r_doesnotexist").await,
            "not_found",
            404,
            "not found",
        );
    }
);

both_backends!(
    guests_may_not_create_or_join_public_rooms_uninvited,
    |backend| async move {
        let (server, admin) =
            TestServer::spawn_with_admin(backend, |s| s.auth.sign_up_role = "guest".into()).await;
        let admin = Client {
            rpc: server.rpc_as(&admin.access_token),
            id: admin.user_id,
            codec: Codec::Json,
        };
        let guest = user(&server, "guest", Codec::Proto).await;
        let other = user(&server, "other", Codec::Json).await;
        expect_refusal(
            guest.create(Kind::Public, "x", &[]).await,
            "permission_denied",
            403,
            "guests",
        );
        expect_refusal(
            guest.create(Kind::Direct, "", &[&other.id]).await,
            "permission_denied",
            403,
            "guests",
        );
        let public = admin.room(Kind::Public, "Lobby", &[]).await;
        let broadcast = admin.room(Kind::Broadcast, "Stage", &[]).await;
        guest
            .get(&public.id)
            .await
            .expect("guests may read public rooms");
        expect_refusal(
            guest.join(&public.id).await,
            "permission_denied",
            403,
            "guests",
        );
        guest
            .join(&broadcast.id)
            .await
            .expect("guests may join a broadcast audience");
        admin
            .invite(&public.id, &guest.id)
            .await
            .expect("invite the guest");
        guest
            .join(&public.id)
            .await
            .expect("an invited guest may join");
        // Guests may take part in a direct room another user starts.
        let direct = admin.room(Kind::Direct, "", &[&guest.id]).await;
        assert_eq!(
            role_of(&guest.get(&direct.id).await.expect("direct")),
            Role::Member
        );
    }
);

both_backends!(
    list_rooms_mine_and_public_with_pages,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let a = user(&server, "alice", Codec::Json).await;
        let b = user(&server, "bob", Codec::Proto).await;
        let mut a_public = Vec::new();
        for i in 0..5 {
            a_public.push(a.room(Kind::Public, &format!("public {i}"), &[]).await.id);
        }
        let a_private = a.room(Kind::Private, "private", &[]).await.id;
        let a_broadcast = a.room(Kind::Broadcast, "broadcast", &[]).await.id;
        let b_public = b.room(Kind::Public, "bob's", &[]).await.id;

        let mine = a.all_rooms(pb::RoomFilter::Mine, 3).await;
        let mut mine_ids: Vec<&str> = mine.iter().map(|r| r.id.as_str()).collect();
        let mut expected: Vec<&str> = a_public.iter().map(String::as_str).collect();
        expected.extend([a_private.as_str(), a_broadcast.as_str()]);
        expected.sort();
        assert!(
            mine_ids.windows(2).all(|w| w[0] < w[1]),
            "ordered by id, no repeats"
        );
        mine_ids.sort();
        assert_eq!(mine_ids, expected);
        assert!(mine
            .iter()
            .all(|r| role_of(r) == Role::Owner && r.member_count == 1));
        // Unspecified means MINE.
        let default = a
            .list_rooms(pb::RoomFilter::Unspecified, 0, "")
            .await
            .expect("default");
        assert_eq!(
            (default.rooms.len(), default.next_page_token.as_str()),
            (7, "")
        );

        let public = b.all_rooms(pb::RoomFilter::Public, 2).await;
        let mut public_ids: Vec<&str> = public.iter().map(|r| r.id.as_str()).collect();
        public_ids.sort();
        let mut expected: Vec<&str> = a_public.iter().map(String::as_str).collect();
        expected.extend([a_broadcast.as_str(), b_public.as_str()]);
        expected.sort();
        assert_eq!(
            public_ids, expected,
            "public and broadcast rooms, not private ones"
        );
        for room in &public {
            let expected_role = if room.id == b_public {
                Role::Owner
            } else {
                Role::Unspecified
            };
            assert_eq!(
                role_of(room),
                expected_role,
                "the caller's role in listed rooms"
            );
        }

        // Unread counts in the caller's rooms.
        b.join(&a_public[0]).await.expect("join");
        for i in 0..3 {
            a.send(&a_public[0], &format!("hello {i}"))
                .await
                .expect("send");
        }
        let bobs = b.all_rooms(pb::RoomFilter::Mine, 10).await;
        let joined = bobs
            .iter()
            .find(|r| r.id == a_public[0])
            .expect("joined room is listed");
        assert_eq!(
            (joined.last_seq, joined.unread_count, joined.last_read_seq),
            (3, 3, 0)
        );

        // Bad pages.
        expect_refusal(
            a.list_rooms(pb::RoomFilter::Mine, 101, "").await,
            "invalid_argument",
            400,
            "page_size",
        );
        expect_refusal(
            a.list_rooms(pb::RoomFilter::Mine, 10, "%%%").await,
            "invalid_argument",
            400,
            "page_token",
        );
        let bad_filter: Result<pb::ListRoomsResponse, _> = a
            .rpc
            .call_proto(
                "RoomService/ListRooms",
                &pb::ListRoomsRequest {
                    filter: 7,
                    ..Default::default()
                },
            )
            .await;
        expect_refusal(bad_filter, "invalid_argument", 400, "filter");
    }
);

both_backends!(list_members_with_profiles_and_pages, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let owner = user(&server, "owner", Codec::Json).await;
    let room = owner.room(Kind::Public, "Lobby", &[]).await;
    let mut everyone = vec![owner.id.clone()];
    for i in 0..4 {
        let u = user(&server, &format!("u{i}"), Codec::Proto).await;
        u.join(&room.id).await.expect("join");
        everyone.push(u.id);
    }
    everyone.sort();
    let outsider = user(&server, "outsider", Codec::Proto).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = outsider
            .list_members(&room.id, 2, &token)
            .await
            .expect("anyone may list a public room's members");
        assert!(page.members.len() <= 2);
        seen.extend(page.members);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen.iter().map(|m| m.user_id.clone()).collect::<Vec<_>>(),
        everyone
    );
    for m in &seen {
        let profile = m.user.as_ref().expect("a profile");
        assert_eq!(profile.id, m.user_id);
        assert!(!profile.username.is_empty());
        assert!(!m.online, "no WebSocket is open, so nobody is online");
        assert!(m.joined_at.is_some() && m.muted_until.is_none());
        let expected = if m.user_id == owner.id {
            Role::Owner
        } else {
            Role::Member
        };
        assert_eq!(m.role, expected as i32);
    }
    expect_refusal(
        owner.list_members(&room.id, 501, "").await,
        "invalid_argument",
        400,
        "page_size must be at most 500",
    );
    expect_refusal(
        owner.list_members(&room.id, 0, "!").await,
        "invalid_argument",
        400,
        "page_token",
    );
    assert_eq!(
        owner
            .list_members(&room.id, 500, "")
            .await
            .expect("max page")
            .members
            .len(),
        5
    );
});

both_backends!(update_room_by_moderators_only, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let owner = user(&server, "owner", Codec::Json).await;
    let moderator = user(&server, "moderator", Codec::Proto).await;
    let member = user(&server, "member", Codec::Json).await;
    let room = owner.room(Kind::Public, "Lobby", &[]).await;
    for u in [&moderator, &member] {
        u.join(&room.id).await.expect("join");
    }
    owner
        .set_role(&room.id, &moderator.id, Role::Moderator)
        .await
        .expect("promote");

    let updated = moderator
        .update(pb::UpdateRoomRequest {
            room_id: room.id.clone(),
            title: Some(" New title ".into()),
            topic: Some("New topic".into()),
            retention_seconds: None,
        })
        .await
        .expect("a moderator updates");
    assert_eq!(
        (updated.title.as_str(), updated.topic.as_str()),
        ("New title", "New topic")
    );
    assert_eq!(
        (
            updated.retention_seconds,
            role_of(&updated),
            updated.member_count
        ),
        (0, Role::Moderator, 3)
    );
    let updated = owner
        .update(pb::UpdateRoomRequest {
            room_id: room.id.clone(),
            retention_seconds: Some(3600),
            ..Default::default()
        })
        .await
        .expect("the owner updates");
    assert_eq!(
        (updated.title.as_str(), updated.retention_seconds),
        ("New title", 3600)
    );
    let read = member.get(&room.id).await.expect("get");
    assert_eq!(
        (
            read.title.as_str(),
            read.topic.as_str(),
            read.retention_seconds
        ),
        ("New title", "New topic", 3600)
    );
    // Clearing the topic is allowed; an empty title is not.
    let cleared = owner
        .update(pb::UpdateRoomRequest {
            room_id: room.id.clone(),
            topic: Some(String::new()),
            ..Default::default()
        })
        .await
        .expect("clear topic");
    assert_eq!(cleared.topic, "");

    let denied = member
        .update(pb::UpdateRoomRequest {
            room_id: room.id.clone(),
            title: Some("mine now".into()),
            ..Default::default()
        })
        .await;
    expect_refusal(denied, "permission_denied", 403, "owners and moderators");
    let empty = owner
        .update(pb::UpdateRoomRequest {
            room_id: room.id.clone(),
            title: Some(" ".into()),
            ..Default::default()
        })
        .await;
    expect_refusal(empty, "invalid_argument", 400, "title is required");
    let long = owner
        .update(pb::UpdateRoomRequest {
            room_id: room.id.clone(),
            topic: Some("x".repeat(1001)),
            ..Default::default()
        })
        .await;
    expect_refusal(long, "invalid_argument", 400, "topic");
    let missing = owner
        .update(pb::UpdateRoomRequest {
            room_id: "r_missing".into(),
            title: Some("x".into()),
            ..Default::default()
        })
        .await;
    expect_refusal(missing, "not_found", 404, "r_missing");
});

both_backends!(kick_and_ban, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let owner = user(&server, "owner", Codec::Json).await;
    let moderator = user(&server, "moderator", Codec::Proto).await;
    let moderator2 = user(&server, "moderator2", Codec::Json).await;
    let b = user(&server, "bob", Codec::Proto).await;
    let c = user(&server, "carol", Codec::Json).await;
    let d = user(&server, "dave", Codec::Proto).await;
    let room = owner.room(Kind::Public, "Lobby", &[]).await;
    for u in [&moderator, &moderator2, &b, &c] {
        u.join(&room.id).await.expect("join");
    }
    for m in [&moderator, &moderator2] {
        owner
            .set_role(&room.id, &m.id, Role::Moderator)
            .await
            .expect("promote");
    }

    // Who may kick whom.
    expect_refusal(
        b.kick(&room.id, &c.id, "").await,
        "permission_denied",
        403,
        "owners and moderators",
    );
    expect_refusal(
        moderator.kick(&room.id, &moderator.id, "").await,
        "invalid_argument",
        400,
        "yourself",
    );
    expect_refusal(
        moderator.kick(&room.id, &moderator2.id, "").await,
        "permission_denied",
        403,
        "only an owner",
    );
    expect_refusal(
        moderator.kick(&room.id, &owner.id, "").await,
        "permission_denied",
        403,
        "only an owner",
    );
    expect_refusal(
        moderator.kick(&room.id, &d.id, "").await,
        "not_found",
        404,
        "not a member",
    );
    expect_refusal(
        moderator.kick(&room.id, &c.id, &"x".repeat(501)).await,
        "invalid_argument",
        400,
        "reason",
    );

    // A kicked member may come back.
    moderator
        .kick(&room.id, &b.id, "cool down")
        .await
        .expect("kick");
    assert!(owner.member(&room.id, &b.id).await.is_none());
    b.join(&room.id).await.expect("rejoin after a kick");

    // A banned member is out, cannot read, join or be invited, until unbanned.
    moderator.ban(&room.id, &b.id, 0).await.expect("ban");
    assert!(owner.member(&room.id, &b.id).await.is_none());
    expect_refusal(b.join(&room.id).await, "permission_denied", 403, "banned");
    expect_refusal(b.get(&room.id).await, "permission_denied", 403, "banned");
    expect_refusal(
        b.list_members(&room.id, 0, "").await,
        "permission_denied",
        403,
        "banned",
    );
    expect_refusal(
        owner.invite(&room.id, &b.id).await,
        "failed_precondition",
        400,
        "banned",
    );
    expect_refusal(
        moderator.ban(&room.id, &moderator2.id, 0).await,
        "permission_denied",
        403,
        "only an owner",
    );
    expect_refusal(
        moderator.ban(&room.id, "u_nobody", 0).await,
        "not_found",
        404,
        "u_nobody",
    );
    expect_refusal(
        c.unban(&room.id, &b.id).await,
        "permission_denied",
        403,
        "owners and moderators",
    );
    moderator.unban(&room.id, &b.id).await.expect("unban");
    expect_refusal(
        moderator.unban(&room.id, &b.id).await,
        "not_found",
        404,
        "not banned",
    );
    b.join(&room.id).await.expect("join after unban");

    // Bans of non-members keep them out pre-emptively.
    moderator
        .ban(&room.id, &d.id, 0)
        .await
        .expect("pre-emptive ban");
    expect_refusal(d.join(&room.id).await, "permission_denied", 403, "banned");

    // A ban with a duration lifts itself.
    moderator
        .ban(&room.id, &c.id, 1)
        .await
        .expect("one-second ban");
    expect_refusal(c.join(&room.id).await, "permission_denied", 403, "banned");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.join(&room.id).await.expect("the ban expired");

    // Owners moderate moderators; the last owner cannot be removed.
    owner
        .kick(&room.id, &moderator2.id, "")
        .await
        .expect("the owner kicks a moderator");
    expect_refusal(
        owner.ban(&room.id, &owner.id, 0).await,
        "invalid_argument",
        400,
        "yourself",
    );
});

both_backends!(
    server_admins_moderate_and_the_last_owner_stays,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let admin = Client {
            rpc: server.rpc_as(&admin.access_token),
            id: admin.user_id,
            codec: Codec::Proto,
        };
        let owner = user(&server, "owner", Codec::Json).await;
        let b = user(&server, "bob", Codec::Proto).await;
        let room = owner.room(Kind::Private, "Team", &[&b.id]).await;
        b.join(&room.id).await.expect("join");
        // An admin who is not a member may still moderate, but not remove the last owner.
        expect_refusal(
            admin.kick(&room.id, &owner.id, "").await,
            "failed_precondition",
            400,
            "last owner",
        );
        expect_refusal(
            admin.ban(&room.id, &owner.id, 0).await,
            "failed_precondition",
            400,
            "last owner",
        );
        expect_refusal(
            admin.set_role(&room.id, &owner.id, Role::Member).await,
            "failed_precondition",
            400,
            "last owner",
        );
        admin
            .set_role(&room.id, &b.id, Role::Owner)
            .await
            .expect("an admin appoints an owner");
        admin
            .ban(&room.id, &owner.id, 0)
            .await
            .expect("now the first owner may be banned");
        expect_refusal(
            owner.get(&room.id).await,
            "permission_denied",
            403,
            "banned",
        );
    }
);

both_backends!(mute_and_unmute, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let owner = user(&server, "owner", Codec::Proto).await;
    let moderator = user(&server, "moderator", Codec::Json).await;
    let b = user(&server, "bob", Codec::Proto).await;
    let c = user(&server, "carol", Codec::Json).await;
    let room = owner.room(Kind::Public, "Lobby", &[]).await;
    for u in [&moderator, &b] {
        u.join(&room.id).await.expect("join");
    }
    owner
        .set_role(&room.id, &moderator.id, Role::Moderator)
        .await
        .expect("promote");

    moderator
        .mute(&room.id, &b.id, 0)
        .await
        .expect("mute until lifted");
    let muted = owner.member(&room.id, &b.id).await.expect("still a member");
    assert_eq!(muted.muted_until.map(|t| t.seconds), Some(FOREVER_SECS));
    expect_refusal(
        b.send(&room.id, "hello?").await,
        "permission_denied",
        403,
        "muted",
    );

    moderator
        .mute(&room.id, &b.id, 60)
        .await
        .expect("mute for a minute");
    let until = owner
        .member(&room.id, &b.id)
        .await
        .and_then(|m| m.muted_until)
        .expect("muted_until is set")
        .seconds;
    let now = common::now_secs();
    assert!(
        (now + 55..=now + 65).contains(&until),
        "muted until {until}, now {now}"
    );

    moderator.unmute(&room.id, &b.id).await.expect("unmute");
    assert!(owner
        .member(&room.id, &b.id)
        .await
        .and_then(|m| m.muted_until)
        .is_none());
    b.send(&room.id, "thanks")
        .await
        .expect("unmuted members send");
    moderator
        .unmute(&room.id, &b.id)
        .await
        .expect("unmuting again is harmless");

    expect_refusal(
        b.mute(&room.id, &moderator.id, 0).await,
        "permission_denied",
        403,
        "owners and moderators",
    );
    expect_refusal(
        moderator.mute(&room.id, &owner.id, 0).await,
        "permission_denied",
        403,
        "only an owner",
    );
    expect_refusal(
        moderator.mute(&room.id, &moderator.id, 0).await,
        "invalid_argument",
        400,
        "yourself",
    );
    expect_refusal(
        moderator.mute(&room.id, &c.id, 0).await,
        "not_found",
        404,
        "not a member",
    );
    expect_refusal(
        moderator.unmute(&room.id, &c.id).await,
        "not_found",
        404,
        "not a member",
    );
    owner
        .mute(&room.id, &moderator.id, 0)
        .await
        .expect("owners mute moderators");
});

both_backends!(member_roles, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let owner = user(&server, "owner", Codec::Json).await;
    let moderator = user(&server, "moderator", Codec::Proto).await;
    let b = user(&server, "bob", Codec::Json).await;
    let c = user(&server, "carol", Codec::Proto).await;
    let outsider = user(&server, "outsider", Codec::Json).await;
    let room = owner.room(Kind::Public, "Lobby", &[]).await;
    for u in [&moderator, &b, &c] {
        u.join(&room.id).await.expect("join");
    }
    expect_refusal(
        owner.set_role(&room.id, &b.id, Role::Unspecified).await,
        "invalid_argument",
        400,
        "role is required",
    );
    expect_refusal(
        b.set_role(&room.id, &c.id, Role::Moderator).await,
        "permission_denied",
        403,
        "owners and moderators",
    );
    owner
        .set_role(&room.id, &moderator.id, Role::Moderator)
        .await
        .expect("promote");

    // Moderators may promote members to moderator, and nothing else.
    moderator
        .set_role(&room.id, &b.id, Role::Moderator)
        .await
        .expect("a moderator promotes");
    expect_refusal(
        moderator.set_role(&room.id, &c.id, Role::Owner).await,
        "permission_denied",
        403,
        "only promote",
    );
    expect_refusal(
        moderator.set_role(&room.id, &b.id, Role::Member).await,
        "permission_denied",
        403,
        "only promote",
    );
    expect_refusal(
        moderator
            .set_role(&room.id, &outsider.id, Role::Moderator)
            .await,
        "not_found",
        404,
        "not a member",
    );
    let roles: Vec<(String, i32)> = owner
        .members(&room.id)
        .await
        .into_iter()
        .map(|m| (m.user_id, m.role))
        .collect();
    assert!(
        roles.contains(&(b.id.clone(), Role::Moderator as i32)),
        "{roles:?}"
    );

    // Owners give any role, owner included, and may step down if another owner remains.
    owner
        .set_role(&room.id, &b.id, Role::Member)
        .await
        .expect("demote");
    owner
        .set_role(&room.id, &c.id, Role::Owner)
        .await
        .expect("co-owner");
    owner
        .set_role(&room.id, &c.id, Role::Owner)
        .await
        .expect("the same role again is harmless");
    owner
        .set_role(&room.id, &owner.id, Role::Member)
        .await
        .expect("step down");
    assert_eq!(
        role_of(&owner.get(&room.id).await.expect("get")),
        Role::Member
    );
    expect_refusal(
        c.set_role(&room.id, &c.id, Role::Moderator).await,
        "failed_precondition",
        400,
        "last owner",
    );
    expect_refusal(
        owner.set_role(&room.id, &c.id, Role::Member).await,
        "permission_denied",
        403,
        "owners and moderators",
    );
    expect_refusal(
        c.set_role(&room.id, "bad id", Role::Member).await,
        "invalid_argument",
        400,
        "user_id",
    );
});

both_backends!(concurrent_changes_keep_the_rules, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let a = user(&server, "alice", Codec::Json).await;
    let b = user(&server, "bob", Codec::Proto).await;
    // Both sides open their direct room at once, several times: one room.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (me, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (me, other_id) = (me.clone(), other.id.clone());
        tasks.push(tokio::spawn(async move {
            me.room(Kind::Direct, "", &[&other_id]).await.id
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("task"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one direct room per pair: {ids:?}");

    // Every owner leaves at once while a member stays: all but one may go.
    for round in 0..10 {
        let first_owner = user(&server, "owner", Codec::Json).await;
        let member = user(&server, "member", Codec::Proto).await;
        let room = first_owner
            .room(Kind::Public, &format!("round {round}"), &[])
            .await;
        member.join(&room.id).await.expect("join");
        let mut owners = vec![first_owner.clone()];
        for _ in 0..3 {
            let co_owner = user(&server, "coowner", Codec::Proto).await;
            co_owner.join(&room.id).await.expect("join");
            first_owner
                .set_role(&room.id, &co_owner.id, Role::Owner)
                .await
                .expect("co-owner");
            owners.push(co_owner);
        }
        let leaves = owners.iter().map(|o| {
            let (o, room) = (o.clone(), room.id.clone());
            tokio::spawn(async move { o.leave(&room).await })
        });
        let mut refused = Vec::new();
        for leave in leaves.collect::<Vec<_>>() {
            if let Err(e) = leave.await.expect("task") {
                refused.push(e);
            }
        }
        assert_eq!(refused.len(), 1, "all owners but one leave: {refused:?}");
        refused[0].expect("failed_precondition", 400);
        let remaining = member
            .members(&room.id)
            .await
            .into_iter()
            .filter(|m| m.role == Role::Owner as i32)
            .count();
        assert_eq!(remaining, 1);
    }
});
