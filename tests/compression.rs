//! Compression in the Connect unary protocol, as a client sees it: gzip request
//! bodies (`Content-Encoding: gzip`, which connect-es sends for bodies of 1 KiB and
//! more when asked), the body limit applied to the decompressed size (a "gzip bomb"
//! is `resource_exhausted`), unsupported codings refused with `unimplemented` and
//! the supported ones named, and gzip replies for clients that accept them
//! (`Accept-Encoding`).

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use common::{rooms, Backend, Codec, TestServer, PASSWORD};
use prost::Message as _;
use roomcast::proto::v1 as pb;
use serde_json::{json, Value};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("a valid gzip reply");
    out
}

/// What came back from one raw request.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    content_encoding: Option<String>,
    accept_encoding: Option<String>,
    /// The body as it came over the wire (not decompressed).
    body: Vec<u8>,
}

impl Reply {
    /// The body, decompressed when the reply says it is gzip.
    fn decoded(&self) -> Vec<u8> {
        match self.content_encoding.as_deref() {
            Some("gzip") => gunzip(&self.body),
            None => self.body.clone(),
            Some(other) => panic!("unexpected Content-Encoding `{other}`"),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.decoded()).unwrap_or_else(|e| {
            panic!(
                "HTTP {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts a Connect error; answers its message.
    #[track_caller]
    fn expect_error(&self, status: u16, code: &str) -> String {
        let body = self.json();
        assert_eq!(
            (self.status, body["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
        assert!(
            self.content_type.starts_with("application/json"),
            "{self:?}"
        );
        body["message"].as_str().unwrap_or_default().to_owned()
    }
}

/// POSTs `body` to `/roomcast.v1.{method}` with the given headers. The client does
/// no compression of its own (reqwest is built without it), so what is sent and
/// received is exactly what the test says.
async fn post(
    server: &TestServer,
    method: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let mut request = server
        .http()
        .post(server.url(&format!("/roomcast.v1.{method}")))
        .header("connect-protocol-version", "1");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.body(body).send().await.expect("send the request");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Reply {
        status: response.status().as_u16(),
        content_type: header("content-type").unwrap_or_default(),
        content_encoding: header("content-encoding"),
        accept_encoding: header("accept-encoding"),
        body: response.bytes().await.expect("read the body").to_vec(),
    }
}

fn sign_up_body(codec: Codec, username: &str, display_name: &str) -> Vec<u8> {
    let request = pb::SignUpRequest {
        username: username.into(),
        password: PASSWORD.into(),
        display_name: display_name.into(),
    };
    match codec {
        Codec::Json => serde_json::to_vec(&request).expect("JSON"),
        Codec::Proto => request.encode_to_vec(),
    }
}

fn decode_sign_up(codec: Codec, bytes: &[u8]) -> pb::SignUpResponse {
    match codec {
        Codec::Json => serde_json::from_slice(bytes).expect("a JSON SignUpResponse"),
        Codec::Proto => pb::SignUpResponse::decode(bytes).expect("a binary SignUpResponse"),
    }
}

both_backends!(gzip_request_bodies_are_decompressed, |backend| async move {
    let server = TestServer::spawn(backend).await;
    for codec in Codec::ALL {
        let username = common::unique_name("gz");
        let display_name = "Gzip Tester";
        let plain = sign_up_body(codec, &username, display_name);
        let reply = post(
            &server,
            "AuthService/SignUp",
            None,
            &[
                ("content-type", codec.content_type()),
                ("content-encoding", "gzip"),
            ],
            gzip(&plain),
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{codec:?}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.content_type, codec.content_type());
        let user = decode_sign_up(codec, &reply.decoded())
            .user
            .expect("a user");
        assert_eq!(user.username, username);
        assert_eq!(user.display_name, display_name);
        // The account really exists: sign in with it, uncompressed.
        server.sign_in(&username, PASSWORD).await;
    }

    // `identity` is no compression, alone or next to gzip.
    let body = sign_up_body(Codec::Json, &common::unique_name("id"), "");
    let reply = post(
        &server,
        "AuthService/SignUp",
        None,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "identity"),
        ],
        body,
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );

    // A large gzip body, as connect-es sends it, in a room: SendMessage.
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room_id = rooms::create_room(&server, &owner, pb::RoomKind::Public).await;
    let text = "compressible text ".repeat(200);
    let request = pb::SendMessageRequest {
        room_id: room_id.clone(),
        text: text.clone(),
        client_message_id: "gz-1".into(),
        ..Default::default()
    };
    let reply = post(
        &server,
        "RoomService/SendMessage",
        Some(&owner.access_token),
        &[
            ("content-type", "application/proto"),
            ("content-encoding", "gzip"),
        ],
        gzip(&request.encode_to_vec()),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let history = rooms::history(&server, &owner, &room_id).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].text, text);
});

#[tokio::test]
async fn the_body_limit_applies_after_decompression() {
    const LIMIT: usize = 64 * 1024;
    let server =
        TestServer::spawn_with(Backend::Sqlite, |s| s.server.max_request_bytes = LIMIT).await;
    let account = server.sign_up("alice").await;
    let get_me = |content_type: &'static str, body: Vec<u8>| {
        let server = &server;
        let token = account.access_token.clone();
        async move {
            post(
                server,
                "UserService/GetMe",
                Some(&token),
                &[("content-type", content_type), ("content-encoding", "gzip")],
                body,
            )
            .await
        }
    };

    // A gzip bomb: 32 KiB on the wire that expand to 32 MiB. Refused once the
    // decompressed size passes the limit, without inflating the rest.
    let mut json = b"{\"padding\": \"".to_vec();
    json.resize(32 * 1024 * 1024, b'a');
    json.extend_from_slice(b"\"}");
    let bomb = gzip(&json);
    drop(json);
    assert!(
        bomb.len() < LIMIT,
        "the bomb fits the limit on the wire: {}",
        bomb.len()
    );
    let message = get_me("application/json", bomb)
        .await
        .expect_error(429, "resource_exhausted");
    assert!(
        message.contains(&LIMIT.to_string()) && message.contains("decompress"),
        "{message}"
    );

    // The same for a binary body: a 32 MiB field (unknown to GetMeRequest).
    let proto = pb::SignInRequest {
        username: "x".repeat(32 * 1024 * 1024),
        password: String::new(),
    }
    .encode_to_vec();
    let bomb = gzip(&proto);
    drop(proto);
    assert!(bomb.len() < LIMIT, "{}", bomb.len());
    let message = get_me("application/proto", bomb)
        .await
        .expect_error(429, "resource_exhausted");
    assert!(message.contains("decompress"), "{message}");

    // A compressed body larger than the limit on the wire is refused before it is
    // decompressed (incompressible bytes stay as large once gzipped).
    let noise: Vec<u8> = (0..LIMIT * 2).map(|_| rand::random::<u8>()).collect();
    let reply = get_me("application/proto", gzip(&noise)).await;
    let message = reply.expect_error(429, "resource_exhausted");
    assert!(message.contains(&LIMIT.to_string()), "{message}");

    // Just under the limit once decompressed: decoded (unknown fields are ignored)
    // and answered by the RPC.
    let fits = json!({"padding": "p".repeat(LIMIT - 100)});
    let reply = get_me("application/json", gzip(fits.to_string().as_bytes())).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["user"]["username"], "alice");
}

#[tokio::test]
async fn malformed_or_empty_gzip_bodies() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let account = server.sign_up("alice").await;
    // Not gzip at all.
    let reply = post(
        &server,
        "UserService/GetMe",
        Some(&account.access_token),
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        b"{}".to_vec(),
    )
    .await;
    let message = reply.expect_error(400, "invalid_argument");
    assert!(message.contains("gzip"), "{message}");
    // Truncated gzip.
    let whole = gzip(br#"{"username": "alice"}"#);
    let reply = post(
        &server,
        "UserService/GetMe",
        Some(&account.access_token),
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        whole[..whole.len() / 2].to_vec(),
    )
    .await;
    reply.expect_error(400, "invalid_argument");
    // An empty body is never decompressed: it is the empty message (protocol rule).
    for codec in Codec::ALL {
        let reply = post(
            &server,
            "UserService/GetMe",
            Some(&account.access_token),
            &[
                ("content-type", codec.content_type()),
                ("content-encoding", "gzip"),
            ],
            Vec::new(),
        )
        .await;
        assert_eq!(reply.status, 200, "{codec:?}: {reply:?}");
    }
}

#[tokio::test]
async fn unsupported_content_encodings_are_unimplemented() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let account = server.sign_up("alice").await;
    for coding in ["br", "zstd", "deflate", "compress", "gzip, br", "snappy"] {
        // The body is plain JSON: a server that ignored the header would answer 200.
        let reply = post(
            &server,
            "UserService/GetMe",
            Some(&account.access_token),
            &[
                ("content-type", "application/json"),
                ("content-encoding", coding),
            ],
            b"{}".to_vec(),
        )
        .await;
        let message = reply.expect_error(501, "unimplemented");
        assert!(
            message.contains("gzip") && message.contains("Content-Encoding"),
            "{coding}: the message names the supported encodings: {message}"
        );
        let accepted = reply.accept_encoding.clone().unwrap_or_default();
        assert!(
            accepted.contains("gzip"),
            "{coding}: Accept-Encoding names what the server reads: {reply:?}"
        );
    }
}

both_backends!(
    replies_are_gzipped_when_the_client_accepts_it,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let owner = server.sign_up(&common::unique_name("owner")).await;
        let room_id = rooms::create_room(&server, &owner, pb::RoomKind::Public).await;
        for i in 0..20 {
            rooms::send_http(
                &server,
                &owner,
                &room_id,
                &format!("message number {i}, long enough to make the history reply big"),
                &format!("c-{i}"),
            )
            .await;
        }
        let list = pb::ListMessagesRequest {
            room_id: room_id.clone(),
            limit: 50,
            ..Default::default()
        };
        for codec in Codec::ALL {
            let body = match codec {
                Codec::Json => serde_json::to_vec(&list).expect("JSON"),
                Codec::Proto => list.encode_to_vec(),
            };
            let decode = |bytes: &[u8]| -> pb::ListMessagesResponse {
                match codec {
                    Codec::Json => serde_json::from_slice(bytes).expect("JSON reply"),
                    Codec::Proto => pb::ListMessagesResponse::decode(bytes).expect("binary reply"),
                }
            };
            let call = |accept: Option<&'static str>, content_encoding: Option<&'static str>| {
                let mut headers = vec![("content-type", codec.content_type())];
                if let Some(accept) = accept {
                    headers.push(("accept-encoding", accept));
                }
                let body = match content_encoding {
                    Some(_) => gzip(&body),
                    None => body.clone(),
                };
                if let Some(coding) = content_encoding {
                    headers.push(("content-encoding", coding));
                }
                let server = &server;
                let token = owner.access_token.clone();
                async move {
                    post(
                        server,
                        "RoomService/ListMessages",
                        Some(&token),
                        &headers,
                        body,
                    )
                    .await
                }
            };

            // Accepted: the reply is gzip, and smaller on the wire.
            for accept in [
                "gzip",
                "br, gzip",
                "gzip;q=1.0, identity;q=0.5",
                "deflate, gzip, br, zstd",
                "*",
            ] {
                let reply = call(Some(accept), None).await;
                assert_eq!(reply.status, 200, "{accept}: {reply:?}");
                assert_eq!(reply.content_type, codec.content_type());
                assert_eq!(
                    reply.content_encoding.as_deref(),
                    Some("gzip"),
                    "{codec:?}, Accept-Encoding: {accept}"
                );
                let plain = reply.decoded();
                assert!(reply.body.len() < plain.len(), "compressed is smaller");
                let page = decode(&plain);
                assert_eq!(page.messages.len(), 20);
                assert_eq!(
                    page.messages[19].text,
                    "message number 19, long enough to make the history reply big"
                );
            }
            // Not accepted: plain.
            for accept in [
                None,
                Some("identity"),
                Some("br"),
                Some("gzip;q=0"),
                Some("identity, gzip"),
            ] {
                let reply = call(accept, None).await;
                assert_eq!(reply.status, 200, "{accept:?}: {reply:?}");
                assert_eq!(
                    reply.content_encoding, None,
                    "{codec:?}, Accept-Encoding: {accept:?}"
                );
                assert_eq!(decode(&reply.body).messages.len(), 20);
            }
            // A gzip request without Accept-Encoding accepts gzip (the protocol's rule).
            let reply = call(None, Some("gzip")).await;
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(reply.content_encoding.as_deref(), Some("gzip"));
            assert_eq!(decode(&reply.decoded()).messages.len(), 20);
        }

        // A small reply is not worth compressing.
        let reply = post(
            &server,
            "UserService/GetMe",
            Some(&owner.access_token),
            &[
                ("content-type", "application/json"),
                ("accept-encoding", "gzip"),
            ],
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.content_encoding, None, "{reply:?}");
        assert_eq!(reply.json()["user"]["id"], owner.user_id);
    }
);

/// The same over a raw HTTP/1.1 socket: exactly the bytes a minimal client sends.
#[tokio::test]
async fn a_raw_http_client_sends_gzip_and_reads_gzip() {
    // Every reply is compressed with a threshold of 0 (the SignUp reply is small).
    let server = TestServer::spawn_with(Backend::Sqlite, |s| s.server.compress_min_bytes = 0).await;
    let addr = server.addr;
    let body = gzip(
        &serde_json::to_vec(&json!({
            "username": "rawgzip",
            "password": PASSWORD,
            "displayName": "x".repeat(40),
        }))
        .expect("JSON"),
    );
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set a read timeout");
        let mut request = format!(
            "POST /roomcast.v1.AuthService/SignUp HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/json\r\nContent-Encoding: gzip\r\n\
             Accept-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        stream.write_all(&request).expect("write");
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        reply
    })
    .await
    .expect("the raw request");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let body = &raw[split + 4..];
    let reply: Value = serde_json::from_slice(&gunzip(body)).expect("gzip JSON");
    assert_eq!(reply["user"]["username"], "rawgzip");
}
