//! Cross-node behaviour that one node gets for free: a newer long-poll with the
//! same poll id ends the older on another node, an announcement reaches every
//! node's users once, a dead node's last commits reach the others' subscribers,
//! live rooms' retry de-duplication, slow mode and resume across nodes. Several
//! roomcast nodes on one PostgreSQL database and one Redis, built by the
//! multi-node harness (tests/common/cluster.rs).

mod common;

use std::time::{Duration, Instant};

use common::{
    cluster::Cluster,
    poll, rooms,
    ws::{Incoming, WsClient, WsCodec},
    Account, Codec,
};
use pb::server_frame::Kind as Out;
use roomcast::{
    actors::poll_hub::CountWaiters, cluster::presence::UsersElsewhere, domain::push::SUPERSEDED,
    proto::v1 as pb, settings::Settings,
};

/// How long anything that should be immediate may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(10);

/// A poll's own wait, far longer than [`WAIT`]: a poll that answers within
/// [`WAIT`] was ended, not timed out.
const LONG_WAIT_MS: u32 = 30_000;

/// `nodes` in-process nodes linked through Redis, with an admin; `None` when
/// PostgreSQL or Redis is missing (reported as skipped).
async fn linked(
    nodes: usize,
    configure: impl Fn(&mut Settings) + Send + Sync + 'static,
) -> Option<Cluster> {
    Cluster::builder(nodes)
        .redis()
        .admin()
        .configure(move |s, _| configure(s))
        .start()
        .await
}

/// How many long-polls wait on node `index` (asked of its poll hub).
async fn waiters(cluster: &Cluster, index: usize) -> usize {
    let server = cluster.server(index).expect("an in-process node");
    server
        .state()
        .polls
        .send(CountWaiters)
        .await
        .expect("the poll hub answers")
}

/// Waits until `count` polls wait on node `index`.
async fn until_waiting(cluster: &Cluster, index: usize, count: usize) {
    let deadline = Instant::now() + WAIT;
    while waiters(cluster, index).await != count {
        assert!(
            Instant::now() < deadline,
            "node {index}: {} polls waiting, expected {count}",
            waiters(cluster, index).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A public room of a new owner made on node 0, with a new member; answers
/// (owner, member, room).
async fn room_with_member(cluster: &Cluster) -> (Account, Account, String) {
    let node = cluster.server(0).expect("an in-process node");
    let owner = cluster.sign_up(0, &common::unique_name("owner")).await;
    let member = cluster.sign_up(0, &common::unique_name("member")).await;
    let room = rooms::create_room(node, &owner, pb::RoomKind::Public).await;
    rooms::join(node, &member, &room).await;
    (owner, member, room)
}

/// Starts a long-poll of `room` from its start on node `index` as `token`, with
/// `poll_id`.
fn spawn_poll(
    cluster: &Cluster,
    index: usize,
    token: &str,
    room: &str,
    poll_id: &str,
) -> tokio::task::JoinHandle<pb::PollResponse> {
    let mut request = poll::request(&[(room, Some(0))], LONG_WAIT_MS);
    request.poll_id = poll_id.to_owned();
    let rpc = cluster.rpc_as(index, token);
    tokio::spawn(async move {
        rpc.call(Codec::Proto, "PushService/Poll", &request)
            .await
            .expect("the poll answers")
    })
}

// ---------------------------------------------------------------------------
// Poll ids across nodes
// ---------------------------------------------------------------------------

/// A newer poll with the same poll id on another node ends the older one at once
/// (`ended` 4505), as on one node; the newer one keeps waiting and gets the next
/// event; a poll with another poll id is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_poll_on_another_node_ends_the_older_with_the_same_poll_id() {
    let Some(cluster) = linked(2, |_| {}).await else {
        return;
    };
    let (owner, member, room) = room_with_member(&cluster).await;
    let older = spawn_poll(&cluster, 0, &member.access_token, &room, "tab-1");
    let other_tab = spawn_poll(&cluster, 0, &member.access_token, &room, "tab-2");
    until_waiting(&cluster, 0, 2).await;

    let newer = spawn_poll(&cluster, 1, &member.access_token, &room, "tab-1");
    until_waiting(&cluster, 1, 1).await;
    let ended = tokio::time::timeout(WAIT, older)
        .await
        .expect("the older poll ends at once, not at its timeout")
        .expect("the poll task");
    assert_eq!(
        ended.ended.as_ref().map(|e| e.code),
        Some(SUPERSEDED),
        "{ended:?}"
    );
    assert!(poll::seqs(&ended, &room).is_empty(), "{ended:?}");
    // The newer one, and the other poll id, still wait.
    until_waiting(&cluster, 0, 1).await;
    until_waiting(&cluster, 1, 1).await;

    rooms::send_http(
        cluster.server(1).expect("in-process"),
        &owner,
        &room,
        "hello",
        "m1",
    )
    .await;
    for (name, waiting) in [("newer", newer), ("other poll id", other_tab)] {
        let answer = tokio::time::timeout(WAIT, waiting)
            .await
            .unwrap_or_else(|_| panic!("the {name} poll wakes on the new event"))
            .expect("the poll task");
        assert!(answer.ended.is_none(), "{name}: {answer:?}");
        assert_eq!(poll::seqs(&answer, &room), vec![1], "{name}");
    }
}

// ---------------------------------------------------------------------------
// Announcements across nodes
// ---------------------------------------------------------------------------

/// Waits for the announcement `text` on `ws`, then checks that no second one
/// arrives.
async fn announced_once(ws: &mut WsClient, text: &str, who: &str) {
    let got = ws
        .push_matching(WAIT, |kind| match kind {
            Out::Announcement(a) => Some(a.text.clone()),
            _ => None,
        })
        .await;
    assert_eq!(got, text, "{who}");
    let quiet_until = Instant::now() + Duration::from_millis(600);
    while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
        match ws.next_push(left).await {
            Incoming::Timeout => break,
            Incoming::Frame(f) => assert!(
                !matches!(f.kind, Some(Out::Announcement(_))),
                "{who}: a second announcement: {f:?}"
            ),
            other => panic!("{who}: {other:?}"),
        }
    }
}

/// AdminService.Announce on one node reaches every connection on every node
/// exactly once (not twice on the node that took the request), and counts each
/// user once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_reaches_every_node_once() {
    let Some(cluster) = linked(2, |s| {
        s.cluster.presence_refresh_ms = 100;
        s.cluster.presence_expiry_ms = 2_000;
    })
    .await
    else {
        return;
    };
    let here = cluster.sign_up(0, &common::unique_name("here")).await;
    let there = cluster.sign_up(0, &common::unique_name("there")).await;
    let both = cluster.sign_up(0, &common::unique_name("both")).await;
    let connect = |index: usize, account: &Account| {
        let (url, token) = (cluster.ws_url(index), account.access_token.clone());
        async move { WsClient::connect_authenticated(&url, WsCodec::Json, &token).await }
    };
    let mut clients = vec![
        ("here on node 0", connect(0, &here).await),
        ("there on node 1", connect(1, &there).await),
        ("both on node 0", connect(0, &both).await),
        ("both on node 1", connect(1, &both).await),
    ];
    // Node 0's presence board learns node 1's users within a refresh.
    let admin = cluster.admin(0).await;
    let board = cluster
        .server(0)
        .expect("in-process")
        .state()
        .presence
        .clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let elsewhere = board.send(UsersElsewhere).await.expect("the board answers");
        if elsewhere.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1's users never seen on node 0: {elsewhere:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let text = "Maintenance at 02:00 UTC";
    let reply: pb::AnnounceResponse = cluster
        .rpc_as(0, &admin.access_token)
        .call(
            Codec::Proto,
            "AdminService/Announce",
            &pb::AnnounceRequest { text: text.into() },
        )
        .await
        .expect("Announce");
    for (who, ws) in &mut clients {
        announced_once(ws, text, who).await;
    }
    assert_eq!(reply.users_reached, 3, "here, there and both, once each");
}

// ---------------------------------------------------------------------------
// A node that dies after committing
// ---------------------------------------------------------------------------

/// Sends `tag-1`, `tag-2`, … to `room` on `base` over HTTP, one at a time, until
/// a send fails (the node died) or `max` were sent; answers the acknowledged
/// sequences.
async fn send_until_dead(
    base: String,
    token: String,
    room: String,
    tag: String,
    max: usize,
) -> Vec<u64> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let mut acked = Vec::new();
    for i in 1..=max {
        let id = format!("{tag}-{i}");
        let reply = client
            .post(format!("{base}/roomcast.v1.RoomService/SendMessage"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"roomId": room, "text": id, "clientMessageId": id}))
            .send()
            .await;
        let Ok(reply) = reply else { break };
        if !reply.status().is_success() {
            break;
        }
        let Ok(body) = reply.json::<serde_json::Value>().await else {
            break;
        };
        match body["message"]["seq"].as_str().and_then(|s| s.parse().ok()) {
            Some(seq) => acked.push(seq),
            None => break,
        }
    }
    acked
}

/// `kill -9` of a node during a burst of sends on it: the other node's subscriber
/// gets every message the killed node acknowledged, with no further send in the
/// room (a message committed but never published is read from the store when
/// the node's presence expires), within the presence expiry and a margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_last_commits_reach_the_other_nodes_without_another_send() {
    const VICTIM: usize = 1;
    const EXPIRY_MS: u64 = 800;
    let Some(cluster) = Cluster::builder(2)
        .redis()
        .node_kind(VICTIM, common::cluster::NodeKind::Process)
        .configure(|s, _| {
            s.realtime.send_rate_per_sec = 100_000;
            s.realtime.send_burst = 100_000;
            s.cluster.presence_refresh_ms = 100;
            s.cluster.presence_expiry_ms = EXPIRY_MS;
        })
        .start()
        .await
    else {
        return;
    };
    let (owner, member, room) = room_with_member(&cluster).await;
    let mut watcher =
        WsClient::connect_authenticated(&cluster.ws_url(0), WsCodec::Proto, &member.access_token)
            .await;
    watcher.subscribe(&room, Some(0)).await.expect("subscribe");

    const SENDERS: usize = 4;
    let senders: Vec<_> = (0..SENDERS)
        .map(|k| {
            tokio::spawn(send_until_dead(
                cluster.url(VICTIM, ""),
                owner.access_token.clone(),
                room.clone(),
                format!("s{k}"),
                5_000,
            ))
        })
        .collect();
    // Kill in the middle of the burst: once the watcher has seen some of it.
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 150 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the burst did not start"
        );
        if let Incoming::Frame(frame) = watcher.next_push(Duration::from_millis(200)).await {
            if let Some(m) = common::ws::room_event(&frame).filter(|m| m.room_id == room) {
                seen.insert(m.seq);
            }
        }
    }
    cluster.kill9(VICTIM);
    let killed_at = Instant::now();
    let mut acked = std::collections::BTreeSet::new();
    for sender in senders {
        acked.extend(sender.await.expect("a sender task"));
    }
    assert!(!acked.is_empty(), "the killed node acknowledged nothing");

    // No send in the room from here on: everything acknowledged must come anyway.
    let deadline = killed_at + Duration::from_millis(EXPIRY_MS) + Duration::from_secs(8);
    while !acked.is_subset(&seen) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            let missing: Vec<_> = acked.difference(&seen).collect();
            panic!(
                "{} acknowledged messages never reached the other node's subscriber \
                 (of {} acknowledged): {missing:?}",
                missing.len(),
                acked.len()
            );
        };
        if let Incoming::Frame(frame) = watcher.next_push(left).await {
            if let Some(m) = common::ws::room_event(&frame).filter(|m| m.room_id == room) {
                seen.insert(m.seq);
            }
        }
    }
    // The watcher's view has no hole below the newest acknowledged message.
    let newest = *acked.iter().next_back().expect("acked");
    assert!(
        (1..=newest).all(|s| seen.contains(&s)),
        "a hole below {newest}"
    );
}

// ---------------------------------------------------------------------------
// Live rooms across nodes
// ---------------------------------------------------------------------------

/// A public live room of `owner` made on node 0 with `controls`.
async fn live_room(cluster: &Cluster, owner: &Account, controls: pb::LiveControls) -> String {
    let reply: pb::CreateRoomResponse = cluster
        .rpc_as(0, &owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public as i32,
                title: "live".into(),
                live: Some(controls),
                ..Default::default()
            },
        )
        .await
        .expect("create a live room");
    reply.room.expect("a room").id
}

/// Sends `text` to `room` on node `index` over HTTP as `account`.
async fn send_on(
    cluster: &Cluster,
    index: usize,
    account: &Account,
    room: &str,
    text: &str,
    client_message_id: &str,
) -> Result<pb::Message, common::RpcError> {
    let reply: pb::SendMessageResponse = cluster
        .rpc_as(index, &account.access_token)
        .call(
            Codec::Proto,
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.to_owned(),
                text: text.to_owned(),
                client_message_id: client_message_id.to_owned(),
                ..Default::default()
            },
        )
        .await?;
    Ok(reply.message.expect("the message"))
}

/// Slow mode, the rate limit and retry de-duplication of a live room hold for
/// the user across nodes, not per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_room_retries_slow_mode_and_rate_limit_hold_across_nodes() {
    let Some(cluster) = linked(2, |_| {}).await else {
        return;
    };
    let owner = cluster.sign_up(0, &common::unique_name("host")).await;
    let viewer = cluster.sign_up(0, &common::unique_name("viewer")).await;
    let node = cluster.server(0).expect("in-process");

    // Slow mode: one message a minute, whichever node takes it.
    let slow = live_room(
        &cluster,
        &owner,
        pb::LiveControls {
            slow_mode_seconds: 60,
            ..Default::default()
        },
    )
    .await;
    rooms::join(node, &viewer, &slow).await;
    send_on(&cluster, 0, &viewer, &slow, "first", "")
        .await
        .expect("the first send");
    let refused = send_on(&cluster, 1, &viewer, &slow, "second", "")
        .await
        .expect_err("slow mode on the other node");
    let message = refused.expect("resource_exhausted", 429);
    assert!(message.contains("slow_mode"), "{message}");
    // Hosts are exempt, on every node.
    send_on(&cluster, 1, &owner, &slow, "host", "")
        .await
        .expect("a host's send");

    // Rate limit: two a minute; one on each node, then a third anywhere is refused
    // (each node alone has seen at most one).
    let rated = live_room(
        &cluster,
        &owner,
        pb::LiveControls {
            rate_limit_per_minute: 2,
            ..Default::default()
        },
    )
    .await;
    rooms::join(node, &viewer, &rated).await;
    send_on(&cluster, 0, &viewer, &rated, "one", "")
        .await
        .expect("one");
    send_on(&cluster, 1, &viewer, &rated, "two", "")
        .await
        .expect("two");
    let refused = send_on(&cluster, 1, &viewer, &rated, "three", "")
        .await
        .expect_err("over the rate limit across nodes");
    let message = refused.expect("resource_exhausted", 429);
    assert!(message.contains("rate_limit"), "{message}");

    // A retry on another node gets the first result, not a second message.
    let open = live_room(&cluster, &owner, pb::LiveControls::default()).await;
    rooms::join(node, &viewer, &open).await;
    for k in 0..5 {
        let key = format!("retry-{k}");
        let first = send_on(&cluster, k % 2, &viewer, &open, "once", &key)
            .await
            .expect("the first attempt");
        let retry = send_on(&cluster, (k + 1) % 2, &viewer, &open, "once", &key)
            .await
            .expect("the retry");
        assert_eq!((retry.seq, &retry.id), (first.seq, &first.id), "{key}");
    }
    let last = send_on(&cluster, 0, &viewer, &open, "after", "after")
        .await
        .expect("a new message");
    assert_eq!(
        last.seq, 6,
        "five messages and this one, nothing numbered twice"
    );
}

/// A live resume on a node from a sequence it has not received (another node
/// numbered it and never delivered it here) is accepted, as in chat rooms: the
/// numbers no node delivered come as a `gap`, and the next comments follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_resume_from_a_sequence_this_node_has_not_received_is_accepted() {
    let Some(cluster) = linked(2, |s| s.cluster.live_holdback_ms = 100).await else {
        return;
    };
    let owner = cluster.sign_up(0, &common::unique_name("host")).await;
    let viewer = cluster.sign_up(0, &common::unique_name("viewer")).await;
    let room = live_room(&cluster, &owner, pb::LiveControls::default()).await;
    rooms::join(cluster.server(0).expect("in-process"), &viewer, &room).await;
    // The room is loaded on node 1: a viewer watches there.
    let mut holder =
        WsClient::connect_authenticated(&cluster.ws_url(1), WsCodec::Json, &viewer.access_token)
            .await;
    holder
        .subscribe(&room, Some(0))
        .await
        .expect("watch on node 1");
    let sent = send_on(&cluster, 0, &owner, &room, "hello", "h1")
        .await
        .expect("send");
    assert_eq!(sent.seq, 1);
    holder.collect_until(&room, 1, WAIT).await;

    // A node numbers 3 comments and dies before publishing them: the shared
    // counter moves, no node receives them.
    let store = &cluster.server(0).expect("in-process").state().store;
    let counter = store
        .take_live_seqs(&roomcast::ids::RoomId(room.clone()), 3)
        .await
        .expect("take numbers");
    assert_eq!(counter, 4);

    // A client that saw 4 (on the node that died) resumes on node 1.
    let mut resumed =
        WsClient::connect_authenticated(&cluster.ws_url(1), WsCodec::Json, &viewer.access_token)
            .await;
    let last = resumed
        .subscribe(&room, Some(4))
        .await
        .unwrap_or_else(|e| panic!("resuming from 4 on node 1: {e:?}"));
    assert!(last >= 4, "subscribed at {last}");
    // Beyond the counter is still out of range.
    let mut beyond =
        WsClient::connect_authenticated(&cluster.ws_url(1), WsCodec::Json, &viewer.access_token)
            .await;
    let err = beyond
        .subscribe(&room, Some(50))
        .await
        .expect_err("beyond the end");
    assert_eq!(err.code, "out_of_range", "{err:?}");

    // The watcher on node 1 is told what no node delivered.
    let gap = holder
        .push_matching(WAIT, |kind| match kind {
            Out::Gap(g) if g.room_id == room => Some((g.from_seq, g.to_seq)),
            _ => None,
        })
        .await;
    assert_eq!(gap, (2, 4));
    // The next comment reaches both, numbered after the counter.
    let next = send_on(&cluster, 0, &owner, &room, "again", "h2")
        .await
        .expect("send");
    assert_eq!(next.seq, 5);
    for (name, ws) in [("holder", &mut holder), ("resumed", &mut resumed)] {
        let events = ws.collect_until(&room, 5, WAIT).await;
        let seqs: Vec<u64> = events.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![5], "{name}");
    }
}

/// A long-poll on a node with a live-room cursor another node numbered and this
/// node has not received yet (a round robin in front of the nodes sends it
/// anywhere) waits for what follows it, as a resume does; a cursor beyond the
/// shared counter is still `out_of_range`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_poll_from_a_sequence_this_node_has_not_received_waits_for_what_follows() {
    let Some(cluster) = linked(2, |s| s.cluster.live_holdback_ms = 100).await else {
        return;
    };
    let owner = cluster.sign_up(0, &common::unique_name("host")).await;
    let viewer = cluster.sign_up(0, &common::unique_name("viewer")).await;
    let room = live_room(&cluster, &owner, pb::LiveControls::default()).await;
    rooms::join(cluster.server(0).expect("in-process"), &viewer, &room).await;
    // Node 1 loads the room (a poll of nothing yet), then receives seq 1.
    let rpc = cluster.rpc_as(1, &viewer.access_token);
    let empty: pb::PollResponse = rpc
        .call(
            Codec::Proto,
            "PushService/Poll",
            &poll::request(&[(&room, Some(0))], 0),
        )
        .await
        .expect("poll node 1");
    assert!(poll::errors(&empty).is_empty(), "{empty:?}");
    let sent = send_on(&cluster, 0, &owner, &room, "hello", "p1")
        .await
        .expect("send");
    assert_eq!(sent.seq, 1);
    let deadline = Instant::now() + WAIT;
    loop {
        let first: pb::PollResponse = rpc
            .call(
                Codec::Proto,
                "PushService/Poll",
                &poll::request(&[(&room, Some(0))], 0),
            )
            .await
            .expect("poll node 1");
        assert!(poll::errors(&first).is_empty(), "{first:?}");
        if poll::seqs(&first, &room) == vec![1] {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 never had seq 1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A node numbers 3 comments and dies before publishing them: the shared
    // counter moves to 4, no node receives them.
    let store = &cluster.server(0).expect("in-process").state().store;
    let counter = store
        .take_live_seqs(&roomcast::ids::RoomId(room.clone()), 3)
        .await
        .expect("take numbers");
    assert_eq!(counter, 4);

    // A client that saw 4 polls node 1: the poll waits for the next comment.
    let waiting = {
        let rpc = cluster.rpc_as(1, &viewer.access_token);
        let request = poll::request(&[(&room, Some(4))], LONG_WAIT_MS);
        tokio::spawn(async move {
            rpc.call::<_, pb::PollResponse>(Codec::Proto, "PushService/Poll", &request)
                .await
                .expect("the poll answers")
        })
    };
    until_waiting(&cluster, 1, 1).await;
    let next = send_on(&cluster, 0, &owner, &room, "again", "p2")
        .await
        .expect("send");
    assert_eq!(next.seq, 5);
    let answered = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the poll answers with the next comment")
        .expect("the poll task");
    assert!(poll::errors(&answered).is_empty(), "{answered:?}");
    assert_eq!(poll::seqs(&answered, &room), vec![5], "{answered:?}");
    assert_eq!(poll::cursor(&answered, &room), Some(5));

    // Beyond the shared counter is still out of range.
    let beyond: pb::PollResponse = cluster
        .rpc_as(1, &viewer.access_token)
        .call(
            Codec::Proto,
            "PushService/Poll",
            &poll::request(&[(&room, Some(50))], 0),
        )
        .await
        .expect("poll beyond the end");
    let errors = poll::errors(&beyond);
    assert_eq!(errors.len(), 1, "{beyond:?}");
    assert_eq!(errors[0].code, "out_of_range", "{beyond:?}");
}
