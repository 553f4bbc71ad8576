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
        self.others.retain(|node, share| {
            let alive = share.seen.elapsed() < expiry;
            if !alive {
                tracing::info!(node = %node, users = share.users.len(), "presence of a silent node expired");
            }
            alive
        });
    }

    /// Publishes this node's share (asked of the session registry).
    fn publish_share(&mut self, ctx: &mut Context<Self>) {
        let asked = self.sessions.send(OnlineUserIds);
        ctx.spawn(asked.into_actor(self).map(|users, act, _ctx| {
            // A registry that is restarting has nobody online yet.
            let users = users.unwrap_or_default();
            act.bus.publish(
                Topic::Control,
                Body::Presence(node::Presence {
                    node_id: act.bus.node_id().to_owned(),
                    online_user_ids: users.into_iter().map(|u| u.0).collect(),
                    offline_user_ids: Vec::new(),
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
        self.publish_share(ctx);
        ctx.run_interval(self.refresh, |act, ctx| {
            act.forget_expired();
            act.publish_share(ctx);
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
                    Body::Relinked => act.publish_share(ctx),
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
