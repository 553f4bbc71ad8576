//! HTTP/2 without TLS ("prior knowledge", h2c): Connect clients that need HTTP/2
//! are served on the same port as HTTP/1.1, RPCs and health checks alike.

mod common;

use bytes::Bytes;
use common::{Backend, TestServer};

/// Sends one request over a fresh HTTP/2 prior-knowledge connection; answers the
/// status and the body.
async fn h2_request(server: &TestServer, method: &str, path: &str, body: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", server.addr))
        .header("content-type", "application/json")
        .body(())
        .expect("request");
    let (response, mut stream) = client
        .send_request(request, body.is_empty())
        .expect("send request");
    if !body.is_empty() {
        stream
            .send_data(Bytes::from(body.to_owned()), true)
            .expect("send body");
    }
    let response = response.await.expect("response");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_on_the_same_port() {
    let server = TestServer::spawn(Backend::Sqlite).await;
    let (status, _) = h2_request(&server, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    let name = common::unique_name("h2user");
    let body = format!(
        r#"{{"username": "{name}", "password": "{}"}}"#,
        common::PASSWORD
    );
    let (status, reply) =
        h2_request(&server, "POST", "/roomcast.v1.AuthService/SignUp", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("accessToken"), "{reply}");
    let (status, reply) = h2_request(&server, "POST", "/roomcast.v1.Nope/Nothing", "{}").await;
    assert_eq!(status, 404, "{reply}");
    assert!(reply.contains("unimplemented"), "{reply}");
    // HTTP/1.1 still works next to it.
    let status = server
        .http()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("GET /healthz")
        .status();
    assert_eq!(status.as_u16(), 200);
}
