//! Per-user notification streams and pending invitations. Every notification gets
//! the user's next sequence number inside the transaction that stores it: the
//! transaction first bumps `users.last_notification_seq`, which takes that row's lock
//! (PostgreSQL) or the write lock (SQLite), so concurrent inserts for one user queue
//! there and the sequence is gapless and in commit order, as room sequences are.

use std::collections::BTreeMap;

use sqlx::FromRow;

use super::{found, AccessChange, Store, StoreError, StoreResult};
use crate::{
    ids::{now_ms, random_id, RoomId, UserId},
    model::RoomKind,
    proto::v1 as pb,
};

/// What a notification is about (stored as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationKind {
    Published,
    Invitation,
    Mention,
    Kicked,
    Banned,
}

impl NotificationKind {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Invitation => "invitation",
            Self::Mention => "mention",
            Self::Kicked => "kicked",
            Self::Banned => "banned",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "published" => Self::Published,
            "invitation" => Self::Invitation,
            "mention" => Self::Mention,
            "kicked" => Self::Kicked,
            "banned" => Self::Banned,
            _ => return None,
        })
    }

    /// The protobuf enum value.
    pub fn to_proto(self) -> i32 {
        (match self {
            Self::Published => pb::NotificationKind::Published,
            Self::Invitation => pb::NotificationKind::Invitation,
            Self::Mention => pb::NotificationKind::Mention,
            Self::Kicked => pb::NotificationKind::Kicked,
            Self::Banned => pb::NotificationKind::Banned,
        }) as i32
    }
}

/// A notification to store.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub user_id: UserId,
    pub kind: NotificationKind,
    pub sender: String,
    pub room_id: Option<RoomId>,
    pub room_seq: u64,
    pub text: String,
    pub data: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
}

/// A stored notification.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRecord {
    pub user_id: UserId,
    pub seq: u64,
    pub id: String,
    pub kind: NotificationKind,
    pub sender: String,
    pub room_id: String,
    pub room_seq: u64,
    pub text: String,
    pub data: BTreeMap<String, String>,
    pub created_at: i64,
}

/// The outcome of storing a notification.
#[derive(Debug, Clone)]
pub enum NotificationInserted {
    /// Stored with the user's next sequence.
    Stored(NotificationRecord),
    /// A retry: the notification stored the first time with this idempotency key.
    Duplicate(NotificationRecord),
}

/// A user's stream position: newest sequence and read cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NotificationState {
    pub last_seq: u64,
    pub read_seq: u64,
}

/// A pending invitation, with what the invitee needs to know of the room.
#[derive(Debug, Clone)]
pub struct InvitationRecord {
    pub room_id: RoomId,
    pub room_kind: RoomKind,
    pub room_title: String,
    pub invited_by: UserId,
    pub created_at: i64,
}

#[derive(FromRow)]
struct NotificationRow {
    user_id: String,
    seq: i64,
    id: String,
    kind: String,
    sender: String,
    room_id: String,
    room_seq: i64,
    text: String,
    data: String,
    created_at: i64,
}

impl TryFrom<NotificationRow> for NotificationRecord {
    type Error = StoreError;
    fn try_from(r: NotificationRow) -> StoreResult<Self> {
        Ok(Self {
            user_id: UserId(r.user_id),
            seq: r.seq as u64,
            id: r.id,
            kind: NotificationKind::parse(&r.kind)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown value `{}`", r.kind)))?,
            sender: r.sender,
            room_id: r.room_id,
            room_seq: r.room_seq as u64,
            text: r.text,
            data: serde_json::from_str(&r.data).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            created_at: r.created_at,
        })
    }
}

const NOTIFICATION_COLUMNS: &str =
    "user_id, seq, id, kind, sender, room_id, room_seq, text, data, created_at";

/// Clamps a client cursor into the range the database's BIGINT holds.
fn cursor(value: u64) -> i64 {
    value.min(i64::MAX as u64) as i64
}

impl Store {
    /// Stores a notification with the user's next sequence; `NotFound` when the user
    /// does not exist. Notifications of the user created before `expire_before`
    /// (Unix ms) are removed in the same transaction (retention).
    pub async fn insert_notification(
        &self,
        new: &NewNotification,
        expire_before: i64,
    ) -> StoreResult<NotificationInserted> {
        self.timed("insert_notification", async move |conn| {
            self.retry_busy("insert notification", async || {
                let mut tx = self.begin_write(conn).await?;
                // The lock first: a concurrent insert with the same idempotency key waits
                // here, then finds the first one below.
                let seq: Option<(i64,)> = sqlx::query_as(
                    "UPDATE users SET last_notification_seq = last_notification_seq + 1 \
                 WHERE id = $1 RETURNING last_notification_seq",
                )
                .bind(new.user_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                let Some((seq,)) = seq else {
                    return Err(StoreError::NotFound);
                };
                if let Some(key) = &new.idempotency_key {
                    let sql = format!(
                        "SELECT {NOTIFICATION_COLUMNS} FROM notifications \
                     WHERE user_id = $1 AND idempotency_key = $2"
                    );
                    let original: Option<NotificationRow> = sqlx::query_as(&sql)
                        .bind(new.user_id.as_str())
                        .bind(key)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if let Some(original) = original {
                        // Dropping the transaction rolls the sequence bump back.
                        drop(tx);
                        return Ok(NotificationInserted::Duplicate(original.try_into()?));
                    }
                }
                sqlx::query("DELETE FROM notifications WHERE user_id = $1 AND created_at < $2")
                    .bind(new.user_id.as_str())
                    .bind(expire_before)
                    .execute(&mut *tx)
                    .await?;
                let record = NotificationRecord {
                    user_id: new.user_id.clone(),
                    seq: seq as u64,
                    id: random_id("n"),
                    kind: new.kind,
                    sender: new.sender.clone(),
                    room_id: new
                        .room_id
                        .as_ref()
                        .map(|r| r.0.clone())
                        .unwrap_or_default(),
                    room_seq: new.room_seq,
                    text: new.text.clone(),
                    data: new.data.clone(),
                    created_at: now_ms(),
                };
                let data = serde_json::to_string(&record.data)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                sqlx::query(
                "INSERT INTO notifications (user_id, seq, id, kind, sender, room_id, room_seq, \
                 text, data, idempotency_key, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(record.user_id.as_str())
            .bind(seq)
            .bind(&record.id)
            .bind(record.kind.as_str())
            .bind(&record.sender)
            .bind(&record.room_id)
            .bind(cursor(record.room_seq))
            .bind(&record.text)
            .bind(data)
            .bind(new.idempotency_key.as_deref())
            .bind(record.created_at)
            .execute(&mut *tx)
            .await?;
                tx.commit().await?;
                Ok(NotificationInserted::Stored(record))
            })
            .await
        })
        .await
    }

    /// Removes every user's notifications created before `before` (Unix ms);
    /// returns how many. Sequences are not reused: users' cursors stay valid.
    pub async fn prune_notifications_before(&self, before: i64) -> StoreResult<u64> {
        self.timed("prune_notifications_before", async move |conn| {
            self.retry_busy("prune notifications", async || {
                let done = sqlx::query("DELETE FROM notifications WHERE created_at < $1")
                    .bind(before)
                    .execute(&mut *conn)
                    .await?;
                Ok(done.rows_affected())
            })
            .await
        })
        .await
    }

    /// Notifications of `user` with `seq > after` created at or after
    /// `created_since` (retention), ascending, at most `limit`.
    pub async fn notifications_after(
        &self,
        user: &UserId,
        after: u64,
        created_since: i64,
        limit: u32,
    ) -> StoreResult<Vec<NotificationRecord>> {
        self.timed("notifications_after", async move |conn| {
            let sql = format!(
                "SELECT {NOTIFICATION_COLUMNS} FROM notifications \
             WHERE user_id = $1 AND seq > $2 AND created_at >= $3 ORDER BY seq LIMIT $4"
            );
            let rows: Vec<NotificationRow> = sqlx::query_as(&sql)
                .bind(user.as_str())
                .bind(cursor(after))
                .bind(created_since)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?;
            rows.into_iter().map(TryInto::try_into).collect()
        })
        .await
    }

    /// The user's newest notification sequence and read cursor; `NotFound` when
    /// the user does not exist.
    pub async fn notification_state(&self, user: &UserId) -> StoreResult<NotificationState> {
        self.timed("notification_state", async move |conn| {
            let row: Option<(i64, i64)> = sqlx::query_as(
                "SELECT last_notification_seq, notification_read_seq FROM users WHERE id = $1",
            )
            .bind(user.as_str())
            .fetch_optional(&mut *conn)
            .await?;
            let (last, read) = row.ok_or(StoreError::NotFound)?;
            Ok(NotificationState {
                last_seq: last as u64,
                read_seq: read as u64,
            })
        })
        .await
    }

    /// Moves the read cursor forward to `up_to` (capped at the newest sequence);
    /// returns the state afterwards.
    pub async fn mark_notifications_read(
        &self,
        user: &UserId,
        up_to: u64,
    ) -> StoreResult<NotificationState> {
        self.timed("mark_notifications_read", async move |conn| {
            self.retry_busy("mark notifications read", async || {
                sqlx::query(
                    "UPDATE users SET notification_read_seq = \
                 CASE WHEN $1 < last_notification_seq THEN $1 ELSE last_notification_seq END \
                 WHERE id = $2 AND notification_read_seq < $1",
                )
                .bind(cursor(up_to))
                .bind(user.as_str())
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
            .await
        })
        .await?;
        self.notification_state(user).await
    }

    /// Retained notifications of `user` after `read_seq`.
    pub async fn count_notifications_after(
        &self,
        user: &UserId,
        read_seq: u64,
        created_since: i64,
    ) -> StoreResult<u64> {
        self.timed("count_notifications_after", async move |conn| {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM notifications WHERE user_id = $1 AND seq > $2 AND created_at >= $3",
        )
        .bind(user.as_str())
        .bind(cursor(read_seq))
        .bind(created_since)
        .fetch_one(&mut *conn)
        .await?;
        Ok(n as u64)
        })
        .await
    }

    /// Pending invitations of `user`, newest first, after the position
    /// `(created_at, room_id)` of the previous page's last one.
    pub async fn list_invitations(
        &self,
        user: &UserId,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> StoreResult<Vec<InvitationRecord>> {
        self.timed("list_invitations", async move |conn| {
        let (at, room) = after.unwrap_or((i64::MAX, String::new()));
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT i.room_id, r.kind, r.title, i.invited_by, i.created_at \
             FROM invites i JOIN rooms r ON r.id = i.room_id \
             WHERE i.user_id = $1 AND (i.created_at < $2 OR (i.created_at = $2 AND i.room_id < $3)) \
             ORDER BY i.created_at DESC, i.room_id DESC LIMIT $4",
        )
        .bind(user.as_str())
        .bind(at)
        .bind(&room)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.into_iter()
            .map(|(room_id, kind, title, by, created_at)| {
                Ok(InvitationRecord {
                    room_id: RoomId(room_id),
                    room_kind: RoomKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown value `{kind}`")))?,
                    room_title: title,
                    invited_by: UserId(by),
                    created_at,
                })
            })
            .collect()
        })
        .await
    }

    /// Removes a pending invitation; `NotFound` when there was none.
    pub async fn delete_invitation(&self, room: &RoomId, user: &UserId) -> StoreResult<()> {
        let result = self
            .timed("delete_invitation", async move |conn| {
                self.retry_busy("delete invitation", async || {
                    let done =
                        sqlx::query("DELETE FROM invites WHERE room_id = $1 AND user_id = $2")
                            .bind(room.as_str())
                            .bind(user.as_str())
                            .execute(&mut *conn)
                            .await?;
                    found(done)
                })
                .await
            })
            .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }
}
