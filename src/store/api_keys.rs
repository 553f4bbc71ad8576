//! API keys for server-to-server calls. Only a SHA-256 of the secret is stored;
//! the secret is high-entropy, so a fast hash is enough and lookups are by hash.

use sqlx::FromRow;

use super::{found, Store, StoreError, StoreResult};
use crate::ids::{hash_secret, now_ms, ApiKeyId, UserId};

/// A stored API key (without its secret).
#[derive(Debug, Clone, FromRow)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_by: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

const KEY_COLUMNS: &str = "id, name, prefix, created_by, created_at, last_used_at, revoked_at";

/// `last_used_at` is refreshed at most this often (one minute).
pub const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// How many characters of the secret are kept as its visible prefix.
const VISIBLE_PREFIX_LEN: usize = 10;

impl Store {
    /// Stores a new key for `secret`.
    pub async fn create_api_key(
        &self,
        name: &str,
        secret: &str,
        created_by: &UserId,
    ) -> StoreResult<ApiKeyRecord> {
        self.timed("create_api_key", async move |conn| {
        let id = ApiKeyId::generate();
        let prefix: String = secret.chars().take(VISIBLE_PREFIX_LEN).collect();
        self.retry_busy("create API key", async || {
            sqlx::query(
                "INSERT INTO api_keys (id, name, prefix, secret_hash, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id.as_str())
            .bind(name)
            .bind(&prefix)
            .bind(hash_secret(secret))
            .bind(created_by.as_str())
            .bind(now_ms())
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await?;
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(id.as_str())
            .fetch_one(&mut *conn)
            .await?)
        })
        .await
    }

    /// The active key whose secret this is, marking it used (at most once per
    /// [`LAST_USED_RESOLUTION_MS`], so busy server-to-server callers do not turn
    /// every request into a write).
    pub async fn use_api_key(&self, secret: &str) -> StoreResult<ApiKeyRecord> {
        self.timed("use_api_key", async move |conn| {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_hash = $1 AND revoked_at IS NULL"
        );
        let key: ApiKeyRecord = sqlx::query_as(&sql)
            .bind(hash_secret(secret))
            .fetch_one(&mut *conn)
            .await?;
        let now = now_ms();
        if key
            .last_used_at
            .is_none_or(|t| now - t >= LAST_USED_RESOLUTION_MS)
        {
            let marked = sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(&key.id)
                .execute(&mut *conn)
                .await;
            // Bookkeeping: a write that lost to concurrent ones must not refuse a
            // valid key; the next use within a minute marks it.
            match marked.map_err(StoreError::from) {
                Ok(_) => {}
                Err(e) if e.is_retryable() => {
                    tracing::debug!(key = %key.id, error = %e, "last_used_at not updated: store busy");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(key)
        })
        .await
    }

    /// All keys, newest first.
    pub async fn list_api_keys(&self, include_revoked: bool) -> StoreResult<Vec<ApiKeyRecord>> {
        self.timed("list_api_keys", async move |conn| {
            let filter = if include_revoked {
                ""
            } else {
                "WHERE revoked_at IS NULL"
            };
            let sql =
                format!("SELECT {KEY_COLUMNS} FROM api_keys {filter} ORDER BY created_at DESC, id");
            Ok(sqlx::query_as(&sql).fetch_all(&mut *conn).await?)
        })
        .await
    }

    /// Revokes a key; `NotFound` when no active key has this id.
    pub async fn revoke_api_key(&self, id: &ApiKeyId) -> StoreResult<()> {
        self.timed("revoke_api_key", async move |conn| {
            self.retry_busy("revoke API key", async || {
                let done = sqlx::query(
                    "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(now_ms())
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
                found(done)
            })
            .await
        })
        .await
    }
}
