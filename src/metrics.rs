//! Prometheus metrics: one [`Metrics`] holding the registry and every metric handle,
//! exposed as the text format at `metrics.path` (see [`crate::settings::MetricsSettings`])
//! by [`render`].
//!
//! The handles live in one process-wide static ([`metrics`]) rather than in
//! [`crate::domain::AppState`]: the events worth counting happen in room actors on
//! their own arbiters, in the WebSocket transport and in the admission gate, none of
//! which carry the `AppState`, and threading a handle through each of their
//! constructors would touch every layer for a value that is process-wide anyway (a
//! process serves one node, and the process collector below is process-wide by
//! nature). Tests that read exact values run one server per test binary.
//!
//! Costs: every metric updated per message or per frame is a label-less counter or
//! histogram (atomic operations); labelled families (RPCs, closes, refusals) are
//! touched once per request or connection. Label values are bounded sets: RPC method
//! names (the route table), Connect codes, close codes, rule names, transport and
//! codec names. Room and user ids are never labels.
//!
//! Names follow the Prometheus conventions: a `roomcast_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters (added by the encoder).

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::{Family, MetricConstructor},
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

/// Buckets of latencies in seconds: 0.5 ms to about 16 s, doubling.
const LATENCY_BUCKETS: (f64, f64, u16) = (0.0005, 2.0, 16);
/// Buckets of group-commit batch sizes: 1 to 512 messages, doubling.
const BATCH_BUCKETS: (f64, f64, u16) = (1.0, 2.0, 10);

/// An RPC's method and Connect code (`ok` on success).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `roomcast.v1.RoomService/SendMessage`: only routed RPCs are counted.
    pub method: String,
    pub code: &'static str,
}

/// A connection's transport (`websocket`) and codec (`json`, `proto`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub transport: &'static str,
    pub codec: &'static str,
}

/// A WebSocket close code sent by the server.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub code: u16,
}

/// The rule that refused something (`max_connections`, `per_ip`, `send_rate`...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: &'static str,
}

/// The live-room host control that refused a message (`slow_mode`, `host_only`,
/// `rate_limit`, `max_length`, `word_filter`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControlLabels {
    pub control: &'static str,
}

/// How something ended: `ok` or `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// A store query, by the name of the store operation (`append_messages`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub query: &'static str,
}

/// Makes latency histograms for a family.
#[derive(Clone)]
pub struct LatencyHistogram;

impl MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        latency_histogram()
    }
}

fn latency_histogram() -> Histogram {
    let (start, factor, n) = LATENCY_BUCKETS;
    Histogram::new(exponential_buckets(start, factor, n))
}

/// The registry and every metric handle. See the module docs.
pub struct Metrics {
    registry: Registry,
    /// Open realtime connections by transport and codec.
    pub connections: Family<ConnectionLabels, Gauge>,
    /// Room actors running (a room is loaded while it has subscribers or writes).
    pub rooms_loaded: Gauge,
    /// Subscriptions held by room actors (see [`GaugeShare`]).
    pub subscriptions: Gauge,
    /// Messages handed to room actors for commit (HTTP and WebSocket sends).
    pub messages_received: Counter,
    /// Messages stored by a group commit.
    pub messages_committed: Counter,
    /// Events pushed to subscribers (one per event per subscriber).
    pub messages_delivered: Counter,
    /// Of those, events a fan-out shard wrote straight into a WebSocket's transport
    /// (the others went through the connection actor).
    pub messages_delivered_direct: Counter,
    /// Messages per group commit.
    pub commit_batch_size: Histogram,
    /// Time a group commit took, store round trip included.
    pub commit_duration: Histogram,
    /// Subscribers dropped because their outbound queue was full.
    pub subscribers_lagged: Counter,
    /// Frames refused because a connection's outbound queue was over its budget.
    pub outbound_overflows: Counter,
    /// RPCs served, by method and code.
    pub rpc_requests: Family<RpcLabels, Counter>,
    /// RPC latency by method and code (a refusal and a served call differ).
    pub rpc_duration: Family<RpcLabels, Histogram, LatencyHistogram>,
    /// Connections or requests refused by admission control, by rule.
    pub admission_refusals: Family<RuleLabels, Counter>,
    /// Requests refused by a rate limit, by rule.
    pub rate_limited: Family<RuleLabels, Counter>,
    /// WebSocket close frames sent by the server, by close code.
    pub ws_closes: Family<CloseLabels, Counter>,
    /// Long-polls waiting on this node (see [`GaugeShare::poll_waiters`]).
    pub poll_waiters: Gauge,
    /// Subscriptions that left live delivery to read missed events from the store.
    pub catch_up_rounds: Counter,
    /// `gap` frames sent: ranges of history retention removed.
    pub gaps_reported: Counter,
    /// `lagging` frames sent to clients whose connection fell behind a room.
    pub lagging_frames: Counter,
    /// Store operation latency on its connection (the pool wait apart), by operation.
    pub store_query_duration: Family<QueryLabels, Histogram, LatencyHistogram>,
    /// Time store operations waited for a pooled connection (one observation per
    /// operation, failed waits included).
    pub store_pool_wait: Histogram,
    /// Store operations waiting for a pooled connection right now.
    pub store_pool_waiters: Gauge,
    /// Waits for a pooled connection that failed (`store.acquire_timeout_ms` passed
    /// or the database refused a new connection): the operation failed.
    pub store_pool_acquire_failures: Counter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// Certificate reloads, by result.
    pub tls_reloads: Family<ResultLabels, Counter>,
    /// Viewers of live rooms on this node (see [`GaugeShare::live_viewers`]).
    pub live_viewers: Gauge,
    /// Messages refused by a live room's host controls, by control.
    pub live_refusals: Family<ControlLabels, Counter>,
    /// Events per delivery a room hands its subscribers: 1 when delivered at
    /// once, more when the coalescing window gathered them into one batch.
    pub fanout_batch_events: Histogram,
    /// Batches rooms sent to fan-out shards that the shards have not written yet
    /// (see `crate::actors::fanout_shard::QueuedBatch`).
    pub fanout_shard_queued_batches: Gauge,
    /// The events of those batches.
    pub fanout_shard_queued_events: Gauge,
    /// Batches rooms sent to fan-out shards (one per shard with subscribers of
    /// the room).
    pub fanout_shard_batches: Counter,
    /// Batches a fan-out shard merged into the batch after them (same room,
    /// events following on) because they queued while it was writing.
    pub fanout_shard_merged_batches: Counter,
    /// Group turns fan-out shards wrote for busy live rooms whose subscribers take
    /// turns (`rooms.live.coalesce_groups`).
    pub fanout_shard_turns: Counter,
    /// The cluster broker (see [`ClusterMetrics`]).
    pub cluster: ClusterMetrics,
}

impl Metrics {
    fn new() -> Self {
        let (start, factor, n) = BATCH_BUCKETS;
        let m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            rooms_loaded: Gauge::default(),
            subscriptions: Gauge::default(),
            messages_received: Counter::default(),
            messages_committed: Counter::default(),
            messages_delivered: Counter::default(),
            messages_delivered_direct: Counter::default(),
            commit_batch_size: Histogram::new(exponential_buckets(start, factor, n)),
            commit_duration: latency_histogram(),
            subscribers_lagged: Counter::default(),
            outbound_overflows: Counter::default(),
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(LatencyHistogram),
            admission_refusals: Family::default(),
            rate_limited: Family::default(),
            ws_closes: Family::default(),
            poll_waiters: Gauge::default(),
            catch_up_rounds: Counter::default(),
            gaps_reported: Counter::default(),
            lagging_frames: Counter::default(),
            store_query_duration: Family::new_with_constructor(LatencyHistogram),
            store_pool_wait: latency_histogram(),
            store_pool_waiters: Gauge::default(),
            store_pool_acquire_failures: Counter::default(),
            tls_handshake_failures: Counter::default(),
            tls_reloads: Family::default(),
            live_viewers: Gauge::default(),
            live_refusals: Family::default(),
            fanout_batch_events: Histogram::new(exponential_buckets(start, factor, n)),
            fanout_shard_queued_batches: Gauge::default(),
            fanout_shard_queued_events: Gauge::default(),
            fanout_shard_batches: Counter::default(),
            fanout_shard_merged_batches: Counter::default(),
            fanout_shard_turns: Counter::default(),
            cluster: ClusterMetrics::default(),
        };
        m.register()
    }

    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "roomcast_connections",
            "Open realtime connections by transport and codec",
            self.connections.clone(),
        );
        r.register(
            "roomcast_rooms_loaded",
            "Room actors running on this node",
            self.rooms_loaded.clone(),
        );
        r.register(
            "roomcast_subscriptions",
            "Room subscriptions held by room actors",
            self.subscriptions.clone(),
        );
        r.register(
            "roomcast_messages_received",
            "Messages handed to room actors for commit",
            self.messages_received.clone(),
        );
        r.register(
            "roomcast_messages_committed",
            "Messages stored by group commits",
            self.messages_committed.clone(),
        );
        r.register(
            "roomcast_messages_delivered",
            "Events pushed to subscribers, one per event per subscriber",
            self.messages_delivered.clone(),
        );
        r.register(
            "roomcast_messages_delivered_direct",
            "Of the events pushed to subscribers, those a fan-out shard wrote straight to a WebSocket (without a message to its connection actor)",
            self.messages_delivered_direct.clone(),
        );
        r.register(
            "roomcast_commit_batch_size",
            "Messages per group commit",
            self.commit_batch_size.clone(),
        );
        r.register_with_unit(
            "roomcast_commit_duration",
            "Time a group commit took, store round trip included",
            Unit::Seconds,
            self.commit_duration.clone(),
        );
        r.register(
            "roomcast_subscribers_lagged",
            "Subscribers dropped because their outbound queue was full (they catch up from the store)",
            self.subscribers_lagged.clone(),
        );
        r.register(
            "roomcast_outbound_overflows",
            "Frames refused because a connection's outbound queue was over its budget",
            self.outbound_overflows.clone(),
        );
        r.register(
            "roomcast_rpc_requests",
            "RPCs served, by method and Connect code",
            self.rpc_requests.clone(),
        );
        r.register_with_unit(
            "roomcast_rpc_duration",
            "RPC latency by method and Connect code",
            Unit::Seconds,
            self.rpc_duration.clone(),
        );
        r.register(
            "roomcast_admission_refusals",
            "Connections refused by admission control, by rule",
            self.admission_refusals.clone(),
        );
        r.register(
            "roomcast_rate_limited",
            "Requests refused by a rate limit, by rule",
            self.rate_limited.clone(),
        );
        r.register(
            "roomcast_websocket_closes",
            "WebSocket close frames sent by the server, by close code",
            self.ws_closes.clone(),
        );
        r.register(
            "roomcast_poll_waiters",
            "Long-polls (PushService.Poll) waiting on this node",
            self.poll_waiters.clone(),
        );
        r.register(
            "roomcast_catch_up_rounds",
            "Subscriptions that left live delivery to read missed events from the store (after lagging or an out-of-order event)",
            self.catch_up_rounds.clone(),
        );
        r.register(
            "roomcast_gaps_reported",
            "gap frames sent: ranges of room history removed by retention",
            self.gaps_reported.clone(),
        );
        r.register(
            "roomcast_lagging_frames",
            "lagging frames sent to connections that fell behind a room",
            self.lagging_frames.clone(),
        );
        r.register_with_unit(
            "roomcast_store_query_duration",
            "Store operation latency on its connection (queries and commit; the pool wait is roomcast_store_pool_wait_seconds), by operation",
            Unit::Seconds,
            self.store_query_duration.clone(),
        );
        r.register_with_unit(
            "roomcast_store_pool_wait",
            "Time store operations waited for a pooled connection, one observation per operation",
            Unit::Seconds,
            self.store_pool_wait.clone(),
        );
        r.register(
            "roomcast_store_pool_waiters",
            "Store operations waiting for a pooled connection now",
            self.store_pool_waiters.clone(),
        );
        r.register(
            "roomcast_store_pool_acquire_failures",
            "Store operations that failed waiting for a pooled connection (store.acquire_timeout_ms or connect error)",
            self.store_pool_acquire_failures.clone(),
        );
        r.register(
            "roomcast_tls_handshake_failures",
            "TLS handshakes that failed or did not finish within server.header_timeout_ms",
            self.tls_handshake_failures.clone(),
        );
        r.register(
            "roomcast_tls_reloads",
            "TLS certificate reloads (SIGHUP or changed files), by result",
            self.tls_reloads.clone(),
        );
        r.register(
            "roomcast_live_viewers",
            "Viewers of live rooms on this node, refreshed at each room's viewer-count interval",
            self.live_viewers.clone(),
        );
        r.register(
            "roomcast_live_refusals",
            "Messages refused by a live room's host controls, by control",
            self.live_refusals.clone(),
        );
        r.register(
            "roomcast_fanout_batch_events",
            "Events per delivery a room hands its subscribers (more than 1: coalesced into a batch)",
            self.fanout_batch_events.clone(),
        );
        r.register(
            "roomcast_fanout_shard_queued_batches",
            "Batches rooms sent to fan-out shards (one per worker thread) not yet written to their connections",
            self.fanout_shard_queued_batches.clone(),
        );
        r.register(
            "roomcast_fanout_shard_queued_events",
            "Events in the batches queued to fan-out shards",
            self.fanout_shard_queued_events.clone(),
        );
        r.register(
            "roomcast_fanout_shard_batches",
            "Batches rooms sent to fan-out shards",
            self.fanout_shard_batches.clone(),
        );
        r.register(
            "roomcast_fanout_shard_merged_batches",
            "Batches a fan-out shard merged into the next one of the same room",
            self.fanout_shard_merged_batches.clone(),
        );
        r.register(
            "roomcast_fanout_shard_turns",
            "Group turns fan-out shards wrote for live rooms whose subscribers take turns",
            self.fanout_shard_turns.clone(),
        );
        self.cluster.register(&mut self.registry);
        self.registry.register_collector(Box::new(UsersOnline));
        // Process metrics carry the conventional unprefixed `process_` names.
        self.registry.register_collector(Box::new(ProcessCollector));
        self.registry.register_collector(Box::new(StoreCollector));
        self
    }

    /// Counts one RPC.
    pub fn rpc(&self, method: &str, code: &'static str, elapsed: Duration) {
        let labels = RpcLabels {
            method: method.to_owned(),
            code,
        };
        self.rpc_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.rpc_requests.get_or_create(&labels).inc();
    }

    /// Counts one refusal by admission control.
    pub fn refused(&self, rule: &'static str) {
        self.admission_refusals
            .get_or_create(&RuleLabels { rule })
            .inc();
    }

    /// Counts one message refused by a live room's host control.
    pub fn live_refused(&self, control: &'static str) {
        self.live_refusals
            .get_or_create(&ControlLabels { control })
            .inc();
    }

    /// Counts one request refused by a rate limit.
    pub fn limited(&self, rule: &'static str) {
        self.rate_limited.get_or_create(&RuleLabels { rule }).inc();
    }

    /// Counts one close frame the server sent.
    pub fn closed(&self, code: u16) {
        self.ws_closes.get_or_create(&CloseLabels { code }).inc();
    }

    /// Counts one certificate reload.
    pub fn tls_reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.tls_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records a group commit that stored `n` new messages.
    pub fn committed(&self, n: usize) {
        self.messages_committed.inc_by(n as u64);
        self.commit_batch_size.observe(n as f64);
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The store whose pool [`StoreCollector`] reports: the last one [`watch_store`]
/// was given (a process runs one server).
static STORE: std::sync::Mutex<Option<crate::store::Store>> = std::sync::Mutex::new(None);

/// Reports `store`'s pool in the metrics from now on.
pub fn watch_store(store: &crate::store::Store) {
    *STORE.lock().unwrap_or_else(|e| e.into_inner()) = Some(store.clone());
}

/// The store pool's size and idle connections, read at each scrape (sqlx keeps
/// both as atomics).
#[derive(Debug)]
struct StoreCollector;

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = STORE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(crate::store::Store::pool_stats);
        let Some((size, idle, max)) = stats else {
            return Ok(());
        };
        let idle = i64::try_from(idle).unwrap_or(i64::MAX);
        for (name, help, value) in [
            (
                "roomcast_store_pool_connections",
                "Connections the store's pool holds open",
                i64::from(size),
            ),
            (
                "roomcast_store_pool_idle_connections",
                "Open store connections not checked out (0 with waiting queries means pool waits)",
                idle,
            ),
            (
                "roomcast_store_pool_in_use_connections",
                "Store connections checked out by running operations",
                (i64::from(size) - idle).max(0),
            ),
            (
                "roomcast_store_pool_max_connections",
                "Most connections the store's pool opens (store.max_connections)",
                i64::from(max),
            ),
        ] {
            let m = ConstGauge::new(value);
            let e = encoder.encode_descriptor(name, help, None, m.metric_type())?;
            m.encode(e)?;
        }
        Ok(())
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// One owner's share of a gauge summed over many owners (each room's subscribers in
/// [`Metrics::subscriptions`]): the owner sets its current count after a change,
/// the share adds the difference, and takes its whole share back when dropped, so
/// the sum stays right however the owner ends.
pub struct GaugeShare {
    gauge: &'static Gauge,
    counted: i64,
}

impl GaugeShare {
    /// A room's share of [`Metrics::subscriptions`].
    pub fn subscriptions() -> Self {
        GaugeShare {
            gauge: &metrics().subscriptions,
            counted: 0,
        }
    }

    /// A live room's share of [`Metrics::live_viewers`].
    pub fn live_viewers() -> Self {
        GaugeShare {
            gauge: &metrics().live_viewers,
            counted: 0,
        }
    }

    /// A poll hub's share of [`Metrics::poll_waiters`].
    pub fn poll_waiters() -> Self {
        GaugeShare {
            gauge: &metrics().poll_waiters,
            counted: 0,
        }
    }

    /// Makes this share `n`.
    pub fn set(&mut self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if n != self.counted {
            self.gauge.inc_by(n - self.counted);
            self.counted = n;
        }
    }
}

impl Drop for GaugeShare {
    fn drop(&mut self) {
        self.gauge.dec_by(self.counted);
    }
}

/// Users online on this node: the user session actors alive (one per user with a
/// connection, kept briefly after the last one closes for presence).
#[derive(Debug)]
struct UsersOnline;

impl Collector for UsersOnline {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let online = crate::actors::user_session::live_sessions();
        let m = ConstGauge::new(i64::try_from(online).unwrap_or(i64::MAX));
        let e = encoder.encode_descriptor(
            "roomcast_users_online",
            "Authenticated users with a user session on this node",
            None,
            m.metric_type(),
        )?;
        m.encode(e)
    }
}

/// Holds a connection in the [`Metrics::connections`] gauge until dropped.
pub struct ConnectionGauge(ConnectionLabels);

impl ConnectionGauge {
    /// Counts a connection of `transport` speaking `codec` as open.
    pub fn open(transport: &'static str, codec: &'static str) -> Self {
        let labels = ConnectionLabels { transport, codec };
        metrics().connections.get_or_create(&labels).inc();
        ConnectionGauge(labels)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics().connections.get_or_create(&self.0).dec();
    }
}

/// The text exposition format (OpenMetrics text, which Prometheus reads) of every
/// metric.
pub fn render() -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &metrics().registry)?;
    Ok(out)
}

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// CPU time, memory and file descriptors of this process, read from `/proc/self`
/// at each scrape (prometheus-client has no process collector). Names follow the
/// Prometheus client libraries' `process_*` metrics, so standard dashboards work.
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says, where it could be read.
#[derive(Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    threads: Option<u64>,
}

impl ProcessStats {
    #[cfg(target_os = "linux")]
    fn read() -> Self {
        let mut s = ProcessStats::default();
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name, which is in parentheses and may hold spaces.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // rest[0] is field 3 (state): utime is field 14, stime 15,
                // num_threads 20, starttime 22, vsize 23, rss 24.
                let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
                if ticks > 0 {
                    if let (Some(u), Some(st)) = (field(14), field(15)) {
                        s.cpu_seconds = Some((u + st) as f64 / ticks as f64);
                    }
                    if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                        s.start_time_seconds = Some(boot as f64 + start as f64 / ticks as f64);
                    }
                }
                s.threads = field(20);
                s.virtual_bytes = field(23);
                if page > 0 {
                    s.resident_bytes = field(24).map(|p| p * page as u64);
                }
            }
        }
        s.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed in.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
            && limit.rlim_cur != libc::RLIM_INFINITY
        {
            s.max_fds = Some(limit.rlim_cur);
        }
        s
    }

    #[cfg(not(target_os = "linux"))]
    fn read() -> Self {
        ProcessStats::default()
    }
}

/// Seconds since the epoch at boot (`btime` of `/proc/stat`).
#[cfg(target_os = "linux")]
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(v) = s.cpu_seconds {
            let m = ConstCounter::new(v);
            let e = encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent",
                Some(&Unit::Seconds),
                m.metric_type(),
            )?;
            m.encode(e)?;
        }
        let gauges: [(&str, &str, Option<Unit>, Option<f64>); 6] = [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                s.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                s.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(Unit::Seconds),
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                s.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Limit of open file descriptors (soft RLIMIT_NOFILE)",
                None,
                s.max_fds.map(|v| v as f64),
            ),
            (
                "process_threads",
                "OS threads of the process",
                None,
                s.threads.map(|v| v as f64),
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                let m = ConstGauge::new(v);
                let e = encoder.encode_descriptor(name, help, unit.as_ref(), m.metric_type())?;
                m.encode(e)?;
            }
        }
        Ok(())
    }
}

/// Mounts the metrics route at `settings.path` on an app whose port serves them:
/// the main port when `settings.listen` is empty, or the metrics listener.
pub fn configure(
    cfg: &mut actix_web::web::ServiceConfig,
    settings: &crate::settings::MetricsSettings,
) {
    if settings.enabled {
        cfg.route(&settings.path, actix_web::web::get().to(scrape));
    }
}

/// Binds the separate metrics listener when one is configured.
pub fn bind_listener(
    settings: &crate::settings::MetricsSettings,
) -> std::io::Result<Option<std::net::TcpListener>> {
    if !settings.enabled || settings.listen.is_empty() {
        return Ok(None);
    }
    std::net::TcpListener::bind(listen_addr(&settings.listen)).map(Some)
}

/// The address `metrics.listen` names: a port alone (`"9464"` or `":9464"`) is on
/// the loopback interface, so a separate metrics listener is private unless an
/// address says otherwise.
fn listen_addr(listen: &str) -> String {
    let port = listen.strip_prefix(':').unwrap_or(listen);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{port}")
    } else {
        listen.to_owned()
    }
}

/// The HTTP service of the separate metrics listener: the metrics route only.
pub fn listener_service(
    settings: crate::settings::MetricsSettings,
) -> impl actix_service::ServiceFactory<
    actix_web::rt::net::TcpStream,
    Config = (),
    Response = (),
    Error = actix_http::error::DispatchError,
    InitError = (),
> {
    let app = actix_web::App::new().configure(move |cfg| configure(cfg, &settings));
    actix_http::HttpService::build()
        .finish(actix_service::map_config(app, |_| {
            actix_web::dev::AppConfig::default()
        }))
        .tcp()
}

async fn scrape() -> actix_web::HttpResponse {
    match render() {
        Ok(body) => actix_web::HttpResponse::Ok()
            .content_type(CONTENT_TYPE)
            .body(body),
        Err(e) => {
            tracing::error!(error = %e, "could not encode the metrics");
            actix_web::HttpResponse::InternalServerError().finish()
        }
    }
}

/// The cluster broker's metrics (`crate::cluster`): what crossed nodes, what was
/// lost on the way and filled from the store, and the link to Redis.
#[derive(Default)]
pub struct ClusterMetrics {
    /// Messages published through the broker (local delivery included).
    pub published: Counter,
    /// Messages received from other nodes.
    pub received: Counter,
    /// Messages that could not be sent to the other nodes (link down, queue full).
    pub dropped: Counter,
    /// Holes in a room's sequence filled by reading the store.
    pub gap_fills: Counter,
    /// Events read from the store to fill holes.
    pub gap_filled_events: Counter,
    /// Holes in a live room's sequence that no node delivered (reported as `gap`).
    pub live_gaps: Counter,
    /// Links to Redis established again after a loss.
    pub reconnects: Counter,
    /// 1 while the node is cut off from the other nodes (Redis unreachable).
    pub degraded: Gauge,
}

impl ClusterMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "roomcast_broker_published",
            "Messages published through the cluster broker (local delivery included)",
            self.published.clone(),
        );
        r.register(
            "roomcast_broker_received",
            "Messages received from other nodes through the cluster broker",
            self.received.clone(),
        );
        r.register(
            "roomcast_broker_dropped",
            "Messages not sent to other nodes (Redis unreachable or the send queue full); receivers fill them from the store",
            self.dropped.clone(),
        );
        r.register(
            "roomcast_broker_gap_fills",
            "Holes in a room's sequence (events lost or late between nodes) filled from the store",
            self.gap_fills.clone(),
        );
        r.register(
            "roomcast_broker_gap_filled_events",
            "Events read from the store to fill holes in a room's sequence",
            self.gap_filled_events.clone(),
        );
        r.register(
            "roomcast_broker_live_gaps",
            "Holes in a live room's sequence no node delivered within cluster.live_holdback_ms",
            self.live_gaps.clone(),
        );
        r.register(
            "roomcast_broker_reconnects",
            "Links to Redis established again after a loss",
            self.reconnects.clone(),
        );
        r.register(
            "roomcast_broker_degraded",
            "1 while this node is cut off from the other nodes (Redis unreachable)",
            self.degraded.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::listen_addr;

    #[test]
    fn a_port_alone_listens_on_loopback() {
        assert_eq!(listen_addr("9464"), "127.0.0.1:9464");
        assert_eq!(listen_addr(":9464"), "127.0.0.1:9464");
        assert_eq!(listen_addr("0.0.0.0:9464"), "0.0.0.0:9464");
        assert_eq!(listen_addr("[::1]:9464"), "[::1]:9464");
    }
}
