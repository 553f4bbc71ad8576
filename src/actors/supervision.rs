//! Making an actor's failure visible to its supervisor. A panic inside a future an
//! actor spawned would otherwise drop the actor's whole task without `stopped()` and
//! without telling its `actix::Supervisor`: the actor is simply gone, and whoever
//! holds its address waits in vain. Futures run through [`catch_panic`] instead
//! report the panic, and the actor answers it with `ctx.stop()`, which its
//! supervisor sees and answers with a restart.

use std::{any::Any, future::Future, panic::AssertUnwindSafe};

use futures_util::FutureExt as _;

/// A future panicked; the payload's message, for the log.
#[derive(Debug, Clone)]
pub struct Panicked(pub String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "panicked: {}", self.0)
    }
}

/// Runs `fut` to completion, turning a panic while polling it into [`Panicked`].
///
/// The future's state is dropped after a panic and never polled again, so nothing
/// it half-changed is observed (the unwind-safety assertion rests on that); the
/// actor that spawned it restarts from its store.
pub async fn catch_panic<F: Future>(fut: F) -> Result<F::Output, Panicked> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|payload| Panicked(panic_message(payload.as_ref())))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
