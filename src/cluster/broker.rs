//! The broker seam: [`Topic`], [`Envelope`] and [`Body`] (what crosses nodes),
//! [`Delivered`] (how a local consumer receives it), the [`Broker`] trait its two
//! implementations share ([`super::broker_memory::MemoryBroker`] and
//! [`super::broker_redis::RedisBroker`]), and [`Bus`], this node's end of it:
//! publish, and register interest.
//!
//! Every publish goes through [`Bus::publish`], which hands the message to every
//! local consumer with interest in its topic (at once, without a network hop) and
//! to the broker, which carries it to the other nodes; each of them hands it to its
//! own consumers the same way. So one node and many share one delivery path.

use std::sync::Arc;

use actix::{Message, Recipient};

use super::hub::Hub;
use crate::{
    ids::{RoomId, UserId},
    proto::node::v1 as node,
    protocol::RoomEvent,
};

/// What a published message is about; each topic is one Redis channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A room's events and notices: nodes with the room loaded.
    Room(RoomId),
    /// A user's pushes and notifications: nodes holding the user's connections.
    User(UserId),
    /// Commands and presence for every node.
    Control,
}

impl Topic {
    /// The Redis channel of this topic under `prefix`.
    pub fn channel(&self, prefix: &str) -> String {
        match self {
            Topic::Room(id) => format!("{prefix}room:{}", id.as_str()),
            Topic::User(id) => format!("{prefix}user:{}", id.0),
            Topic::Control => format!("{prefix}control"),
        }
    }

    /// The topic of a Redis channel under `prefix`, if it is one of ours.
    pub fn from_channel(prefix: &str, channel: &str) -> Option<Self> {
        let rest = channel.strip_prefix(prefix)?;
        if let Some(room) = rest.strip_prefix("room:") {
            return Some(Topic::Room(RoomId(room.to_owned())));
        }
        if let Some(user) = rest.strip_prefix("user:") {
            return Some(Topic::User(UserId(user.to_owned())));
        }
        (rest == "control").then_some(Topic::Control)
    }
}

/// What crosses nodes. Room events travel as the events a room actor already built
/// (encoded for clients once, shared) and are converted to the node protocol only
/// when they leave the node; the other kinds are the node protocol's messages.
#[derive(Debug, Clone)]
pub enum Body {
    /// Committed events of one room: contiguous sequences, ascending. `live`: a
    /// live room (the events are not in the store).
    RoomEvents {
        room_id: RoomId,
        events: Vec<Arc<RoomEvent>>,
        live: bool,
    },
    /// Something about a room outside its history (members, removals, updates,
    /// presence, typing).
    RoomNotice(node::RoomNotice),
    /// A push or notification for one user.
    User(node::UserMessage),
    /// A command every node acts on (disconnect a user, sign-out, revoked key, …).
    Control(node::Control),
    /// A node's share of presence.
    Presence(node::Presence),
    /// Never published: the broker hands it to every local consumer after the node
    /// was cut off from the others (Redis unreachable) and is linked again. What was
    /// published meanwhile may never arrive: re-read the store.
    Relinked,
}

/// One published message.
#[derive(Debug)]
pub struct Envelope {
    pub topic: Topic,
    /// The node that published it (`cluster.node_id`).
    pub origin: Arc<str>,
    pub body: Body,
}

/// A message of a topic the receiver registered interest in. The envelope is
/// shared by every local receiver.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Delivered(pub Arc<Envelope>);

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cluster.redis_url: {0}")]
    RedisUrl(#[source] redis::RedisError),
    #[error("cluster.broker: `{0}` is neither `local` nor `redis`")]
    UnknownBroker(String),
}

/// Which broker links this node to the others. Decide by this (or
/// [`Bus::is_shared`]), never by the name, which is for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The in-process broker: the node is alone (`cluster.broker = "local"`).
    Local,
    /// Redis pub/sub: nodes share the store and Redis (`cluster.broker = "redis"`).
    Redis,
}

impl BrokerKind {
    /// The kind a `cluster.broker` setting names, if it names one.
    pub fn parse(setting: &str) -> Option<Self> {
        match setting {
            "local" => Some(BrokerKind::Local),
            "redis" => Some(BrokerKind::Redis),
            _ => None,
        }
    }

    /// `local` or `redis`: the `cluster.broker` value (logs, metrics).
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Local => "local",
            BrokerKind::Redis => "redis",
        }
    }

    /// Whether other nodes may share this node's rooms and users.
    pub fn is_shared(self) -> bool {
        self != BrokerKind::Local
    }
}

/// What a broker implementation does beyond this node. The local half (interest
/// and delivery to this node's consumers) is the same for every implementation and
/// lives in [`Bus`].
pub trait Broker: Send + Sync + 'static {
    /// Which broker this is.
    fn kind(&self) -> BrokerKind;
    /// Carries `envelope` to the other nodes (not back to this one).
    fn send_to_others(&self, envelope: &Arc<Envelope>);
    /// This node gained its first (`true`) or lost its last (`false`) consumer of
    /// `topic`: start or stop receiving it from the other nodes.
    fn interest_changed(&self, topic: &Topic, interested: bool);
    /// Whether the node is linked to the others now (`false`: degraded, serving its
    /// local clients only).
    fn linked(&self) -> bool;
}

/// This node's end of the broker: publish, and register interest. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    node_id: Arc<str>,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    /// Live rooms' per-user rules across nodes (the Redis broker only).
    live_guard: Option<Arc<super::live_guard::LiveGuard>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("node_id", &self.node_id)
            .field("broker", &self.broker.kind().name())
            .finish()
    }
}

impl Bus {
    pub(crate) fn new(node_id: Arc<str>, hub: Arc<Hub>, broker: Arc<dyn Broker>) -> Self {
        Self {
            node_id,
            hub,
            broker,
            live_guard: None,
        }
    }

    /// This bus with `guard` for live rooms' retries, slow mode and rate limit
    /// across nodes.
    pub(crate) fn with_live_guard(mut self, guard: Arc<super::live_guard::LiveGuard>) -> Self {
        self.live_guard = Some(guard);
        self
    }

    /// Live rooms' retries, slow mode and rate limit across nodes, when nodes
    /// share rooms (`None`: each room's own rules are the whole truth).
    pub fn live_guard(&self) -> Option<&Arc<super::live_guard::LiveGuard>> {
        self.live_guard.as_ref()
    }

    /// A bus of its own with the in-process broker (one node; tests of one actor).
    pub fn local() -> Self {
        super::broker_memory::MemoryBroker::bus(super::generate_node_id().into())
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// `local` or `redis`, for logs and metrics (decide by [`Bus::kind`]).
    pub fn broker_name(&self) -> &'static str {
        self.broker.kind().name()
    }

    /// Which broker links this node to the others.
    pub fn kind(&self) -> BrokerKind {
        self.broker.kind()
    }

    /// Whether other nodes may share this node's rooms and users (the Redis
    /// broker): what a room or user holds on this node alone is then not the
    /// whole truth.
    pub fn is_shared(&self) -> bool {
        self.broker.kind().is_shared()
    }

    /// Whether the node is linked to the other nodes now (always with the local broker).
    pub fn linked(&self) -> bool {
        self.broker.linked()
    }

    /// Publishes `body` on `topic`: hands it to every local consumer with interest
    /// in the topic except `publisher` (when the publisher is a consumer itself),
    /// and to the broker for the other nodes. Returns the envelope, which the
    /// publisher handles as it handles what the others publish: the broker hands
    /// every publish back, so there is one delivery path.
    pub fn publish(&self, topic: Topic, body: Body, publisher: Option<&Interest>) -> Arc<Envelope> {
        let envelope = Arc::new(Envelope {
            topic,
            origin: self.node_id.clone(),
            body,
        });
        self.hub.dispatch(&envelope, publisher.map(|i| i.id), None);
        self.broker.send_to_others(&envelope);
        crate::metrics::metrics().cluster.published.inc();
        envelope
    }

    /// Hands [`Body::Relinked`] to every local consumer of every topic, as after a
    /// Redis fault: each re-reads what it may have missed from the store. For what
    /// notices that another node died (it may have committed events it never
    /// published: chat rooms read them from the store).
    pub fn relink_local(&self) {
        let envelope = Arc::new(Envelope {
            topic: Topic::Control,
            origin: self.node_id.clone(),
            body: Body::Relinked,
        });
        self.hub.dispatch_all(&envelope);
    }

    /// Hands [`Body::Relinked`] to every local consumer of a room topic: every
    /// loaded room reads the store past the last sequence it delivered (one query
    /// per loaded chat room; live rooms keep nothing in the store and ignore it).
    /// For when another node died or was cut off: it may have committed events it
    /// never published. Answers how many rooms were asked.
    pub fn recheck_rooms(&self) -> usize {
        let envelope = Arc::new(Envelope {
            topic: Topic::Control,
            origin: self.node_id.clone(),
            body: Body::Relinked,
        });
        let mut rooms = 0;
        for topic in self.hub.topics() {
            if matches!(topic, Topic::Room(_)) {
                rooms += self.hub.dispatch(&envelope, None, Some(&topic));
            }
        }
        rooms
    }

    /// Registers `recipient` for `topic`: it gets a [`Delivered`] for every message
    /// published on it, by this node or another, until the returned [`Interest`] is
    /// dropped. The first interest in a topic subscribes the node to it.
    pub fn register(&self, topic: Topic, recipient: Recipient<Delivered>) -> Interest {
        let (id, first) = self.hub.register(&topic, recipient);
        if first {
            self.broker.interest_changed(&topic, true);
        }
        Interest {
            id,
            topic,
            hub: self.hub.clone(),
            broker: self.broker.clone(),
        }
    }
}

/// A registered interest in a topic; dropping it unregisters (and unsubscribes the
/// node when it was the topic's last).
pub struct Interest {
    id: u64,
    topic: Topic,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
}

impl Interest {
    /// The topic registered for.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }
}

impl std::fmt::Debug for Interest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interest")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .finish()
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        if self.hub.unregister(&self.topic, self.id) {
            self.broker.interest_changed(&self.topic, false);
        }
    }
}
