//! User notifications: each user's own stream of events addressed to them (a
//! backend's PublishToUser, an invitation, a mention, a kick or ban), stored with a
//! gapless per-user sequence and pushed live through the user's session to every
//! connection that subscribed to it. This module stores and delivers them, serves
//! NotificationService's list / mark-read / count RPCs, and holds
//! [`NotificationFeed`], the cursor logic a connection uses to replay from the store
//! and continue live with no gap and no duplicate.

use std::collections::BTreeMap;

use super::{validate, AppState, Principal};
use crate::{
    error::ApiError,
    ids::{now_ms, RoomId, UserId},
    model::timestamp,
    proto::v1 as pb,
    store::{
        MessageRecord, NewNotification, NotificationInserted, NotificationKind, NotificationRecord,
        StoreError,
    },
};

/// ListNotifications page size when the request gives none.
pub const DEFAULT_NOTIFICATION_PAGE: u32 = 50;
/// Longest message excerpt a mention notification carries, in characters.
pub const MENTION_EXCERPT_CHARS: usize = 280;
/// Most users one message notifies by mentions (the rest are ignored).
pub const MAX_MENTIONS_PER_MESSAGE: usize = 20;

/// The oldest creation time (Unix ms) retention keeps.
pub fn retained_since(state: &AppState) -> i64 {
    let secs = state.settings.notifications.retention_secs;
    now_ms().saturating_sub(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
}

/// A stored notification as the API shows it; `read_seq` is the user's cursor.
pub fn notification_to_proto(n: &NotificationRecord, read_seq: u64) -> pb::Notification {
    pb::Notification {
        seq: n.seq,
        id: n.id.clone(),
        kind: n.kind.to_proto(),
        sender: n.sender.clone(),
        room_id: n.room_id.clone(),
        room_seq: n.room_seq,
        text: n.text.clone(),
        data: n.data.clone().into_iter().collect(),
        created_at: Some(timestamp(n.created_at)),
        read: n.seq <= read_seq,
    }
}

/// Stores a notification and, once committed, hands it to the user's session,
/// which passes it to every live connection of the user. `not_found` when the user
/// does not exist.
pub async fn deliver(
    state: &AppState,
    new: NewNotification,
) -> Result<NotificationInserted, ApiError> {
    let user_id = new.user_id.clone();
    let inserted = match state
        .store
        .insert_notification(&new, retained_since(state))
        .await
    {
        Ok(inserted) => inserted,
        Err(StoreError::NotFound) => {
            return Err(ApiError::not_found(format!("user `{user_id}` not found")))
        }
        Err(e) => return Err(e.into()),
    };
    if let NotificationInserted::Stored(record) = &inserted {
        tracing::debug!(user = %user_id, seq = record.seq, kind = record.kind.as_str(), "notification stored");
        // To the user's connections and waiting long-polls on every node.
        crate::cluster::control::notification_stored(&state.bus, record);
    }
    Ok(inserted)
}

/// [`deliver`] in the background, for hooks whose caller must not wait (mentions,
/// kicks, bans): failures are logged.
pub fn deliver_later(state: &AppState, new: NewNotification) {
    let state = state.clone();
    actix::spawn(async move {
        let user = new.user_id.clone();
        if let Err(e) = deliver(&state, new).await {
            tracing::warn!(user = %user, error = %e.message, "notification not stored");
        }
    });
}

/// A notification about a room, from `sender` (a user id).
pub fn room_notification(
    user: &UserId,
    kind: NotificationKind,
    sender: &UserId,
    room: &RoomId,
    text: String,
) -> NewNotification {
    NewNotification {
        user_id: user.clone(),
        kind,
        sender: sender.0.clone(),
        room_id: Some(room.clone()),
        room_seq: 0,
        text,
        data: BTreeMap::new(),
        idempotency_key: None,
    }
}

// ---------------------------------------------------------------------------
// Mentions
// ---------------------------------------------------------------------------

fn is_username_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.')
}

/// The distinct usernames written as `@username` in `text` (lower-cased; a
/// trailing `.` or `-` is punctuation, not part of the name), in order of first
/// appearance, at most [`MAX_MENTIONS_PER_MESSAGE`].
pub fn mentioned_usernames(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() && names.len() < MAX_MENTIONS_PER_MESSAGE {
        let starts = chars[i] == '@'
            && (i == 0
                || !(is_username_char(chars[i - 1].to_ascii_lowercase()) || chars[i - 1] == '@'));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        let mut name = String::new();
        while j < chars.len() && is_username_char(chars[j].to_ascii_lowercase()) {
            name.push(chars[j].to_ascii_lowercase());
            j += 1;
        }
        let name = name.trim_end_matches(['.', '-']).to_owned();
        if (3..=32).contains(&name.len()) && !names.contains(&name) {
            names.push(name);
        }
        i = j.max(i + 1);
    }
    names
}

/// After a TEXT message or an EDIT is committed: a MENTION notification for every
/// member of the room named as `@username` in it (not the author). Runs in the
/// background, off the send path: the sender's acknowledgement never waits for it.
///
/// The notification is about the message (`room_seq` is the edited message's
/// sequence for an edit) and keyed by it, so a user is notified once per message:
/// an edit notifies only the users it newly mentions, not again those the
/// original (or an earlier edit) already notified.
pub fn after_message_stored(state: &AppState, record: &MessageRecord) {
    use crate::model::MessageKind;
    let message_seq = match record.kind {
        MessageKind::Text => record.seq,
        MessageKind::Edit => record.target_seq,
        MessageKind::Delete => return,
    };
    if !record.text.contains('@') {
        return;
    }
    let names = mentioned_usernames(&record.text);
    if names.is_empty() {
        return;
    }
    let state = state.clone();
    let record = record.clone();
    actix::spawn(async move {
        for name in names {
            let user = match state.store.get_user_by_username(&name).await {
                Ok(user) => user,
                Err(StoreError::NotFound) => continue,
                Err(e) => {
                    tracing::warn!(room = %record.room_id, error = %e, "mention lookup failed");
                    continue;
                }
            };
            if user.id == record.sender_id {
                continue;
            }
            match state.store.get_member(&record.room_id, &user.id).await {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(room = %record.room_id, error = %e, "mention membership check failed");
                    continue;
                }
            }
            let mut new = room_notification(
                &user.id,
                NotificationKind::Mention,
                &record.sender_id,
                &record.room_id,
                record.text.chars().take(MENTION_EXCERPT_CHARS).collect(),
            );
            new.room_seq = message_seq;
            // One notification per user and message: a restarted hook, a retried
            // send that stored once, or an edit that keeps a mention never
            // notifies twice.
            new.idempotency_key = Some(format!("mention:{}:{}", record.room_id, message_seq));
            if let Err(e) = deliver(&state, new).await {
                tracing::warn!(user = %user.id, error = %e.message, "mention notification not stored");
            }
        }
    });
}

// ---------------------------------------------------------------------------
// NotificationService: list, mark read, count
// ---------------------------------------------------------------------------

/// ListNotifications: a page of the caller's notifications after a sequence.
pub async fn list_notifications(
    state: &AppState,
    principal: &Principal,
    req: pb::ListNotificationsRequest,
) -> Result<pb::ListNotificationsResponse, ApiError> {
    let user = principal.require_user()?;
    let max = state.settings.notifications.page_max;
    let limit = validate::page_size("limit", req.limit, DEFAULT_NOTIFICATION_PAGE.min(max), max)?;
    let position = state.store.notification_state(user).await?;
    let mut page = state
        .store
        .notifications_after(user, req.after_seq, retained_since(state), limit + 1)
        .await?;
    let has_more = page.len() > limit as usize;
    page.truncate(limit as usize);
    Ok(pb::ListNotificationsResponse {
        notifications: page
            .iter()
            .map(|n| notification_to_proto(n, position.read_seq))
            .collect(),
        has_more,
        last_seq: position.last_seq.max(page.last().map_or(0, |n| n.seq)),
        read_seq: position.read_seq,
    })
}

/// MarkNotificationsRead: moves the caller's read cursor forward.
pub async fn mark_notifications_read(
    state: &AppState,
    principal: &Principal,
    req: pb::MarkNotificationsReadRequest,
) -> Result<pb::MarkNotificationsReadResponse, ApiError> {
    let user = principal.require_user()?;
    let position = state
        .store
        .mark_notifications_read(user, req.up_to_seq)
        .await?;
    let unread_count = state
        .store
        .count_notifications_after(user, position.read_seq, retained_since(state))
        .await?;
    Ok(pb::MarkNotificationsReadResponse {
        read_seq: position.read_seq,
        unread_count,
    })
}

/// CountUnreadNotifications: retained notifications after the read cursor.
pub async fn count_unread_notifications(
    state: &AppState,
    principal: &Principal,
    _req: pb::CountUnreadNotificationsRequest,
) -> Result<pb::CountUnreadNotificationsResponse, ApiError> {
    let user = principal.require_user()?;
    let position = state.store.notification_state(user).await?;
    let unread_count = state
        .store
        .count_notifications_after(user, position.read_seq, retained_since(state))
        .await?;
    Ok(pb::CountUnreadNotificationsResponse {
        unread_count,
        read_seq: position.read_seq,
        last_seq: position.last_seq,
    })
}

// ---------------------------------------------------------------------------
// Live delivery on a connection
// ---------------------------------------------------------------------------

/// Where a connection's notification subscription starts: the user's newest
/// sequence now, and the cursor to replay after (`since`, or that sequence for a
/// live-only subscription). `out_of_range` when `since` is beyond it.
pub async fn feed_start(
    state: &AppState,
    user: &UserId,
    since: Option<u64>,
) -> Result<(u64, u64), ApiError> {
    let last_seq = state.store.notification_state(user).await?.last_seq;
    match since {
        Some(since) if since > last_seq => Err(ApiError::new(
            crate::error::Code::OutOfRange,
            format!("since_seq {since} is beyond the last notification sequence {last_seq}"),
        )),
        Some(since) => Ok((last_seq, since)),
        None => Ok((last_seq, last_seq)),
    }
}

/// One page of a connection's replay: notifications after `after`.
pub async fn feed_page(
    state: &AppState,
    user: &UserId,
    after: u64,
) -> Result<Vec<NotificationRecord>, ApiError> {
    Ok(state
        .store
        .notifications_after(
            user,
            after,
            retained_since(state),
            state.settings.notifications.page_max,
        )
        .await?)
}

/// A connection's notification subscription: the cursor (last sequence
/// delivered) and whether a store read is running. Live notifications that follow
/// the cursor are delivered at once; any other (a gap, or one that arrives while
/// the store is being read) makes the connection read the store from the cursor
/// again, so the client sees every sequence once, in order.
#[derive(Debug, Clone)]
pub struct NotificationFeed {
    generation: u64,
    delivered: u64,
    /// A store read is running (or the start position is not known yet).
    reading: bool,
    /// The newest live sequence seen while reading: read again until past it.
    seen_upto: u64,
}

/// What to do with a live notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveStep {
    /// Write it: it follows the cursor.
    Deliver,
    /// Nothing: delivered already, or a running read will pick it up.
    Skip,
    /// Start a store read from the cursor (a gap was seen).
    Read,
}

impl NotificationFeed {
    /// A subscription whose start position is being looked up.
    pub fn starting(generation: u64) -> Self {
        Self {
            generation,
            delivered: 0,
            reading: true,
            seen_upto: 0,
        }
    }

    /// Which (re)subscription this is; results of an older one are ignored.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The last sequence delivered.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The start position is known: replay after `since`.
    pub fn start(&mut self, since: u64) {
        self.delivered = since;
        self.reading = true;
    }

    /// A live notification arrived.
    pub fn on_live(&mut self, seq: u64) -> LiveStep {
        if self.reading {
            self.seen_upto = self.seen_upto.max(seq);
            return LiveStep::Skip;
        }
        if seq <= self.delivered {
            LiveStep::Skip
        } else if seq == self.delivered + 1 {
            self.delivered = seq;
            LiveStep::Deliver
        } else {
            self.reading = true;
            self.seen_upto = seq;
            LiveStep::Read
        }
    }

    /// A store page arrived (`full`: it had as many rows as asked for). Returns
    /// the notifications to write, in order, and whether to read again.
    pub fn on_page(
        &mut self,
        page: Vec<NotificationRecord>,
        full: bool,
    ) -> (Vec<NotificationRecord>, bool) {
        let mut out = Vec::with_capacity(page.len());
        for n in page {
            if n.seq > self.delivered {
                self.delivered = n.seq;
                out.push(n);
            }
        }
        let again = full || self.seen_upto > self.delivered;
        if !again {
            self.reading = false;
        }
        (out, again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> NotificationRecord {
        NotificationRecord {
            user_id: UserId("u_1".into()),
            seq,
            id: format!("n_{seq}"),
            kind: NotificationKind::Published,
            sender: "shop".into(),
            room_id: String::new(),
            room_seq: 0,
            text: "hi".into(),
            data: BTreeMap::new(),
            created_at: 0,
        }
    }

    #[test]
    fn mentions_are_found_once_and_lower_cased() {
        assert_eq!(
            mentioned_usernames("hi @Alice and @bob_2, @alice again; mail a@b.com @x @carol."),
            vec!["alice", "bob_2", "carol"]
        );
        assert!(mentioned_usernames("no mentions @ all").is_empty());
    }

    #[test]
    fn feed_replays_then_goes_live_without_gap_or_duplicate() {
        let mut feed = NotificationFeed::starting(1);
        // A live push while the start position is looked up: the read covers it.
        assert_eq!(feed.on_live(3), LiveStep::Skip);
        feed.start(1);
        let (out, again) = feed.on_page(vec![record(2), record(3)], false);
        assert_eq!(out.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert!(!again);
        assert_eq!(feed.on_live(3), LiveStep::Skip);
        assert_eq!(feed.on_live(4), LiveStep::Deliver);
        // 6 before 5: read the store, which holds both.
        assert_eq!(feed.on_live(6), LiveStep::Read);
        assert_eq!(feed.on_live(5), LiveStep::Skip);
        let (out, again) = feed.on_page(vec![record(5), record(6)], false);
        assert_eq!(out.len(), 2);
        assert!(!again);
        assert_eq!(feed.delivered(), 6);
    }

    #[test]
    fn feed_reads_again_when_a_push_passed_the_page() {
        let mut feed = NotificationFeed::starting(1);
        feed.start(0);
        assert_eq!(feed.on_live(2), LiveStep::Skip);
        let (out, again) = feed.on_page(vec![record(1)], false);
        assert_eq!(out.len(), 1);
        assert!(again, "seq 2 was seen live while reading: read again");
        let (out, again) = feed.on_page(vec![record(2)], false);
        assert_eq!(out.len(), 1);
        assert!(!again);
    }
}
