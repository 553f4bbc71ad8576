//! [`RetentionSweeper`]: removes history older than each room's retention, on a
//! fixed interval. Sequences are untouched, so a client resuming from before the
//! pruned range receives what is left (catch-up skips the removed part).

use std::time::Duration;

use actix::{
    fut::WrapFuture as _, Actor, ActorFutureExt as _, AsyncContext as _, Context, Supervised,
};

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
        ctx.spawn(
            async move { store.prune_expired_messages().await }
                .into_actor(self)
                .map(|result, act, _| {
                    act.running = false;
                    match result {
                        Ok(0) => {}
                        Ok(removed) => {
                            tracing::info!(removed, "pruned messages past their room's retention")
                        }
                        Err(e) => tracing::warn!(error = %e, "retention sweep failed; will retry"),
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
