//! The transport of one upgraded WebSocket: the socket taken out of the HTTP/1
//! dispatcher, split into
//!
//! - a [`Reader`]: a stream of decoded client [`Message`]s that its owner (the
//!   connection actor, or the echo loop) polls when it is ready for more, so a
//!   client can never get ahead of the server. An idle reader holds no buffer: one
//!   is taken when the socket has bytes, grows only to hold the frame in flight
//!   (never past the message limit) and is given back once every byte in it was
//!   decoded;
//! - a [`Transport`]: the handle the owner writes with. It never blocks: frames go
//!   to a queue whose bytes are counted (and charged to the connection's
//!   [`OutboundGauge`], so room pushes see a peer that does not read as lagging);
//!   a queue over its budget tells the caller to give up on the peer. A
//!   [`Transport::pusher`] is a second handle on the same queue for the arbiter's
//!   fan-out shard, which writes a room's shared bytes straight to the socket;
//! - a [`Writer`]: the future that drains the queue, several frames per system call
//!   (`writev`), and gives up on a peer whose socket accepted nothing for the stall
//!   timeout. It ends when the owner has closed (after the close frame is written and
//!   the peer had a moment to answer) or dropped the [`Transport`]; the reader then
//!   reports the end too, so the owner stops.
//!
//! The three parts run on the thread (the arbiter) that took the connection, so
//! they share one `Rc` of plain `Cell` state: no channel, no atomics, and while the
//! connection is idle no queue or buffer allocation at all.

use std::{
    cell::{Cell, OnceCell, RefCell},
    collections::VecDeque,
    future::{poll_fn, Future},
    io::{self, IoSlice},
    pin::Pin,
    rc::{Rc, Weak},
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::sync::Notify;

use super::{
    decoder::{Decoder, Message, ProtocolError},
    frame::{close_payload, OpCode, MAX_CONTROL_PAYLOAD},
    stream::{SharedSocket, Socket},
};
use crate::{
    actors::room::OutboundGauge,
    admission::{Refusal, WsTicket},
    protocol::WireFrame,
};

/// Bytes each read asks for at least (more when a bigger frame is in flight).
const READ_CHUNK: usize = 1024;
/// Most frames gathered into one `writev` (each is two slices).
const COALESCE_FRAMES: usize = 64;
/// Most bytes gathered into one `writev`.
const COALESCE_BYTES: usize = 256 * 1024;
/// After the close frame is written, how long the peer may take to answer it and
/// close its side before the socket is dropped anyway.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Bytes read (and discarded) at a time while lingering.
const LINGER_CHUNK: usize = 1024;
/// Longest server frame header: 2 bytes and a 64-bit length.
const MAX_SERVER_HEADER: usize = 10;

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

/// A frame waiting to be written: its header inline (no allocation per frame), the
/// payload shared with whoever encoded it (a room's event is encoded once).
struct Outbound {
    header: [u8; MAX_SERVER_HEADER],
    header_len: u8,
    /// Header bytes already written (a `writev` may stop anywhere).
    header_sent: u8,
    close: bool,
    payload: Bytes,
    /// Bytes charged when queued (header and payload), released once written.
    charged: usize,
}

impl Outbound {
    fn new(opcode: OpCode, payload: Bytes, close: bool) -> Self {
        let mut header = [0u8; MAX_SERVER_HEADER];
        header[0] = 0x80 | opcode.bits();
        let len = payload.len();
        let header_len = if len < 126 {
            header[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            header[1] = 126;
            header[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self {
            header,
            header_len,
            header_sent: 0,
            close,
            charged: usize::from(header_len) + payload.len(),
            payload,
        }
    }

    /// Bytes still to write.
    fn len(&self) -> usize {
        usize::from(self.header_len - self.header_sent) + self.payload.len()
    }

    fn unsent_header(&self) -> &[u8] {
        &self.header[usize::from(self.header_sent)..usize::from(self.header_len)]
    }

    /// Bytes that are not a frame (the handshake's answer), uncharged.
    fn raw(bytes: Bytes) -> Self {
        Self {
            header: [0u8; MAX_SERVER_HEADER],
            header_len: 0,
            header_sent: 0,
            close: false,
            charged: 0,
            payload: bytes,
        }
    }

    /// Marks up to `n` bytes as written; answers how many of them this frame took.
    fn advance(&mut self, n: usize) -> usize {
        let from_header = n.min(usize::from(self.header_len - self.header_sent));
        self.header_sent += from_header as u8;
        let from_payload = (n - from_header).min(self.payload.len());
        self.payload.advance(from_payload);
        from_header + from_payload
    }
}

/// Puts the unsent parts of the first `frames` (up to [`COALESCE_FRAMES`] frames
/// and [`COALESCE_BYTES`], stopping after a close frame) into `slices` for one
/// `writev`; answers how many slices it filled.
fn gather<'a>(
    frames: impl Iterator<Item = &'a Outbound>,
    slices: &mut [IoSlice<'a>; 2 * COALESCE_FRAMES],
) -> usize {
    let mut count = 0;
    let mut bytes = 0;
    for frame in frames.take(COALESCE_FRAMES) {
        if bytes >= COALESCE_BYTES {
            break;
        }
        for part in [frame.unsent_header(), &frame.payload[..]] {
            if !part.is_empty() {
                slices[count] = IoSlice::new(part);
                count += 1;
            }
        }
        bytes += frame.len();
        if frame.close {
            break;
        }
    }
    count
}

/// What one step of writing the queue came to.
enum Flushed {
    /// Everything queued was written (and, for TLS, flushed).
    Empty,
    /// Some bytes went out; more are queued.
    Progress,
    /// The close frame went out.
    Closed,
}

/// One upgraded socket and everything its parts share (see the module docs).
struct Shared {
    io: SharedSocket,
    /// Frames waiting for the writer; empty (no allocation) while idle.
    queue: RefCell<VecDeque<Outbound>>,
    /// Bytes in `queue` (as charged).
    queued: Cell<usize>,
    /// Most bytes queued before the peer is given up on.
    max_queued: usize,
    /// A close frame was queued: nothing is queued after it.
    closing: Cell<bool>,
    /// The [`Transport`] was dropped: the writer finishes what is queued and ends.
    transport_gone: Cell<bool>,
    /// The writer ended (the reader then ends too).
    writer_done: Cell<bool>,
    /// The queue starts with the handshake's answer, held back until the first
    /// frame joins it (see [`Transport::answer_with_first_frame`]).
    held: Cell<bool>,
    /// The writer, waiting for frames.
    writer_waker: Cell<Option<Waker>>,
    /// The reader, waiting for bytes (woken when the writer ends).
    reader_waker: Cell<Option<Waker>>,
    gauge: OnceCell<Arc<OutboundGauge>>,
    /// The connection's admission slots, returned when every part is gone.
    ticket: OnceCell<WsTicket>,
    /// Woken whenever the writer took bytes off the queue, and when it ends.
    drained: Notify,
}

impl Shared {
    fn release(&self, n: usize) {
        self.queued.set(self.queued.get().saturating_sub(n));
        if let Some(gauge) = self.gauge.get() {
            gauge.release(n);
        }
    }

    fn wake_writer(&self) {
        if let Some(waker) = self.writer_waker.take() {
            waker.wake();
        }
    }

    fn push(
        &self,
        opcode: OpCode,
        payload: Bytes,
        close: bool,
        write_now: bool,
    ) -> Result<(), QueueFull> {
        if self.closing.get() {
            return Ok(());
        }
        if close {
            self.closing.set(true);
        }
        if self.writer_done.get() {
            // The writer is gone; so is the peer. Nothing will be written.
            return Ok(());
        }
        // A held handshake answer goes out with this frame (it is queued ahead).
        self.held.set(false);
        let mut frame = Outbound::new(opcode, payload, close);
        if write_now && self.queue.borrow().is_empty() {
            // Nothing else is on its way: write from here, sparing the writer a
            // wake-up, and the queue an allocation (an idle connection keeps
            // none, so queueing first would allocate and free one per frame).
            // What the socket does not take now is queued for the writer.
            let slices = [
                IoSlice::new(frame.unsent_header()),
                IoSlice::new(&frame.payload),
            ];
            if let Ok(n) = self.io.try_write_vectored(&slices) {
                frame.advance(n);
                if frame.len() == 0 {
                    return Ok(());
                }
            }
        }
        // A close frame goes out whatever the queue holds.
        let result = self.enqueue(frame, !close);
        self.wake_writer();
        result
    }

    /// Several data frames in order, written from here with one system call when
    /// nothing else is queued (a shard's merged batches to a connection that takes
    /// single frames); what the socket does not take is queued for the writer.
    fn push_all(&self, mut frames: Vec<Outbound>) -> Result<(), QueueFull> {
        if self.closing.get() || self.writer_done.get() || frames.is_empty() {
            return Ok(());
        }
        self.held.set(false);
        if self.queue.borrow().is_empty() {
            let wrote = {
                let mut slices = [IoSlice::new(&[]); 2 * COALESCE_FRAMES];
                let count = gather(frames.iter(), &mut slices);
                self.io.try_write_vectored(&slices[..count])
            };
            if let Ok(mut n) = wrote {
                let mut done = 0;
                for frame in frames.iter_mut() {
                    n -= frame.advance(n);
                    if frame.len() > 0 {
                        break;
                    }
                    done += 1;
                }
                frames.drain(..done);
                if frames.is_empty() {
                    return Ok(());
                }
            }
        }
        let mut result = Ok(());
        for frame in frames {
            if let Err(full) = self.enqueue(frame, true) {
                result = Err(full);
            }
        }
        self.wake_writer();
        result
    }

    /// Puts `frame` at the end of the queue, charged as a whole even when partly
    /// written (it is released as a whole); `Err` when `budgeted` and the queue is
    /// now over its budget.
    fn enqueue(&self, frame: Outbound, budgeted: bool) -> Result<(), QueueFull> {
        let n = frame.charged;
        let queued = self.queued.get() + n;
        self.queued.set(queued);
        if let Some(gauge) = self.gauge.get() {
            gauge.charge(n);
        }
        self.queue.borrow_mut().push_back(frame);
        if budgeted && queued > self.max_queued {
            crate::metrics::metrics().outbound_overflows.inc();
            return Err(QueueFull {
                queued,
                budget: self.max_queued,
            });
        }
        Ok(())
    }

    /// Hands the front of the queue (up to [`COALESCE_FRAMES`] frames and
    /// [`COALESCE_BYTES`]) to `write` as one vector and takes what it wrote off the
    /// queue. An empty queue is [`Flushed::Empty`] without calling `write`.
    fn write_some(
        &self,
        write: impl FnOnce(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<Flushed> {
        let mut queue = self.queue.borrow_mut();
        if queue.is_empty() {
            // Idle connections keep no queue allocation.
            *queue = VecDeque::new();
            return Ok(Flushed::Empty);
        }
        let mut slices = [IoSlice::new(&[]); 2 * COALESCE_FRAMES];
        let count = gather(queue.iter(), &mut slices);
        let mut n = match write(&slices[..count]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        let mut released = 0;
        let mut closed = false;
        while n > 0 {
            let Some(front) = queue.front_mut() else {
                break;
            };
            n -= front.advance(n);
            if front.len() == 0 {
                if let Some(frame) = queue.pop_front() {
                    released += frame.charged;
                    closed |= frame.close;
                }
            }
        }
        let empty = queue.is_empty();
        if empty {
            *queue = VecDeque::new();
        }
        drop(queue);
        self.release(released);
        self.drained.notify_waiters();
        Ok(if closed {
            Flushed::Closed
        } else if empty {
            Flushed::Empty
        } else {
            Flushed::Progress
        })
    }

    /// Writes what the socket takes now; `Ready` once some bytes went out (or
    /// everything, or the close frame), `Pending` until the socket is writable.
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<Flushed>> {
        let mut wrote = false;
        loop {
            let step = self.write_some(|slices| match self.io.poll_write_vectored(cx, slices) {
                Poll::Ready(result) => result,
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            });
            match step {
                Ok(Flushed::Progress) => wrote = true,
                Ok(done @ (Flushed::Empty | Flushed::Closed)) => {
                    // TLS: the record layer may still hold the last bytes.
                    return match self.io.poll_flush(cx) {
                        Poll::Ready(Ok(())) => Poll::Ready(Ok(done)),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending if wrote => Poll::Ready(Ok(Flushed::Progress)),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if wrote {
                        Poll::Ready(Ok(Flushed::Progress))
                    } else {
                        Poll::Pending
                    };
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Splits an upgraded socket (with the bytes the HTTP parser already read past the
/// request) into its reader, write handle and writer.
pub fn split(io: Socket, read_buf: BytesMut, limits: Limits) -> (Reader, Transport, Writer) {
    let shared = Rc::new(Shared {
        io: SharedSocket::from(io),
        queue: RefCell::new(VecDeque::new()),
        queued: Cell::new(0),
        max_queued: limits.max_queued,
        closing: Cell::new(false),
        transport_gone: Cell::new(false),
        writer_done: Cell::new(false),
        held: Cell::new(false),
        writer_waker: Cell::new(None),
        reader_waker: Cell::new(None),
        gauge: OnceCell::new(),
        ticket: OnceCell::new(),
        drained: Notify::new(),
    });
    // The HTTP/1 dispatcher's read buffer is large; keep only what it read ahead.
    let buf = if read_buf.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&read_buf[..])
    };
    drop(read_buf);
    let reader = Reader {
        shared: shared.clone(),
        buf,
        decoder: Decoder::new(limits.max_message),
        done: false,
    };
    let transport = Transport {
        shared: shared.clone(),
    };
    let writer = Writer {
        shared,
        stall: limits.write_stall,
    };
    (reader, transport, writer)
}

// --- reading -------------------------------------------------------------------

/// The client's messages, in order; ends after a close frame, a protocol error
/// (reported once) or the loss of the socket.
pub struct Reader {
    shared: Rc<Shared>,
    buf: BytesMut,
    decoder: Decoder,
    done: bool,
}

impl Reader {
    fn lost(&mut self, why: impl Into<String>) -> Poll<Option<Result<Message, ReadError>>> {
        self.done = true;
        self.buf = BytesMut::new();
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
                    if this.buf.is_empty() {
                        // Nothing in flight: give the buffer back (an idle
                        // connection holds none).
                        this.buf = BytesMut::new();
                    }
                    return Poll::Ready(Some(Ok(message)));
                }
                Err(e) => {
                    this.done = true;
                    this.buf = BytesMut::new();
                    return Poll::Ready(Some(Err(ReadError::Protocol(e))));
                }
                Ok(None) => {}
            }
            if this.shared.writer_done.get() {
                return this.lost("the connection could not be written to");
            }
            let needed = this.decoder.needed(&this.buf);
            let want = needed.saturating_sub(this.buf.len()).max(READ_CHUNK);
            match this.shared.io.poll_read_buf(cx, &mut this.buf, want) {
                Poll::Pending => {
                    this.shared.reader_waker.set(Some(cx.waker().clone()));
                    if this.buf.is_empty() && this.buf.capacity() > 0 {
                        this.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
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
    shared: Rc<Shared>,
}

impl Drop for Transport {
    fn drop(&mut self) {
        // The writer writes what is queued, then ends.
        self.shared.transport_gone.set(true);
        self.shared.wake_writer();
    }
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

    /// Queues `answer` (the handshake's `101 Switching Protocols`, already
    /// encoded) and holds it back until the first frame is queued, so both go out
    /// in one write: a client that authenticates in its upgrade request gets the
    /// answer and its `authenticated` (or the error and the close) together, one
    /// segment and one wake-up instead of two. The answer always goes first; it is
    /// held only while nothing else is queued. Dropping the transport releases it.
    pub fn answer_with_first_frame(&self, answer: Bytes) {
        let shared = &*self.shared;
        let mut queue = shared.queue.borrow_mut();
        shared.held.set(queue.is_empty());
        queue.push_front(Outbound::raw(answer));
    }

    /// The connection became an anonymous viewer (see [`crate::admission`]).
    pub fn admit_anonymous(&self) {
        if let Some(ticket) = self.shared.ticket.get() {
            ticket.anonymous();
        }
    }

    /// A handle for the arbiter's fan-out shard (see [`Pusher`]).
    pub fn pusher(&self) -> Pusher {
        Pusher {
            shared: Rc::downgrade(&self.shared),
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.shared.queued.get()
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
                if shared.queued.get() <= below || shared.writer_done.get() {
                    return;
                }
                notified.await;
            }
        }
    }

    /// Whether a close frame was queued (nothing is sent after it).
    pub fn is_closing(&self) -> bool {
        self.shared.closing.get()
    }

    /// Queues a text message.
    pub fn text(&self, text: ByteString) -> Result<(), QueueFull> {
        self.shared
            .push(OpCode::Text, text.into_bytes(), false, false)
    }

    /// Queues a binary message.
    pub fn binary(&self, bytes: Bytes) -> Result<(), QueueFull> {
        self.shared.push(OpCode::Binary, bytes, false, false)
    }

    /// Queues a ping (its payload cut to what a control frame holds).
    pub fn ping(&self, payload: &[u8]) {
        let payload = Bytes::copy_from_slice(&payload[..payload.len().min(MAX_CONTROL_PAYLOAD)]);
        let _ = self.shared.push(OpCode::Ping, payload, false, false);
    }

    /// Queues the pong answering a ping.
    pub fn pong(&self, payload: Bytes) {
        let _ = self.shared.push(OpCode::Pong, payload, false, false);
    }

    /// Queues the close frame (`None`: without a status code) and stops accepting
    /// anything else. Only the first call sends a frame.
    pub fn close(&self, code: Option<u16>, reason: &str) {
        close(&self.shared, code, reason);
    }
}

/// The opcode and payload of a text or binary message.
fn data_frame(frame: WireFrame) -> (OpCode, Bytes) {
    match frame {
        WireFrame::Text(text) => (OpCode::Text, text.into_bytes()),
        WireFrame::Binary(bytes) => (OpCode::Binary, bytes),
    }
}

fn close(shared: &Shared, code: Option<u16>, reason: &str) {
    if !shared.closing.get() {
        // 1005: "no status code", the code a close without one is reported as.
        crate::metrics::metrics().closed(code.unwrap_or(1005));
    }
    let payload = code.map_or_else(Bytes::new, |code| close_payload(code, reason));
    let _ = shared.push(OpCode::Close, payload, true, false);
}

/// A second write handle on a connection's queue, held by the fan-out shard of
/// its arbiter (same thread: it is not `Send`). It writes a frame to the socket at
/// once when nothing else is queued, so a shard's delivery costs one system call
/// per connection and no task wake-up; otherwise the frame queues behind the
/// others. It holds the connection weakly: the socket closes when the connection
/// is over, whoever still holds a pusher.
#[derive(Clone)]
pub struct Pusher {
    shared: Weak<Shared>,
}

impl Pusher {
    /// Writes (or queues) a text or binary message; `Err` when the queue is over
    /// its budget (the frame is queued all the same, like [`Transport::text`]). A
    /// connection that is gone takes nothing and answers `Ok`.
    pub fn write(&self, frame: WireFrame) -> Result<(), QueueFull> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let (opcode, payload) = data_frame(frame);
        shared.push(opcode, payload, false, true)
    }

    /// Writes (or queues) several messages in order, with one system call when
    /// nothing else is queued; otherwise as [`Self::write`] for each.
    pub fn write_all(&self, frames: impl Iterator<Item = WireFrame>) -> Result<(), QueueFull> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let frames = frames
            .map(|frame| {
                let (opcode, payload) = data_frame(frame);
                Outbound::new(opcode, payload, false)
            })
            .collect();
        shared.push_all(frames)
    }

    /// Queues the close frame, as [`Transport::close`].
    pub fn close(&self, code: Option<u16>, reason: &str) {
        if let Some(shared) = self.shared.upgrade() {
            close(&shared, code, reason);
        }
    }

    /// Whether the connection is closing or gone (nothing more is written).
    pub fn is_closed(&self) -> bool {
        self.shared
            .upgrade()
            .is_none_or(|shared| shared.closing.get() || shared.writer_done.get())
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
    shared: Rc<Shared>,
    stall: Duration,
}

impl Writer {
    /// Runs until the connection is over; then closes the socket.
    pub async fn run(self) -> WriterEnd {
        let end = self.write_all().await;
        let shared = &*self.shared;
        match end {
            // Boxed for the same reason as the stall timer in `write_all`.
            WriterEnd::Closed | WriterEnd::Dropped => Box::pin(self.linger()).await,
            WriterEnd::Stalled | WriterEnd::Failed => {
                // Nobody reads what is still in the kernel's buffer: reset
                // instead of keeping it around until TCP gives up.
                shared.io.reset_on_close();
            }
        }
        // Whatever was never written goes back to the gauge.
        let left: VecDeque<Outbound> = shared.queue.take();
        for frame in left {
            shared.release(frame.charged);
        }
        shared.writer_done.set(true);
        shared.drained.notify_waiters();
        if let Some(waker) = shared.reader_waker.take() {
            waker.wake();
        }
        end
    }

    async fn write_all(&self) -> WriterEnd {
        let shared = &*self.shared;
        loop {
            // Wait for frames, or for the owner to go.
            let more = poll_fn(|cx| {
                let held = shared.held.get() && !shared.transport_gone.get();
                if !held && !shared.queue.borrow().is_empty() {
                    Poll::Ready(true)
                } else if shared.transport_gone.get() {
                    Poll::Ready(false)
                } else {
                    shared.writer_waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await;
            if !more {
                return WriterEnd::Dropped;
            }
            loop {
                // Each step must make progress within the stall timeout; the timer
                // is only set when the socket does not take bytes at once.
                let mut step = poll_fn(|cx| shared.poll_flush(cx));
                let result = match Pin::new(&mut step).poll(&mut Context::from_waker(
                    futures_util::task::noop_waker_ref(),
                )) {
                    Poll::Ready(result) => result,
                    // Boxed: the writer's future lives as long as the connection
                    // and would otherwise carry the timer inline while idle.
                    Poll::Pending => match Box::pin(tokio::time::timeout(self.stall, step)).await {
                        Err(_) => return WriterEnd::Stalled,
                        Ok(result) => result,
                    },
                };
                match result {
                    Ok(Flushed::Closed) => return WriterEnd::Closed,
                    Ok(Flushed::Empty) => break,
                    Ok(Flushed::Progress) => {}
                    Err(_) => return WriterEnd::Failed,
                }
            }
        }
    }

    /// Half-closes the socket and gives the peer [`CLOSE_LINGER`] to close its side,
    /// discarding what it still sends, so it reads our close frame instead of a reset.
    async fn linger(&self) {
        let io = &self.shared.io;
        io.shutdown_write(CLOSE_LINGER).await;
        let _ = tokio::time::timeout(CLOSE_LINGER, io.discard_until_closed(LINGER_CHUNK)).await;
    }
}
