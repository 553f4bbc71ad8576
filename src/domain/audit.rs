//! The audit log: moderation actions (kick, ban, unban, mute, unmute, role
//! changes, message deletions by moderators) and admin actions, written after the
//! action succeeded and listed through `AdminService.ListAuditLog`.

use super::{AppState, Principal};
use crate::{ids::RoomId, store::NewAudit};

/// Writes one entry: `principal` did `action` to `target` (in `room`). The action
/// has already happened, so a failed write is logged, not returned: the caller's
/// answer must say what happened to their request, and it succeeded.
pub async fn record(
    state: &AppState,
    principal: &Principal,
    action: &str,
    target: &str,
    room: Option<&RoomId>,
    detail: &str,
) {
    let entry = NewAudit {
        actor_id: principal.user_id.as_str(),
        action,
        target,
        room_id: room.map_or("", RoomId::as_str),
        detail,
    };
    if let Err(e) = state.store.append_audit(entry).await {
        tracing::error!(
            actor = %principal.user_id,
            action,
            target,
            error = %e,
            "cannot write the audit log entry"
        );
    }
}
