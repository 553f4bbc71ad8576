//! [`FanoutShard`]: one per HTTP worker arbiter, started (under supervision) by the
//! first connection on that arbiter that subscribes to a room. It holds, per room,
//! the subscribers whose connections live on its arbiter, and delivers each batch a
//! room hands it to them: a room with subscribers on every worker sends each shard
//! one message per batch (the batch encoded once per codec, bytes shared), and the
//! shards write to their connections in parallel, each on its own thread. A shard
//! never waits for a connection: one whose queue is full is dropped from the shard
//! and told it lagged (the same handling as a room's own delivery), so a slow
//! consumer delays neither its shard's other connections nor the other shards.
//!
//! The room stays the one place that decides who is subscribed: it adds and removes
//! subscribers here in the same order as it hands out batches (one mailbox, FIFO),
//! and learns from [`ShardLagged`] which ones the shard dropped.
//!
//! A WebSocket subscription's position ([`DirectSub`]) is shared with the shard
//! (the connection is on the same thread): while the connection has the
//! subscription live and a batch is exactly the next one, the shard writes the
//! shared bytes straight into the connection's transport, with no message to the
//! connection actor. Anything else (the subscription is subscribing or catching
//! up, the batch does not follow on, an SSE stream) goes to the connection as a
//! [`RoomPush`] and is handled there as before, so the connection actor still owns
//! the subscription's phases; the sequence check keeps the two paths in order (a
//! batch handed to the actor holds back every later one until the actor wrote it).

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    rc::Rc,
    sync::Arc,
};

use actix::{
    Actor, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler, Message, Recipient,
    Supervised, Supervisor, WrapFuture as _,
};

use super::{
    room::{ConnectionId, EventBatch, RoomPush, Subscriber},
    supervision::guarded,
};
use crate::{
    ids::RoomId,
    protocol::{close, FrameCodec},
    ws::transport::Pusher,
};

/// Adds a subscriber of `room_id` (its connection lives on this shard's arbiter).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddSubscriber {
    pub room_id: RoomId,
    pub subscriber: Subscriber,
    /// Groups the room's subscribers take turns in (`rooms.live.coalesce_groups`
    /// for a live room, 1 for a chat room).
    pub groups: usize,
}

/// Removes a subscriber of `room_id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveSubscriber {
    pub room_id: RoomId,
    pub conn_id: ConnectionId,
}

/// Forgets every subscriber of a room (it restarted or was deleted, and told
/// them itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DropRoom {
    pub room_id: RoomId,
}

/// Delivers a batch of a room to the shard's subscribers of that room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliverBatch {
    pub batch: Arc<EventBatch>,
    /// A live room: a lagging subscriber moves to the tail (see `RoomPush::Lagged`).
    pub live: bool,
    /// Whose turn it is in a room whose subscribers take turns (see [`RoomShare`]);
    /// `None`: everyone's.
    pub turn: Option<Turn>,
    /// Where to report the subscribers the shard dropped.
    pub room: Recipient<ShardLagged>,
    /// Counts the batch as queued to a shard until it is dropped: `QueuedBatch::new(&batch)`.
    pub queued: QueuedBatch,
}

/// One tick of a room whose subscribers take turns: the shard's groups `g` with
/// `g % of == index` are due. The room may tick with fewer groups than the shard
/// keeps (its window is too short for all of them), so each of its turns takes
/// several of the shard's groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    pub index: usize,
    pub of: usize,
}

impl Turn {
    fn takes(self, group: usize) -> bool {
        group % self.of.max(1) == self.index
    }
}

/// A [`DeliverBatch`] on its way to a shard, counted in
/// `roomcast_fanout_shard_queued_batches` and `…_queued_events` from the room's
/// send until the message is dropped: when the shard has written the batch to its
/// connections, or the message was lost with a stopped shard's mailbox. Both are
/// single atomic additions, so the gauges cost the hot path nothing worth
/// measuring; a number that stays high means shards fall behind their rooms.
pub struct QueuedBatch {
    events: i64,
}

impl QueuedBatch {
    /// Counts one batch of `batch`'s events as queued.
    pub fn new(batch: &EventBatch) -> Self {
        let events = i64::try_from(batch.events.len()).unwrap_or(i64::MAX);
        let metrics = crate::metrics::metrics();
        metrics.fanout_shard_queued_batches.inc();
        metrics.fanout_shard_queued_events.inc_by(events);
        metrics.fanout_shard_batches.inc();
        Self { events }
    }
}

impl Drop for QueuedBatch {
    fn drop(&mut self) {
        let metrics = crate::metrics::metrics();
        metrics.fanout_shard_queued_batches.dec();
        metrics.fanout_shard_queued_events.dec_by(self.events);
    }
}

/// The shard dropped a subscriber whose queue was full (and told it it lagged).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShardLagged {
    pub conn_id: ConnectionId,
    /// The registration the shard held (`Subscriber::registration`): a newer one
    /// of the same connection stays.
    pub registration: u64,
}

/// Where one room subscription of a connection stands: the last sequence written to
/// the client, and whether the subscription is live. The connection actor owns it
/// (it is the subscription's only record of that position); the shard of its
/// arbiter writes through it (see the module docs).
pub struct DirectSub {
    conn_id: ConnectionId,
    room_id: RoomId,
    delivered: Cell<u64>,
    live: Cell<bool>,
    /// The connection's socket; `None`: an SSE stream, always reached by message.
    pusher: Option<Pusher>,
    codec: FrameCodec,
}

impl DirectSub {
    /// A subscription position at `delivered`, not live; registered with the
    /// arbiter's shard when `pusher` is given.
    pub fn new(
        conn_id: ConnectionId,
        room_id: RoomId,
        pusher: Option<Pusher>,
        codec: FrameCodec,
        delivered: u64,
    ) -> Rc<Self> {
        let sub = Rc::new(Self {
            conn_id,
            room_id,
            delivered: Cell::new(delivered),
            live: Cell::new(false),
            pusher,
            codec,
        });
        if sub.pusher.is_some() {
            DIRECT.with(|direct| {
                direct
                    .borrow_mut()
                    .insert((sub.conn_id, sub.room_id.clone()), sub.clone())
            });
        }
        sub
    }

    /// The last sequence written to the client.
    pub fn delivered(&self) -> u64 {
        self.delivered.get()
    }

    pub fn set_delivered(&self, seq: u64) {
        self.delivered.set(seq);
    }

    /// Whether the shard may write the next batch itself (the subscription is live).
    pub fn set_live(&self, live: bool) {
        self.live.set(live);
    }

    /// The subscription ended: the shard writes nothing more through it.
    pub fn end(&self) {
        self.live.set(false);
        if self.pusher.is_some() {
            let key = (self.conn_id, self.room_id.clone());
            // `try_with`: a connection dropped while the thread ends finds the
            // registry gone already.
            let _ = DIRECT.try_with(|direct| {
                let mut direct = direct.borrow_mut();
                // Only this subscription's own entry (a newer one may have taken
                // its place).
                if direct
                    .get(&key)
                    .is_some_and(|sub| std::ptr::eq(&**sub, self))
                {
                    direct.remove(&key);
                }
            });
        }
    }

    /// Writes `batch` to the client when the subscription is live and the batch is
    /// exactly the next one (as the connection actor would: one `batch` frame, or
    /// one frame per event); `false`: the connection actor must handle it.
    fn write(&self, batch: &EventBatch, as_batch: bool) -> bool {
        let Some(pusher) = &self.pusher else {
            return false;
        };
        let (Some(first), Some(last)) = (batch.events.first(), batch.events.last()) else {
            return false;
        };
        let (first, last) = (first.seq, last.seq);
        if !self.live.get()
            || first != self.delivered.get().saturating_add(1)
            || last - first + 1 != batch.events.len() as u64
            || pusher.is_closed()
        {
            return false;
        }
        let written = if batch.sends_as_batch(as_batch) {
            pusher.write(batch.batch_wire(self.codec))
        } else if let [event] = &batch.events[..] {
            pusher.write(event.frame.wire(self.codec))
        } else {
            // Several events as single frames: one system call for all of them.
            pusher.write_all(
                batch
                    .events
                    .iter()
                    .map(|event| event.frame.wire(self.codec)),
            )
        };
        self.delivered.set(last);
        if let Err(full) = written {
            // As the connection does when a write overflows its queue: close; the
            // connection actor stops once the writer is done.
            tracing::debug!(conn = self.conn_id, %full, "write queue over budget; closing");
            self.live.set(false);
            pusher.close(
                Some(close::TOO_SLOW),
                "the connection cannot keep up; reconnect and resume",
            );
        }
        true
    }
}

/// Whether `next` continues `prev`: the same room, its first event right after
/// `prev`'s last, and the same kind of room.
fn follows_on(prev: &DeliverBatch, next: &DeliverBatch) -> bool {
    let (Some(last), Some(first)) = (prev.batch.events.last(), next.batch.events.first()) else {
        return false;
    };
    prev.batch.room_id == next.batch.room_id
        && prev.live == next.live
        && last.seq.checked_add(1) == Some(first.seq)
}

/// A subscriber as the shard holds it.
struct Entry {
    subscriber: Subscriber,
    /// Its position, when the connection shares it (a WebSocket).
    direct: Option<Rc<DirectSub>>,
    /// The last sequence this shard handed to it (rooms whose subscribers take
    /// turns).
    sent: u64,
}

impl Entry {
    /// The last sequence the subscriber has: the connection's own position while
    /// the shard writes to it directly, else what the shard handed it.
    fn position(&self) -> u64 {
        match &self.direct {
            Some(direct) if direct.live.get() => direct.delivered(),
            _ => self.sent,
        }
    }
}

/// One room's subscribers on this shard.
///
/// A busy live room's subscribers take turns (`rooms.live.coalesce_groups`): the
/// room ticks every window ÷ groups and each tick is one group's turn, so a
/// subscriber still gets one write per window, and a room of 2,000 sends 500
/// writes every quarter window instead of 2,000 at once. What a group has not
/// been written yet waits in `recent`; its turn writes each of its subscribers
/// everything after its position, as one batch shared by all at the same
/// position. A chat room has one group and every batch is everyone's turn.
struct RoomShare {
    groups: Vec<HashMap<ConnectionId, Entry>>,
    /// The group of the next subscriber (round robin).
    next_group: usize,
    /// The room's latest batches (turn-taking rooms), oldest first, their events
    /// consecutive; twice the groups after each run of turns, so every group's
    /// last turn is covered.
    recent: VecDeque<Arc<EventBatch>>,
}

impl RoomShare {
    fn new(groups: usize) -> Self {
        Self {
            groups: (0..groups.max(1)).map(|_| HashMap::new()).collect(),
            next_group: 0,
            recent: VecDeque::new(),
        }
    }

    fn takes_turns(&self) -> bool {
        self.groups.len() > 1
    }

    fn is_empty(&self) -> bool {
        self.groups.iter().all(HashMap::is_empty)
    }

    fn last_seq(&self) -> u64 {
        self.recent
            .back()
            .and_then(|batch| batch.events.last())
            .map_or(0, |event| event.seq)
    }

    fn insert(
        &mut self,
        conn_id: ConnectionId,
        subscriber: Subscriber,
        direct: Option<Rc<DirectSub>>,
    ) {
        self.remove(conn_id);
        // Batches the room sent before this subscriber are not for it.
        let entry = Entry {
            subscriber,
            direct,
            sent: self.last_seq(),
        };
        let group = self.next_group % self.groups.len();
        self.next_group = self.next_group.wrapping_add(1);
        self.groups[group].insert(conn_id, entry);
    }

    fn remove(&mut self, conn_id: ConnectionId) -> Option<Entry> {
        self.groups
            .iter_mut()
            .find_map(|group| group.remove(&conn_id))
    }

    /// Keeps a batch of a turn-taking room until every group had its turn.
    fn record(&mut self, batch: &Arc<EventBatch>) {
        let Some(first) = batch.events.first() else {
            return;
        };
        if self.last_seq().checked_add(1) != Some(first.seq) {
            // Not consecutive (the first batch, or events no node delivered): a
            // subscriber behind it is told by the gap it sees.
            self.recent.clear();
        }
        self.recent.push_back(batch.clone());
    }

    /// Forgets the batches every group has been written past (a run of several is
    /// trimmed only after its turns: a shard that fell behind keeps them all).
    fn trim(&mut self) {
        while self.recent.len() > 2 * self.groups.len() {
            self.recent.pop_front();
        }
    }
}

/// Everything `recent` holds after `position`, as one batch; `None`: nothing. A
/// position before what `recent` holds gets all of it (the connection sees the
/// gap and catches up).
fn events_after(
    recent: &VecDeque<Arc<EventBatch>>,
    room_id: &RoomId,
    position: u64,
) -> Option<Arc<EventBatch>> {
    let last = recent.back()?;
    if last.events.last()?.seq <= position {
        return None;
    }
    if last
        .events
        .first()
        .is_some_and(|e| e.seq == position.wrapping_add(1))
    {
        // The newest batch only: shared as it is, with its encodings.
        return Some(last.clone());
    }
    let events = recent
        .iter()
        .flat_map(|batch| batch.events.iter())
        .filter(|event| event.seq > position)
        .cloned()
        .collect();
    Some(Arc::new(EventBatch::new(room_id.clone(), events)))
}

/// A batch's bytes per codec, as single frames and as one batch frame (filled on
/// first use).
type WireSizes = [[Option<usize>; 2]; 2];

/// Why a subscriber was not handed a batch: its queue is full.
struct Full;

/// Hands `batch` to one subscriber: straight into its socket when the shard may
/// write there, else as a message to its connection. Returns the events written
/// directly and those handed over as a message.
fn hand(entry: &Entry, batch: &Arc<EventBatch>, sizes: &mut WireSizes) -> Result<(u64, u64), Full> {
    let sub = &entry.subscriber;
    let events = batch.events.len() as u64;
    let bytes = *sizes[sub.codec as usize][usize::from(sub.batch)]
        .get_or_insert_with(|| batch.wire_len(sub.codec, sub.batch));
    if !sub.gauge.try_reserve(bytes) {
        return Err(Full);
    }
    if let Some(direct) = &entry.direct {
        // The transport charges the gauge itself as it queues.
        sub.gauge.release(bytes);
        if direct.write(batch, sub.batch) {
            return Ok((events, 0));
        }
        if !sub.gauge.try_reserve(bytes) {
            return Err(Full);
        }
    }
    let push = RoomPush::Events {
        batch: batch.clone(),
        bytes,
    };
    if sub.addr.try_send(push).is_err() {
        sub.gauge.release(bytes);
        return Err(Full);
    }
    Ok((0, events))
}

/// One arbiter's share of every room's subscribers.
#[derive(Default)]
pub struct FanoutShard {
    rooms: HashMap<RoomId, RoomShare>,
    /// Batches received and not yet written, in arrival order (see
    /// [`FanoutShard::drain`]).
    pending: Vec<DeliverBatch>,
    /// A drain is scheduled.
    draining: bool,
}

thread_local! {
    /// The shard of the arbiter this thread runs.
    static LOCAL: RefCell<Option<Addr<FanoutShard>>> = const { RefCell::new(None) };
    /// The subscription positions of this arbiter's WebSocket connections, by
    /// connection and room, for the shard to pick up when the room adds them.
    static DIRECT: RefCell<HashMap<(ConnectionId, RoomId), Rc<DirectSub>>> =
        RefCell::new(HashMap::new());
}

/// The shard of the current arbiter, started on first use. Call it from an actor
/// running on an HTTP worker's arbiter (a connection).
pub fn local_shard() -> Addr<FanoutShard> {
    LOCAL.with(|local| {
        local
            .borrow_mut()
            .get_or_insert_with(|| Supervisor::start(|_| FanoutShard::default()))
            .clone()
    })
}

impl FanoutShard {
    /// Writes every pending batch, merging each run of batches of one room whose
    /// events follow on into one batch. The drain runs after the shard's mailbox
    /// was emptied (and before any subscriber is added or removed, so each batch
    /// still reaches exactly the subscribers the room sent it to). A shard that
    /// fell behind its rooms (it was writing a big batch while they committed
    /// more) so catches up with one write per subscriber for all that queued
    /// meanwhile instead of one per batch: its cost per event falls as its load
    /// rises, and a quiet room's batch, alone in the mailbox, goes out as before.
    /// A room whose subscribers take turns writes once for the run, to every
    /// group whose turn came in it.
    fn drain(&mut self) {
        self.draining = false;
        let mut pending = std::mem::take(&mut self.pending).into_iter().peekable();
        while let Some(first) = pending.next() {
            if self
                .rooms
                .get(&first.batch.room_id)
                .is_some_and(RoomShare::takes_turns)
            {
                let room_id = first.batch.room_id.clone();
                let mut run = vec![first];
                while let Some(next) = pending.next_if(|next| next.batch.room_id == room_id) {
                    run.push(next);
                }
                self.take_turns(run);
                continue;
            }
            let mut run = vec![first];
            while let Some(next) = pending.next_if(|next| follows_on(&run[run.len() - 1], next)) {
                run.push(next);
            }
            let Some(last) = run.pop() else {
                continue;
            };
            if run.is_empty() {
                self.deliver(last);
                continue;
            }
            let events = run
                .iter()
                .chain([&last])
                .flat_map(|msg| msg.batch.events.iter().cloned())
                .collect();
            let merged = EventBatch::new(last.batch.room_id.clone(), events);
            crate::metrics::metrics()
                .fanout_shard_merged_batches
                .inc_by(run.len() as u64);
            // The earlier batches' queue gauges are released once written.
            let _earlier: Vec<QueuedBatch> = run.into_iter().map(|msg| msg.queued).collect();
            self.deliver(DeliverBatch {
                batch: Arc::new(merged),
                ..last
            });
        }
        // The vector's allocation goes with the batches: an idle shard keeps none.
    }

    /// Delivers a batch to every subscriber of its room (one group).
    fn deliver(&mut self, msg: DeliverBatch) {
        let batch = msg.batch;
        let Some(share) = self.rooms.get_mut(&batch.room_id) else {
            return;
        };
        let mut sizes = [[None, None], [None, None]];
        let mut lagged = Vec::new();
        let (mut direct, mut handed) = (0, 0);
        for group in &share.groups {
            for (conn_id, entry) in group {
                match hand(entry, &batch, &mut sizes) {
                    Ok((d, h)) => {
                        direct += d;
                        handed += h;
                    }
                    Err(Full) => lagged.push(*conn_id),
                }
            }
        }
        count_delivered(direct, handed);
        self.drop_lagged(&batch.room_id, lagged, msg.live, &msg.room);
    }

    /// A run of batches of a room whose subscribers take turns: keeps them, then
    /// writes to each group whose turn came in the run everything after its
    /// subscribers' positions (one batch per position: normally one per group).
    fn take_turns(&mut self, run: Vec<DeliverBatch>) {
        let Some(last) = run.last() else {
            return;
        };
        let (room_id, live, room) = (last.batch.room_id.clone(), last.live, last.room.clone());
        let Some(share) = self.rooms.get_mut(&room_id) else {
            return;
        };
        for msg in &run {
            share.record(&msg.batch);
        }
        let ticks: Vec<Option<Turn>> = run.iter().map(|msg| msg.turn).collect();
        let mut slices: HashMap<u64, Option<(Arc<EventBatch>, WireSizes)>> = HashMap::new();
        let mut lagged = Vec::new();
        let (mut direct, mut handed, mut turns) = (0, 0, 0);
        let RoomShare { groups, recent, .. } = &mut *share;
        for (index, group) in groups.iter_mut().enumerate() {
            if !ticks
                .iter()
                .any(|tick| tick.is_none_or(|turn| turn.takes(index)))
            {
                continue;
            }
            turns += 1;
            for (conn_id, entry) in group.iter_mut() {
                let position = entry.position();
                let slice = slices.entry(position).or_insert_with(|| {
                    events_after(recent, &room_id, position)
                        .map(|batch| (batch, [[None, None], [None, None]]))
                });
                let Some((batch, sizes)) = slice else {
                    continue;
                };
                match hand(entry, batch, sizes) {
                    Ok((d, h)) => {
                        direct += d;
                        handed += h;
                        entry.sent = batch.events.last().map_or(entry.sent, |e| e.seq);
                    }
                    Err(Full) => lagged.push(*conn_id),
                }
            }
        }
        share.trim();
        count_delivered(direct, handed);
        crate::metrics::metrics().fanout_shard_turns.inc_by(turns);
        self.drop_lagged(&room_id, lagged, live, &room);
    }

    /// Drops the subscribers whose queues were full, tells them they lagged and
    /// tells the room.
    fn drop_lagged(
        &mut self,
        room_id: &RoomId,
        lagged: Vec<ConnectionId>,
        live: bool,
        room: &Recipient<ShardLagged>,
    ) {
        let Some(share) = self.rooms.get_mut(room_id) else {
            return;
        };
        for conn_id in lagged {
            if let Some(Entry {
                subscriber: sub, ..
            }) = share.remove(conn_id)
            {
                tracing::debug!(room = %room_id, conn = conn_id, "subscriber lagged (shard)");
                crate::metrics::metrics().subscribers_lagged.inc();
                sub.addr.do_send(RoomPush::Lagged {
                    room_id: room_id.clone(),
                    tail: live,
                });
                room.do_send(ShardLagged {
                    conn_id,
                    registration: sub.registration,
                });
            }
        }
        if share.is_empty() {
            self.rooms.remove(room_id);
        }
    }
}

fn count_delivered(direct: u64, handed: u64) {
    let metrics = crate::metrics::metrics();
    metrics.messages_delivered.inc_by(direct + handed);
    metrics.messages_delivered_direct.inc_by(direct);
}

impl Actor for FanoutShard {
    type Context = Context<Self>;
}

impl Supervised for FanoutShard {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // The subscribers stay: the rooms still count on this shard for them.
        tracing::warn!(rooms = self.rooms.len(), "fan-out shard restarting");
    }
}

impl Handler<AddSubscriber> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: AddSubscriber, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                // Batches the room sent before this subscriber are not for it.
                act.drain();
                let conn_id = msg.subscriber.conn_id;
                let direct = DIRECT.with(|direct| {
                    direct
                        .borrow()
                        .get(&(conn_id, msg.room_id.clone()))
                        .cloned()
                });
                act.rooms
                    .entry(msg.room_id)
                    .or_insert_with(|| RoomShare::new(msg.groups))
                    .insert(conn_id, msg.subscriber, direct);
            },
        )
    }
}

impl Handler<RemoveSubscriber> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: RemoveSubscriber, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                // Batches the room sent before the removal are still for it.
                act.drain();
                if let Some(share) = act.rooms.get_mut(&msg.room_id) {
                    share.remove(msg.conn_id);
                    if share.is_empty() {
                        act.rooms.remove(&msg.room_id);
                    }
                }
            },
        )
    }
}

impl Handler<DropRoom> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: DropRoom, _ctx: &mut Self::Context) {
        self.drain();
        self.rooms.remove(&msg.room_id);
    }
}

impl Handler<DeliverBatch> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: DeliverBatch, ctx: &mut Self::Context) {
        self.pending.push(msg);
        if !self.draining {
            self.draining = true;
            // After the mailbox: the batches queued behind this one join it.
            ctx.spawn(
                tokio::task::yield_now()
                    .into_actor(self)
                    .map(|(), act, ctx| guarded(act, ctx, || (), |act, _ctx| act.drain())),
            );
        }
    }
}
