//! Invitations from the invitee's side: list the pending ones, accept (join the
//! room) or decline. RoomService.InviteMember makes them; each one also arrives as
//! an INVITATION notification (see [`invited`]).

use super::{
    notifications::{self, room_notification},
    rooms, validate, AppState, Principal,
};
use crate::{
    error::ApiError,
    ids::{RoomId, UserId},
    model::timestamp,
    proto::v1 as pb,
    store::{NotificationKind, StoreError},
};

/// ListInvitations page size when the request gives none.
pub const DEFAULT_INVITATION_PAGE: u32 = 50;
/// Largest ListInvitations page.
pub const MAX_INVITATION_PAGE: u32 = 200;

/// Called by InviteMember once a new invitation is stored: the invitee gets an
/// INVITATION notification carrying the room's title. Awaited, so that the
/// notification exists when InviteMember answers; a failure is logged, not
/// returned (the invitation itself stands).
pub async fn invited(state: &AppState, room: &RoomId, title: &str, user: &UserId, by: &UserId) {
    let new = room_notification(
        user,
        NotificationKind::Invitation,
        by,
        room,
        title.to_owned(),
    );
    if let Err(e) = notifications::deliver(state, new).await {
        tracing::warn!(room = %room, user = %user, error = %e.message, "invitation notification not stored");
    }
}

fn page_cursor(token: &str) -> Result<Option<(i64, String)>, ApiError> {
    let Some(cursor) = validate::decode_page_token("page_token", token)? else {
        return Ok(None);
    };
    let invalid = || ApiError::invalid("page_token is not a token this server returned");
    let (at, room) = cursor.split_once(':').ok_or_else(invalid)?;
    Ok(Some((at.parse().map_err(|_| invalid())?, room.to_owned())))
}

/// ListInvitations: the caller's pending invitations, newest first.
pub async fn list_invitations(
    state: &AppState,
    principal: &Principal,
    req: pb::ListInvitationsRequest,
) -> Result<pb::ListInvitationsResponse, ApiError> {
    let user = principal.require_user()?;
    let limit = validate::page_size(
        "page_size",
        req.page_size,
        DEFAULT_INVITATION_PAGE,
        MAX_INVITATION_PAGE,
    )?;
    let after = page_cursor(&req.page_token)?;
    let mut page = state.store.list_invitations(user, after, limit + 1).await?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let next_page_token = match page.last() {
        Some(last) if more => {
            validate::encode_page_token(&format!("{}:{}", last.created_at, last.room_id))
        }
        _ => String::new(),
    };
    Ok(pb::ListInvitationsResponse {
        invitations: page
            .into_iter()
            .map(|i| pb::Invitation {
                room_id: i.room_id.0,
                room_kind: i.room_kind.to_proto(),
                room_title: i.room_title,
                invited_by: i.invited_by.0,
                created_at: Some(timestamp(i.created_at)),
            })
            .collect(),
        next_page_token,
    })
}

fn no_invitation(room: &RoomId) -> ApiError {
    ApiError::not_found(format!("no pending invitation to room `{room}`"))
}

/// AcceptInvitation: joins the room (JoinRoom's rules, which use the invitation up).
pub async fn accept_invitation(
    state: &AppState,
    principal: &Principal,
    req: pb::AcceptInvitationRequest,
) -> Result<pb::AcceptInvitationResponse, ApiError> {
    let user = principal.require_user()?;
    let room = RoomId(validate::id("room_id", &req.room_id)?.to_owned());
    if !state.store.has_invite(&room, user).await? {
        return Err(no_invitation(&room));
    }
    let joined = rooms::join_room(
        state,
        principal,
        pb::JoinRoomRequest {
            room_id: room.0.clone(),
        },
    )
    .await?;
    tracing::info!(room = %room, user = %user, "invitation accepted");
    Ok(pb::AcceptInvitationResponse { room: joined.room })
}

/// DeclineInvitation: removes the invitation; the room is not joined.
pub async fn decline_invitation(
    state: &AppState,
    principal: &Principal,
    req: pb::DeclineInvitationRequest,
) -> Result<pb::DeclineInvitationResponse, ApiError> {
    let user = principal.require_user()?;
    let room = RoomId(validate::id("room_id", &req.room_id)?.to_owned());
    match state.store.delete_invitation(&room, user).await {
        Ok(()) => {
            tracing::info!(room = %room, user = %user, "invitation declined");
            Ok(pb::DeclineInvitationResponse {})
        }
        Err(StoreError::NotFound) => Err(no_invitation(&room)),
        Err(e) => Err(e.into()),
    }
}
