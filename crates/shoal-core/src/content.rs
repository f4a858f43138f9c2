//! Content as chunks: how a file's bytes are named and cut, shared by every replica.
//!
//! The cut parameters are part of the protocol: changing them changes every chunk name. The
//! cutting itself (FastCDC over bytes) lives in the store; these are the values it produces.

use crate::item::ContentHash;

/// Smallest chunk FastCDC cuts (except the last chunk of a file).
pub const CHUNK_MIN: usize = 16 * 1024;
/// Target average chunk size.
pub const CHUNK_AVG: usize = 64 * 1024;
/// Largest chunk.
pub const CHUNK_MAX: usize = 256 * 1024;

/// One chunk of a content: its hash and where it sits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's bytes.
    pub hash: ContentHash,
    /// Offset in the content.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A content cut into chunks, with the hash of the whole.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ChunkedContent {
    /// BLAKE3 of the whole content.
    pub hash: ContentHash,
    /// Total size.
    pub size: u64,
    /// The chunks in order; empty for empty content.
    pub chunks: Vec<ChunkRef>,
}

impl ChunkedContent {
    /// Compact bytes for the metadata store: hash and length per chunk (offsets follow).
    pub fn encode_chunks(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.chunks.len() * 36);
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.hash.0);
            out.extend_from_slice(&chunk.len.to_le_bytes());
        }
        out
    }

    /// Rebuilds a chunk list from [`ChunkedContent::encode_chunks`].
    pub fn decode_chunks(hash: ContentHash, bytes: &[u8]) -> Option<ChunkedContent> {
        if !bytes.len().is_multiple_of(36) {
            return None;
        }
        let mut offset = 0u64;
        let mut chunks = Vec::with_capacity(bytes.len() / 36);
        for record in bytes.chunks_exact(36) {
            let mut hash_bytes = [0u8; 32];
            hash_bytes.copy_from_slice(&record[..32]);
            let len = u32::from_le_bytes([record[32], record[33], record[34], record[35]]);
            chunks.push(ChunkRef {
                hash: ContentHash(hash_bytes),
                offset,
                len,
            });
            offset += u64::from(len);
        }
        Some(ChunkedContent {
            hash,
            size: offset,
            chunks,
        })
    }
}
