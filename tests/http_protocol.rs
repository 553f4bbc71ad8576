//! The Connect unary protocol as any client sees it, independent of what each RPC
//! does: codecs, content types, malformed bodies, the body limit, deadlines, HTTP
//! methods, unknown routes, CORS, health checks and request ids.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use common::{expect_error, Backend, Codec, TestServer, PASSWORD};
use prost::Message as _;
use roomcast::proto::v1 as pb;
use serde_json::{json, Value};

/// Asserts a Connect error reply: status, code, and a message containing `needle`.
#[track_caller]
fn assert_error(reply: &(u16, Value), status: u16, code: &str, needle: &str) {
    let (got_status, body) = reply;
    assert_eq!(*got_status, status, "status of {body}");
    assert_eq!(body["code"], code, "code of {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "message `{message}` should mention `{needle}`"
    );
}

both_backends!(json_and_proto_bodies_round_trip, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let rpc = server.rpc();
    // snake_case and camelCase field names are both accepted on input.
    let (status, body) = rpc
        .call_json(
            "AuthService/SignUp",
            json!({"username": "Snake", "password": PASSWORD, "display_name": "Snake Case"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["displayName"], "Snake Case");
    assert_eq!(body["user"]["username"], "snake");
    assert_eq!(body["user"]["role"], "ROLE_MEMBER");
    let created_at = body["user"]["createdAt"].as_str().unwrap_or_default();
    assert!(created_at.ends_with('Z'), "{body}");
    assert!(body["tokens"]["accessToken"].is_string());
    assert!(body["tokens"]["accessExpiresAt"].is_string());
    let (status, body) = rpc
        .call_json(
            "AuthService/SignUp",
            json!({"username": "camel", "password": PASSWORD, "displayName": "Camel Case"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["displayName"], "Camel Case");

    // Binary protobuf in, binary protobuf out.
    let request = pb::SignInRequest {
        username: "camel".into(),
        password: PASSWORD.into(),
    };
    let (status, content_type, bytes) = rpc
        .call_raw(
            "AuthService/SignIn",
            "application/proto",
            request.encode_to_vec(),
        )
        .await;
    assert_eq!((status, content_type.as_str()), (200, "application/proto"));
    let reply = pb::SignInResponse::decode(bytes.as_slice()).expect("a SignInResponse");
    assert_eq!(reply.user.expect("user").display_name, "Camel Case");

    // Unknown JSON fields are ignored, as proto3 JSON parsers do by default.
    let (status, body) = rpc
        .call_json(
            "AuthService/SignIn",
            json!({"username": "camel", "password": PASSWORD, "futureField": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
});

#[tokio::test]
async fn content_type_parameters_and_aliases_are_accepted() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let account = server.sign_up("alice").await;
    let rpc = server.rpc_as(&account.access_token);
    let (status, content_type, body) = rpc
        .call_raw("UserService/GetMe", "application/json; charset=utf-8", "{}")
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, "application/json");
    // An empty JSON body is the empty message.
    let (status, _, _) = rpc
        .call_raw("UserService/GetMe", "application/json", "")
        .await;
    assert_eq!(status, 200);
    // An empty protobuf body is the empty message too.
    let (status, content_type, _) = rpc
        .call_raw("UserService/GetMe", "application/proto", Vec::new())
        .await;
    assert_eq!((status, content_type.as_str()), (200, "application/proto"));
}

#[tokio::test]
async fn malformed_bodies_are_invalid_argument_with_the_problem_named() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let rpc = server.rpc();

    let (status, _, body) = rpc
        .call_raw("AuthService/SignIn", "application/json", "{\"username\": ")
        .await;
    let error = common::connect_error(status, "application/json", &body);
    let message = error.expect("invalid_argument", 400);
    assert!(message.contains("malformed JSON"), "{message}");

    let (status, _, body) = rpc
        .call_raw("AuthService/SignIn", "application/json", "[1, 2]")
        .await;
    common::connect_error(status, "application/json", &body).expect("invalid_argument", 400);

    // A field of the wrong type names the field's expected type.
    let reply = rpc
        .call_json(
            "AuthService/SignUp",
            json!({"username": 5, "password": PASSWORD}),
        )
        .await;
    assert_error(&reply, 400, "invalid_argument", "malformed JSON");
    assert!(
        reply.1["message"]
            .as_str()
            .unwrap_or_default()
            .contains("string"),
        "{}",
        reply.1
    );
    let reply = rpc
        .call_json("AuthService/SignOut", json!({"allSessions": "yes"}))
        .await;
    assert_error(&reply, 400, "invalid_argument", "malformed JSON");
    let reply = rpc
        .call_json("UserService/BatchGetUsers", json!({"ids": "u_1"}))
        .await;
    // Bodies are decoded before credentials are checked.
    assert_error(&reply, 400, "invalid_argument", "malformed JSON");

    // Bytes that are not a protobuf message of this type.
    let (status, content_type, body) = rpc
        .call_raw(
            "AuthService/SignIn",
            "application/proto",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        )
        .await;
    let message = common::connect_error(status, &content_type, &body)
        .expect("invalid_argument", 400)
        .to_owned();
    assert!(message.contains("malformed protobuf"), "{message}");
}

#[tokio::test]
async fn unsupported_or_missing_content_type_is_415() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    for content_type in ["text/plain", "application/xml", "application/grpc"] {
        let (status, reply_type, body) = server
            .rpc()
            .call_raw("AuthService/SignIn", content_type, "{}")
            .await;
        assert_eq!(status, 415, "{content_type}");
        let error = common::connect_error(status, &reply_type, &body);
        assert!(
            error.message.contains(content_type) && error.message.contains("application/json"),
            "{error}"
        );
    }
    let response = server
        .http()
        .post(server.url("/roomcast.v1.AuthService/SignIn"))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 415);
    let (_, body) = common::json_reply(response).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("none"),
        "{body}"
    );
}

#[tokio::test]
async fn unknown_rpcs_are_unimplemented_404() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    for path in [
        "/roomcast.v1.AuthService/NoSuchMethod",
        "/roomcast.v1.NoSuchService/SignIn",
        "/nothing/here",
    ] {
        let reply = server.rpc().call_json(path, json!({})).await;
        assert_error(&reply, 404, "unimplemented", path);
    }
}

#[tokio::test]
async fn rpcs_need_post() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let response = server
            .http()
            .request(
                method.clone(),
                server.url("/roomcast.v1.AuthService/SignIn"),
            )
            .send()
            .await
            .expect("send");
        let reply = common::json_reply(response).await;
        assert_error(&reply, 405, "unimplemented", "POST");
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_a_clear_error() {
    let server =
        TestServer::spawn_with(Backend::Sqlite, |s| s.server.max_request_bytes = 1024).await;
    let rpc = server.rpc();
    let big = json!({"username": "alice", "password": "x".repeat(4096)});
    let reply = rpc.call_json("AuthService/SignIn", big).await;
    assert_error(&reply, 429, "resource_exhausted", "1024 bytes");

    // The same in protobuf.
    let request = pb::SignInRequest {
        username: "alice".into(),
        password: "x".repeat(4096),
    };
    let result: Result<pb::SignInResponse, _> =
        rpc.call_proto("AuthService/SignIn", &request).await;
    let message = expect_error(result, "resource_exhausted", 429);
    assert!(message.contains("exceeds the limit"), "{message}");

    // A body just under the limit is served.
    let fits = json!({"username": "alice", "password": "y".repeat(900)});
    let reply = rpc.call_json("AuthService/SignIn", fits).await;
    assert_error(&reply, 401, "unauthenticated", "wrong username or password");

    // A chunked body (no Content-Length) is cut off at the limit too, and answered.
    let addr = server.addr;
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        let chunk = "z".repeat(2000);
        let request = format!(
            "POST /roomcast.v1.AuthService/SignIn HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             {:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len(),
            chunk.len()
        );
        stream.write_all(request.as_bytes()).expect("write");
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    })
    .await
    .expect("raw request");
    assert!(raw.starts_with("HTTP/1.1 429"), "{raw}");
    assert!(raw.contains("resource_exhausted"), "{raw}");
}

#[tokio::test]
async fn connect_timeout_header_is_validated_and_honoured() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let account = server.sign_up("alice").await;
    let send = |timeout: &'static str| {
        server
            .http()
            .post(server.url("/roomcast.v1.UserService/GetMe"))
            .header("content-type", "application/json")
            .header("connect-timeout-ms", timeout)
            .bearer_auth(&account.access_token)
            .body("{}")
            .send()
    };
    for bad in ["soon", "-5", "12345678901", "1.5", ""] {
        let reply = common::json_reply(send(bad).await.expect("send")).await;
        assert_error(&reply, 400, "invalid_argument", "Connect-Timeout-Ms");
    }
    let (status, body) = common::json_reply(send("5000").await.expect("send")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["username"], "alice");
}

#[tokio::test]
async fn a_passed_deadline_is_deadline_exceeded() {
    // Expensive password hashing makes SignUp take far longer than 1 ms.
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.auth.argon2_memory_kib = 64 * 1024;
        s.auth.argon2_iterations = 4;
    })
    .await;
    let started = std::time::Instant::now();
    let response = server
        .http()
        .post(server.url("/roomcast.v1.AuthService/SignUp"))
        .header("content-type", "application/json")
        .header("connect-timeout-ms", "1")
        .body(json!({"username": "slow", "password": PASSWORD}).to_string())
        .send()
        .await
        .expect("send");
    let reply = common::json_reply(response).await;
    assert_error(&reply, 504, "deadline_exceeded", "deadline");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline was not enforced promptly: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_zero_connect_timeout_is_a_deadline_already_passed() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let account = server.sign_up("alice").await;
    // Even the quickest RPC is not served: its deadline passed before it started.
    for codec in Codec::ALL {
        let body = match codec {
            Codec::Json => b"{}".to_vec(),
            Codec::Proto => Vec::new(),
        };
        let response = server
            .http()
            .post(server.url("/roomcast.v1.UserService/GetMe"))
            .header("content-type", codec.content_type())
            .header("connect-timeout-ms", "0")
            .bearer_auth(&account.access_token)
            .body(body)
            .send()
            .await
            .expect("send");
        let reply = common::json_reply(response).await;
        assert_error(&reply, 504, "deadline_exceeded", "deadline");
    }
    // And it has no effect: the account a zero-deadline SignUp asked for does not exist.
    let response = server
        .http()
        .post(server.url("/roomcast.v1.AuthService/SignUp"))
        .header("content-type", "application/json")
        .header("connect-timeout-ms", "0")
        .body(json!({"username": "zero", "password": PASSWORD}).to_string())
        .send()
        .await
        .expect("send");
    let reply = common::json_reply(response).await;
    assert_error(&reply, 504, "deadline_exceeded", "deadline");
    let reply = server
        .rpc()
        .call_json(
            "AuthService/SignIn",
            json!({"username": "zero", "password": PASSWORD}),
        )
        .await;
    assert_error(&reply, 401, "unauthenticated", "wrong username or password");
    // "00" is zero too; "1" is a real (short) deadline and still validated as before.
    let response = server
        .http()
        .post(server.url("/roomcast.v1.UserService/GetMe"))
        .header("content-type", "application/json")
        .header("connect-timeout-ms", "00")
        .bearer_auth(&account.access_token)
        .body("{}")
        .send()
        .await
        .expect("send");
    let reply = common::json_reply(response).await;
    assert_error(&reply, 504, "deadline_exceeded", "deadline");
}

#[tokio::test]
async fn errors_in_binary_calls_are_connect_json() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let (status, content_type, body) = server
        .rpc()
        .call_raw(
            "UserService/GetMe",
            "application/proto",
            pb::GetMeRequest {}.encode_to_vec(),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(content_type, "application/json");
    let error = common::connect_error(status, &content_type, &body);
    assert!(error.message.contains("Authorization"), "{error}");
}

#[tokio::test]
async fn bad_authorization_headers_are_unauthenticated() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "token abc"] {
        let response = server
            .http()
            .post(server.url("/roomcast.v1.UserService/GetMe"))
            .header("content-type", "application/json")
            .header("authorization", header)
            .body("{}")
            .send()
            .await
            .expect("send");
        let reply = common::json_reply(response).await;
        assert_error(&reply, 401, "unauthenticated", "Bearer");
    }
}

#[tokio::test]
async fn cors_preflight_and_responses_follow_the_configuration() {
    let origin = "https://chat.example.com";
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.cors.allowed_origins = vec![origin.into()];
        s.cors.max_age_secs = 600;
    })
    .await;
    let preflight = server
        .http()
        .request(
            reqwest::Method::OPTIONS,
            server.url("/roomcast.v1.AuthService/SignIn"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,connect-protocol-version,connect-timeout-ms,authorization",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], origin);
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .expect("ascii");
    assert!(methods.contains("POST"), "{methods}");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    for h in [
        "content-type",
        "connect-protocol-version",
        "connect-timeout-ms",
        "authorization",
    ] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }
    assert_eq!(headers["access-control-max-age"], "600");

    // The actual request gets the allow-origin header too.
    let response = server
        .http()
        .post(server.url("/roomcast.v1.AuthService/SignIn"))
        .header("origin", origin)
        .header("content-type", "application/json")
        .body(json!({"username": "nobody", "password": PASSWORD}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["access-control-allow-origin"], origin);

    // Another origin is not allowed: no allow-origin header for it.
    let preflight = server
        .http()
        .request(
            reqwest::Method::OPTIONS,
            server.url("/roomcast.v1.AuthService/SignIn"),
        )
        .header("origin", "https://evil.example.net")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "{:?}",
        preflight.headers()
    );
}

#[tokio::test]
async fn without_cors_configuration_no_origin_is_allowed() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let response = server
        .http()
        .post(server.url("/roomcast.v1.AuthService/SignIn"))
        .header("origin", "https://chat.example.com")
        .header("content-type", "application/json")
        .body(json!({"username": "nobody", "password": PASSWORD}).to_string())
        .send()
        .await
        .expect("send");
    // Non-browser clients still work; browsers are refused by the missing header.
    assert_eq!(response.status().as_u16(), 401);
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

both_backends!(health_checks_answer, |backend| async move {
    let server = TestServer::spawn(backend).await;
    for (path, text) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let response = server
            .http()
            .get(server.url(path))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(response.text().await.expect("body").trim(), text);
    }
});

#[tokio::test]
async fn readyz_reports_an_unreachable_store() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    server.state().store.close().await;
    let response = server
        .http()
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 503);
    let response = server
        .http()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let response = server
        .http()
        .get(server.url("/healthz"))
        .header("x-request-id", "trace-123")
        .send()
        .await
        .expect("send");
    assert_eq!(response.headers()["x-request-id"], "trace-123");
    let response = server
        .http()
        .get(server.url("/healthz"))
        .header("x-request-id", "has spaces in it")
        .send()
        .await
        .expect("send");
    let generated = response.headers()["x-request-id"].to_str().expect("ascii");
    assert!(
        generated.len() >= 16 && !generated.contains(' '),
        "{generated}"
    );
}

#[tokio::test]
async fn every_routed_rpc_answers_in_both_codecs() {
    // Without credentials every RPC still answers with a Connect error or a
    // success, never a panic, a hang or a non-Connect body.
    let server = TestServer::spawn(Backend::Sqlite).await;
    for (service, methods) in [
        (pb::auth_service::NAME, pb::auth_service::UNARY_METHODS),
        (pb::user_service::NAME, pb::user_service::UNARY_METHODS),
        (pb::room_service::NAME, pb::room_service::UNARY_METHODS),
        (
            pb::realtime_service::NAME,
            pb::realtime_service::UNARY_METHODS,
        ),
    ] {
        for method in methods {
            let path = format!("/{service}/{method}");
            for codec in Codec::ALL {
                let (status, content_type, body) = server
                    .rpc()
                    .call_raw(&path, codec.content_type(), Vec::new())
                    .await;
                if status == 200 {
                    assert_eq!(content_type, codec.content_type(), "{path}");
                } else {
                    let error = common::connect_error(status, &content_type, &body);
                    assert!(
                        matches!(status, 400 | 401),
                        "{path} ({codec:?}) with an empty body: {error}"
                    );
                }
            }
        }
    }
}
