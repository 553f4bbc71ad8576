//! Behaviour the documentation states in so many words (docs/websocket.md,
//! docs/api.md, the comments of the .proto files), checked over real sockets so the
//! two cannot drift apart again: the text of an EDIT after its target is deleted,
//! API keys on the WebSocket, request id 0, and the malformed-frame threshold before
//! close 4502.

mod common;

use std::time::Duration;

use common::{
    rooms,
    ws::{Incoming, WsClient, WsCodec},
    Backend, Codec, TestServer,
};
use roomcast::proto::v1 as pb;
use tokio_tungstenite::tungstenite::Message;

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

/// The number of malformed frames a connection may send; the next one closes it
/// with 4502 (docs/websocket.md, "Close codes").
const DOCUMENTED_MALFORMED_FRAMES: usize = 20;

both_backends!(
    an_edit_event_loses_its_text_when_its_target_is_deleted,
    |backend| async move {
        let server = TestServer::spawn(backend).await;
        let alice = server.sign_up("alice").await;
        let room_id = rooms::create_room(&server, &alice, pb::RoomKind::Public).await;
        let rpc = server.rpc_as(&alice.access_token);
        rooms::send_http(&server, &alice, &room_id, "the first draft", "c1").await;
        let _: pb::EditMessageResponse = rpc
            .call(
                Codec::Proto,
                "RoomService/EditMessage",
                &pb::EditMessageRequest {
                    room_id: room_id.clone(),
                    seq: 1,
                    text: "the second draft".into(),
                },
            )
            .await
            .expect("edit");
        let _: pb::DeleteMessageResponse = rpc
            .call(
                Codec::Proto,
                "RoomService/DeleteMessage",
                &pb::DeleteMessageRequest {
                    room_id: room_id.clone(),
                    seq: 1,
                },
            )
            .await
            .expect("delete");
        let history = rooms::history(&server, &alice, &room_id).await;
        let kinds: Vec<i32> = history.iter().map(|m| m.kind).collect();
        assert_eq!(
            kinds,
            [
                pb::MessageKind::Text as i32,
                pb::MessageKind::Edit as i32,
                pb::MessageKind::Delete as i32
            ]
        );
        // rooms.proto: the TEXT is a tombstone, and the EDIT keeps its place in the
        // sequence but no longer carries the deleted content.
        assert!(history[0].deleted);
        assert_eq!(history[0].text, "");
        assert_eq!(history[1].target_seq, 1);
        assert_eq!(
            history[1].text, "",
            "the EDIT's text is cleared with its target"
        );
    }
);

#[tokio::test]
async fn an_api_key_authenticates_a_websocket_but_cannot_act_as_a_user() {
    let (server, admin) = TestServer::spawn_with_admin(Backend::Sqlite, |_| {}).await;
    let key: pb::CreateApiKeyResponse = server
        .rpc_as(&admin.access_token)
        .call(
            Codec::Proto,
            "AuthService/CreateApiKey",
            &pb::CreateApiKeyRequest {
                name: "backend".into(),
            },
        )
        .await
        .expect("create an API key");
    let alice = server.sign_up("alice").await;
    let room_id = rooms::create_room(&server, &alice, pb::RoomKind::Public).await;

    let mut ws = WsClient::connect(&server.ws_url("/ws"), WsCodec::Json, Some(&key.secret)).await;
    // Accepted: `authenticated`, without a user.
    match ws.next_frame(Duration::from_secs(10)).await {
        Incoming::Frame(pb::ServerFrame {
            kind: Some(Out::Authenticated(authenticated)),
            ..
        }) => assert!(authenticated.user.is_none(), "an API key is not a user"),
        other => panic!("expected `authenticated`, got {other:?}"),
    }
    // Every room frame is refused, with a message that says why.
    for kind in [
        In::Subscribe(pb::Subscribe {
            room_id: room_id.clone(),
            since_seq: None,
        }),
        In::Send(pb::SendMessageRequest {
            room_id: room_id.clone(),
            text: "hi".into(),
            ..Default::default()
        }),
    ] {
        let reply = ws.request(kind).await;
        match reply.kind {
            Some(Out::Error(error)) => {
                assert_eq!(error.code, "permission_denied", "{error:?}");
                assert!(
                    error.message.contains("API key"),
                    "the refusal names the reason: {error:?}"
                );
            }
            other => panic!("expected permission_denied, got {other:?}"),
        }
    }
    // The connection stays usable for what needs no user.
    let reply = ws.request(In::Ping(pb::Ping {})).await;
    assert!(matches!(reply.kind, Some(Out::Pong(_))), "{reply:?}");
}

#[tokio::test]
async fn request_id_zero_is_refused_and_twenty_malformed_frames_are_tolerated() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let alice = server.sign_up("alice").await;
    for codec in [WsCodec::Json, WsCodec::Proto] {
        let mut ws =
            WsClient::connect_authenticated(&server.ws_url("/ws"), codec, &alice.access_token)
                .await;
        // realtime.proto: a frame with id 0 is refused with an error of id 0.
        ws.send_frame(&pb::ClientFrame {
            id: 0,
            kind: Some(In::Ping(pb::Ping {})),
        })
        .await;
        match ws.next_frame(Duration::from_secs(10)).await {
            Incoming::Frame(pb::ServerFrame {
                id: 0,
                kind: Some(Out::Error(error)),
            }) => {
                assert_eq!(error.code, "invalid_argument");
                assert!(error.message.contains("non-zero id"), "{error:?}");
            }
            other => panic!("expected an error for id 0, got {other:?}"),
        }
        // That was malformed frame 1; up to the documented 20 are answered...
        for _ in 1..DOCUMENTED_MALFORMED_FRAMES {
            let garbage = match codec {
                WsCodec::Json => Message::text("{not json"),
                WsCodec::Proto => Message::binary(vec![0xff, 0xff, 0xff]),
            };
            ws.send_raw(garbage).await;
            match ws.next_frame(Duration::from_secs(10)).await {
                Incoming::Frame(pb::ServerFrame {
                    kind: Some(Out::Error(error)),
                    ..
                }) => assert_eq!(error.code, "invalid_argument"),
                other => panic!("expected an error frame, got {other:?}"),
            }
        }
        // ... and the connection still works,
        let reply = ws.request(In::Ping(pb::Ping {})).await;
        assert!(matches!(reply.kind, Some(Out::Pong(_))), "{reply:?}");
        // ... until the 21st, which closes it with 4502.
        ws.send_raw(Message::text("{still not json")).await;
        let mut closed = None;
        for _ in 0..5 {
            match ws.next_frame(Duration::from_secs(10)).await {
                Incoming::Closed(code, _) => {
                    closed = Some(code);
                    break;
                }
                Incoming::Frame(_) => continue,
                Incoming::Timeout => break,
            }
        }
        assert_eq!(closed, Some(4502), "{codec:?}");
    }
}
