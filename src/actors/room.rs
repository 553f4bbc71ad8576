//! [`RoomActor`]: one per active room, under `actix::Supervisor`. It serialises the
//! room's writes (group commit: every append waiting while a commit runs goes into
//! the next transaction), keeps the last sequence and a ring of recent events, and
//! fans committed events out to the room's local subscribers, each event encoded
//! once per codec and shared.
//!
//! A subscriber whose bounded queue is full is not waited for: it is removed and
//! told it lagged, and its connection catches up from the store and subscribes
//! again. When the actor restarts (a crash or [`Restart`]), it reloads its state
//! from the store and tells every subscriber to resynchronise from the last event
//! it delivered, so nothing committed is ever skipped. A panic inside its commit
//! future is a crash too: it stops the actor, and its supervisor restarts it.
//!
//! The ring serves the same state as the store: an edit or deletion also changes
//! the ring's copy of its target. The room remembers whom it saw removed (kicked,
//! banned, left) and refuses a subscription whose access was checked before that.
//! A commit that fails for a batch is retried one message at a time, so one bad
//! message fails alone; the queue of appends waiting for a commit is bounded.
//!
//! Across nodes (see [`crate::cluster`]): committed events go out through the
//! cluster broker and come back, from this node and the others, through
//! [`RoomOrder`], which delivers each sequence once and in order, reading holes
//! from the store (or, in a live room, reporting them as a `gap` after a short
//! hold-back).
//!
//! A live room (see [`super::live_state`]) keeps its comments in the ring only: it
//! numbers them from a block of sequence numbers reserved in the store, answers
//! the sender at once, applies the host controls, pushes a viewer count at an
//! interval instead of presence and join/leave events, and moves a subscriber that
//! lags to the ring's tail with a `gap` instead of a catch-up from the store.
//!
//! Coalescing: a room that delivered within its window (adaptive, see
//! [`super::live_state::AdaptiveWindow`]: between `rooms.live.coalesce_min_ms` and
//! `rooms.live.coalesce_ms` for live rooms, `realtime.coalesce_window_ms` and
//! `realtime.coalesce_max_ms` for chat rooms) collects events until the window
//! ends and hands each subscriber one [`EventBatch`]; the batch is encoded once
//! per codec (as single frames and as one `batch` frame) and the bytes are shared
//! by every subscriber. A busy room's subscribers take turns (see
//! [`RoomActor::flush_turn`]), so its writes spread over the window.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, Addr, AsyncContext as _,
    Context, Handler, Message, Recipient, ResponseActFuture, ResponseFuture, SpawnHandle,
    Supervised,
};
use tokio::sync::oneshot;

use super::{
    fanout_shard::{
        AddSubscriber, DeliverBatch, DropRoom, FanoutShard, QueuedBatch, RemoveSubscriber,
        ShardLagged, Turn,
    },
    live_state::{AdaptiveWindow, LiveState},
    poll_hub::HUB_SUBSCRIBER,
    supervision::{catch_panic, guarded},
};
use crate::{
    cluster::{
        order::{Fill, Step, FILL_PAGE},
        Body, Bus, Delivered, Envelope, Interest, RoomOrder, Topic,
    },
    error::{ApiError, Code},
    ids::{now_ms, RoomId, UserId},
    model::{MessageKind, RoomKind},
    proto::node::v1 as node,
    proto::v1 as pb,
    protocol::{FrameCodec, RoomEvent, SharedFrame, WireFrame},
    settings::{Coalescing, Settings},
    store::{
        AppendRejection, Appended, LiveControlsRecord, MessageRecord, NewMessage, Store, StoreError,
    },
};

/// Identifies one connection (unique within this process).
pub type ConnectionId = u64;

/// How often an idle room checks whether it may retire (at most; shorter when
/// `rooms.idle_stop_secs` is shorter).
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The message of the error a room answers with while it restarts.
const RESTARTING_MESSAGE: &str = "room restarted; retry with the same client_message_id";

/// The message of the error a retired room answers with.
const RETIRED_MESSAGE: &str = "room actor retired; retry";

/// How long a room remembers that a user was removed, to refuse a subscription
/// whose access check started before the removal (checks take milliseconds).
const REMOVAL_MEMORY: Duration = Duration::from_secs(120);

/// How long a room waits before reading a hole from the store again after the
/// read failed.
const FILL_RETRY: Duration = Duration::from_millis(250);

/// Whether `error` came from a retired room actor: ask the registry again.
pub fn is_retired(error: &ApiError) -> bool {
    error.message == RETIRED_MESSAGE
}

/// Bytes queued for one connection but not yet written; shared by the rooms that
/// feed it and the connection that drains it.
#[derive(Debug)]
pub struct OutboundGauge {
    bytes: AtomicUsize,
    limit: usize,
}

impl OutboundGauge {
    pub fn new(limit: usize) -> Self {
        Self {
            bytes: AtomicUsize::new(0),
            limit,
        }
    }

    /// Reserves `n` bytes; false when that would pass the limit.
    pub fn try_reserve(&self, n: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                let next = cur.saturating_add(n);
                (next <= self.limit || cur == 0).then_some(next)
            })
            .is_ok()
    }

    /// Adds `n` bytes however full the gauge is: bytes already committed to the
    /// connection (queued for its socket) that the room must see.
    pub fn charge(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    /// Returns `n` bytes once written (or dropped).
    pub fn release(&self, n: usize) {
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_sub(n))
            });
    }
}

/// Committed events of one room, in sequence order (contiguous), shared by every
/// subscriber.
#[derive(Debug)]
pub struct EventBatch {
    pub room_id: RoomId,
    pub events: Vec<Arc<RoomEvent>>,
    /// The events as one `batch` frame, per codec, encoded on first use.
    json: OnceLock<WireFrame>,
    proto: OnceLock<WireFrame>,
}

impl EventBatch {
    pub fn new(room_id: RoomId, events: Vec<Arc<RoomEvent>>) -> Self {
        Self {
            room_id,
            events,
            json: OnceLock::new(),
            proto: OnceLock::new(),
        }
    }

    /// Whether a subscription that asked for batches gets this one as one frame:
    /// it holds more than one event.
    pub fn sends_as_batch(&self, batch: bool) -> bool {
        batch && self.events.len() > 1
    }

    /// The events as one `batch` frame in `codec` (encoded once, then shared).
    pub fn batch_wire(&self, codec: FrameCodec) -> WireFrame {
        let cell = match codec {
            FrameCodec::Json => &self.json,
            FrameCodec::Proto => &self.proto,
        };
        cell.get_or_init(|| {
            crate::protocol::encode_batch(
                self.room_id.as_str(),
                self.events.iter().map(|e| &e.frame),
                codec,
            )
        })
        .clone()
    }

    /// Bytes the batch takes on a connection using `codec`, as one `batch` frame
    /// or as single frames (encodes on first use).
    pub(crate) fn wire_len(&self, codec: FrameCodec, batch: bool) -> usize {
        if self.sends_as_batch(batch) {
            self.batch_wire(codec).len()
        } else {
            self.events.iter().map(|e| e.frame.wire(codec).len()).sum()
        }
    }
}

/// What a room sends to a subscribed connection.
#[derive(Message)]
#[rtype(result = "()")]
pub enum RoomPush {
    /// Committed events; `bytes` were reserved on the gauge.
    Events {
        batch: Arc<EventBatch>,
        bytes: usize,
    },
    /// A push that is not part of the history (typing, presence, members, room updates).
    Notice {
        room_id: RoomId,
        frame: Arc<SharedFrame>,
        bytes: usize,
    },
    /// The subscription was dropped because the connection's queue was full.
    /// `tail`: a live room, which moves the subscriber to its newest event with a
    /// `gap` (subscribe again with [`Subscribe::tail`]) instead of a catch-up.
    Lagged { room_id: RoomId, tail: bool },
    /// The room restarted: subscribe again from the last delivered event.
    Resync { room_id: RoomId },
    /// The user may no longer read the room; the subscription has ended.
    Removed {
        room_id: RoomId,
        frame: Arc<SharedFrame>,
    },
}

/// A connection's subscription as the room keeps it.
#[derive(Clone)]
pub struct Subscriber {
    pub conn_id: ConnectionId,
    pub user_id: UserId,
    pub codec: FrameCodec,
    pub addr: Recipient<RoomPush>,
    pub gauge: Arc<OutboundGauge>,
    /// The subscription takes `batch` frames (a `+batch` subprotocol).
    pub batch: bool,
    /// The fan-out shard of the connection's arbiter, which delivers the room's
    /// batches to it; `None`: the room delivers them itself.
    pub shard: Option<Addr<FanoutShard>>,
    /// Set by the room when it registers the subscription (unique per room).
    pub registration: u64,
}

/// Appends one event; answered after commit.
#[derive(Message)]
#[rtype(result = "Result<Appended, ApiError>")]
pub struct Append {
    pub message: NewMessage,
    /// The sender is one of the room's hosts (owner, moderator, server admin, or the
    /// server publish API): exempt from a live room's host-only mode, slow mode and
    /// rate limit.
    pub host: bool,
}

/// Starts delivery to a subscriber, replaying what came after `since`.
#[derive(Message)]
#[rtype(result = "Result<SubscribeReply, ApiError>")]
pub struct Subscribe {
    pub subscriber: Subscriber,
    /// `None`: live only.
    pub since: Option<u64>,
    /// When the subscriber's read access was last checked (just before this): a
    /// user the room saw removed after that is refused.
    pub access_checked_at: Instant,
    /// An anonymous viewer: only live rooms that allow them accept it.
    pub anonymous: bool,
    /// The subscriber lagged: a live room moves it to its newest event (a `gap`
    /// covers the rest) instead of replaying its ring.
    pub tail: bool,
}

/// The answer to [`Subscribe`].
#[derive(Debug)]
pub enum SubscribeReply {
    /// Registered: `replay` holds every event after `since` up to `last_seq`,
    /// except the range `gap` (inclusive) that a live room no longer holds, which
    /// comes before the replay; live delivery continues after `last_seq`.
    Live {
        last_seq: u64,
        gap: Option<(u64, u64)>,
        replay: Vec<Arc<RoomEvent>>,
    },
    /// Not registered: events after `since` up to `last_seq` are no longer in memory;
    /// read them from the store, then subscribe again with `since = last_seq`.
    Behind { last_seq: u64 },
}

/// Ends a subscription.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub conn_id: ConnectionId,
}

/// Relays a push that is not stored (typing) to every subscriber but one connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Relay {
    pub frame: pb::ServerFrame,
    pub except: Option<ConnectionId>,
}

/// Something about the room changed outside the history.
#[derive(Debug, Clone)]
pub enum RoomNotice {
    /// Joined, left, role changed, muted, invited: pushed to every subscriber.
    Member(pb::MemberEvent),
    /// The user may no longer read the room (kicked, banned, left): their
    /// subscriptions end with a `removed` frame.
    Removed {
        user_id: UserId,
        reason: pb::RemovedReason,
        message: String,
    },
    /// Title, topic or retention changed.
    /// (Boxed: a room with a pinned message is large.)
    Updated(Box<pb::Room>),
    /// A member came online or went offline. `version` orders the changes of one
    /// user: a notice older than one already delivered is dropped.
    Presence {
        user_id: UserId,
        online: bool,
        version: u64,
    },
}

/// Delivers a [`RoomNotice`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Notify(pub RoomNotice);

/// Stops the actor so that its supervisor restarts it from the store (operations
/// and tests use it to prove that a restart loses nothing).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Restart;

/// Asks an idle room to retire; true when it did (it then answers everything with
/// a retry error until its last address is dropped).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Retire;

/// Pins a message of a live room (`seq` 0 unpins); answered with the pinned
/// message once stored.
#[derive(Message)]
#[rtype(result = "Result<Option<pb::Message>, ApiError>")]
pub struct Pin {
    pub seq: u64,
}

/// A live room's controls changed (UpdateLiveControls stored them).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ControlsChanged {
    pub controls: LiveControlsRecord,
}

/// Asks a room for what only it knows about itself (GetRoom of a live room).
#[derive(Message)]
#[rtype(result = "Result<LiveSnapshot, ApiError>")]
pub struct GetLiveSnapshot;

/// A live room as its actor sees it now.
#[derive(Debug, Clone)]
pub struct LiveSnapshot {
    /// Whether the room is live at all.
    pub live: bool,
    /// The newest sequence given out.
    pub last_seq: u64,
    pub pinned: Option<pb::Message>,
    pub viewers: u32,
    /// Fan-out shards (HTTP worker arbiters) holding some of its subscribers.
    pub shards: usize,
}

/// Tells the registry that the room retired (it retires on its own once idle).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomIdle {
    pub room_id: RoomId,
}

/// Set once a room actor retired; shared with the registry, so that it never hands
/// out a retired room without a round trip to it.
pub type RetiredFlag = Arc<AtomicBool>;

/// Test-only faults (compiled with the `fault-injection` feature, which only the
/// test suite enables): they prove that a store fault or a panic in the middle of
/// the room's work loses nothing.
#[cfg(feature = "fault-injection")]
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum InjectFault {
    /// The next group commit's future panics before it reaches the store.
    PanicInNextCommit,
    /// The next group commit waits this long before it starts (so that appends
    /// pile up into one batch behind it).
    DelayNextCommit(Duration),
    /// The next group commit waits this long after the store committed it, before
    /// the room learns of it: the store shows events the room has not published.
    DelayAfterNextCommit(Duration),
    /// Every commit of a batch holding a message with this text fails as a store
    /// fault would (the transaction stores nothing).
    FailCommitsWithText(String),
    /// The next `Subscribe` finds the room retired, as if it retired an instant
    /// before.
    RetireOnNextSubscribe,
    /// The handler of this message panics.
    PanicInHandler,
}

#[cfg(feature = "fault-injection")]
#[derive(Default)]
struct Faults {
    panic_next_commit: bool,
    delay_next_commit: Option<Duration>,
    delay_after_next_commit: Option<Duration>,
    fail_text: Option<String>,
    retire_on_subscribe: bool,
}

type PendingAppend = (NewMessage, oneshot::Sender<Result<Appended, ApiError>>);

/// A subscription waiting for events this room has not delivered yet, and the
/// store catch-up it waits for (none while the room's own commit is finishing).
type Deferred = (
    Subscribe,
    oneshot::Sender<Result<SubscribeReply, ApiError>>,
    Option<u64>,
);

/// One room's live state.
pub struct RoomActor {
    id: RoomId,
    store: Store,
    settings: Arc<Settings>,
    registry: Option<Recipient<RoomIdle>>,
    kind: Option<RoomKind>,
    /// The sequence of the newest committed event.
    last_seq: u64,
    /// Committed events `last_seq - ring.len() + 1 ..= last_seq`, contiguous.
    ring: VecDeque<Arc<RoomEvent>>,
    subscribers: HashMap<ConnectionId, Subscriber>,
    /// This room's share of the `roomcast_subscriptions` gauge.
    subscriptions_gauge: crate::metrics::GaugeShare,
    /// A live room's share of the `roomcast_live_viewers` gauge.
    viewers_gauge: crate::metrics::GaugeShare,
    pending: VecDeque<PendingAppend>,
    writing: bool,
    /// Appends still to be committed one at a time, because the batch they were
    /// in failed: one bad message must not fail the others.
    isolate: usize,
    /// Users removed from the room (kicked, banned, left), and when.
    removals: HashMap<UserId, Instant>,
    /// The newest presence version delivered per user.
    presence: HashMap<UserId, u64>,
    /// Set when loading failed; every request is answered with it.
    broken: Option<ApiError>,
    retired: bool,
    /// `retired`, shared with the registry.
    retired_flag: RetiredFlag,
    idle_since: Instant,
    idle_timer: Option<SpawnHandle>,
    /// Committed events not yet delivered (coalescing window).
    outbox: Vec<Arc<RoomEvent>>,
    /// When the outbox was last delivered.
    last_flush: Instant,
    /// Set while a delayed outbox delivery is scheduled.
    flush_timer: Option<SpawnHandle>,
    /// The coalescing window, following the room's load.
    window: AdaptiveWindow,
    /// The next turn of a live room whose subscribers take turns (see
    /// [`RoomActor::flush_turn`]).
    turn: usize,
    /// Turns still to come before every group had its turn since the last events.
    owed_turns: usize,
    /// Set for a live room.
    live: Option<LiveState>,
    /// The viewer count push of a live room.
    viewer_timer: Option<SpawnHandle>,
    /// The fan-out shards holding some of the subscribers, with how many each.
    shards: HashMap<Addr<FanoutShard>, usize>,
    next_registration: u64,
    /// Subscriptions from a sequence the store already shows but this room has not
    /// delivered yet (its commit is finishing, or another node committed it):
    /// answered once it has, with the catch-up ticket they wait for (see
    /// [`RoomOrder::want_catch_up`]).
    deferred: Vec<Deferred>,
    /// The cluster broker: committed events go out through it and come back (from
    /// this node and the others) through [`RoomActor::on_envelope`].
    bus: Bus,
    /// This room's interest in its topic, while loaded.
    interest: Option<Interest>,
    /// What arrives from the broker, put in one gapless order (see
    /// [`crate::cluster::order`]).
    order: RoomOrder,
    /// Live rooms across nodes: reads of the store's sequence counter started and
    /// finished, for resumes from a sequence this node has not received yet (a
    /// deferred subscription waits for the read numbered by its ticket).
    counter_reads: (u64, u64),
    /// The newest counter read that failed: a subscription waiting on it is
    /// answered `unavailable` (the client retries), never `out_of_range`.
    counter_failed: u64,
    #[cfg(feature = "fault-injection")]
    faults: Faults,
}

impl RoomActor {
    pub fn new(
        id: RoomId,
        store: Store,
        settings: Arc<Settings>,
        registry: Option<Recipient<RoomIdle>>,
        retired_flag: RetiredFlag,
    ) -> Self {
        Self {
            id,
            store,
            settings,
            registry,
            kind: None,
            last_seq: 0,
            ring: VecDeque::new(),
            subscribers: HashMap::new(),
            subscriptions_gauge: crate::metrics::GaugeShare::subscriptions(),
            viewers_gauge: crate::metrics::GaugeShare::live_viewers(),
            pending: VecDeque::new(),
            writing: false,
            isolate: 0,
            removals: HashMap::new(),
            presence: HashMap::new(),
            broken: None,
            retired: false,
            retired_flag,
            idle_since: Instant::now(),
            idle_timer: None,
            outbox: Vec::new(),
            last_flush: Instant::now(),
            flush_timer: None,
            window: AdaptiveWindow::default(),
            turn: 0,
            owed_turns: 0,
            live: None,
            viewer_timer: None,
            shards: HashMap::new(),
            next_registration: 1,
            deferred: Vec::new(),
            bus: Bus::local(),
            interest: None,
            order: RoomOrder::new(0, false, Duration::ZERO),
            counter_reads: (0, 0),
            counter_failed: 0,
            #[cfg(feature = "fault-injection")]
            faults: Faults::default(),
        }
    }

    /// Publishes and receives the room's events through `bus` (default: an
    /// in-process broker of its own).
    pub fn with_bus(mut self, bus: Bus) -> Self {
        self.bus = bus;
        self
    }

    /// Registers a subscriber (replacing an earlier one of its connection), with
    /// its shard when it has one.
    fn add_subscriber(&mut self, mut sub: Subscriber) {
        self.remove_subscriber(sub.conn_id);
        sub.registration = self.next_registration;
        self.next_registration += 1;
        if let Some(shard) = &sub.shard {
            *self.shards.entry(shard.clone()).or_default() += 1;
            shard.do_send(AddSubscriber {
                room_id: self.id.clone(),
                subscriber: sub.clone(),
                groups: self.configured_groups(),
            });
        }
        self.subscribers.insert(sub.conn_id, sub);
        self.subscriptions_gauge.set(self.subscribers.len());
    }

    /// Ends a subscription, at its shard too.
    fn remove_subscriber(&mut self, conn_id: ConnectionId) -> Option<Subscriber> {
        let sub = self.subscribers.remove(&conn_id)?;
        if let Some(shard) = &sub.shard {
            shard.do_send(RemoveSubscriber {
                room_id: self.id.clone(),
                conn_id,
            });
            self.forget_shard_share(shard);
        }
        Some(sub)
    }

    fn forget_shard_share(&mut self, shard: &Addr<FanoutShard>) {
        if let Some(count) = self.shards.get_mut(shard) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.shards.remove(shard);
            }
        }
    }

    /// Ends every subscription (the caller tells the connections why).
    fn drain_subscribers(&mut self) -> Vec<Subscriber> {
        for (shard, _) in self.shards.drain() {
            shard.do_send(DropRoom {
                room_id: self.id.clone(),
            });
        }
        let subs: Vec<Subscriber> = self.subscribers.drain().map(|(_, s)| s).collect();
        self.subscriptions_gauge.set(0);
        subs
    }

    fn is_idle(&self) -> bool {
        self.subscribers.is_empty()
            && self.pending.is_empty()
            && !self.writing
            && !self.live.as_ref().is_some_and(|l| l.reserving)
    }

    /// The viewer count: every subscription but the poll hub's (which stands for
    /// the long-polls waiting on this node; pollers between polls are not
    /// connected, so none of them is counted).
    fn viewers(&self) -> u32 {
        let viewers = self
            .subscribers
            .values()
            .filter(|s| s.user_id.0 != HUB_SUBSCRIBER)
            .count();
        u32::try_from(viewers).unwrap_or(u32::MAX)
    }

    /// Events the ring keeps.
    fn ring_size(&self) -> usize {
        if self.live.is_some() {
            self.settings.rooms.live.ring_size
        } else {
            self.settings.rooms.ring_size
        }
    }

    /// The coalescing window: adapted to the load in live rooms (see
    /// [`super::live_state::AdaptiveWindow`]), fixed in chat rooms.
    fn coalesce_window(&mut self) -> Duration {
        let coalescing = self.coalescing();
        self.window
            .window(&coalescing, self.subscribers.len(), Instant::now())
    }

    /// How the room's kind coalesces (`rooms.live.coalesce_*` or
    /// `realtime.coalesce_*`).
    fn coalescing(&self) -> Coalescing {
        if self.live.is_some() {
            self.settings.rooms.live.coalescing()
        } else {
            self.settings.realtime.coalescing()
        }
    }

    /// Stops taking work: every later request is answered with a retry error, and
    /// the registry hands out a fresh actor instead of this one.
    fn retire(&mut self, ctx: &mut Context<Self>) {
        self.retired = true;
        self.retired_flag.store(true, Ordering::Release);
        // A retired room receives nothing more (its successor registers anew).
        self.interest = None;
        if let Some(timer) = self.idle_timer.take() {
            ctx.cancel_future(timer);
        }
        tracing::debug!(room = %self.id, "room retired");
        if let Some(registry) = &self.registry {
            registry.do_send(RoomIdle {
                room_id: self.id.clone(),
            });
        }
    }

    fn unavailable(&self) -> Option<ApiError> {
        if self.retired {
            return Some(ApiError::unavailable(RETIRED_MESSAGE));
        }
        self.broken.clone()
    }

    /// Loads the room's sequence from the store; the actor handles no message
    /// before this finishes.
    fn load(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let id = self.id.clone();
        ctx.wait(
            async move {
                let room = store.get_room(&id).await?;
                let live = store.get_live_room(&id).await?;
                Ok::<_, StoreError>((room, live))
            }
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok((room, live)) => {
                        act.kind = Some(room.kind);
                        act.last_seq = room.last_seq;
                        act.broken = None;
                        act.live = live.map(|record| {
                            // A pinned message that no longer parses is dropped, not fatal.
                            let pinned = record
                                .pinned
                                .as_deref()
                                .and_then(|json| serde_json::from_str::<pb::Message>(json).ok());
                            LiveState::new(record.controls, pinned, room.last_seq)
                        });
                        if act.live.is_some() {
                            act.start_viewer_counts(ctx);
                        }
                        act.order = RoomOrder::new(
                            room.last_seq,
                            act.live.is_some(),
                            Duration::from_millis(act.settings.cluster.live_holdback_ms),
                        );
                        if act.interest.is_none() {
                            act.interest = Some(act.bus.register(
                                Topic::Room(act.id.clone()),
                                ctx.address().recipient(),
                            ));
                        }
                        tracing::debug!(room = %act.id, last_seq = act.last_seq, live = act.live.is_some(), "room loaded");
                    }
                    Err(StoreError::NotFound) => {
                        act.broken = Some(ApiError::not_found("room not found"))
                    }
                    Err(e) => {
                        tracing::error!(room = %act.id, error = %e, "cannot load room");
                        act.broken =
                            Some(ApiError::unavailable("the room cannot be loaded; retry"));
                    }
                }),
        );
    }

    /// Pushes the viewer count to every subscriber at the configured interval.
    fn start_viewer_counts(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.viewer_timer.take() {
            ctx.cancel_future(timer);
        }
        let every = Duration::from_millis(self.settings.rooms.live.viewer_count_interval_ms);
        self.viewer_timer = Some(ctx.run_interval(every, |act, _ctx| {
            let count = act.viewers();
            act.viewers_gauge.set(count as usize);
            if act.subscribers.is_empty() || act.retired {
                return;
            }
            let frame = crate::protocol::push(pb::server_frame::Kind::Viewers(pb::Viewers {
                room_id: act.id.0.clone(),
                count,
            }));
            act.notice(frame, None);
        }));
    }

    /// Starts a group commit of everything pending, unless one is running; a live
    /// room numbers and delivers them at once instead.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.live.is_some() {
            self.flush_live(ctx);
            return;
        }
        if self.writing || self.pending.is_empty() {
            return;
        }
        if let Some(error) = self.unavailable() {
            for (_, reply) in self.pending.drain(..) {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        self.writing = true;
        let isolated = self.isolate > 0;
        let take = if isolated {
            1
        } else {
            self.pending.len().min(self.settings.rooms.max_batch.max(1))
        };
        let batch: Vec<PendingAppend> = self.pending.drain(..take).collect();
        let messages: Vec<NewMessage> = batch.iter().map(|(m, _)| m.clone()).collect();
        let store = self.store.clone();
        let room = self.id.clone();
        #[cfg(feature = "fault-injection")]
        let fault = self.faults.for_commit(&messages);
        #[cfg(feature = "fault-injection")]
        let delay_after = self.faults.delay_after_next_commit.take();
        let commit = async move {
            #[cfg(feature = "fault-injection")]
            if let Some(result) = fault.apply().await {
                return result;
            }
            let result = store.append_grouped(&room, messages).await;
            #[cfg(feature = "fault-injection")]
            if let Some(delay) = delay_after {
                tokio::time::sleep(delay).await;
            }
            result
        };
        // A panic in the commit must not drop the actor's task unseen: it stops the
        // actor, the supervisor restarts it, and the batch's senders are told to
        // retry (their replies are dropped with the batch).
        let started = Instant::now();
        ctx.spawn(
            catch_panic(commit)
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.writing = false;
                    crate::metrics::metrics().commit_duration.observe(started.elapsed().as_secs_f64());
                    match result {
                        Ok(result) => {
                            act.committed(batch, isolated, result, ctx);
                            act.flush(ctx);
                            act.retry_deferred(ctx);
                        }
                        Err(panicked) => {
                            tracing::error!(room = %act.id, error = %panicked, "room commit panicked; restarting the room");
                            drop(batch);
                            ctx.stop();
                        }
                    }
                }),
        );
    }

    /// Answers the senders of a committed batch and fans its events out.
    fn committed(
        &mut self,
        mut batch: Vec<PendingAppend>,
        isolated: bool,
        result: Result<Vec<Appended>, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        if isolated {
            self.isolate = self.isolate.saturating_sub(1);
        }
        let results = match result {
            Ok(results) => results,
            Err(e) if batch.len() > 1 => {
                // Nothing of the batch was stored: commit its messages one at a time,
                // in order, so that only a message the store refuses fails.
                tracing::warn!(room = %self.id, batch = batch.len(), error = %e, "group commit failed; retrying its messages one by one");
                self.isolate += batch.len();
                while let Some(item) = batch.pop() {
                    self.pending.push_front(item);
                }
                return;
            }
            Err(e) => {
                let error = ApiError::from(e);
                for (_, reply) in batch {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
        };
        // Each stored record is copied once, into the event its subscribers share.
        let mut events = Vec::with_capacity(results.len());
        for ((_, reply), outcome) in batch.into_iter().zip(results) {
            match &outcome {
                Appended::Stored(record) => events.push(Arc::new(RoomEvent::new(record))),
                Appended::Duplicate(_) => {}
                Appended::Rejected(rejection) => {
                    let _ = reply.send(Err(rejection_error(*rejection)));
                    continue;
                }
            }
            let _ = reply.send(Ok(outcome));
        }
        crate::metrics::metrics().committed(events.len());
        self.broadcast_events(events, ctx);
    }

    /// Live rooms: gives each pending append the next sequence number (while the
    /// reservation lasts), answers it and delivers it. Reserves the next block of
    /// numbers in the store ahead of need, so a busy room rarely waits for it.
    fn flush_live(&mut self, ctx: &mut Context<Self>) {
        if self.bus.is_shared() {
            self.flush_live_shared(ctx);
            return;
        }
        if let Some(error) = self.unavailable() {
            for (_, reply) in self.pending.drain(..) {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        let mut published = Vec::new();
        while !self.pending.is_empty() {
            let reserved = self.live.as_ref().map_or(0, |l| l.reserved);
            let next = self.last_seq + 1 + published.len() as u64;
            if next > reserved {
                break;
            }
            let Some((message, reply)) = self.pending.pop_front() else {
                break;
            };
            // A retry that raced its first attempt (both waited for numbers) gets
            // the first result, as the store's unique key gives chat rooms.
            let first = message.client_message_id.as_ref().and_then(|key| {
                published.iter().find(|r: &&MessageRecord| {
                    r.sender_id == message.sender_id && r.client_message_id.as_ref() == Some(key)
                })
            });
            let first = first.cloned().or_else(|| {
                let key = message.client_message_id.clone()?;
                let seq = *self
                    .live
                    .as_ref()?
                    .sent_ids
                    .get(&(message.sender_id.clone(), key))?;
                self.ring_event(seq).map(|e| e.record.clone())
            });
            if let Some(first) = first {
                let _ = reply.send(Ok(Appended::Duplicate(first)));
                continue;
            }
            match self.live_record(&message, next, &published) {
                Ok(record) => {
                    if let (Some(live), Some(key)) = (self.live.as_mut(), &record.client_message_id)
                    {
                        live.sent_ids
                            .insert((record.sender_id.clone(), key.clone()), record.seq);
                    }
                    let _ = reply.send(Ok(Appended::Stored(record.clone())));
                    published.push(record);
                }
                Err(rejection) => {
                    let _ = reply.send(Err(rejection_error(rejection)));
                }
            }
        }
        crate::metrics::metrics().committed(published.len());
        self.broadcast(&published, ctx);
        for record in published.iter().filter(|r| r.kind == MessageKind::Delete) {
            if self
                .live
                .as_ref()
                .and_then(|l| l.pinned.as_ref())
                .is_some_and(|p| p.seq == record.target_seq)
            {
                // A deleted message does not stay pinned.
                self.set_pinned(None, ctx);
            }
        }
        let Some(live) = self.live.as_ref() else {
            return;
        };
        let block = self.settings.rooms.live.seq_reservation;
        let low = live.reserved.saturating_sub(self.last_seq) < block.div_ceil(2);
        if (low || !self.pending.is_empty()) && !live.reserving {
            self.reserve_seqs(ctx);
        }
    }

    /// Live rooms when several nodes share them (the Redis broker): one total order
    /// across nodes, so each flush takes exactly its count of numbers from the
    /// store in one statement (`rooms.last_seq` is the shared counter; a block per
    /// node would interleave the nodes' numbers out of order). Appends that arrive
    /// while the numbers are being taken go into the next flush. The messages are
    /// checked first, so that a refused one takes no number (which the other nodes
    /// would see as a hole).
    fn flush_live_shared(&mut self, ctx: &mut Context<Self>) {
        if let Some(error) = self.unavailable() {
            for (_, reply) in self.pending.drain(..) {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        let Some(live) = self.live.as_ref() else {
            return;
        };
        if live.reserving || self.pending.is_empty() {
            return;
        }
        let take = self.pending.len().min(self.settings.rooms.max_batch.max(1));
        let batch: Vec<PendingAppend> = self.pending.drain(..take).collect();
        // Provisional numbers for the checks (a reply must point before itself);
        // the store gives the real ones.
        let base = self.order.newest_known().max(self.last_seq);
        let mut fresh: Vec<MessageRecord> = Vec::new();
        let mut replies = Vec::new();
        let mut retries: Vec<(usize, oneshot::Sender<Result<Appended, ApiError>>)> = Vec::new();
        for (message, reply) in batch {
            if let Some(key) = &message.client_message_id {
                let seen = live
                    .sent_ids
                    .get(&(message.sender_id.clone(), key.clone()))
                    .and_then(|seq| self.ring_event(*seq));
                if let Some(first) = seen {
                    let _ = reply.send(Ok(Appended::Duplicate(first.record.clone())));
                    continue;
                }
                if let Some(i) = fresh.iter().position(|r| {
                    r.sender_id == message.sender_id && r.client_message_id.as_ref() == Some(key)
                }) {
                    retries.push((i, reply));
                    continue;
                }
            }
            match self.live_record(&message, base + 1 + fresh.len() as u64, &fresh) {
                Ok(record) => {
                    fresh.push(record);
                    replies.push(reply);
                }
                Err(rejection) => {
                    let _ = reply.send(Err(rejection_error(rejection)));
                }
            }
        }
        if fresh.is_empty() {
            self.flush_live_shared(ctx);
            return;
        }
        if let Some(live) = self.live.as_mut() {
            live.reserving = true;
        }
        let count = fresh.len() as u64;
        let store = self.store.clone();
        let id = self.id.clone();
        ctx.spawn(
            async move { store.take_live_seqs(&id, count).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if let Some(live) = act.live.as_mut() {
                        live.reserving = false;
                    }
                    match result {
                        Ok(last) => {
                            let first = last + 1 - count;
                            for (i, record) in fresh.iter_mut().enumerate() {
                                record.seq = first + i as u64;
                            }
                            for (record, reply) in fresh.iter().zip(replies) {
                                if let (Some(live), Some(key)) =
                                    (act.live.as_mut(), &record.client_message_id)
                                {
                                    live.sent_ids
                                        .insert((record.sender_id.clone(), key.clone()), record.seq);
                                }
                                let _ = reply.send(Ok(Appended::Stored(record.clone())));
                            }
                            for (i, reply) in retries {
                                let _ = reply.send(Ok(Appended::Duplicate(fresh[i].clone())));
                            }
                            crate::metrics::metrics().committed(fresh.len());
                            act.broadcast(&fresh, ctx);
                            let unpin = fresh.iter().any(|r| {
                                r.kind == MessageKind::Delete
                                    && act
                                        .live
                                        .as_ref()
                                        .and_then(|l| l.pinned.as_ref())
                                        .is_some_and(|p| p.seq == r.target_seq)
                            });
                            if unpin {
                                // A deleted message does not stay pinned.
                                act.set_pinned(None, ctx);
                            }
                        }
                        Err(e) => {
                            tracing::error!(room = %act.id, error = %e, "cannot take sequence numbers");
                            let error = ApiError::unavailable(
                                "the live room cannot take sequence numbers; retry with the same client_message_id",
                            );
                            for reply in replies {
                                let _ = reply.send(Err(error.clone()));
                            }
                            for (_, reply) in retries {
                                let _ = reply.send(Err(error.clone()));
                            }
                        }
                    }
                    act.flush_live_shared(ctx);
                }),
        );
    }

    /// Writes the next block of sequence numbers to the store, then goes on with
    /// the appends that waited for it.
    fn reserve_seqs(&mut self, ctx: &mut Context<Self>) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        live.reserving = true;
        let upto = live.reserved.max(self.last_seq) + self.settings.rooms.live.seq_reservation;
        let store = self.store.clone();
        let id = self.id.clone();
        ctx.spawn(
            async move { store.reserve_live_seqs(&id, upto).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let Some(live) = act.live.as_mut() else {
                        return;
                    };
                    live.reserving = false;
                    match result {
                        Ok(()) => {
                            live.reserved = live.reserved.max(upto);
                            act.flush_live(ctx);
                        }
                        Err(e) => {
                            tracing::error!(room = %act.id, error = %e, "cannot reserve sequence numbers");
                            let error = ApiError::unavailable(
                                "the live room cannot reserve sequence numbers; retry with the same client_message_id",
                            );
                            for (_, reply) in act.pending.drain(..) {
                                let _ = reply.send(Err(error.clone()));
                            }
                        }
                    }
                }),
        );
    }

    /// A live room's event `seq` from `new`, checked against the ring (and the
    /// events numbered in this round, `fresh`) as the store checks stored ones.
    fn live_record(
        &self,
        new: &NewMessage,
        seq: u64,
        fresh: &[MessageRecord],
    ) -> Result<MessageRecord, AppendRejection> {
        let find = |seq: u64| -> Option<&MessageRecord> {
            fresh
                .iter()
                .rev()
                .find(|r| r.seq == seq)
                .or_else(|| self.ring_event(seq).map(|e| &e.record))
        };
        match new.kind {
            MessageKind::Text => {
                if new.reply_to_seq >= seq {
                    return Err(AppendRejection::TargetNotFound);
                }
            }
            MessageKind::Edit | MessageKind::Delete => {
                let target = find(new.target_seq).ok_or(AppendRejection::TargetNotFound)?;
                // The ring's copy may be older than an edit or deletion numbered in
                // this same round: a deletion there wins.
                let deleted = target.deleted
                    || fresh
                        .iter()
                        .any(|r| r.kind == MessageKind::Delete && r.target_seq == new.target_seq);
                if target.kind != MessageKind::Text || deleted {
                    return Err(AppendRejection::NotEditable);
                }
                let is_author = target.sender_id == new.sender_id;
                let allowed = match new.kind {
                    MessageKind::Edit => is_author,
                    _ => is_author || new.moderator,
                };
                if !allowed {
                    return Err(AppendRejection::NotAuthor);
                }
            }
        }
        Ok(new.record(self.id.clone(), seq, now_ms()))
    }

    /// Empties the ring (and the retry ids of what it held).
    fn clear_ring(&mut self) {
        self.ring.clear();
        if let Some(live) = self.live.as_mut() {
            live.sent_ids.clear();
        }
    }

    /// The ring's event `seq`, if it still holds it.
    fn ring_event(&self, seq: u64) -> Option<&Arc<RoomEvent>> {
        let first = self.ring.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.ring.get(index).filter(|e| e.seq == seq)
    }

    /// Stores and pushes a live room's pinned message (`None`: unpinned).
    fn set_pinned(&mut self, pinned: Option<pb::Message>, ctx: &mut Context<Self>) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        live.pinned = pinned.clone();
        let json = pinned.as_ref().and_then(|m| serde_json::to_string(m).ok());
        let store = self.store.clone();
        let id = self.id.clone();
        ctx.spawn(
            async move {
                if let Err(e) = store.set_live_pinned(&id, json.as_deref()).await {
                    tracing::error!(room = %id, error = %e, "cannot store the pinned message");
                }
            }
            .into_actor(self),
        );
        let frame = crate::protocol::push(pb::server_frame::Kind::Pinned(pb::Pinned {
            room_id: self.id.0.clone(),
            message: pinned,
        }));
        self.notice(frame, None);
    }

    /// Publishes committed events through the broker (to this node and the
    /// others), and delivers what the broker hands back like what the others
    /// publish: one delivery path.
    fn broadcast(&mut self, records: &[MessageRecord], ctx: &mut Context<Self>) {
        if records.is_empty() {
            return;
        }
        let events = records
            .iter()
            .map(|r| Arc::new(RoomEvent::new(r)))
            .collect();
        self.broadcast_events(events, ctx);
    }

    /// [`RoomActor::broadcast`] of events already made.
    fn broadcast_events(&mut self, events: Vec<Arc<RoomEvent>>, ctx: &mut Context<Self>) {
        if events.is_empty() {
            return;
        }
        let envelope = self.bus.publish(
            Topic::Room(self.id.clone()),
            Body::RoomEvents {
                room_id: self.id.clone(),
                events,
                live: self.live.is_some(),
            },
            self.interest.as_ref(),
        );
        self.on_envelope(&envelope, ctx);
    }

    /// Something published on the room's topic, by this node or another.
    fn on_envelope(&mut self, envelope: &Envelope, ctx: &mut Context<Self>) {
        match &envelope.body {
            Body::RoomEvents { events, .. } => {
                let step = self.order.accept(events.iter().cloned());
                self.apply_step(step, ctx);
            }
            // A notice for the room on every node (this one included: publish it
            // instead of sending `Notify`, not as well).
            Body::RoomNotice(notice) => self.on_node_notice(notice, ctx),
            Body::Relinked => {
                // The node was cut off from the others (or just subscribed): what
                // they committed meanwhile is in the store.
                self.order.want_catch_up();
                self.apply_step(Step::default(), ctx);
            }
            _ => {}
        }
    }

    /// Does what the room's order asks: report a live room's gap, deliver what is
    /// ready, read a hole (or the store's end) from the store, wait out a hold-back;
    /// then answers the subscriptions that waited for it.
    fn apply_step(&mut self, step: Step, ctx: &mut Context<Self>) {
        if let Some((from_seq, to_seq)) = step.gap {
            tracing::debug!(room = %self.id, from_seq, to_seq, "live events no node delivered; reporting a gap");
            crate::metrics::metrics().gaps_reported.inc();
            let frame = crate::protocol::push(pb::server_frame::Kind::Gap(pb::Gap {
                room_id: self.id.0.clone(),
                from_seq,
                to_seq,
            }));
            // The events before the gap may still wait in the coalescing outbox
            // (or for their group's turn): everyone gets them before the gap.
            self.flush_outbox(ctx, None);
            self.notice(frame, None);
            if to_seq > self.last_seq {
                // Nothing after the gap yet (expected events that never came): the
                // room is past it, and its ring starts afresh.
                self.clear_ring();
                self.last_seq = to_seq;
            }
        }
        if !step.ready.is_empty() {
            self.publish(step.ready, ctx);
        }
        if let Some(fill) = step.fill.or_else(|| self.order.next_catch_up()) {
            self.start_fill(fill, ctx);
        }
        if step.hold {
            let holdback = Duration::from_millis(self.settings.cluster.live_holdback_ms);
            ctx.run_later(holdback, |act, ctx| {
                let step = act.order.hold_expired();
                act.apply_step(step, ctx);
            });
        }
        if !self.deferred.is_empty() {
            self.retry_deferred(ctx);
        }
    }

    /// Reads `fill` from the store and hands the events to the room's order.
    fn start_fill(&mut self, fill: Fill, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let id = self.id.clone();
        ctx.spawn(
            async move {
                store
                    .messages_after(&id, fill.after, fill.upto.unwrap_or(u64::MAX), FILL_PAGE)
                    .await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                let records = match result {
                    Ok(records) => Ok(records
                        .iter()
                        .map(|r| Arc::new(RoomEvent::new(r)))
                        .collect()),
                    Err(e) => {
                        tracing::warn!(room = %act.id, after = fill.after, upto = ?fill.upto, error = %e, "cannot read missed events from the store; retrying");
                        Err(())
                    }
                };
                let failed = records.is_err();
                let step = act.order.filled(fill, records);
                act.apply_step(step, ctx);
                if failed {
                    ctx.run_later(FILL_RETRY, |act, ctx| {
                        let step = act.order.retry_fill();
                        act.apply_step(step, ctx);
                    });
                }
            }),
        );
    }

    /// Adds committed events (contiguous, in order) to the ring and delivers them
    /// to every subscriber.
    fn publish(&mut self, events: Vec<Arc<RoomEvent>>, ctx: &mut Context<Self>) {
        if events.is_empty() {
            return;
        }
        let count = events.len();
        for event in events {
            let record = &event.record;
            if event.seq != self.last_seq + 1 {
                // Someone else appended in between (another node); the ring would
                // have a hole, so start it afresh from here.
                self.clear_ring();
            }
            self.last_seq = event.seq;
            // Another node's live comments too: a retry of one on this node gets
            // the first result while the ring holds it.
            if let (Some(live), Some(key)) = (self.live.as_mut(), &record.client_message_id) {
                live.sent_ids
                    .insert((record.sender_id.clone(), key.clone()), event.seq);
            }
            self.ring.push_back(event.clone());
            self.amend_ring(record);
            self.outbox.push(event);
        }
        self.window.record(count);
        let ring_size = self.ring_size();
        while self.ring.len() > ring_size {
            if let Some(gone) = self.ring.pop_front() {
                if let (Some(live), Some(key)) =
                    (self.live.as_mut(), &gone.record.client_message_id)
                {
                    live.sent_ids
                        .remove(&(gone.record.sender_id.clone(), key.clone()));
                }
            }
        }
        // Coalescing: a room that flushed within the window waits for the window to
        // end and sends everything since in one push per subscriber; a quiet room
        // flushes at once, so it adds no latency.
        if self.flush_timer.is_some() {
            return;
        }
        let window = self.coalesce_window();
        let since = self.last_flush.elapsed();
        if since >= window {
            self.flush_outbox(ctx, None);
            return;
        }
        // A busy live room with turns ticks every window ÷ groups, one group's
        // turn per tick (see `flush_turn`).
        let groups = self.groups_for(window);
        let tick = window / groups as u32;
        self.flush_timer = Some(ctx.run_later(tick.saturating_sub(since), move |act, ctx| {
            act.flush_timer = None;
            act.flush_turn(groups, ctx);
        }));
    }

    /// Groups a live room's subscribers take turns in (`rooms.live.coalesce_groups`);
    /// 1 in a chat room.
    fn configured_groups(&self) -> usize {
        self.coalescing().groups.clamp(1, 64)
    }

    /// Groups that take turns in a `window`: as many as keep each tick (window ÷
    /// groups) at least `rooms.live.coalesce_min_ms`, at most the configured ones
    /// (a room at its shortest window takes no turns).
    fn groups_for(&self, window: Duration) -> usize {
        let min = Duration::from_millis(self.coalescing().min_ms.max(1));
        let fit = usize::try_from(window.as_nanos() / min.as_nanos()).unwrap_or(usize::MAX);
        self.configured_groups().min(fit).max(1)
    }

    /// One tick of a busy room: delivers the outbox to one group of subscribers
    /// (every subscriber without turns), and keeps ticking, with nothing new if
    /// need be, until every group had its turn since the last events. So each
    /// subscriber gets one write per window while the room's writes spread over
    /// it, and nothing waits longer than a window.
    fn flush_turn(&mut self, groups: usize, ctx: &mut Context<Self>) {
        if groups <= 1 {
            self.flush_outbox(ctx, None);
            return;
        }
        let turn = self.turn % groups;
        self.turn = self.turn.wrapping_add(1);
        self.owed_turns = if self.outbox.is_empty() {
            self.owed_turns.saturating_sub(1)
        } else {
            groups - 1
        };
        self.flush_outbox(
            ctx,
            Some(Turn {
                index: turn,
                of: groups,
            }),
        );
        if self.owed_turns > 0 {
            let tick = self.coalesce_window() / groups as u32;
            self.flush_timer = Some(ctx.run_later(tick, move |act, ctx| {
                act.flush_timer = None;
                act.flush_turn(groups, ctx);
            }));
        }
    }

    /// Makes the ring show an edit or deletion in its target as the store does
    /// (see `apply_to_target` in the store): a replay from the ring and a page of
    /// history must never disagree.
    fn amend_ring(&mut self, event: &MessageRecord) {
        match event.kind {
            MessageKind::Text => {}
            MessageKind::Edit => self.amend_in_ring(event.target_seq, |target| {
                target.text = event.text.clone();
                target.edited_at = Some(event.created_at);
            }),
            MessageKind::Delete => {
                self.amend_in_ring(event.target_seq, |target| {
                    target.text = event.text.clone();
                    target.metadata.clear();
                    target.deleted = true;
                });
                // The deleted text must not stay readable through earlier edits.
                let edits: Vec<u64> = self
                    .ring
                    .iter()
                    .filter(|e| {
                        e.record.kind == MessageKind::Edit
                            && e.record.target_seq == event.target_seq
                    })
                    .map(|e| e.seq)
                    .collect();
                for seq in edits {
                    self.amend_in_ring(seq, |edit| edit.text.clear());
                }
            }
        }
    }

    /// Replaces the ring's event `seq` (if it holds it) with a changed copy; the
    /// old event stays valid for whoever holds it already.
    fn amend_in_ring(&mut self, seq: u64, change: impl FnOnce(&mut MessageRecord)) {
        let Some(first) = self.ring.front().map(|e| e.seq) else {
            return;
        };
        let Some(index) = seq.checked_sub(first).and_then(|i| usize::try_from(i).ok()) else {
            return;
        };
        if let Some(slot) = self.ring.get_mut(index).filter(|e| e.seq == seq) {
            let mut record = slot.record.clone();
            change(&mut record);
            *slot = Arc::new(RoomEvent::new(&record));
        }
    }

    /// Delivers the events waiting in the outbox to every subscriber, as one batch.
    /// `turn`: whose turn it is in a room whose subscribers take turns (`None`:
    /// everyone's); such a turn is handed to the shards even with nothing new,
    /// for what the group has not been written yet.
    fn flush_outbox(&mut self, ctx: &mut Context<Self>, turn: Option<Turn>) {
        self.last_flush = Instant::now();
        if self.outbox.is_empty() {
            if turn.is_some() && !self.shards.is_empty() {
                let batch = Arc::new(EventBatch::new(self.id.clone(), Vec::new()));
                let room: Recipient<ShardLagged> = ctx.address().recipient();
                for shard in self.shards.keys() {
                    shard.do_send(DeliverBatch {
                        batch: batch.clone(),
                        live: self.live.is_some(),
                        turn,
                        room: room.clone(),
                        queued: QueuedBatch::new(&batch),
                    });
                }
            }
            return;
        }
        crate::metrics::metrics()
            .fanout_batch_events
            .observe(self.outbox.len() as f64);
        let batch = Arc::new(EventBatch::new(
            self.id.clone(),
            std::mem::take(&mut self.outbox),
        ));
        // Bytes per codec, as single frames and as one batch frame.
        let mut sizes = [[None, None], [None, None]];
        let mut lagged = Vec::new();
        // Each shard gets the batch once and delivers it to its connections on its
        // own arbiter; the room delivers to the others (without a shard) itself.
        let live = self.live.is_some();
        if !self.shards.is_empty() {
            let room: Recipient<ShardLagged> = ctx.address().recipient();
            for shard in self.shards.keys() {
                shard.do_send(DeliverBatch {
                    batch: batch.clone(),
                    live,
                    turn,
                    room: room.clone(),
                    queued: QueuedBatch::new(&batch),
                });
            }
        }
        for (conn_id, sub) in self.subscribers.iter().filter(|(_, s)| s.shard.is_none()) {
            let bytes = *sizes[sub.codec as usize][usize::from(sub.batch)]
                .get_or_insert_with(|| batch.wire_len(sub.codec, sub.batch));
            if !sub.gauge.try_reserve(bytes) {
                lagged.push(*conn_id);
                continue;
            }
            let push = RoomPush::Events {
                batch: batch.clone(),
                bytes,
            };
            if sub.addr.try_send(push).is_err() {
                sub.gauge.release(bytes);
                lagged.push(*conn_id);
                continue;
            }
            crate::metrics::metrics()
                .messages_delivered
                .inc_by(batch.events.len() as u64);
        }
        for conn_id in lagged {
            if let Some(sub) = self.remove_subscriber(conn_id) {
                tracing::debug!(room = %self.id, conn = conn_id, "subscriber lagged");
                crate::metrics::metrics().subscribers_lagged.inc();
                sub.addr.do_send(RoomPush::Lagged {
                    room_id: self.id.clone(),
                    tail: self.live.is_some(),
                });
            }
        }
        self.subscriptions_gauge.set(self.subscribers.len());
    }

    /// Sends a non-history push to subscribers, dropping it for full queues.
    fn notice(&self, frame: pb::ServerFrame, except: Option<ConnectionId>) {
        let frame = Arc::new(SharedFrame::new(frame));
        for (conn_id, sub) in &self.subscribers {
            if Some(*conn_id) == except {
                continue;
            }
            let bytes = frame.wire(sub.codec).len();
            if sub.gauge.try_reserve(bytes) {
                let push = RoomPush::Notice {
                    room_id: self.id.clone(),
                    frame: frame.clone(),
                    bytes,
                };
                if sub.addr.try_send(push).is_err() {
                    sub.gauge.release(bytes);
                }
            }
        }
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        self.subscriptions_gauge.set(self.subscribers.len());
        if let Some(live) = self.live.as_mut() {
            live.prune(Instant::now());
        }
        self.removals.retain(|_, at| at.elapsed() < REMOVAL_MEMORY);
        if !self.is_idle() {
            self.idle_since = Instant::now();
            return;
        }
        if self.registry.is_some()
            && self.idle_since.elapsed() >= Duration::from_secs(self.settings.rooms.idle_stop_secs)
        {
            self.retire(ctx);
        }
    }
}

fn rejection_error(rejection: AppendRejection) -> ApiError {
    match rejection {
        AppendRejection::TargetNotFound => {
            ApiError::not_found("the referenced message does not exist")
        }
        AppendRejection::NotAuthor => {
            ApiError::denied("only the author (or a moderator, to delete) may change this message")
        }
        AppendRejection::NotEditable => {
            ApiError::failed_precondition("the message was deleted or cannot be changed")
        }
    }
}

impl Actor for RoomActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.retired {
            return;
        }
        self.load(ctx);
        self.idle_since = Instant::now();
        let idle_stop = Duration::from_secs(self.settings.rooms.idle_stop_secs);
        let every = IDLE_CHECK_INTERVAL
            .min(idle_stop / 2)
            .max(Duration::from_millis(100));
        self.idle_timer = Some(ctx.run_interval(every, |act, ctx| act.check_idle(ctx)));
    }
}

impl Supervised for RoomActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // Waiting subscriptions are answered "retry" (their senders dropped): the
        // reloaded room may not know the sequences they wait for.
        self.deferred.clear();
        tracing::warn!(room = %self.id, subscribers = self.subscribers.len(), "room actor restarting");
        // In-flight commits were dropped with the old context: their senders get
        // an error and retry with the same client message id (idempotent).
        self.writing = false;
        self.isolate = 0;
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(ApiError::unavailable(
                "room restarted; retry with the same client_message_id",
            )));
        }
        self.ring.clear();
        // A live room's ring is gone with the restart; it reloads its reservation,
        // and subscribers resuming from before it get a `gap`.
        self.live = None;
        self.viewer_timer = None;
        for sub in self.drain_subscribers() {
            sub.addr.do_send(RoomPush::Resync {
                room_id: self.id.clone(),
            });
        }
        self.idle_timer = None;
        // Undelivered events are dropped with the subscribers, who resynchronise
        // from the store.
        self.outbox.clear();
        self.flush_timer = None;
        self.owed_turns = 0;
    }
}

impl Handler<Append> for RoomActor {
    type Result = ResponseFuture<Result<Appended, ApiError>>;

    fn handle(&mut self, msg: Append, ctx: &mut Self::Context) -> Self::Result {
        guarded(
            self,
            ctx,
            || Box::pin(async { Err(ApiError::unavailable(RESTARTING_MESSAGE)) }) as Self::Result,
            move |act, ctx| {
                let limit = act.settings.rooms.max_pending_appends;
                if act.pending.len() >= limit {
                    // Admission control: the room cannot commit as fast as it is sent to.
                    crate::metrics::metrics().refused("room_pending_appends");
                    return Box::pin(async move {
                        Err(ApiError::unavailable(format!(
                        "the room has {limit} sends waiting for the store; retry shortly with the same client_message_id"
                    )))
                    });
                }
                if let Some(live) = act.live.as_ref() {
                    let message = &msg.message;
                    let now = Instant::now();
                    let is_send = message.kind == MessageKind::Text;
                    if let Some(key) = &message.client_message_id {
                        let seen = live
                            .sent_ids
                            .get(&(message.sender_id.clone(), key.clone()))
                            .copied();
                        if let Some(event) = seen.and_then(|seq| act.ring_event(seq)) {
                            let record = event.record.clone();
                            return Box::pin(async move { Ok(Appended::Duplicate(record)) });
                        }
                    }
                    if message.kind != MessageKind::Delete {
                        if let Err(refused) = live.check(
                            &act.settings.rooms.live,
                            &message.sender_id,
                            &message.text,
                            msg.host,
                            is_send,
                            now,
                        ) {
                            crate::metrics::metrics().limited("live_controls");
                            return Box::pin(async move { Err(refused) });
                        }
                    }
                    if is_send {
                        if let Some(live) = act.live.as_mut() {
                            live.record_send(&msg.message.sender_id, now);
                        }
                    }
                    if let Some(checked) = act.live_across_nodes(&msg, ctx) {
                        return checked;
                    }
                }
                act.enqueue(msg.message, ctx)
            },
        )
    }
}

/// A live room's append that passed the cluster-wide rules
/// ([`RoomActor::live_across_nodes`]): numbered like any other.
#[derive(Message)]
#[rtype(result = "Result<Appended, ApiError>")]
struct AdmittedAppend(NewMessage);

impl Handler<AdmittedAppend> for RoomActor {
    type Result = ResponseFuture<Result<Appended, ApiError>>;

    fn handle(&mut self, msg: AdmittedAppend, ctx: &mut Self::Context) -> Self::Result {
        guarded(
            self,
            ctx,
            || Box::pin(async { Err(ApiError::unavailable(RESTARTING_MESSAGE)) }) as Self::Result,
            move |act, ctx| act.enqueue(msg.0, ctx),
        )
    }
}

impl RoomActor {
    /// Queues `message` for the next flush; answers its outcome.
    fn enqueue(
        &mut self,
        message: NewMessage,
        ctx: &mut Context<Self>,
    ) -> ResponseFuture<Result<Appended, ApiError>> {
        let (reply, outcome) = oneshot::channel();
        self.pending.push_back((message, reply));
        crate::metrics::metrics().messages_received.inc();
        self.flush(ctx);
        Box::pin(async move {
            outcome.await.unwrap_or_else(|_| {
                Err(ApiError::unavailable(
                    "room restarted; retry with the same client_message_id",
                ))
            })
        })
    }

    /// Live rooms shared by several nodes (the Redis broker): the append passed
    /// this node's rules; checks the cluster-wide ones in Redis
    /// ([`crate::cluster::live_guard`]) before numbering it: a retry sent first on
    /// another node gets that result, slow mode and the rate limit count the
    /// user's sends on every node. `None`: nothing to check there (the append is
    /// queued at once).
    fn live_across_nodes(
        &mut self,
        msg: &Append,
        ctx: &mut Context<Self>,
    ) -> Option<ResponseFuture<Result<Appended, ApiError>>> {
        let guard = self.bus.live_guard()?.clone();
        let controls = &self.live.as_ref()?.controls;
        let message = msg.message.clone();
        let limited = message.kind == MessageKind::Text && !msg.host;
        let slow_mode = controls.slow_mode_seconds;
        let per_minute = controls.rate_limit_per_minute;
        let slow = limited && slow_mode > 0;
        let rate = limited && per_minute > 0;
        if message.client_message_id.is_none() && !slow && !rate {
            return None;
        }
        let room = self.id.clone();
        let addr = ctx.address();
        let checked: ResponseFuture<Result<Appended, ApiError>> = Box::pin(async move {
            use crate::cluster::{limits::Verdict, live_guard::Claim};
            let sender = message.sender_id.clone();
            let key = message.client_message_id.clone();
            let mut claimed = false;
            if let Some(key) = &key {
                match guard.claim(&room, &sender, key).await {
                    Claim::First => claimed = true,
                    Claim::Sent(record) => return Ok(Appended::Duplicate(record)),
                    Claim::InFlight => {
                        return Err(ApiError::unavailable(
                            "this client_message_id is being sent on another node; retry shortly with the same client_message_id",
                        ))
                    }
                    Claim::Unknown => {}
                }
            }
            let mut refusal = None;
            if slow {
                let every = Duration::from_secs(u64::from(slow_mode));
                if let Verdict::Wait(wait) = guard.slow_mode(&room, &sender, every).await {
                    refusal = Some(super::live_state::slow_mode_refused(slow_mode, wait));
                }
            }
            if rate && refusal.is_none() {
                if let Verdict::Wait(wait) = guard.rate_limit(&room, &sender, per_minute).await {
                    refusal = Some(super::live_state::rate_limit_refused(per_minute, wait));
                }
            }
            let outcome = match refusal {
                Some(refused) => {
                    crate::metrics::metrics().limited("live_controls");
                    Err(refused)
                }
                None => addr
                    .send(AdmittedAppend(message))
                    .await
                    .unwrap_or_else(|_| Err(ApiError::unavailable(RESTARTING_MESSAGE))),
            };
            if let (true, Some(key)) = (claimed, &key) {
                let record = match &outcome {
                    Ok(Appended::Stored(record) | Appended::Duplicate(record)) => Some(record),
                    _ => None,
                };
                guard.settle(&room, &sender, key, record).await;
            }
            outcome
        });
        Some(checked)
    }
}

impl Handler<Subscribe> for RoomActor {
    type Result = ResponseFuture<Result<SubscribeReply, ApiError>>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Self::Context) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.try_subscribe(msg, reply, None, ctx);
        // Dropped unanswered: the actor stopped (the connection looks the room up
        // again and subscribes anew).
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(ApiError::unavailable(RETIRED_MESSAGE)))
        })
    }
}

impl RoomActor {
    /// Registers a subscription and answers `reply`, or, when it starts after a
    /// sequence the store already shows but this room has not published yet (a
    /// client read it from history while the commit was finishing), keeps it until
    /// that commit has been published ([`RoomActor::retry_deferred`]).
    fn try_subscribe(
        &mut self,
        msg: Subscribe,
        reply: oneshot::Sender<Result<SubscribeReply, ApiError>>,
        ticket: Option<u64>,
        ctx: &mut Context<Self>,
    ) {
        let mut deferred: Option<(Subscribe, Option<u64>)> = None;
        let wait = &mut deferred;
        let mut read_counter = false;
        let read = &mut read_counter;
        let result = guarded(
            self,
            ctx,
            // The connection looks the room up again and subscribes anew.
            || Err(ApiError::unavailable(RETIRED_MESSAGE)),
            move |act, _ctx| {
                #[cfg(feature = "fault-injection")]
                if std::mem::take(&mut act.faults.retire_on_subscribe) && act.is_idle() {
                    act.retire(_ctx);
                }
                if let Some(error) = act.unavailable() {
                    return Err(error);
                }
                if act
                    .removals
                    .get(&msg.subscriber.user_id)
                    .is_some_and(|removed_at| *removed_at >= msg.access_checked_at)
                {
                    return Err(ApiError::denied(
                        "you were removed from this room; you may no longer read it",
                    ));
                }
                let last_seq = act.last_seq;
                if let Some(live) = &act.live {
                    if msg.anonymous && !live.controls.anonymous_viewers {
                        return Err(ApiError::unauthenticated(
                            "this live room does not allow anonymous viewers; authenticate first",
                        ));
                    }
                    let (gap, replay) = match msg.since {
                        None => (None, Vec::new()),
                        Some(since) if since > last_seq && act.bus.is_shared() => {
                            // Another node numbered it (the counter is shared) and
                            // it has not arrived here yet: answered once it has, or
                            // once the hold-back reported it as a gap.
                            if since <= act.order.newest_known() {
                                *wait = Some((msg, ticket));
                                return Err(ApiError::unavailable(
                                    "deferred until the sequence is delivered",
                                ));
                            }
                            // Not known here: ask the store's counter once.
                            match ticket {
                                Some(t) if act.counter_failed >= t => {
                                    return Err(ApiError::unavailable(
                                        "cannot read the live room's sequence counter; retry",
                                    ))
                                }
                                Some(t) if act.counter_reads.1 >= t => {
                                    return Err(ApiError::new(
                                        Code::OutOfRange,
                                        format!(
                                        "since_seq {since} is beyond the room's last sequence {}",
                                        act.order.newest_known().max(last_seq)
                                    ),
                                    ))
                                }
                                Some(_) => *wait = Some((msg, ticket)),
                                None => {
                                    act.counter_reads.0 += 1;
                                    *wait = Some((msg, Some(act.counter_reads.0)));
                                    *read = true;
                                }
                            }
                            return Err(ApiError::unavailable(
                                "deferred until the store's counter was read",
                            ));
                        }
                        Some(since) if since > last_seq => {
                            return Err(ApiError::new(
                                Code::OutOfRange,
                                format!(
                                "since_seq {since} is beyond the room's last sequence {last_seq}"
                            ),
                            ))
                        }
                        Some(since) if since == last_seq => (None, Vec::new()),
                        // A lagging subscriber goes to the newest event.
                        Some(since) if msg.tail => (Some((since + 1, last_seq)), Vec::new()),
                        Some(since) => {
                            let first_in_ring = act.ring.front().map_or(last_seq + 1, |e| e.seq);
                            let gap =
                                (first_in_ring > since + 1).then(|| (since + 1, first_in_ring - 1));
                            let replay =
                                act.ring.iter().filter(|e| e.seq > since).cloned().collect();
                            (gap, replay)
                        }
                    };
                    act.add_subscriber(msg.subscriber);
                    act.idle_since = Instant::now();
                    return Ok(SubscribeReply::Live {
                        last_seq,
                        gap,
                        replay,
                    });
                }
                if msg.anonymous {
                    return Err(ApiError::unauthenticated(
                        "only live rooms that allow anonymous viewers can be watched without an account; authenticate first",
                    ));
                }
                let replay = match msg.since {
                    None => Vec::new(),
                    Some(since)
                        if since > last_seq
                            && (act.writing
                                || act.order.filling()
                                || since <= act.order.newest_known()) =>
                    {
                        // This room's commit is finishing, or the events are being
                        // read from the store: answered once they are delivered.
                        *wait = Some((msg, ticket));
                        return Err(ApiError::unavailable(
                            "deferred until the commit is published",
                        ));
                    }
                    Some(since)
                        if since > last_seq && !ticket.is_some_and(|t| act.order.caught_up(t)) =>
                    {
                        // Another node may have committed it: read the store's end
                        // first (out_of_range only if the store has no such event).
                        let ticket = ticket.unwrap_or_else(|| act.order.want_catch_up());
                        *wait = Some((msg, Some(ticket)));
                        return Err(ApiError::unavailable("deferred until the store was read"));
                    }
                    Some(since) if since > last_seq => {
                        return Err(ApiError::new(
                            Code::OutOfRange,
                            format!(
                                "since_seq {since} is beyond the room's last sequence {last_seq}"
                            ),
                        ))
                    }
                    Some(since) if since == last_seq => Vec::new(),
                    Some(since) => {
                        let first_in_ring = act.ring.front().map_or(u64::MAX, |e| e.seq);
                        if first_in_ring > since + 1 {
                            return Ok(SubscribeReply::Behind { last_seq });
                        }
                        act.ring.iter().filter(|e| e.seq > since).cloned().collect()
                    }
                };
                act.add_subscriber(msg.subscriber);
                act.idle_since = Instant::now();
                crate::metrics::metrics()
                    .messages_delivered
                    .inc_by(replay.len() as u64);
                Ok(SubscribeReply::Live {
                    last_seq,
                    gap: None,
                    replay,
                })
            },
        );
        match deferred {
            Some((msg, ticket)) => {
                self.deferred.push((msg, reply, ticket));
                if read_counter {
                    self.read_live_counter(ctx);
                }
                if let Some(fill) = self.order.next_catch_up() {
                    self.start_fill(fill, ctx);
                }
            }
            None => {
                let _ = reply.send(result);
            }
        }
    }

    /// Live rooms across nodes: reads the store's sequence counter; what it
    /// shows past what arrived here is held back like any hole, then reported as
    /// a `gap`. The deferred subscriptions are tried again.
    fn read_live_counter(&mut self, ctx: &mut Context<Self>) {
        let ticket = self.counter_reads.0;
        let store = self.store.clone();
        let id = self.id.clone();
        ctx.spawn(
            async move { store.get_room(&id).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.counter_reads.1 = act.counter_reads.1.max(ticket);
                    match result {
                        Ok(room) => {
                            let step = act.order.expect_through(room.last_seq);
                            act.apply_step(step, ctx);
                        }
                        Err(e) => {
                            act.counter_failed = act.counter_failed.max(ticket);
                            tracing::warn!(room = %act.id, error = %e, "cannot read the live room's counter");
                        }
                    }
                    act.retry_deferred(ctx);
                }),
        );
    }

    /// Tries the deferred subscriptions again (after events were delivered).
    fn retry_deferred(&mut self, ctx: &mut Context<Self>) {
        for (msg, reply, ticket) in std::mem::take(&mut self.deferred) {
            self.try_subscribe(msg, reply, ticket, ctx);
        }
    }
}

impl Handler<Unsubscribe> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                act.remove_subscriber(msg.conn_id);
                act.subscriptions_gauge.set(act.subscribers.len());
            },
        )
    }
}

impl Handler<Relay> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Relay, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                act.notice(msg.frame, msg.except);
            },
        )
    }
}

impl Handler<Notify> for RoomActor {
    type Result = ();

    fn handle(&mut self, Notify(notice): Notify, ctx: &mut Self::Context) {
        guarded(self, ctx, || (), move |act, _ctx| act.apply_notice(notice))
    }
}

impl RoomActor {
    /// Delivers a notice (from this node's [`Notify`] or another node's
    /// `RoomNotice` through the broker).
    fn apply_notice(&mut self, notice: RoomNotice) {
        use crate::protocol::push;
        use pb::server_frame::Kind;
        let quiet_live = self.live.is_some() && !self.settings.rooms.live.member_events;
        match notice {
            // Live rooms: no join/leave per viewer (a viewer count instead),
            // unless rooms.live.member_events.
            RoomNotice::Member(event)
                if quiet_live
                    && matches!(
                        pb::MemberEventKind::try_from(event.kind),
                        Ok(pb::MemberEventKind::Joined | pb::MemberEventKind::Left)
                    ) => {}
            RoomNotice::Presence { .. } if quiet_live => {}
            RoomNotice::Member(event) => self.notice(push(Kind::Member(event)), None),
            RoomNotice::Updated(room) => self.notice(push(Kind::RoomUpdated(*room)), None),
            RoomNotice::Presence {
                user_id,
                online,
                version,
            } => {
                let newest = self.presence.entry(user_id.clone()).or_insert(0);
                if version <= *newest {
                    // A later change of this user was delivered already.
                    return;
                }
                *newest = version;
                self.notice(
                    push(Kind::Presence(pb::PresenceEvent {
                        room_id: self.id.0.clone(),
                        user_id: user_id.0,
                        online,
                    })),
                    None,
                )
            }
            RoomNotice::Removed {
                user_id,
                reason,
                message,
            } => {
                self.removals.insert(user_id.clone(), Instant::now());
                let frame = Arc::new(SharedFrame::new(push(Kind::Removed(pb::RemovedEvent {
                    room_id: self.id.0.clone(),
                    reason: reason as i32,
                    message,
                }))));
                let gone: Vec<ConnectionId> = self
                    .subscribers
                    .iter()
                    .filter(|(_, s)| s.user_id == user_id)
                    .map(|(id, _)| *id)
                    .collect();
                for conn_id in gone {
                    if let Some(sub) = self.remove_subscriber(conn_id) {
                        sub.addr.do_send(RoomPush::Removed {
                            room_id: self.id.clone(),
                            frame: frame.clone(),
                        });
                    }
                }
            }
        }
    }

    /// A notice published on the room's topic (by any node).
    fn on_node_notice(&mut self, notice: &node::RoomNotice, ctx: &mut Context<Self>) {
        use node::room_notice::Kind;
        let Some(kind) = &notice.kind else {
            return;
        };
        match kind {
            Kind::Member(event) => self.apply_notice(RoomNotice::Member(event.clone())),
            Kind::Removed(removed) => self.apply_notice(RoomNotice::Removed {
                user_id: UserId(removed.user_id.clone()),
                reason: pb::RemovedReason::try_from(removed.reason).unwrap_or_default(),
                message: removed.message.clone(),
            }),
            Kind::Updated(room) => self.apply_notice(RoomNotice::Updated(Box::new(room.clone()))),
            Kind::Presence(change) => self.apply_notice(RoomNotice::Presence {
                user_id: UserId(change.user_id.clone()),
                online: change.online,
                version: change.version,
            }),
            Kind::Relay(frame) => self.notice(frame.clone(), None),
            Kind::Deleted(frame) => {
                let frame = Arc::new(SharedFrame::new(frame.clone()));
                self.deleted(frame, ctx);
            }
        }
    }
}

impl Handler<Delivered> for RoomActor {
    type Result = ();

    fn handle(&mut self, Delivered(envelope): Delivered, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, ctx| {
                if act.retired || act.broken.is_some() {
                    return;
                }
                act.on_envelope(&envelope, ctx);
            },
        )
    }
}

impl Handler<ShardLagged> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: ShardLagged, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                let current = act
                    .subscribers
                    .get(&msg.conn_id)
                    .is_some_and(|s| s.registration == msg.registration);
                if !current {
                    // The connection subscribed again meanwhile.
                    return;
                }
                // The shard dropped it already.
                if let Some(shard) = act
                    .subscribers
                    .remove(&msg.conn_id)
                    .and_then(|sub| sub.shard)
                {
                    act.forget_shard_share(&shard);
                }
                act.subscriptions_gauge.set(act.subscribers.len());
            },
        )
    }
}

impl Handler<Pin> for RoomActor {
    type Result = Result<Option<pb::Message>, ApiError>;

    fn handle(&mut self, msg: Pin, ctx: &mut Self::Context) -> Self::Result {
        guarded(
            self,
            ctx,
            || Err(ApiError::unavailable(RESTARTING_MESSAGE)),
            move |act, ctx| {
                if let Some(error) = act.unavailable() {
                    return Err(error);
                }
                if act.live.is_none() {
                    return Err(ApiError::failed_precondition(
                        "only live rooms have pinned messages",
                    ));
                }
                let pinned = if msg.seq == 0 {
                    None
                } else {
                    let event = act.ring_event(msg.seq).ok_or_else(|| {
                        ApiError::not_found(format!(
                            "the room no longer holds message {} (live rooms keep the last {})",
                            msg.seq,
                            act.ring_size()
                        ))
                    })?;
                    if event.record.kind != MessageKind::Text || event.record.deleted {
                        return Err(ApiError::failed_precondition(
                            "only a message that is not deleted can be pinned",
                        ));
                    }
                    Some(crate::domain::convert::message_to_proto(&event.record))
                };
                act.set_pinned(pinned.clone(), ctx);
                Ok(pinned)
            },
        )
    }
}

impl Handler<ControlsChanged> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: ControlsChanged, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                if let Some(live) = act.live.as_mut() {
                    live.controls = msg.controls;
                }
            },
        )
    }
}

impl Handler<GetLiveSnapshot> for RoomActor {
    type Result = Result<LiveSnapshot, ApiError>;

    fn handle(&mut self, _msg: GetLiveSnapshot, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(error) = self.unavailable() {
            return Err(error);
        }
        Ok(LiveSnapshot {
            live: self.live.is_some(),
            last_seq: self.last_seq,
            pinned: self.live.as_ref().and_then(|l| l.pinned.clone()),
            viewers: self.viewers(),
            shards: self.shards.len(),
        })
    }
}

/// Reads the room's ring for a long-poll: the events after `after` (the room's
/// current end when `None`), at most `limit`. A live room always answers from its
/// ring (it has no other history), with a `gap` for what the ring no longer holds.
/// A chat room answers from its ring when the ring holds everything after
/// `after`, and with `None` otherwise (the store has it, or this node has not
/// published it yet): the poll then reads the store. A live room across nodes
/// answers an empty page for a cursor another node numbered and this node has
/// not received yet (the poll waits for what follows), and `out_of_range` only
/// past the store's counter.
#[derive(Message)]
#[rtype(result = "Result<Option<RingPage>, ApiError>")]
pub struct ReadRing {
    pub after: Option<u64>,
    pub limit: usize,
}

/// What [`ReadRing`] found.
#[derive(Debug)]
pub struct RingPage {
    /// Whether the room is a live room.
    pub live: bool,
    /// The room's last sequence now.
    pub last_seq: u64,
    /// The range (inclusive) after `after` that the ring no longer holds (live
    /// rooms only).
    pub gap: Option<(u64, u64)>,
    /// Events after the gap (or after `after`), in order, at most `limit`.
    pub events: Vec<Arc<RoomEvent>>,
    /// More events follow the last of `events`.
    pub more: bool,
}

impl Handler<ReadRing> for RoomActor {
    type Result = ResponseActFuture<Self, Result<Option<RingPage>, ApiError>>;

    fn handle(&mut self, msg: ReadRing, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(error) = self.unavailable() {
            return Box::pin(actix::fut::ready(Err(error)));
        }
        let live = self.live.is_some();
        let after = msg.after.unwrap_or(self.last_seq);
        if live && after > self.last_seq && self.bus.is_shared() {
            // Another node numbered it (the live counter is shared) and it has not
            // arrived here yet: an empty page, the poll waits for what follows.
            // Only a cursor beyond the store's counter is out of range.
            if after <= self.order.newest_known() {
                return Box::pin(actix::fut::ready(Ok(Some(self.empty_page(live)))));
            }
            let store = self.store.clone();
            let id = self.id.clone();
            return Box::pin(
                async move { store.get_room(&id).await }
                    .into_actor(self)
                    .map(move |room, act, _ctx| {
                        let counter = room.map_err(ApiError::from)?.last_seq;
                        if after <= counter {
                            Ok(Some(act.empty_page(live)))
                        } else {
                            Err(beyond_last(after, counter))
                        }
                    }),
            );
        }
        Box::pin(actix::fut::ready(self.read_ring(live, after, msg.limit)))
    }
}

/// The `out_of_range` answer to a poll cursor past the room's last sequence.
fn beyond_last(after: u64, last_seq: u64) -> ApiError {
    ApiError::new(
        Code::OutOfRange,
        format!("after_seq {after} is beyond the room's last sequence {last_seq}"),
    )
}

impl RoomActor {
    /// [`ReadRing`] when this node has everything up to the cursor.
    fn read_ring(
        &self,
        live: bool,
        after: u64,
        limit: usize,
    ) -> Result<Option<RingPage>, ApiError> {
        let last_seq = self.last_seq;
        let first_in_ring = self.ring.front().map_or(last_seq + 1, |e| e.seq);
        if !live && (after > last_seq || first_in_ring > after + 1) {
            return Ok(None);
        }
        if after > last_seq {
            return Err(beyond_last(after, last_seq));
        }
        let gap = (after < last_seq && first_in_ring > after + 1)
            .then(|| (after + 1, (first_in_ring - 1).min(last_seq)));
        let mut events = self.ring.iter().filter(|e| e.seq > after);
        let page: Vec<Arc<RoomEvent>> = events.by_ref().take(limit).cloned().collect();
        let more = events.next().is_some();
        Ok(Some(RingPage {
            live,
            last_seq,
            gap,
            events: page,
            more,
        }))
    }

    /// A page with nothing in it: the cursor is ahead of what this node has.
    fn empty_page(&self, live: bool) -> RingPage {
        RingPage {
            live,
            last_seq: self.last_seq,
            gap: None,
            events: Vec::new(),
            more: false,
        }
    }
}

impl Handler<Restart> for RoomActor {
    type Result = ();

    fn handle(&mut self, _msg: Restart, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// The room was deleted (AdminService.DeleteRoom): every subscriber gets this
/// `removed` push, and the actor answers not_found and retires.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deleted {
    pub frame: Arc<SharedFrame>,
}

impl Handler<Deleted> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Deleted, ctx: &mut Self::Context) {
        self.deleted(msg.frame, ctx);
    }
}

impl RoomActor {
    /// The room was deleted: tells every subscriber with `frame` and retires.
    fn deleted(&mut self, frame: Arc<SharedFrame>, ctx: &mut Context<Self>) {
        for sub in self.drain_subscribers() {
            sub.addr.do_send(RoomPush::Removed {
                room_id: self.id.clone(),
                frame: frame.clone(),
            });
        }
        let gone = ApiError::not_found("room not found");
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(gone.clone()));
        }
        self.broken = Some(gone);
        if !self.retired {
            self.retire(ctx);
        }
        tracing::info!(room = %self.id, "room deleted; actor retired");
    }
}

impl Handler<Retire> for RoomActor {
    type Result = bool;

    fn handle(&mut self, _msg: Retire, ctx: &mut Self::Context) -> bool {
        if self.retired {
            return true;
        }
        if !self.is_idle() {
            return false;
        }
        self.retire(ctx);
        true
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<InjectFault> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: InjectFault, ctx: &mut Self::Context) {
        tracing::warn!(room = %self.id, fault = ?msg, "fault injected (test build)");
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| match msg {
                InjectFault::PanicInNextCommit => act.faults.panic_next_commit = true,
                InjectFault::DelayNextCommit(delay) => act.faults.delay_next_commit = Some(delay),
                InjectFault::DelayAfterNextCommit(delay) => {
                    act.faults.delay_after_next_commit = Some(delay)
                }
                InjectFault::FailCommitsWithText(text) => act.faults.fail_text = Some(text),
                InjectFault::RetireOnNextSubscribe => act.faults.retire_on_subscribe = true,
                InjectFault::PanicInHandler => panic!("injected fault: a room handler panics"),
            },
        )
    }
}

/// What an injected fault does to one commit.
#[cfg(feature = "fault-injection")]
enum CommitFault {
    None,
    Panic,
    Delay(Duration),
    Fail,
}

#[cfg(feature = "fault-injection")]
impl Faults {
    fn for_commit(&mut self, batch: &[NewMessage]) -> CommitFault {
        if std::mem::take(&mut self.panic_next_commit) {
            return CommitFault::Panic;
        }
        if let Some(delay) = self.delay_next_commit.take() {
            return CommitFault::Delay(delay);
        }
        if let Some(text) = &self.fail_text {
            if batch.iter().any(|m| &m.text == text) {
                return CommitFault::Fail;
            }
        }
        CommitFault::None
    }
}

#[cfg(feature = "fault-injection")]
impl CommitFault {
    /// Runs the fault; `Some` replaces the commit's result.
    async fn apply(self) -> Option<Result<Vec<Appended>, StoreError>> {
        match self {
            CommitFault::None => None,
            CommitFault::Panic => panic!("injected fault: the room's commit panics"),
            CommitFault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                None
            }
            CommitFault::Fail => Some(Err(StoreError::Database(sqlx::Error::Protocol(
                "injected store fault".into(),
            )))),
        }
    }
}
