//! [`RetentionSweeper`]: removes history older than each room's retention, on a
//! fixed interval. Sequences are untouched, so a client resuming from before the
//! pruned range receives a `gap` frame naming exactly the removed range, then what
//! is left.

use std::time::Duration;

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, AsyncContext as _,
    Context, Supervised,
};

use super::supervision::catch_panic;
use crate::store::Store;

/// Prunes expired messages periodically.
pub struct RetentionSweeper {
    store: Store,
    interval: Duration,
    running: bool,
}

impl RetentionSweeper {
    pub fn new(store: Store, interval: Duration) -> Self {
        Self {
            store,
            interval,
            running: false,
        }
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        self.running = true;
        let store = self.store.clone();
        // A panic in the sweep stops the actor, which its supervisor restarts,
        // instead of silently ending every later sweep.
        ctx.spawn(
            catch_panic(async move { store.prune_expired_messages().await })
                .into_actor(self)
                .map(|result, act, ctx| {
                    act.running = false;
                    match result {
                        Ok(Ok(0)) => {}
                        Ok(Ok(removed)) => {
                            tracing::info!(removed, "pruned messages past their room's retention")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "retention sweep failed; will retry")
                        }
                        Err(panicked) => {
                            tracing::error!(error = %panicked, "retention sweep panicked; restarting the sweeper");
                            ctx.stop();
                        }
                    }
                }),
        );
    }
}

impl Actor for RetentionSweeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, |act, ctx| act.sweep(ctx));
    }
}

impl Supervised for RetentionSweeper {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.running = false;
    }
}
