//! The harness every integration test uses: a real roomcast server on an ephemeral
//! port, in-process on its own thread and actix `System`, with its own database
//! (a SQLite file in a temp dir, or a fresh PostgreSQL database), and clients that
//! talk to it over real sockets.
//!
//! - [`TestServer::spawn`] / [`TestServer::spawn_with`] start a server; dropping it
//!   stops the server, closes its pool and removes its database.
//! - [`Rpc`] calls RPCs the way any Connect client does, in either [`Codec`].
//! - [`both_backends!`] runs one test body against SQLite and against PostgreSQL.
//!
//! PostgreSQL tests need `ROOMCAST_TEST_POSTGRES_URL` (scripts/test.sh and
//! scripts/test-services.sh set it). Without it they fail when `CI=true` or
//! `ROOMCAST_TEST_REQUIRE_POSTGRES=1` (scripts/test.sh sets it), and otherwise each
//! prints a `SKIPPED <test>: ...` line on the console and returns, so a plain
//! `cargo test` works on a laptop and shows what it did not run.

#![allow(dead_code)] // each test binary uses its own subset of the helpers

pub mod cluster;
pub mod nginx;
pub mod poll;
pub mod raw_ws;
pub mod rooms;
pub mod sse;
pub mod ws;

use std::{
    future::Future,
    net::{SocketAddr, TcpListener},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rand::Rng as _;
use roomcast::{
    app::{self, Running},
    domain::AppState,
    proto::v1 as pb,
    settings::Settings,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use sqlx::{Connection as _, Executor as _};

/// The environment variable naming the PostgreSQL server tests may use: a URL whose
/// user can `CREATE DATABASE`.
pub const POSTGRES_URL_ENV: &str = "ROOMCAST_TEST_POSTGRES_URL";

/// The password every account made by the helpers gets.
pub const PASSWORD: &str = "correct horse battery staple";

/// A token secret for tests that sign their own roomcast tokens (see
/// [`TestServer::spawn_with`]); servers without it generate one.
pub const TEST_TOKEN_SECRET: &str = "roomcast-test-token-secret-0123456789abcdef";

/// How long a server may take to start before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dropping a server waits for its thread to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which database a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh SQLite file in a temp dir.
    Sqlite,
    /// A fresh database on the server named by `ROOMCAST_TEST_POSTGRES_URL`.
    Postgres,
}

/// Set (to `1`) by scripts/test.sh: PostgreSQL tests must run, so a missing
/// `ROOMCAST_TEST_POSTGRES_URL` is a failure, as under `CI=true`.
pub const REQUIRE_POSTGRES_ENV: &str = "ROOMCAST_TEST_REQUIRE_POSTGRES";

/// Whether PostgreSQL tests can run. Without `ROOMCAST_TEST_POSTGRES_URL` this
/// panics under CI (`CI=true`) or when `ROOMCAST_TEST_REQUIRE_POSTGRES=1`, and
/// otherwise reports the test as skipped (see [`report_skipped`]) and answers
/// false, so the caller returns without running it.
pub fn postgres_available() -> bool {
    if std::env::var(POSTGRES_URL_ENV).is_ok_and(|v| !v.trim().is_empty()) {
        return true;
    }
    let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "true" || v == "1");
    let required = flag("CI") || flag(REQUIRE_POSTGRES_ENV);
    assert!(
        !required,
        "{POSTGRES_URL_ENV} is not set but PostgreSQL tests are required (CI=true or \
         {REQUIRE_POSTGRES_ENV}=1). Run them through `bash scripts/test.sh`, or start the \
         services with `eval \"$(scripts/test-services.sh start)\"`."
    );
    report_skipped(&format!(
        "{POSTGRES_URL_ENV} is not set; run `bash scripts/test.sh` \
         (or `eval \"$(scripts/test-services.sh start)\"`) to include PostgreSQL"
    ));
    false
}

/// Prints `SKIPPED <test>: <why>` where the person running the tests sees it. The
/// test harness captures what `eprintln!` prints in a passing test and never shows
/// it, so the line is written to the process's stderr directly, once per skipped
/// test. (Stable libtest cannot mark a test ignored at run time; the test itself is
/// still counted as passed.)
pub fn report_skipped(why: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    // libtest names each test's thread after the test (not with --test-threads=1).
    let test = match thread.name() {
        Some(name) if name != "main" => name,
        _ => "a PostgreSQL test",
    };
    let line = format!("SKIPPED {test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Runs one async test body against both backends: generates a module `$name`
/// holding the tests `sqlite` and `postgres` (filter with `cargo test name::`).
///
/// ```ignore
/// both_backends!(sign_in_works, |backend| async move {
///     let server = TestServer::spawn(backend).await;
///     ...
/// });
/// ```
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let body = $body;
                body($crate::common::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if !$crate::common::postgres_available() {
                    return;
                }
                let body = $body;
                body($crate::common::Backend::Postgres).await;
            }
        }
    };
}

/// Settings for a test server: the defaults with `config/test.toml` on top
/// (loopback port 0, cheap argon2, few threads), no environment overrides.
/// `store.url` is replaced by the harness.
pub fn test_settings() -> Settings {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/test.toml");
    // A prefix no variable has: the developer's ROOMCAST_* environment must not
    // change what the tests run with.
    let no_env = figment::providers::Env::prefixed("ROOMCAST_TEST_HARNESS_IGNORES_ENV_");
    Settings::load_from(Some(&path), no_env).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A roomcast server running in this process until dropped.
pub struct TestServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// The settings it was started with (with `store.url` filled in).
    pub settings: Settings,
    pub backend: Backend,
    state: AppState,
    handle: actix_web::dev::ServerHandle,
    thread: Option<JoinHandle<()>>,
    http: reqwest::Client,
    /// The database this server made and removes when dropped (none when the
    /// test gave `store.url` itself).
    database: Option<TestDatabase>,
}

/// A fresh database for one test, removed when dropped: a SQLite file in a temp
/// dir, or a `roomcast_t_<random>` database on the PostgreSQL server of
/// `ROOMCAST_TEST_POSTGRES_URL`. For tests that run the `roomcast` binary too.
pub struct TestDatabase {
    /// The `store.url` of this database.
    pub url: String,
    /// The SQLite temp dir.
    dir: Option<tempfile::TempDir>,
    /// (admin URL, database name).
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    pub async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("roomcast-test-")
                    .tempdir()
                    .expect("create a temp dir");
                Self {
                    url: format!("sqlite://{}/roomcast.db", dir.path().display()),
                    dir: Some(dir),
                    postgres: None,
                }
            }
            Backend::Postgres => {
                let admin_url = std::env::var(POSTGRES_URL_ENV).unwrap_or_else(|_| {
                    panic!("{POSTGRES_URL_ENV} must be set to use a PostgreSQL test database")
                });
                let db = create_postgres_database(&admin_url).await;
                Self {
                    url: replace_database(&admin_url, &db),
                    dir: None,
                    postgres: Some((admin_url, db)),
                }
            }
        }
    }

    /// The SQLite temp dir (for files next to the database), if this is SQLite.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some((admin_url, db)) = self.postgres.take() {
            // Drop may run inside the test's runtime, where blocking on another
            // future is not allowed: use a thread with its own runtime.
            let dropper = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime to drop the test database")
                    .block_on(drop_postgres_database(&admin_url, &db));
            });
            let _ = dropper.join();
        }
    }
}

/// What the server thread reports once it listens.
struct Started {
    state: AppState,
    handle: actix_web::dev::ServerHandle,
    addr: SocketAddr,
}

impl TestServer {
    /// Starts a server with [`test_settings`] on `backend`.
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    /// Starts a server with [`test_settings`] changed by `configure`. Set
    /// `store.url` in `configure` to reuse an existing database; otherwise a fresh
    /// one is made (and removed on drop).
    pub async fn spawn_with(backend: Backend, configure: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings();
        settings.store.url = String::new();
        configure(&mut settings);
        let database = if settings.store.url.is_empty() {
            let database = TestDatabase::create(backend).await;
            settings.store.url = database.url.clone();
            Some(database)
        } else {
            None
        };
        Self::start(backend, settings, database).await
    }

    /// Stops this server and starts a new one on the same database (and a new
    /// port), with the settings changed by `configure`: for tests of what
    /// survives a restart.
    pub async fn restart_with(mut self, configure: impl FnOnce(&mut Settings)) -> Self {
        self.shutdown();
        let database = self.database.take();
        let mut settings = self.settings.clone();
        settings.server.listen = "127.0.0.1:0".parse().expect("valid address");
        configure(&mut settings);
        Self::start(self.backend, settings, database).await
    }

    async fn start(backend: Backend, settings: Settings, database: Option<TestDatabase>) -> Self {
        settings
            .validate()
            .unwrap_or_else(|e| panic!("test settings are invalid: {e}"));
        init_logging();
        let listener = TcpListener::bind(settings.server.listen).expect("bind 127.0.0.1:0");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<Started, String>>();
        let thread_settings = settings.clone();
        let thread = std::thread::Builder::new()
            .name("roomcast-test-server".into())
            .spawn(move || run_server(thread_settings, listener, ready_tx))
            .expect("spawn the server thread");
        let started = match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(started))) => started,
            Ok(Ok(Err(e))) => panic!("test server failed to start: {e}"),
            Ok(Err(_)) => panic!("test server thread ended before it started listening"),
            Err(_) => panic!("test server did not start within {START_TIMEOUT:?}"),
        };
        Self {
            addr: started.addr,
            settings,
            backend,
            state: started.state,
            handle: started.handle,
            thread: Some(thread),
            http: http_client(),
            database,
        }
    }

    /// Stops the server (without waiting for in-flight requests) and waits for
    /// its thread, which closes the store's pool.
    fn shutdown(&mut self) {
        // The command is sent before the returned future is polled; the server
        // thread observes the stop and cleans up on its own.
        drop(self.handle.stop(false));
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !thread.is_finished() {
            eprintln!(
                "test server on {} did not stop within {STOP_TIMEOUT:?}",
                self.addr
            );
        } else if thread.join().is_err() && !std::thread::panicking() {
            panic!("the test server thread panicked");
        }
    }

    /// Stops the server the way SIGTERM does: live WebSockets are closed with the
    /// "shutting down" code, then the HTTP server drains (for at most
    /// `server.shutdown_timeout_secs`). Answers how long that took.
    pub async fn stop_gracefully(&self) -> Duration {
        let started = Instant::now();
        let _ = self
            .state
            .sessions
            .send(roomcast::actors::session_registry::CloseAll)
            .await;
        self.handle.stop(true).await;
        started.elapsed()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The sum of every sample of the metric `name` on `/metrics` whose labels
    /// include each of `labels` (0 when none does). Panics when the server
    /// exports no sample of `name` at all, so a renamed metric fails loudly.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_at(self.http(), &self.base_url(), name, labels).await
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `ws://127.0.0.1:PORT{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The server's actors and store, for tests that reach behind the API.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A plain HTTP client (no bearer token), for requests that are not RPCs.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// An RPC client without credentials.
    pub fn rpc(&self) -> Rpc {
        Rpc::over(self.http.clone(), &self.base_url())
    }

    /// An RPC client sending `Authorization: Bearer <token>`.
    pub fn rpc_as(&self, token: &str) -> Rpc {
        self.rpc().with_token(token)
    }

    /// Signs up `username` (with [`PASSWORD`]) and returns the new account.
    pub async fn sign_up(&self, username: &str) -> Account {
        let resp: pb::SignUpResponse = self
            .rpc()
            .call(
                Codec::Proto,
                "AuthService/SignUp",
                &pb::SignUpRequest {
                    username: username.into(),
                    password: PASSWORD.into(),
                    display_name: String::new(),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("sign up `{username}`: {e}"));
        Account::from_parts(resp.user, resp.tokens)
    }

    /// Signs in `username` with `password`.
    pub async fn sign_in(&self, username: &str, password: &str) -> Account {
        let resp: pb::SignInResponse = self
            .rpc()
            .call(
                Codec::Proto,
                "AuthService/SignIn",
                &pb::SignInRequest {
                    username: username.into(),
                    password: password.into(),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("sign in `{username}`: {e}"));
        Account::from_parts(resp.user, resp.tokens)
    }

    /// Starts a server whose configured admin is `admin` / [`PASSWORD`], and signs
    /// the admin in.
    pub async fn spawn_with_admin(
        backend: Backend,
        configure: impl FnOnce(&mut Settings),
    ) -> (Self, Account) {
        let server = Self::spawn_with(backend, |s| {
            s.auth.admin_username = "admin".into();
            s.auth.admin_password = PASSWORD.into();
            configure(s);
        })
        .await;
        let admin = server.sign_in("admin", PASSWORD).await;
        (server, admin)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // The server first, so its pool is closed before the database goes.
        self.shutdown();
        self.database.take();
    }
}

/// The server thread: a fresh actix `System` running the server until it is
/// stopped; then the auth actors are stopped and the pool closed.
fn run_server(
    settings: Settings,
    listener: TcpListener,
    ready: tokio::sync::oneshot::Sender<Result<Started, String>>,
) {
    let system = actix_web::rt::System::new();
    system.block_on(async move {
        let Running {
            server,
            state,
            local_addr,
            ..
        } = match app::start(settings, listener).await {
            Ok(running) => running,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready.send(Ok(Started {
            state: state.clone(),
            handle: server.handle(),
            addr: local_addr,
        }));
        let _ = server.await;
        state.auth.stop();
        state.store.close().await;
    });
}

/// Logs go to stderr only when `RUST_LOG` is set, to keep test output readable.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        roomcast::telemetry::init(&Settings::default().log);
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build an HTTP client")
}

/// Creates `roomcast_t_<random>` on the server of `admin_url`.
async fn create_postgres_database(admin_url: &str) -> String {
    let name = format!("roomcast_t_{:016x}", rand::thread_rng().gen::<u64>());
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("connect to {POSTGRES_URL_ENV} ({admin_url}): {e}"));
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = conn.close().await;
    name
}

/// Drops a database made by [`create_postgres_database`]; failures only warn.
async fn drop_postgres_database(admin_url: &str, name: &str) {
    let result = async {
        let mut conn = sqlx::PgConnection::connect(admin_url).await?;
        // FORCE (PostgreSQL 13+) ends connections a test may have left open.
        let dropped = conn
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
        if dropped.is_err() {
            conn.execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                .await?;
        }
        conn.close().await
    }
    .await;
    if let Err(e) = result {
        eprintln!("warning: could not drop test database {name}: {e}");
    }
}

/// `postgres://u@h:p/old?x` → `postgres://u@h:p/<db>?x`.
fn replace_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_and_path = &base[scheme_end..];
    let host = host_and_path
        .split_once('/')
        .map_or(host_and_path, |(host, _)| host);
    let mut out = format!("{}{host}/{db}", &base[..scheme_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// The two codecs of the Connect unary protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `application/json`, canonical proto3 JSON.
    Json,
    /// `application/proto`, binary protobuf.
    Proto,
}

impl Codec {
    /// Both codecs, for tests that run every call in each.
    pub const ALL: [Codec; 2] = [Codec::Json, Codec::Proto];

    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        }
    }
}

/// A Connect error as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The HTTP status.
    pub status: u16,
    /// The Connect code, e.g. `invalid_argument`.
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {}: {}", self.status, self.code, self.message)
    }
}

impl RpcError {
    /// Asserts the Connect code, the HTTP status and a non-empty message; answers
    /// the message for further checks.
    #[track_caller]
    pub fn expect(&self, code: &str, status: u16) -> &str {
        assert_eq!(
            (self.code.as_str(), self.status),
            (code, status),
            "unexpected error: {self}"
        );
        assert!(
            self.message.trim().len() >= 5,
            "error message is not meaningful: {self}"
        );
        &self.message
    }
}

/// Asserts that `result` is a Connect error with `code` and `status`; answers the
/// message.
#[track_caller]
pub fn expect_error<T: std::fmt::Debug>(
    result: Result<T, RpcError>,
    code: &str,
    status: u16,
) -> String {
    match result {
        Ok(ok) => panic!("expected {code} ({status}), got a success: {ok:?}"),
        Err(e) => e.expect(code, status).to_owned(),
    }
}

/// The sum of every sample of the metric `name` on `{base}/metrics` whose labels
/// include each of `labels` (0 when none does): [`TestServer::metric`] for any
/// server (a process node of a cluster). Panics when the server exports no sample
/// of `name` at all, so a renamed metric fails loudly.
pub async fn metric_at(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let body = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let mut exported = false;
    let mut sum = 0.0;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        if series_name != name {
            continue;
        }
        exported = true;
        if labels
            .iter()
            .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().expect("a sample value");
        }
    }
    assert!(exported, "no {name} in {base}/metrics");
    sum
}

/// Calls RPCs on one server, optionally with a bearer token.
#[derive(Clone)]
pub struct Rpc {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// Calls go through a reverse proxy (nginx), whose own gateway errors are not
    /// Connect errors.
    behind_proxy: bool,
}

impl Rpc {
    /// Calls RPCs at `base` (`https://localhost:PORT`) through `http`: for servers
    /// that need a client of their own (TLS with the test's CA).
    pub fn over(http: reqwest::Client, base: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            behind_proxy: false,
        }
    }

    /// The same client for calls through a reverse proxy: the proxy's own 502, 503
    /// and 504 pages (no node answered: one is restarting or draining) come back as
    /// an `RpcError` with code `proxy_unavailable`, which a client retries like a
    /// refused connection; every answer of roomcast itself is still checked as a
    /// Connect error.
    pub fn through_proxy(self) -> Self {
        Self {
            behind_proxy: true,
            ..self
        }
    }

    /// The error of a non-200 reply.
    fn error(&self, status: u16, content_type: &str, body: &[u8]) -> RpcError {
        if self.behind_proxy
            && matches!(status, 502..=504)
            && !content_type.starts_with("application/json")
        {
            return RpcError {
                status,
                code: "proxy_unavailable".to_owned(),
                message: String::from_utf8_lossy(body).into_owned(),
            };
        }
        connect_error(status, content_type, body)
    }

    /// The same client with `Authorization: Bearer <token>`.
    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    /// `POST /roomcast.v1.<method>` where `method` is `Service/Method`, or a full
    /// path starting with `/`.
    fn url(&self, method: &str) -> String {
        if method.starts_with('/') {
            format!("{}{method}", self.base)
        } else {
            format!("{}/roomcast.v1.{method}", self.base)
        }
    }

    fn post(&self, method: &str, content_type: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(self.url(method))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("connect-protocol-version", "1");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    /// Sends a JSON body as is; answers the HTTP status and the parsed JSON reply
    /// (`Value::Null` for an empty body).
    pub async fn call_json(&self, method: &str, body: Value) -> (u16, Value) {
        let response = self
            .post(method, "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {method}: {e}"));
        json_reply(response).await
    }

    /// Sends `body` bytes with `content_type`; answers the status, the response's
    /// content type and body.
    pub async fn call_raw(
        &self,
        method: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, String, Vec<u8>) {
        let response = self
            .post(method, content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {method}: {e}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.bytes().await.expect("read the body").to_vec();
        (status, content_type, body)
    }

    /// Calls `method` in binary protobuf.
    pub async fn call_proto<Req, Resp>(&self, method: &str, req: &Req) -> Result<Resp, RpcError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let (status, content_type, body) = self
            .call_raw(method, "application/proto", req.encode_to_vec())
            .await;
        if status != 200 {
            return Err(self.error(status, &content_type, &body));
        }
        assert_eq!(
            content_type, "application/proto",
            "a binary request gets a binary reply"
        );
        Ok(Resp::decode(body.as_slice())
            .unwrap_or_else(|e| panic!("{method}: undecodable protobuf reply: {e}")))
    }

    /// Calls `method` in canonical proto3 JSON, with the typed messages.
    pub async fn call_typed_json<Req, Resp>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, RpcError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let body = serde_json::to_vec(req).expect("serialize the request");
        let (status, content_type, body) = self.call_raw(method, "application/json", body).await;
        if status != 200 {
            return Err(self.error(status, &content_type, &body));
        }
        assert_eq!(
            content_type, "application/json",
            "a JSON request gets a JSON reply"
        );
        Ok(serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{method}: reply is not the expected JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        }))
    }

    /// Calls `method` in `codec` with typed messages.
    pub async fn call<Req, Resp>(
        &self,
        codec: Codec,
        method: &str,
        req: &Req,
    ) -> Result<Resp, RpcError>
    where
        Req: prost::Message + Serialize,
        Resp: prost::Message + Default + DeserializeOwned,
    {
        match codec {
            Codec::Json => self.call_typed_json(method, req).await,
            Codec::Proto => self.call_proto(method, req).await,
        }
    }
}

/// Calls `AdminService/{method}` in JSON as `admin`; panics on an error.
pub async fn admin_call<Req, Resp>(
    server: &TestServer,
    admin: &Account,
    method: &str,
    req: &Req,
) -> Resp
where
    Req: prost::Message + Serialize,
    Resp: prost::Message + Default + DeserializeOwned,
{
    server
        .rpc_as(&admin.access_token)
        .call(Codec::Json, &format!("AdminService/{method}"), req)
        .await
        .unwrap_or_else(|e| panic!("AdminService/{method}: {e}"))
}

/// Reads a reply as JSON (any status).
pub async fn json_reply(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("read the body");
    if body.is_empty() {
        return (status, Value::Null);
    }
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "HTTP {status}: body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, value)
}

/// Parses a Connect error body; asserts it is the JSON shape the protocol defines.
pub fn connect_error(status: u16, content_type: &str, body: &[u8]) -> RpcError {
    assert!(
        content_type.starts_with("application/json"),
        "Connect errors are JSON, got `{content_type}` with HTTP {status}: {}",
        String::from_utf8_lossy(body)
    );
    let value: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "HTTP {status}: error body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("HTTP {status}: error body has no string `{name}`: {value}"))
            .to_owned()
    };
    RpcError {
        status,
        code: field("code"),
        message: field("message"),
    }
}

/// An account signed in by a helper.
#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: String,
    pub username: String,
    pub access_token: String,
    pub refresh_token: String,
    pub user: pb::User,
}

impl Account {
    /// The account a SignUp or SignIn reply describes.
    pub fn from_reply(user: Option<pb::User>, tokens: Option<pb::TokenPair>) -> Self {
        Self::from_parts(user, tokens)
    }

    fn from_parts(user: Option<pb::User>, tokens: Option<pb::TokenPair>) -> Self {
        let user = user.expect("the reply has a user");
        let tokens = tokens.expect("the reply has tokens");
        assert!(!tokens.access_token.is_empty() && !tokens.refresh_token.is_empty());
        Self {
            user_id: user.id.clone(),
            username: user.username.clone(),
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
            user,
        }
    }
}

/// A unique, valid username starting with `prefix` (tests share no data, but
/// unique names make failures easier to read in logs).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{:06}", rand::thread_rng().gen_range(0..1_000_000))
}

/// Polls `check` every 20 ms until it answers true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signs a roomcast access token with `secret` (the server's
/// `auth.token_secret`), for forged/expired-token tests.
pub fn sign_roomcast_token(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a test token")
}

/// The payload of a JWT (no verification), for tests that copy real claims.
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("JWT payload is base64url");
    serde_json::from_slice(&bytes).expect("JWT payload is JSON")
}

/// Unix time in seconds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}
