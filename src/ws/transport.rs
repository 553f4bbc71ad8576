//! The transport of one upgraded WebSocket: the socket taken out of the HTTP/1
//! dispatcher, split into
//!
//! - a [`Reader`]: a stream of decoded client [`Message`]s that its owner (the
//!   connection actor, or the echo loop) polls when it is ready for more, so a
//!   client can never get ahead of the server; its buffer starts small, grows only
//!   to hold the frame in flight (never past the message limit) and shrinks back;
//! - a [`Transport`]: the handle the owner writes with. It never blocks: frames go
//!   to a queue whose bytes are counted (and charged to the connection's
//!   [`OutboundGauge`], so room pushes see a peer that does not read as lagging);
//!   a queue over its budget tells the caller to give up on the peer;
//! - a [`Writer`]: the future that drains the queue, several frames per system call
//!   (`writev`), and gives up on a peer whose socket accepted nothing for the stall
//!   timeout. It ends when the owner has closed (after the close frame is written and
//!   the peer had a moment to answer) or dropped the [`Transport`]; the reader then
//!   reports the end too, so the owner stops.

use std::{
    future::Future,
    io::IoSlice,
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{
    decoder::{Decoder, Message, ProtocolError},
    frame::{close_payload, server_header, OpCode, MAX_CONTROL_PAYLOAD},
    stream::{SharedSocket, Socket},
};
use crate::{
    actors::room::OutboundGauge,
    admission::{Refusal, WsTicket},
};

/// The read buffer of an idle connection.
const READ_BUF_INITIAL: usize = 1024;
/// A read buffer that grew past this for a big frame is replaced by a small one
/// once that frame was decoded.
const READ_BUF_KEEP: usize = 4 * 1024;
/// Bytes each read asks for at least (more when a bigger frame is in flight).
const READ_CHUNK: usize = 1024;
/// Most bytes gathered into one `writev`.
const COALESCE_BYTES: usize = 256 * 1024;
/// Most frames gathered into one `writev` (each is two slices).
const COALESCE_FRAMES: usize = 256;
/// After the close frame is written, how long the peer may take to answer it and
/// close its side before the socket is dropped anyway.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Bytes read (and discarded) at a time while lingering.
const LINGER_CHUNK: usize = 1024;

/// The limits of one transport.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest client message (the sum of its fragments), in bytes.
    pub max_message: usize,
    /// Most bytes queued for writing before the peer is given up on.
    pub max_queued: usize,
    /// How long a write may make no progress before the peer is given up on.
    pub write_stall: Duration,
}

/// Why the reader ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The client broke the protocol: close with this code.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The socket is gone: the peer closed it, it failed, or the writer gave up.
    #[error("connection lost: {0}")]
    Lost(String),
}

/// The write queue was over its budget; the peer does not read fast enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the write queue holds {queued} bytes (budget {budget})")]
pub struct QueueFull {
    pub queued: usize,
    pub budget: usize,
}

/// A frame waiting to be written.
struct Outbound {
    header: Bytes,
    payload: Bytes,
    close: bool,
}

impl Outbound {
    fn len(&self) -> usize {
        self.header.len() + self.payload.len()
    }
}

/// State the transport handle and the writer share.
struct Shared {
    queued: AtomicUsize,
    closing: AtomicBool,
    gauge: OnceLock<Arc<OutboundGauge>>,
    /// The connection's admission slots, returned when both halves are gone.
    ticket: OnceLock<WsTicket>,
    /// Woken whenever the writer took bytes off the queue, and when it ends.
    drained: Notify,
    writer_done: AtomicBool,
}

impl Shared {
    fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
        if let Some(gauge) = self.gauge.get() {
            gauge.release(n);
        }
    }
}

/// Splits an upgraded socket (with the bytes the HTTP parser already read past the
/// request) into its reader, write handle and writer.
pub fn split(io: Socket, read_buf: BytesMut, limits: Limits) -> (Reader, Transport, Writer) {
    let io = Rc::new(SharedSocket::from(io));
    let (tx, rx) = mpsc::unbounded_channel();
    let (gone_tx, gone_rx) = oneshot::channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        gauge: OnceLock::new(),
        ticket: OnceLock::new(),
        drained: Notify::new(),
        writer_done: AtomicBool::new(false),
    });
    // The HTTP/1 dispatcher's read buffer is large; keep only what it read ahead.
    let mut buf = BytesMut::with_capacity(READ_BUF_INITIAL.max(read_buf.len()));
    buf.extend_from_slice(&read_buf);
    drop(read_buf);
    let reader = Reader {
        io: io.clone(),
        buf,
        decoder: Decoder::new(limits.max_message),
        writer_gone: gone_rx,
        done: false,
    };
    let transport = Transport {
        tx,
        shared: shared.clone(),
        max_queued: limits.max_queued,
    };
    let writer = Writer {
        io,
        rx,
        shared,
        stall: limits.write_stall,
        _gone: gone_tx,
    };
    (reader, transport, writer)
}

// --- reading -------------------------------------------------------------------

/// The client's messages, in order; ends after a close frame, a protocol error
/// (reported once) or the loss of the socket.
pub struct Reader {
    io: Rc<SharedSocket>,
    buf: BytesMut,
    decoder: Decoder,
    writer_gone: oneshot::Receiver<()>,
    done: bool,
}

impl Reader {
    fn lost(&mut self, why: impl Into<String>) -> Poll<Option<Result<Message, ReadError>>> {
        self.done = true;
        Poll::Ready(Some(Err(ReadError::Lost(why.into()))))
    }
}

impl Stream for Reader {
    type Item = Result<Message, ReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.decoder.decode(&mut this.buf) {
                Ok(Some(message)) => {
                    if matches!(message, Message::Close(_)) {
                        this.done = true;
                    }
                    if this.buf.is_empty() && this.buf.capacity() > READ_BUF_KEEP {
                        this.buf = BytesMut::with_capacity(READ_BUF_INITIAL);
                    }
                    return Poll::Ready(Some(Ok(message)));
                }
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ReadError::Protocol(e))));
                }
                Ok(None) => {}
            }
            if Pin::new(&mut this.writer_gone).poll(cx).is_ready() {
                return this.lost("the connection could not be written to");
            }
            let needed = this.decoder.needed(&this.buf);
            let want = needed.saturating_sub(this.buf.len()).max(READ_CHUNK);
            if this.buf.capacity() - this.buf.len() < READ_CHUNK {
                this.buf.reserve(want);
            }
            match this.io.poll_read_buf(cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return this.lost("the peer closed the connection"),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.lost(e.to_string()),
            }
        }
    }
}

// --- writing -------------------------------------------------------------------

/// The write side as its owner sees it: every call returns at once.
pub struct Transport {
    tx: mpsc::UnboundedSender<Outbound>,
    shared: Arc<Shared>,
    max_queued: usize,
}

impl Transport {
    /// Charges every byte queued from now on to `gauge` as well (released as it
    /// is written), so the rooms see how far behind this peer is.
    pub fn attach_gauge(&self, gauge: Arc<OutboundGauge>) {
        let _ = self.shared.gauge.set(gauge);
    }

    /// Holds the connection's admission slots until it is gone.
    pub fn hold_ticket(&self, ticket: WsTicket) {
        let _ = self.shared.ticket.set(ticket);
    }

    /// Takes a slot of `user`'s connections (see [`crate::admission`]); always
    /// succeeds when the connection holds no ticket.
    pub fn admit_user(&self, user: &str) -> Result<(), Refusal> {
        match self.shared.ticket.get() {
            Some(ticket) => ticket.authenticated(user),
            None => Ok(()),
        }
    }

    /// The connection became an anonymous viewer (see [`crate::admission`]).
    pub fn admit_anonymous(&self) {
        if let Some(ticket) = self.shared.ticket.get() {
            ticket.anonymous();
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Completes once at most `below` bytes are queued, or the writer is gone: a
    /// producer that can wait (catch-up from the store) goes at the pace the
    /// client reads instead of filling the queue.
    pub fn drained(&self, below: usize) -> impl Future<Output = ()> + 'static {
        let shared = self.shared.clone();
        async move {
            loop {
                let notified = shared.drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.queued.load(Ordering::Acquire) <= below
                    || shared.writer_done.load(Ordering::Acquire)
                {
                    return;
                }
                notified.await;
            }
        }
    }

    /// Whether a close frame was queued (nothing is sent after it).
    pub fn is_closing(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire)
    }

    /// Queues a text message.
    pub fn text(&self, text: ByteString) -> Result<(), QueueFull> {
        self.push(OpCode::Text, text.into_bytes(), false)
    }

    /// Queues a binary message.
    pub fn binary(&self, bytes: Bytes) -> Result<(), QueueFull> {
        self.push(OpCode::Binary, bytes, false)
    }

    /// Queues a ping (its payload cut to what a control frame holds).
    pub fn ping(&self, payload: &[u8]) {
        let payload = Bytes::copy_from_slice(&payload[..payload.len().min(MAX_CONTROL_PAYLOAD)]);
        let _ = self.push(OpCode::Ping, payload, false);
    }

    /// Queues the pong answering a ping.
    pub fn pong(&self, payload: Bytes) {
        let _ = self.push(OpCode::Pong, payload, false);
    }

    /// Queues the close frame (`None`: without a status code) and stops accepting
    /// anything else. Only the first call sends a frame.
    pub fn close(&self, code: Option<u16>, reason: &str) {
        if !self.is_closing() {
            // 1005: "no status code", the code a close without one is reported as.
            crate::metrics::metrics().closed(code.unwrap_or(1005));
        }
        let payload = code.map_or_else(Bytes::new, |code| close_payload(code, reason));
        let _ = self.push(OpCode::Close, payload, true);
    }

    fn push(&self, opcode: OpCode, payload: Bytes, close: bool) -> Result<(), QueueFull> {
        if close {
            if self.shared.closing.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
        } else if self.is_closing() {
            return Ok(());
        }
        let frame = Outbound {
            header: server_header(opcode, payload.len()),
            payload,
            close,
        };
        let n = frame.len();
        let queued = self.shared.queued.fetch_add(n, Ordering::AcqRel) + n;
        if let Some(gauge) = self.shared.gauge.get() {
            gauge.charge(n);
        }
        if self.tx.send(frame).is_err() {
            // The writer is gone; so is the peer. Nothing will be written.
            self.shared.release(n);
            return Ok(());
        }
        if queued > self.max_queued && !close {
            crate::metrics::metrics().outbound_overflows.inc();
            return Err(QueueFull {
                queued,
                budget: self.max_queued,
            });
        }
        Ok(())
    }
}

/// How the writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd {
    /// The close frame was written.
    Closed,
    /// The owner dropped the transport without closing.
    Dropped,
    /// The peer accepted no bytes for the stall timeout.
    Stalled,
    /// Writing failed (the peer reset the connection).
    Failed,
}

/// Drains the write queue into the socket; see the module docs.
pub struct Writer {
    io: Rc<SharedSocket>,
    rx: mpsc::UnboundedReceiver<Outbound>,
    shared: Arc<Shared>,
    stall: Duration,
    /// Dropped when the writer ends, which ends the reader too.
    _gone: oneshot::Sender<()>,
}

impl Writer {
    /// Runs until the connection is over; then closes the socket.
    pub async fn run(mut self) -> WriterEnd {
        let end = self.write_all().await;
        match end {
            WriterEnd::Closed | WriterEnd::Dropped => self.linger().await,
            WriterEnd::Stalled | WriterEnd::Failed => {
                // Nobody reads what is still in the kernel's buffer: reset
                // instead of keeping it around until TCP gives up.
                self.io.reset_on_close();
            }
        }
        // Whatever was never written goes back to the gauge.
        self.rx.close();
        while let Ok(frame) = self.rx.try_recv() {
            self.shared.release(frame.len());
        }
        self.shared.writer_done.store(true, Ordering::Release);
        self.shared.drained.notify_waiters();
        end
    }

    async fn write_all(&mut self) -> WriterEnd {
        let mut batch: Vec<Outbound> = Vec::new();
        loop {
            let Some(first) = self.rx.recv().await else {
                return WriterEnd::Dropped;
            };
            let mut bytes = first.len();
            let mut closing = first.close;
            batch.push(first);
            while !closing && bytes < COALESCE_BYTES && batch.len() < COALESCE_FRAMES {
                let Ok(next) = self.rx.try_recv() else {
                    break;
                };
                bytes += next.len();
                closing = next.close;
                batch.push(next);
            }
            let result = self.write_batch(&batch).await;
            for frame in batch.drain(..) {
                self.shared.release(frame.len());
            }
            self.shared.drained.notify_waiters();
            if let Err(end) = result {
                return end;
            }
            if closing {
                return WriterEnd::Closed;
            }
        }
    }

    /// Writes every frame of `batch`, several per system call.
    async fn write_batch(&self, batch: &[Outbound]) -> Result<(), WriterEnd> {
        let mut parts: Vec<Bytes> = batch
            .iter()
            .flat_map(|f| [f.header.clone(), f.payload.clone()])
            .filter(|b| !b.is_empty())
            .collect();
        let mut start = 0;
        while start < parts.len() {
            let slices: Vec<IoSlice<'_>> = parts[start..].iter().map(|b| IoSlice::new(b)).collect();
            match tokio::time::timeout(self.stall, self.io.write_vectored(&slices)).await {
                Err(_) => return Err(WriterEnd::Stalled),
                Ok(Ok(0)) => return Err(WriterEnd::Failed),
                Ok(Ok(mut n)) => {
                    while n > 0 {
                        let part = &mut parts[start];
                        let take = n.min(part.len());
                        part.advance(take);
                        n -= take;
                        if part.is_empty() {
                            start += 1;
                        }
                    }
                }
                Ok(Err(_)) => return Err(WriterEnd::Failed),
            }
        }
        match tokio::time::timeout(self.stall, self.io.flush()).await {
            Err(_) => Err(WriterEnd::Stalled),
            Ok(Err(_)) => Err(WriterEnd::Failed),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Half-closes the socket and gives the peer [`CLOSE_LINGER`] to close its side,
    /// discarding what it still sends, so it reads our close frame instead of a reset.
    async fn linger(&self) {
        self.io.shutdown_write(CLOSE_LINGER).await;
        let drain = self.io.discard_until_closed(LINGER_CHUNK);
        let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
    }
}
