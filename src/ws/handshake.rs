//! The WebSocket opening handshake (RFC 6455 §4.2) as the server checks it: method,
//! `Upgrade`/`Connection` headers, version 13, a key, and an `Origin` this server
//! accepts; then the `101 Switching Protocols` answer.

use actix_http::{
    header::{self, HeaderValue},
    ws, RequestHead, Response, StatusCode,
};

/// Why the handshake was refused (answered with `400 Bad Request`).
#[derive(Debug, thiserror::Error)]
#[error("WebSocket handshake failed: {0}")]
pub struct HandshakeError(String);

/// Checks the upgrade headers; the value of `Sec-WebSocket-Accept` when they are right.
pub fn verify(head: &RequestHead) -> Result<HeaderValue, HandshakeError> {
    ws::verify_handshake(head).map_err(|e| HandshakeError(e.to_string()))?;
    let key = head
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| HandshakeError("no Sec-WebSocket-Key".into()))?;
    let accept = ws::hash_key(key.as_bytes());
    HeaderValue::from_bytes(&accept).map_err(|e| HandshakeError(e.to_string()))
}

/// Whether a browser page from the request's `Origin` may open this WebSocket:
/// requests without `Origin` (not from a browser) may; so may pages of the same
/// origin as the server (`Origin`'s host is the `Host` the request was sent to), and
/// origins listed in `allowed` (`"*"` allows any).
pub fn origin_allowed(head: &RequestHead, allowed: &[String]) -> bool {
    let Some(origin) = head.headers().get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let host = head
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()))
}

/// The `101 Switching Protocols` answer, naming `protocol` when the client offered any.
pub fn switching_protocols(accept: HeaderValue, protocol: Option<&'static str>) -> Response<()> {
    let mut builder = Response::build(StatusCode::SWITCHING_PROTOCOLS);
    builder
        .upgrade("websocket")
        .insert_header((header::SEC_WEBSOCKET_ACCEPT, accept));
    if let Some(protocol) = protocol {
        builder.insert_header((header::SEC_WEBSOCKET_PROTOCOL, protocol));
    }
    builder.body(()).drop_body()
}

#[cfg(test)]
mod tests {
    use actix_http::test::TestRequest;

    use super::*;

    fn head(origin: Option<&str>, host: &str) -> actix_http::Request {
        let mut req = TestRequest::default();
        req.insert_header((header::HOST, host));
        if let Some(origin) = origin {
            req.insert_header((header::ORIGIN, origin));
        }
        req.finish()
    }

    #[test]
    fn origins() {
        let none: Vec<String> = Vec::new();
        assert!(origin_allowed(head(None, "a:1").head(), &none));
        assert!(origin_allowed(
            head(Some("http://a:1"), "a:1").head(),
            &none
        ));
        assert!(!origin_allowed(
            head(Some("https://evil.example"), "a:1").head(),
            &none
        ));
        let listed = vec!["https://chat.example.com".to_owned()];
        assert!(origin_allowed(
            head(Some("https://chat.example.com"), "api:8080").head(),
            &listed
        ));
        assert!(!origin_allowed(
            head(Some("https://other.example.com"), "api:8080").head(),
            &listed
        ));
        let any = vec!["*".to_owned()];
        assert!(origin_allowed(
            head(Some("https://x.example"), "a").head(),
            &any
        ));
    }
}
