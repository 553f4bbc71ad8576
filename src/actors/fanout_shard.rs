//! [`FanoutShard`]: one per HTTP worker arbiter, started (under supervision) by the
//! first connection on that arbiter that subscribes to a room. It holds, per room,
//! the subscribers whose connections live on its arbiter, and delivers each batch a
//! room hands it to them: a room with subscribers on every worker sends each shard
//! one message per batch (the batch encoded once per codec, bytes shared), and the
//! shards write to their connections in parallel, each on its own thread. A shard
//! never waits for a connection: one whose queue is full is dropped from the shard
//! and told it lagged (the same handling as a room's own delivery), so a slow
//! consumer delays neither its shard's other connections nor the other shards.
//!
//! The room stays the one place that decides who is subscribed: it adds and removes
//! subscribers here in the same order as it hands out batches (one mailbox, FIFO),
//! and learns from [`ShardLagged`] which ones the shard dropped.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use actix::{Actor, Addr, Context, Handler, Message, Recipient, Supervised, Supervisor};

use super::{
    room::{ConnectionId, EventBatch, RoomPush, Subscriber},
    supervision::guarded,
};
use crate::ids::RoomId;

/// Adds a subscriber of `room_id` (its connection lives on this shard's arbiter).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddSubscriber {
    pub room_id: RoomId,
    pub subscriber: Subscriber,
}

/// Removes a subscriber of `room_id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveSubscriber {
    pub room_id: RoomId,
    pub conn_id: ConnectionId,
}

/// Forgets every subscriber of a room (it restarted or was deleted, and told
/// them itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DropRoom {
    pub room_id: RoomId,
}

/// Delivers a batch of a room to the shard's subscribers of that room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliverBatch {
    pub batch: Arc<EventBatch>,
    /// A live room: a lagging subscriber moves to the tail (see `RoomPush::Lagged`).
    pub live: bool,
    /// Where to report the subscribers the shard dropped.
    pub room: Recipient<ShardLagged>,
}

/// The shard dropped a subscriber whose queue was full (and told it it lagged).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShardLagged {
    pub conn_id: ConnectionId,
    /// The registration the shard held (`Subscriber::registration`): a newer one
    /// of the same connection stays.
    pub registration: u64,
}

/// One arbiter's share of every room's subscribers.
#[derive(Default)]
pub struct FanoutShard {
    rooms: HashMap<RoomId, HashMap<ConnectionId, Subscriber>>,
}

thread_local! {
    /// The shard of the arbiter this thread runs.
    static LOCAL: RefCell<Option<Addr<FanoutShard>>> = const { RefCell::new(None) };
}

/// The shard of the current arbiter, started on first use. Call it from an actor
/// running on an HTTP worker's arbiter (a connection).
pub fn local_shard() -> Addr<FanoutShard> {
    LOCAL.with(|local| {
        local
            .borrow_mut()
            .get_or_insert_with(|| Supervisor::start(|_| FanoutShard::default()))
            .clone()
    })
}

impl FanoutShard {
    fn deliver(&mut self, msg: DeliverBatch) {
        let batch = msg.batch;
        let Some(subscribers) = self.rooms.get_mut(&batch.room_id) else {
            return;
        };
        // Bytes per codec, as single frames and as one batch frame.
        let mut sizes = [[None, None], [None, None]];
        let mut lagged = Vec::new();
        let mut delivered = 0u64;
        for (conn_id, sub) in subscribers.iter() {
            let bytes = *sizes[sub.codec as usize][usize::from(sub.batch)]
                .get_or_insert_with(|| batch.wire_len(sub.codec, sub.batch));
            if !sub.gauge.try_reserve(bytes) {
                lagged.push(*conn_id);
                continue;
            }
            let push = RoomPush::Events {
                batch: batch.clone(),
                bytes,
            };
            if sub.addr.try_send(push).is_err() {
                sub.gauge.release(bytes);
                lagged.push(*conn_id);
                continue;
            }
            delivered += batch.events.len() as u64;
        }
        crate::metrics::metrics()
            .messages_delivered
            .inc_by(delivered);
        for conn_id in lagged {
            if let Some(sub) = subscribers.remove(&conn_id) {
                tracing::debug!(room = %batch.room_id, conn = conn_id, "subscriber lagged (shard)");
                crate::metrics::metrics().subscribers_lagged.inc();
                sub.addr.do_send(RoomPush::Lagged {
                    room_id: batch.room_id.clone(),
                    tail: msg.live,
                });
                msg.room.do_send(ShardLagged {
                    conn_id,
                    registration: sub.registration,
                });
            }
        }
        if subscribers.is_empty() {
            self.rooms.remove(&batch.room_id);
        }
    }
}

impl Actor for FanoutShard {
    type Context = Context<Self>;
}

impl Supervised for FanoutShard {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // The subscribers stay: the rooms still count on this shard for them.
        tracing::warn!(rooms = self.rooms.len(), "fan-out shard restarting");
    }
}

impl Handler<AddSubscriber> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: AddSubscriber, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                act.rooms
                    .entry(msg.room_id)
                    .or_default()
                    .insert(msg.subscriber.conn_id, msg.subscriber);
            },
        )
    }
}

impl Handler<RemoveSubscriber> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: RemoveSubscriber, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| {
                if let Some(subscribers) = act.rooms.get_mut(&msg.room_id) {
                    subscribers.remove(&msg.conn_id);
                    if subscribers.is_empty() {
                        act.rooms.remove(&msg.room_id);
                    }
                }
            },
        )
    }
}

impl Handler<DropRoom> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: DropRoom, _ctx: &mut Self::Context) {
        self.rooms.remove(&msg.room_id);
    }
}

impl Handler<DeliverBatch> for FanoutShard {
    type Result = ();

    fn handle(&mut self, msg: DeliverBatch, ctx: &mut Self::Context) {
        guarded(self, ctx, || (), move |act, _ctx| act.deliver(msg))
    }
}
