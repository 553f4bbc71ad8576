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
//! it delivered, so nothing committed is ever skipped.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, AsyncContext as _,
    Context, Handler, Message, Recipient, ResponseFuture, SpawnHandle, Supervised,
};
use tokio::sync::oneshot;

use crate::{
    error::{ApiError, Code},
    ids::{RoomId, UserId},
    model::RoomKind,
    proto::v1 as pb,
    protocol::{FrameCodec, RoomEvent, SharedFrame},
    settings::Settings,
    store::{AppendRejection, Appended, MessageRecord, NewMessage, Store, StoreError},
};

/// Identifies one connection (unique within this process).
pub type ConnectionId = u64;

/// How often an idle room checks whether it may retire (at most; shorter when
/// `rooms.idle_stop_secs` is shorter).
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The message of the error a retired room answers with.
const RETIRED_MESSAGE: &str = "room actor retired; retry";

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

/// Committed events of one room, in sequence order, shared by every subscriber.
#[derive(Debug)]
pub struct EventBatch {
    pub room_id: RoomId,
    pub events: Vec<Arc<RoomEvent>>,
}

impl EventBatch {
    /// Bytes the batch takes on a connection using `codec` (encodes on first use).
    fn wire_len(&self, codec: FrameCodec) -> usize {
        self.events.iter().map(|e| e.frame.wire(codec).len()).sum()
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
    Lagged { room_id: RoomId },
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
}

/// Appends one event; answered after commit.
#[derive(Message)]
#[rtype(result = "Result<Appended, ApiError>")]
pub struct Append {
    pub message: NewMessage,
}

/// Starts delivery to a subscriber, replaying what came after `since`.
#[derive(Message)]
#[rtype(result = "Result<SubscribeReply, ApiError>")]
pub struct Subscribe {
    pub subscriber: Subscriber,
    /// `None`: live only.
    pub since: Option<u64>,
}

/// The answer to [`Subscribe`].
#[derive(Debug)]
pub enum SubscribeReply {
    /// Registered: `replay` holds every event after `since` up to `last_seq`;
    /// live delivery continues after `last_seq`.
    Live {
        last_seq: u64,
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
    Updated(pb::Room),
    /// A member came online or went offline.
    Presence { user_id: UserId, online: bool },
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

/// Reports the room as idle to its registry.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomIdle {
    pub room_id: RoomId,
}

type PendingAppend = (NewMessage, oneshot::Sender<Result<Appended, ApiError>>);

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
    pending: VecDeque<PendingAppend>,
    writing: bool,
    /// Set when loading failed; every request is answered with it.
    broken: Option<ApiError>,
    retired: bool,
    idle_since: Instant,
    idle_timer: Option<SpawnHandle>,
    /// Committed events not yet delivered (coalescing window).
    outbox: Vec<Arc<RoomEvent>>,
    /// When the outbox was last delivered.
    last_flush: Instant,
    /// Set while a delayed outbox delivery is scheduled.
    flush_timer: Option<SpawnHandle>,
}

impl RoomActor {
    pub fn new(
        id: RoomId,
        store: Store,
        settings: Arc<Settings>,
        registry: Option<Recipient<RoomIdle>>,
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
            pending: VecDeque::new(),
            writing: false,
            broken: None,
            retired: false,
            idle_since: Instant::now(),
            idle_timer: None,
            outbox: Vec::new(),
            last_flush: Instant::now(),
            flush_timer: None,
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
            async move { store.get_room(&id).await }
                .into_actor(self)
                .map(|result, act, _ctx| match result {
                    Ok(room) => {
                        act.kind = Some(room.kind);
                        act.last_seq = room.last_seq;
                        act.broken = None;
                        tracing::debug!(room = %act.id, last_seq = act.last_seq, "room loaded");
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

    /// Starts a group commit of everything pending, unless one is running.
    fn flush(&mut self, ctx: &mut Context<Self>) {
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
        let take = self.pending.len().min(self.settings.rooms.max_batch);
        let batch: Vec<PendingAppend> = self.pending.drain(..take).collect();
        let messages: Vec<NewMessage> = batch.iter().map(|(m, _)| m.clone()).collect();
        let store = self.store.clone();
        let room = self.id.clone();
        ctx.spawn(
            async move { store.append_messages(&room, &messages).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.writing = false;
                    act.committed(batch, result, ctx);
                    act.flush(ctx);
                }),
        );
    }

    /// Answers the senders of a committed batch and fans its events out.
    fn committed(
        &mut self,
        batch: Vec<PendingAppend>,
        result: Result<Vec<Appended>, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let results = match result {
            Ok(results) => results,
            Err(e) => {
                let error = ApiError::from(e);
                for (_, reply) in batch {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
        };
        let mut events = Vec::new();
        for ((_, reply), outcome) in batch.into_iter().zip(results) {
            match &outcome {
                Appended::Stored(record) => events.push(record.clone()),
                Appended::Duplicate(_) => {}
                Appended::Rejected(rejection) => {
                    let _ = reply.send(Err(rejection_error(*rejection)));
                    continue;
                }
            }
            let _ = reply.send(Ok(outcome));
        }
        self.publish(&events, ctx);
    }

    /// Adds committed events to the ring and delivers them to every subscriber.
    fn publish(&mut self, records: &[MessageRecord], ctx: &mut Context<Self>) {
        if records.is_empty() {
            return;
        }
        for record in records {
            let event = Arc::new(RoomEvent::new(record));
            if event.seq != self.last_seq + 1 {
                // Someone else appended in between (another node); the ring would
                // have a hole, so start it afresh from here.
                self.ring.clear();
            }
            self.last_seq = event.seq;
            self.ring.push_back(event.clone());
            self.outbox.push(event);
        }
        while self.ring.len() > self.settings.rooms.ring_size {
            self.ring.pop_front();
        }
        // Coalescing: a room that flushed within the window waits for the window to
        // end and sends everything since in one push per subscriber; a quiet room
        // flushes at once, so it adds no latency.
        if self.flush_timer.is_some() {
            return;
        }
        let window = Duration::from_millis(self.settings.realtime.coalesce_window_ms);
        let since = self.last_flush.elapsed();
        if since >= window {
            self.flush_outbox();
        } else {
            self.flush_timer = Some(ctx.run_later(window - since, |act, _| {
                act.flush_timer = None;
                act.flush_outbox();
            }));
        }
    }

    /// Delivers the events waiting in the outbox to every subscriber, as one batch.
    fn flush_outbox(&mut self) {
        self.last_flush = Instant::now();
        if self.outbox.is_empty() {
            return;
        }
        let batch = Arc::new(EventBatch {
            room_id: self.id.clone(),
            events: std::mem::take(&mut self.outbox),
        });
        let mut sizes = [None, None];
        let mut lagged = Vec::new();
        for (conn_id, sub) in &self.subscribers {
            let bytes = *sizes[sub.codec as usize].get_or_insert_with(|| batch.wire_len(sub.codec));
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
            }
        }
        for conn_id in lagged {
            if let Some(sub) = self.subscribers.remove(&conn_id) {
                tracing::debug!(room = %self.id, conn = conn_id, "subscriber lagged");
                sub.addr.do_send(RoomPush::Lagged {
                    room_id: self.id.clone(),
                });
            }
        }
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

    fn check_idle(&mut self) {
        let idle = self.subscribers.is_empty() && self.pending.is_empty() && !self.writing;
        if !idle {
            self.idle_since = Instant::now();
            return;
        }
        if self.idle_since.elapsed() >= Duration::from_secs(self.settings.rooms.idle_stop_secs) {
            if let Some(registry) = &self.registry {
                registry.do_send(RoomIdle {
                    room_id: self.id.clone(),
                });
            }
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
        self.idle_timer = Some(ctx.run_interval(every, |act, _| act.check_idle()));
    }
}

impl Supervised for RoomActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::warn!(room = %self.id, subscribers = self.subscribers.len(), "room actor restarting");
        // In-flight commits were dropped with the old context: their senders get
        // an error and retry with the same client message id (idempotent).
        self.writing = false;
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(ApiError::unavailable(
                "room restarted; retry with the same client_message_id",
            )));
        }
        self.ring.clear();
        for (_, sub) in self.subscribers.drain() {
            sub.addr.do_send(RoomPush::Resync {
                room_id: self.id.clone(),
            });
        }
        self.idle_timer = None;
        // Undelivered events are dropped with the subscribers, who resynchronise
        // from the store.
        self.outbox.clear();
        self.flush_timer = None;
    }
}

impl Handler<Append> for RoomActor {
    type Result = ResponseFuture<Result<Appended, ApiError>>;

    fn handle(&mut self, msg: Append, ctx: &mut Self::Context) -> Self::Result {
        let (reply, outcome) = oneshot::channel();
        self.pending.push_back((msg.message, reply));
        self.flush(ctx);
        Box::pin(async move {
            outcome.await.unwrap_or_else(|_| {
                Err(ApiError::unavailable(
                    "room restarted; retry with the same client_message_id",
                ))
            })
        })
    }
}

impl Handler<Subscribe> for RoomActor {
    type Result = Result<SubscribeReply, ApiError>;

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(error) = self.unavailable() {
            return Err(error);
        }
        let last_seq = self.last_seq;
        let replay = match msg.since {
            None => Vec::new(),
            Some(since) if since > last_seq => {
                return Err(ApiError::new(
                    Code::OutOfRange,
                    format!("since_seq {since} is beyond the room's last sequence {last_seq}"),
                ))
            }
            Some(since) if since == last_seq => Vec::new(),
            Some(since) => {
                let first_in_ring = self.ring.front().map_or(u64::MAX, |e| e.seq);
                if first_in_ring > since + 1 {
                    return Ok(SubscribeReply::Behind { last_seq });
                }
                self.ring
                    .iter()
                    .filter(|e| e.seq > since)
                    .cloned()
                    .collect()
            }
        };
        self.subscribers
            .insert(msg.subscriber.conn_id, msg.subscriber);
        self.idle_since = Instant::now();
        Ok(SubscribeReply::Live { last_seq, replay })
    }
}

impl Handler<Unsubscribe> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Self::Context) {
        self.subscribers.remove(&msg.conn_id);
    }
}

impl Handler<Relay> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Relay, _ctx: &mut Self::Context) {
        self.notice(msg.frame, msg.except);
    }
}

impl Handler<Notify> for RoomActor {
    type Result = ();

    fn handle(&mut self, Notify(notice): Notify, _ctx: &mut Self::Context) {
        use crate::protocol::push;
        use pb::server_frame::Kind;
        match notice {
            RoomNotice::Member(event) => self.notice(push(Kind::Member(event)), None),
            RoomNotice::Updated(room) => self.notice(push(Kind::RoomUpdated(room)), None),
            RoomNotice::Presence { user_id, online } => self.notice(
                push(Kind::Presence(pb::PresenceEvent {
                    room_id: self.id.0.clone(),
                    user_id: user_id.0,
                    online,
                })),
                None,
            ),
            RoomNotice::Removed {
                user_id,
                reason,
                message,
            } => {
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
                    if let Some(sub) = self.subscribers.remove(&conn_id) {
                        sub.addr.do_send(RoomPush::Removed {
                            room_id: self.id.clone(),
                            frame: frame.clone(),
                        });
                    }
                }
            }
        }
    }
}

impl Handler<Restart> for RoomActor {
    type Result = ();

    fn handle(&mut self, _msg: Restart, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Retire> for RoomActor {
    type Result = bool;

    fn handle(&mut self, _msg: Retire, ctx: &mut Self::Context) -> bool {
        if !(self.subscribers.is_empty() && self.pending.is_empty() && !self.writing) {
            return false;
        }
        self.retired = true;
        if let Some(timer) = self.idle_timer.take() {
            ctx.cancel_future(timer);
        }
        tracing::debug!(room = %self.id, "room retired");
        true
    }
}
