//! `PushService.Poll`: HTTP long-polling (docs/long-polling.md). The client brings
//! its whole position (per room the last sequence it processed, plus its
//! notification cursor); the poll checks read access to every room, reads what
//! is newer and answers, or, when nothing is, registers a waiter with this node's
//! [`PollHub`](crate::actors::poll_hub::PollHub) and reads again when woken, until
//! something is new or the wait is over. A room is read from its actor's ring of
//! recent events when the ring holds everything after the cursor (so a woken poll
//! is served from memory; a live room has nothing else), from the store
//! otherwise. Nothing of the poll is kept on the node once it answers, so any node
//! can answer the next poll.
//!
//! The order that makes a wake-up impossible to miss: the waiter is registered
//! (and the hub's room subscriptions set up) before the room is read, and a
//! wake-up that arrives while the room is being read is kept for the next wait.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    access::room_access,
    messages::room_actor,
    notifications::{self, notification_to_proto},
    principal::Credential,
    validate, AppState, Principal,
};
use crate::{
    actors::{
        poll_hub::{PollEnd, TooManyWaiters, Watch, WatchGuard},
        room::{is_retired, ReadRing},
    },
    error::{ApiError, Code},
    ids::{RoomId, UserId},
    proto::v1 as pb,
    protocol,
};

use pb::server_frame::Kind as Out;

/// Events in an answer when the request gives no `limit`.
pub const DEFAULT_POLL_LIMIT: u32 = 100;

/// The answer must be written before the request's deadline: the wait ends this
/// much earlier.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(200);

/// `ended.code` of a poll that a newer poll with the same poll id took over.
pub const SUPERSEDED: u32 = 4505;

/// Longest poll id.
pub const POLL_ID_MAX_CHARS: usize = 64;

/// One room of a poll and the client's position in it.
struct RoomPosition {
    room_id: RoomId,
    /// Last sequence delivered; `None` until the room's current end is known.
    after: Option<u64>,
    /// Dropped from the poll (an `error` frame said why).
    refused: bool,
}

/// What one read of the store found.
#[derive(Default)]
struct Page {
    events: Vec<pb::ServerFrame>,
    /// Frames that end the wait (errors about a room).
    errors: usize,
    count: u32,
    more: bool,
}

/// Checks the request; the rooms in request order.
fn positions(state: &AppState, req: &pb::PollRequest) -> Result<Vec<RoomPosition>, ApiError> {
    let max = state.settings.poll.max_rooms;
    if req.rooms.len() > max {
        return Err(ApiError::invalid(format!(
            "a poll may name at most {max} rooms (poll.max_rooms)"
        )));
    }
    if req.rooms.is_empty() && !req.notifications {
        return Err(ApiError::invalid(
            "nothing to poll: name rooms, or set notifications",
        ));
    }
    if !req.notifications && req.notifications_after_seq.is_some() {
        return Err(ApiError::invalid(
            "notifications_after_seq needs notifications = true",
        ));
    }
    let mut out: Vec<RoomPosition> = Vec::with_capacity(req.rooms.len());
    for room in &req.rooms {
        let room_id = RoomId::from(validate::id("rooms.room_id", &room.room_id)?);
        if out.iter().any(|p| p.room_id == room_id) {
            return Err(ApiError::invalid(format!(
                "rooms: {room_id} is named twice"
            )));
        }
        out.push(RoomPosition {
            room_id,
            after: room.after_seq,
            refused: false,
        });
    }
    if !req.poll_id.is_empty() {
        validate::char_len("poll_id", &req.poll_id, 1, POLL_ID_MAX_CHARS)?;
        if !req
            .poll_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
        {
            return Err(ApiError::invalid(
                "poll_id may only contain a-z, A-Z, 0-9, '_', '-', '.' and ':'",
            ));
        }
    }
    Ok(out)
}

/// Whether a room's error is the room's alone (reported in an `error` frame) or
/// the whole poll's (the store is down, ...).
fn is_room_error(error: &ApiError) -> bool {
    matches!(
        error.code,
        Code::PermissionDenied | Code::NotFound | Code::InvalidArgument | Code::OutOfRange
    )
}

fn room_error(room_id: &RoomId, error: &ApiError) -> pb::ServerFrame {
    protocol::push(Out::Error(pb::Error {
        code: error.code.as_str().to_owned(),
        message: error.message.clone(),
        room_id: room_id.0.clone(),
        retry_after_ms: 0,
    }))
}

/// PushService.Poll; `deadline` is the request's (Connect-Timeout-Ms).
pub async fn poll(
    state: &AppState,
    principal: &Principal,
    deadline: Instant,
    req: pb::PollRequest,
) -> Result<pb::PollResponse, ApiError> {
    let user = principal.require_user()?.clone();
    let mut rooms = positions(state, &req)?;
    let max = state.settings.poll.page_max;
    let limit = validate::page_size("limit", req.limit, DEFAULT_POLL_LIMIT.min(max), max)?;
    let wait = Duration::from_millis(u64::from(req.wait_ms).min(state.settings.poll.max_wait_ms));
    let wait_until = (Instant::now() + wait).min(
        deadline
            .checked_sub(DEADLINE_MARGIN)
            .unwrap_or_else(Instant::now),
    );
    // The notification cursor; unset: the user's newest sequence now.
    let mut notifications_after = if req.notifications {
        let (_, since) =
            notifications::feed_start(state, &user, req.notifications_after_seq).await?;
        Some(since)
    } else {
        None
    };

    // First read: access to every room, unset cursors resolved. Rooms the caller
    // may not read answer at once with their error.
    let mut page = read(
        state,
        principal,
        &user,
        &mut rooms,
        &mut notifications_after,
        limit,
    )
    .await?;
    if page.count > 0 || page.errors > 0 || Instant::now() >= wait_until {
        return Ok(answer(page, &rooms, notifications_after));
    }
    if state.drain.is_draining() {
        // No new waits on a draining node: the client polls again elsewhere.
        return Ok(ended(PollEnd::Shutdown, &rooms, notifications_after));
    }

    let watch = Watch {
        user_id: user.clone(),
        session_id: match &principal.credential {
            Credential::Session(session) => Some(session.clone()),
            _ => None,
        },
        poll_id: req.poll_id.clone(),
        rooms: rooms.iter().map(|r| r.room_id.clone()).collect(),
        notifications: req.notifications,
    };
    let guard = WatchGuard::watch(&state.polls, watch)
        .await
        .map_err(|TooManyWaiters(max)| {
            ApiError::exhausted(format!(
                "{max} polls of this user are already waiting on this server \
                 (poll.max_waiting_per_user); give each poller its own poll_id and \
                 reuse it"
            ))
        })?;
    let Some(guard) = guard else {
        // The hub is restarting: answer now rather than wait without wake-ups.
        return Ok(answer(page, &rooms, notifications_after));
    };
    loop {
        // Every earlier read found nothing, so the cursors have not moved past
        // anything the client has not seen.
        if let Some(end) = guard.signal.ended() {
            return Ok(ended(end, &rooms, notifications_after));
        }
        // Read after the waiter is registered: what was committed before is in
        // the store, what comes after wakes the waiter.
        page = read(
            state,
            principal,
            &user,
            &mut rooms,
            &mut notifications_after,
            limit,
        )
        .await?;
        if page.count > 0 || page.errors > 0 {
            return Ok(answer(page, &rooms, notifications_after));
        }
        tokio::select! {
            () = guard.signal.woken() => {}
            () = tokio::time::sleep_until(wait_until) => {
                return Ok(answer(Page::default(), &rooms, notifications_after));
            }
        }
    }
}

/// Reads what is after the cursors (advancing them), at most `limit` events:
/// the notifications first, then the rooms in order. Read access is checked for
/// every room on every read.
async fn read(
    state: &AppState,
    principal: &Principal,
    user: &UserId,
    rooms: &mut [RoomPosition],
    notifications_after: &mut Option<u64>,
    limit: u32,
) -> Result<Page, ApiError> {
    let mut page = Page::default();
    if let Some(after) = notifications_after {
        let found = state
            .store
            .notifications_after(
                user,
                *after,
                notifications::retained_since(state),
                limit + 1,
            )
            .await?;
        for n in found {
            if page.count == limit {
                page.more = true;
                break;
            }
            *after = n.seq;
            page.count += 1;
            page.events
                .push(protocol::push(Out::Notification(notification_to_proto(
                    &n, 0,
                ))));
        }
    }
    for room in rooms.iter_mut().filter(|r| !r.refused) {
        let access = match room_access(state, principal, &room.room_id.0).await {
            Ok(access) => access.require_read().map(|()| access),
            Err(e) => Err(e),
        };
        let access = match access {
            Ok(access) => access,
            Err(e) if is_room_error(&e) => {
                room.refused = true;
                page.errors += 1;
                page.events.push(room_error(&room.room_id, &e));
                continue;
            }
            Err(e) => return Err(e),
        };
        // The room actor's ring answers a live room (whose comments are only
        // there) and a chat room whose ring holds everything after the cursor:
        // a woken poll is served from memory. Otherwise the store is read.
        match read_ring(state, room, limit - page.count, &mut page).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) if is_room_error(&e) => {
                room.refused = true;
                page.errors += 1;
                page.events.push(room_error(&room.room_id, &e));
                continue;
            }
            Err(e) => return Err(e),
        }
        let last_seq = access.room.last_seq;
        let after = *room.after.get_or_insert(last_seq);
        if after > last_seq {
            room.refused = true;
            page.errors += 1;
            let e = ApiError::new(
                Code::OutOfRange,
                format!("after_seq {after} is beyond the room's last sequence {last_seq}"),
            );
            page.events.push(room_error(&room.room_id, &e));
            continue;
        }
        if after == last_seq {
            continue;
        }
        let remaining = limit - page.count;
        if remaining == 0 {
            page.more = true;
            continue;
        }
        let records = state
            .store
            .messages_after(&room.room_id, after, last_seq, remaining + 1)
            .await?;
        let mut delivered = after;
        if records.is_empty() {
            // Nothing is left of (after, last_seq]: retention pruned it.
            page.events.push(gap(&room.room_id, after + 1, last_seq));
            room.after = Some(last_seq);
            continue;
        }
        for record in &records {
            if page.count == limit {
                page.more = true;
                break;
            }
            if record.seq > delivered + 1 {
                page.events
                    .push(gap(&room.room_id, delivered + 1, record.seq - 1));
            }
            page.events
                .push(protocol::push(protocol::event_kind(record)));
            page.count += 1;
            delivered = record.seq;
        }
        room.after = Some(delivered);
    }
    Ok(page)
}

/// Reads the room's ring after its cursor (resolving an unset cursor to the
/// room's end), at most `remaining` events, into `page`. Answers `false` when the
/// store must be read instead (a chat room whose ring does not hold everything
/// after the cursor).
async fn read_ring(
    state: &AppState,
    room: &mut RoomPosition,
    remaining: u32,
    page: &mut Page,
) -> Result<bool, ApiError> {
    let request = || ReadRing {
        after: room.after,
        limit: remaining as usize,
    };
    let mut reply = room_actor(state, &room.room_id)
        .await?
        .send(request())
        .await?;
    if reply.as_ref().is_err_and(is_retired) {
        // The actor retired between lookup and read: ask the registry once more.
        reply = room_actor(state, &room.room_id)
            .await?
            .send(request())
            .await?;
    }
    let Some(ring) = reply? else {
        return Ok(false);
    };
    let mut delivered = *room.after.get_or_insert(ring.last_seq);
    if let Some((from_seq, to_seq)) = ring.gap {
        page.events.push(gap(&room.room_id, from_seq, to_seq));
        delivered = to_seq;
    }
    for event in &ring.events {
        page.events
            .push(protocol::push(protocol::event_kind(&event.record)));
        page.count += 1;
        delivered = event.seq;
    }
    page.more |= ring.more;
    room.after = Some(delivered);
    Ok(true)
}

fn gap(room_id: &RoomId, from_seq: u64, to_seq: u64) -> pb::ServerFrame {
    protocol::push(Out::Gap(pb::Gap {
        room_id: room_id.0.clone(),
        from_seq,
        to_seq,
    }))
}

fn cursors(rooms: &[RoomPosition]) -> Vec<pb::PollCursor> {
    rooms
        .iter()
        .filter(|r| !r.refused)
        .filter_map(|r| {
            r.after.map(|after_seq| pb::PollCursor {
                room_id: r.room_id.0.clone(),
                after_seq,
            })
        })
        .collect()
}

fn answer(
    page: Page,
    rooms: &[RoomPosition],
    notifications_after: Option<u64>,
) -> pb::PollResponse {
    pb::PollResponse {
        events: page.events,
        more: page.more,
        cursors: cursors(rooms),
        notifications_seq: notifications_after.unwrap_or(0),
        ended: None,
    }
}

fn ended(
    end: PollEnd,
    rooms: &[RoomPosition],
    notifications_after: Option<u64>,
) -> pb::PollResponse {
    let (code, reason) = match end {
        PollEnd::Superseded => (
            SUPERSEDED,
            "a newer poll with the same poll_id took over".to_owned(),
        ),
        PollEnd::Disconnected { reason } => (u32::from(protocol::close::DISCONNECTED), reason),
        PollEnd::SignedOut => (
            u32::from(protocol::close::SIGNED_OUT),
            "the session was signed out".to_owned(),
        ),
        PollEnd::Shutdown => (
            u32::from(protocol::close::SHUTDOWN),
            "the server is shutting down; poll again".to_owned(),
        ),
    };
    pb::PollResponse {
        events: Vec::new(),
        more: false,
        cursors: cursors(rooms),
        notifications_seq: notifications_after.unwrap_or(0),
        ended: Some(pb::PollEnded { code, reason }),
    }
}
