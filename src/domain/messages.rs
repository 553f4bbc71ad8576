//! Room history: sending, editing and deleting (appends that go through the room
//! actor, acknowledged after commit with their sequence), reading pages of history,
//! and read cursors. The WebSocket `send` and `mark_read` frames call these too.

use std::collections::BTreeMap;

use actix::{Addr, MailboxError};

use super::{
    access::{check_room_access, room_access},
    convert::message_to_proto,
    validate, AppState, Principal,
};
use crate::{
    actors::{
        room::{is_retired, Append, RoomActor},
        room_registry,
    },
    error::ApiError,
    ids::RoomId,
    model::MessageKind,
    proto::v1 as pb,
    store::{Appended, NewMessage},
};

/// Longest client message id.
pub const CLIENT_MESSAGE_ID_MAX_CHARS: usize = 64;
/// Most metadata entries per message.
pub const METADATA_MAX_ENTRIES: usize = 16;
/// Longest metadata key, in bytes.
pub const METADATA_KEY_MAX_BYTES: usize = 64;
/// Longest metadata value, in bytes.
pub const METADATA_VALUE_MAX_BYTES: usize = 1024;
/// History page size when the request gives none.
pub const DEFAULT_HISTORY_PAGE: u32 = 50;

/// The room's actor, started if needed (from this thread's memory of the room
/// when it is still current: no round trip to the registry, see
/// [`room_registry::lookup`]).
pub async fn room_actor(state: &AppState, room_id: &RoomId) -> Result<Addr<RoomActor>, ApiError> {
    room_registry::lookup(&state.rooms, room_id)
        .await?
        .ok_or_else(|| ApiError::unavailable("the room registry is restarting; retry"))
}

/// Appends through the room actor; if the actor was retiring or restarting, asks
/// the registry again once.
///
/// `host`: the sender is one of the room's hosts (or the server publish API),
/// exempt from a live room's host-only mode, slow mode and rate limit.
pub(crate) async fn append(
    state: &AppState,
    room_id: &RoomId,
    message: NewMessage,
    host: bool,
) -> Result<Appended, ApiError> {
    for attempt in 0..2 {
        let addr = room_actor(state, room_id).await?;
        match addr
            .send(Append {
                message: message.clone(),
                host,
            })
            .await
        {
            Ok(Err(e)) if attempt == 0 && is_retired(&e) => continue,
            Ok(result) => return result,
            Err(MailboxError::Closed) if attempt == 0 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::unavailable(
        "the room is restarting; retry with the same client_message_id",
    ))
}

pub(crate) fn validate_text(state: &AppState, text: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::invalid("text must not be empty"));
    }
    // PostgreSQL refuses NUL in text; no client needs control characters but tab
    // and line breaks.
    validate::no_control_chars("text", text)?;
    let max = state.settings.rooms.max_message_bytes;
    if text.len() > max {
        return Err(ApiError::invalid(format!(
            "text is {} bytes; the limit is {max}",
            text.len()
        )));
    }
    Ok(())
}

pub(crate) fn validate_metadata(
    metadata: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, ApiError> {
    if metadata.len() > METADATA_MAX_ENTRIES {
        return Err(ApiError::invalid(format!(
            "metadata has {} entries; the limit is {METADATA_MAX_ENTRIES}",
            metadata.len()
        )));
    }
    for (key, value) in metadata {
        validate::no_control_chars("metadata key", key)?;
        validate::no_control_chars("metadata value", value)?;
        if key.is_empty() || key.len() > METADATA_KEY_MAX_BYTES {
            return Err(ApiError::invalid(format!(
                "metadata keys must be 1-{METADATA_KEY_MAX_BYTES} bytes"
            )));
        }
        if value.len() > METADATA_VALUE_MAX_BYTES {
            return Err(ApiError::invalid(format!(
                "metadata value of `{key}` exceeds {METADATA_VALUE_MAX_BYTES} bytes"
            )));
        }
    }
    Ok(metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// SendMessage: stored, sequenced and acknowledged after commit; a retry with the
/// same client message id returns the original.
pub async fn send_message(
    state: &AppState,
    principal: &Principal,
    req: pb::SendMessageRequest,
) -> Result<pb::SendMessageResponse, ApiError> {
    validate_text(state, &req.text)?;
    let metadata = validate_metadata(&req.metadata)?;
    if req.client_message_id.chars().count() > CLIENT_MESSAGE_ID_MAX_CHARS {
        return Err(ApiError::invalid(format!(
            "client_message_id must be at most {CLIENT_MESSAGE_ID_MAX_CHARS} characters"
        )));
    }
    validate::no_control_chars("client_message_id", &req.client_message_id)?;
    // The rate limit comes before any database read: a flood costs no queries.
    state.send_limiter.check(principal.require_user()?).await?;
    let access = check_room_access(state, principal, &req.room_id).await?;
    access.require_send()?;
    let message = NewMessage {
        kind: MessageKind::Text,
        sender_id: access.user_id.clone(),
        text: req.text,
        metadata,
        reply_to_seq: req.reply_to_seq,
        target_seq: 0,
        client_message_id: (!req.client_message_id.is_empty()).then_some(req.client_message_id),
        moderator: false,
    };
    match append(state, &access.room.id, message, access.is_moderator()).await? {
        Appended::Stored(record) => {
            super::notifications::after_message_stored(state, &record);
            Ok(pb::SendMessageResponse {
                message: Some(message_to_proto(&record)),
                duplicate: false,
            })
        }
        Appended::Duplicate(record) => Ok(pb::SendMessageResponse {
            message: Some(message_to_proto(&record)),
            duplicate: true,
        }),
        Appended::Rejected(_) => Err(ApiError::internal("rejection not turned into an error")),
    }
}

/// EditMessage: the author replaces a message's text; appends an EDIT event.
pub async fn edit_message(
    state: &AppState,
    principal: &Principal,
    req: pb::EditMessageRequest,
) -> Result<pb::EditMessageResponse, ApiError> {
    validate_text(state, &req.text)?;
    if req.seq == 0 {
        return Err(ApiError::invalid("seq is required"));
    }
    state.send_limiter.check(principal.require_user()?).await?;
    let access = check_room_access(state, principal, &req.room_id).await?;
    access.require_send()?;
    let message = NewMessage {
        kind: MessageKind::Edit,
        sender_id: access.user_id.clone(),
        text: req.text,
        metadata: BTreeMap::new(),
        reply_to_seq: 0,
        target_seq: req.seq,
        client_message_id: None,
        moderator: false,
    };
    let appended = append(state, &access.room.id, message, access.is_moderator()).await?;
    if let Appended::Stored(record) = &appended {
        // Users the edit newly mentions are notified (not again those notified
        // for the message before).
        super::notifications::after_message_stored(state, record);
    }
    let record = stored(appended)?;
    Ok(pb::EditMessageResponse {
        message: Some(message_to_proto(&record)),
    })
}

/// DeleteMessage: the author or a moderator deletes a message; appends a DELETE event.
pub async fn delete_message(
    state: &AppState,
    principal: &Principal,
    req: pb::DeleteMessageRequest,
) -> Result<pb::DeleteMessageResponse, ApiError> {
    if req.seq == 0 {
        return Err(ApiError::invalid("seq is required"));
    }
    let access = check_room_access(state, principal, &req.room_id).await?;
    let moderator = access.is_moderator();
    if !moderator {
        access.require_member()?;
    }
    let message = NewMessage {
        kind: MessageKind::Delete,
        sender_id: access.user_id.clone(),
        text: String::new(),
        metadata: BTreeMap::new(),
        reply_to_seq: 0,
        target_seq: req.seq,
        client_message_id: None,
        moderator,
    };
    let record = stored(append(state, &access.room.id, message, moderator).await?)?;
    if moderator {
        super::audit::record(
            state,
            principal,
            "delete_message",
            &format!("seq {}", req.seq),
            Some(&access.room.id),
            "",
        )
        .await;
    }
    Ok(pb::DeleteMessageResponse {
        message: Some(message_to_proto(&record)),
    })
}

fn stored(appended: Appended) -> Result<crate::store::MessageRecord, ApiError> {
    match appended {
        Appended::Stored(record) | Appended::Duplicate(record) => Ok(record),
        Appended::Rejected(_) => Err(ApiError::internal("rejection not turned into an error")),
    }
}

/// ListMessages: a page of history before or after a sequence, ascending.
pub async fn list_messages(
    state: &AppState,
    principal: &Principal,
    req: pb::ListMessagesRequest,
) -> Result<pb::ListMessagesResponse, ApiError> {
    let max = state.settings.rooms.history_page_max;
    let limit = validate::page_size("limit", req.limit, DEFAULT_HISTORY_PAGE.min(max), max)?;
    let access = room_access(state, principal, &req.room_id).await?;
    access.require_read()?;
    let room = &access.room;
    let (messages, has_more) = if req.before_seq > 0 {
        let mut page = state
            .store
            .messages_before(&room.id, req.before_seq, limit + 1)
            .await?;
        let more = page.len() > limit as usize;
        if more {
            page.remove(0);
        }
        (page, more)
    } else {
        let mut page = state
            .store
            .messages_after(&room.id, req.after_seq, u64::MAX, limit + 1)
            .await?;
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        (page, more)
    };
    let last_seq = state.store.get_room(&room.id).await?.last_seq;
    Ok(pb::ListMessagesResponse {
        messages: messages.iter().map(message_to_proto).collect(),
        has_more,
        last_seq,
    })
}

/// MarkRead: moves the caller's read cursor forward.
pub async fn mark_read(
    state: &AppState,
    principal: &Principal,
    req: pb::MarkReadRequest,
) -> Result<pb::MarkReadResponse, ApiError> {
    let access = room_access(state, principal, &req.room_id).await?;
    access.require_member()?;
    let seq = req.seq.min(access.room.last_seq);
    let last_read_seq = state
        .store
        .mark_read(&access.room.id, &access.user_id, seq)
        .await?;
    let last_seq = state.store.get_room(&access.room.id).await?.last_seq;
    Ok(pb::MarkReadResponse {
        last_read_seq,
        unread_count: last_seq.saturating_sub(last_read_seq),
    })
}
