//! [`UserSession`]: one per online user. It knows the user's live connections (one
//! per device or tab), so it can say whether the user is online, announce presence
//! changes to the user's rooms, and close connections when the user signs out.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, Addr, AsyncContext as _,
    Context, Handler, Message, Recipient,
};

use super::{
    room::{ConnectionId, RoomNotice},
    room_registry::{NotifyRoom, RoomRegistry},
};
use crate::{
    ids::{SessionId, UserId},
    store::Store,
};

/// User session actors alive in this process (started and not yet stopped).
static LIVE_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// How many user sessions are alive; shutdown waits for this to reach zero so that
/// their last presence writes finish before the store closes.
pub fn live_sessions() -> usize {
    LIVE_SESSIONS.load(Ordering::Acquire)
}

/// What a user session tells one of its connections.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum SessionSignal {
    /// The session this connection authenticated with was signed out or revoked.
    SignedOut,
    /// The server is shutting down: reconnect (to another node).
    ServerShutdown,
}

/// Tells every connection of this user that the server is shutting down.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShutDown;

/// A connection of this user opened.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach {
    pub conn_id: ConnectionId,
    pub session_id: Option<SessionId>,
    pub addr: Recipient<SessionSignal>,
}

/// A connection of this user closed; answers how many remain.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Detach {
    pub conn_id: ConnectionId,
}

/// Closes the connections of one session (`Some`) or of every session (`None`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndSessions {
    pub session_id: Option<SessionId>,
}

/// One online user.
pub struct UserSession {
    user_id: UserId,
    store: Store,
    rooms: Addr<RoomRegistry>,
    connections: HashMap<ConnectionId, (Option<SessionId>, Recipient<SessionSignal>)>,
}

impl UserSession {
    pub fn new(user_id: UserId, store: Store, rooms: Addr<RoomRegistry>) -> Self {
        Self {
            user_id,
            store,
            rooms,
            connections: HashMap::new(),
        }
    }

    /// Tells the running rooms the user is a member of that presence changed; an
    /// offline announcement stops the actor once sent, unless a connection came back.
    fn announce(&self, online: bool, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let user = self.user_id.clone();
        ctx.spawn(
            async move { store.user_room_ids(&user).await }
                .into_actor(self)
                .map(move |rooms, act, ctx| {
                    match rooms {
                        Ok(rooms) => {
                            for room_id in rooms {
                                let notice = RoomNotice::Presence {
                                    user_id: act.user_id.clone(),
                                    online,
                                };
                                act.rooms.do_send(NotifyRoom { room_id, notice });
                            }
                        }
                        Err(e) => {
                            tracing::warn!(user = %act.user_id, error = %e, "cannot announce presence")
                        }
                    }
                    if !online && act.connections.is_empty() {
                        ctx.stop();
                    }
                }),
        );
    }
}

impl Actor for UserSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        LIVE_SESSIONS.fetch_add(1, Ordering::AcqRel);
        self.announce(true, ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        LIVE_SESSIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handler<Attach> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: Attach, _ctx: &mut Self::Context) {
        self.connections
            .insert(msg.conn_id, (msg.session_id, msg.addr));
    }
}

impl Handler<Detach> for UserSession {
    type Result = usize;

    fn handle(&mut self, msg: Detach, ctx: &mut Self::Context) -> usize {
        self.connections.remove(&msg.conn_id);
        if self.connections.is_empty() {
            self.announce(false, ctx);
        }
        self.connections.len()
    }
}

impl Handler<ShutDown> for UserSession {
    type Result = ();

    fn handle(&mut self, _msg: ShutDown, _ctx: &mut Self::Context) {
        for (_, addr) in self.connections.values() {
            addr.do_send(SessionSignal::ServerShutdown);
        }
    }
}

impl Handler<EndSessions> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: EndSessions, _ctx: &mut Self::Context) {
        for (session, addr) in self.connections.values() {
            if msg.session_id.is_none() || msg.session_id == *session {
                addr.do_send(SessionSignal::SignedOut);
            }
        }
    }
}
