//! Sessions and their rotating refresh tokens. A session is one sign-in; each
//! refresh consumes the current refresh token and issues the next one. Presenting a
//! consumed token again means it leaked, so the whole session is revoked.

use sqlx::FromRow;

use super::{Store, StoreResult};
use crate::ids::{hash_secret, now_ms, SessionId, UserId};

/// A stored session.
#[derive(Debug, Clone, FromRow)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

impl SessionRecord {
    /// Not revoked and not expired at `now`.
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

/// What presenting a refresh token led to.
#[derive(Debug)]
pub enum RefreshOutcome {
    /// The token was current: it is consumed and `next` is the new one.
    Rotated { session: SessionRecord },
    /// The token was already consumed: the session is now revoked.
    Reused {
        session_id: SessionId,
        user_id: UserId,
    },
    /// Unknown, expired, or its session was revoked.
    Invalid,
}

impl Store {
    /// Starts a session for `user` and stores the hash of its first refresh token.
    pub async fn create_session(
        &self,
        user: &UserId,
        refresh_token: &str,
        ttl_ms: i64,
    ) -> StoreResult<SessionRecord> {
        let id = SessionId::generate();
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id.as_str())
        .bind(user.as_str())
        .bind(now)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash_secret(refresh_token))
        .bind(id.as_str())
        .bind(now)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(SessionRecord {
            id: id.0,
            user_id: user.0.clone(),
            created_at: now,
            expires_at: now + ttl_ms,
            revoked_at: None,
        })
    }

    /// The session with this id.
    pub async fn get_session(&self, id: &SessionId) -> StoreResult<SessionRecord> {
        Ok(sqlx::query_as(
            "SELECT id, user_id, created_at, expires_at, revoked_at FROM sessions WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_one(&self.pool)
        .await?)
    }

    /// Consumes `presented` and stores `next` in its place, extending the session.
    /// The consume is a conditional update, so two concurrent refreshes with the
    /// same token cannot both succeed.
    pub async fn rotate_refresh_token(
        &self,
        presented: &str,
        next: &str,
        ttl_ms: i64,
    ) -> StoreResult<RefreshOutcome> {
        let now = now_ms();
        let hash = hash_secret(presented);
        let mut tx = self.pool.begin().await?;
        let found: Option<(String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT session_id, expires_at, used_at FROM refresh_tokens WHERE token_hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((session_id, expires_at, used_at)) = found else {
            return Ok(RefreshOutcome::Invalid);
        };
        let session: SessionRecord = sqlx::query_as(
            "SELECT id, user_id, created_at, expires_at, revoked_at FROM sessions WHERE id = $1",
        )
        .bind(&session_id)
        .fetch_one(&mut *tx)
        .await?;
        if used_at.is_some() {
            sqlx::query("UPDATE sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(&session_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused {
                session_id: SessionId(session.id),
                user_id: UserId(session.user_id),
            });
        }
        if expires_at <= now || !session.is_active(now) {
            return Ok(RefreshOutcome::Invalid);
        }
        let consumed = sqlx::query(
            "UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL",
        )
        .bind(now)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
        if consumed.rows_affected() != 1 {
            return Ok(RefreshOutcome::Invalid);
        }
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash_secret(next))
        .bind(&session_id)
        .bind(now)
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE sessions SET expires_at = $1 WHERE id = $2")
            .bind(now + ttl_ms)
            .bind(&session_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefreshOutcome::Rotated {
            session: SessionRecord {
                expires_at: now + ttl_ms,
                ..session
            },
        })
    }

    /// Revokes one session; returns how many were active.
    pub async fn revoke_session(&self, id: &SessionId) -> StoreResult<u64> {
        let done =
            sqlx::query("UPDATE sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL AND expires_at > $1")
                .bind(now_ms())
                .bind(id.as_str())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    /// Revokes every session of a user; returns how many were active.
    pub async fn revoke_user_sessions(&self, user: &UserId) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL AND expires_at > $1",
        )
        .bind(now_ms())
        .bind(user.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

impl From<SessionRecord> for SessionId {
    fn from(s: SessionRecord) -> Self {
        SessionId(s.id)
    }
}
