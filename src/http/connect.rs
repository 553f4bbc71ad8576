//! The Connect protocol's unary rules, once for every RPC: `POST /<service>/<method>`
//! with a JSON (canonical proto3 JSON) or binary protobuf body, answered in the same
//! codec; `Connect-Timeout-Ms` honoured; errors as Connect error JSON.

use std::{future::Future, time::Duration};

use actix_web::{
    http::header::{self, HeaderMap},
    web, HttpRequest, HttpResponse,
};
use futures_util::StreamExt as _;
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    actors::authenticator::{Authenticate, ClientAddr},
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
    /// Where the request came from (for per-address limits); see [`client_addr`].
    pub client: ClientAddr,
}

/// The client's address: the TCP peer's. The seam for trusted proxies: when
/// roomcast learns to trust `X-Forwarded-For` from configured proxies, it is
/// decided here, and only here.
pub fn client_addr(req: &HttpRequest) -> ClientAddr {
    ClientAddr(req.peer_addr().map(|addr| addr.ip()))
}

impl RpcContext {
    /// The authenticated caller; `unauthenticated` without a valid bearer credential.
    pub async fn principal(&self) -> Result<Principal, ApiError> {
        let Some(bearer) = self.bearer.clone() else {
            return Err(ApiError::unauthenticated(
                "missing `Authorization: Bearer <token>` header",
            ));
        };
        self.state.auth.send(Authenticate { bearer }).await
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

/// Serves one unary RPC: decode, run `handler` under the deadline, encode.
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
    let Some(codec) = Codec::from_headers(req.headers()) else {
        let given = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        return error_response(
            &ApiError::invalid(format!(
                "unsupported content type `{given}`; use application/json or application/proto"
            )),
            Some(415),
        );
    };
    let Some(state) = req
        .app_data::<web::Data<AppState>>()
        .map(|d| d.get_ref().clone())
    else {
        return error_response(&ApiError::internal("AppState missing from the app"), None);
    };
    let settings = &state.settings.server;
    let result = async {
        let timeout = deadline(req.headers(), settings.request_timeout_ms)?;
        let bearer = bearer_token(req.headers())?;
        let work = async {
            let body = read_body(&req, payload, settings.max_request_bytes).await?;
            let message: Req = codec.decode(&body)?;
            let context = RpcContext {
                state: state.clone(),
                bearer,
                client: client_addr(&req),
            };
            handler(context, message).await
        };
        match actix_web::rt::time::timeout(timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ApiError::new(
                Code::DeadlineExceeded,
                "the request deadline passed",
            )),
        }
    }
    .await;
    match result.and_then(|response| codec.encode(&response)) {
        Ok(bytes) => HttpResponse::Ok()
            .content_type(codec.content_type())
            .body(bytes),
        Err(e) => error_response(&e, None),
    }
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
