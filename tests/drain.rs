//! Draining one node (AdminService.DrainNode, the same path SIGTERM takes): its
//! live clients are told to reconnect spread over `server.drain_spread_ms`, not
//! all at once; new SSE streams are refused like new WebSockets (503, which nginx
//! passes to another node); and every HTTP reply closes its connection, so a
//! proxy's pooled keep-alive connections end before the node stops listening.
//! tests/admin_drain.rs has the rest of DrainNode; tests/cluster_users.rs the
//! rolling restart of three nodes behind nginx.

mod common;

use std::time::{Duration, Instant};

use common::{
    admin_call,
    ws::{Incoming, WsClient, WsCodec},
    Backend, TestServer,
};
use roomcast::proto::v1 as pb;

/// The spread window of these tests.
const WINDOW: Duration = Duration::from_millis(1_500);
const CLIENTS: usize = 6;

both_backends!(
    drained_clients_are_closed_spread_over_the_window,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |s| {
            s.server.drain_spread_ms = WINDOW.as_millis() as u64;
        })
        .await;
        let url = server.ws_url("/ws");
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            let user = server.sign_up(&format!("spread{i}")).await;
            clients.push(
                WsClient::connect_authenticated(&url, WsCodec::Proto, &user.access_token).await,
            );
        }
        let asked = Instant::now();
        let reply: pb::DrainNodeResponse = admin_call(
            &server,
            &admin,
            "DrainNode",
            &pb::DrainNodeRequest {
                reason: "rolling deploy".into(),
            },
        )
        .await;
        assert_eq!(reply.users_closed as usize, CLIENTS);
        // Each client reads until its close, all at the same time.
        let closes = futures_util::future::join_all(clients.into_iter().map(|mut ws| async move {
            loop {
                match ws.next_push(WINDOW * 4).await {
                    Incoming::Closed(code, _) => return (code, asked.elapsed()),
                    Incoming::Frame(_) => continue,
                    Incoming::Timeout => panic!("a client was not closed within {:?}", WINDOW * 4),
                }
            }
        }))
        .await;
        let mut at: Vec<Duration> = closes
            .iter()
            .map(|(code, at)| {
                assert_eq!(
                    *code, 4001,
                    "drained clients are told to reconnect elsewhere"
                );
                *at
            })
            .collect();
        at.sort();
        // User i of n is told at i/n of the window: the last at 5/6 of it, the
        // first at once. All at once would put every close near 0.
        let spread = at[CLIENTS - 1] - at[0];
        assert!(
            spread >= WINDOW / 2,
            "the closes were not spread over the {WINDOW:?} window: {at:?}"
        );
        assert!(
            at[0] < WINDOW / 2,
            "the first client waited for the window: {at:?}"
        );
    }
);

both_backends!(
    a_draining_node_refuses_new_sse_streams_and_closes_keep_alive_connections,
    |backend: Backend| async move {
        let (server, admin) = TestServer::spawn_with_admin(backend, |_| {}).await;
        let user = server.sign_up("streamer").await;
        let http = server.http();
        // Before the drain: an SSE stream opens, and replies keep the connection.
        let sse = http
            .get(server.url("/sse?notifications=live"))
            .bearer_auth(&user.access_token)
            .send()
            .await
            .expect("GET /sse");
        assert_eq!(sse.status(), 200);
        drop(sse);
        let me = http
            .post(server.url("/roomcast.v1.UserService/GetMe"))
            .bearer_auth(&user.access_token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("GetMe");
        assert_eq!(me.status(), 200);
        assert_ne!(
            me.headers().get("connection").and_then(|v| v.to_str().ok()),
            Some("close")
        );

        let _: pb::DrainNodeResponse = admin_call(
            &server,
            &admin,
            "DrainNode",
            &pb::DrainNodeRequest {
                reason: "maintenance".into(),
            },
        )
        .await;
        // A new SSE stream is refused with 503 and a Connect error, as a WebSocket is.
        let refused = http
            .get(server.url("/sse?notifications=live"))
            .bearer_auth(&user.access_token)
            .send()
            .await
            .expect("GET /sse while draining");
        assert_eq!(refused.status(), 503);
        let body = refused.text().await.expect("the refusal's body");
        assert!(
            body.contains("unavailable") && body.contains("draining"),
            "{body}"
        );
        // RPCs are still served, each closing its connection after the reply.
        let me = http
            .post(server.url("/roomcast.v1.UserService/GetMe"))
            .bearer_auth(&user.access_token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("GetMe while draining");
        assert_eq!(me.status(), 200);
        assert_eq!(
            me.headers().get("connection").and_then(|v| v.to_str().ok()),
            Some("close"),
            "a draining node closes keep-alive connections after each reply"
        );
    }
);
