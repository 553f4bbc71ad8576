//! [`RetentionSweeper`]: removes history older than each room's retention, and
//! user notifications older than `notifications.retention_secs`, on a fixed
//! interval. Sequences are untouched, so a client resuming from before the pruned
//! range receives a `gap` frame naming exactly the removed range, then what is
//! left (a notification cursor simply skips the removed sequences).

use std::time::Duration;

use actix::{
    fut::WrapFuture as _, Actor, ActorContext as _, ActorFutureExt as _, AsyncContext as _,
    Context, Supervised,
};

use super::supervision::catch_panic;
use crate::{ids::now_ms, store::Store};

/// Prunes expired messages and notifications periodically.
pub struct RetentionSweeper {
    store: Store,
    interval: Duration,
    /// How long user notifications are kept; `None`: not swept here.
    notification_retention: Option<Duration>,
    running: bool,
}

impl RetentionSweeper {
    pub fn new(store: Store, interval: Duration) -> Self {
        Self {
            store,
            interval,
            notification_retention: None,
            running: false,
        }
    }

    /// Also removes user notifications older than `retention`. (Reads already
    /// skip them, and a user's insert removes that user's; the sweep removes them
    /// for users who receive nothing new.)
    pub fn with_notification_retention(mut self, retention: Duration) -> Self {
        self.notification_retention = Some(retention);
        self
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        self.running = true;
        let store = self.store.clone();
        let notifications_before = self.notification_retention.map(|keep| {
            now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX))
        });
        // A panic in the sweep stops the actor, which its supervisor restarts,
        // instead of silently ending every later sweep.
        ctx.spawn(
            catch_panic(async move {
                let messages = store.prune_expired_messages().await?;
                let notifications = match notifications_before {
                    Some(before) => store.prune_notifications_before(before).await?,
                    None => 0,
                };
                Ok::<_, crate::store::StoreError>((messages, notifications))
            })
            .into_actor(self)
            .map(|result, act, ctx| {
                act.running = false;
                match result {
                        Ok(Ok((0, 0))) => {}
                        Ok(Ok((messages, notifications))) => {
                            tracing::info!(
                                messages,
                                notifications,
                                "pruned messages and notifications past their retention"
                            )
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
