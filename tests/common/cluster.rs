//! Several roomcast nodes sharing one PostgreSQL database (and, once configured, one
//! Redis), optionally behind a real nginx running `deploy/nginx/roomcast.conf`: the
//! harness of the multi-node tests (tests/cluster.rs, tests/cluster_users.rs).
//!
//! Each node is either an in-process [`TestServer`] (cheap, and the test can reach
//! its actors) or a real `roomcast serve` process of this build
//! ([`NodeKind::Process`]), which a test can `kill -9` ([`Cluster::kill`]) or stop
//! with SIGTERM ([`Cluster::terminate`]). Every node keeps its loopback port for
//! the life of the cluster, so nginx's upstream list stays valid across
//! [`Cluster::restart`]s. Every node shares `auth.token_secret`, so a token signed
//! by one node is accepted by all, as in a real deployment.
//!
//! ```ignore
//! let Some(cluster) = Cluster::builder(3).process_nodes().nginx().start().await else {
//!     return; // reported as skipped: no PostgreSQL or no nginx
//! };
//! let alice = cluster.sign_up(0, "alice").await;
//! let ws = WsClient::connect_authenticated(&cluster.nginx_ws_url(), WsCodec::Proto, &alice.access_token).await;
//! ```
//!
//! Requirements: PostgreSQL (`ROOMCAST_TEST_POSTGRES_URL`, see [`super`]); with
//! [`ClusterBuilder::nginx`], an nginx binary ([`super::nginx`]); with
//! [`ClusterBuilder::redis`], `ROOMCAST_TEST_REDIS_URL` ([`redis_url`]). Without
//! one of them [`ClusterBuilder::start`] reports the test as skipped (or fails it
//! where the suite requires them) and answers `None`.
//!
//! Process nodes write their configuration (the same [`Settings`] an in-process
//! node gets, as TOML) and their log into the cluster's temp dir; every process is
//! killed by its own PID when the cluster is dropped.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng as _;
use roomcast::settings::Settings;

use super::{
    nginx::{nginx_binary, Nginx},
    postgres_available, report_skipped, test_settings, Account, Backend, Codec, Rpc, TestDatabase,
    TestServer, PASSWORD, REQUIRE_POSTGRES_ENV, TEST_TOKEN_SECRET,
};
use roomcast::proto::v1 as pb;

/// The environment variable naming the Redis server the cluster tests use
/// (`redis://127.0.0.1:PORT/`; scripts/test.sh and scripts/test-services.sh set it).
pub const REDIS_URL_ENV: &str = "ROOMCAST_TEST_REDIS_URL";

/// The `roomcast` binary of this build, for process nodes.
pub const ROOMCAST: &str = env!("CARGO_BIN_EXE_roomcast");

/// How long a node may take to start (answer `/readyz` with 200).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Cluster::wait_exit`] waits for a process to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The Redis URL of the suite, if there is one; `None` after reporting the test as
/// skipped (it fails instead under `CI=true` or `ROOMCAST_TEST_REQUIRE_POSTGRES=1`,
/// where scripts/test.sh has started Redis).
pub fn redis_url() -> Option<String> {
    if let Ok(url) = std::env::var(REDIS_URL_ENV) {
        if !url.trim().is_empty() {
            return Some(url);
        }
    }
    let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !(flag("CI") || flag(REQUIRE_POSTGRES_ENV)),
        "{REDIS_URL_ENV} is not set but the cluster tests are required; run them through \
         `bash scripts/test.sh`, which starts Redis"
    );
    report_skipped(&format!(
        "{REDIS_URL_ENV} is not set; run `bash scripts/test.sh` \
         (or `eval \"$(scripts/test-services.sh start)\"`) to include the cluster tests"
    ));
    None
}

/// How a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A [`TestServer`] on its own thread in this process.
    InProcess,
    /// A `roomcast serve` child process (for `kill -9` and SIGTERM).
    Process,
}

/// Changes the settings of node `index` (called at every start of that node).
pub type Configure = Arc<dyn Fn(&mut Settings, usize) + Send + Sync>;

/// Builds a [`Cluster`].
pub struct ClusterBuilder {
    kinds: Vec<NodeKind>,
    nginx: bool,
    redis: bool,
    /// A Redis of the test's own instead of the suite's.
    redis_at: Option<String>,
    admin: bool,
    configure: Vec<Configure>,
}

impl ClusterBuilder {
    /// Every node a real process.
    pub fn process_nodes(mut self) -> Self {
        self.kinds.fill(NodeKind::Process);
        self
    }

    /// Node `index` runs as `kind`.
    pub fn node_kind(mut self, index: usize, kind: NodeKind) -> Self {
        self.kinds[index] = kind;
        self
    }

    /// nginx in front (running `deploy/nginx/roomcast.conf`), round robin over
    /// every node; the nodes trust it as a proxy.
    pub fn nginx(mut self) -> Self {
        self.nginx = true;
        self
    }

    /// The nodes are linked through the suite's Redis ([`redis_url`]) with
    /// `cluster.broker = "redis"`, each node named `node<index>`, on channels of
    /// this cluster's own (a prefix no other test uses).
    pub fn redis(mut self) -> Self {
        self.redis = true;
        self
    }

    /// Like [`ClusterBuilder::redis`], through the Redis at `url` (one the test
    /// started itself, to kill and restart it) instead of the suite's.
    pub fn redis_at(mut self, url: &str) -> Self {
        self.redis = true;
        self.redis_at = Some(url.to_owned());
        self
    }

    /// Configures the admin account `admin` / [`PASSWORD`] on every node
    /// ([`Cluster::admin`] signs it in).
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// Changes every node's settings (after the harness's own); may be called more
    /// than once.
    pub fn configure(mut self, f: impl Fn(&mut Settings, usize) + Send + Sync + 'static) -> Self {
        self.configure.push(Arc::new(f));
        self
    }

    /// Starts the nodes (one after the other: the first applies the migrations),
    /// then nginx. `None` (reported as skipped) when PostgreSQL, Redis or nginx is
    /// missing.
    pub async fn start(self) -> Option<Cluster> {
        if !postgres_available() {
            return None;
        }
        let redis = match (self.redis, self.redis_at) {
            (false, _) => None,
            (true, Some(url)) => Some(url),
            (true, None) => Some(redis_url()?),
        };
        let prefix = format!("rc{:012x}:", rand::thread_rng().gen::<u64>() >> 16);
        let nginx_bin = if self.nginx {
            Some(nginx_binary()?)
        } else {
            None
        };
        let database = TestDatabase::create(Backend::Postgres).await;
        let dir = tempfile::Builder::new()
            .prefix("roomcast-cluster-")
            .tempdir()
            .expect("a temp dir for the cluster");
        let mut nodes = Vec::with_capacity(self.kinds.len());
        for (index, kind) in self.kinds.iter().copied().enumerate() {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("a loopback address");
            let mut settings = test_settings();
            settings.server.listen = addr;
            settings.store.url = database.url.clone();
            settings.auth.token_secret = TEST_TOKEN_SECRET.into();
            // nginx connects from 127.0.0.1; the tests' clients come from 127.0.0.x.
            settings.server.trusted_proxies = vec!["127.0.0.1".parse().expect("an address")];
            if self.admin {
                settings.auth.admin_username = "admin".into();
                settings.auth.admin_password = PASSWORD.into();
            }
            if let Some(url) = &redis {
                settings.cluster.broker = "redis".into();
                settings.cluster.redis_url = url.clone();
                settings.cluster.channel_prefix = prefix.clone();
                settings.cluster.node_id = format!("node{index}");
            }
            for f in &self.configure {
                f(&mut settings, index);
            }
            nodes.push(Node {
                index,
                kind,
                addr,
                settings,
                running: None,
                starts: 0,
            });
        }
        let mut cluster = Cluster {
            nodes,
            nginx: None,
            database,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
        };
        for index in 0..cluster.nodes.len() {
            cluster.start_node(index).await;
        }
        if let Some(binary) = nginx_bin {
            let upstreams: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
            cluster.nginx = Some(Nginx::start(&binary, &upstreams));
        }
        Some(cluster)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One node: its fixed address and settings, and what runs it now.
struct Node {
    index: usize,
    kind: NodeKind,
    addr: SocketAddr,
    settings: Settings,
    running: Option<Running>,
    /// How many times it was started (names the log of each run).
    starts: usize,
}

enum Running {
    InProcess(Box<TestServer>),
    Process { child: Child, log: PathBuf },
}

/// N roomcast nodes on one PostgreSQL database, optionally behind nginx; every
/// node and nginx is stopped and the database removed when dropped.
pub struct Cluster {
    nodes: Vec<Node>,
    nginx: Option<Nginx>,
    database: TestDatabase,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Cluster {
    /// A cluster of `nodes` in-process nodes, without nginx or Redis until asked.
    pub fn builder(nodes: usize) -> ClusterBuilder {
        assert!(nodes > 0, "a cluster has at least one node");
        ClusterBuilder {
            kinds: vec![NodeKind::InProcess; nodes],
            nginx: false,
            redis: false,
            redis_at: None,
            admin: false,
            configure: Vec::new(),
        }
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The shared database's `store.url`.
    pub fn store_url(&self) -> &str {
        &self.database.url
    }

    /// Node `index`'s address (kept across restarts).
    pub fn addr(&self, index: usize) -> SocketAddr {
        self.nodes[index].addr
    }

    /// `http://127.0.0.1:PORT{path}` of node `index`.
    pub fn url(&self, index: usize, path: &str) -> String {
        format!("http://{}{path}", self.nodes[index].addr)
    }

    /// `ws://127.0.0.1:PORT/ws` of node `index`.
    pub fn ws_url(&self, index: usize) -> String {
        format!("ws://{}/ws", self.nodes[index].addr)
    }

    /// The settings node `index` runs with (after every `configure`).
    pub fn settings(&self, index: usize) -> &Settings {
        &self.nodes[index].settings
    }

    /// Changes node `index`'s settings for its next start.
    pub fn reconfigure(&mut self, index: usize, f: impl FnOnce(&mut Settings)) {
        f(&mut self.nodes[index].settings);
    }

    /// nginx, when the cluster has one.
    pub fn nginx(&self) -> &Nginx {
        self.nginx
            .as_ref()
            .expect("the cluster was built with .nginx()")
    }

    /// `http://NGINX{path}`.
    pub fn nginx_url(&self, path: &str) -> String {
        self.nginx().url(path)
    }

    /// `ws://NGINX/ws`.
    pub fn nginx_ws_url(&self) -> String {
        format!("ws://{}/ws", self.nginx().addr())
    }

    /// A plain HTTP client (for `/sse`, `/readyz`, ...).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// An RPC client of node `index`, without credentials.
    pub fn rpc(&self, index: usize) -> Rpc {
        Rpc::over(self.http.clone(), &self.url(index, ""))
    }

    /// An RPC client of node `index` with `token`.
    pub fn rpc_as(&self, index: usize, token: &str) -> Rpc {
        self.rpc(index).with_token(token)
    }

    /// An RPC client through nginx.
    pub fn nginx_rpc(&self) -> Rpc {
        Rpc::over(self.http.clone(), &self.nginx_url("")).through_proxy()
    }

    /// An RPC client through nginx with `token`.
    pub fn nginx_rpc_as(&self, token: &str) -> Rpc {
        self.nginx_rpc().with_token(token)
    }

    /// The in-process server of node `index` (its actors and store), if it is an
    /// in-process node and running.
    pub fn server(&self, index: usize) -> Option<&TestServer> {
        match &self.nodes[index].running {
            Some(Running::InProcess(server)) => Some(server),
            _ => None,
        }
    }

    /// Whether node `index` runs (a process that exited on its own counts as not).
    pub fn is_running(&mut self, index: usize) -> bool {
        match &mut self.nodes[index].running {
            Some(Running::InProcess(_)) => true,
            Some(Running::Process { child, .. }) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Signs up `username` (with [`PASSWORD`]) on node `index`.
    pub async fn sign_up(&self, index: usize, username: &str) -> Account {
        let reply: pb::SignUpResponse = self
            .rpc(index)
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
            .unwrap_or_else(|e| panic!("sign up `{username}` on node {index}: {e}"));
        Account::from_reply(reply.user, reply.tokens)
    }

    /// Signs in `username` (with [`PASSWORD`]) on node `index`: another session.
    pub async fn sign_in(&self, index: usize, username: &str) -> Account {
        let reply: pb::SignInResponse = self
            .rpc(index)
            .call(
                Codec::Proto,
                "AuthService/SignIn",
                &pb::SignInRequest {
                    username: username.into(),
                    password: PASSWORD.into(),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("sign in `{username}` on node {index}: {e}"));
        Account::from_reply(reply.user, reply.tokens)
    }

    /// The configured admin (see [`ClusterBuilder::admin`]), signed in on node `index`.
    pub async fn admin(&self, index: usize) -> Account {
        self.sign_in(index, "admin").await
    }

    /// Starts node `index` (which must be stopped) on its address.
    pub async fn start_node(&mut self, index: usize) {
        assert!(!self.is_running(index), "node {index} is already running");
        let node = &mut self.nodes[index];
        node.starts += 1;
        let running = match node.kind {
            NodeKind::InProcess => {
                let settings = node.settings.clone();
                let server =
                    TestServer::spawn_with(Backend::Postgres, move |s| *s = settings).await;
                Running::InProcess(Box::new(server))
            }
            NodeKind::Process => {
                let (child, log) = spawn_process(self.dir.path(), node).await;
                Running::Process { child, log }
            }
        };
        self.nodes[index].running = Some(running);
    }

    /// Stops node `index` abruptly: `kill -9` for a process; an in-process node is
    /// stopped without waiting for anything (its sockets close; it cannot be
    /// killed harder inside this process).
    pub fn kill(&mut self, index: usize) {
        match self.nodes[index].running.take() {
            Some(Running::Process { mut child, .. }) => {
                // Our own child, by its PID.
                let _ = child.kill();
                let _ = child.wait();
            }
            Some(Running::InProcess(server)) => drop(server),
            None => {}
        }
    }

    /// Sends SIGTERM to process node `index` (the graceful drain); see
    /// [`Cluster::wait_exit`].
    pub fn terminate(&self, index: usize) {
        self.signal(index, libc::SIGTERM);
    }

    /// Sends SIGKILL to process node `index` without waiting (so it can be called
    /// while the in-process nodes are borrowed); the harness reaps the child when
    /// the node is started again or the cluster is dropped.
    pub fn kill9(&self, index: usize) {
        self.signal(index, libc::SIGKILL);
    }

    fn signal(&self, index: usize, signal: libc::c_int) {
        let Some(Running::Process { child, .. }) = &self.nodes[index].running else {
            panic!("node {index} is not a running process");
        };
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        // SAFETY: kill(2) on the PID of a child this harness started and has not reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill -{signal} {pid}");
    }

    /// Waits (bounded) for process node `index` to exit; answers its status.
    pub async fn wait_exit(&mut self, index: usize) -> std::process::ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            let Some(Running::Process { child, .. }) = &mut self.nodes[index].running else {
                panic!("node {index} is not a running process");
            };
            if let Some(status) = child.try_wait().expect("wait for the node") {
                self.nodes[index].running = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {index} did not exit within {EXIT_TIMEOUT:?}:\n{}",
                self.log(index)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `index` gracefully (SIGTERM and waiting for the exit for a
    /// process; the in-process equivalent otherwise) and starts it again.
    pub async fn restart(&mut self, index: usize) {
        self.stop_gracefully(index).await;
        self.start_node(index).await;
    }

    /// Stops node `index` the way an operator does: SIGTERM and wait for the
    /// process to exit; an in-process node closes its connections with the
    /// "reconnect" code and stops.
    pub async fn stop_gracefully(&mut self, index: usize) {
        match &self.nodes[index].running {
            Some(Running::Process { .. }) => {
                self.terminate(index);
                let status = self.wait_exit(index).await;
                assert!(
                    status.success(),
                    "node {index} exited with {status} after SIGTERM:\n{}",
                    self.log(index)
                );
            }
            Some(Running::InProcess(server)) => {
                server.stop_gracefully().await;
                self.nodes[index].running = None;
            }
            None => {}
        }
    }

    /// The log of process node `index` (its current or last run), for assertion
    /// messages; empty for in-process nodes.
    pub fn log(&self, index: usize) -> String {
        let node = &self.nodes[index];
        match &node.running {
            Some(Running::Process { log, .. }) => std::fs::read_to_string(log).unwrap_or_default(),
            _ => std::fs::read_to_string(log_path(self.dir.path(), node.index, node.starts))
                .unwrap_or_default(),
        }
    }

    /// The sum of node `index`'s samples of metric `name` with `labels` (see
    /// [`super::metric_at`]). Only a process node has a registry of its own: the
    /// in-process nodes of one test binary share theirs.
    pub async fn metric(&self, index: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::metric_at(&self.http, &self.url(index, ""), name, labels).await
    }

    /// `GET /readyz` of node `index`: the status (0 when it does not answer) and body.
    pub async fn readyz(&self, index: usize) -> (u16, String) {
        match self
            .http
            .get(self.url(index, "/readyz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // nginx first (no new requests), then every node, then the database (the
        // field drops after this).
        self.nginx.take();
        for index in 0..self.nodes.len() {
            self.kill(index);
        }
    }
}

fn log_path(dir: &Path, index: usize, start: usize) -> PathBuf {
    dir.join(format!("node{index}-run{start}.log"))
}

/// Starts `roomcast serve` for `node` with its settings as a config file and no
/// `ROOMCAST_*` environment; waits until `/readyz` answers 200.
async fn spawn_process(dir: &Path, node: &Node) -> (Child, PathBuf) {
    let config = dir.join(format!("node{}.toml", node.index));
    let toml = toml::to_string(&node.settings).expect("the settings as TOML");
    std::fs::write(&config, toml).expect("write the node's config");
    let log = log_path(dir, node.index, node.starts);
    let mut command = Command::new(ROOMCAST);
    command.current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("ROOMCAST_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the node's log"))
        .spawn()
        .expect("spawn roomcast serve");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("an HTTP client");
    let url = format!("http://{}/readyz", node.addr);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(response) = http.get(&url).send().await {
            if response.status().is_success() {
                return (child, log);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "node {} exited at start ({status}):\n{}",
                node.index,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "node {} was not ready within {START_TIMEOUT:?}:\n{}",
                node.index,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
