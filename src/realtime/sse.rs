//! The Server-Sent Events outlet: frames of a [`Connection`] written as SSE events
//! into a streamed HTTP response body.
//!
//! Each frame is one event: `event:` names the frame's kind (`message`, `gap`,
//! `notification`, `subscribed`, ...), `data:` is the proto3-JSON `ServerFrame`.
//! A frame that moves the client's position (a room event, a gap, a notification,
//! the start of a live-only subscription) carries an `id:`: the client's whole
//! position ([`Cursors`]), so a reconnect with `Last-Event-ID` resumes every room
//! and the notification feed with no gap and no duplicate. Heartbeats are SSE
//! comments; the stream opens with `retry:`.
//!
//! The body is fed by a queue whose bytes count against the connection's budget
//! (like the WebSocket's write queue): a client that stops reading lags, then is
//! closed; memory stays bounded. When the client goes away the body is dropped and
//! the connection actor is told at once (its [`gone`](SseOutlet::new) stream).
//!
//! [`Connection`]: crate::actors::connection::Connection

use std::{
    cell::RefCell,
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};

use super::outlet::{Cursor, Outlet};
use crate::{
    actors::room::OutboundGauge,
    admission::{Refusal, WsTicket},
    protocol::{FrameCodec, WireFrame},
    settings::RealtimeSettings,
    ws::transport::{QueueFull, ReadError},
};

/// Longest `Last-Event-ID` accepted, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 16 * 1024;

/// A client's position: per room the last sequence it has, and its notification
/// cursor. Encoded as base64url (no padding) JSON `{"r":{"room":seq},"n":seq}`; the
/// token is opaque to clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursors {
    #[serde(rename = "r", default)]
    pub rooms: BTreeMap<String, u64>,
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<u64>,
}

impl Cursors {
    /// The SSE `id:` for this position.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// Reads a `Last-Event-ID`; `None` when it is not one of ours.
    pub fn decode(token: &str) -> Option<Self> {
        if token.len() > MAX_EVENT_ID_BYTES {
            return None;
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .ok()?;
        serde_json::from_slice(&json).ok()
    }

    fn apply(&mut self, cursor: Cursor) {
        match cursor {
            Cursor::Room(room, seq) => {
                let entry = self.rooms.entry(room.0).or_insert(0);
                *entry = (*entry).max(seq);
            }
            Cursor::Notifications(seq) => {
                self.notifications = Some(self.notifications.unwrap_or(0).max(seq));
            }
        }
    }
}

/// State the outlet and the body share.
struct Shared {
    queued: AtomicUsize,
    closing: AtomicBool,
    gone: AtomicBool,
    gauge: OnceLock<Arc<OutboundGauge>>,
    ticket: OnceLock<WsTicket>,
    drained: Notify,
}

impl Shared {
    fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        if let Some(gauge) = self.gauge.get() {
            gauge.release(n);
        }
        self.drained.notify_waiters();
    }
}

/// The SSE write side of a connection.
pub struct SseOutlet {
    tx: mpsc::UnboundedSender<Bytes>,
    shared: Arc<Shared>,
    max_queued: usize,
    heartbeat: Duration,
    cursors: RefCell<Cursors>,
    next: RefCell<Option<Cursor>>,
}

/// The response body: the queued events, in order.
pub struct SseBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<Shared>,
    _gone: oneshot::Sender<()>,
    /// Counts the stream in `roomcast_connections{transport="sse"}` while it is open.
    _open: crate::metrics::ConnectionGauge,
}

/// Tells the connection actor the client went away (yields one item, then ends).
pub type GoneStream = Pin<Box<dyn Stream<Item = Result<crate::ws::decoder::Message, ReadError>>>>;

impl SseOutlet {
    /// An outlet starting at `cursors`, its response body, and the stream that
    /// reports the client's departure to the connection actor.
    pub fn new(
        settings: &RealtimeSettings,
        cursors: Cursors,
        ticket: Option<WsTicket>,
    ) -> (Self, SseBody, GoneStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (gone_tx, gone_rx) = oneshot::channel::<()>();
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            gauge: OnceLock::new(),
            ticket: OnceLock::new(),
            drained: Notify::new(),
        });
        if let Some(ticket) = ticket {
            let _ = shared.ticket.set(ticket);
        }
        let outlet = Self {
            tx,
            shared: shared.clone(),
            max_queued: settings.max_write_queue_bytes,
            heartbeat: Duration::from_millis(settings.sse_heartbeat_interval_ms),
            cursors: RefCell::new(cursors),
            next: RefCell::new(None),
        };
        // The stream opens with the reconnection delay and a comment, so proxies
        // and clients see the response start at once.
        let _ = outlet.push(
            Bytes::from(format!("retry: {}\n: roomcast\n\n", settings.sse_retry_ms)),
            false,
        );
        let body = SseBody {
            rx,
            shared,
            _gone: gone_tx,
            _open: crate::metrics::ConnectionGauge::open("sse", "json"),
        };
        let gone: GoneStream = Box::pin(futures_util::stream::once(async move {
            let _ = gone_rx.await;
            Err(ReadError::Lost("the SSE client went away".into()))
        }));
        (outlet, body, gone)
    }

    fn push(&self, bytes: Bytes, close: bool) -> Result<(), QueueFull> {
        if close {
            if self.shared.closing.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
        } else if self.shared.closing.load(Ordering::Acquire) {
            return Ok(());
        }
        let n = bytes.len();
        let queued = self.shared.queued.fetch_add(n, Ordering::AcqRel) + n;
        if let Some(gauge) = self.shared.gauge.get() {
            gauge.charge(n);
        }
        if self.tx.send(bytes).is_err() {
            self.shared.release(n);
            return Ok(());
        }
        if queued > self.max_queued && !close {
            return Err(QueueFull {
                queued,
                budget: self.max_queued,
            });
        }
        Ok(())
    }
}

/// The frame's kind: the first key of the JSON `ServerFrame` other than `id`.
fn frame_kind(json: &str) -> String {
    #[derive(Deserialize)]
    struct Keys(serde_json::Map<String, serde_json::Value>);
    // The encoder writes `id` first and the kind next: read just that far.
    let mut rest = json.trim_start().strip_prefix('{').unwrap_or("");
    while let Some(after_quote) = rest.trim_start().strip_prefix('"') {
        let Some(end) = after_quote.find('"') else {
            break;
        };
        let key = &after_quote[..end];
        if key != "id" {
            return key.to_owned();
        }
        // Skip `"id":"123",`.
        let after = &after_quote[end + 1..];
        let Some(comma) = after.find(',') else {
            break;
        };
        rest = &after[comma + 1..];
    }
    serde_json::from_str::<Keys>(json)
        .ok()
        .and_then(|k| k.0.keys().find(|k| *k != "id").cloned())
        .unwrap_or_else(|| "frame".into())
}

impl Outlet for SseOutlet {
    fn describe(&self, _codec: FrameCodec) -> String {
        "sse".into()
    }

    fn attach_gauge(&self, gauge: Arc<OutboundGauge>) {
        let _ = self.shared.gauge.set(gauge);
    }

    fn admit_user(&self, user: &str) -> Result<(), Refusal> {
        match self.shared.ticket.get() {
            Some(ticket) => ticket.authenticated(user),
            None => Ok(()),
        }
    }

    fn advance(&self, cursor: Cursor) {
        *self.next.borrow_mut() = Some(cursor);
    }

    fn write(&self, frame: WireFrame) -> Result<(), QueueFull> {
        let json = match &frame {
            WireFrame::Text(text) => text.to_string(),
            // SSE connections use the JSON codec; never reached.
            WireFrame::Binary(_) => return Ok(()),
        };
        let mut out = BytesMut::with_capacity(json.len() + 64);
        if let Some(cursor) = self.next.borrow_mut().take() {
            let mut cursors = self.cursors.borrow_mut();
            cursors.apply(cursor);
            out.put_slice(b"id: ");
            out.put_slice(cursors.encode().as_bytes());
            out.put_u8(b'\n');
        }
        out.put_slice(b"event: ");
        out.put_slice(frame_kind(&json).as_bytes());
        out.put_slice(b"\ndata: ");
        out.put_slice(json.as_bytes());
        out.put_slice(b"\n\n");
        self.push(out.freeze(), false)
    }

    fn heartbeat(&self) {
        let _ = self.push(Bytes::from_static(b": heartbeat\n\n"), false);
    }

    fn pong(&self, _payload: Bytes) {}

    fn close(&self, code: Option<u16>, reason: &str) {
        let data = serde_json::json!({ "code": code.unwrap_or(1000), "reason": reason });
        let _ = self.push(Bytes::from(format!("event: close\ndata: {data}\n\n")), true);
    }

    fn drained(&self, below: usize) -> Pin<Box<dyn Future<Output = ()>>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            loop {
                let notified = shared.drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.queued.load(Ordering::Acquire) <= below
                    || shared.gone.load(Ordering::Acquire)
                {
                    return;
                }
                notified.await;
            }
        })
    }

    fn heartbeat_interval(&self, _settings: &RealtimeSettings) -> Duration {
        self.heartbeat
    }

    fn client_talks(&self) -> bool {
        false
    }
}

impl Stream for SseBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(bytes)) => {
                self.shared.release(bytes.len());
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.shared.gone.store(true, Ordering::Release);
        self.shared.drained.notify_waiters();
        // Bytes never written go back to the budget.
        while let Ok(bytes) = self.rx.try_recv() {
            self.shared.release(bytes.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoomId;

    #[test]
    fn cursors_round_trip() {
        let mut c = Cursors::default();
        c.apply(Cursor::Room(RoomId("r_a".into()), 41));
        c.apply(Cursor::Notifications(3));
        let token = c.encode();
        assert!(!token.contains(['\n', '\r', ':']));
        assert_eq!(Cursors::decode(&token), Some(c));
        assert_eq!(Cursors::decode("not base64 !"), None);
    }

    /// A client that does not read: the rooms see its queued bytes (so they switch
    /// it to catch-up), writes fail past the budget (so it is closed), and bytes
    /// the body takes, or never sends because the client left, are given back.
    #[tokio::test]
    async fn a_client_that_does_not_read_is_bounded() {
        use futures_util::StreamExt as _;
        let settings = RealtimeSettings {
            max_write_queue_bytes: 1000,
            ..Default::default()
        };
        let (outlet, mut body, _gone) = SseOutlet::new(&settings, Cursors::default(), None);
        let gauge = Arc::new(OutboundGauge::new(500));
        outlet.attach_gauge(gauge.clone());
        let frame =
            || WireFrame::Text(format!("{{\"message\":{{\"x\":\"{}\"}}}}", "a".repeat(100)).into());
        let mut accepted = 0;
        while outlet.write(frame()).is_ok() {
            accepted += 1;
            assert!(accepted < 100, "the queue is bounded");
        }
        assert!(!gauge.try_reserve(1), "the rooms see the client as full");
        // The body takes everything queued: the budget is free again.
        let mut taken = 0;
        while outlet.shared.queued.load(Ordering::Acquire) > 0 {
            body.next().await.expect("a chunk").expect("bytes");
            taken += 1;
        }
        assert!(taken > accepted, "the opening comment and every frame");
        assert!(gauge.try_reserve(1));
        gauge.release(1);
        outlet.write(frame()).expect("room again");
        drop(body);
        assert_eq!(outlet.shared.queued.load(Ordering::Acquire), 0);
        outlet.drained(0).await;
    }

    #[test]
    fn kinds_are_read_from_the_frame() {
        assert_eq!(frame_kind(r#"{"message":{"seq":"1"}}"#), "message");
        assert_eq!(frame_kind(r#"{"id":"3","subscribed":{}}"#), "subscribed");
        assert_eq!(frame_kind(r#"{"gap":{"fromSeq":"1"}}"#), "gap");
    }
}
