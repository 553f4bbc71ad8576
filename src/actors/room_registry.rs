//! [`RoomRegistry`]: room id → running [`RoomActor`], under `actix::Supervisor`.
//! Rooms start on demand, each supervised on one of the HTTP workers' arbiters
//! (one per core) so that rooms run in parallel next to their connections (see
//! [`RoomRegistry`]), and retire when idle.
//!
//! A room decides on its own that it retires and raises a flag it shares with the
//! registry, so a lookup never waits for a round trip to a room: the registry hands
//! out a fresh actor instead of a retired (or dead) one.
//!
//! Each thread remembers the rooms it looked up ([`lookup`]) with the same flag, so
//! a send or a subscription does not cross to the registry's thread for a room the
//! thread already knows: a remembered room is used only while it is exactly what
//! the registry would answer (not retired and its actor alive); otherwise the
//! registry is asked, as before.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
};

use actix::{
    Actor, Addr, Arbiter, ArbiterHandle, AsyncContext as _, Context, Handler, MailboxError,
    Message, Supervised, Supervisor, WeakAddr,
};

use super::{
    room::{Notify, RetiredFlag, RoomActor, RoomIdle, RoomNotice},
    supervision::guarded,
};
use crate::{cluster::Bus, ids::RoomId, settings::Settings, store::Store};

/// The running actor of a room, started when needed; `None` only when the registry
/// failed while answering (it is then restarting: retry).
#[derive(Message)]
#[rtype(result = "Option<Addr<RoomActor>>")]
pub struct GetRoom {
    pub room_id: RoomId,
}

/// [`GetRoom`] with the room's retired flag, for the per-thread memory of
/// [`lookup`].
#[derive(Message)]
#[rtype(result = "Option<(Addr<RoomActor>, RetiredFlag)>")]
pub struct GetRoomEntry {
    pub room_id: RoomId,
}

/// Rooms each thread remembers for [`lookup`]; past this the entries of retired
/// rooms are dropped, and if that is not enough, all of them (they are looked up
/// again on their next use).
pub const LOCAL_ROOMS_MAX: usize = 4096;

/// What one thread remembers of the rooms of one registry.
#[derive(Default)]
struct LocalRooms {
    /// Whose rooms these are: a process may run several servers (tests, nodes).
    registry: Option<WeakAddr<RoomRegistry>>,
    /// Weak: remembering a room must not keep its actor (or its restarts) alive.
    rooms: HashMap<RoomId, (WeakAddr<RoomActor>, RetiredFlag)>,
}

impl LocalRooms {
    /// Whether these are `registry`'s rooms.
    fn belong_to(&self, registry: &Addr<RoomRegistry>) -> bool {
        self.registry
            .as_ref()
            .and_then(WeakAddr::upgrade)
            .is_some_and(|r| &r == registry)
    }
}

thread_local! {
    static LOCAL_ROOMS: RefCell<LocalRooms> = RefCell::new(LocalRooms::default());
}

/// The running actor of a room, started if needed, as [`GetRoom`] answers it, but
/// without the round trip to the registry's thread when this thread looked the
/// room up before and that actor still takes work (see the module docs). `None`
/// only when the registry failed while answering.
pub async fn lookup(
    registry: &Addr<RoomRegistry>,
    room_id: &RoomId,
) -> Result<Option<Addr<RoomActor>>, MailboxError> {
    if let Some(addr) = remembered(registry, room_id) {
        return Ok(Some(addr));
    }
    let entry = registry
        .send(GetRoomEntry {
            room_id: room_id.clone(),
        })
        .await?;
    Ok(entry.map(|(addr, retired)| {
        remember(registry, room_id, &addr, retired);
        addr
    }))
}

/// The remembered actor of `room_id`, if it is still the one the registry would
/// hand out: the same test as [`RoomEntry::usable`].
fn remembered(registry: &Addr<RoomRegistry>, room_id: &RoomId) -> Option<Addr<RoomActor>> {
    LOCAL_ROOMS.with(|local| {
        let local = local.borrow();
        if !local.belong_to(registry) {
            return None;
        }
        let (addr, retired) = local.rooms.get(room_id)?;
        let addr = addr.upgrade()?;
        (!retired.load(Ordering::Acquire) && addr.connected()).then_some(addr)
    })
}

fn remember(
    registry: &Addr<RoomRegistry>,
    room_id: &RoomId,
    addr: &Addr<RoomActor>,
    retired: RetiredFlag,
) {
    LOCAL_ROOMS.with(|local| {
        let mut local = local.borrow_mut();
        if !local.belong_to(registry) {
            local.registry = Some(registry.downgrade());
            local.rooms.clear();
        }
        if local.rooms.len() >= LOCAL_ROOMS_MAX {
            local.rooms.retain(|_, (addr, retired)| {
                !retired.load(Ordering::Acquire) && addr.upgrade().is_some_and(|a| a.connected())
            });
            if local.rooms.len() >= LOCAL_ROOMS_MAX {
                local.rooms.clear();
            }
        }
        local
            .rooms
            .insert(room_id.clone(), (addr.downgrade(), retired));
    })
}

/// The running actor of a room, if there is one (for tests and operations).
#[derive(Message)]
#[rtype(result = "Option<Addr<RoomActor>>")]
pub struct FindRoom {
    pub room_id: RoomId,
}

/// Delivers a notice to a room if it is running (a room that is not running has no
/// subscribers to tell).
#[derive(Message)]
#[rtype(result = "()")]
pub struct NotifyRoom {
    pub room_id: RoomId,
    pub notice: RoomNotice,
}

/// An HTTP worker's arbiter, announced by the worker as it starts: rooms start on
/// the workers' arbiters from then on (see [`RoomRegistry`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddWorkerArbiter(pub ArbiterHandle);

impl Handler<AddWorkerArbiter> for RoomRegistry {
    type Result = ();

    fn handle(&mut self, msg: AddWorkerArbiter, _ctx: &mut Self::Context) {
        self.workers.push(msg.0);
    }
}

/// How many rooms are running.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountRooms;

/// Owns the room actors. Rooms start round robin on the HTTP workers' arbiters
/// (one per core), the threads their connections run on: a subscription or a send
/// then reaches its room without waking another thread when the room is on the
/// connection's own worker, always on a one-core server. Until a worker has
/// announced itself ([`AddWorkerArbiter`]), and when every announced one has
/// stopped (a worker that died, a server that is stopping), rooms start on the
/// registry's own arbiters instead.
pub struct RoomRegistry {
    store: Store,
    settings: Arc<Settings>,
    /// The HTTP workers' arbiters, in the order they announced themselves.
    workers: Vec<ArbiterHandle>,
    /// The registry's own arbiters (see above).
    arbiters: Vec<ArbiterHandle>,
    /// Keeps the arbiters' threads alive for the registry's lifetime.
    _owned: Vec<Arbiter>,
    next_arbiter: usize,
    rooms: HashMap<RoomId, RoomEntry>,
    /// The cluster broker the rooms publish to and receive from.
    bus: Bus,
}

/// A running room and the flag it raises when it retires.
struct RoomEntry {
    addr: Addr<RoomActor>,
    retired: RetiredFlag,
}

impl RoomEntry {
    /// Whether the actor still takes work: not retired, and its task is alive.
    fn usable(&self) -> bool {
        !self.retired.load(Ordering::Acquire) && self.addr.connected()
    }
}

impl RoomRegistry {
    /// A registry whose rooms run on `threads` arbiters (at least one).
    pub fn new(store: Store, settings: Arc<Settings>, threads: usize) -> Self {
        let owned: Vec<Arbiter> = (0..threads.max(1)).map(|_| Arbiter::new()).collect();
        let arbiters = owned.iter().map(Arbiter::handle).collect();
        Self {
            store,
            settings,
            arbiters,
            _owned: owned,
            next_arbiter: 0,
            workers: Vec::new(),
            rooms: HashMap::new(),
            bus: Bus::local(),
        }
    }

    /// The rooms publish their events through `bus` (default: an in-process one).
    pub fn with_bus(mut self, bus: Bus) -> Self {
        self.bus = bus;
        self
    }

    /// Starts the registry under a supervisor.
    pub fn start_supervised(self) -> Addr<Self> {
        Supervisor::start(|_| self)
    }

    /// The arbiter for the next room: the next running HTTP worker's (a stopped
    /// one is forgotten), else the next of the registry's own.
    fn next_arbiter(&mut self) -> ArbiterHandle {
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        while !self.workers.is_empty() {
            let at = self.next_arbiter % self.workers.len();
            // `spawn_fn` answers false once the arbiter has stopped.
            if self.workers[at].spawn_fn(|| ()) {
                return self.workers[at].clone();
            }
            self.workers.remove(at);
        }
        self.arbiters[self.next_arbiter % self.arbiters.len()].clone()
    }

    fn room(&mut self, room_id: RoomId, ctx: &mut Context<Self>) -> Addr<RoomActor> {
        self.room_entry(room_id, ctx).0
    }

    fn room_entry(
        &mut self,
        room_id: RoomId,
        ctx: &mut Context<Self>,
    ) -> (Addr<RoomActor>, RetiredFlag) {
        if let Some(entry) = self.rooms.get(&room_id).filter(|e| e.usable()) {
            return (entry.addr.clone(), entry.retired.clone());
        }
        let arbiter = self.next_arbiter();
        let store = self.store.clone();
        let settings = self.settings.clone();
        let bus = self.bus.clone();
        let registry = ctx.address().recipient();
        let id = room_id.clone();
        let retired = RetiredFlag::default();
        let flag = retired.clone();
        let addr = Supervisor::start_in_arbiter(&arbiter, move |_| {
            RoomActor::new(id, store, settings, Some(registry), flag).with_bus(bus)
        });
        self.rooms.insert(
            room_id,
            RoomEntry {
                addr: addr.clone(),
                retired: retired.clone(),
            },
        );
        crate::metrics::metrics()
            .rooms_loaded
            .set(self.rooms.len() as i64);
        (addr, retired)
    }
}

impl Actor for RoomRegistry {
    type Context = Context<Self>;
}

impl Supervised for RoomRegistry {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // A restart keeps this value, so the room map survives: room actors keep
        // running and lookups keep finding them; retired ones are replaced on the
        // next lookup as usual.
        tracing::warn!(rooms = self.rooms.len(), "room registry restarting");
    }
}

impl Handler<GetRoom> for RoomRegistry {
    type Result = Option<Addr<RoomActor>>;

    fn handle(&mut self, msg: GetRoom, ctx: &mut Self::Context) -> Self::Result {
        guarded(
            self,
            ctx,
            || None,
            move |act, ctx| Some(act.room(msg.room_id, ctx)),
        )
    }
}

impl Handler<GetRoomEntry> for RoomRegistry {
    type Result = Option<(Addr<RoomActor>, RetiredFlag)>;

    fn handle(&mut self, msg: GetRoomEntry, ctx: &mut Self::Context) -> Self::Result {
        guarded(
            self,
            ctx,
            || None,
            move |act, ctx| Some(act.room_entry(msg.room_id, ctx)),
        )
    }
}

impl Handler<FindRoom> for RoomRegistry {
    type Result = Option<Addr<RoomActor>>;

    fn handle(&mut self, msg: FindRoom, ctx: &mut Self::Context) -> Self::Result {
        guarded(
            self,
            ctx,
            || None,
            move |act, _ctx| {
                act.rooms
                    .get(&msg.room_id)
                    .filter(|e| e.usable())
                    .map(|e| e.addr.clone())
            },
        )
    }
}

impl Handler<NotifyRoom> for RoomRegistry {
    type Result = ();

    fn handle(&mut self, msg: NotifyRoom, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                if let Some(entry) = act.rooms.get(&msg.room_id) {
                    entry.addr.do_send(Notify(msg.notice));
                }
            },
        )
    }
}

impl Handler<CountRooms> for RoomRegistry {
    type Result = usize;

    fn handle(&mut self, _msg: CountRooms, ctx: &mut Self::Context) -> usize {
        guarded(
            self,
            ctx,
            || 0,
            move |act, _ctx| act.rooms.values().filter(|e| e.usable()).count(),
        )
    }
}

impl Handler<RoomIdle> for RoomRegistry {
    type Result = ();

    fn handle(&mut self, msg: RoomIdle, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                // The entry may already be a fresh actor started after this one retired.
                if act.rooms.get(&msg.room_id).is_some_and(|e| !e.usable()) {
                    act.rooms.remove(&msg.room_id);
                    crate::metrics::metrics()
                        .rooms_loaded
                        .set(act.rooms.len() as i64);
                }
            },
        )
    }
}
