//! The cluster broker: everything that crosses nodes (room events, room notices,
//! user pushes and notifications, control commands, presence) goes through it.
//! `cluster.broker = "local"` (the default) keeps it in the process
//! ([`broker_memory`]); `"redis"` links nodes that share one PostgreSQL store
//! through Redis pub/sub ([`broker_redis`], one supervised `Cluster` actor owning
//! the connections). Node-to-node messages are `roomcast.node.v1.NodeMessage`
//! (`src/proto/roomcast/node/v1/node.proto`).
//!
//! - [`broker`]: [`Topic`], [`Body`], [`Envelope`], [`Delivered`], the [`Broker`]
//!   trait and [`Bus`], this node's end of it.
//! - [`hub`]: this node's interest (topic → local consumers).
//! - [`broker_memory`], [`broker_redis`]: the two brokers.
//! - [`codec`]: envelopes to and from the node protocol.
//! - [`live_guard`]: live rooms' retries, slow mode and rate limit across nodes.
//! - [`order`]: [`RoomOrder`], how a room actor turns what arrives from every node
//!   into one gapless order (holes filled from the store, or reported as `gap` in
//!   live rooms).
//!
//! ## One delivery path
//!
//! Every publish, local or not, goes through [`Bus::publish`], which hands it to
//! this node's consumers of the topic (no network hop) and to the broker, which
//! carries it to the other nodes' consumers. The publisher gets the envelope back
//! and handles it as it handles the others' (a room actor feeds its own committed
//! events through the same [`RoomOrder`] as another node's). A node ignores its own
//! messages when Redis echoes them.
//!
//! ## Registering interest (how a consumer receives what crosses nodes)
//!
//! An actor that wants a topic implements `Handler<Delivered>` and calls
//! [`Bus::register`]`(topic, ctx.address().recipient())`, keeping the returned
//! [`Interest`] for as long as it wants the topic (dropping it unregisters; the
//! node unsubscribes from the topic's Redis channel when its last interest goes).
//! Topics: [`Topic::Room`] (events and notices of a room: the room's actor
//! registers while it is loaded), [`Topic::User`] (register while the user has
//! connections on this node), [`Topic::Control`] (every node; register once at
//! start). Publish with [`Bus::publish`]`(topic, body, None)` (or
//! `Some(&interest)` when the publisher is itself a consumer of the topic and
//! handles the returned envelope itself). A consumer also gets [`Body::Relinked`]
//! when the node relinks after a Redis fault and when its topic's subscription took
//! effect: what it may have missed is in the store (re-read it) or is lost (a live
//! room reports a `gap`). Delivery is at most once and, between nodes, may be out
//! of order: consumers that need order carry a sequence (rooms do).
//!
//! The [`Bus`] is in `AppState` (`state.bus`); its `linked()` says whether the node
//! is degraded (see `/readyz`).

pub mod broker;
pub mod broker_memory;
pub mod broker_redis;
pub mod codec;
pub mod control;
pub mod hub;
pub mod limits;
pub mod live_guard;
pub mod order;
pub mod presence;

use std::sync::Arc;

pub use broker::{
    Body, Broker, BrokerError, BrokerKind, Bus, Delivered, Envelope, Interest, Topic,
};
pub use order::RoomOrder;

use crate::settings::ClusterSettings;

/// A node id for a node whose `cluster.node_id` is empty: random, new at each start.
pub fn generate_node_id() -> String {
    format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Starts the configured broker and returns this node's bus. Must run inside an
/// actix `System` (the Redis broker starts its `Cluster` actor).
pub fn start(settings: &ClusterSettings) -> Result<Bus, BrokerError> {
    let node_id: Arc<str> = if settings.node_id.is_empty() {
        generate_node_id().into()
    } else {
        settings.node_id.as_str().into()
    };
    match BrokerKind::parse(&settings.broker) {
        Some(BrokerKind::Local) => Ok(broker_memory::MemoryBroker::bus(node_id)),
        Some(BrokerKind::Redis) => {
            tracing::info!(node = %node_id, redis = %redact(&settings.redis_url), "cluster broker: Redis pub/sub");
            broker_redis::RedisBroker::start(settings, node_id)
        }
        None => Err(BrokerError::UnknownBroker(settings.broker.clone())),
    }
}

/// Starts what carries users across nodes, on this node's `bus`: the
/// [`control::ControlListener`] (sign-outs, disconnects, notifications, access
/// changes from every node), the [`presence::PresenceBoard`], and with the Redis
/// broker the cluster-wide send limit ([`limits::ClusterRateLimit`]) and the
/// forwarding of this node's access changes to the others.
pub fn start_users(
    settings: &crate::settings::Settings,
    bus: &Bus,
    store: &crate::store::Store,
    sessions: &actix::Addr<crate::actors::session_registry::SessionRegistry>,
    polls: &actix::Addr<crate::actors::poll_hub::PollHub>,
) -> Result<
    (
        actix::Addr<presence::PresenceBoard>,
        Option<limits::ClusterRateLimit>,
    ),
    BrokerError,
> {
    use actix::Supervisor;
    use std::time::Duration;
    let (listener_bus, listener_store) = (bus.clone(), store.clone());
    let (listener_sessions, listener_polls) = (sessions.clone(), polls.clone());
    Supervisor::start(move |_| {
        control::ControlListener::new(
            listener_bus.clone(),
            listener_store.clone(),
            listener_sessions.clone(),
            listener_polls.clone(),
        )
    });
    let (board_bus, board_sessions) = (bus.clone(), sessions.clone());
    let refresh = Duration::from_millis(settings.cluster.presence_refresh_ms.max(1));
    let expiry = Duration::from_millis(settings.cluster.presence_expiry_ms.max(1));
    let board = Supervisor::start(move |_| {
        presence::PresenceBoard::new(board_bus.clone(), board_sessions.clone(), refresh, expiry)
    });
    if !bus.is_shared() {
        return Ok((board, None));
    }
    let forward_bus = bus.clone();
    store.forward_access_changes(Arc::new(move |change| {
        control::access_changed(&forward_bus, change);
    }));
    let limit = limits::ClusterRateLimit::new(
        &settings.cluster.redis_url,
        &settings.cluster.channel_prefix,
        settings.realtime.send_rate_per_sec,
        settings.realtime.send_burst,
    )
    .map_err(BrokerError::RedisUrl)?;
    Ok((board, Some(limit)))
}

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
