//! [`LiveGuard`]: a live room's per-user rules for the whole cluster, not per
//! node, when nodes share rooms (the Redis broker). A live room's actor checks
//! them on its own node first ([`crate::actors::live_state`]); with the Redis
//! broker it then asks Redis, so a user who sends on several nodes meets one
//! rule:
//!
//! - **Retries** (`client_message_id`): the first attempt claims the key
//!   `<prefix>live:sent:<room>:<user>:<id>` with `SET NX PX`; once the room has
//!   numbered the message the key holds the message (its node-protocol
//!   `StoredEvent`), so a retry on any node gets the first result. A retry that
//!   comes while the first attempt is still being numbered on another node is
//!   answered `unavailable` (retry shortly with the same id); a first attempt that
//!   failed releases the key. Kept for `cluster.live_retry_window_ms`.
//! - **Slow mode**: `SET <prefix>live:slow:<room>:<user> NX PX <slow mode>`: a
//!   send finds the key while the user's last send is younger than the slow mode,
//!   and waits out its remaining time (`PTTL`).
//! - **Rate limit** (`rate_limit_per_minute`): a GCRA bucket per user and room
//!   (the script of [`super::limits`]) with a rate of the limit per minute and a
//!   burst of the limit: never more than the limit in a burst, then one send every
//!   `60 s / limit`.
//!
//! Every call waits at most [`super::limits::LIMIT_TIMEOUT`]. While Redis does not
//! answer (down, or slower than that) the room's own per-node rules decide (a user
//! may then send up to the limits on each node) and the guard tries Redis again
//! after [`super::limits::RETRY_AFTER_FAILURE`]; the rules are never off.

use std::time::Duration;

use prost::Message as _;

use super::limits::{GuardedRedis, Verdict, GCRA};
use crate::{
    ids::{RoomId, UserId},
    proto::node::v1 as node,
    store::MessageRecord,
};

/// Claims a retry key, or reads what holds it. KEYS[1]: the key; ARGV[1]: its
/// lifetime (ms). Answers nil when this call claimed it, else the key's value
/// (empty while the first attempt is being numbered).
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[1]) then return false end
return redis.call('GET', KEYS[1])
";

/// Slow mode. KEYS[1]: the user's key in the room; ARGV[1]: the slow mode (ms).
/// Answers 0 (allowed, the key set) or how many ms remain.
const SLOW: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then return 1 end
return left
";

/// What Redis knows of a retry key.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This attempt is the first: send it, then [`LiveGuard::settle`].
    First,
    /// The message was numbered already (on some node): its record.
    Sent(MessageRecord),
    /// The first attempt is still being numbered on some node.
    InFlight,
    /// Redis did not answer: the room's own record of retries decides.
    Unknown,
}

/// See the module docs.
pub struct LiveGuard {
    redis: GuardedRedis,
    prefix: String,
    retry_window: Duration,
}

impl std::fmt::Debug for LiveGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveGuard")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl LiveGuard {
    /// A guard on the Redis at `url`, with keys under `prefix`, keeping retry keys
    /// for `retry_window`. Connects on first use.
    pub fn new(url: &str, prefix: &str, retry_window: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            redis: GuardedRedis::new(url, "live rooms' retries, slow mode and rate limit")?,
            prefix: prefix.to_owned(),
            retry_window,
        })
    }

    fn sent_key(&self, room: &RoomId, user: &UserId, client_message_id: &str) -> String {
        format!(
            "{}live:sent:{}:{}:{}",
            self.prefix,
            room.as_str(),
            user.0,
            client_message_id
        )
    }

    /// Claims `client_message_id` of `user` in `room` for this attempt, or says
    /// who has it.
    pub async fn claim(&self, room: &RoomId, user: &UserId, client_message_id: &str) -> Claim {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(CLAIM)
            .arg(1)
            .arg(self.sent_key(room, user, client_message_id))
            .arg(self.retry_window.as_millis().max(1) as u64);
        match self.redis.run::<Option<Vec<u8>>>(cmd).await {
            None => Claim::Unknown,
            Some(None) => Claim::First,
            Some(Some(bytes)) if bytes.is_empty() => Claim::InFlight,
            Some(Some(bytes)) => {
                let record = node::StoredEvent::decode(bytes.as_slice())
                    .ok()
                    .and_then(|e| super::codec::message_record(room.as_str(), e).ok());
                match record {
                    Some(record) => Claim::Sent(record),
                    None => {
                        tracing::warn!(room = %room, "unreadable retry record in Redis; the room's own record decides");
                        Claim::Unknown
                    }
                }
            }
        }
    }

    /// The attempt that claimed a key ended: numbered as `record` (a retry on any
    /// node now gets it), or failed (`None`: the key is released, a retry is a
    /// first attempt again).
    pub async fn settle(
        &self,
        room: &RoomId,
        user: &UserId,
        client_message_id: &str,
        record: Option<&MessageRecord>,
    ) {
        let key = self.sent_key(room, user, client_message_id);
        let cmd = match record {
            Some(record) => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key)
                    .arg(super::codec::stored_event(record).encode_to_vec())
                    .arg("XX")
                    .arg("PX")
                    .arg(self.retry_window.as_millis().max(1) as u64);
                cmd
            }
            None => {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(key);
                cmd
            }
        };
        // Not answered: the key expires by itself (a retry meanwhile is told to
        // retry later, or is checked by the room's own record).
        let _ = self.redis.run::<redis::Value>(cmd).await;
    }

    /// Slow mode of `every` for `user` in `room`: allowed (the user's next send
    /// waits `every`), or how long to wait.
    pub async fn slow_mode(&self, room: &RoomId, user: &UserId, every: Duration) -> Verdict {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SLOW)
            .arg(1)
            .arg(format!(
                "{}live:slow:{}:{}",
                self.prefix,
                room.as_str(),
                user.0
            ))
            .arg(every.as_millis().max(1) as u64);
        match self.redis.run::<u64>(cmd).await {
            None => Verdict::Unknown,
            Some(0) => Verdict::Allowed,
            Some(left_ms) => Verdict::Wait(Duration::from_millis(left_ms)),
        }
    }

    /// The rate limit of `per_minute` sends for `user` in `room`: allowed, or how
    /// long to wait.
    pub async fn rate_limit(&self, room: &RoomId, user: &UserId, per_minute: u32) -> Verdict {
        let per_minute = u64::from(per_minute.max(1));
        let interval_us = (60_000_000 / per_minute).max(1);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GCRA)
            .arg(1)
            .arg(format!(
                "{}live:rate:{}:{}",
                self.prefix,
                room.as_str(),
                user.0
            ))
            .arg(interval_us)
            .arg(interval_us * (per_minute - 1));
        match self.redis.run::<u64>(cmd).await {
            None => Verdict::Unknown,
            Some(0) => Verdict::Allowed,
            Some(wait_us) => Verdict::Wait(Duration::from_micros(wait_us)),
        }
    }
}
