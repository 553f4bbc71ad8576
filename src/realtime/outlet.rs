//! [`Outlet`]: the write side of a push transport, as the connection actor drives
//! it. Every call returns at once; a peer that does not read fast enough makes
//! [`Outlet::write`] fail with [`QueueFull`] (the connection then closes with
//! `TOO_SLOW`), while the rooms see the bytes it has queued through the
//! connection's [`OutboundGauge`] and switch it to catch-up (lagging) first.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{
    actors::room::OutboundGauge,
    admission::Refusal,
    ids::RoomId,
    protocol::{FrameCodec, WireFrame},
    settings::RealtimeSettings,
    ws::transport::{Pusher, QueueFull, Transport},
};

/// A position the next written frame moves the client to: a transport that
/// labels frames with resumable cursors (SSE's `id:`) records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// The client has everything of the room up to this sequence.
    Room(RoomId, u64),
    /// The client has every user notification up to this sequence.
    Notifications(u64),
}

/// The write side of one push transport.
pub trait Outlet {
    /// How the admin API names the transport.
    fn describe(&self, codec: FrameCodec) -> String;
    /// Charges every byte queued from now on to `gauge` as well.
    fn attach_gauge(&self, gauge: Arc<OutboundGauge>);
    /// Takes a slot of `user`'s connections (see [`crate::admission`]).
    fn admit_user(&self, user: &str) -> Result<(), Refusal>;
    /// The connection became an anonymous viewer: it leaves the slots of
    /// connections waiting to authenticate (see [`crate::admission`]).
    fn admit_anonymous(&self) {}
    /// The next [`Outlet::write`] moves the client to `cursor`.
    fn advance(&self, cursor: Cursor);
    /// Queues one frame.
    fn write(&self, frame: WireFrame) -> Result<(), QueueFull>;
    /// Queues a heartbeat (a WebSocket ping, an SSE comment).
    fn heartbeat(&self);
    /// Answers a client's ping (WebSocket only).
    fn pong(&self, payload: Bytes);
    /// Queues the end of the stream with a close code and stops accepting writes.
    fn close(&self, code: Option<u16>, reason: &str);
    /// Completes once at most `below` bytes are queued, or the peer is gone.
    fn drained(&self, below: usize) -> Pin<Box<dyn Future<Output = ()>>>;
    /// How often [`Outlet::heartbeat`] is due.
    fn heartbeat_interval(&self, settings: &RealtimeSettings) -> Duration;
    /// A handle the arbiter's fan-out shard writes a room's batches through
    /// directly; `None`: they reach the transport through the connection actor.
    fn pusher(&self) -> Option<Pusher> {
        None
    }
    /// Whether the client talks back (answers pings); only then is a silent client
    /// closed after `realtime.idle_timeout_ms`.
    fn client_talks(&self) -> bool;
}

impl Outlet for Transport {
    fn describe(&self, codec: FrameCodec) -> String {
        match codec {
            FrameCodec::Json => "websocket+json".into(),
            FrameCodec::Proto => "websocket+proto".into(),
        }
    }

    fn attach_gauge(&self, gauge: Arc<OutboundGauge>) {
        Transport::attach_gauge(self, gauge)
    }

    fn admit_user(&self, user: &str) -> Result<(), Refusal> {
        Transport::admit_user(self, user)
    }

    fn admit_anonymous(&self) {
        Transport::admit_anonymous(self)
    }

    fn advance(&self, _cursor: Cursor) {
        // A WebSocket client tracks its own cursors from the frames' sequences.
    }

    fn write(&self, frame: WireFrame) -> Result<(), QueueFull> {
        match frame {
            WireFrame::Text(text) => self.text(text),
            WireFrame::Binary(bytes) => self.binary(bytes),
        }
    }

    fn heartbeat(&self) {
        self.ping(b"")
    }

    fn pong(&self, payload: Bytes) {
        Transport::pong(self, payload)
    }

    fn close(&self, code: Option<u16>, reason: &str) {
        Transport::close(self, code, reason)
    }

    fn drained(&self, below: usize) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(Transport::drained(self, below))
    }

    fn heartbeat_interval(&self, settings: &RealtimeSettings) -> Duration {
        Duration::from_millis(settings.heartbeat_interval_ms)
    }

    fn client_talks(&self) -> bool {
        true
    }

    fn pusher(&self) -> Option<Pusher> {
        Some(Transport::pusher(self))
    }
}
