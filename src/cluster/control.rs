//! [`ControlListener`]: what every node must do about a user, whichever node the
//! request came to. Sign-outs and revoked sessions, revoked API keys, suspensions,
//! `DisconnectUser`, stored notifications (PublishToUser and the others) and
//! announcements are published on [`Topic::Control`] through the [`Bus`] by the
//! functions below; every node's listener (this node's included: the bus hands
//! every publish back, so there is one path) passes them to its own session
//! registry and poll hub, which act on the connections and waiting polls they
//! hold. A node without connections of that user does nothing.
//!
//! Control is at most once between nodes (Redis pub/sub). What must not be missed
//! is also in the store and checked there: a revoked session or API key, or a
//! suspended account, is refused at the next authentication on every node; a
//! notification is read from the store by the user's next catch-up or poll. The
//! broadcast only makes it immediate.
//!
//! Why the control topic and not per-user channels: a node would otherwise
//! subscribe to one Redis channel per online user (and unsubscribe at every last
//! disconnect); one channel per cluster costs each node one message per command,
//! which it drops when it holds nothing of that user.

use std::{collections::BTreeMap, sync::Arc};

use actix::{Actor, Addr, AsyncContext as _, Context, Handler, Supervised};

use super::{Body, Bus, Delivered, Interest, Topic};
use crate::{
    actors::{
        poll_hub::{EndUserPolls, NotificationStored, PollEnd, PollHub, PollTakenElsewhere},
        session_registry::{SessionRegistry, SignOutUser, SignalEveryone, SignalUser},
        supervision::guarded,
        user_session::SessionSignal,
    },
    ids::{SessionId, UserId},
    proto::{node::v1 as node, v1 as pb},
    protocol::SharedFrame,
    store::{AccessChange, NotificationKind, NotificationRecord, Store},
};

use node::control::Kind as ControlKind;

/// Ends one session of `user` (`Some`) or all of them, on every node: its live
/// connections close with 4501 and its waiting long-polls end.
pub fn sign_out(bus: &Bus, user_id: &UserId, session_id: Option<&SessionId>) {
    publish(
        bus,
        ControlKind::SignedOut(node::SignedOut {
            user_id: user_id.0.clone(),
            session_id: session_id.map(|s| s.0.clone()).unwrap_or_default(),
        }),
    );
}

/// Closes every connection of `user` on every node with 4504 and `reason`
/// (PublishService.DisconnectUser, AdminService.DisconnectUser); waiting long-polls
/// end with `ended` 4504.
pub fn disconnect_user(bus: &Bus, user_id: &UserId, reason: &str) {
    publish(
        bus,
        ControlKind::DisconnectUser(node::DisconnectUser {
            user_id: user_id.0.clone(),
            close_code: u32::from(crate::protocol::close::DISCONNECTED),
            reason: reason.to_owned(),
        }),
    );
}

/// An API key was revoked: connections authenticated with it close on every node
/// (an API key's principal has the key id as its user id).
pub fn api_key_revoked(bus: &Bus, key_id: &str) {
    publish(
        bus,
        ControlKind::ApiKeyRevoked(node::ApiKeyRevoked {
            key_id: key_id.to_owned(),
        }),
    );
}

/// An operator's announcement to the connections of every other node (the
/// publishing node's listener skips it: AdminService.Announce signals that
/// node's own connections directly, and counts them).
pub fn announce(bus: &Bus, frame: pb::ServerFrame) {
    publish(
        bus,
        ControlKind::Announce(node::Announce { frame: Some(frame) }),
    );
}

/// This node committed an access change: the other nodes drop what they cache of
/// it (this node's own cache was updated by the store already).
pub fn access_changed(bus: &Bus, change: &AccessChange) {
    match serde_json::to_string(change) {
        Ok(change_json) => publish(
            bus,
            ControlKind::AccessChanged(node::AccessChanged { change_json }),
        ),
        Err(e) => tracing::error!(error = %e, ?change, "access change not forwarded"),
    }
}

/// A notification of `record.user_id` was stored: the user's connections on every
/// node that subscribed to notifications push it, and the user's waiting long-polls
/// wake up and read it.
pub fn notification_stored(bus: &Bus, record: &NotificationRecord) {
    bus.publish(
        Topic::Control,
        Body::User(node::UserMessage {
            user_id: record.user_id.0.clone(),
            kind: Some(node::user_message::Kind::Notification(
                crate::domain::notifications::notification_to_proto(record, 0),
            )),
        }),
        None,
    );
}

fn publish(bus: &Bus, kind: ControlKind) {
    bus.publish(
        Topic::Control,
        Body::Control(node::Control { kind: Some(kind) }),
        None,
    );
}

/// Hears [`Topic::Control`] on this node and acts on its session registry and poll
/// hub (see the module docs). Supervised; registers its interest when it starts.
pub struct ControlListener {
    bus: Bus,
    store: Store,
    sessions: Addr<SessionRegistry>,
    polls: Addr<PollHub>,
    interest: Option<Interest>,
}

impl ControlListener {
    pub fn new(
        bus: Bus,
        store: Store,
        sessions: Addr<SessionRegistry>,
        polls: Addr<PollHub>,
    ) -> Self {
        Self {
            bus,
            store,
            sessions,
            polls,
            interest: None,
        }
    }

    fn control(&self, origin: &str, kind: &ControlKind) {
        match kind {
            // This node's own changes are in its cache already.
            ControlKind::AccessChanged(m) if origin != self.bus.node_id() => {
                match serde_json::from_str::<AccessChange>(&m.change_json) {
                    Ok(change) => self.store.apply_remote_access_change(&change),
                    Err(e) => {
                        // Unknown to this (older) node: forget everything cached.
                        tracing::warn!(error = %e, "unreadable access change; clearing the access cache");
                        self.store.clear_access_cache();
                    }
                }
            }
            ControlKind::AccessChanged(_) => {}
            ControlKind::SignedOut(m) => self.sessions.do_send(SignOutUser {
                user_id: UserId(m.user_id.clone()),
                session_id: (!m.session_id.is_empty()).then(|| SessionId(m.session_id.clone())),
            }),
            ControlKind::ApiKeyRevoked(m) => self.sessions.do_send(SignOutUser {
                user_id: UserId(m.key_id.clone()),
                session_id: None,
            }),
            ControlKind::DisconnectUser(m) => {
                let user_id = UserId(m.user_id.clone());
                self.polls.do_send(EndUserPolls {
                    user_id: user_id.clone(),
                    session_id: None,
                    why: PollEnd::Disconnected {
                        reason: m.reason.clone(),
                    },
                });
                self.sessions.do_send(SignalUser {
                    user_id,
                    signal: SessionSignal::Disconnected {
                        reason: m.reason.clone(),
                    },
                });
            }
            // The node that took the request signalled its own connections.
            ControlKind::Announce(_) if origin == self.bus.node_id() => {}
            ControlKind::Announce(m) => {
                if let Some(frame) = m.frame.clone() {
                    self.sessions.do_send(SignalEveryone {
                        signal: SessionSignal::Announcement {
                            frame: Arc::new(SharedFrame::new(frame)),
                        },
                    });
                }
            }
            // A newer poll with a poll id waits on another node: the older one
            // here ends (this node's own were ended when it registered).
            ControlKind::PollTaken(m) if origin != self.bus.node_id() => {
                self.polls.do_send(PollTakenElsewhere {
                    user_id: UserId(m.user_id.clone()),
                    poll_id: m.poll_id.clone(),
                    origin: origin.to_owned(),
                    registered_at_ms: m.registered_at_ms,
                })
            }
            ControlKind::PollTaken(_) => {}
            // Rooms hear their own updates on their room topic.
            ControlKind::RoomUpdated(_) => {}
        }
    }

    fn user(&self, message: &node::UserMessage) {
        let Some(node::user_message::Kind::Notification(n)) = &message.kind else {
            return;
        };
        let Some(record) = notification_record(&message.user_id, n) else {
            tracing::warn!(user = %message.user_id, "undecodable notification from the cluster; dropped (the store has it)");
            return;
        };
        let user_id = record.user_id.clone();
        self.polls.do_send(NotificationStored {
            user_id: user_id.clone(),
        });
        self.sessions.do_send(SignalUser {
            user_id,
            signal: SessionSignal::Notification(Arc::new(record)),
        });
    }
}

/// The stored kind of a protobuf [`pb::NotificationKind`] value.
fn notification_kind(value: i32) -> Option<NotificationKind> {
    Some(match pb::NotificationKind::try_from(value).ok()? {
        pb::NotificationKind::Published => NotificationKind::Published,
        pb::NotificationKind::Invitation => NotificationKind::Invitation,
        pb::NotificationKind::Mention => NotificationKind::Mention,
        pb::NotificationKind::Kicked => NotificationKind::Kicked,
        pb::NotificationKind::Banned => NotificationKind::Banned,
        pb::NotificationKind::Unspecified => return None,
    })
}

/// The stored record a [`pb::Notification`] was made from.
fn notification_record(user_id: &str, n: &pb::Notification) -> Option<NotificationRecord> {
    let created_at = n
        .created_at
        .as_ref()
        .map_or(0, |t| t.seconds * 1_000 + i64::from(t.nanos) / 1_000_000);
    Some(NotificationRecord {
        user_id: UserId(user_id.to_owned()),
        seq: n.seq,
        id: n.id.clone(),
        kind: notification_kind(n.kind)?,
        sender: n.sender.clone(),
        room_id: n.room_id.clone(),
        room_seq: n.room_seq,
        text: n.text.clone(),
        data: n
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        created_at,
    })
}

impl Actor for ControlListener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.interest = Some(self.bus.register(Topic::Control, ctx.address().recipient()));
    }
}

impl Supervised for ControlListener {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // `started` registers again.
        self.interest = None;
    }
}

impl Handler<Delivered> for ControlListener {
    type Result = ();

    fn handle(&mut self, msg: Delivered, ctx: &mut Self::Context) {
        guarded(
            self,
            ctx,
            || (),
            move |act, _ctx| match &msg.0.body {
                Body::Control(node::Control { kind: Some(kind) }) => {
                    act.control(&msg.0.origin, kind)
                }
                Body::User(message) => act.user(message),
                // Commands missed while the node was cut off are enforced by the
                // store at the next check, but only if the cache did not keep
                // what they changed: drop it all.
                Body::Relinked => act.store.clear_access_cache(),
                Body::Control(node::Control { kind: None }) => {
                    tracing::debug!("empty control message ignored");
                }
                // Rooms, presence: other consumers' business.
                _ => {}
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_survives_the_trip_through_the_node_protocol() {
        let record = NotificationRecord {
            user_id: UserId("u_1".into()),
            seq: 7,
            id: "n_1".into(),
            kind: NotificationKind::Published,
            sender: "billing".into(),
            room_id: String::new(),
            room_seq: 0,
            text: "paid".into(),
            data: BTreeMap::from([("invoice".to_owned(), "42".to_owned())]),
            created_at: 1_764_000_000_123,
        };
        let proto = crate::domain::notifications::notification_to_proto(&record, 0);
        let back = notification_record("u_1", &proto).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{record:?}"));
    }
}
