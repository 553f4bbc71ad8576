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

both_backends!(
    many_rooms_sending_at_once_commit_everything_once,
    |backend| async move {
        let server = Arc::new(
            TestServer::spawn_with(backend, |s| {
                s.realtime.send_rate_per_sec = 100_000;
                s.realtime.send_burst = 100_000;
            })
            .await,
        );
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
