//! Persistence through sqlx. One [`Store`] wraps a pool that talks to SQLite (the
//! embedded default) or PostgreSQL (shared by several nodes), chosen by the URL.
//! The queries are written once in the SQL both accept (and CockroachDB too):
//! `$n` placeholders, integer flags and times, no sequences, no advisory locks.
//! Migrations are kept per backend under `migrations/`.

mod admin;
mod api_keys;
mod cache;
mod member_lookups;
mod messages;
mod notifications;
mod rooms;
mod sessions;
mod users;

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use sqlx::{
    any::{AnyConnectOptions, AnyPoolOptions},
    AnyConnection, AnyPool, Connection as _, Executor as _,
};

use crate::settings::StoreSettings;

pub use admin::{AccessRuleFields, AccessRuleRecord, AuditRecord, NewAudit};
pub use api_keys::ApiKeyRecord;
pub use cache::{AccessChange, MemberFacts, SessionFacts};
pub use messages::{AppendRejection, Appended, MessageRecord, NewMessage};
pub use notifications::{
    InvitationRecord, NewNotification, NotificationInserted, NotificationKind, NotificationRecord,
    NotificationState,
};
pub use rooms::{
    BanRecord, LiveControlsRecord, LiveRoomRecord, MemberRecord, MembershipChange, NewRoom,
    RoomRecord, RoomUpdate,
};
pub use sessions::{RefreshOutcome, SessionRecord};
pub use users::{username_skeleton, NewUser, ProfileUpdate, UserRecord};

/// Which database the pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Why a store call failed. Never shown to clients as-is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist.
    #[error("not found")]
    NotFound,
    /// A unique constraint rejected the write.
    #[error("already exists")]
    Conflict,
    /// A stored value could not be understood (corrupt or foreign data).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database refused this transaction because of concurrent ones: SQLite's
    /// "database is locked" / busy-snapshot (`SQLITE_BUSY`, `SQLITE_LOCKED`) or a
    /// PostgreSQL serialization failure or deadlock (SQLSTATE `40001`, `40P01`).
    /// Nothing was written; running the transaction again may succeed
    /// ([`Store::retry_busy`] does, a bounded number of times), and clients get a
    /// retryable `unavailable`. Decided by the database's error code, never by
    /// the text of its message.
    #[error("database busy (concurrent transactions conflicted): {0}")]
    Busy(sqlx::Error),
    /// The database failed or is unreachable.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(ref db) if db.is_unique_violation() => StoreError::Conflict,
            sqlx::Error::Database(ref db) if is_busy(db.as_ref()) => StoreError::Busy(e),
            other => StoreError::Database(other),
        }
    }
}

impl StoreError {
    /// Whether running the same transaction again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Busy(_))
    }
}

/// SQLite primary result codes of a lock conflict: `SQLITE_BUSY` (with its
/// extended codes, e.g. `SQLITE_BUSY_SNAPSHOT` = 517) and `SQLITE_LOCKED`.
const SQLITE_BUSY_CODES: [i32; 2] = [5, 6];
/// PostgreSQL SQLSTATEs after which the transaction may simply be run again:
/// `serialization_failure` (also CockroachDB's "restart transaction") and
/// `deadlock_detected`.
const POSTGRES_RETRYABLE_SQLSTATES: [&str; 2] = ["40001", "40P01"];

/// Whether a database error is a conflict with concurrent transactions, by its
/// code (the Any driver hands out the backend's own error type).
fn is_busy(db: &(dyn sqlx::error::DatabaseError + 'static)) -> bool {
    if let Some(sqlite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        // The code is SQLite's extended result code; its low byte is the primary code.
        return sqlx::error::DatabaseError::code(sqlite)
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| SQLITE_BUSY_CODES.contains(&(code & 0xff)));
    }
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return POSTGRES_RETRYABLE_SQLSTATES.contains(&pg.code());
    }
    false
}

/// Most attempts [`Store::retry_busy`] makes (the first one included).
pub const BUSY_MAX_ATTEMPTS: u32 = 4;
/// Pause before the first retry; it doubles for each further one, plus jitter.
const BUSY_RETRY_BASE: Duration = Duration::from_millis(10);

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Cheap to clone: clones share the pool (and the route of grouped appends).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    grouped: Arc<OnceLock<GroupedRoute>>,
    /// Access facts kept in memory (see [`cache`]).
    cache: Arc<cache::AccessCache>,
    /// Where this node's access changes go besides its own cache (the cluster).
    forward_access: Arc<OnceLock<ForwardAccess>>,
    /// Membership lookups waiting to be read together (see [`member_lookups`]).
    member_lookups: Arc<member_lookups::MemberLookups>,
}

/// Takes one room's group-commit batch and answers its results.
pub type GroupedAppend = Box<
    dyn Fn(
            crate::ids::RoomId,
            Vec<NewMessage>,
        ) -> Pin<Box<dyn Future<Output = StoreResult<Vec<Appended>>> + Send>>
        + Send
        + Sync,
>;

/// Where [`Store::append_grouped`] sends batches (the commit batcher actor).
struct GroupedRoute(GroupedAppend);

impl std::fmt::Debug for GroupedRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupedRoute")
    }
}

/// Where [`Store::forward_access_changes`] sends this node's access changes.
pub type AccessForward = Arc<dyn Fn(&AccessChange) + Send + Sync>;

struct ForwardAccess(AccessForward);

impl std::fmt::Debug for ForwardAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardAccess")
    }
}

/// SQLite migrations, embedded in the binary.
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/sqlite");
/// PostgreSQL migrations, embedded in the binary.
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator =
    sqlx::migrate!("src/store/migrations/postgres");

impl Store {
    /// Opens the pool. A SQLite file and its directory are created when missing.
    pub async fn connect(settings: &StoreSettings) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let backend = if settings.url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let mut url = settings.url.clone();
        if backend == Backend::Sqlite {
            prepare_sqlite_path(&url)?;
            if !url.contains("mode=") {
                url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let options = AnyConnectOptions::from_str(&url)?;
        let synchronous = if settings.sqlite_synchronous == "normal" {
            "NORMAL"
        } else {
            "FULL"
        };
        let pragmas = format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;"
        );
        let pool = AnyPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            .after_connect(move |conn, _meta| {
                let pragmas = pragmas.clone();
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(pragmas.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            backend,
            grouped: Arc::default(),
            cache: Arc::new(cache::AccessCache::new(settings.access_cache_max_entries)),
            forward_access: Arc::default(),
            member_lookups: Arc::default(),
        })
    }

    /// Applies pending migrations of this backend.
    pub async fn migrate(&self) -> StoreResult<()> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
            Backend::Postgres if self.is_cockroachdb().await? => {
                // CockroachDB has no pg_advisory_lock (cockroachdb/cockroach#13546),
                // which sqlx's migrator takes to keep two processes from migrating
                // at once: run without it. Migrate from one place (one node first,
                // or `roomcast migrate`), as docs/scaling.md says.
                let mut unlocked = sqlx::migrate!("src/store/migrations/postgres");
                unlocked.set_locking(false);
                unlocked.run(&self.pool).await?;
            }
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
        }
        // Values that only Rust can compute (Unicode skeletons).
        let filled = self.backfill_username_skeletons().await?;
        if filled > 0 {
            tracing::info!(filled, "username skeletons filled in");
        }
        Ok(())
    }

    /// Whether the PostgreSQL-protocol server is CockroachDB (its `version()` says so).
    async fn is_cockroachdb(&self) -> StoreResult<bool> {
        self.timed("is_cockroachdb", async move |conn| {
            let version: String = sqlx::query_scalar("SELECT version()")
                .fetch_one(&mut *conn)
                .await?;
            Ok(version.contains("CockroachDB"))
        })
        .await
    }

    /// Whether the database answers (and a pooled connection is to be had).
    pub async fn ping(&self) -> StoreResult<()> {
        self.timed("ping", async move |conn| {
            sqlx::query("SELECT 1").execute(&mut *conn).await?;
            Ok(())
        })
        .await
    }

    /// Runs one store operation on one pooled connection. The wait for the
    /// connection is recorded in `roomcast_store_pool_wait_seconds` (a wait that
    /// failed, e.g. at `store.acquire_timeout_ms`, also in
    /// `roomcast_store_pool_acquire_failures_total`), and the work on it (queries
    /// and commit, without the wait) in
    /// `roomcast_store_query_duration_seconds{query}`, so a saturated pool and a
    /// slow database are told apart. `query` is the operation's method name: a
    /// fixed set, so the label stays bounded.
    ///
    /// `op` runs everything on `conn`, transactions included
    /// ([`Store::begin_write`], `conn.begin()`), and never calls another store
    /// method while it holds the connection: an operation holding one connection
    /// while waiting for a second can deadlock a saturated pool.
    pub(crate) async fn timed<T>(
        &self,
        query: &'static str,
        op: impl AsyncFnOnce(&mut AnyConnection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let metrics = crate::metrics::metrics();
        let waiting = std::time::Instant::now();
        metrics.store_pool_waiters.inc();
        let acquired = self.pool.acquire().await;
        metrics.store_pool_waiters.dec();
        metrics
            .store_pool_wait
            .observe(waiting.elapsed().as_secs_f64());
        let mut conn = Checkout(Some(acquired.inspect_err(|_| {
            metrics.store_pool_acquire_failures.inc();
        })?));
        let started = std::time::Instant::now();
        let result = op(conn.connection()).await;
        metrics
            .store_query_duration
            .get_or_create(&crate::metrics::QueryLabels { query })
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Runs `op` (one whole transaction, or one statement) again when it fails with
    /// [`StoreError::Busy`], at most [`BUSY_MAX_ATTEMPTS`] times in all, with a
    /// short randomized pause between attempts. Only for operations that are safe
    /// to repeat: a busy failure means nothing of the attempt was committed.
    ///
    /// Inside [`Store::timed`] the attempts share its connection (`op` borrows it:
    /// an async closure).
    pub async fn retry_busy<T>(
        &self,
        what: &'static str,
        mut op: impl AsyncFnMut() -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_retryable() && attempt < BUSY_MAX_ATTEMPTS => {
                    let jitter = rand::random::<u64>() % 10;
                    let pause =
                        BUSY_RETRY_BASE * 2u32.pow(attempt - 1) + Duration::from_millis(jitter);
                    tracing::debug!(operation = what, attempt, error = %e, "store busy; retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Begins a transaction that is going to write. On SQLite it takes the write
    /// lock at once (`BEGIN IMMEDIATE`): a deferred transaction that reads and then
    /// writes fails with a busy-snapshot error, without waiting, when another
    /// connection wrote in between; an immediate one waits (`busy_timeout`) for
    /// the lock instead. PostgreSQL transactions lock rows with `FOR UPDATE`
    /// (see [`Store::for_update`]).
    pub(crate) async fn begin_write<'c>(
        &self,
        conn: &'c mut AnyConnection,
    ) -> StoreResult<sqlx::Transaction<'c, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => conn.begin().await?,
        })
    }

    /// ` FOR UPDATE` on PostgreSQL (a row lock for a read that a write follows),
    /// nothing on SQLite (whose [`Store::begin_write`] locks the whole database).
    pub(crate) fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Sends every [`Store::append_grouped`] of this store (and its clones)
    /// through `route` from now on; only the first route set counts.
    pub fn route_grouped_appends(&self, route: GroupedAppend) {
        let _ = self.grouped.set(GroupedRoute(route));
    }

    /// Drops the cached access facts that `change` may have made wrong. Every
    /// store write that changes a room, a membership, a ban, an invitation, a
    /// user, a suspension or a session calls this after its commit; a node that
    /// learns of a change another node made to the shared database must call it
    /// too (the cluster forwards each [`AccessChange`]).
    pub fn invalidate_access(&self, change: &AccessChange) {
        self.cache.invalidate(change);
        if let Some(ForwardAccess(forward)) = self.forward_access.get() {
            forward(change);
        }
    }

    /// Passes every [`AccessChange`] this node's writes make to `forward` from now
    /// on (the cluster tells the other nodes: `crate::cluster::control`); only the
    /// first one set counts.
    pub fn forward_access_changes(&self, forward: AccessForward) {
        let _ = self.forward_access.set(ForwardAccess(forward));
    }

    /// Another node's [`AccessChange`]: drops the cached facts it touches (and
    /// forwards nothing).
    pub fn apply_remote_access_change(&self, change: &AccessChange) {
        self.cache.invalidate(change);
    }

    /// Drops every cached access fact: after this node was cut off from the
    /// others, whose changes it may have missed.
    pub fn clear_access_cache(&self) {
        self.cache.clear();
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool's open connections, how many of them are idle, and the most it
    /// opens (for the metrics).
    pub fn pool_stats(&self) -> (u32, usize, u32) {
        (
            self.pool.size(),
            self.pool.num_idle(),
            self.pool.options().get_max_connections(),
        )
    }

    /// Closes the pool, waiting for checked-out connections to return.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A server-wide value, e.g. the generated token secret.
    pub async fn kv_get(&self, key: &str) -> StoreResult<Option<String>> {
        self.timed("kv_get", async move |conn| {
            let value: Option<(String,)> =
                sqlx::query_as("SELECT value FROM server_kv WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
            Ok(value.map(|(v,)| v))
        })
        .await
    }

    /// Stores `value` under `key` unless a value is there already; returns the value
    /// that is stored afterwards (so concurrent nodes agree on the first one).
    pub async fn kv_get_or_insert(&self, key: &str, value: &str) -> StoreResult<String> {
        self.timed("kv_get_or_insert", async move |conn| {
            sqlx::query(
                "INSERT INTO server_kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(value)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await?;
        self.kv_get(key).await?.ok_or(StoreError::NotFound)
    }
}

/// Creates the directory of a `sqlite://dir/file.db` URL (mode 0700) and the
/// database file (mode 0600) when they are missing, and warns about those that
/// other local users can read: the database holds the token secret, so reading
/// it is enough to forge an admin's tokens. SQLite gives the `-wal` and `-shm`
/// files the database file's permissions, so they are 0600 too.
fn prepare_sqlite_path(url: &str) -> StoreResult<()> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    let io = |e| StoreError::Database(sqlx::Error::Io(e));
    let path = Path::new(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            private_dir_builder().create(dir).map_err(io)?;
        }
    }
    match private_file_options().open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    for warning in exposed_files(path) {
        tracing::warn!("{warning}");
    }
    Ok(())
}

/// Creates directories (and their missing parents) only their owner can enter.
fn private_dir_builder() -> std::fs::DirBuilder {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder
}

/// Creates a new file only its owner can read and write.
fn private_file_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
}

/// One line for each of the database's directory, file, `-wal` and `-shm` files
/// that users other than its owner may read (or enter), with the fix.
pub fn exposed_files(database: &Path) -> Vec<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mut candidates: Vec<(std::path::PathBuf, &str, u32)> = Vec::new();
        if let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) {
            candidates.push((dir.to_path_buf(), "data directory", 0o700));
        }
        candidates.push((database.to_path_buf(), "database file", 0o600));
        for suffix in ["-wal", "-shm"] {
            let mut name = database.as_os_str().to_owned();
            name.push(suffix);
            candidates.push((name.into(), "database file", 0o600));
        }
        candidates
            .into_iter()
            .filter_map(|(path, what, fix)| {
                let mode = std::fs::metadata(&path).ok()?.permissions().mode() & 0o777;
                (mode & 0o077 != 0).then(|| {
                    format!(
                        "{what} {} is accessible to other users (mode {mode:03o}); it holds the \
                         token secret: run `chmod {fix:o} {}`",
                        path.display(),
                        path.display()
                    )
                })
            })
            .collect()
    }
    #[cfg(not(unix))]
    {
        let _ = database;
        Vec::new()
    }
}

/// `NotFound` when a write touched no row (the row to change does not exist).
fn found(done: sqlx::any::AnyQueryResult) -> StoreResult<()> {
    if done.rows_affected() == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

/// Reads a text enum column, reporting unknown values as corruption.
fn parse_enum<T>(value: &str, parse: fn(&str) -> Option<T>) -> StoreResult<T> {
    parse(value).ok_or_else(|| StoreError::Corrupt(format!("unknown value `{value}`")))
}

/// A pooled connection held by [`Store::timed`]. sqlx returns a dropped connection
/// to its pool from a task it spawns on the current Tokio runtime, and panics when
/// there is none: an operation cancelled while the server's runtime shuts down
/// (its actors' futures dropped with it) would abort the process. Without a
/// runtime the connection is detached instead and closes as it drops; its pool
/// is going away with the runtime.
struct Checkout(Option<sqlx::pool::PoolConnection<sqlx::Any>>);

impl Checkout {
    fn connection(&mut self) -> &mut AnyConnection {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                drop(conn.detach());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store operation that holds a pooled connection and is dropped after its
    /// runtime is gone (an actor's future dropped while the server shuts down)
    /// must not panic. sqlx returns a dropped pooled connection from a task it
    /// spawns, which panics without a runtime ("this functionality requires a
    /// Tokio context"); a test server aborted that way once, with a room-list read
    /// in flight. `Checkout` detaches the connection instead.
    #[test]
    fn an_operation_dropped_after_its_runtime_ends_does_not_panic() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut settings = crate::settings::Settings::default().store;
        settings.url = format!("sqlite://{}/held.db", dir.path().display());
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let store = runtime
                .block_on(Store::connect(&settings))
                .expect("the store opens");
            let (holding, held_now) = tokio::sync::oneshot::channel();
            let mut held = Box::pin(async move {
                store
                    .timed("held", async move |_conn| {
                        let _ = holding.send(());
                        std::future::pending::<()>().await;
                        Ok(())
                    })
                    .await
            });
            // Run the operation until it holds its connection and waits.
            runtime.block_on(async {
                tokio::select! {
                    _ = &mut held => panic!("the operation cannot finish"),
                    _ = held_now => {}
                }
            });
            drop(runtime);
            // No runtime now, as in a shutdown's thread-local destructors.
            drop(held);
        })
        .join();
        assert!(
            outcome.is_ok(),
            "dropping an operation that holds a connection after its runtime ended panicked"
        );
    }
}
