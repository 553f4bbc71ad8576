//! Room helpers over the HTTP API (binary protobuf), shared by the room and
//! WebSocket tests.

use roomcast::proto::v1 as pb;

use super::{Account, TestServer};

/// Creates a room owned by `owner`; answers its id.
pub async fn create_room(server: &TestServer, owner: &Account, kind: pb::RoomKind) -> String {
    let reply: pb::CreateRoomResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: kind as i32,
                title: "test room".into(),
                ..Default::default()
            },
        )
        .await
        .expect("create a room");
    reply.room.expect("a room").id
}

/// Joins `room_id` as `account`.
pub async fn join(server: &TestServer, account: &Account, room_id: &str) {
    let _: pb::JoinRoomResponse = server
        .rpc_as(&account.access_token)
        .call_proto(
            "RoomService/JoinRoom",
            &pb::JoinRoomRequest {
                room_id: room_id.into(),
            },
        )
        .await
        .expect("join the room");
}

/// Sends a message over HTTP; panics on an error.
pub async fn send_http(
    server: &TestServer,
    account: &Account,
    room_id: &str,
    text: &str,
    client_message_id: &str,
) -> pb::SendMessageResponse {
    server
        .rpc_as(&account.access_token)
        .call_proto(
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room_id.into(),
                text: text.into(),
                client_message_id: client_message_id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("send {client_message_id}: {e:?}"))
}

/// Every stored event of a room, in sequence order.
pub async fn history(server: &TestServer, account: &Account, room_id: &str) -> Vec<pb::Message> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page: pb::ListMessagesResponse = server
            .rpc_as(&account.access_token)
            .call_proto(
                "RoomService/ListMessages",
                &pb::ListMessagesRequest {
                    room_id: room_id.into(),
                    after_seq: after,
                    limit: 200,
                    ..Default::default()
                },
            )
            .await
            .expect("list messages");
        after = page.messages.last().map_or(after, |m| m.seq);
        all.extend(page.messages);
        if !page.has_more {
            return all;
        }
    }
}

/// The room's current last sequence, as a client would learn it.
pub async fn last_seq(server: &TestServer, account: &Account, room_id: &str) -> u64 {
    let page: pb::ListMessagesResponse = server
        .rpc_as(&account.access_token)
        .call_proto(
            "RoomService/ListMessages",
            &pb::ListMessagesRequest {
                room_id: room_id.into(),
                before_seq: u64::MAX,
                limit: 1,
                ..Default::default()
            },
        )
        .await
        .expect("list messages");
    page.last_seq
}
