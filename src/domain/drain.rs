//! Draining a node: the one path that both SIGTERM/SIGINT ([`crate::app::serve`])
//! and AdminService.DrainNode take. A draining node answers `/readyz` with 503 and
//! the reason (so a load balancer stops sending it traffic), refuses new
//! WebSockets ([`crate::http::ws`]) and SSE streams ([`crate::http::sse`]) with
//! 503, answers long-polls at once with `ended` (4001), closes every HTTP
//! keep-alive connection after its reply, and tells every live WebSocket (close
//! 4001) and SSE stream (a `close` event) to reconnect elsewhere through the
//! session registry, spread over `server.drain_spread_ms` so the other nodes take
//! the clients a few at a time. Requests in flight finish; the node keeps serving
//! RPCs until it stops. [`drain_for_shutdown`] (SIGTERM) waits out the window and
//! returns for the HTTP server to stop; DrainNode leaves stopping to the operator.
use std::{sync::RwLock, time::Duration};

use super::AppState;
use crate::actors::session_registry::{CloseAll, CloseAllSpread};

/// Whether this node is draining, and why.
#[derive(Debug, Default)]
pub struct Drain {
    reason: RwLock<Option<String>>,
}

impl Drain {
    /// Marks the node draining; `false` when it already was (the first reason stays).
    fn begin(&self, reason: &str) -> bool {
        let mut slot = match self.reason.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slot.is_some() {
            return false;
        }
        *slot = Some(reason.to_owned());
        true
    }

    /// Why the node is draining; `None` while it serves normally.
    pub fn reason(&self) -> Option<String> {
        match self.reason.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.reason().is_some()
    }
}

/// What [`drain`] did.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// False when the node was already draining.
    pub started: bool,
    /// Users whose live connections were told to reconnect.
    pub users_closed: usize,
}

/// How long after a drain begins a node behind a reverse proxy (one with
/// `server.trusted_proxies`) keeps listening, at least: longer than the HTTP
/// keep-alive timeout (5 s), so every keep-alive connection the proxy pooled has
/// either carried a reply with `Connection: close` or expired before the listener
/// closes (see [`crate::http::close_keep_alive_while_draining`]).
pub const MIN_DRAIN_LISTEN: Duration = Duration::from_secs(6);

/// Drains the node (see the module docs). Closing live connections is repeated on
/// every call, so a connection that slipped in during a race is closed too; a
/// repeated call closes at once, without a new spread.
pub async fn drain(state: &AppState, reason: &str) -> Drained {
    let started = state.drain.begin(reason);
    let window = Duration::from_millis(state.settings.server.drain_spread_ms);
    if started {
        tracing::info!(
            reason,
            spread_ms = window.as_millis() as u64,
            "draining: not ready, refusing new WebSockets and SSE streams, \
             telling live ones to reconnect elsewhere"
        );
    }
    // A registry that is restarting has no connections to close.
    let users_closed = if started && !window.is_zero() {
        state.sessions.send(CloseAllSpread { window }).await
    } else {
        state.sessions.send(CloseAll).await
    }
    .unwrap_or(0);
    // Waiting long-polls answer at once (`ended` 4001: poll again, elsewhere); a
    // poll costs a client one request, not a reconnect, so they are not spread.
    state.polls.do_send(crate::actors::poll_hub::EndAllPolls);
    Drained {
        started,
        users_closed,
    }
}

/// How often [`drain_for_shutdown`] looks whether every connection has gone.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The drain of a node that stops (SIGTERM): [`drain`], then waits while the
/// clients move away: until the spread window is over or no user session is left,
/// whichever comes first (an idle node stops at once), but behind a proxy for at
/// least [`MIN_DRAIN_LISTEN`]. Then it closes whatever is still connected; the
/// caller stops the HTTP server, which finishes the requests in flight.
pub async fn drain_for_shutdown(state: &AppState, reason: &str) {
    let started = std::time::Instant::now();
    drain(state, reason).await;
    let window = Duration::from_millis(state.settings.server.drain_spread_ms);
    let floor = if state.settings.server.trusted_proxies.is_empty() {
        Duration::ZERO
    } else {
        MIN_DRAIN_LISTEN
    };
    loop {
        let elapsed = started.elapsed();
        let everyone_left = crate::actors::user_session::live_sessions() == 0;
        if elapsed >= window.max(floor) || (elapsed >= floor && everyone_left) {
            break;
        }
        actix_web::rt::time::sleep(DRAIN_CHECK_INTERVAL).await;
    }
    let late = state.sessions.send(CloseAll).await.unwrap_or(0);
    state.polls.do_send(crate::actors::poll_hub::EndAllPolls);
    tracing::info!(
        users_still_connected = late,
        "drain window over: stopping the listener, finishing requests in flight"
    );
}
