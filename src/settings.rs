//! The one configuration tree. Values come from the built-in defaults (the constants
//! below, mirrored key for key in `config/default.toml`), then the `--config` file,
//! then `ROOMCAST_SECTION__KEY` environment variables. Unknown keys and bad values
//! are errors that name the key and where it came from.

use std::{net::SocketAddr, path::Path};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

pub use crate::http::client_addr::ProxyNet;

/// Environment variables with this prefix (and a `__` between section and key)
/// override the file.
pub const ENV_PREFIX: &str = "ROOMCAST_";

/// Everything roomcast can be configured with.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub cors: CorsSettings,
    pub store: StoreSettings,
    pub auth: AuthSettings,
    pub rooms: RoomSettings,
    pub realtime: RealtimeSettings,
    pub log: LogSettings,
    pub publish: PublishSettings,
    pub notifications: NotificationSettings,
    pub poll: PollSettings,
    pub metrics: MetricsSettings,
    pub tls: TlsSettings,
    pub web: WebSettings,
    pub cluster: ClusterSettings,
}

/// The HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// Largest accepted request body, in bytes.
    pub max_request_bytes: usize,
    /// Upper bound for `Connect-Timeout-Ms`, and the deadline of requests without one.
    pub request_timeout_ms: u64,
    /// How long a graceful shutdown waits for in-flight requests, in seconds.
    pub shutdown_timeout_secs: u64,
    /// When the node drains (SIGTERM, AdminService.DrainNode), its live connections
    /// are told to reconnect spread evenly over this window, in milliseconds, so the
    /// other nodes are not stampeded by every client at once. 0 closes them at once.
    pub drain_spread_ms: u64,
    /// RPC replies at least this long are gzip-compressed for clients that accept it.
    pub compress_min_bytes: usize,
    /// How long a new connection may take to send its first request's headers (or
    /// the HTTP/2 preface), in milliseconds; slower clients get `408` and are closed.
    /// A later request on a keep-alive connection may take this plus
    /// `request_timeout_ms` from its first byte until its answer starts.
    pub header_timeout_ms: u64,
    /// Most open connections (HTTP and WebSocket); more get `503`. Kept below the
    /// process's open file limit (`ulimit -n`), with room for the store and logs.
    pub max_connections: usize,
    /// Reverse proxies (addresses or networks) whose `X-Forwarded-For` is believed:
    /// a request from one of them counts as coming from the address it forwarded
    /// (per-address limits, the admin API). Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<ProxyNet>,
}

/// The listen address of the embedded default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Largest accepted request body: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Requests without `Connect-Timeout-Ms` get 30 s.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Graceful shutdown waits 30 s for in-flight requests.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
/// A draining node's clients reconnect spread over 10 s: a node of 10,000
/// connections sends the others 1,000 reconnects a second, not 10,000 at once.
pub const DEFAULT_DRAIN_SPREAD_MS: u64 = 10_000;
/// Replies from 1 KiB up are compressed (the threshold connect-es uses for requests):
/// below it, gzip's header and CPU cost outweigh the bytes saved.
pub const DEFAULT_COMPRESS_MIN_BYTES: usize = 1024;
/// A new connection has 5 s to send its request headers.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 5_000;
/// At most 10,000 open connections (lowered to fit the file descriptor limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid address"),
            workers: 0,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            drain_spread_ms: DEFAULT_DRAIN_SPREAD_MS,
            compress_min_bytes: DEFAULT_COMPRESS_MIN_BYTES,
            header_timeout_ms: DEFAULT_HEADER_TIMEOUT_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Cross-origin access for browser clients served from another origin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsSettings {
    /// Origins allowed to call the API, e.g. `["https://chat.example.com"]`;
    /// `["*"]` allows any origin; empty disables CORS.
    pub allowed_origins: Vec<String>,
    /// How long browsers may cache a preflight answer, in seconds.
    pub max_age_secs: usize,
}

impl Default for CorsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age_secs: 3600,
        }
    }
}

/// The database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite://path/to/file.db` (created when missing) or `postgres://user:pass@host/db`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Apply pending migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// SQLite `synchronous` pragma: `full` (durable on power loss) or `normal`.
    pub sqlite_synchronous: String,
    /// How long a query waits for a pool connection, in milliseconds.
    pub acquire_timeout_ms: u64,
    /// SQLite: most messages one group commit across rooms stores (the rooms'
    /// batches waiting while the previous commit ran, see
    /// `crate::actors::commit_batcher`).
    pub group_commit_max_messages: usize,
    /// Entries per kind of access fact (rooms, memberships, sessions, users' room
    /// lists) kept in memory so that sends, subscriptions and token checks need no
    /// query; every change drops its entries at once. 0 turns the cache off.
    pub access_cache_max_entries: usize,
}

/// How nodes exchange what crosses them (room events, user pushes, control
/// commands, presence): see `crate::cluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// `local`: one node, the in-process broker. `redis`: several nodes sharing one
    /// PostgreSQL store (`store.url`) and one Redis (`redis_url`).
    pub broker: String,
    /// The Redis every node uses (`redis://host:port/db`); used when `broker = "redis"`.
    pub redis_url: String,
    /// This node's name in the cluster (logs, metrics, the origin of what it
    /// publishes); empty: one is generated at each start.
    pub node_id: String,
    /// Prefix of every Redis channel name, so several clusters (or test runs) can
    /// share one Redis.
    pub channel_prefix: String,
    /// First wait before reconnecting to Redis after a failure, in milliseconds;
    /// doubled after each failed attempt.
    pub reconnect_min_ms: u64,
    /// Longest wait between two reconnection attempts, in milliseconds.
    pub reconnect_max_ms: u64,
    /// Live rooms: how long a node holds back an event that arrives after a hole in
    /// the sequence (another node's event still on its way) before it reports the
    /// hole as a `gap` and goes on, in milliseconds.
    pub live_holdback_ms: u64,
    /// How often a node publishes which users are online on it, in milliseconds
    /// (`crate::cluster::presence`).
    pub presence_refresh_ms: u64,
    /// A node whose presence was not refreshed for this long counts as gone: its
    /// users are offline for the others, in milliseconds (a few refreshes).
    pub presence_expiry_ms: u64,
    /// Live rooms across nodes: how long a retry (same `client_message_id`) of a
    /// live comment gets the first result on any node, in milliseconds
    /// (`crate::cluster::live_guard`; within one node, as long as the ring holds it).
    pub live_retry_window_ms: u64,
}

/// Default of `cluster.reconnect_min_ms`.
pub const CLUSTER_RECONNECT_MIN_MS: u64 = 100;
/// Default of `cluster.reconnect_max_ms`.
pub const CLUSTER_RECONNECT_MAX_MS: u64 = 5_000;
/// Default of `cluster.live_holdback_ms`: a few Redis round trips on one network.
pub const CLUSTER_LIVE_HOLDBACK_MS: u64 = 200;
/// Default of `cluster.live_retry_window_ms`: longer than any client retries one
/// send.
pub const CLUSTER_LIVE_RETRY_WINDOW_MS: u64 = 600_000;
/// Default of `cluster.presence_refresh_ms`: the others see a user come online
/// within 2 s.
pub const CLUSTER_PRESENCE_REFRESH_MS: u64 = 2_000;
/// Default of `cluster.presence_expiry_ms`: three refreshes missed, so one lost
/// message (pub/sub is at most once) does not make anyone offline.
pub const CLUSTER_PRESENCE_EXPIRY_MS: u64 = 7_000;
/// Default of `cluster.channel_prefix`.
pub const CLUSTER_CHANNEL_PREFIX: &str = "roomcast:";

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            broker: "local".into(),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            node_id: String::new(),
            channel_prefix: CLUSTER_CHANNEL_PREFIX.into(),
            reconnect_min_ms: CLUSTER_RECONNECT_MIN_MS,
            reconnect_max_ms: CLUSTER_RECONNECT_MAX_MS,
            live_holdback_ms: CLUSTER_LIVE_HOLDBACK_MS,
            presence_refresh_ms: CLUSTER_PRESENCE_REFRESH_MS,
            presence_expiry_ms: CLUSTER_PRESENCE_EXPIRY_MS,
            live_retry_window_ms: CLUSTER_LIVE_RETRY_WINDOW_MS,
        }
    }
}

/// Default of `store.group_commit_max_messages`: 16 rooms' full batches
/// (`rooms.max_batch`, 256) in one transaction; more wait for the next one.
pub const GROUP_COMMIT_MAX_MESSAGES: usize = 4096;

/// Default of `store.access_cache_max_entries`: a busy node's sessions and
/// memberships (a few hundred bytes each).
pub const ACCESS_CACHE_MAX_ENTRIES: usize = 100_000;

/// The embedded default database.
pub const DEFAULT_STORE_URL: &str = "sqlite://data/roomcast.db";

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: DEFAULT_STORE_URL.into(),
            max_connections: 8,
            migrate_on_start: true,
            sqlite_synchronous: "full".into(),
            acquire_timeout_ms: 10_000,
            group_commit_max_messages: GROUP_COMMIT_MAX_MESSAGES,
            access_cache_max_entries: ACCESS_CACHE_MAX_ENTRIES,
        }
    }
}

/// Accounts, tokens and external applications.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Secret that signs access tokens (at least 32 bytes). Empty: one is generated
    /// on first start and kept in the store, so every node sharing the store uses it.
    pub token_secret: String,
    /// Access token lifetime, in seconds.
    pub access_token_ttl_secs: u64,
    /// Refresh token (session) lifetime, in seconds.
    pub refresh_token_ttl_secs: u64,
    /// Whether anyone may call SignUp.
    pub allow_sign_up: bool,
    /// Role of accounts created by SignUp: `member` or `guest`.
    pub sign_up_role: String,
    /// Threads of the password-hashing actor pool.
    pub hasher_threads: usize,
    /// argon2id memory cost in KiB.
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    pub argon2_iterations: u32,
    /// Create this admin account at start when it does not exist (with `admin_password`).
    pub admin_username: String,
    /// Password of `admin_username`; only used to create the account.
    pub admin_password: String,
    /// A refresh token presented again within this many milliseconds of its use
    /// (and before the next one was used) gets another token pair instead of
    /// revoking the session; 0: any second use revokes.
    pub refresh_reuse_grace_ms: u64,
    /// Password hashes and verifications that may wait or run at once; more are
    /// refused with `unavailable` at once.
    pub hasher_max_pending: usize,
    /// SignIn attempts per minute from one client address (an IPv6 /64); 0: no limit.
    pub sign_in_ip_per_minute: u32,
    /// SignIn attempts one address may make in a burst above that rate.
    pub sign_in_ip_burst: u32,
    /// Failed SignIns in a row one username may have before each further attempt
    /// must wait; 0: no per-account limit.
    pub sign_in_free_failures: u32,
    /// The first wait after `sign_in_free_failures`, in milliseconds; it doubles
    /// with each further failure.
    pub sign_in_backoff_base_ms: u64,
    /// The longest wait between SignIn attempts of one username, in milliseconds.
    pub sign_in_backoff_max_ms: u64,
    /// A username's failure count is forgotten after this many seconds without a
    /// failure.
    pub sign_in_failure_memory_secs: u64,
    /// SignUps per hour from one client address (an IPv6 /64); 0: no limit.
    pub sign_up_ip_per_hour: u32,
    /// SignUps one address may make in a burst above that rate.
    pub sign_up_ip_burst: u32,
    /// How often the auth actors re-read the access rules from the store (ms);
    /// 0 = only when changed on this node.
    pub access_rules_refresh_ms: u64,
    /// Tokens signed by an external application.
    pub external: ExternalAuthSettings,
}

/// Access tokens live 15 minutes.
pub const DEFAULT_ACCESS_TOKEN_TTL_SECS: u64 = 15 * 60;
/// Refresh tokens live 30 days.
pub const DEFAULT_REFRESH_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// A consumed refresh token is honoured again for 10 s (concurrent refreshes,
/// retries of a lost answer).
pub const DEFAULT_REFRESH_REUSE_GRACE_MS: u64 = 10_000;
/// 64 hashing jobs waiting or running: about a second and a half of work for two
/// hashing threads at the default cost.
pub const DEFAULT_HASHER_MAX_PENDING: usize = 64;
/// SignIns per minute from one address.
pub const DEFAULT_SIGN_IN_IP_PER_MINUTE: u32 = 30;
/// SignIn burst from one address.
pub const DEFAULT_SIGN_IN_IP_BURST: u32 = 10;
/// Failed SignIns in a row before a username must wait.
pub const DEFAULT_SIGN_IN_FREE_FAILURES: u32 = 5;
/// First wait after the free failures: 1 s, doubling.
pub const DEFAULT_SIGN_IN_BACKOFF_BASE_MS: u64 = 1_000;
/// Longest wait between attempts of one username: 5 minutes.
pub const DEFAULT_SIGN_IN_BACKOFF_MAX_MS: u64 = 5 * 60 * 1000;
/// Failures are forgotten after an hour without one.
pub const DEFAULT_SIGN_IN_FAILURE_MEMORY_SECS: u64 = 3600;
/// SignUps per hour from one address.
pub const DEFAULT_SIGN_UP_IP_PER_HOUR: u32 = 20;
/// SignUp burst from one address.
pub const DEFAULT_SIGN_UP_IP_BURST: u32 = 5;
/// Access rules are re-read from the store every 5 s, so a change made on another
/// node applies here within that time (a change made here applies at once).
pub const DEFAULT_ACCESS_RULES_REFRESH_MS: u64 = 5_000;

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            token_secret: String::new(),
            access_token_ttl_secs: DEFAULT_ACCESS_TOKEN_TTL_SECS,
            refresh_token_ttl_secs: DEFAULT_REFRESH_TOKEN_TTL_SECS,
            allow_sign_up: true,
            sign_up_role: "member".into(),
            hasher_threads: 2,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            admin_username: String::new(),
            admin_password: String::new(),
            refresh_reuse_grace_ms: DEFAULT_REFRESH_REUSE_GRACE_MS,
            hasher_max_pending: DEFAULT_HASHER_MAX_PENDING,
            sign_in_ip_per_minute: DEFAULT_SIGN_IN_IP_PER_MINUTE,
            sign_in_ip_burst: DEFAULT_SIGN_IN_IP_BURST,
            sign_in_free_failures: DEFAULT_SIGN_IN_FREE_FAILURES,
            sign_in_backoff_base_ms: DEFAULT_SIGN_IN_BACKOFF_BASE_MS,
            sign_in_backoff_max_ms: DEFAULT_SIGN_IN_BACKOFF_MAX_MS,
            sign_in_failure_memory_secs: DEFAULT_SIGN_IN_FAILURE_MEMORY_SECS,
            sign_up_ip_per_hour: DEFAULT_SIGN_UP_IP_PER_HOUR,
            sign_up_ip_burst: DEFAULT_SIGN_UP_IP_BURST,
            access_rules_refresh_ms: DEFAULT_ACCESS_RULES_REFRESH_MS,
            external: ExternalAuthSettings::default(),
        }
    }
}

/// Tokens that an application's backend signs for its own users.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalAuthSettings {
    /// Accept external tokens.
    pub enabled: bool,
    /// `HS256`, `RS256` or `ES256`.
    pub algorithm: String,
    /// HS256 shared secret.
    pub secret: String,
    /// RS256 / ES256 public key, PEM.
    pub public_key_pem: String,
    /// Required `iss`, when not empty.
    pub issuer: String,
    /// Required `aud`, when not empty.
    pub audience: String,
    /// Claim holding the application's user id.
    pub user_id_claim: String,
    /// Claim holding the display name.
    pub name_claim: String,
    /// Claim holding a list of roles (`admin`, `member`, `guest`); the highest wins.
    pub roles_claim: String,
    /// Role when the token names none.
    pub default_role: String,
}

impl Default for ExternalAuthSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            algorithm: "HS256".into(),
            secret: String::new(),
            public_key_pem: String::new(),
            issuer: String::new(),
            audience: String::new(),
            user_id_claim: "sub".into(),
            name_claim: "name".into(),
            roles_claim: "roles".into(),
            default_role: "member".into(),
        }
    }
}

/// Rooms and messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomSettings {
    /// Largest message text, in bytes.
    pub max_message_bytes: usize,
    /// Recent events each room actor keeps in memory for fast resume.
    pub ring_size: usize,
    /// A room actor with no subscribers stops after this many seconds.
    pub idle_stop_secs: u64,
    /// Most events a history page returns.
    pub history_page_max: u32,
    /// Most messages stored in one group commit.
    pub max_batch: usize,
    /// How often history past each room's retention is removed, in seconds.
    pub retention_sweep_secs: u64,
    /// Most sends waiting in one room for their commit; more are refused with
    /// `unavailable` (retry with the same client message id).
    pub max_pending_appends: usize,
    /// Most rooms one user may create (server admins are exempt); 0: no limit.
    pub max_rooms_per_user: u64,
    /// Live rooms (comments kept in memory, host controls).
    pub live: LiveRoomSettings,
}

/// Default of `rooms.live.ring_size`.
pub const LIVE_RING_SIZE: usize = 1000;
/// Default of `rooms.live.coalesce_ms`: the longest window a busy live room
/// grows to (at 2,000 viewers × 200 msgs/s, 20 events per batch gave 971k
/// deliveries per server CPU-second where 5 gave 400k; BENCHMARKS.md).
pub const LIVE_COALESCE_MS: u64 = 100;
/// Default of `rooms.live.coalesce_min_ms`: the window of a live room within its
/// write budget.
pub const LIVE_COALESCE_MIN_MS: u64 = 5;
/// Default of `rooms.live.coalesce_writes_per_sec`: about half of one core's
/// frame writes on loopback (~10 µs each with the per-subscriber bookkeeping).
pub const LIVE_COALESCE_WRITES_PER_SEC: u64 = 50_000;
/// Default of `rooms.live.coalesce_groups`.
pub const LIVE_COALESCE_GROUPS: usize = 8;
/// Default of `rooms.live.viewer_count_interval_ms`.
pub const LIVE_VIEWER_COUNT_INTERVAL_MS: u64 = 2000;
/// Default of `rooms.live.seq_reservation`.
pub const LIVE_SEQ_RESERVATION: u64 = 1024;

/// How a room kind coalesces its events (see
/// `crate::actors::live_state::AdaptiveWindow`): the window adapts between
/// `min_ms` and `max_ms` to keep the room within `writes_per_sec` frame writes a
/// second, and a busy room's subscribers take turns in up to `groups` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalescing {
    pub min_ms: u64,
    pub max_ms: u64,
    pub writes_per_sec: u64,
    pub groups: usize,
}

/// Live rooms: messages kept in an in-memory ring instead of the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveRoomSettings {
    /// Messages each live room keeps in memory; a client resuming from before
    /// them gets a `gap` frame.
    pub ring_size: usize,
    /// Longest coalescing window of live rooms in ms (a busy room sends one batch
    /// per window; a quiet one sends at once); 0: off. The window adapts between
    /// `coalesce_min_ms` and this (see `crate::actors::live_state::AdaptiveWindow`).
    pub coalesce_ms: u64,
    /// Shortest coalescing window of live rooms in ms: a room whose events reach
    /// its subscribers within `coalesce_writes_per_sec` writes a second. Equal to
    /// `coalesce_ms`: a fixed window.
    pub coalesce_min_ms: u64,
    /// Frame writes a second a live room may cause (event rate × subscribers)
    /// before its window grows (to subscribers ÷ this, at most `coalesce_ms`).
    pub coalesce_writes_per_sec: u64,
    /// Groups a busy live room's subscribers take turns in (1 to 64; 1: off). A
    /// room whose window is at least this many times `coalesce_min_ms` delivers
    /// every window ÷ this to one group in turn, so each subscriber still gets one
    /// write per window while the room's writes spread over the window instead of
    /// leaving in one burst (which would add its length to the latency).
    pub coalesce_groups: usize,
    /// How often subscribers of a live room get its viewer count, in ms.
    pub viewer_count_interval_ms: u64,
    /// Whether join, leave and presence events are pushed in live rooms.
    pub member_events: bool,
    /// Sequence numbers a live room reserves in the store at a time (one store
    /// write per this many messages; a restart skips at most this many numbers,
    /// announced by a `gap`).
    pub seq_reservation: u64,
    /// Words refused in live rooms that enable the word filter (matched as whole
    /// words, case-insensitively).
    pub word_filter: Vec<String>,
}

impl LiveRoomSettings {
    pub fn coalescing(&self) -> Coalescing {
        Coalescing {
            min_ms: self.coalesce_min_ms,
            max_ms: self.coalesce_ms,
            writes_per_sec: self.coalesce_writes_per_sec,
            groups: self.coalesce_groups,
        }
    }
}

impl Default for LiveRoomSettings {
    fn default() -> Self {
        Self {
            ring_size: LIVE_RING_SIZE,
            coalesce_ms: LIVE_COALESCE_MS,
            coalesce_min_ms: LIVE_COALESCE_MIN_MS,
            coalesce_writes_per_sec: LIVE_COALESCE_WRITES_PER_SEC,
            coalesce_groups: LIVE_COALESCE_GROUPS,
            viewer_count_interval_ms: LIVE_VIEWER_COUNT_INTERVAL_MS,
            member_events: false,
            seq_reservation: LIVE_SEQ_RESERVATION,
            word_filter: Vec::new(),
        }
    }
}

impl Default for RoomSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 4096,
            ring_size: 512,
            idle_stop_secs: 300,
            history_page_max: 200,
            max_batch: 256,
            retention_sweep_secs: 60,
            max_pending_appends: 4096,
            max_rooms_per_user: 1000,
            live: LiveRoomSettings::default(),
        }
    }
}

/// WebSocket connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeSettings {
    /// How often the server pings each connection, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// A connection that sent nothing (not even a pong) for this long is closed.
    pub idle_timeout_ms: u64,
    /// A connection must authenticate within this many milliseconds.
    pub auth_deadline_ms: u64,
    /// Largest accepted client frame, in bytes.
    pub max_frame_bytes: usize,
    /// Most rooms one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Most frames waiting to be written to one connection before it lags.
    pub outbound_queue_frames: usize,
    /// Most bytes waiting to be written to one connection before it lags.
    pub outbound_queue_bytes: usize,
    /// A room that delivered within this many milliseconds collects new events
    /// until the window ends and delivers them in one push per subscriber (a quiet
    /// room delivers at once); 0 turns coalescing off. The shortest window of a
    /// chat room: a busy one's grows up to `coalesce_max_ms`.
    pub coalesce_window_ms: u64,
    /// Longest coalescing window of a chat room whose event rate × subscribers
    /// exceeds `coalesce_writes_per_sec` (it grows to subscribers ÷ that budget).
    pub coalesce_max_ms: u64,
    /// Frame writes a second a chat room may cause before its window grows.
    pub coalesce_writes_per_sec: u64,
    /// Groups a busy chat room's subscribers take turns in (1 to 64; 1: off), as
    /// `rooms.live.coalesce_groups`.
    pub coalesce_groups: usize,
    /// Catch-ups a lagging connection may need in a row before it is closed.
    pub max_catch_up_rounds: u32,
    /// Sends per second each user may make (token bucket refill rate).
    pub send_rate_per_sec: u32,
    /// Sends a user may burst above the rate.
    pub send_burst: u32,
    /// Most `send`, `mark_read` and `typing` frames of one connection being worked on
    /// at once; more are answered with `resource_exhausted`.
    pub max_inflight_requests: usize,
    /// Most store reads (access checks of subscriptions, catch-up pages) one
    /// connection runs at once; the others wait their turn.
    pub max_parallel_reads: usize,
    /// Most WebSocket connections from one peer address; 0: no limit. Behind a
    /// reverse proxy every connection comes from the proxy: set 0 and limit there.
    pub max_connections_per_ip: usize,
    /// Most WebSocket connections of one user (or API key); 0: no limit.
    pub max_connections_per_user: usize,
    /// Most WebSocket connections that have not authenticated yet; 0: no limit.
    pub max_unauthenticated: usize,
    /// Browser origins allowed to open WebSockets besides the server's own (an
    /// `Origin` whose host is the request's `Host`), e.g. `["https://chat.example.com"]`;
    /// `["*"]` allows any. Clients that send no `Origin` (not browsers) are allowed.
    pub allowed_origins: Vec<String>,
    /// A connection whose socket accepted no bytes for this long is dropped, in
    /// milliseconds (its peer stopped reading).
    pub write_stall_timeout_ms: u64,
    /// Most bytes queued for one connection (replies, catch-up pages and pushes)
    /// before it is closed with TOO_SLOW.
    pub max_write_queue_bytes: usize,
    /// Path of a WebSocket echo endpoint over roomcast's own framing, for protocol
    /// conformance tests (the Autobahn suite); "" (the default) turns it off.
    pub echo_path: String,
    /// How often an SSE stream (`GET /sse`) gets a comment heartbeat, in
    /// milliseconds (keeps proxies from closing an idle stream).
    pub sse_heartbeat_interval_ms: u64,
    /// The `retry:` an SSE stream announces: how long `EventSource` waits before
    /// reconnecting, in milliseconds.
    pub sse_retry_ms: u64,
}

impl RealtimeSettings {
    /// A chat room's coalescing: never a shorter window than `coalesce_window_ms`
    /// (0: none at all).
    pub fn coalescing(&self) -> Coalescing {
        let min_ms = self.coalesce_window_ms;
        Coalescing {
            min_ms,
            max_ms: if min_ms == 0 {
                0
            } else {
                self.coalesce_max_ms.max(min_ms)
            },
            writes_per_sec: self.coalesce_writes_per_sec,
            groups: self.coalesce_groups,
        }
    }
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 15_000,
            idle_timeout_ms: 45_000,
            auth_deadline_ms: 10_000,
            max_frame_bytes: 64 * 1024,
            max_subscriptions: 256,
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            coalesce_window_ms: 2,
            coalesce_max_ms: 20,
            coalesce_writes_per_sec: 50_000,
            coalesce_groups: 8,
            max_catch_up_rounds: 8,
            send_rate_per_sec: 20,
            send_burst: 40,
            max_inflight_requests: 64,
            max_parallel_reads: 2,
            max_connections_per_ip: 256,
            max_connections_per_user: 32,
            max_unauthenticated: 1024,
            allowed_origins: Vec::new(),
            write_stall_timeout_ms: 30_000,
            max_write_queue_bytes: 8 * 1024 * 1024,
            echo_path: String::new(),
            sse_heartbeat_interval_ms: 15_000,
            sse_retry_ms: 2_000,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `tracing` filter, e.g. `info` or `roomcast=debug,actix_web=info`.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// The server publish API (PublishService).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSettings {
    /// Most rooms one Broadcast or GetOnlineCounts call may name.
    pub max_broadcast_rooms: usize,
}

/// Default of `publish.max_broadcast_rooms`.
pub const MAX_BROADCAST_ROOMS: usize = 100;

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            max_broadcast_rooms: MAX_BROADCAST_ROOMS,
        }
    }
}

/// Per-user notification streams (NotificationService).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationSettings {
    /// Notifications older than this many seconds are removed (and no longer listed).
    pub retention_secs: u64,
    /// Largest page of ListNotifications and of a WebSocket replay read.
    pub page_max: u32,
}

/// The Prometheus metrics endpoint (docs/operations.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Serve the metrics at all.
    pub enabled: bool,
    /// The HTTP path of the text exposition.
    pub path: String,
    /// A separate listener for the metrics only, e.g. `127.0.0.1:9464`; a port
    /// alone (`9464`) means loopback, so they are not public; empty serves them
    /// on `server.listen`.
    pub listen: String,
}

/// Default of `metrics.path`: where Prometheus looks by default.
pub const METRICS_PATH: &str = "/metrics";

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: METRICS_PATH.to_owned(),
            listen: String::new(),
        }
    }
}

/// TLS terminated by roomcast itself (docs/deployment.md). Off while `cert_file`
/// is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM certificate chain, the server's certificate first; empty: no TLS.
    pub cert_file: String,
    /// PEM private key of that certificate (PKCS#8, RSA or EC).
    pub key_file: String,
    /// How often to look for changed certificate or key files and reload them,
    /// in seconds; 0: only on SIGHUP.
    pub watch_interval_secs: u64,
}

/// Default of `tls.watch_interval_secs`: a renewed certificate is served within
/// a minute without a signal (certbot, cert-manager and friends replace the files).
pub const TLS_WATCH_INTERVAL_SECS: u64 = 60;

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_file: String::new(),
            key_file: String::new(),
            watch_interval_secs: TLS_WATCH_INTERVAL_SECS,
        }
    }
}

/// The bundled web client (`web/`, compiled into the binary; docs/web-client.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSettings {
    /// Serve the web client at `/` and `/web/<file>`; off, those paths are 404.
    pub enabled: bool,
}

/// Default of `web.enabled`: the client works out of the box.
pub const WEB_ENABLED: bool = true;

impl Default for WebSettings {
    fn default() -> Self {
        Self {
            enabled: WEB_ENABLED,
        }
    }
}

/// Default of `notifications.retention_secs`: 30 days.
pub const NOTIFICATION_RETENTION_SECS: u64 = 30 * 24 * 3600;
/// Default of `notifications.page_max`.
pub const NOTIFICATION_PAGE_MAX: u32 = 200;

impl Default for NotificationSettings {
    fn default() -> Self {
        Self {
            retention_secs: NOTIFICATION_RETENTION_SECS,
            page_max: NOTIFICATION_PAGE_MAX,
        }
    }
}

/// HTTP long-polling (PushService.Poll, docs/long-polling.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollSettings {
    /// Longest wait of one poll, in milliseconds (a larger `wait_ms` is lowered to
    /// it). Keep it below the idle timeouts of proxies in front (nginx's
    /// `proxy_read_timeout` is 60 s by default).
    pub max_wait_ms: u64,
    /// Most rooms one poll may name.
    pub max_rooms: usize,
    /// Most events (room events and notifications) in one poll's answer.
    pub page_max: u32,
    /// Most polls of one user waiting on one node at a time; more get
    /// `resource_exhausted` (a newer poll with the same poll id replaces the older
    /// and does not count twice).
    pub max_waiting_per_user: usize,
}

/// Default of `poll.max_wait_ms`: 25 s, below common proxy timeouts (nginx 60 s).
pub const POLL_MAX_WAIT_MS: u64 = 25_000;
/// Default of `poll.max_rooms`.
pub const POLL_MAX_ROOMS: usize = 64;
/// Default of `poll.page_max`.
pub const POLL_PAGE_MAX: u32 = 500;
/// Default of `poll.max_waiting_per_user`: a few tabs and devices.
pub const POLL_MAX_WAITING_PER_USER: usize = 16;

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            max_wait_ms: POLL_MAX_WAIT_MS,
            max_rooms: POLL_MAX_ROOMS,
            page_max: POLL_PAGE_MAX,
            max_waiting_per_user: POLL_MAX_WAITING_PER_USER,
        }
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {key}: {reason}{}", from_suffix(.origin))]
    Invalid {
        key: &'static str,
        reason: String,
        /// Where the value came from (a file, an environment variable), when known.
        origin: Option<String>,
    },
}

impl Settings {
    /// Defaults, then `file` (when given), then `ROOMCAST_SECTION__KEY` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, Env::prefixed(ENV_PREFIX))
    }

    /// Like [`Settings::load`] with the environment provider given, for tests.
    pub fn load_from(file: Option<&Path>, env: Env) -> Result<Self, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(SettingsError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only `SECTION__KEY` variables are configuration; others with the prefix
        // (e.g. ROOMCAST_TEST_POSTGRES_URL) belong to tooling.
        let env = env.filter(|key| key.as_str().contains("__")).split("__");
        figment = figment.merge(env);
        let settings: Settings = figment
            .extract()
            .map_err(|e| SettingsError::Parse(describe_figment_error(e)))?;
        settings.validate().map_err(|e| match e {
            SettingsError::Invalid { key, reason, .. } => SettingsError::Invalid {
                key,
                reason,
                origin: figment.find_metadata(key).map(|meta| {
                    let path: Vec<String> = key.split('.').map(str::to_owned).collect();
                    origin(meta, &path)
                }),
            },
            other => other,
        })?;
        Ok(settings)
    }

    /// Checks that cannot be expressed in types.
    pub fn validate(&self) -> Result<(), SettingsError> {
        fn bad(key: &'static str, reason: impl Into<String>) -> Result<(), SettingsError> {
            Err(SettingsError::Invalid {
                key,
                reason: reason.into(),
                origin: None,
            })
        }
        if self.tls.cert_file.is_empty() != self.tls.key_file.is_empty() {
            return bad(
                "tls.key_file",
                "tls.cert_file and tls.key_file go together (both empty: no TLS)",
            );
        }
        let url = &self.store.url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return bad(
                "store.url",
                format!("`{url}` is neither sqlite: nor postgres://"),
            );
        }
        if !matches!(self.store.sqlite_synchronous.as_str(), "full" | "normal") {
            return bad("store.sqlite_synchronous", "must be `full` or `normal`");
        }
        match self.cluster.broker.as_str() {
            "local" => {}
            "redis" => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return bad(
                        "cluster.broker",
                        "`redis` links several nodes, which must share one PostgreSQL store: \
                         set store.url to postgres://… (an SQLite file belongs to one node)",
                    );
                }
                if !(self.cluster.redis_url.starts_with("redis://")
                    || self.cluster.redis_url.starts_with("redis+unix://")
                    || self.cluster.redis_url.starts_with("unix://"))
                {
                    return bad("cluster.redis_url", "must be a redis:// (or unix://) URL");
                }
            }
            _ => return bad("cluster.broker", "must be `local` or `redis`"),
        }
        if self.cluster.reconnect_min_ms == 0
            || self.cluster.reconnect_max_ms < self.cluster.reconnect_min_ms
        {
            return bad(
                "cluster.reconnect_max_ms",
                "reconnect_min_ms must be at least 1 and reconnect_max_ms at least reconnect_min_ms",
            );
        }
        if self.store.group_commit_max_messages == 0 {
            return bad("store.group_commit_max_messages", "must be at least 1");
        }
        if self.store.max_connections == 0 {
            return bad("store.max_connections", "must be at least 1");
        }
        if self.publish.max_broadcast_rooms == 0 {
            return bad("publish.max_broadcast_rooms", "must be at least 1");
        }
        if self.poll.max_rooms == 0 {
            return bad("poll.max_rooms", "must be at least 1");
        }
        if self.poll.page_max == 0 {
            return bad("poll.page_max", "must be at least 1");
        }
        if self.poll.max_waiting_per_user == 0 {
            return bad("poll.max_waiting_per_user", "must be at least 1");
        }
        if self.notifications.page_max == 0 {
            return bad("notifications.page_max", "must be at least 1");
        }
        if self.notifications.retention_secs == 0 {
            return bad(
                "notifications.retention_secs",
                "must be at least 1 (notifications are kept this many seconds)",
            );
        }
        if !self.auth.token_secret.is_empty() && self.auth.token_secret.len() < 32 {
            return bad(
                "auth.token_secret",
                "must be at least 32 bytes (or empty to generate one)",
            );
        }
        if self.auth.access_token_ttl_secs == 0 || self.auth.refresh_token_ttl_secs == 0 {
            return bad(
                "auth.access_token_ttl_secs",
                "token lifetimes must be positive",
            );
        }
        if !matches!(self.auth.sign_up_role.as_str(), "member" | "guest") {
            return bad("auth.sign_up_role", "must be `member` or `guest`");
        }
        if self.auth.argon2_memory_kib < 8 || self.auth.argon2_memory_kib > 4 * 1024 * 1024 {
            return bad(
                "auth.argon2_memory_kib",
                "must be between 8 and 4194304 (KiB)",
            );
        }
        if self.auth.argon2_iterations == 0 {
            return bad("auth.argon2_iterations", "must be at least 1");
        }
        if self.auth.hasher_threads == 0 {
            return bad("auth.hasher_threads", "must be at least 1");
        }
        if self.auth.hasher_max_pending == 0 {
            return bad("auth.hasher_max_pending", "must be at least 1");
        }
        if self.auth.sign_in_ip_per_minute > 0 && self.auth.sign_in_ip_burst == 0 {
            return bad(
                "auth.sign_in_ip_burst",
                "must be at least 1 when sign_in_ip_per_minute is set",
            );
        }
        if self.auth.sign_up_ip_per_hour > 0 && self.auth.sign_up_ip_burst == 0 {
            return bad(
                "auth.sign_up_ip_burst",
                "must be at least 1 when sign_up_ip_per_hour is set",
            );
        }
        if self.auth.sign_in_free_failures > 0
            && (self.auth.sign_in_backoff_base_ms == 0
                || self.auth.sign_in_backoff_max_ms < self.auth.sign_in_backoff_base_ms)
        {
            return bad(
                "auth.sign_in_backoff_max_ms",
                "sign_in_backoff_base_ms must be positive and at most sign_in_backoff_max_ms",
            );
        }
        if self.auth.sign_in_free_failures > 0
            && self.auth.sign_in_failure_memory_secs.saturating_mul(1000)
                < self.auth.sign_in_backoff_max_ms
        {
            return bad(
                "auth.sign_in_failure_memory_secs",
                "must cover sign_in_backoff_max_ms (failures must not be forgotten during a wait)",
            );
        }
        if self.auth.admin_username.is_empty() != self.auth.admin_password.is_empty() {
            return bad(
                "auth.admin_password",
                "admin_username and admin_password go together",
            );
        }
        let ext = &self.auth.external;
        if ext.enabled {
            match ext.algorithm.as_str() {
                "HS256" if ext.secret.len() < 32 => {
                    return bad(
                        "auth.external.secret",
                        "HS256 needs a secret of at least 32 bytes",
                    )
                }
                "RS256" | "ES256" if ext.public_key_pem.trim().is_empty() => {
                    return bad(
                        "auth.external.public_key_pem",
                        "RS256 and ES256 need a public key",
                    )
                }
                "HS256" | "RS256" | "ES256" => {}
                other => {
                    return bad(
                        "auth.external.algorithm",
                        format!("`{other}` is not HS256, RS256 or ES256"),
                    )
                }
            }
            if !matches!(ext.default_role.as_str(), "admin" | "member" | "guest") {
                return bad(
                    "auth.external.default_role",
                    "must be `admin`, `member` or `guest`",
                );
            }
        }
        if self.rooms.max_message_bytes == 0
            || self.rooms.ring_size == 0
            || self.rooms.max_batch == 0
        {
            return bad("rooms.max_message_bytes", "rooms limits must be positive");
        }
        let rt = &self.realtime;
        if rt.heartbeat_interval_ms == 0 || rt.idle_timeout_ms <= rt.heartbeat_interval_ms {
            return bad(
                "realtime.idle_timeout_ms",
                "must be greater than heartbeat_interval_ms (> 0)",
            );
        }
        if rt.sse_heartbeat_interval_ms == 0 {
            return bad("realtime.sse_heartbeat_interval_ms", "must be positive");
        }
        if rt.outbound_queue_frames == 0 || rt.outbound_queue_bytes == 0 {
            return bad(
                "realtime.outbound_queue_frames",
                "queue limits must be positive",
            );
        }
        if rt.send_rate_per_sec == 0 || rt.send_burst == 0 {
            return bad("realtime.send_rate_per_sec", "rate limits must be positive");
        }
        if self.rooms.live.ring_size == 0 {
            return bad("rooms.live.ring_size", "must be positive");
        }
        if !(1..=64).contains(&self.realtime.coalesce_groups) {
            return bad("realtime.coalesce_groups", "must be between 1 and 64");
        }
        if !(1..=64).contains(&self.rooms.live.coalesce_groups) {
            return bad("rooms.live.coalesce_groups", "must be between 1 and 64");
        }
        if self.rooms.live.seq_reservation == 0 {
            return bad("rooms.live.seq_reservation", "must be positive");
        }
        if self.rooms.live.viewer_count_interval_ms < 100 {
            return bad(
                "rooms.live.viewer_count_interval_ms",
                "must be at least 100",
            );
        }
        if self.rooms.max_pending_appends == 0 {
            return bad("rooms.max_pending_appends", "must be positive");
        }
        if rt.max_inflight_requests == 0 {
            return bad("realtime.max_inflight_requests", "must be positive");
        }
        if rt.max_parallel_reads == 0 {
            return bad("realtime.max_parallel_reads", "must be positive");
        }
        if self.server.header_timeout_ms == 0 {
            return bad("server.header_timeout_ms", "must be positive");
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections", "must be at least 1");
        }
        if rt.write_stall_timeout_ms == 0 || rt.max_write_queue_bytes == 0 {
            return bad(
                "realtime.write_stall_timeout_ms",
                "write limits must be positive",
            );
        }
        if !rt.echo_path.is_empty() && (!rt.echo_path.starts_with('/') || rt.echo_path == "/ws") {
            return bad(
                "realtime.echo_path",
                "must be empty or a path starting with `/` other than /ws",
            );
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format", "must be `text` or `json`");
        }
        Ok(())
    }

    /// The effective settings as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for secret in [
            &mut masked.auth.token_secret,
            &mut masked.auth.admin_password,
            &mut masked.auth.external.secret,
        ] {
            if !secret.is_empty() {
                *secret = "********".into();
            }
        }
        masked.store.url = mask_url_password(&masked.store.url);
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:********@host/db`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((creds, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:********@{host}"),
        None => url.to_owned(),
    }
}

/// ` (from <origin>)`, or nothing.
fn from_suffix(origin: &Option<String>) -> String {
    origin
        .as_deref()
        .map(|o| format!(" (from {o})"))
        .unwrap_or_default()
}

/// Figment's messages name the key and the provider; flatten them into one line each.
fn describe_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!("key `{}`: ", e.path.join("."))
            };
            let source = match &e.metadata {
                Some(meta) => format!(" (from {})", origin(meta, &e.path)),
                None => String::new(),
            };
            format!("{key}{}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Where the value at `path` came from: the file, or the environment variable(s)
/// that set it (figment only knows "the `ROOMCAST_` variables").
fn origin(meta: &figment::Metadata, path: &[String]) -> String {
    match &meta.source {
        Some(figment::Source::Code(_)) => return "the built-in defaults".into(),
        Some(source) => return source.to_string(),
        None => {}
    }
    if meta.name.contains("environment variable") && !path.is_empty() {
        let key = format!("{ENV_PREFIX}{}", path.join("__")).to_ascii_uppercase();
        let nested = format!("{key}__");
        let mut names: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| {
                let upper = name.to_ascii_uppercase();
                upper == key || upper.starts_with(&nested)
            })
            .collect();
        if !names.is_empty() {
            names.sort();
            let noun = if names.len() == 1 {
                "variable"
            } else {
                "variables"
            };
            return format!("environment {noun} {}", names.join(", "));
        }
    }
    meta.name.to_string()
}
