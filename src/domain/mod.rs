//! The operations behind each RPC, shared by the HTTP API and the WebSocket. Each
//! takes the [`AppState`], the caller and a request message, and returns a response
//! message or an [`ApiError`](crate::error::ApiError). Validation of client input
//! happens here; authentication goes through the auth actors, and everything that
//! changes a room's history goes through its room actor.

pub mod access;
pub mod access_rules;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod convert;
pub mod drain;
pub mod invitations;
pub mod live;
pub mod messages;
pub mod notifications;
mod principal;
pub mod publish;
pub mod push;
pub mod rooms;
pub mod users;
pub mod validate;

use std::sync::Arc;

use actix::Addr;
use governor::{DefaultKeyedRateLimiter, Quota};

pub use principal::{Credential, Principal};

use crate::{
    actors::{
        authenticator::AuthPool, poll_hub::PollHub, room_registry::RoomRegistry,
        session_registry::SessionRegistry,
    },
    error::ApiError,
    ids::UserId,
    settings::Settings,
    store::Store,
};

/// Handles to everything an operation may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub auth: AuthPool,
    pub rooms: Addr<RoomRegistry>,
    pub sessions: Addr<SessionRegistry>,
    /// Wakes this node's waiting long-polls (PushService.Poll).
    pub polls: Addr<PollHub>,
    pub send_limiter: Arc<SendLimiter>,
    /// Who is online on the other nodes (`crate::cluster::presence`).
    pub presence: Addr<crate::cluster::presence::PresenceBoard>,
    /// Set once the node drains (SIGTERM or AdminService.DrainNode).
    pub drain: Arc<drain::Drain>,
    /// This node's end of the cluster broker (publish, register interest).
    pub bus: crate::cluster::Bus,
}

/// Per-user token bucket for sends (HTTP and WebSocket share it): this node's
/// own, and with the Redis broker one for the whole cluster
/// ([`crate::cluster::limits`]), which decides while Redis answers.
pub struct SendLimiter {
    local: DefaultKeyedRateLimiter<UserId>,
    cluster: Option<crate::cluster::limits::ClusterRateLimit>,
}

impl SendLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let rate =
            std::num::NonZeroU32::new(per_second.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            local: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            cluster: None,
        }
    }

    /// The same limit for the whole cluster, kept in Redis (the local one stays
    /// as the fallback while Redis does not answer).
    pub fn with_cluster(mut self, cluster: crate::cluster::limits::ClusterRateLimit) -> Self {
        self.cluster = Some(cluster);
        self
    }

    fn refused(wait: std::time::Duration) -> ApiError {
        crate::metrics::metrics().limited("send_rate");
        ApiError::exhausted(format!(
            "send rate limit exceeded; retry in {} ms with the same client_message_id",
            wait.as_millis().max(1)
        ))
        .with_retry_after(wait)
    }

    /// Takes one token for `user`, or says how long to wait (in the message, and as
    /// the retry delay that HTTP answers carry in `Retry-After` and `RetryInfo`).
    pub async fn check(&self, user: &UserId) -> Result<(), ApiError> {
        use crate::cluster::limits::Verdict;
        use governor::clock::{Clock as _, DefaultClock};
        if let Some(cluster) = &self.cluster {
            match cluster.check(user).await {
                Verdict::Allowed => return Ok(()),
                Verdict::Wait(wait) => return Err(Self::refused(wait)),
                Verdict::Unknown => {}
            }
        }
        self.local.check_key(user).map_err(|not_until| {
            Self::refused(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }
}
