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

/// Subprotocol for JSON text frames that may carry `batch` frames.
pub const SUBPROTOCOL_JSON_BATCH: &str = "roomcast.v1.json+batch";
/// Subprotocol for protobuf binary frames that may carry `batch` frames.
pub const SUBPROTOCOL_PROTO_BATCH: &str = "roomcast.v1.proto+batch";

/// The codec of a subprotocol and whether it takes `batch` frames; `None` for a
/// subprotocol roomcast does not speak.
pub fn parse_subprotocol(name: &str) -> Option<(FrameCodec, bool)> {
    match name {
        SUBPROTOCOL_JSON => Some((FrameCodec::Json, false)),
        SUBPROTOCOL_PROTO => Some((FrameCodec::Proto, false)),
        SUBPROTOCOL_JSON_BATCH => Some((FrameCodec::Json, true)),
        SUBPROTOCOL_PROTO_BATCH => Some((FrameCodec::Proto, true)),
        _ => None,
    }
}

/// The subprotocol name of a codec, with or without batches.
pub fn subprotocol(codec: FrameCodec, batch: bool) -> &'static str {
    match (codec, batch) {
        (FrameCodec::Json, false) => SUBPROTOCOL_JSON,
        (FrameCodec::Proto, false) => SUBPROTOCOL_PROTO,
        (FrameCodec::Json, true) => SUBPROTOCOL_JSON_BATCH,
        (FrameCodec::Proto, true) => SUBPROTOCOL_PROTO_BATCH,
    }
}

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

/// Field number of `ServerFrame.batch` (realtime.proto).
const SERVER_FRAME_BATCH_FIELD: u32 = 32;

/// A `batch` push of `room_id` holding `frames` in order, built from each frame's
/// encoding in `codec` (encoded on first use, then shared): nothing is encoded
/// twice, and the result is exactly what encoding the `Batch` message would give.
pub fn encode_batch<'a>(
    room_id: &str,
    frames: impl Iterator<Item = &'a SharedFrame> + Clone,
    codec: FrameCodec,
) -> WireFrame {
    match codec {
        FrameCodec::Json => {
            // `{"batch":{"roomId":"...","frames":[f1,f2,...]}}`: the proto3 JSON
            // of ServerFrame { batch: Batch { room_id, frames } } (id 0 omitted).
            let parts: Vec<ByteString> = frames
                .map(|f| match f.wire(FrameCodec::Json) {
                    WireFrame::Text(text) => text,
                    WireFrame::Binary(_) => ByteString::new(),
                })
                .collect();
            let room = serde_json::to_string(room_id).unwrap_or_else(|_| String::from("\"\""));
            let mut out = String::with_capacity(
                32 + room.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>(),
            );
            out.push_str("{\"batch\":{\"roomId\":");
            out.push_str(&room);
            out.push_str(",\"frames\":[");
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(part);
            }
            out.push_str("]}}");
            WireFrame::Text(ByteString::from(out))
        }
        FrameCodec::Proto => {
            use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
            let parts: Vec<Bytes> = frames
                .map(|f| match f.wire(FrameCodec::Proto) {
                    WireFrame::Binary(bytes) => bytes,
                    WireFrame::Text(_) => Bytes::new(),
                })
                .collect();
            // Batch { room_id = 1; repeated ServerFrame frames = 2; }: one byte of
            // key each (fields 1 and 2), then the length and the bytes.
            let room_len = if room_id.is_empty() {
                0
            } else {
                1 + encoded_len_varint(room_id.len() as u64) + room_id.len()
            };
            let inner = room_len
                + parts
                    .iter()
                    .map(|p| 1 + encoded_len_varint(p.len() as u64) + p.len())
                    .sum::<usize>();
            let mut out = Vec::with_capacity(inner + 8);
            encode_key(
                SERVER_FRAME_BATCH_FIELD,
                WireType::LengthDelimited,
                &mut out,
            );
            encode_varint(inner as u64, &mut out);
            if !room_id.is_empty() {
                encode_key(1, WireType::LengthDelimited, &mut out);
                encode_varint(room_id.len() as u64, &mut out);
                out.extend_from_slice(room_id.as_bytes());
            }
            for part in &parts {
                encode_key(2, WireType::LengthDelimited, &mut out);
                encode_varint(part.len() as u64, &mut out);
                out.extend_from_slice(part);
            }
            WireFrame::Binary(Bytes::from(out))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn text_push(seq: u64, text: &str) -> SharedFrame {
        SharedFrame::new(push(pb::server_frame::Kind::Message(pb::Message {
            room_id: "r_1".into(),
            seq,
            text: text.into(),
            kind: pb::MessageKind::Text as i32,
            ..Default::default()
        })))
    }

    /// A batch built from the shared encodings decodes, in both codecs, to the
    /// `Batch` message holding the same frames in order.
    #[test]
    fn batches_decode_to_their_frames_in_both_codecs() {
        let frames = [
            text_push(1, "a"),
            text_push(2, "b \"quoted\" é"),
            text_push(3, ""),
        ];
        let expected = push(pb::server_frame::Kind::Batch(pb::Batch {
            room_id: "r_1".into(),
            frames: frames.iter().map(|f| f.frame().clone()).collect(),
        }));
        let WireFrame::Binary(bytes) = encode_batch("r_1", frames.iter(), FrameCodec::Proto) else {
            panic!("protobuf batches are binary");
        };
        assert_eq!(pb::ServerFrame::decode(bytes).expect("decodes"), expected);
        assert_eq!(Bytes::from(expected.encode_to_vec()), {
            let WireFrame::Binary(again) = encode_batch("r_1", frames.iter(), FrameCodec::Proto)
            else {
                panic!("binary");
            };
            again
        });
        let WireFrame::Text(text) = encode_batch("r_1", frames.iter(), FrameCodec::Json) else {
            panic!("JSON batches are text");
        };
        let decoded: pb::ServerFrame = serde_json::from_str(&text).expect("JSON decodes");
        assert_eq!(decoded, expected);
    }
}
