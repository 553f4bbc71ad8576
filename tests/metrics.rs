//! Prometheus metrics (`/metrics`), read with a real text-format parser
//! (`prometheus-parse`) after a scripted session: the counters moved by exactly
//! what the clients did and saw.
//!
//! The metrics are process-wide (src/metrics.rs says why), so this binary runs one
//! test, which runs its backends one after the other and compares scrapes taken
//! before and after each step.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    raw_ws,
    rooms::{create_room, join, send_http},
    ws::{room_event, Incoming, WsClient, WsCodec},
    Backend, TestServer,
};
use prometheus_parse::{Scrape, Value};
use roomcast::proto::v1 as pb;

use pb::server_frame::Kind as Out;

const WAIT: Duration = Duration::from_secs(10);

/// One scrape: every sample by its name and sorted labels.
struct Metrics(HashMap<String, f64>);

impl Metrics {
    async fn scrape(server: &TestServer, path: &str) -> Self {
        let response = server
            .http()
            .get(server.url(path))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status().as_u16(), 200);
        let body = response.text().await.expect("body");
        Self::parse(&body)
    }

    fn parse(body: &str) -> Self {
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        let scrape = Scrape::parse(lines).expect("the exposition parses");
        let mut samples = HashMap::new();
        for sample in scrape.samples {
            let mut labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            let key = format!("{}{{{}}}", sample.metric, labels.join(","));
            match sample.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                    samples.insert(key, v);
                }
                Value::Histogram(buckets) => {
                    let count = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
                    samples.insert(key, count);
                }
                Value::Summary(_) => {}
            }
        }
        Metrics(samples)
    }

    /// A sample's value; 0 when absent (a labelled series not yet created).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let key = format!("{name}{{{}}}", labels.join(","));
        self.0.get(&key).copied().unwrap_or(0.0)
    }

    /// How much a sample moved since `before`.
    fn delta(&self, before: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels) - before.get(name, labels)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_session_moves_the_counters_by_what_happened() {
    session(Backend::Sqlite).await;
    send_rate_limit().await;
    auth_limits_by_rule().await;
    pruned_history_gap().await;
    live_room().await;
    fanout_shard_queue().await;
    store_pool_of_one(Backend::Sqlite).await;
    if common::postgres_available() {
        session(Backend::Postgres).await;
        store_pool_of_one(Backend::Postgres).await;
    }
}

/// Sums a labelled family's samples (e.g. a histogram's `_count` over every
/// `query`).
fn sum_of(m: &Metrics, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    m.0.iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .map(|(_, v)| v)
        .sum()
}

/// A scrape taken when no store operation holds a pooled connection: then every
/// operation that got a connection has recorded its query time too, so the pool
/// waits (less the failed ones) equal the store operations, exactly. Each store
/// operation records one wait when it asks for its connection and one duration
/// when done with it; waits for the other test of this binary's server count on
/// both sides alike. Panics when the two never agree.
async fn settled_store_scrape(server: &TestServer, path: &str) -> Metrics {
    let mut last = (0.0, 0.0);
    for _ in 0..250 {
        let m = Metrics::scrape(server, path).await;
        let waits = m.get("roomcast_store_pool_wait_seconds_count", &[])
            - m.get("roomcast_store_pool_acquire_failures_total", &[]);
        let queries = sum_of(&m, "roomcast_store_query_duration_seconds_count");
        if waits == queries {
            return m;
        }
        last = (waits, queries);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "successful pool waits ({}) never matched the store operations ({})",
        last.0, last.1
    );
}

/// Every store operation waits for its own pooled connection and never holds one
/// while waiting for a second: a pool of one connection serves a session that
/// runs each composite operation (create a room then read it back, update a room
/// or a profile, join, mark read, refresh a token, concurrent sends) with no
/// failed wait, and each of its store operations is one pool wait and one query
/// observation, exactly.
async fn store_pool_of_one(backend: Backend) {
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            s.store.max_connections = 1;
            // A deadlock on the one connection would show as failed RPCs here,
            // long before a test timeout.
            s.store.acquire_timeout_ms = 5_000;
            s.realtime.send_rate_per_sec = 100_000;
            s.realtime.send_burst = 100_000;
        })
        .await,
    );
    let m0 = settled_store_scrape(&server, "/metrics").await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let member = server.sign_up(&common::unique_name("member")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    join(&server, &member, &room).await;
    let calls = [
        (
            &owner,
            "RoomService/UpdateRoom",
            serde_json::json!({"roomId": room, "title": "renamed"}),
        ),
        (
            &member,
            "UserService/UpdateProfile",
            serde_json::json!({"displayName": "Member"}),
        ),
    ];
    for (account, method, body) in calls {
        let (status, reply) = server
            .rpc_as(&account.access_token)
            .call_json(method, body)
            .await;
        assert_eq!(status, 200, "{method}: {reply}");
    }
    // Concurrent sends: the group commits and the access checks queue for the
    // one connection.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("p{t}");
            send_http(&server, &owner, &room, &id, &id).await
        }));
    }
    let mut last_seq = 0;
    for task in tasks {
        let sent = task.await.expect("sender");
        last_seq = last_seq.max(sent.message.expect("message").seq);
    }
    assert_eq!(last_seq, 8);
    for (account, method, body) in [
        (
            &member,
            "RoomService/MarkRead",
            serde_json::json!({"roomId": room, "seq": last_seq}),
        ),
        (
            &member,
            "AuthService/Refresh",
            serde_json::json!({"refreshToken": member.refresh_token}),
        ),
    ] {
        let (status, reply) = server
            .rpc_as(&account.access_token)
            .call_json(method, body)
            .await;
        assert_eq!(status, 200, "{method}: {reply}");
    }
    let m1 = settled_store_scrape(&server, "/metrics").await;
    let waits = m1.delta(&m0, "roomcast_store_pool_wait_seconds_count", &[]);
    let queries = sum_of(&m1, "roomcast_store_query_duration_seconds_count")
        - sum_of(&m0, "roomcast_store_query_duration_seconds_count");
    assert!(
        waits > 0.0,
        "the session's store operations waited for the pool"
    );
    assert_eq!(waits, queries, "one pool wait per store operation");
    assert_eq!(
        m1.delta(&m0, "roomcast_store_pool_acquire_failures_total", &[]),
        0.0,
        "no operation failed waiting for the one connection"
    );
    // The composite operations ran their parts as separate operations.
    for (query, at_least) in [
        ("create_room", 1.0),
        ("update_room", 1.0),
        ("add_member", 1.0),
        ("update_profile", 1.0),
        ("mark_read", 1.0),
        ("rotate_refresh_token", 1.0),
        ("create_user", 2.0),
    ] {
        let ran = m1.delta(
            &m0,
            "roomcast_store_query_duration_seconds_count",
            &[("query", query)],
        );
        assert!(ran >= at_least, "{query} ran {ran} times");
    }
    assert_eq!(m1.get("roomcast_store_pool_waiters", &[]), 0.0);
    assert!(m1
        .0
        .contains_key("roomcast_store_pool_in_use_connections{}"));
    assert!(m1.0.contains_key("roomcast_store_pool_max_connections{}"));
}

/// Batches a room hands its fan-out shards are on the queue gauges until the
/// shard wrote them: every batch sent is counted, and once the subscribers have
/// read everything the gauges are back at zero.
async fn fanout_shard_queue() {
    const SUBSCRIBERS: usize = 6;
    const SENDS: u64 = 40;
    let server = Arc::new(
        TestServer::spawn_with(Backend::Sqlite, |s| {
            s.server.workers = 2;
            s.realtime.send_rate_per_sec = 100_000;
            s.realtime.send_burst = 100_000;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut clients = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut client = WsClient::connect_authenticated(
            &server.ws_url("/ws"),
            WsCodec::Json,
            &reader.access_token,
        )
        .await;
        client.subscribe(&room, None).await.expect("subscribe");
        clients.push(client);
    }
    let m0 = Metrics::scrape(&server, "/metrics").await;
    assert_eq!(m0.get("roomcast_fanout_shard_queued_batches", &[]), 0.0);
    assert_eq!(m0.get("roomcast_fanout_shard_queued_events", &[]), 0.0);
    // Sends from several tasks while a scraper samples the gauges (a sample above
    // zero is likely but not guaranteed, so it is reported, not asserted).
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (server, sampling) = (server.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut highest = 0.0f64;
            for _ in 0..500 {
                if !sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let m = Metrics::scrape(&server, "/metrics").await;
                highest = highest.max(m.get("roomcast_fanout_shard_queued_events", &[]));
            }
            highest
        })
    };
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..SENDS / 4 {
                let id = format!("q{t}-{i}");
                send_http(&server, &owner, &room, &id, &id).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("sender");
    }
    for client in &mut clients {
        let events = client.collect_until(&room, SENDS, WAIT).await;
        assert_eq!(
            events.len() as u64,
            SENDS,
            "every subscriber reads every event"
        );
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let highest = sampler.await.expect("sampler");
    eprintln!("fan-out shard queue: highest sampled depth {highest} events");
    let m1 = Metrics::scrape(&server, "/metrics").await;
    let batches = m1.delta(&m0, "roomcast_fanout_shard_batches_total", &[]);
    // At least one batch reached a shard; at most one per send per worker.
    assert!(
        (1.0..=(SENDS * 2) as f64).contains(&batches),
        "batches sent to shards: {batches}"
    );
    // A shard counts a batch off once its write call returns, which a client may
    // beat by a moment.
    let drained = common::eventually(WAIT, || {
        let server = server.clone();
        async move {
            let m = Metrics::scrape(&server, "/metrics").await;
            m.get("roomcast_fanout_shard_queued_batches", &[]) == 0.0
                && m.get("roomcast_fanout_shard_queued_events", &[]) == 0.0
        }
    })
    .await;
    assert!(drained, "the shard queue gauges return to zero when idle");
}

/// A second send within the per-user rate is refused and counted by its rule.
async fn send_rate_limit() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.realtime.send_rate_per_sec = 1;
        s.realtime.send_burst = 1;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let m0 = Metrics::scrape(&server, "/metrics").await;
    send_http(&server, &owner, &room, "first", "r1").await;
    let refused = server
        .rpc_as(&owner.access_token)
        .call_proto::<_, pb::SendMessageResponse>(
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.clone(),
                text: "second".into(),
                client_message_id: "r2".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("the second send is over the rate");
    refused.expect("resource_exhausted", 429);
    let m1 = Metrics::scrape(&server, "/metrics").await;
    let rule = [("rule", "send_rate")];
    assert_eq!(m1.delta(&m0, "roomcast_rate_limited_total", &rule), 1.0);
    let exhausted = [
        ("method", "roomcast.v1.RoomService/SendMessage"),
        ("code", "resource_exhausted"),
    ];
    assert_eq!(
        m1.delta(&m0, "roomcast_rpc_requests_total", &exhausted),
        1.0
    );
    assert_eq!(m1.delta(&m0, "roomcast_messages_committed_total", &[]), 1.0);
}

/// A live room: its viewers are on the gauge within one viewer-count interval,
/// each host-control refusal is counted under its control, and each delivery
/// lands in the batch-size histogram.
async fn live_room() {
    const INTERVAL_MS: u64 = 100;
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.rooms.live.viewer_count_interval_ms = INTERVAL_MS;
        s.realtime.send_rate_per_sec = 1000;
        s.realtime.send_burst = 1000;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("host")).await;
    let viewer = server.sign_up(&common::unique_name("viewer")).await;
    let created: pb::CreateRoomResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public as i32,
                title: "live".into(),
                live: Some(pb::LiveControls {
                    slow_mode_seconds: 60,
                    max_length: 10,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("create a live room");
    let room = created.room.expect("a room").id;
    join(&server, &viewer, &room).await;
    let m0 = Metrics::scrape(&server, "/metrics").await;
    let mut clients = Vec::new();
    for account in [&owner, &viewer] {
        let mut client = WsClient::connect_authenticated(
            &server.ws_url("/ws"),
            WsCodec::Json,
            &account.access_token,
        )
        .await;
        client.subscribe(&room, None).await.expect("subscribe");
        clients.push(client);
    }
    assert!(
        common::eventually(WAIT, || async {
            Metrics::scrape(&server, "/metrics")
                .await
                .get("roomcast_live_viewers", &[])
                == 2.0
        })
        .await,
        "two viewers on the gauge within an interval"
    );
    let send = |text: &'static str, id: &'static str| {
        let rpc = server.rpc_as(&viewer.access_token);
        let room = room.clone();
        async move {
            rpc.call_proto::<_, pb::SendMessageResponse>(
                "RoomService/SendMessage",
                &pb::SendMessageRequest {
                    room_id: room,
                    text: text.into(),
                    client_message_id: id.into(),
                    ..Default::default()
                },
            )
            .await
        }
    };
    send("hello", "l1").await.expect("the first comment passes");
    send("far too long a comment", "l2")
        .await
        .expect_err("over max_length");
    send("again", "l3").await.expect_err("slow mode");
    send("and again", "l4").await.expect_err("slow mode");
    let m1 = Metrics::scrape(&server, "/metrics").await;
    let refusals = "roomcast_live_refusals_total";
    assert_eq!(m1.delta(&m0, refusals, &[("control", "max_length")]), 1.0);
    assert_eq!(m1.delta(&m0, refusals, &[("control", "slow_mode")]), 2.0);
    assert_eq!(m1.delta(&m0, refusals, &[("control", "host_only")]), 0.0);
    assert!(
        m1.delta(&m0, "roomcast_fanout_batch_events", &[]) >= 1.0,
        "the comment was handed to the subscribers"
    );
    for client in clients {
        client.close().await;
    }
    assert!(
        common::eventually(WAIT, || async {
            Metrics::scrape(&server, "/metrics")
                .await
                .get("roomcast_live_viewers", &[])
                == 0.0
        })
        .await,
        "the viewers leave the gauge"
    );
}

/// Sign-in and sign-up refusals are counted under the rule that refused them.
async fn auth_limits_by_rule() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.auth.sign_in_ip_per_minute = 2;
        s.auth.sign_in_ip_burst = 2;
        s.auth.sign_up_ip_per_hour = 1;
        s.auth.sign_up_ip_burst = 1;
        s.auth.sign_in_free_failures = 1;
        s.auth.sign_in_backoff_base_ms = 30_000;
        s.auth.sign_in_backoff_max_ms = 30_000;
    })
    .await;
    let m0 = Metrics::scrape(&server, "/metrics").await;
    let alice = server.sign_up(&common::unique_name("alice")).await;
    let second = server
        .rpc()
        .call_proto::<_, pb::SignUpResponse>(
            "AuthService/SignUp",
            &pb::SignUpRequest {
                username: common::unique_name("bob"),
                password: common::PASSWORD.into(),
                display_name: String::new(),
            },
        )
        .await
        .expect_err("one sign-up per hour from this address");
    second.expect("resource_exhausted", 429);
    let sign_in = |password: &str| pb::SignInRequest {
        username: alice.username.clone(),
        password: password.into(),
    };
    let wrong = server
        .rpc()
        .call_proto::<_, pb::SignInResponse>("AuthService/SignIn", &sign_in("wrong password"))
        .await
        .expect_err("a wrong password");
    wrong.expect("unauthenticated", 401);
    let backoff = server
        .rpc()
        .call_proto::<_, pb::SignInResponse>("AuthService/SignIn", &sign_in(common::PASSWORD))
        .await
        .expect_err("the account must wait after a failure");
    backoff.expect("resource_exhausted", 429);
    let per_ip = server
        .rpc()
        .call_proto::<_, pb::SignInResponse>("AuthService/SignIn", &sign_in(common::PASSWORD))
        .await
        .expect_err("two sign-ins a minute from this address");
    per_ip.expect("resource_exhausted", 429);
    let m1 = Metrics::scrape(&server, "/metrics").await;
    for rule in ["sign_up_per_ip", "sign_in_backoff", "sign_in_per_ip"] {
        assert_eq!(
            m1.delta(&m0, "roomcast_rate_limited_total", &[("rule", rule)]),
            1.0,
            "one refusal by {rule}"
        );
    }
}

/// A subscriber resuming from history retention removed gets one `gap` frame,
/// and it is counted.
async fn pruned_history_gap() {
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.rooms.ring_size = 1;
        s.rooms.retention_sweep_secs = 1;
        s.realtime.send_burst = 100;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let created: pb::CreateRoomResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public as i32,
                title: "short-lived".into(),
                retention_seconds: 1,
                ..Default::default()
            },
        )
        .await
        .expect("create a room");
    let room = created.room.expect("a room").id;
    for i in 0..3 {
        send_http(
            &server,
            &owner,
            &room,
            &format!("gone {i}"),
            &format!("g{i}"),
        )
        .await;
    }
    assert!(
        common::eventually(Duration::from_secs(15), || async {
            common::rooms::history(&server, &owner, &room)
                .await
                .is_empty()
        })
        .await,
        "retention prunes the history"
    );
    let m0 = Metrics::scrape(&server, "/metrics").await;
    let mut ws =
        WsClient::connect_authenticated(&server.ws_url("/ws"), WsCodec::Json, &owner.access_token)
            .await;
    ws.subscribe(&room, Some(0)).await.expect("subscribe");
    let gap = ws
        .push_matching(WAIT, |kind| match kind {
            Out::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .await;
    assert_eq!((gap.from_seq, gap.to_seq), (1, 3));
    let m1 = Metrics::scrape(&server, "/metrics").await;
    assert_eq!(m1.delta(&m0, "roomcast_gaps_reported_total", &[]), 1.0);
}

async fn session(backend: Backend) {
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            s.realtime.send_rate_per_sec = 100_000;
            s.realtime.send_burst = 100_000;
            s.rooms.max_message_bytes = 16 * 1024;
            s.realtime.outbound_queue_frames = 8;
            s.realtime.outbound_queue_bytes = 64 * 1024;
            s.realtime.max_catch_up_rounds = 1000;
            s.metrics.path = "/internal/metrics".into();
        })
        .await,
    );
    let path = "/internal/metrics";
    let m0 = Metrics::scrape(&server, path).await;
    let sign_up = [("method", "roomcast.v1.AuthService/SignUp"), ("code", "ok")];
    let send = [
        ("method", "roomcast.v1.RoomService/SendMessage"),
        ("code", "ok"),
    ];
    let send_unauth = [
        ("method", "roomcast.v1.RoomService/SendMessage"),
        ("code", "unauthenticated"),
    ];

    // Two accounts and a room (RPCs), one refused call.
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let member = server.sign_up(&common::unique_name("member")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    join(&server, &member, &room).await;
    let (status, _) = server
        .rpc()
        .call_json(
            "RoomService/SendMessage",
            serde_json::json!({"roomId": room, "text": "x", "clientMessageId": "x"}),
        )
        .await;
    assert_eq!(status, 401);
    let m1 = Metrics::scrape(&server, path).await;
    assert_eq!(m1.delta(&m0, "roomcast_rpc_requests_total", &sign_up), 2.0);
    assert_eq!(
        m1.delta(&m0, "roomcast_rpc_requests_total", &send_unauth),
        1.0
    );
    assert_eq!(
        m1.delta(&m0, "roomcast_rpc_duration_seconds_count", &sign_up),
        2.0
    );

    // A WebSocket subscriber reads three messages sent over HTTP.
    let ws_json = [("transport", "websocket"), ("codec", "json")];
    let mut reader =
        WsClient::connect_authenticated(&server.ws_url("/ws"), WsCodec::Json, &member.access_token)
            .await;
    reader.subscribe(&room, None).await.expect("subscribe");
    let m2 = Metrics::scrape(&server, path).await;
    assert_eq!(m2.delta(&m0, "roomcast_connections", &ws_json), 1.0);
    assert!(m2.get("roomcast_rooms_loaded", &[]) >= 1.0);
    assert_eq!(m2.delta(&m0, "roomcast_subscriptions", &[]), 1.0);
    assert_eq!(m2.delta(&m0, "roomcast_users_online", &[]), 1.0);
    for i in 0..3 {
        send_http(
            &server,
            &owner,
            &room,
            &format!("hello {i}"),
            &format!("h{i}"),
        )
        .await;
    }
    let mut read = 0;
    while read < 3 {
        match reader.next_push(WAIT).await {
            Incoming::Frame(frame) => {
                if room_event(&frame).is_some() {
                    read += 1;
                }
            }
            other => panic!("expected three events; got {other:?}"),
        }
    }
    // The room actor counts a delivery on its own thread just after handing the
    // events to the connection, so the count may trail what the client read by a
    // moment.
    let delivered = common::eventually(WAIT, || {
        let server = server.clone();
        let before = m2.get("roomcast_messages_delivered_total", &[]);
        async move {
            let m = Metrics::scrape(&server, "/internal/metrics").await;
            m.get("roomcast_messages_delivered_total", &[]) - before >= 3.0
        }
    })
    .await;
    assert!(delivered, "three deliveries counted");
    let m3 = Metrics::scrape(&server, path).await;
    assert_eq!(m3.delta(&m2, "roomcast_rpc_requests_total", &send), 3.0);
    assert_eq!(m3.delta(&m2, "roomcast_messages_received_total", &[]), 3.0);
    assert_eq!(m3.delta(&m2, "roomcast_messages_committed_total", &[]), 3.0);
    assert_eq!(
        m3.delta(&m2, "roomcast_messages_delivered_total", &[]),
        3.0,
        "one subscriber, three events"
    );
    assert!(m3.delta(&m2, "roomcast_commit_batch_size_count", &[]) >= 1.0);
    assert_eq!(m3.delta(&m2, "roomcast_commit_batch_size_sum", &[]), 3.0);
    assert!(m3.delta(&m2, "roomcast_commit_duration_seconds_count", &[]) >= 1.0);
    drop(reader);

    // A subscriber that stops reading while the room fills its small queue lags.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let stream = socket.connect(server.addr).await.expect("connect");
    let mut slow = WsClient::from_stream(
        stream,
        &server.ws_url("/ws"),
        WsCodec::Json,
        &member.access_token,
    )
    .await;
    slow.subscribe(&room, None).await.expect("subscribe");
    let m4 = Metrics::scrape(&server, path).await;
    let big = "x".repeat(12 * 1024);
    const SENDS: usize = 240;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (server, owner, room, big) = (server.clone(), owner.clone(), room.clone(), big.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..SENDS / 4 {
                let id = format!("b{t}-{i}");
                send_http(&server, &owner, &room, &format!("{id} {big}"), &id).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("sender");
    }
    let mut lagging_frames = 0.0;
    let mut events = 0;
    while events < SENDS {
        match slow.next_push(WAIT).await {
            Incoming::Frame(frame) => match frame.kind {
                Some(Out::Lagging(_)) => lagging_frames += 1.0,
                _ if room_event(&frame).is_some() => events += 1,
                _ => {}
            },
            other => panic!("the slow reader gets every event; got {other:?}"),
        }
    }
    // A room may drop the subscriber once more after the catch-up already read the
    // last event: its `lagging` frame then comes after every event. Read until the
    // connection is quiet, so every frame the server sent is counted.
    for _ in 0..100 {
        match slow.next_push(Duration::from_millis(500)).await {
            Incoming::Frame(frame) => match frame.kind {
                Some(Out::Lagging(_)) => lagging_frames += 1.0,
                _ if room_event(&frame).is_some() => panic!("an event past the last one"),
                _ => {}
            },
            Incoming::Timeout => break,
            other => panic!("the slow reader stays connected; got {other:?}"),
        }
    }
    let m5 = Metrics::scrape(&server, path).await;
    assert!(
        lagging_frames >= 1.0,
        "the test must make the reader lag (lagged: {}, overflows: {})",
        m5.delta(&m4, "roomcast_subscribers_lagged_total", &[]),
        m5.delta(&m4, "roomcast_outbound_overflows_total", &[])
    );
    // Each `lagging` frame follows a room dropping the subscriber; a drop while the
    // connection is still catching up from an earlier one sends no second frame.
    let lagged = m5.delta(&m4, "roomcast_subscribers_lagged_total", &[]);
    assert!(
        lagged >= lagging_frames,
        "every `lagging` frame the client read was counted ({lagged} < {lagging_frames})"
    );
    assert_eq!(
        m5.delta(&m4, "roomcast_lagging_frames_total", &[]),
        lagging_frames,
        "every `lagging` frame sent was read by the one slow client"
    );
    assert!(
        m5.delta(&m4, "roomcast_catch_up_rounds_total", &[]) >= lagging_frames,
        "each `lagging` frame starts a catch-up round"
    );
    assert_eq!(
        m5.delta(&m4, "roomcast_messages_committed_total", &[]),
        SENDS as f64
    );
    assert!(
        m5.delta(
            &m4,
            "roomcast_store_query_duration_seconds_count",
            &[("query", "append_messages")]
        ) >= 1.0,
        "group commits are timed as store operations"
    );
    assert_eq!(
        m5.delta(&m4, "roomcast_rpc_requests_total", &send),
        SENDS as f64
    );
    drop(slow);

    // A client breaking the protocol is closed with 1007 (invalid UTF-8 in text).
    let mut raw = raw_ws::connect(server.addr, "/ws", "").await;
    let invalid = raw_ws::frame(true, 0x1, &[0xff, 0xfe], true);
    tokio::io::AsyncWriteExt::write_all(&mut raw, &invalid)
        .await
        .expect("write");
    assert_eq!(raw_ws::read_close(&mut raw, WAIT).await, Some(1007));
    drop(raw);

    // Every connection gone: the gauge is back where it was.
    let before = m0.get("roomcast_connections", &ws_json);
    let back = common::eventually(WAIT, || {
        let server = server.clone();
        async move {
            let m = Metrics::scrape(&server, "/internal/metrics").await;
            m.get("roomcast_connections", &ws_json) == before
        }
    })
    .await;
    // The rooms notice their subscribers are gone (at the latest at their idle
    // check, every 5 s).
    let subscriptions = m0.get("roomcast_subscriptions", &[]);
    let unsubscribed = common::eventually(WAIT, || {
        let server = server.clone();
        async move {
            let m = Metrics::scrape(&server, "/internal/metrics").await;
            m.get("roomcast_subscriptions", &[]) == subscriptions
        }
    })
    .await;
    let m6 = Metrics::scrape(&server, path).await;
    assert!(back, "connections gauge returns to zero");
    assert!(unsubscribed, "subscriptions gauge returns to where it was");
    assert_eq!(
        m6.delta(&m5, "roomcast_websocket_closes_total", &[("code", "1007")]),
        1.0
    );

    // The process collector read /proc/self.
    assert!(m6.get("process_cpu_seconds_total", &[]) > 0.0);
    assert!(m6.get("process_resident_memory_bytes", &[]) > 0.0);
    assert!(m6.get("process_open_fds", &[]) > 0.0);
    assert!(m6.get("process_max_fds", &[]) >= m6.get("process_open_fds", &[]));
    // The pool is the last started server's (the other test here may start one).
    assert!(m6.0.contains_key("roomcast_store_pool_connections{}"));
    assert!(m6.0.contains_key("roomcast_store_pool_idle_connections{}"));
    // The default path is not served when another is configured.
    let other = server
        .http()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET");
    assert_ne!(other.status().as_u16(), 200);
}

/// `metrics.listen` moves the metrics to their own listener: served there, not on
/// the API's port. (Reads no values, so it may run beside the session above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_listener_serves_the_metrics_and_the_api_port_does_not() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // A port alone: a listener on the loopback interface.
    let listen = format!("127.0.0.1:{port}");
    let server = TestServer::spawn_with(Backend::Sqlite, |s| {
        s.metrics.listen = port.to_string();
    })
    .await;
    let response = server
        .http()
        .get(format!("http://{listen}/metrics"))
        .send()
        .await
        .expect("GET the metrics listener");
    assert_eq!(response.status().as_u16(), 200);
    let body = response.text().await.expect("body");
    let m = Metrics::parse(&body);
    assert!(m.get("process_open_fds", &[]) > 0.0);
    let on_api = server
        .http()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET the API port");
    assert_ne!(on_api.status().as_u16(), 200);
}

/// The example alerting rules in deploy/prometheus/ (docs/operations.md) load: the
/// file is YAML of the shape Prometheus reads, every expression parses as PromQL
/// (promql-parser, a port of Prometheus's own grammar; `promtool` is not part of
/// the toolchain), every `for` is a Prometheus duration, and every metric an
/// expression reads is one this server exports (so a renamed metric breaks this
/// test, not an operator's alert). Moves no counter the session above reads, so
/// it may run beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_rules_file_loads_and_reads_exported_metrics() {
    use promql_parser::{
        parser::Expr,
        util::{parse_duration, walk_expr, ExprVisitor},
    };
    use yaml_rust2::YamlLoader;

    /// Collects the metric names an expression selects.
    struct Names(Vec<String>);
    impl ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
            let selector = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(name) = selector.and_then(|vs| vs.name.clone()) {
                self.0.push(name);
            }
            Ok(true)
        }
    }

    let server = TestServer::spawn(Backend::Sqlite).await;
    // One RPC, so the RPC families have series (a labelled family without any is
    // not in the exposition at all): one the session above does not count.
    let (status, _) = server
        .rpc()
        .call_json("UserService/GetMe", serde_json::json!({}))
        .await;
    assert_eq!(status, 401);
    let body = server
        .http()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    // Metric families as declared (`# TYPE roomcast_rpc_requests counter`): a
    // family is declared even before its first labelled series exists.
    let families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    // A labelled family that has had no event yet (admission refusals by rule)
    // is not in the exposition: for those the documented name must match.
    let documented =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
            .expect("docs/operations.md");
    let exported = |name: &str| {
        let base = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        families.contains(&name)
            || families.contains(&base)
            || documented.contains(&format!("| `{name}` |"))
            || documented.contains(&format!("| `{base}` |"))
    };

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/roomcast-rules.yml"
    );
    let text = std::fs::read_to_string(path).expect("the rules file");
    let docs = YamlLoader::load_from_str(&text).expect("the rules file is YAML");
    assert_eq!(docs.len(), 1, "one YAML document");
    let groups = docs[0]["groups"].as_vec().expect("a `groups` list");
    assert!(!groups.is_empty());
    let mut alerts = Vec::new();
    for group in groups {
        assert!(group["name"].as_str().is_some(), "every group has a name");
        let rules = group["rules"].as_vec().expect("a group's `rules` list");
        for rule in rules {
            let alert = rule["alert"].as_str().expect("an alerting rule's name");
            assert!(!alerts.contains(&alert), "alert {alert} twice");
            alerts.push(alert);
            let expr = rule["expr"].as_str().expect("an expression");
            let parsed = promql_parser::parser::parse(expr)
                .unwrap_or_else(|e| panic!("{alert}: the expression does not parse: {e}\n{expr}"));
            if !rule["for"].is_badvalue() {
                let wait = rule["for"].as_str().expect("`for` is a duration string");
                parse_duration(wait).unwrap_or_else(|e| panic!("{alert}: for: {e}"));
            }
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{alert}: a severity label"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{alert}: a summary"
            );
            let mut names = Names(Vec::new());
            walk_expr(&mut names, &parsed).expect("walk");
            assert!(!names.0.is_empty(), "{alert} reads some metric");
            for name in names.0 {
                // `up` is Prometheus's own, per scrape target.
                assert!(
                    name == "up" || exported(&name),
                    "{alert} reads {name}, which the server neither exports nor documents: {families:?}"
                );
            }
        }
    }
    assert!(alerts.len() >= 12, "{alerts:?}");
}
