//! The first cluster test, through nginx: three real `roomcast serve`
//! nodes on one PostgreSQL, linked by one Redis, behind nginx running
//! `deploy/nginx/roomcast.conf` on loopback. Clients of every transport —
//! WebSocket in JSON and in binary, Server-Sent Events, long-polling — connect
//! through nginx, whose round robin spreads them over the nodes (each node's own
//! `/metrics` shows it); senders on every node, some through nginx and some
//! straight to a node, write a chat room and a live room at once. Every chat
//! subscriber ends with the identical gapless sequence holding every acknowledged
//! message exactly once; every live subscriber's sequence is in order and each
//! number is either delivered (with the acknowledged text) or inside exactly one
//! `gap` frame.
//!
//! Needs PostgreSQL, Redis and nginx (`bash scripts/test.sh -- --test
//! cluster_nginx` starts them); without them the test prints `SKIPPED …`.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    cluster::Cluster,
    poll::Poller,
    sse::Sse,
    ws::{room_event, Incoming, WsClient, WsCodec},
    Account, Codec, Rpc,
};
use pb::server_frame::Kind as Out;
use roomcast::proto::v1 as pb;

/// How long a subscriber may see nothing before the test fails.
const IDLE: Duration = Duration::from_secs(20);
/// Bounds every reading loop of the test.
const DEADLINE: Duration = Duration::from_secs(90);
/// Messages each sender sends to each room.
const PER_SENDER: usize = 20;
/// WebSocket (JSON), WebSocket (binary) and SSE clients through nginx, each.
const PER_TRANSPORT: usize = 3;
/// Long-pollers through nginx (every poll may land on another node).
const POLLERS: usize = 3;
/// How long a long-poll waits when nothing is new.
const POLL_WAIT_MS: u32 = 1_000;

/// One item a subscriber saw of a room, in arrival order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Event(u64, String),
    Gap(u64, u64),
}

/// What one subscriber saw of the chat room and of the live room.
#[derive(Debug, Default)]
struct Feed {
    chat: Vec<Seen>,
    live: Vec<Seen>,
}

impl Feed {
    /// The highest sequence `items` covers.
    fn newest(items: &[Seen]) -> u64 {
        items.iter().fold(0, |n, item| match item {
            Seen::Event(seq, _) => n.max(*seq),
            Seen::Gap(_, to) => n.max(*to),
        })
    }

    /// Takes a frame of either room.
    fn take(&mut self, rooms: &Rooms, frame: &pb::ServerFrame) {
        if let Some(Out::Gap(gap)) = &frame.kind {
            if let Some(items) = self.items(rooms, &gap.room_id) {
                items.push(Seen::Gap(gap.from_seq, gap.to_seq));
            }
        } else if let Some(m) = room_event(frame) {
            if let Some(items) = self.items(rooms, &m.room_id) {
                items.push(Seen::Event(m.seq, m.text.clone()));
            }
        }
    }

    /// Takes an SSE event of either room (`data:` is the JSON ServerFrame).
    fn take_sse(&mut self, rooms: &Rooms, event: &common::sse::Event) {
        let data = event.json();
        let number = |v: &serde_json::Value| -> u64 {
            v.as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("a numeric sequence in {data}"))
        };
        match event.event.as_str() {
            "message" | "edited" | "deleted" => {
                let m = &data[event.event.as_str()];
                let room = m["roomId"].as_str().expect("roomId");
                let text = m["text"].as_str().unwrap_or_default().to_owned();
                if let Some(items) = self.items(rooms, room) {
                    items.push(Seen::Event(number(&m["seq"]), text));
                }
            }
            "gap" => {
                let g = &data["gap"];
                let room = g["roomId"].as_str().expect("roomId");
                if let Some(items) = self.items(rooms, room) {
                    items.push(Seen::Gap(number(&g["fromSeq"]), number(&g["toSeq"])));
                }
            }
            _ => {}
        }
    }

    fn items(&mut self, rooms: &Rooms, room: &str) -> Option<&mut Vec<Seen>> {
        if room == rooms.chat {
            Some(&mut self.chat)
        } else if room == rooms.live {
            Some(&mut self.live)
        } else {
            None
        }
    }

    /// Whether it has reached both rooms' last numbers.
    fn done(&self, targets: (u64, u64)) -> bool {
        Self::newest(&self.chat) >= targets.0 && Self::newest(&self.live) >= targets.1
    }
}

#[derive(Clone)]
struct Rooms {
    chat: String,
    live: String,
}

/// A subscriber through nginx and where its live subscription started.
struct Client {
    name: String,
    transport: Transport,
    /// The live room's number at subscription: the subscriber owes every number
    /// after it.
    live_start: u64,
    feed: Feed,
}

enum Transport {
    Ws(Box<WsClient>),
    Sse(Box<Sse>),
}

/// Creates a room as `owner` on node 0: a chat room, or a live one.
async fn create(cluster: &Cluster, owner: &Account, live: bool) -> String {
    let reply: pb::CreateRoomResponse = cluster
        .rpc_as(0, &owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public.into(),
                title: if live { "live" } else { "chat" }.into(),
                live: live.then(pb::LiveControls::default),
                ..Default::default()
            },
        )
        .await
        .expect("CreateRoom");
    reply.room.expect("a room").id
}

/// Sends one message to `room` through `rpc` (binary protobuf); its sequence.
async fn send(rpc: &Rpc, room: &str, id: &str) -> u64 {
    let sent: pb::SendMessageResponse = rpc
        .call(
            Codec::Proto,
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.to_owned(),
                text: id.to_owned(),
                client_message_id: id.to_owned(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("send {id}: {e}"));
    sent.message.expect("the message").seq
}

/// Reads a WebSocket or SSE client until it has both rooms' last numbers, then
/// reads on briefly so that anything delivered twice is seen too.
async fn read_to_end(client: &mut Client, rooms: &Rooms, targets: (u64, u64)) {
    let deadline = Instant::now() + DEADLINE;
    let mut quiet_after = None;
    loop {
        let wait = match quiet_after {
            Some(until) => match Instant::checked_duration_since(&until, Instant::now()) {
                Some(left) => left,
                None => return,
            },
            None => IDLE,
        };
        assert!(
            Instant::now() < deadline,
            "{}: not done within {DEADLINE:?}: {:?}",
            client.name,
            client.feed
        );
        match &mut client.transport {
            Transport::Ws(ws) => match ws.next_push(wait).await {
                Incoming::Frame(frame) => client.feed.take(rooms, &frame),
                Incoming::Timeout if quiet_after.is_some() => return,
                other => panic!(
                    "{}: waiting for {targets:?}: {other:?}; so far {:?}",
                    client.name, client.feed
                ),
            },
            Transport::Sse(sse) => match sse.next(wait).await {
                Some(event) => client.feed.take_sse(rooms, &event),
                None if quiet_after.is_some() => return,
                None => panic!(
                    "{}: the stream ended or went quiet waiting for {targets:?}; so far {:?}",
                    client.name, client.feed
                ),
            },
        }
        if quiet_after.is_none() && client.feed.done(targets) {
            quiet_after = Some(Instant::now() + Duration::from_millis(300));
        }
    }
}

/// A long-poller through nginx: polls both rooms from its cursors until it has
/// both rooms' last numbers (published in `targets` once the senders are done).
async fn long_poll(
    rpc: Rpc,
    mut poller: Poller,
    rooms: Rooms,
    targets: Arc<(AtomicU64, AtomicU64)>,
    name: String,
) -> Feed {
    let mut feed = Feed::default();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let target = (
            targets.0.load(Ordering::Acquire),
            targets.1.load(Ordering::Acquire),
        );
        let at = |room: &str| poller.rooms.get(room).copied().flatten().unwrap_or(0);
        if target.0 > 0 && at(&rooms.chat) >= target.0 && at(&rooms.live) >= target.1 {
            // One more poll answers at once with nothing (no duplicates).
            let last = poller.poll_rpc(&rpc, 0).await.expect("the last poll");
            for frame in &last.events {
                feed.take(&rooms, frame);
            }
            return feed;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: stuck at {:?} (targets {target:?}): {feed:?}",
            poller.rooms
        );
        let response = poller
            .poll_rpc(&rpc, POLL_WAIT_MS)
            .await
            .unwrap_or_else(|e| panic!("{name}: poll: {e}"));
        for frame in &response.events {
            assert!(
                !matches!(frame.kind, Some(Out::Error(_))),
                "{name}: the poll answered an error frame: {frame:?}"
            );
            feed.take(&rooms, frame);
        }
        assert_eq!(
            response.cursors.len(),
            2,
            "{name}: a cursor for each room: {response:?}"
        );
    }
}

/// The chat room: exactly the gapless sequence 1..=total with each acknowledged text.
fn assert_chat(name: &str, items: &[Seen], acked: &BTreeMap<u64, String>) {
    let expected: Vec<Seen> = acked
        .iter()
        .map(|(seq, text)| Seen::Event(*seq, text.clone()))
        .collect();
    assert_eq!(
        items, expected,
        "{name}: the chat room is not the acknowledged gapless sequence"
    );
}

/// The live room: in order from `start + 1` to the last acknowledged number,
/// each number once, as an event with its acknowledged text or inside one gap.
fn assert_live(name: &str, items: &[Seen], start: u64, acked: &BTreeMap<u64, String>) {
    let last = *acked.keys().next_back().expect("sent");
    let mut next = start + 1;
    for item in items {
        match item {
            Seen::Event(seq, text) => {
                assert_eq!(
                    *seq, next,
                    "{name}: live event out of order or twice: {items:?}"
                );
                assert_eq!(
                    acked.get(seq),
                    Some(text),
                    "{name}: live seq {seq} is not the acknowledged message"
                );
                next += 1;
            }
            Seen::Gap(from, to) => {
                assert_eq!(*from, next, "{name}: gap out of order: {items:?}");
                assert!(to >= from, "{name}: empty gap {from}..{to}");
                next = to + 1;
            }
        }
    }
    assert_eq!(
        next,
        last + 1,
        "{name}: the live room ends at {last}: {items:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_transport_through_nginx_sees_one_order_per_room_across_three_nodes() {
    let Some(cluster) = Cluster::builder(3)
        .process_nodes()
        .redis()
        .nginx()
        .configure(|s, _| {
            s.realtime.send_rate_per_sec = 100_000;
            s.realtime.send_burst = 100_000;
            s.cluster.reconnect_min_ms = 50;
            s.cluster.reconnect_max_ms = 500;
        })
        .start()
        .await
    else {
        return;
    };
    let nodes = cluster.len();
    let owner = cluster.sign_up(0, &common::unique_name("owner")).await;
    let rooms = Rooms {
        chat: create(&cluster, &owner, false).await,
        live: create(&cluster, &owner, true).await,
    };

    // Every account straight on a node, so that the requests through nginx below
    // are only the clients' own and its round robin spreads them evenly.
    let mut readers = Vec::new();
    for i in 0..3 * PER_TRANSPORT + POLLERS {
        readers.push(
            cluster
                .sign_up(i % nodes, &common::unique_name("reader"))
                .await,
        );
    }
    let mut senders = Vec::new();
    for i in 0..2 * nodes {
        let account = cluster
            .sign_up(i % nodes, &common::unique_name("sender"))
            .await;
        for room in [&rooms.chat, &rooms.live] {
            let _: pb::JoinRoomResponse = cluster
                .rpc_as(i % nodes, &account.access_token)
                .call(
                    Codec::Proto,
                    "RoomService/JoinRoom",
                    &pb::JoinRoomRequest {
                        room_id: room.clone(),
                    },
                )
                .await
                .expect("JoinRoom");
        }
        senders.push(account);
    }
    let mut readers = readers.into_iter();

    // WebSocket clients (both codecs) and SSE streams through nginx: the chat room
    // from its start, the live room from now.
    let mut clients = Vec::new();
    for codec in [WsCodec::Json, WsCodec::Proto] {
        for k in 0..PER_TRANSPORT {
            let reader = readers.next().expect("a reader");
            let mut ws = WsClient::connect_authenticated(
                &cluster.nginx_ws_url(),
                codec,
                &reader.access_token,
            )
            .await;
            ws.subscribe(&rooms.chat, Some(0))
                .await
                .expect("subscribe to the chat room through nginx");
            let live_start = ws
                .subscribe(&rooms.live, None)
                .await
                .expect("watch the live room through nginx");
            clients.push(Client {
                name: format!("WebSocket {codec:?} #{k}"),
                transport: Transport::Ws(Box::new(ws)),
                live_start,
                feed: Feed::default(),
            });
        }
    }
    for k in 0..PER_TRANSPORT {
        let reader = readers.next().expect("a reader");
        let mut sse = Sse::open_url(
            cluster.http(),
            &cluster.nginx_url(&format!(
                "/sse?rooms={}:0,{}&notifications=off",
                rooms.chat, rooms.live
            )),
            &reader.access_token,
            None,
        )
        .await;
        // Both subscriptions are in place (and the live room's start known)
        // before anything is sent.
        let mut live_start = None;
        let mut chat_subscribed = false;
        while live_start.is_none() || !chat_subscribed {
            let event = sse.next_named("subscribed").await;
            let subscribed = &event.json()["subscribed"];
            let last: u64 = subscribed["lastSeq"]
                .as_str()
                .unwrap_or("0")
                .parse()
                .expect("a numeric lastSeq");
            match subscribed["roomId"].as_str() {
                Some(room) if room == rooms.live => live_start = Some(last),
                Some(room) if room == rooms.chat => chat_subscribed = true,
                other => panic!("subscribed to {other:?}"),
            }
        }
        clients.push(Client {
            name: format!("SSE #{k}"),
            transport: Transport::Sse(Box::new(sse)),
            live_start: live_start.expect("the live start"),
            feed: Feed::default(),
        });
    }

    // nginx spread the streaming clients: every node holds some, and together
    // they hold exactly these (nothing else is connected yet).
    let mut per_node = Vec::new();
    for i in 0..nodes {
        let ws = cluster
            .metric(i, "roomcast_connections", &[("transport", "websocket")])
            .await;
        let sse = cluster
            .metric(i, "roomcast_connections", &[("transport", "sse")])
            .await;
        per_node.push((ws, sse));
    }
    for (i, (ws, sse)) in per_node.iter().enumerate() {
        assert!(
            ws + sse >= 1.0,
            "node {i} got no client through nginx: {per_node:?}"
        );
    }
    assert_eq!(
        per_node.iter().map(|(ws, _)| ws).sum::<f64>(),
        (2 * PER_TRANSPORT) as f64,
        "{per_node:?}"
    );
    assert_eq!(
        per_node.iter().map(|(_, sse)| sse).sum::<f64>(),
        PER_TRANSPORT as f64,
        "{per_node:?}"
    );
    assert!(
        per_node.iter().filter(|(ws, _)| *ws >= 1.0).count() >= 2
            && per_node.iter().filter(|(_, sse)| *sse >= 1.0).count() >= 2,
        "each streaming transport is spread over more than one node: {per_node:?}"
    );

    // Long-pollers through nginx: a first poll (answered at once) fixes where the
    // live room starts for each; every later poll may land on another node.
    let targets = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let mut pollers = Vec::new();
    for k in 0..POLLERS {
        let reader = readers.next().expect("a reader");
        let rpc = cluster.nginx_rpc_as(&reader.access_token);
        let mut poller = Poller {
            token: reader.access_token.clone(),
            poll_id: format!("poller{k}"),
            ..Default::default()
        };
        poller.rooms.insert(rooms.chat.clone(), Some(0));
        poller.rooms.insert(rooms.live.clone(), None);
        let first = poller.poll_rpc(&rpc, 0).await.expect("the first poll");
        assert!(first.events.is_empty(), "nothing sent yet: {first:?}");
        let live_start = poller.rooms[&rooms.live].expect("a live cursor");
        let name = format!("long-poll #{k}");
        let task = tokio::spawn(long_poll(
            rpc,
            poller,
            rooms.clone(),
            targets.clone(),
            name.clone(),
        ));
        pollers.push((name, live_start, task));
    }

    // Concurrent senders: two per node, one straight to the node, one through
    // nginx (round robin over every node), each alternating the two rooms.
    let mut tasks = Vec::new();
    for (i, account) in senders.iter().enumerate() {
        let rpc = if i < nodes {
            cluster.rpc_as(i, &account.access_token)
        } else {
            cluster.nginx_rpc_as(&account.access_token)
        };
        let rooms = rooms.clone();
        tasks.push(tokio::spawn(async move {
            let (mut chat, mut live) = (Vec::new(), Vec::new());
            for k in 0..PER_SENDER {
                let id = format!("c{i}-{k}");
                chat.push((send(&rpc, &rooms.chat, &id).await, id));
                let id = format!("l{i}-{k}");
                live.push((send(&rpc, &rooms.live, &id).await, id));
            }
            (chat, live)
        }));
    }
    let mut chat_acked = BTreeMap::new();
    let mut live_acked = BTreeMap::new();
    for task in tasks {
        let (chat, live) = task.await.expect("a sender");
        for (seq, id) in chat {
            assert!(chat_acked.insert(seq, id).is_none(), "chat seq {seq} twice");
        }
        for (seq, id) in live {
            assert!(live_acked.insert(seq, id).is_none(), "live seq {seq} twice");
        }
    }
    let total = (senders.len() * PER_SENDER) as u64;
    assert_eq!(
        chat_acked.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "the store gave every chat send its own gapless number"
    );
    let live_first = *live_acked.keys().next().expect("sent");
    let live_last = *live_acked.keys().next_back().expect("sent");
    assert_eq!(
        live_last - live_first + 1,
        total,
        "the live room's numbers are contiguous across nodes"
    );
    targets.0.store(total, Ordering::Release);
    targets.1.store(live_last, Ordering::Release);

    for client in &mut clients {
        read_to_end(client, &rooms, (total, live_last)).await;
    }
    let mut feeds: Vec<(String, u64, Feed)> = clients
        .into_iter()
        .map(|c| (c.name, c.live_start, c.feed))
        .collect();
    for (name, live_start, task) in pollers {
        feeds.push((name, live_start, task.await.expect("a poller")));
    }
    for (name, live_start, feed) in &feeds {
        assert_chat(name, &feed.chat, &chat_acked);
        assert!(
            *live_start < live_first,
            "{name}: watched the live room from {live_start}, after the first send ({live_first})"
        );
        assert_live(name, &feed.live, *live_start, &live_acked);
    }
}
