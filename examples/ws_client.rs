//! A minimal roomcast WebSocket client: signs up (or signs in), makes a room (or
//! uses the one given), opens `GET /ws` with the JSON subprotocol, subscribes with
//! `sinceSeq: 0` (the room's whole history, then live), sends one message and prints
//! every frame until its own message comes back as a push.
//!
//! ```sh
//! cargo run --release &                        # a server on 127.0.0.1:8080
//! cargo run --example ws_client -- http://127.0.0.1:8080 alice 'correct horse battery staple'
//! cargo run --example ws_client -- http://127.0.0.1:8080 bob 'another long passphrase' r_...
//! ```
//!
//! Arguments: the server's base URL, a username, a password, and optionally a room
//! id to join. Lines starting with `>` are frames sent, `<` frames received.
//! tests/examples.rs runs this example against a live server.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, Message};

/// How long the example waits for any one frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Calls `POST /roomcast.v1.{method}` with a JSON body; a Connect error becomes `Err`.
async fn rpc(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    token: Option<&str>,
    body: Value,
) -> Result<Value, (String, String)> {
    let mut request = http
        .post(format!("{base}/roomcast.v1.{method}"))
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| ("unavailable".to_owned(), e.to_string()))?;
    let ok = response.status().is_success();
    let reply: Value = response
        .json()
        .await
        .map_err(|e| ("unknown".to_owned(), e.to_string()))?;
    if ok {
        Ok(reply)
    } else {
        let field = |name: &str| reply[name].as_str().unwrap_or_default().to_owned();
        Err((field("code"), field("message")))
    }
}

fn describe((code, message): (String, String)) -> Error {
    format!("{code}: {message}").into()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, username, password, rest @ ..] = args.as_slice() else {
        eprintln!("usage: ws_client BASE_URL USERNAME PASSWORD [ROOM_ID]");
        std::process::exit(2);
    };
    let base = base.trim_end_matches('/');
    let http = reqwest::Client::new();

    // 1. An access token: sign up, or sign in when the account exists.
    let credentials = json!({"username": username, "password": password});
    let session = match rpc(&http, base, "AuthService/SignUp", None, credentials.clone()).await {
        Ok(reply) => reply,
        Err((code, _)) if code == "already_exists" => {
            rpc(&http, base, "AuthService/SignIn", None, credentials)
                .await
                .map_err(describe)?
        }
        Err(e) => return Err(describe(e)),
    };
    let token = session["tokens"]["accessToken"]
        .as_str()
        .ok_or("no access token in the reply")?
        .to_owned();
    println!("signed in as {username}");

    // 2. A room: join the one given, or create a public one.
    let room_id = match rest.first() {
        Some(room_id) => {
            // Joining a room one is already a member of (the owner too) is a no-op.
            rpc(
                &http,
                base,
                "RoomService/JoinRoom",
                Some(&token),
                json!({"roomId": room_id}),
            )
            .await
            .map_err(describe)?;
            room_id.clone()
        }
        None => {
            let created = rpc(
                &http,
                base,
                "RoomService/CreateRoom",
                Some(&token),
                json!({"kind": "ROOM_KIND_PUBLIC", "title": "ws_client example"}),
            )
            .await
            .map_err(describe)?;
            created["room"]["id"]
                .as_str()
                .ok_or("no room id in the reply")?
                .to_owned()
        }
    };
    println!("room {room_id}");

    // 3. The WebSocket, authenticated by the upgrade request's Authorization header.
    let ws_url = format!(
        "{}/ws",
        base.replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1)
    );
    let mut request = ws_url.into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "roomcast.v1.json".parse()?);
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;

    // 4. Subscribe from the start of the history. Replies carry the request's id;
    //    pushes (history and live events) carry none. The history comes first, then
    //    `resumed` marks the switch to live delivery.
    let subscribe = json!({"id": "1", "subscribe": {"roomId": room_id, "sinceSeq": "0"}});
    println!("> {subscribe}");
    ws.send(Message::text(subscribe.to_string())).await?;
    let client_message_id = format!("ws_client-{}", std::process::id());
    let mut live = false;
    let mut sent_seq: Option<String> = None;
    let mut pushed_seq: Option<String> = None;
    loop {
        let next = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .map_err(|_| "no frame from the server for 10 s")?;
        let message = match next {
            Some(message) => message?,
            None => return Err("the server closed the connection".into()),
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => return Err(format!("closed by the server: {frame:?}").into()),
            _ => continue,
        };
        println!("< {text}");
        let frame: Value = serde_json::from_str(text.as_str())?;
        if let Some(error) = frame.get("error") {
            return Err(format!("error frame: {error}").into());
        }
        // 5. Once live, send one message.
        if !live && frame.get("resumed").is_some() {
            live = true;
            let send = json!({"id": "2", "send": {
                "roomId": room_id,
                "text": format!("hello from {username}"),
                "clientMessageId": client_message_id,
            }});
            println!("> {send}");
            ws.send(Message::text(send.to_string())).await?;
        }
        // 6. Done when it is acknowledged (`sent`, after the commit) and came back as a
        //    live push; the two may arrive in either order.
        if let Some(seq) = frame["sent"]["message"]["seq"].as_str() {
            sent_seq = Some(seq.to_owned());
        }
        if live && frame["message"]["clientMessageId"] == client_message_id.as_str() {
            pushed_seq = frame["message"]["seq"].as_str().map(str::to_owned);
        }
        if let (Some(sent), Some(pushed)) = (&sent_seq, &pushed_seq) {
            if sent == pushed {
                println!("message stored at seq {sent} and delivered live");
                break;
            }
        }
    }
    ws.close(None).await?;
    Ok(())
}
