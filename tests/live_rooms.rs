//! Live rooms and batched frames end to end (docs/live-rooms.md): real clients on
//! real sockets, both subprotocols, SQLite and PostgreSQL. A live room keeps its
//! comments in memory yet numbers them gaplessly: every subscriber sees each
//! sequence once, in order, or a `gap` frame that covers exactly what it missed.
//! Batches carry the same events in the same order as single frames; host controls
//! refuse with errors that name their rule; viewer counts arrive at their interval;
//! anonymous viewers may watch only the rooms that allow them. A chat room with
//! coalescing and batches keeps every chat guarantee.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    rooms::{create_room, history, join, last_seq, send_http},
    ws::{Incoming, WsClient, WsCodec},
    Account, Backend, TestServer,
};
use rand::Rng as _;
use roomcast::{proto::v1 as pb, settings::Settings};

use pb::{client_frame::Kind as In, server_frame::Kind as Out};

const IDLE: Duration = Duration::from_secs(30);

fn ws_url(server: &TestServer) -> String {
    server.ws_url("/ws")
}

fn fast_sends(settings: &mut Settings) {
    settings.realtime.send_rate_per_sec = 100_000;
    settings.realtime.send_burst = 100_000;
}

/// Creates a live public room owned by `owner` with `controls`.
async fn create_live_room(
    server: &TestServer,
    owner: &Account,
    controls: pb::LiveControls,
) -> pb::Room {
    let reply: pb::CreateRoomResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
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
    reply.room.expect("a room")
}

async fn get_room(server: &TestServer, account: &Account, room_id: &str) -> pb::Room {
    let reply: pb::GetRoomResponse = server
        .rpc_as(&account.access_token)
        .call_proto(
            "RoomService/GetRoom",
            &pb::GetRoomRequest {
                room_id: room_id.into(),
            },
        )
        .await
        .expect("get the room");
    reply.room.expect("a room")
}

/// What a subscriber saw of one room, batches unpacked: each event or gap in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Event(u64, String),
    Gap(u64, u64),
}

/// Reads pushes until the room's position reaches `last_seq`; unpacks batches
/// (counting them) and answers events and gaps in arrival order.
async fn watch_until(client: &mut WsClient, room_id: &str, last_seq: u64) -> (Vec<Seen>, usize) {
    let mut seen = Vec::new();
    let mut batches = 0;
    let mut position = 0;
    while position < last_seq {
        let frame = match client.next_push(IDLE).await {
            Incoming::Frame(frame) => frame,
            other => panic!("watching {room_id} up to {last_seq} (at {position}): {other:?}"),
        };
        let frames = match frame.kind {
            Some(Out::Batch(batch)) => {
                assert_eq!(batch.room_id, room_id, "a batch names its room");
                assert!(batch.frames.len() > 1, "a batch holds several frames");
                batches += 1;
                batch.frames
            }
            _ => vec![frame],
        };
        for frame in frames {
            match frame.kind {
                Some(Out::Message(m) | Out::Edited(m) | Out::Deleted(m))
                    if m.room_id == room_id =>
                {
                    position = position.max(m.seq);
                    seen.push(Seen::Event(m.seq, m.text));
                }
                Some(Out::Gap(g)) if g.room_id == room_id => {
                    position = position.max(g.to_seq);
                    seen.push(Seen::Gap(g.from_seq, g.to_seq));
                }
                _ => {}
            }
        }
    }
    (seen, batches)
}

/// Asserts that `seen` covers `from..=to` exactly once, in order, each number as
/// its event (with the acknowledged text) or inside a gap; answers how many
/// numbers gaps covered.
#[track_caller]
fn assert_covers(
    seen: &[Seen],
    from: u64,
    to: u64,
    acked: &HashMap<u64, String>,
    who: &str,
) -> u64 {
    let mut next = from;
    let mut gapped = 0;
    for item in seen {
        match item {
            Seen::Event(seq, text) => {
                assert_eq!(
                    *seq, next,
                    "{who}: expected seq {next}, got {item:?} in {seen:?}"
                );
                assert_eq!(
                    acked.get(seq),
                    Some(text),
                    "{who}: seq {seq} has the acked text"
                );
                next += 1;
            }
            Seen::Gap(a, b) => {
                assert_eq!(
                    *a, next,
                    "{who}: a gap must start where delivery stopped: {item:?}"
                );
                assert!(b >= a, "{who}: an empty gap {item:?}");
                gapped += b - a + 1;
                next = b + 1;
            }
        }
    }
    assert_eq!(next, to + 1, "{who}: must reach {to} exactly: {seen:?}");
    gapped
}

// ---------------------------------------------------------------------------
// Concurrent senders, subscribers joining at random points, a small ring.
// ---------------------------------------------------------------------------

const SENDERS: usize = 6;
const PER_SENDER: usize = 60;
const SUBSCRIBERS: usize = 12;
const RING: usize = 40;

async fn gapless_or_explicit_gaps(backend: Backend, codec: WsCodec) {
    concurrent_senders_and_joins(backend, codec, false).await;
}

ws_matrix!(concurrent_live, gapless_or_explicit_gaps);

/// The same with the subscribers taking turns (`rooms.live.coalesce_groups`): the
/// room's 40 ms window always counts as busy, so it ticks every 10 ms (the
/// shortest tick), each tick the turn of two of the shards' 8 groups, and each
/// group gets what came since its last turn.
async fn gapless_when_subscribers_take_turns(backend: Backend, codec: WsCodec) {
    concurrent_senders_and_joins(backend, codec, true).await;
}

ws_matrix!(concurrent_live_turns, gapless_when_subscribers_take_turns);

async fn concurrent_senders_and_joins(backend: Backend, codec: WsCodec, turns: bool) {
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            fast_sends(s);
            s.rooms.live.ring_size = RING;
            s.rooms.live.coalesce_ms = 10;
            // Small blocks: the room reserves numbers in the store many times.
            s.rooms.live.seq_reservation = 16;
            if turns {
                s.rooms.live.coalesce_ms = 40;
                s.rooms.live.coalesce_min_ms = 10;
                s.rooms.live.coalesce_writes_per_sec = 1;
                s.rooms.live.coalesce_groups = 8;
            }
        })
        .await,
    );
    const TURNS: &str = "roomcast_fanout_shard_turns_total";
    let turns_before = server.metric(TURNS, &[]).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_live_room(&server, &owner, pb::LiveControls::default())
        .await
        .id;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let account = server
            .sign_up(&common::unique_name(&format!("s{i}x")))
            .await;
        join(&server, &account, &room).await;
        senders.push(account);
    }
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let total = (SENDERS * PER_SENDER) as u64;

    let mut subscriber_tasks = Vec::new();
    for n in 0..SUBSCRIBERS {
        let (server, reader, room) = (server.clone(), reader.clone(), room.clone());
        let delay = Duration::from_millis(rand::thread_rng().gen_range(0..1200));
        let pick = rand::thread_rng().gen_range(0.0..=1.0f64);
        subscriber_tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let last = get_room(&server, &reader, &room).await.last_seq;
            let since = (pick * last as f64) as u64;
            // Half the subscribers take batches.
            let mut client = if n % 2 == 0 {
                WsClient::connect_batched(&ws_url(&server), codec, Some(&reader.access_token), None)
                    .await
            } else {
                WsClient::connect_authenticated(&ws_url(&server), codec, &reader.access_token).await
            };
            client
                .subscribe(&room, Some(since))
                .await
                .expect("subscribe");
            let (seen, batches) = watch_until(&mut client, &room, total).await;
            (n, since, seen, batches)
        }));
    }

    let mut sender_tasks = Vec::new();
    for (i, account) in senders.iter().cloned().enumerate() {
        let (server, room) = (server.clone(), room.clone());
        sender_tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            if i % 2 == 0 {
                let mut client =
                    WsClient::connect_authenticated(&ws_url(&server), codec, &account.access_token)
                        .await;
                for j in 0..PER_SENDER {
                    let text = format!("sender {i} message {j}");
                    let sent = client
                        .send_message(&room, &text, &format!("{i}-{j}"))
                        .await
                        .unwrap_or_else(|e| panic!("send {i}-{j}: {e:?}"));
                    acks.push((sent.message.expect("acked").seq, text));
                }
            } else {
                for j in 0..PER_SENDER {
                    let text = format!("sender {i} message {j}");
                    let sent =
                        send_http(&server, &account, &room, &text, &format!("{i}-{j}")).await;
                    acks.push((sent.message.expect("acked").seq, text));
                }
            }
            acks
        }));
    }
    let mut acked = HashMap::new();
    for task in sender_tasks {
        let acks = task.await.expect("sender task");
        assert!(
            acks.windows(2).all(|w| w[0].0 < w[1].0),
            "one sender's acks increase"
        );
        acked.extend(acks);
    }
    let mut seqs: Vec<u64> = acked.keys().copied().collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "acks cover 1..={total} once"
    );
    // Nothing is written to the history one by one.
    assert!(
        history(&server, &owner, &room).await.is_empty(),
        "live comments are not stored"
    );

    for task in subscriber_tasks {
        let (n, since, seen, batches) = task.await.expect("subscriber task");
        let who = format!("subscriber {n} (since {since})");
        let gapped = assert_covers(&seen, since + 1, total, &acked, &who);
        // A gap only where the ring no longer reached back.
        assert!(
            gapped <= total.saturating_sub(RING as u64),
            "{who}: gaps too large: {gapped}"
        );
        // Batches are allowed, not required, under this load.
        if n % 2 == 1 {
            assert_eq!(
                batches, 0,
                "{who}: a client that did not opt in gets no batch"
            );
        }
    }
    // A retried send (same client_message_id) returns the first result.
    let first = send_http(&server, &senders[1], &room, "once", "retry-1").await;
    let retry = send_http(&server, &senders[1], &room, "ignored", "retry-1").await;
    assert!(
        retry.duplicate && !first.duplicate,
        "a retry within the ring is a duplicate"
    );
    assert_eq!(retry.message, first.message);
    // Retries racing their first attempt: one message, the others duplicates of it.
    let racing = (0..4).map(|_| {
        let (server, account, room) = (server.clone(), senders[2].clone(), room.clone());
        async move { send_http(&server, &account, &room, "raced", "race-1").await }
    });
    let replies = futures_util::future::join_all(racing).await;
    assert_eq!(
        replies.iter().filter(|r| !r.duplicate).count(),
        1,
        "{replies:?}"
    );
    assert!(
        replies.windows(2).all(|w| w[0].message == w[1].message),
        "{replies:?}"
    );
    if turns {
        assert!(
            server.metric(TURNS, &[]).await > turns_before,
            "the room's subscribers took turns"
        );
    }
}

// ---------------------------------------------------------------------------
// Batches: the same events in the same order, in one frame.
// ---------------------------------------------------------------------------

async fn batches_carry_the_same_events(backend: Backend, codec: WsCodec) {
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            fast_sends(s);
            // A long window: everything sent while it runs goes in one batch.
            s.rooms.live.coalesce_ms = 400;
            s.rooms.live.coalesce_min_ms = 400;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_live_room(&server, &owner, pb::LiveControls::default())
        .await
        .id;
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let mut batched =
        WsClient::connect_batched(&ws_url(&server), codec, Some(&reader.access_token), None).await;
    let mut single =
        WsClient::connect_authenticated(&ws_url(&server), codec, &reader.access_token).await;
    batched.subscribe(&room, None).await.expect("subscribe");
    single.subscribe(&room, None).await.expect("subscribe");
    const N: u64 = 30;
    // The first send of a quiet room goes at once; the rest arrive within the window.
    let sends = (0..N).map(|i| {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        async move {
            let text = format!("burst {i} \"quoted\" é");
            let sent = send_http(&server, &owner, &room, &text, &format!("b{i}")).await;
            (sent.message.expect("acked").seq, text)
        }
    });
    let acked: HashMap<u64, String> = futures_util::future::join_all(sends)
        .await
        .into_iter()
        .collect();
    let (batch_seen, batches) = watch_until(&mut batched, &room, N).await;
    let (single_seen, singles) = watch_until(&mut single, &room, N).await;
    assert_covers(&batch_seen, 1, N, &acked, "batched client");
    assert_covers(&single_seen, 1, N, &acked, "single-frame client");
    assert_eq!(
        batch_seen, single_seen,
        "batches decode to the same events in order"
    );
    assert!(batches >= 1, "a busy window arrives as a batch");
    assert_eq!(singles, 0, "no batch for a client that did not opt in");
}

ws_matrix!(batches, batches_carry_the_same_events);

// ---------------------------------------------------------------------------
// Host controls.
// ---------------------------------------------------------------------------

async fn update_controls(
    server: &TestServer,
    who: &Account,
    room: &str,
    controls: pb::LiveControls,
) -> Result<pb::UpdateLiveControlsResponse, common::RpcError> {
    server
        .rpc_as(&who.access_token)
        .call_proto(
            "RoomService/UpdateLiveControls",
            &pb::UpdateLiveControlsRequest {
                room_id: room.into(),
                controls: Some(controls),
            },
        )
        .await
}

async fn try_send(
    server: &TestServer,
    who: &Account,
    room: &str,
    text: &str,
) -> Result<pb::SendMessageResponse, common::RpcError> {
    server
        .rpc_as(&who.access_token)
        .call_proto(
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.into(),
                text: text.into(),
                ..Default::default()
            },
        )
        .await
}

async fn host_controls(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s| {
        fast_sends(s);
        s.rooms.live.word_filter = vec!["Spoiler".into()];
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let member = server.sign_up(&common::unique_name("member")).await;
    let room = create_live_room(
        &server,
        &owner,
        pb::LiveControls {
            slow_mode_seconds: 30,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(room.live.as_ref().map(|l| l.slow_mode_seconds), Some(30));
    let room = room.id;
    join(&server, &member, &room).await;
    let mut ws =
        WsClient::connect_authenticated(&ws_url(&server), codec, &member.access_token).await;
    ws.subscribe(&room, None).await.expect("subscribe");

    // Slow mode: the second message within 30 s is refused, naming the rule and
    // the delay (over the WebSocket too, with retry_after_ms).
    try_send(&server, &member, &room, "first")
        .await
        .expect("the first message");
    let message = common::expect_error(
        try_send(&server, &member, &room, "second").await,
        "resource_exhausted",
        429,
    );
    assert!(
        message.starts_with("slow_mode:") && message.contains("may send again"),
        "{message}"
    );
    let refused = ws
        .send_message(&room, "third", "")
        .await
        .expect_err("slow mode over the socket");
    assert_eq!(refused.code, "resource_exhausted");
    assert!(
        refused.message.starts_with("slow_mode:"),
        "{}",
        refused.message
    );
    assert!(
        refused.retry_after_ms > 20_000 && refused.retry_after_ms <= 30_000,
        "{refused:?}"
    );
    // Hosts are exempt.
    try_send(&server, &owner, &room, "host 1")
        .await
        .expect("hosts are exempt");
    try_send(&server, &owner, &room, "host 2")
        .await
        .expect("hosts are exempt");

    // Only moderators change the controls.
    common::expect_error(
        update_controls(&server, &member, &room, pb::LiveControls::default()).await,
        "permission_denied",
        403,
    );

    // Rate limit.
    let updated = update_controls(
        &server,
        &owner,
        &room,
        pb::LiveControls {
            rate_limit_per_minute: 2,
            ..Default::default()
        },
    )
    .await
    .expect("update");
    assert_eq!(
        updated
            .room
            .and_then(|r| r.live)
            .map(|l| l.rate_limit_per_minute),
        Some(2)
    );
    let other = server.sign_up(&common::unique_name("other")).await;
    join(&server, &other, &room).await;
    try_send(&server, &other, &room, "one")
        .await
        .expect("1 of 2");
    try_send(&server, &other, &room, "two")
        .await
        .expect("2 of 2");
    let message = common::expect_error(
        try_send(&server, &other, &room, "three").await,
        "resource_exhausted",
        429,
    );
    assert!(
        message.starts_with("rate_limit:") && message.contains("may send again"),
        "{message}"
    );

    // Host-only.
    update_controls(
        &server,
        &owner,
        &room,
        pb::LiveControls {
            host_only: true,
            ..Default::default()
        },
    )
    .await
    .expect("update");
    let message = common::expect_error(
        try_send(&server, &member, &room, "hello").await,
        "failed_precondition",
        400,
    );
    assert!(message.starts_with("host_only:"), "{message}");
    try_send(&server, &owner, &room, "host speaks")
        .await
        .expect("hosts may send");

    // Length and word filter.
    update_controls(
        &server,
        &owner,
        &room,
        pb::LiveControls {
            max_length: 10,
            word_filter: true,
            ..Default::default()
        },
    )
    .await
    .expect("update");
    let message = common::expect_error(
        try_send(&server, &member, &room, "this is far too long").await,
        "invalid_argument",
        400,
    );
    assert!(message.starts_with("max_length:"), "{message}");
    let message = common::expect_error(
        try_send(&server, &member, &room, "a SPOILER").await,
        "invalid_argument",
        400,
    );
    assert!(message.starts_with("word_filter:"), "{message}");
    let ok = try_send(&server, &member, &room, "spoilers")
        .await
        .expect("not a filtered word");
    let ok_seq = ok.message.expect("message").seq;

    // Pin: pushed to subscribers and returned by GetRoom.
    let pinned: pb::PinMessageResponse = server
        .rpc_as(&owner.access_token)
        .call_proto(
            "RoomService/PinMessage",
            &pb::PinMessageRequest {
                room_id: room.clone(),
                seq: ok_seq,
            },
        )
        .await
        .expect("pin");
    assert_eq!(pinned.pinned.as_ref().map(|m| m.seq), Some(ok_seq));
    let pushed = ws
        .push_matching(IDLE, |kind| match kind {
            Out::Pinned(p) => Some(p.clone()),
            _ => None,
        })
        .await;
    assert_eq!(pushed.message.map(|m| m.text), Some("spoilers".to_owned()));
    assert_eq!(
        get_room(&server, &member, &room)
            .await
            .pinned
            .map(|m| m.seq),
        Some(ok_seq)
    );
    let refused: Result<pb::PinMessageResponse, _> = server
        .rpc_as(&member.access_token)
        .call_proto(
            "RoomService/PinMessage",
            &pb::PinMessageRequest {
                room_id: room.clone(),
                seq: ok_seq,
            },
        )
        .await;
    common::expect_error(refused, "permission_denied", 403);

    // Chat rooms have no live controls.
    let chat = create_room(&server, &owner, pb::RoomKind::Public).await;
    let message = common::expect_error(
        update_controls(&server, &owner, &chat, pb::LiveControls::default()).await,
        "failed_precondition",
        400,
    );
    assert!(message.contains("live"), "{message}");
}

ws_matrix!(controls, host_controls);

// ---------------------------------------------------------------------------
// Viewer counts, no per-viewer presence or join events.
// ---------------------------------------------------------------------------

const VIEWER_INTERVAL_MS: u64 = 200;

async fn viewer_counts(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s| {
        s.rooms.live.viewer_count_interval_ms = VIEWER_INTERVAL_MS;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_live_room(&server, &owner, pb::LiveControls::default())
        .await
        .id;
    let mut viewers = Vec::new();
    for i in 0..3 {
        let account = server
            .sign_up(&common::unique_name(&format!("v{i}x")))
            .await;
        join(&server, &account, &room).await;
        let mut client =
            WsClient::connect_authenticated(&ws_url(&server), codec, &account.access_token).await;
        client.subscribe(&room, None).await.expect("subscribe");
        viewers.push(client);
    }
    // Within one interval of the last subscription, the count is right; the
    // pushes come at the interval.
    let first = &mut viewers[0];
    let mut counts = Vec::new();
    let started = tokio::time::Instant::now();
    for _ in 0..6 {
        let count = first
            .push_matching(
                Duration::from_millis(VIEWER_INTERVAL_MS * 10),
                |kind| match kind {
                    Out::Viewers(v) => Some(v.count),
                    Out::Member(m) => panic!("no member events in a live room by default: {m:?}"),
                    Out::Presence(p) => panic!("no presence events in a live room: {p:?}"),
                    _ => None,
                },
            )
            .await;
        counts.push(count);
    }
    let elapsed = started.elapsed();
    assert!(
        counts[1..].iter().all(|c| *c == 3),
        "counts after one interval: {counts:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(VIEWER_INTERVAL_MS * 4),
        "six pushes take at least five intervals (one per interval), took {elapsed:?}"
    );
    // A viewer leaves: the others see it within one interval (plus one in flight).
    viewers.pop().expect("a viewer").close().await;
    let first = &mut viewers[0];
    let mut settled = false;
    for _ in 0..3 {
        let count = first
            .push_matching(
                Duration::from_millis(VIEWER_INTERVAL_MS * 10),
                |kind| match kind {
                    Out::Viewers(v) => Some(v.count),
                    _ => None,
                },
            )
            .await;
        if count == 2 {
            settled = true;
            break;
        }
    }
    assert!(settled, "the count drops to 2 within the next pushes");
    // A long-poll waiting on the room subscribes the node's poll hub to it; that
    // subscription is no viewer.
    let poll = {
        let req = common::poll::request(&[(&room, None)], 20_000);
        let rpc = server.rpc_as(&owner.access_token);
        tokio::spawn(async move {
            rpc.call_proto::<_, pb::PollResponse>("PushService/Poll", &req)
                .await
                .expect("poll")
        })
    };
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            server
                .state()
                .polls
                .send(roomcast::actors::poll_hub::CountWaiters)
                .await
                .expect("the poll hub answers")
                == 1
        })
        .await,
        "the poll waits"
    );
    for _ in 0..3 {
        let count = first
            .push_matching(
                Duration::from_millis(VIEWER_INTERVAL_MS * 10),
                |kind| match kind {
                    Out::Viewers(v) => Some(v.count),
                    _ => None,
                },
            )
            .await;
        assert_eq!(count, 2, "a waiting long-poll is not a viewer");
    }
    let room_now = get_room(&server, &owner, &room).await;
    assert_eq!(room_now.viewer_count, 2, "GetRoom has the viewer count");
    poll.abort();
}

ws_matrix!(viewers, viewer_counts);

// ---------------------------------------------------------------------------
// Anonymous viewers.
// ---------------------------------------------------------------------------

async fn watch_anonymously(client: &mut WsClient) {
    let reply = client
        .request(In::AuthenticateAnonymous(pb::AuthenticateAnonymous {}))
        .await;
    match reply.kind {
        Some(Out::Authenticated(a)) => {
            assert!(a.anonymous && a.user.is_none(), "{a:?}");
        }
        other => panic!("expected `authenticated`, got {other:?}"),
    }
}

async fn anonymous_viewers(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s| {
        fast_sends(s);
        // Anonymous viewers outlive the deadline to authenticate.
        s.realtime.auth_deadline_ms = 300;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let open = create_live_room(
        &server,
        &owner,
        pb::LiveControls {
            anonymous_viewers: true,
            ..Default::default()
        },
    )
    .await
    .id;
    let closed = create_live_room(&server, &owner, pb::LiveControls::default())
        .await
        .id;
    let chat = create_room(&server, &owner, pb::RoomKind::Public).await;

    let mut anon = WsClient::connect(&ws_url(&server), codec, None).await;
    watch_anonymously(&mut anon).await;
    anon.subscribe(&open, Some(0))
        .await
        .expect("an allowing live room");
    let refused = anon
        .subscribe(&closed, None)
        .await
        .expect_err("a live room that does not allow it");
    assert_eq!(refused.code, "unauthenticated", "{refused:?}");
    let refused = anon.subscribe(&chat, None).await.expect_err("a chat room");
    assert_eq!(refused.code, "unauthenticated", "{refused:?}");
    let refused = anon
        .send_message(&open, "hi", "")
        .await
        .expect_err("posting needs an account");
    assert_eq!(refused.code, "unauthenticated", "{refused:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sent = send_http(&server, &owner, &open, "welcome", "w1").await;
    let seq = sent.message.expect("message").seq;
    let (seen, _) = watch_until(&mut anon, &open, seq).await;
    assert_eq!(seen, vec![Seen::Event(1, "welcome".into())]);

    // A connection that never said it is anonymous is still unauthenticated.
    let mut plain = WsClient::connect(&ws_url(&server), codec, None).await;
    let refused = plain
        .subscribe(&open, None)
        .await
        .expect_err("not authenticated");
    assert_eq!(refused.code, "unauthenticated");
}

ws_matrix!(anonymous, anonymous_viewers);

// ---------------------------------------------------------------------------
// A lagging viewer moves to the ring's tail with a gap; a restart leaves a gap.
// ---------------------------------------------------------------------------

async fn lagging_viewer_jumps_to_the_tail(backend: Backend, codec: WsCodec) {
    let server = TestServer::spawn_with(backend, |s| {
        fast_sends(s);
        s.realtime.outbound_queue_bytes = 16 * 1024;
        s.realtime.max_catch_up_rounds = 1000;
        s.rooms.live.coalesce_ms = 0;
        // Large comments, so the kernel's socket buffers cannot hold them all.
        s.rooms.max_message_bytes = 48 * 1024;
    })
    .await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_live_room(&server, &owner, pb::LiveControls::default())
        .await
        .id;
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(server.addr).await.expect("connect");
    let mut slow = WsClient::connect_batched(
        &ws_url(&server),
        codec,
        Some(&reader.access_token),
        Some(stream),
    )
    .await;
    slow.subscribe(&room, None).await.expect("subscribe");
    // The slow client reads nothing while 300 large comments (12 MB) go by.
    let text = "x".repeat(40 * 1024);
    let mut acked = HashMap::new();
    for i in 0..300 {
        let sent = send_http(
            &server,
            &owner,
            &room,
            &format!("{i} {text}"),
            &format!("c{i}"),
        )
        .await;
        let m = sent.message.expect("message");
        acked.insert(m.seq, m.text);
    }
    let (seen, _) = watch_until(&mut slow, &room, 300).await;
    let gapped = assert_covers(&seen, 1, 300, &acked, "slow viewer");
    assert!(
        gapped > 0,
        "a viewer that lagged skips to the tail with a gap"
    );
    assert!(!seen
        .iter()
        .any(|s| matches!(s, Seen::Gap(_, b) if *b > 300)));

    // A restart of the room loses its ring: a resume from before it gets a gap up
    // to the room's new start, then what follows.
    server
        .state()
        .rooms
        .send(roomcast::actors::room_registry::FindRoom {
            room_id: roomcast::ids::RoomId(room.clone()),
        })
        .await
        .expect("registry")
        .expect("room running")
        .send(roomcast::actors::room::Restart)
        .await
        .expect("restart");
    let after = send_http(&server, &owner, &room, "after the restart", "after").await;
    let after_seq = after.message.expect("message").seq;
    assert!(after_seq > 300, "numbers are never reused");
    let mut fresh =
        WsClient::connect_authenticated(&ws_url(&server), codec, &reader.access_token).await;
    fresh.subscribe(&room, Some(290)).await.expect("resume");
    let (seen, _) = watch_until(&mut fresh, &room, after_seq).await;
    assert_eq!(
        seen,
        vec![
            Seen::Gap(291, after_seq - 1),
            Seen::Event(after_seq, "after the restart".into())
        ]
    );
}

ws_matrix!(lagging, lagging_viewer_jumps_to_the_tail);

// ---------------------------------------------------------------------------
// A chat room with coalescing and batches keeps every chat guarantee.
// ---------------------------------------------------------------------------

async fn chat_room_with_batches(backend: Backend, codec: WsCodec) {
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            fast_sends(s);
            s.realtime.coalesce_window_ms = 20;
            s.rooms.ring_size = 64;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let mut senders = Vec::new();
    for i in 0..4 {
        let account = server
            .sign_up(&common::unique_name(&format!("c{i}x")))
            .await;
        join(&server, &account, &room).await;
        senders.push(account);
    }
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let total = 4 * 80;
    let mut subscriber_tasks = Vec::new();
    for n in 0..8 {
        let (server, reader, room) = (server.clone(), reader.clone(), room.clone());
        let delay = Duration::from_millis(rand::thread_rng().gen_range(0..1000));
        let pick = rand::thread_rng().gen_range(0.0..=1.0f64);
        subscriber_tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let since = (pick * last_seq(&server, &reader, &room).await as f64) as u64;
            let mut client = WsClient::connect_batched(
                &ws_url(&server),
                codec,
                Some(&reader.access_token),
                None,
            )
            .await;
            client
                .subscribe(&room, Some(since))
                .await
                .expect("subscribe");
            let (seen, _) = watch_until(&mut client, &room, total).await;
            (n, since, seen)
        }));
    }
    let sends = senders.iter().cloned().enumerate().map(|(i, account)| {
        let (server, room) = (server.clone(), room.clone());
        tokio::spawn(async move {
            let mut client =
                WsClient::connect_authenticated(&ws_url(&server), codec, &account.access_token)
                    .await;
            for j in 0..80 {
                client
                    .send_message(&room, &format!("chat {i} {j}"), &format!("{i}-{j}"))
                    .await
                    .unwrap_or_else(|e| panic!("send {i}-{j}: {e:?}"));
            }
        })
    });
    for task in sends.collect::<Vec<_>>() {
        task.await.expect("sender");
    }
    let stored: HashMap<u64, String> = history(&server, &owner, &room)
        .await
        .into_iter()
        .map(|m| (m.seq, m.text))
        .collect();
    assert_eq!(stored.len() as u64, total);
    for task in subscriber_tasks {
        let (n, since, seen) = task.await.expect("subscriber");
        let gapped = assert_covers(
            &seen,
            since + 1,
            total,
            &stored,
            &format!("chat subscriber {n} (since {since})"),
        );
        assert_eq!(gapped, 0, "chat rooms never skip");
    }
}

ws_matrix!(chat_batches, chat_room_with_batches);

// ---------------------------------------------------------------------------
// SSE: a batch is one event whose id is the position after its last event.
// ---------------------------------------------------------------------------

/// One SSE event: its id (if any), name and data.
#[derive(Debug)]
struct SseEvent {
    id: Option<String>,
    name: String,
    data: serde_json::Value,
}

/// Reads SSE events from `response` until `pick` has seen enough (bounded by `IDLE`).
async fn sse_events(
    response: &mut reqwest::Response,
    mut done: impl FnMut(&[SseEvent]) -> bool,
) -> Vec<SseEvent> {
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + IDLE;
    while !done(&events) {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut name, mut data) = (None, String::new(), String::new());
            for line in block.lines() {
                match line.split_once(": ") {
                    Some(("id", v)) => id = Some(v.to_owned()),
                    Some(("event", v)) => name = v.to_owned(),
                    Some(("data", v)) => data.push_str(v),
                    _ => {}
                }
            }
            if !data.is_empty() {
                let data = serde_json::from_str(&data).expect("data is JSON");
                events.push(SseEvent { id, name, data });
            }
            continue;
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("SSE events in time")
            .expect("the stream goes on")
            .expect("a chunk");
        buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    events
}

/// The sequences an SSE room event (message or batch) carries.
fn sse_seqs(event: &SseEvent) -> Vec<u64> {
    let seq = |m: &serde_json::Value| -> u64 {
        m["message"]["seq"]
            .as_str()
            .expect("seq")
            .parse()
            .expect("numeric")
    };
    match event.name.as_str() {
        "message" => vec![seq(&event.data)],
        "batch" => event.data["batch"]["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .map(seq)
            .collect(),
        _ => Vec::new(),
    }
}

async fn sse_batches(backend: Backend) {
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            fast_sends(s);
            s.rooms.live.coalesce_ms = 400;
            s.rooms.live.coalesce_min_ms = 400;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let room = create_live_room(&server, &owner, pb::LiveControls::default())
        .await
        .id;
    let open = |last_id: Option<String>| {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        async move {
            let mut request = server
                .http()
                .get(server.url(&format!("/sse?rooms={room}:0&notifications=off&batch=true")))
                .bearer_auth(&owner.access_token);
            if let Some(id) = last_id {
                request = request.header("Last-Event-ID", id);
            }
            let response = request.send().await.expect("GET /sse");
            assert_eq!(response.status(), 200);
            response
        }
    };
    let mut stream = open(None).await;
    sse_events(&mut stream, |e| e.iter().any(|e| e.name == "subscribed")).await;
    const N: u64 = 20;
    let sends = (0..N).map(|i| {
        let (server, owner, room) = (server.clone(), owner.clone(), room.clone());
        async move {
            send_http(
                &server,
                &owner,
                &room,
                &format!("sse {i}"),
                &format!("e{i}"),
            )
            .await
        }
    });
    futures_util::future::join_all(sends).await;
    let events = sse_events(&mut stream, |e| {
        e.iter().flat_map(sse_seqs).max() == Some(N)
    })
    .await;
    let seqs: Vec<u64> = events.iter().flat_map(sse_seqs).collect();
    assert_eq!(
        seqs,
        (1..=N).collect::<Vec<_>>(),
        "every comment once, in order"
    );
    let batch = events
        .iter()
        .find(|e| e.name == "batch")
        .expect("a busy window is one batch event");
    assert!(
        batch.id.is_some(),
        "a batch event carries the position after it"
    );
    // Resuming from the batch's id continues right after its last event.
    let after = *sse_seqs(batch).last().expect("a batch has events");
    drop(stream);
    let mut resumed = open(batch.id.clone()).await;
    send_http(&server, &owner, &room, "after", "after").await;
    let events = sse_events(&mut resumed, |e| {
        e.iter().flat_map(sse_seqs).max() == Some(N + 1)
    })
    .await;
    let seqs: Vec<u64> = events.iter().flat_map(sse_seqs).collect();
    assert_eq!(
        seqs,
        (after + 1..=N + 1).collect::<Vec<_>>(),
        "Last-Event-ID resumes exactly after the batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_batches_sqlite() {
    sse_batches(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_batches_postgres() {
    if common::postgres_available() {
        sse_batches(Backend::Postgres).await;
    }
}

/// Slow mode over HTTP: `Retry-After` says when to send again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_mode_sets_retry_after_over_http() {
    let server = TestServer::spawn_with(Backend::Sqlite, fast_sends).await;
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let member = server.sign_up(&common::unique_name("member")).await;
    let room = create_live_room(
        &server,
        &owner,
        pb::LiveControls {
            slow_mode_seconds: 5,
            ..Default::default()
        },
    )
    .await
    .id;
    join(&server, &member, &room).await;
    try_send(&server, &member, &room, "first")
        .await
        .expect("first");
    let response = server
        .http()
        .post(server.url("/roomcast.v1.RoomService/SendMessage"))
        .bearer_auth(&member.access_token)
        .json(&serde_json::json!({"roomId": room, "text": "second"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=5).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .starts_with("slow_mode:"),
        "{body}"
    );
}

// ---------------------------------------------------------------------------
// Fan-out shards: subscribers on every worker, a slow one on one of them.
// ---------------------------------------------------------------------------

async fn sharded_delivery(backend: Backend, codec: WsCodec) {
    const WORKERS: usize = 3;
    let server = Arc::new(
        TestServer::spawn_with(backend, |s| {
            fast_sends(s);
            s.server.workers = WORKERS;
            s.realtime.outbound_queue_bytes = 16 * 1024;
            s.realtime.max_catch_up_rounds = 1000;
            s.rooms.max_message_bytes = 48 * 1024;
            s.rooms.live.coalesce_ms = 5;
        })
        .await,
    );
    let owner = server.sign_up(&common::unique_name("owner")).await;
    // A chat room: a subscriber that lags (the slow one, or any other on a busy
    // machine) catches up from the store, so every subscriber must get every event.
    let room = create_room(&server, &owner, pb::RoomKind::Public).await;
    let reader = server.sign_up(&common::unique_name("reader")).await;
    // A slow viewer that reads nothing, on whichever worker it lands.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(server.addr).await.expect("connect");
    let mut slow = WsClient::connect_batched(
        &ws_url(&server),
        codec,
        Some(&reader.access_token),
        Some(stream),
    )
    .await;
    slow.subscribe(&room, None).await.expect("subscribe");
    // Connections are spread over the workers: enough of them reach every one.
    let mut viewers = Vec::new();
    for n in 0..(WORKERS * 4) {
        let mut client = if n % 2 == 0 {
            WsClient::connect_batched(&ws_url(&server), codec, Some(&reader.access_token), None)
                .await
        } else {
            WsClient::connect_authenticated(&ws_url(&server), codec, &reader.access_token).await
        };
        client.subscribe(&room, None).await.expect("subscribe");
        viewers.push(client);
    }
    let snapshot = server
        .state()
        .rooms
        .send(roomcast::actors::room_registry::FindRoom {
            room_id: roomcast::ids::RoomId(room.clone()),
        })
        .await
        .expect("registry")
        .expect("room running")
        .send(roomcast::actors::room::GetLiveSnapshot)
        .await
        .expect("room")
        .expect("snapshot");
    assert_eq!(
        snapshot.shards, WORKERS,
        "the room's subscribers sit on every worker's shard"
    );
    assert_eq!(snapshot.viewers as usize, WORKERS * 4 + 1);
    // 200 large messages: far more than the slow viewer's socket and queue hold.
    const N: u64 = 200;
    let text = "y".repeat(40 * 1024);
    let mut acked = HashMap::new();
    let readers: Vec<_> = viewers
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| {
            let room = room.clone();
            tokio::spawn(async move { (n, watch_until(&mut client, &room, N).await.0) })
        })
        .collect();
    for i in 0..N {
        let sent = send_http(
            &server,
            &owner,
            &room,
            &format!("{i} {text}"),
            &format!("s{i}"),
        )
        .await;
        let m = sent.message.expect("message");
        acked.insert(m.seq, m.text);
    }
    // Every other viewer gets every comment once, in order, while the slow one
    // still reads nothing.
    for task in readers {
        let (n, seen) = task.await.expect("reader");
        let gapped = assert_covers(&seen, 1, N, &acked, &format!("viewer {n}"));
        assert_eq!(gapped, 0, "viewer {n} missed nothing");
    }
    // The slow viewer lagged and catches up from the store: it misses nothing either.
    let (seen, _) = watch_until(&mut slow, &room, N).await;
    let gapped = assert_covers(&seen, 1, N, &acked, "slow viewer");
    assert_eq!(gapped, 0, "the slow viewer missed nothing");
}

ws_matrix!(sharded, sharded_delivery);
