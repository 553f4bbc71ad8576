//! Who may read and who may write a room. Every RoomService call and every
//! WebSocket frame that touches a room asks here first; the decision itself is made
//! by the auth actors ([`AuthorizeRoom`]), with the rules below.

use std::sync::Arc;

use super::{AppState, Principal};
use crate::{
    actors::authenticator::AuthorizeRoom,
    error::ApiError,
    ids::{now_ms, RoomId, UserId},
    model::{MemberRole, RoomKind},
    store::{MemberFacts, MemberRecord, RoomRecord, Store, StoreError},
};

/// A room and the caller's membership in it.
#[derive(Debug, Clone)]
pub struct RoomAccess {
    /// Shared with the store's access cache: a check copies no room record.
    pub room: Arc<RoomRecord>,
    pub member: Option<MemberRecord>,
    pub user_id: UserId,
    pub server_admin: bool,
}

impl RoomAccess {
    /// The caller's role in the room, if a member.
    pub fn role(&self) -> Option<MemberRole> {
        self.member.as_ref().map(|m| m.role)
    }

    /// Owners, moderators and server admins moderate; in direct rooms only server
    /// admins do (the two parties are equals).
    pub fn is_moderator(&self) -> bool {
        if self.room.kind == RoomKind::Direct {
            return self.server_admin;
        }
        self.server_admin || self.role().is_some_and(MemberRole::is_moderator)
    }

    /// Members may read; so may anyone for public and broadcast rooms.
    pub fn can_read(&self) -> bool {
        self.member.is_some()
            || self.server_admin
            || matches!(self.room.kind, RoomKind::Public | RoomKind::Broadcast)
    }

    /// Fails unless the caller may read.
    pub fn require_read(&self) -> Result<(), ApiError> {
        if self.can_read() {
            Ok(())
        } else {
            Err(ApiError::denied("you are not a member of this room"))
        }
    }

    /// Fails unless the caller is a member.
    pub fn require_member(&self) -> Result<&MemberRecord, ApiError> {
        self.member
            .as_ref()
            .ok_or_else(|| ApiError::denied("you are not a member of this room"))
    }

    /// Fails unless the caller may send now: a member, not muted, and a host in
    /// broadcast rooms.
    pub fn require_send(&self) -> Result<(), ApiError> {
        let member = self.require_member()?;
        if member.is_muted(now_ms()) {
            return Err(ApiError::denied("you are muted in this room"));
        }
        if self.room.kind == RoomKind::Broadcast && !member.role.is_moderator() {
            return Err(ApiError::denied("only hosts may send in a broadcast room"));
        }
        Ok(())
    }

    /// Fails unless the caller moderates the room.
    pub fn require_moderator(&self) -> Result<(), ApiError> {
        if self.is_moderator() {
            Ok(())
        } else {
            Err(ApiError::denied(
                "only the room's owners and moderators may do this",
            ))
        }
    }
}

/// The caller's access to a room, decided by the auth actors (every ACL decision
/// goes through them); `not_found` when the room does not exist, and also when it is
/// private and the caller may not know it exists. Read fresh from the store: the
/// room's `last_seq` and the membership's `last_read_seq` are current.
pub async fn room_access(
    state: &AppState,
    principal: &Principal,
    room_id: &str,
) -> Result<RoomAccess, ApiError> {
    authorize(state, principal, room_id, false).await
}

/// The same decision as [`room_access`], from the facts the store keeps in memory
/// (exact: every change to them drops them at once) where it can: for the hot
/// paths (sends, subscriptions, typing), which need no query when the facts are
/// cached. The access's `room.last_seq` and `member.last_read_seq` may be old; use
/// [`room_access`] where they are shown.
pub async fn check_room_access(
    state: &AppState,
    principal: &Principal,
    room_id: &str,
) -> Result<RoomAccess, ApiError> {
    authorize(state, principal, room_id, true).await
}

async fn authorize(
    state: &AppState,
    principal: &Principal,
    room_id: &str,
    cached: bool,
) -> Result<RoomAccess, ApiError> {
    // On the caller's own arbiter: no round trip to another thread per check.
    state
        .auth
        .send_local(AuthorizeRoom {
            principal: principal.clone(),
            room_id: room_id.to_owned(),
            cached,
        })
        .await
}

/// Loads the room and the caller's membership, bans and invitations (`cached`:
/// from the store's cache where it holds them) and decides. Runs inside the auth
/// actors (see [`AuthorizeRoom`]).
pub async fn load_room_access(
    store: &Store,
    principal: &Principal,
    room_id: &str,
    cached: bool,
) -> Result<RoomAccess, ApiError> {
    let user_id = principal.require_user()?.clone();
    let room_id = RoomId::from(super::validate::id("room_id", room_id)?);
    let not_found = |e| match e {
        StoreError::NotFound => ApiError::not_found(format!("room `{room_id}` not found")),
        other => other.into(),
    };
    let (room, facts) = if cached {
        let room = store.room_for_access(&room_id).await.map_err(not_found)?;
        let facts = store.member_facts(&room, &user_id).await?;
        (room, facts.as_ref().clone())
    } else {
        let room = Arc::new(store.get_room(&room_id).await.map_err(not_found)?);
        let member = store.get_member(&room_id, &user_id).await?;
        let mut facts = MemberFacts {
            member,
            ban: None,
            invited: false,
        };
        if facts.member.is_none() {
            facts.ban = store.active_ban(&room_id, &user_id, now_ms()).await?;
            let private = !matches!(room.kind, RoomKind::Public | RoomKind::Broadcast);
            if facts.ban.is_none() && private && !principal.is_admin() {
                facts.invited = store.has_invite(&room_id, &user_id).await?;
            }
        }
        (room, facts)
    };
    decide(principal, user_id, room, facts)
}

/// The rules, over the facts.
fn decide(
    principal: &Principal,
    user_id: UserId,
    room: Arc<RoomRecord>,
    facts: MemberFacts,
) -> Result<RoomAccess, ApiError> {
    if facts.member.is_none() {
        let now = now_ms();
        if let Some(ban) = facts.ban.filter(|b| b.expires_at.is_none_or(|t| t > now)) {
            let until = ban.expires_at.map_or(String::from(" until lifted"), |t| {
                format!(" until {t} (Unix ms)")
            });
            return Err(ApiError::denied(format!(
                "you are banned from this room{until}"
            )));
        }
    }
    let access = RoomAccess {
        room,
        member: facts.member,
        user_id,
        server_admin: principal.is_admin(),
    };
    if !access.can_read()
        && !matches!(access.room.kind, RoomKind::Public | RoomKind::Broadcast)
        && !facts.invited
    {
        // Private rooms stay invisible to outsiders, unless invited.
        return Err(ApiError::not_found(format!(
            "room `{}` not found",
            access.room.id
        )));
    }
    Ok(access)
}
