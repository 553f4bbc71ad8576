//! `GET /healthz` (the process answers) and `GET /readyz` (the store answers too,
//! and the node is not draining: see [`crate::domain::drain`]).

use actix_web::{web, HttpResponse};

use crate::domain::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if let Some(reason) = state.drain.reason() {
        return HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("draining: {reason}\n"));
    }
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            HttpResponse::ServiceUnavailable()
                .content_type("text/plain")
                .body("store unavailable\n")
        }
    }
}
