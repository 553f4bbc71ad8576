//! Room history over HTTP (SendMessage, ListMessages, EditMessage, DeleteMessage,
//! MarkRead) in both codecs, and the live events it produces over WebSocket
//! (edited, deleted, typing, presence, member events), on SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{
    expect_error,
    rooms::{create_room, join},
    ws::{Incoming, WsClient, WsCodec},
    Codec, TestServer,
};
use roomcast::proto::v1 as pb;

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const WAIT: Duration = Duration::from_secs(10);

fn send_req(room: &str, text: &str) -> pb::SendMessageRequest {
    pb::SendMessageRequest {
        room_id: room.into(),
        text: text.into(),
        ..Default::default()
    }
}

both_backends!(send_list_edit_delete, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| s.rooms.max_message_bytes = 100).await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let bob = server.sign_up(&common::unique_name("bob")).await;
    let room = create_room(&server, &alice, pb::RoomKind::Public).await;
    join(&server, &bob, &room).await;
    for (who, codec) in [(&alice, Codec::Json), (&bob, Codec::Proto)] {
        let rpc = server.rpc_as(&who.access_token);
        for i in 0..5 {
            let mut req = send_req(&room, &format!("{} says {i}", who.username));
            req.metadata.insert("lang".into(), "en".into());
            let sent: pb::SendMessageResponse = rpc
                .call(codec, "RoomService/SendMessage", &req)
                .await
                .expect("send");
            let message = sent.message.expect("message");
            assert_eq!(message.sender_id, who.user_id);
            assert_eq!(message.metadata.get("lang").map(String::as_str), Some("en"));
            assert!(message.created_at.is_some());
        }
    }
    let alice_rpc = server.rpc_as(&alice.access_token);
    let bob_rpc = server.rpc_as(&bob.access_token);

    // Replies must point at an existing message.
    let mut reply = send_req(&room, "answering 2");
    reply.reply_to_seq = 2;
    let sent: pb::SendMessageResponse = alice_rpc
        .call(Codec::Json, "RoomService/SendMessage", &reply)
        .await
        .expect("reply");
    assert_eq!(sent.message.expect("m").reply_to_seq, 2);
    reply.reply_to_seq = 999;
    expect_error(
        alice_rpc
            .call::<_, pb::SendMessageResponse>(Codec::Proto, "RoomService/SendMessage", &reply)
            .await,
        "not_found",
        404,
    );

    // Bad input.
    for (req, what) in [
        (send_req(&room, ""), "empty text"),
        (send_req(&room, &"x".repeat(101)), "text over the limit"),
        (
            pb::SendMessageRequest {
                client_message_id: "c".repeat(65),
                ..send_req(&room, "hi")
            },
            "long client id",
        ),
    ] {
        let result: Result<pb::SendMessageResponse, _> = alice_rpc
            .call(Codec::Json, "RoomService/SendMessage", &req)
            .await;
        let message = expect_error(result, "invalid_argument", 400);
        assert!(!message.is_empty(), "{what}");
    }
    let mut too_much = send_req(&room, "meta");
    for i in 0..17 {
        too_much.metadata.insert(format!("k{i}"), "v".into());
    }
    expect_error(
        alice_rpc
            .call::<_, pb::SendMessageResponse>(Codec::Json, "RoomService/SendMessage", &too_much)
            .await,
        "invalid_argument",
        400,
    );

    // Edits: only the author; the history shows the edited text and an EDIT event.
    let edit = pb::EditMessageRequest {
        room_id: room.clone(),
        seq: 1,
        text: "alice says 0 (edited)".into(),
    };
    expect_error(
        bob_rpc
            .call::<_, pb::EditMessageResponse>(Codec::Json, "RoomService/EditMessage", &edit)
            .await,
        "permission_denied",
        403,
    );
    let edited: pb::EditMessageResponse = alice_rpc
        .call(Codec::Proto, "RoomService/EditMessage", &edit)
        .await
        .expect("edit");
    let event = edited.message.expect("event");
    assert_eq!(
        (event.kind, event.target_seq, event.seq),
        (pb::MessageKind::Edit as i32, 1, 12)
    );

    // Deletes: the author or a moderator; a tombstone stays in history.
    let delete = pb::DeleteMessageRequest {
        room_id: room.clone(),
        seq: 6,
    };
    let deleted: pb::DeleteMessageResponse = alice_rpc
        .call(Codec::Json, "RoomService/DeleteMessage", &delete)
        .await
        .expect("owner deletes bob's message");
    assert_eq!(
        deleted.message.expect("event").kind,
        pb::MessageKind::Delete as i32
    );
    let delete_alices = pb::DeleteMessageRequest {
        room_id: room.clone(),
        seq: 2,
    };
    expect_error(
        bob_rpc
            .call::<_, pb::DeleteMessageResponse>(
                Codec::Json,
                "RoomService/DeleteMessage",
                &delete_alices,
            )
            .await,
        "permission_denied",
        403,
    );
    let edit_deleted = pb::EditMessageRequest {
        room_id: room.clone(),
        seq: 6,
        text: "zombie".into(),
    };
    expect_error(
        bob_rpc
            .call::<_, pb::EditMessageResponse>(
                Codec::Json,
                "RoomService/EditMessage",
                &edit_deleted,
            )
            .await,
        "failed_precondition",
        400,
    );
    let missing = pb::EditMessageRequest {
        room_id: room.clone(),
        seq: 500,
        text: "nope".into(),
    };
    expect_error(
        alice_rpc
            .call::<_, pb::EditMessageResponse>(Codec::Json, "RoomService/EditMessage", &missing)
            .await,
        "not_found",
        404,
    );

    // Deleting an edited message leaves no readable copy in its edit events.
    let edit3 = pb::EditMessageRequest {
        room_id: room.clone(),
        seq: 3,
        text: "secret".into(),
    };
    let _: pb::EditMessageResponse = alice_rpc
        .call(Codec::Json, "RoomService/EditMessage", &edit3)
        .await
        .expect("edit 3");
    let del3 = pb::DeleteMessageRequest {
        room_id: room.clone(),
        seq: 3,
    };
    let _: pb::DeleteMessageResponse = alice_rpc
        .call(Codec::Json, "RoomService/DeleteMessage", &del3)
        .await
        .expect("delete 3");
    let all: pb::ListMessagesResponse = bob_rpc
        .call(
            Codec::Json,
            "RoomService/ListMessages",
            &pb::ListMessagesRequest {
                room_id: room.clone(),
                after_seq: 0,
                limit: 200,
                ..Default::default()
            },
        )
        .await
        .expect("all");
    assert!(
        all.messages.iter().all(|m| !m.text.contains("secret")),
        "deleted text is gone everywhere"
    );
    let edit_event = all
        .messages
        .iter()
        .find(|m| m.kind == pb::MessageKind::Edit as i32 && m.target_seq == 3)
        .expect("edit event");
    assert!(edit_event.text.is_empty());

    // History: ascending pages after and before a sequence.
    let page: pb::ListMessagesResponse = bob_rpc
        .call(
            Codec::Proto,
            "RoomService/ListMessages",
            &pb::ListMessagesRequest {
                room_id: room.clone(),
                limit: 5,
                ..Default::default()
            },
        )
        .await
        .expect("first page");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(page.has_more);
    assert_eq!(page.last_seq, 15);
    assert_eq!(page.messages[0].text, "alice says 0 (edited)");
    assert!(page.messages[0].edited_at.is_some());
    let page: pb::ListMessagesResponse = bob_rpc
        .call(
            Codec::Json,
            "RoomService/ListMessages",
            &pb::ListMessagesRequest {
                room_id: room.clone(),
                after_seq: 5,
                limit: 200,
                ..Default::default()
            },
        )
        .await
        .expect("rest");
    assert_eq!(page.messages.first().map(|m| m.seq), Some(6));
    assert!(
        page.messages[0].deleted && page.messages[0].text.is_empty(),
        "a tombstone"
    );
    assert_eq!(page.messages.last().map(|m| m.seq), Some(15));
    assert!(!page.has_more);
    let page: pb::ListMessagesResponse = bob_rpc
        .call(
            Codec::Json,
            "RoomService/ListMessages",
            &pb::ListMessagesRequest {
                room_id: room.clone(),
                before_seq: 4,
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .expect("before");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(page.has_more);
    let too_big = pb::ListMessagesRequest {
        room_id: room.clone(),
        limit: 10_000,
        ..Default::default()
    };
    expect_error(
        bob_rpc
            .call::<_, pb::ListMessagesResponse>(Codec::Json, "RoomService/ListMessages", &too_big)
            .await,
        "invalid_argument",
        400,
    );

    // Read cursors and unread counts.
    let marked: pb::MarkReadResponse = bob_rpc
        .call(
            Codec::Json,
            "RoomService/MarkRead",
            &pb::MarkReadRequest {
                room_id: room.clone(),
                seq: 10,
            },
        )
        .await
        .expect("mark read");
    assert_eq!((marked.last_read_seq, marked.unread_count), (10, 5));
    let back: pb::MarkReadResponse = bob_rpc
        .call(
            Codec::Proto,
            "RoomService/MarkRead",
            &pb::MarkReadRequest {
                room_id: room.clone(),
                seq: 3,
            },
        )
        .await
        .expect("mark read backwards");
    assert_eq!(back.last_read_seq, 10, "a read cursor never moves back");
    let rooms: pb::ListRoomsResponse = bob_rpc
        .call(
            Codec::Json,
            "RoomService/ListRooms",
            &pb::ListRoomsRequest::default(),
        )
        .await
        .expect("list rooms");
    let listed = rooms
        .rooms
        .iter()
        .find(|r| r.id == room)
        .expect("bob's room");
    assert_eq!((listed.unread_count, listed.last_read_seq), (5, 10));

    // Outsiders of a private room see nothing.
    let carol = server.sign_up(&common::unique_name("carol")).await;
    let private = create_room(&server, &alice, pb::RoomKind::Private).await;
    let carol_rpc = server.rpc_as(&carol.access_token);
    expect_error(
        carol_rpc
            .call::<_, pb::ListMessagesResponse>(
                Codec::Json,
                "RoomService/ListMessages",
                &pb::ListMessagesRequest {
                    room_id: private.clone(),
                    ..Default::default()
                },
            )
            .await,
        "not_found",
        404,
    );
    expect_error(
        carol_rpc
            .call::<_, pb::SendMessageResponse>(
                Codec::Proto,
                "RoomService/SendMessage",
                &send_req(&private, "hi"),
            )
            .await,
        "not_found",
        404,
    );
});

both_backends!(live_events, |backend| async move {
    let server = TestServer::spawn(backend).await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let bob = server.sign_up(&common::unique_name("bob")).await;
    let room = create_room(&server, &alice, pb::RoomKind::Public).await;
    let url = server.ws_url("/ws");
    let mut alice_ws =
        WsClient::connect_authenticated(&url, WsCodec::Json, &alice.access_token).await;
    alice_ws.subscribe(&room, None).await.expect("subscribe");

    // A member joining is announced; so is their coming online.
    join(&server, &bob, &room).await;
    let joined = alice_ws
        .push_matching(WAIT, |k| match k {
            Out::Member(m) if m.kind == pb::MemberEventKind::Joined as i32 => Some(m.clone()),
            _ => None,
        })
        .await;
    assert_eq!(joined.user_id, bob.user_id);
    let mut bob_ws = WsClient::connect_authenticated(&url, WsCodec::Proto, &bob.access_token).await;
    let online = alice_ws
        .push_matching(WAIT, |k| match k {
            Out::Presence(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (online.user_id.as_str(), online.online),
        (bob.user_id.as_str(), true)
    );
    let members: pb::ListMembersResponse = server
        .rpc_as(&alice.access_token)
        .call_proto(
            "RoomService/ListMembers",
            &pb::ListMembersRequest {
                room_id: room.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("members");
    let bob_member = members
        .members
        .iter()
        .find(|m| m.user_id == bob.user_id)
        .expect("bob listed");
    assert!(bob_member.online, "bob has a live connection");
    bob_ws.subscribe(&room, None).await.expect("bob subscribes");

    // Typing is relayed to others, not echoed.
    let ack = bob_ws
        .request(In::Typing(pb::Typing {
            room_id: room.clone(),
        }))
        .await;
    assert!(matches!(ack.kind, Some(Out::Ack(_))));
    let typing = alice_ws
        .push_matching(WAIT, |k| match k {
            Out::Typing(t) => Some(t.clone()),
            _ => None,
        })
        .await;
    assert_eq!(typing.user_id, bob.user_id);

    // Edits and deletions arrive as their own pushes, in sequence.
    let sent = bob_ws
        .send_message(&room, "typo teh", "b1")
        .await
        .expect("send");
    let seq = sent.message.expect("m").seq;
    let _: pb::EditMessageResponse = server
        .rpc_as(&bob.access_token)
        .call_proto(
            "RoomService/EditMessage",
            &pb::EditMessageRequest {
                room_id: room.clone(),
                seq,
                text: "typo the".into(),
            },
        )
        .await
        .expect("edit");
    let _: pb::DeleteMessageResponse = server
        .rpc_as(&alice.access_token)
        .call_proto(
            "RoomService/DeleteMessage",
            &pb::DeleteMessageRequest {
                room_id: room.clone(),
                seq,
            },
        )
        .await
        .expect("delete");
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        if let Incoming::Frame(frame) = alice_ws.next_push(WAIT).await {
            match frame.kind {
                Some(Out::Message(m)) => kinds.push(("message", m.seq)),
                Some(Out::Edited(m)) => kinds.push(("edited", m.seq)),
                Some(Out::Deleted(m)) => kinds.push(("deleted", m.seq)),
                _ => {}
            }
        } else {
            panic!("connection ended");
        }
    }
    assert_eq!(
        kinds,
        vec![("message", seq), ("edited", seq + 1), ("deleted", seq + 2)]
    );

    // Read cursors over the socket.
    let marked = alice_ws
        .request(In::MarkRead(pb::MarkReadRequest {
            room_id: room.clone(),
            seq: seq + 2,
        }))
        .await;
    match marked.kind {
        Some(Out::MarkedRead(m)) => assert_eq!((m.last_read_seq, m.unread_count), (seq + 2, 0)),
        other => panic!("expected markedRead, got {other:?}"),
    }

    // Bob going offline is announced.
    bob_ws.close().await;
    let offline = alice_ws
        .push_matching(WAIT, |k| match k {
            Out::Presence(p) if !p.online => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(offline.user_id, bob.user_id);
});

both_backends!(direct_rooms_and_retention, |backend| async move {
    let server = TestServer::spawn_with(backend, |s| s.rooms.retention_sweep_secs = 1).await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let bob = server.sign_up(&common::unique_name("bob")).await;
    let alice_rpc = server.rpc_as(&alice.access_token);
    let bob_rpc = server.rpc_as(&bob.access_token);

    // In a direct room the two parties are equals: neither deletes the other's messages.
    let direct: pb::CreateRoomResponse = alice_rpc
        .call_proto(
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Direct as i32,
                member_ids: vec![bob.user_id.clone()],
                ..Default::default()
            },
        )
        .await
        .expect("direct room");
    let direct = direct.room.expect("room").id;
    let sent: pb::SendMessageResponse = bob_rpc
        .call_proto("RoomService/SendMessage", &send_req(&direct, "hi alice"))
        .await
        .expect("bob sends");
    let seq = sent.message.expect("m").seq;
    let result: Result<pb::DeleteMessageResponse, _> = alice_rpc
        .call_proto(
            "RoomService/DeleteMessage",
            &pb::DeleteMessageRequest {
                room_id: direct.clone(),
                seq,
            },
        )
        .await;
    expect_error(result, "permission_denied", 403);

    // Retention is bounded, and expired history is pruned while the sequence goes on.
    let too_long = pb::CreateRoomRequest {
        kind: pb::RoomKind::Public as i32,
        title: "forever and a day".into(),
        retention_seconds: u64::MAX,
        ..Default::default()
    };
    expect_error(
        alice_rpc
            .call_proto::<_, pb::CreateRoomResponse>("RoomService/CreateRoom", &too_long)
            .await,
        "invalid_argument",
        400,
    );
    let short = pb::CreateRoomRequest {
        kind: pb::RoomKind::Public as i32,
        title: "ephemeral".into(),
        retention_seconds: 1,
        ..Default::default()
    };
    let room: pb::CreateRoomResponse = alice_rpc
        .call_proto("RoomService/CreateRoom", &short)
        .await
        .expect("short retention");
    let room = room.room.expect("room").id;
    let _: pb::SendMessageResponse = alice_rpc
        .call_proto("RoomService/SendMessage", &send_req(&room, "soon gone"))
        .await
        .expect("send");
    let list = || async {
        let page: pb::ListMessagesResponse = alice_rpc
            .call_proto(
                "RoomService/ListMessages",
                &pb::ListMessagesRequest {
                    room_id: room.clone(),
                    ..Default::default()
                },
            )
            .await
            .expect("list");
        page
    };
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            list().await.messages.is_empty()
        })
        .await,
        "pruned after retention"
    );
    assert_eq!(list().await.last_seq, 1, "pruning keeps the sequence");
    let next: pb::SendMessageResponse = alice_rpc
        .call_proto("RoomService/SendMessage", &send_req(&room, "next"))
        .await
        .expect("send");
    assert_eq!(next.message.expect("m").seq, 2);
});

/// The send rate limit, like the sign-in limits, tells the client when to retry:
/// in the message, as `Retry-After` (whole seconds, rounded up) and as a
/// `google.rpc.RetryInfo` detail.
#[tokio::test]
async fn send_rate_limit_says_when_to_retry() {
    let server = TestServer::spawn_with(common::Backend::Sqlite, |s| {
        s.realtime.send_rate_per_sec = 1;
        s.realtime.send_burst = 2;
    })
    .await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let room = create_room(&server, &alice, pb::RoomKind::Public).await;
    let rpc = server.rpc_as(&alice.access_token);
    let mut refused = None;
    for i in 0..4 {
        let body = serde_json::json!({ "roomId": room, "text": format!("burst {i}") });
        let (status, reply) = rpc.call_json("RoomService/SendMessage", body).await;
        if status == 429 {
            refused = Some(reply);
            break;
        }
        assert_eq!(status, 200, "{reply}");
    }
    let reply = refused.expect("the third send within a second is refused");
    assert_eq!(reply["code"], "resource_exhausted", "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("retry in"), "{message}");
    assert_eq!(
        reply["details"][0]["type"], "google.rpc.RetryInfo",
        "{reply}"
    );
    let response = server
        .http()
        .post(format!(
            "{}/roomcast.v1.RoomService/SendMessage",
            server.base_url()
        ))
        .bearer_auth(&alice.access_token)
        .header("content-type", "application/json")
        .body(serde_json::json!({ "roomId": room, "text": "again" }).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After header in seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
}
