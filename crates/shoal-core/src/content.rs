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

/// A content cut into chunks, with its name.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ChunkedContent {
    /// The content's name: [`ChunkedContent::name_of`] its chunks.
    pub hash: ContentHash,
    /// Total size.
    pub size: u64,
    /// The chunks in order; empty for empty content.
    pub chunks: Vec<ChunkRef>,
}

impl ChunkedContent {
    /// A content's name, from its chunk list. Content of one chunk (any file under 16 KiB) is
    /// named by that chunk, so by the BLAKE3 of its bytes, and empty content by the BLAKE3 of
    /// nothing. Longer content is named by a keyed BLAKE3 of each chunk's hash and length in
    /// order: the chunk hashes already bind every byte, so no pass over the whole content is
    /// needed to name it or to check a name, and a receiver checks a chunk list it is sent in
    /// microseconds.
    pub fn name_of(chunks: &[ChunkRef]) -> ContentHash {
        match chunks {
            [] => ContentHash::of(&[]),
            [only] => only.hash,
            _ => {
                let mut hasher = blake3::Hasher::new_derive_key("shoal content v1");
                for chunk in chunks {
                    hasher.update(&chunk.hash.0);
                    hasher.update(&chunk.len.to_le_bytes());
                }
                ContentHash(*hasher.finalize().as_bytes())
            }
        }
    }

    /// A content named from its chunks, with its size.
    pub fn from_chunks(chunks: Vec<ChunkRef>) -> ChunkedContent {
        ChunkedContent {
            hash: ChunkedContent::name_of(&chunks),
            size: chunks.iter().map(|c| u64::from(c.len)).sum(),
            chunks,
        }
    }

    /// Whether the name and size agree with the chunk list.
    pub fn is_consistent(&self) -> bool {
        self.hash == ChunkedContent::name_of(&self.chunks)
            && self.size == self.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>()
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, offset: u64, len: u32) -> ChunkRef {
        ChunkRef {
            hash: ContentHash::of(&[seed]),
            offset,
            len,
        }
    }

    #[test]
    fn small_content_is_named_by_its_bytes_and_longer_content_by_its_list() {
        assert_eq!(ChunkedContent::name_of(&[]), ContentHash::of(b""));
        let one = chunk(1, 0, 10);
        assert_eq!(ChunkedContent::name_of(&[one]), one.hash);
        let two = [one, chunk(2, 10, 20)];
        let named = ChunkedContent::from_chunks(two.to_vec());
        assert_eq!(named.size, 30);
        assert!(named.is_consistent());
        // Order, lengths and every chunk hash are all bound by the name.
        let swapped = [two[1], two[0]];
        let longer = [one, chunk(2, 10, 21)];
        let other = [one, chunk(3, 10, 20)];
        for list in [&swapped[..], &longer[..], &other[..], &two[..1]] {
            assert_ne!(ChunkedContent::name_of(list), named.hash, "{list:?}");
        }
        // The example in docs/protocol.md.
        let hex = |text: &str| {
            let mut out = [0u8; 32];
            for (i, byte) in out.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or_default();
            }
            ContentHash(out)
        };
        let mut offset = 0;
        let example: Vec<ChunkRef> = [
            (
                "2e780110f2bdcff21b6b8050137b3ee558bbe3e892098395888aec245b17ddbc",
                150_512,
            ),
            (
                "af5b2a9e5238c76fd0b2ce85674cdda56888d8ab4588b605c49a843053a0aece",
                149_345,
            ),
            (
                "92587deb9f02071a20e481c872dbebc48b42d37ca55192c8f3acf716fc83b538",
                143,
            ),
        ]
        .into_iter()
        .map(|(hash, len)| {
            let chunk = ChunkRef {
                hash: hex(hash),
                offset,
                len,
            };
            offset += u64::from(len);
            chunk
        })
        .collect();
        let example = ChunkedContent::from_chunks(example);
        assert_eq!(example.size, 300_000);
        assert_eq!(
            example.hash,
            hex("4c01c61434401aab73aed4617ffe6e7c950a84415096cf80743a28a54b9418c1")
        );
        let mut wrong_size = named.clone();
        wrong_size.size += 1;
        assert!(!wrong_size.is_consistent());
    }
}
