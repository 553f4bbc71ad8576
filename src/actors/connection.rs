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
//!   to that catch-up, so the client always continues from exactly where it was.
//!
//! Heartbeats: a ping every `heartbeat_interval_ms`; the connection closes when
//! nothing arrived for `idle_timeout_ms`. Close codes are in [`crate::protocol::close`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, Addr, AsyncContext as _,
    Handler, SpawnHandle, StreamHandler,
};
use prost::Message as _;

use super::{
    room::{
        is_retired, ConnectionId, OutboundGauge, RoomActor, RoomPush, Subscribe, SubscribeReply,
        Subscriber, Unsubscribe,
    },
    session_registry::{ConnectionClosed, ConnectionOpened},
    user_session::SessionSignal,
};
use crate::{
    actors::{authenticator::Authenticate, room::Relay},
    domain::{access::room_access, messages, AppState, Credential, Principal},
    error::ApiError,
    ids::{now_ms, RoomId},
    proto::v1 as pb,
    protocol::{self, close, FrameCodec, RoomEvent, WireFrame},
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
    /// Last sequence written to the client.
    delivered: u64,
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
    /// Whether the user could send when subscribing (typing is only relayed then;
    /// kicks and bans end the subscription).
    may_send: bool,
    /// When a typing notice was last relayed, to throttle them.
    last_typing: Option<Instant>,
}

/// One WebSocket connection.
pub struct Connection {
    id: ConnectionId,
    state: AppState,
    codec: FrameCodec,
    principal: Option<Principal>,
    /// A token from the upgrade request, checked when the actor starts.
    initial_token: Option<String>,
    subs: HashMap<RoomId, RoomSub>,
    gauge: Arc<OutboundGauge>,
    last_heard: Instant,
    malformed: u32,
    expiry: Option<SpawnHandle>,
    lags: VecDeque<Instant>,
    next_generation: u64,
    /// The write side of the socket.
    transport: Transport,
}

impl Connection {
    /// A connection writing through `transport`; its reader must be added to the
    /// actor's context as a stream.
    pub fn new(
        state: AppState,
        codec: FrameCodec,
        token: Option<String>,
        transport: Transport,
    ) -> Self {
        let gauge = Arc::new(OutboundGauge::new(
            state.settings.realtime.outbound_queue_bytes,
        ));
        // Bytes queued for the socket count against the same budget as pushes
        // waiting in the mailbox: a peer that stops reading lags.
        transport.attach_gauge(gauge.clone());
        Self {
            id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
            state,
            codec,
            principal: None,
            initial_token: token,
            subs: HashMap::new(),
            gauge,
            last_heard: Instant::now(),
            malformed: 0,
            expiry: None,
            lags: VecDeque::new(),
            next_generation: 1,
            transport,
        }
    }

    /// Whether `generation` is still the subscription's latest (re)subscription.
    fn is_current(&self, room_id: &RoomId, generation: u64) -> bool {
        self.subs
            .get(room_id)
            .is_some_and(|s| s.generation == generation)
    }

    fn write(&self, ctx: &mut Ctx, wire: WireFrame) {
        let queued = match wire {
            WireFrame::Text(text) => self.transport.text(text),
            WireFrame::Binary(bytes) => self.transport.binary(bytes),
        };
        if let Err(full) = queued {
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
            async move { auth.send(Authenticate { bearer: token }).await }
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
        if let Some(timer) = self.expiry.take() {
            ctx.cancel_future(timer);
        }
        let remaining = principal.expires_at.saturating_sub(now_ms());
        if principal.expires_at != i64::MAX {
            let after = Duration::from_millis(remaining.max(0) as u64);
            self.expiry = Some(ctx.run_later(after, |act, ctx| {
                act.close(
                    ctx,
                    close::TOKEN_EXPIRED,
                    "access token expired; reconnect with a fresh token",
                );
            }));
        }
        if first {
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
            self.state.sessions.do_send(ConnectionOpened {
                user_id: principal.user_id.clone(),
                conn_id: self.id,
                session_id,
                addr: ctx.address().recipient(),
            });
            tracing::debug!(conn = self.id, user = %principal.user_id, "connection authenticated");
        }
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
        };
        self.principal = Some(principal);
        self.reply(ctx, request_id.unwrap_or(0), Out::Authenticated(reply));
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
        if let In::Ping(_) = kind {
            self.reply(ctx, id, Out::Pong(pb::Pong {}));
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
        match kind {
            In::Subscribe(sub) => self.subscribe(ctx, id, principal, sub),
            In::Unsubscribe(unsub) => {
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
            In::Send(request) => {
                let state = self.state.clone();
                let room_id = request.room_id.clone();
                ctx.spawn(
                    async move { messages::send_message(&state, &principal, request).await }
                        .into_actor(self)
                        .map(move |result, act, ctx| match result {
                            Ok(sent) => act.reply(ctx, id, Out::Sent(sent)),
                            Err(error) => act.reply_error(ctx, id, &error, &room_id),
                        }),
                );
            }
            In::MarkRead(request) => {
                let state = self.state.clone();
                let room_id = request.room_id.clone();
                ctx.spawn(
                    async move { messages::mark_read(&state, &principal, request).await }
                        .into_actor(self)
                        .map(move |result, act, ctx| match result {
                            Ok(marked) => act.reply(ctx, id, Out::MarkedRead(marked)),
                            Err(error) => act.reply_error(ctx, id, &error, &room_id),
                        }),
                );
            }
            In::Typing(typing) => {
                let room_id = RoomId(typing.room_id.clone());
                let Some(sub) = self.subs.get_mut(&room_id) else {
                    let error = ApiError::failed_precondition(
                        "subscribe to the room before sending typing",
                    );
                    self.reply_error(ctx, id, &error, &typing.room_id);
                    return;
                };
                if !sub.may_send {
                    let error = ApiError::denied("only members who may send can send typing");
                    self.reply_error(ctx, id, &error, &typing.room_id);
                    return;
                }
                // At most one typing notice per room per interval is relayed; the
                // others are acknowledged and dropped (typing is not history).
                let now = Instant::now();
                if sub
                    .last_typing
                    .is_some_and(|t| now.duration_since(t) < TYPING_INTERVAL)
                {
                    self.reply(ctx, id, Out::Ack(pb::Ack {}));
                    return;
                }
                sub.last_typing = Some(now);
                let frame = protocol::push(Out::Typing(pb::TypingEvent {
                    room_id: typing.room_id,
                    user_id: principal.user_id.0.clone(),
                }));
                sub.room.do_send(Relay {
                    frame,
                    except: Some(self.id),
                });
                self.reply(ctx, id, Out::Ack(pb::Ack {}));
            }
            In::Authenticate(_) | In::Ping(_) => {}
        }
    }

    // --- subscriptions ---------------------------------------------------------

    fn subscribe(&mut self, ctx: &mut Ctx, id: u64, principal: Principal, req: pb::Subscribe) {
        let room_id = RoomId(req.room_id.clone());
        if self.subs.contains_key(&room_id) {
            self.reply_error(
                ctx,
                id,
                &ApiError::already_exists("already subscribed to this room"),
                &req.room_id,
            );
            return;
        }
        if self.subs.len() >= self.state.settings.realtime.max_subscriptions {
            let error = ApiError::exhausted(format!(
                "a connection may subscribe to at most {} rooms",
                self.state.settings.realtime.max_subscriptions
            ));
            self.reply_error(ctx, id, &error, &req.room_id);
            return;
        }
        let state = self.state.clone();
        let since = req.since_seq;
        let fut = async move {
            let access = room_access(&state, &principal, &req.room_id).await?;
            access.require_read()?;
            let may_send = access.require_send().is_ok();
            Ok::<_, ApiError>((
                messages::room_actor(&state, &access.room.id).await?,
                may_send,
            ))
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok((room, may_send)) => {
                        if act.subs.contains_key(&room_id) {
                            let error = ApiError::already_exists("already subscribed to this room");
                            act.reply_error(ctx, id, &error, &room_id.0);
                            return;
                        }
                        let sub = RoomSub {
                            room,
                            delivered: since.unwrap_or(0),
                            phase: Phase::CatchingUp,
                            generation: 0,
                            resume_from: since.map(|s| s + 1),
                            pending_reply: Some(id),
                            relocations: 0,
                            may_send,
                            last_typing: None,
                        };
                        act.subs.insert(room_id.clone(), sub);
                        act.register(ctx, &room_id, since.is_none());
                    }
                    Err(error) => act.reply_error(ctx, id, &error, &room_id.0),
                }),
        );
    }

    /// Sends `Subscribe` to the room for the subscription's current position.
    fn register(&mut self, ctx: &mut Ctx, room_id: &RoomId, live_only: bool) {
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
        };
        let Some(sub) = self.subs.get_mut(room_id) else {
            return;
        };
        sub.generation = generation;
        sub.phase = Phase::Subscribing {
            buffered: Vec::new(),
        };
        let since = (!live_only).then_some(sub.delivered);
        let room = sub.room.clone();
        let room_id = room_id.clone();
        ctx.spawn(
            async move { room.send(Subscribe { subscriber, since }).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    if !act.is_current(&room_id, generation) {
                        return;
                    }
                    match result {
                        Ok(Ok(reply)) => act.registered(ctx, &room_id, reply),
                        Ok(Err(error)) if !is_retired(&error) => {
                            act.drop_sub(ctx, &room_id, &error)
                        }
                        Ok(Err(_)) | Err(_) => {
                            // The room actor went away (retired or restarting): ask the
                            // registry for the current one and try again.
                            act.relocate(ctx, &room_id);
                        }
                    }
                }),
        );
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
                                act.register(ctx, &room_id, false);
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
                sub.phase = Phase::CatchingUp;
                self.catch_up(ctx, room_id.clone(), last_seq);
            }
            SubscribeReply::Live { last_seq, replay } => {
                let buffered = match std::mem::replace(&mut sub.phase, Phase::Live) {
                    Phase::Subscribing { buffered } => buffered,
                    _ => Vec::new(),
                };
                if sub.resume_from.is_none() {
                    // Live only: start after the room's current sequence.
                    sub.delivered = sub.delivered.max(last_seq);
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
                    let to_seq = sub.delivered;
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
        if event.seq <= sub.delivered {
            return true;
        }
        if event.seq != sub.delivered + 1 {
            tracing::debug!(conn = self.id, room = %room_id, delivered = sub.delivered, got = event.seq, "gap; catching up");
            self.restart_delivery(ctx, room_id, false);
            return false;
        }
        sub.delivered = event.seq;
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
            sub.resume_from = Some(sub.delivered + 1);
        }
        let delivered = sub.delivered;
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
            let frame = protocol::push(Out::Lagging(pb::Lagging {
                room_id: room_id.0.clone(),
                delivered_seq: delivered,
            }));
            self.send_frame(ctx, &frame);
        }
        self.register(ctx, room_id, false);
    }

    /// Reads events after the last delivered one up to `upto` from the store, page
    /// by page, then subscribes again.
    fn catch_up(&mut self, ctx: &mut Ctx, room_id: RoomId, upto: u64) {
        let Some(sub) = self.subs.get(&room_id) else {
            return;
        };
        let generation = sub.generation;
        let after = sub.delivered;
        if after >= upto {
            self.register(ctx, &room_id, false);
            return;
        }
        let store = self.state.store.clone();
        let id = room_id.clone();
        // The next page is read once the socket took most of the last one, so
        // catch-up goes at the pace the client reads (crate::ws::transport).
        let drained = self
            .transport
            .drained(self.state.settings.realtime.outbound_queue_bytes);
        ctx.spawn(
            async move {
                drained.await;
                store.messages_after(&id, after, upto, CATCH_UP_PAGE).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                if !act.is_current(&room_id, generation) {
                    return;
                }
                match result {
                    Ok(page) => {
                        for record in &page {
                            let frame = protocol::push(protocol::event_kind(record));
                            act.send_frame(ctx, &frame);
                        }
                        let Some(sub) = act.subs.get_mut(&room_id) else {
                            return;
                        };
                        // An empty page means the rest was pruned by retention.
                        sub.delivered = page.last().map_or(upto, |r| r.seq);
                        act.catch_up(ctx, room_id, upto);
                    }
                    Err(e) => act.drop_sub(ctx, &room_id, &ApiError::from(e)),
                }
            }),
        );
    }
}

impl Actor for Connection {
    type Context = Ctx;

    fn started(&mut self, ctx: &mut Self::Context) {
        let rt = self.state.settings.realtime.clone();
        ctx.set_mailbox_capacity(rt.outbound_queue_frames);
        ctx.run_interval(
            Duration::from_millis(rt.heartbeat_interval_ms),
            move |act, ctx| {
                if act.last_heard.elapsed() > Duration::from_millis(rt.idle_timeout_ms) {
                    act.close(ctx, close::IDLE_TIMEOUT, "no heartbeat received");
                } else {
                    act.transport.ping(b"");
                }
            },
        );
        ctx.run_later(Duration::from_millis(rt.auth_deadline_ms), |act, ctx| {
            if act.principal.is_none() {
                act.close(ctx, close::AUTH_FAILED, "not authenticated in time");
            }
        });
        if let Some(token) = self.initial_token.take() {
            self.authenticate(ctx, None, token);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for (_, sub) in self.subs.drain() {
            sub.room.do_send(Unsubscribe { conn_id: self.id });
        }
        if let Some(principal) = &self.principal {
            self.state.sessions.do_send(ConnectionClosed {
                user_id: principal.user_id.clone(),
                conn_id: self.id,
            });
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
            RoomPush::Lagged { room_id } => self.restart_delivery(ctx, &room_id, true),
            RoomPush::Resync { room_id } => self.restart_delivery(ctx, &room_id, false),
            RoomPush::Removed { room_id, frame } => {
                if self.subs.remove(&room_id).is_some() {
                    self.write(ctx, frame.wire(self.codec));
                }
            }
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
        }
    }
}
