//! [`SessionRegistry`]: user id → [`UserSession`] of every user with a live
//! connection on this node; answers "who is online" and routes sign-outs.

use std::collections::{HashMap, HashSet};

use actix::{
    fut::WrapFuture as _, Actor, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler,
    Message, Recipient, Supervised,
};

use super::{
    room::ConnectionId,
    room_registry::RoomRegistry,
    user_session::{Attach, Detach, EndSessions, SessionSignal, ShutDown, UserSession},
};
use crate::{
    ids::{SessionId, UserId},
    store::Store,
};

/// A connection authenticated as `user_id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionOpened {
    pub user_id: UserId,
    pub conn_id: ConnectionId,
    pub session_id: Option<SessionId>,
    pub addr: Recipient<SessionSignal>,
}

/// A connection of `user_id` closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionClosed {
    pub user_id: UserId,
    pub conn_id: ConnectionId,
}

/// Closes a user's connections of one session, or of all sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignOutUser {
    pub user_id: UserId,
    pub session_id: Option<SessionId>,
}

/// Closes every authenticated connection with the "server shutting down" code.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll;

/// Which of these users are online.
#[derive(Message)]
#[rtype(result = "OnlineSet")]
pub struct OnlineUsers {
    pub user_ids: Vec<UserId>,
}

/// The users of an [`OnlineUsers`] query that are online.
#[derive(Debug, Default, actix::MessageResponse)]
pub struct OnlineSet(pub HashSet<UserId>);

/// Owns the user sessions.
pub struct SessionRegistry {
    store: Store,
    rooms: Addr<RoomRegistry>,
    sessions: HashMap<UserId, Addr<UserSession>>,
}

impl SessionRegistry {
    pub fn new(store: Store, rooms: Addr<RoomRegistry>) -> Self {
        Self {
            store,
            rooms,
            sessions: HashMap::new(),
        }
    }
}

impl Actor for SessionRegistry {
    type Context = Context<Self>;
}

impl Supervised for SessionRegistry {}

impl Handler<ConnectionOpened> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: ConnectionOpened, _ctx: &mut Self::Context) {
        let session = self.sessions.entry(msg.user_id.clone()).or_insert_with(|| {
            UserSession::new(msg.user_id.clone(), self.store.clone(), self.rooms.clone()).start()
        });
        if !session.connected() {
            *session =
                UserSession::new(msg.user_id.clone(), self.store.clone(), self.rooms.clone())
                    .start();
        }
        session.do_send(Attach {
            conn_id: msg.conn_id,
            session_id: msg.session_id,
            addr: msg.addr,
        });
    }
}

impl Handler<ConnectionClosed> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: ConnectionClosed, ctx: &mut Self::Context) {
        let Some(session) = self.sessions.get(&msg.user_id).cloned() else {
            return;
        };
        let user = msg.user_id;
        ctx.wait(
            session
                .send(Detach {
                    conn_id: msg.conn_id,
                })
                .into_actor(self)
                .map(move |left, act, _| {
                    if matches!(left, Ok(0) | Err(_)) {
                        act.sessions.remove(&user);
                    }
                }),
        );
    }
}

impl Handler<SignOutUser> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: SignOutUser, _ctx: &mut Self::Context) {
        if let Some(session) = self.sessions.get(&msg.user_id) {
            session.do_send(EndSessions {
                session_id: msg.session_id,
            });
        }
    }
}

impl Handler<CloseAll> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, _msg: CloseAll, _ctx: &mut Self::Context) {
        tracing::info!(
            users = self.sessions.len(),
            "closing live connections for shutdown"
        );
        for session in self.sessions.values() {
            session.do_send(ShutDown);
        }
    }
}

impl Handler<OnlineUsers> for SessionRegistry {
    type Result = OnlineSet;

    fn handle(&mut self, msg: OnlineUsers, _ctx: &mut Self::Context) -> Self::Result {
        OnlineSet(
            msg.user_ids
                .into_iter()
                .filter(|u| self.sessions.get(u).is_some_and(Addr::connected))
                .collect(),
        )
    }
}
