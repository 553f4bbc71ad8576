//! Making an actor's failure visible to its supervisor. A panic inside a future an
//! actor spawned would otherwise drop the actor's whole task without `stopped()` and
//! without telling its `actix::Supervisor`: the actor is simply gone, and whoever
//! holds its address waits in vain. Futures run through [`catch_panic`] instead
//! report the panic, and the actor answers it with `ctx.stop()`, which its
//! supervisor sees and answers with a restart. Handler bodies run through
//! [`guarded`] get the same treatment for a panic in the handler itself.

use std::{any::Any, future::Future, panic::AssertUnwindSafe};

use actix::{Actor, ActorContext as _, Context};
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

/// Runs a handler's body; a panic in it stops the actor (so its supervisor
/// restarts it) instead of dropping the actor's task, and the message is answered
/// with `fallback`.
pub fn guarded<A, R>(
    act: &mut A,
    ctx: &mut Context<A>,
    fallback: impl FnOnce() -> R,
    body: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> R
where
    A: Actor<Context = Context<A>>,
{
    match std::panic::catch_unwind(AssertUnwindSafe(|| body(&mut *act, &mut *ctx))) {
        Ok(result) => result,
        Err(payload) => {
            tracing::error!(
                actor = std::any::type_name::<A>(),
                error = %panic_message(payload.as_ref()),
                "actor handler panicked; stopping it so that its supervisor restarts it"
            );
            ctx.stop();
            fallback()
        }
    }
}

/// An actor future (what `ResponseActFuture` handlers return; it runs on the
/// actor's own task) whose panic stops the actor, so its supervisor restarts it,
/// and resolves to `fallback()` for the caller waiting on it.
pub struct StopOnPanic<F, G> {
    inner: F,
    fallback: Option<G>,
}

/// Wraps `fut`; see [`StopOnPanic`].
pub fn stop_on_panic<F, G>(fut: F, fallback: G) -> StopOnPanic<F, G> {
    StopOnPanic {
        inner: fut,
        fallback: Some(fallback),
    }
}

impl<A, F, G> actix::ActorFuture<A> for StopOnPanic<F, G>
where
    A: Actor<Context = Context<A>>,
    F: actix::ActorFuture<A> + Unpin,
    G: FnOnce() -> F::Output + Unpin,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        act: &mut A,
        ctx: &mut Context<A>,
        task: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.get_mut();
        if this.fallback.is_none() {
            // Already answered with the fallback after a panic: never poll the
            // panicked future again.
            return std::task::Poll::Pending;
        }
        let inner = &mut this.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            std::pin::Pin::new(&mut *inner).poll(&mut *act, &mut *ctx, task)
        })) {
            Ok(poll) => poll,
            Err(payload) => {
                tracing::error!(
                    actor = std::any::type_name::<A>(),
                    error = %panic_message(payload.as_ref()),
                    "actor future panicked; stopping the actor so that its supervisor restarts it"
                );
                ctx.stop();
                let fallback = this.fallback.take().expect("checked above");
                std::task::Poll::Ready(fallback())
            }
        }
    }
}
