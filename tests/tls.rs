//! TLS terminated by roomcast (`[tls]`): clients that verify the test's own
//! self-signed CA reach every transport over it (Connect RPCs over HTTP/1.1 and
//! HTTP/2 chosen by ALPN, WebSocket over `wss://`, SSE); a renewed certificate is
//! served to new connections, by file watch and by SIGHUP, while open ones keep
//! going; a certificate that cannot be used stops the start with a clear message
//! and, at a reload, leaves the old one in service.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    ws::{room_event, Incoming, WsClient, WsCodec},
    Account, Backend, Codec, Rpc, TestDatabase, TestServer, PASSWORD,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use roomcast::proto::v1 as pb;
use rustls::pki_types::{pem::PemObject as _, CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

/// How long a renewed certificate may take to be served (the watch looks every
/// second in these tests).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// A certificate authority made by the test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("a self-signed CA");
        Self { cert, key }
    }

    /// A server certificate for `localhost` and 127.0.0.1: (cert PEM, key PEM, DER).
    fn server_cert(&self, name: &str) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().expect("a server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a server certificate");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// A certificate and key on disk, as an operator has them.
struct CertFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn write(cert_pem: &str, key_pem: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("roomcast-tls-test-")
            .tempdir()
            .expect("a temp dir");
        let files = Self {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            _dir: dir,
        };
        files.replace(cert_pem, key_pem);
        files
    }

    /// Replaces both files (each by a rename, as certificate tools do).
    fn replace(&self, cert_pem: &str, key_pem: &str) {
        for (path, contents) in [(&self.cert, cert_pem), (&self.key, key_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, contents).expect("write a PEM file");
            std::fs::rename(&tmp, path).expect("rename a PEM file");
        }
    }
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("the CA PEM");
    roots.add(ca).expect("add the CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// An HTTPS client that trusts only `ca_pem`.
fn https_client(ca_pem: &str, http1_only: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("the CA PEM");
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(20));
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().expect("an HTTPS client")
}

/// Connects with TLS, verifying `ca_pem` for `localhost`; answers the stream.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("a server name");
    connector.connect(name, tcp).await
}

/// The certificate the server presents to a new connection.
async fn served_cert(addr: std::net::SocketAddr, ca_pem: &str) -> std::io::Result<Vec<u8>> {
    let stream = tls_connect(addr, ca_pem).await?;
    let (_, conn) = stream.get_ref();
    Ok(conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.to_vec())
        .unwrap_or_default())
}

/// Sends `GET path` on an open HTTP/1.1 connection (kept alive) and answers the
/// response's status, reading the whole response (its `Content-Length` body).
async fn get_kept_alive<S>(stream: &mut S, path: &str) -> u16
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "the connection was closed: {}",
                String::from_utf8_lossy(&response)
            );
            response.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&response).to_string();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a Content-Length");
            if body.len() >= length {
                let status = head.split(' ').nth(1).expect("a status");
                return status.parse::<u16>().expect("a numeric status");
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response in time")
}

/// Waits until new connections get `expected` (verified with `ca_pem`).
async fn wait_for_cert(addr: std::net::SocketAddr, ca_pem: &str, expected: &[u8]) {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    loop {
        if served_cert(addr, ca_pem).await.ok().as_deref() == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served within {RELOAD_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A test server terminating TLS with `files`, looking for changed files every second.
async fn tls_server(files: &CertFiles) -> TestServer {
    let (cert, key) = (files.cert.clone(), files.key.clone());
    TestServer::spawn_with(Backend::Sqlite, move |s| {
        s.tls.cert_file = cert.display().to_string();
        s.tls.key_file = key.display().to_string();
        s.tls.watch_interval_secs = 1;
        // The wss test sends 20 messages back to back.
        s.realtime.send_burst = 100;
    })
    .await
}

fn https_base(server: &TestServer) -> String {
    format!("https://localhost:{}", server.addr.port())
}

async fn sign_up(rpc: &Rpc, username: &str) -> Account {
    let reply: pb::SignUpResponse = rpc
        .call(
            Codec::Proto,
            "AuthService/SignUp",
            &pb::SignUpRequest {
                username: username.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("sign up {username} over https: {e}"));
    Account::from_reply(reply.user, reply.tokens)
}

async fn create_room(rpc: &Rpc, owner: &Account) -> String {
    let reply: pb::CreateRoomResponse = rpc
        .with_token(&owner.access_token)
        .call(
            Codec::Proto,
            "RoomService/CreateRoom",
            &pb::CreateRoomRequest {
                kind: pb::RoomKind::Public as i32,
                title: "tls room".into(),
                ..Default::default()
            },
        )
        .await
        .expect("create a room over https");
    reply.room.expect("a room").id
}

/// A `wss://` connection verified against `ca_pem`, authenticated as `token`.
async fn wss(server: &TestServer, ca_pem: &str, codec: WsCodec, token: &str) -> WsClient {
    let stream = tls_connect(server.addr, ca_pem)
        .await
        .expect("a TLS connection for wss");
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    WsClient::over(MaybeTlsStream::Rustls(stream), &url, codec, token).await
}

/// Waits for the room event with `text`.
async fn expect_event(client: &mut WsClient, text: &str) -> pb::Message {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_push(left).await {
            Incoming::Frame(frame) => {
                if let Some(m) = room_event(&frame).filter(|m| m.text == text) {
                    return m.clone();
                }
            }
            other => panic!("waiting for `{text}` over wss: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rpcs_over_https_with_http1_and_http2_by_alpn() {
    let ca = Ca::new("roomcast test CA");
    let (cert, key, _) = ca.server_cert("server one");
    let files = CertFiles::write(&cert, &key);
    let server = tls_server(&files).await;
    let base = https_base(&server);

    for (http1_only, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let http = https_client(&ca.pem(), http1_only);
        let response = http
            .post(format!("{base}/roomcast.v1.AuthService/SignUp"))
            .header("content-type", "application/json")
            .body(
                serde_json::json!({
                    "username": format!("alice{}", u8::from(http1_only)),
                    "password": PASSWORD,
                })
                .to_string(),
            )
            .send()
            .await
            .expect("SignUp over https");
        assert_eq!(response.version(), version, "the protocol ALPN chose");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("a JSON reply");
        assert!(
            body["tokens"]["accessToken"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{body}"
        );
    }

    // A client that does not trust the test's CA refuses the server.
    let other_ca = Ca::new("another CA");
    let stranger = https_client(&other_ca.pem(), false);
    let refused = stranger.get(format!("{base}/healthz")).send().await;
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA must not verify"
    );

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", server.addr))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "cleartext HTTP is not served on a TLS listener: {plain:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_wss_subscribes_sends_and_receives() {
    let ca = Ca::new("roomcast test CA");
    let (cert, key, _) = ca.server_cert("server one");
    let files = CertFiles::write(&cert, &key);
    let server = tls_server(&files).await;
    let rpc = Rpc::over(https_client(&ca.pem(), false), &https_base(&server));
    let alice = sign_up(&rpc, "alice").await;
    let bob = sign_up(&rpc, "bob").await;
    let room = create_room(&rpc, &alice).await;

    for codec in [WsCodec::Json, WsCodec::Proto] {
        let mut a = wss(&server, &ca.pem(), codec, &alice.access_token).await;
        let mut b = wss(&server, &ca.pem(), codec, &bob.access_token).await;
        a.subscribe(&room, None).await.expect("alice subscribes");
        b.subscribe(&room, None).await.expect("bob subscribes");
        let text = format!("hello over wss ({codec:?})");
        let sent = a
            .send_message(&room, &text, &format!("cmid-{codec:?}"))
            .await
            .expect("send over wss");
        let got = expect_event(&mut b, &text).await;
        assert_eq!(Some(got.seq), sent.message.map(|m| m.seq));
        // 80 kB of messages: many TLS records, several per read and write.
        let texts: Vec<String> = (0..20)
            .map(|i| format!("{i:02}{}", "x".repeat(3_998)))
            .collect();
        for (i, text) in texts.iter().enumerate() {
            a.send_message(&room, text, &format!("big-{codec:?}-{i}"))
                .await
                .expect("a 4 kB message over wss");
        }
        for text in &texts {
            assert_eq!(&expect_event(&mut b, text).await.text, text);
        }
        a.close().await;
        b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_over_https() {
    let ca = Ca::new("roomcast test CA");
    let (cert, key, _) = ca.server_cert("server one");
    let files = CertFiles::write(&cert, &key);
    let server = tls_server(&files).await;
    let http = https_client(&ca.pem(), true);
    let base = https_base(&server);
    let rpc = Rpc::over(http.clone(), &base);
    let alice = sign_up(&rpc, "alice").await;
    let room = create_room(&rpc, &alice).await;
    let _: pb::SendMessageResponse = rpc
        .with_token(&alice.access_token)
        .call(
            Codec::Proto,
            "RoomService/SendMessage",
            &pb::SendMessageRequest {
                room_id: room.clone(),
                text: "stored before the stream".into(),
                client_message_id: "sse-1".into(),
                ..Default::default()
            },
        )
        .await
        .expect("send over https");

    let mut response = http
        .get(format!("{base}/sse?rooms={room}:0"))
        .bearer_auth(&alice.access_token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("open the SSE stream over https");
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains("stored before the stream") {
        assert!(
            Instant::now() < deadline,
            "no message event over https SSE: {seen}"
        );
        match tokio::time::timeout(Duration::from_secs(20), response.chunk()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("the SSE stream ended early ({other:?}): {seen}"),
        }
    }
    assert!(seen.contains("event: authenticated"), "{seen}");
    assert!(seen.contains("event: message"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_to_new_connections_while_open_ones_stay() {
    let ca = Ca::new("roomcast test CA");
    let (cert1, key1, der1) = ca.server_cert("first certificate");
    let files = CertFiles::write(&cert1, &key1);
    let server = tls_server(&files).await;
    assert_eq!(
        served_cert(server.addr, &ca.pem()).await.expect("TLS"),
        der1
    );
    let rpc = Rpc::over(https_client(&ca.pem(), false), &https_base(&server));
    let alice = sign_up(&rpc, "alice").await;
    let room = create_room(&rpc, &alice).await;
    let mut open = wss(&server, &ca.pem(), WsCodec::Json, &alice.access_token).await;
    open.subscribe(&room, None).await.expect("subscribe");

    // A broken file is refused at the reload: the old certificate stays.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        served_cert(server.addr, &ca.pem())
            .await
            .expect("TLS after a bad reload"),
        der1,
        "a certificate that fails to load must not replace the one in service"
    );
    let metrics = https_client(&ca.pem(), true)
        .get(format!("{}/metrics", https_base(&server)))
        .send()
        .await
        .expect("metrics over https")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("roomcast_tls_reloads_total{result=\"error\"}") && !l.ends_with(" 0")
        ),
        "a failed reload is counted:\n{metrics}"
    );

    // The renewed pair (a new key too) goes into service.
    let (cert2, key2, der2) = ca.server_cert("second certificate");
    files.replace(&cert2, &key2);
    wait_for_cert(server.addr, &ca.pem(), &der2).await;

    // The connection opened before the reload still works both ways.
    let sent = open
        .send_message(&room, "still here after the reload", "after-reload")
        .await
        .expect("send on the connection opened before the reload");
    assert_eq!(
        expect_event(&mut open, "still here after the reload")
            .await
            .seq,
        sent.message.map_or(0, |m| m.seq)
    );
    // New connections get the new certificate and work.
    let mut fresh = wss(&server, &ca.pem(), WsCodec::Proto, &alice.access_token).await;
    fresh
        .subscribe(&room, Some(0))
        .await
        .expect("subscribe after the reload");
    open.close().await;
    fresh.close().await;
}

/// The `roomcast` binary under test.
const ROOMCAST: &str = env!("CARGO_BIN_EXE_roomcast");

fn write_config(dir: &Path, files: &CertFiles, database: &str, port: u16) -> PathBuf {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[store]\nurl = \"{database}\"\n\n\
         [auth]\nargon2_memory_kib = 8\nargon2_iterations = 1\n\n\
         [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nwatch_interval_secs = 0\n",
        files.cert.display(),
        files.key.display()
    );
    let path = dir.join("roomcast.toml");
    std::fs::write(&path, config).expect("write the config");
    path
}

fn roomcast(dir: &Path, config: &Path) -> Command {
    let mut command = Command::new(ROOMCAST);
    command
        .current_dir(dir)
        .args(["--config", &config.display().to_string(), "serve"]);
    for (key, _) in std::env::vars() {
        if key.starts_with("ROOMCAST_") {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG");
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_certificate_stops_the_start_with_a_clear_message() {
    let ca = Ca::new("roomcast test CA");
    let (cert, key, _) = ca.server_cert("server");
    let (_, other_key, _) = ca.server_cert("another server");
    let database = TestDatabase::create(Backend::Sqlite).await;
    let dir = database.dir().expect("a SQLite dir").to_owned();
    let cases: [(&str, String, String, &[&str]); 3] = [
        (
            "garbage",
            "this is not PEM\n".into(),
            key.clone(),
            &["cert.pem", "no PEM certificate"],
        ),
        (
            "missing key",
            cert.clone(),
            String::new(),
            &["key.pem", "no usable private key"],
        ),
        (
            "another key",
            cert.clone(),
            other_key,
            &["key.pem", "does not belong", "cert.pem"],
        ),
    ];
    for (case, cert_pem, key_pem, needles) in cases {
        let files = CertFiles::write(&cert_pem, &key_pem);
        let config = write_config(&dir, &files, &database.url, free_port());
        let mut child = roomcast(&dir, &config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run roomcast serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for roomcast") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{case}: roomcast serve did not stop on an unusable certificate");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("read stderr");
        assert!(!status.success(), "{case}: must exit with an error");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{case}: the error names `{needle}`:\n{stderr}"
            );
        }
        assert!(
            stderr.contains("tls.cert_file"),
            "{case}: names the setting:\n{stderr}"
        );
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let ca = Ca::new("roomcast test CA");
    let (cert1, key1, der1) = ca.server_cert("first certificate");
    let files = CertFiles::write(&cert1, &key1);
    let database = TestDatabase::create(Backend::Sqlite).await;
    let dir = database.dir().expect("a SQLite dir").to_owned();
    let port = free_port();
    let config = write_config(&dir, &files, &database.url, port);
    let mut child = roomcast(&dir, &config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run roomcast serve");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            match served_cert(addr, &ca.pem()).await {
                Ok(der) => break der,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("roomcast did not serve TLS: {e}"),
            }
        };
        assert_eq!(first, der1);
        // Without a signal (and with the file watch off) nothing changes.
        let (cert2, key2, der2) = ca.server_cert("second certificate");
        files.replace(&cert2, &key2);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(served_cert(addr, &ca.pem()).await.expect("TLS"), der1);
        // A client connected before the reload (HTTP/1.1, kept alive; idle for
        // less than the server's 5 s keep-alive until it asks again below).
        let mut kept = tls_connect(addr, &ca.pem()).await.expect("TLS");
        assert_eq!(get_kept_alive(&mut kept, "/healthz").await, 200);
        let pid = i32::try_from(child.id()).expect("a pid");
        // SAFETY: kill only sends a signal to the child this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        wait_for_cert(addr, &ca.pem(), &der2).await;
        // The reload dropped no connection: the one opened before it still
        // answers, on its first certificate.
        assert_eq!(get_kept_alive(&mut kept, "/healthz").await, 200);
        let (_, session) = kept.get_ref();
        assert_eq!(
            session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
            Some(der1.clone())
        );
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), result).await;
    let pid = i32::try_from(child.id()).expect("a pid");
    // SAFETY: as above; SIGTERM is the documented way to stop the server.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    outcome.expect("the SIGHUP test finished in time");
}
