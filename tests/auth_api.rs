//! AuthService over HTTP, in both codecs, against SQLite and PostgreSQL: accounts,
//! token pairs and their rotation, revocation, expiry and forgery, tokens signed by
//! an external application, API keys and the admin-only RPCs.

mod common;

use std::time::Duration;

use common::{
    expect_error, jwt_claims, now_secs, sign_roomcast_token, Account, Backend, Codec, Rpc,
    TestServer, PASSWORD, TEST_TOKEN_SECRET,
};
use roomcast::proto::v1 as pb;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Typed calls in either codec
// ---------------------------------------------------------------------------

async fn sign_up(
    rpc: &Rpc,
    codec: Codec,
    username: &str,
    password: &str,
    display_name: &str,
) -> Result<pb::SignUpResponse, common::RpcError> {
    rpc.call(
        codec,
        "AuthService/SignUp",
        &pb::SignUpRequest {
            username: username.into(),
            password: password.into(),
            display_name: display_name.into(),
        },
    )
    .await
}

async fn sign_in(
    rpc: &Rpc,
    codec: Codec,
    username: &str,
    password: &str,
) -> Result<pb::SignInResponse, common::RpcError> {
    rpc.call(
        codec,
        "AuthService/SignIn",
        &pb::SignInRequest {
            username: username.into(),
            password: password.into(),
        },
    )
    .await
}

async fn refresh(
    rpc: &Rpc,
    codec: Codec,
    refresh_token: &str,
) -> Result<pb::RefreshResponse, common::RpcError> {
    rpc.call(
        codec,
        "AuthService/Refresh",
        &pb::RefreshRequest {
            refresh_token: refresh_token.into(),
        },
    )
    .await
}

async fn sign_out(
    server: &TestServer,
    codec: Codec,
    token: &str,
    all_sessions: bool,
) -> Result<pb::SignOutResponse, common::RpcError> {
    server
        .rpc_as(token)
        .call(
            codec,
            "AuthService/SignOut",
            &pb::SignOutRequest { all_sessions },
        )
        .await
}

async fn get_me(
    server: &TestServer,
    codec: Codec,
    token: &str,
) -> Result<pb::User, common::RpcError> {
    let reply: pb::GetMeResponse = server
        .rpc_as(token)
        .call(codec, "UserService/GetMe", &pb::GetMeRequest {})
        .await?;
    Ok(reply.user.expect("GetMe answers a user"))
}

async fn create_api_key(
    server: &TestServer,
    codec: Codec,
    token: &str,
    name: &str,
) -> Result<pb::CreateApiKeyResponse, common::RpcError> {
    server
        .rpc_as(token)
        .call(
            codec,
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest { name: name.into() },
        )
        .await
}

async fn list_api_keys(
    server: &TestServer,
    codec: Codec,
    token: &str,
    include_revoked: bool,
) -> Result<Vec<pb::ApiKey>, common::RpcError> {
    let reply: pb::ListApiKeysResponse = server
        .rpc_as(token)
        .call(
            codec,
            "AuthService/ListApiKeys",
            &pb::ListApiKeysRequest { include_revoked },
        )
        .await?;
    Ok(reply.keys)
}

async fn revoke_api_key(
    server: &TestServer,
    codec: Codec,
    token: &str,
    id: &str,
) -> Result<pb::RevokeApiKeyResponse, common::RpcError> {
    server
        .rpc_as(token)
        .call(
            codec,
            "AuthService/RevokeApiKey",
            &pb::RevokeApiKeyRequest { id: id.into() },
        )
        .await
}

/// A name per codec so one server can serve both loops.
fn name_for(prefix: &str, codec: Codec) -> String {
    format!(
        "{prefix}-{}",
        if codec == Codec::Json {
            "json"
        } else {
            "proto"
        }
    )
}

// ---------------------------------------------------------------------------
// Accounts and token pairs
// ---------------------------------------------------------------------------

both_backends!(sign_up_sign_in_refresh_and_sign_out, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let rpc = server.rpc();
    for codec in Codec::ALL {
        let username = name_for("Alice", codec);
        let before = now_secs();
        let signed_up = sign_up(&rpc, codec, &username, PASSWORD, "  Alice A.  ")
            .await
            .unwrap_or_else(|e| panic!("{codec:?} sign up: {e}"));
        let user = signed_up.user.expect("user");
        assert!(user.id.starts_with("u_"), "{user:?}");
        assert_eq!(user.username, username.to_lowercase());
        assert_eq!(user.display_name, "Alice A.");
        assert_eq!(user.role, pb::Role::Member as i32);
        assert!(!user.external);
        let created = user.created_at.expect("created_at").seconds;
        assert!((before - 1..=now_secs() + 1).contains(&created));
        let tokens = signed_up.tokens.expect("tokens");
        let access_expires = tokens.access_expires_at.expect("access expiry").seconds;
        let refresh_expires = tokens.refresh_expires_at.expect("refresh expiry").seconds;
        let ttl = server.settings.auth.access_token_ttl_secs as i64;
        assert!(
            (access_expires - before - ttl).abs() <= 2,
            "{access_expires}"
        );
        assert!(refresh_expires > access_expires);
        assert!(tokens.refresh_token.starts_with("rt_"));

        // The access token works.
        let me = get_me(&server, codec, &tokens.access_token)
            .await
            .expect("GetMe");
        assert_eq!(me.id, user.id);

        // Sign-in is case-insensitive on the username and opens another session.
        let signed_in = sign_in(&rpc, codec, &username.to_uppercase(), PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("{codec:?} sign in: {e}"));
        assert_eq!(signed_in.user.expect("user").id, user.id);
        let session2 = signed_in.tokens.expect("tokens");
        assert_ne!(session2.refresh_token, tokens.refresh_token);

        // Refresh rotates the refresh token; the session's expiry slides to a
        // full refresh lifetime from now ("expires if unused").
        let refreshed = refresh(&rpc, codec, &tokens.refresh_token)
            .await
            .unwrap_or_else(|e| panic!("{codec:?} refresh: {e}"))
            .tokens
            .expect("tokens");
        assert_ne!(refreshed.refresh_token, tokens.refresh_token);
        let slid = refreshed.refresh_expires_at.expect("expiry").seconds;
        let refresh_ttl = server.settings.auth.refresh_token_ttl_secs as i64;
        assert!(slid >= refresh_expires, "{slid} < {refresh_expires}");
        assert!(
            (slid - now_secs() - refresh_ttl).abs() <= 2,
            "refresh expiry {slid} is not a full lifetime from now"
        );
        let me = get_me(&server, codec, &refreshed.access_token)
            .await
            .expect("GetMe with the refreshed token");
        assert_eq!(me.id, user.id);

        // Signing out ends this session only.
        let out = sign_out(&server, codec, &refreshed.access_token, false)
            .await
            .expect("SignOut");
        assert_eq!(out.sessions_ended, 1);
        for token in [&refreshed.access_token, &tokens.access_token] {
            let message = expect_error(get_me(&server, codec, token).await, "unauthenticated", 401);
            assert!(message.contains("signed out"), "{message}");
        }
        let message = expect_error(
            refresh(&rpc, codec, &refreshed.refresh_token).await,
            "unauthenticated",
            401,
        );
        assert!(message.contains("refresh token"), "{message}");
        // Signing out twice is refused: the token no longer authenticates.
        expect_error(
            sign_out(&server, codec, &refreshed.access_token, false).await,
            "unauthenticated",
            401,
        );
        // The other session is untouched.
        get_me(&server, codec, &session2.access_token)
            .await
            .expect("the second session still works");
    }
});

both_backends!(
    sign_out_all_sessions_ends_every_session,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        for codec in Codec::ALL {
            let username = name_for("multi", codec);
            let first = server.sign_up(&username).await;
            let second = server.sign_in(&username, PASSWORD).await;
            let third = server.sign_in(&username, PASSWORD).await;
            let other = server.sign_up(&name_for("bystander", codec)).await;
            let out = sign_out(&server, codec, &second.access_token, true)
                .await
                .expect("SignOut all");
            assert_eq!(out.sessions_ended, 3);
            for account in [&first, &second, &third] {
                expect_error(
                    get_me(&server, codec, &account.access_token).await,
                    "unauthenticated",
                    401,
                );
                expect_error(
                    refresh(&server.rpc(), codec, &account.refresh_token).await,
                    "unauthenticated",
                    401,
                );
            }
            get_me(&server, codec, &other.access_token)
                .await
                .expect("another user's session is untouched");
        }
    }
);

both_backends!(sign_up_is_validated, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let rpc = server.rpc();
    for codec in Codec::ALL {
        let cases: [(&str, &str, &str, &str); 9] = [
            ("", PASSWORD, "", "username is required"),
            ("   ", PASSWORD, "", "username is required"),
            ("ab", PASSWORD, "", "at least 3"),
            (&"a".repeat(33), PASSWORD, "", "at most 32"),
            ("bad name", PASSWORD, "", "may only contain"),
            ("ünïcode", PASSWORD, "", "may only contain"),
            ("good-name", "", "", "password is required"),
            ("good-name", "short", "", "password must be at least 8"),
            (
                "good-name",
                PASSWORD,
                &"d".repeat(65),
                "display_name must be at most 64",
            ),
        ];
        for (username, password, display_name, needle) in cases {
            let message = expect_error(
                sign_up(&rpc, codec, username, password, display_name).await,
                "invalid_argument",
                400,
            );
            assert!(
                message.contains(needle),
                "{codec:?} sign up ({username:?}, {password:?}): `{message}` should mention `{needle}`"
            );
        }
        let message = expect_error(
            sign_up(&rpc, codec, "good-name", &"p".repeat(257), "").await,
            "invalid_argument",
            400,
        );
        assert!(message.contains("at most 256"), "{message}");

        // Usernames are unique regardless of case.
        let username = name_for("taken", codec);
        sign_up(&rpc, codec, &username, PASSWORD, "")
            .await
            .expect("first");
        let message = expect_error(
            sign_up(&rpc, codec, &username.to_uppercase(), PASSWORD, "").await,
            "already_exists",
            409,
        );
        assert!(message.contains(&username), "{message}");
    }
    // Nothing was created by the refused attempts.
    let found: Result<pb::SignInResponse, _> =
        sign_in(&rpc, Codec::Json, "good-name", PASSWORD).await;
    expect_error(found, "unauthenticated", 401);
});

both_backends!(wrong_credentials_are_refused_alike, |backend| async move {
    let server = TestServer::spawn(backend).await;
    server.sign_up("carol").await;
    let rpc = server.rpc();
    for codec in Codec::ALL {
        let wrong_password = expect_error(
            sign_in(&rpc, codec, "carol", "not the password").await,
            "unauthenticated",
            401,
        );
        let unknown_user = expect_error(
            sign_in(&rpc, codec, "nobody", PASSWORD).await,
            "unauthenticated",
            401,
        );
        let malformed_user = expect_error(
            sign_in(&rpc, codec, "no such user!", PASSWORD).await,
            "unauthenticated",
            401,
        );
        // One message for all three, so usernames cannot be probed.
        assert_eq!(wrong_password, unknown_user);
        assert_eq!(wrong_password, malformed_user);
        assert!(wrong_password.contains("wrong username or password"));
        let message = expect_error(
            sign_in(&rpc, codec, "carol", "").await,
            "invalid_argument",
            400,
        );
        assert!(message.contains("password is required"), "{message}");
        let message = expect_error(
            sign_in(&rpc, codec, "", PASSWORD).await,
            "invalid_argument",
            400,
        );
        assert!(message.contains("username is required"), "{message}");
    }
});

#[tokio::test]
async fn sign_up_can_be_disabled_and_its_role_configured() {
    let closed = TestServer::spawn_with(Backend::Sqlite, |s| s.auth.allow_sign_up = false).await;
    for codec in Codec::ALL {
        let message = expect_error(
            sign_up(&closed.rpc(), codec, "dave", PASSWORD, "").await,
            "permission_denied",
            403,
        );
        assert!(message.contains("sign-up is disabled"), "{message}");
    }
    let guests =
        TestServer::spawn_with(Backend::Sqlite, |s| s.auth.sign_up_role = "guest".into()).await;
    let account = guests.sign_up("erin").await;
    assert_eq!(account.user.role, pb::Role::Guest as i32);
}

// ---------------------------------------------------------------------------
// Refresh-token reuse
// ---------------------------------------------------------------------------

both_backends!(
    refresh_token_reuse_revokes_the_chain,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let rpc = server.rpc();
        for codec in Codec::ALL {
            let account = server.sign_up(&name_for("frank", codec)).await;
            let r1 = refresh(&rpc, codec, &account.refresh_token)
                .await
                .expect("first refresh")
                .tokens
                .expect("tokens");
            let r2 = refresh(&rpc, codec, &r1.refresh_token)
                .await
                .expect("second refresh")
                .tokens
                .expect("tokens");
            // Presenting a rotated token again means it leaked: the session ends.
            let message = expect_error(
                refresh(&rpc, codec, &account.refresh_token).await,
                "unauthenticated",
                401,
            );
            assert!(message.contains("already used"), "{message}");
            // The current refresh token and every access token of the chain stop working.
            expect_error(
                refresh(&rpc, codec, &r2.refresh_token).await,
                "unauthenticated",
                401,
            );
            for token in [&account.access_token, &r1.access_token, &r2.access_token] {
                let message =
                    expect_error(get_me(&server, codec, token).await, "unauthenticated", 401);
                assert!(message.contains("signed out"), "{message}");
            }
            // The password still opens a new session.
            let again = sign_in(&rpc, codec, &account.username, PASSWORD)
                .await
                .expect("sign in again")
                .tokens
                .expect("tokens");
            get_me(&server, codec, &again.access_token)
                .await
                .expect("new session");
        }
    }
);

// Eight refreshes with one token at once (a client with several tabs, or one
// that retried): every one is answered with a working token pair, none fails
// with `internal` (SQLite busy-snapshot errors) and the session is not revoked
// as if the token had leaked.
both_backends!(
    concurrent_refreshes_with_one_token_keep_the_session,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let rpc = server.rpc();
        for codec in Codec::ALL {
            let account = server.sign_up(&name_for("tabs", codec)).await;
            let calls = (0..8).map(|_| refresh(&rpc, codec, &account.refresh_token));
            let results = futures_util::future::join_all(calls).await;
            let mut pairs = Vec::new();
            for result in results {
                let tokens = result
                    .unwrap_or_else(|e| panic!("{codec:?} concurrent refresh: {e}"))
                    .tokens
                    .expect("tokens");
                pairs.push(tokens);
            }
            for tokens in &pairs {
                get_me(&server, codec, &tokens.access_token)
                    .await
                    .unwrap_or_else(|e| panic!("{codec:?} the session was signed out: {e}"));
            }
            // The client goes on with the answer it kept (say the last one).
            let kept = pairs.last().expect("eight answers");
            let next = refresh(&rpc, codec, &kept.refresh_token)
                .await
                .unwrap_or_else(|e| panic!("{codec:?} refresh after the burst: {e}"))
                .tokens
                .expect("tokens");
            get_me(&server, codec, &next.access_token)
                .await
                .expect("the chain goes on");
            get_me(&server, codec, &account.access_token)
                .await
                .expect("the first access token of the session still works");
        }
    }
);

// The grace period is short: a consumed token presented after it still revokes
// the session.
both_backends!(
    refresh_token_reuse_after_the_grace_period_revokes,
    |backend| async move {
        let server =
            TestServer::spawn_with(backend, |s| s.auth.refresh_reuse_grace_ms = 1_000).await;
        let rpc = server.rpc();
        let account = server.sign_up("henry").await;
        let next = refresh(&rpc, Codec::Json, &account.refresh_token)
            .await
            .expect("refresh")
            .tokens
            .expect("tokens");
        // Within the grace period the same token is honoured once more.
        refresh(&rpc, Codec::Json, &account.refresh_token)
            .await
            .expect("a retry within the grace period");
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let message = expect_error(
            refresh(&rpc, Codec::Json, &account.refresh_token).await,
            "unauthenticated",
            401,
        );
        assert!(message.contains("already used"), "{message}");
        expect_error(
            get_me(&server, Codec::Json, &next.access_token).await,
            "unauthenticated",
            401,
        );
    }
);

both_backends!(
    refresh_rejects_unknown_and_empty_tokens,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let rpc = server.rpc();
        for codec in Codec::ALL {
            let message = expect_error(refresh(&rpc, codec, "").await, "invalid_argument", 400);
            assert!(message.contains("refresh_token is required"), "{message}");
            let message = expect_error(
                refresh(&rpc, codec, "rt_not-a-token-this-server-issued").await,
                "unauthenticated",
                401,
            );
            assert!(
                message.contains("invalid or expired refresh token"),
                "{message}"
            );
            // An access token is not a refresh token.
            let account = server.sign_up(&name_for("gina", codec)).await;
            expect_error(
                refresh(&rpc, codec, &account.access_token).await,
                "unauthenticated",
                401,
            );
        }
    }
);

// ---------------------------------------------------------------------------
// Expired, forged and tampered access tokens
// ---------------------------------------------------------------------------

both_backends!(access_tokens_expire, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| s.auth.access_token_ttl_secs = 1).await;
    let account = server.sign_up("henry").await;
    // The token is valid for at least a second (expiry is in whole seconds)...
    get_me(&server, Codec::Json, &account.access_token)
        .await
        .expect("fresh token");
    // ...and refused within a few seconds.
    let expired = common::eventually(Duration::from_secs(5), || async {
        get_me(&server, Codec::Proto, &account.access_token)
            .await
            .is_err()
    })
    .await;
    assert!(expired, "the access token was still accepted after 5 s");
    for codec in Codec::ALL {
        let message = expect_error(
            get_me(&server, codec, &account.access_token).await,
            "unauthenticated",
            401,
        );
        assert!(message.contains("expired"), "{message}");
    }
    // The refresh token still renews the session.
    let tokens = refresh(&server.rpc(), Codec::Json, &account.refresh_token)
        .await
        .expect("refresh after expiry")
        .tokens
        .expect("tokens");
    get_me(&server, Codec::Json, &tokens.access_token)
        .await
        .expect("renewed token");
});

both_backends!(
    forged_and_tampered_tokens_are_refused,
    |backend| async move {
        let server = TestServer::spawn_with(backend, |s| {
            s.auth.token_secret = TEST_TOKEN_SECRET.into();
        })
        .await;
        let alice = server.sign_up("alice").await;
        let bob = server.sign_up("bob").await;
        let claims = jwt_claims(&alice.access_token);
        assert_eq!(claims["sub"], alice.user_id.as_str());
        assert_eq!(claims["iss"], "roomcast");

        // Signed with the server's secret but past `exp`: "expired".
        let mut expired = claims.clone();
        expired["iat"] = json!(now_secs() - 600);
        expired["exp"] = json!(now_secs() - 60);
        let expired = sign_roomcast_token(TEST_TOKEN_SECRET, &expired);

        // Alice's token with Bob's id in the payload and Alice's signature.
        let (header, rest) = alice.access_token.split_once('.').expect("a JWT");
        let (_, signature) = rest.split_once('.').expect("a JWT");
        let mut as_bob = claims.clone();
        as_bob["sub"] = json!(bob.user_id);
        let payload = {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(as_bob.to_string())
        };
        let tampered_payload = format!("{header}.{payload}.{signature}");

        // A flipped character in the signature.
        let mut tampered_signature = alice.access_token.clone();
        let last = tampered_signature.pop().expect("non-empty");
        tampered_signature.push(if last == 'A' { 'B' } else { 'A' });

        // Valid claims signed with another secret.
        let other_secret = sign_roomcast_token("another-secret-another-secret-another!", &claims);

        // `alg: none`.
        let unsigned = {
            use base64::Engine as _;
            let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                engine.encode(r#"{"alg":"none","typ":"JWT"}"#),
                engine.encode(claims.to_string())
            )
        };

        for codec in Codec::ALL {
            let message = expect_error(
                get_me(&server, codec, &expired).await,
                "unauthenticated",
                401,
            );
            assert!(message.contains("expired"), "{message}");
            for token in [
                &tampered_payload,
                &tampered_signature,
                &other_secret,
                &unsigned,
                &"not-a-token".to_owned(),
            ] {
                let message =
                    expect_error(get_me(&server, codec, token).await, "unauthenticated", 401);
                assert!(message.contains("invalid"), "{token}: {message}");
            }
            let message = expect_error(
                server
                    .rpc()
                    .call::<_, pb::GetMeResponse>(codec, "UserService/GetMe", &pb::GetMeRequest {})
                    .await,
                "unauthenticated",
                401,
            );
            assert!(message.contains("Authorization"), "{message}");
        }
        // Alice's real token is still fine, and still Alice.
        let me = get_me(&server, Codec::Json, &alice.access_token)
            .await
            .expect("valid");
        assert_eq!(me.id, alice.user_id);
    }
);

// ---------------------------------------------------------------------------
// External application tokens
// ---------------------------------------------------------------------------

const EXTERNAL_SECRET: &str = "my-app-shared-secret-of-at-least-32-bytes";

fn sign_external(
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: &Value,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), claims, key).expect("sign")
}

fn hs256(claims: &Value, secret: &str) -> String {
    sign_external(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        claims,
    )
}

both_backends!(external_hs256_tokens_map_to_users, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| {
        let ext = &mut s.auth.external;
        ext.enabled = true;
        ext.algorithm = "HS256".into();
        ext.secret = EXTERNAL_SECRET.into();
        ext.issuer = "my-app".into();
    })
    .await;
    let exp = now_secs() + 600;
    for codec in Codec::ALL {
        let subject = name_for("ext-user", codec);
        let token = hs256(
            &json!({"sub": subject, "name": "Ext User", "roles": ["member"], "iss": "my-app", "exp": exp}),
            EXTERNAL_SECRET,
        );
        let me = get_me(&server, codec, &token)
            .await
            .expect("a good external token");
        assert!(me.external, "{me:?}");
        assert_eq!(me.display_name, "Ext User");
        assert_eq!(me.role, pb::Role::Member as i32);
        assert_eq!(me.username, "", "external users have no username");
        // The same subject is the same user, with the latest name and role.
        let token2 = hs256(
            &json!({"sub": subject, "name": "Renamed", "roles": ["guest"], "iss": "my-app", "exp": exp}),
            EXTERNAL_SECRET,
        );
        let again = get_me(&server, codec, &token2).await.expect("same subject");
        assert_eq!(again.id, me.id);
        assert_eq!(again.display_name, "Renamed");
        assert_eq!(again.role, pb::Role::Guest as i32);
        // Other users see the external user's profile.
        let viewer = server.sign_up(&name_for("viewer", codec)).await;
        let seen: pb::GetUserResponse = server
            .rpc_as(&viewer.access_token)
            .call(
                codec,
                "UserService/GetUser",
                &pb::GetUserRequest { id: me.id.clone() },
            )
            .await
            .expect("GetUser");
        assert!(seen.user.expect("user").external);

        // An admin role in the token grants admin RPCs.
        let admin = hs256(
            &json!({"sub": name_for("ext-admin", codec), "roles": ["admin"], "iss": "my-app", "exp": exp}),
            EXTERNAL_SECRET,
        );
        list_api_keys(&server, codec, &admin, false)
            .await
            .expect("an external admin lists API keys");
        let member_keys = list_api_keys(&server, codec, &token, false).await;
        expect_error(member_keys, "permission_denied", 403);

        // External tokens cannot be signed out here.
        let message = expect_error(
            sign_out(&server, codec, &token, false).await,
            "failed_precondition",
            400,
        );
        assert!(message.contains("external"), "{message}");

        // A bad signature, a wrong issuer, an expired token: unauthenticated.
        let forged = hs256(
            &json!({"sub": subject, "iss": "my-app", "exp": exp}),
            "not-the-shared-secret-not-the-shared-secret",
        );
        let message = expect_error(
            get_me(&server, codec, &forged).await,
            "unauthenticated",
            401,
        );
        assert!(message.contains("signature"), "{message}");
        let wrong_issuer = hs256(
            &json!({"sub": subject, "iss": "other", "exp": exp}),
            EXTERNAL_SECRET,
        );
        let message = expect_error(
            get_me(&server, codec, &wrong_issuer).await,
            "unauthenticated",
            401,
        );
        assert!(message.contains("issuer"), "{message}");
        let expired = hs256(
            &json!({"sub": subject, "iss": "my-app", "exp": now_secs() - 60}),
            EXTERNAL_SECRET,
        );
        let message = expect_error(
            get_me(&server, codec, &expired).await,
            "unauthenticated",
            401,
        );
        assert!(message.contains("expired"), "{message}");
        let no_subject = hs256(&json!({"iss": "my-app", "exp": exp}), EXTERNAL_SECRET);
        let message = expect_error(
            get_me(&server, codec, &no_subject).await,
            "unauthenticated",
            401,
        );
        assert!(message.contains("sub"), "{message}");
    }
});

#[tokio::test]
async fn external_tokens_are_refused_when_not_enabled() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let token = hs256(
        &json!({"sub": "x", "exp": now_secs() + 600}),
        EXTERNAL_SECRET,
    );
    let message = expect_error(
        get_me(&server, Codec::Json, &token).await,
        "unauthenticated",
        401,
    );
    assert!(message.contains("invalid"), "{message}");
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// RS256 and ES256: the server holds the public key, the application the private one.
async fn external_public_key_tokens_work(algorithm: &str) {
    let (alg, private, public) = match algorithm {
        "RS256" => (
            jsonwebtoken::Algorithm::RS256,
            jsonwebtoken::EncodingKey::from_rsa_pem(fixture("rs256_private.pem").as_bytes())
                .expect("RSA key"),
            fixture("rs256_public.pem"),
        ),
        _ => (
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_pem(fixture("es256_private.pem").as_bytes())
                .expect("EC key"),
            fixture("es256_public.pem"),
        ),
    };
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        let ext = &mut s.auth.external;
        ext.enabled = true;
        ext.algorithm = algorithm.into();
        ext.public_key_pem = public.clone();
        ext.audience = "roomcast".into();
        ext.user_id_claim = "uid".into();
        ext.name_claim = "nick".into();
        ext.roles_claim = "groups".into();
    })
    .await;
    let public_pem = public;
    let exp = now_secs() + 600;
    let claims =
        json!({"uid": 4242, "nick": "Pat", "groups": "admin", "aud": "roomcast", "exp": exp});
    let token = sign_external(alg, &private, &claims);
    for codec in Codec::ALL {
        let me = get_me(&server, codec, &token)
            .await
            .unwrap_or_else(|e| panic!("{algorithm} token: {e}"));
        assert!(me.external);
        assert_eq!(me.display_name, "Pat");
        assert_eq!(me.role, pb::Role::Admin as i32);
    }
    // The wrong audience is refused.
    let wrong_aud = sign_external(
        alg,
        &private,
        &json!({"uid": 1, "aud": "someone-else", "exp": exp}),
    );
    let message = expect_error(
        get_me(&server, Codec::Json, &wrong_aud).await,
        "unauthenticated",
        401,
    );
    assert!(message.contains("audience"), "{message}");
    // A token whose signature was made for other claims is refused.
    let (header, rest) = token.split_once('.').expect("JWT");
    let (_, signature) = rest.split_once('.').expect("JWT");
    let forged_payload = {
        use base64::Engine as _;
        let mut forged = claims.clone();
        forged["uid"] = json!(1);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string())
    };
    let forged = format!("{header}.{forged_payload}.{signature}");
    let message = expect_error(
        get_me(&server, Codec::Json, &forged).await,
        "unauthenticated",
        401,
    );
    assert!(message.contains("signature"), "{message}");
    // An HS256 token (signed with the PEM text as a secret: the classic
    // algorithm-confusion attack) is refused.
    let confused = hs256(&claims, &public_pem);
    expect_error(
        get_me(&server, Codec::Json, &confused).await,
        "unauthenticated",
        401,
    );
}

#[tokio::test]
async fn external_rs256_tokens() {
    external_public_key_tokens_work("RS256").await;
}

#[tokio::test]
async fn external_es256_tokens() {
    external_public_key_tokens_work("ES256").await;
}

// ---------------------------------------------------------------------------
// Admins and API keys
// ---------------------------------------------------------------------------

both_backends!(configured_admin_is_created_once, |backend| async move {
    // The first server creates the admin; a restart on the same store keeps it
    // (and does not reset its password to the configured one).
    let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
    assert_eq!(admin.user.role, pb::Role::Admin as i32);
    assert_eq!(admin.username, "admin");
    let again = server
        .restart_with(|s| s.auth.admin_password = "a different password".into())
        .await;
    // The generated token secret is kept in the store: tokens survive a restart.
    let me = get_me(&again, Codec::Proto, &admin.access_token)
        .await
        .expect("a token issued before the restart");
    assert_eq!(me.id, admin.user_id);
    // The existing account is kept as is: the old password still works.
    let admin = again.sign_in("admin", PASSWORD).await;
    assert_eq!(admin.user.role, pb::Role::Admin as i32);
    expect_error(
        sign_in(&again.rpc(), Codec::Json, "admin", "a different password").await,
        "unauthenticated",
        401,
    );
});

both_backends!(
    api_keys_are_created_listed_used_and_revoked,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let member = server.sign_up("member").await;
        for codec in Codec::ALL {
            let name = name_for("deploy bot", codec);
            let created =
                create_api_key(&server, codec, &admin.access_token, &format!("  {name} "))
                    .await
                    .expect("CreateApiKey");
            let secret = created.secret;
            let key = created.key.expect("key");
            assert!(secret.starts_with("rk_") && secret.len() > 40, "{secret}");
            assert_eq!(key.name, name);
            assert!(
                secret.starts_with(&key.prefix) && key.prefix.len() >= 6,
                "{key:?}"
            );
            assert_eq!(key.created_by, admin.user_id);
            assert!(
                key.created_at.is_some() && key.revoked_at.is_none() && key.last_used_at.is_none()
            );

            // Listing shows the key but never its secret.
            let keys = list_api_keys(&server, codec, &admin.access_token, false)
                .await
                .expect("ListApiKeys");
            let listed = keys.iter().find(|k| k.id == key.id).expect("listed");
            assert_eq!(listed.name, name);
            let (status, body) = server
                .rpc_as(&admin.access_token)
                .call_json("AuthService/ListApiKeys", json!({}))
                .await;
            assert_eq!(status, 200);
            assert!(
                !body.to_string().contains(&secret),
                "the secret must never be listed"
            );

            // The key authenticates server-to-server calls and acts as the server.
            let seen: pb::GetUserResponse = server
                .rpc_as(&secret)
                .call(
                    codec,
                    "UserService/GetUser",
                    &pb::GetUserRequest {
                        id: member.user_id.clone(),
                    },
                )
                .await
                .expect("GetUser with an API key");
            assert_eq!(seen.user.expect("user").id, member.user_id);
            list_api_keys(&server, codec, &secret, false)
                .await
                .expect("an API key may list keys");
            let message = expect_error(
                get_me(&server, codec, &secret).await,
                "permission_denied",
                403,
            );
            assert!(message.contains("API key"), "{message}");
            let message = expect_error(
                sign_out(&server, codec, &secret, false).await,
                "failed_precondition",
                400,
            );
            assert!(message.contains("RevokeApiKey"), "{message}");
            let used = list_api_keys(&server, codec, &admin.access_token, false)
                .await
                .expect("list");
            assert!(
                used.iter()
                    .find(|k| k.id == key.id)
                    .expect("listed")
                    .last_used_at
                    .is_some(),
                "last_used_at is set once the key was used"
            );

            // Revoked: refused at once, listed only with include_revoked.
            revoke_api_key(&server, codec, &admin.access_token, &key.id)
                .await
                .expect("RevokeApiKey");
            let message = expect_error(
                server
                    .rpc_as(&secret)
                    .call::<_, pb::GetUserResponse>(
                        codec,
                        "UserService/GetUser",
                        &pb::GetUserRequest {
                            id: member.user_id.clone(),
                        },
                    )
                    .await,
                "unauthenticated",
                401,
            );
            assert!(message.contains("revoked"), "{message}");
            let active = list_api_keys(&server, codec, &admin.access_token, false)
                .await
                .expect("list");
            assert!(active.iter().all(|k| k.id != key.id));
            let all = list_api_keys(&server, codec, &admin.access_token, true)
                .await
                .expect("list");
            let revoked = all
                .iter()
                .find(|k| k.id == key.id)
                .expect("listed with include_revoked");
            assert!(revoked.revoked_at.is_some());
            // Revoking twice, or an unknown key: not_found.
            let message = expect_error(
                revoke_api_key(&server, codec, &admin.access_token, &key.id).await,
                "not_found",
                404,
            );
            assert!(message.contains(&key.id), "{message}");
            expect_error(
                revoke_api_key(&server, codec, &admin.access_token, "k_doesnotexist").await,
                "not_found",
                404,
            );
            // Bad input.
            let message = expect_error(
                revoke_api_key(&server, codec, &admin.access_token, "").await,
                "invalid_argument",
                400,
            );
            assert!(message.contains("id is required"), "{message}");
            for bad_name in ["", "   ", &"n".repeat(65), "two\nlines"] {
                let message = expect_error(
                    create_api_key(&server, codec, &admin.access_token, bad_name).await,
                    "invalid_argument",
                    400,
                );
                assert!(message.contains("name"), "{bad_name:?}: {message}");
            }
        }
    }
);

both_backends!(members_cannot_call_admin_rpcs, |backend| async move {
    let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
    let member = server.sign_up("mallory").await;
    let key = create_api_key(&server, Codec::Json, &admin.access_token, "k")
        .await
        .expect("create")
        .key
        .expect("key");
    for codec in Codec::ALL {
        for result in [
            create_api_key(&server, codec, &member.access_token, "mine")
                .await
                .map(|_| ()),
            list_api_keys(&server, codec, &member.access_token, true)
                .await
                .map(|_| ()),
            revoke_api_key(&server, codec, &member.access_token, &key.id)
                .await
                .map(|_| ()),
        ] {
            let message = expect_error(result, "permission_denied", 403);
            assert!(message.contains("admin"), "{message}");
        }
        // Without credentials: unauthenticated, not permission_denied.
        let anonymous: Result<pb::ListApiKeysResponse, _> = server
            .rpc()
            .call(
                codec,
                "AuthService/ListApiKeys",
                &pb::ListApiKeysRequest::default(),
            )
            .await;
        expect_error(anonymous, "unauthenticated", 401);
    }
    // The key the member tried to revoke is still active.
    let keys = list_api_keys(&server, Codec::Proto, &admin.access_token, false)
        .await
        .expect("list");
    assert!(keys.iter().any(|k| k.id == key.id));
});

both_backends!(role_changes_apply_to_live_tokens, |backend| async move {
    // The role is read from the user row on every request, not from the token.
    let server = TestServer::spawn(backend).await;
    let account: Account = server.sign_up("promoted").await;
    expect_error(
        list_api_keys(&server, Codec::Json, &account.access_token, false).await,
        "permission_denied",
        403,
    );
    server
        .state()
        .store
        .set_user_role(
            &roomcast::ids::UserId::from(account.user_id.as_str()),
            roomcast::model::Role::Admin,
        )
        .await
        .expect("promote");
    list_api_keys(&server, Codec::Json, &account.access_token, false)
        .await
        .expect("the same token now has the admin role");
});

// ---------------------------------------------------------------------------
// Supervision (issue 6 item 14)
// ---------------------------------------------------------------------------

/// A panic inside an authenticator, in its handler or in the future it runs on
/// its own task, answers that one request with a retryable `unavailable` (the
/// actor is restarting) and must not silently take the actor out of the pool: its
/// supervisor restarts it, and every later authentication, whichever
/// authenticator of the pool it lands on, succeeds.
#[tokio::test]
async fn a_panicking_authenticator_is_restarted_and_the_pool_keeps_serving() {
    use roomcast::actors::authenticator::faults;
    let server = TestServer::spawn(Backend::Sqlite).await;
    let account = server.sign_up("grace").await;
    // The pool hands requests out round robin: enough panics to hit every
    // authenticator with both kinds.
    for bearer in [faults::PANIC_IN_HANDLER, faults::PANIC_IN_FUTURE].repeat(8) {
        expect_error(
            get_me(&server, Codec::Json, bearer).await,
            "unavailable",
            503,
        );
    }
    for attempt in 0..32 {
        let me = get_me(&server, Codec::Json, &account.access_token)
            .await
            .unwrap_or_else(|e| panic!("authentication {attempt} after the panics: {e:?}"));
        assert_eq!(me.username, account.username);
    }
}
