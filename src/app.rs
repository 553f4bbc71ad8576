//! Start-up and shutdown order: store (and migrations) → auth actors → room
//! registry → HTTP server. The HTTP server stops first on SIGTERM/SIGINT (finishing
//! in-flight requests), then the store's pool is closed.

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix::{Supervisor, SyncArbiter};
use actix_web::{middleware::from_fn, web, App, HttpServer};

use crate::{
    actors::{
        authenticator::{AuthPool, EnsureAdmin},
        password_hasher::PasswordHasher,
        retention::RetentionSweeper,
        room_registry::RoomRegistry,
        session_registry::{CloseAll, SessionRegistry},
        user_session,
    },
    domain::{AppState, SendLimiter},
    error::ApiError,
    http,
    settings::Settings,
    store::{Store, StoreError},
};

/// How long shutdown waits for user sessions to finish their presence writes.
const SESSION_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("auth: {0}")]
    Auth(#[from] ApiError),
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

/// A started server.
pub struct Running {
    /// Completes when the HTTP server has stopped.
    pub server: actix_web::dev::Server,
    pub state: AppState,
    pub local_addr: std::net::SocketAddr,
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
    let room_threads = std::thread::available_parallelism().map_or(2, usize::from);
    let rooms = RoomRegistry::new(store.clone(), settings.clone(), room_threads).start_supervised();
    let sessions_store = store.clone();
    let sessions_rooms = rooms.clone();
    let sessions = Supervisor::start(move |_| SessionRegistry::new(sessions_store, sessions_rooms));
    let sweeper_store = store.clone();
    let sweep_every = Duration::from_secs(settings.rooms.retention_sweep_secs);
    Supervisor::start(move |_| RetentionSweeper::new(sweeper_store, sweep_every));
    let send_limiter = Arc::new(SendLimiter::new(
        settings.realtime.send_rate_per_sec,
        settings.realtime.send_burst,
    ));
    Ok(AppState {
        settings,
        store,
        auth,
        rooms,
        sessions,
        send_limiter,
    })
}

/// Starts everything on `listener`. Must run inside an actix `System`.
pub async fn start(settings: Settings, listener: TcpListener) -> Result<Running, StartError> {
    let settings = Arc::new(settings);
    let store = open_store(&settings).await?;
    let state = start_state(settings.clone(), store).await?;
    let local_addr = listener.local_addr()?;
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(app_state.clone()))
            .wrap(http::cors(&app_state.settings.cors))
            .wrap(from_fn(http::request_context))
            .configure(http::configure)
    })
    .shutdown_timeout(settings.server.shutdown_timeout_secs)
    .disable_signals()
    .client_request_timeout(Duration::from_secs(30));
    if settings.server.workers > 0 {
        server = server.workers(settings.server.workers);
    }
    let server = server.listen(listener)?.run();
    tracing::info!(addr = %local_addr, store = ?state.store.backend(), "roomcast listening");
    Ok(Running {
        server,
        state,
        local_addr,
    })
}

/// Runs until SIGTERM/SIGINT, then drains and closes the store.
pub async fn serve(settings: Settings) -> Result<(), StartError> {
    let listener = TcpListener::bind(settings.server.listen)?;
    let running = start(settings, listener).await?;
    let handle = running.server.handle();
    let sessions = running.state.sessions.clone();
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            "shutdown requested: closing live connections, finishing in-flight requests"
        );
        // WebSocket clients get the "reconnect" close code instead of a dropped socket.
        let _ = sessions.send(CloseAll).await;
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
