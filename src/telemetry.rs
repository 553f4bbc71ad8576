//! Structured logging with `tracing`: human-readable text or JSON lines, filtered by
//! `RUST_LOG` when set, else by `log.level`.

use tracing_subscriber::{fmt, EnvFilter};

use crate::settings::LogSettings;

/// Installs the global subscriber; a second call (as in tests) is a no-op.
pub fn init(settings: &LogSettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if settings.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
