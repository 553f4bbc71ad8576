//! [`ClusterRateLimit`]: the per-user send limit (`realtime.send_rate_per_sec`,
//! `realtime.send_burst`) for the whole cluster, not per node. With the Redis
//! broker every send takes its token from one GCRA bucket per user kept in Redis
//! (one Lua script call: read the user's "theoretical arrival time", refuse or
//! advance it, all atomically, with Redis's own clock so the nodes' clocks do not
//! matter). While Redis does not answer (down, or slower than
//! [`LIMIT_TIMEOUT`]) a node falls back to its own in-memory limiter
//! ([`crate::domain::SendLimiter`]): a user may then send up to the limit on each
//! node; the limit is never turned off. It tries Redis again after
//! [`RETRY_AFTER_FAILURE`].

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;

use crate::ids::UserId;

/// How long a send waits for Redis's answer before the local limiter decides.
pub const LIMIT_TIMEOUT: Duration = Duration::from_millis(100);
/// After a failed call, how long the node uses its local limiter only.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// GCRA on Redis time in microseconds. KEYS[1]: the user's bucket; ARGV[1]: the
/// emission interval (µs per token); ARGV[2]: the burst tolerance (µs). Answers 0
/// (allowed) or how many µs to wait.
pub(crate) const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then return allow_at - now end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
";

/// What the cluster-wide bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused: the user may send again after this long.
    Wait(Duration),
    /// Redis did not answer: the caller's local limiter decides.
    Unknown,
}

/// The Redis half of the send limit (see the module docs).
pub struct ClusterRateLimit {
    redis: GuardedRedis,
    prefix: String,
    interval_us: u64,
    tolerance_us: u64,
}

/// A Redis link for checks that must never wait long: one multiplexed
/// connection opened on first use, every call bounded by [`LIMIT_TIMEOUT`], and
/// after a failure no call for [`RETRY_AFTER_FAILURE`] (the caller's local rules
/// decide meanwhile). Shared by the send limit and the live rooms' guards.
pub(crate) struct GuardedRedis {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    failed_at: Mutex<Option<Instant>>,
    /// Logged once per failure spell: what falls back to per-node rules.
    fallback: &'static str,
}

impl GuardedRedis {
    /// A link to the Redis at `url`; `fallback` says in the log what each node
    /// does on its own while Redis does not answer.
    pub(crate) fn new(url: &str, fallback: &'static str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            connection: tokio::sync::Mutex::new(None),
            failed_at: Mutex::new(None),
            fallback,
        })
    }

    /// Runs `cmd` within [`LIMIT_TIMEOUT`]; `None` when Redis did not answer (or
    /// failed less than [`RETRY_AFTER_FAILURE`] ago).
    pub(crate) async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Option<T> {
        if self.recently_failed() {
            return None;
        }
        let call = async {
            let mut connection = self.connection().await?;
            cmd.query_async::<T>(&mut connection).await
        };
        match tokio::time::timeout(LIMIT_TIMEOUT, call).await {
            Ok(Ok(value)) => {
                *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Some(value)
            }
            Ok(Err(e)) => {
                self.connection.lock().await.take();
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("timed out");
                None
            }
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = self.client.get_multiplexed_async_connection().await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    fn recently_failed(&self) -> bool {
        let slot = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        slot.is_some_and(|at| at.elapsed() < RETRY_AFTER_FAILURE)
    }

    fn failed(&self, error: &str) {
        let mut slot = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none_or(|at| at.elapsed() >= RETRY_AFTER_FAILURE) {
            tracing::warn!(
                error,
                fallback = self.fallback,
                "cluster: Redis did not answer; each node applies these rules on its own until it does"
            );
        }
        *slot = Some(Instant::now());
    }
}

impl ClusterRateLimit {
    /// A limiter on the Redis at `url`, with keys under `prefix`, for `per_second`
    /// sends with bursts of `burst`. Connects on first use.
    pub fn new(
        url: &str,
        prefix: &str,
        per_second: u32,
        burst: u32,
    ) -> Result<Self, redis::RedisError> {
        let interval_us = 1_000_000 / u64::from(per_second.max(1));
        let interval_us = interval_us.max(1);
        Ok(Self {
            redis: GuardedRedis::new(url, "the send limit")?,
            prefix: prefix.to_owned(),
            interval_us,
            tolerance_us: interval_us * u64::from(burst.max(1) - 1),
        })
    }

    /// Takes one token of `user`'s cluster-wide bucket.
    pub async fn check(&self, user: &UserId) -> Verdict {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GCRA)
            .arg(1)
            .arg(format!("{}limit:send:{}", self.prefix, user.0))
            .arg(self.interval_us)
            .arg(self.tolerance_us);
        match self.redis.run::<u64>(cmd).await {
            None => Verdict::Unknown,
            Some(0) => Verdict::Allowed,
            Some(wait_us) => Verdict::Wait(Duration::from_micros(wait_us)),
        }
    }
}
