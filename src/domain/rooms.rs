//! RoomService, rooms and membership: create, read, list, update, join, leave,
//! invite, list members and moderate (kick, ban, mute, roles). The message RPCs
//! live in [`super::messages`].
//!
//! Every call loads the room and the caller's membership through
//! [`access::room_access`], changes the store, and then tells the room's actor
//! (through the [`RoomRegistry`](crate::actors::room_registry::RoomRegistry)) so
//! that live subscribers see joins, leaves, role changes and removals. Those
//! notices may be lost (the room may not be running, or a queue may be full); the
//! store is the truth and clients can always re-read it.
//!
//! Rules beyond the proto's comments, decided here:
//! - Guests may not create rooms, nor join public rooms without an invitation; they
//!   may join broadcast rooms (the audience of a broadcast is anyone) and private
//!   rooms they were invited to.
//! - Direct rooms have no moderation: invite, kick, ban, mute and role changes
//!   answer `failed_precondition`. Either user may leave one; CreateRoom with the
//!   same pair returns the room and adds the caller back.
//! - A room with members always keeps an owner: the last owner can neither leave,
//!   be removed nor be demoted while other members remain. The last owner may leave
//!   a room they are alone in; that room then has no owner (server admins still
//!   moderate it).
//! - Owners and server admins moderate anyone; moderators moderate members only.
//! - An invited user may read the room's description with GetRoom before joining.
//! - `Member.muted_until` is set only while the member is muted; a mute without
//!   expiry shows as 9999-12-31T23:59:59.999Z, the largest protobuf timestamp.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{
    access::{room_access, RoomAccess},
    audit,
    convert::{room_to_proto, user_to_proto},
    validate, AppState, Principal,
};
use crate::{
    actors::{
        room::RoomNotice, room_registry::NotifyRoom, session_registry::SignalUser,
        user_session::SessionSignal,
    },
    error::ApiError,
    ids::{now_ms, RoomId, UserId},
    model::{timestamp, MemberRole, Role, RoomKind},
    proto::v1 as pb,
    protocol::{self, SharedFrame},
    store::{
        MemberRecord, MembershipChange, NewRoom, NotificationKind, RoomRecord, RoomUpdate,
        StoreError,
    },
};

/// Longest room title.
pub const TITLE_MAX_CHARS: usize = 100;
/// Longest room topic.
pub const TOPIC_MAX_CHARS: usize = 1000;
/// Longest kick or ban reason.
pub const REASON_MAX_CHARS: usize = 500;
/// Most users a private room may invite at creation.
pub const CREATE_MEMBERS_MAX: usize = 100;
/// ListRooms page size when the request says 0.
pub const ROOMS_PAGE_DEFAULT: u32 = 50;
/// Largest ListRooms page.
pub const ROOMS_PAGE_MAX: u32 = 100;
/// ListMembers page size when the request says 0.
pub const MEMBERS_PAGE_DEFAULT: u32 = 100;
/// Largest ListMembers page.
pub const MEMBERS_PAGE_MAX: u32 = 500;
/// The largest time a protobuf timestamp can hold (9999-12-31T23:59:59.999Z), in
/// Unix ms: what a mute without expiry shows as.
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

// ---------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------

/// Creates a room; the caller becomes its owner. For a direct room that exists
/// already, returns that room instead.
pub async fn create_room(
    state: &AppState,
    principal: &Principal,
    req: pb::CreateRoomRequest,
) -> Result<pb::CreateRoomResponse, ApiError> {
    let me = principal.require_user()?.clone();
    if principal.role == Role::Guest {
        return Err(ApiError::denied("guests may not create rooms"));
    }
    let kind = RoomKind::from_proto(req.kind).ok_or_else(|| {
        ApiError::invalid(
            "kind is required: ROOM_KIND_PUBLIC, ROOM_KIND_PRIVATE, ROOM_KIND_DIRECT or ROOM_KIND_BROADCAST",
        )
    })?;
    let live = req
        .live
        .as_ref()
        .map(super::live::controls_from_proto)
        .transpose()?;
    if live.is_some() && !matches!(kind, RoomKind::Public | RoomKind::Broadcast) {
        return Err(ApiError::invalid(
            "live: only public and broadcast rooms can be live rooms",
        ));
    }
    let title = title(kind, &req.title)?;
    let topic = topic(&req.topic)?;
    let quota = state.settings.rooms.max_rooms_per_user;
    if quota > 0 && !principal.is_admin() && state.store.count_rooms_created_by(&me).await? >= quota
    {
        return Err(ApiError::exhausted(format!(
            "you have created {quota} rooms, the most one user may create \
             (rooms.max_rooms_per_user); delete or leave some first"
        )));
    }
    let mut new = NewRoom {
        kind,
        title,
        topic,
        retention_seconds: retention(req.retention_seconds)?,
        created_by: me.clone(),
        direct_key: None,
        members: Vec::new(),
        invites: Vec::new(),
        live,
    };
    match kind {
        RoomKind::Public | RoomKind::Broadcast => {}
        RoomKind::Private => {
            let mut ids = unique_user_ids(&req.member_ids)?;
            ids.retain(|id| *id != me);
            require_users_exist(state, &ids).await?;
            new.invites = ids;
        }
        RoomKind::Direct => {
            let other = direct_partner(&me, &req.member_ids)?;
            require_users_exist(state, std::slice::from_ref(&other)).await?;
            let key = direct_key(&me, &other);
            if let Some(room) = state.store.find_direct_room(&key).await? {
                return Ok(pb::CreateRoomResponse {
                    room: Some(reopen_direct(state, room, &me).await?),
                });
            }
            new.direct_key = Some(key.clone());
            new.members = vec![(other, MemberRole::Member)];
        }
    }
    let invited = new.invites.clone();
    let room = match state.store.create_room(new).await {
        Ok(room) => room,
        // Two first messages to the same person raced; the other one won.
        Err(StoreError::Conflict) if kind == RoomKind::Direct => {
            let key = direct_key(&me, &direct_partner(&me, &req.member_ids)?);
            let room =
                state.store.find_direct_room(&key).await?.ok_or_else(|| {
                    ApiError::unavailable("the direct room is being created; retry")
                })?;
            return Ok(pb::CreateRoomResponse {
                room: Some(reopen_direct(state, room, &me).await?),
            });
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(room = %room.id, user = %me, kind = %kind, "room created");
    futures_util::future::join_all(
        invited
            .iter()
            .map(|user| super::invitations::invited(state, &room.id, &room.title, user, &me)),
    )
    .await;
    let member = state.store.get_member(&room.id, &me).await?;
    Ok(pb::CreateRoomResponse {
        room: Some(room_proto(state, &room, member.as_ref()).await?),
    })
}

/// A room the caller may see, with the caller's membership.
pub async fn get_room(
    state: &AppState,
    principal: &Principal,
    req: pb::GetRoomRequest,
) -> Result<pb::GetRoomResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    if !access.can_read() {
        // room_access lets a non-member through to a private room only when
        // invited: they may see what they were invited to.
        let invited = access.room.kind == RoomKind::Private
            && state
                .store
                .has_invite(&access.room.id, &access.user_id)
                .await?;
        if !invited {
            access.require_read()?;
        }
    }
    Ok(pb::GetRoomResponse {
        room: Some(room_proto(state, &access.room, access.member.as_ref()).await?),
    })
}

/// The caller's rooms (with unread counts) or the public directory, ordered by id.
pub async fn list_rooms(
    state: &AppState,
    principal: &Principal,
    req: pb::ListRoomsRequest,
) -> Result<pb::ListRoomsResponse, ApiError> {
    let me = principal.require_user()?;
    let filter = match pb::RoomFilter::try_from(req.filter) {
        Ok(pb::RoomFilter::Unspecified | pb::RoomFilter::Mine) => pb::RoomFilter::Mine,
        Ok(pb::RoomFilter::Public) => pb::RoomFilter::Public,
        Err(_) => {
            return Err(ApiError::invalid(
                "filter must be ROOM_FILTER_MINE or ROOM_FILTER_PUBLIC",
            ))
        }
    };
    let page_size = validate::page_size(
        "page_size",
        req.page_size,
        ROOMS_PAGE_DEFAULT,
        ROOMS_PAGE_MAX,
    )?;
    let after = validate::decode_page_token("page_token", &req.page_token)?.unwrap_or_default();
    // One more than a page tells whether another page follows.
    let mut found: Vec<(RoomRecord, Option<MemberRecord>)> = match filter {
        pb::RoomFilter::Public => {
            let rooms = state.store.list_public_rooms(&after, page_size + 1).await?;
            let ids: Vec<RoomId> = rooms.iter().map(|r| r.id.clone()).collect();
            let mut mine: HashMap<RoomId, MemberRecord> = state
                .store
                .memberships_in(me, &ids)
                .await?
                .into_iter()
                .map(|m| (m.room_id.clone(), m))
                .collect();
            rooms
                .into_iter()
                .map(|room| {
                    let member = mine.remove(&room.id);
                    (room, member)
                })
                .collect()
        }
        _ => state
            .store
            .list_user_rooms(me, &after, page_size + 1)
            .await?
            .into_iter()
            .map(|(room, member)| (room, Some(member)))
            .collect(),
    };
    let more = found.len() > page_size as usize;
    found.truncate(page_size as usize);
    let next_page_token = match found.last() {
        Some((last, _)) if more => validate::encode_page_token(last.id.as_str()),
        _ => String::new(),
    };
    let ids: Vec<RoomId> = found.iter().map(|(r, _)| r.id.clone()).collect();
    let counts = state.store.member_counts(&ids).await?;
    let rooms = found
        .iter()
        .map(|(room, member)| {
            let count = counts.get(&room.id).copied().unwrap_or(0);
            room_to_proto(room, count, member.as_ref())
        })
        .collect();
    Ok(pb::ListRoomsResponse {
        rooms,
        next_page_token,
    })
}

/// Owners and moderators change the title, topic or retention; subscribers get a
/// `room_updated` push.
pub async fn update_room(
    state: &AppState,
    principal: &Principal,
    req: pb::UpdateRoomRequest,
) -> Result<pb::UpdateRoomResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    access.require_moderator()?;
    let update = RoomUpdate {
        title: req
            .title
            .as_deref()
            .map(|t| title(access.room.kind, t))
            .transpose()?,
        topic: req.topic.as_deref().map(topic).transpose()?,
        retention_seconds: req.retention_seconds.map(retention).transpose()?,
    };
    if update.title.is_none() && update.topic.is_none() && update.retention_seconds.is_none() {
        return Ok(pb::UpdateRoomResponse {
            room: Some(room_proto(state, &access.room, access.member.as_ref()).await?),
        });
    }
    let room = state
        .store
        .update_room(&access.room.id, update)
        .await
        .map_err(|e| room_gone(e, &access.room.id))?;
    let count = state.store.member_count(&room.id).await?;
    tracing::info!(room = %room.id, user = %access.user_id, "room updated");
    notify(
        state,
        &room.id,
        RoomNotice::Updated(Box::new(room_to_proto(&room, count, None))),
    );
    Ok(pb::UpdateRoomResponse {
        room: Some(room_to_proto(&room, count, access.member.as_ref())),
    })
}

// ---------------------------------------------------------------------------
// Membership
// ---------------------------------------------------------------------------

/// Joins a public or broadcast room, or a private room the caller was invited to.
/// Joining a room one is a member of already returns the room.
pub async fn join_room(
    state: &AppState,
    principal: &Principal,
    req: pb::JoinRoomRequest,
) -> Result<pb::JoinRoomResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    let room = &access.room;
    if access.member.is_none() {
        let needs_invite = match room.kind {
            RoomKind::Direct => {
                return Err(ApiError::failed_precondition(
                    "direct rooms cannot be joined; create a direct room with the user instead",
                ))
            }
            RoomKind::Private => !access.server_admin,
            RoomKind::Public => principal.role == Role::Guest,
            RoomKind::Broadcast => false,
        };
        if needs_invite && !state.store.has_invite(&room.id, &access.user_id).await? {
            return Err(if room.kind == RoomKind::Private {
                ApiError::not_found(format!("room `{}` not found", room.id))
            } else {
                ApiError::denied("guests may join a public room only when invited")
            });
        }
        match state
            .store
            .add_member(&room.id, &access.user_id, MemberRole::Member)
            .await
        {
            Ok(_) => {
                tracing::info!(room = %room.id, user = %access.user_id, "joined");
                notify(
                    state,
                    &room.id,
                    member_event(
                        &room.id,
                        &access.user_id,
                        pb::MemberEventKind::Joined,
                        Some(MemberRole::Member),
                        None,
                    ),
                );
            }
            // A concurrent join of the same user won; joining is idempotent.
            Err(StoreError::Conflict) => {}
            Err(e) => return Err(room_gone(e, &room.id)),
        }
    }
    let member = state.store.get_member(&room.id, &access.user_id).await?;
    Ok(pb::JoinRoomResponse {
        room: Some(room_proto(state, room, member.as_ref()).await?),
    })
}

/// Leaves a room; the caller's live subscriptions to it end.
pub async fn leave_room(
    state: &AppState,
    principal: &Principal,
    req: pb::LeaveRoomRequest,
) -> Result<pb::LeaveRoomResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    access.require_member()?;
    let room_id = &access.room.id;
    let outcome = if access.room.kind == RoomKind::Direct {
        match state.store.remove_member(room_id, &access.user_id).await {
            Ok(()) => MembershipChange::Done,
            Err(StoreError::NotFound) => MembershipChange::NotMember,
            Err(e) => return Err(e.into()),
        }
    } else {
        state
            .store
            .remove_member_keeping_owner(room_id, &access.user_id)
            .await
            .map_err(|e| room_gone(e, room_id))?
    };
    match outcome {
        MembershipChange::Done => {}
        // A concurrent leave (another device) got there first.
        MembershipChange::NotMember => return Ok(pb::LeaveRoomResponse {}),
        MembershipChange::LastOwner => {
            return Err(ApiError::failed_precondition(
                "you are the last owner of this room and other members remain; \
                 make another member owner (SetMemberRole) before leaving",
            ))
        }
    }
    tracing::info!(room = %room_id, user = %access.user_id, "left");
    removed(
        state,
        room_id,
        &access.user_id,
        None,
        pb::MemberEventKind::Left,
        pb::RemovedReason::Left,
        "you left the room".into(),
    );
    Ok(pb::LeaveRoomResponse {})
}

/// Invites a user: to a private room, owners and moderators; to a public or
/// broadcast room, any member. Inviting someone invited already succeeds.
pub async fn invite_member(
    state: &AppState,
    principal: &Principal,
    req: pb::InviteMemberRequest,
) -> Result<pb::InviteMemberResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    let room_id = &access.room.id;
    match access.room.kind {
        RoomKind::Direct => {
            return Err(ApiError::failed_precondition(
                "direct rooms are for two users; create a private room to invite others",
            ))
        }
        RoomKind::Private => access.require_moderator()?,
        RoomKind::Public | RoomKind::Broadcast => {
            if !access.server_admin {
                access.require_member()?;
            }
        }
    }
    let target = UserId::from(validate::id("user_id", &req.user_id)?);
    if state.store.get_member(room_id, &target).await?.is_some() {
        return Err(ApiError::already_exists(format!(
            "user `{target}` is already a member of this room"
        )));
    }
    require_users_exist(state, std::slice::from_ref(&target)).await?;
    if state
        .store
        .active_ban(room_id, &target, now_ms())
        .await?
        .is_some()
    {
        return Err(ApiError::failed_precondition(format!(
            "user `{target}` is banned from this room; unban them before inviting"
        )));
    }
    let already_invited = state.store.has_invite(room_id, &target).await?;
    state
        .store
        .invite(room_id, &target, &access.user_id)
        .await
        .map_err(|e| room_gone(e, room_id))?;
    tracing::info!(room = %room_id, user = %target, by = %access.user_id, "invited");
    if !already_invited {
        super::invitations::invited(state, room_id, &access.room.title, &target, &access.user_id)
            .await;
    }
    notify(
        state,
        room_id,
        member_event(
            room_id,
            &target,
            pb::MemberEventKind::Invited,
            None,
            Some(&access.user_id),
        ),
    );
    Ok(pb::InviteMemberResponse {})
}

/// Members ordered by user id, with role, profile and whether they are online.
pub async fn list_members(
    state: &AppState,
    principal: &Principal,
    req: pb::ListMembersRequest,
) -> Result<pb::ListMembersResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    access.require_read()?;
    let page_size = validate::page_size(
        "page_size",
        req.page_size,
        MEMBERS_PAGE_DEFAULT,
        MEMBERS_PAGE_MAX,
    )?;
    let after = validate::decode_page_token("page_token", &req.page_token)?.unwrap_or_default();
    let mut members = state
        .store
        .list_members(&access.room.id, &after, page_size + 1)
        .await?;
    let more = members.len() > page_size as usize;
    members.truncate(page_size as usize);
    let next_page_token = match members.last() {
        Some(last) if more => validate::encode_page_token(last.user_id.as_str()),
        _ => String::new(),
    };
    let user_ids: Vec<UserId> = members.iter().map(|m| m.user_id.clone()).collect();
    let profiles: HashMap<UserId, pb::User> = state
        .store
        .get_users(&user_ids)
        .await?
        .iter()
        .map(|u| (u.id.clone(), user_to_proto(u)))
        .collect();
    let online = crate::cluster::presence::online_anywhere(state, user_ids).await?;
    let now = now_ms();
    let members = members
        .into_iter()
        .map(|m| pb::Member {
            online: online.contains(&m.user_id),
            user: profiles.get(&m.user_id).cloned(),
            role: m.role.to_proto(),
            joined_at: Some(timestamp(m.joined_at)),
            last_read_seq: m.last_read_seq,
            muted_until: m
                .muted_until
                .filter(|_| m.is_muted(now))
                .map(|until| timestamp(until.min(MAX_TIMESTAMP_MS))),
            user_id: m.user_id.0,
        })
        .collect();
    Ok(pb::ListMembersResponse {
        members,
        next_page_token,
    })
}

// ---------------------------------------------------------------------------
// Moderation
// ---------------------------------------------------------------------------

/// Removes a member; they may join again.
pub async fn kick_member(
    state: &AppState,
    principal: &Principal,
    req: pb::KickMemberRequest,
) -> Result<pb::KickMemberResponse, ApiError> {
    let reason = reason(&req.reason)?;
    let (access, target) = moderation(state, principal, &req.room_id, &req.user_id, "kick").await?;
    let room_id = &access.room.id;
    let member = require_target_member(state, room_id, &target).await?;
    require_outranks(&access, member.role, "kick")?;
    match state
        .store
        .remove_member_keeping_owner(room_id, &target)
        .await
        .map_err(|e| room_gone(e, room_id))?
    {
        MembershipChange::Done => {}
        MembershipChange::NotMember => return Err(not_a_member(&target)),
        MembershipChange::LastOwner => return Err(last_owner(&target, "removed")),
    }
    tracing::info!(room = %room_id, user = %target, by = %access.user_id, "kicked");
    audit::record(
        state,
        principal,
        "kick",
        target.as_str(),
        Some(room_id),
        &reason,
    )
    .await;
    removed(
        state,
        room_id,
        &target,
        Some(&access.user_id),
        pb::MemberEventKind::Kicked,
        pb::RemovedReason::Kicked,
        reason_or(reason, "you were removed from the room by a moderator"),
    );
    Ok(pb::KickMemberResponse {})
}

/// Removes a member (or keeps a non-member out) until the ban expires or is lifted.
pub async fn ban_member(
    state: &AppState,
    principal: &Principal,
    req: pb::BanMemberRequest,
) -> Result<pb::BanMemberResponse, ApiError> {
    let reason = reason(&req.reason)?;
    let (access, target) = moderation(state, principal, &req.room_id, &req.user_id, "ban").await?;
    let room_id = &access.room.id;
    if let Some(member) = state.store.get_member(room_id, &target).await? {
        require_outranks(&access, member.role, "ban")?;
    } else {
        require_users_exist(state, std::slice::from_ref(&target)).await?;
    }
    let expires_at = (req.duration_seconds > 0).then(|| after_seconds(req.duration_seconds));
    match state
        .store
        .ban_keeping_owner(room_id, &target, &access.user_id, &reason, expires_at)
        .await
        .map_err(|e| room_gone(e, room_id))?
    {
        MembershipChange::Done | MembershipChange::NotMember => {}
        MembershipChange::LastOwner => return Err(last_owner(&target, "banned")),
    }
    tracing::info!(room = %room_id, user = %target, by = %access.user_id, ?expires_at, "banned");
    let detail = match expires_at {
        Some(_) => format!("for {} s: {reason}", req.duration_seconds),
        None => reason.clone(),
    };
    audit::record(
        state,
        principal,
        "ban",
        target.as_str(),
        Some(room_id),
        &detail,
    )
    .await;
    removed(
        state,
        room_id,
        &target,
        Some(&access.user_id),
        pb::MemberEventKind::Banned,
        pb::RemovedReason::Banned,
        reason_or(reason, "you were banned from the room by a moderator"),
    );
    Ok(pb::BanMemberResponse {})
}

/// Lifts a ban (also an expired one); the user may join again.
pub async fn unban_member(
    state: &AppState,
    principal: &Principal,
    req: pb::UnbanMemberRequest,
) -> Result<pb::UnbanMemberResponse, ApiError> {
    let (access, target) =
        moderation(state, principal, &req.room_id, &req.user_id, "unban").await?;
    match state.store.unban(&access.room.id, &target).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!(
                "user `{target}` is not banned from this room"
            )))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(room = %access.room.id, user = %target, by = %access.user_id, "unbanned");
    audit::record(
        state,
        principal,
        "unban",
        target.as_str(),
        Some(&access.room.id),
        "",
    )
    .await;
    Ok(pb::UnbanMemberResponse {})
}

/// Stops a member from sending until the mute expires or is lifted.
pub async fn mute_member(
    state: &AppState,
    principal: &Principal,
    req: pb::MuteMemberRequest,
) -> Result<pb::MuteMemberResponse, ApiError> {
    let (access, target) = moderation(state, principal, &req.room_id, &req.user_id, "mute").await?;
    let until = match req.duration_seconds {
        0 => i64::MAX,
        seconds => after_seconds(seconds),
    };
    set_mute(state, &access, &target, Some(until), "mute").await?;
    let detail = match req.duration_seconds {
        0 => String::new(),
        seconds => format!("for {seconds} s"),
    };
    audit::record(
        state,
        principal,
        "mute",
        target.as_str(),
        Some(&access.room.id),
        &detail,
    )
    .await;
    Ok(pb::MuteMemberResponse {})
}

/// Lifts a mute; unmuting a member who is not muted succeeds.
pub async fn unmute_member(
    state: &AppState,
    principal: &Principal,
    req: pb::UnmuteMemberRequest,
) -> Result<pb::UnmuteMemberResponse, ApiError> {
    let (access, target) =
        moderation(state, principal, &req.room_id, &req.user_id, "unmute").await?;
    set_mute(state, &access, &target, None, "unmute").await?;
    audit::record(
        state,
        principal,
        "unmute",
        target.as_str(),
        Some(&access.room.id),
        "",
    )
    .await;
    Ok(pb::UnmuteMemberResponse {})
}

/// Owners (and server admins) give any role, owner included; moderators may only
/// promote members to moderator. The last owner cannot be demoted.
pub async fn set_member_role(
    state: &AppState,
    principal: &Principal,
    req: pb::SetMemberRoleRequest,
) -> Result<pb::SetMemberRoleResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    require_not_direct(&access)?;
    let role = MemberRole::from_proto(req.role).ok_or_else(|| {
        ApiError::invalid(
            "role is required: MEMBER_ROLE_MEMBER, MEMBER_ROLE_MODERATOR or MEMBER_ROLE_OWNER",
        )
    })?;
    let target = UserId::from(validate::id("user_id", &req.user_id)?);
    access.require_moderator()?;
    let room_id = &access.room.id;
    let member = require_target_member(state, room_id, &target).await?;
    let owner_or_admin = access.server_admin || access.role() == Some(MemberRole::Owner);
    let promotion = member.role == MemberRole::Member && role == MemberRole::Moderator;
    if !(owner_or_admin || promotion) {
        return Err(ApiError::denied(
            "moderators may only promote members to moderator; ask an owner",
        ));
    }
    if member.role == role {
        return Ok(pb::SetMemberRoleResponse {});
    }
    match state
        .store
        .set_member_role_keeping_owner(room_id, &target, role)
        .await
        .map_err(|e| room_gone(e, room_id))?
    {
        MembershipChange::Done => {}
        MembershipChange::NotMember => return Err(not_a_member(&target)),
        MembershipChange::LastOwner => return Err(last_owner(&target, "demoted")),
    }
    tracing::info!(room = %room_id, user = %target, by = %access.user_id, role = %role, "role changed");
    let detail = format!("{} -> {role}", member.role);
    audit::record(
        state,
        principal,
        "set_member_role",
        target.as_str(),
        Some(room_id),
        &detail,
    )
    .await;
    notify(
        state,
        room_id,
        member_event(
            room_id,
            &target,
            pb::MemberEventKind::RoleChanged,
            Some(role),
            Some(&access.user_id),
        ),
    );
    Ok(pb::SetMemberRoleResponse {})
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A room with its member count and the caller's membership fields.
async fn room_proto(
    state: &AppState,
    room: &RoomRecord,
    member: Option<&MemberRecord>,
) -> Result<pb::Room, ApiError> {
    let count = state.store.member_count(&room.id).await?;
    let mut proto = room_to_proto(room, count, member);
    super::live::fill_live_fields(state, room, &mut proto).await?;
    Ok(proto)
}

/// Returns an existing direct room to one of its pair, adding them back when they
/// had left it.
async fn reopen_direct(
    state: &AppState,
    room: RoomRecord,
    me: &UserId,
) -> Result<pb::Room, ApiError> {
    let mut member = state.store.get_member(&room.id, me).await?;
    if member.is_none() {
        let role = if room.created_by == *me {
            MemberRole::Owner
        } else {
            MemberRole::Member
        };
        match state.store.add_member(&room.id, me, role).await {
            Ok(added) => {
                tracing::info!(room = %room.id, user = %me, "rejoined direct room");
                notify(
                    state,
                    &room.id,
                    member_event(&room.id, me, pb::MemberEventKind::Joined, Some(role), None),
                );
                member = Some(added);
            }
            Err(StoreError::Conflict) => member = state.store.get_member(&room.id, me).await?,
            Err(e) => return Err(e.into()),
        }
    }
    room_proto(state, &room, member.as_ref()).await
}

/// The common start of every moderation RPC: the room, a moderator caller, and a
/// valid target who is not the caller.
async fn moderation(
    state: &AppState,
    principal: &Principal,
    room_id: &str,
    user_id: &str,
    verb: &str,
) -> Result<(RoomAccess, UserId), ApiError> {
    let access = room_access(state, principal, room_id).await?;
    require_not_direct(&access)?;
    let target = UserId::from(validate::id("user_id", user_id)?);
    access.require_moderator()?;
    if target == access.user_id {
        return Err(ApiError::invalid(format!(
            "user_id is you: you cannot {verb} yourself"
        )));
    }
    Ok((access, target))
}

/// Mutes (`Some(until)`) or unmutes (`None`) a member, and tells the room.
async fn set_mute(
    state: &AppState,
    access: &RoomAccess,
    target: &UserId,
    until: Option<i64>,
    verb: &str,
) -> Result<(), ApiError> {
    let room_id = &access.room.id;
    let member = require_target_member(state, room_id, target).await?;
    require_outranks(access, member.role, verb)?;
    match state.store.set_member_mute(room_id, target, until).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => return Err(not_a_member(target)),
        Err(e) => return Err(e.into()),
    }
    let kind = if until.is_some() {
        pb::MemberEventKind::Muted
    } else {
        pb::MemberEventKind::Unmuted
    };
    tracing::info!(room = %room_id, user = %target, by = %access.user_id, ?until, "{verb}d");
    notify(
        state,
        room_id,
        member_event(
            room_id,
            target,
            kind,
            Some(member.role),
            Some(&access.user_id),
        ),
    );
    Ok(())
}

/// Direct rooms have no moderation and no roles to change.
fn require_not_direct(access: &RoomAccess) -> Result<(), ApiError> {
    if access.room.kind == RoomKind::Direct {
        return Err(ApiError::failed_precondition(
            "direct rooms have no moderation; leave the room instead",
        ));
    }
    Ok(())
}

/// Moderators act on members; owners and server admins act on anyone.
fn require_outranks(access: &RoomAccess, target: MemberRole, verb: &str) -> Result<(), ApiError> {
    if access.server_admin || access.role() == Some(MemberRole::Owner) {
        return Ok(());
    }
    match access.role() {
        Some(mine) if mine > target => Ok(()),
        _ => Err(ApiError::denied(format!(
            "only an owner may {verb} a moderator or an owner of this room"
        ))),
    }
}

/// The target's membership; `not_found` when they are not a member.
async fn require_target_member(
    state: &AppState,
    room: &RoomId,
    target: &UserId,
) -> Result<MemberRecord, ApiError> {
    state
        .store
        .get_member(room, target)
        .await?
        .ok_or_else(|| not_a_member(target))
}

fn not_a_member(target: &UserId) -> ApiError {
    ApiError::not_found(format!("user `{target}` is not a member of this room"))
}

fn last_owner(target: &UserId, what: &str) -> ApiError {
    ApiError::failed_precondition(format!(
        "user `{target}` is the last owner of this room and cannot be {what} while other \
         members remain; make another member owner first"
    ))
}

/// A store error of a room that was loaded a moment ago: `NotFound` means it was
/// deleted in between.
fn room_gone(e: StoreError, room: &RoomId) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found(format!("room `{room}` not found")),
        other => other.into(),
    }
}

/// Tells the room's actor, if it is running; the notice may be lost.
fn notify(state: &AppState, room_id: &RoomId, notice: RoomNotice) {
    state.rooms.do_send(NotifyRoom {
        room_id: room_id.clone(),
        notice,
    });
}

fn member_event(
    room_id: &RoomId,
    user_id: &UserId,
    kind: pb::MemberEventKind,
    role: Option<MemberRole>,
    actor: Option<&UserId>,
) -> RoomNotice {
    RoomNotice::Member(pb::MemberEvent {
        room_id: room_id.0.clone(),
        user_id: user_id.0.clone(),
        kind: kind as i32,
        role: role.map_or(0, MemberRole::to_proto),
        actor_id: actor.map(|a| a.0.clone()).unwrap_or_default(),
    })
}

/// Tells the room a user is gone (kicked, banned, left), and ends their live
/// subscriptions to it with a `removed` push: through the room for the connections
/// it delivers to, and through the user's session for every connection of the user
/// (one that is lagging, catching up or re-subscribing is not registered with the
/// room at that moment).
fn removed(
    state: &AppState,
    room_id: &RoomId,
    user_id: &UserId,
    actor: Option<&UserId>,
    kind: pb::MemberEventKind,
    reason: pb::RemovedReason,
    message: String,
) {
    let notification = match reason {
        pb::RemovedReason::Kicked => Some(NotificationKind::Kicked),
        pb::RemovedReason::Banned => Some(NotificationKind::Banned),
        _ => None,
    };
    if let (Some(kind), Some(actor)) = (notification, actor) {
        super::notifications::deliver_later(
            state,
            super::notifications::room_notification(user_id, kind, actor, room_id, message.clone()),
        );
    }
    notify(
        state,
        room_id,
        member_event(room_id, user_id, kind, None, actor),
    );
    let frame = protocol::push(pb::server_frame::Kind::Removed(pb::RemovedEvent {
        room_id: room_id.0.clone(),
        reason: reason as i32,
        message: message.clone(),
    }));
    notify(
        state,
        room_id,
        RoomNotice::Removed {
            user_id: user_id.clone(),
            reason,
            message,
        },
    );
    state.sessions.do_send(SignalUser {
        user_id: user_id.clone(),
        signal: SessionSignal::Removed {
            room_id: room_id.clone(),
            frame: Arc::new(SharedFrame::new(frame)),
        },
    });
}

/// A title: trimmed, one line, 1–100 characters; direct rooms may have none.
fn title(kind: RoomKind, value: &str) -> Result<String, ApiError> {
    let title = value.trim();
    let min = usize::from(kind != RoomKind::Direct);
    validate::char_len("title", title, min, TITLE_MAX_CHARS)?;
    validate::single_line("title", title)?;
    Ok(title.to_owned())
}

/// A topic: trimmed, at most 1000 characters; line breaks and tabs are allowed.
fn topic(value: &str) -> Result<String, ApiError> {
    let topic = value.trim();
    validate::char_len("topic", topic, 0, TOPIC_MAX_CHARS)?;
    if topic
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\t'))
    {
        return Err(ApiError::invalid(
            "topic must not contain control characters other than line breaks and tabs",
        ));
    }
    validate::no_format_characters("topic", topic)?;
    Ok(topic.to_owned())
}

/// Longest history retention: 100 years (0 keeps history forever).
pub const RETENTION_MAX_SECONDS: u64 = 100 * 365 * 24 * 3600;

fn retention(seconds: u64) -> Result<u64, ApiError> {
    if seconds > RETENTION_MAX_SECONDS {
        return Err(ApiError::invalid(format!(
            "retention_seconds must be at most {RETENTION_MAX_SECONDS} (100 years); 0 keeps history forever"
        )));
    }
    Ok(seconds)
}

/// A kick or ban reason: trimmed, at most 500 characters.
fn reason(value: &str) -> Result<String, ApiError> {
    let reason = value.trim();
    validate::char_len("reason", reason, 0, REASON_MAX_CHARS)?;
    Ok(reason.to_owned())
}

fn reason_or(reason: String, default: &str) -> String {
    if reason.is_empty() {
        default.to_owned()
    } else {
        reason
    }
}

/// Now plus `seconds`, in Unix ms, saturating far in the future.
fn after_seconds(seconds: u64) -> i64 {
    let ms = i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    now_ms().saturating_add(ms)
}

/// The `member_ids` of a request: each a valid id, duplicates dropped, at most 100.
fn unique_user_ids(raw: &[String]) -> Result<Vec<UserId>, ApiError> {
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for (i, id) in raw.iter().enumerate() {
        validate::id(&format!("member_ids[{i}]"), id)?;
        if seen.insert(id.as_str()) {
            ids.push(UserId::from(id.as_str()));
        }
    }
    if ids.len() > CREATE_MEMBERS_MAX {
        return Err(ApiError::invalid(format!(
            "member_ids must name at most {CREATE_MEMBERS_MAX} users"
        )));
    }
    Ok(ids)
}

/// The other user of a direct room: exactly one id, not the caller's.
fn direct_partner(me: &UserId, member_ids: &[String]) -> Result<UserId, ApiError> {
    let [other] = member_ids else {
        return Err(ApiError::invalid(format!(
            "member_ids must name exactly one other user for a direct room (got {})",
            member_ids.len()
        )));
    };
    let other = UserId::from(validate::id("member_ids[0]", other)?);
    if other == *me {
        return Err(ApiError::invalid(
            "member_ids[0] is you: a direct room needs another user",
        ));
    }
    Ok(other)
}

/// The unique key of a pair's direct room: both ids, sorted, joined with `:`.
fn direct_key(a: &UserId, b: &UserId) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!("{first}:{second}")
}

/// `not_found` naming every id that is not a user.
async fn require_users_exist(state: &AppState, ids: &[UserId]) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Ok(());
    }
    let found: HashSet<UserId> = state
        .store
        .get_users(ids)
        .await?
        .into_iter()
        .map(|u| u.id)
        .collect();
    let missing: Vec<&str> = ids
        .iter()
        .filter(|id| !found.contains(*id))
        .map(UserId::as_str)
        .collect();
    match missing.as_slice() {
        [] => Ok(()),
        [one] => Err(ApiError::not_found(format!("user `{one}` not found"))),
        many => Err(ApiError::not_found(format!(
            "users not found: {}",
            many.iter()
                .map(|id| format!("`{id}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    #[test]
    fn direct_keys_ignore_order() {
        let (a, b) = (UserId::from("u_a"), UserId::from("u_b"));
        assert_eq!(direct_key(&a, &b), "u_a:u_b");
        assert_eq!(direct_key(&b, &a), "u_a:u_b");
    }

    #[test]
    fn direct_partner_is_one_other_user() {
        let me = UserId::from("u_me");
        assert_eq!(
            direct_partner(&me, &["u_x".into()]).expect("valid"),
            UserId::from("u_x")
        );
        assert!(direct_partner(&me, &[])
            .expect_err("none")
            .message
            .contains("exactly one"));
        assert!(direct_partner(&me, &["u_x".into(), "u_y".into()]).is_err());
        assert!(direct_partner(&me, &["u_me".into()])
            .expect_err("self")
            .message
            .contains("is you"));
    }

    #[test]
    fn titles_and_topics() {
        assert_eq!(title(RoomKind::Public, "  Lobby ").expect("valid"), "Lobby");
        assert_eq!(
            title(RoomKind::Public, " ").expect_err("empty").message,
            "title is required"
        );
        assert_eq!(title(RoomKind::Direct, "").expect("valid"), "");
        assert!(title(RoomKind::Private, "a\nb").is_err());
        assert!(title(RoomKind::Public, &"é".repeat(100)).is_ok());
        assert_eq!(
            title(RoomKind::Public, &"x".repeat(101))
                .expect_err("long")
                .message,
            "title must be at most 100 characters"
        );
        assert_eq!(topic("line 1\nline 2").expect("valid"), "line 1\nline 2");
        assert!(topic("bell\u{7}").is_err());
        assert_eq!(
            topic(&"x".repeat(1001)).expect_err("long").code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn member_ids_are_checked_and_deduplicated() {
        let ids = unique_user_ids(&["u_b".into(), "u_a".into(), "u_b".into()]).expect("valid");
        assert_eq!(ids, vec![UserId::from("u_b"), UserId::from("u_a")]);
        assert_eq!(
            unique_user_ids(&["u_a".into(), "a b".into()])
                .expect_err("bad id")
                .message,
            "member_ids[1] is not a valid id"
        );
        let many: Vec<String> = (0..101).map(|i| format!("u_{i}")).collect();
        assert!(unique_user_ids(&many).is_err());
    }

    #[test]
    fn durations_saturate() {
        let soon = after_seconds(1);
        assert!(soon > now_ms() && soon <= now_ms() + 1000);
        assert_eq!(after_seconds(u64::MAX), i64::MAX);
    }
}
