//! [`UserSession`]: one per online user. It knows the user's live connections (one
//! per device or tab), so it can announce presence changes to the user's rooms,
//! close connections when the user signs out, and tell every connection that the
//! user was removed from a room. The [`SessionRegistry`](super::session_registry)
//! starts it with the user's first connection and detaches the last one; it then
//! announces "offline" and stops.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, Addr, AsyncContext as _,
    Context, Handler, Message, WeakRecipient,
};

use super::{
    room::{ConnectionId, RoomNotice},
    room_registry::{NotifyRoom, RoomRegistry},
    supervision::catch_panic,
};
use crate::{
    ids::{RoomId, SessionId, UserId},
    protocol::SharedFrame,
    store::{NotificationRecord, Store},
};

/// User session actors alive in this process (started and not yet stopped).
static LIVE_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// How many user sessions are alive; shutdown waits for this to reach zero so that
/// their last presence writes finish before the store closes.
pub fn live_sessions() -> usize {
    LIVE_SESSIONS.load(Ordering::Acquire)
}

/// Test-only (the `fault-injection` feature): every "offline" announcement of this
/// process waits this many milliseconds first, so a test can make it arrive after
/// the "online" of a quick reconnect.
#[cfg(feature = "fault-injection")]
pub static DELAY_OFFLINE_ANNOUNCEMENTS_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// What a user session tells one of its connections.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum SessionSignal {
    /// The session this connection authenticated with was signed out or revoked.
    SignedOut,
    /// The server is shutting down: reconnect (to another node).
    ServerShutdown,
    /// The user may no longer read the room (kicked, banned, left): a subscription
    /// to it ends with this `removed` frame, whatever phase it is in.
    Removed {
        room_id: RoomId,
        frame: Arc<SharedFrame>,
    },
    /// A notification of the user was stored: connections that subscribed to the
    /// user's notification stream deliver it (or catch up to it from the store).
    Notification(Arc<NotificationRecord>),
    /// A backend called PublishService.DisconnectUser: close with
    /// [`close::DISCONNECTED`](crate::protocol::close::DISCONNECTED).
    Disconnected { reason: String },
    /// An operator's announcement (AdminService.Announce): written as is.
    Announcement { frame: Arc<SharedFrame> },
    /// The admin API asks what the connection is doing.
    Describe(DescribeReply),
}

/// What a connection tells the admin API about itself.
#[derive(Debug, Clone, Default)]
pub struct ConnectionDetails {
    /// "websocket+json", "websocket+proto", ...
    pub transport: String,
    /// The peer's address, when the transport knows it.
    pub remote_address: Option<String>,
    /// Rooms the connection is subscribed to.
    pub subscriptions: Vec<RoomId>,
}

/// Where a connection answers a [`SessionSignal::Describe`]; the signal is cloned
/// per connection, the answer is taken once.
#[derive(Debug, Clone)]
pub struct DescribeReply(
    Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<ConnectionDetails>>>>,
);

impl DescribeReply {
    /// A reply slot and the receiver of its answer.
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<ConnectionDetails>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self(Arc::new(std::sync::Mutex::new(Some(tx)))), rx)
    }

    /// Answers (the first answer counts; the asker may have given up).
    pub fn send(&self, details: ConnectionDetails) {
        let taken = match self.0.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(tx) = taken {
            let _ = tx.send(details);
        }
    }
}

/// What the admin API lists about one connection of this user.
#[derive(Debug, Clone)]
pub struct ConnectionSummary {
    pub conn_id: ConnectionId,
    pub user_id: UserId,
    pub session_id: Option<SessionId>,
    /// When the connection attached to this session (Unix ms).
    pub attached_at: i64,
    pub transport: String,
    pub remote_address: Option<String>,
    pub subscriptions: Vec<RoomId>,
}

/// How long the admin API waits for a connection to describe itself; one that
/// does not answer in time (busy, closing) is listed without its details.
pub const DESCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The user's live connections, for the admin API.
#[derive(Message)]
#[rtype(result = "Vec<ConnectionSummary>")]
pub struct DescribeConnections;

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
    /// Weak: the session does not keep a closed connection's mailbox alive.
    pub addr: WeakRecipient<SessionSignal>,
}

/// A connection of this user closed. `offline_version` is set when it was the
/// last one: the session announces "offline" with it and stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach {
    pub conn_id: ConnectionId,
    pub offline_version: Option<u64>,
}

/// Passes a signal to one connection of this user (AdminService.DisconnectConnection);
/// answers whether the session holds that connection.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct SignalConnection {
    pub conn_id: ConnectionId,
    pub signal: SessionSignal,
}

/// Closes the connections of one session (`Some`) or of every session (`None`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct EndSessions {
    pub session_id: Option<SessionId>,
}

/// One connection of the user.
struct Attached {
    conn_id: ConnectionId,
    session_id: Option<SessionId>,
    addr: WeakRecipient<SessionSignal>,
    /// When the connection attached (Unix ms), for the admin API.
    attached_at: i64,
}

impl Attached {
    fn send(&self, signal: SessionSignal) {
        if let Some(addr) = self.addr.upgrade() {
            addr.do_send(signal);
        }
    }
}

/// The user's connections: most users have one, which needs no allocation.
#[derive(Default)]
enum Connections {
    #[default]
    None,
    One(Attached),
    Many(Vec<Attached>),
}

impl Connections {
    fn as_slice(&self) -> &[Attached] {
        match self {
            Connections::None => &[],
            Connections::One(one) => std::slice::from_ref(one),
            Connections::Many(many) => many,
        }
    }

    fn get(&self, conn_id: ConnectionId) -> Option<&Attached> {
        self.as_slice().iter().find(|a| a.conn_id == conn_id)
    }

    /// Adds a connection, or updates its session and address (a re-authentication).
    fn attach(
        &mut self,
        conn_id: ConnectionId,
        session_id: Option<SessionId>,
        addr: WeakRecipient<SessionSignal>,
    ) {
        let found = match self {
            Connections::None => None,
            Connections::One(one) => (one.conn_id == conn_id).then_some(one),
            Connections::Many(many) => many.iter_mut().find(|a| a.conn_id == conn_id),
        };
        if let Some(attached) = found {
            attached.session_id = session_id;
            attached.addr = addr;
            return;
        }
        let new = Attached {
            conn_id,
            session_id,
            addr,
            attached_at: crate::ids::now_ms(),
        };
        *self = match std::mem::take(self) {
            Connections::None => Connections::One(new),
            Connections::One(one) => Connections::Many(vec![one, new]),
            Connections::Many(mut many) => {
                many.push(new);
                Connections::Many(many)
            }
        };
    }

    fn detach(&mut self, conn_id: ConnectionId) {
        *self = match std::mem::take(self) {
            Connections::One(one) if one.conn_id == conn_id => Connections::None,
            Connections::Many(mut many) => {
                many.retain(|a| a.conn_id != conn_id);
                match many.len() {
                    0 => Connections::None,
                    1 => Connections::One(many.remove(0)),
                    _ => Connections::Many(many),
                }
            }
            other => other,
        };
    }
}

/// One online user.
pub struct UserSession {
    user_id: UserId,
    store: Store,
    rooms: Arc<Addr<RoomRegistry>>,
    connections: Connections,
    /// The presence version of the "online" announcement (see the registry).
    online_version: u64,
}

impl UserSession {
    pub fn new(
        user_id: UserId,
        store: Store,
        rooms: Arc<Addr<RoomRegistry>>,
        online_version: u64,
    ) -> Self {
        Self {
            user_id,
            store,
            rooms,
            connections: Connections::None,
            online_version,
        }
    }

    /// Tells the running rooms the user is a member of that presence changed; an
    /// offline announcement stops the actor once sent.
    fn announce(&self, online: bool, version: u64, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let user = self.user_id.clone();
        #[cfg(feature = "fault-injection")]
        let delay = if online {
            0
        } else {
            DELAY_OFFLINE_ANNOUNCEMENTS_MS.load(Ordering::Relaxed)
        };
        // A panic in the store call must not take the session's task with it: the
        // session also carries sign-outs and removals to the user's connections.
        ctx.spawn(
            catch_panic(async move {
                #[cfg(feature = "fault-injection")]
                if delay > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                }
                store.user_room_ids(&user).await
            })
            .into_actor(self)
            .map(move |rooms, act, ctx| {
                match rooms {
                    Ok(Ok(rooms)) => {
                        for room_id in rooms {
                            let notice = RoomNotice::Presence {
                                user_id: act.user_id.clone(),
                                online,
                                version,
                            };
                            act.rooms.do_send(NotifyRoom { room_id, notice });
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(user = %act.user_id, error = %e, "cannot announce presence")
                    }
                    Err(panicked) => {
                        tracing::error!(user = %act.user_id, error = %panicked, "presence announcement panicked")
                    }
                }
                if !online {
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
        self.announce(true, self.online_version, ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        LIVE_SESSIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Handler<Attach> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: Attach, _ctx: &mut Self::Context) {
        self.connections
            .attach(msg.conn_id, msg.session_id, msg.addr);
    }
}

impl Handler<Detach> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: Detach, ctx: &mut Self::Context) {
        self.connections.detach(msg.conn_id);
        if let Some(version) = msg.offline_version {
            self.announce(false, version, ctx);
        }
    }
}

impl Handler<SessionSignal> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: SessionSignal, _ctx: &mut Self::Context) {
        for attached in self.connections.as_slice() {
            attached.send(msg.clone());
        }
    }
}

impl Handler<SignalConnection> for UserSession {
    type Result = bool;

    fn handle(&mut self, msg: SignalConnection, _ctx: &mut Self::Context) -> bool {
        match self.connections.get(msg.conn_id) {
            Some(attached) => {
                attached.send(msg.signal);
                true
            }
            None => false,
        }
    }
}

impl Handler<ShutDown> for UserSession {
    type Result = ();

    fn handle(&mut self, _msg: ShutDown, _ctx: &mut Self::Context) {
        for attached in self.connections.as_slice() {
            attached.send(SessionSignal::ServerShutdown);
        }
    }
}

impl Handler<EndSessions> for UserSession {
    type Result = ();

    fn handle(&mut self, msg: EndSessions, _ctx: &mut Self::Context) {
        for attached in self.connections.as_slice() {
            if msg.session_id.is_none() || msg.session_id == attached.session_id {
                attached.send(SessionSignal::SignedOut);
            }
        }
    }
}

impl Handler<DescribeConnections> for UserSession {
    type Result = actix::ResponseFuture<Vec<ConnectionSummary>>;

    fn handle(&mut self, _msg: DescribeConnections, _ctx: &mut Self::Context) -> Self::Result {
        let asked: Vec<_> = self
            .connections
            .as_slice()
            .iter()
            .map(|attached| {
                let (reply, answer) = DescribeReply::new();
                attached.send(SessionSignal::Describe(reply));
                let summary = ConnectionSummary {
                    conn_id: attached.conn_id,
                    user_id: self.user_id.clone(),
                    session_id: attached.session_id.clone(),
                    attached_at: attached.attached_at,
                    transport: String::new(),
                    remote_address: None,
                    subscriptions: Vec::new(),
                };
                async move {
                    let mut summary = summary;
                    if let Ok(Ok(details)) = tokio::time::timeout(DESCRIBE_TIMEOUT, answer).await {
                        summary.transport = details.transport;
                        summary.remote_address = details.remote_address;
                        summary.subscriptions = details.subscriptions;
                    }
                    summary
                }
            })
            .collect();
        Box::pin(futures_util::future::join_all(asked))
    }
}
