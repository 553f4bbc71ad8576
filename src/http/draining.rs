//! While the node drains ([`crate::domain::drain`]), every HTTP reply closes its
//! connection (`Connection: close`). A reverse proxy's pooled keep-alive
//! connections to this node are thus closed by the node, each right after a
//! complete reply, before the node stops listening: the proxy never sends a
//! request on a pooled connection the node is about to drop. nginx does not retry
//! a POST that it had already sent, so that race would fail an RPC (see
//! docs/scaling.md); a refused new connection, by contrast, nginx passes to the
//! next node.

use actix_web::{
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::ConnectionType,
    middleware::Next,
    web, Error,
};

use crate::domain::AppState;

/// The middleware (see the module docs).
pub async fn close_keep_alive_while_draining(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let mut response = next.call(req).await?;
    // Asked when the reply is ready: a drain that began meanwhile counts.
    let draining = response
        .request()
        .app_data::<web::Data<AppState>>()
        .is_some_and(|state| state.drain.is_draining());
    if draining {
        response
            .response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
    }
    Ok(response)
}
