//! Several roomcast nodes sharing one PostgreSQL database and one Redis (the
//! `redis` cluster broker): every subscriber on every node, in both WebSocket
//! codecs and over SSE, ends
//! with the same gapless sequence of a room that senders on every node write to at
//! once, and nothing acknowledged is lost when Redis dies and comes back.
//!
//! Needs `ROOMCAST_TEST_POSTGRES_URL` and `ROOMCAST_TEST_REDIS_URL` (scripts/test.sh
//! starts both); without them each test prints `SKIPPED …` and returns. The Redis
//! fault test starts its own `redis-server` (from PATH) on a free loopback port and
//! stops it by PID.

mod common;

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    cluster::{redis_url, Cluster, NodeKind},
    rooms::{create_room, join, send_http},
    ws::{room_event, Incoming, WsClient, WsCodec},
    Account, Backend, TestDatabase, TestServer,
};
use roomcast::proto::v1 as pb;

/// How long a subscriber may see nothing before the test fails.
const IDLE: Duration = Duration::from_secs(20);

/// The suite's Redis URL, or `None` (reported as skipped) when these tests cannot
/// run: no PostgreSQL or no Redis.
fn services() -> Option<String> {
    if !common::postgres_available() {
        return None;
    }
    redis_url()
}

/// A channel prefix of this test's own, so parallel tests never hear each other.
fn unique_prefix() -> String {
    format!("rc-test-{}:", uuid_like())
}

fn uuid_like() -> String {
    use rand::Rng as _;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// `n` in-process nodes on one fresh PostgreSQL database (the multi-node harness),
/// linked through the suite's Redis or, when given, `redis`; each `/readyz` says
/// ready (linked) before this answers. `None` (reported as skipped) without the
/// services.
async fn start_nodes(n: usize, redis: Option<&str>) -> Option<Cluster> {
    let builder = match redis {
        Some(url) => Cluster::builder(n).redis_at(url),
        None => Cluster::builder(n).redis(),
    };
    let cluster = builder
        .configure(|s, _| {
            s.cluster.reconnect_min_ms = 50;
            s.cluster.reconnect_max_ms = 500;
            s.realtime.send_rate_per_sec = 10_000;
            s.realtime.send_burst = 10_000;
        })
        .start()
        .await?;
    for node in servers(&cluster) {
        wait_ready(node, Duration::from_secs(20)).await;
    }
    Some(cluster)
}

/// The in-process servers of every node.
fn servers(cluster: &Cluster) -> Vec<&TestServer> {
    (0..cluster.len())
        .map(|i| cluster.server(i).expect("an in-process node"))
        .collect()
}

/// `/readyz` of `node`: (HTTP status, body).
async fn readyz(node: &TestServer) -> (u16, String) {
    match node.http().get(node.url("/readyz")).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Waits until `/readyz` answers `ready` (linked to the other nodes).
async fn wait_ready(node: &TestServer, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = readyz(node).await;
        if status == 200 && body.starts_with("ready") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} not ready within {within:?}: {status} {body}",
            node.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/readyz` says `degraded`.
async fn wait_degraded(node: &TestServer, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = readyz(node).await;
        if body.starts_with("degraded") {
            assert_eq!(status, 200, "a degraded node still serves its clients");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} not degraded within {within:?}: {status} {body}",
            node.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One subscriber: its connection and what it received, by sequence.
struct Watcher {
    client: WsClient,
    name: String,
    /// Sequence → text, in arrival order checks below.
    seen: Vec<(u64, String)>,
}

impl Watcher {
    async fn subscribe(
        node: &TestServer,
        account: &Account,
        room: &str,
        codec: WsCodec,
        name: String,
    ) -> Self {
        let mut client =
            WsClient::connect_authenticated(&node.ws_url("/ws"), codec, &account.access_token)
                .await;
        client.subscribe(room, Some(0)).await.expect("subscribe");
        Self {
            client,
            name,
            seen: Vec::new(),
        }
    }

    /// Reads until it has seen `last`; panics on a close or on silence.
    async fn read_until(&mut self, room: &str, last: u64) {
        let mut newest = self.seen.last().map_or(0, |(s, _)| *s);
        while newest < last {
            match self.client.next_push(IDLE).await {
                Incoming::Frame(frame) => {
                    if let Some(m) = room_event(&frame).filter(|m| m.room_id == room) {
                        newest = newest.max(m.seq);
                        self.seen.push((m.seq, m.text.clone()));
                    }
                }
                other => panic!(
                    "{}: waiting for seq {last} (at {newest}): {other:?}",
                    self.name
                ),
            }
        }
    }

    /// Asserts the gapless, duplicate-free sequence 1..=last, and answers it.
    fn assert_gapless(&self, last: u64) -> Vec<(u64, String)> {
        let seqs: Vec<u64> = self.seen.iter().map(|(s, _)| *s).collect();
        let expected: Vec<u64> = (1..=last).collect();
        assert_eq!(
            seqs, expected,
            "{}: not the gapless sequence 1..={last}",
            self.name
        );
        self.seen.clone()
    }
}

/// Signs up a user on `node` and joins it to `room`.
async fn member(node: &TestServer, name: &str, room: &str) -> Account {
    let account = node.sign_up(name).await;
    join(node, &account, room).await;
    account
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_room_written_on_every_node_is_one_gapless_order_everywhere() {
    let Some(cluster) = start_nodes(3, None).await else {
        return;
    };
    let nodes = servers(&cluster);
    let owner = nodes[0].sign_up("owner").await;
    let room = create_room(nodes[0], &owner, pb::RoomKind::Public).await;

    // Subscribers on every node, in both codecs.
    let mut watchers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for codec in [WsCodec::Json, WsCodec::Proto] {
            let account = member(node, &format!("watcher{i}{codec:?}").to_lowercase(), &room).await;
            watchers.push(
                Watcher::subscribe(node, &account, &room, codec, format!("node {i} {codec:?}"))
                    .await,
            );
        }
    }

    // An SSE stream on every node too, from the room's start.
    let mut streams = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let account = member(node, &format!("sse{i}"), &room).await;
        let stream = common::sse::Sse::open(
            node,
            &format!("rooms={room}:0"),
            &account.access_token,
            None,
        )
        .await;
        streams.push((format!("node {i} SSE"), stream));
    }

    // Concurrent senders on every node.
    const PER_SENDER: u64 = 40;
    let mut senders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..2 {
            let account = member(node, &format!("sender{i}x{j}"), &room).await;
            senders.push((i, j, account));
        }
    }
    let mut tasks = Vec::new();
    for (i, j, account) in senders {
        let node = &nodes[i];
        let room = room.clone();
        tasks.push(async move {
            let mut acked = Vec::new();
            for k in 0..PER_SENDER {
                let id = format!("s{i}-{j}-{k}");
                let sent = send_http(node, &account, &room, &id, &id).await;
                acked.push((sent.message.as_ref().expect("the stored message").seq, id));
            }
            acked
        });
    }
    let acked: Vec<(u64, String)> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let total = acked.len() as u64;
    assert_eq!(total, 6 * PER_SENDER);
    let by_seq: BTreeMap<u64, String> = acked.into_iter().collect();
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "the store gave every send its own sequence"
    );

    for (name, stream) in &mut streams {
        let mut seen = Vec::new();
        while seen.len() < total as usize {
            let event = tokio::time::timeout(IDLE, stream.next_named("message"))
                .await
                .unwrap_or_else(|_| panic!("{name}: nothing after {} messages", seen.len()));
            let text = event.json()["message"]["text"]
                .as_str()
                .expect("text")
                .to_owned();
            seen.push((event.seq(), text));
        }
        let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "{name}: not the gapless sequence"
        );
        for (seq, text) in seen {
            assert_eq!(by_seq.get(&seq), Some(&text), "{name}: seq {seq}");
        }
    }
    for watcher in &mut watchers {
        watcher.read_until(&room, total).await;
    }
    for watcher in &watchers {
        let seen = watcher.assert_gapless(total);
        for (seq, text) in seen {
            assert_eq!(
                by_seq.get(&seq),
                Some(&text),
                "{}: seq {seq} carries the acknowledged message",
                watcher.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resuming_on_another_node_from_a_sequence_it_has_not_seen_yet_is_not_out_of_range() {
    let Some(cluster) = start_nodes(2, None).await else {
        return;
    };
    let nodes = servers(&cluster);
    let owner = nodes[0].sign_up("owner").await;
    let room = create_room(nodes[0], &owner, pb::RoomKind::Public).await;
    let reader = member(nodes[1], "reader", &room).await;
    // The room is loaded on node 1 (a subscriber holds it there).
    let mut holder =
        Watcher::subscribe(nodes[1], &reader, &room, WsCodec::Json, "holder".into()).await;
    for k in 1..=20u64 {
        let id = format!("m{k}");
        let sent = send_http(nodes[0], &owner, &room, &id, &id).await;
        assert_eq!(sent.message.as_ref().expect("the stored message").seq, k);
        // At once, on the other node, from the sequence just acknowledged: it may
        // not have arrived there yet, but it exists.
        let mut client = WsClient::connect_authenticated(
            &nodes[1].ws_url("/ws"),
            WsCodec::Proto,
            &reader.access_token,
        )
        .await;
        let last = client
            .subscribe(&room, Some(k))
            .await
            .unwrap_or_else(|e| panic!("resuming from {k} on node 1: {e:?}"));
        assert!(last >= k, "subscribed at {last}, before {k}");
        client.close().await;
    }
    // A sequence no node committed is still out of range.
    let mut client = WsClient::connect_authenticated(
        &nodes[1].ws_url("/ws"),
        WsCodec::Json,
        &reader.access_token,
    )
    .await;
    let err = client
        .subscribe(&room, Some(1_000))
        .await
        .expect_err("beyond the end");
    assert_eq!(err.code, "out_of_range", "{err:?}");
    holder.read_until(&room, 20).await;
    holder.assert_gapless(20);
}

/// A `redis-server` of the test's own, on a free loopback port, stopped by PID.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::Builder::new()
            .prefix("roomcast-redis-")
            .tempdir()
            .expect("temp dir");
        let mut redis = Self {
            port,
            child: None,
            dir,
        };
        redis.spawn();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it on PATH? scripts/test-services.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, by PID.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_mid_stream_loses_nothing() {
    if services().is_none() {
        return;
    }
    let mut redis = OwnRedis::start();
    let Some(cluster) = start_nodes(2, Some(&redis.url())).await else {
        return;
    };
    let nodes = servers(&cluster);
    let owner = nodes[0].sign_up("owner").await;
    let room = create_room(nodes[0], &owner, pb::RoomKind::Public).await;
    let mut watchers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for codec in [WsCodec::Json, WsCodec::Proto] {
            let account = member(node, &format!("w{i}{codec:?}").to_lowercase(), &room).await;
            watchers.push(
                Watcher::subscribe(node, &account, &room, codec, format!("node {i} {codec:?}"))
                    .await,
            );
        }
    }
    let senders = [
        member(nodes[0], "sender0", &room).await,
        member(nodes[1], "sender1", &room).await,
    ];
    let mut acked = BTreeMap::new();
    let send_round = |round: &'static str| {
        let nodes = &nodes;
        let senders = &senders;
        let room = room.clone();
        async move {
            let mut got = Vec::new();
            for k in 0..10 {
                for (i, sender) in senders.iter().enumerate() {
                    let id = format!("{round}-{i}-{k}");
                    let sent = send_http(nodes[i], sender, &room, &id, &id).await;
                    got.push((sent.message.as_ref().expect("the stored message").seq, id));
                }
            }
            got
        }
    };
    acked.extend(send_round("before").await);

    redis.kill();
    for node in &nodes {
        wait_degraded(node, Duration::from_secs(10)).await;
    }
    // Both nodes still take sends (the store is up) while cut off from each other.
    acked.extend(send_round("during").await);

    redis.spawn();
    for node in &nodes {
        wait_ready(node, Duration::from_secs(20)).await;
    }
    acked.extend(send_round("after").await);

    let total = acked.len() as u64;
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    for watcher in &mut watchers {
        watcher.read_until(&room, total).await;
    }
    for watcher in &watchers {
        for (seq, text) in watcher.assert_gapless(total) {
            assert_eq!(acked.get(&seq), Some(&text), "{}: seq {seq}", watcher.name);
        }
    }
    // The metrics say what happened (the process-wide registry is shared by the
    // nodes of this test binary, so only lower bounds).
    let reconnects = nodes[0]
        .metric("roomcast_broker_reconnects_total", &[])
        .await;
    assert!(reconnects >= 2.0, "each node relinked: {reconnects}");
    assert!(
        nodes[0]
            .metric("roomcast_broker_gap_filled_events_total", &[])
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_redis_broker_refuses_an_sqlite_store() {
    let mut settings = common::test_settings();
    settings.store.url = "sqlite://target/never.db".into();
    settings.cluster.broker = "redis".into();
    let err = settings.validate().expect_err("redis needs PostgreSQL");
    let text = err.to_string();
    assert!(
        text.contains("cluster.broker") && text.contains("PostgreSQL"),
        "{text}"
    );
}

/// Creates a live public room owned by `owner`.
async fn create_live_room(node: &TestServer, owner: &Account) -> String {
    let reply: pb::CreateRoomResponse = node
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public as i32,
                title: "live".into(),
                live: Some(pb::LiveControls::default()),
                ..Default::default()
            },
        )
        .await
        .expect("create a live room");
    reply.room.expect("a room").id
}

/// What a live viewer saw: events and gaps, in arrival order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Event(u64, String),
    Gap(u64, u64),
}

async fn watch_live(client: &mut WsClient, room: &str, last: u64, name: &str) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut newest = 0;
    while newest < last {
        match client.next_push(IDLE).await {
            Incoming::Frame(frame) => match &frame.kind {
                Some(pb::server_frame::Kind::Gap(gap)) if gap.room_id == room => {
                    newest = newest.max(gap.to_seq);
                    seen.push(Seen::Gap(gap.from_seq, gap.to_seq));
                }
                _ => {
                    if let Some(m) = room_event(&frame).filter(|m| m.room_id == room) {
                        newest = newest.max(m.seq);
                        seen.push(Seen::Event(m.seq, m.text.clone()));
                    }
                }
            },
            other => panic!("{name}: waiting for seq {last} (at {newest}): {other:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_room_written_on_every_node_has_one_order_with_exact_gaps() {
    let Some(cluster) = start_nodes(3, None).await else {
        return;
    };
    let nodes = servers(&cluster);
    let owner = nodes[0].sign_up("owner").await;
    let room = create_live_room(nodes[0], &owner).await;

    let mut viewers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for codec in [WsCodec::Json, WsCodec::Proto] {
            let account = node
                .sign_up(&format!("viewer{i}{codec:?}").to_lowercase())
                .await;
            let mut client =
                WsClient::connect_authenticated(&node.ws_url("/ws"), codec, &account.access_token)
                    .await;
            client.subscribe(&room, None).await.expect("watch");
            viewers.push((format!("node {i} {codec:?}"), client));
        }
    }
    let mut senders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        senders.push((i, member(node, &format!("sender{i}"), &room).await));
    }
    const PER_SENDER: u64 = 50;
    let mut tasks = Vec::new();
    for (i, account) in &senders {
        let node = &nodes[*i];
        let room = room.clone();
        tasks.push(async move {
            let mut acked = Vec::new();
            for k in 0..PER_SENDER {
                let id = format!("l{i}-{k}");
                let sent = send_http(node, account, &room, &id, &id).await;
                acked.push((sent.message.expect("the message").seq, id));
            }
            acked
        });
    }
    let acked: BTreeMap<u64, String> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let total = acked.len() as u64;
    assert_eq!(total, 3 * PER_SENDER, "every send got its own number");
    let first = *acked.keys().next().expect("sent");
    let last = *acked.keys().next_back().expect("sent");
    assert_eq!(
        last - first + 1,
        total,
        "the numbers of one room are contiguous across nodes"
    );

    for (name, client) in &mut viewers {
        let seen = watch_live(client, &room, last, name).await;
        // In order, each number once: as an event carrying the acknowledged
        // message, or inside exactly one gap.
        let mut next = first;
        for item in &seen {
            match item {
                Seen::Event(seq, text) if *seq < first => {
                    panic!("{name}: event {seq} {text} before the first sent")
                }
                Seen::Event(seq, text) => {
                    assert_eq!(*seq, next, "{name}: out of order or twice: {seen:?}");
                    assert_eq!(acked.get(seq), Some(text), "{name}: seq {seq}");
                    next += 1;
                }
                Seen::Gap(from, to) => {
                    assert_eq!(*from, next, "{name}: gap out of order: {seen:?}");
                    assert!(to >= from, "{name}: empty gap");
                    next = to + 1;
                }
            }
        }
        assert_eq!(next, last + 1, "{name}: ends at the last number");
    }
}

/// A TCP forwarder between a node and PostgreSQL that the test can cut (every
/// connection dropped, new ones refused) and restore: the database becomes
/// unreachable for that node only.
struct StoreLink {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl StoreLink {
    async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accept_cut, accept_conns) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if accept_cut.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_conns.lock().expect("lock").push(task);
            }
        });
        Self {
            port,
            cut,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
        for task in self.conns.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for StoreLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_cannot_reach_postgresql_answers_unavailable_and_is_not_ready() {
    let Some(redis) = services() else { return };
    let database = TestDatabase::create(Backend::Postgres).await;
    // postgres://user@127.0.0.1:PORT/db → the same through the forwarder.
    let (head, tail) = database.url.rsplit_once('@').expect("a user in the URL");
    let (host_port, db) = tail.split_once('/').expect("a database in the URL");
    let target: std::net::SocketAddr = host_port.parse().expect("host:port");
    let link = StoreLink::start(target).await;
    let url = format!("{head}@127.0.0.1:{}/{db}", link.port);
    let prefix = unique_prefix();
    let node = TestServer::spawn_with(Backend::Postgres, move |s| {
        s.store.url = url;
        s.store.acquire_timeout_ms = 500;
        s.cluster.broker = "redis".into();
        s.cluster.redis_url = redis;
        s.cluster.channel_prefix = prefix;
    })
    .await;
    wait_ready(&node, Duration::from_secs(20)).await;
    let owner = node.sign_up("owner").await;
    let room = create_room(&node, &owner, pb::RoomKind::Public).await;
    send_http(&node, &owner, &room, "before", "before").await;

    link.cut();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readyz(&node).await;
        if status == 503 {
            assert!(body.contains("store"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready without its store: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = node
        .rpc_as(&owner.access_token)
        .call_proto::<_, pb::SendMessageResponse>(
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.clone(),
                text: "during".into(),
                client_message_id: "during".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("no store, no acknowledgement");
    assert_eq!(err.code, "unavailable", "{err:?}");

    link.restore();
    wait_ready(&node, Duration::from_secs(20)).await;
    // The retry of the refused send is stored once.
    let sent = send_http(&node, &owner, &room, "during", "during").await;
    assert_eq!(sent.message.expect("stored").seq, 2);
}

/// SendMessage over HTTP (JSON) to `base`; the sequence, or why not.
async fn send_to(base: &str, token: &str, room: &str, id: &str) -> Result<u64, String> {
    let resp = reqwest::Client::new()
        .post(format!("{base}/roomcast.v1.RoomService/SendMessage"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .json(&serde_json::json!({"roomId": room, "text": id, "clientMessageId": id}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    body["message"]["seq"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no seq in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_node_mid_stream_loses_nothing_and_its_clients_resume_through_nginx() {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    // Nodes 0 and 1 in this process, node 2 (the victim) a `roomcast serve`
    // process, so that it can be `kill -9`ed.
    const VICTIM: usize = 2;
    let Some(cluster) = Cluster::builder(3)
        .redis()
        .nginx()
        .node_kind(VICTIM, NodeKind::Process)
        .configure(|s, _| {
            s.realtime.send_rate_per_sec = 10_000;
            s.realtime.send_burst = 10_000;
        })
        .start()
        .await
    else {
        return;
    };
    let nodes = [0, 1].map(|i| cluster.server(i).expect("an in-process node"));
    let owner = nodes[0].sign_up("owner").await;
    let room = create_room(nodes[0], &owner, pb::RoomKind::Public).await;

    let mut watchers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let account = member(node, &format!("watcher{i}"), &room).await;
        watchers.push(
            Watcher::subscribe(node, &account, &room, WsCodec::Proto, format!("node {i}")).await,
        );
    }
    // A subscriber and a sender on the node that dies.
    let doomed = member(nodes[0], "doomed", &room).await;
    let mut on_victim = Watcher {
        client: WsClient::connect_authenticated(
            &cluster.ws_url(VICTIM),
            WsCodec::Json,
            &doomed.access_token,
        )
        .await,
        name: "subscriber of the killed node".into(),
        seen: Vec::new(),
    };
    on_victim
        .client
        .subscribe(&room, Some(0))
        .await
        .expect("subscribe on the victim");
    let sender = member(nodes[0], "sender", &room).await;
    let other = member(nodes[1], "other", &room).await;

    const SENDS: usize = 60;
    let acks = Arc::new(AtomicUsize::new(0));
    let victim_base = cluster.url(VICTIM, "");
    // After the kill the victim's clients come back through nginx, which passes
    // them to the nodes still alive.
    let fallback = cluster.nginx_url("");
    let token = sender.access_token.clone();
    let counter = acks.clone();
    let task_room = room.clone();
    // Sends to the victim until it is gone, then retries the same message (same
    // client_message_id) through nginx until a surviving node acknowledges it
    // (nginx may answer its own 502 while it finds the victim gone).
    let victim_sends = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut dead = false;
        for k in 0..SENDS {
            let id = format!("v{k}");
            let mut seq = None;
            if !dead {
                match send_to(&victim_base, &token, &task_room, &id).await {
                    Ok(s) => seq = Some(s),
                    Err(_) => dead = true,
                }
            }
            let seq = match seq {
                Some(s) => s,
                None => {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        match send_to(&fallback, &token, &task_room, &id).await {
                            Ok(s) => break s,
                            Err(e) => {
                                assert!(Instant::now() < deadline, "{id} through nginx: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
            };
            acked.push((seq, id));
            counter.fetch_add(1, Ordering::Release);
        }
        acked
    });
    let other_sends = async {
        let mut acked = Vec::new();
        for k in 0..SENDS {
            let id = format!("o{k}");
            let sent = send_http(nodes[1], &other, &room, &id, &id).await;
            acked.push((sent.message.expect("stored").seq, id));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        acked
    };
    let killer = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acks.load(Ordering::Acquire) < SENDS / 3 {
            assert!(Instant::now() < deadline, "the victim took no sends");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cluster.kill9(VICTIM);
    };
    let (other_acked, ()) = tokio::join!(other_sends, killer);
    let victim_acked = victim_sends.await.expect("the sender task");
    let acked: BTreeMap<u64, String> = other_acked.into_iter().chain(victim_acked).collect();
    let total = acked.len() as u64;
    assert_eq!(total, 2 * SENDS as u64, "every message acknowledged once");
    assert_eq!(
        acked.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );

    // The killed node's subscriber: what it got, then a resume through nginx.
    while let Incoming::Frame(frame) = on_victim.client.next_push(Duration::from_secs(5)).await {
        if let Some(m) = room_event(&frame).filter(|m| m.room_id == room) {
            on_victim.seen.push((m.seq, m.text.clone()));
        }
    }
    let resume_from = on_victim.seen.last().map_or(0, |(s, _)| *s);
    on_victim.client = WsClient::connect_authenticated(
        &cluster.nginx_ws_url(),
        WsCodec::Json,
        &doomed.access_token,
    )
    .await;
    on_victim
        .client
        .subscribe(&room, Some(resume_from))
        .await
        .expect("resume through nginx on a surviving node");
    watchers.push(on_victim);
    for watcher in &mut watchers {
        watcher.read_until(&room, total).await;
    }
    for watcher in &watchers {
        for (seq, text) in watcher.assert_gapless(total) {
            assert_eq!(acked.get(&seq), Some(&text), "{}: seq {seq}", watcher.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_notice_published_on_one_node_reaches_the_room_on_every_node() {
    use roomcast::{
        actors::room::RoomNotice,
        cluster::{codec, Body, Topic},
        ids::{RoomId, UserId},
    };
    let Some(cluster) = start_nodes(2, None).await else {
        return;
    };
    let nodes = servers(&cluster);
    let owner = nodes[0].sign_up("owner").await;
    let room = create_room(nodes[0], &owner, pb::RoomKind::Public).await;
    let guest = member(nodes[1], "guest", &room).await;
    let mut far = Watcher::subscribe(nodes[1], &guest, &room, WsCodec::Proto, "far".into()).await;
    let mut near = Watcher::subscribe(nodes[0], &guest, &room, WsCodec::Json, "near".into()).await;
    // Node 1's room may still be subscribing in Redis: an event from node 0 that
    // reaches it shows the link is up.
    send_http(nodes[0], &owner, &room, "hello", "hello").await;
    far.read_until(&room, 1).await;
    near.read_until(&room, 1).await;

    let room_id = RoomId(room.clone());
    let notice = RoomNotice::Removed {
        user_id: UserId(guest.user_id.clone()),
        reason: pb::RemovedReason::Kicked,
        message: "kicked on another node".into(),
    };
    nodes[0].state().bus.publish(
        Topic::Room(room_id.clone()),
        Body::RoomNotice(codec::room_notice(&room_id, &notice)),
        None,
    );
    for watcher in [&mut far, &mut near] {
        let removed = watcher
            .client
            .push_matching(IDLE, |kind| match kind {
                pb::server_frame::Kind::Removed(r) => Some(r.clone()),
                _ => None,
            })
            .await;
        assert_eq!(removed.room_id, room, "{}", watcher.name);
        assert_eq!(
            removed.message, "kicked on another node",
            "{}",
            watcher.name
        );
    }
}
