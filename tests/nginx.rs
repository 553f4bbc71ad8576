//! roomcast behind a real nginx running `deploy/nginx/roomcast.conf` unchanged:
//! RPCs, WebSocket upgrades and Server-Sent Events pass through (SSE without
//! buffering), and `server.trusted_proxies` makes per-address decisions see the
//! client's address, never nginx's and never one the client made up.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use common::{
    nginx::{nginx_binary, Nginx},
    rooms,
    sse::Sse,
    ws::{WsClient, WsCodec},
    Account, TestServer,
};
use pb::server_frame::Kind as Out;
use roomcast::proto::v1 as pb;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest as _, http::StatusCode, Error as WsError},
    MaybeTlsStream,
};

const WAIT: Duration = Duration::from_secs(10);

fn server_addr(server: &TestServer) -> SocketAddr {
    server
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .expect("the test server's address")
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// An HTTP client whose connections come from `from` (a loopback address).
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(from)
        .build()
        .expect("HTTP client")
}

both_backends!(rpcs_websockets_and_sse_pass_through, |backend| async move {
    let Some(binary) = nginx_binary() else {
        return;
    };
    let server = TestServer::spawn_with(backend, |s| {
        s.server.trusted_proxies = vec!["127.0.0.1".parse().expect("address")];
        // No heartbeat could flush a buffering proxy during the test.
        s.realtime.sse_heartbeat_interval_ms = 60_000;
    })
    .await;
    let nginx = Nginx::start(&binary, &[server_addr(&server)]);
    let owner = server.sign_up(&common::unique_name("owner")).await;
    let reader = server.sign_up(&common::unique_name("reader")).await;
    let room = rooms::create_room(&server, &owner, pb::RoomKind::Public).await;
    rooms::join(&server, &reader, &room).await;

    // WebSocket through nginx.
    let mut ws = WsClient::connect_authenticated(
        &format!("ws://{}/ws", nginx.addr()),
        WsCodec::Proto,
        &reader.access_token,
    )
    .await;
    ws.subscribe(&room, None)
        .await
        .expect("subscribe through nginx");

    // SSE through nginx.
    let http = client_from(loopback(1));
    let response = http
        .get(nginx.url(&format!("/sse?rooms={room}")))
        .bearer_auth(&reader.access_token)
        .send()
        .await
        .expect("GET /sse through nginx");
    assert_eq!(response.status(), 200, "{}", nginx.error_log());
    let mut sse = Sse::from_response(response);
    sse.next_named_within("subscribed", WAIT).await;

    // A Connect RPC through nginx.
    let reply = http
        .post(nginx.url("/roomcast.v1.RoomService/SendMessage"))
        .bearer_auth(&owner.access_token)
        .json(&json!({"roomId": room, "text": "through nginx", "clientMessageId": "n1"}))
        .send()
        .await
        .expect("SendMessage through nginx");
    assert_eq!(reply.status(), 200);
    let sent: Value = reply.json().await.expect("JSON reply");
    let seq = sent["message"]["seq"].as_str().expect("seq").to_owned();

    // Both transports get the message at once: one ~300-byte event would sit in a
    // buffering proxy until the (60 s) heartbeat.
    let message = ws
        .push_matching(WAIT, |kind| match kind {
            Out::Message(m) => Some(m.clone()),
            _ => None,
        })
        .await;
    assert_eq!(message.seq.to_string(), seq);
    assert_eq!(message.text, "through nginx");
    let event = sse.next_named_within("message", WAIT).await.json();
    assert_eq!(event["message"]["seq"].as_str(), Some(seq.as_str()));

    // Health checks pass through too.
    let ready = http.get(nginx.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
});

/// Opens a WebSocket from local address `from` to `target`, sending
/// `X-Forwarded-For: spoofed`; answers the client or the HTTP status of the refusal.
async fn ws_from(
    from: IpAddr,
    target: SocketAddr,
    account: &Account,
    spoofed: &str,
) -> Result<WsClient, StatusCode> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind a loopback address");
    let stream = socket.connect(target).await.expect("connect");
    let url = format!("ws://{target}/ws");
    let mut request = url.as_str().into_client_request().expect("ws url");
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        WsCodec::Proto.subprotocol().parse().expect("header"),
    );
    headers.insert(
        "authorization",
        format!("Bearer {}", account.access_token)
            .parse()
            .expect("header"),
    );
    headers.insert("x-forwarded-for", spoofed.parse().expect("header"));
    match tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await {
        Ok((stream, _)) => Ok(WsClient::from_upgraded(stream, WsCodec::Proto).await),
        Err(WsError::Http(response)) => Err(response.status()),
        Err(e) => panic!("upgrade from {from}: {e}"),
    }
}

/// The remote address the admin API shows for `user`'s one connection.
async fn remote_of(server: &TestServer, admin: &Account, user: &Account) -> String {
    let listed: pb::ListConnectionsResponse = common::admin_call(
        server,
        admin,
        "ListConnections",
        &pb::ListConnectionsRequest {
            user_id: user.user_id.clone(),
        },
    )
    .await;
    let [connection] = listed.connections.as_slice() else {
        panic!("expected one connection of {}: {listed:?}", user.user_id);
    };
    connection.remote_address.clone()
}

both_backends!(
    forwarded_addresses_count_only_from_trusted_proxies,
    |backend| async move {
        let Some(binary) = nginx_binary() else {
            return;
        };
        let (server, admin) = TestServer::spawn_with_admin(backend, |s| {
            s.server.trusted_proxies = vec!["127.0.0.1".parse().expect("address")];
            s.realtime.max_connections_per_ip = 1;
        })
        .await;
        let nginx = Nginx::start(&binary, &[server_addr(&server)]);
        let [a, b, c, d] = [
            server.sign_up(&common::unique_name("a")).await,
            server.sign_up(&common::unique_name("b")).await,
            server.sign_up(&common::unique_name("c")).await,
            server.sign_up(&common::unique_name("d")).await,
        ];

        // Through nginx from 127.0.0.2, claiming to be 203.0.113.9: the server sees
        // 127.0.0.2 (what nginx appended), not nginx's 127.0.0.1 and not the claim.
        let _a = ws_from(loopback(2), nginx.addr(), &a, "203.0.113.9")
            .await
            .expect("first connection from 127.0.0.2");
        assert_eq!(remote_of(&server, &admin, &a).await, "127.0.0.2");

        // Another client through the same nginx has its own per-address budget...
        let _b = ws_from(loopback(3), nginx.addr(), &b, "127.0.0.2")
            .await
            .expect("a connection from 127.0.0.3 through the same nginx");
        assert_eq!(remote_of(&server, &admin, &b).await, "127.0.0.3");

        // ...and 127.0.0.2's is spent (max_connections_per_ip = 1), whatever it claims.
        let refused = ws_from(loopback(2), nginx.addr(), &c, "198.51.100.1").await;
        assert_eq!(
            refused.err(),
            Some(StatusCode::TOO_MANY_REQUESTS),
            "the second connection of 127.0.0.2 must be refused"
        );

        // Straight to the server (no trusted proxy in between): the header is ignored.
        let _d = ws_from(loopback(4), server_addr(&server), &d, "127.0.0.9")
            .await
            .expect("a direct connection from 127.0.0.4");
        assert_eq!(remote_of(&server, &admin, &d).await, "127.0.0.4");
    }
);
