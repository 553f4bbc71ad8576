//! Connection admission: how many connections the server holds, and who holds them.
//!
//! - Every TCP connection takes a [`ConnectionPermit`] from the server-wide cap
//!   (`server.max_connections`, kept below the process's file descriptor limit);
//!   past it, new connections get `503` and are closed at once.
//! - Every WebSocket takes a [`WsTicket`]: one of its peer address's slots
//!   (`realtime.max_connections_per_ip`) and, until it authenticates, one of the
//!   slots for unauthenticated connections (`realtime.max_unauthenticated`); when it
//!   authenticates, that slot is exchanged for one of its user's
//!   (`realtime.max_connections_per_user`). Refusals before the upgrade are HTTP
//!   errors; a user over the cap is closed with `TOO_MANY_CONNECTIONS`. An
//!   anonymous viewer of a live room gives its unauthenticated slot back and keeps
//!   only its address's slot.
//!
//! A limit of 0 means no limit. Slots go back when the permit or ticket is dropped.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

/// The limits admission enforces (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_connections: usize,
    pub per_ip: usize,
    pub per_user: usize,
    pub unauthenticated: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the server holds its maximum of {0} connections; retry later")]
    Server(usize),
    #[error("too many WebSocket connections from this address (limit {0})")]
    PerIp(usize),
    #[error("too many connections waiting to authenticate (limit {0}); retry later")]
    Unauthenticated(usize),
    #[error("too many WebSocket connections for this user (limit {0})")]
    PerUser(usize),
}

impl Refusal {
    /// The config key of the rule that refused, as the metrics label it.
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::Server(_) => "max_connections",
            Refusal::PerIp(_) => "max_connections_per_ip",
            Refusal::Unauthenticated(_) => "max_unauthenticated",
            Refusal::PerUser(_) => "max_connections_per_user",
        }
    }

    /// Counts the refusal in the metrics (`roomcast_admission_refusals_total`).
    fn counted(self) -> Self {
        crate::metrics::metrics().refused(self.rule());
        self
    }
}

#[derive(Default)]
struct Counts {
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<String, usize>,
    unauthenticated: usize,
}

/// The server's connection counts; shared by every worker.
pub struct Admission {
    limits: Limits,
    connections: AtomicUsize,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            connections: AtomicUsize::new(0),
            counts: Mutex::new(Counts::default()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Open TCP connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Takes a slot for a new TCP connection.
    pub fn open_connection(self: &Arc<Self>) -> Result<ConnectionPermit, Refusal> {
        let max = self.limits.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .map_err(|_| Refusal::Server(max).counted())?;
        Ok(ConnectionPermit {
            admission: self.clone(),
        })
    }

    /// Takes the slots of a new WebSocket from `ip` that has not authenticated yet.
    pub fn open_websocket(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<WsTicket, Refusal> {
        let mut counts = self.lock();
        let limits = self.limits;
        if limits.unauthenticated > 0 && counts.unauthenticated >= limits.unauthenticated {
            return Err(Refusal::Unauthenticated(limits.unauthenticated).counted());
        }
        if let Some(ip) = ip {
            let n = counts.per_ip.entry(ip).or_default();
            if limits.per_ip > 0 && *n >= limits.per_ip {
                return Err(Refusal::PerIp(limits.per_ip).counted());
            }
            *n += 1;
        }
        counts.unauthenticated += 1;
        Ok(WsTicket {
            admission: self.clone(),
            ip,
            state: Mutex::new(TicketState::Unauthenticated),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every update is
        // a single increment or decrement.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One TCP connection's slot; returned when dropped.
pub struct ConnectionPermit {
    admission: Arc<Admission>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

enum TicketState {
    Unauthenticated,
    /// An anonymous viewer: only the per-address slot.
    Anonymous,
    User(String),
    Released,
}

/// One WebSocket's slots; returned when dropped.
pub struct WsTicket {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
    state: Mutex<TicketState>,
}

impl WsTicket {
    /// Exchanges the unauthenticated slot for one of `user`'s. A connection that
    /// authenticates again keeps its slot.
    pub fn authenticated(&self, user: &str) -> Result<(), Refusal> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let was_unauthenticated = match *state {
            TicketState::Unauthenticated => true,
            TicketState::Anonymous => false,
            _ => return Ok(()),
        };
        let limit = self.admission.limits.per_user;
        let mut counts = self.admission.lock();
        let n = counts.per_user.entry(user.to_owned()).or_default();
        if limit > 0 && *n >= limit {
            if *n == 0 {
                counts.per_user.remove(user);
            }
            return Err(Refusal::PerUser(limit).counted());
        }
        *n += 1;
        if was_unauthenticated {
            counts.unauthenticated -= 1;
        }
        *state = TicketState::User(user.to_owned());
        Ok(())
    }

    /// Gives the unauthenticated slot back: the connection watches live rooms
    /// anonymously (its address's slot still counts).
    pub fn anonymous(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*state, TicketState::Unauthenticated) {
            self.admission.lock().unauthenticated -= 1;
            *state = TicketState::Anonymous;
        }
    }
}

impl Drop for WsTicket {
    fn drop(&mut self) {
        let state = std::mem::replace(
            &mut *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            TicketState::Released,
        );
        let mut counts = self.admission.lock();
        match state {
            TicketState::Unauthenticated => counts.unauthenticated -= 1,
            TicketState::User(user) => {
                if let Some(n) = counts.per_user.get_mut(&user) {
                    *n -= 1;
                    if *n == 0 {
                        counts.per_user.remove(&user);
                    }
                }
            }
            TicketState::Anonymous | TicketState::Released => {}
        }
        if let Some(ip) = self.ip {
            if let Some(n) = counts.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.per_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_release() {
        let admission = Admission::new(Limits {
            max_connections: 2,
            per_ip: 2,
            per_user: 1,
            unauthenticated: 2,
        });
        let a = admission.open_connection().expect("first");
        let _b = admission.open_connection().expect("second");
        assert_eq!(admission.open_connection().err(), Some(Refusal::Server(2)));
        drop(a);
        let _c = admission.open_connection().expect("a slot came back");

        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let t1 = admission.open_websocket(Some(ip)).expect("t1");
        let t2 = admission.open_websocket(Some(ip)).expect("t2");
        assert_eq!(
            admission
                .open_websocket(Some("10.0.0.2".parse().expect("ip")))
                .err(),
            Some(Refusal::Unauthenticated(2))
        );
        t1.authenticated("u").expect("first connection of u");
        assert_eq!(
            admission.open_websocket(Some(ip)).err(),
            Some(Refusal::PerIp(2))
        );
        assert_eq!(t2.authenticated("u"), Err(Refusal::PerUser(1)));
        drop(t1);
        t2.authenticated("u").expect("u's slot came back");
        drop(t2);
        let counts = admission.lock();
        assert!(counts.per_ip.is_empty() && counts.per_user.is_empty());
        assert_eq!(counts.unauthenticated, 0);
    }
}
