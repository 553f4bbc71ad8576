//! PublishService, the server publish API: an application backend (holding an API
//! key, or a server admin) publishes to rooms and to users without a socket,
//! disconnects users, and reads presence. Room messages go through the room actor
//! exactly like SendMessage (group commit, gapless sequence, live delivery,
//! idempotency); user notifications go through [`super::notifications`].

use std::collections::{BTreeMap, HashMap, HashSet};

use futures_util::future::join_all;

use super::{
    messages::{append, validate_metadata, validate_text, CLIENT_MESSAGE_ID_MAX_CHARS},
    notifications::{self, notification_to_proto},
    validate, AppState, Principal,
};
use crate::{
    actors::{
        session_registry::{OnlineUsers, SignalUser},
        user_session::SessionSignal,
    },
    domain::convert::message_to_proto,
    error::ApiError,
    ids::{RoomId, UserId},
    model::{MessageKind, RoomKind},
    proto::v1 as pb,
    store::{
        Appended, NewMessage, NewNotification, NotificationInserted, NotificationKind, StoreError,
    },
};

/// Prefix of the sender id of messages published through this API; never a user id.
pub const BOT_SENDER_PREFIX: &str = "bot:";
/// Longest publisher name.
pub const SENDER_MAX_CHARS: usize = 32;
/// Longest DisconnectUser reason.
pub const DISCONNECT_REASON_MAX_CHARS: usize = 100;
/// Members read per store query when counting who is online.
const MEMBER_SCAN_PAGE: u32 = 1000;

/// Only API keys and server admins may publish.
fn require_publisher(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_admin() {
        Ok(())
    } else {
        Err(ApiError::denied(
            "the publish API needs an API key or a server admin's token",
        ))
    }
}

/// A publisher name: 1-32 characters of a-z, 0-9, '_', '-', '.'.
fn sender(value: &str) -> Result<String, ApiError> {
    let ok = !value.is_empty()
        && value.chars().count() <= SENDER_MAX_CHARS
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(ApiError::invalid(format!(
            "sender must be 1-{SENDER_MAX_CHARS} characters of a-z, 0-9, '_', '-', '.'"
        )))
    }
}

fn idempotency_key(value: &str) -> Result<Option<String>, ApiError> {
    if value.chars().count() > CLIENT_MESSAGE_ID_MAX_CHARS {
        return Err(ApiError::invalid(format!(
            "idempotency_key must be at most {CLIENT_MESSAGE_ID_MAX_CHARS} characters"
        )));
    }
    validate::no_control_chars("idempotency_key", value)?;
    Ok((!value.is_empty()).then(|| value.to_owned()))
}

fn user_id(value: &str) -> Result<UserId, ApiError> {
    Ok(UserId(validate::id("user_id", value)?.to_owned()))
}

/// Distinct room ids, 1..=`publish.max_broadcast_rooms`, in request order.
fn room_ids(state: &AppState, raw: &[String]) -> Result<Vec<String>, ApiError> {
    let max = state.settings.publish.max_broadcast_rooms;
    if raw.is_empty() {
        return Err(ApiError::invalid("room_ids must name at least one room"));
    }
    if raw.len() > max {
        return Err(ApiError::invalid(format!(
            "room_ids names {} rooms; the limit is {max} (publish.max_broadcast_rooms)",
            raw.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for id in raw {
        if !seen.insert(id.as_str()) {
            return Err(ApiError::invalid(format!(
                "room_ids names `{id}` more than once"
            )));
        }
        out.push(id.clone());
    }
    Ok(out)
}

/// What Publish and Broadcast store, checked once.
struct Publication {
    sender_id: UserId,
    text: String,
    metadata: BTreeMap<String, String>,
    key: Option<String>,
}

fn publication(
    state: &AppState,
    sender_name: &str,
    text: String,
    metadata: &HashMap<String, String>,
    key: &str,
) -> Result<Publication, ApiError> {
    let name = sender(sender_name)?;
    validate_text(state, &text)?;
    Ok(Publication {
        sender_id: UserId(format!("{BOT_SENDER_PREFIX}{name}")),
        text,
        metadata: validate_metadata(metadata)?,
        key: idempotency_key(key)?,
    })
}

/// Stores the publication in one room: `not_found` for no such room,
/// `failed_precondition` for a direct room.
async fn publish_to_room(
    state: &AppState,
    room: &str,
    p: &Publication,
) -> Result<(pb::Message, bool), ApiError> {
    let room_id = RoomId(validate::id("room_id", room)?.to_owned());
    let record = match state.store.get_room(&room_id).await {
        Ok(record) => record,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!("room `{room_id}` not found")))
        }
        Err(e) => return Err(e.into()),
    };
    if record.kind == RoomKind::Direct {
        return Err(ApiError::failed_precondition(
            "direct rooms are between their two users; use PublishToUser to reach one of them",
        ));
    }
    let message = NewMessage {
        kind: MessageKind::Text,
        sender_id: p.sender_id.clone(),
        text: p.text.clone(),
        metadata: p.metadata.clone(),
        reply_to_seq: 0,
        target_seq: 0,
        client_message_id: p.key.clone(),
        moderator: false,
    };
    // The application's backend is a host: a live room's controls are for viewers.
    match append(state, &room_id, message, true).await? {
        Appended::Stored(stored) => {
            notifications::after_message_stored(state, &stored);
            tracing::debug!(room = %room_id, seq = stored.seq, sender = %p.sender_id, "published");
            Ok((message_to_proto(&stored), false))
        }
        Appended::Duplicate(original) => Ok((message_to_proto(&original), true)),
        Appended::Rejected(_) => Err(ApiError::internal("rejection not turned into an error")),
    }
}

/// Publish: one message to one room, as `bot:<sender>`.
pub async fn publish(
    state: &AppState,
    principal: &Principal,
    req: pb::PublishRequest,
) -> Result<pb::PublishResponse, ApiError> {
    require_publisher(principal)?;
    let p = publication(
        state,
        &req.sender,
        req.text,
        &req.metadata,
        &req.idempotency_key,
    )?;
    let (message, duplicate) = publish_to_room(state, &req.room_id, &p).await?;
    Ok(pb::PublishResponse {
        message: Some(message),
        duplicate,
    })
}

/// Broadcast: one message to many rooms, each with its own result.
pub async fn broadcast(
    state: &AppState,
    principal: &Principal,
    req: pb::BroadcastRequest,
) -> Result<pb::BroadcastResponse, ApiError> {
    require_publisher(principal)?;
    let rooms = room_ids(state, &req.room_ids)?;
    let p = publication(
        state,
        &req.sender,
        req.text,
        &req.metadata,
        &req.idempotency_key,
    )?;
    let outcomes = join_all(rooms.iter().map(|room| publish_to_room(state, room, &p))).await;
    let mut response = pb::BroadcastResponse::default();
    for (room_id, outcome) in rooms.into_iter().zip(outcomes) {
        let result = match outcome {
            Ok((message, duplicate)) => {
                response.succeeded += 1;
                pb::BroadcastResult {
                    room_id,
                    message: Some(message),
                    duplicate,
                    ..Default::default()
                }
            }
            Err(e) => {
                response.failed += 1;
                pb::BroadcastResult {
                    room_id,
                    error_code: e.code.as_str().to_owned(),
                    error_message: e.message,
                    ..Default::default()
                }
            }
        };
        response.results.push(result);
    }
    Ok(response)
}

/// PublishToUser: a PUBLISHED notification, stored and pushed live.
pub async fn publish_to_user(
    state: &AppState,
    principal: &Principal,
    req: pb::PublishToUserRequest,
) -> Result<pb::PublishToUserResponse, ApiError> {
    require_publisher(principal)?;
    let user = user_id(&req.user_id)?;
    let name = sender(&req.sender)?;
    validate_text(state, &req.text)?;
    let data = validate_metadata(&req.data)?;
    let new = NewNotification {
        user_id: user,
        kind: NotificationKind::Published,
        sender: name,
        room_id: None,
        room_seq: 0,
        text: req.text,
        data,
        idempotency_key: idempotency_key(&req.idempotency_key)?,
    };
    let (record, duplicate) = match notifications::deliver(state, new).await? {
        NotificationInserted::Stored(r) => (r, false),
        NotificationInserted::Duplicate(r) => (r, true),
    };
    Ok(pb::PublishToUserResponse {
        notification: Some(notification_to_proto(&record, 0)),
        duplicate,
    })
}

async fn require_user_exists(state: &AppState, user: &UserId) -> Result<(), ApiError> {
    match state.store.get_user(user).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound) => Err(ApiError::not_found(format!("user `{user}` not found"))),
        Err(e) => Err(e.into()),
    }
}

/// DisconnectUser: closes every connection of the user (close code 4504), and
/// signs out their sessions when asked.
pub async fn disconnect_user(
    state: &AppState,
    principal: &Principal,
    req: pb::DisconnectUserRequest,
) -> Result<pb::DisconnectUserResponse, ApiError> {
    require_publisher(principal)?;
    let user = user_id(&req.user_id)?;
    let reason = req.reason.trim();
    validate::char_len("reason", reason, 0, DISCONNECT_REASON_MAX_CHARS)?;
    validate::single_line("reason", reason)?;
    require_user_exists(state, &user).await?;
    // Sessions first: a connection that reconnects at once is refused.
    let sessions_revoked = if req.revoke_sessions {
        state.store.revoke_user_sessions(&user).await?
    } else {
        0
    };
    let reason = if reason.is_empty() {
        "disconnected by the application".to_owned()
    } else {
        reason.to_owned()
    };
    tracing::info!(user = %user, sessions_revoked, "user disconnected by the publish API");
    // Waiting long-polls of the user answer at once with `ended` 4504.
    state.polls.do_send(crate::actors::poll_hub::EndUserPolls {
        user_id: user.clone(),
        session_id: None,
        why: crate::actors::poll_hub::PollEnd::Disconnected {
            reason: reason.clone(),
        },
    });
    state.sessions.do_send(SignalUser {
        user_id: user,
        signal: SessionSignal::Disconnected { reason },
    });
    Ok(pb::DisconnectUserResponse { sessions_revoked })
}

/// Every member of a room and which of them are online.
async fn online_members(state: &AppState, room: &str) -> Result<(Vec<UserId>, u64), ApiError> {
    let room_id = RoomId(validate::id("room_id", room)?.to_owned());
    match state.store.get_room(&room_id).await {
        Ok(_) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!("room `{room_id}` not found")))
        }
        Err(e) => return Err(e.into()),
    }
    let mut online = Vec::new();
    let mut members = 0u64;
    let mut after = String::new();
    loop {
        let page = state
            .store
            .list_members(&room_id, &after, MEMBER_SCAN_PAGE)
            .await?;
        members += page.len() as u64;
        let done = page.len() < MEMBER_SCAN_PAGE as usize;
        let user_ids: Vec<UserId> = page.into_iter().map(|m| m.user_id).collect();
        if let Some(last) = user_ids.last() {
            after = last.0.clone();
        }
        let set = state
            .sessions
            .send(OnlineUsers {
                user_ids: user_ids.clone(),
            })
            .await?
            .0;
        online.extend(user_ids.into_iter().filter(|u| set.contains(u)));
        if done {
            break;
        }
    }
    Ok((online, members))
}

/// GetPresence: the online members of a room.
pub async fn get_presence(
    state: &AppState,
    principal: &Principal,
    req: pb::GetPresenceRequest,
) -> Result<pb::GetPresenceResponse, ApiError> {
    require_publisher(principal)?;
    let (mut online, member_count) = online_members(state, &req.room_id).await?;
    online.sort();
    Ok(pb::GetPresenceResponse {
        online_user_ids: online.into_iter().map(|u| u.0).collect(),
        member_count,
    })
}

/// GetOnlineCounts: how many members of each room are online.
pub async fn get_online_counts(
    state: &AppState,
    principal: &Principal,
    req: pb::GetOnlineCountsRequest,
) -> Result<pb::GetOnlineCountsResponse, ApiError> {
    require_publisher(principal)?;
    let rooms = room_ids(state, &req.room_ids)?;
    let mut online = HashMap::with_capacity(rooms.len());
    for room in rooms {
        let (users, _) = online_members(state, &room).await?;
        online.insert(room, users.len() as u64);
    }
    Ok(pb::GetOnlineCountsResponse { online })
}
