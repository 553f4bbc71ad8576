//! # roomcast-bench
//!
//! roomcast's own load generator. It talks to a running roomcast server over real
//! loopback sockets, the way any client does: accounts and rooms through the Connect
//! HTTP API (`POST /roomcast.v1.<Service>/<Method>`, JSON), traffic over `GET /ws`
//! (subprotocol `roomcast.v1.proto` by default). Results are printed as a short human
//! summary followed by one JSON line per scenario (for BENCHMARKS.md).
//!
//! ## Scenarios
//!
//! - [`sends`](run_sends): N senders, each on its own WebSocket, send M messages to one
//!   room, one at a time, each acknowledged after the store commit. Acks per second
//!   and ack latency; the acknowledged sequences must be gapless and unique.
//! - [`fanout`](run_fanout): S live subscribers of one room, P publishers at a
//!   total of R messages per second for D seconds. Each message's text starts with
//!   its send time (ns since this process's clock origin), so every subscriber
//!   measures publish-to-delivery latency and checks it got every sequence once, in
//!   order. With several comma-separated `--server` addresses (the nodes of a
//!   cluster linked by Redis) subscribers and publishers are spread over them round
//!   robin, and `--server-pid` takes every node's PID (their CPU time is added up).
//! - [`idle`](run_idle): C authenticated (optionally subscribed) idle connections;
//!   the server's resident memory (`VmRSS` from `/proc/<pid>/status`) before and
//!   after gives KiB per connection. Opening them measures a connection storm.
//!
//! ## Safety rails
//!
//! - The target must be loopback (127.0.0.0/8, ::1 or `localhost` resolving only to
//!   loopback); anything else is refused before any traffic. HTTP goes without
//!   proxies and follows no redirects, WebSockets are opened on a socket connected to
//!   the checked address.
//! - Every loop is bounded by a count and by time: each scenario runs under a hard
//!   `--timeout`, and every wait for a reply or a delivery has its own deadline.
//! - The server's per-user send limit (`realtime.send_rate_per_sec`, default 20/s)
//!   would turn most sends into `resource_exhausted`: start the server with
//!   `ROOMCAST_REALTIME__SEND_RATE_PER_SEC=1000000 ROOMCAST_REALTIME__SEND_BURST=1000000`
//!   (scripts/bench.sh does).

mod api;
mod fanout;
mod idle;
mod lean;
mod measure;
mod poll;
mod sends;
mod sse;
mod target;
mod ws;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{bail, ensure, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use roomcast::protocol::{
    SUBPROTOCOL_JSON, SUBPROTOCOL_JSON_BATCH, SUBPROTOCOL_PROTO, SUBPROTOCOL_PROTO_BATCH,
};
use serde::Serialize;
use tokio::time::Instant;

use api::Api;
use measure::{now_ns, raise_fd_limit};
use target::resolve_loopback;

/// How long one request (an RPC, a WebSocket reply, a connection upgrade) may take.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Password of every account the bench signs up.
pub(crate) const PASSWORD: &str = "roomcast-bench-password";
/// Sign-ups in flight at once: each one is an argon2id hash on the server's hasher
/// threads (scripts/bench.sh makes them cheap) and a store commit; the server
/// answers `unavailable` past `auth.hasher_max_pending` (64).
pub(crate) const SIGN_UP_CONCURRENCY: usize = 16;
/// Connections opened at once during set-up (fanout subscribers).
pub(crate) const SETUP_CONCURRENCY: usize = 32;
/// Largest number of deliveries (subscribers × messages) one fanout run may plan;
/// every delivery's latency is kept in memory (4 bytes each).
pub(crate) const MAX_PLANNED_DELIVERIES: u64 = 200_000_000;

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// roomcast's load generator: runs one scenario against a running roomcast server
/// on this machine (loopback only) and prints a summary and one JSON line.
#[derive(Parser)]
#[command(name = "roomcast-bench", version)]
struct Cli {
    /// The server: 127.0.0.1:PORT (any 127.0.0.0/8 address), [::1]:PORT or
    /// localhost:PORT. Other addresses are refused. `fanout` takes several,
    /// comma-separated (the nodes of a cluster): its subscribers and publishers are
    /// spread over them round robin.
    #[arg(long, global = true, default_value = "127.0.0.1:8080")]
    server: String,
    /// PID of the server process, to read its memory (VmRSS) and CPU time from /proc;
    /// comma-separated for several nodes (their CPU time is added up).
    #[arg(long, global = true, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Hard limit for the whole scenario, set-up included (seconds).
    #[arg(long, global = true, default_value_t = 300)]
    timeout: u64,
    /// WebSocket subprotocol.
    #[arg(long, global = true, value_enum, default_value_t = Codec::Proto)]
    codec: Codec,
    /// Worker threads of the bench's own runtime (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Persisted sends: N senders × M messages to one room, each waiting for its ack.
    Sends(SendsArgs),
    /// Fan-out in one room: S subscribers, P publishers at R msgs/s for D seconds.
    Fanout(FanoutArgs),
    /// Memory per idle connection: open C authenticated connections and hold them.
    Idle(IdleArgs),
}

#[derive(Args)]
pub(crate) struct SendsArgs {
    /// Concurrent senders, each its own user and WebSocket.
    #[arg(long, default_value_t = 10)]
    pub(crate) senders: usize,
    /// Messages each sender sends.
    #[arg(long, default_value_t = 500)]
    pub(crate) messages: usize,
    /// Sends each sender keeps in flight (sent, not yet acknowledged); 1 sends one
    /// at a time, each waiting for its ack.
    #[arg(long, default_value_t = 1)]
    pub(crate) in_flight: usize,
    /// Rooms the sends are spread over (every sender sends to each room in turn);
    /// the server commits them all through one store.
    #[arg(long, default_value_t = 1)]
    pub(crate) rooms: usize,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Stop sending after this many seconds even if messages remain.
    #[arg(long, default_value_t = 120)]
    pub(crate) duration: u64,
}

#[derive(Args)]
pub(crate) struct FanoutArgs {
    /// Subscriber connections, each subscribed live to one room.
    #[arg(long, default_value_t = 1000)]
    pub(crate) subscribers: usize,
    /// Rooms the subscribers are spread over (publishers send to them in turn).
    #[arg(long, default_value_t = 1)]
    pub(crate) rooms: usize,
    /// How the subscribers receive: WebSocket, Server-Sent Events or long-polling.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub(crate) transport: Transport,
    /// Make the rooms live rooms (comments in memory, no store write per message).
    #[arg(long)]
    pub(crate) live: bool,
    /// Subscribers take `batch` frames (`+batch` subprotocol, SSE `batch=true`).
    #[arg(long)]
    pub(crate) batch: bool,
    /// Subscribers watch without an account (WebSocket only; needs --live, whose
    /// rooms then allow anonymous viewers). Set-up needs no sign-ups.
    #[arg(long)]
    pub(crate) anonymous: bool,
    /// Accounts the subscriber connections are spread over (sign-up hashes a
    /// password, so one account per connection makes set-up slow).
    #[arg(long, default_value_t = 50)]
    pub(crate) subscriber_users: usize,
    /// Publishers, each its own user and WebSocket.
    #[arg(long, default_value_t = 2)]
    pub(crate) publishers: usize,
    /// Total target publish rate (messages per second, over all publishers).
    #[arg(long, default_value_t = 200.0)]
    pub(crate) rate: f64,
    /// How long publishers publish (seconds).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// Message text size in bytes (at least the timestamp prefix).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// After the last ack, how long subscribers may take to receive everything (seconds).
    #[arg(long, default_value_t = 30)]
    pub(crate) drain_timeout: u64,
}

#[derive(Args)]
pub(crate) struct IdleArgs {
    /// Idle connections to open and measure.
    #[arg(long, default_value_t = 2000)]
    pub(crate) connections: usize,
    /// Accounts the connections are spread over (0: one account per connection, as
    /// real clients are; the server keeps a session per online user).
    #[arg(long, default_value_t = 0)]
    pub(crate) users: usize,
    /// Subscribe every connection (live) to one public room.
    #[arg(long)]
    pub(crate) subscribe: bool,
    /// Connections opened before the "before" reading, so one-time costs (thread
    /// buffers, the room actor, allocator arenas) are not charged to the measured ones.
    #[arg(long, default_value_t = 50)]
    pub(crate) warmup: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// How long to wait before each memory reading (milliseconds).
    #[arg(long, default_value_t = 2000)]
    pub(crate) settle_ms: u64,
    /// How long to hold the connections open after the reading (seconds); they must
    /// all stay open.
    #[arg(long, default_value_t = 5)]
    pub(crate) hold: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Codec {
    /// `roomcast.v1.proto`: binary protobuf frames.
    Proto,
    /// `roomcast.v1.json`: text frames, proto3 JSON.
    Json,
}

/// How subscribers receive pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// `GET /ws` in the bench's codec.
    Ws,
    /// `GET /sse` (proto3-JSON frames whatever the codec).
    Sse,
    /// `PushService/Poll` (binary protobuf), one outstanding poll per client.
    Poll,
}

impl Transport {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Ws => "WebSocket",
            Transport::Sse => "SSE",
            Transport::Poll => "long-polling",
        }
    }
}

impl Codec {
    pub(crate) fn subprotocol(self) -> &'static str {
        self.subprotocol_with(false)
    }

    /// The subprotocol, with `+batch` (the server may send `batch` frames) or not.
    pub(crate) fn subprotocol_with(self, batch: bool) -> &'static str {
        match (self, batch) {
            (Codec::Proto, false) => SUBPROTOCOL_PROTO,
            (Codec::Json, false) => SUBPROTOCOL_JSON,
            (Codec::Proto, true) => SUBPROTOCOL_PROTO_BATCH,
            (Codec::Json, true) => SUBPROTOCOL_JSON_BATCH,
        }
    }
}

// ---------------------------------------------------------------------------

/// What every scenario needs.
pub(crate) struct Ctx {
    /// The (first) server: set-up RPCs go there.
    pub(crate) addr: SocketAddr,
    /// Every server given (one, or the nodes of a cluster).
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) api: Api,
    pub(crate) codec: Codec,
    /// The (first) server's PID, for its memory.
    pub(crate) server_pid: Option<u32>,
    /// Every server PID given, for their CPU time.
    pub(crate) server_pids: Vec<u32>,
    /// The scenario's hard deadline.
    pub(crate) deadline: Instant,
    pub(crate) fd_limit: u64,
    /// Cores this process may run on (its affinity mask, or `--threads` if fewer):
    /// the ceiling for its own CPU use.
    pub(crate) bench_cores: f64,
}

async fn run(cli: Cli) -> Result<bool> {
    let mut addrs = Vec::new();
    for server in cli.server.split(',').map(str::trim) {
        addrs.push(resolve_loopback(server).await?);
    }
    let addr = addrs[0];
    ensure!(
        (addrs.len() == 1 && cli.server_pid.len() <= 1)
            || matches!(cli.scenario, Scenario::Fanout(_)),
        "only `fanout` takes several --server addresses or --server-pid values"
    );
    let fd_limit = raise_fd_limit();
    for pid in &cli.server_pid {
        ensure!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "no process {pid} (--server-pid)"
        );
    }
    let hard = Duration::from_secs(cli.timeout);
    let ctx = Ctx {
        addr,
        addrs,
        api: Api::new(addr)?,
        codec: cli.codec,
        server_pid: cli.server_pid.first().copied(),
        server_pids: cli.server_pid.clone(),
        deadline: Instant::now() + hard,
        fd_limit,
        bench_cores: bench_cores(cli.threads),
    };
    let scenario = async {
        let (json, ok) = match &cli.scenario {
            Scenario::Sends(args) => {
                let report = sends::run(&ctx, args).await?;
                report.print();
                (serde_json::to_string(&report)?, report.ok)
            }
            Scenario::Fanout(args) => {
                let report = fanout::run(&ctx, args).await?;
                report.print();
                (serde_json::to_string(&report)?, report.ok)
            }
            Scenario::Idle(args) => {
                let report = idle::run(&ctx, args).await?;
                report.print();
                (serde_json::to_string(&report)?, report.ok)
            }
        };
        println!("{json}");
        Ok::<_, anyhow::Error>(ok)
    };
    // A little after the deadline the scenario's own timeouts have all fired.
    match tokio::time::timeout(hard + Duration::from_secs(5), scenario).await {
        Ok(result) => result,
        Err(_) => bail!(
            "the scenario did not finish within --timeout {}s",
            cli.timeout
        ),
    }
}

/// Cores the bench may use: the CPUs in its affinity mask (`taskset`), capped by
/// `--threads` when given.
fn bench_cores(threads: usize) -> f64 {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = if threads > 0 {
        threads.min(available)
    } else {
        available
    };
    cores as f64
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = now_ns();
    // One thread: the current-thread scheduler (no cross-thread wake-ups, no
    // atomics per task poll); the generator's CPU is part of what a run measures.
    let mut builder = if cli.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if cli.threads > 1 {
        builder.worker_threads(cli.threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("roomcast-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Leftover tasks (if a deadline cut a scenario short) must not keep us alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("roomcast-bench: the run finished but its checks failed (see `ok` above)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("roomcast-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
