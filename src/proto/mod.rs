//! The protobuf API: the `.proto` files under `src/proto/roomcast/v1/` are the single
//! source of truth. `build.rs` compiles them into the prost types, the canonical
//! proto3 JSON mapping (pbjson) and a table of method names per service.

/// `roomcast.v1`: every message and service of the public API.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/roomcast.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/roomcast.v1.serde.rs"));
}
