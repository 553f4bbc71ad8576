//! What happens to a TCP connection before HTTP: it takes a slot of the server-wide
//! connection cap (`server.max_connections`; past it, `503` and close), has
//! `server.header_timeout_ms` to send its first bytes, and is served as HTTP/2 when
//! those bytes are the HTTP/2 connection preface (cleartext "prior knowledge", as
//! gRPC and Connect clients send it), else as HTTP/1.x.
//!
//! With TLS configured ([`super::tls`]), the TLS handshake comes first (within the
//! same `server.header_timeout_ms`) and ALPN decides: `h2` is served as HTTP/2,
//! `http/1.1` (or no ALPN) as HTTP/1.x. Everything after, WebSocket upgrades
//! included, runs over the TLS stream ([`Socket::Tls`]).
//!
//! actix-http's header timeout covers only a connection's first request. On an
//! HTTP/1 connection, a [`WatchedStream`] closes that gap: a request that has been
//! arriving (or waiting for its answer) for longer than `server.header_timeout_ms`
//! plus `server.request_timeout_ms` ends the connection, so a client cannot hold it
//! by trickling the headers of its second request. A WebSocket upgrade takes the
//! socket out of the watch.

use std::{
    cell::Cell,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use actix_http::Protocol;
use actix_service::{fn_factory, fn_service, Service, ServiceFactory};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    admission::{Admission, Refusal},
    ws::stream::Socket,
};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How often to look again while the first bytes could still be the preface.
const PEEK_INTERVAL: Duration = Duration::from_millis(5);
/// How long the `503` for a connection over the cap may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Wraps the HTTP service factory with the connection cap, the first-bytes deadline,
/// the HTTP/1 or HTTP/2 choice, and (HTTP/1) the per-request watch: a request may
/// take `request_limit` from its first byte to the first byte of its answer. With
/// `tls`, every connection is a TLS connection (see the module docs).
pub fn connection_service<F>(
    http: F,
    admission: Arc<Admission>,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
    request_limit: Duration,
) -> impl ServiceFactory<TcpStream, Config = (), Response = (), Error = (), InitError = ()>
where
    F: ServiceFactory<
            (WatchedStream, Protocol, Option<SocketAddr>),
            Config = (),
            Response = (),
            Error = actix_http::error::DispatchError,
            InitError = (),
        > + 'static,
    F::Service: 'static,
    F::Future: 'static,
{
    fn_factory(move || {
        let service = http.new_service(());
        let admission = admission.clone();
        let tls = tls.clone();
        async move {
            let service = Rc::new(service.await?);
            Ok::<_, ()>(fn_service(move |io: TcpStream| {
                let service = service.clone();
                let admission = admission.clone();
                let tls = tls.clone();
                async move {
                    let _ = io.set_nodelay(true);
                    let peer = io.peer_addr().ok();
                    // This task lives as long as the connection (a WebSocket's
                    // writer runs in it), and its size is that of its largest
                    // state: the short-lived steps (the refusal, the protocol
                    // detection, the TLS handshake with its buffers, the request
                    // watch) are boxed, so an idle connection keeps only pointers.
                    let permit = match admission.open_connection() {
                        Ok(permit) => permit,
                        Err(refusal) => {
                            Box::pin(refuse(io, tls.as_ref(), &refusal)).await;
                            return Ok(());
                        }
                    };
                    let (io, protocol) = match &tls {
                        None => match Box::pin(detect(&io, header_timeout)).await {
                            Some(protocol) => (Socket::Plain(io), protocol),
                            None => return Ok(()),
                        },
                        Some(tls) => match Box::pin(handshake(tls, io, header_timeout)).await {
                            Some(accepted) => accepted,
                            None => return Ok(()),
                        },
                    };
                    let activity = Rc::new(Activity::default());
                    let io = WatchedStream {
                        io,
                        activity: activity.clone(),
                    };
                    // Boxed: the HTTP/1 dispatcher (its buffers, its service futures) is
                    // freed as soon as it ends, while a WebSocket that took the socket
                    // goes on in this task (`Handover`) with only what it needs.
                    let serve = Box::pin(service.call((io, protocol, peer)));
                    let result = if protocol == Protocol::Http1 {
                        let watched = Box::pin(watch(&activity, request_limit));
                        tokio::select! {
                            result = serve => Some(result),
                            () = watched => None,
                        }
                    } else {
                        Some(serve.await)
                    };
                    match result {
                        Some(Err(e)) => {
                            tracing::debug!(error = ?e, "connection ended with an error")
                        }
                        None => tracing::debug!(
                            limit = ?request_limit,
                            "a request took too long to arrive and be answered; closing"
                        ),
                        Some(Ok(())) => {}
                    }
                    if let Some(then) = activity.then.take() {
                        then.await;
                    }
                    drop(permit);
                    Ok(())
                }
            }))
        }
    })
}

/// Waits (up to `timeout`) for the first bytes: HTTP/2 when they are the preface,
/// HTTP/1.x otherwise; `None` when nothing useful came in time or the peer left.
async fn detect(io: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let look = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = io.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(Protocol::Http1);
            }
            if n == H2_PREFACE.len() {
                return Some(Protocol::Http2);
            }
            // A prefix of the preface: wait for more (peeking again at once would
            // only see the same bytes).
            tokio::time::sleep(PEEK_INTERVAL).await;
        }
    };
    match tokio::time::timeout(timeout, look).await {
        Ok(protocol) => protocol,
        Err(_) => {
            tracing::debug!("no request within the header timeout; closing");
            None
        }
    }
}

/// Runs the TLS handshake (within `timeout`); the protocol ALPN chose (HTTP/1.1
/// when the client offered none), or `None` when the handshake failed or took
/// too long.
async fn handshake(
    tls: &TlsAcceptor,
    io: TcpStream,
    timeout: Duration,
) -> Option<(Socket, Protocol)> {
    match tokio::time::timeout(timeout, tls.accept(io)).await {
        Ok(Ok(stream)) => {
            let protocol = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Protocol::Http2,
                _ => Protocol::Http1,
            };
            Some((Socket::Tls(Box::new(stream)), protocol))
        }
        Ok(Err(e)) => {
            crate::metrics::metrics().tls_handshake_failures.inc();
            tracing::debug!(error = %e, "TLS handshake failed; closing");
            None
        }
        Err(_) => {
            crate::metrics::metrics().tls_handshake_failures.inc();
            tracing::debug!("no TLS handshake within the header timeout; closing");
            None
        }
    }
}

/// Answers a connection over the cap with `503` and closes it (over TLS when the
/// server speaks TLS: a cleartext answer would only be a handshake error).
async fn refuse(io: TcpStream, tls: Option<&TlsAcceptor>, refusal: &Refusal) {
    let mut io = match tls {
        None => Socket::Plain(io),
        Some(tls) => match handshake(tls, io, REFUSAL_WRITE_TIMEOUT).await {
            Some((io, _)) => io,
            None => return,
        },
    };
    tracing::warn!(%refusal, "connection refused");
    let body =
        serde_json::json!({ "code": "unavailable", "message": refusal.to_string() }).to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        io.write_all(response.as_bytes()).await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await;
}

/// What the watch knows about a connection.
#[derive(Default)]
struct Activity {
    /// When the request being received began: the first bytes read after the
    /// last bytes written. `None` while the connection is idle or answering.
    request_since: Cell<Option<Instant>>,
    /// Set once a WebSocket upgrade took the socket: no more watching.
    detached: Cell<bool>,
    /// What runs in the connection's task once the HTTP dispatcher ended (a
    /// WebSocket's writer): the connection holds its slot until it completes.
    then: Cell<Option<Pin<Box<dyn Future<Output = ()>>>>>,
}

/// Hands work to the connection's task after a WebSocket upgrade took the socket
/// ([`WatchedStream::handover`]).
pub struct Handover(Rc<Activity>);

impl Handover {
    /// Runs `then` in the connection's task after the HTTP/1 dispatcher ended; the
    /// connection keeps its slot of `server.max_connections` (and graceful shutdown
    /// waits for it) until `then` completes.
    pub fn run_after(self, then: impl Future<Output = ()> + 'static) {
        self.0.then.set(Some(Box::pin(then)));
    }
}

/// Completes when a request has been pending for longer than `limit`; never once
/// the socket was detached.
async fn watch(activity: &Activity, limit: Duration) {
    loop {
        if activity.detached.get() {
            return std::future::pending().await;
        }
        match activity.request_since.get() {
            Some(since) if since.elapsed() >= limit => return,
            Some(since) => tokio::time::sleep_until(since + limit).await,
            None => tokio::time::sleep(limit).await,
        }
    }
}

/// A connection's socket whose reads and writes are watched (see the module docs).
pub struct WatchedStream {
    io: Socket,
    activity: Rc<Activity>,
}

impl WatchedStream {
    /// Takes the socket out of the watch (a WebSocket upgrade).
    pub fn into_inner(self) -> Socket {
        self.activity.detached.set(true);
        self.io
    }

    /// Where an upgrade hands the rest of the connection's work (see [`Handover`]).
    pub fn handover(&self) -> Handover {
        Handover(self.activity.clone())
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let activity = &self.activity;
            if activity.request_since.get().is_none() {
                activity.request_since.set(Some(Instant::now()));
            }
        }
        poll
    }
}

impl WatchedStream {
    fn wrote(&self, poll: &Poll<io::Result<usize>>) {
        if matches!(poll, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.request_since.set(None);
        }
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
