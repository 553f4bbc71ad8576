//! Set-up over the Connect JSON API: accounts and rooms.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context as _, Result};
use futures_util::{stream, StreamExt as _};
use roomcast::proto::v1 as pb;
use serde::{de::DeserializeOwned, Serialize};

use crate::{PASSWORD, REPLY_TIMEOUT, SIGN_UP_CONCURRENCY};

/// An account the bench signed up.
#[derive(Clone)]
pub(crate) struct Account {
    pub(crate) token: String,
}

/// The Connect JSON API of the target.
#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
}

impl Api {
    pub(crate) fn new(addr: SocketAddr) -> Result<Self> {
        let http = reqwest::Client::builder()
            // Proxies from the environment would send traffic elsewhere; redirects
            // could leave loopback.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REPLY_TIMEOUT)
            .build()
            .context("build the HTTP client")?;
        Ok(Self {
            http,
            base: format!("http://{addr}"),
        })
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: &str,
        token: Option<&str>,
        request: &Req,
    ) -> Result<Resp> {
        let url = format!("{}/roomcast.v1.{method}", self.base);
        let mut builder = self.http.post(&url).json(request);
        if let Some(token) = token {
            builder = builder.bearer_auth(token);
        }
        let response = builder.send().await.with_context(|| method.to_owned())?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{method}: HTTP {status}: {body}");
        }
        response
            .json()
            .await
            .with_context(|| format!("{method}: bad response"))
    }

    /// Signs up `count` accounts named `bench-<run>-<role><n>`.
    pub(crate) async fn sign_up_many(
        &self,
        run: &str,
        role: &str,
        count: usize,
    ) -> Result<Vec<Account>> {
        let results: Vec<Result<Account>> = stream::iter(0..count)
            .map(|n| {
                let username = format!("b{run}-{role}{n}");
                async move {
                    let reply: pb::SignUpResponse = self
                        .call(
                            "AuthService/SignUp",
                            None,
                            &pb::SignUpRequest {
                                username: username.clone(),
                                password: PASSWORD.into(),
                                display_name: String::new(),
                            },
                        )
                        .await
                        .with_context(|| format!("sign up {username}"))?;
                    Ok(Account {
                        token: reply
                            .tokens
                            .map(|t| t.access_token)
                            .ok_or_else(|| anyhow!("sign-up of {username} gave no token"))?,
                    })
                }
            })
            .buffered(SIGN_UP_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Creates a public room owned by `owner`; answers its id.
    pub(crate) async fn create_room(&self, owner: &Account, title: &str) -> Result<String> {
        self.create_room_with(owner, title, None).await
    }

    /// Creates a public room, a live room with `live` controls when given.
    pub(crate) async fn create_room_with(
        &self,
        owner: &Account,
        title: &str,
        live: Option<pb::LiveControls>,
    ) -> Result<String> {
        let reply: pb::CreateRoomResponse = self
            .call(
                "RoomService/CreateRoom",
                Some(&owner.token),
                &pb::CreateRoomRequest {
                    kind: pb::RoomKind::Public as i32,
                    title: title.into(),
                    live,
                    ..Default::default()
                },
            )
            .await?;
        reply
            .room
            .map(|r| r.id)
            .ok_or_else(|| anyhow!("CreateRoom answered no room"))
    }

    pub(crate) async fn join_room(&self, account: &Account, room_id: &str) -> Result<()> {
        let _: pb::JoinRoomResponse = self
            .call(
                "RoomService/JoinRoom",
                Some(&account.token),
                &pb::JoinRoomRequest {
                    room_id: room_id.into(),
                },
            )
            .await?;
        Ok(())
    }
}

/// A short random id for this run's account names.
pub(crate) fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}
