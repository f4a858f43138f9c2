//! The shoal sync model: pure and deterministic.
//!
//! Replicas, items and their versions, knowledge, change enumeration in bounded batches,
//! conflict detection and resolution, and the tree layout every replica shows. Nothing here
//! touches a disk, a network, a clock or a random number generator: callers pass ids and
//! times in, so every function gives the same answer everywhere.

mod codec;
mod content;
mod ids;
mod item;
mod knowledge;
mod layout;
mod name;
mod replica;
mod sync;
mod vector;

pub use codec::{DecodeError, Decoder, Encoder};
pub use content::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkRef, ChunkedContent};
pub use ids::{Dot, Epoch, ItemId, ReplicaId, WriterId, parse_hex16};
pub use item::{ContentHash, Entry, ItemConflict, ItemKind, ItemState, MergeOutcome, Version};
pub use knowledge::{CompactKnowledge, Knowledge};
pub use layout::{Layout, LayoutNote, Placement, Role, layout};
pub use name::{
    NameError, STATE_DIR_NAME, TEMP_PREFIX, conflict_copy_name, split_extension, utc_stamp,
    validate_name,
};
pub use replica::{MemReplica, shown, sync_once};
pub use sync::{
    ApplyReport, Batch, BatchLimits, ItemAccess, Receiving, SyncOffer, apply_batch, dead_versions,
    entry_weight, missing_versions, plan_batches,
};
pub use vector::VersionVector;
