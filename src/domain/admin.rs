//! `AdminService`: the operator's API. Every call needs the admin role (an admin's
//! token or an API key); the auth actors refuse everyone else before a handler
//! runs, and each handler checks again. Changes are written to the audit log.

use std::sync::Arc;

use super::{
    access_rules::{validate_rule, Effect},
    audit, drain, publish, validate, AppState, Principal,
};
use crate::{
    actors::{
        room::Deleted,
        room_registry::FindRoom,
        session_registry::{
            describe_connections, ListSessions, OnlineUserIds, SignalEveryone, SignalOneConnection,
            SignalUser,
        },
        user_session::SessionSignal,
    },
    cluster::presence::UsersElsewhere,
    error::ApiError,
    ids::{now_ms, RoomId, UserId},
    model::timestamp,
    proto::v1 as pb,
    protocol::{self, SharedFrame},
    store::{AccessRuleFields, AccessRuleRecord, StoreError},
};

/// Longest announcement.
pub const ANNOUNCEMENT_MAX_CHARS: usize = 2000;
/// Longest suspension or deletion reason.
pub const REASON_MAX_CHARS: usize = 500;
/// Default audit log page.
pub const AUDIT_PAGE_DEFAULT: u32 = 50;
/// Largest audit log page.
pub const AUDIT_PAGE_MAX: u32 = 200;
/// Members of a room looked at when counting who is online.
pub const ONLINE_COUNT_MEMBERS_MAX: u32 = 10_000;
/// The window of GetRoomStats' message rate.
const RATE_WINDOW_MS: i64 = 60_000;

fn user_id(field: &str, value: &str) -> Result<UserId, ApiError> {
    Ok(UserId::from(validate::id(field, value.trim())?))
}

async fn require_user_exists(state: &AppState, user: &UserId) -> Result<(), ApiError> {
    match state.store.get_user(user).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound) => Err(ApiError::not_found(format!("no user `{user}`"))),
        Err(e) => Err(e.into()),
    }
}

fn reason(value: &str) -> Result<String, ApiError> {
    let reason = value.trim();
    validate::char_len("reason", reason, 0, REASON_MAX_CHARS)?;
    Ok(reason.to_owned())
}

/// ListConnections.
pub async fn list_connections(
    state: &AppState,
    principal: &Principal,
    req: pb::ListConnectionsRequest,
) -> Result<pb::ListConnectionsResponse, ApiError> {
    principal.require_admin()?;
    let filter = match req.user_id.trim() {
        "" => None,
        id => Some(user_id("user_id", id)?),
    };
    let live = state
        .sessions
        .send(ListSessions { user_id: filter })
        .await?;
    let connections = describe_connections(&live)
        .await
        .into_iter()
        .map(|c| pb::LiveConnection {
            connection_id: c.conn_id.to_string(),
            user_id: c.user_id.0,
            session_id: c.session_id.map(|s| s.0).unwrap_or_default(),
            transport: c.transport,
            remote_address: c.remote_address.unwrap_or_default(),
            connected_at: Some(timestamp(c.attached_at)),
            subscriptions: c.subscriptions.into_iter().map(|r| r.0).collect(),
        })
        .collect();
    Ok(pb::ListConnectionsResponse {
        connections,
        users_online: live.users_online as u64,
    })
}

/// GetRoomStats.
pub async fn get_room_stats(
    state: &AppState,
    principal: &Principal,
    req: pb::GetRoomStatsRequest,
) -> Result<pb::GetRoomStatsResponse, ApiError> {
    principal.require_admin()?;
    let room_id = RoomId::from(validate::id("room_id", req.room_id.trim())?);
    let room = match state.store.get_room(&room_id).await {
        Ok(room) => room,
        Err(StoreError::NotFound) => return Err(ApiError::not_found("room not found")),
        Err(e) => return Err(e.into()),
    };
    let members = state.store.member_count(&room_id).await?;
    let ids = state
        .store
        .member_ids(&room_id, ONLINE_COUNT_MEMBERS_MAX)
        .await?;
    let online = crate::cluster::presence::online_anywhere(state, ids).await?;
    let recent = state
        .store
        .messages_since(&room_id, now_ms() - RATE_WINDOW_MS)
        .await?;
    let loaded = state
        .rooms
        .send(FindRoom {
            room_id: room_id.clone(),
        })
        .await?
        .is_some();
    Ok(pb::GetRoomStatsResponse {
        room_id: room_id.0,
        members,
        members_online: online.len() as u64,
        last_seq: room.last_seq,
        messages_last_minute: recent,
        messages_per_second: recent as f64 / (RATE_WINDOW_MS as f64 / 1000.0),
        loaded,
    })
}

/// RevokeUserSessions.
pub async fn revoke_user_sessions(
    state: &AppState,
    principal: &Principal,
    req: pb::RevokeUserSessionsRequest,
) -> Result<pb::RevokeUserSessionsResponse, ApiError> {
    principal.require_admin()?;
    let user = user_id("user_id", &req.user_id)?;
    require_user_exists(state, &user).await?;
    let revoked = state.store.revoke_user_sessions(&user).await?;
    crate::cluster::control::sign_out(&state.bus, &user, None);
    tracing::info!(user = %user, by = %principal.user_id, revoked, "sessions revoked by an admin");
    let detail = format!("sessions ended: {revoked}");
    audit::record(
        state,
        principal,
        "revoke_sessions",
        user.as_str(),
        None,
        &detail,
    )
    .await;
    Ok(pb::RevokeUserSessionsResponse {
        sessions_revoked: revoked,
    })
}

/// SuspendUser.
pub async fn suspend_user(
    state: &AppState,
    principal: &Principal,
    req: pb::SuspendUserRequest,
) -> Result<pb::SuspendUserResponse, ApiError> {
    principal.require_admin()?;
    let user = user_id("user_id", &req.user_id)?;
    let reason = reason(&req.reason)?;
    if user == principal.user_id {
        return Err(ApiError::failed_precondition(
            "an admin cannot suspend their own account",
        ));
    }
    require_user_exists(state, &user).await?;
    state
        .store
        .suspend_user(&user, &principal.user_id, &reason)
        .await?;
    // The suspension alone refuses every token from now on; ending the sessions
    // also kills the refresh tokens, and the signal closes live connections.
    state.store.revoke_user_sessions(&user).await?;
    crate::cluster::control::sign_out(&state.bus, &user, None);
    tracing::info!(user = %user, by = %principal.user_id, "account suspended");
    audit::record(
        state,
        principal,
        "suspend_user",
        user.as_str(),
        None,
        &reason,
    )
    .await;
    Ok(pb::SuspendUserResponse {})
}

/// ReinstateUser.
pub async fn reinstate_user(
    state: &AppState,
    principal: &Principal,
    req: pb::ReinstateUserRequest,
) -> Result<pb::ReinstateUserResponse, ApiError> {
    principal.require_admin()?;
    let user = user_id("user_id", &req.user_id)?;
    match state.store.reinstate_user(&user).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!(
                "user `{user}` is not suspended"
            )))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user = %user, by = %principal.user_id, "account reinstated");
    audit::record(state, principal, "reinstate_user", user.as_str(), None, "").await;
    Ok(pb::ReinstateUserResponse {})
}

/// DeleteRoom.
pub async fn delete_room(
    state: &AppState,
    principal: &Principal,
    req: pb::DeleteRoomRequest,
) -> Result<pb::DeleteRoomResponse, ApiError> {
    principal.require_admin()?;
    let room_id = RoomId::from(validate::id("room_id", req.room_id.trim())?);
    let reason = reason(&req.reason)?;
    let members = match state.store.delete_room(&room_id).await {
        Ok(members) => members,
        Err(StoreError::NotFound) => return Err(ApiError::not_found("room not found")),
        Err(e) => return Err(e.into()),
    };
    let message = if reason.is_empty() {
        "the room was deleted by an admin".to_owned()
    } else {
        reason.clone()
    };
    let frame = Arc::new(SharedFrame::new(protocol::push(
        pb::server_frame::Kind::Removed(pb::RemovedEvent {
            room_id: room_id.0.clone(),
            reason: pb::RemovedReason::RoomDeleted as i32,
            message,
        }),
    )));
    // Every subscriber the room delivers to, members or not...
    if let Some(room) = state
        .rooms
        .send(FindRoom {
            room_id: room_id.clone(),
        })
        .await?
    {
        room.send(Deleted {
            frame: frame.clone(),
        })
        .await?;
    }
    // ...and the members' connections the room does not hold right now (lagging,
    // catching up, re-registering).
    for user_id in &members {
        state.sessions.do_send(SignalUser {
            user_id: user_id.clone(),
            signal: SessionSignal::Removed {
                room_id: room_id.clone(),
                frame: frame.clone(),
            },
        });
    }
    tracing::info!(room = %room_id, by = %principal.user_id, members = members.len(), "room deleted");
    audit::record(
        state,
        principal,
        "delete_room",
        room_id.as_str(),
        Some(&room_id),
        &reason,
    )
    .await;
    Ok(pb::DeleteRoomResponse {})
}

/// GetConfig.
pub async fn get_config(
    state: &AppState,
    principal: &Principal,
    _req: pb::GetConfigRequest,
) -> Result<pb::GetConfigResponse, ApiError> {
    principal.require_admin()?;
    Ok(pb::GetConfigResponse {
        toml: state.settings.to_masked_toml(),
    })
}

/// Announce.
pub async fn announce(
    state: &AppState,
    principal: &Principal,
    req: pb::AnnounceRequest,
) -> Result<pb::AnnounceResponse, ApiError> {
    principal.require_admin()?;
    let text = req.text.trim();
    validate::char_len("text", text, 1, ANNOUNCEMENT_MAX_CHARS)?;
    validate::no_format_characters("text", text)?;
    let push = protocol::push(pb::server_frame::Kind::Announcement(pb::Announcement {
        text: text.to_owned(),
        sender_id: principal.user_id.0.clone(),
    }));
    let frame = Arc::new(SharedFrame::new(push.clone()));
    // This node's connections directly (the count is exact); the other nodes'
    // through the control topic, whose listener here skips what this node
    // published, so no connection gets it twice.
    let reached_here = state
        .sessions
        .send(SignalEveryone {
            signal: SessionSignal::Announcement { frame },
        })
        .await?;
    let mut reached_elsewhere = 0;
    if state.bus.is_shared() {
        crate::cluster::control::announce(&state.bus, push);
        // The others' users as their last presence share said, less those this
        // node reached already (a user connected to several nodes counts once).
        let here: std::collections::HashSet<UserId> = state
            .sessions
            .send(OnlineUserIds)
            .await?
            .into_iter()
            .collect();
        // A board that is restarting knows nobody elsewhere for a moment.
        let elsewhere = state
            .presence
            .send(UsersElsewhere)
            .await
            .unwrap_or_default();
        reached_elsewhere = elsewhere.difference(&here).count();
    }
    let reached = reached_here + reached_elsewhere;
    tracing::info!(by = %principal.user_id, users = reached, here = reached_here, "announcement sent");
    audit::record(state, principal, "announce", "", None, text).await;
    Ok(pb::AnnounceResponse {
        users_reached: reached as u64,
    })
}

/// ListAuditLog.
pub async fn list_audit_log(
    state: &AppState,
    principal: &Principal,
    req: pb::ListAuditLogRequest,
) -> Result<pb::ListAuditLogResponse, ApiError> {
    principal.require_admin()?;
    let limit = validate::page_size(
        "page_size",
        req.page_size,
        AUDIT_PAGE_DEFAULT,
        AUDIT_PAGE_MAX,
    )?;
    let cursor = validate::decode_page_token("page_token", &req.page_token)?;
    let before = match &cursor {
        None => None,
        Some(text) => {
            let bad = || ApiError::invalid("page_token is not a token this server returned");
            let (at, id) = text.split_once('/').ok_or_else(bad)?;
            Some((at.parse::<i64>().map_err(|_| bad())?, id.to_owned()))
        }
    };
    let action = req.action.trim();
    let mut rows = state
        .store
        .list_audit(
            before.as_ref().map(|(at, id)| (*at, id.as_str())),
            (!action.is_empty()).then_some(action),
            limit + 1,
        )
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_page_token = match rows.last() {
        Some(last) if more => validate::encode_page_token(&format!("{}/{}", last.at, last.id)),
        _ => String::new(),
    };
    Ok(pb::ListAuditLogResponse {
        entries: rows
            .into_iter()
            .map(|r| pb::AuditEntry {
                id: r.id,
                at: Some(timestamp(r.at)),
                actor_id: r.actor_id,
                action: r.action,
                target: r.target,
                room_id: r.room_id,
                detail: r.detail,
            })
            .collect(),
        next_page_token,
    })
}

fn rule_to_proto(r: AccessRuleRecord) -> pb::AccessRule {
    pb::AccessRule {
        id: r.id,
        role: r.role,
        operation: r.operation,
        effect: r.effect,
        priority: r.priority,
        description: r.description,
        created_by: r.created_by,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
    }
}

fn rule_fields(
    role: &str,
    operation: &str,
    effect: &str,
    priority: i64,
    description: &str,
) -> Result<AccessRuleFields, ApiError> {
    let (role, operation, effect, priority, description) =
        validate_rule(role, operation, effect, priority, description)?;
    Ok(AccessRuleFields {
        role,
        operation,
        effect: Effect::as_str(effect).to_owned(),
        priority,
        description,
    })
}

fn describe_rule(f: &AccessRuleFields) -> String {
    format!(
        "{} {} for {} (priority {})",
        f.effect, f.operation, f.role, f.priority
    )
}

/// ListAccessRules.
pub async fn list_access_rules(
    state: &AppState,
    principal: &Principal,
    _req: pb::ListAccessRulesRequest,
) -> Result<pb::ListAccessRulesResponse, ApiError> {
    principal.require_admin()?;
    let mut rules = state.store.list_access_rules().await?;
    // Evaluation order: priority, then deny before allow.
    rules.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then((a.effect == "allow").cmp(&(b.effect == "allow")))
    });
    Ok(pb::ListAccessRulesResponse {
        rules: rules.into_iter().map(rule_to_proto).collect(),
    })
}

/// CreateAccessRule.
pub async fn create_access_rule(
    state: &AppState,
    principal: &Principal,
    req: pb::CreateAccessRuleRequest,
) -> Result<pb::CreateAccessRuleResponse, ApiError> {
    principal.require_admin()?;
    let fields = rule_fields(
        &req.role,
        &req.operation,
        &req.effect,
        req.priority,
        &req.description,
    )?;
    let rule = state
        .store
        .create_access_rule(&fields, &principal.user_id)
        .await?;
    state.auth.reload_rules().await?;
    tracing::info!(rule = %rule.id, by = %principal.user_id, "access rule created");
    audit::record(
        state,
        principal,
        "create_access_rule",
        &rule.id,
        None,
        &describe_rule(&fields),
    )
    .await;
    Ok(pb::CreateAccessRuleResponse {
        rule: Some(rule_to_proto(rule)),
    })
}

/// UpdateAccessRule.
pub async fn update_access_rule(
    state: &AppState,
    principal: &Principal,
    req: pb::UpdateAccessRuleRequest,
) -> Result<pb::UpdateAccessRuleResponse, ApiError> {
    principal.require_admin()?;
    let id = validate::id("id", req.id.trim())?.to_owned();
    let fields = rule_fields(
        &req.role,
        &req.operation,
        &req.effect,
        req.priority,
        &req.description,
    )?;
    let rule = match state.store.update_access_rule(&id, &fields).await {
        Ok(rule) => rule,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!("no access rule `{id}`")))
        }
        Err(e) => return Err(e.into()),
    };
    state.auth.reload_rules().await?;
    tracing::info!(rule = %id, by = %principal.user_id, "access rule updated");
    audit::record(
        state,
        principal,
        "update_access_rule",
        &id,
        None,
        &describe_rule(&fields),
    )
    .await;
    Ok(pb::UpdateAccessRuleResponse {
        rule: Some(rule_to_proto(rule)),
    })
}

/// DeleteAccessRule.
pub async fn delete_access_rule(
    state: &AppState,
    principal: &Principal,
    req: pb::DeleteAccessRuleRequest,
) -> Result<pb::DeleteAccessRuleResponse, ApiError> {
    principal.require_admin()?;
    let id = validate::id("id", req.id.trim())?.to_owned();
    match state.store.delete_access_rule(&id).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!("no access rule `{id}`")))
        }
        Err(e) => return Err(e.into()),
    }
    state.auth.reload_rules().await?;
    tracing::info!(rule = %id, by = %principal.user_id, "access rule deleted");
    audit::record(state, principal, "delete_access_rule", &id, None, "").await;
    Ok(pb::DeleteAccessRuleResponse {})
}

/// DisconnectConnection: closes one live connection with 4504 (disconnected).
pub async fn disconnect_connection(
    state: &AppState,
    principal: &Principal,
    req: pb::DisconnectConnectionRequest,
) -> Result<pb::DisconnectConnectionResponse, ApiError> {
    principal.require_admin()?;
    let raw = req.connection_id.trim();
    let conn_id: crate::actors::room::ConnectionId = raw.parse().map_err(|_| {
        ApiError::invalid(format!(
            "connection_id: `{raw}` is not a connection id as ListConnections lists them"
        ))
    })?;
    let reason = req.reason.trim();
    validate::char_len("reason", reason, 0, publish::DISCONNECT_REASON_MAX_CHARS)?;
    validate::single_line("reason", reason)?;
    let reason = if reason.is_empty() {
        "disconnected by an administrator".to_owned()
    } else {
        reason.to_owned()
    };
    let user = state
        .sessions
        .send(SignalOneConnection {
            conn_id,
            signal: SessionSignal::Disconnected {
                reason: reason.clone(),
            },
        })
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("no live connection `{conn_id}` on this node"))
        })?;
    tracing::info!(connection = conn_id, user = %user, by = %principal.user_id, "connection disconnected by an admin");
    let target = format!("connection {conn_id} of {user}");
    audit::record(
        state,
        principal,
        "disconnect_connection",
        &target,
        None,
        &reason,
    )
    .await;
    Ok(pb::DisconnectConnectionResponse { user_id: user.0 })
}

/// DisconnectUser: PublishService.DisconnectUser's path, written to the audit log.
pub async fn disconnect_user(
    state: &AppState,
    principal: &Principal,
    req: pb::DisconnectUserRequest,
) -> Result<pb::DisconnectUserResponse, ApiError> {
    principal.require_admin()?;
    let target = req.user_id.trim().to_owned();
    let detail = req.reason.trim().to_owned();
    let response = publish::disconnect_user(state, principal, req).await?;
    audit::record(state, principal, "disconnect_user", &target, None, &detail).await;
    Ok(response)
}

/// DrainNode: the drain SIGTERM starts, without stopping the process.
pub async fn drain_node(
    state: &AppState,
    principal: &Principal,
    req: pb::DrainNodeRequest,
) -> Result<pb::DrainNodeResponse, ApiError> {
    principal.require_admin()?;
    // Required: /readyz shows it to whoever wonders why the node left the pool.
    let reason = req.reason.trim();
    validate::char_len("reason", reason, 1, REASON_MAX_CHARS)?;
    validate::single_line("reason", reason)?;
    let drained = drain::drain(state, reason).await;
    tracing::info!(by = %principal.user_id, started = drained.started, users = drained.users_closed, "node drained by an admin");
    audit::record(state, principal, "drain_node", "node", None, reason).await;
    Ok(pb::DrainNodeResponse {
        users_closed: drained.users_closed as u64,
        started: drained.started,
    })
}
