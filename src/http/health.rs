//! `GET /healthz` (the process answers) and `GET /readyz` (the store answers too,
//! and the node is not draining: see [`crate::domain::drain`]). A node cut off from
//! the other nodes (Redis unreachable) still serves its clients: `/readyz` answers
//! `200 degraded: …` while it lasts, so that a cluster-wide Redis outage does not
//! take every node out of its load balancer.

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
        Ok(()) if !state.bus.linked() => HttpResponse::Ok()
            .content_type("text/plain")
            .insert_header(("X-Roomcast-Degraded", "broker"))
            .body(
                "degraded: not linked to the other nodes (Redis unreachable); serving local clients, events from other nodes arrive once relinked\n",
            ),
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
