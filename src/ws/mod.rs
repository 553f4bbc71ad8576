//! The WebSocket protocol (RFC 6455), owned by roomcast instead of the HTTP
//! library, so that every limit holds from the first byte a client sends:
//!
//! - [`frame`]: frame headers, parsed on their own so a declared length is checked
//!   before any payload is buffered; server frame headers; close codes.
//! - [`decoder`]: client bytes → messages, with every protocol rule and the close
//!   code each violation earns.
//! - [`handshake`]: the upgrade request's checks (method, headers, version, key,
//!   `Origin`) and the `101 Switching Protocols` answer.
//! - [`stream`]: the socket under a connection, plain TCP or TLS.
//! - [`transport`]: one upgraded socket as a reader stream, a non-blocking write
//!   handle with a byte-counted queue, and a writer that coalesces frames and
//!   gives up on peers that stopped reading.
//! - [`echo`]: an echo endpoint over the same code, for the Autobahn suite.
//!
//! [`crate::http::ws`] takes upgraded connections out of the HTTP/1 dispatcher and
//! hands them to [`crate::actors::connection::Connection`] through these pieces.

pub mod decoder;
pub mod echo;
pub mod frame;
pub mod handshake;
pub mod stream;
pub mod transport;
