//! [`ConnectionSweep`]: the heartbeats and deadlines of every connection of one
//! arbiter, kept by one actor instead of a timer per connection.
//!
//! Each connection registers in a table local to its arbiter's thread (an entry of a
//! few dozen bytes: a weak address, when its next heartbeat is due and its next
//! deadline) and gets a [`Slot`] back. Every sweep tick the arbiter's sweep actor
//! walks the table and sends [`SweepSignal::Heartbeat`] to the connections whose
//! heartbeat is due (the connection pings, or closes with `IDLE_TIMEOUT` when it
//! heard nothing for `realtime.idle_timeout_ms`) and [`SweepSignal::Deadline`] to
//! those whose deadline passed (not authenticated in time: `AUTH_FAILED`; the
//! access token expired: `TOKEN_EXPIRED`).
//!
//! The tick is a tenth of the shortest interval or deadline registered (at least
//! [`MIN_TICK`], at most [`MAX_TICK`]), so a heartbeat or a close comes at most that
//! much later than its exact time. The table lives in the thread, not in the actor:
//! a sweep actor restarted by its supervisor finds every registration still there.

use std::{
    cell::RefCell,
    time::{Duration, Instant},
};

use actix::{Actor, AsyncContext as _, Context, Message, Supervised, Supervisor, WeakAddr};

use super::connection::Connection;

/// Shortest sweep tick.
pub const MIN_TICK: Duration = Duration::from_millis(5);
/// Longest sweep tick.
pub const MAX_TICK: Duration = Duration::from_secs(1);

/// What the sweep tells a connection.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum SweepSignal {
    /// A heartbeat is due: ping, or close a silent peer.
    Heartbeat,
    /// The connection's deadline passed (authentication, token expiry).
    Deadline,
}

/// A connection's place in its arbiter's table; give it back with [`unregister`].
#[derive(Debug, PartialEq, Eq)]
pub struct Slot(u32);

struct Entry {
    conn: WeakAddr<Connection>,
    every: Duration,
    next_heartbeat: Instant,
    deadline: Option<Instant>,
}

#[derive(Default)]
struct Table {
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    /// The current tick; zero until the first registration.
    tick: Duration,
    /// Whether this thread's sweep actor runs.
    started: bool,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

/// The tick for a connection with this heartbeat interval and first deadline.
fn tick_for(every: Duration, deadline_in: Option<Duration>) -> Duration {
    let shortest = deadline_in.map_or(every, |d| d.min(every));
    (shortest / 10).clamp(MIN_TICK, MAX_TICK)
}

/// Registers a connection of this thread: a heartbeat every `every`, and a
/// deadline `deadline_in` from now (if any). Starts the thread's sweep on first use.
pub fn register(
    conn: WeakAddr<Connection>,
    every: Duration,
    deadline_in: Option<Duration>,
) -> Slot {
    let now = Instant::now();
    let tick = tick_for(every, deadline_in);
    let (slot, start) = TABLE.with(|table| {
        let mut table = table.borrow_mut();
        let entry = Entry {
            conn,
            every,
            next_heartbeat: now + every,
            deadline: deadline_in.map(|d| now + d),
        };
        let index = match table.free.pop() {
            Some(index) => {
                table.entries[index as usize] = Some(entry);
                index
            }
            None => {
                table.entries.push(Some(entry));
                (table.entries.len() - 1) as u32
            }
        };
        if table.tick.is_zero() || tick < table.tick {
            table.tick = tick;
        }
        let start = !table.started;
        table.started = true;
        (Slot(index), start)
    });
    if start {
        Supervisor::start(|_| ConnectionSweep);
    }
    slot
}

/// Sets (or clears) the connection's deadline.
pub fn set_deadline(slot: &Slot, deadline_in: Option<Duration>) {
    let at = deadline_in.map(|d| Instant::now() + d);
    TABLE.with(|table| {
        let mut table = table.borrow_mut();
        if let Some(Some(entry)) = table.entries.get_mut(slot.0 as usize) {
            entry.deadline = at;
        }
        if let Some(d) = deadline_in {
            let tick = tick_for(d.max(MIN_TICK * 10), None);
            if tick < table.tick {
                table.tick = tick;
            }
        }
    });
}

/// Removes a connection (when it stops).
pub fn unregister(slot: Slot) {
    TABLE.with(|table| {
        let mut table = table.borrow_mut();
        if let Some(entry) = table.entries.get_mut(slot.0 as usize) {
            if entry.take().is_some() {
                table.free.push(slot.0);
            }
        }
        if table.free.len() == table.entries.len() {
            // Every connection of this thread is gone: give the memory back.
            table.entries = Vec::new();
            table.free = Vec::new();
        }
    });
}

/// Walks this thread's table once; sends what is due.
fn sweep() {
    let now = Instant::now();
    let mut due: Vec<(WeakAddr<Connection>, SweepSignal)> = Vec::new();
    TABLE.with(|table| {
        let mut table = table.borrow_mut();
        for entry in table.entries.iter_mut().flatten() {
            if entry.deadline.is_some_and(|at| at <= now) {
                entry.deadline = None;
                due.push((entry.conn.clone(), SweepSignal::Deadline));
            }
            if entry.next_heartbeat <= now {
                entry.next_heartbeat += entry.every;
                if entry.next_heartbeat <= now {
                    // Behind (a busy thread): the next one is an interval from now.
                    entry.next_heartbeat = now + entry.every;
                }
                due.push((entry.conn.clone(), SweepSignal::Heartbeat));
            }
        }
    });
    // Sent outside the table's borrow.
    for (conn, signal) in due {
        if let Some(addr) = conn.upgrade() {
            addr.do_send(signal);
        }
    }
}

fn current_tick() -> Duration {
    TABLE.with(|table| table.borrow().tick).max(MIN_TICK)
}

/// The sweep of one arbiter; see the module docs.
pub struct ConnectionSweep;

impl ConnectionSweep {
    fn schedule(&self, ctx: &mut Context<Self>) {
        ctx.run_later(current_tick(), |act, ctx| {
            sweep();
            act.schedule(ctx);
        });
    }
}

impl Actor for ConnectionSweep {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.schedule(ctx);
    }
}

impl Supervised for ConnectionSweep {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::warn!("connection sweep restarting; its table is kept");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_the_shortest_interval() {
        assert_eq!(
            tick_for(Duration::from_secs(15), Some(Duration::from_secs(10))),
            MAX_TICK
        );
        assert_eq!(
            tick_for(Duration::from_millis(100), Some(Duration::from_millis(400))),
            Duration::from_millis(10)
        );
        assert_eq!(tick_for(Duration::from_millis(10), None), MIN_TICK);
    }
}
