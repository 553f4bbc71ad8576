//! What happens to a TCP connection before HTTP: it takes a slot of the server-wide
//! connection cap (`server.max_connections`; past it, `503` and close), has
//! `server.header_timeout_ms` to send its first bytes, and is served as HTTP/2 when
//! those bytes are the HTTP/2 connection preface (cleartext "prior knowledge", as
//! gRPC and Connect clients send it), else as HTTP/1.x.

use std::{net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use actix_http::Protocol;
use actix_service::{fn_factory, fn_service, Service, ServiceFactory};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use crate::admission::{Admission, Refusal};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How often to look again while the first bytes could still be the preface.
const PEEK_INTERVAL: Duration = Duration::from_millis(5);
/// How long the `503` for a connection over the cap may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Wraps the HTTP service factory with the connection cap, the first-bytes deadline
/// and the HTTP/1 or HTTP/2 choice.
pub fn connection_service<F>(
    http: F,
    admission: Arc<Admission>,
    header_timeout: Duration,
) -> impl ServiceFactory<TcpStream, Config = (), Response = (), Error = (), InitError = ()>
where
    F: ServiceFactory<
            (TcpStream, Protocol, Option<SocketAddr>),
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
        async move {
            let service = Rc::new(service.await?);
            Ok::<_, ()>(fn_service(move |io: TcpStream| {
                let service = service.clone();
                let admission = admission.clone();
                async move {
                    let permit = match admission.open_connection() {
                        Ok(permit) => permit,
                        Err(refusal) => {
                            refuse(io, &refusal).await;
                            return Ok(());
                        }
                    };
                    let Some(protocol) = detect(&io, header_timeout).await else {
                        return Ok(());
                    };
                    let _ = io.set_nodelay(true);
                    let peer = io.peer_addr().ok();
                    if let Err(e) = service.call((io, protocol, peer)).await {
                        tracing::debug!(error = ?e, "connection ended with an error");
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

/// Answers a connection over the cap with `503` and closes it.
async fn refuse(mut io: TcpStream, refusal: &Refusal) {
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
