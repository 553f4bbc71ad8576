//! The WebSocket protocol's wire details: the two subprotocols, frames encoded once
//! and shared by every connection that sends them, and the documented close codes.

use std::sync::OnceLock;

use bytes::Bytes;
use bytestring::ByteString;
use prost::Message as _;

use crate::{proto::v1 as pb, store::MessageRecord};

/// Subprotocol for text frames carrying proto3 JSON.
pub const SUBPROTOCOL_JSON: &str = "roomcast.v1.json";
/// Subprotocol for binary frames carrying protobuf.
pub const SUBPROTOCOL_PROTO: &str = "roomcast.v1.proto";

/// How a connection encodes its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCodec {
    Json,
    Proto,
}

/// A frame ready to write: text for JSON connections, binary for protobuf ones.
#[derive(Debug, Clone)]
pub enum WireFrame {
    Text(ByteString),
    Binary(Bytes),
}

impl WireFrame {
    pub fn len(&self) -> usize {
        match self {
            WireFrame::Text(t) => t.len(),
            WireFrame::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A server frame encoded at most once per codec, however many connections send it.
#[derive(Debug)]
pub struct SharedFrame {
    frame: pb::ServerFrame,
    json: OnceLock<ByteString>,
    proto: OnceLock<Bytes>,
}

impl SharedFrame {
    pub fn new(frame: pb::ServerFrame) -> Self {
        Self {
            frame,
            json: OnceLock::new(),
            proto: OnceLock::new(),
        }
    }

    /// The decoded frame.
    pub fn frame(&self) -> &pb::ServerFrame {
        &self.frame
    }

    /// The frame in `codec`, encoding it on first use.
    pub fn wire(&self, codec: FrameCodec) -> WireFrame {
        match codec {
            FrameCodec::Json => {
                WireFrame::Text(self.json.get_or_init(|| encode_json(&self.frame)).clone())
            }
            FrameCodec::Proto => WireFrame::Binary(
                self.proto
                    .get_or_init(|| Bytes::from(self.frame.encode_to_vec()))
                    .clone(),
            ),
        }
    }
}

/// Encodes any server frame to JSON text.
pub fn encode_json(frame: &pb::ServerFrame) -> ByteString {
    // Serializing generated pbjson types into a String cannot fail: every field is
    // a plain value or map with string keys.
    ByteString::from(serde_json::to_string(frame).unwrap_or_else(|_| String::from("{}")))
}

/// Encodes a one-off frame for one connection.
pub fn encode(frame: &pb::ServerFrame, codec: FrameCodec) -> WireFrame {
    match codec {
        FrameCodec::Json => WireFrame::Text(encode_json(frame)),
        FrameCodec::Proto => WireFrame::Binary(Bytes::from(frame.encode_to_vec())),
    }
}

/// One committed room event, as pushed to subscribers. It keeps the stored record
/// so that the room's ring can show a later edit or deletion exactly as the store
/// does.
#[derive(Debug)]
pub struct RoomEvent {
    pub seq: u64,
    pub record: MessageRecord,
    pub frame: SharedFrame,
}

impl RoomEvent {
    pub fn new(record: &MessageRecord) -> Self {
        Self {
            seq: record.seq,
            record: record.clone(),
            frame: SharedFrame::new(push(event_kind(record))),
        }
    }
}

/// The push frame variant for a stored event.
pub fn event_kind(record: &MessageRecord) -> pb::server_frame::Kind {
    use crate::model::MessageKind;
    let message = crate::domain::convert::message_to_proto(record);
    match record.kind {
        MessageKind::Text => pb::server_frame::Kind::Message(message),
        MessageKind::Edit => pb::server_frame::Kind::Edited(message),
        MessageKind::Delete => pb::server_frame::Kind::Deleted(message),
    }
}

/// A push (id 0).
pub fn push(kind: pb::server_frame::Kind) -> pb::ServerFrame {
    pb::ServerFrame {
        id: 0,
        kind: Some(kind),
    }
}

/// A reply to request `id`.
pub fn reply(id: u64, kind: pb::server_frame::Kind) -> pb::ServerFrame {
    pb::ServerFrame {
        id,
        kind: Some(kind),
    }
}

/// WebSocket close codes. 4000–4499: the client should reconnect (after a backoff);
/// 4500–4999: it should not reconnect without user action.
pub mod close {
    /// Could not keep up even with catch-up from the store; reconnect and resume.
    pub const TOO_SLOW: u16 = 4000;
    /// The server is shutting down or draining; reconnect (to another node).
    pub const SHUTDOWN: u16 = 4001;
    /// The access token expired; reconnect with a fresh token.
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// Nothing was received within the idle timeout; reconnect.
    pub const IDLE_TIMEOUT: u16 = 4003;
    /// Authentication failed or did not happen in time; fix the token first.
    pub const AUTH_FAILED: u16 = 4500;
    /// The session was signed out or revoked; sign in again.
    pub const SIGNED_OUT: u16 = 4501;
    /// Too many malformed frames; fix the client.
    pub const PROTOCOL_ERROR: u16 = 4502;
    /// The user already holds `realtime.max_connections_per_user` connections;
    /// close another one first.
    pub const TOO_MANY_CONNECTIONS: u16 = 4503;
    /// The application's backend disconnected the user (PublishService.DisconnectUser,
    /// e.g. after banning them); do not reconnect without user action.
    pub const DISCONNECTED: u16 = 4504;
    /// A frame was larger than the server accepts (standard code).
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}
