//! Start-up and shutdown order: store (and migrations) → auth actors → room
//! registry → HTTP server. The HTTP server stops first on SIGTERM/SIGINT (finishing
//! in-flight requests), then the store's pool is closed.

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix::{Supervisor, SyncArbiter};
use actix_http::{HttpService, KeepAlive};
use actix_service::{map_config, IntoServiceFactory as _, ServiceFactoryExt as _};
use actix_web::{dev::AppConfig, middleware::from_fn, web, App};

use crate::{
    actors::{
        authenticator::{AuthPool, EnsureAdmin},
        commit_batcher::CommitBatcher,
        password_hasher::PasswordHasher,
        poll_hub::PollHub,
        retention::RetentionSweeper,
        room_registry::{AddWorkerArbiter, RoomRegistry},
        session_registry::SessionRegistry,
        user_session,
    },
    admission::{self, Admission},
    domain::{drain, AppState, SendLimiter},
    error::ApiError,
    http,
    settings::Settings,
    store::{Store, StoreError},
};

/// How long shutdown waits for user sessions to finish their presence writes.
const SESSION_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle keep-alive HTTP connection is closed after 5 s (actix-web's default).
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// How long a closing HTTP connection may take to shut down (actix-web's default).
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// File descriptors kept free of connections: the store's pool, logs, the
/// listener, files the process opens.
const RESERVED_FDS: usize = 64;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("auth: {0}")]
    Auth(#[from] ApiError),
    #[error("cannot listen on {addr} (server.listen): {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS (tls.cert_file, tls.key_file): {0}")]
    Tls(#[from] http::tls::TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::BrokerError),
    #[error("cluster.broker = \"redis\" links several nodes, which must share one PostgreSQL store; store.url is an SQLite file (one node only): set store.url to postgres://… or cluster.broker to \"local\"")]
    ClusterNeedsPostgres,
}

/// A started server.
pub struct Running {
    /// Completes when the HTTP server has stopped.
    pub server: actix_web::dev::Server,
    pub state: AppState,
    pub local_addr: std::net::SocketAddr,
    /// The server's TLS when configured: [`http::tls::Tls::reload`] reloads the
    /// certificate (SIGHUP does in [`serve`]).
    pub tls: Option<http::tls::Tls>,
}

/// Connects the store and applies migrations when configured.
pub async fn open_store(settings: &Settings) -> Result<Store, StoreError> {
    let store = Store::connect(&settings.store).await?;
    if settings.store.migrate_on_start {
        store.migrate().await?;
    }
    Ok(store)
}

/// Starts the actors that serve the API. Must run inside an actix `System`.
pub async fn start_state(settings: Arc<Settings>, store: Store) -> Result<AppState, StartError> {
    let shared = crate::cluster::BrokerKind::parse(&settings.cluster.broker)
        .is_some_and(crate::cluster::BrokerKind::is_shared);
    if shared && store.backend() == crate::store::Backend::Sqlite {
        return Err(StartError::ClusterNeedsPostgres);
    }
    // The broker first: rooms register their interest in it as they load.
    let bus = crate::cluster::start(&settings.cluster)?;
    let hasher_settings = settings.auth.clone();
    let hasher = SyncArbiter::start(settings.auth.hasher_threads, move || {
        PasswordHasher::new(&hasher_settings)
    });
    let auth = AuthPool::start(settings.clone(), store.clone(), hasher).await?;
    if !settings.auth.admin_username.is_empty() {
        auth.send(EnsureAdmin {
            username: settings.auth.admin_username.clone(),
            password: settings.auth.admin_password.clone(),
        })
        .await?;
    }
    if store.backend() == crate::store::Backend::Sqlite {
        // SQLite has one writer: rooms' group commits go through one batcher,
        // which stores what waits in one transaction (PostgreSQL commits rooms
        // concurrently, each in its own).
        CommitBatcher::start(store.clone(), settings.store.group_commit_max_messages);
    }
    let room_threads = std::thread::available_parallelism().map_or(2, usize::from);
    let rooms = RoomRegistry::new(store.clone(), settings.clone(), room_threads)
        .with_bus(bus.clone())
        .start_supervised();
    let hub_rooms = rooms.clone();
    let max_waiting = settings.poll.max_waiting_per_user;
    let hub_bus = bus.clone();
    let polls =
        Supervisor::start(move |_| PollHub::new(hub_rooms, max_waiting).with_bus(hub_bus.clone()));
    let sessions_store = store.clone();
    let sessions_rooms = rooms.clone();
    let sessions_polls = polls.clone().recipient();
    let sessions = Supervisor::start(move |_| {
        SessionRegistry::new(sessions_store, sessions_rooms, sessions_polls.clone())
    });
    let sweeper_store = store.clone();
    let sweep_every = Duration::from_secs(settings.rooms.retention_sweep_secs);
    let notification_retention = Duration::from_secs(settings.notifications.retention_secs);
    Supervisor::start(move |_| {
        RetentionSweeper::new(sweeper_store, sweep_every)
            .with_notification_retention(notification_retention)
    });
    let mut send_limiter = SendLimiter::new(
        settings.realtime.send_rate_per_sec,
        settings.realtime.send_burst,
    );
    // Users across nodes (crate::cluster::{control, presence, limits}).
    let presence = crate::cluster::start_users(&settings, &bus, &store, &sessions, &polls)?;
    if let Some(cluster_limit) = presence.1 {
        send_limiter = send_limiter.with_cluster(cluster_limit);
    }
    Ok(AppState {
        settings,
        store,
        auth,
        rooms,
        sessions,
        polls,
        send_limiter: Arc::new(send_limiter),
        drain: Arc::default(),
        bus,
        presence: presence.0,
    })
}

/// Starts everything on `listener`. Must run inside an actix `System`.
///
/// The HTTP service is built from actix-http's parts rather than actix-web's
/// `HttpServer`, for its upgrade hook: WebSocket upgrades leave the HTTP/1
/// dispatcher and run over roomcast's own framing ([`http::ws`]). In front of it,
/// [`http::accept`] applies the connection cap and the header timeout and serves
/// HTTP/2 prior-knowledge clients on the same port.
pub async fn start(settings: Settings, listener: TcpListener) -> Result<Running, StartError> {
    let settings = Arc::new(settings);
    // Before anything else: a certificate that cannot be served stops the start.
    let tls = http::tls::Tls::from_settings(&settings.tls)?;
    let store = open_store(&settings).await?;
    let state = start_state(settings.clone(), store).await?;
    crate::metrics::watch_store(&state.store);
    let local_addr = listener.local_addr()?;
    let admission = Admission::new(admission::Limits {
        max_connections: connection_cap(settings.server.max_connections),
        per_ip: settings.realtime.max_connections_per_ip,
        per_user: settings.realtime.max_connections_per_user,
        unauthenticated: settings.realtime.max_unauthenticated,
    });
    let header_timeout = Duration::from_millis(settings.server.header_timeout_ms);
    let request_timeout = Duration::from_millis(settings.server.request_timeout_ms);
    let workers = match settings.server.workers {
        0 => std::thread::available_parallelism().map_or(2, usize::from),
        n => n,
    };
    let metrics_listener =
        crate::metrics::bind_listener(&settings.metrics).map_err(|source| StartError::Listen {
            addr: settings.metrics.listen.clone(),
            source,
        })?;
    let builder = actix_server::Server::build();
    let shutdown_signal = builder.graceful_shutdown_signal();
    let app_state = state.clone();
    let acceptor = tls.as_ref().map(http::tls::Tls::acceptor);
    let mut builder = builder
        .workers(workers)
        .shutdown_timeout(settings.server.shutdown_timeout_secs)
        .disable_signals()
        .listen("roomcast", listener, move || {
            let app_state = app_state.clone();
            // This runs on each HTTP worker as it starts: rooms start on the
            // workers' arbiters, next to their connections.
            app_state
                .rooms
                .do_send(AddWorkerArbiter(actix::Arbiter::current()));
            let upgrade = http::ws::upgrade_service(http::ws::UpgradeContext {
                state: app_state.clone(),
                admission: admission.clone(),
            });
            let shutdown_signal = shutdown_signal.clone();
            let app = App::new()
                .app_data(web::Data::new(app_state.clone()))
                .app_data(web::Data::new(admission.clone()))
                .wrap(http::cors(&app_state.settings.cors))
                .wrap(from_fn(http::close_keep_alive_while_draining))
                .wrap(from_fn(http::request_context))
                .configure(|cfg| {
                    if app_state.settings.metrics.listen.is_empty() {
                        crate::metrics::configure(cfg, &app_state.settings.metrics);
                    }
                })
                .configure(http::configure)
                .into_factory()
                .map_err(|e: actix_web::Error| e.error_response());
            let service = HttpService::build();
            let service = if acceptor.is_some() {
                service.secure()
            } else {
                service
            };
            let service = service
                .graceful_shutdown_signal(move || {
                    let signal = shutdown_signal.clone();
                    async move { signal.notified().await }
                })
                .keep_alive(KeepAlive::Timeout(KEEP_ALIVE))
                // A client that closes its side has gone: its pending request (a
                // waiting long-poll) is dropped at once instead of running on.
                .h1_allow_half_closed(false)
                .client_request_timeout(header_timeout)
                .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
                .local_addr(local_addr)
                .upgrade(upgrade)
                .finish(map_config(app, |_| AppConfig::default()));
            http::accept::connection_service(
                service,
                admission.clone(),
                acceptor.clone(),
                header_timeout,
                header_timeout + request_timeout,
            )
        })
        .map_err(|e| StartError::Listen {
            addr: local_addr.to_string(),
            source: e,
        })?;
    if let Some(listener) = metrics_listener {
        let metrics = settings.metrics.clone();
        builder = builder.listen("metrics", listener, move || {
            crate::metrics::listener_service(metrics.clone())
        })?;
    }
    let server = builder.run();
    if let Some(tls) = &tls {
        let every = settings.tls.watch_interval_secs;
        if every > 0 {
            actix_web::rt::spawn(tls.clone().watch(Duration::from_secs(every)));
        }
    }
    tracing::info!(
        addr = %local_addr,
        tls = tls.is_some(),
        store = ?state.store.backend(),
        broker = state.bus.broker_name(),
        node = state.bus.node_id(),
        "roomcast listening"
    );
    Ok(Running {
        server,
        state,
        local_addr,
        tls,
    })
}

/// The connection cap in force: `configured`, lowered (with a warning) to fit the
/// open file limit less [`RESERVED_FDS`] after raising the soft limit as far as
/// the hard one allows.
fn connection_cap(configured: usize) -> usize {
    let Some(limit) = raise_fd_limit() else {
        return configured;
    };
    let fits = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(RESERVED_FDS)
        .max(1);
    if configured > fits {
        tracing::warn!(
            configured,
            open_file_limit = limit,
            effective = fits,
            "server.max_connections is above the open file limit (ulimit -n) less {RESERVED_FDS} \
             descriptors for the store and logs; lowering it"
        );
        return fits;
    }
    configured
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; the soft limit in force, or
/// `None` when it cannot be read (or is unlimited).
fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed in.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Runs until SIGTERM/SIGINT, then drains and closes the store.
pub async fn serve(settings: Settings) -> Result<(), StartError> {
    let addr = settings.server.listen;
    let listener = TcpListener::bind(addr).map_err(|source| StartError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    let running = start(settings, listener).await?;
    if let Some(tls) = running.tls.clone() {
        actix_web::rt::spawn(reload_on_sighup(tls));
    }
    let handle = running.server.handle();
    let state = running.state.clone();
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            "shutdown requested: closing live connections, finishing in-flight requests"
        );
        // The same drain as AdminService.DrainNode: not ready, no new WebSockets,
        // live ones get the "reconnect" close code instead of a dropped socket,
        // spread over server.drain_spread_ms; then the listener closes and the
        // requests in flight finish.
        drain::drain_for_shutdown(&state, "shutting down").await;
        handle.stop(true).await;
    });
    running.server.await?;
    // Connections closing announce their users offline through the store; let
    // those writes finish (bounded) before the pool closes.
    let drain_until = std::time::Instant::now() + SESSION_DRAIN_TIMEOUT;
    while user_session::live_sessions() > 0 && std::time::Instant::now() < drain_until {
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(
        unfinished_sessions = user_session::live_sessions(),
        "HTTP server stopped; closing the store"
    );
    running.state.auth.stop();
    running.state.store.close().await;
    Ok(())
}

/// Reloads the TLS certificate on every SIGHUP (a failed reload keeps the old one).
async fn reload_on_sighup(tls: http::tls::Tls) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS reloads only on file changes");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the TLS certificate");
            let _ = tls.reload();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tls;
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `roomcast user create`: creates an account through the auth actors.
pub async fn create_user(
    settings: Settings,
    username: String,
    password: String,
    display_name: Option<String>,
    admin: bool,
) -> Result<(), StartError> {
    use crate::{actors::authenticator::CreateUser, model::Role};
    let settings = Arc::new(settings);
    let store = open_store(&settings).await?;
    let state = start_state(settings, store).await?;
    let role = if admin { Role::Admin } else { Role::Member };
    let user = state
        .auth
        .send(CreateUser {
            username,
            password,
            display_name: display_name.unwrap_or_default(),
            role,
        })
        .await?;
    println!(
        "created user {} ({}) with role {}",
        user.username.unwrap_or_default(),
        user.id,
        user.role
    );
    state.store.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_fits_under_the_open_file_limit() {
        let Some(limit) = raise_fd_limit() else {
            return; // unlimited or unreadable: nothing to fit under
        };
        let cap = connection_cap(usize::MAX);
        assert!(cap as u64 <= limit.saturating_sub(RESERVED_FDS as u64).max(1));
        assert_eq!(connection_cap(1), 1, "a cap that fits is kept");
    }
}
