//! [`Authenticator`]: every authentication decision and every change to accounts,
//! sessions and API keys. A few of them run under `actix::Supervisor`, each on its
//! own arbiter, behind an [`AuthPool`] that hands requests out round-robin.
//!
//! It talks to the [`Store`] (users, sessions, refresh tokens, API keys) and to the
//! [`PasswordHasher`] threads through a bounded [`HasherQueue`]; it never sees
//! HTTP. SignIn and SignUp pass the credential-attack limits of [`AuthLimits`]
//! (per client address, per username with backoff) before any hashing.
//! Bearer credentials are:
//!
//! - API keys (`rk_...`), looked up by hash in the store; they act as the server
//!   (admin role).
//! - roomcast access tokens: HS256 JWTs signed with the token secret, claims
//!   `{sub, sid, role, iat, exp, iss: "roomcast", typ: "access"}`. A valid token
//!   also needs its session to be active in the store, which is how SignOut and
//!   refresh-token reuse revoke access tokens before they expire. The principal's
//!   role is read from the user row on every request, not taken from the `role`
//!   claim, so a role change applies at once (the claim is informational).
//! - tokens an external application signs (when `auth.external.enabled`): any
//!   bearer that is not a valid roomcast token is tried against the external key.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use actix::{
    fut::{ready, ActorFutureExt as _, WrapFuture as _},
    Actor, Addr, Arbiter, ArbiterHandle, Context, Handler, Message, ResponseActFuture,
    ResponseFuture, Supervised, Supervisor,
};
use base64::Engine as _;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

mod limits;
mod rules;

pub use limits::{AuthLimits, ClientAddr};
pub use rules::AccessRules;

use super::{
    password_hasher::{Caller, HasherQueue, PasswordHasher},
    supervision::{guarded, stop_on_panic},
};
use crate::{
    domain::{
        access::{load_room_access, RoomAccess},
        access_rules::Operation,
        validate, Credential, Principal,
    },
    error::ApiError,
    ids::{now_ms, random_secret, ApiKeyId, SessionId, UserId},
    model::Role,
    settings::{AuthSettings, Settings},
    store::{ApiKeyRecord, NewUser, RefreshOutcome, Store, StoreError, UserRecord},
};

/// `iss` of every roomcast access token.
pub const TOKEN_ISSUER: &str = "roomcast";
/// `typ` claim of access tokens (the only kind of JWT roomcast issues).
const ACCESS_TOKEN_TYPE: &str = "access";
/// Prefix of API key secrets (`rk_...`).
pub const API_KEY_PREFIX: &str = "rk";
/// Prefix of refresh tokens (`rt_...`).
pub const REFRESH_TOKEN_PREFIX: &str = "rt";
/// How an API key secret starts.
const API_KEY_SECRET_START: &str = "rk_";
/// How a refresh token starts.
const REFRESH_TOKEN_SECRET_START: &str = "rt_";
/// Key of the generated token secret in the store's `server_kv` table.
const TOKEN_SECRET_KV_KEY: &str = "token_secret";
/// Random bytes of a generated token secret (base64: 64 characters).
const GENERATED_SECRET_BYTES: usize = 48;
/// Clock skew tolerated on roomcast tokens: none, nodes share NTP time and the
/// token's own lifetime is short.
const ACCESS_TOKEN_LEEWAY_SECS: u64 = 0;
/// Clock skew tolerated on external tokens, whose issuer runs on other machines.
const EXTERNAL_TOKEN_LEEWAY_SECS: u64 = 5;
/// Longest external user id accepted from a token.
const EXTERNAL_SUBJECT_MAX_CHARS: usize = 256;
/// External users each authenticator remembers (subject, name, role → user id) to
/// skip the upsert on reconnects; cleared when full.
const EXTERNAL_USER_CACHE_MAX: usize = 10_000;
/// Mailbox capacity of each authenticator: a reconnect storm queues here instead
/// of parking thousands of senders.
const AUTH_MAILBOX_CAPACITY: usize = 1024;
/// Most authenticators [`default_pool_size`] starts.
pub const MAX_DEFAULT_AUTHENTICATORS: usize = 4;
/// Longest API key name.
const API_KEY_NAME_MAX_CHARS: usize = 64;

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// Authenticates the bearer credential of an RPC call (as [`Authenticate`]) and
/// checks the access rules for the caller's role and the RPC: `permission_denied`
/// when a rule denies it. Every RPC that has a caller goes through this.
#[derive(Debug, Message)]
#[rtype(result = "Result<Principal, ApiError>")]
pub struct AuthorizeCall {
    pub bearer: String,
    /// The full RPC name, `roomcast.v1.RoomService/SendMessage`.
    pub rpc: String,
}

/// Re-reads the access rules from the store and puts them in force on this node;
/// answers how many there are.
#[derive(Debug, Message)]
#[rtype(result = "Result<usize, ApiError>")]
pub struct ReloadAccessRules;

/// Turns a bearer credential (API key, roomcast access token or external token)
/// into a [`Principal`]; `unauthenticated` when it is not acceptable.
#[derive(Debug, Message)]
#[rtype(result = "Result<Principal, ApiError>")]
pub struct Authenticate {
    pub bearer: String,
}

/// Creates an account (when sign-up is allowed) and signs it in.
#[derive(Debug, Message)]
#[rtype(result = "Result<SignedIn, ApiError>")]
pub struct SignUp {
    pub username: String,
    pub password: String,
    /// Empty: the username.
    pub display_name: String,
    /// Where the request came from, for the per-address sign-up limit.
    pub client: ClientAddr,
    /// Whether the requester still waits (a job of a gone one is not hashed).
    pub caller: Caller,
}

/// Exchanges a username and password for a new session.
#[derive(Debug, Message)]
#[rtype(result = "Result<SignedIn, ApiError>")]
pub struct SignIn {
    pub username: String,
    pub password: String,
    /// Where the request came from, for the per-address sign-in limit.
    pub client: ClientAddr,
    /// Whether the requester still waits (a job of a gone one is not hashed).
    pub caller: Caller,
}

/// Decides what the principal may do in a room (an ACL decision).
#[derive(Debug, Message)]
#[rtype(result = "Result<RoomAccess, ApiError>")]
pub struct AuthorizeRoom {
    pub principal: Principal,
    pub room_id: String,
    /// Decide from the store's cached access facts where it holds them (see
    /// [`crate::domain::access::check_room_access`]).
    pub cached: bool,
}

/// Consumes a refresh token and issues the next token pair of its session.
#[derive(Debug, Message)]
#[rtype(result = "Result<Refreshed, ApiError>")]
pub struct Refresh {
    pub refresh_token: String,
}

/// The outcome of a [`Refresh`] that was not simply invalid.
#[derive(Debug)]
pub enum Refreshed {
    /// The next token pair.
    Tokens(IssuedTokens),
    /// The token had been used before: it leaked, and its session is now revoked.
    /// The caller closes the session's live connections and refuses the request.
    Revoked {
        user_id: UserId,
        session_id: SessionId,
    },
}

/// Ends the caller's session, or all of the caller's sessions; answers how many
/// sessions were active.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, ApiError>")]
pub struct SignOut {
    pub principal: Principal,
    pub all_sessions: bool,
}

/// Creates an account with any role, without signing it in (the CLI, the
/// configured admin). Same validation as [`SignUp`].
#[derive(Debug, Message)]
#[rtype(result = "Result<UserRecord, ApiError>")]
pub struct CreateUser {
    pub username: String,
    pub password: String,
    /// Empty: the username.
    pub display_name: String,
    pub role: Role,
}

/// Creates the configured admin account unless the username exists; answers
/// whether it was created.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, ApiError>")]
pub struct EnsureAdmin {
    pub username: String,
    pub password: String,
}

/// Admin only: creates an API key. The secret is in the answer and nowhere else.
#[derive(Debug, Message)]
#[rtype(result = "Result<CreatedApiKey, ApiError>")]
pub struct CreateApiKey {
    pub principal: Principal,
    pub name: String,
}

/// Admin only: lists API keys, newest first.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<ApiKeyRecord>, ApiError>")]
pub struct ListApiKeys {
    pub principal: Principal,
    pub include_revoked: bool,
}

/// Admin only: revokes an active API key; `not_found` when there is none.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct RevokeApiKey {
    pub principal: Principal,
    pub id: ApiKeyId,
}

/// A new access token and the refresh token that renews it. Times are Unix ms.
#[derive(Debug, Clone)]
pub struct IssuedTokens {
    pub access_token: String,
    pub access_expires_at: i64,
    pub refresh_token: String,
    pub refresh_expires_at: i64,
    /// The session both tokens belong to.
    pub session_id: SessionId,
}

/// The answer to [`SignUp`] and [`SignIn`].
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub user: UserRecord,
    pub tokens: IssuedTokens,
}

/// The answer to [`CreateApiKey`].
#[derive(Debug, Clone)]
pub struct CreatedApiKey {
    pub key: ApiKeyRecord,
    /// The only copy of the secret; the store keeps its hash.
    pub secret: String,
}

// ---------------------------------------------------------------------------
// The pool
// ---------------------------------------------------------------------------

/// Handles to the running authenticators. Cheap to clone; requests are spread
/// round-robin over the actors that are still alive.
///
/// The checks on the hot paths (a connection's authentication, an RPC's
/// authorization, a room access check) go to [`AuthPool::send_local`] instead: an
/// authenticator of the same pool on the caller's own arbiter (an HTTP worker),
/// started there on first use and supervised like the others, so they cost no
/// round trip to another thread.
#[derive(Clone)]
pub struct AuthPool {
    actors: Arc<[Addr<Authenticator>]>,
    arbiters: Arc<[ArbiterHandle]>,
    next: Arc<AtomicUsize>,
    hasher: HasherQueue,
    rules: AccessRules,
    /// What an authenticator this pool starts on a caller's arbiter shares.
    shared: Shared,
    /// Tells this pool's per-arbiter authenticators from another server's in the
    /// same process (tests, several nodes).
    id: usize,
}

/// Numbers the pools of this process (see [`AuthPool::send_local`]).
static NEXT_POOL_ID: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The authenticators started on this thread's arbiter, by pool id.
    static LOCAL_AUTHENTICATORS: std::cell::RefCell<Vec<(usize, Addr<Authenticator>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl AuthPool {
    /// Loads the token secret (`auth.token_secret`, or the one generated once and
    /// kept in the store so that every node sharing the store agrees), then starts
    /// [`default_pool_size`] supervised authenticators, each on a new arbiter. Must
    /// be called inside a running actix `System`.
    pub async fn start(
        settings: Arc<Settings>,
        store: Store,
        hasher: Addr<PasswordHasher>,
    ) -> Result<Self, ApiError> {
        Self::start_with_size(&settings, store, hasher, default_pool_size()).await
    }

    /// Like [`AuthPool::start`] with `n` (at least one) authenticators.
    pub async fn start_with_size(
        settings: &Settings,
        store: Store,
        hasher: Addr<PasswordHasher>,
        n: usize,
    ) -> Result<Self, ApiError> {
        let auth = Arc::new(settings.auth.clone());
        let secret = load_token_secret(&auth, &store).await.map_err(|e| {
            ApiError::unavailable(format!("cannot load the token secret from the store: {e}"))
        })?;
        let keys = TokenKeys::new(secret.as_bytes(), &auth)
            .map_err(|e| ApiError::failed_precondition(format!("auth.external: {e}")))?;
        let rules = AccessRules::default();
        rules.reload(&store).await.map_err(|e| {
            ApiError::unavailable(format!("cannot load the access rules from the store: {e}"))
        })?;
        let shared = Shared {
            rules: rules.clone(),
            hasher: HasherQueue::new(hasher, auth.hasher_max_pending),
            limits: Arc::new(AuthLimits::new(&auth)),
            settings: auth,
            store,
            keys: Arc::new(keys),
        };
        let n = n.max(1);
        let mut actors = Vec::with_capacity(n);
        let mut arbiters = Vec::with_capacity(n);
        for i in 0..n {
            let arbiter = Arbiter::new().handle();
            let shared = shared.clone();
            // One authenticator re-reads the rules for the whole pool.
            let refresher = i == 0;
            actors.push(Supervisor::start_in_arbiter(&arbiter, move |_ctx| {
                let mut actor = Authenticator::new(shared);
                actor.refreshes_rules = refresher;
                actor
            }));
            arbiters.push(arbiter);
        }
        info!(
            authenticators = n,
            external = shared.keys.external.is_some(),
            "auth pool started"
        );
        Ok(Self {
            actors: actors.into(),
            arbiters: arbiters.into(),
            next: Arc::new(AtomicUsize::new(0)),
            hasher: shared.hasher.clone(),
            rules,
            shared,
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Sends `msg` to this pool's authenticator on the caller's own arbiter (started
    /// there under a supervisor on first use), so the answer needs no other thread;
    /// outside an actix arbiter, to the pool as [`AuthPool::send`].
    pub async fn send_local<M, T>(&self, msg: M) -> Result<T, ApiError>
    where
        M: Message<Result = Result<T, ApiError>> + Send + 'static,
        T: Send + 'static,
        Authenticator: Handler<M>,
    {
        match self.local() {
            Some(addr) => addr.send(msg).await?,
            None => self.send(msg).await,
        }
    }

    fn local(&self) -> Option<Addr<Authenticator>> {
        // Only inside an arbiter can an actor be started here.
        actix::Arbiter::try_current()?;
        LOCAL_AUTHENTICATORS.with(|local| {
            let mut local = local.borrow_mut();
            // A stopped pool's actors (a server of this process that shut down).
            local.retain(|(_, addr)| addr.connected());
            if let Some((_, addr)) = local.iter().find(|(id, _)| *id == self.id) {
                return Some(addr.clone());
            }
            let shared = self.shared.clone();
            let addr = Supervisor::start(move |_ctx| Authenticator::new(shared));
            local.push((self.id, addr.clone()));
            Some(addr)
        })
    }

    /// Sends `msg` to the next authenticator and waits for its answer. An
    /// unreachable actor becomes `unavailable`.
    pub async fn send<M, T>(&self, msg: M) -> Result<T, ApiError>
    where
        M: Message<Result = Result<T, ApiError>> + Send + 'static,
        T: Send + 'static,
        Authenticator: Handler<M>,
    {
        self.pick().send(msg).await?
    }

    /// Shorthand for [`Authenticate`].
    pub async fn authenticate(&self, bearer: impl Into<String>) -> Result<Principal, ApiError> {
        self.send(Authenticate {
            bearer: bearer.into(),
        })
        .await
    }

    /// The access rules in force (connections check WebSocket frames against them).
    pub fn rules(&self) -> &AccessRules {
        &self.rules
    }

    /// Re-reads the access rules now (after a change made through the admin API).
    pub async fn reload_rules(&self) -> Result<usize, ApiError> {
        self.send(ReloadAccessRules).await
    }

    /// Password hashing jobs waiting or running now (for health checks and tests).
    pub fn hasher_pending(&self) -> usize {
        self.hasher.pending()
    }

    /// How many authenticators the pool has.
    pub fn len(&self) -> usize {
        self.actors.len()
    }

    /// Always false: a pool has at least one authenticator.
    pub fn is_empty(&self) -> bool {
        self.actors.is_empty()
    }

    /// Stops the authenticators' arbiters (at shutdown, after the HTTP server).
    pub fn stop(&self) {
        for arbiter in self.arbiters.iter() {
            arbiter.stop();
        }
    }

    /// The next live actor, round-robin; a dead one (its arbiter thread ended) is
    /// skipped so a single failure does not fail every n-th request.
    fn pick(&self) -> &Addr<Authenticator> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let len = self.actors.len();
        (0..len)
            .map(|i| &self.actors[(start + i) % len])
            .find(|addr| addr.connected())
            .unwrap_or(&self.actors[start % len])
    }
}

/// Authenticators started by [`AuthPool::start`]: one per core, at most
/// [`MAX_DEFAULT_AUTHENTICATORS`]. Their work is mostly waiting on the store, so a
/// few threads go a long way.
pub fn default_pool_size() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, MAX_DEFAULT_AUTHENTICATORS)
}

async fn load_token_secret(settings: &AuthSettings, store: &Store) -> Result<String, StoreError> {
    if !settings.token_secret.is_empty() {
        return Ok(settings.token_secret.clone());
    }
    let bytes: Vec<u8> = (0..GENERATED_SECRET_BYTES)
        .map(|_| rand::thread_rng().gen())
        .collect();
    let candidate = base64::engine::general_purpose::STANDARD.encode(bytes);
    store
        .kv_get_or_insert(TOKEN_SECRET_KV_KEY, &candidate)
        .await
}

// ---------------------------------------------------------------------------
// The actor
// ---------------------------------------------------------------------------

/// One authenticator. Stateless apart from a cache of external users; everything
/// else is in the store, so a restart loses nothing.
pub struct Authenticator {
    shared: Shared,
    /// (subject, display name, role) of external users seen lately → their user id.
    external_users: HashMap<ExternalIdentityKey, UserId>,
    /// Whether this one re-reads the access rules every
    /// `auth.access_rules_refresh_ms` (one per pool).
    refreshes_rules: bool,
}

type ExternalIdentityKey = (String, String, Role);

impl Authenticator {
    fn new(shared: Shared) -> Self {
        Self {
            shared,
            external_users: HashMap::new(),
            refreshes_rules: false,
        }
    }
}

impl Actor for Authenticator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(AUTH_MAILBOX_CAPACITY);
        let every = self.shared.settings.access_rules_refresh_ms;
        if self.refreshes_rules && every > 0 {
            actix::AsyncContext::run_interval(
                ctx,
                std::time::Duration::from_millis(every),
                |act, ctx| {
                    let shared = act.shared.clone();
                    actix::AsyncContext::spawn(
                    ctx,
                    async move {
                        if let Err(e) = shared.rules.reload(&shared.store).await {
                            warn!(error = %e, "cannot re-read the access rules; keeping the old ones");
                        }
                    }
                    .into_actor(act),
                );
                },
            );
        }
    }
}

impl Supervised for Authenticator {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        warn!("authenticator restarting");
        self.external_users.clear();
    }
}

/// What every handler's future needs; cloned into it.
#[derive(Clone)]
struct Shared {
    settings: Arc<AuthSettings>,
    store: Store,
    /// The bounded queue to the hashing threads.
    hasher: HasherQueue,
    /// Credential-attack limits, shared by every authenticator of the pool.
    limits: Arc<AuthLimits>,
    keys: Arc<TokenKeys>,
    /// The access rules in force, shared by the pool.
    rules: AccessRules,
}

impl Handler<AuthorizeCall> for Authenticator {
    type Result = ResponseActFuture<Self, Result<Principal, ApiError>>;

    fn handle(&mut self, msg: AuthorizeCall, ctx: &mut Context<Self>) -> Self::Result {
        let authenticated =
            <Self as Handler<Authenticate>>::handle(self, Authenticate { bearer: msg.bearer }, ctx);
        let rpc = msg.rpc;
        Box::pin(authenticated.map(move |result, act, _ctx| {
            let principal = result?;
            act.shared
                .rules
                .check(principal.role, Operation::Rpc(&rpc))?;
            Ok(principal)
        }))
    }
}

impl Handler<ReloadAccessRules> for Authenticator {
    type Result = ResponseFuture<Result<usize, ApiError>>;

    fn handle(&mut self, _msg: ReloadAccessRules, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            let n = shared.rules.reload(&shared.store).await?;
            debug!(rules = n, "access rules re-read");
            Ok(n)
        })
    }
}

impl Handler<Authenticate> for Authenticator {
    type Result = ResponseActFuture<Self, Result<Principal, ApiError>>;

    fn handle(&mut self, msg: Authenticate, ctx: &mut Context<Self>) -> Self::Result {
        // This handler and its future run on the actor's own task: a panic in either
        // stops this authenticator, which its supervisor restarts, instead of
        // silently taking one actor out of the pool.
        // Answered as when the reply is lost to the stop: retryable.
        let failed = || {
            Err(ApiError::unavailable(
                "the authenticator failed and is restarting; retry",
            ))
        };
        match guarded(self, ctx, || None, |act, _ctx| Some(act.authenticate(msg))) {
            Some(fut) => Box::pin(stop_on_panic(fut, failed)),
            None => Box::pin(ready(failed())),
        }
    }
}

/// Bearer tokens that make an authenticator panic, in its handler or in its
/// future, to prove that the pool survives it (tests only).
#[cfg(feature = "fault-injection")]
pub mod faults {
    /// Panics in the handler itself.
    pub const PANIC_IN_HANDLER: &str = "fault-injection-panic-in-handler";
    /// Panics in the handler's future.
    pub const PANIC_IN_FUTURE: &str = "fault-injection-panic-in-future";
}

#[cfg(feature = "fault-injection")]
fn injected_panic() -> Result<Principal, ApiError> {
    panic!("injected authenticator panic (fault-injection)")
}

impl Authenticator {
    fn authenticate(
        &mut self,
        msg: Authenticate,
    ) -> ResponseActFuture<Self, Result<Principal, ApiError>> {
        #[cfg(feature = "fault-injection")]
        match msg.bearer.as_str() {
            faults::PANIC_IN_HANDLER => return Box::pin(ready(injected_panic())),
            faults::PANIC_IN_FUTURE => {
                return Box::pin(async { injected_panic() }.into_actor(self));
            }
            _ => {}
        }
        let bearer = msg.bearer.trim();
        if bearer.is_empty() {
            return Box::pin(ready(Err(ApiError::unauthenticated(
                "a bearer token is required",
            ))));
        }
        if bearer.starts_with(API_KEY_SECRET_START) {
            let store = self.shared.store.clone();
            let secret = bearer.to_owned();
            return Box::pin(
                async move { authenticate_api_key(&store, &secret).await }.into_actor(self),
            );
        }
        match self.shared.keys.verify_access(bearer) {
            Ok(claims) => {
                let store = self.shared.store.clone();
                Box::pin(async move { authenticate_session(&store, claims).await }.into_actor(self))
            }
            Err(AccessRejection::Expired) => Box::pin(ready(Err(ApiError::unauthenticated(
                "access token expired",
            )))),
            Err(AccessRejection::Invalid) if bearer.starts_with(REFRESH_TOKEN_SECRET_START) => {
                Box::pin(ready(Err(ApiError::unauthenticated(
                    "a refresh token is not an access token; exchange it with AuthService.Refresh",
                ))))
            }
            Err(AccessRejection::Invalid) => match &self.shared.keys.external {
                None => Box::pin(ready(Err(ApiError::unauthenticated(
                    "invalid access token",
                )))),
                Some(external) => match external.verify(bearer) {
                    Ok(identity) => self.authenticate_external(identity),
                    Err(e) => Box::pin(ready(Err(e))),
                },
            },
        }
    }
}

impl Authenticator {
    /// Finds or creates the user of a verified external identity. The upsert is
    /// skipped when this actor saw the same identity (same name and role) lately.
    fn authenticate_external(
        &mut self,
        identity: ExternalIdentity,
    ) -> ResponseActFuture<Self, Result<Principal, ApiError>> {
        let key: ExternalIdentityKey = (
            identity.subject.clone(),
            identity.display_name.clone(),
            identity.role,
        );
        if let Some(user_id) = self.external_users.get(&key) {
            let store = self.shared.store.clone();
            let principal = identity.principal(user_id.clone());
            return Box::pin(
                async move { refuse_suspended(&store, principal).await }.into_actor(self),
            );
        }
        let store = self.shared.store.clone();
        let upsert = async move {
            let user = store
                .upsert_external_user(&identity.subject, &identity.display_name, identity.role)
                .await?;
            if store.is_suspended(&user.id).await? {
                return Err(suspended_error());
            }
            debug!(user = %user.id, subject = %identity.subject, "external user authenticated");
            Ok::<_, ApiError>((user.id, identity))
        };
        Box::pin(upsert.into_actor(self).map(move |result, act, _ctx| {
            let (user_id, identity) = result?;
            if act.external_users.len() >= EXTERNAL_USER_CACHE_MAX {
                act.external_users.clear();
            }
            act.external_users.insert(key, user_id.clone());
            Ok(identity.principal(user_id))
        }))
    }
}

/// The answer to any credential of a suspended account.
fn suspended_error() -> ApiError {
    ApiError::unauthenticated("this account is suspended; ask an admin")
}

/// Refuses a suspended user (external users, whose tokens cannot be revoked).
async fn refuse_suspended(store: &Store, principal: Principal) -> Result<Principal, ApiError> {
    if store.is_suspended(&principal.user_id).await? {
        return Err(suspended_error());
    }
    Ok(principal)
}

async fn authenticate_api_key(store: &Store, secret: &str) -> Result<Principal, ApiError> {
    match store.use_api_key(secret).await {
        Ok(key) => Ok(Principal {
            user_id: UserId(key.id.clone()),
            role: Role::Admin,
            credential: Credential::ApiKey(ApiKeyId(key.id)),
            display_name: Some(key.name),
            expires_at: i64::MAX,
        }),
        Err(StoreError::NotFound) => Err(ApiError::unauthenticated("invalid or revoked API key")),
        Err(e) => Err(e.into()),
    }
}

async fn authenticate_session(store: &Store, claims: AccessClaims) -> Result<Principal, ApiError> {
    let session_id = SessionId(claims.sid);
    let user_id = UserId(claims.sub);
    // From memory when cached: sign-out, revocation, suspension and role or
    // profile changes drop the entry at once (see `Store::invalidate_access`).
    let facts = store.session_facts(&session_id, &user_id).await?;
    let signed_out = || ApiError::unauthenticated("session has been signed out");
    // First: a suspended account's sessions were ended too, and "suspended" is
    // the answer that tells the user what happened.
    if facts.suspended {
        return Err(suspended_error());
    }
    let Some(session) = &facts.session else {
        return Err(signed_out());
    };
    if !session.is_active(now_ms()) || session.user_id != user_id.0 {
        return Err(signed_out());
    }
    let Some(user) = &facts.user else {
        return Err(signed_out());
    };
    Ok(Principal {
        user_id,
        role: user.role,
        credential: Credential::Session(session_id),
        display_name: Some(user.display_name.clone()),
        expires_at: claims.exp.saturating_mul(1000),
    })
}

impl Handler<SignUp> for Authenticator {
    type Result = ResponseFuture<Result<SignedIn, ApiError>>;

    fn handle(&mut self, msg: SignUp, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            if !shared.settings.allow_sign_up {
                return Err(ApiError::denied(
                    "sign-up is disabled on this server; ask an admin for an account",
                ));
            }
            let role = Role::parse(&shared.settings.sign_up_role).unwrap_or(Role::Member);
            // Refused input does not count against the address: only sign-ups
            // that would create an account do.
            validate_new_account(&msg.username, &msg.password, &msg.display_name)?;
            shared.limits.sign_up_from(msg.client)?;
            let user = shared
                .create_account(
                    &msg.username,
                    msg.password,
                    &msg.display_name,
                    role,
                    msg.caller,
                )
                .await?;
            let tokens = shared.issue_tokens(&user).await?;
            info!(user = %user.id, session = %tokens.session_id, "signed up");
            Ok(SignedIn { user, tokens })
        })
    }
}

impl Handler<SignIn> for Authenticator {
    type Result = ResponseFuture<Result<SignedIn, ApiError>>;

    fn handle(&mut self, msg: SignIn, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            let raw = msg.username.trim();
            validate::required("username", raw)?;
            validate::required("password", &msg.password)?;
            // Limits first: a refused attempt costs no store read and no hash.
            shared.limits.sign_in_from(msg.client)?;
            let valid = validate::username(raw);
            // Counted per username whether it exists or not, so the answer does
            // not tell which usernames exist.
            let account_key = match &valid {
                Ok(username) => username.clone(),
                Err(_) => raw.to_lowercase(),
            };
            shared.limits.sign_in_as(&account_key)?;
            // A malformed username cannot exist; it still costs a verification so
            // the answer takes as long as for a wrong password.
            let user = match valid {
                Ok(username) => match shared.store.get_user_by_username(&username).await {
                    Ok(user) => Some(user),
                    Err(StoreError::NotFound) => None,
                    Err(e) => return Err(e.into()),
                },
                Err(_) => None,
            };
            let hash = user.as_ref().and_then(|u| u.password_hash.clone());
            let matches = shared.hasher.verify(msg.password, hash, msg.caller).await?;
            if matches {
                shared.limits.signed_in(&account_key);
            }
            let user = match user {
                Some(user) if matches => user,
                _ => {
                    debug!("sign-in refused: wrong username or password");
                    return Err(ApiError::unauthenticated("wrong username or password"));
                }
            };
            // Checked after the password, so that it tells nothing to a guesser.
            if shared.store.is_suspended(&user.id).await? {
                info!(user = %user.id, "sign-in refused: account suspended");
                return Err(ApiError::denied("this account is suspended; ask an admin"));
            }
            let tokens = shared.issue_tokens(&user).await?;
            info!(user = %user.id, session = %tokens.session_id, "signed in");
            Ok(SignedIn { user, tokens })
        })
    }
}

impl Handler<Refresh> for Authenticator {
    type Result = ResponseFuture<Result<Refreshed, ApiError>>;

    fn handle(&mut self, msg: Refresh, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            let presented = msg.refresh_token.trim();
            validate::required("refresh_token", presented)?;
            let invalid = || ApiError::unauthenticated("invalid or expired refresh token");
            let next = random_secret(REFRESH_TOKEN_PREFIX);
            let ttl_ms = secs_to_ms(shared.settings.refresh_token_ttl_secs);
            let grace_ms =
                i64::try_from(shared.settings.refresh_reuse_grace_ms).unwrap_or(i64::MAX);
            match shared
                .store
                .rotate_refresh_token(presented, &next, ttl_ms, grace_ms)
                .await?
            {
                RefreshOutcome::Rotated { session, grace } => {
                    let user = match shared
                        .store
                        .get_user(&UserId(session.user_id.clone()))
                        .await
                    {
                        Ok(user) => user,
                        Err(StoreError::NotFound) => return Err(invalid()),
                        Err(e) => return Err(e.into()),
                    };
                    if shared.store.is_suspended(&user.id).await? {
                        return Err(suspended_error());
                    }
                    let session_id = SessionId(session.id);
                    let (access_token, access_expires_at) = shared.keys.sign_access(
                        &user,
                        &session_id,
                        shared.settings.access_token_ttl_secs,
                    )?;
                    debug!(user = %user.id, session = %session_id, grace, "tokens refreshed");
                    Ok(Refreshed::Tokens(IssuedTokens {
                        access_token,
                        access_expires_at,
                        refresh_token: next,
                        refresh_expires_at: session.expires_at,
                        session_id,
                    }))
                }
                RefreshOutcome::Reused {
                    session_id,
                    user_id,
                } => {
                    warn!(user = %user_id, session = %session_id, "refresh token reused; session revoked");
                    Ok(Refreshed::Revoked {
                        user_id,
                        session_id,
                    })
                }
                RefreshOutcome::Invalid => Err(invalid()),
            }
        })
    }
}

impl Handler<SignOut> for Authenticator {
    type Result = ResponseFuture<Result<u64, ApiError>>;

    fn handle(&mut self, msg: SignOut, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.shared.store.clone();
        Box::pin(async move {
            let principal = msg.principal;
            let session_id = match &principal.credential {
                Credential::Session(id) => id.clone(),
                Credential::ApiKey(_) => {
                    return Err(ApiError::failed_precondition(
                        "an API key has no session to sign out; revoke the key with RevokeApiKey instead",
                    ))
                }
                Credential::External => {
                    return Err(ApiError::failed_precondition(
                        "external tokens are issued by your application and cannot be signed out here; \
                         stop issuing them or let them expire",
                    ))
                }
            };
            let ended = if msg.all_sessions {
                store.revoke_user_sessions(&principal.user_id).await?
            } else {
                store.revoke_session(&session_id).await?
            };
            info!(user = %principal.user_id, session = %session_id, all = msg.all_sessions, ended, "signed out");
            Ok(ended)
        })
    }
}

impl Handler<CreateUser> for Authenticator {
    type Result = ResponseFuture<Result<UserRecord, ApiError>>;

    fn handle(&mut self, msg: CreateUser, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            let user = shared
                .create_account(
                    &msg.username,
                    msg.password,
                    &msg.display_name,
                    msg.role,
                    Caller::detached(),
                )
                .await?;
            info!(user = %user.id, role = %user.role, "user created");
            Ok(user)
        })
    }
}

impl Handler<EnsureAdmin> for Authenticator {
    type Result = ResponseFuture<Result<bool, ApiError>>;

    fn handle(&mut self, msg: EnsureAdmin, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        Box::pin(async move {
            // Start-up fails with this error: name the setting to fix.
            let username = validate::username(&msg.username).map_err(|e| {
                ApiError::new(e.code, format!("auth.admin_username: {}", e.message))
            })?;
            match shared.store.get_user_by_username(&username).await {
                Ok(existing) => {
                    if existing.role != Role::Admin {
                        warn!(user = %existing.id, username, "configured admin exists without the admin role; left as is");
                    }
                    return Ok(false);
                }
                Err(StoreError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
            // Only checked when the account is to be made: the password of an
            // existing admin is not this setting's business any more.
            validate::password(&msg.password, &username).map_err(|e| {
                ApiError::new(e.code, format!("auth.admin_password: {}", e.message))
            })?;
            match shared
                .create_account(&username, msg.password, "", Role::Admin, Caller::detached())
                .await
            {
                Ok(user) => {
                    info!(user = %user.id, username, "configured admin account created");
                    Ok(true)
                }
                // Another node created it between the lookup and the insert.
                Err(e) if e.code == crate::error::Code::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })
    }
}

impl Handler<CreateApiKey> for Authenticator {
    type Result = ResponseFuture<Result<CreatedApiKey, ApiError>>;

    fn handle(&mut self, msg: CreateApiKey, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.shared.store.clone();
        Box::pin(async move {
            msg.principal.require_admin()?;
            let name = msg.name.trim();
            validate::char_len("name", name, 1, API_KEY_NAME_MAX_CHARS)?;
            validate::single_line("name", name)?;
            let secret = random_secret(API_KEY_PREFIX);
            let key = store
                .create_api_key(name, &secret, &msg.principal.user_id)
                .await?;
            info!(key = %key.id, by = %msg.principal.user_id, "API key created");
            Ok(CreatedApiKey { key, secret })
        })
    }
}

impl Handler<ListApiKeys> for Authenticator {
    type Result = ResponseFuture<Result<Vec<ApiKeyRecord>, ApiError>>;

    fn handle(&mut self, msg: ListApiKeys, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.shared.store.clone();
        Box::pin(async move {
            msg.principal.require_admin()?;
            Ok(store.list_api_keys(msg.include_revoked).await?)
        })
    }
}

impl Handler<RevokeApiKey> for Authenticator {
    type Result = ResponseFuture<Result<(), ApiError>>;

    fn handle(&mut self, msg: RevokeApiKey, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.shared.store.clone();
        Box::pin(async move {
            msg.principal.require_admin()?;
            validate::id("id", msg.id.as_str())?;
            match store.revoke_api_key(&msg.id).await {
                Ok(()) => {
                    info!(key = %msg.id, by = %msg.principal.user_id, "API key revoked");
                    Ok(())
                }
                Err(StoreError::NotFound) => Err(ApiError::not_found(format!(
                    "no active API key `{}`",
                    msg.id
                ))),
                Err(e) => Err(e.into()),
            }
        })
    }
}

impl Handler<AuthorizeRoom> for Authenticator {
    type Result = ResponseFuture<Result<RoomAccess, ApiError>>;

    fn handle(&mut self, msg: AuthorizeRoom, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.shared.store.clone();
        Box::pin(
            async move { load_room_access(&store, &msg.principal, &msg.room_id, msg.cached).await },
        )
    }
}

impl Shared {
    /// Validates, hashes the password off the event loop, and inserts the account.
    async fn create_account(
        &self,
        username: &str,
        password: String,
        display_name: &str,
        role: Role,
        caller: Caller,
    ) -> Result<UserRecord, ApiError> {
        let (username, display_name) = validate_new_account(username, &password, display_name)?;
        let taken = || ApiError::already_exists(format!("username `{username}` is taken"));
        // Checked first so a taken name does not cost a hash; the insert's unique
        // constraint still decides races.
        match self.store.get_user_by_username(&username).await {
            Ok(_) => return Err(taken()),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        self.refuse_lookalike(&username).await?;
        let password_hash = self.hasher.hash(password, caller).await?;
        let new = NewUser {
            username: username.clone(),
            display_name,
            password_hash,
            role,
        };
        match self.store.create_user(new).await {
            Ok(user) => Ok(user),
            // A concurrent sign-up won: with this name, or with one like it.
            Err(StoreError::Conflict) => {
                self.refuse_lookalike(&username).await?;
                Err(taken())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `already_exists` when another account's username looks like `username`
    /// (same confusable skeleton, e.g. `adrnin` and `admin`).
    async fn refuse_lookalike(&self, username: &str) -> Result<(), ApiError> {
        match self.store.get_user_by_lookalike(username).await {
            Ok(existing) => {
                let existing = existing.username.unwrap_or_default();
                if existing == username {
                    return Err(ApiError::already_exists(format!(
                        "username `{username}` is taken"
                    )));
                }
                Err(ApiError::already_exists(format!(
                    "username `{username}` looks too much like the existing username \
                     `{existing}`; choose another"
                )))
            }
            Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts a session for `user`: a refresh token (stored hashed) and an access token.
    async fn issue_tokens(&self, user: &UserRecord) -> Result<IssuedTokens, ApiError> {
        let refresh_token = random_secret(REFRESH_TOKEN_PREFIX);
        let ttl_ms = secs_to_ms(self.settings.refresh_token_ttl_secs);
        let session = self
            .store
            .create_session(&user.id, &refresh_token, ttl_ms)
            .await?;
        let session_id = SessionId(session.id);
        // A token is used right after it is issued (a client signs in, then
        // connects): read what its check and the user's presence need now, so
        // they find it in memory.
        let (facts, rooms) = futures_util::future::join(
            self.store.session_facts(&session_id, &user.id),
            self.store.user_room_ids(&user.id),
        )
        .await;
        if let Err(e) = facts.and(rooms.map(drop)) {
            debug!(error = %e, "cannot pre-read the new session's facts");
        }
        let (access_token, access_expires_at) =
            self.keys
                .sign_access(user, &session_id, self.settings.access_token_ttl_secs)?;
        Ok(IssuedTokens {
            access_token,
            access_expires_at,
            refresh_token,
            refresh_expires_at: session.expires_at,
            session_id,
        })
    }
}

/// The username (normalised) and display name of a new account, after checking
/// them and the password's strength.
fn validate_new_account(
    username: &str,
    password: &str,
    display_name: &str,
) -> Result<(String, String), ApiError> {
    let username = validate::username(username)?;
    validate::password(password, &username)?;
    let display_name = validate::display_name_or(display_name, &username)?;
    Ok((username, display_name))
}

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000)
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

/// The claims of a roomcast access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct AccessClaims {
    /// User id.
    sub: String,
    /// Session id.
    sid: String,
    /// Role at issue time (informational; the user row decides).
    role: String,
    /// Issued at, Unix seconds.
    iat: i64,
    /// Expires at, Unix seconds.
    exp: i64,
    iss: String,
    typ: String,
}

/// Why a bearer is not an acceptable roomcast access token.
#[derive(Debug, PartialEq, Eq)]
enum AccessRejection {
    /// Signed by us, but past `exp`.
    Expired,
    /// Anything else: not a JWT, another key, another issuer, wrong claims.
    Invalid,
}

/// The keys and validation rules of both token kinds, built once per pool.
struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    external: Option<ExternalVerifier>,
}

impl TokenKeys {
    fn new(secret: &[u8], settings: &AuthSettings) -> Result<Self, String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = ACCESS_TOKEN_LEEWAY_SECS;
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let external = if settings.external.enabled {
            Some(ExternalVerifier::new(&settings.external)?)
        } else {
            None
        };
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            external,
        })
    }

    /// Signs an access token for `user` in `session`; answers it with its expiry (ms).
    fn sign_access(
        &self,
        user: &UserRecord,
        session: &SessionId,
        ttl_secs: u64,
    ) -> Result<(String, i64), ApiError> {
        let iat = now_ms() / 1000;
        let exp = iat.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX / 2));
        let claims = AccessClaims {
            sub: user.id.0.clone(),
            sid: session.0.clone(),
            role: user.role.as_str().to_owned(),
            iat,
            exp,
            iss: TOKEN_ISSUER.to_owned(),
            typ: ACCESS_TOKEN_TYPE.to_owned(),
        };
        let token = self.sign_claims(&claims)?;
        Ok((token, exp.saturating_mul(1000)))
    }

    fn sign_claims(&self, claims: &AccessClaims) -> Result<String, ApiError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(ApiError::internal)
    }

    /// Checks signature, issuer, type and expiry; the session check is the caller's.
    fn verify_access(&self, token: &str) -> Result<AccessClaims, AccessRejection> {
        match jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation) {
            Ok(data) if data.claims.typ == ACCESS_TOKEN_TYPE => Ok(data.claims),
            Ok(_) => Err(AccessRejection::Invalid),
            // The signature is checked before `exp`, so this token is ours.
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                Err(AccessRejection::Expired)
            }
            Err(_) => Err(AccessRejection::Invalid),
        }
    }
}

/// Verifies tokens signed by the configured external application and reads the
/// user out of their claims.
struct ExternalVerifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
    user_id_claim: String,
    name_claim: String,
    roles_claim: String,
    default_role: Role,
}

/// The user an external token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExternalIdentity {
    subject: String,
    display_name: String,
    role: Role,
    /// Unix ms.
    expires_at: i64,
}

impl ExternalIdentity {
    fn principal(self, user_id: UserId) -> Principal {
        Principal {
            user_id,
            role: self.role,
            credential: Credential::External,
            display_name: Some(self.display_name),
            expires_at: self.expires_at,
        }
    }
}

impl ExternalVerifier {
    fn new(settings: &crate::settings::ExternalAuthSettings) -> Result<Self, String> {
        let pem = settings.public_key_pem.as_bytes();
        let (algorithm, key) = match settings.algorithm.as_str() {
            "HS256" => (
                Algorithm::HS256,
                DecodingKey::from_secret(settings.secret.as_bytes()),
            ),
            "RS256" => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(pem)
                    .map_err(|e| format!("public_key_pem is not an RSA public key: {e}"))?,
            ),
            "ES256" => (
                Algorithm::ES256,
                DecodingKey::from_ec_pem(pem)
                    .map_err(|e| format!("public_key_pem is not an EC public key: {e}"))?,
            ),
            other => return Err(format!("algorithm `{other}` is not HS256, RS256 or ES256")),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = EXTERNAL_TOKEN_LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if !settings.issuer.is_empty() {
            validation.set_issuer(&[&settings.issuer]);
            required.push("iss");
        }
        if settings.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&settings.audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let default_role = Role::parse(&settings.default_role)
            .ok_or_else(|| format!("default_role `{}` is unknown", settings.default_role))?;
        Ok(Self {
            key,
            validation,
            algorithm,
            user_id_claim: settings.user_id_claim.clone(),
            name_claim: settings.name_claim.clone(),
            roles_claim: settings.roles_claim.clone(),
            default_role,
        })
    }

    /// Verifies the token and maps its claims; every failure is `unauthenticated`
    /// with a message an application developer can act on.
    fn verify(&self, token: &str) -> Result<ExternalIdentity, ApiError> {
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| self.rejection(e.kind()))?
            .claims;
        self.identity(&claims)
    }

    fn rejection(&self, kind: &ErrorKind) -> ApiError {
        let message = match kind {
            ErrorKind::InvalidSignature => "invalid token signature".to_owned(),
            ErrorKind::ExpiredSignature => "token expired".to_owned(),
            ErrorKind::ImmatureSignature => "token is not valid yet (nbf is in the future)".to_owned(),
            ErrorKind::InvalidIssuer => "token issuer (iss) is not accepted".to_owned(),
            ErrorKind::InvalidAudience => "token audience (aud) is not accepted".to_owned(),
            ErrorKind::MissingRequiredClaim(claim) => format!("token has no `{claim}` claim"),
            ErrorKind::InvalidClaimFormat(claim) => format!("token claim `{claim}` has the wrong type"),
            ErrorKind::InvalidAlgorithm => format!(
                "invalid token: expected a roomcast access token or a {:?}-signed application token",
                self.algorithm
            ),
            // A claim of the wrong type (e.g. `sub` an array) fails JSON decoding.
            ErrorKind::Json(_) => "invalid token: its claims are not JSON of the expected types".to_owned(),
            _ => "invalid access token".to_owned(),
        };
        ApiError::unauthenticated(message)
    }

    /// Reads the user id, display name, role and expiry out of verified claims.
    fn identity(&self, claims: &Map<String, Value>) -> Result<ExternalIdentity, ApiError> {
        let subject = match claims.get(&self.user_id_claim) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => {
                return Err(ApiError::unauthenticated(format!(
                    "token has no usable `{}` claim (the user id, a string or an integer)",
                    self.user_id_claim
                )))
            }
        };
        if subject.chars().count() > EXTERNAL_SUBJECT_MAX_CHARS {
            return Err(ApiError::unauthenticated(format!(
                "token claim `{}` is longer than {EXTERNAL_SUBJECT_MAX_CHARS} characters",
                self.user_id_claim
            )));
        }
        let display_name = match claims.get(&self.name_claim) {
            Some(Value::String(s)) => clean_display_name(s),
            _ => None,
        }
        .or_else(|| clean_display_name(&subject))
        .unwrap_or_else(|| subject.clone());
        let role = match claims.get(&self.roles_claim) {
            Some(Value::String(s)) => parse_role(s),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .filter_map(parse_role)
                .max(),
            _ => None,
        }
        .unwrap_or(self.default_role);
        let exp_secs = match claims.get("exp") {
            Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
            _ => None,
        }
        .ok_or_else(|| ApiError::unauthenticated("token has no `exp` claim"))?;
        Ok(ExternalIdentity {
            subject,
            display_name,
            role,
            expires_at: exp_secs.saturating_mul(1000),
        })
    }
}

fn parse_role(s: &str) -> Option<Role> {
    Role::parse(&s.trim().to_ascii_lowercase())
}

/// A display name from a token: one line, trimmed, cut to the profile limit, and
/// without invisible formatting characters (the application's name is cleaned,
/// not refused: its users should still get in).
fn clean_display_name(raw: &str) -> Option<String> {
    let visible: String = raw
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '\u{2028}' | '\u{2029}'))
        .collect();
    let visible = if validate::no_format_characters("name", &visible).is_ok() {
        visible
    } else {
        validate::strip_format_characters(&visible)
    };
    let name: String = visible
        .trim()
        .chars()
        .take(validate::DISPLAY_NAME_MAX_CHARS)
        .collect();
    let name = name.trim_end().to_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::settings::ExternalAuthSettings;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";
    const EXTERNAL_SECRET: &str = "external-app-secret-of-at-least-32-bytes!";

    fn settings(external: bool) -> AuthSettings {
        AuthSettings {
            external: ExternalAuthSettings {
                enabled: external,
                secret: EXTERNAL_SECRET.into(),
                issuer: "my-app".into(),
                ..ExternalAuthSettings::default()
            },
            ..AuthSettings::default()
        }
    }

    fn user(role: Role) -> UserRecord {
        UserRecord {
            id: UserId("u_alice".into()),
            username: Some("alice".into()),
            display_name: "Alice".into(),
            avatar_url: String::new(),
            bio: String::new(),
            role,
            password_hash: None,
            external_subject: None,
            created_at: 0,
        }
    }

    fn external_token(claims: &Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn now_secs() -> i64 {
        now_ms() / 1000
    }

    #[test]
    fn access_tokens_round_trip() {
        let keys = TokenKeys::new(SECRET.as_bytes(), &settings(false)).expect("keys");
        let (token, expires_at) = keys
            .sign_access(&user(Role::Member), &SessionId("s_1".into()), 900)
            .expect("sign");
        assert!(expires_at > now_ms());
        let claims = keys.verify_access(&token).expect("valid");
        assert_eq!(
            (
                claims.sub.as_str(),
                claims.sid.as_str(),
                claims.role.as_str()
            ),
            ("u_alice", "s_1", "member")
        );
        assert_eq!(
            (claims.iss.as_str(), claims.typ.as_str()),
            (TOKEN_ISSUER, ACCESS_TOKEN_TYPE)
        );
    }

    #[test]
    fn access_tokens_are_rejected_when_expired_forged_or_foreign() {
        let keys = TokenKeys::new(SECRET.as_bytes(), &settings(false)).expect("keys");
        let mut claims = AccessClaims {
            sub: "u_alice".into(),
            sid: "s_1".into(),
            role: "member".into(),
            iat: now_secs() - 100,
            exp: now_secs() - 10,
            iss: TOKEN_ISSUER.into(),
            typ: ACCESS_TOKEN_TYPE.into(),
        };
        let expired = keys.sign_claims(&claims).expect("sign");
        assert_eq!(keys.verify_access(&expired), Err(AccessRejection::Expired));

        claims.exp = now_secs() + 100;
        let other = TokenKeys::new(b"another-secret-another-secret-another", &settings(false))
            .expect("keys");
        assert_eq!(
            keys.verify_access(&other.sign_claims(&claims).expect("sign")),
            Err(AccessRejection::Invalid)
        );

        claims.typ = "refresh".into();
        assert_eq!(
            keys.verify_access(&keys.sign_claims(&claims).expect("sign")),
            Err(AccessRejection::Invalid)
        );

        claims.typ = ACCESS_TOKEN_TYPE.into();
        claims.iss = "someone-else".into();
        assert_eq!(
            keys.verify_access(&keys.sign_claims(&claims).expect("sign")),
            Err(AccessRejection::Invalid)
        );

        assert_eq!(
            keys.verify_access("not a token"),
            Err(AccessRejection::Invalid)
        );
    }

    #[test]
    fn external_claims_map_to_an_identity() {
        let keys = TokenKeys::new(SECRET.as_bytes(), &settings(true)).expect("keys");
        let external = keys.external.as_ref().expect("enabled");
        let exp = now_secs() + 600;

        let token = external_token(
            &json!({"sub": 42, "name": "  Bob\n ", "roles": ["guest", "admin", "pilot"], "iss": "my-app", "exp": exp}),
            EXTERNAL_SECRET,
        );
        let identity = external.verify(&token).expect("valid");
        assert_eq!(
            identity,
            ExternalIdentity {
                subject: "42".into(),
                display_name: "Bob".into(),
                role: Role::Admin,
                expires_at: exp * 1000
            }
        );

        let token = external_token(
            &json!({"sub": "ext-7", "roles": "Guest", "iss": "my-app", "exp": exp}),
            EXTERNAL_SECRET,
        );
        let identity = external.verify(&token).expect("valid");
        assert_eq!(
            (identity.display_name.as_str(), identity.role),
            ("ext-7", Role::Guest)
        );

        let token = external_token(
            &json!({"sub": "ext-8", "iss": "my-app", "exp": exp}),
            EXTERNAL_SECRET,
        );
        assert_eq!(external.verify(&token).expect("valid").role, Role::Member);
    }

    #[test]
    fn external_tokens_are_rejected_with_clear_messages() {
        let keys = TokenKeys::new(SECRET.as_bytes(), &settings(true)).expect("keys");
        let external = keys.external.as_ref().expect("enabled");
        let exp = now_secs() + 600;
        let message = |token: String| external.verify(&token).expect_err("rejected").message;

        let forged = external_token(
            &json!({"sub": "x", "iss": "my-app", "exp": exp}),
            "wrong-secret-wrong-secret-wrong-secret",
        );
        assert_eq!(message(forged), "invalid token signature");
        let expired = external_token(
            &json!({"sub": "x", "iss": "my-app", "exp": now_secs() - 60}),
            EXTERNAL_SECRET,
        );
        assert_eq!(message(expired), "token expired");
        let no_exp = external_token(&json!({"sub": "x", "iss": "my-app"}), EXTERNAL_SECRET);
        assert_eq!(message(no_exp), "token has no `exp` claim");
        let wrong_iss = external_token(
            &json!({"sub": "x", "iss": "other", "exp": exp}),
            EXTERNAL_SECRET,
        );
        assert_eq!(message(wrong_iss), "token issuer (iss) is not accepted");
        let no_sub = external_token(
            &json!({"sub": "", "iss": "my-app", "exp": exp}),
            EXTERNAL_SECRET,
        );
        let no_sub = message(no_sub);
        assert!(no_sub.contains("`sub`"), "{no_sub}");
    }

    #[test]
    fn display_names_from_tokens_are_cleaned() {
        assert_eq!(clean_display_name(" \t "), None);
        assert_eq!(clean_display_name("a\u{0}b"), Some("ab".into()));
        assert_eq!(
            clean_display_name("a\u{202E}b\u{200B}c"),
            Some("abc".into())
        );
        assert_eq!(clean_display_name("\u{200B}"), None);
        assert_eq!(
            clean_display_name(&"x".repeat(100)).map(|s| s.chars().count()),
            Some(64)
        );
    }
}
