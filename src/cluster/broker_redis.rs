//! [`RedisBroker`] and the [`Cluster`] actor (supervised) that owns this node's two
//! Redis connections: a publisher (multiplexed; what this node publishes goes out
//! in pipelines of `PUBLISH`, in order) and a pub/sub connection, split into a sink
//! that subscribes to a topic's channel when local interest in it appears (and
//! unsubscribes when it goes) and a stream of what the other nodes publish, handed
//! to this node's consumers through the [`Hub`].
//!
//! Faults: when either connection fails (or a `PING` goes unanswered), the node is
//! degraded: it keeps serving its local clients, drops what it would send to the
//! others (they fill holes from the store), and reconnects with a doubling backoff
//! between `cluster.reconnect_min_ms` and `cluster.reconnect_max_ms`. Once linked
//! again it subscribes to every topic with local interest and hands
//! [`Body::Relinked`] to every consumer, which re-reads what it may have missed
//! from the store. A topic newly subscribed gets `Relinked` too, once Redis
//! confirmed the subscription, closing the window between a room loading from the
//! store and its subscription taking effect.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::{
    fut::WrapFuture as _, Actor, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler,
    Message, Supervised, Supervisor,
};
use bytes::Bytes;
use futures_util::StreamExt as _;
use redis::aio::{MultiplexedConnection, PubSubSink};

use super::{
    broker::{Body, Broker, BrokerKind, Bus, Envelope, Topic},
    codec,
    hub::Hub,
};
use crate::settings::ClusterSettings;

/// Messages waiting to be published; more are dropped (receivers fill holes from
/// the store) rather than growing without bound while Redis is slow.
const OUTBOX_LIMIT: usize = 65_536;
/// Most `PUBLISH` commands in one pipeline.
const PIPELINE_MAX: usize = 512;
/// How often the publisher connection is checked with a `PING`.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// How long a `PING`, a connection attempt or a subscription may take before the
/// link counts as lost.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The broker linking nodes through Redis pub/sub.
pub struct RedisBroker {
    cluster: Addr<Cluster>,
    prefix: Arc<str>,
    linked: Arc<AtomicBool>,
}

impl RedisBroker {
    /// Starts the [`Cluster`] actor (it connects in the background; the node is
    /// degraded until it has) and returns the bus. Must run inside an actix `System`.
    pub fn start(
        settings: &ClusterSettings,
        node_id: Arc<str>,
    ) -> Result<Bus, super::broker::BrokerError> {
        let client = redis::Client::open(settings.redis_url.as_str())
            .map_err(super::broker::BrokerError::RedisUrl)?;
        let hub = Arc::new(Hub::default());
        let linked = Arc::new(AtomicBool::new(false));
        crate::metrics::metrics().cluster.degraded.set(1);
        let prefix: Arc<str> = settings.channel_prefix.as_str().into();
        let actor_settings = settings.clone();
        let actor_hub = hub.clone();
        let actor_linked = linked.clone();
        let actor_node = node_id.clone();
        let actor_prefix = prefix.clone();
        let cluster = Supervisor::start(move |_| Cluster {
            backoff: Duration::from_millis(actor_settings.reconnect_min_ms),
            settings: actor_settings,
            node_id: actor_node,
            prefix: actor_prefix,
            client,
            hub: actor_hub,
            linked: actor_linked,
            link: None,
            generation: 0,
            connecting: false,
            subscribed: HashSet::new(),
            dirty: HashSet::new(),
            reconciling: false,
            outbox: VecDeque::new(),
            sending: false,
            ever_linked: false,
        });
        let broker = RedisBroker {
            cluster,
            prefix,
            linked,
        };
        let guard = super::live_guard::LiveGuard::new(
            &settings.redis_url,
            &settings.channel_prefix,
            Duration::from_millis(settings.live_retry_window_ms.max(1)),
        )
        .map_err(super::broker::BrokerError::RedisUrl)?;
        Ok(Bus::new(node_id, hub, Arc::new(broker)).with_live_guard(Arc::new(guard)))
    }
}

impl Broker for RedisBroker {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Redis
    }

    fn send_to_others(&self, envelope: &Arc<Envelope>) {
        let Some(payload) = codec::encode(envelope) else {
            return;
        };
        self.cluster.do_send(Outgoing {
            channel: envelope.topic.channel(&self.prefix),
            payload,
        });
    }

    fn interest_changed(&self, topic: &Topic, _interested: bool) {
        // The actor compares the hub's interest with its subscriptions, so that a
        // quick unsubscribe-subscribe pair can never end unsubscribed.
        self.cluster.do_send(Reconcile {
            topic: topic.clone(),
        });
    }

    fn linked(&self) -> bool {
        self.linked.load(Ordering::Acquire)
    }
}

/// One message for the other nodes.
#[derive(Message)]
#[rtype(result = "()")]
struct Outgoing {
    channel: String,
    payload: Bytes,
}

/// Local interest in a topic changed.
#[derive(Message)]
#[rtype(result = "()")]
struct Reconcile {
    topic: Topic,
}

/// The two connections of one link.
struct Link {
    publisher: MultiplexedConnection,
    sink: PubSubSink,
}

/// Owns the Redis connections of this node. See the module docs.
pub struct Cluster {
    settings: ClusterSettings,
    node_id: Arc<str>,
    prefix: Arc<str>,
    client: redis::Client,
    hub: Arc<Hub>,
    linked: Arc<AtomicBool>,
    link: Option<Link>,
    /// Counts links; what a lost link's futures report afterwards is ignored.
    generation: u64,
    connecting: bool,
    backoff: Duration,
    /// Channels Redis confirmed we subscribe to on the current link.
    subscribed: HashSet<String>,
    /// Topics whose interest changed since the last reconciliation.
    dirty: HashSet<Topic>,
    reconciling: bool,
    outbox: VecDeque<(String, Bytes)>,
    sending: bool,
    ever_linked: bool,
}

impl Cluster {
    /// Opens both connections and subscribes to every topic with local interest.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.connecting || self.link.is_some() {
            return;
        }
        self.connecting = true;
        let client = self.client.clone();
        let topics = self.hub.topics();
        let channels: Vec<String> = topics.iter().map(|t| t.channel(&self.prefix)).collect();
        let wanted = channels.clone();
        let attempt = async move {
            let publisher = client.get_multiplexed_async_connection().await?;
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            if !wanted.is_empty() {
                sink.subscribe(wanted).await?;
            }
            Ok::<_, redis::RedisError>((publisher, sink, stream))
        };
        ctx.spawn(
            async move {
                tokio::time::timeout(REDIS_TIMEOUT, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::IoError,
                            "timed out",
                        )))
                    })
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.connecting = false;
                match result {
                    Ok((publisher, sink, stream)) => {
                        act.linked_up(publisher, sink, stream, channels, topics, ctx)
                    }
                    Err(e) => {
                        if act.ever_linked || act.backoff.as_millis() as u64 == act.settings.reconnect_min_ms {
                            tracing::warn!(node = %act.node_id, error = %e, retry_in_ms = act.backoff.as_millis() as u64, "cannot reach Redis; node degraded (serving its local clients only)");
                        } else {
                            tracing::debug!(node = %act.node_id, error = %e, "cannot reach Redis yet");
                        }
                        act.retry_later(ctx);
                    }
                }
            }),
        );
    }

    fn retry_later(&mut self, ctx: &mut Context<Self>) {
        let wait = self.backoff;
        self.backoff =
            (self.backoff * 2).min(Duration::from_millis(self.settings.reconnect_max_ms));
        ctx.run_later(wait, |act, ctx| act.connect(ctx));
    }

    fn linked_up(
        &mut self,
        publisher: MultiplexedConnection,
        sink: PubSubSink,
        stream: redis::aio::PubSubStream,
        channels: Vec<String>,
        topics: Vec<Topic>,
        ctx: &mut Context<Self>,
    ) {
        self.generation += 1;
        let generation = self.generation;
        self.link = Some(Link { publisher, sink });
        self.subscribed = channels.into_iter().collect();
        self.backoff = Duration::from_millis(self.settings.reconnect_min_ms);
        self.linked.store(true, Ordering::Release);
        let m = &crate::metrics::metrics().cluster;
        m.degraded.set(0);
        if self.ever_linked {
            m.reconnects.inc();
            tracing::info!(node = %self.node_id, topics = topics.len(), "Redis link restored; node no longer degraded; filling holes from the store");
        } else {
            tracing::info!(node = %self.node_id, "linked to the other nodes through Redis");
        }
        self.ever_linked = true;
        // What the others published while we were not subscribed may be lost:
        // every consumer re-reads the store (topics that gained interest meanwhile
        // are reconciled below and get theirs then).
        let relinked = Arc::new(Envelope {
            topic: Topic::Control,
            origin: self.node_id.clone(),
            body: Body::Relinked,
        });
        for topic in &topics {
            self.hub.dispatch(&relinked, None, Some(topic));
        }
        // Topics whose interest changed while connecting.
        self.dirty.extend(self.hub.topics());
        self.dirty.extend(topics);
        self.reconcile(ctx);
        // Deliver what the others publish.
        let hub = self.hub.clone();
        let prefix = self.prefix.clone();
        let me = self.node_id.clone();
        ctx.spawn(
            async move {
                let mut stream = stream;
                while let Some(msg) = stream.next().await {
                    receive(
                        &hub,
                        &prefix,
                        &me,
                        msg.get_channel_name(),
                        msg.get_payload_bytes(),
                    );
                }
            }
            .into_actor(self)
            .map(move |(), act, ctx| {
                act.lost(generation, "the subscription connection closed", ctx)
            }),
        );
        self.pump(ctx);
    }

    /// The link failed: degrade, and reconnect after the backoff.
    fn lost(&mut self, generation: u64, why: &str, ctx: &mut Context<Self>) {
        if generation != self.generation || self.link.is_none() {
            return;
        }
        self.link = None;
        self.generation += 1;
        self.subscribed.clear();
        self.linked.store(false, Ordering::Release);
        self.sending = false;
        let dropped = self.outbox.len();
        self.outbox.clear();
        let m = &crate::metrics::metrics().cluster;
        m.dropped.inc_by(dropped as u64);
        m.degraded.set(1);
        tracing::warn!(node = %self.node_id, reason = why, dropped, "Redis link lost; node degraded (serving its local clients only); reconnecting");
        self.retry_later(ctx);
    }

    /// Sends what waits in the outbox, one pipeline at a time (so in order).
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.sending || self.outbox.is_empty() {
            return;
        }
        let Some(link) = &self.link else {
            return;
        };
        let mut publisher = link.publisher.clone();
        let take = self.outbox.len().min(PIPELINE_MAX);
        let mut pipe = redis::pipe();
        for (channel, payload) in self.outbox.drain(..take) {
            pipe.cmd("PUBLISH")
                .arg(channel)
                .arg(payload.as_ref())
                .ignore();
        }
        self.sending = true;
        let generation = self.generation;
        ctx.spawn(
            async move {
                tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(&mut publisher)).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                if generation != act.generation {
                    return;
                }
                act.sending = false;
                match result {
                    Ok(Ok(())) => act.pump(ctx),
                    Ok(Err(e)) => {
                        crate::metrics::metrics()
                            .cluster
                            .dropped
                            .inc_by(take as u64);
                        act.lost(generation, &format!("publish failed: {e}"), ctx)
                    }
                    Err(_) => {
                        crate::metrics::metrics()
                            .cluster
                            .dropped
                            .inc_by(take as u64);
                        act.lost(generation, "publish timed out", ctx)
                    }
                }
            }),
        );
    }

    /// Subscribes to the dirty topics that have local interest and unsubscribes
    /// from those that lost it, one batch at a time.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        if self.reconciling || self.dirty.is_empty() {
            return;
        }
        let Some(link) = &self.link else {
            return;
        };
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        for topic in self.dirty.drain() {
            let channel = topic.channel(&self.prefix);
            let wanted = self.hub.interested(&topic);
            let has = self.subscribed.contains(&channel);
            if wanted && !has {
                subscribe.push((topic, channel));
            } else if !wanted && has {
                unsubscribe.push(channel);
            }
        }
        if subscribe.is_empty() && unsubscribe.is_empty() {
            return;
        }
        self.reconciling = true;
        let mut sink = link.sink.clone();
        let generation = self.generation;
        let sub_channels: Vec<String> = subscribe.iter().map(|(_, c)| c.clone()).collect();
        let unsub_channels = unsubscribe.clone();
        ctx.spawn(
            async move {
                let work = async {
                    if !sub_channels.is_empty() {
                        sink.subscribe(sub_channels).await?;
                    }
                    if !unsub_channels.is_empty() {
                        sink.unsubscribe(unsub_channels).await?;
                    }
                    Ok::<_, redis::RedisError>(())
                };
                tokio::time::timeout(REDIS_TIMEOUT, work).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                if generation != act.generation {
                    return;
                }
                act.reconciling = false;
                match result {
                    Ok(Ok(())) => {
                        for channel in unsubscribe {
                            act.subscribed.remove(&channel);
                        }
                        let relinked = Arc::new(Envelope {
                            topic: Topic::Control,
                            origin: act.node_id.clone(),
                            body: Body::Relinked,
                        });
                        for (topic, channel) in subscribe {
                            act.subscribed.insert(channel);
                            // Subscribed now: whatever was published before is in
                            // the store (or, for a live room, a gap).
                            act.hub.dispatch(&relinked, None, Some(&topic));
                        }
                        act.reconcile(ctx);
                    }
                    Ok(Err(e)) => act.lost(generation, &format!("subscribe failed: {e}"), ctx),
                    Err(_) => act.lost(generation, "subscribe timed out", ctx),
                }
            }),
        );
    }

    fn ping(&mut self, ctx: &mut Context<Self>) {
        let Some(link) = &self.link else {
            return;
        };
        let mut publisher = link.publisher.clone();
        let generation = self.generation;
        ctx.spawn(
            async move {
                tokio::time::timeout(
                    REDIS_TIMEOUT,
                    redis::cmd("PING").query_async::<String>(&mut publisher),
                )
                .await
            }
            .into_actor(self)
            .map(move |result, act, ctx| match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => act.lost(generation, &format!("PING failed: {e}"), ctx),
                Err(_) => act.lost(generation, "PING timed out", ctx),
            }),
        );
    }
}

/// Hands a message from another node to this node's consumers.
fn receive(hub: &Hub, prefix: &str, me: &str, channel: &str, payload: &[u8]) {
    let Some(topic) = Topic::from_channel(prefix, channel) else {
        return;
    };
    match codec::decode(topic, payload) {
        // This node delivered its own publishes when it made them.
        Ok(envelope) if &*envelope.origin == me => {}
        Ok(envelope) => {
            crate::metrics::metrics().cluster.received.inc();
            hub.dispatch(&Arc::new(envelope), None, None);
        }
        Err(e) => {
            tracing::warn!(channel, error = %e, "dropped a message from another node that does not decode");
        }
    }
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Large fan-out rooms publish often: never refuse a publish for the mailbox.
        ctx.set_mailbox_capacity(usize::MAX);
        self.connect(ctx);
        ctx.run_interval(PING_INTERVAL, |act, ctx| act.ping(ctx));
    }
}

impl Supervised for Cluster {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::warn!(node = %self.node_id, "cluster actor restarting; relinking to Redis");
        self.link = None;
        self.generation += 1;
        self.connecting = false;
        self.sending = false;
        self.reconciling = false;
        self.subscribed.clear();
        self.linked.store(false, Ordering::Release);
        crate::metrics::metrics().cluster.degraded.set(1);
    }
}

impl Handler<Outgoing> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Outgoing, ctx: &mut Self::Context) {
        if self.link.is_none() || self.outbox.len() >= OUTBOX_LIMIT {
            // The receivers see the hole by sequence and fill it from the store.
            crate::metrics::metrics().cluster.dropped.inc();
            return;
        }
        self.outbox.push_back((msg.channel, msg.payload));
        self.pump(ctx);
    }
}

impl Handler<Reconcile> for Cluster {
    type Result = ();

    fn handle(&mut self, msg: Reconcile, ctx: &mut Self::Context) {
        self.dirty.insert(msg.topic);
        self.reconcile(ctx);
    }
}
