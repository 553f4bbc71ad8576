//! Users: built-in accounts and users of external applications. Each username
//! is stored with its confusable skeleton ([`username_skeleton`]), unique like
//! the username itself.

use sqlx::{AnyConnection, FromRow};

use super::{found, parse_enum, AccessChange, Store, StoreError, StoreResult};
use crate::{
    ids::{now_ms, UserId},
    model::Role,
};

/// A stored user.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: UserId,
    /// `None` for external users.
    pub username: Option<String>,
    pub display_name: String,
    pub avatar_url: String,
    pub bio: String,
    pub role: Role,
    /// argon2id PHC string; `None` for external users.
    pub password_hash: Option<String>,
    /// The external application's user id.
    pub external_subject: Option<String>,
    pub created_at: i64,
}

#[derive(FromRow)]
struct UserRow {
    id: String,
    username: Option<String>,
    display_name: String,
    avatar_url: String,
    bio: String,
    role: String,
    password_hash: Option<String>,
    external_subject: Option<String>,
    created_at: i64,
}

impl TryFrom<UserRow> for UserRecord {
    type Error = StoreError;
    fn try_from(r: UserRow) -> StoreResult<Self> {
        Ok(Self {
            id: UserId(r.id),
            username: r.username,
            display_name: r.display_name,
            avatar_url: r.avatar_url,
            bio: r.bio,
            role: parse_enum(&r.role, Role::parse)?,
            password_hash: r.password_hash,
            external_subject: r.external_subject,
            created_at: r.created_at,
        })
    }
}

const USER_COLUMNS: &str =
    "id, username, display_name, avatar_url, bio, role, password_hash, external_subject, created_at";

/// A built-in account to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub display_name: String,
    pub password_hash: String,
    pub role: Role,
}

/// Profile fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProfileUpdate {
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
    pub bio: Option<String>,
}

/// The key under which usernames that look alike collide: Unicode's confusable
/// skeleton (UTS #39: `rn` and `m`, `1` and `l`, `0` and `O` map alike),
/// lower-cased because usernames are case-insensitive (so `0` and `o` collide too).
pub fn username_skeleton(username: &str) -> String {
    unicode_security::confusable_detection::skeleton(username)
        .collect::<String>()
        .to_lowercase()
}

impl Store {
    /// Creates an account; `Conflict` when the username, or one that looks like it
    /// (the same [`username_skeleton`]), is taken.
    pub async fn create_user(&self, new: NewUser) -> StoreResult<UserRecord> {
        let id = UserId::generate();
        self.timed("create_user", async |conn| {
        let now = now_ms();
        self.retry_busy("create user", async || {
            sqlx::query(
                "INSERT INTO users (id, username, username_skeleton, display_name, display_name_lc, role, password_hash, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
            )
            .bind(id.as_str())
            .bind(&new.username)
            .bind(username_skeleton(&new.username))
            .bind(&new.display_name)
            .bind(new.display_name.to_lowercase())
            .bind(new.role.as_str())
            .bind(&new.password_hash)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
        })
        .await?;
        self.get_user(&id).await
    }

    /// The account whose username looks like `username` (has its skeleton).
    pub async fn get_user_by_lookalike(&self, username: &str) -> StoreResult<UserRecord> {
        self.timed("get_user_by_lookalike", async move |conn| {
            let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username_skeleton = $1");
            let row: UserRow = sqlx::query_as(&sql)
                .bind(username_skeleton(username))
                .fetch_one(&mut *conn)
                .await?;
            row.try_into()
        })
        .await
    }

    /// Fills in the skeletons of accounts made before they were stored, oldest
    /// first; an account that looks like an older one keeps none (it can still
    /// sign in; its name is only not protected) and is logged. Answers how many
    /// were filled in.
    pub(crate) async fn backfill_username_skeletons(&self) -> StoreResult<u64> {
        self.timed("backfill_username_skeletons", async move |conn| {
            let missing: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, username FROM users \
             WHERE username IS NOT NULL AND username_skeleton IS NULL ORDER BY created_at, id",
            )
            .fetch_all(&mut *conn)
            .await?;
            let mut filled = 0;
            for (id, username) in missing {
                let done = sqlx::query("UPDATE users SET username_skeleton = $1 WHERE id = $2")
                    .bind(username_skeleton(&username))
                    .bind(&id)
                    .execute(&mut *conn)
                    .await;
                match done {
                    Ok(_) => filled += 1,
                    Err(e) => match StoreError::from(e) {
                        StoreError::Conflict => tracing::warn!(
                            user = %id,
                            username,
                            "username looks like an older account's; left without a skeleton"
                        ),
                        other => return Err(other),
                    },
                }
            }
            Ok(filled)
        })
        .await
    }

    /// The user with this id.
    pub async fn get_user(&self, id: &UserId) -> StoreResult<UserRecord> {
        self.timed("get_user", async move |conn| user_by_id(conn, id).await)
            .await
    }

    /// The account with this (lower-case) username.
    pub async fn get_user_by_username(&self, username: &str) -> StoreResult<UserRecord> {
        self.timed("get_user_by_username", async move |conn| {
            let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
            let row: UserRow = sqlx::query_as(&sql)
                .bind(username)
                .fetch_one(&mut *conn)
                .await?;
            row.try_into()
        })
        .await
    }

    /// The users with these ids, in no particular order; unknown ids are skipped.
    pub async fn get_users(&self, ids: &[UserId]) -> StoreResult<Vec<UserRecord>> {
        self.timed("get_users", async move |conn| {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT {USER_COLUMNS} FROM users WHERE id IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query_as::<_, UserRow>(&sql);
            for id in ids {
                query = query.bind(id.as_str());
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

    /// The user of an external application, created on first sight; its display
    /// name and role follow the latest token.
    pub async fn upsert_external_user(
        &self,
        subject: &str,
        display_name: &str,
        role: Role,
    ) -> StoreResult<UserRecord> {
        self.timed("upsert_external_user", async move |conn| {
        let now = now_ms();
        let id = UserId::generate();
        sqlx::query(
            "INSERT INTO users (id, display_name, display_name_lc, role, external_subject, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6) \
             ON CONFLICT (external_subject) DO UPDATE SET display_name = excluded.display_name, \
             display_name_lc = excluded.display_name_lc, role = excluded.role, updated_at = excluded.updated_at",
        )
        .bind(id.as_str())
        .bind(display_name)
        .bind(display_name.to_lowercase())
        .bind(role.as_str())
        .bind(subject)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE external_subject = $1");
        let row: UserRow = sqlx::query_as(&sql)
            .bind(subject)
            .fetch_one(&mut *conn)
            .await?;
        let user: UserRecord = row.try_into()?;
        // The display name and role follow the token.
        self.invalidate_access(&AccessChange::User { user: user.id.clone() });
        Ok(user)
        })
        .await
    }

    /// Changes the fields of `update` that are set.
    pub async fn update_profile(
        &self,
        id: &UserId,
        update: ProfileUpdate,
    ) -> StoreResult<UserRecord> {
        let result = self
            .timed("update_profile", async move |conn| {
                self.retry_busy("update profile", async || {
                    update_profile_once(conn, id, &update).await
                })
                .await
            })
            .await;
        self.invalidate_access(&AccessChange::User { user: id.clone() });
        result?;
        self.get_user(id).await
    }

    /// Changes a user's server-wide role.
    pub async fn set_user_role(&self, id: &UserId, role: Role) -> StoreResult<()> {
        let result = self
            .timed("set_user_role", async move |conn| {
                self.retry_busy("set user role", async || {
                    let done =
                        sqlx::query("UPDATE users SET role = $1, updated_at = $2 WHERE id = $3")
                            .bind(role.as_str())
                            .bind(now_ms())
                            .bind(id.as_str())
                            .execute(&mut *conn)
                            .await?;
                    found(done)
                })
                .await
            })
            .await;
        self.invalidate_access(&AccessChange::User { user: id.clone() });
        result
    }

    /// Users whose username or display name starts with `prefix` (lower-case),
    /// ordered by id, after `after_id`; at most `limit`.
    pub async fn search_users(
        &self,
        prefix: &str,
        after_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<UserRecord>> {
        self.timed("search_users", async move |conn| {
        let escaped = prefix
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let pattern = format!("{escaped}%");
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users \
             WHERE (username LIKE $1 ESCAPE '\\' OR display_name_lc LIKE $1 ESCAPE '\\') AND id > $2 \
             ORDER BY id LIMIT $3"
        );
        let rows: Vec<UserRow> = sqlx::query_as(&sql)
            .bind(pattern)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
        })
        .await
    }
}

/// The user with this id, on `conn`.
async fn user_by_id(conn: &mut AnyConnection, id: &UserId) -> StoreResult<UserRecord> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
    let row: UserRow = sqlx::query_as(&sql)
        .bind(id.as_str())
        .fetch_one(&mut *conn)
        .await?;
    row.try_into()
}

/// One attempt of [`Store::update_profile`]: reads the profile and writes it back
/// with `update`'s fields.
async fn update_profile_once(
    conn: &mut AnyConnection,
    id: &UserId,
    update: &ProfileUpdate,
) -> StoreResult<()> {
    let current = user_by_id(conn, id).await?;
    let display_name = update.display_name.clone().unwrap_or(current.display_name);
    let avatar_url = update.avatar_url.clone().unwrap_or(current.avatar_url);
    let bio = update.bio.clone().unwrap_or(current.bio);
    sqlx::query(
        "UPDATE users SET display_name = $1, display_name_lc = $2, avatar_url = $3, bio = $4, updated_at = $5 \
         WHERE id = $6",
    )
    .bind(&display_name)
    .bind(display_name.to_lowercase())
    .bind(&avatar_url)
    .bind(&bio)
    .bind(now_ms())
    .bind(id.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
