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
//!   order.
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

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::{stream, SinkExt as _, Stream, StreamExt as _};
use prost::Message as _;
use roomcast::{
    proto::v1 as pb,
    protocol::{SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO},
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    net::TcpStream,
    sync::watch,
    time::{sleep_until, timeout_at, Instant},
};
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest as _, Message},
    WebSocketStream,
};

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

/// How long one request (an RPC, a WebSocket reply, a connection upgrade) may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Password of every account the bench signs up.
const PASSWORD: &str = "roomcast-bench-password";
/// Sign-ups in flight at once: each one is an argon2id hash on the server's hasher
/// threads, so more would only queue there.
const SIGN_UP_CONCURRENCY: usize = 4;
/// Connections opened at once during set-up (fanout subscribers).
const SETUP_CONCURRENCY: usize = 32;
/// Largest number of deliveries (subscribers × messages) one fanout run may plan;
/// every delivery's latency is kept in memory (4 bytes each).
const MAX_PLANNED_DELIVERIES: u64 = 200_000_000;

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// roomcast's load generator: runs one scenario against a running roomcast server
/// on this machine (loopback only) and prints a summary and one JSON line.
#[derive(Parser)]
#[command(name = "roomcast-bench", version)]
struct Cli {
    /// The server: 127.0.0.1:PORT (any 127.0.0.0/8 address), [::1]:PORT or
    /// localhost:PORT. Other addresses are refused.
    #[arg(long, global = true, default_value = "127.0.0.1:8080")]
    server: String,
    /// PID of the server process, to read its memory (VmRSS) and CPU time from /proc.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
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
struct SendsArgs {
    /// Concurrent senders, each its own user and WebSocket.
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Messages each sender sends (one at a time, waiting for the ack).
    #[arg(long, default_value_t = 500)]
    messages: usize,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Stop sending after this many seconds even if messages remain.
    #[arg(long, default_value_t = 120)]
    duration: u64,
}

#[derive(Args)]
struct FanoutArgs {
    /// Subscriber connections, each subscribed live to the room.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Accounts the subscriber connections are spread over (sign-up hashes a
    /// password, so one account per connection makes set-up slow).
    #[arg(long, default_value_t = 50)]
    subscriber_users: usize,
    /// Publishers, each its own user and WebSocket.
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Total target publish rate (messages per second, over all publishers).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long publishers publish (seconds).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Message text size in bytes (at least the timestamp prefix).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// After the last ack, how long subscribers may take to receive everything (seconds).
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
}

#[derive(Args)]
struct IdleArgs {
    /// Idle connections to open and measure.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Accounts the connections are spread over (0: one account per connection, as
    /// real clients are; the server keeps a session per online user).
    #[arg(long, default_value_t = 0)]
    users: usize,
    /// Subscribe every connection (live) to one public room.
    #[arg(long)]
    subscribe: bool,
    /// Connections opened before the "before" reading, so one-time costs (thread
    /// buffers, the room actor, allocator arenas) are not charged to the measured ones.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to wait before each memory reading (milliseconds).
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// How long to hold the connections open after the reading (seconds); they must
    /// all stay open.
    #[arg(long, default_value_t = 5)]
    hold: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Codec {
    /// `roomcast.v1.proto`: binary protobuf frames.
    Proto,
    /// `roomcast.v1.json`: text frames, proto3 JSON.
    Json,
}

impl Codec {
    fn subprotocol(self) -> &'static str {
        match self {
            Codec::Proto => SUBPROTOCOL_PROTO,
            Codec::Json => SUBPROTOCOL_JSON,
        }
    }
}

// ---------------------------------------------------------------------------
// The target: loopback only
// ---------------------------------------------------------------------------

/// Resolves `server` (`HOST:PORT`) to one socket address, refusing anything that is
/// not loopback: IPv4 127.0.0.0/8, IPv6 ::1, or `localhost` when every address it
/// resolves to is one of those. No other host name is looked up at all.
async fn resolve_loopback(server: &str) -> Result<SocketAddr> {
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--server must be HOST:PORT, got {server:?}"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in --server {server:?}"))?;
    let candidates: Vec<SocketAddr> = if host.eq_ignore_ascii_case("localhost") {
        tokio::net::lookup_host(("localhost", port))
            .await
            .context("resolve localhost")?
            .collect()
    } else {
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip: IpAddr = literal.parse().map_err(|_| {
            anyhow!("--server {server:?}: the host must be a loopback IP address or localhost")
        })?;
        vec![SocketAddr::new(ip, port)]
    };
    ensure!(!candidates.is_empty(), "{server:?} resolves to nothing");
    if let Some(outside) = candidates.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "refusing {server:?}: {} is not a loopback address; the bench only targets \
             127.0.0.0/8, ::1 or localhost",
            outside.ip()
        );
    }
    let chosen = candidates
        .iter()
        .find(|a| a.is_ipv4())
        .unwrap_or(&candidates[0]);
    Ok(*chosen)
}

// ---------------------------------------------------------------------------
// Set-up over the HTTP API
// ---------------------------------------------------------------------------

/// An account the bench signed up.
#[derive(Clone)]
struct Account {
    token: String,
}

/// The Connect JSON API of the target.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(addr: SocketAddr) -> Result<Self> {
        let http = reqwest::Client::builder()
            // Proxies from the environment would send traffic elsewhere; redirects
            // could leave loopback.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REPLY_TIMEOUT)
            .build()
            .context("build the HTTP client")?;
        Ok(Self {
            http,
            base: format!("http://{addr}"),
        })
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &str,
        token: Option<&str>,
        request: &Req,
    ) -> Result<Resp> {
        let url = format!("{}/roomcast.v1.{method}", self.base);
        let mut builder = self.http.post(&url).json(request);
        if let Some(token) = token {
            builder = builder.bearer_auth(token);
        }
        let response = builder.send().await.with_context(|| method.to_owned())?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{method}: HTTP {status}: {body}");
        }
        response
            .json()
            .await
            .with_context(|| format!("{method}: bad response"))
    }

    /// Signs up `count` accounts named `bench-<run>-<role><n>`.
    async fn sign_up_many(&self, run: &str, role: &str, count: usize) -> Result<Vec<Account>> {
        let results: Vec<Result<Account>> = stream::iter(0..count)
            .map(|n| {
                let username = format!("b{run}-{role}{n}");
                async move {
                    let reply: pb::SignUpResponse = self
                        .call(
                            "AuthService/SignUp",
                            None,
                            &pb::SignUpRequest {
                                username: username.clone(),
                                password: PASSWORD.into(),
                                display_name: String::new(),
                            },
                        )
                        .await
                        .with_context(|| format!("sign up {username}"))?;
                    Ok(Account {
                        token: reply
                            .tokens
                            .map(|t| t.access_token)
                            .ok_or_else(|| anyhow!("sign-up of {username} gave no token"))?,
                    })
                }
            })
            .buffered(SIGN_UP_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Creates a public room owned by `owner`; answers its id.
    async fn create_room(&self, owner: &Account, title: &str) -> Result<String> {
        let reply: pb::CreateRoomResponse = self
            .call(
                "RoomService/CreateRoom",
                Some(&owner.token),
                &pb::CreateRoomRequest {
                    kind: pb::RoomKind::Public as i32,
                    title: title.into(),
                    ..Default::default()
                },
            )
            .await?;
        reply
            .room
            .map(|r| r.id)
            .ok_or_else(|| anyhow!("CreateRoom answered no room"))
    }

    async fn join_room(&self, account: &Account, room_id: &str) -> Result<()> {
        let _: pb::JoinRoomResponse = self
            .call(
                "RoomService/JoinRoom",
                Some(&account.token),
                &pb::JoinRoomRequest {
                    room_id: room_id.into(),
                },
            )
            .await?;
        Ok(())
    }
}

/// A short random id for this run's account names.
fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// What reading the next server frame gave.
enum Incoming {
    Frame(Box<pb::ServerFrame>),
    /// The connection ended: close code and reason (1006 when it just broke).
    Closed(u16, String),
}

/// One WebSocket connection in the bench's codec.
struct Conn {
    ws: Ws,
    codec: Codec,
    next_id: u64,
}

impl Conn {
    /// Connects to `addr` with `token` in the upgrade request and waits for
    /// `authenticated`.
    async fn open(addr: SocketAddr, codec: Codec, token: &str) -> Result<Self> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let socket = timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("TCP connect to {addr} timed out"))?
            .with_context(|| format!("TCP connect to {addr}"))?;
        socket.set_nodelay(true)?;
        let mut request = format!("ws://{addr}/ws").into_client_request()?;
        let headers = request.headers_mut();
        headers.insert("sec-websocket-protocol", codec.subprotocol().parse()?);
        headers.insert("authorization", format!("Bearer {token}").parse()?);
        let (ws, response) = timeout_at(deadline, tokio_tungstenite::client_async(request, socket))
            .await
            .map_err(|_| anyhow!("WebSocket upgrade timed out"))?
            .context("WebSocket upgrade")?;
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        ensure!(
            chosen == Some(codec.subprotocol()),
            "the server chose subprotocol {chosen:?}, not {}",
            codec.subprotocol()
        );
        let mut conn = Self {
            ws,
            codec,
            next_id: 1,
        };
        loop {
            match conn.next(deadline).await? {
                Incoming::Frame(frame) => match frame.kind {
                    Some(Out::Authenticated(_)) => return Ok(conn),
                    Some(Out::Error(e)) => {
                        bail!("authentication failed: {}: {}", e.code, e.message)
                    }
                    _ => continue,
                },
                Incoming::Closed(code, reason) => {
                    bail!("closed before authenticating: {code} {reason}")
                }
            }
        }
    }

    async fn next(&mut self, deadline: Instant) -> Result<Incoming> {
        timeout_at(deadline, read_frame(&mut self.ws, self.codec))
            .await
            .map_err(|_| anyhow!("no frame from the server in time"))?
    }

    /// Sends a request and waits for the frame answering it (pushes are skipped).
    async fn request(&mut self, kind: In) -> Result<pb::ServerFrame> {
        let id = self.next_id;
        self.next_id += 1;
        self.ws
            .send(encode_frame(
                self.codec,
                &pb::ClientFrame {
                    id,
                    kind: Some(kind),
                },
            ))
            .await
            .context("send a frame")?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match self.next(deadline).await? {
                Incoming::Frame(frame) if frame.id == id => return Ok(*frame),
                Incoming::Frame(_) => continue,
                Incoming::Closed(code, reason) => {
                    bail!("closed while waiting for reply {id}: {code} {reason}")
                }
            }
        }
    }

    /// Subscribes live; answers the room's sequence at that moment.
    async fn subscribe_live(&mut self, room_id: &str) -> Result<u64> {
        let reply = self
            .request(In::Subscribe(pb::Subscribe {
                room_id: room_id.into(),
                since_seq: None,
            }))
            .await?;
        match reply.kind {
            Some(Out::Subscribed(s)) => Ok(s.last_seq),
            Some(Out::Error(e)) => bail!("subscribe: {}: {}", e.code, e.message),
            other => bail!("unexpected reply to subscribe: {other:?}"),
        }
    }

    /// Sends a close frame and waits (briefly) for the server's.
    async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(_))) = timeout_at(deadline, self.ws.next()).await {}
    }
}

fn encode_frame(codec: Codec, frame: &pb::ClientFrame) -> Message {
    match codec {
        Codec::Proto => Message::binary(frame.encode_to_vec()),
        // Serializing a generated pbjson type into a String cannot fail.
        Codec::Json => Message::text(serde_json::to_string(frame).unwrap_or_default()),
    }
}

/// Reads the next server frame; WebSocket pings are answered by tungstenite.
/// Cancel-safe: a frame is consumed and returned in the same poll.
async fn read_frame<S>(stream: &mut S, codec: Codec) -> Result<Incoming>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                let frame = pb::ServerFrame::decode(bytes).context("undecodable protobuf frame")?;
                return Ok(Incoming::Frame(Box::new(frame)));
            }
            Some(Ok(Message::Text(text))) => {
                let frame: pb::ServerFrame =
                    serde_json::from_str(text.as_str()).context("undecodable JSON frame")?;
                if codec == Codec::Proto {
                    bail!("a text frame on a {} connection", codec.subprotocol());
                }
                return Ok(Incoming::Frame(Box::new(frame)));
            }
            Some(Ok(Message::Close(close))) => {
                let (code, reason) = close
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Ok(Incoming::Closed(code, reason));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Ok(Incoming::Closed(1006, e.to_string())),
            None => return Ok(Incoming::Closed(1006, "stream ended".into())),
        }
    }
}

/// Opens `count` connections, `concurrency` at a time, for `accounts[n % len]`;
/// each one subscribed live to `room` when given. Answers, per connection in
/// completion order, the connection (with its subscription's start sequence) and how
/// long opening took, or the error.
async fn open_many(
    addr: SocketAddr,
    codec: Codec,
    accounts: &[Account],
    count: usize,
    concurrency: usize,
    room: Option<&str>,
) -> Vec<Result<(Conn, u64, Duration)>> {
    stream::iter(0..count)
        .map(|n| {
            let token = accounts[n % accounts.len()].token.clone();
            async move {
                let started = Instant::now();
                let mut conn = Conn::open(addr, codec, &token).await?;
                let base = match room {
                    Some(room) => conn.subscribe_live(room).await?,
                    None => 0,
                };
                Ok((conn, base, started.elapsed()))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

// ---------------------------------------------------------------------------
// Clock, payloads, statistics, /proc
// ---------------------------------------------------------------------------

/// The origin of the timestamps carried in message texts (publishers and subscribers
/// live in this process, so a monotonic clock is enough).
static CLOCK_ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();

fn now_ns() -> u64 {
    CLOCK_ORIGIN
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// `<send ns>|<tag>|` padded with `x` to `size` bytes.
fn payload(sent_ns: u64, tag: &str, size: usize) -> String {
    let mut text = format!("{sent_ns}|{tag}|");
    if text.len() < size {
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    text
}

/// The send time a [`payload`] carries.
fn payload_sent_ns(text: &str) -> Option<u64> {
    text.split('|').next()?.parse().ok()
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
struct Latency {
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    /// From samples in microseconds (sorted in place).
    fn from_us(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let ms = |us: u32| f64::from(us) / 1000.0;
        Self {
            samples: samples.len(),
            p50_ms: ms(percentile(samples, 0.50)),
            p99_ms: ms(percentile(samples, 0.99)),
            max_ms: ms(samples[samples.len() - 1]),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p99_ms, self.max_ms, self.samples
        )
    }
}

/// Nearest-rank percentile of sorted, non-empty `samples`.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn micros_ns(ns: u64) -> u32 {
    u32::try_from(ns / 1000).unwrap_or(u32::MAX)
}

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))
}

/// User + system CPU time of `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // Fields after the command name (which may hold spaces) start at field 3;
    // utime and stime are fields 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("malformed {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("malformed {path}"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = if per_sec > 0 { per_sec as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) as f64 / per_sec)
}

/// The soft open-files limit of `pid`, from /proc/<pid>/limits.
fn open_files_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; answers the soft
/// limit in force.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// CPU seconds the server (when its PID is known) and this process used between
/// two readings: on one machine they compete for the same cores.
struct CpuMeter {
    server_pid: Option<u32>,
    server_start: Option<f64>,
    bench_start: Option<f64>,
}

impl CpuMeter {
    fn start(server_pid: Option<u32>) -> Self {
        Self {
            server_pid,
            server_start: server_pid.and_then(|p| cpu_seconds(p).ok()),
            bench_start: cpu_seconds(std::process::id()).ok(),
        }
    }

    /// The server's CPU seconds since [`CpuMeter::start`].
    fn server(&self) -> Option<f64> {
        let now = cpu_seconds(self.server_pid?).ok()?;
        Some(now - self.server_start?)
    }

    /// This process's CPU seconds since [`CpuMeter::start`].
    fn bench(&self) -> Option<f64> {
        let now = cpu_seconds(std::process::id()).ok()?;
        Some(now - self.bench_start?)
    }
}

/// Rounds to 2 decimals for the report.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------
// Scenario: sends
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct SendsReport {
    scenario: &'static str,
    codec: Codec,
    senders: usize,
    messages_per_sender: usize,
    size: usize,
    acks: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed_s: f64,
    acks_per_s: f64,
    ack_latency: Latency,
    /// Acknowledged sequences that are not contiguous or repeat (must be 0).
    seq_gaps: u64,
    seq_dups: u64,
    server_cpu_s: Option<f64>,
    bench_cpu_s: Option<f64>,
    ok: bool,
}

#[derive(Default)]
struct SenderResult {
    latencies_us: Vec<u32>,
    seqs: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
}

async fn run_sends(ctx: &Ctx, args: &SendsArgs) -> Result<SendsReport> {
    ensure!(
        args.senders > 0 && args.messages > 0,
        "need senders and messages"
    );
    let run = run_id();
    eprintln!("sends: signing up {} senders", args.senders);
    let users = ctx.api.sign_up_many(&run, "s", args.senders).await?;
    let room = ctx.api.create_room(&users[0], "bench sends").await?;
    for user in &users[1..] {
        ctx.api.join_room(user, &room).await?;
    }
    let mut conns = Vec::with_capacity(users.len());
    for user in &users {
        conns.push(Conn::open(ctx.addr, ctx.codec, &user.token).await?);
    }
    eprintln!(
        "sends: {} senders × {} messages to {room}",
        args.senders, args.messages
    );
    let cpu = CpuMeter::start(ctx.server_pid);
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for (n, mut conn) in conns.into_iter().enumerate() {
        let room = room.clone();
        let (messages, size) = (args.messages, args.size);
        tasks.push(tokio::spawn(async move {
            let mut out = SenderResult::default();
            for i in 0..messages {
                if Instant::now() >= stop_at {
                    break;
                }
                let sent = Instant::now();
                let reply = conn
                    .request(In::Send(pb::SendMessageRequest {
                        room_id: room.clone(),
                        text: payload(now_ns(), &format!("s{n}-{i}"), size),
                        client_message_id: format!("s{n}-{i}"),
                        ..Default::default()
                    }))
                    .await?;
                match reply.kind {
                    Some(Out::Sent(ack)) => {
                        out.latencies_us.push(micros(sent.elapsed()));
                        out.seqs.push(ack.message.map_or(0, |m| m.seq));
                    }
                    Some(Out::Error(e)) => {
                        out.errors += 1;
                        out.first_error
                            .get_or_insert_with(|| format!("{}: {}", e.code, e.message));
                    }
                    other => bail!("unexpected reply to send: {other:?}"),
                }
            }
            conn.close().await;
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.context("sender task")??);
    }
    let elapsed = start.elapsed();
    let server_cpu_s = cpu.server().map(round2);
    let bench_cpu_s = cpu.bench().map(round2);

    let mut latencies: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    let mut seqs: Vec<u64> = results
        .iter()
        .flat_map(|r| r.seqs.iter().copied())
        .collect();
    seqs.sort_unstable();
    let (mut seq_gaps, mut seq_dups) = (0, 0);
    for pair in seqs.windows(2) {
        match pair[1].cmp(&(pair[0] + 1)) {
            std::cmp::Ordering::Less => seq_dups += 1,
            std::cmp::Ordering::Greater => seq_gaps += pair[1] - pair[0] - 1,
            std::cmp::Ordering::Equal => {}
        }
    }
    let errors = results.iter().map(|r| r.errors).sum();
    let first_error = results.iter().find_map(|r| r.first_error.clone());
    let acks = latencies.len();
    Ok(SendsReport {
        scenario: "sends",
        codec: ctx.codec,
        senders: args.senders,
        messages_per_sender: args.messages,
        size: args.size,
        acks,
        errors,
        first_error,
        elapsed_s: round2(elapsed.as_secs_f64()),
        acks_per_s: round2(acks as f64 / elapsed.as_secs_f64()),
        ack_latency: Latency::from_us(&mut latencies),
        seq_gaps,
        seq_dups,
        server_cpu_s,
        bench_cpu_s,
        ok: errors == 0 && seq_gaps == 0 && seq_dups == 0 && acks == args.senders * args.messages,
    })
}

impl SendsReport {
    fn print(&self) {
        println!("== sends ({} codec)", self.subprotocol());
        println!(
            "  {} senders × {} messages of {} B: {} acks, {} errors in {:.2} s",
            self.senders,
            self.messages_per_sender,
            self.size,
            self.acks,
            self.errors,
            self.elapsed_s
        );
        println!("  acks/s: {:.0}", self.acks_per_s);
        println!("  ack latency: {}", self.ack_latency);
        println!(
            "  acknowledged sequences: {} gaps, {} duplicates",
            self.seq_gaps, self.seq_dups
        );
        if let Some(cpu) = self.server_cpu_s {
            println!("  server CPU: {cpu:.2} s");
        }
        if let Some(cpu) = self.bench_cpu_s {
            println!("  bench (client) CPU: {cpu:.2} s");
        }
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
    }

    fn subprotocol(&self) -> &'static str {
        self.codec.subprotocol()
    }
}

// ---------------------------------------------------------------------------
// Scenario: fanout
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct FanoutReport {
    scenario: &'static str,
    codec: Codec,
    subscribers: usize,
    subscriber_users: usize,
    publishers: usize,
    target_rate: f64,
    duration_s: f64,
    size: usize,
    published: usize,
    acks: usize,
    publish_errors: usize,
    first_error: Option<String>,
    publish_rate: f64,
    ack_latency: Latency,
    expected_deliveries: u64,
    deliveries: u64,
    deliveries_per_s: f64,
    delivery_latency: Latency,
    /// Sequences skipped inside a subscription (must be 0).
    gaps: u64,
    /// Sequences received again or out of order (must be 0).
    dups: u64,
    /// Sequences never received by the end of the drain (must be 0).
    missing: u64,
    lagging_frames: u64,
    subscribers_closed: usize,
    first_close: Option<String>,
    server_cpu_s: Option<f64>,
    deliveries_per_server_cpu_s: Option<f64>,
    bench_cpu_s: Option<f64>,
    ok: bool,
}

#[derive(Default)]
struct PublisherResult {
    published: usize,
    acks: usize,
    errors: usize,
    first_error: Option<String>,
    max_seq: u64,
    ack_latencies_us: Vec<u32>,
}

#[derive(Default)]
struct SubscriberResult {
    received: u64,
    gaps: u64,
    dups: u64,
    missing: u64,
    lagging: u64,
    latencies_us: Vec<u32>,
    last_receive_ns: u64,
    closed: Option<String>,
}

async fn run_fanout(ctx: &Ctx, args: &FanoutArgs) -> Result<FanoutReport> {
    ensure!(
        args.subscribers > 0 && args.publishers > 0,
        "need subscribers and publishers"
    );
    ensure!(
        args.rate > 0.0 && args.duration > 0.0,
        "need a positive rate and duration"
    );
    let per_publisher = ((args.rate * args.duration) / args.publishers as f64).round() as usize;
    ensure!(per_publisher > 0, "rate × duration gives no message");
    let planned = (per_publisher * args.publishers) as u64 * args.subscribers as u64;
    ensure!(
        planned <= MAX_PLANNED_DELIVERIES,
        "{planned} planned deliveries exceed the bench's limit of {MAX_PLANNED_DELIVERIES}"
    );
    let run = run_id();
    let subscriber_users = args.subscriber_users.clamp(1, args.subscribers);
    eprintln!(
        "fanout: signing up {} publishers and {subscriber_users} subscriber accounts",
        args.publishers
    );
    let publishers = ctx.api.sign_up_many(&run, "p", args.publishers).await?;
    let readers = ctx.api.sign_up_many(&run, "r", subscriber_users).await?;
    let room = ctx.api.create_room(&publishers[0], "bench fanout").await?;
    for publisher in &publishers[1..] {
        ctx.api.join_room(publisher, &room).await?;
    }

    eprintln!("fanout: opening {} subscribers of {room}", args.subscribers);
    let opened = open_many(
        ctx.addr,
        ctx.codec,
        &readers,
        args.subscribers,
        SETUP_CONCURRENCY,
        Some(&room),
    )
    .await;
    let mut subs = Vec::with_capacity(opened.len());
    for result in opened {
        let (conn, base, _) = result.context("open a subscriber")?;
        subs.push((conn, base));
    }
    let mut pub_conns = Vec::with_capacity(publishers.len());
    for publisher in &publishers {
        pub_conns.push(Conn::open(ctx.addr, ctx.codec, &publisher.token).await?);
    }

    // Subscribers read until they have the last acknowledged sequence (sent on
    // `final_tx` once every publisher is done) or their deadline passes.
    let (final_tx, final_rx) = watch::channel::<Option<u64>>(None);
    let hard_deadline = ctx.deadline;
    let drain = Duration::from_secs(args.drain_timeout);
    let codec = ctx.codec;
    let mut sub_tasks = Vec::with_capacity(subs.len());
    for (conn, base) in subs {
        let room = room.clone();
        let mut final_rx = final_rx.clone();
        sub_tasks.push(tokio::spawn(async move {
            let mut ws = conn.ws;
            let mut out = SubscriberResult::default();
            let mut last = base;
            let mut deadline = hard_deadline;
            loop {
                let target = *final_rx.borrow();
                if let Some(target) = target {
                    if last >= target {
                        break;
                    }
                }
                tokio::select! {
                    changed = final_rx.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        deadline = deadline.min(Instant::now() + drain);
                    }
                    read = timeout_at(deadline, read_frame(&mut ws, codec)) => match read {
                        Err(_) => break,
                        Ok(Err(e)) => {
                            out.closed = Some(format!("read error: {e:#}"));
                            break;
                        }
                        Ok(Ok(Incoming::Closed(code, reason))) => {
                            out.closed = Some(format!("closed {code} {reason}"));
                            break;
                        }
                        Ok(Ok(Incoming::Frame(frame))) => match frame.kind {
                            Some(Out::Message(m)) if m.room_id == room => {
                                let now = now_ns();
                                out.received += 1;
                                out.last_receive_ns = now;
                                if let Some(sent) = payload_sent_ns(&m.text) {
                                    out.latencies_us.push(micros_ns(now.saturating_sub(sent)));
                                }
                                if m.seq <= last {
                                    out.dups += 1;
                                } else {
                                    out.gaps += m.seq - last - 1;
                                    last = m.seq;
                                }
                            }
                            Some(Out::Lagging(_)) => out.lagging += 1,
                            _ => {}
                        },
                    },
                }
            }
            if let Some(target) = *final_rx.borrow() {
                out.missing = target.saturating_sub(last);
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            out
        }));
    }

    eprintln!(
        "fanout: {} publishers at {} msgs/s for {} s ({per_publisher} messages each)",
        args.publishers, args.rate, args.duration
    );
    let cpu = CpuMeter::start(ctx.server_pid);
    let start = Instant::now() + Duration::from_millis(100);
    let start_ns = now_ns() + 100_000_000;
    let period = Duration::from_secs_f64(args.publishers as f64 / args.rate);
    let mut pub_tasks = Vec::with_capacity(pub_conns.len());
    for (n, conn) in pub_conns.into_iter().enumerate() {
        let room = room.clone();
        let size = args.size;
        // Publishers start spread over one period, not all at the same instant.
        let offset = period.mul_f64(n as f64 / args.publishers as f64);
        pub_tasks.push(tokio::spawn(async move {
            publish(
                conn.ws,
                codec,
                &room,
                n,
                size,
                start + offset,
                period,
                per_publisher,
                hard_deadline,
            )
            .await
        }));
    }
    let mut pub_results = Vec::new();
    for task in pub_tasks {
        pub_results.push(task.await.context("publisher task")??);
    }
    let publish_end = Instant::now();
    let final_seq = pub_results.iter().map(|r| r.max_seq).max().unwrap_or(0);
    let _ = final_tx.send(Some(final_seq));
    let mut sub_results = Vec::with_capacity(sub_tasks.len());
    for task in sub_tasks {
        sub_results.push(task.await.context("subscriber task")?);
    }
    drop(final_tx);
    let server_cpu_s = cpu.server();
    let bench_cpu_s = cpu.bench().map(round2);

    let acks: usize = pub_results.iter().map(|r| r.acks).sum();
    let published: usize = pub_results.iter().map(|r| r.published).sum();
    let publish_errors: usize = pub_results.iter().map(|r| r.errors).sum();
    let first_error = pub_results.iter().find_map(|r| r.first_error.clone());
    let mut ack_latencies: Vec<u32> = pub_results
        .iter()
        .flat_map(|r| r.ack_latencies_us.iter().copied())
        .collect();
    let deliveries: u64 = sub_results.iter().map(|r| r.received).sum();
    let last_receive_ns = sub_results
        .iter()
        .map(|r| r.last_receive_ns)
        .max()
        .unwrap_or(start_ns);
    let delivery_window = (last_receive_ns.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let publish_window = publish_end.duration_since(start).as_secs_f64().max(1e-9);
    let mut latencies: Vec<u32> = Vec::with_capacity(deliveries as usize);
    for r in &mut sub_results {
        latencies.append(&mut r.latencies_us);
    }
    let gaps = sub_results.iter().map(|r| r.gaps).sum();
    let dups = sub_results.iter().map(|r| r.dups).sum();
    let missing = sub_results.iter().map(|r| r.missing).sum();
    let closed: Vec<&String> = sub_results
        .iter()
        .filter_map(|r| r.closed.as_ref())
        .collect();
    let expected_deliveries = acks as u64 * args.subscribers as u64;
    Ok(FanoutReport {
        scenario: "fanout",
        codec,
        subscribers: args.subscribers,
        subscriber_users,
        publishers: args.publishers,
        target_rate: args.rate,
        duration_s: args.duration,
        size: args.size,
        published,
        acks,
        publish_errors,
        first_error,
        publish_rate: round2(acks as f64 / publish_window),
        ack_latency: Latency::from_us(&mut ack_latencies),
        expected_deliveries,
        deliveries,
        deliveries_per_s: round2(deliveries as f64 / delivery_window),
        delivery_latency: Latency::from_us(&mut latencies),
        gaps,
        dups,
        missing,
        lagging_frames: sub_results.iter().map(|r| r.lagging).sum(),
        subscribers_closed: closed.len(),
        first_close: closed.first().map(|s| (*s).clone()),
        server_cpu_s: server_cpu_s.map(round2),
        deliveries_per_server_cpu_s: server_cpu_s
            .filter(|s| *s > 0.0)
            .map(|s| round2(deliveries as f64 / s)),
        bench_cpu_s,
        ok: publish_errors == 0
            && acks == per_publisher * args.publishers
            && gaps == 0
            && dups == 0
            && missing == 0
            && deliveries == expected_deliveries
            && closed.is_empty(),
    })
}

/// One publisher: sends `count` messages on schedule (`start + i × period`, sending
/// late ones at once) without waiting for acks, and reads the acks as they come.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn publish(
    ws: Ws,
    codec: Codec,
    room: &str,
    n: usize,
    size: usize,
    start: Instant,
    period: Duration,
    count: usize,
    hard_deadline: Instant,
) -> Result<PublisherResult> {
    let (mut sink, mut stream) = ws.split();
    let mut out = PublisherResult::default();
    let mut next_at = start;
    let mut ack_deadline = hard_deadline;
    loop {
        let sending = out.published < count && Instant::now() < hard_deadline;
        if !sending {
            if out.acks + out.errors >= out.published {
                break;
            }
            ack_deadline = ack_deadline.min(Instant::now() + REPLY_TIMEOUT);
        }
        tokio::select! {
            _ = sleep_until(next_at), if sending => {
                let i = out.published;
                let frame = pb::ClientFrame {
                    id: i as u64 + 1,
                    kind: Some(In::Send(pb::SendMessageRequest {
                        room_id: room.to_owned(),
                        text: payload(now_ns(), &format!("p{n}-{i}"), size),
                        client_message_id: format!("p{n}-{i}"),
                        ..Default::default()
                    })),
                };
                sink.send(encode_frame(codec, &frame)).await.context("publish")?;
                out.published += 1;
                next_at = start + period.mul_f64(out.published as f64);
            }
            read = timeout_at(ack_deadline, read_frame(&mut stream, codec)) => match read {
                Err(_) => break,
                Ok(read) => match read? {
                    Incoming::Closed(code, reason) => {
                        out.first_error.get_or_insert(format!("publisher closed: {code} {reason}"));
                        break;
                    }
                    Incoming::Frame(frame) if frame.id != 0 => match frame.kind {
                        Some(Out::Sent(ack)) => {
                            out.acks += 1;
                            if let Some(m) = ack.message {
                                out.max_seq = out.max_seq.max(m.seq);
                                if let Some(sent) = payload_sent_ns(&m.text) {
                                    out.ack_latencies_us.push(micros_ns(now_ns().saturating_sub(sent)));
                                }
                            }
                        }
                        Some(Out::Error(e)) => {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| format!("{}: {}", e.code, e.message));
                        }
                        _ => {}
                    },
                    Incoming::Frame(_) => {}
                },
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    Ok(out)
}

impl FanoutReport {
    fn print(&self) {
        println!("== fanout ({} codec)", self.codec.subprotocol());
        println!(
            "  {} subscribers ({} accounts), {} publishers at {} msgs/s for {} s, {} B texts",
            self.subscribers,
            self.subscriber_users,
            self.publishers,
            self.target_rate,
            self.duration_s,
            self.size
        );
        println!(
            "  published {} ({} acks, {} errors), achieved {:.1} msgs/s; ack latency {}",
            self.published, self.acks, self.publish_errors, self.publish_rate, self.ack_latency
        );
        println!(
            "  deliveries: {} of {} expected, {:.0}/s",
            self.deliveries, self.expected_deliveries, self.deliveries_per_s
        );
        println!("  publish-to-delivery latency: {}", self.delivery_latency);
        println!(
            "  order: {} gaps, {} duplicates/out of order, {} missing; {} lagging frames; {} subscribers closed",
            self.gaps, self.dups, self.missing, self.lagging_frames, self.subscribers_closed
        );
        if let (Some(cpu), Some(per)) = (self.server_cpu_s, self.deliveries_per_server_cpu_s) {
            println!("  server CPU: {cpu:.2} s ({per:.0} deliveries per CPU-second)");
        }
        if let Some(cpu) = self.bench_cpu_s {
            println!("  bench (client) CPU: {cpu:.2} s");
        }
        if let Some(e) = &self.first_error {
            println!("  first publish error: {e}");
        }
        if let Some(c) = &self.first_close {
            println!("  first subscriber close: {c}");
        }
    }
}

// ---------------------------------------------------------------------------
// Scenario: idle
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct IdleReport {
    scenario: &'static str,
    codec: Codec,
    connections: usize,
    users: usize,
    subscribed: bool,
    warmup: usize,
    opened: usize,
    failed: usize,
    first_failure: Option<String>,
    open_s: f64,
    connections_per_s: f64,
    connect_latency: Latency,
    server_rss_before_kib: Option<u64>,
    server_rss_after_kib: Option<u64>,
    kib_per_connection: Option<f64>,
    closed_during_hold: usize,
    first_close: Option<String>,
    ok: bool,
}

async fn run_idle(ctx: &Ctx, args: &IdleArgs) -> Result<IdleReport> {
    ensure!(args.connections > 0, "need connections");
    let needed = (args.connections + args.warmup) as u64 + 64;
    ensure!(
        needed <= ctx.fd_limit,
        "{} connections need about {needed} file descriptors but this process may open {}; \
         raise `ulimit -n` (the server needs as many)",
        args.connections + args.warmup,
        ctx.fd_limit
    );
    if let Some(server_limit) = ctx.server_pid.and_then(open_files_limit) {
        ensure!(
            needed <= server_limit,
            "the server (pid {:?}) may open only {server_limit} files; start it under a \
             higher `ulimit -n`",
            ctx.server_pid
        );
    }
    let run = run_id();
    let users = if args.users == 0 {
        args.connections
    } else {
        args.users.min(args.connections)
    };
    eprintln!("idle: signing up {users} accounts");
    let accounts = ctx.api.sign_up_many(&run, "i", users).await?;
    let room = if args.subscribe {
        Some(ctx.api.create_room(&accounts[0], "bench idle").await?)
    } else {
        None
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let closed = Arc::new(AtomicUsize::new(0));
    let first_close: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut holders = Vec::new();
    let mut hold = |conn: Conn| {
        let mut stop_rx = stop_rx.clone();
        let closed = closed.clone();
        let first_close = first_close.clone();
        let deadline = ctx.deadline;
        holders.push(tokio::spawn(async move {
            let codec = conn.codec;
            let mut ws = conn.ws;
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    read = timeout_at(deadline, read_frame(&mut ws, codec)) => match read {
                        Err(_) => break,
                        Ok(Ok(Incoming::Frame(_))) => continue,
                        Ok(Ok(Incoming::Closed(code, reason))) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut first) = first_close.lock() {
                                first.get_or_insert(format!("closed {code} {reason}"));
                            }
                            return;
                        }
                        Ok(Err(e)) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut first) = first_close.lock() {
                                first.get_or_insert(format!("read error: {e:#}"));
                            }
                            return;
                        }
                    },
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }));
    };

    let settle = Duration::from_millis(args.settle_ms);
    if args.warmup > 0 {
        eprintln!("idle: {} warm-up connections", args.warmup);
        for result in open_many(
            ctx.addr,
            ctx.codec,
            &accounts,
            args.warmup,
            args.concurrency,
            room.as_deref(),
        )
        .await
        {
            let (conn, _, _) = result.context("open a warm-up connection")?;
            hold(conn);
        }
    }
    tokio::time::sleep(settle).await;
    let before = ctx.server_pid.map(rss_kib).transpose()?;

    eprintln!(
        "idle: opening {} connections, {} at a time",
        args.connections, args.concurrency
    );
    let started = Instant::now();
    // Offset the accounts so warm-up connections do not all share the first ones.
    let rotated: Vec<Account> = accounts
        .iter()
        .cycle()
        .skip(args.warmup % accounts.len())
        .take(accounts.len())
        .cloned()
        .collect();
    let results = open_many(
        ctx.addr,
        ctx.codec,
        &rotated,
        args.connections,
        args.concurrency,
        room.as_deref(),
    )
    .await;
    let open_s = started.elapsed().as_secs_f64();
    let mut connect_us = Vec::new();
    let mut failed = 0;
    let mut first_failure = None;
    for result in results {
        match result {
            Ok((conn, _, took)) => {
                connect_us.push(micros(took));
                hold(conn);
            }
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let opened = connect_us.len();
    tokio::time::sleep(settle).await;
    let after = ctx.server_pid.map(rss_kib).transpose()?;
    eprintln!("idle: holding {opened} connections for {} s", args.hold);
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let closed_during_hold = closed.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for holder in holders {
        let _ = holder.await;
    }
    let kib_per_connection = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => Some(round2((a as f64 - b as f64) / opened as f64)),
        _ => None,
    };
    let first_close = first_close.lock().ok().and_then(|f| f.clone());
    Ok(IdleReport {
        scenario: "idle",
        codec: ctx.codec,
        connections: args.connections,
        users,
        subscribed: args.subscribe,
        warmup: args.warmup,
        opened,
        failed,
        first_failure,
        open_s: round2(open_s),
        connections_per_s: round2(opened as f64 / open_s.max(1e-9)),
        connect_latency: Latency::from_us(&mut connect_us),
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        kib_per_connection,
        closed_during_hold,
        first_close,
        ok: failed == 0 && closed_during_hold == 0,
    })
}

impl IdleReport {
    fn print(&self) {
        println!("== idle ({} codec)", self.codec.subprotocol());
        println!(
            "  {} connections ({} accounts{}), {} warm-up: {} opened, {} failed in {:.2} s ({:.0}/s)",
            self.connections,
            self.users,
            if self.subscribed { ", subscribed to one room" } else { "" },
            self.warmup,
            self.opened,
            self.failed,
            self.open_s,
            self.connections_per_s
        );
        println!("  connect + authenticate latency: {}", self.connect_latency);
        match (
            self.server_rss_before_kib,
            self.server_rss_after_kib,
            self.kib_per_connection,
        ) {
            (Some(b), Some(a), Some(per)) => {
                println!("  server RSS: {b} KiB before, {a} KiB after: {per:.2} KiB per connection")
            }
            _ => println!("  server RSS: not measured (give --server-pid)"),
        }
        println!("  closed while held: {}", self.closed_during_hold);
        if let Some(e) = &self.first_failure {
            println!("  first failure: {e}");
        }
        if let Some(c) = &self.first_close {
            println!("  first close: {c}");
        }
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

/// What every scenario needs.
struct Ctx {
    addr: SocketAddr,
    api: Api,
    codec: Codec,
    server_pid: Option<u32>,
    /// The scenario's hard deadline.
    deadline: Instant,
    fd_limit: u64,
}

async fn run(cli: Cli) -> Result<bool> {
    let addr = resolve_loopback(&cli.server).await?;
    let fd_limit = raise_fd_limit();
    if let Some(pid) = cli.server_pid {
        ensure!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "no process {pid} (--server-pid)"
        );
    }
    let hard = Duration::from_secs(cli.timeout);
    let ctx = Ctx {
        addr,
        api: Api::new(addr)?,
        codec: cli.codec,
        server_pid: cli.server_pid,
        deadline: Instant::now() + hard,
        fd_limit,
    };
    let scenario = async {
        let (json, ok) = match &cli.scenario {
            Scenario::Sends(args) => {
                let report = run_sends(&ctx, args).await?;
                report.print();
                (serde_json::to_string(&report)?, report.ok)
            }
            Scenario::Fanout(args) => {
                let report = run_fanout(&ctx, args).await?;
                report.print();
                (serde_json::to_string(&report)?, report.ok)
            }
            Scenario::Idle(args) => {
                let report = run_idle(&ctx, args).await?;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = now_ns();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cli.threads > 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_targets_are_accepted() {
        for ok in [
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]:9000",
            "localhost:8080",
        ] {
            let addr = resolve_loopback(ok)
                .await
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(addr.ip().is_loopback(), "{ok} → {addr}");
        }
        for refused in [
            "10.0.0.1:8080",
            "192.168.1.1:80",
            "8.8.8.8:53",
            "0.0.0.0:8080",
            "[::]:8080",
            "[::ffff:10.0.0.1]:80",
            "example.com:80",
            "127.0.0.1.nip.io:80",
            "127.0.0.1",
            "127.0.0.1:http",
        ] {
            assert!(
                resolve_loopback(refused).await.is_err(),
                "{refused} must be refused"
            );
        }
    }

    #[test]
    fn payload_carries_its_send_time_and_size() {
        let text = payload(1_234_567, "p0-1", 64);
        assert_eq!(text.len(), 64);
        assert_eq!(payload_sent_ns(&text), Some(1_234_567));
        assert_eq!(payload_sent_ns("hello"), None);
        // Never truncated below the prefix.
        assert_eq!(payload(5, "t", 1), "5|t|");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<u32> = (1..=100).rev().map(|v| v * 1000).collect();
        let l = Latency::from_us(&mut samples);
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert_eq!(Latency::from_us(&mut []), Latency::default());
        assert_eq!(percentile(&[7], 0.99), 7);
    }

    #[test]
    fn proc_readings_work_on_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).expect("VmRSS") > 0);
        assert!(cpu_seconds(pid).expect("CPU time") >= 0.0);
        assert!(open_files_limit(pid).expect("limits") > 0);
    }
}
