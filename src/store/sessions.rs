//! Sessions and their rotating refresh tokens. A session is one sign-in; each
//! refresh consumes the current refresh token and issues the next one. Presenting a
//! consumed token again means it leaked, so the whole session is revoked.

use sqlx::{AnyConnection, FromRow};

use std::sync::Arc;

use super::{AccessChange, SessionFacts, Store, StoreError, StoreResult};
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
    /// The token was current (or consumed within the grace period, `grace`): `next`
    /// is the new one.
    Rotated { session: SessionRecord, grace: bool },
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
        self.timed("create_session", async move |conn| {
            self.retry_busy("create session", async || {
                self.create_session_once(conn, user, refresh_token, ttl_ms)
                    .await
            })
            .await
        })
        .await
    }

    async fn create_session_once(
        &self,
        conn: &mut AnyConnection,
        user: &UserId,
        refresh_token: &str,
        ttl_ms: i64,
    ) -> StoreResult<SessionRecord> {
        let id = SessionId::generate();
        let now = now_ms();
        let mut tx = self.begin_write(conn).await?;
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
        self.timed("get_session", async move |conn| {
            Ok(sqlx::query_as(
            "SELECT id, user_id, created_at, expires_at, revoked_at FROM sessions WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_one(&mut *conn)
        .await?)
        })
        .await
    }

    /// Consumes `presented` and stores `next` in its place, extending the session.
    ///
    /// The transaction takes the write lock before it reads (SQLite `BEGIN
    /// IMMEDIATE`, PostgreSQL `FOR UPDATE` on the token's row), so concurrent
    /// refreshes with one token run one after the other instead of failing, and it
    /// is run again when the database still reports a conflict.
    ///
    /// A token that was consumed less than `grace_ms` ago, while no later token of
    /// its session has been consumed since, is honoured once more with another
    /// next token (`Rotated { grace: true }`): a client that sent several refreshes
    /// at once, or retried one whose answer it lost, is not signed out. Outside
    /// that window a consumed token means it leaked: the session is revoked.
    /// When a token is consumed normally, the other unconsumed tokens of its
    /// session (issued to such concurrent requests) are consumed with it, so only
    /// the chain the client went on with stays usable.
    pub async fn rotate_refresh_token(
        &self,
        presented: &str,
        next: &str,
        ttl_ms: i64,
        grace_ms: i64,
    ) -> StoreResult<RefreshOutcome> {
        self.timed("rotate_refresh_token", async move |conn| {
            let hash = hash_secret(presented);
            let next_hash = hash_secret(next);
            self.retry_busy("rotate refresh token", async || {
                self.rotate_once(conn, &hash, &next_hash, ttl_ms, grace_ms)
                    .await
            })
            .await
        })
        .await
    }

    async fn rotate_once(
        &self,
        conn: &mut AnyConnection,
        hash: &str,
        next_hash: &str,
        ttl_ms: i64,
        grace_ms: i64,
    ) -> StoreResult<RefreshOutcome> {
        let mut tx = self.begin_write(conn).await?;
        let now = now_ms();
        let sql = format!(
            "SELECT session_id, expires_at, used_at FROM refresh_tokens WHERE token_hash = $1{}",
            self.for_update()
        );
        let found: Option<(String, i64, Option<i64>)> = sqlx::query_as(&sql)
            .bind(hash)
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
        let grace = match used_at {
            None => false,
            Some(used_at) if now.saturating_sub(used_at) <= grace_ms => {
                // Within the window only while the chain has not moved on: no token
                // issued since this one was consumed (its successor was created in
                // that same transaction, at `used_at`) has been consumed. Comparing
                // creation with consumption, not two consumption times, stays right
                // when both fall in the same millisecond.
                let later: Option<(i64,)> = sqlx::query_as(
                    "SELECT used_at FROM refresh_tokens \
                     WHERE session_id = $1 AND token_hash <> $2 AND created_at >= $3 \
                     AND used_at IS NOT NULL LIMIT 1",
                )
                .bind(&session_id)
                .bind(hash)
                .bind(used_at)
                .fetch_optional(&mut *tx)
                .await?;
                if later.is_some() {
                    return self.revoke_reused(tx, session, now).await;
                }
                true
            }
            Some(_) => return self.revoke_reused(tx, session, now).await,
        };
        if expires_at <= now || !session.is_active(now) {
            return Ok(RefreshOutcome::Invalid);
        }
        if !grace {
            let consumed = sqlx::query(
                "UPDATE refresh_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL",
            )
            .bind(now)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
            if consumed.rows_affected() != 1 {
                return Ok(RefreshOutcome::Invalid);
            }
            // Siblings handed out to concurrent requests within a grace window.
            sqlx::query(
                "UPDATE refresh_tokens SET used_at = $1 WHERE session_id = $2 AND used_at IS NULL",
            )
            .bind(now)
            .bind(&session_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(next_hash)
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
        // The session lives longer now.
        self.invalidate_access(&AccessChange::Session {
            session: SessionId(session_id.clone()),
        });
        Ok(RefreshOutcome::Rotated {
            session: SessionRecord {
                expires_at: now + ttl_ms,
                ..session
            },
            grace,
        })
    }

    /// A consumed token came back: revoke its session.
    async fn revoke_reused(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Any>,
        session: SessionRecord,
        now: i64,
    ) -> StoreResult<RefreshOutcome> {
        sqlx::query("UPDATE sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(&session.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.invalidate_access(&AccessChange::Session {
            session: SessionId(session.id.clone()),
        });
        Ok(RefreshOutcome::Reused {
            session_id: SessionId(session.id),
            user_id: UserId(session.user_id),
        })
    }

    /// Revokes one session; returns how many were active.
    pub async fn revoke_session(&self, id: &SessionId) -> StoreResult<u64> {
        let result = self.timed("revoke_session", async move |conn| {
        self.retry_busy("revoke session", async || {
            let done = sqlx::query(
                "UPDATE sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL AND expires_at > $1",
            )
            .bind(now_ms())
            .bind(id.as_str())
            .execute(&mut *conn)
            .await?;
            Ok(done.rows_affected())
        })
        .await
        })
        .await;
        self.invalidate_access(&AccessChange::Session {
            session: id.clone(),
        });
        result
    }

    /// Revokes every session of a user; returns how many were active.
    pub async fn revoke_user_sessions(&self, user: &UserId) -> StoreResult<u64> {
        let result = self.timed("revoke_user_sessions", async move |conn| {
        self.retry_busy("revoke user sessions", async || {
            let done = sqlx::query(
                "UPDATE sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL AND expires_at > $1",
            )
            .bind(now_ms())
            .bind(user.as_str())
            .execute(&mut *conn)
            .await?;
            Ok(done.rows_affected())
        })
        .await
        })
        .await;
        self.invalidate_access(&AccessChange::User { user: user.clone() });
        result
    }
}

impl From<SessionRecord> for SessionId {
    fn from(s: SessionRecord) -> Self {
        SessionId(s.id)
    }
}

impl Store {
    /// What an access token's check needs: its session, its user and whether the
    /// user is suspended, from the store's cache when it holds them (see
    /// [`super::cache`]); read together otherwise. Only complete answers (both
    /// found) are kept.
    pub async fn session_facts(
        &self,
        session: &SessionId,
        user: &UserId,
    ) -> StoreResult<Arc<SessionFacts>> {
        if let Some(facts) = self.cache.session(session) {
            let same_user = facts.user.as_ref().is_some_and(|u| u.id == *user);
            if same_user {
                return Ok(facts);
            }
        }
        let ticket = self.cache.ticket();
        let (found, account, suspended) = futures_util::future::join3(
            self.get_session(session),
            self.get_user(user),
            self.is_suspended(user),
        )
        .await;
        let facts = SessionFacts {
            session: optional(found)?,
            user: optional(account)?,
            suspended: suspended?,
        };
        if facts.session.is_some() && facts.user.is_some() {
            self.cache
                .fill_session(ticket, session.clone(), facts.clone());
        }
        Ok(Arc::new(facts))
    }
}

/// `NotFound` as `None`.
fn optional<T>(result: StoreResult<T>) -> StoreResult<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(StoreError::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}
