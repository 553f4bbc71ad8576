//! [`RoomRegistry`]: room id → running [`RoomActor`], under `actix::Supervisor`.
//! Rooms start on demand, each supervised on one of a fixed set of arbiters (one per
//! core) so that rooms run in parallel, and retire when idle.
//!
//! A room decides on its own that it retires and raises a flag it shares with the
//! registry, so a lookup never waits for a round trip to a room: the registry hands
//! out a fresh actor instead of a retired (or dead) one.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
};

use actix::{
    Actor, Addr, Arbiter, ArbiterHandle, AsyncContext as _, Context, Handler, Message, Supervised,
    Supervisor,
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

/// How many rooms are running.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountRooms;

/// Owns the room actors.
pub struct RoomRegistry {
    store: Store,
    settings: Arc<Settings>,
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

    fn room(&mut self, room_id: RoomId, ctx: &mut Context<Self>) -> Addr<RoomActor> {
        if let Some(entry) = self.rooms.get(&room_id).filter(|e| e.usable()) {
            return entry.addr.clone();
        }
        let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        let store = self.store.clone();
        let settings = self.settings.clone();
        let bus = self.bus.clone();
        let registry = ctx.address().recipient();
        let id = room_id.clone();
        let retired = RetiredFlag::default();
        let flag = retired.clone();
        let addr = Supervisor::start_in_arbiter(arbiter, move |_| {
            RoomActor::new(id, store, settings, Some(registry), flag).with_bus(bus)
        });
        self.rooms.insert(
            room_id,
            RoomEntry {
                addr: addr.clone(),
                retired,
            },
        );
        crate::metrics::metrics()
            .rooms_loaded
            .set(self.rooms.len() as i64);
        addr
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
