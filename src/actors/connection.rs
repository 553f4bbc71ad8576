//! [`Connection`]: one WebSocket. It authenticates the client (upgrade header or
//! query token, or an `authenticate` frame before a deadline), answers every client
//! frame with a reply or an error carrying the frame's id, and delivers the rooms it
//! subscribed to in sequence order with no gap and no duplicate:
//!
//! - it remembers, per room, the last sequence it delivered;
//! - subscribing replays from the room's ring, or, when the ring no longer reaches
//!   back far enough, from the store page by page before subscribing again;
//! - a live event that does not follow the last delivered one (a gap), a "lagged"
//!   signal (its queue overflowed) or a "resync" (the room restarted) all lead back
//!   to that catch-up, so the client always continues from exactly where it was;
//! - history that retention pruned is never skipped silently: a `gap` frame names
//!   the exact range the client will not receive;
//! - live rooms keep no history in the store: what their ring no longer holds (and,
//!   for a subscriber that lagged, everything up to the room's newest event) is
//!   announced by a `gap` frame instead of a catch-up;
//! - a subscription that asked for batches (`Subscribe.batch`) gets a room's batch
//!   of events as one shared `batch` frame, written with one write.
//!
//! An anonymous viewer (`authenticate` with `anonymous`) has no user: it may only
//! subscribe to live rooms that allow anonymous viewers (the room decides) and
//! unsubscribe.
//!
//! Access is checked again on every (re-)registration with a room and before every
//! catch-up page, and a removal from the room (delivered through the room and
//! through the user's session) ends the subscription in whatever phase it is in.
//! Admission limits: subscriptions (pending ones included), requests in flight,
//! and history reads running at once, per connection.
//!
//! Heartbeats: a ping every `heartbeat_interval_ms`; the connection closes when
//! nothing arrived for `idle_timeout_ms`. Those checks, the authentication deadline
//! and the token's expiry are driven by its arbiter's
//! [`ConnectionSweep`](super::sweep::ConnectionSweep), not by timers of its own. Close codes are in
//! [`crate::protocol::close`].

use std::{
    collections::{HashMap, HashSet, VecDeque},
    rc::Rc,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, Addr, AsyncContext as _,
    Handler, StreamHandler,
};
use prost::Message as _;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{
    fanout_shard::DirectSub,
    room::{
        is_retired, ConnectionId, OutboundGauge, RoomActor, RoomPush, Subscribe, SubscribeReply,
        Subscriber, Unsubscribe,
    },
    session_registry::{
        report, ConnectionChange, ConnectionClosed, ConnectionOpened, ConnectionReauthenticated,
    },
    sweep::{self, SweepSignal},
    user_session::{ConnectionDetails, SessionSignal},
};
use crate::{
    actors::{authenticator::Authenticate, room::Relay},
    domain::{
        access::check_room_access,
        access_rules::Operation,
        messages,
        notifications::{self, LiveStep, NotificationFeed},
        AppState, Credential, Principal,
    },
    error::ApiError,
    ids::{now_ms, RoomId},
    proto::v1 as pb,
    protocol::{self, close, FrameCodec, RoomEvent, SharedFrame, WireFrame},
    realtime::{Cursor, Outlet},
    store::{MessageRecord, NotificationRecord},
    ws::{
        decoder::{Message as WsMessage, CLOSE_TOO_BIG},
        transport::{ReadError, Transport},
    },
};

use pb::server_frame::Kind as Out;

/// Events read from the store per catch-up page.
const CATCH_UP_PAGE: u32 = 256;
/// Malformed frames tolerated before the connection is closed.
const MAX_MALFORMED_FRAMES: u32 = 20;
/// Times in a row a subscription may find its room actor gone (retired or
/// restarting) and look it up again before giving up with `unavailable`.
const MAX_RELOCATIONS: u32 = 5;
/// Typing notices relayed per room and connection: at most one per interval.
const TYPING_INTERVAL: Duration = Duration::from_millis(1000);
/// Lag rounds are counted over this window to decide a client is too slow.
const LAG_WINDOW: Duration = Duration::from_secs(60);

/// The connection's actor context: a plain one. The socket is driven by
/// [`crate::ws::transport`]: its reader is a stream of this actor, its writes go
/// through [`Connection::write`] into a queue that never blocks the actor.
type Ctx = actix::Context<Connection>;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Where a room subscription stands.
enum Phase {
    /// A `Subscribe` is on its way; live events that arrive meanwhile wait here.
    Subscribing { buffered: Vec<Arc<RoomEvent>> },
    /// Reading missed events from the store.
    CatchingUp,
    /// Registered with the room; events are written as they come.
    Live,
}

struct RoomSub {
    room: Addr<RoomActor>,
    /// Last sequence written to the client, and whether the subscription is live:
    /// shared with the arbiter's fan-out shard, which writes the room's next batch
    /// itself while the subscription is live (see [`super::fanout_shard`]).
    cursor: Rc<DirectSub>,
    phase: Phase,
    /// Bumped on every (re)subscription so stale async completions are ignored.
    generation: u64,
    /// First sequence of the replay in progress, for the `resumed` frame; `None`
    /// when the client asked for live delivery only.
    resume_from: Option<u64>,
    /// Request id of the `subscribe` frame still awaiting its `subscribed` reply.
    pending_reply: Option<u64>,
    /// Times in a row the room actor was found gone; bounded by [`MAX_RELOCATIONS`].
    relocations: u32,
    /// The subscription takes `batch` frames.
    batch: bool,
    /// The next registration follows a lag: a live room moves it to its newest event.
    tail: bool,
    /// A live-only subscription not registered yet: it starts after the room's
    /// sequence at registration, however many attempts registering takes.
    live_only_start: bool,
    /// Where the catch-up in progress ends.
    catch_up_upto: u64,
    /// When a typing notice was last relayed, to throttle them.
    last_typing: Option<Instant>,
}

impl RoomSub {
    fn delivered(&self) -> u64 {
        self.cursor.delivered()
    }

    fn set_delivered(&self, seq: u64) {
        self.cursor.set_delivered(seq);
    }

    /// Moves to `phase`; only a live subscription lets the shard write directly.
    fn set_phase(&mut self, phase: Phase) -> Phase {
        self.cursor.set_live(matches!(phase, Phase::Live));
        std::mem::replace(&mut self.phase, phase)
    }
}

impl Drop for RoomSub {
    fn drop(&mut self) {
        // However the subscription ends, the shard stops writing through it.
        self.cursor.end();
    }
}

/// One WebSocket connection.
pub struct Connection {
    id: ConnectionId,
    /// Shared by the connections of a worker (see [`crate::http::ws`]).
    state: Arc<AppState>,
    codec: FrameCodec,
    principal: Option<Principal>,
    /// An anonymous viewer (no principal): may watch live rooms that allow it.
    anonymous: bool,
    /// The client takes `batch` frames (a `+batch` subprotocol, SSE `batch=true`).
    batch: bool,
    /// A token from the upgrade request, checked when the actor starts.
    initial_token: Option<String>,
    subs: HashMap<RoomId, RoomSub>,
    gauge: Arc<OutboundGauge>,
    last_heard: Instant,
    malformed: u32,
    /// The connection's entry in its arbiter's sweep (heartbeats, deadlines).
    sweep: Option<sweep::Slot>,
    lags: VecDeque<Instant>,
    next_generation: u64,
    /// Rooms whose `subscribe` is being checked; they count towards the limit.
    pending_subscribes: HashSet<RoomId>,
    /// Pending subscribes whose user was removed from the room meanwhile: their
    /// access check may predate the removal, so they are refused.
    removed_while_pending: HashSet<RoomId>,
    /// `send`, `mark_read` and `typing` requests being worked on.
    inflight: usize,
    /// Store reads this connection may run at once (`realtime.max_parallel_reads`):
    /// subscription access checks and catch-up pages wait here, in order.
    reads: Arc<Semaphore>,
    /// The write side of the transport (a WebSocket, an SSE stream).
    transport: Box<dyn Outlet>,
    /// Frames run as if the client sent them once it is authenticated: an SSE
    /// stream's subscriptions, given by its request.
    initial_frames: Vec<pb::ClientFrame>,
    /// The user's notification stream, after `subscribe_notifications`.
    notifications: Option<NotificationFeed>,
    /// The peer's address, when the transport passed it ([`Connection::with_remote_addr`]);
    /// listed by the admin API.
    remote_addr: Option<std::net::IpAddr>,
}

impl Connection {
    /// A connection writing through `transport`; its reader must be added to the
    /// actor's context as a stream.
    pub fn new(
        state: Arc<AppState>,
        codec: FrameCodec,
        token: Option<String>,
        transport: Transport,
    ) -> Self {
        Self::with_outlet(state, codec, token, Box::new(transport))
    }

    /// A connection writing through any [`Outlet`] (WebSocket, SSE).
    pub fn with_outlet(
        state: impl Into<Arc<AppState>>,
        codec: FrameCodec,
        token: Option<String>,
        transport: Box<dyn Outlet>,
    ) -> Self {
        let state = state.into();
        let gauge = Arc::new(OutboundGauge::new(
            state.settings.realtime.outbound_queue_bytes,
        ));
        let reads = Arc::new(Semaphore::new(state.settings.realtime.max_parallel_reads));
        // Bytes queued for the socket count against the same budget as pushes
        // waiting in the mailbox: a peer that stops reading lags.
        transport.attach_gauge(gauge.clone());
        Self {
            id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
            state,
            codec,
            principal: None,
            anonymous: false,
            batch: false,
            initial_token: token,
            subs: HashMap::new(),
            gauge,
            last_heard: Instant::now(),
            malformed: 0,
            sweep: None,
            lags: VecDeque::new(),
            next_generation: 1,
            pending_subscribes: HashSet::new(),
            removed_while_pending: HashSet::new(),
            inflight: 0,
            reads,
            transport,
            initial_frames: Vec::new(),
            notifications: None,
            remote_addr: None,
        }
    }

    /// Frames to run, in order, as soon as the connection is authenticated (an SSE
    /// stream's `subscribe` and `subscribe_notifications`).
    pub fn with_initial_frames(mut self, frames: Vec<pb::ClientFrame>) -> Self {
        self.initial_frames = frames;
        self
    }

    /// The client takes `batch` frames: a room's busy period arrives as one frame.
    pub fn with_batches(mut self, batch: bool) -> Self {
        self.batch = batch;
        self
    }

    /// Records the peer's address, for the admin API's connection list.
    pub fn with_remote_addr(mut self, addr: Option<std::net::IpAddr>) -> Self {
        self.remote_addr = addr;
        self
    }

    /// Whether `generation` is still the subscription's latest (re)subscription.
    fn is_current(&self, room_id: &RoomId, generation: u64) -> bool {
        self.subs
            .get(room_id)
            .is_some_and(|s| s.generation == generation)
    }

    fn write(&self, ctx: &mut Ctx, wire: WireFrame) {
        if let Err(full) = self.transport.write(wire) {
            // The peer reads slower than catch-up and replies fill its queue.
            tracing::debug!(conn = self.id, %full, "write queue over budget; closing");
            self.transport.close(
                Some(close::TOO_SLOW),
                "the connection cannot keep up; reconnect and resume",
            );
            ctx.stop();
        }
    }

    fn send_frame(&self, ctx: &mut Ctx, frame: &pb::ServerFrame) {
        self.write(ctx, protocol::encode(frame, self.codec));
    }

    fn reply(&self, ctx: &mut Ctx, id: u64, kind: Out) {
        self.send_frame(ctx, &protocol::reply(id, kind));
    }

    fn reply_error(&self, ctx: &mut Ctx, id: u64, error: &ApiError, room_id: &str) {
        let kind = Out::Error(pb::Error {
            code: error.code.as_str().to_owned(),
            message: error.message.clone(),
            room_id: room_id.to_owned(),
            retry_after_ms: error
                .retry_after
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        });
        self.reply(ctx, id, kind);
    }

    fn close(&mut self, ctx: &mut Ctx, code: u16, reason: &str) {
        tracing::debug!(conn = self.id, code, reason, "closing connection");
        self.transport.close(Some(code), reason);
        ctx.stop();
    }

    fn malformed(&mut self, ctx: &mut Ctx, id: u64, message: String) {
        self.malformed += 1;
        self.reply_error(ctx, id, &ApiError::invalid(message), "");
        if self.malformed > MAX_MALFORMED_FRAMES {
            self.close(ctx, close::PROTOCOL_ERROR, "too many malformed frames");
        }
    }

    // --- authentication -------------------------------------------------------

    fn authenticate(&mut self, ctx: &mut Ctx, request_id: Option<u64>, token: String) {
        let auth = self.state.auth.clone();
        ctx.wait(
            async move { auth.send_local(Authenticate { bearer: token }).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(principal) => {
                        if let Some(current) = &act.principal {
                            if current.user_id != principal.user_id {
                                let error = ApiError::denied("a connection cannot change its user");
                                act.reply_error(ctx, request_id.unwrap_or(0), &error, "");
                                return;
                            }
                        }
                        act.authenticated(ctx, request_id, principal);
                    }
                    Err(error) => {
                        act.reply_error(ctx, request_id.unwrap_or(0), &error, "");
                        if act.principal.is_none() {
                            act.close(ctx, close::AUTH_FAILED, &error.message);
                        }
                    }
                }),
        );
    }

    fn authenticated(&mut self, ctx: &mut Ctx, request_id: Option<u64>, principal: Principal) {
        let first = self.principal.is_none();
        // The sweep closes the connection when the token expires.
        if let Some(slot) = &self.sweep {
            let remaining = principal.expires_at.saturating_sub(now_ms());
            let expires_in = (principal.expires_at != i64::MAX)
                .then(|| Duration::from_millis(remaining.max(0) as u64));
            sweep::set_deadline(slot, expires_in);
        }
        let reported = if first {
            // The per-user connection cap (crate::admission).
            if let Err(refusal) = self.transport.admit_user(&principal.user_id.0) {
                let error = ApiError::exhausted(refusal.to_string());
                self.reply_error(ctx, request_id.unwrap_or(0), &error, "");
                self.close(ctx, close::TOO_MANY_CONNECTIONS, &error.message);
                return;
            }
            let session_id = match &principal.credential {
                Credential::Session(id) => Some(id.clone()),
                _ => None,
            };
            let opened = ConnectionOpened {
                user_id: principal.user_id.clone(),
                conn_id: self.id,
                session_id,
                addr: ctx.address().downgrade().recipient(),
            };
            tracing::debug!(conn = self.id, user = %principal.user_id, "connection authenticated");
            report(&self.state.sessions, ConnectionChange::Opened(opened))
        } else {
            // The connection now lives on this token: signing out its session (not
            // the first one's) must end the connection.
            let session_id = match &principal.credential {
                Credential::Session(id) => Some(id.clone()),
                _ => None,
            };
            let again = ConnectionReauthenticated {
                user_id: principal.user_id.clone(),
                conn_id: self.id,
                session_id,
                addr: ctx.address().downgrade().recipient(),
            };
            report(
                &self.state.sessions,
                ConnectionChange::Reauthenticated(again),
            )
        };
        let rt = &self.state.settings.realtime;
        let user = match &principal.credential {
            Credential::ApiKey(_) => None,
            _ => Some(principal.user_id.clone()),
        };
        let reply = pb::Authenticated {
            user: user.map(|id| pb::User {
                id: id.0,
                display_name: principal.display_name.clone().unwrap_or_default(),
                role: principal.role.to_proto(),
                ..Default::default()
            }),
            heartbeat_interval_ms: rt.heartbeat_interval_ms,
            idle_timeout_ms: rt.idle_timeout_ms,
            connection_id: self.id.to_string(),
            anonymous: false,
        };
        self.principal = Some(principal);
        self.anonymous = false;
        // The client hears it once the session registry has the change (see
        // `report`); nothing else of this connection runs meanwhile.
        ctx.wait(reported.into_actor(self).map(move |(), act, ctx| {
            act.reply(ctx, request_id.unwrap_or(0), Out::Authenticated(reply));
            for frame in std::mem::take(&mut act.initial_frames) {
                act.on_frame(ctx, frame);
            }
        }));
    }

    // --- client frames ---------------------------------------------------------

    fn on_frame(&mut self, ctx: &mut Ctx, frame: pb::ClientFrame) {
        use pb::client_frame::Kind as In;
        let id = frame.id;
        if id == 0 {
            self.malformed(ctx, 0, "every client frame needs a non-zero id".into());
            return;
        }
        let Some(kind) = frame.kind else {
            self.malformed(ctx, id, "unknown or missing frame type".into());
            return;
        };
        if let In::Authenticate(auth) = kind {
            self.authenticate(ctx, Some(id), auth.access_token);
            return;
        }
        if let In::AuthenticateAnonymous(_) = kind {
            self.watch_anonymously(ctx, id);
            return;
        }
        if let In::Ping(_) = kind {
            self.reply(ctx, id, Out::Pong(pb::Pong {}));
            return;
        }
        if self.anonymous && self.principal.is_none() {
            // Access rules match roles, and an anonymous viewer has none: the room
            // itself decides whether it may watch.
            match kind {
                In::Subscribe(sub) => self.subscribe(ctx, id, None, sub),
                In::Unsubscribe(unsub) => self.unsubscribe(ctx, id, unsub),
                _ => {
                    let error = ApiError::unauthenticated(
                        "anonymous viewers may only subscribe to live rooms that allow them; authenticate to do more",
                    );
                    self.reply_error(ctx, id, &error, "");
                }
            }
            return;
        }
        let Some(principal) = self.principal.clone() else {
            self.reply_error(
                ctx,
                id,
                &ApiError::unauthenticated("authenticate first"),
                "",
            );
            return;
        };
        // The access rules, as for RPCs (the same snapshot the auth actors keep).
        let (frame_kind, room_id) = match &kind {
            In::Subscribe(f) => ("subscribe", f.room_id.as_str()),
            In::Unsubscribe(f) => ("unsubscribe", f.room_id.as_str()),
            In::Send(f) => ("send", f.room_id.as_str()),
            In::Typing(f) => ("typing", f.room_id.as_str()),
            In::MarkRead(f) => ("mark_read", f.room_id.as_str()),
            In::SubscribeNotifications(_) => ("subscribe_notifications", ""),
            In::Authenticate(_) | In::Ping(_) | In::AuthenticateAnonymous(_) => ("", ""),
        };
        if let Err(error) = self
            .state
            .auth
            .rules()
            .check(principal.role, Operation::Frame(frame_kind))
        {
            let room_id = room_id.to_owned();
            self.reply_error(ctx, id, &error, &room_id);
            return;
        }
        match kind {
            In::Subscribe(sub) => self.subscribe(ctx, id, Some(principal), sub),
            In::Unsubscribe(unsub) => self.unsubscribe(ctx, id, unsub),
            In::Send(request) => self.send_message(ctx, id, principal, request),
            In::MarkRead(request) => self.mark_read(ctx, id, principal, request),
            In::Typing(typing) => self.typing(ctx, id, principal, typing),
            In::SubscribeNotifications(req) => {
                self.subscribe_notifications(ctx, id, principal, req)
            }
            In::Authenticate(_) | In::Ping(_) | In::AuthenticateAnonymous(_) => {}
        }
    }

    /// `authenticate_anonymous`: the connection watches without an account.
    fn watch_anonymously(&mut self, ctx: &mut Ctx, id: u64) {
        if self.principal.is_some() {
            let error = ApiError::failed_precondition(
                "the connection is authenticated already; it cannot become anonymous",
            );
            return self.reply_error(ctx, id, &error, "");
        }
        if !self.anonymous {
            // Leaves the slots of connections waiting to authenticate (see
            // crate::admission); the per-address cap still holds.
            self.transport.admit_anonymous();
            self.anonymous = true;
            tracing::debug!(conn = self.id, "anonymous viewer");
        }
        let rt = &self.state.settings.realtime;
        let reply = pb::Authenticated {
            user: None,
            heartbeat_interval_ms: rt.heartbeat_interval_ms,
            idle_timeout_ms: rt.idle_timeout_ms,
            connection_id: self.id.to_string(),
            anonymous: true,
        };
        self.reply(ctx, id, Out::Authenticated(reply));
    }

    fn unsubscribe(&mut self, ctx: &mut Ctx, id: u64, unsub: pb::Unsubscribe) {
        let room_id = RoomId(unsub.room_id.clone());
        match self.subs.remove(&room_id) {
            Some(sub) => {
                sub.room.do_send(Unsubscribe { conn_id: self.id });
                self.reply(
                    ctx,
                    id,
                    Out::Unsubscribed(pb::Unsubscribed {
                        room_id: unsub.room_id,
                    }),
                );
            }
            None => {
                let error = ApiError::not_found("not subscribed to this room");
                self.reply_error(ctx, id, &error, &unsub.room_id);
            }
        }
    }

    // --- requests --------------------------------------------------------------

    /// Admission control: takes a slot for a request that runs in the background,
    /// or answers `resource_exhausted` when the connection has too many.
    fn admit(&mut self, ctx: &mut Ctx, id: u64, room_id: &str) -> bool {
        let max = self.state.settings.realtime.max_inflight_requests;
        if self.inflight >= max {
            let error = ApiError::exhausted(format!(
                "{max} requests of this connection are still being worked on \
                 (realtime.max_inflight_requests); wait for their replies"
            ));
            self.reply_error(ctx, id, &error, room_id);
            return false;
        }
        self.inflight += 1;
        true
    }

    fn send_message(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        principal: Principal,
        request: pb::SendMessageRequest,
    ) {
        let room_id = request.room_id.clone();
        if !self.admit(ctx, id, &room_id) {
            return;
        }
        let state = self.state.clone();
        ctx.spawn(
            async move { messages::send_message(&state, &principal, request).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.inflight -= 1;
                    match result {
                        Ok(sent) => act.reply(ctx, id, Out::Sent(sent)),
                        Err(error) => act.reply_error(ctx, id, &error, &room_id),
                    }
                }),
        );
    }

    fn mark_read(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        principal: Principal,
        request: pb::MarkReadRequest,
    ) {
        let room_id = request.room_id.clone();
        if !self.admit(ctx, id, &room_id) {
            return;
        }
        let state = self.state.clone();
        ctx.spawn(
            async move { messages::mark_read(&state, &principal, request).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.inflight -= 1;
                    match result {
                        Ok(marked) => act.reply(ctx, id, Out::MarkedRead(marked)),
                        Err(error) => act.reply_error(ctx, id, &error, &room_id),
                    }
                }),
        );
    }

    /// Relays "typing" if the user may send in the room now (a mute or a kick since
    /// subscribing counts), at most one per room per interval.
    fn typing(&mut self, ctx: &mut Ctx, id: u64, principal: Principal, typing: pb::Typing) {
        let room_id = RoomId(typing.room_id.clone());
        let Some(sub) = self.subs.get_mut(&room_id) else {
            let error =
                ApiError::failed_precondition("subscribe to the room before sending typing");
            self.reply_error(ctx, id, &error, &typing.room_id);
            return;
        };
        // At most one typing notice per room per interval is relayed; the others
        // are acknowledged and dropped (typing is not history).
        let now = Instant::now();
        if sub
            .last_typing
            .is_some_and(|t| now.duration_since(t) < TYPING_INTERVAL)
        {
            self.reply(ctx, id, Out::Ack(pb::Ack {}));
            return;
        }
        sub.last_typing = Some(now);
        if !self.admit(ctx, id, &typing.room_id) {
            return;
        }
        let state = self.state.clone();
        let user_id = principal.user_id.0.clone();
        ctx.spawn(
            async move {
                check_room_access(&state, &principal, &room_id.0)
                    .await?
                    .require_send()
                    .map_err(|_| ApiError::denied("only members who may send can send typing"))
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.inflight -= 1;
                if let Err(error) = result {
                    act.reply_error(ctx, id, &error, &typing.room_id);
                    return;
                }
                if let Some(sub) = act.subs.get(&RoomId(typing.room_id.clone())) {
                    let frame = protocol::push(Out::Typing(pb::TypingEvent {
                        room_id: typing.room_id.clone(),
                        user_id,
                    }));
                    sub.room.do_send(Relay {
                        frame,
                        except: Some(act.id),
                    });
                }
                act.reply(ctx, id, Out::Ack(pb::Ack {}));
            }),
        );
    }

    // --- subscriptions ---------------------------------------------------------

    /// `principal` is `None` for an anonymous viewer: the room decides whether it
    /// may watch (a live room that allows anonymous viewers).
    fn subscribe(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        principal: Option<Principal>,
        req: pb::Subscribe,
    ) {
        let room_id = RoomId(req.room_id.clone());
        if self.subs.contains_key(&room_id) || self.pending_subscribes.contains(&room_id) {
            self.reply_error(
                ctx,
                id,
                &ApiError::already_exists("already subscribed to this room"),
                &req.room_id,
            );
            return;
        }
        // Subscriptions still being checked count too, or frames sent back to back
        // would all pass the limit.
        let max = self.state.settings.realtime.max_subscriptions;
        if self.subs.len() + self.pending_subscribes.len() >= max {
            let error =
                ApiError::exhausted(format!("a connection may subscribe to at most {max} rooms"));
            self.reply_error(ctx, id, &error, &req.room_id);
            return;
        }
        self.pending_subscribes.insert(room_id.clone());
        let state = self.state.clone();
        let since = req.since_seq;
        let batch = self.batch;
        let reads = self.reads.clone();
        let fut = async move {
            let slot = read_slot(&reads).await?;
            let checked_at = Instant::now();
            let Some(principal) = principal else {
                drop(slot);
                let room_id = RoomId::from(crate::domain::validate::id("room_id", &req.room_id)?);
                return Ok((messages::room_actor(&state, &room_id).await?, checked_at));
            };
            let access = check_room_access(&state, &principal, &req.room_id).await?;
            drop(slot);
            access.require_read()?;
            Ok::<_, ApiError>((
                messages::room_actor(&state, &access.room.id).await?,
                checked_at,
            ))
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            act.pending_subscribes.remove(&room_id);
            if act.removed_while_pending.remove(&room_id) {
                let error = ApiError::denied("you were removed from this room");
                act.reply_error(ctx, id, &error, &room_id.0);
                return;
            }
            match result {
                Ok((room, checked_at)) => {
                    let cursor = DirectSub::new(
                        act.id,
                        room_id.clone(),
                        act.transport.pusher(),
                        act.codec,
                        since.unwrap_or(0),
                    );
                    let sub = RoomSub {
                        room,
                        cursor,
                        phase: Phase::CatchingUp,
                        generation: 0,
                        resume_from: since.map(|s| s.saturating_add(1)),
                        pending_reply: Some(id),
                        relocations: 0,
                        batch,
                        tail: false,
                        live_only_start: since.is_none(),
                        catch_up_upto: 0,
                        last_typing: None,
                    };
                    act.subs.insert(room_id.clone(), sub);
                    act.register(ctx, &room_id, Some(checked_at));
                }
                Err(error) => act.reply_error(ctx, id, &error, &room_id.0),
            }
        }));
    }

    /// Sends `Subscribe` to the room for the subscription's current position, after
    /// checking read access again unless `access_checked_at` says it just was (a
    /// kick or ban may have happened while the subscription was away from the room).
    fn register(&mut self, ctx: &mut Ctx, room_id: &RoomId, access_checked_at: Option<Instant>) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let subscriber = Subscriber {
            conn_id: self.id,
            user_id: self
                .principal
                .as_ref()
                .map(|p| p.user_id.clone())
                .unwrap_or_else(|| "".into()),
            codec: self.codec,
            addr: ctx.address().recipient(),
            gauge: self.gauge.clone(),
            batch: false,
            // This connection runs on an HTTP worker's arbiter: its shard delivers
            // the room's batches from the same thread.
            shard: Some(super::fanout_shard::local_shard()),
            registration: 0,
        };
        let anonymous = self.principal.is_none();
        let Some(sub) = self.subs.get_mut(room_id) else {
            return;
        };
        let subscriber = Subscriber {
            batch: sub.batch,
            ..subscriber
        };
        let tail = std::mem::take(&mut sub.tail);
        sub.generation = generation;
        sub.set_phase(Phase::Subscribing {
            buffered: Vec::new(),
        });
        let since = (!sub.live_only_start).then_some(sub.delivered());
        let room = sub.room.clone();
        let state = self.state.clone();
        let principal = self.principal.clone();
        let id = room_id.clone();
        let reads = self.reads.clone();
        let fut = async move {
            let access_checked_at = match access_checked_at {
                Some(at) => at,
                // The room checks an anonymous viewer on every registration.
                None if anonymous => Instant::now(),
                None => {
                    let _slot = read_slot(&reads).await?;
                    let at = Instant::now();
                    check_read(&state, principal, &id).await?;
                    at
                }
            };
            Ok::<_, ApiError>(
                room.send(Subscribe {
                    subscriber,
                    since,
                    access_checked_at,
                    anonymous,
                    tail,
                })
                .await,
            )
        };
        let room_id = room_id.clone();
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            if !act.is_current(&room_id, generation) {
                return;
            }
            match result {
                Err(denied) => act.drop_sub(ctx, &room_id, &denied),
                Ok(Ok(Ok(reply))) => act.registered(ctx, &room_id, reply),
                Ok(Ok(Err(error))) if !is_retired(&error) => act.drop_sub(ctx, &room_id, &error),
                Ok(Ok(Err(_)) | Err(_)) => {
                    // The room actor went away (retired or restarting): ask the
                    // registry for the current one and try again.
                    act.relocate(ctx, &room_id);
                }
            }
        }));
    }

    fn relocate(&mut self, ctx: &mut Ctx, room_id: &RoomId) {
        let Some(sub) = self.subs.get_mut(room_id) else {
            return;
        };
        sub.relocations += 1;
        if sub.relocations > MAX_RELOCATIONS {
            let error = ApiError::unavailable("the room is restarting; subscribe again later");
            self.drop_sub(ctx, room_id, &error);
            return;
        }
        let state = self.state.clone();
        let id = room_id.clone();
        ctx.spawn(
            async move { messages::room_actor(&state, &id).await }
                .into_actor(self)
                .map({
                    let room_id = room_id.clone();
                    move |result, act, ctx| match result {
                        Ok(room) => {
                            if let Some(sub) = act.subs.get_mut(&room_id) {
                                sub.room = room;
                                act.register(ctx, &room_id, None);
                            }
                        }
                        Err(error) => act.drop_sub(ctx, &room_id, &error),
                    }
                }),
        );
    }

    fn drop_sub(&mut self, ctx: &mut Ctx, room_id: &RoomId, error: &ApiError) {
        if let Some(sub) = self.subs.remove(room_id) {
            sub.room.do_send(Unsubscribe { conn_id: self.id });
            self.reply_error(ctx, sub.pending_reply.unwrap_or(0), error, &room_id.0);
        }
    }

    /// Ends a subscription because the user was removed from the room: the
    /// `removed` frame, whatever phase the subscription was in (and an error for a
    /// `subscribe` still unanswered).
    fn removed(&mut self, ctx: &mut Ctx, room_id: &RoomId, frame: &SharedFrame) {
        if self.pending_subscribes.contains(room_id) {
            self.removed_while_pending.insert(room_id.clone());
        }
        let Some(sub) = self.subs.remove(room_id) else {
            return;
        };
        sub.room.do_send(Unsubscribe { conn_id: self.id });
        if let Some(request_id) = sub.pending_reply {
            let error = ApiError::denied("you were removed from this room");
            self.reply_error(ctx, request_id, &error, &room_id.0);
        }
        self.write(ctx, frame.wire(self.codec));
    }

    fn registered(&mut self, ctx: &mut Ctx, room_id: &RoomId, reply: SubscribeReply) {
        let last_seq = match &reply {
            SubscribeReply::Live { last_seq, .. } | SubscribeReply::Behind { last_seq } => {
                *last_seq
            }
        };
        let Some(sub) = self.subs.get_mut(room_id) else {
            return;
        };
        sub.relocations = 0;
        if sub.live_only_start {
            if let SubscribeReply::Live { last_seq, .. } = &reply {
                // A live-only subscription starts here: that is the client's
                // position in the room until its first event.
                self.transport.advance(Cursor::Room(
                    room_id.clone(),
                    sub.delivered().max(*last_seq),
                ));
            }
        }
        if let Some(request_id) = sub.pending_reply.take() {
            let frame = protocol::reply(
                request_id,
                Out::Subscribed(pb::Subscribed {
                    room_id: room_id.0.clone(),
                    last_seq,
                }),
            );
            self.send_frame(ctx, &frame);
        }
        let Some(sub) = self.subs.get_mut(room_id) else {
            return;
        };
        match reply {
            SubscribeReply::Behind { last_seq } => {
                sub.set_phase(Phase::CatchingUp);
                self.catch_up(ctx, room_id.clone(), last_seq);
            }
            SubscribeReply::Live {
                last_seq,
                gap,
                replay,
            } => {
                let buffered = match sub.set_phase(Phase::Live) {
                    Phase::Subscribing { buffered } => buffered,
                    _ => Vec::new(),
                };
                if sub.resume_from.is_none() {
                    // Live only: start after the room's current sequence.
                    sub.set_delivered(sub.delivered().max(last_seq));
                }
                sub.live_only_start = false;
                if let Some((from_seq, to_seq)) = gap {
                    // A live room no longer holds these (or the subscriber lagged):
                    // say so, and continue after them.
                    if to_seq > sub.delivered() {
                        let from_seq = from_seq.max(sub.delivered() + 1);
                        sub.set_delivered(to_seq);
                        self.gap(ctx, room_id, from_seq, to_seq);
                    }
                }
                for event in replay.iter().chain(buffered.iter()) {
                    if !self.deliver(ctx, room_id, event) {
                        return;
                    }
                }
                let Some(sub) = self.subs.get_mut(room_id) else {
                    return;
                };
                if let Some(from_seq) = sub.resume_from.take() {
                    let to_seq = sub.delivered();
                    let frame = protocol::push(Out::Resumed(pb::Resumed {
                        room_id: room_id.0.clone(),
                        from_seq,
                        to_seq,
                    }));
                    self.send_frame(ctx, &frame);
                }
            }
        }
    }

    /// Writes one event if it is the next one; on a gap, goes back to catch-up.
    /// Returns false when the subscription left the live phase.
    fn deliver(&mut self, ctx: &mut Ctx, room_id: &RoomId, event: &Arc<RoomEvent>) -> bool {
        let Some(sub) = self.subs.get_mut(room_id) else {
            return false;
        };
        if event.seq <= sub.delivered() {
            return true;
        }
        if event.seq != sub.delivered().saturating_add(1) {
            tracing::debug!(conn = self.id, room = %room_id, delivered = sub.delivered(), got = event.seq, "gap; catching up");
            self.restart_delivery(ctx, room_id, false);
            return false;
        }
        sub.set_delivered(event.seq);
        self.transport
            .advance(Cursor::Room(room_id.clone(), event.seq));
        let wire = event.frame.wire(self.codec);
        self.write(ctx, wire);
        true
    }

    /// Leaves the room's live delivery and resumes from the last delivered event.
    fn restart_delivery(&mut self, ctx: &mut Ctx, room_id: &RoomId, lagged: bool) {
        let Some(sub) = self.subs.get_mut(room_id) else {
            return;
        };
        sub.room.do_send(Unsubscribe { conn_id: self.id });
        if sub.resume_from.is_none() {
            sub.resume_from = Some(sub.delivered().saturating_add(1));
        }
        let delivered = sub.delivered();
        if lagged {
            let now = Instant::now();
            self.lags.push_back(now);
            while self
                .lags
                .front()
                .is_some_and(|t| now.duration_since(*t) > LAG_WINDOW)
            {
                self.lags.pop_front();
            }
            if self.lags.len() as u32 > self.state.settings.realtime.max_catch_up_rounds {
                self.close(
                    ctx,
                    close::TOO_SLOW,
                    "the connection cannot keep up; reconnect and resume",
                );
                return;
            }
            if self.subs.get(room_id).is_some_and(|s| s.tail) {
                // A live room: no catch-up; the `gap` up to the room's newest
                // event says what was skipped.
                self.register(ctx, room_id, None);
                return;
            }
            crate::metrics::metrics().lagging_frames.inc();
            let frame = protocol::push(Out::Lagging(pb::Lagging {
                room_id: room_id.0.clone(),
                delivered_seq: delivered,
            }));
            self.send_frame(ctx, &frame);
        }
        crate::metrics::metrics().catch_up_rounds.inc();
        self.register(ctx, room_id, None);
    }

    /// Reads events after the last delivered one up to `upto` from the store, page
    /// by page, then subscribes again. Each page waits for one of the connection's
    /// read slots, so many subscriptions catching up take turns.
    fn catch_up(&mut self, ctx: &mut Ctx, room_id: RoomId, upto: u64) {
        let Some(sub) = self.subs.get_mut(&room_id) else {
            return;
        };
        sub.catch_up_upto = upto;
        if sub.delivered() >= upto {
            self.register(ctx, &room_id, None);
            return;
        }
        self.read_page(ctx, room_id);
    }

    /// Reads one page of missed events, after checking read access again.
    fn read_page(&mut self, ctx: &mut Ctx, room_id: RoomId) {
        let Some(sub) = self.subs.get(&room_id) else {
            return;
        };
        let generation = sub.generation;
        let after = sub.delivered();
        let upto = sub.catch_up_upto;
        let state = self.state.clone();
        let principal = self.principal.clone();
        let id = room_id.clone();
        let reads = self.reads.clone();
        // The next page is read once the socket took most of the last one, so
        // catch-up goes at the pace the client reads (crate::ws::transport).
        let drained = self
            .transport
            .drained(self.state.settings.realtime.outbound_queue_bytes);
        let fut = async move {
            drained.await;
            let _slot = read_slot(&reads).await?;
            check_read(&state, principal, &id).await?;
            Ok::<_, ApiError>(
                state
                    .store
                    .messages_after(&id, after, upto, CATCH_UP_PAGE)
                    .await?,
            )
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            if !act.is_current(&room_id, generation) {
                return;
            }
            match result {
                Ok(page) => act.write_page(ctx, room_id, after, upto, &page),
                Err(error) => act.drop_sub(ctx, &room_id, &error),
            }
        }));
    }

    /// Writes a catch-up page (at most the outbound byte budget of it), with a
    /// `gap` frame for every range retention pruned, then goes on catching up.
    fn write_page(
        &mut self,
        ctx: &mut Ctx,
        room_id: RoomId,
        after: u64,
        upto: u64,
        page: &[MessageRecord],
    ) {
        let budget = self.state.settings.realtime.outbound_queue_bytes;
        let mut written = 0usize;
        let mut delivered = after;
        for record in page {
            if record.seq > delivered.saturating_add(1) {
                self.gap(ctx, &room_id, delivered + 1, record.seq - 1);
            }
            let wire = protocol::encode(&protocol::push(protocol::event_kind(record)), self.codec);
            written += wire.len();
            self.transport
                .advance(Cursor::Room(room_id.clone(), record.seq));
            self.write(ctx, wire);
            delivered = record.seq;
            if written >= budget {
                break;
            }
        }
        if page.is_empty() {
            // Nothing is left of (after, upto]: retention pruned it.
            self.gap(ctx, &room_id, after + 1, upto);
            delivered = upto;
        }
        let Some(sub) = self.subs.get_mut(&room_id) else {
            return;
        };
        sub.set_delivered(delivered);
        self.catch_up(ctx, room_id, upto);
    }

    /// Tells the client that events `from_seq..=to_seq` of the room are gone from
    /// history (pruned by retention) and will not be delivered.
    fn gap(&mut self, ctx: &mut Ctx, room_id: &RoomId, from_seq: u64, to_seq: u64) {
        tracing::debug!(conn = self.id, room = %room_id, from_seq, to_seq, "history pruned; sending gap");
        crate::metrics::metrics().gaps_reported.inc();
        self.transport
            .advance(Cursor::Room(room_id.clone(), to_seq));
        let frame = protocol::push(Out::Gap(pb::Gap {
            room_id: room_id.0.clone(),
            from_seq,
            to_seq,
        }));
        self.send_frame(ctx, &frame);
    }
}

/// Waits for one of the connection's store-read slots.
async fn read_slot(reads: &Semaphore) -> Result<SemaphorePermit<'_>, ApiError> {
    reads
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the connection is closing"))
}

/// Fails unless `principal` may read the room now.
async fn check_read(
    state: &AppState,
    principal: Option<Principal>,
    room_id: &RoomId,
) -> Result<(), ApiError> {
    let principal = principal.ok_or_else(|| ApiError::unauthenticated("authenticate first"))?;
    check_room_access(state, &principal, &room_id.0)
        .await?
        .require_read()
}

impl Actor for Connection {
    type Context = Ctx;

    fn started(&mut self, ctx: &mut Self::Context) {
        let rt = &self.state.settings.realtime;
        ctx.set_mailbox_capacity(rt.outbound_queue_frames);
        self.sweep = Some(sweep::register(
            ctx.address().downgrade(),
            self.transport.heartbeat_interval(rt),
            Some(Duration::from_millis(rt.auth_deadline_ms)),
        ));
        if let Some(token) = self.initial_token.take() {
            self.authenticate(ctx, None, token);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(slot) = self.sweep.take() {
            sweep::unregister(slot);
        }
        for (_, sub) in self.subs.drain() {
            sub.room.do_send(Unsubscribe { conn_id: self.id });
        }
        if let Some(principal) = &self.principal {
            let closed = ConnectionClosed {
                user_id: principal.user_id.clone(),
                conn_id: self.id,
            };
            // Nothing waits for a close to reach the registry.
            drop(report(
                &self.state.sessions,
                ConnectionChange::Closed(closed),
            ));
        }
    }
}

impl StreamHandler<Result<WsMessage, ReadError>> for Connection {
    fn handle(&mut self, item: Result<WsMessage, ReadError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        let message = match item {
            Ok(message) => message,
            Err(ReadError::Protocol(e)) if e.code == CLOSE_TOO_BIG => {
                let limit = self.state.settings.realtime.max_frame_bytes;
                self.close(
                    ctx,
                    close::MESSAGE_TOO_BIG,
                    &format!("frame larger than {limit} bytes"),
                );
                return;
            }
            Err(ReadError::Protocol(e)) => {
                self.close(
                    ctx,
                    e.code,
                    &format!("WebSocket protocol error: {}", e.reason),
                );
                return;
            }
            Err(ReadError::Lost(why)) => {
                tracing::debug!(conn = self.id, %why, "connection lost");
                ctx.stop();
                return;
            }
        };
        match message {
            WsMessage::Text(text) => match serde_json::from_str::<pb::ClientFrame>(&text) {
                Ok(frame) => self.on_frame(ctx, frame),
                Err(e) => self.malformed(ctx, 0, format!("malformed JSON frame: {e}")),
            },
            WsMessage::Binary(bytes) => match pb::ClientFrame::decode(bytes) {
                Ok(frame) => self.on_frame(ctx, frame),
                Err(e) => self.malformed(ctx, 0, format!("malformed protobuf frame: {e}")),
            },
            WsMessage::Ping(payload) => self.transport.pong(payload),
            WsMessage::Pong(_) => {}
            WsMessage::Close(frame) => {
                // Answer the close handshake with the client's own code.
                self.transport.close(frame.map(|f| f.code), "");
                ctx.stop();
            }
        }
    }
}

impl Handler<RoomPush> for Connection {
    type Result = ();

    fn handle(&mut self, msg: RoomPush, ctx: &mut Self::Context) {
        match msg {
            RoomPush::Events { batch, bytes } => {
                self.gauge.release(bytes);
                let room_id = &batch.room_id;
                let Some(sub) = self.subs.get_mut(room_id) else {
                    return;
                };
                match &mut sub.phase {
                    Phase::Subscribing { buffered } => {
                        buffered.extend(batch.events.iter().cloned())
                    }
                    Phase::CatchingUp => {}
                    Phase::Live => {
                        let (first, last) = match (batch.events.first(), batch.events.last()) {
                            (Some(first), Some(last)) => (first.seq, last.seq),
                            _ => return,
                        };
                        let contiguous = last - first + 1 == batch.events.len() as u64;
                        if batch.sends_as_batch(sub.batch)
                            && contiguous
                            && first == sub.delivered().saturating_add(1)
                        {
                            // The common case: the whole batch is next; one shared
                            // frame, one write.
                            sub.set_delivered(last);
                            self.transport.advance(Cursor::Room(room_id.clone(), last));
                            let wire = batch.batch_wire(self.codec);
                            self.write(ctx, wire);
                            return;
                        }
                        for event in &batch.events {
                            if !self.deliver(ctx, room_id, event) {
                                break;
                            }
                        }
                    }
                }
            }
            RoomPush::Notice {
                room_id,
                frame,
                bytes,
            } => {
                self.gauge.release(bytes);
                if self.subs.contains_key(&room_id) {
                    self.write(ctx, frame.wire(self.codec));
                }
            }
            RoomPush::Lagged { room_id, tail } => {
                if tail {
                    if let Some(sub) = self.subs.get_mut(&room_id) {
                        sub.tail = true;
                    }
                }
                self.restart_delivery(ctx, &room_id, true)
            }
            RoomPush::Resync { room_id } => self.restart_delivery(ctx, &room_id, false),
            RoomPush::Removed { room_id, frame } => self.removed(ctx, &room_id, &frame),
        }
    }
}

impl Handler<SweepSignal> for Connection {
    type Result = ();

    fn handle(&mut self, msg: SweepSignal, ctx: &mut Self::Context) {
        match msg {
            SweepSignal::Heartbeat => {
                let idle = Duration::from_millis(self.state.settings.realtime.idle_timeout_ms);
                if self.transport.client_talks() && self.last_heard.elapsed() > idle {
                    self.close(ctx, close::IDLE_TIMEOUT, "no heartbeat received");
                } else {
                    self.transport.heartbeat();
                }
            }
            SweepSignal::Deadline => match &self.principal {
                // An anonymous viewer (live rooms) has no deadline to authenticate.
                None if self.anonymous => {}
                None => self.close(ctx, close::AUTH_FAILED, "not authenticated in time"),
                Some(principal) if principal.expires_at <= now_ms() => self.close(
                    ctx,
                    close::TOKEN_EXPIRED,
                    "access token expired; reconnect with a fresh token",
                ),
                // Authenticated again with a later token meanwhile.
                Some(_) => {}
            },
        }
    }
}

impl Handler<SessionSignal> for Connection {
    type Result = ();

    fn handle(&mut self, msg: SessionSignal, ctx: &mut Self::Context) {
        match msg {
            SessionSignal::ServerShutdown => self.close(
                ctx,
                close::SHUTDOWN,
                "the server is shutting down; reconnect",
            ),
            SessionSignal::SignedOut => {
                self.close(ctx, close::SIGNED_OUT, "the session was signed out")
            }
            SessionSignal::Removed { room_id, frame } => self.removed(ctx, &room_id, &frame),
            SessionSignal::Notification(record) => self.notification_pushed(ctx, &record),
            SessionSignal::Disconnected { reason } => self.close(ctx, close::DISCONNECTED, &reason),
            SessionSignal::Announcement { frame } => self.write(ctx, frame.wire(self.codec)),
            SessionSignal::Describe(reply) => {
                let mut subscriptions: Vec<RoomId> = self.subs.keys().cloned().collect();
                subscriptions.sort();
                reply.send(ConnectionDetails {
                    transport: self.transport.describe(self.codec),
                    remote_address: self.remote_addr.map(|a| a.to_string()),
                    subscriptions,
                });
            }
        }
    }
}

// --- user notifications ---------------------------------------------------------
//
// Self-contained: the cursor logic is `NotificationFeed` (domain::notifications);
// this part only starts reads and writes frames.

impl Connection {
    fn subscribe_notifications(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        principal: Principal,
        req: pb::SubscribeNotifications,
    ) {
        let user = match principal.require_user() {
            Ok(user) => user.clone(),
            Err(error) => return self.reply_error(ctx, id, &error, ""),
        };
        // Counted like other requests, and its store reads share the connection's
        // read slots: a client repeating the frame cannot flood the store.
        if !self.admit(ctx, id, "") {
            return;
        }
        let generation = self
            .notifications
            .as_ref()
            .map_or(1, |feed| feed.generation() + 1);
        self.notifications = Some(NotificationFeed::starting(generation));
        let state = self.state.clone();
        let reads = self.reads.clone();
        ctx.spawn(
            async move {
                let _slot = read_slot(&reads).await?;
                notifications::feed_start(&state, &user, req.since_seq).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.inflight -= 1;
                let Some(feed) = act
                    .notifications
                    .as_mut()
                    .filter(|f| f.generation() == generation)
                else {
                    // A later subscribe_notifications replaced this one; it still
                    // gets its one reply.
                    let error = ApiError::new(
                        crate::error::Code::Aborted,
                        "replaced by a later subscribe_notifications",
                    );
                    return act.reply_error(ctx, id, &error, "");
                };
                match result {
                    Ok((last_seq, since)) => {
                        feed.start(since);
                        act.transport.advance(Cursor::Notifications(since));
                        let reply = pb::NotificationsSubscribed { last_seq };
                        act.reply(ctx, id, Out::NotificationsSubscribed(reply));
                        act.read_notifications(ctx);
                    }
                    Err(error) => {
                        act.notifications = None;
                        act.reply_error(ctx, id, &error, "");
                    }
                }
            }),
        );
    }

    /// Reads the next page after the feed's cursor and writes it.
    fn read_notifications(&mut self, ctx: &mut Ctx) {
        let (Some(feed), Some(principal)) = (&self.notifications, &self.principal) else {
            return;
        };
        let generation = feed.generation();
        let after = feed.delivered();
        let user = principal.user_id.clone();
        let state = self.state.clone();
        let page_max = state.settings.notifications.page_max as usize;
        let reads = self.reads.clone();
        ctx.spawn(
            async move {
                let _slot = read_slot(&reads).await?;
                notifications::feed_page(&state, &user, after).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                let Some(feed) = act
                    .notifications
                    .as_mut()
                    .filter(|f| f.generation() == generation)
                else {
                    return;
                };
                match result {
                    Ok(page) => {
                        let full = page.len() >= page_max;
                        let (out, again) = feed.on_page(page, full);
                        for record in &out {
                            act.write_notification(ctx, record);
                        }
                        if again {
                            act.read_notifications(ctx);
                        }
                    }
                    Err(error) => {
                        // The subscription ends; the client subscribes again
                        // from the last notification it got.
                        act.notifications = None;
                        act.send_frame(
                            ctx,
                            &protocol::push(Out::Error(pb::Error {
                                code: error.code.as_str().to_owned(),
                                message: format!(
                                    "notification subscription ended: {}",
                                    error.message
                                ),
                                room_id: String::new(),
                                retry_after_ms: 0,
                            })),
                        );
                    }
                }
            }),
        );
    }

    /// A notification of the user was stored (through the user's session).
    fn notification_pushed(&mut self, ctx: &mut Ctx, record: &NotificationRecord) {
        let Some(feed) = self.notifications.as_mut() else {
            return;
        };
        match feed.on_live(record.seq) {
            LiveStep::Deliver => self.write_notification(ctx, record),
            LiveStep::Read => self.read_notifications(ctx),
            LiveStep::Skip => {}
        }
    }

    fn write_notification(&self, ctx: &mut Ctx, record: &NotificationRecord) {
        self.transport.advance(Cursor::Notifications(record.seq));
        let frame = protocol::push(Out::Notification(notifications::notification_to_proto(
            record, 0,
        )));
        self.send_frame(ctx, &frame);
    }
}
