//! [`PollHub`]: one per node, under supervision. It wakes the long-polls
//! (`PushService.Poll`, [`crate::domain::push`]) that wait on this node, and keeps
//! nothing a poll needs to be answered: a poll brings its cursors and reads the
//! store, so any node can answer any poll; the hub only says "look again".
//!
//! - Rooms: for every room that has waiters, the hub holds one subscription at the
//!   room actor (a [`Subscriber`] like a connection's, on behalf of every waiter of
//!   the room) and drops it when the last waiter leaves. A committed event wakes
//!   every waiter of the room; a membership change wakes the waiters of the user it
//!   is about (they check their read access again).
//! - User notifications: [`NotificationStored`] wakes the user's waiters that poll
//!   their notifications.
//! - Poll ids: a waiter registered with the same `(user, poll_id)` as an older one
//!   ends the older at once ([`PollEnd::Superseded`]). Across nodes (the Redis
//!   broker), the hub publishes a `PollTaken` control message for each waiter
//!   with a poll id; the other nodes' hubs end their waiter of that key
//!   ([`PollTakenElsewhere`]) if it registered no later than the new one (so a
//!   message that arrives late never ends a poll newer than the one it announces).
//! - [`EndUserPolls`] ends every waiter of a user (DisconnectUser), or of one of
//!   their sessions (sign-out and session revocation, from the session registry).
//!
//! A waiter is a [`WaiterSignal`] the poll awaits; the poll's [`WatchGuard`]
//! unregisters it when the poll returns or is dropped (the client went away), so
//! no waiter outlives its request. The `roomcast_poll_waiters` gauge counts them.
//!
//! Wake-ups never carry data, so a lost or extra wake-up costs at most a store
//! read or a wait until the poll's own timeout: when a room subscription is
//! (re)established (first waiter, room restart, lag), every waiter of the room is
//! woken once, which covers events committed before the subscription was live.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix::{
    fut::WrapFuture as _, Actor, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler,
    Message, Supervised,
};
use tokio::sync::Notify;

use super::{
    room::{
        ConnectionId, OutboundGauge, RoomActor, RoomPush, Subscribe, SubscribeReply, Subscriber,
        Unsubscribe,
    },
    room_registry::{GetRoom, RoomRegistry},
    supervision::guarded,
};
use crate::{
    cluster::{Body, Bus, Topic},
    ids::{RoomId, SessionId, UserId},
    proto::node::v1 as node,
    protocol::FrameCodec,
};

/// The user id the hub's room subscriptions carry: never a real user's (those
/// are `u_...`), so no removal of a user ever ends them.
pub const HUB_SUBSCRIBER: &str = "poll-hub";

/// Connection ids of the hub's room subscriptions count down from the top of
/// the range; connections count up from 1, so the two never meet.
const FIRST_SUBSCRIPTION_ID: ConnectionId = u64::MAX;

/// Mailbox capacity: rooms `try_send` their pushes and treat a full mailbox as
/// a lagging subscriber, so the hub (one subscriber standing for many waiters)
/// takes a deep queue.
const MAILBOX_CAPACITY: usize = 4096;

/// How long to wait before subscribing to a room again after the room actor went
/// away (retired or restarting).
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(50);

/// Attempts to subscribe to a room in a row before giving up until the next
/// waiter of the room (its waiters then wait until their timeout).
const MAX_SUBSCRIBE_ATTEMPTS: u32 = 20;

/// Why a poll ended without its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollEnd {
    /// A newer poll of the same user with the same poll id took over.
    Superseded,
    /// The application's backend disconnected the user (DisconnectUser).
    Disconnected { reason: String },
    /// The poll's session was signed out or revoked.
    SignedOut,
    /// The node is shutting down.
    Shutdown,
}

/// What a waiting poll awaits: a wake-up, or the end.
#[derive(Debug, Default)]
pub struct WaiterSignal {
    notify: Notify,
    ended: Mutex<Option<PollEnd>>,
}

impl WaiterSignal {
    /// Completes at the next wake-up (at once if one came since the last call).
    pub async fn woken(&self) {
        self.notify.notified().await
    }

    /// Why the poll was ended, if it was.
    pub fn ended(&self) -> Option<PollEnd> {
        self.ended.lock().map(|e| e.clone()).unwrap_or(None)
    }

    fn wake(&self) {
        // A permit is stored when nobody waits yet, so a wake-up that comes while
        // the poll reads the store is not lost.
        self.notify.notify_one();
    }

    fn end(&self, why: PollEnd) {
        if let Ok(mut ended) = self.ended.lock() {
            ended.get_or_insert(why);
        }
        self.wake();
    }
}

/// Identifies one waiter within the hub.
pub type WaiterId = u64;

/// Registers a waiting poll; answered with its signal, or [`TooManyWaiters`] when
/// the user already has `poll.max_waiting_per_user` waiting polls on this node.
#[derive(Message)]
#[rtype(result = "Result<Watching, TooManyWaiters>")]
pub struct Watch {
    pub user_id: UserId,
    /// The session the poll was authenticated with, if by an access token.
    pub session_id: Option<SessionId>,
    /// The client's poll id; empty: none.
    pub poll_id: String,
    pub rooms: Vec<RoomId>,
    /// Wake on the user's new notifications.
    pub notifications: bool,
}

/// The answer to [`Watch`].
pub struct Watching {
    pub id: WaiterId,
    pub signal: Arc<WaiterSignal>,
}

/// The user's waiting polls are at the limit (the value).
#[derive(Debug, Clone, Copy)]
pub struct TooManyWaiters(pub usize);

/// Unregisters a waiter (its poll returned or was dropped).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch {
    pub id: WaiterId,
}

/// A notification of the user was stored: wakes their waiters.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NotificationStored {
    pub user_id: UserId,
}

/// Ends every waiter of a user, or of one of their sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndUserPolls {
    pub user_id: UserId,
    /// Only the polls authenticated with this session; `None`: all of them.
    pub session_id: Option<SessionId>,
    pub why: PollEnd,
}

/// Ends every waiter (the node shuts down or drains).
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndAllPolls;

/// A poll with this `(user, poll_id)` started waiting on another node
/// (`origin`) at `registered_at_ms`: this node's waiter of that key ends
/// ([`PollEnd::Superseded`]) if it registered no later. From the control topic
/// ([`crate::cluster::control`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PollTakenElsewhere {
    pub user_id: UserId,
    pub poll_id: String,
    pub origin: String,
    pub registered_at_ms: i64,
}

/// How many polls wait on this node (for tests and operations).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountWaiters;

/// Unregisters its waiter when dropped: when the poll returns, and when the HTTP
/// request is dropped because the client went away.
pub struct WatchGuard {
    hub: Addr<PollHub>,
    id: WaiterId,
    /// The waiter's signal.
    pub signal: Arc<WaiterSignal>,
}

impl WatchGuard {
    /// Registers a waiter with `hub`; `Ok(None)` when the hub is restarting (the
    /// poll then answers at once instead of waiting).
    pub async fn watch(hub: &Addr<PollHub>, watch: Watch) -> Result<Option<Self>, TooManyWaiters> {
        let Ok(watching) = hub.send(watch).await else {
            return Ok(None);
        };
        let watching = watching?;
        Ok(Some(Self {
            hub: hub.clone(),
            id: watching.id,
            signal: watching.signal,
        }))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.hub.do_send(Unwatch { id: self.id });
    }
}

struct Waiter {
    user_id: UserId,
    session_id: Option<SessionId>,
    poll_id: String,
    rooms: Vec<RoomId>,
    notifications: bool,
    signal: Arc<WaiterSignal>,
    /// When it registered, milliseconds since the Unix epoch (compared with the
    /// other nodes' `PollTaken`).
    registered_at_ms: i64,
}

/// The hub's subscription to one room.
struct RoomWatch {
    waiters: HashSet<WaiterId>,
    conn_id: ConnectionId,
    /// The room actor, once subscribed.
    room: Option<Addr<RoomActor>>,
    /// Bumped on every (re)subscription; answers of older ones are ignored.
    generation: u64,
    attempts: u32,
}

/// Wakes this node's waiting long-polls; see the module docs.
pub struct PollHub {
    registry: Addr<RoomRegistry>,
    /// Tells the other nodes about waiters with a poll id (`None`: alone).
    bus: Option<Bus>,
    /// `poll.max_waiting_per_user`.
    max_per_user: usize,
    waiters: HashMap<WaiterId, Waiter>,
    rooms: HashMap<RoomId, RoomWatch>,
    by_user: HashMap<UserId, HashSet<WaiterId>>,
    by_poll_id: HashMap<(UserId, String), WaiterId>,
    next_waiter: WaiterId,
    next_conn: ConnectionId,
    /// Rooms charge pushes here; the hub gives the bytes back on receipt.
    gauge: Arc<OutboundGauge>,
    waiters_gauge: crate::metrics::GaugeShare,
}

impl PollHub {
    pub fn new(registry: Addr<RoomRegistry>, max_per_user: usize) -> Self {
        Self {
            registry,
            bus: None,
            max_per_user,
            waiters: HashMap::new(),
            rooms: HashMap::new(),
            by_user: HashMap::new(),
            by_poll_id: HashMap::new(),
            next_waiter: 1,
            next_conn: FIRST_SUBSCRIPTION_ID,
            gauge: Arc::new(OutboundGauge::new(usize::MAX)),
            waiters_gauge: crate::metrics::GaugeShare::poll_waiters(),
        }
    }

    /// Announces the waiters with a poll id on `bus` when it links several nodes,
    /// so that a newer poll with the same poll id on another node ends them.
    pub fn with_bus(mut self, bus: Bus) -> Self {
        self.bus = bus.is_shared().then_some(bus);
        self
    }

    /// Tells the other nodes that waiter `id` took `(user_id, poll_id)`.
    fn announce_taken(&self, user_id: &UserId, poll_id: &str, id: WaiterId, at_ms: i64) {
        let Some(bus) = &self.bus else {
            return;
        };
        bus.publish(
            Topic::Control,
            Body::Control(node::Control {
                kind: Some(node::control::Kind::PollTaken(node::PollTaken {
                    user_id: user_id.0.clone(),
                    poll_id: poll_id.to_owned(),
                    registration: id,
                    registered_at_ms: at_ms,
                })),
            }),
            None,
        );
    }

    fn count(&mut self) {
        self.waiters_gauge.set(self.waiters.len());
    }

    fn remove_waiter(&mut self, id: WaiterId) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        if let Some(ids) = self.by_user.get_mut(&waiter.user_id) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_user.remove(&waiter.user_id);
            }
        }
        if !waiter.poll_id.is_empty() {
            let key = (waiter.user_id.clone(), waiter.poll_id.clone());
            if self.by_poll_id.get(&key) == Some(&id) {
                self.by_poll_id.remove(&key);
            }
        }
        for room_id in &waiter.rooms {
            let Some(watch) = self.rooms.get_mut(room_id) else {
                continue;
            };
            watch.waiters.remove(&id);
            if watch.waiters.is_empty() {
                if let Some(watch) = self.rooms.remove(room_id) {
                    if let Some(room) = watch.room {
                        room.do_send(Unsubscribe {
                            conn_id: watch.conn_id,
                        });
                    }
                }
            }
        }
        self.count();
        Some(waiter)
    }

    fn wake_room(&self, room_id: &RoomId) {
        if let Some(watch) = self.rooms.get(room_id) {
            for id in &watch.waiters {
                if let Some(waiter) = self.waiters.get(id) {
                    waiter.signal.wake();
                }
            }
        }
    }

    /// Subscribes to the room on behalf of its waiters; once live, wakes them.
    fn subscribe(&mut self, ctx: &mut Context<Self>, room_id: &RoomId) {
        let Some(watch) = self.rooms.get_mut(room_id) else {
            return;
        };
        watch.generation += 1;
        watch.attempts += 1;
        if let Some(room) = watch.room.take() {
            room.do_send(Unsubscribe {
                conn_id: watch.conn_id,
            });
        }
        // A fresh id per attempt: an outdated attempt's subscription is dropped by
        // its own id, never by one a newer attempt registered.
        watch.conn_id = self.next_conn;
        self.next_conn -= 1;
        let generation = watch.generation;
        let subscriber = Subscriber {
            conn_id: watch.conn_id,
            user_id: UserId(HUB_SUBSCRIBER.to_owned()),
            codec: FrameCodec::Json,
            addr: ctx.address().recipient(),
            gauge: self.gauge.clone(),
            // The hub only wakes waiters; one frame per event is as cheap as a batch.
            batch: false,
            // One subscriber per room: the room delivers to it itself.
            shard: None,
            registration: 0,
        };
        let conn_id = watch.conn_id;
        let registry = self.registry.clone();
        let id = room_id.clone();
        let fut = async move {
            let room = registry
                .send(GetRoom {
                    room_id: id.clone(),
                })
                .await
                .ok()
                .flatten()?;
            let reply = room
                .send(Subscribe {
                    subscriber,
                    since: None,
                    access_checked_at: Instant::now(),
                    anonymous: false,
                    tail: false,
                })
                .await
                .ok()?;
            Some((room, reply))
        };
        let room_id = room_id.clone();
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            let Some(watch) = act.rooms.get_mut(&room_id) else {
                // Every waiter left meanwhile.
                if let Some((room, Ok(_))) = result {
                    room.do_send(Unsubscribe { conn_id });
                }
                return;
            };
            if watch.generation != generation {
                if let Some((room, Ok(_))) = result {
                    room.do_send(Unsubscribe { conn_id });
                }
                return;
            }
            match result {
                Some((room, Ok(SubscribeReply::Live { .. }))) => {
                    watch.room = Some(room);
                    watch.attempts = 0;
                    // Events committed before the subscription was live were not
                    // pushed here: every waiter looks at the store once more.
                    act.wake_room(&room_id);
                }
                _ => {
                    let attempts = watch.attempts;
                    act.wake_room(&room_id);
                    if attempts >= MAX_SUBSCRIBE_ATTEMPTS {
                        tracing::warn!(room = %room_id, "poll hub could not subscribe to the room; its polls wait until their timeout");
                        return;
                    }
                    ctx.run_later(RESUBSCRIBE_DELAY, move |act, ctx| {
                        if act
                            .rooms
                            .get(&room_id)
                            .is_some_and(|w| w.generation == generation)
                        {
                            act.subscribe(ctx, &room_id);
                        }
                    });
                }
            }
        }));
    }
}

impl Actor for PollHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        // After a restart: the kept waiters look again, the rooms are subscribed anew.
        let rooms: Vec<RoomId> = self.rooms.keys().cloned().collect();
        for room_id in rooms {
            if let Some(watch) = self.rooms.get_mut(&room_id) {
                watch.attempts = 0;
            }
            self.subscribe(ctx, &room_id);
        }
        for waiter in self.waiters.values() {
            waiter.signal.wake();
        }
    }
}

impl Supervised for PollHub {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        for watch in self.rooms.values_mut() {
            if let Some(room) = watch.room.take() {
                room.do_send(Unsubscribe {
                    conn_id: watch.conn_id,
                });
            }
        }
    }
}

impl Handler<Watch> for PollHub {
    type Result = Result<Watching, TooManyWaiters>;

    fn handle(&mut self, msg: Watch, ctx: &mut Self::Context) -> Self::Result {
        let signal = Arc::new(WaiterSignal::default());
        let id = self.next_waiter;
        self.next_waiter += 1;
        let answer = Watching {
            id,
            signal: signal.clone(),
        };
        let admitted = guarded(
            self,
            ctx,
            || Ok(()),
            move |act, ctx| {
                if !msg.poll_id.is_empty() {
                    let key = (msg.user_id.clone(), msg.poll_id.clone());
                    if let Some(older) = act.by_poll_id.remove(&key) {
                        if let Some(waiter) = act.remove_waiter(older) {
                            waiter.signal.end(PollEnd::Superseded);
                        }
                    }
                }
                let waiting = act.by_user.get(&msg.user_id).map_or(0, HashSet::len);
                if waiting >= act.max_per_user {
                    return Err(TooManyWaiters(act.max_per_user));
                }
                let registered_at_ms = unix_ms();
                if !msg.poll_id.is_empty() {
                    act.by_poll_id
                        .insert((msg.user_id.clone(), msg.poll_id.clone()), id);
                    act.announce_taken(&msg.user_id, &msg.poll_id, id, registered_at_ms);
                }
                act.by_user
                    .entry(msg.user_id.clone())
                    .or_default()
                    .insert(id);
                for room_id in &msg.rooms {
                    let new = !act.rooms.contains_key(room_id);
                    if new {
                        act.rooms.insert(
                            room_id.clone(),
                            RoomWatch {
                                waiters: HashSet::new(),
                                conn_id: 0,
                                room: None,
                                generation: 0,
                                attempts: 0,
                            },
                        );
                    }
                    if let Some(watch) = act.rooms.get_mut(room_id) {
                        watch.waiters.insert(id);
                    }
                    if new {
                        act.subscribe(ctx, room_id);
                    }
                }
                act.waiters.insert(
                    id,
                    Waiter {
                        user_id: msg.user_id,
                        session_id: msg.session_id,
                        poll_id: msg.poll_id,
                        rooms: msg.rooms,
                        notifications: msg.notifications,
                        signal,
                        registered_at_ms,
                    },
                );
                act.count();
                Ok(())
            },
        );
        admitted.map(|()| answer)
    }
}

impl Handler<Unwatch> for PollHub {
    type Result = ();

    fn handle(&mut self, msg: Unwatch, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                act.remove_waiter(msg.id);
            },
        )
    }
}

impl Handler<NotificationStored> for PollHub {
    type Result = ();

    fn handle(&mut self, msg: NotificationStored, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                let Some(ids) = act.by_user.get(&msg.user_id) else {
                    return;
                };
                for id in ids {
                    if let Some(waiter) = act.waiters.get(id).filter(|w| w.notifications) {
                        waiter.signal.wake();
                    }
                }
            },
        )
    }
}

impl Handler<EndUserPolls> for PollHub {
    type Result = ();

    fn handle(&mut self, msg: EndUserPolls, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                let ids: Vec<WaiterId> = act
                    .by_user
                    .get(&msg.user_id)
                    .map(|ids| ids.iter().copied().collect())
                    .unwrap_or_default();
                for id in ids {
                    let of_session = act.waiters.get(&id).is_some_and(|w| {
                        msg.session_id.is_none() || w.session_id == msg.session_id
                    });
                    if !of_session {
                        continue;
                    }
                    if let Some(waiter) = act.remove_waiter(id) {
                        waiter.signal.end(msg.why.clone());
                    }
                }
            },
        )
    }
}

impl Handler<EndAllPolls> for PollHub {
    type Result = ();

    fn handle(&mut self, _msg: EndAllPolls, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                let ids: Vec<WaiterId> = act.waiters.keys().copied().collect();
                for id in ids {
                    if let Some(waiter) = act.remove_waiter(id) {
                        waiter.signal.end(PollEnd::Shutdown);
                    }
                }
            },
        )
    }
}

impl Handler<PollTakenElsewhere> for PollHub {
    type Result = ();

    fn handle(&mut self, msg: PollTakenElsewhere, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                // This node's own waiters were superseded when the new one registered.
                if act.bus.as_ref().is_some_and(|b| b.node_id() == msg.origin) {
                    return;
                }
                let key = (msg.user_id, msg.poll_id);
                let Some(&id) = act.by_poll_id.get(&key) else {
                    return;
                };
                let older = act
                    .waiters
                    .get(&id)
                    .is_some_and(|w| w.registered_at_ms <= msg.registered_at_ms);
                if !older {
                    // Registered here after the other node's: it is the newest.
                    return;
                }
                if let Some(waiter) = act.remove_waiter(id) {
                    waiter.signal.end(PollEnd::Superseded);
                }
            },
        )
    }
}

/// Now, in milliseconds since the Unix epoch.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Handler<CountWaiters> for PollHub {
    type Result = usize;

    fn handle(&mut self, _msg: CountWaiters, _ctx: &mut Self::Context) -> usize {
        self.waiters.len()
    }
}

impl Handler<RoomPush> for PollHub {
    type Result = ();

    fn handle(&mut self, msg: RoomPush, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, ctx| match msg {
                RoomPush::Events { batch, bytes } => {
                    act.gauge.release(bytes);
                    act.wake_room(&batch.room_id);
                }
                RoomPush::Notice {
                    room_id,
                    frame,
                    bytes,
                } => {
                    act.gauge.release(bytes);
                    // A membership change: the waiters of that user check their read
                    // access again (a kicked user's poll answers permission_denied).
                    if let Some(crate::proto::v1::server_frame::Kind::Member(member)) =
                        &frame.frame().kind
                    {
                        let Some(watch) = act.rooms.get(&room_id) else {
                            return;
                        };
                        for id in &watch.waiters {
                            if let Some(waiter) = act
                                .waiters
                                .get(id)
                                .filter(|w| w.user_id.as_str() == member.user_id)
                            {
                                waiter.signal.wake();
                            }
                        }
                    }
                }
                RoomPush::Lagged { room_id, .. } | RoomPush::Resync { room_id } => {
                    act.wake_room(&room_id);
                    if let Some(watch) = act.rooms.get_mut(&room_id) {
                        watch.attempts = 0;
                    }
                    act.subscribe(ctx, &room_id);
                }
                RoomPush::Removed { room_id, .. } => {
                    // Never for the hub's own user id; subscribe again if it happens.
                    act.wake_room(&room_id);
                    act.subscribe(ctx, &room_id);
                }
            },
        )
    }
}
