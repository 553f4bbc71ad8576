//! Property-based tests of the decoders that read untrusted input: the WebSocket
//! `ClientFrame` in both codecs (proto3 JSON text frames and binary protobuf
//! frames, decoded exactly as the connection does), and the Connect unary request
//! (content type, content coding, deadline, bearer and body; the codec functions
//! directly, then a live server over real sockets).
//!
//! Properties: arbitrary and structurally valid-but-weird input never panics and
//! always yields a value or a clear error; a frame that decodes survives a
//! re-encode unchanged; a request is answered with a Connect error (never a 500);
//! over a live WebSocket, every frame gets exactly one answer and the connection
//! stays usable.
//! Each property runs a fixed number of cases, chosen so each takes a few seconds at
//! most, so they run in the normal test command (stable Rust, no fuzzing toolchain).
//! A failure is shrunk to a minimal input and printed; nothing is written to disk.

mod common;

use std::{sync::OnceLock, time::Duration};

use common::{Backend, TestServer};
use proptest::{prelude::*, test_runner::Config};
use prost::Message as _;
use roomcast::{
    http::connect::{gunzip_limited, Codec, ContentCoding},
    proto::v1 as pb,
};
use serde_json::{json, Value};

/// Cases per decoder property (each case is microseconds).
const DECODER_CASES: u32 = 4_000;
/// Cases for the live-server property (each case is one HTTP request on loopback).
const LIVE_CASES: u32 = 300;

fn config(cases: u32) -> Config {
    Config {
        cases,
        // No proptest-regressions files in the repository.
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------
// WebSocket ClientFrame decoders (the calls the connection makes for each frame)
// ---------------------------------------------------------------------------

fn decode_text_frame(text: &str) -> Result<pb::ClientFrame, String> {
    serde_json::from_str::<pb::ClientFrame>(text).map_err(|e| e.to_string())
}

fn decode_binary_frame(bytes: &[u8]) -> Result<pb::ClientFrame, String> {
    pb::ClientFrame::decode(bytes).map_err(|e| e.to_string())
}

/// A decoded frame re-encodes, in both codecs, to one that decodes to itself.
fn assert_round_trips(frame: &pb::ClientFrame) -> Result<(), TestCaseError> {
    let json = serde_json::to_string(frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let again = decode_text_frame(&json).map_err(TestCaseError::fail)?;
    prop_assert_eq!(&again, frame, "JSON round trip of {}", json);
    let again = decode_binary_frame(&frame.encode_to_vec()).map_err(TestCaseError::fail)?;
    prop_assert_eq!(&again, frame);
    Ok(())
}

fn check_outcome(outcome: Result<pb::ClientFrame, String>) -> Result<(), TestCaseError> {
    match outcome {
        Ok(frame) => assert_round_trips(&frame),
        Err(message) => {
            prop_assert!(!message.trim().is_empty(), "an error says what is wrong");
            Ok(())
        }
    }
}

/// Any JSON value, a few levels deep, with the awkward scalars: huge and negative
/// numbers, floats, digit strings, unicode, nulls.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN/inf", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        "[0-9]{1,25}".prop_map(Value::from),
        Just(json!("18446744073709551616")),
        Just(json!("-1")),
        Just(json!("1e3")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(field_name(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of ClientFrame and its messages (both spellings), and some others.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "id",
            "authenticate",
            "subscribe",
            "unsubscribe",
            "send",
            "typing",
            "markRead",
            "mark_read",
            "ping",
            "accessToken",
            "access_token",
            "roomId",
            "room_id",
            "sinceSeq",
            "since_seq",
            "text",
            "metadata",
            "replyToSeq",
            "clientMessageId",
            "seq",
            "teleport",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z_]{1,10}",
    ]
}

/// A ClientFrame-shaped JSON object: an id of any JSON type and one or more kinds
/// with any contents.
fn frame_shaped_json() -> impl Strategy<Value = Value> {
    (
        prop::option::of(any_json()),
        prop::collection::btree_map(field_name(), any_json(), 0..3),
    )
        .prop_map(|(id, kinds)| {
            let mut object: serde_json::Map<String, Value> = kinds.into_iter().collect();
            if let Some(id) = id {
                object.insert("id".into(), id);
            }
            Value::Object(object)
        })
}

/// A structurally valid ClientFrame with arbitrary field values.
fn valid_frame() -> impl Strategy<Value = pb::ClientFrame> {
    use pb::client_frame::Kind;
    let kind = prop_oneof![
        "\\PC{0,40}".prop_map(|t| Kind::Authenticate(pb::Authenticate { access_token: t })),
        ("\\PC{0,30}", prop::option::of(any::<u64>())).prop_map(|(room_id, since_seq)| {
            Kind::Subscribe(pb::Subscribe { room_id, since_seq })
        }),
        "\\PC{0,30}".prop_map(|room_id| Kind::Unsubscribe(pb::Unsubscribe { room_id })),
        (
            "\\PC{0,30}",
            "\\PC{0,200}",
            prop::collection::hash_map("\\PC{0,8}", "\\PC{0,8}", 0..4),
            any::<u64>(),
            "\\PC{0,70}",
        )
            .prop_map(
                |(room_id, text, metadata, reply_to_seq, client_message_id)| {
                    Kind::Send(pb::SendMessageRequest {
                        room_id,
                        text,
                        metadata,
                        reply_to_seq,
                        client_message_id,
                    })
                }
            ),
        "\\PC{0,30}".prop_map(|room_id| Kind::Typing(pb::Typing { room_id })),
        ("\\PC{0,30}", any::<u64>())
            .prop_map(|(room_id, seq)| Kind::MarkRead(pb::MarkReadRequest { room_id, seq })),
        Just(Kind::Ping(pb::Ping {})),
    ];
    (any::<u64>(), prop::option::of(kind)).prop_map(|(id, kind)| pb::ClientFrame { id, kind })
}

/// A byte-level change to an encoded frame.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bits: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Flip { at, bits } if len > 0 => bytes[at % len] ^= bits,
            Mutation::Flip { .. } => {}
            Mutation::Truncate { at } => bytes.truncate(at % (len + 1)),
            Mutation::Insert { at, bytes: new } => {
                let at = at % (len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(config(DECODER_CASES))]

    #[test]
    fn text_frames_of_any_string_decode_or_fail_clearly(text in "\\PC{0,200}") {
        check_outcome(decode_text_frame(&text))?;
    }

    #[test]
    fn text_frames_of_any_bytes_as_lossy_utf8_decode_or_fail_clearly(
        bytes in prop::collection::vec(any::<u8>(), 0..200)
    ) {
        check_outcome(decode_text_frame(&String::from_utf8_lossy(&bytes)))?;
    }

    #[test]
    fn frame_shaped_json_decodes_or_fails_clearly(value in frame_shaped_json()) {
        check_outcome(decode_text_frame(&value.to_string()))?;
    }

    #[test]
    fn binary_frames_of_any_bytes_decode_or_fail_clearly(
        bytes in prop::collection::vec(any::<u8>(), 0..300)
    ) {
        check_outcome(decode_binary_frame(&bytes))?;
    }

    #[test]
    fn valid_frames_round_trip_in_both_codecs(frame in valid_frame()) {
        assert_round_trips(&frame)?;
    }

    #[test]
    fn mutated_binary_frames_decode_or_fail_clearly(
        frame in valid_frame(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        check_outcome(decode_binary_frame(&mutate(frame.encode_to_vec(), &mutations)))?;
    }

    #[test]
    fn mutated_text_frames_decode_or_fail_clearly(
        frame in valid_frame(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let json = serde_json::to_vec(&frame).expect("a frame serializes");
        check_outcome(decode_text_frame(&String::from_utf8_lossy(&mutate(json, &mutations))))?;
    }
}

/// Nesting far deeper than any frame: refused with an error (the JSON parser's
/// recursion limit), not a stack overflow.
#[test]
fn deeply_nested_frames_fail_clearly() {
    for depth in [64, 1_000, 100_000] {
        let text = format!(
            "{{\"id\":\"1\",\"send\":{{\"metadata\":{}{}}}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert!(decode_text_frame(&text).is_err(), "depth {depth}");
    }
    // Protobuf: nested groups of unknown fields, far past prost's recursion limit.
    // Field 9 "start group" (0x4b) 100,000 times, then as many "end group" (0x4c).
    let mut bytes = vec![0x4b; 100_000];
    bytes.extend(std::iter::repeat_n(0x4c, 100_000));
    assert!(decode_binary_frame(&bytes).is_err());
}

// ---------------------------------------------------------------------------
// Connect unary request decoding (the codec's functions)
// ---------------------------------------------------------------------------

fn header_map(pairs: &[(&str, &str)]) -> actix_web::http::header::HeaderMap {
    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let Ok(value) = HeaderValue::from_str(value) {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
                value,
            );
        }
    }
    map
}

/// Header values: mostly printable ASCII, with the interesting tokens mixed in.
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        prop::sample::select(vec![
            "gzip",
            "identity",
            "br",
            "gzip, br",
            "gzip;q=0",
            "*",
            "x-gzip",
            "application/json",
            "application/proto",
            "application/json; charset=utf-8",
            "application/connect+proto",
            "0",
            "00",
            "9999999999",
            "99999999999",
            "Bearer ",
            "Bearer x",
        ])
        .prop_map(str::to_owned),
    ]
}

proptest! {
    #![proptest_config(config(DECODER_CASES))]

    #[test]
    fn request_bodies_decode_or_are_invalid_argument(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        for codec in [Codec::Json, Codec::Proto] {
            match codec.decode::<pb::SendMessageRequest>(&bytes) {
                Ok(message) => {
                    let again = codec.encode(&message).expect("a decoded message encodes");
                    prop_assert_eq!(codec.decode::<pb::SendMessageRequest>(&again).ok(), Some(message));
                }
                Err(e) => {
                    prop_assert_eq!(e.code.as_str(), "invalid_argument");
                    prop_assert!(e.message.contains("malformed"), "{}", e.message);
                }
            }
        }
    }

    #[test]
    fn gzip_bodies_inflate_within_the_limit_or_fail_clearly(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        limit in 0usize..4096,
        gzipped in any::<bool>(),
    ) {
        let body = if gzipped {
            use std::io::Write as _;
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&bytes).expect("gzip into memory");
            encoder.finish().expect("gzip into memory")
        } else {
            bytes.clone()
        };
        match gunzip_limited(&body, limit) {
            Ok(out) => {
                prop_assert!(out.len() <= limit);
                if gzipped && !body.is_empty() {
                    prop_assert_eq!(out, bytes);
                }
            }
            Err(e) => {
                let code = e.code.as_str();
                prop_assert!(code == "invalid_argument" || code == "resource_exhausted", "{}", code);
                if gzipped {
                    prop_assert_eq!(code, "resource_exhausted", "{}", e.message);
                    prop_assert!(bytes.len() > limit);
                }
            }
        }
    }

    #[test]
    fn content_headers_never_panic(
        content_type in header_value(),
        content_encoding in header_value(),
        accept_encoding in header_value(),
    ) {
        let headers = header_map(&[
            ("content-type", &content_type),
            ("content-encoding", &content_encoding),
            ("accept-encoding", &accept_encoding),
        ]);
        let _ = Codec::from_headers(&headers);
        match ContentCoding::of_request(&headers) {
            Ok(coding) => {
                let _ = ContentCoding::for_response(&headers, coding);
            }
            Err(e) => {
                prop_assert_eq!(e.code.as_str(), "unimplemented");
                prop_assert!(e.message.contains("gzip"));
            }
        }
        let _ = roomcast::http::connect::bearer_token(&headers);
    }
}

// ---------------------------------------------------------------------------
// Connect unary requests against a live server
// ---------------------------------------------------------------------------

/// One server (and runtime) for every case of the live property.
struct Live {
    runtime: tokio::runtime::Runtime,
    server: TestServer,
    token: String,
}

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let (server, token) = runtime.block_on(async {
            let server = TestServer::spawn_with(Backend::Sqlite, |s| {
                s.server.max_request_bytes = 4096;
                s.realtime.send_rate_per_sec = 100_000;
                s.realtime.send_burst = 100_000;
            })
            .await;
            let account = server.sign_up("prop").await;
            (server, account.access_token)
        });
        Live {
            runtime,
            server,
            token,
        }
    })
}

#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    content_type: Option<String>,
    content_encoding: Option<String>,
    accept_encoding: Option<String>,
    timeout: Option<String>,
    /// None: no Authorization; Some(None): the valid token; Some(Some(v)): `v`.
    authorization: Option<Option<String>>,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = Request> {
    let methods = prop::sample::select(vec![
        "AuthService/SignIn",
        "AuthService/Refresh",
        "UserService/GetMe",
        "UserService/GetUser",
        "UserService/SearchUsers",
        "RoomService/CreateRoom",
        "RoomService/GetRoom",
        "RoomService/ListRooms",
        "RoomService/SendMessage",
        "RoomService/ListMessages",
        "RoomService/MarkRead",
        "NoService/Nothing",
    ]);
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        frame_shaped_json().prop_map(|v| v.to_string().into_bytes()),
        Just(b"{}".to_vec()),
    ];
    (
        methods,
        prop::option::of(header_value()),
        prop::option::of(header_value()),
        prop::option::of(header_value()),
        prop::option::of(prop_oneof!["[0-9]{0,11}", header_value()]),
        prop::option::of(prop::option::of(header_value())),
        body,
    )
        .prop_map(
            |(
                method,
                content_type,
                content_encoding,
                accept_encoding,
                timeout,
                authorization,
                body,
            )| Request {
                method,
                content_type,
                content_encoding,
                accept_encoding,
                timeout,
                authorization,
                body,
            },
        )
}

proptest! {
    #![proptest_config(config(LIVE_CASES))]

    #[test]
    fn any_request_gets_a_connect_answer_never_a_500(request in request()) {
        let live = live();
        let (status, content_type, body) = live.runtime.block_on(async {
            let mut builder = live
                .server
                .http()
                .post(live.server.url(&format!("/roomcast.v1.{}", request.method)));
            let headers = [
                ("content-type", &request.content_type),
                ("content-encoding", &request.content_encoding),
                ("accept-encoding", &request.accept_encoding),
                ("connect-timeout-ms", &request.timeout),
            ];
            for (name, value) in headers {
                if let Some(value) = value {
                    if reqwest::header::HeaderValue::from_str(value).is_ok() {
                        builder = builder.header(name, value.as_str());
                    }
                }
            }
            match &request.authorization {
                None => {}
                Some(None) => builder = builder.bearer_auth(&live.token),
                Some(Some(value)) if reqwest::header::HeaderValue::from_str(value).is_ok() => {
                    builder = builder.header("authorization", value.as_str());
                }
                Some(Some(_)) => {}
            }
            let response = builder
                .body(request.body.clone())
                .send()
                .await
                .expect("the server answers");
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = response.bytes().await.expect("a body").to_vec();
            (status, content_type, body)
        });
        prop_assert!(status < 500 || status == 501 || status == 503 || status == 504,
            "HTTP {} for {:?}: {}", status, request, String::from_utf8_lossy(&body));
        if status != 200 {
            prop_assert!(content_type.starts_with("application/json"), "{} {}", status, content_type);
            let error: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("error body is not JSON: {e}")))?;
            let code = error["code"].as_str().unwrap_or_default();
            prop_assert!(!code.is_empty() && code != "internal" && code != "unknown", "{}", error);
            prop_assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", error);
        }
    }
}

// ---------------------------------------------------------------------------
// WebSocket frames against a live server
// ---------------------------------------------------------------------------

/// Connections (cases) for the live WebSocket property; each sends a few frames.
const LIVE_WS_CASES: u32 = 96;

/// One frame as sent on the wire.
#[derive(Debug, Clone)]
enum WireFrame {
    Text(String),
    Binary(Vec<u8>),
}

fn wire_frame() -> impl Strategy<Value = WireFrame> {
    prop_oneof![
        "\\PC{0,80}".prop_map(WireFrame::Text),
        frame_shaped_json().prop_map(|v| WireFrame::Text(v.to_string())),
        valid_frame().prop_map(|f| WireFrame::Text(serde_json::to_string(&f).expect("JSON"))),
        valid_frame().prop_map(|f| WireFrame::Binary(f.encode_to_vec())),
        (valid_frame(), prop::collection::vec(mutation(), 1..3))
            .prop_map(|(f, m)| WireFrame::Binary(mutate(f.encode_to_vec(), &m))),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(WireFrame::Binary),
    ]
}

/// The id the server must answer `frame` with: the frame's own id when it decodes
/// with a non-zero id, else 0 (an `error` that answers no request).
fn expected_reply_id(frame: &WireFrame) -> u64 {
    let decoded = match frame {
        WireFrame::Text(text) => decode_text_frame(text),
        WireFrame::Binary(bytes) => decode_binary_frame(bytes),
    };
    decoded.map_or(0, |f| f.id)
}

proptest! {
    #![proptest_config(config(LIVE_WS_CASES))]

    /// docs/websocket.md: the server answers each client frame with exactly one frame
    /// carrying its id (or an `error` of id 0 when the id cannot be read), and a
    /// connection survives up to 20 malformed frames.
    #[test]
    fn any_websocket_frame_gets_exactly_one_answer(
        frames in prop::collection::vec(wire_frame(), 1..12),
        proto in any::<bool>(),
    ) {
        use common::ws::{Incoming, WsClient, WsCodec};
        use tokio_tungstenite::tungstenite::Message;
        let live = live();
        let codec = if proto { WsCodec::Proto } else { WsCodec::Json };
        let outcome: Result<(), String> = live.runtime.block_on(async {
            let mut ws = WsClient::connect_authenticated(
                &live.server.ws_url("/ws"),
                codec,
                &live.token,
            )
            .await;
            for frame in &frames {
                let want = expected_reply_id(frame);
                let message = match frame {
                    WireFrame::Text(text) => Message::text(text.clone()),
                    WireFrame::Binary(bytes) => Message::binary(bytes.clone()),
                };
                ws.send_raw(message).await;
                // Skip pushes (id 0, not an error); the answer is the next other frame.
                loop {
                    match ws.next_frame(Duration::from_secs(10)).await {
                        Incoming::Frame(reply) => {
                            let is_error = matches!(reply.kind, Some(pb::server_frame::Kind::Error(_)));
                            if reply.id == 0 && !is_error {
                                continue;
                            }
                            if reply.id != want {
                                return Err(format!("{frame:?}: answered with id {} (want {want}): {reply:?}", reply.id));
                            }
                            break;
                        }
                        other => return Err(format!("{frame:?}: no answer: {other:?}")),
                    }
                }
            }
            // Still open and usable.
            let reply = ws.request(pb::client_frame::Kind::Ping(pb::Ping {})).await;
            if !matches!(reply.kind, Some(pb::server_frame::Kind::Pong(_))) {
                return Err(format!("no pong after the frames: {reply:?}"));
            }
            ws.close().await;
            Ok(())
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
