//! Draining a node: the one path that both SIGTERM/SIGINT ([`crate::app::serve`])
//! and AdminService.DrainNode take. A draining node answers `/readyz` with 503 and
//! the reason (so a load balancer stops sending it traffic), refuses new
//! WebSockets ([`crate::http::ws`]), and tells every live WebSocket to reconnect
//! elsewhere (close 4001) through the session registry. Requests in flight finish;
//! stopping the process is left to the caller (SIGTERM) or the operator (DrainNode).

use std::sync::RwLock;

use super::AppState;
use crate::actors::session_registry::CloseAll;

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

/// Drains the node (see the module docs). Closing live connections is repeated on
/// every call, so a connection that slipped in during a race is closed too.
pub async fn drain(state: &AppState, reason: &str) -> Drained {
    let started = state.drain.begin(reason);
    if started {
        tracing::info!(
            reason,
            "draining: not ready, refusing new WebSockets, closing live ones"
        );
    }
    // A registry that is restarting has no connections to close.
    let users_closed = state.sessions.send(CloseAll).await.unwrap_or(0);
    // Waiting long-polls answer at once (`ended` 4001: poll again, elsewhere).
    state.polls.do_send(crate::actors::poll_hub::EndAllPolls);
    Drained {
        started,
        users_closed,
    }
}
