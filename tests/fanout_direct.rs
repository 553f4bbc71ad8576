//! The fan-out shard's direct path (src/actors/fanout_shard.rs): a live WebSocket
//! subscription gets a room's events written by its arbiter's shard straight into
//! its transport, and still sees every event once, in order, interleaved correctly
//! with the connection's own replies; an unsubscribed connection gets nothing more.
//! The metrics are process-wide, so this binary holds one test per backend and codec
//! that only compares counters it alone moves.

mod common;

use std::time::Duration;

use common::{
    rooms::{create_room, send_http},
    ws::{room_event, Incoming, WsClient, WsCodec},
    Backend, TestServer,
};
use roomcast::proto::v1 as pb;

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const IDLE: Duration = Duration::from_secs(20);

async fn direct_total(server: &TestServer) -> f64 {
    server
        .metric("roomcast_messages_delivered_direct_total", &[])
        .await
}

async fn direct_delivery(backend: Backend, codec: WsCodec) {
    const WORKERS: usize = 2;
    const SUBSCRIBERS: usize = 6;
    const FIRST: u64 = 30;
    let server = TestServer::spawn_with(backend, |s| {
        s.server.workers = WORKERS;
        s.realtime.send_rate_per_sec = 100_000;
        s.realtime.send_burst = 100_000;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let ws_url = server.ws_url("/ws");
    let mut clients = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut client =
            WsClient::connect_authenticated(&ws_url, codec, &reader.access_token).await;
        client.subscribe(&room, None).await.expect("subscribe");
        clients.push(client);
    }
    let before = direct_total(&server).await;
    for i in 1..=FIRST {
        let sent = send_http(&server, &owner, &room, &format!("m{i}"), &format!("c{i}")).await;
        assert_eq!(sent.message.expect("message").seq, i);
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let events = client.collect_until(&room, FIRST, IDLE).await;
        let seqs: Vec<u64> = events.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=FIRST).collect::<Vec<_>>(),
            "subscriber {n}: every event once, in order"
        );
        for m in &events {
            assert_eq!(m.text, format!("m{}", m.seq), "subscriber {n}");
        }
    }
    let direct = direct_total(&server).await - before;
    assert!(
        direct > 0.0,
        "live subscriptions get events written by their shard directly (counter moved by {direct})"
    );

    // One leaves: after its `unsubscribed` reply nothing of the room reaches it,
    // while the others still get everything.
    let mut leaver = clients.pop().expect("a client");
    let reply = leaver
        .request(In::Unsubscribe(pb::Unsubscribe {
            room_id: room.clone(),
        }))
        .await;
    assert!(
        matches!(reply.kind, Some(Out::Unsubscribed(_))),
        "{reply:?}"
    );
    leaver.pushes.retain(|frame| room_event(frame).is_none());
    let sent = send_http(&server, &owner, &room, "after", "after").await;
    let last = sent.message.expect("message").seq;
    for client in &mut clients {
        let events = client.collect_until(&room, last, IDLE).await;
        assert_eq!(events.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![last]);
    }
    // A request answered after the others had the event: anything written for the
    // room would have come before this reply.
    let reply = leaver
        .request(In::Unsubscribe(pb::Unsubscribe {
            room_id: room.clone(),
        }))
        .await;
    assert!(matches!(reply.kind, Some(Out::Error(_))), "{reply:?}");
    while let Some(frame) = leaver.pushes.pop_front() {
        assert!(
            room_event(&frame).is_none(),
            "an unsubscribed connection got {frame:?}"
        );
    }
    assert!(matches!(
        leaver.next_push(Duration::from_millis(50)).await,
        Incoming::Timeout
    ));
}

both_backends!(direct_delivery_both_codecs, |backend: Backend| async move {
    direct_delivery(backend, WsCodec::Json).await;
    direct_delivery(backend, WsCodec::Proto).await;
});
