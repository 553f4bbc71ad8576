//! [`PresenceBoard`]: who is online on the other nodes. Every
//! `cluster.presence_refresh_ms` each node publishes its share — every user with a
//! live connection on it — as a `Presence` message on [`Topic::Control`]; every
//! node keeps the latest share of each other node and forgets a share not refreshed
//! for `cluster.presence_expiry_ms`, so the users of a node that died (or was cut
//! off from Redis) drop out within the expiry. This node's own users come from its
//! session registry at the moment of the question, so they are exact; the others'
//! are at most one refresh old.
//!
//! [`online_anywhere`] answers "which of these users are online" for
//! UserService/PushService presence queries and online counts.
//!
//! ## A node that dies or is cut off
//!
//! A node killed between committing a chat message and publishing it leaves the
//! other nodes' subscribers without that message until the room's next event (and
//! so does a node cut off from Redis for what it commits meanwhile). So the board
//! also watches the nodes: when a node's share expires (it died, or was cut off),
//! when a node not known is heard from (it started, or came back), and when a node
//! says its share follows a relink (it was cut off for less than the expiry),
//! every loaded room of this node reads the store past the last sequence it
//! delivered ([`Bus::recheck_rooms`]; one query per loaded chat room). A message
//! committed by a node that died is thus delivered everywhere within
//! `cluster.presence_expiry_ms` plus one refresh, with no further send in the room.
//!
//! A share is the whole list each time (not changes): a lost message (pub/sub is
//! at most once) is repaired by the next one, and a node that starts learns every
//! other node's users within one refresh. The cost is one message of
//! (users on the node × ~25 bytes) per node per refresh.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use actix::{
    fut::WrapFuture as _, Actor, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler,
    Message, Supervised,
};

use super::{Body, Bus, Delivered, Interest, Topic};
use crate::{
    actors::{
        session_registry::{OnlineUserIds, OnlineUsers, SessionRegistry},
        supervision::guarded,
    },
    domain::AppState,
    error::ApiError,
    ids::UserId,
    proto::node::v1 as node,
};

/// Which of `user_ids` are online on another node (this node's own are asked of
/// its session registry).
#[derive(Message)]
#[rtype(result = "HashSet<UserId>")]
pub struct OnlineElsewhere {
    pub user_ids: Vec<UserId>,
}

/// How many users the other nodes report online (for the admin API).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CountElsewhere;

/// Every user the other nodes report online (AdminService.Announce's count).
#[derive(Message)]
#[rtype(result = "HashSet<UserId>")]
pub struct UsersElsewhere;

/// The latest share of one other node.
struct Share {
    users: HashSet<UserId>,
    seen: Instant,
}

/// See the module docs.
pub struct PresenceBoard {
    bus: Bus,
    sessions: Addr<SessionRegistry>,
    refresh: Duration,
    expiry: Duration,
    others: HashMap<String, Share>,
    interest: Option<Interest>,
}

impl PresenceBoard {
    pub fn new(
        bus: Bus,
        sessions: Addr<SessionRegistry>,
        refresh: Duration,
        expiry: Duration,
    ) -> Self {
        Self {
            bus,
            sessions,
            refresh,
            expiry,
            others: HashMap::new(),
            interest: None,
        }
    }

    fn forget_expired(&mut self) {
        let expiry = self.expiry;
        let mut lost = 0;
        self.others.retain(|node, share| {
            let alive = share.seen.elapsed() < expiry;
            if !alive {
                tracing::info!(node = %node, users = share.users.len(), "presence of a silent node expired");
                lost += 1;
            }
            alive
        });
        if lost > 0 {
            self.recheck_rooms("a node went silent");
        }
    }

    /// Every loaded room reads what another node may have committed without
    /// publishing it (see the module docs).
    fn recheck_rooms(&self, why: &'static str) {
        let rooms = self.bus.recheck_rooms();
        tracing::info!(rooms, why, "loaded rooms re-read the store");
    }

    /// Publishes this node's share (asked of the session registry); `relinked`:
    /// the first after a Redis fault.
    fn publish_share(&mut self, ctx: &mut Context<Self>, relinked: bool) {
        let asked = self.sessions.send(OnlineUserIds);
        ctx.spawn(asked.into_actor(self).map(move |users, act, _ctx| {
            // A registry that is restarting has nobody online yet.
            let users = users.unwrap_or_default();
            act.bus.publish(
                Topic::Control,
                Body::Presence(node::Presence {
                    node_id: act.bus.node_id().to_owned(),
                    online_user_ids: users.into_iter().map(|u| u.0).collect(),
                    offline_user_ids: Vec::new(),
                    relinked,
                }),
                act.interest.as_ref(),
            );
        }));
    }
}

impl Actor for PresenceBoard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.interest = Some(self.bus.register(Topic::Control, ctx.address().recipient()));
        self.publish_share(ctx, false);
        ctx.run_interval(self.refresh, |act, ctx| {
            act.forget_expired();
            act.publish_share(ctx, false);
        });
    }
}

impl Supervised for PresenceBoard {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.interest = None;
        self.others.clear();
    }
}

impl Handler<Delivered> for PresenceBoard {
    type Result = ();

    fn handle(&mut self, msg: Delivered, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, ctx| {
                let envelope = &msg.0;
                match &envelope.body {
                    Body::Presence(share) if share.node_id != act.bus.node_id() => {
                        if share.relinked {
                            act.recheck_rooms("a node is linked again");
                        } else if !act.others.contains_key(&share.node_id) {
                            act.recheck_rooms("a node joined or came back");
                        }
                        act.others.insert(
                            share.node_id.clone(),
                            Share {
                                users: share
                                    .online_user_ids
                                    .iter()
                                    .map(|u| UserId(u.clone()))
                                    .collect(),
                                seen: Instant::now(),
                            },
                        );
                    }
                    // Back after a Redis fault: tell the others at once.
                    Body::Relinked => act.publish_share(ctx, true),
                    _ => {}
                }
            },
        )
    }
}

impl Handler<OnlineElsewhere> for PresenceBoard {
    type Result = actix::MessageResult<OnlineElsewhere>;

    fn handle(&mut self, msg: OnlineElsewhere, _ctx: &mut Self::Context) -> Self::Result {
        self.forget_expired();
        actix::MessageResult(
            msg.user_ids
                .into_iter()
                .filter(|u| self.others.values().any(|share| share.users.contains(u)))
                .collect(),
        )
    }
}

impl Handler<CountElsewhere> for PresenceBoard {
    type Result = usize;

    fn handle(&mut self, _msg: CountElsewhere, _ctx: &mut Self::Context) -> usize {
        self.forget_expired();
        let users: HashSet<&UserId> = self.others.values().flat_map(|s| &s.users).collect();
        users.len()
    }
}

impl Handler<UsersElsewhere> for PresenceBoard {
    type Result = actix::MessageResult<UsersElsewhere>;

    fn handle(&mut self, _msg: UsersElsewhere, _ctx: &mut Self::Context) -> Self::Result {
        self.forget_expired();
        actix::MessageResult(
            self.others
                .values()
                .flat_map(|s| s.users.iter().cloned())
                .collect(),
        )
    }
}

/// Which of `user_ids` are online on any node: this node's registry, and the
/// latest shares of the others.
pub async fn online_anywhere(
    state: &AppState,
    user_ids: Vec<UserId>,
) -> Result<HashSet<UserId>, ApiError> {
    let mut online = state
        .sessions
        .send(OnlineUsers {
            user_ids: user_ids.clone(),
        })
        .await?
        .0;
    let rest: Vec<UserId> = user_ids
        .into_iter()
        .filter(|u| !online.contains(u))
        .collect();
    if !rest.is_empty() {
        // A board that is restarting knows nobody elsewhere for a moment.
        online.extend(
            state
                .presence
                .send(OnlineElsewhere { user_ids: rest })
                .await
                .unwrap_or_default(),
        );
    }
    Ok(online)
}
