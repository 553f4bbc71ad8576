//! Live rooms (docs/live-rooms.md): the host controls as the API shows them, the
//! room fields only the room actor knows (pinned message, viewer count, newest
//! sequence), and the RPCs that change them (UpdateLiveControls, PinMessage). The
//! controls themselves are enforced by the room actor (`actors::live_state`).

use super::{access::room_access, messages::room_actor, AppState, Principal};
use crate::{
    actors::room::{ControlsChanged, GetLiveSnapshot, Pin, RoomNotice},
    error::ApiError,
    model::RoomKind,
    proto::v1 as pb,
    store::{LiveControlsRecord, RoomRecord, StoreError},
};

/// Longest slow-mode interval: a day.
pub const MAX_SLOW_MODE_SECONDS: u32 = 86_400;

/// The controls as the API shows them.
pub fn controls_to_proto(c: &LiveControlsRecord) -> pb::LiveControls {
    pb::LiveControls {
        anonymous_viewers: c.anonymous_viewers,
        slow_mode_seconds: c.slow_mode_seconds,
        host_only: c.host_only,
        rate_limit_per_minute: c.rate_limit_per_minute,
        max_length: c.max_length,
        word_filter: c.word_filter,
    }
}

/// Checks controls given by a client.
pub fn controls_from_proto(c: &pb::LiveControls) -> Result<LiveControlsRecord, ApiError> {
    if c.slow_mode_seconds > MAX_SLOW_MODE_SECONDS {
        return Err(ApiError::invalid(format!(
            "live.slow_mode_seconds must be at most {MAX_SLOW_MODE_SECONDS}"
        )));
    }
    Ok(LiveControlsRecord {
        anonymous_viewers: c.anonymous_viewers,
        slow_mode_seconds: c.slow_mode_seconds,
        host_only: c.host_only,
        rate_limit_per_minute: c.rate_limit_per_minute,
        max_length: c.max_length,
        word_filter: c.word_filter,
    })
}

/// Fills in a live room's fields of `room` (controls, pinned message, viewer
/// count, and the newest sequence its actor gave out: the stored one is the
/// reservation). Chat rooms are left as they are.
pub async fn fill_live_fields(
    state: &AppState,
    record: &RoomRecord,
    room: &mut pb::Room,
) -> Result<(), ApiError> {
    let Some(live) = state.store.get_live_room(&record.id).await? else {
        return Ok(());
    };
    room.live = Some(controls_to_proto(&live.controls));
    room.pinned = live
        .pinned
        .as_deref()
        .and_then(|json| serde_json::from_str(json).ok());
    let actor = room_actor(state, &record.id).await?;
    if let Ok(Ok(snapshot)) = actor.send(GetLiveSnapshot).await {
        if snapshot.live {
            room.last_seq = snapshot.last_seq;
            room.pinned = snapshot.pinned;
            room.viewer_count = snapshot.viewers;
            if room.my_role != 0 {
                room.unread_count = room.last_seq.saturating_sub(room.last_read_seq);
            }
        }
    }
    Ok(())
}

/// UpdateLiveControls: moderators replace a live room's controls; subscribers get
/// a `room_updated` push.
pub async fn update_live_controls(
    state: &AppState,
    principal: &Principal,
    req: pb::UpdateLiveControlsRequest,
) -> Result<pb::UpdateLiveControlsResponse, ApiError> {
    let controls = controls_from_proto(
        req.controls
            .as_ref()
            .ok_or_else(|| ApiError::invalid("controls is required"))?,
    )?;
    let access = room_access(state, principal, &req.room_id).await?;
    access.require_moderator()?;
    let room_id = access.room.id.clone();
    match state.store.set_live_controls(&room_id, &controls).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::failed_precondition(
                "not a live room: only live rooms have live controls",
            ))
        }
        Err(e) => return Err(e.into()),
    }
    let actor = room_actor(state, &room_id).await?;
    actor.do_send(ControlsChanged { controls });
    tracing::info!(room = %room_id, user = %access.user_id, ?controls, "live controls changed");
    super::audit::record(
        state,
        principal,
        "update_live_controls",
        &format!("{controls:?}"),
        Some(&room_id),
        "",
    )
    .await;
    let count = state.store.member_count(&room_id).await?;
    let mut pushed = super::convert::room_to_proto(&access.room, count, None);
    fill_live_fields(state, &access.room, &mut pushed).await?;
    pushed.viewer_count = 0;
    actor.do_send(crate::actors::room::Notify(RoomNotice::Updated(Box::new(
        pushed,
    ))));
    let mut room = super::convert::room_to_proto(&access.room, count, access.member.as_ref());
    fill_live_fields(state, &access.room, &mut room).await?;
    Ok(pb::UpdateLiveControlsResponse { room: Some(room) })
}

/// PinMessage: moderators pin a message the live room still holds (seq 0 unpins).
pub async fn pin_message(
    state: &AppState,
    principal: &Principal,
    req: pb::PinMessageRequest,
) -> Result<pb::PinMessageResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    access.require_moderator()?;
    if !matches!(access.room.kind, RoomKind::Public | RoomKind::Broadcast) {
        return Err(ApiError::failed_precondition(
            "only live rooms have pinned messages",
        ));
    }
    let actor = room_actor(state, &access.room.id).await?;
    let pinned = actor.send(Pin { seq: req.seq }).await??;
    tracing::info!(room = %access.room.id, user = %access.user_id, seq = req.seq, "pinned message changed");
    Ok(pb::PinMessageResponse { pinned })
}
