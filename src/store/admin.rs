//! Operations data: access rules (read by the auth actors' rule cache), the audit
//! log of moderation and admin actions, account suspensions, and the room
//! deletions and statistics the admin API needs.

use sqlx::FromRow;

use super::{found, AccessChange, Store, StoreResult};
use crate::ids::{now_ms, random_id, RoomId, UserId};

/// A stored access rule.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct AccessRuleRecord {
    pub id: String,
    /// `admin`, `member`, `guest` or `*`.
    pub role: String,
    /// A full RPC name, `<service>/*`, `ws:<frame kind>` or `*`.
    pub operation: String,
    /// `allow` or `deny`.
    pub effect: String,
    pub priority: i64,
    pub description: String,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The fields of a new or changed access rule.
#[derive(Debug, Clone)]
pub struct AccessRuleFields {
    pub role: String,
    pub operation: String,
    pub effect: String,
    pub priority: i64,
    pub description: String,
}

/// One audit log entry.
#[derive(Debug, Clone, FromRow)]
pub struct AuditRecord {
    pub id: String,
    pub at: i64,
    pub actor_id: String,
    pub action: String,
    pub target: String,
    pub room_id: String,
    pub detail: String,
}

/// What to write to the audit log.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    pub actor_id: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub room_id: &'a str,
    pub detail: &'a str,
}

const RULE_COLUMNS: &str =
    "id, role, operation, effect, priority, description, created_by, created_at, updated_at";

impl Store {
    /// Every access rule, highest priority first.
    pub async fn list_access_rules(&self) -> StoreResult<Vec<AccessRuleRecord>> {
        self.timed("list_access_rules", async move |conn| {
            let sql = format!("SELECT {RULE_COLUMNS} FROM access_rules ORDER BY priority DESC, id");
            Ok(sqlx::query_as(&sql).fetch_all(&mut *conn).await?)
        })
        .await
    }

    /// Stores a new rule.
    pub async fn create_access_rule(
        &self,
        fields: &AccessRuleFields,
        created_by: &UserId,
    ) -> StoreResult<AccessRuleRecord> {
        let id = random_id("ar");
        self.timed("create_access_rule", async |conn| {
        let now = now_ms();
        self.retry_busy("create access rule", async || {
            sqlx::query(
                "INSERT INTO access_rules (id, role, operation, effect, priority, description, created_by, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
            )
            .bind(&id)
            .bind(&fields.role)
            .bind(&fields.operation)
            .bind(&fields.effect)
            .bind(fields.priority)
            .bind(&fields.description)
            .bind(created_by.as_str())
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
        })
        .await?;
        self.get_access_rule(&id).await
    }

    /// One rule; `NotFound` when there is none.
    pub async fn get_access_rule(&self, id: &str) -> StoreResult<AccessRuleRecord> {
        self.timed("get_access_rule", async move |conn| {
            let sql = format!("SELECT {RULE_COLUMNS} FROM access_rules WHERE id = $1");
            Ok(sqlx::query_as(&sql).bind(id).fetch_one(&mut *conn).await?)
        })
        .await
    }

    /// Replaces a rule's fields; `NotFound` when there is none.
    pub async fn update_access_rule(
        &self,
        id: &str,
        fields: &AccessRuleFields,
    ) -> StoreResult<AccessRuleRecord> {
        self.timed("update_access_rule", async move |conn| {
        let done = sqlx::query(
            "UPDATE access_rules SET role = $1, operation = $2, effect = $3, priority = $4, description = $5, updated_at = $6 WHERE id = $7",
        )
        .bind(&fields.role)
        .bind(&fields.operation)
        .bind(&fields.effect)
        .bind(fields.priority)
        .bind(&fields.description)
        .bind(now_ms())
        .bind(id)
        .execute(&mut *conn)
        .await?;
        found(done)
        })
        .await?;
        self.get_access_rule(id).await
    }

    /// Deletes a rule; `NotFound` when there is none.
    pub async fn delete_access_rule(&self, id: &str) -> StoreResult<()> {
        self.timed("delete_access_rule", async move |conn| {
            let done = sqlx::query("DELETE FROM access_rules WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            found(done)
        })
        .await
    }

    /// Appends one entry to the audit log.
    pub async fn append_audit(&self, entry: NewAudit<'_>) -> StoreResult<()> {
        self.timed("append_audit", async move |conn| {
        let id = random_id("au");
        let at = now_ms();
        self.retry_busy("append audit entry", async || {
            sqlx::query(
                "INSERT INTO audit_log (id, at, actor_id, action, target, room_id, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&id)
            .bind(at)
            .bind(entry.actor_id)
            .bind(entry.action)
            .bind(entry.target)
            .bind(entry.room_id)
            .bind(entry.detail)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
        })
        .await
    }

    /// A page of the audit log, newest first, strictly before `(before_at,
    /// before_id)` when given; optionally only one action.
    pub async fn list_audit(
        &self,
        before: Option<(i64, &str)>,
        action: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<AuditRecord>> {
        self.timed("list_audit", async move |conn| {
            let (at, id) = before.unwrap_or((i64::MAX, ""));
            let sql = "SELECT id, at, actor_id, action, target, room_id, detail FROM audit_log \
                   WHERE (at < $1 OR (at = $1 AND id < $2) OR $3 = 0) AND ($4 = '' OR action = $4) \
                   ORDER BY at DESC, id DESC LIMIT $5";
            Ok(sqlx::query_as(sql)
                .bind(at)
                .bind(id)
                .bind(i64::from(before.is_some()))
                .bind(action.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?)
        })
        .await
    }

    /// Suspends an account (again: keeps the first suspension).
    pub async fn suspend_user(&self, user: &UserId, by: &UserId, reason: &str) -> StoreResult<()> {
        let result = self.timed("suspend_user", async move |conn| {
        sqlx::query(
            "INSERT INTO user_suspensions (user_id, suspended_by, reason, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user.as_str())
        .bind(by.as_str())
        .bind(reason)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
        Ok(())
        })
        .await;
        self.invalidate_access(&AccessChange::User { user: user.clone() });
        result
    }

    /// Lifts a suspension; `NotFound` when the account is not suspended.
    pub async fn reinstate_user(&self, user: &UserId) -> StoreResult<()> {
        let result = self
            .timed("reinstate_user", async move |conn| {
                let done = sqlx::query("DELETE FROM user_suspensions WHERE user_id = $1")
                    .bind(user.as_str())
                    .execute(&mut *conn)
                    .await?;
                found(done)
            })
            .await;
        self.invalidate_access(&AccessChange::User { user: user.clone() });
        result
    }

    /// Whether the account is suspended.
    pub async fn is_suspended(&self, user: &UserId) -> StoreResult<bool> {
        self.timed("is_suspended", async move |conn| {
            let row: Option<(String,)> =
                sqlx::query_as("SELECT user_id FROM user_suspensions WHERE user_id = $1")
                    .bind(user.as_str())
                    .fetch_optional(&mut *conn)
                    .await?;
            Ok(row.is_some())
        })
        .await
    }

    /// Deletes a room with its memberships, invites, bans and history (cascade);
    /// returns the ids of its members before the delete. `NotFound` when there is
    /// no such room.
    pub async fn delete_room(&self, room: &RoomId) -> StoreResult<Vec<UserId>> {
        let result = self
            .timed("delete_room", async move |conn| {
                let members: Vec<(String,)> =
                    sqlx::query_as("SELECT user_id FROM memberships WHERE room_id = $1")
                        .bind(room.as_str())
                        .fetch_all(&mut *conn)
                        .await?;
                let mut tx = self.begin_write(conn).await?;
                // Children first: CockroachDB's cascades are slower than explicit deletes,
                // and SQLite needs foreign_keys on for the cascade (it is, but be explicit).
                for table in ["messages", "bans", "invites", "memberships"] {
                    sqlx::query(&format!("DELETE FROM {table} WHERE room_id = $1"))
                        .bind(room.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                let done = sqlx::query("DELETE FROM rooms WHERE id = $1")
                    .bind(room.as_str())
                    .execute(&mut *tx)
                    .await?;
                found(done)?;
                tx.commit().await?;
                Ok(members.into_iter().map(|(id,)| UserId(id)).collect())
            })
            .await;
        self.invalidate_access(&AccessChange::RoomDeleted { room: room.clone() });
        result
    }

    /// Member ids of a room, at most `limit`.
    pub async fn member_ids(&self, room: &RoomId, limit: u32) -> StoreResult<Vec<UserId>> {
        self.timed("member_ids", async move |conn| {
            let rows: Vec<(String,)> =
                sqlx::query_as("SELECT user_id FROM memberships WHERE room_id = $1 LIMIT $2")
                    .bind(room.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(&mut *conn)
                    .await?;
            Ok(rows.into_iter().map(|(id,)| UserId(id)).collect())
        })
        .await
    }

    /// Events a room stored since `since_ms` (uses the `(room_id, created_at)` index).
    pub async fn messages_since(&self, room: &RoomId, since_ms: i64) -> StoreResult<u64> {
        self.timed("messages_since", async move |conn| {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM messages WHERE room_id = $1 AND created_at >= $2",
            )
            .bind(room.as_str())
            .bind(since_ms)
            .fetch_one(&mut *conn)
            .await?;
            Ok(n as u64)
        })
        .await
    }
}
