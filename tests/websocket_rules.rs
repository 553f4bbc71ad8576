//! The WebSocket protocol's rules: authentication and its deadline, the
//! authorization matrix (private, banned, muted, kicked, broadcast, expired and
//! signed-out sessions), malformed and oversized frames, unknown frame types, rate
//! limits, subscription limits and heartbeats. Each gets its documented error frame
//! or close code, and the server keeps serving.

mod common;

use std::time::Duration;

use common::{
    rooms::{create_room, join},
    ws::{Incoming, WsClient, WsCodec},
    Account, Backend, TestServer,
};
use roomcast::{proto::v1 as pb, settings::Settings};
use tokio_tungstenite::tungstenite::Message;

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const WAIT: Duration = Duration::from_secs(10);

async fn rpc<Req: prost::Message, Resp: prost::Message + Default>(
    server: &TestServer,
    who: &Account,
    method: &str,
    req: &Req,
) -> Resp {
    server
        .rpc_as(&who.access_token)
        .call_proto(method, req)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e:?}"))
}

fn expect_error(result: Result<impl std::fmt::Debug, pb::Error>, code: &str) -> pb::Error {
    let error = result.expect_err("the request must fail");
    assert_eq!(error.code, code, "unexpected error: {error:?}");
    assert!(!error.message.is_empty(), "errors explain themselves");
    error
}

async fn expect_close(client: &mut WsClient, code: u16) -> String {
    loop {
        match client.next_frame(WAIT).await {
            Incoming::Closed(got, reason) => {
                assert_eq!(got, code, "close code (reason: {reason})");
                return reason;
            }
            Incoming::Frame(_) => continue,
            Incoming::Timeout => panic!("expected close {code}, nothing happened"),
        }
    }
}

fn url(server: &TestServer) -> String {
    server.ws_url("/ws")
}

async fn authorization_matrix(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn(backend).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let eve = server.sign_up(&common::unique_name("eve")).await;
    let mut eve_ws = WsClient::connect_authenticated(&url(&server), codec, &eve.access_token).await;

    // Private room without an invitation: invisible.
    let private = create_room(&server, &owner, pb::RoomKind::Private).await;
    expect_error(eve_ws.subscribe(&private, None).await, "not_found");
    expect_error(eve_ws.send_message(&private, "hi", "").await, "not_found");

    // Public room: readable by anyone, but only members send.
    let public = create_room(&server, &owner, pb::RoomKind::Public).await;
    eve_ws
        .subscribe(&public, None)
        .await
        .expect("anyone reads a public room");
    expect_error(
        eve_ws.send_message(&public, "hi", "").await,
        "permission_denied",
    );
    join(&server, &eve, &public).await;
    eve_ws
        .send_message(&public, "hello", "")
        .await
        .expect("members send");

    // Muted: can read, cannot send; unmuted: can send again.
    let _: pb::MuteMemberResponse = rpc(
        &server,
        &owner,
        "RoomService/MuteMember",
        &pb::MuteMemberRequest {
            room_id: public.clone(),
            user_id: eve.user_id.clone(),
            duration_seconds: 0,
        },
    )
    .await;
    let error = expect_error(
        eve_ws.send_message(&public, "still here?", "").await,
        "permission_denied",
    );
    assert!(error.message.contains("muted"), "{error:?}");
    let _: pb::UnmuteMemberResponse = rpc(
        &server,
        &owner,
        "RoomService/UnmuteMember",
        &pb::UnmuteMemberRequest {
            room_id: public.clone(),
            user_id: eve.user_id.clone(),
        },
    )
    .await;
    eve_ws
        .send_message(&public, "back", "")
        .await
        .expect("unmuted");

    // Kicked: the live subscription ends with a `removed` push; eve may rejoin.
    let _: pb::KickMemberResponse = rpc(
        &server,
        &owner,
        "RoomService/KickMember",
        &pb::KickMemberRequest {
            room_id: public.clone(),
            user_id: eve.user_id.clone(),
            reason: "cool off".into(),
        },
    )
    .await;
    let removed = eve_ws
        .push_matching(WAIT, |k| match k {
            Out::Removed(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(removed.reason, pb::RemovedReason::Kicked as i32);
    assert_eq!(removed.room_id, public);
    expect_error(
        eve_ws.send_message(&public, "hey", "").await,
        "permission_denied",
    );
    join(&server, &eve, &public).await;
    eve_ws
        .subscribe(&public, None)
        .await
        .expect("resubscribe after kick");

    // Banned: removed, and neither reads nor sends nor joins.
    let _: pb::BanMemberResponse = rpc(
        &server,
        &owner,
        "RoomService/BanMember",
        &pb::BanMemberRequest {
            room_id: public.clone(),
            user_id: eve.user_id.clone(),
            ..Default::default()
        },
    )
    .await;
    let removed = eve_ws
        .push_matching(WAIT, |k| match k {
            Out::Removed(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(removed.reason, pb::RemovedReason::Banned as i32);
    expect_error(eve_ws.subscribe(&public, None).await, "permission_denied");
    expect_error(
        eve_ws.send_message(&public, "let me in", "").await,
        "permission_denied",
    );

    // Broadcast room: members read, only hosts send.
    let broadcast = create_room(&server, &owner, pb::RoomKind::Broadcast).await;
    join(&server, &eve, &broadcast).await;
    eve_ws
        .subscribe(&broadcast, Some(0))
        .await
        .expect("viewers read");
    let error = expect_error(
        eve_ws.send_message(&broadcast, "me too", "").await,
        "permission_denied",
    );
    assert!(error.message.contains("host"), "{error:?}");
    let mut owner_ws =
        WsClient::connect_authenticated(&url(&server), codec, &owner.access_token).await;
    let sent = owner_ws
        .send_message(&broadcast, "welcome", "")
        .await
        .expect("hosts send");
    let seq = sent.message.expect("message").seq;
    let events = eve_ws.collect_until(&broadcast, seq, WAIT).await;
    assert_eq!(events.last().map(|m| m.text.as_str()), Some("welcome"));
}

async fn expired_and_signed_out_sessions(backend: Backend, codec: WsCodec) {
    let (server, _) =
        TestServer::spawn_with_admin(backend, |s: &mut Settings| s.auth.access_token_ttl_secs = 2)
            .await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    // The token expires while connected: the documented "reconnect with a fresh
    // token" code.
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &alice.access_token).await;
    let reason = expect_close(&mut ws, 4002).await;
    assert!(reason.contains("expired"), "{reason}");

    // Signing out closes the session's live connections with "signed out".
    let bob = server.sign_in(&alice.username, common::PASSWORD).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &bob.access_token).await;
    let _: pb::SignOutResponse = rpc(
        &server,
        &bob,
        "AuthService/SignOut",
        &pb::SignOutRequest {
            all_sessions: false,
        },
    )
    .await;
    expect_close(&mut ws, 4501).await;
    // And the token no longer opens a connection.
    let mut ws = WsClient::connect(&url(&server), codec, Some(&bob.access_token)).await;
    expect_close(&mut ws, 4500).await;

    // Reusing a rotated refresh token revokes the session, live connections included.
    let carol = server.sign_in(&alice.username, common::PASSWORD).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &carol.access_token).await;
    let request = pb::RefreshRequest {
        refresh_token: carol.refresh_token.clone(),
    };
    let next: pb::RefreshResponse = rpc(&server, &carol, "AuthService/Refresh", &request).await;
    // The chain moves on (a rotated token is only honoured again within the
    // short grace period before its successor is used).
    let next = pb::RefreshRequest {
        refresh_token: next.tokens.expect("tokens").refresh_token,
    };
    let _: pb::RefreshResponse = rpc(&server, &carol, "AuthService/Refresh", &next).await;
    let reused: Result<pb::RefreshResponse, _> = server
        .rpc()
        .call_proto("AuthService/Refresh", &request)
        .await;
    assert_eq!(
        reused.expect_err("reuse is refused").code,
        "unauthenticated"
    );
    expect_close(&mut ws, 4501).await;

    // Revoking an API key closes the connections authenticated with it.
    let admin = server.sign_in("admin", common::PASSWORD).await;
    let created: pb::CreateApiKeyResponse = rpc(
        &server,
        &admin,
        "AuthService/CreateApiKey",
        &pb::CreateApiKeyRequest {
            name: "ingest".into(),
        },
    )
    .await;
    let key = created.key.expect("key");
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &created.secret).await;
    let _: pb::RevokeApiKeyResponse = rpc(
        &server,
        &admin,
        "AuthService/RevokeApiKey",
        &pb::RevokeApiKeyRequest { id: key.id },
    )
    .await;
    expect_close(&mut ws, 4501).await;
}

async fn authentication_rules(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s: &mut Settings| {
        s.realtime.auth_deadline_ms = 400
    })
    .await;
    let alice = server.sign_up(&common::unique_name("alice")).await;

    // Frames before authentication are refused, then the first-frame handshake works.
    let mut ws = WsClient::connect(&url(&server), codec, None).await;
    let reply = ws
        .request(In::Subscribe(pb::Subscribe {
            room_id: "r_x".into(),
            since_seq: None,
        }))
        .await;
    match reply.kind {
        Some(Out::Error(e)) => assert_eq!(e.code, "unauthenticated"),
        other => panic!("expected unauthenticated, got {other:?}"),
    }
    let reply = ws
        .request(In::Authenticate(pb::Authenticate {
            access_token: alice.access_token.clone(),
        }))
        .await;
    match reply.kind {
        Some(Out::Authenticated(a)) => assert_eq!(a.user.expect("user").id, alice.user_id),
        other => panic!("expected authenticated, got {other:?}"),
    }
    let reply = ws.request(In::Ping(pb::Ping {})).await;
    assert!(matches!(reply.kind, Some(Out::Pong(_))));

    // A bad token closes with AUTH_FAILED.
    let mut ws = WsClient::connect(&url(&server), codec, Some("not-a-token")).await;
    expect_close(&mut ws, 4500).await;
    // So does staying silent past the deadline.
    let mut ws = WsClient::connect(&url(&server), codec, None).await;
    let reason = expect_close(&mut ws, 4500).await;
    assert!(reason.contains("in time"), "{reason}");
    // A query-parameter token works too (browsers cannot set headers).
    let mut ws = WsClient::connect(
        &server.ws_url(&format!("/ws?access_token={}", alice.access_token)),
        codec,
        None,
    )
    .await;
    match ws.next_frame(WAIT).await {
        Incoming::Frame(pb::ServerFrame {
            kind: Some(Out::Authenticated(_)),
            ..
        }) => {}
        other => panic!("expected authenticated, got {other:?}"),
    }
}

async fn bad_frames_and_limits(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s: &mut Settings| {
        s.realtime.max_frame_bytes = 2048;
        s.realtime.max_subscriptions = 2;
        s.realtime.send_rate_per_sec = 2;
        s.realtime.send_burst = 3;
    })
    .await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let room = create_room(&server, &alice, pb::RoomKind::Public).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &alice.access_token).await;

    // Malformed JSON and protobuf get an error frame, and the connection lives on.
    ws.send_raw(Message::text("{not json")).await;
    match ws.next_frame(WAIT).await {
        Incoming::Frame(pb::ServerFrame {
            id: 0,
            kind: Some(Out::Error(e)),
        }) => {
            assert_eq!(e.code, "invalid_argument");
            assert!(e.message.contains("JSON"), "{e:?}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    ws.send_raw(Message::binary(vec![0xff, 0xff, 0xff, 0xff]))
        .await;
    match ws.next_frame(WAIT).await {
        Incoming::Frame(pb::ServerFrame {
            kind: Some(Out::Error(e)),
            ..
        }) => assert_eq!(e.code, "invalid_argument"),
        other => panic!("expected an error frame, got {other:?}"),
    }
    // Wrong field types in JSON.
    ws.send_raw(Message::text(r#"{"id": 9, "subscribe": {"roomId": 42}}"#))
        .await;
    match ws.next_frame(WAIT).await {
        Incoming::Frame(pb::ServerFrame {
            kind: Some(Out::Error(e)),
            ..
        }) => assert_eq!(e.code, "invalid_argument"),
        other => panic!("expected an error frame, got {other:?}"),
    }
    // Unknown frame types answer with the request id.
    ws.send_raw(Message::text(r#"{"id": 7, "teleport": {}}"#))
        .await;
    let reply = ws.await_reply(7).await;
    match reply.kind {
        Some(Out::Error(e)) => {
            assert_eq!(e.code, "invalid_argument");
            assert!(e.message.contains("frame type"), "{e:?}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // Every frame needs a request id.
    ws.send_frame(&pb::ClientFrame {
        id: 0,
        kind: Some(In::Ping(pb::Ping {})),
    })
    .await;
    match ws.next_frame(WAIT).await {
        Incoming::Frame(pb::ServerFrame {
            id: 0,
            kind: Some(Out::Error(e)),
        }) => {
            assert_eq!(e.code, "invalid_argument");
            assert!(e.message.contains("id"), "{e:?}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    // A resume point beyond the room's history is refused, not silently skipped.
    let error = expect_error(ws.subscribe(&room, Some(1_000)).await, "out_of_range");
    assert!(error.message.contains("1000"), "{error:?}");
    // Typing needs a subscription, and only senders may type.
    let reply = ws
        .request(In::Typing(pb::Typing {
            room_id: room.clone(),
        }))
        .await;
    assert!(matches!(reply.kind, Some(Out::Error(e)) if e.code == "failed_precondition"));
    let bob = server.sign_up(&common::unique_name("bob")).await;
    let mut bob_ws = WsClient::connect_authenticated(&url(&server), codec, &bob.access_token).await;
    bob_ws
        .subscribe(&room, None)
        .await
        .expect("anyone reads a public room");
    let reply = bob_ws
        .request(In::Typing(pb::Typing {
            room_id: room.clone(),
        }))
        .await;
    assert!(
        matches!(reply.kind, Some(Out::Error(e)) if e.code == "permission_denied"),
        "non-members cannot type"
    );
    bob_ws.close().await;
    let pong = ws.request(In::Ping(pb::Ping {})).await;
    assert!(
        matches!(pong.kind, Some(Out::Pong(_))),
        "still serving after bad frames"
    );

    // Sends to unknown rooms and invalid sends.
    expect_error(ws.send_message("r_nope", "hi", "").await, "not_found");
    expect_error(ws.send_message(&room, "", "").await, "invalid_argument");

    // Subscription limit.
    ws.subscribe(&room, None).await.expect("first");
    let second = create_room(&server, &alice, pb::RoomKind::Public).await;
    ws.subscribe(&second, None).await.expect("second");
    let third = create_room(&server, &alice, pb::RoomKind::Public).await;
    expect_error(ws.subscribe(&third, None).await, "resource_exhausted");
    expect_error(ws.subscribe(&room, None).await, "already_exists");

    // Floods past the rate limit are refused with resource_exhausted, not dropped.
    // The limit is checked before the room is looked up, so the send to an unknown
    // room above took a token: let the bucket (2/s, burst 3) fill up again first.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut refused = 0;
    let mut accepted = 0;
    for i in 0..10 {
        match ws
            .send_message(&room, &format!("flood {i}"), &format!("f{i}"))
            .await
        {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert_eq!(e.code, "resource_exhausted", "{e:?}");
                refused += 1;
            }
        }
    }
    assert!(
        accepted >= 3 && refused >= 1,
        "accepted {accepted}, refused {refused}"
    );

    // An oversized frame closes with 1009.
    let big = format!(
        r#"{{"id": 1, "ping": {{}}, "pad": "{}"}}"#,
        "x".repeat(4096)
    );
    ws.send_raw(Message::text(big)).await;
    expect_close(&mut ws, 1009).await;
}

async fn heartbeat_timeout(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s: &mut Settings| {
        s.realtime.heartbeat_interval_ms = 100;
        s.realtime.idle_timeout_ms = 300;
    })
    .await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let mut ws = WsClient::connect_authenticated(&url(&server), codec, &alice.access_token).await;
    // A client that answers pings stays connected.
    let until = tokio::time::Instant::now() + Duration::from_millis(700);
    while tokio::time::Instant::now() < until {
        if let Incoming::Closed(code, reason) = ws.next_frame(Duration::from_millis(50)).await {
            panic!("closed while answering pings: {code} {reason}");
        }
    }
    // One that goes silent (never reads, so never answers a ping) is closed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let reason = expect_close(&mut ws, 4003).await;
    assert!(reason.contains("heartbeat"), "{reason}");
}

ws_matrix!(authorization, authorization_matrix);
ws_matrix!(sessions, expired_and_signed_out_sessions);
ws_matrix!(authentication, authentication_rules);
ws_matrix!(bad_frames, bad_frames_and_limits);
ws_matrix!(heartbeat, heartbeat_timeout);
