//! The socket under a connection: plain TCP, or TLS over TCP when the server
//! terminates TLS itself (`tls.cert_file`). [`Socket`] is what the HTTP layer reads
//! and writes; [`SharedSocket`] is the same socket once a WebSocket upgrade took it,
//! shared by the transport's reader and writer (two tasks on one arbiter thread).
//!
//! Plain TCP keeps its readiness-based path (`try_read` / `try_write_vectored` on a
//! shared `&TcpStream`, no lock, no extra buffer). A TLS stream needs `&mut` for
//! every read and write (its record layer is stateful), so it sits in a `RefCell`
//! that each poll borrows for the length of one synchronous call: the reader and
//! the writer run on the same thread and never hold a borrow across an `.await`.

use std::{
    cell::RefCell,
    future::poll_fn,
    io::{self, IoSlice},
    mem::MaybeUninit,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;

/// Bytes a TLS read takes at a time (on the stack: an idle reader holds no buffer).
const TLS_READ_SCRATCH: usize = 4096;

/// A connection's socket as the HTTP layer sees it.
pub enum Socket {
    /// Cleartext TCP.
    Plain(TcpStream),
    /// TLS terminated by roomcast (boxed: the TLS state is large, the plain
    /// variant stays one pointer-sized stream).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Socket {
    /// The TCP stream under the socket.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Socket::Plain(io) => io,
            Socket::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Plain(io) => io.is_write_vectored(),
            Socket::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(io) => Pin::new(io).poll_flush(cx),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Socket::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

/// An upgraded socket shared by a WebSocket's reader and writer (see the module
/// docs). Every method takes `&self`.
pub enum SharedSocket {
    Plain(TcpStream),
    Tls(RefCell<Box<TlsStream<TcpStream>>>),
}

impl From<Socket> for SharedSocket {
    fn from(socket: Socket) -> Self {
        match socket {
            Socket::Plain(io) => SharedSocket::Plain(io),
            Socket::Tls(tls) => SharedSocket::Tls(RefCell::new(tls)),
        }
    }
}

impl SharedSocket {
    /// Reads what is available into `buf` (reserving at least `want` bytes of room
    /// first); `Ok(0)` when the peer closed (TLS: its `close_notify` or the end of
    /// the TCP stream). Plain TCP waits for readiness before it touches `buf`, so a
    /// reader may keep no buffer at all while its socket is idle; TLS reads into a
    /// scratch area on the stack and copies what arrived.
    pub fn poll_read_buf(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            SharedSocket::Plain(io) => loop {
                ready!(io.poll_read_ready(cx))?;
                if buf.capacity() - buf.len() < want {
                    buf.reserve(want);
                }
                match io.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    result => return Poll::Ready(result),
                }
            },
            SharedSocket::Tls(tls) => {
                let mut scratch = [MaybeUninit::<u8>::uninit(); TLS_READ_SCRATCH];
                let mut read = ReadBuf::uninit(&mut scratch);
                ready!(Pin::new(&mut **tls.borrow_mut()).poll_read(cx, &mut read))?;
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
        }
    }

    /// Writes some of `slices` (at least one byte unless they are empty); for TLS
    /// the bytes may wait in the record layer until [`Self::poll_flush`].
    pub fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            SharedSocket::Plain(io) => loop {
                ready!(io.poll_write_ready(cx))?;
                match io.try_write_vectored(slices) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    result => return Poll::Ready(result),
                }
            },
            SharedSocket::Tls(tls) => {
                Pin::new(&mut **tls.borrow_mut()).poll_write_vectored(cx, slices)
            }
        }
    }

    /// Writes some of `slices` now, without waiting: plain TCP only (a TLS socket
    /// answers `WouldBlock`, its writes go through [`Self::poll_write_vectored`]).
    pub fn try_write_vectored(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            SharedSocket::Plain(io) => io.try_write_vectored(slices),
            SharedSocket::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// Sends what the TLS record layer still holds (nothing to do for plain TCP).
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            SharedSocket::Plain(_) => Poll::Ready(Ok(())),
            SharedSocket::Tls(tls) => Pin::new(&mut **tls.borrow_mut()).poll_flush(cx),
        }
    }

    /// Ends our direction: TLS sends its `close_notify` first (bounded by
    /// `timeout`), then the TCP write side is shut.
    pub async fn shutdown_write(&self, timeout: Duration) {
        if let SharedSocket::Tls(tls) = self {
            let close = poll_fn(|cx| {
                let mut tls = tls.borrow_mut();
                tls.get_mut().1.send_close_notify();
                Pin::new(&mut **tls).poll_flush(cx)
            });
            let _ = tokio::time::timeout(timeout, close).await;
        }
        self.with_tcp(|io| {
            let _ = socket2::SockRef::from(io).shutdown(std::net::Shutdown::Write);
        });
    }

    /// Makes closing reset the connection instead of leaving unread bytes in the
    /// kernel's buffer until TCP gives up.
    pub fn reset_on_close(&self) {
        self.with_tcp(|io| {
            let _ = socket2::SockRef::from(io).set_linger(Some(Duration::ZERO));
        });
    }

    /// Reads and discards what the peer still sends until it closes or fails.
    pub async fn discard_until_closed(&self, chunk: usize) {
        let mut scratch = BytesMut::with_capacity(chunk);
        loop {
            scratch.clear();
            match poll_fn(|cx| self.poll_read_buf(cx, &mut scratch, chunk)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn with_tcp<R>(&self, f: impl FnOnce(&TcpStream) -> R) -> R {
        match self {
            SharedSocket::Plain(io) => f(io),
            SharedSocket::Tls(tls) => f(tls.borrow().get_ref().0),
        }
    }
}
