//! Text that people read, over HTTP against SQLite and PostgreSQL: display names,
//! room titles and bios refuse invisible formatting characters (bidi overrides,
//! zero-width characters) and the bio refuses terminal escapes; usernames are
//! NFKC-normalised and a username that looks like an existing one is refused.

mod common;

use common::{expect_error, Codec, Rpc, RpcError, TestServer, PASSWORD};
use roomcast::proto::v1 as pb;

async fn sign_up(
    rpc: &Rpc,
    username: &str,
    display_name: &str,
) -> Result<pb::SignUpResponse, RpcError> {
    rpc.call(
        Codec::Json,
        "AuthService/SignUp",
        &pb::SignUpRequest {
            username: username.into(),
            password: PASSWORD.into(),
            display_name: display_name.into(),
        },
    )
    .await
}

async fn update_profile(
    rpc: &Rpc,
    update: pb::UpdateProfileRequest,
) -> Result<pb::UpdateProfileResponse, RpcError> {
    rpc.call(Codec::Proto, "UserService/UpdateProfile", &update)
        .await
}

/// Spoofing with invisible characters: a right-to-left override that makes
/// "evil" + U+202E + "txt.exe" read "evilexe.txt", a zero-width space inside a name, a
/// bidi isolate.
const INVISIBLE: [&str; 4] = [
    "evil\u{202E}txt.exe",
    "ad\u{200B}min",
    "\u{2066}Support\u{2069}",
    "soft\u{AD}hyphen",
];

both_backends!(
    names_and_titles_refuse_invisible_characters,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let rpc = server.rpc();
        for (i, name) in INVISIBLE.iter().enumerate() {
            let message = expect_error(
                sign_up(&rpc, &format!("spoof{i}"), name).await,
                "invalid_argument",
                400,
            );
            assert!(
                message.contains("display_name") && message.contains("invisible formatting"),
                "{name:?}: {message}"
            );
        }
        let account = server.sign_up("honest").await;
        let me = server.rpc_as(&account.access_token);
        for name in INVISIBLE {
            let message = expect_error(
                update_profile(
                    &me,
                    pb::UpdateProfileRequest {
                        display_name: Some(name.into()),
                        ..Default::default()
                    },
                )
                .await,
                "invalid_argument",
                400,
            );
            assert!(message.contains("invisible formatting"), "{message}");
            let message = expect_error(
                me.call::<_, pb::CreateRoomResponse>(
                    Codec::Json,
                    "RoomService/CreateRoom",
                    &pb::CreateRoomRequest {
                        kind: pb::RoomKind::Public as i32,
                        title: name.into(),
                        ..Default::default()
                    },
                )
                .await,
                "invalid_argument",
                400,
            );
            assert!(
                message.contains("title") && message.contains("invisible formatting"),
                "{message}"
            );
        }
        // What scripts and emoji need still works.
        for name in [
            "Zoë 👩\u{200D}💻",
            "\u{0645}\u{06CC}\u{200C}\u{062E}\u{0648}\u{0627}\u{0647}\u{0645}",
        ] {
            let updated = update_profile(
                &me,
                pb::UpdateProfileRequest {
                    display_name: Some(name.into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!(updated.user.expect("user").display_name, name);
        }
    }
);

both_backends!(the_bio_refuses_terminal_escapes, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let account = server.sign_up("writer").await;
    let me = server.rpc_as(&account.access_token);
    for bio in [
        "\u{1B}[2J\u{1B}[31mcleared your terminal",
        "ding\u{7}",
        "back\u{8}space",
        "bidi \u{202E}override",
    ] {
        expect_error(
            update_profile(
                &me,
                pb::UpdateProfileRequest {
                    bio: Some(bio.into()),
                    ..Default::default()
                },
            )
            .await,
            "invalid_argument",
            400,
        );
    }
    let bio = "Two lines:\nand a\ttab.";
    let updated = update_profile(
        &me,
        pb::UpdateProfileRequest {
            bio: Some(bio.into()),
            ..Default::default()
        },
    )
    .await
    .expect("newlines and tabs are fine");
    assert_eq!(updated.user.expect("user").bio, bio);
});

both_backends!(
    usernames_are_normalised_and_lookalikes_refused,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let rpc = server.rpc();
        // Full-width letters are the ASCII username (NFKC), for sign-up and sign-in.
        let signed_up = sign_up(&rpc, "ｍａｌｌｏｒｙ", "").await.expect("sign up");
        assert_eq!(signed_up.user.expect("user").username, "mallory");
        server.sign_in("ＭＡＬＬＯＲＹ", PASSWORD).await;
        // The same name again in another form is taken.
        let message = expect_error(sign_up(&rpc, "mallory", "").await, "already_exists", 409);
        assert!(message.contains("taken"), "{message}");

        server.sign_up("admin").await;
        server.sign_up("paypal").await;
        server.sign_up("owner").await;
        for (lookalike, original) in [
            ("adrnin", "admin"),
            ("paypa1", "paypal"),
            ("0WNER", "owner"),
        ] {
            let message = expect_error(sign_up(&rpc, lookalike, "").await, "already_exists", 409);
            assert!(
                message.contains("looks too much like") && message.contains(original),
                "{lookalike}: {message}"
            );
        }
        // Names that only share letters are fine.
        sign_up(&rpc, "administrator", "")
            .await
            .expect("a different name");
    }
);

// Names in tokens an external application signs are cleaned (its users still
// get in), without the invisible characters.
both_backends!(
    external_names_lose_invisible_characters,
    |backend| async move {
        const SECRET: &str = "my-app-shared-secret-of-at-least-32-bytes";
        let server = TestServer::spawn_with(backend, |s| {
            s.auth.external.enabled = true;
            s.auth.external.secret = SECRET.into();
        })
        .await;
        let token = common::sign_roomcast_token(
            SECRET,
            &serde_json::json!({
                "sub": "ext-1",
                "name": "Eve\u{202E}lyn\u{200B}",
                "exp": common::now_secs() + 600,
            }),
        );
        let reply: pb::GetMeResponse = server
            .rpc_as(&token)
            .call(Codec::Json, "UserService/GetMe", &pb::GetMeRequest {})
            .await
            .expect("GetMe with an external token");
        assert_eq!(reply.user.expect("user").display_name, "Evelyn");
    }
);
