//! Group commits across rooms (src/actors/commit_batcher.rs on SQLite; per-room
//! transactions on PostgreSQL): many rooms sending at once get every message
//! acknowledged once, each room's sequence gapless and in commit order, retries
//! with the same client message id answered with the original, also when the
//! retry lands in the same batch as the original.

mod common;

use std::{collections::HashMap, sync::Arc};

use common::{
    rooms::{create_room, history, send_http},
    TestServer,
};
use roomcast::proto::v1 as pb;

const ROOMS: usize = 12;
const SENDS_PER_ROOM: usize = 16;

/// A server whose per-user send limit lets one account send everything at once.
async fn unlimited_server(backend: common::Backend) -> Arc<TestServer> {
    Arc::new(
        TestServer::spawn_with(backend, |s| {
            s.realtime.send_rate_per_sec = 100_000;
            s.realtime.send_burst = 100_000;
        })
        .await,
    )
}

both_backends!(
    many_rooms_sending_at_once_commit_everything_once,
    |backend| async move {
        let server = unlimited_server(backend).await;
        let owner = server.sign_up(&common::unique_name("owner")).await;
        let mut rooms = Vec::new();
        for _ in 0..ROOMS {
            rooms.push(create_room(&server, &owner, pb::RoomKind::Public).await);
        }
        // Every send of every room at once, and each message sent twice with the same
        // client message id (a client retrying before its first ack came back).
        let mut tasks = Vec::new();
        for room in &rooms {
            for i in 0..SENDS_PER_ROOM {
                for _attempt in 0..2 {
                    let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
                    tasks.push(tokio::spawn(async move {
                        let cmid = format!("m{i}");
                        let reply =
                            send_http(&server, &owner, &room, &format!("text {i}"), &cmid).await;
                        let message = reply.message.expect("the stored message");
                        (room, cmid, message.seq, reply.duplicate)
                    }));
                }
            }
        }
        let mut seqs: HashMap<(String, String), Vec<(u64, bool)>> = HashMap::new();
        for task in tasks {
            let (room, cmid, seq, duplicate) = task.await.expect("a sender");
            seqs.entry((room, cmid)).or_default().push((seq, duplicate));
        }
        for ((room, cmid), answers) in &seqs {
            assert_eq!(answers.len(), 2);
            assert_eq!(
                answers[0].0, answers[1].0,
                "{room}/{cmid}: both sends answer with the one stored message"
            );
            assert_eq!(
                answers.iter().filter(|(_, dup)| *dup).count(),
                1,
                "{room}/{cmid}: exactly one of the two is the duplicate: {answers:?}"
            );
        }
        for room in &rooms {
            let stored = history(&server, &owner, room).await;
            let got: Vec<u64> = stored.iter().map(|m| m.seq).collect();
            let want: Vec<u64> = (1..=SENDS_PER_ROOM as u64).collect();
            assert_eq!(got, want, "{room}: every message stored once, gapless");
            for m in &stored {
                let key = (room.clone(), m.client_message_id.clone());
                let (seq, _) = seqs[&key][0];
                assert_eq!(seq, m.seq, "{room}: the ack names the stored sequence");
            }
        }
    }
);

// Replies, edits and deletions land in the same shared transactions as plain
// messages of other rooms: each sees every earlier event of its own room, its
// rejection (a reply to nothing, an edit of a deleted message) stays its own, and
// every room's sequence stays gapless.
both_backends!(
    replies_edits_and_deletions_mixed_across_rooms_commit_in_order,
    |backend| async move {
        let server = unlimited_server(backend).await;
        let owner = server.sign_up(&common::unique_name("owner")).await;
        let mut rooms = Vec::new();
        for _ in 0..ROOMS {
            let room = create_room(&server, &owner, pb::RoomKind::Public).await;
            // seq 1 (to be edited) and seq 2 (to be deleted, then edited: refused).
            send_http(&server, &owner, &room, "first", "first").await;
            send_http(&server, &owner, &room, "second", "second").await;
            rooms.push(room);
        }
        let rpc = Arc::new(server.rpc_as(&owner.access_token));
        let mut tasks = Vec::new();
        for room in &rooms {
            for i in 0..SENDS_PER_ROOM {
                let (rpc, room) = (rpc.clone(), room.clone());
                tasks.push(tokio::spawn(async move {
                    let request = pb::SendMessageRequest {
                        room_id: room.clone(),
                        text: format!("text {i}"),
                        client_message_id: format!("m{i}"),
                        // Every other one replies to seq 1; one replies to nothing.
                        reply_to_seq: match i {
                            3 => 999_999,
                            i if i % 2 == 0 => 1,
                            _ => 0,
                        },
                        ..Default::default()
                    };
                    let reply = rpc
                        .call_proto::<_, pb::SendMessageResponse>(
                            "RoomService/SendMessage",
                            &request,
                        )
                        .await;
                    ("send", i, reply.map(|r| r.message.expect("a message").seq))
                }));
            }
            let (rpc_edit, room_edit) = (rpc.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                let reply = rpc_edit
                    .call_proto::<_, pb::EditMessageResponse>(
                        "RoomService/EditMessage",
                        &pb::EditMessageRequest {
                            room_id: room_edit,
                            seq: 1,
                            text: "first, edited".into(),
                        },
                    )
                    .await;
                ("edit", 0, reply.map(|r| r.message.expect("a message").seq))
            }));
            let (rpc_delete, room_delete) = (rpc.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                let reply = rpc_delete
                    .call_proto::<_, pb::DeleteMessageResponse>(
                        "RoomService/DeleteMessage",
                        &pb::DeleteMessageRequest {
                            room_id: room_delete,
                            seq: 2,
                        },
                    )
                    .await;
                ("delete", 0, reply.map(|_| 0))
            }));
        }
        for task in tasks {
            let (what, i, outcome) = task.await.expect("a task");
            match (what, i) {
                ("send", 3) => {
                    let error = outcome.expect_err("a reply to a message that does not exist");
                    assert_eq!(error.code, "not_found", "{error:?}");
                }
                _ => {
                    outcome.unwrap_or_else(|e| panic!("{what} {i}: {e:?}"));
                }
            }
        }
        for room in &rooms {
            let stored = history(&server, &owner, room).await;
            let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
            // 2 first messages, the sends but the refused reply, one edit, one delete.
            let want: Vec<u64> = (1..=(2 + SENDS_PER_ROOM as u64 - 1 + 2)).collect();
            assert_eq!(
                seqs, want,
                "{room}: gapless, nothing refused took a sequence"
            );
            assert_eq!(stored[0].text, "first, edited", "{room}: the edit applied");
            assert!(stored[1].deleted, "{room}: the deletion applied");
            let replies = stored
                .iter()
                .filter(|m| m.kind == pb::MessageKind::Text as i32 && m.reply_to_seq == 1)
                .count();
            assert_eq!(replies, SENDS_PER_ROOM / 2, "{room}: every reply stored");
        }
    }
);
