//! UserService over HTTP, in both codecs, against SQLite and PostgreSQL: profiles,
//! batch reads, profile updates and prefix search with pagination.

mod common;

use std::collections::HashSet;

use common::{expect_error, Backend, Codec, Rpc, RpcError, TestServer};
use roomcast::proto::v1 as pb;
use serde_json::json;

async fn get_me(rpc: &Rpc, codec: Codec) -> Result<pb::User, RpcError> {
    let reply: pb::GetMeResponse = rpc
        .call(codec, "UserService/GetMe", &pb::GetMeRequest {})
        .await?;
    Ok(reply.user.expect("GetMe answers a user"))
}

async fn get_user(rpc: &Rpc, codec: Codec, id: &str) -> Result<pb::User, RpcError> {
    let reply: pb::GetUserResponse = rpc
        .call(
            codec,
            "UserService/GetUser",
            &pb::GetUserRequest { id: id.into() },
        )
        .await?;
    Ok(reply.user.expect("GetUser answers a user"))
}

async fn batch_get(
    rpc: &Rpc,
    codec: Codec,
    ids: &[&str],
) -> Result<pb::BatchGetUsersResponse, RpcError> {
    rpc.call(
        codec,
        "UserService/BatchGetUsers",
        &pb::BatchGetUsersRequest {
            ids: ids.iter().map(|id| id.to_string()).collect(),
        },
    )
    .await
}

async fn update_profile(
    rpc: &Rpc,
    codec: Codec,
    update: pb::UpdateProfileRequest,
) -> Result<pb::User, RpcError> {
    let reply: pb::UpdateProfileResponse = rpc
        .call(codec, "UserService/UpdateProfile", &update)
        .await?;
    Ok(reply.user.expect("UpdateProfile answers the user"))
}

async fn search(
    rpc: &Rpc,
    codec: Codec,
    prefix: &str,
    page_size: u32,
    page_token: &str,
) -> Result<pb::SearchUsersResponse, RpcError> {
    rpc.call(
        codec,
        "UserService/SearchUsers",
        &pb::SearchUsersRequest {
            prefix: prefix.into(),
            page_size,
            page_token: page_token.into(),
        },
    )
    .await
}

both_backends!(get_me_and_get_user, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let alice = server.sign_up("alice").await;
    let bob = server.sign_up("bob").await;
    let as_alice = server.rpc_as(&alice.access_token);
    for codec in Codec::ALL {
        let me = get_me(&as_alice, codec).await.expect("GetMe");
        assert_eq!(me, alice.user, "GetMe answers what SignUp answered");
        let seen = get_user(&as_alice, codec, &bob.user_id)
            .await
            .expect("GetUser");
        assert_eq!(seen, bob.user);

        let message = expect_error(
            get_user(&as_alice, codec, "u_doesnotexist").await,
            "not_found",
            404,
        );
        assert!(message.contains("u_doesnotexist"), "{message}");
        let message = expect_error(
            get_user(&as_alice, codec, "").await,
            "invalid_argument",
            400,
        );
        assert!(message.contains("id is required"), "{message}");
        let message = expect_error(
            get_user(&as_alice, codec, &"x".repeat(65)).await,
            "invalid_argument",
            400,
        );
        assert!(message.contains("at most 64"), "{message}");
        expect_error(
            get_user(&as_alice, codec, "has space").await,
            "invalid_argument",
            400,
        );

        // Every UserService RPC needs credentials.
        let anonymous = server.rpc();
        expect_error(get_me(&anonymous, codec).await, "unauthenticated", 401);
        expect_error(
            get_user(&anonymous, codec, &bob.user_id).await,
            "unauthenticated",
            401,
        );
        expect_error(
            batch_get(&anonymous, codec, &[&bob.user_id]).await,
            "unauthenticated",
            401,
        );
        expect_error(
            update_profile(&anonymous, codec, pb::UpdateProfileRequest::default()).await,
            "unauthenticated",
            401,
        );
        expect_error(
            search(&anonymous, codec, "b", 0, "").await,
            "unauthenticated",
            401,
        );
    }
});

both_backends!(
    batch_get_users_keeps_order_and_lists_missing_ids,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let a = server.sign_up("anna").await;
        let b = server.sign_up("ben").await;
        let c = server.sign_up("cleo").await;
        let rpc = server.rpc_as(&a.access_token);
        for codec in Codec::ALL {
            let reply = batch_get(
                &rpc,
                codec,
                &[
                    &c.user_id,
                    "u_missing1",
                    &a.user_id,
                    &c.user_id,
                    "u_missing2",
                    &b.user_id,
                ],
            )
            .await
            .expect("BatchGetUsers");
            let ids: Vec<&str> = reply.users.iter().map(|u| u.id.as_str()).collect();
            assert_eq!(
                ids,
                [c.user_id.as_str(), a.user_id.as_str(), b.user_id.as_str()]
            );
            assert_eq!(reply.missing_ids, ["u_missing1", "u_missing2"]);
            assert_eq!(reply.users[0], c.user);

            let only_missing = batch_get(&rpc, codec, &["u_nobody"])
                .await
                .expect("all missing");
            assert!(only_missing.users.is_empty());
            assert_eq!(only_missing.missing_ids, ["u_nobody"]);

            let message = expect_error(batch_get(&rpc, codec, &[]).await, "invalid_argument", 400);
            assert!(message.contains("at least one"), "{message}");
            let message = expect_error(
                batch_get(&rpc, codec, &[&a.user_id, ""]).await,
                "invalid_argument",
                400,
            );
            assert!(message.contains("ids[1]"), "{message}");
            let many: Vec<String> = (0..101).map(|i| format!("u_{i}")).collect();
            let many: Vec<&str> = many.iter().map(String::as_str).collect();
            let message =
                expect_error(batch_get(&rpc, codec, &many).await, "invalid_argument", 400);
            assert!(message.contains("at most 100"), "{message}");
            // 100 distinct ids are fine.
            let reply = batch_get(&rpc, codec, &many[..100]).await.expect("100 ids");
            assert_eq!(reply.missing_ids.len(), 100);
        }
    }
);

both_backends!(
    update_profile_changes_only_what_is_set,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let dana = server.sign_up("dana").await;
        let viewer = server.sign_up("viewer").await;
        let rpc = server.rpc_as(&dana.access_token);
        for codec in Codec::ALL {
            let updated = update_profile(
                &rpc,
                codec,
                pb::UpdateProfileRequest {
                    display_name: Some("  Dana Scully ".into()),
                    avatar_url: Some("https://img.example.com/dana.png".into()),
                    bio: Some("  I want to believe. ".into()),
                },
            )
            .await
            .expect("UpdateProfile");
            assert_eq!(updated.display_name, "Dana Scully");
            assert_eq!(updated.avatar_url, "https://img.example.com/dana.png");
            assert_eq!(updated.bio, "I want to believe.");
            assert_eq!(updated.username, "dana");
            assert_eq!(updated.id, dana.user_id);

            // Unset fields stay; an empty avatar or bio clears it.
            let updated = update_profile(
                &rpc,
                codec,
                pb::UpdateProfileRequest {
                    avatar_url: Some(String::new()),
                    ..Default::default()
                },
            )
            .await
            .expect("clear the avatar");
            assert_eq!(
                (
                    updated.display_name.as_str(),
                    updated.avatar_url.as_str(),
                    updated.bio.as_str()
                ),
                ("Dana Scully", "", "I want to believe.")
            );
            let unchanged = update_profile(&rpc, codec, pb::UpdateProfileRequest::default())
                .await
                .expect("an empty update");
            assert_eq!(unchanged, updated);

            // Others see the change.
            let seen = get_user(&server.rpc_as(&viewer.access_token), codec, &dana.user_id)
                .await
                .expect("GetUser");
            assert_eq!(seen, updated);

            // Validation names the field; nothing changes.
            let cases = [
                (
                    pb::UpdateProfileRequest {
                        display_name: Some("   ".into()),
                        ..Default::default()
                    },
                    "display_name is required",
                ),
                (
                    pb::UpdateProfileRequest {
                        display_name: Some("x".repeat(65)),
                        ..Default::default()
                    },
                    "display_name must be at most 64",
                ),
                (
                    pb::UpdateProfileRequest {
                        display_name: Some("two\nlines".into()),
                        ..Default::default()
                    },
                    "control characters",
                ),
                (
                    pb::UpdateProfileRequest {
                        avatar_url: Some("javascript:alert(1)".into()),
                        ..Default::default()
                    },
                    "avatar_url must be an http",
                ),
                (
                    pb::UpdateProfileRequest {
                        avatar_url: Some(format!("https://x.example/{}", "a".repeat(600))),
                        ..Default::default()
                    },
                    "avatar_url must be at most 512",
                ),
                (
                    pb::UpdateProfileRequest {
                        bio: Some("b".repeat(513)),
                        ..Default::default()
                    },
                    "bio must be at most 512",
                ),
            ];
            for (update, needle) in cases {
                let message = expect_error(
                    update_profile(&rpc, codec, update).await,
                    "invalid_argument",
                    400,
                );
                assert!(
                    message.contains(needle),
                    "`{message}` should mention `{needle}`"
                );
            }
            assert_eq!(get_me(&rpc, codec).await.expect("GetMe"), updated);
        }
        // In JSON, a field that is present (even empty) is "set"; an absent one is not.
        let (status, body) = rpc
            .call_json("UserService/UpdateProfile", json!({"bio": ""}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user"]["displayName"], "Dana Scully");
        assert!(
            body["user"].get("bio").is_none(),
            "an empty bio is omitted: {body}"
        );
    }
);

both_backends!(
    api_keys_and_external_users_and_profiles,
    |backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let erin = server.sign_up("erin").await;
        let created: pb::CreateApiKeyResponse = server
            .rpc_as(&admin.access_token)
            .call(
                Codec::Json,
                "AuthService/CreateApiKey",
                &pb::CreateApiKeyRequest {
                    name: "reader".into(),
                },
            )
            .await
            .expect("CreateApiKey");
        let key = server.rpc_as(&created.secret);
        for codec in Codec::ALL {
            // An API key reads profiles but has no profile of its own.
            assert_eq!(
                get_user(&key, codec, &erin.user_id).await.expect("GetUser"),
                erin.user
            );
            let reply = batch_get(&key, codec, &[&erin.user_id])
                .await
                .expect("BatchGetUsers");
            assert_eq!(reply.users, std::slice::from_ref(&erin.user));
            search(&key, codec, "er", 0, "").await.expect("SearchUsers");
            expect_error(get_me(&key, codec).await, "permission_denied", 403);
            expect_error(
                update_profile(
                    &key,
                    codec,
                    pb::UpdateProfileRequest {
                        bio: Some("x".into()),
                        ..Default::default()
                    },
                )
                .await,
                "permission_denied",
                403,
            );
        }
    }
);

both_backends!(search_users_pages_without_overlap, |backend| async move {
    let server = TestServer::spawn(backend).await;
    // Seven users match "sam" (five by username, two by display name), two do not.
    let mut expected = HashSet::new();
    for name in ["sam1", "sam2", "samantha", "sam_x", "samuel"] {
        expected.insert(server.sign_up(name).await.user_id);
    }
    for (name, display) in [("zed", "Sam Zed"), ("yan", "SAMMY")] {
        let account = server.sign_up(name).await;
        update_profile(
            &server.rpc_as(&account.access_token),
            Codec::Json,
            pb::UpdateProfileRequest {
                display_name: Some(display.into()),
                ..Default::default()
            },
        )
        .await
        .expect("rename");
        expected.insert(account.user_id);
    }
    let searcher = server.sign_up("other").await;
    server.sign_up("salt").await;
    let rpc = server.rpc_as(&searcher.access_token);

    for codec in Codec::ALL {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = search(&rpc, codec, "Sam", 3, &token)
                .await
                .expect("SearchUsers");
            pages += 1;
            assert!(page.users.len() <= 3);
            seen.extend(page.users.into_iter().map(|u| u.id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
            assert!(pages < 10, "pagination does not end");
        }
        assert_eq!(pages, 3, "7 matches in pages of 3");
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "pages overlap: {seen:?}");
        assert_eq!(unique, expected);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "results are in a stable order (by id)");

        // One page with the default size holds them all.
        let all = search(&rpc, codec, "sam", 0, "")
            .await
            .expect("default page size");
        assert_eq!(all.users.len(), 7);
        assert!(all.next_page_token.is_empty());

        // `_` is a literal character, not a wildcard.
        let literal = search(&rpc, codec, "sam_", 0, "")
            .await
            .expect("underscore");
        let names: Vec<&str> = literal.users.iter().map(|u| u.username.as_str()).collect();
        assert_eq!(names, ["sam_x"]);
        let none = search(&rpc, codec, "%", 0, "").await.expect("percent");
        assert!(none.users.is_empty(), "`%` is a literal character too");

        // Bad requests name the field.
        for (prefix, size, token, needle) in [
            ("", 0, "", "prefix is required"),
            ("   ", 0, "", "prefix is required"),
            (&"s".repeat(33)[..], 0, "", "prefix must be at most 32"),
            ("sam", 101, "", "page_size must be at most 100"),
            ("sam", 0, "!!not a token!!", "page_token"),
        ] {
            let message = expect_error(
                search(&rpc, codec, prefix, size, token).await,
                "invalid_argument",
                400,
            );
            assert!(
                message.contains(needle),
                "`{message}` should mention `{needle}`"
            );
        }
    }
});

#[tokio::test]
async fn get_me_json_shape_is_canonical_proto3_json() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let account = server.sign_up("shape").await;
    let (status, body) = server
        .rpc_as(&account.access_token)
        .call_json("UserService/GetMe", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let user = &body["user"];
    // lowerCamelCase names, enum names as strings, defaults omitted.
    assert_eq!(user["id"], account.user_id.as_str());
    assert_eq!(user["displayName"], "shape");
    assert_eq!(user["role"], "ROLE_MEMBER");
    assert!(user.get("display_name").is_none());
    assert!(
        user.get("external").is_none(),
        "false is the default: {user}"
    );
    assert!(
        user.get("avatarUrl").is_none(),
        "empty is the default: {user}"
    );
    // Timestamps are RFC 3339 in UTC with a `Z`, as every proto3 JSON parser
    // (protobuf-es / connect-es included) accepts.
    let created_at = user["createdAt"].as_str().expect("createdAt is a string");
    assert!(
        created_at.ends_with('Z') && created_at.len() >= 20,
        "createdAt `{created_at}` is not Z-normalized RFC 3339"
    );
}
