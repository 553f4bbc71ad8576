//! The Connect protocol's unary rules, once for every RPC: `POST /<service>/<method>`
//! with a JSON (canonical proto3 JSON) or binary protobuf body, answered in the same
//! codec; `Connect-Timeout-Ms` honoured; `Content-Encoding: gzip` bodies decompressed
//! (the body limit applies to the decompressed size) and replies gzip-compressed when
//! the client accepts it; errors as Connect error JSON.
//!
//! The extractor reads the raw payload (`web::Payload` does no decoding), so every
//! content coding is handled here, where the body limit and the Connect error for an
//! unsupported coding (`unimplemented`, with `Accept-Encoding` naming what is
//! supported) can be applied.

use std::{
    future::Future,
    io::{Read as _, Write as _},
    time::Duration,
};

use actix_web::{
    http::header::{self, HeaderMap},
    web, HttpRequest, HttpResponse,
};
use futures_util::StreamExt as _;
use serde::{de::DeserializeOwned, Serialize};

use super::client_addr::{client_ip, ProxyNet};
use crate::{
    actors::authenticator::{AuthorizeCall, ClientAddr},
    domain::{AppState, Principal},
    error::{ApiError, Code},
};

/// The two codecs of the Connect unary protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `application/json`: canonical proto3 JSON.
    Json,
    /// `application/proto`: binary protobuf.
    Proto,
}

impl Codec {
    /// The codec of a request's `Content-Type`; `None` when unsupported.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let mime = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/json" => Some(Codec::Json),
            "application/proto" | "application/protobuf" | "application/x-protobuf" => {
                Some(Codec::Proto)
            }
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        }
    }

    /// Decodes a request body; the error names the problem.
    pub fn decode<M: prost::Message + DeserializeOwned + Default>(
        self,
        body: &[u8],
    ) -> Result<M, ApiError> {
        match self {
            Codec::Json if body.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => serde_json::from_slice(body)
                .map_err(|e| ApiError::invalid(format!("malformed JSON request: {e}"))),
            Codec::Proto => M::decode(body)
                .map_err(|e| ApiError::invalid(format!("malformed protobuf request: {e}"))),
        }
    }

    /// Encodes a response body.
    pub fn encode<M: prost::Message + Serialize>(self, message: &M) -> Result<Vec<u8>, ApiError> {
        match self {
            Codec::Json => serde_json::to_vec(message).map_err(ApiError::internal),
            Codec::Proto => Ok(message.encode_to_vec()),
        }
    }
}

/// What an RPC handler gets besides its request message.
pub struct RpcContext {
    pub state: AppState,
    bearer: Option<String>,
    /// The RPC being served, `roomcast.v1.RoomService/SendMessage` (the access
    /// rules are checked against it).
    pub rpc: String,
    /// Where the request came from (for per-address limits); see [`client_addr`].
    pub client: ClientAddr,
    /// When the request's deadline passes (`Connect-Timeout-Ms`, at most
    /// `server.request_timeout_ms`): a handler that waits (long-polling) answers
    /// before it.
    pub deadline: tokio::time::Instant,
}

/// The client's address: the TCP peer's, or the address a trusted proxy forwarded
/// ([`client_ip`], `server.trusted_proxies`).
pub fn client_addr(req: &HttpRequest, trusted: &[ProxyNet]) -> ClientAddr {
    ClientAddr(client_ip(
        req.peer_addr().map(|addr| addr.ip()),
        req.headers(),
        trusted,
    ))
}

impl RpcContext {
    /// The authenticated caller; `unauthenticated` without a valid bearer credential.
    pub async fn principal(&self) -> Result<Principal, ApiError> {
        let Some(bearer) = self.bearer.clone() else {
            return Err(ApiError::unauthenticated(
                "missing `Authorization: Bearer <token>` header",
            ));
        };
        let rpc = self.rpc.clone();
        self.state
            .auth
            .send_local(AuthorizeCall { bearer, rpc })
            .await
    }
}

/// The bearer credential of a request, if it has one.
pub fn bearer_token(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthenticated("malformed Authorization header"))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::unauthenticated(
            "Authorization header must be `Bearer <token>`",
        ));
    }
    Ok(Some(token.trim().to_owned()))
}

/// Longest `Connect-Timeout-Ms` value the protocol allows (10 digits).
const MAX_TIMEOUT_DIGITS: usize = 10;

/// The content codings this server reads in request bodies and may use for replies,
/// as sent in the `Accept-Encoding` header of every RPC response.
pub const ACCEPTED_ENCODINGS: &str = "gzip, identity";

/// A content coding of a request or response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    /// No compression.
    Identity,
    /// gzip (RFC 1952).
    Gzip,
}

impl ContentCoding {
    /// The request body's coding from `Content-Encoding`; absent means identity.
    /// Anything but `gzip` and `identity` is Connect's `unimplemented`.
    pub fn of_request(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut coding = ContentCoding::Identity;
        for value in headers.get_all(header::CONTENT_ENCODING) {
            let text = value.to_str().unwrap_or("(not ASCII)");
            for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                match token.to_ascii_lowercase().as_str() {
                    "identity" => {}
                    "gzip" | "x-gzip" if coding == ContentCoding::Identity => {
                        coding = ContentCoding::Gzip;
                    }
                    _ => {
                        return Err(ApiError::new(
                            Code::Unimplemented,
                            format!(
                                "unsupported Content-Encoding `{text}`; \
                                 supported encodings: {ACCEPTED_ENCODINGS}"
                            ),
                        ))
                    }
                }
            }
        }
        Ok(coding)
    }

    /// The reply's coding: the first supported coding of `Accept-Encoding` (an
    /// ordered list, as the Connect protocol reads it; a `q=0` entry is refused). Without
    /// the header, the request's own coding, as the protocol says.
    pub fn for_response(headers: &HeaderMap, request: ContentCoding) -> Self {
        let values: Vec<&str> = headers
            .get_all(header::ACCEPT_ENCODING)
            .filter_map(|v| v.to_str().ok())
            .collect();
        if values.is_empty() {
            return request;
        }
        for entry in values.iter().flat_map(|v| v.split(',')) {
            let mut parts = entry.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default().to_ascii_lowercase();
            let refused = parts.any(|param| {
                param
                    .strip_prefix("q=")
                    .or_else(|| param.strip_prefix("Q="))
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if refused {
                continue;
            }
            match name.as_str() {
                "gzip" | "x-gzip" | "*" => return ContentCoding::Gzip,
                "identity" => return ContentCoding::Identity,
                _ => {}
            }
        }
        ContentCoding::Identity
    }

    fn header_value(self) -> Option<&'static str> {
        match self {
            ContentCoding::Identity => None,
            ContentCoding::Gzip => Some("gzip"),
        }
    }
}

/// Decompresses a gzip body, refusing output larger than `limit` bytes without
/// producing more than `limit + 1` of it (a small "gzip bomb" expands a
/// thousandfold). An empty body stays empty: the protocol forbids decompressing it.
pub fn gunzip_limited(body: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::MultiGzDecoder::new(body)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::invalid(format!("malformed gzip request body: {e}")))?;
    if out.len() > limit {
        return Err(ApiError::exhausted(format!(
            "request body exceeds the limit of {limit} bytes after decompression"
        )));
    }
    Ok(out)
}

/// Gzip-compresses a reply body.
fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 2 + 64),
        flate2::Compression::default(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

fn deadline(headers: &HeaderMap, ceiling_ms: u64) -> Result<Duration, ApiError> {
    let Some(value) = headers.get("connect-timeout-ms") else {
        return Ok(Duration::from_millis(ceiling_ms));
    };
    let text = value.to_str().unwrap_or_default();
    if text.is_empty()
        || text.len() > MAX_TIMEOUT_DIGITS
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(ApiError::invalid(
            "Connect-Timeout-Ms must be a positive integer of at most 10 digits",
        ));
    }
    let ms: u64 = text
        .parse()
        .map_err(|_| ApiError::invalid("Connect-Timeout-Ms is not a number"))?;
    Ok(Duration::from_millis(ms.min(ceiling_ms)))
}

/// The answer to a request whose deadline has passed.
fn deadline_exceeded() -> ApiError {
    ApiError::new(Code::DeadlineExceeded, "the request deadline passed")
}

/// Reads the body up to `limit` bytes; a larger body is refused without reading it all.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let too_large =
        || ApiError::exhausted(format!("request body exceeds the limit of {limit} bytes"));
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        if len
            .to_str()
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l > limit)
        {
            return Err(too_large());
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("could not read request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Serves one unary RPC: decode, run `handler` under the deadline, encode; counted
/// in the metrics by method and Connect code.
pub async fn unary<Req, Resp, F, Fut>(
    req: HttpRequest,
    payload: web::Payload,
    handler: F,
) -> HttpResponse
where
    Req: prost::Message + DeserializeOwned + Default,
    Resp: prost::Message + Serialize,
    F: FnOnce(RpcContext, Req) -> Fut,
    Fut: Future<Output = Result<Resp, ApiError>>,
{
    let started = std::time::Instant::now();
    let (response, code) = serve_unary(&req, payload, handler).await;
    crate::metrics::metrics().rpc(req.path().trim_start_matches('/'), code, started.elapsed());
    response
}

/// [`unary`]'s work; the response and its Connect code (`ok` on success).
async fn serve_unary<Req, Resp, F, Fut>(
    req: &HttpRequest,
    payload: web::Payload,
    handler: F,
) -> (HttpResponse, &'static str)
where
    Req: prost::Message + DeserializeOwned + Default,
    Resp: prost::Message + Serialize,
    F: FnOnce(RpcContext, Req) -> Fut,
    Fut: Future<Output = Result<Resp, ApiError>>,
{
    let req = req.clone();
    let Some(codec) = Codec::from_headers(req.headers()) else {
        let given = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        let error = ApiError::invalid(format!(
            "unsupported content type `{given}`; use application/json or application/proto"
        ));
        return (error_response(&error, Some(415)), error.code.as_str());
    };
    let request_coding = match ContentCoding::of_request(req.headers()) {
        Ok(coding) => coding,
        // The protocol's table gives `unimplemented` HTTP 501 (404 is kept for
        // unknown RPCs, where clients infer `unimplemented` from the status alone).
        Err(e) => {
            return (
                with_accepted_encodings(error_response(&e, Some(501))),
                e.code.as_str(),
            )
        }
    };
    let response_coding = ContentCoding::for_response(req.headers(), request_coding);
    let Some(state) = req
        .app_data::<web::Data<AppState>>()
        .map(|d| d.get_ref().clone())
    else {
        let error = ApiError::internal("AppState missing from the app");
        return (error_response(&error, None), error.code.as_str());
    };
    let settings = &state.settings.server;
    let result = async {
        let timeout = deadline(req.headers(), settings.request_timeout_ms)?;
        // A zero deadline has passed before any work could start: the handler must not
        // run (a timer of 0 ms would only fire at the next tick, after it finished).
        if timeout.is_zero() {
            return Err(deadline_exceeded());
        }
        let bearer = bearer_token(req.headers())?;
        let deadline_at = tokio::time::Instant::now() + timeout;
        let work = async {
            let limit = settings.max_request_bytes;
            let body = read_body(&req, payload, limit).await?;
            let message: Req = match request_coding {
                ContentCoding::Identity => codec.decode(&body)?,
                ContentCoding::Gzip => codec.decode(&gunzip_limited(&body, limit)?)?,
            };
            let context = RpcContext {
                state: state.clone(),
                bearer,
                rpc: req.path().trim_start_matches('/').to_owned(),
                client: client_addr(&req, &state.settings.server.trusted_proxies),
                deadline: deadline_at,
            };
            handler(context, message).await
        };
        match actix_web::rt::time::timeout(timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(deadline_exceeded()),
        }
    }
    .await;
    let (response, code) = match result.and_then(|response| codec.encode(&response)) {
        Ok(bytes) => (
            success_response(codec, bytes, response_coding, settings.compress_min_bytes),
            "ok",
        ),
        Err(e) => (error_response(&e, None), e.code.as_str()),
    };
    (with_accepted_encodings(response), code)
}

/// A 200 reply, gzip-compressed when the client accepts it and the body is at least
/// `compress_min_bytes` long (smaller bodies gain nothing from it).
fn success_response(
    codec: Codec,
    bytes: Vec<u8>,
    coding: ContentCoding,
    compress_min_bytes: usize,
) -> HttpResponse {
    let mut builder = HttpResponse::Ok();
    builder.content_type(codec.content_type());
    if coding == ContentCoding::Gzip && bytes.len() >= compress_min_bytes {
        match gzip(&bytes) {
            Ok(compressed) => {
                if let Some(value) = coding.header_value() {
                    builder.insert_header((header::CONTENT_ENCODING, value));
                }
                return builder.body(compressed);
            }
            // Compressing into memory cannot fail in practice; answer uncompressed.
            Err(e) => tracing::warn!(error = %e, "could not gzip a reply; sending it uncompressed"),
        }
    }
    builder.body(bytes)
}

/// Tells the client which request codings this server reads.
fn with_accepted_encodings(mut response: HttpResponse) -> HttpResponse {
    response.headers_mut().insert(
        header::ACCEPT_ENCODING,
        header::HeaderValue::from_static(ACCEPTED_ENCODINGS),
    );
    response
}

/// A Connect error response: JSON body, the code's HTTP status (or `status`).
pub fn error_response(error: &ApiError, status: Option<u16>) -> HttpResponse {
    let status = status.unwrap_or_else(|| error.code.http_status());
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = serde_json::json!({ "code": error.code.as_str(), "message": error.message });
    let mut response = HttpResponse::build(status);
    if let (Some(delay), Some((kind, value))) = (error.retry_after, error.retry_info_detail()) {
        body["details"] = serde_json::json!([{ "type": kind, "value": value }]);
        let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        response.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    response.content_type("application/json").json(body)
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        actix_web::http::StatusCode::from_u16(self.code.http_status())
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        error_response(self, None)
    }
}
