//! [`SessionRegistry`]: user id → [`UserSession`] of every user with a live
//! connection on this node; answers "who is online" and routes sign-outs and
//! removals from rooms to the user's connections.
//!
//! The registry counts each user's connections itself, so "online" changes in the
//! order connections open and close, without waiting for the session actor: a user
//! whose last connection closed is offline at once, and a quick reconnect starts a
//! new session that is online at once. Every change carries a presence version
//! taken here, in that order, so rooms drop an "offline" that arrives after the
//! "online" of a reconnect.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::{
    Actor, Addr, AsyncContext as _, Context, Handler, Message, Recipient, Supervised, WeakRecipient,
};

use tokio::sync::oneshot;

use super::{
    poll_hub::{EndUserPolls, PollEnd},
    room::ConnectionId,
    room_registry::RoomRegistry,
    supervision::guarded,
    user_session::{
        Attach, ConnectionSummary, DescribeConnections, Detach, EndSessions, SessionSignal,
        ShutDown, SignalConnection, UserSession,
    },
};
use crate::{
    ids::{SessionId, UserId},
    store::Store,
};

/// Orders presence changes across this process (see the module docs).
static PRESENCE_VERSION: AtomicU64 = AtomicU64::new(1);

fn next_presence_version() -> u64 {
    PRESENCE_VERSION.fetch_add(1, Ordering::Relaxed)
}

/// A connection authenticated as `user_id`.
pub struct ConnectionOpened {
    pub user_id: UserId,
    pub conn_id: ConnectionId,
    pub session_id: Option<SessionId>,
    pub addr: WeakRecipient<SessionSignal>,
}

/// An open connection authenticated again, possibly with another session's token:
/// sign-outs of that session now end it.
pub struct ConnectionReauthenticated {
    pub user_id: UserId,
    pub conn_id: ConnectionId,
    pub session_id: Option<SessionId>,
    pub addr: WeakRecipient<SessionSignal>,
}

/// A connection of `user_id` closed.
pub struct ConnectionClosed {
    pub user_id: UserId,
    pub conn_id: ConnectionId,
}

/// What happened to one connection, as [`report`] tells the registry.
pub enum ConnectionChange {
    Opened(ConnectionOpened),
    Reauthenticated(ConnectionReauthenticated),
    Closed(ConnectionClosed),
}

/// Changes of connections, in the order one arbiter reported them (see [`report`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionChanges(pub Vec<ConnectionChange>);

/// A change reported on this thread and not yet sent: its registry (a process may
/// run several servers: tests, nodes), and who waits for it to be sent.
type Queued = (Addr<SessionRegistry>, ConnectionChange, oneshot::Sender<()>);

/// Changes reported on this thread and not yet sent; sent when the thread ends,
/// too.
#[derive(Default)]
struct Outbox(Vec<Queued>);

impl Drop for Outbox {
    fn drop(&mut self) {
        send_all(std::mem::take(&mut self.0));
    }
}

thread_local! {
    static OUTBOX: RefCell<Outbox> = RefCell::new(Outbox::default());
}

/// Tells `registry` what happened to a connection. On an arbiter (where every
/// connection runs) the change waits for the end of the arbiter's turn and goes
/// with the others of that turn in one message, in the order they were reported:
/// a storm of connections wakes the registry's thread once per turn instead of
/// once per connection. Elsewhere it is sent at once. The answer completes once
/// the change is in the registry's mailbox: a connection tells its client it is
/// authenticated only then, so whatever the client asks the registry next (the
/// admin API's connections, who is online) sees it.
pub fn report(
    registry: &Addr<SessionRegistry>,
    change: ConnectionChange,
) -> impl Future<Output = ()> + 'static {
    let (sent, reported) = oneshot::channel();
    let mut queued = Some((registry.clone(), change, sent));
    if actix::Arbiter::try_current().is_some() {
        // `try_with`: a connection dropped while its thread ends finds the outbox
        // gone, and sends at once.
        let first = OUTBOX.try_with(|outbox| {
            let mut outbox = outbox.borrow_mut();
            outbox.0.extend(queued.take());
            outbox.0.len() == 1
        });
        if first == Ok(true) {
            let flush = Flush;
            actix::spawn(async move {
                // After the other tasks of this turn, whose changes join these.
                tokio::task::yield_now().await;
                drop(flush);
            });
        }
    }
    send_all(queued.into_iter().collect());
    async move {
        // An error: the outbox went with its thread; nothing is left to wait for.
        let _ = reported.await;
    }
}

/// Sends this thread's outbox when dropped: at the end of the turn its task was
/// spawned for, or when that task is dropped before it ran (its arbiter stopped),
/// so no change is left waiting for a send that would never come.
struct Flush;

impl Drop for Flush {
    fn drop(&mut self) {
        let changes = OUTBOX
            .try_with(|outbox| std::mem::take(&mut outbox.borrow_mut().0))
            .unwrap_or_default();
        send_all(changes);
    }
}

/// Sends `changes` in order, one message per run of changes to the same registry,
/// and tells each reporter once its change is in the registry's mailbox.
fn send_all(changes: Vec<Queued>) {
    let mut run = Vec::new();
    let mut waiting = Vec::new();
    let mut to: Option<Addr<SessionRegistry>> = None;
    for (registry, change, sent) in changes {
        if let Some(current) = to.take_if(|current| *current != registry) {
            current.do_send(ConnectionChanges(std::mem::take(&mut run)));
        }
        to = Some(registry);
        run.push(change);
        waiting.push(sent);
    }
    if let Some(registry) = to {
        registry.do_send(ConnectionChanges(run));
    }
    for sent in waiting {
        let _ = sent.send(());
    }
}

/// Closes a user's connections of one session, or of all sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignOutUser {
    pub user_id: UserId,
    pub session_id: Option<SessionId>,
}

/// Passes a signal to every connection of a user on this node (a removal from a
/// room reaches subscriptions the room itself does not hold at that moment).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignalUser {
    pub user_id: UserId,
    pub signal: SessionSignal,
}

/// Passes a signal to one connection, wherever its user is; answers the user the
/// connection belongs to, or `None` when this node has no such connection.
#[derive(Message)]
#[rtype(result = "Option<UserId>")]
pub struct SignalOneConnection {
    pub conn_id: ConnectionId,
    pub signal: SessionSignal,
}

/// Closes every authenticated connection with the "server shutting down" code.
/// Answers how many users were told.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll;

/// Closes every authenticated connection with the "server shutting down" code,
/// the users spread evenly over `window` (a draining node's clients then reconnect
/// to the other nodes a few at a time, not all at once). Answers how many users
/// will be told.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAllSpread {
    pub window: Duration,
}

/// Sends a signal (an announcement) to every connection of every online user;
/// answers how many users it reached.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SignalEveryone {
    pub signal: SessionSignal,
}

/// The user sessions to ask about live connections (of one user, or of all), and
/// how many users are online; the caller asks each session (so this registry,
/// which every connect and disconnect goes through, is not held up).
#[derive(Message)]
#[rtype(result = "LiveSessions")]
pub struct ListSessions {
    pub user_id: Option<UserId>,
}

/// The answer to [`ListSessions`].
#[derive(actix::MessageResponse)]
pub struct LiveSessions {
    pub sessions: Vec<Addr<UserSession>>,
    pub users_online: usize,
}

/// Asks every session of a [`LiveSessions`] for its connections.
pub async fn describe_connections(live: &LiveSessions) -> Vec<ConnectionSummary> {
    let asked = live.sessions.iter().map(|s| s.send(DescribeConnections));
    let mut out: Vec<ConnectionSummary> = futures_util::future::join_all(asked)
        .await
        .into_iter()
        // A session that stopped meanwhile has no connections left to list.
        .filter_map(Result::ok)
        .flatten()
        .collect();
    out.sort_by_key(|c| c.conn_id);
    out
}

/// Which of these users are online.
#[derive(Message)]
#[rtype(result = "OnlineSet")]
pub struct OnlineUsers {
    pub user_ids: Vec<UserId>,
}

/// Every user with a live connection on this node (the node's presence share,
/// published to the other nodes: `crate::cluster::presence`).
#[derive(Message)]
#[rtype(result = "Vec<UserId>")]
pub struct OnlineUserIds;

/// The users of an [`OnlineUsers`] query that are online.
#[derive(Debug, Default, actix::MessageResponse)]
pub struct OnlineSet(pub HashSet<UserId>);

/// One online user: their session actor and open connections.
struct Online {
    session: Addr<UserSession>,
    connections: ConnIds,
}

/// A user's open connection ids; one (the common case) needs no allocation.
#[derive(Default)]
enum ConnIds {
    #[default]
    None,
    One(ConnectionId),
    Many(Vec<ConnectionId>),
}

impl ConnIds {
    fn contains(&self, id: ConnectionId) -> bool {
        match self {
            ConnIds::None => false,
            ConnIds::One(one) => *one == id,
            ConnIds::Many(many) => many.contains(&id),
        }
    }

    fn insert(&mut self, id: ConnectionId) {
        if self.contains(id) {
            return;
        }
        *self = match std::mem::take(self) {
            ConnIds::None => ConnIds::One(id),
            ConnIds::One(one) => ConnIds::Many(vec![one, id]),
            ConnIds::Many(mut many) => {
                many.push(id);
                ConnIds::Many(many)
            }
        };
    }

    /// Answers whether `id` was there.
    fn remove(&mut self, id: ConnectionId) -> bool {
        if !self.contains(id) {
            return false;
        }
        *self = match std::mem::take(self) {
            ConnIds::Many(mut many) => {
                many.retain(|c| *c != id);
                match many.as_slice() {
                    [] => ConnIds::None,
                    [one] => ConnIds::One(*one),
                    _ => ConnIds::Many(many),
                }
            }
            _ => ConnIds::None,
        };
        true
    }

    fn is_empty(&self) -> bool {
        matches!(self, ConnIds::None)
    }
}

/// Owns the user sessions.
pub struct SessionRegistry {
    store: Store,
    /// Shared by every session (an address per session would allocate per user).
    rooms: Arc<Addr<RoomRegistry>>,
    /// The poll hub, whose waiting long-polls a sign-out ends.
    polls: Recipient<EndUserPolls>,
    sessions: HashMap<UserId, Online>,
}

impl SessionRegistry {
    pub fn new(store: Store, rooms: Addr<RoomRegistry>, polls: Recipient<EndUserPolls>) -> Self {
        Self {
            store,
            rooms: Arc::new(rooms),
            polls,
            sessions: HashMap::new(),
        }
    }
}

impl Actor for SessionRegistry {
    type Context = Context<Self>;
}

impl Supervised for SessionRegistry {}

impl SessionRegistry {
    fn opened(&mut self, msg: ConnectionOpened) {
        let online = self
            .sessions
            .entry(msg.user_id.clone())
            .or_insert_with(|| Online {
                session: UserSession::new(
                    msg.user_id.clone(),
                    self.store.clone(),
                    self.rooms.clone(),
                    next_presence_version(),
                )
                .start(),
                connections: ConnIds::None,
            });
        online.connections.insert(msg.conn_id);
        online.session.do_send(Attach {
            conn_id: msg.conn_id,
            session_id: msg.session_id,
            addr: msg.addr,
        });
    }

    fn reauthenticated(&mut self, msg: ConnectionReauthenticated) {
        if let Some(online) = self.sessions.get(&msg.user_id) {
            if online.connections.contains(msg.conn_id) {
                online.session.do_send(Attach {
                    conn_id: msg.conn_id,
                    session_id: msg.session_id,
                    addr: msg.addr,
                });
            }
        }
    }

    fn closed(&mut self, msg: ConnectionClosed) {
        let Some(online) = self.sessions.get_mut(&msg.user_id) else {
            return;
        };
        if !online.connections.remove(msg.conn_id) {
            return;
        }
        let last = online.connections.is_empty();
        online.session.do_send(Detach {
            conn_id: msg.conn_id,
            offline_version: last.then(next_presence_version),
        });
        if last {
            self.sessions.remove(&msg.user_id);
        }
    }
}

impl Handler<ConnectionChanges> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: ConnectionChanges, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                for change in msg.0 {
                    match change {
                        ConnectionChange::Opened(m) => act.opened(m),
                        ConnectionChange::Reauthenticated(m) => act.reauthenticated(m),
                        ConnectionChange::Closed(m) => act.closed(m),
                    }
                }
            },
        )
    }
}

impl Handler<SignOutUser> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: SignOutUser, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                // Long-polls of the session end too (`ended` 4501), on this node.
                act.polls.do_send(EndUserPolls {
                    user_id: msg.user_id.clone(),
                    session_id: msg.session_id.clone(),
                    why: PollEnd::SignedOut,
                });
                if let Some(online) = act.sessions.get(&msg.user_id) {
                    online.session.do_send(EndSessions {
                        session_id: msg.session_id,
                    });
                }
            },
        )
    }
}

impl Handler<SignalUser> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: SignalUser, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                if let Some(online) = act.sessions.get(&msg.user_id) {
                    online.session.do_send(msg.signal);
                }
            },
        )
    }
}

impl Handler<SignalOneConnection> for SessionRegistry {
    type Result = Option<UserId>;

    fn handle(&mut self, msg: SignalOneConnection, ctx: &mut Self::Context) -> Option<UserId> {
        guarded(
            self,
            ctx,
            || None,
            move |act, _ctx| {
                let (user, online) = act
                    .sessions
                    .iter()
                    .find(|(_, online)| online.connections.contains(msg.conn_id))?;
                online.session.do_send(SignalConnection {
                    conn_id: msg.conn_id,
                    signal: msg.signal,
                });
                Some(user.clone())
            },
        )
    }
}

impl Handler<CloseAll> for SessionRegistry {
    type Result = usize;

    fn handle(&mut self, _msg: CloseAll, ctx: &mut Self::Context) -> usize {
        guarded(
            self,
            ctx,
            || 0,
            move |act, _ctx| {
                tracing::info!(
                    users = act.sessions.len(),
                    "closing live connections for shutdown"
                );
                for online in act.sessions.values() {
                    online.session.do_send(ShutDown);
                }
                act.sessions.len()
            },
        )
    }
}

impl Handler<CloseAllSpread> for SessionRegistry {
    type Result = usize;

    fn handle(&mut self, msg: CloseAllSpread, ctx: &mut Self::Context) -> usize {
        guarded(
            self,
            ctx,
            || 0,
            move |act, ctx| {
                let users = act.sessions.len();
                tracing::info!(
                    users,
                    window_ms = msg.window.as_millis() as u64,
                    "closing live connections for a drain, spread over the window"
                );
                let sessions: Vec<Addr<UserSession>> =
                    act.sessions.values().map(|o| o.session.clone()).collect();
                for (i, session) in sessions.into_iter().enumerate() {
                    // User i of n at i/n of the window; the first at once.
                    let delay = msg.window.mul_f64(i as f64 / users as f64);
                    if delay.is_zero() {
                        session.do_send(ShutDown);
                    } else {
                        ctx.run_later(delay, move |_, _| session.do_send(ShutDown));
                    }
                }
                users
            },
        )
    }
}

impl Handler<OnlineUsers> for SessionRegistry {
    type Result = OnlineSet;

    fn handle(&mut self, msg: OnlineUsers, ctx: &mut Self::Context) -> Self::Result {
        guarded(
            self,
            ctx,
            || OnlineSet(HashSet::new()),
            move |act, _ctx| {
                OnlineSet(
                    msg.user_ids
                        .into_iter()
                        .filter(|u| act.sessions.contains_key(u))
                        .collect(),
                )
            },
        )
    }
}

impl Handler<OnlineUserIds> for SessionRegistry {
    type Result = actix::MessageResult<OnlineUserIds>;

    fn handle(&mut self, _msg: OnlineUserIds, _ctx: &mut Self::Context) -> Self::Result {
        actix::MessageResult(self.sessions.keys().cloned().collect())
    }
}

impl Handler<SignalEveryone> for SessionRegistry {
    type Result = usize;

    fn handle(&mut self, msg: SignalEveryone, ctx: &mut Self::Context) -> usize {
        guarded(
            self,
            ctx,
            || 0,
            move |act, _ctx| {
                for online in act.sessions.values() {
                    online.session.do_send(msg.signal.clone());
                }
                act.sessions.len()
            },
        )
    }
}

impl Handler<ListSessions> for SessionRegistry {
    type Result = LiveSessions;

    fn handle(&mut self, msg: ListSessions, ctx: &mut Self::Context) -> LiveSessions {
        guarded(
            self,
            ctx,
            || LiveSessions {
                sessions: Vec::new(),
                users_online: 0,
            },
            move |act, _ctx| {
                let sessions = match &msg.user_id {
                    Some(user) => act
                        .sessions
                        .get(user)
                        .map(|o| o.session.clone())
                        .into_iter()
                        .collect(),
                    None => act.sessions.values().map(|o| o.session.clone()).collect(),
                };
                LiveSessions {
                    sessions,
                    users_online: act.sessions.len(),
                }
            },
        )
    }
}
