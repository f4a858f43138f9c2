//! Content-defined chunking and the chunk store.
//!
//! Content is cut at points chosen by the bytes themselves (FastCDC), so an edit in the middle
//! of a large file changes only the chunks around it; chunks are named by their BLAKE3 hash,
//! so identical chunks are stored and moved once. The cut parameters are part of the
//! protocol: changing them changes every chunk name, so they are frozen here.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use shoal_core::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkRef, ChunkedContent, ContentHash};

/// Reads `reader` to the end, cutting and hashing as it goes.
pub fn chunk_reader<R: Read>(reader: R) -> io::Result<ChunkedContent> {
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut size = 0u64;
    for chunk in fastcdc::v2020::StreamCDC::new(reader, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
        let chunk = chunk.map_err(|error| match error {
            fastcdc::v2020::Error::IoError(io) => io,
            other => io::Error::other(other.to_string()),
        })?;
        whole.update(&chunk.data);
        let len = u32::try_from(chunk.length).map_err(io::Error::other)?;
        chunks.push(ChunkRef {
            hash: ContentHash::of(&chunk.data),
            offset: chunk.offset,
            len,
        });
        size += u64::from(len);
    }
    Ok(ChunkedContent {
        hash: ContentHash(*whole.finalize().as_bytes()),
        size,
        chunks,
    })
}

/// Cuts an in-memory content.
pub fn chunk_bytes(bytes: &[u8]) -> ChunkedContent {
    let mut chunks = Vec::new();
    for chunk in fastcdc::v2020::FastCDC::new(bytes, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
        let data = &bytes[chunk.offset..chunk.offset + chunk.length];
        chunks.push(ChunkRef {
            hash: ContentHash::of(data),
            offset: chunk.offset as u64,
            len: chunk.length as u32,
        });
    }
    ChunkedContent {
        hash: ContentHash::of(bytes),
        size: bytes.len() as u64,
        chunks,
    }
}

/// Why the chunk store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// Reading or writing the store's directory failed.
    #[error("chunk store I/O at {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A stored chunk no longer matches its name (disk corruption).
    #[error("chunk {0} is corrupt")]
    Corrupt(ContentHash),
    /// Bytes offered under a hash they do not have.
    #[error("chunk bytes do not match the hash {0}")]
    Mismatch(ContentHash),
}

/// Chunks stored once each, as files named by their hash under one directory.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    root: PathBuf,
}

impl ChunkStore {
    /// Opens (creating) a chunk store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ChunkStore, ChunkError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| ChunkError::Io {
            path: root.clone(),
            source,
        })?;
        Ok(ChunkStore { root })
    }

    fn path_of(&self, hash: &ContentHash) -> PathBuf {
        let name = hash.to_string();
        self.root.join(&name[..2]).join(&name[2..])
    }

    /// Whether the chunk is stored.
    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.path_of(hash).is_file()
    }

    /// Stores bytes that must hash to `hash`; storing a chunk twice is a no-op. The chunk
    /// becomes visible only complete (temp file, rename); it is durable after the next
    /// [`ChunkStore::flush`], so many chunks cost one flush instead of one fsync each.
    pub fn put(&self, hash: &ContentHash, bytes: &[u8]) -> Result<bool, ChunkError> {
        if ContentHash::of(bytes) != *hash {
            return Err(ChunkError::Mismatch(*hash));
        }
        let path = self.path_of(hash);
        if path.is_file() {
            return Ok(false);
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ChunkError::Io { path, source }
        };
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(io(dir))?;
        let temp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut file = fs::File::create(&temp).map_err(io(&temp))?;
        file.write_all(bytes).map_err(io(&temp))?;
        fs::rename(&temp, &path).map_err(io(&path))?;
        Ok(true)
    }

    /// Makes every chunk stored so far durable: one file-system flush. Call it before
    /// committing metadata that refers to the chunks.
    pub fn flush(&self) -> Result<(), ChunkError> {
        let io = |source| ChunkError::Io {
            path: self.root.clone(),
            source,
        };
        let dir = fs::File::open(&self.root).map_err(io)?;
        rustix::fs::syncfs(&dir).map_err(|e| io(e.into()))
    }

    /// A chunk's bytes without checking them: only for a caller that checks them another way
    /// (the hash of a whole content covers every chunk in it).
    pub fn get_unchecked(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, ChunkError> {
        let path = self.path_of(hash);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// Reads a chunk, checking it still matches its name.
    pub fn get(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, ChunkError> {
        let path = self.path_of(hash);
        match fs::read(&path) {
            Ok(bytes) if ContentHash::of(&bytes) == *hash => Ok(Some(bytes)),
            Ok(_) => Err(ChunkError::Corrupt(*hash)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// Removes a chunk (when nothing refers to it any more).
    pub fn remove(&self, hash: &ContentHash) -> Result<(), ChunkError> {
        let path = self.path_of(hash);
        match fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(ChunkError::Io {
                path,
                source: error,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn cut_points_are_frozen() {
        // A golden test: if this changes, every chunk name in every store changes.
        let data = pseudo_random(1 << 20, 42);
        let cuts: Vec<u64> = chunk_bytes(&data).chunks.iter().map(|c| c.offset).collect();
        assert_eq!(
            cuts,
            vec![
                0, 106980, 176072, 213274, 298025, 317763, 364888, 457990, 591077, 632188, 660427,
                705348, 788501, 867952, 889228, 910410
            ]
        );
        assert_eq!(chunk_reader(&data[..]).ok(), Some(chunk_bytes(&data)));
    }

    #[test]
    fn an_edit_in_the_middle_changes_few_chunks() {
        let mut data = pseudo_random(4 << 20, 7);
        let before = chunk_bytes(&data);
        data[2 << 20..(2 << 20) + 1000].fill(0);
        let after = chunk_bytes(&data);
        let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
        let changed = after
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .count();
        assert!(changed <= 3, "{changed} chunks changed");
        let decoded = ChunkedContent::decode_chunks(after.hash, &after.encode_chunks());
        assert_eq!(decoded, Some(after));
    }

    #[test]
    fn chunks_are_stored_once_and_verified() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = ChunkStore::open(dir.path())?;
        let bytes = b"hello chunk";
        let hash = ContentHash::of(bytes);
        assert!(store.put(&hash, bytes)?);
        assert!(!store.put(&hash, bytes)?);
        assert_eq!(store.get(&hash)?, Some(bytes.to_vec()));
        assert!(matches!(
            store.put(&hash, b"other"),
            Err(ChunkError::Mismatch(_))
        ));
        fs::write(store.path_of(&hash), b"rot")?;
        assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt(_))));
        store.remove(&hash)?;
        assert_eq!(store.get(&hash)?, None);
        Ok(())
    }
}
