//! Conflicts between concurrent transactions, provoked on real databases: SQLite's
//! "database is locked" and PostgreSQL's serialization failure (SQLSTATE 40001)
//! and deadlock (40P01) are a named, retryable `StoreError::Busy` (decided by the
//! error code) and reach clients as `unavailable`, not `internal`.

mod common;

use std::str::FromStr as _;

use common::{Backend, TestDatabase};
use roomcast::{
    error::{ApiError, Code},
    store::StoreError,
};
use sqlx::{
    any::{AnyConnectOptions, AnyPoolOptions},
    Executor as _,
};

/// Pool of two connections to `url`, without a busy timeout on SQLite.
async fn pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    let url = if sqlite {
        format!("{url}?mode=rwc")
    } else {
        url.to_owned()
    };
    AnyPoolOptions::new()
        .max_connections(2)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 0;")
                        .await?;
                }
                Ok(())
            })
        })
        .connect_with(AnyConnectOptions::from_str(&url).expect("a URL"))
        .await
        .expect("connect")
}

fn assert_busy(error: sqlx::Error) {
    let error = StoreError::from(error);
    assert!(
        matches!(error, StoreError::Busy(_)) && error.is_retryable(),
        "not a retryable busy error: {error:?}"
    );
    let api = ApiError::from(error);
    assert_eq!(api.code, Code::Unavailable, "{api:?}");
}

#[tokio::test]
async fn sqlite_lock_conflicts_are_busy() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let pool = pool(&database.url).await;
    pool.execute("CREATE TABLE t (v INTEGER)")
        .await
        .expect("create");
    pool.execute("INSERT INTO t (v) VALUES (1)")
        .await
        .expect("insert");
    // A deferred transaction reads, another connection writes, then the first
    // one tries to write on its stale snapshot: SQLITE_BUSY_SNAPSHOT.
    let mut reader = pool.begin().await.expect("begin");
    sqlx::query("SELECT v FROM t")
        .fetch_all(&mut *reader)
        .await
        .expect("read");
    pool.execute("UPDATE t SET v = 2")
        .await
        .expect("a concurrent write");
    let error = sqlx::query("UPDATE t SET v = 3")
        .execute(&mut *reader)
        .await
        .expect_err("a write on a stale snapshot fails");
    assert_busy(error);
    drop(reader);
    // Two writers: "database is locked" for the second.
    let mut first = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
    sqlx::query("UPDATE t SET v = 4")
        .execute(&mut *first)
        .await
        .expect("write");
    let error = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map(|_| ())
        .expect_err("the second writer is locked out");
    assert_busy(error);
    // Other errors are not busy.
    let error = pool
        .execute("SELECT * FROM missing")
        .await
        .expect_err("no table");
    assert!(!StoreError::from(error).is_retryable());
}

#[tokio::test]
async fn postgres_serialization_failures_and_deadlocks_are_busy() {
    if !common::postgres_available() {
        return;
    }
    let database = TestDatabase::create(Backend::Postgres).await;
    let pool = pool(&database.url).await;
    pool.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")
        .await
        .expect("create");
    pool.execute("INSERT INTO t (id, v) VALUES (1, 0), (2, 0)")
        .await
        .expect("insert");

    // 40001: two serializable transactions update the same row.
    let mut a = pool.begin().await.expect("begin a");
    let mut b = pool.begin().await.expect("begin b");
    for tx in [&mut a, &mut b] {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .execute(&mut **tx)
            .await
            .expect("serializable");
        sqlx::query("SELECT v FROM t WHERE id = 1")
            .fetch_all(&mut **tx)
            .await
            .expect("read");
    }
    sqlx::query("UPDATE t SET v = 1 WHERE id = 1")
        .execute(&mut *a)
        .await
        .expect("a writes");
    a.commit().await.expect("a commits");
    let error = sqlx::query("UPDATE t SET v = 2 WHERE id = 1")
        .execute(&mut *b)
        .await
        .expect_err("b conflicts");
    assert_busy(error);
    drop(b);

    // 40P01: each transaction waits for the row the other one holds.
    let mut a = pool.begin().await.expect("begin a");
    let mut b = pool.begin().await.expect("begin b");
    sqlx::query("UPDATE t SET v = 3 WHERE id = 1")
        .execute(&mut *a)
        .await
        .expect("a locks 1");
    sqlx::query("UPDATE t SET v = 3 WHERE id = 2")
        .execute(&mut *b)
        .await
        .expect("b locks 2");
    let (ra, rb) = tokio::join!(
        sqlx::query("UPDATE t SET v = 4 WHERE id = 2").execute(&mut *a),
        sqlx::query("UPDATE t SET v = 4 WHERE id = 1").execute(&mut *b),
    );
    let error = match (ra, rb) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
        other => panic!("expected one deadlock victim, got {other:?}"),
    };
    assert_busy(error);
}
