//! Envelopes to and from the node protocol (`roomcast.node.v1.NodeMessage`, binary
//! protobuf): encoded once per publish when a message leaves the node, decoded
//! once when it arrives.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use super::broker::{Body, Envelope, Topic};
use crate::{
    ids::{RoomId, UserId},
    model::MessageKind,
    proto::node::v1 as node,
    protocol::RoomEvent,
    store::MessageRecord,
};

/// Why a message from another node was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a NodeMessage: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("the message has no kind (a newer node's message?)")]
    Empty,
    #[error("unknown message kind {0}")]
    Kind(i32),
}

/// `envelope` as the bytes of one `NodeMessage`; `None` for what never leaves the
/// node ([`Body::Relinked`]).
pub fn encode(envelope: &Envelope) -> Option<Bytes> {
    use node::node_message::Kind;
    let kind = match &envelope.body {
        Body::RoomEvents {
            room_id,
            events,
            live,
        } => Kind::RoomEvents(node::RoomEvents {
            room_id: room_id.0.clone(),
            events: events.iter().map(|e| stored_event(&e.record)).collect(),
            live: *live,
        }),
        Body::RoomNotice(notice) => Kind::RoomNotice(notice.clone()),
        Body::User(message) => Kind::User(message.clone()),
        Body::Control(control) => Kind::Control(control.clone()),
        Body::Presence(presence) => Kind::Presence(presence.clone()),
        Body::Relinked => return None,
    };
    let message = node::NodeMessage {
        origin_node: envelope.origin.to_string(),
        kind: Some(kind),
    };
    Some(Bytes::from(message.encode_to_vec()))
}

/// The envelope a `NodeMessage` received on `topic` carries.
pub fn decode(topic: Topic, bytes: &[u8]) -> Result<Envelope, DecodeError> {
    use node::node_message::Kind;
    let message = node::NodeMessage::decode(bytes)?;
    let body = match message.kind.ok_or(DecodeError::Empty)? {
        Kind::RoomEvents(events) => Body::RoomEvents {
            room_id: RoomId(events.room_id.clone()),
            events: events
                .events
                .into_iter()
                .map(|e| message_record(&events.room_id, e).map(|r| Arc::new(RoomEvent::new(&r))))
                .collect::<Result<_, _>>()?,
            live: events.live,
        },
        Kind::RoomNotice(notice) => Body::RoomNotice(notice),
        Kind::User(message) => Body::User(message),
        Kind::Control(control) => Body::Control(control),
        Kind::Presence(presence) => Body::Presence(presence),
    };
    Ok(Envelope {
        topic,
        origin: message.origin_node.into(),
        body,
    })
}

/// A room notice in the node protocol, for [`Body::RoomNotice`]: publish it on
/// [`Topic::Room`] and every node's room actor (this node's included) applies it.
pub fn room_notice(room_id: &RoomId, notice: &crate::actors::room::RoomNotice) -> node::RoomNotice {
    use crate::actors::room::RoomNotice;
    use node::room_notice::Kind;
    let kind = match notice {
        RoomNotice::Member(event) => Kind::Member(event.clone()),
        RoomNotice::Removed {
            user_id,
            reason,
            message,
        } => Kind::Removed(node::Removed {
            user_id: user_id.0.clone(),
            reason: *reason as i32,
            message: message.clone(),
        }),
        RoomNotice::Updated(room) => Kind::Updated((**room).clone()),
        RoomNotice::Presence {
            user_id,
            online,
            version,
        } => Kind::Presence(node::PresenceChange {
            user_id: user_id.0.clone(),
            online: *online,
            version: *version,
        }),
    };
    node::RoomNotice {
        room_id: room_id.0.clone(),
        kind: Some(kind),
    }
}

pub(crate) fn stored_event(record: &MessageRecord) -> node::StoredEvent {
    node::StoredEvent {
        seq: record.seq,
        id: record.id.clone(),
        kind: record.kind.to_proto(),
        sender_id: record.sender_id.0.clone(),
        text: record.text.clone(),
        metadata: record
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        reply_to_seq: record.reply_to_seq,
        target_seq: record.target_seq,
        client_message_id: record.client_message_id.clone(),
        created_at: record.created_at,
        edited_at: record.edited_at,
        deleted: record.deleted,
    }
}

pub(crate) fn message_record(
    room_id: &str,
    e: node::StoredEvent,
) -> Result<MessageRecord, DecodeError> {
    Ok(MessageRecord {
        room_id: RoomId(room_id.to_owned()),
        seq: e.seq,
        id: e.id,
        kind: MessageKind::from_proto(e.kind).ok_or(DecodeError::Kind(e.kind))?,
        sender_id: UserId(e.sender_id),
        text: e.text,
        metadata: e.metadata.into_iter().collect(),
        reply_to_seq: e.reply_to_seq,
        target_seq: e.target_seq,
        client_message_id: e.client_message_id,
        created_at: e.created_at,
        edited_at: e.edited_at,
        deleted: e.deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A room's events survive the trip through the node protocol unchanged.
    #[test]
    fn room_events_round_trip() {
        let record = MessageRecord {
            room_id: RoomId("r_1".into()),
            seq: 7,
            id: "m_1".into(),
            kind: MessageKind::Edit,
            sender_id: UserId("u_1".into()),
            text: "héllo".into(),
            metadata: [("k".to_owned(), "v".to_owned())].into_iter().collect(),
            reply_to_seq: 0,
            target_seq: 3,
            client_message_id: Some("c1".into()),
            created_at: 1_700_000_000_000,
            edited_at: Some(1_700_000_000_500),
            deleted: false,
        };
        let envelope = Envelope {
            topic: Topic::Room(RoomId("r_1".into())),
            origin: "n1".into(),
            body: Body::RoomEvents {
                room_id: RoomId("r_1".into()),
                events: vec![Arc::new(RoomEvent::new(&record))],
                live: false,
            },
        };
        let bytes = encode(&envelope).expect("room events leave the node");
        let back = decode(envelope.topic.clone(), &bytes).expect("decodes");
        assert_eq!(&*back.origin, "n1");
        let Body::RoomEvents { events, live, .. } = back.body else {
            panic!("room events");
        };
        assert!(!live);
        assert_eq!(events.len(), 1);
        let got = &events[0].record;
        assert_eq!(
            (
                got.seq,
                &got.text,
                got.kind,
                got.target_seq,
                got.edited_at,
                &got.client_message_id
            ),
            (
                7,
                &record.text,
                MessageKind::Edit,
                3,
                Some(1_700_000_000_500),
                &record.client_message_id
            )
        );
        assert_eq!(got.metadata, record.metadata);
        assert!(encode(&Envelope {
            topic: Topic::Control,
            origin: "n1".into(),
            body: Body::Relinked
        })
        .is_none());
    }

    #[test]
    fn channels_map_back_to_topics() {
        for topic in [
            Topic::Room(RoomId("r_a:b".into())),
            Topic::User(UserId("u_1".into())),
            Topic::Control,
        ] {
            assert_eq!(Topic::from_channel("p:", &topic.channel("p:")), Some(topic));
        }
        assert_eq!(Topic::from_channel("p:", "q:control"), None);
    }
}
