//! Structured logging with `tracing`: human-readable text or JSON lines, filtered by
//! `RUST_LOG` when set, else by `log.level`.

use std::io::IsTerminal as _;

use tracing_subscriber::{fmt, EnvFilter};

use crate::settings::LogSettings;

/// Installs the global subscriber; a second call (as in tests) is a no-op.
pub fn init(settings: &LogSettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_colour());
    let _ = if settings.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Colour codes only for a person at a terminal: a log written to a file, a pipe or
/// journald would carry them as garbage. `NO_COLOR` (https://no-color.org) turns
/// them off everywhere.
fn use_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
