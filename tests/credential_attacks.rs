//! Credential attacks over HTTP, against SQLite and PostgreSQL: SignIn limits per
//! client address and per account (with backoff and a retry delay), password
//! strength at sign-up, sign-up limits per address, a flood of bogus SignIns that
//! must not starve real logins, and a weak configured admin password.
//!
//! Every limit is configured small here; the test config turns the per-address
//! limits off for the other test binaries (all their clients are 127.0.0.1).

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use base64::Engine as _;
use common::{expect_error, unique_name, Backend, Codec, RpcError, TestDatabase, TestServer};
use roomcast::proto::v1 as pb;
use serde_json::{json, Value};

async fn sign_in(
    server: &TestServer,
    username: &str,
    password: &str,
) -> Result<pb::SignInResponse, RpcError> {
    server
        .rpc()
        .call(
            Codec::Json,
            "AuthService/SignIn",
            &pb::SignInRequest {
                username: username.into(),
                password: password.into(),
            },
        )
        .await
}

async fn sign_up(
    server: &TestServer,
    username: &str,
    password: &str,
) -> Result<pb::SignUpResponse, RpcError> {
    server
        .rpc()
        .call(
            Codec::Proto,
            "AuthService/SignUp",
            &pb::SignUpRequest {
                username: username.into(),
                password: password.into(),
                display_name: String::new(),
            },
        )
        .await
}

/// A raw SignIn: the HTTP status, the `Retry-After` header and the JSON body.
async fn raw_sign_in(
    server: &TestServer,
    username: &str,
    password: &str,
) -> (u16, Option<String>, Value) {
    let response = server
        .http()
        .post(server.url("/roomcast.v1.AuthService/SignIn"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("POST SignIn");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.expect("a JSON body");
    (status, retry_after, body)
}

/// The seconds of the `google.rpc.RetryInfo` detail of a Connect error body.
fn retry_info_seconds(body: &Value) -> i64 {
    let detail = body["details"]
        .as_array()
        .and_then(|details| details.iter().find(|d| d["type"] == "google.rpc.RetryInfo"))
        .unwrap_or_else(|| panic!("no RetryInfo detail in {body}"));
    let value = detail["value"].as_str().expect("a base64 value");
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(value.trim_end_matches('='))
        .expect("base64");
    // RetryInfo { retry_delay (1): Duration { seconds (1) } }, decoded by hand.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        retry_delay: Option<pbjson_types::Duration>,
    }
    let info: RetryInfo = prost::Message::decode(bytes.as_slice()).expect("RetryInfo");
    info.retry_delay.expect("a delay").seconds
}

// ---------------------------------------------------------------------------
// Per-address SignIn limit
// ---------------------------------------------------------------------------

both_backends!(sign_in_is_limited_per_address, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| {
        s.auth.sign_in_ip_per_minute = 3;
        s.auth.sign_in_ip_burst = 3;
        s.auth.sign_in_free_failures = 0;
    })
    .await;
    let account = server.sign_up("victim").await;
    // Guessing: the first three attempts are answered, then the address waits.
    for guess in ["guess-one-1", "guess-two-2", "guess-three-3"] {
        expect_error(
            sign_in(&server, "victim", guess).await,
            "unauthenticated",
            401,
        );
    }
    let (status, retry_after, body) = raw_sign_in(&server, "victim", "guess-four-4").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "resource_exhausted", "{body}");
    let message = body["message"].as_str().expect("a message");
    assert!(
        message.contains("sign-in attempts from your address") && message.contains("retry in"),
        "{message}"
    );
    let retry_after: i64 = retry_after
        .expect("a Retry-After header")
        .parse()
        .expect("seconds");
    // Three a minute: the next one is about 20 s away.
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(retry_info_seconds(&body), retry_after);
    // The right password does not get through either while the address waits.
    expect_error(
        sign_in(&server, "victim", common::PASSWORD).await,
        "resource_exhausted",
        429,
    );
    // The account itself is fine: its tokens keep working.
    let _: pb::GetMeResponse = server
        .rpc_as(&account.access_token)
        .call(Codec::Json, "UserService/GetMe", &pb::GetMeRequest {})
        .await
        .expect("GetMe");
});

// ---------------------------------------------------------------------------
// Per-account backoff
// ---------------------------------------------------------------------------

both_backends!(failed_sign_ins_back_off_per_account, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| {
        s.auth.sign_in_free_failures = 3;
        // Long enough that the test never reaches its end.
        s.auth.sign_in_backoff_base_ms = 60_000;
        s.auth.sign_in_backoff_max_ms = 600_000;
    })
    .await;
    server.sign_up("target").await;
    server.sign_up("bystander").await;
    // Two failures, then a success: the count starts again.
    for _ in 0..2 {
        expect_error(
            sign_in(&server, "target", "wrong-guess-1").await,
            "unauthenticated",
            401,
        );
    }
    sign_in(&server, "target", common::PASSWORD)
        .await
        .expect("a success before the limit");
    for _ in 0..3 {
        expect_error(
            sign_in(&server, "TARGET", "wrong-guess-2").await,
            "unauthenticated",
            401,
        );
    }
    // The fourth attempt in a row waits, whatever the password.
    let message = expect_error(
        sign_in(&server, "target", common::PASSWORD).await,
        "resource_exhausted",
        429,
    );
    assert!(
        message.contains("failed sign-ins for this account") && message.contains("retry in 60 s"),
        "{message}"
    );
    // Other accounts are not affected; unknown usernames are limited alike, so the
    // limit does not tell which usernames exist.
    sign_in(&server, "bystander", common::PASSWORD)
        .await
        .expect("another account");
    for _ in 0..3 {
        expect_error(
            sign_in(&server, "nobody-here", "wrong-guess-3").await,
            "unauthenticated",
            401,
        );
    }
    expect_error(
        sign_in(&server, "nobody-here", "wrong-guess-4").await,
        "resource_exhausted",
        429,
    );
});

// ---------------------------------------------------------------------------
// Password strength and sign-up limits
// ---------------------------------------------------------------------------

both_backends!(
    weak_passwords_are_refused_at_sign_up,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        for (i, weak) in [
            "12345678",
            "password",
            "        ",
            "qwertyuiop",
            "Password123!",
            "aaaaaaaaaa",
            "abcdefgh",
            "weakling2024",
        ]
        .into_iter()
        .enumerate()
        {
            let username = if weak == "weakling2024" {
                "weakling".to_owned()
            } else {
                format!("weak{i}")
            };
            let message = expect_error(
                sign_up(&server, &username, weak).await,
                "invalid_argument",
                400,
            );
            assert!(
                message.starts_with("password is too easy to guess"),
                "{weak:?}: {message}"
            );
        }
        sign_up(&server, "strong", "tulip-gravel-orbit")
            .await
            .expect("a strong password");
    }
);

both_backends!(sign_up_is_limited_per_address, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| {
        s.auth.sign_up_ip_per_hour = 2;
        s.auth.sign_up_ip_burst = 2;
    })
    .await;
    // Refused input does not use the allowance.
    for _ in 0..3 {
        expect_error(
            sign_up(&server, "first", "12345678").await,
            "invalid_argument",
            400,
        );
    }
    for name in ["first", "second"] {
        sign_up(&server, name, common::PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("sign up {name}: {e}"));
    }
    let message = expect_error(
        sign_up(&server, "third", common::PASSWORD).await,
        "resource_exhausted",
        429,
    );
    assert!(
        message.contains("accounts created from your address") && message.contains("retry in"),
        "{message}"
    );
    // Signing in is a different limit.
    sign_in(&server, "first", common::PASSWORD)
        .await
        .expect("sign in");
});

// ---------------------------------------------------------------------------
// Password-hashing flood
// ---------------------------------------------------------------------------

/// Bogus SignIns sent at once; each asks the server to verify a password.
const FLOOD: usize = 400;

// A flood of concurrent bogus SignIns whose callers give up (their deadline is
// 100 ms) must not queue hours of hashing: the queue is bounded (the overflow is
// refused at once with `unavailable`), jobs of callers that went away are
// skipped, and a real login right after the flood succeeds within its own short
// deadline. Before the fix every flood job was hashed, one after the other, and
// the real login waited behind all of them.
both_backends!(
    a_sign_in_flood_does_not_starve_real_logins,
    |backend| async move {
        let server = TestServer::spawn_with(backend, |s| {
            // One hashing thread and a hash that costs a few milliseconds, so the
            // flood is FLOOD × that much work if the queue keeps it.
            s.auth.hasher_threads = 1;
            s.auth.argon2_memory_kib = 16 * 1024;
            s.auth.argon2_iterations = 2;
            s.auth.hasher_max_pending = 8;
            s.auth.sign_in_free_failures = 0;
        })
        .await;
        let username = unique_name("real");
        server.sign_up(&username).await;
        let http = server.http().clone();
        let url = server.url("/roomcast.v1.AuthService/SignIn");
        let flood = (0..FLOOD).map(|i| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let response = http
                    .post(&url)
                    .header("connect-timeout-ms", "100")
                    .json(&json!({"username": format!("bogus{i}"), "password": "not-a-password"}))
                    .send()
                    .await
                    .expect("POST SignIn");
                let status = response.status().as_u16();
                let body: Value = response.json().await.expect("a JSON body");
                (status, body["code"].as_str().unwrap_or_default().to_owned())
            }
        });
        let answers = futures_util::future::join_all(flood).await;
        let mut unavailable = 0;
        for (status, code) in &answers {
            match code.as_str() {
                "unauthenticated" | "deadline_exceeded" => {}
                "unavailable" => {
                    assert_eq!(*status, 503);
                    unavailable += 1;
                }
                other => panic!("a flood SignIn answered {status} {other}"),
            }
        }
        assert!(
            unavailable > 0,
            "the hashing queue never refused: {answers:?}"
        );
        // The real user signs in, with a deadline far below what the flood's work
        // would take when queued (FLOOD hashes on one thread).
        let response = http
            .post(&url)
            .header("connect-timeout-ms", "5000")
            .json(&json!({"username": username, "password": common::PASSWORD}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("the real SignIn is answered");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(status, 200, "the real login failed after the flood: {body}");
        assert!(body["tokens"]["accessToken"].is_string(), "{body}");
        // The queue drained: nothing of the flood is still waiting or running.
        assert!(
            common::eventually(Duration::from_secs(5), || async {
                server.state().auth.hasher_pending() == 0
            })
            .await,
            "hashing jobs of the flood are still queued"
        );
    }
);

// ---------------------------------------------------------------------------
// The configured admin's password
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_weak_configured_admin_password_names_the_setting() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let cwd = tempfile::tempdir().expect("a temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .current_dir(cwd.path())
        .arg("serve")
        .env_remove("ROOMCAST_CONFIG")
        .env("ROOMCAST_SERVER__LISTEN", "127.0.0.1:0")
        .env("ROOMCAST_STORE__URL", &database.url)
        .env("ROOMCAST_AUTH__ADMIN_USERNAME", "root")
        .env("ROOMCAST_AUTH__ADMIN_PASSWORD", "password1")
        .env("ROOMCAST_AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("ROOMCAST_AUTH__ARGON2_ITERATIONS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run roomcast serve");
    assert!(
        !output.status.success(),
        "serve started with a weak admin password"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("auth.admin_password") && stderr.contains("too easy to guess"),
        "{stderr}"
    );
}
