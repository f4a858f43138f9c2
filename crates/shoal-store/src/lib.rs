//! A shoal replica's durable state.
//!
//! Metadata lives in SQLite (bundled, WAL, synchronous commits; one transaction per applied
//! batch). Content is cut into BLAKE3-named chunks by content-defined chunking; a
//! [`ChunkStore`] keeps each chunk once on disk for replicas that hold content themselves.

mod chunks;
mod db;
mod direct;

pub use chunks::{
    ChunkError, ChunkStore, Located, OneWriter, chunk_bytes, chunk_reader, rechunk_reader,
    start_writeback,
};
pub use db::{
    ContentIndex, Identity, LocalFile, LocalRecords, LocalStat, Store, StoreError, Transaction,
};
pub use direct::{LargeFile, Piece};
pub use shoal_core::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkRef, ChunkedContent};
