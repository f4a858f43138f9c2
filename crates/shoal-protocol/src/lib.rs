//! The shoal sync protocol: every message that crosses the wire, as JSON, with conversions to
//! and from the core's domain types.
//!
//! This crate owns the wire format (the core's types know nothing of serde). Ids travel as
//! lowercase hex; knowledge travels as per-writer prefixes and exceptions. Conversions from
//! the wire validate everything, since the other side may be anyone. See `docs/protocol.md`.

mod convert;
mod delta;
mod messages;
mod plan;
pub mod routes;

pub use convert::{WireError, hex16, hex32, parse_hash, parse_item, parse_replica};
pub use delta::{DELTA_BASES, DELTA_MIN_CHUNKS};
pub use messages::*;
pub use plan::{
    CHUNK_BUNDLE_MAX, FRAME_HEADER, bundle_chunk, bundle_frame, bundle_frame_header, dot_path,
    frame_header, frame_len, parse_dot_path, parse_held, refusals_tag, unbundle_chunks,
    upload_batch, wire_batch, wire_batches,
};

/// The protocol version, sent as the `shoal-protocol` header.
pub const PROTOCOL_VERSION: u32 = 1;

/// Header names used on requests and responses.
pub mod headers {
    /// Protocol version the caller speaks.
    pub const PROTOCOL: &str = "shoal-protocol";
    /// The partnership: the caller's replica id and the workspace, "REPLICA@WORKSPACE".
    pub const PARTNERSHIP: &str = "shoal-partnership";
    /// The caller's replica id (hex).
    pub const REPLICA: &str = "shoal-replica";
    /// The caller replica's epoch.
    pub const EPOCH: &str = "shoal-epoch";
    /// The caller's device id (hex).
    pub const DEVICE: &str = "shoal-device";
    /// Ties the requests of one sync session together in logs.
    pub const CORRELATION: &str = "shoal-correlation";
    /// Set on every response: names this request in the server's logs.
    pub const REQUEST_ID: &str = "shoal-request-id";
}
