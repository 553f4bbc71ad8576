//! Rooms, memberships, invitations and bans.

use std::{collections::HashMap, sync::Arc};

use sqlx::{AnyConnection, Connection as _, FromRow};

use super::{found, parse_enum, AccessChange, MemberFacts, Store, StoreError, StoreResult};
use crate::{
    ids::{now_ms, RoomId, UserId},
    model::{MemberRole, RoomKind},
};

/// A stored room.
#[derive(Debug, Clone)]
pub struct RoomRecord {
    pub id: RoomId,
    pub kind: RoomKind,
    pub title: String,
    pub topic: String,
    pub created_by: UserId,
    pub created_at: i64,
    pub last_seq: u64,
    pub retention_seconds: u64,
}

#[derive(FromRow)]
struct RoomRow {
    id: String,
    kind: String,
    title: String,
    topic: String,
    created_by: String,
    created_at: i64,
    last_seq: i64,
    retention_seconds: i64,
}

impl TryFrom<RoomRow> for RoomRecord {
    type Error = StoreError;
    fn try_from(r: RoomRow) -> StoreResult<Self> {
        Ok(Self {
            id: RoomId(r.id),
            kind: parse_enum(&r.kind, RoomKind::parse)?,
            title: r.title,
            topic: r.topic,
            created_by: UserId(r.created_by),
            created_at: r.created_at,
            last_seq: r.last_seq as u64,
            retention_seconds: r.retention_seconds as u64,
        })
    }
}

/// A room with the caller's membership (ListRooms MINE).
#[derive(FromRow)]
struct UserRoomRow {
    #[sqlx(flatten)]
    room: RoomRow,
    member_role: String,
    member_joined_at: i64,
    member_last_read_seq: i64,
    member_muted_until: Option<i64>,
}

const ROOM_COLUMNS: &str =
    "id, kind, title, topic, created_by, created_at, last_seq, retention_seconds";

/// A member of a room.
#[derive(Debug, Clone)]
pub struct MemberRecord {
    pub room_id: RoomId,
    pub user_id: UserId,
    pub role: MemberRole,
    pub joined_at: i64,
    pub last_read_seq: u64,
    /// Muted until this time; `i64::MAX` for a mute without expiry.
    pub muted_until: Option<i64>,
}

impl MemberRecord {
    /// Whether the member may not send at `now`.
    pub fn is_muted(&self, now: i64) -> bool {
        self.muted_until.is_some_and(|until| until > now)
    }
}

#[derive(FromRow)]
struct MemberRow {
    room_id: String,
    user_id: String,
    role: String,
    joined_at: i64,
    last_read_seq: i64,
    muted_until: Option<i64>,
}

impl TryFrom<MemberRow> for MemberRecord {
    type Error = StoreError;
    fn try_from(r: MemberRow) -> StoreResult<Self> {
        Ok(Self {
            room_id: RoomId(r.room_id),
            user_id: UserId(r.user_id),
            role: parse_enum(&r.role, MemberRole::parse)?,
            joined_at: r.joined_at,
            last_read_seq: r.last_read_seq as u64,
            muted_until: r.muted_until,
        })
    }
}

const MEMBER_COLUMNS: &str = "room_id, user_id, role, joined_at, last_read_seq, muted_until";

/// A user's membership in a room and their ban there (in force or not), either or
/// both absent.
pub(super) type MemberAndBan = (Option<MemberRecord>, Option<BanRecord>);

/// A membership and a ban of one user in one room, either or both absent.
#[derive(FromRow)]
struct MemberAndBanRow {
    user_id: String,
    role: Option<String>,
    joined_at: Option<i64>,
    last_read_seq: Option<i64>,
    muted_until: Option<i64>,
    banned_by: Option<String>,
    reason: Option<String>,
    banned_at: Option<i64>,
    expires_at: Option<i64>,
}

/// A ban of a user from a room.
#[derive(Debug, Clone, FromRow)]
pub struct BanRecord {
    pub banned_by: String,
    pub reason: String,
    pub created_at: i64,
    /// `None` until lifted.
    pub expires_at: Option<i64>,
}

/// Room fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct RoomUpdate {
    pub title: Option<String>,
    pub topic: Option<String>,
    pub retention_seconds: Option<u64>,
}

/// The outcome of a membership change that must leave the room with an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// The change was made.
    Done,
    /// The user is not a member (nothing changed).
    NotMember,
    /// Refused: the user is the room's only owner, and the change would leave
    /// members without an owner (nothing changed).
    LastOwner,
}

/// A room to create.
#[derive(Debug, Clone)]
pub struct NewRoom {
    pub kind: RoomKind,
    pub title: String,
    pub topic: String,
    pub retention_seconds: u64,
    pub created_by: UserId,
    /// For direct rooms: both user ids, sorted and joined, unique across rooms.
    pub direct_key: Option<String>,
    /// Members besides the creator (who becomes owner).
    pub members: Vec<(UserId, MemberRole)>,
    /// Users invited at creation.
    pub invites: Vec<UserId>,
    /// Set for a live room: its host controls.
    pub live: Option<LiveControlsRecord>,
}

/// A live room's host controls (see `LiveControls` in rooms.proto).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveControlsRecord {
    pub anonymous_viewers: bool,
    pub slow_mode_seconds: u32,
    pub host_only: bool,
    pub rate_limit_per_minute: u32,
    pub max_length: u32,
    pub word_filter: bool,
}

/// A live room's stored state.
#[derive(Debug, Clone, Default)]
pub struct LiveRoomRecord {
    pub controls: LiveControlsRecord,
    /// The pinned message as proto3 JSON.
    pub pinned: Option<String>,
}

#[derive(FromRow)]
struct LiveRoomRow {
    anonymous_viewers: i64,
    slow_mode_seconds: i64,
    host_only: i64,
    rate_limit_per_minute: i64,
    max_length: i64,
    word_filter: i64,
    pinned: Option<String>,
}

impl From<LiveRoomRow> for LiveRoomRecord {
    fn from(r: LiveRoomRow) -> Self {
        let small = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        Self {
            controls: LiveControlsRecord {
                anonymous_viewers: r.anonymous_viewers != 0,
                slow_mode_seconds: small(r.slow_mode_seconds),
                host_only: r.host_only != 0,
                rate_limit_per_minute: small(r.rate_limit_per_minute),
                max_length: small(r.max_length),
                word_filter: r.word_filter != 0,
            },
            pinned: r.pinned,
        }
    }
}

/// Writes a live room's controls inside `tx`; the number of rows changed.
async fn write_live_controls(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &RoomId,
    c: &LiveControlsRecord,
) -> StoreResult<u64> {
    let done = sqlx::query(
        "UPDATE live_rooms SET anonymous_viewers = $1, slow_mode_seconds = $2, host_only = $3, \
         rate_limit_per_minute = $4, max_length = $5, word_filter = $6 WHERE room_id = $7",
    )
    .bind(i64::from(c.anonymous_viewers))
    .bind(i64::from(c.slow_mode_seconds))
    .bind(i64::from(c.host_only))
    .bind(i64::from(c.rate_limit_per_minute))
    .bind(i64::from(c.max_length))
    .bind(i64::from(c.word_filter))
    .bind(id.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

impl Store {
    /// Creates a room with its owner, members and invitations in one transaction.
    /// `Conflict` when a direct room for the same pair exists.
    /// How many rooms `user` created (for the per-user room quota).
    pub async fn count_rooms_created_by(&self, user: &UserId) -> StoreResult<u64> {
        self.timed("count_rooms_created_by", async move |conn| {
            let (count,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM rooms WHERE created_by = $1")
                    .bind(user.as_str())
                    .fetch_one(&mut *conn)
                    .await?;
            Ok(count.max(0) as u64)
        })
        .await
    }

    pub async fn create_room(&self, new: NewRoom) -> StoreResult<RoomRecord> {
        let id = RoomId::generate();
        self.timed("create_room", async |conn| {
        let now = now_ms();
        let mut tx = conn.begin().await?;
        sqlx::query(
            "INSERT INTO rooms (id, kind, title, topic, created_by, created_at, last_seq, retention_seconds, direct_key) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8)",
        )
        .bind(id.as_str())
        .bind(new.kind.as_str())
        .bind(&new.title)
        .bind(&new.topic)
        .bind(new.created_by.as_str())
        .bind(now)
        .bind(new.retention_seconds.min(i64::MAX as u64) as i64)
        .bind(new.direct_key.as_deref())
        .execute(&mut *tx)
        .await?;
        let owner = std::iter::once((new.created_by.clone(), MemberRole::Owner));
        for (user, role) in owner.chain(new.members.iter().cloned()) {
            sqlx::query(
                "INSERT INTO memberships (room_id, user_id, role, joined_at, last_read_seq) VALUES ($1, $2, $3, $4, 0) \
                 ON CONFLICT (room_id, user_id) DO NOTHING",
            )
            .bind(id.as_str())
            .bind(user.as_str())
            .bind(role.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        for user in &new.invites {
            sqlx::query(
                "INSERT INTO invites (room_id, user_id, invited_by, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (room_id, user_id) DO NOTHING",
            )
            .bind(id.as_str())
            .bind(user.as_str())
            .bind(new.created_by.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(controls) = &new.live {
            sqlx::query("INSERT INTO live_rooms (room_id) VALUES ($1)")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            write_live_controls(&mut tx, &id, controls).await?;
        }
        tx.commit().await?;
        // A new id has no cached facts, but its members' room lists change.
        for user in std::iter::once(&new.created_by)
            .chain(new.members.iter().map(|(user, _)| user))
            .chain(new.invites.iter())
        {
            self.invalidate_access(&AccessChange::Member {
                room: id.clone(),
                user: user.clone(),
            });
        }
        Ok(())
        })
        .await?;
        self.get_room(&id).await
    }

    /// A live room's controls and pinned message; `None` for a chat room.
    pub async fn get_live_room(&self, id: &RoomId) -> StoreResult<Option<LiveRoomRecord>> {
        self.timed("get_live_room", async move |conn| {
            let row: Option<LiveRoomRow> = sqlx::query_as(
                "SELECT anonymous_viewers, slow_mode_seconds, host_only, rate_limit_per_minute, \
             max_length, word_filter, pinned FROM live_rooms WHERE room_id = $1",
            )
            .bind(id.as_str())
            .fetch_optional(&mut *conn)
            .await?;
            Ok(row.map(Into::into))
        })
        .await
    }

    /// Replaces a live room's controls; `NotFound` for a chat room.
    pub async fn set_live_controls(
        &self,
        id: &RoomId,
        controls: &LiveControlsRecord,
    ) -> StoreResult<()> {
        self.timed("set_live_controls", async move |conn| {
            let mut tx = self.begin_write(conn).await?;
            let changed = write_live_controls(&mut tx, id, controls).await?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Sets (or, with `None`, clears) a live room's pinned message.
    pub async fn set_live_pinned(&self, id: &RoomId, pinned: Option<&str>) -> StoreResult<()> {
        self.timed("set_live_pinned", async move |conn| {
            let done = sqlx::query("UPDATE live_rooms SET pinned = $1 WHERE room_id = $2")
                .bind(pinned)
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    /// Records that a live room may use sequence numbers up to `upto` (stored in
    /// `rooms.last_seq`, which never goes down), so that a restarted room starts
    /// after every number it may have given out.
    pub async fn reserve_live_seqs(&self, id: &RoomId, upto: u64) -> StoreResult<()> {
        self.timed("reserve_live_seqs", async move |conn| {
            sqlx::query("UPDATE rooms SET last_seq = $1 WHERE id = $2 AND last_seq < $1")
                .bind(upto.min(i64::MAX as u64) as i64)
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Takes the next `count` sequence numbers of a live room that several nodes
    /// number (the cluster broker): `rooms.last_seq` goes up by `count` in one
    /// statement, so concurrent nodes never get the same number; answers the last
    /// number taken.
    pub async fn take_live_seqs(&self, id: &RoomId, count: u64) -> StoreResult<u64> {
        self.timed("take_live_seqs", async move |conn| {
            let (last,): (i64,) = sqlx::query_as(
                "UPDATE rooms SET last_seq = last_seq + $1 WHERE id = $2 RETURNING last_seq",
            )
            .bind(count.min(i64::MAX as u64) as i64)
            .bind(id.as_str())
            .fetch_one(&mut *conn)
            .await?;
            Ok(last.max(0) as u64)
        })
        .await
    }

    /// The room with this id.
    pub async fn get_room(&self, id: &RoomId) -> StoreResult<RoomRecord> {
        self.timed("get_room", async move |conn| {
            let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE id = $1");
            let row: RoomRow = sqlx::query_as(&sql)
                .bind(id.as_str())
                .fetch_one(&mut *conn)
                .await?;
            row.try_into()
        })
        .await
    }

    /// The direct room of a pair, by its key.
    pub async fn find_direct_room(&self, direct_key: &str) -> StoreResult<Option<RoomRecord>> {
        self.timed("find_direct_room", async move |conn| {
            let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE direct_key = $1");
            let row: Option<RoomRow> = sqlx::query_as(&sql)
                .bind(direct_key)
                .fetch_optional(&mut *conn)
                .await?;
            row.map(TryInto::try_into).transpose()
        })
        .await
    }

    /// Changes the fields of `update` that are set.
    pub async fn update_room(&self, id: &RoomId, update: RoomUpdate) -> StoreResult<RoomRecord> {
        let current = self.get_room(id).await?;
        let result = self
            .timed("update_room", async move |conn| {
                sqlx::query(
                    "UPDATE rooms SET title = $1, topic = $2, retention_seconds = $3 WHERE id = $4",
                )
                .bind(update.title.unwrap_or(current.title))
                .bind(update.topic.unwrap_or(current.topic))
                .bind(
                    update
                        .retention_seconds
                        .unwrap_or(current.retention_seconds)
                        .min(i64::MAX as u64) as i64,
                )
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
            .await;
        self.invalidate_access(&AccessChange::Room { room: id.clone() });
        result?;
        self.get_room(id).await
    }

    /// The rooms `user` is a member of, with the membership, ordered by room id
    /// after `after_id`.
    pub async fn list_user_rooms(
        &self,
        user: &UserId,
        after_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<(RoomRecord, MemberRecord)>> {
        self.timed("list_user_rooms", async move |conn| {
        // One query: the page of rooms with the caller's membership joined in.
        let rows: Vec<UserRoomRow> = sqlx::query_as(
            "SELECT r.id, r.kind, r.title, r.topic, r.created_by, r.created_at, r.last_seq, r.retention_seconds, \
             m.role AS member_role, m.joined_at AS member_joined_at, m.last_read_seq AS member_last_read_seq, \
             m.muted_until AS member_muted_until \
             FROM memberships m JOIN rooms r ON r.id = m.room_id \
             WHERE m.user_id = $1 AND r.id > $2 ORDER BY r.id LIMIT $3",
        )
        .bind(user.as_str())
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.into_iter()
            .map(|row| {
                let member = MemberRow {
                    room_id: row.room.id.clone(),
                    user_id: user.0.clone(),
                    role: row.member_role,
                    joined_at: row.member_joined_at,
                    last_read_seq: row.member_last_read_seq,
                    muted_until: row.member_muted_until,
                };
                Ok((row.room.try_into()?, member.try_into()?))
            })
            .collect()
        })
        .await
    }

    /// Public and broadcast rooms, ordered by id after `after_id`.
    pub async fn list_public_rooms(
        &self,
        after_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<RoomRecord>> {
        self.timed("list_public_rooms", async move |conn| {
        let sql = format!(
            "SELECT {ROOM_COLUMNS} FROM rooms WHERE kind IN ('public', 'broadcast') AND id > $1 ORDER BY id LIMIT $2"
        );
        let rows: Vec<RoomRow> = sqlx::query_as(&sql)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
        })
        .await
    }

    /// How many members a room has.
    pub async fn member_count(&self, room: &RoomId) -> StoreResult<u64> {
        self.timed("member_count", async move |conn| {
            let (n,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM memberships WHERE room_id = $1")
                    .bind(room.as_str())
                    .fetch_one(&mut *conn)
                    .await?;
            Ok(n as u64)
        })
        .await
    }

    /// Member counts of several rooms; rooms without members are absent.
    pub async fn member_counts(&self, rooms: &[RoomId]) -> StoreResult<HashMap<RoomId, u64>> {
        self.timed("member_counts", async move |conn| {
            if rooms.is_empty() {
                return Ok(HashMap::new());
            }
            let sql = format!(
                "SELECT room_id, COUNT(*) FROM memberships WHERE room_id IN ({}) GROUP BY room_id",
                placeholders(1, rooms.len())
            );
            let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
            for room in rooms {
                query = query.bind(room.as_str());
            }
            let rows = query.fetch_all(&mut *conn).await?;
            Ok(rows
                .into_iter()
                .map(|(room, n)| (RoomId(room), n as u64))
                .collect())
        })
        .await
    }

    /// The memberships of `user` among `rooms`.
    pub async fn memberships_in(
        &self,
        user: &UserId,
        rooms: &[RoomId],
    ) -> StoreResult<Vec<MemberRecord>> {
        self.timed("memberships_in", async move |conn| {
            if rooms.is_empty() {
                return Ok(Vec::new());
            }
            let sql = format!(
                "SELECT {MEMBER_COLUMNS} FROM memberships WHERE user_id = $1 AND room_id IN ({})",
                placeholders(2, rooms.len())
            );
            let mut query = sqlx::query_as::<_, MemberRow>(&sql).bind(user.as_str());
            for room in rooms {
                query = query.bind(room.as_str());
            }
            query
                .fetch_all(&mut *conn)
                .await?
                .into_iter()
                .map(TryInto::try_into)
                .collect()
        })
        .await
    }

    /// Removes a membership unless `user` is the only owner and others remain.
    pub async fn remove_member_keeping_owner(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> StoreResult<MembershipChange> {
        let result = self
            .timed("remove_member_keeping_owner", async move |conn| {
                let mut tx = conn.begin().await?;
                if let Some(refused) = owner_guard(&mut tx, room, user, None).await? {
                    return Ok(refused);
                }
                sqlx::query("DELETE FROM memberships WHERE room_id = $1 AND user_id = $2")
                    .bind(room.as_str())
                    .bind(user.as_str())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(MembershipChange::Done)
            })
            .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }

    /// Changes a member's role unless that demotes the room's only owner.
    pub async fn set_member_role_keeping_owner(
        &self,
        room: &RoomId,
        user: &UserId,
        role: MemberRole,
    ) -> StoreResult<MembershipChange> {
        let result = self
            .timed("set_member_role_keeping_owner", async move |conn| {
                let mut tx = conn.begin().await?;
                if let Some(refused) = owner_guard(&mut tx, room, user, Some(role)).await? {
                    return Ok(refused);
                }
                sqlx::query("UPDATE memberships SET role = $1 WHERE room_id = $2 AND user_id = $3")
                    .bind(role.as_str())
                    .bind(room.as_str())
                    .bind(user.as_str())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(MembershipChange::Done)
            })
            .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }

    /// Like [`Store::ban`], but refuses to remove the room's only owner while
    /// others remain. Banning a non-member is allowed (and answers `Done`).
    pub async fn ban_keeping_owner(
        &self,
        room: &RoomId,
        user: &UserId,
        by: &UserId,
        reason: &str,
        expires_at: Option<i64>,
    ) -> StoreResult<MembershipChange> {
        let result = self.timed("ban_keeping_owner", async move |conn| {
        let mut tx = conn.begin().await?;
        match owner_guard(&mut tx, room, user, None).await? {
            None | Some(MembershipChange::NotMember) => {}
            Some(refused) => return Ok(refused),
        }
        sqlx::query(
            "INSERT INTO bans (room_id, user_id, banned_by, reason, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (room_id, user_id) DO UPDATE SET banned_by = excluded.banned_by, reason = excluded.reason, \
             created_at = excluded.created_at, expires_at = excluded.expires_at",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(by.as_str())
        .bind(reason)
        .bind(now_ms())
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        for table in ["memberships", "invites"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE room_id = $1 AND user_id = $2"
            ))
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(MembershipChange::Done)
        })
        .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }

    /// The membership of `user` in `room`, if any.
    pub async fn get_member(
        &self,
        room: &RoomId,
        user: &UserId,
    ) -> StoreResult<Option<MemberRecord>> {
        self.timed("get_member", async move |conn| {
            let sql = format!(
                "SELECT {MEMBER_COLUMNS} FROM memberships WHERE room_id = $1 AND user_id = $2"
            );
            let row: Option<MemberRow> = sqlx::query_as(&sql)
                .bind(room.as_str())
                .bind(user.as_str())
                .fetch_optional(&mut *conn)
                .await?;
            row.map(TryInto::try_into).transpose()
        })
        .await
    }

    /// Members ordered by user id after `after_user`.
    pub async fn list_members(
        &self,
        room: &RoomId,
        after_user: &str,
        limit: u32,
    ) -> StoreResult<Vec<MemberRecord>> {
        self.timed("list_members", async move |conn| {
        let sql = format!(
            "SELECT {MEMBER_COLUMNS} FROM memberships WHERE room_id = $1 AND user_id > $2 ORDER BY user_id LIMIT $3"
        );
        let rows: Vec<MemberRow> = sqlx::query_as(&sql)
            .bind(room.as_str())
            .bind(after_user)
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
        })
        .await
    }

    /// Adds a member and consumes a pending invitation; `Conflict` when already a member.
    pub async fn add_member(
        &self,
        room: &RoomId,
        user: &UserId,
        role: MemberRole,
    ) -> StoreResult<MemberRecord> {
        let result = self.timed("add_member", async move |conn| {
        let mut tx = conn.begin().await?;
        sqlx::query(
            "INSERT INTO memberships (room_id, user_id, role, joined_at, last_read_seq) VALUES ($1, $2, $3, $4, 0)",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(role.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM invites WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
        })
        .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result?;
        self.get_member(room, user)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Removes a membership; `NotFound` when there was none.
    pub async fn remove_member(&self, room: &RoomId, user: &UserId) -> StoreResult<()> {
        let result = self
            .timed("remove_member", async move |conn| {
                let done =
                    sqlx::query("DELETE FROM memberships WHERE room_id = $1 AND user_id = $2")
                        .bind(room.as_str())
                        .bind(user.as_str())
                        .execute(&mut *conn)
                        .await?;
                found(done)
            })
            .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }

    /// Mutes until a time (`i64::MAX`: until lifted) or, with `None`, unmutes.
    pub async fn set_member_mute(
        &self,
        room: &RoomId,
        user: &UserId,
        until: Option<i64>,
    ) -> StoreResult<()> {
        let result = self
            .timed("set_member_mute", async move |conn| {
                let done = sqlx::query(
                    "UPDATE memberships SET muted_until = $1 WHERE room_id = $2 AND user_id = $3",
                )
                .bind(until)
                .bind(room.as_str())
                .bind(user.as_str())
                .execute(&mut *conn)
                .await?;
                found(done)
            })
            .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }

    /// Moves the read cursor forward (never back, never past the room's last
    /// sequence); returns the cursor afterwards.
    pub async fn mark_read(&self, room: &RoomId, user: &UserId, seq: u64) -> StoreResult<u64> {
        self.timed("mark_read", async move |conn| {
        sqlx::query(
            "UPDATE memberships SET last_read_seq = $1 WHERE room_id = $2 AND user_id = $3 AND last_read_seq < $1",
        )
        .bind(seq.min(i64::MAX as u64) as i64)
        .bind(room.as_str())
        .bind(user.as_str())
        .execute(&mut *conn)
        .await?;
        Ok(())
        })
        .await?;
        let member = self
            .get_member(room, user)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(member.last_read_seq)
    }

    /// Records an invitation (idempotent).
    pub async fn invite(&self, room: &RoomId, user: &UserId, by: &UserId) -> StoreResult<()> {
        let result = self.timed("invite", async move |conn| {
        sqlx::query(
            "INSERT INTO invites (room_id, user_id, invited_by, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room_id, user_id) DO NOTHING",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(by.as_str())
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
        Ok(())
        })
        .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }

    /// Whether `user` has a pending invitation to `room`.
    pub async fn has_invite(&self, room: &RoomId, user: &UserId) -> StoreResult<bool> {
        self.timed("has_invite", async move |conn| {
            let row: Option<(String,)> =
                sqlx::query_as("SELECT user_id FROM invites WHERE room_id = $1 AND user_id = $2")
                    .bind(room.as_str())
                    .bind(user.as_str())
                    .fetch_optional(&mut *conn)
                    .await?;
            Ok(row.is_some())
        })
        .await
    }

    /// Lifts a ban; `NotFound` when there was none.
    pub async fn unban(&self, room: &RoomId, user: &UserId) -> StoreResult<()> {
        let result = self
            .timed("unban", async move |conn| {
                let done = sqlx::query("DELETE FROM bans WHERE room_id = $1 AND user_id = $2")
                    .bind(room.as_str())
                    .bind(user.as_str())
                    .execute(&mut *conn)
                    .await?;
                found(done)
            })
            .await;
        self.invalidate_access(&AccessChange::Member {
            room: room.clone(),
            user: user.clone(),
        });
        result
    }

    /// The ban of `user` in `room` that is in force at `now`, if any.
    pub async fn active_ban(
        &self,
        room: &RoomId,
        user: &UserId,
        now: i64,
    ) -> StoreResult<Option<BanRecord>> {
        self.timed("active_ban", async move |conn| {
        let ban: Option<BanRecord> = sqlx::query_as(
            "SELECT banned_by, reason, created_at, expires_at FROM bans WHERE room_id = $1 AND user_id = $2",
        )
        .bind(room.as_str())
        .bind(user.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        Ok(ban.filter(|b| b.expires_at.is_none_or(|t| t > now)))
        })
        .await
    }
}

/// `$first, $first+1, …` for `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inside a transaction: locks the room's row (so concurrent membership changes of
/// the same room run one after another on PostgreSQL too) and checks that removing
/// `user`, or giving them `new_role`, leaves the room's members with an owner.
/// `Some(outcome)` means "refuse"; `None` means "go ahead".
async fn owner_guard(
    conn: &mut AnyConnection,
    room: &RoomId,
    user: &UserId,
    new_role: Option<MemberRole>,
) -> StoreResult<Option<MembershipChange>> {
    let locked = sqlx::query("UPDATE rooms SET last_seq = last_seq WHERE id = $1")
        .bind(room.as_str())
        .execute(&mut *conn)
        .await?;
    if locked.rows_affected() == 0 {
        return Err(StoreError::NotFound);
    }
    let role: Option<(String,)> =
        sqlx::query_as("SELECT role FROM memberships WHERE room_id = $1 AND user_id = $2")
            .bind(room.as_str())
            .bind(user.as_str())
            .fetch_optional(&mut *conn)
            .await?;
    let Some((role,)) = role else {
        return Ok(Some(MembershipChange::NotMember));
    };
    if parse_enum(&role, MemberRole::parse)? != MemberRole::Owner
        || new_role == Some(MemberRole::Owner)
    {
        return Ok(None);
    }
    let (owners, members): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(CASE WHEN role = 'owner' THEN 1 ELSE 0 END), 0), COUNT(*) \
         FROM memberships WHERE room_id = $1",
    )
    .bind(room.as_str())
    .fetch_one(&mut *conn)
    .await?;
    // A demoted owner stays a member, so the last owner may never be demoted; the
    // last owner may leave only an otherwise empty room.
    let others_remain = new_role.is_some() || members > 1;
    if owners <= 1 && others_remain {
        return Ok(Some(MembershipChange::LastOwner));
    }
    Ok(None)
}

impl Store {
    /// Ids of the rooms `user` is a member of.
    pub async fn user_room_ids(&self, user: &UserId) -> StoreResult<Vec<RoomId>> {
        if let Some(rooms) = self.cache.user_rooms(user) {
            return Ok(rooms.as_ref().clone());
        }
        let ticket = self.cache.ticket();
        let rooms = self.user_room_ids_uncached(user).await?;
        self.cache
            .fill_user_rooms(ticket, user.clone(), rooms.clone());
        Ok(rooms)
    }

    async fn user_room_ids_uncached(&self, user: &UserId) -> StoreResult<Vec<RoomId>> {
        self.timed("user_room_ids", async move |conn| {
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT room_id FROM memberships WHERE user_id = $1")
                    .bind(user.as_str())
                    .fetch_all(&mut *conn)
                    .await?;
            Ok(rows.into_iter().map(|(id,)| RoomId(id)).collect())
        })
        .await
    }
}

/// Access facts, answered from the store's cache when it holds them (see
/// [`super::cache`]): only for access decisions.
impl Store {
    /// The room, for an access decision: its `last_seq` may be old.
    pub async fn room_for_access(&self, id: &RoomId) -> StoreResult<Arc<RoomRecord>> {
        if let Some(room) = self.cache.room(id) {
            return Ok(room);
        }
        let ticket = self.cache.ticket();
        let room = self.get_room(id).await?;
        self.cache.fill_room(ticket, room.clone());
        Ok(Arc::new(room))
    }

    /// `user`'s membership in `room`, and for non-members their ban and (in
    /// private and direct rooms) invitation, for an access decision: the
    /// membership's `last_read_seq` may be old.
    pub async fn member_facts(
        &self,
        room: &RoomRecord,
        user: &UserId,
    ) -> StoreResult<Arc<MemberFacts>> {
        if let Some(facts) = self.cache.member(&room.id, user) {
            return Ok(facts);
        }
        let ticket = self.cache.ticket();
        let (member, ban) = self.member_and_ban(&room.id, user).await?;
        let invited = match (&member, room.kind) {
            (Some(_), _) | (None, RoomKind::Public | RoomKind::Broadcast) => false,
            (None, _) => self.has_invite(&room.id, user).await?,
        };
        // A member's ban is moot (a ban removes the membership).
        let ban = if member.is_some() { None } else { ban };
        let facts = MemberFacts {
            member,
            ban,
            invited,
        };
        self.cache
            .fill_member(ticket, room.id.clone(), user.clone(), facts.clone());
        Ok(Arc::new(facts))
    }
}

/// The memberships and bans of `users` (at most a few dozen: one statement) in
/// `room`; users with neither are absent. See [`super::member_lookups`].
pub(super) async fn members_and_bans_in(
    conn: &mut AnyConnection,
    room: &RoomId,
    users: &[UserId],
) -> StoreResult<Vec<(UserId, MemberAndBan)>> {
    // Anonymous `?` on SQLite, `$n` on PostgreSQL (see `Params`): users first,
    // then the room twice.
    let mut params = super::messages::Params::new(conn);
    let mut sql = String::from("WITH u (user_id) AS (VALUES ");
    for n in 0..users.len() {
        if n > 0 {
            sql.push_str(", ");
        }
        params.push_tuple(&mut sql, 1);
    }
    sql.push_str(
        ") SELECT u.user_id, m.role, m.joined_at, m.last_read_seq, m.muted_until, \
         b.banned_by, b.reason, b.created_at AS banned_at, b.expires_at \
         FROM u LEFT JOIN memberships m ON m.room_id = ",
    );
    params.push(&mut sql);
    sql.push_str(" AND m.user_id = u.user_id LEFT JOIN bans b ON b.room_id = ");
    params.push(&mut sql);
    sql.push_str(" AND b.user_id = u.user_id WHERE m.user_id IS NOT NULL OR b.user_id IS NOT NULL");
    let mut query = sqlx::query_as::<_, MemberAndBanRow>(&sql);
    for user in users {
        query = query.bind(user.as_str());
    }
    let rows = query
        .bind(room.as_str())
        .bind(room.as_str())
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter()
        .map(|row| {
            let user = UserId(row.user_id);
            let member = match (row.role, row.joined_at, row.last_read_seq) {
                (Some(role), Some(joined_at), Some(last_read_seq)) => Some(MemberRecord {
                    room_id: room.clone(),
                    user_id: user.clone(),
                    role: parse_enum(&role, MemberRole::parse)?,
                    joined_at,
                    last_read_seq: last_read_seq as u64,
                    muted_until: row.muted_until,
                }),
                _ => None,
            };
            let ban = match (row.banned_by, row.reason, row.banned_at) {
                (Some(banned_by), Some(reason), Some(created_at)) => Some(BanRecord {
                    banned_by,
                    reason,
                    created_at,
                    expires_at: row.expires_at,
                }),
                _ => None,
            };
            Ok((user, (member, ban)))
        })
        .collect()
}
