//! Content-defined chunking and the chunk store.
//!
//! Content is cut at points chosen by the bytes themselves (FastCDC), so an edit in the middle
//! of a large file changes only the chunks around it; chunks are named by their BLAKE3 hash,
//! so identical chunks are stored and moved once. The cut parameters are part of the
//! protocol: changing them changes every chunk name, so they are frozen here.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use shoal_core::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkRef, ChunkedContent, ContentHash};

/// How much of a stream is cut at once. While one block is cut, the one before it is hashed on
/// the other cores; 4 MiB keeps both busy and the buffers small.
const BLOCK: usize = 4 << 20;

/// Below this, a block is hashed on the calling thread (thread hand-offs would cost more).
const PARALLEL_MIN: usize = 1 << 20;

/// A block read and cut, not yet hashed.
struct CutBlock {
    data: Vec<u8>,
    cuts: Vec<(usize, usize)>,
    /// The stream ended with this block, so its last chunk is final.
    end: bool,
}

impl CutBlock {
    /// The bytes covered by the cuts; the rest starts the next block.
    fn used(&self) -> usize {
        self.cuts.last().map_or(0, |(offset, len)| offset + len)
    }
}

/// Reads `reader` to the end, cutting a block at a time while the block before is hashed.
/// The cuts are those of `chunk_bytes` on the whole content: a chunk that reaches the end of a
/// block before the stream ends is carried into the next block and cut again there.
pub fn chunk_reader<R: Read + Send>(mut reader: R) -> io::Result<ChunkedContent> {
    let mut chunks = Vec::new();
    let mut base = 0u64;
    let mut current = read_and_cut(&mut reader, Vec::new())?;
    let mut spare = Vec::new();
    loop {
        let used = current.used();
        let (hashes, next) = if current.end {
            (hash_block(&current), None)
        } else {
            let mut tail = std::mem::take(&mut spare);
            tail.clear();
            tail.extend_from_slice(&current.data[used..]);
            let (hashes, next) =
                rayon::join(|| hash_block(&current), || read_and_cut(&mut reader, tail));
            (hashes, Some(next?))
        };
        for ((offset, len), hash) in current.cuts.iter().zip(hashes) {
            chunks.push(ChunkRef {
                hash,
                offset: base + *offset as u64,
                len: u32::try_from(*len).map_err(io::Error::other)?,
            });
        }
        base += used as u64;
        match next {
            Some(next) => spare = std::mem::replace(&mut current, next).data,
            None => break,
        }
    }
    Ok(ChunkedContent::from_chunks(chunks))
}

/// Cuts `reader` exactly as [`chunk_reader`] would, given the chunk list of an earlier version
/// of the same file (a large file edited in place). Where the earlier chunks still follow one
/// another, their bytes are only hashed to confirm them, several at once; cut points are
/// searched for only around what changed.
///
/// A FastCDC cut depends only on the bytes from its chunk's start up to and including the
/// first byte after it (the end of the data only bounds the search). So an earlier chunk is
/// taken as it was when its bytes and the next chunk's are unchanged (which settles that
/// first byte), or when it was the last and the data still ends where it did.
pub fn rechunk_reader<R: Read + Send>(
    mut reader: R,
    old: &ChunkedContent,
) -> io::Result<ChunkedContent> {
    let mut first_of: HashMap<ContentHash, usize> = HashMap::with_capacity(old.chunks.len());
    for (index, chunk) in old.chunks.iter().enumerate() {
        first_of.entry(chunk.hash).or_insert(index);
    }
    let mut state = Rechunk {
        old,
        first_of,
        // An empty earlier list has nothing to confirm (and a run of nothing would wait for
        // more data forever).
        guess: Some(0).filter(|_| !old.chunks.is_empty()),
        run_max: RUN_START,
        chunks: Vec::new(),
        base: 0,
    };
    let mut data = Vec::new();
    let mut end = fill(&mut reader, &mut data, BLOCK + CHUNK_MAX)?;
    loop {
        if end {
            state.block(&data, true)?;
            break;
        }
        // The next block is read while this one is cut and hashed.
        let mut next = Vec::new();
        let (used, read) = rayon::join(
            || state.block(&data, false),
            || fill(&mut reader, &mut next, BLOCK),
        );
        let used = used?;
        end = read?;
        data.drain(..used);
        data.extend_from_slice(&next);
    }
    Ok(ChunkedContent::from_chunks(state.chunks))
}

/// Earlier chunks hashed at once at the start of a run of unchanged ones; doubled while they
/// keep matching, up to `RUN_MAX`, so a changed region wastes little hashing.
const RUN_START: usize = 2;
const RUN_MAX: usize = 64;

struct Rechunk<'a> {
    old: &'a ChunkedContent,
    /// The first index of each earlier chunk.
    first_of: HashMap<ContentHash, usize>,
    /// The earlier chunk expected next, when the last one matched.
    guess: Option<usize>,
    run_max: usize,
    chunks: Vec<ChunkRef>,
    /// Where the current block starts in the stream.
    base: u64,
}

impl Rechunk<'_> {
    /// Cuts `data` as far as its cuts are certain; returns how many bytes were used (all of
    /// them when `end`, the stream having ended with this block).
    fn block(&mut self, data: &[u8], end: bool) -> io::Result<usize> {
        let used = self.cut_block(data, end)?;
        self.base += used as u64;
        Ok(used)
    }

    fn cut_block(&mut self, data: &[u8], end: bool) -> io::Result<usize> {
        let cdc = fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
        let mut at = 0;
        while at < data.len() {
            if let Some(first) = self.guess {
                match self.confirm_run(data, end, at, first)? {
                    Run::Taken(next) => {
                        at = next;
                        continue;
                    }
                    Run::NeedsMore(next) => return Ok(next),
                    Run::Changed(next) => at = next,
                }
                self.guess = None;
            }
            let left = data.len() - at;
            if !end && left <= CHUNK_MAX {
                return Ok(at);
            }
            let (_, cut) = cdc.cut(at, left);
            if !end && cut == data.len() {
                return Ok(at);
            }
            let hash = ContentHash::of(&data[at..cut]);
            self.push(at, cut - at, hash)?;
            self.guess = self
                .first_of
                .get(&hash)
                .map(|index| index + 1)
                .filter(|next| *next < self.old.chunks.len());
            self.run_max = RUN_START;
            at = cut;
        }
        Ok(at)
    }

    /// Hashes the earlier chunks from `first` that fit from `at` on, and takes those that are
    /// certain to be cut as before.
    fn confirm_run(&mut self, data: &[u8], end: bool, at: usize, first: usize) -> io::Result<Run> {
        use rayon::prelude::*;
        let mut run = Vec::new();
        let mut reach = at;
        for chunk in self.old.chunks[first..].iter().take(self.run_max) {
            let len = chunk.len as usize;
            if reach + len > data.len() {
                break;
            }
            run.push((reach, len));
            reach += len;
        }
        // More earlier chunks would have fitted: a longer run may confirm the last one.
        let limited_by_size =
            run.len() == self.run_max && first + run.len() < self.old.chunks.len();
        let hashes: Vec<ContentHash> = run
            .par_iter()
            .map(|&(offset, len)| ContentHash::of(&data[offset..offset + len]))
            .collect();
        let matched = hashes
            .iter()
            .zip(&self.old.chunks[first..])
            .take_while(|(hash, chunk)| **hash == chunk.hash)
            .count();
        for (index, &(offset, len)) in run.iter().enumerate().take(matched) {
            let earlier = first + index;
            let known = (data.len() - offset) as u64;
            let old_left = self.old.size - self.old.chunks[earlier].offset;
            // Whether the byte after it is as before (None: not known yet).
            let followed = if index + 1 < matched {
                Some(true)
            } else if index + 1 < run.len() {
                Some(false)
            } else if earlier + 1 == self.old.chunks.len() {
                if end || known > old_left {
                    Some(known == old_left)
                } else {
                    None
                }
            } else {
                None
            };
            match followed {
                Some(true) => self.push(offset, len, hashes[index])?,
                Some(false) => return Ok(Run::Changed(offset)),
                None => {
                    // Not known yet: a longer run from here, or the next block, settles it.
                    self.guess = Some(earlier);
                    return Ok(if limited_by_size && offset > at {
                        self.run_max = (self.run_max * 2).min(RUN_MAX);
                        Run::Taken(offset)
                    } else if end {
                        Run::Changed(offset)
                    } else {
                        Run::NeedsMore(offset)
                    });
                }
            }
        }
        if matched == run.len() && !run.is_empty() {
            self.guess = Some(first + run.len()).filter(|g| *g < self.old.chunks.len());
            self.run_max = (self.run_max * 2).min(RUN_MAX);
            return Ok(Run::Taken(reach));
        }
        let stop = run.get(matched).map_or(reach, |(offset, _)| *offset);
        if run.is_empty() && !end {
            return Ok(Run::NeedsMore(stop));
        }
        Ok(Run::Changed(stop))
    }

    fn push(&mut self, offset: usize, len: usize, hash: ContentHash) -> io::Result<()> {
        self.chunks.push(ChunkRef {
            hash,
            offset: self.base + offset as u64,
            len: u32::try_from(len).map_err(io::Error::other)?,
        });
        Ok(())
    }
}

/// How a run of earlier chunks went; each holds where the cutting goes on.
enum Run {
    /// All taken, or the last waits for a longer run.
    Taken(usize),
    /// Something changed here: cut points are searched for from here.
    Changed(usize),
    /// The data ends before it is known: the rest waits for the next block.
    NeedsMore(usize),
}

/// Fills `block` (which holds the previous block's uncut tail) and finds its cut points.
fn read_and_cut<R: Read>(reader: &mut R, mut block: Vec<u8>) -> io::Result<CutBlock> {
    let end = fill(reader, &mut block, BLOCK + CHUNK_MAX)?;
    let mut cuts = cut_points(&block);
    if !end
        && cuts
            .last()
            .is_some_and(|(offset, len)| offset + len == block.len())
    {
        // Cut short by the block's end, not the stream's: cut again with what follows.
        cuts.pop();
    }
    Ok(CutBlock {
        data: block,
        cuts,
        end,
    })
}

/// Below this, a block is cut on one thread.
const PARALLEL_CUT_MIN: usize = 2 << 20;

/// The (offset, length) of every chunk of `data`, as FastCDC cuts it from the start, the
/// last one ending at the end of `data`.
///
/// A large block is cut in two halves at once. A cut depends only on the bytes from its
/// chunk's start, so once the cuts from the start reach a chunk start that the second half's
/// own cuts also have, the rest of those are the true cuts; until then the cutting goes on
/// from the first half's end, one chunk at a time (content without cut points, such as zeros,
/// may never meet, and is then cut to the end that way).
fn cut_points(data: &[u8]) -> Vec<(usize, usize)> {
    let cdc = fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
    let cut_from = |mut at: usize, stop: &dyn Fn(usize) -> bool| {
        let mut cuts = Vec::new();
        while at < data.len() && !stop(at) {
            let (_, end) = cdc.cut(at, data.len() - at);
            cuts.push((at, end - at));
            at = end;
        }
        cuts
    };
    if data.len() < PARALLEL_CUT_MIN {
        return cut_from(0, &|_| false);
    }
    let middle = data.len() / 2;
    let (mut cuts, guessed) = rayon::join(
        || cut_from(0, &|at| at >= middle),
        || cut_from(middle, &|_| false),
    );
    let meets = |at: usize| {
        guessed
            .binary_search_by_key(&at, |(start, _)| *start)
            .is_ok()
    };
    let from = cuts.last().map_or(0, |(offset, len)| offset + len);
    cuts.extend(cut_from(from, &meets));
    if let Some(last) = cuts.last().map(|(offset, len)| offset + len)
        && let Ok(at) = guessed.binary_search_by_key(&last, |(start, _)| *start)
    {
        cuts.extend_from_slice(&guessed[at..]);
    }
    cuts
}

/// Hashes a cut block's chunks, on every core when the block is large.
fn hash_block(block: &CutBlock) -> Vec<ContentHash> {
    use rayon::prelude::*;
    let data = &block.data[..block.used()];
    let hash_of = |&(offset, len): &(usize, usize)| ContentHash::of(&data[offset..offset + len]);
    if data.len() < PARALLEL_MIN {
        block.cuts.iter().map(hash_of).collect()
    } else {
        block.cuts.par_iter().map(hash_of).collect()
    }
}

/// Reads into `block` until it holds `target` bytes or the stream ends (then true). The buffer
/// grows with what arrives, so a small file needs only a small one; `read_to_end` fills its
/// spare room without zeroing it first where the reader allows.
fn fill<R: Read>(reader: &mut R, block: &mut Vec<u8>, target: usize) -> io::Result<bool> {
    let Some(want) = target.checked_sub(block.len()).filter(|w| *w > 0) else {
        return Ok(false);
    };
    let read = reader.by_ref().take(want as u64).read_to_end(block)?;
    Ok(read < want)
}

/// Cuts an in-memory content.
pub fn chunk_bytes(bytes: &[u8]) -> ChunkedContent {
    let chunks = cut_points(bytes)
        .into_iter()
        .map(|(offset, len)| ChunkRef {
            hash: ContentHash::of(&bytes[offset..offset + len]),
            offset: offset as u64,
            len: len as u32,
        })
        .collect();
    ChunkedContent::from_chunks(chunks)
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
    /// The table of small chunks failed.
    #[error("chunk store database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A thread panicked while holding the table of small chunks.
    #[error("the chunk store's table was left locked by a failed thread")]
    Poisoned,
}

/// Chunks shorter than the smallest cut (a small file, or the tail of a larger one) are kept
/// in one table instead of a file each: creating a file and its inode costs far more than a
/// few kilobytes, and a first sync of many small files would create one per file.
const SMALL_BELOW: usize = CHUNK_MIN;

/// Chunks stored once each: small ones in one SQLite table (`small.db`), the others as files
/// named by their hash under one directory.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    root: PathBuf,
    small: Arc<Mutex<Connection>>,
}

impl ChunkStore {
    /// Opens (creating) a chunk store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ChunkStore, ChunkError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| ChunkError::Io {
            path: root.clone(),
            source,
        })?;
        let small = Connection::open(root.join("small.db"))?;
        // Commits are not synced one by one: `flush` (one syncfs) makes them durable before
        // any metadata refers to them; WAL with NORMAL still syncs before a checkpoint.
        small.pragma_update(None, "journal_mode", "WAL")?;
        small.pragma_update(None, "synchronous", "NORMAL")?;
        small.busy_timeout(std::time::Duration::from_secs(30))?;
        small.execute_batch(
            "CREATE TABLE IF NOT EXISTS small (hash BLOB PRIMARY KEY, bytes BLOB NOT NULL);",
        )?;
        Ok(ChunkStore {
            root,
            small: Arc::new(Mutex::new(small)),
        })
    }

    fn table(&self) -> Result<MutexGuard<'_, Connection>, ChunkError> {
        self.small.lock().map_err(|_| ChunkError::Poisoned)
    }

    /// A small chunk's bytes, if the table holds it.
    fn small_get(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, ChunkError> {
        Ok(self
            .table()?
            .prepare_cached("SELECT bytes FROM small WHERE hash = ?1")?
            .query_row([&hash.0[..]], |row| row.get(0))
            .optional()?)
    }

    fn path_of(&self, hash: &ContentHash) -> PathBuf {
        let name = hash.to_string();
        self.root.join(&name[..2]).join(&name[2..])
    }

    /// Whether the chunk is stored.
    pub fn contains(&self, hash: &ContentHash) -> bool {
        matches!(self.stored_len(hash), Ok(Some(_)))
    }

    /// The stored length of a chunk, if it is stored: a file cut short by a power cut before
    /// its flush shows here without reading it.
    pub fn stored_len(&self, hash: &ContentHash) -> Result<Option<u64>, ChunkError> {
        match self.small_len(hash)? {
            Some(len) => Ok(Some(len)),
            None => self.file_len(hash),
        }
    }

    /// As [`ChunkStore::stored_len`] for a chunk listed with length `len`, looked for only
    /// where a chunk of that length is kept: one lookup instead of two for a chunk that is
    /// missing (most of them, in a first upload).
    pub fn stored_len_listed(
        &self,
        hash: &ContentHash,
        len: u32,
    ) -> Result<Option<u64>, ChunkError> {
        if (len as usize) < SMALL_BELOW {
            self.small_len(hash)
        } else {
            self.file_len(hash)
        }
    }

    /// Whether a chunk listed with length `len` is stored (see
    /// [`ChunkStore::stored_len_listed`]).
    pub fn holds_listed(&self, hash: &ContentHash, len: u32) -> bool {
        matches!(self.stored_len_listed(hash, len), Ok(Some(_)))
    }

    fn small_len(&self, hash: &ContentHash) -> Result<Option<u64>, ChunkError> {
        let small: Option<i64> = self
            .table()?
            .prepare_cached("SELECT length(bytes) FROM small WHERE hash = ?1")?
            .query_row([&hash.0[..]], |row| row.get(0))
            .optional()?;
        Ok(small.map(i64::unsigned_abs))
    }

    fn file_len(&self, hash: &ContentHash) -> Result<Option<u64>, ChunkError> {
        let path = self.path_of(hash);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// Stores bytes the caller has already checked against `hash` (as `unbundle_chunks` does),
    /// without hashing them again; otherwise as [`ChunkStore::put`].
    pub fn put_checked(&self, hash: &ContentHash, bytes: &[u8]) -> Result<bool, ChunkError> {
        Ok(self.put_many_checked(&[(*hash, bytes)])? == 1)
    }

    /// Stores many checked chunks (a bundle), the small ones in one transaction. Returns how
    /// many were new.
    pub fn put_many_checked(&self, chunks: &[(ContentHash, &[u8])]) -> Result<usize, ChunkError> {
        let (small, large): (Vec<_>, Vec<_>) =
            chunks.iter().partition(|(_, b)| b.len() < SMALL_BELOW);
        let mut stored = 0;
        if !small.is_empty() {
            let mut table = self.table()?;
            let tx = table.transaction()?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT OR IGNORE INTO small (hash, bytes) VALUES (?1, ?2)")?;
                for (hash, bytes) in small {
                    stored += insert.execute(params![&hash.0[..], bytes])?;
                }
            }
            tx.commit()?;
        }
        for (hash, bytes) in large {
            if self.put_file(&hash, bytes)? {
                stored += 1;
            }
        }
        Ok(stored)
    }

    /// Stores a large chunk as a file of its own, visible only complete (temp file, rename).
    fn put_file(&self, hash: &ContentHash, bytes: &[u8]) -> Result<bool, ChunkError> {
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

    /// Stores bytes that must hash to `hash`; storing a chunk twice is a no-op. The chunk
    /// becomes visible only complete (temp file, rename); it is durable after the next
    /// [`ChunkStore::flush`], so many chunks cost one flush instead of one fsync each.
    pub fn put(&self, hash: &ContentHash, bytes: &[u8]) -> Result<bool, ChunkError> {
        if ContentHash::of(bytes) != *hash {
            return Err(ChunkError::Mismatch(*hash));
        }
        self.put_checked(hash, bytes)
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
        if let Some(bytes) = self.small_get(hash)? {
            return Ok(Some(bytes));
        }
        let path = self.path_of(hash);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// Reads a chunk, checking it still matches its name. A chunk found corrupt is removed,
    /// so the next upload that needs it is asked for it again.
    pub fn get(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, ChunkError> {
        if let Some(bytes) = self.small_get(hash)? {
            if ContentHash::of(&bytes) == *hash {
                return Ok(Some(bytes));
            }
            self.remove(hash)?;
            return Err(ChunkError::Corrupt(*hash));
        }
        let path = self.path_of(hash);
        match fs::read(&path) {
            Ok(bytes) if ContentHash::of(&bytes) == *hash => Ok(Some(bytes)),
            Ok(_) => {
                self.remove(hash)?;
                Err(ChunkError::Corrupt(*hash))
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// Removes a chunk (when nothing refers to it any more).
    pub fn remove(&self, hash: &ContentHash) -> Result<(), ChunkError> {
        self.table()?
            .prepare_cached("DELETE FROM small WHERE hash = ?1")?
            .execute([&hash.0[..]])?;
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

    /// FastCDC's own cuts, one after the other from the start.
    fn cut_in_sequence(data: &[u8]) -> Vec<(usize, usize)> {
        fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
            .map(|c| (c.offset, c.length))
            .collect()
    }

    #[test]
    fn cutting_both_halves_at_once_finds_the_cuts_made_in_sequence() {
        let random = pseudo_random(9 << 20, 7);
        let mut runs = random.clone();
        // Long stretches with no cut point in them, where the halves may never meet.
        runs[(3 << 20)..(6 << 20)].fill(0);
        let mut repeated = Vec::new();
        while repeated.len() < (5 << 20) + 12_345 {
            repeated.extend_from_slice(&random[..300_007]);
        }
        let zeros = vec![0u8; (4 << 20) + 3];
        for (name, data) in [
            ("random", &random[..]),
            ("random, odd length", &random[..(6 << 20) + 77]),
            (
                "just over the parallel size",
                &random[..PARALLEL_CUT_MIN + 1],
            ),
            ("zero runs", &runs[..]),
            ("repeated", &repeated[..]),
            ("zeros", &zeros[..]),
            ("small", &random[..100_000]),
            ("empty", &random[..0]),
        ] {
            assert_eq!(cut_points(data), cut_in_sequence(data), "{name}");
        }
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

    /// Reads at most a few bytes per call, as a pipe or socket might.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(self.1).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// `edited` cut with the help of `original`'s list, read whole and in dribbles, must be
    /// cut exactly as it is from scratch.
    fn assert_recut_as_from_scratch(original: &[u8], edited: &[u8], what: &str) {
        let old = chunk_bytes(original);
        let expected = chunk_bytes(edited);
        assert_eq!(
            rechunk_reader(edited, &old).ok(),
            Some(expected.clone()),
            "{what}"
        );
        assert_eq!(
            rechunk_reader(Trickle(edited, 700_001), &old).ok(),
            Some(expected),
            "{what}, trickled"
        );
    }

    #[test]
    fn an_edited_file_is_recut_as_it_would_be_from_scratch() {
        let original = pseudo_random(3 * BLOCK + 54_321, 21);
        let old = chunk_bytes(&original);
        let middle = original.len() / 2;
        let mut cases: Vec<(&str, Vec<u8>)> = vec![("unchanged", original.clone())];
        let mut overwritten = original.clone();
        overwritten[middle..middle + (1 << 20)].copy_from_slice(&pseudo_random(1 << 20, 22));
        cases.push(("a MiB overwritten", overwritten));
        // The first byte after a chunk decides its cut: change exactly those bytes.
        for pick in [1, old.chunks.len() / 2, old.chunks.len() - 1] {
            let mut at_cut = original.clone();
            at_cut[old.chunks[pick].offset as usize] ^= 0x5a;
            cases.push(("the byte at a cut", at_cut.clone()));
            at_cut = original.clone();
            at_cut[old.chunks[pick].offset as usize - 1] ^= 0x5a;
            cases.push(("the byte before a cut", at_cut));
        }
        let mut inserted = original.clone();
        inserted.splice(middle..middle, pseudo_random(777, 23));
        cases.push(("bytes inserted", inserted));
        let mut removed = original.clone();
        removed.drain(middle..middle + 50_000);
        cases.push(("bytes removed", removed));
        let mut appended = original.clone();
        appended.extend(pseudo_random(100_000, 24));
        cases.push(("bytes appended", appended));
        let mut grown_a_little = original.clone();
        grown_a_little.push(7);
        cases.push(("one byte appended", grown_a_little));
        for cut in [1, 1000, CHUNK_AVG - 1, CHUNK_AVG + 1, 2 * CHUNK_MAX] {
            cases.push(("the end cut off", original[..original.len() - cut].to_vec()));
        }
        let mut prepended = pseudo_random(5, 25);
        prepended.extend_from_slice(&original);
        cases.push(("bytes prepended", prepended));
        cases.push(("all new", pseudo_random(original.len(), 26)));
        cases.push(("emptied", Vec::new()));
        for (what, edited) in &cases {
            assert_recut_as_from_scratch(&original, edited, what);
        }
        assert_recut_as_from_scratch(&[], &original, "once empty");
        // Repeated content (one chunk name at many places), and zeros (no cut points).
        let unit = pseudo_random(300_000, 27);
        let repeated: Vec<u8> = unit.iter().copied().cycle().take(5 * BLOCK).collect();
        let mut edited = repeated.clone();
        edited[2 * BLOCK] ^= 1;
        assert_recut_as_from_scratch(&repeated, &edited, "repeated content");
        let zeros = vec![0u8; BLOCK + 3 * CHUNK_MAX];
        let mut edited = zeros.clone();
        edited[BLOCK] = 1;
        assert_recut_as_from_scratch(&zeros, &edited, "zeros");
        assert_recut_as_from_scratch(&zeros, &zeros[..zeros.len() - 10], "zeros cut short");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn random_edits_are_recut_as_from_scratch(
            size in 0usize..(2 * BLOCK),
            seed in 0u64..1000,
            edits in proptest::collection::vec((0.0f64..1.0, 0usize..3, 0usize..200_000), 0..4),
        ) {
            let original = pseudo_random(size, seed);
            let mut edited = original.clone();
            for (place, kind, len) in edits {
                let at = (place * edited.len() as f64) as usize;
                let fresh = pseudo_random(len, seed + len as u64);
                match kind {
                    0 => {
                        let end = (at + len).min(edited.len());
                        edited[at..end].copy_from_slice(&fresh[..end - at]);
                    }
                    1 => {
                        edited.splice(at..at, fresh);
                    }
                    _ => {
                        edited.drain(at..(at + len).min(edited.len()));
                    }
                }
            }
            let old = chunk_bytes(&original);
            proptest::prop_assert_eq!(
                rechunk_reader(&edited[..], &old).ok(),
                Some(chunk_bytes(&edited))
            );
        }
    }

    #[test]
    fn reading_in_blocks_cuts_as_the_whole_content_is_cut() {
        // Sizes around the block boundary and several blocks, read whole or in dribbles.
        let sizes = [
            0,
            1,
            CHUNK_MIN - 1,
            BLOCK - 1,
            BLOCK,
            BLOCK + CHUNK_MAX + 1,
            3 * BLOCK + 12345,
        ];
        for (seed, size) in sizes.into_iter().enumerate() {
            let data = pseudo_random(size, seed as u64 + 3);
            let expected = chunk_bytes(&data);
            assert_eq!(
                chunk_reader(&data[..]).ok(),
                Some(expected.clone()),
                "size {size}"
            );
            assert_eq!(
                chunk_reader(Trickle(&data, 100_003)).ok(),
                Some(expected),
                "size {size}"
            );
        }
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
    fn small_chunks_live_in_the_table_and_large_ones_in_files()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let small = pseudo_random(4096, 1);
        let large = pseudo_random(CHUNK_MIN, 2);
        let (small_hash, large_hash) = (ContentHash::of(&small), ContentHash::of(&large));
        {
            let store = ChunkStore::open(dir.path())?;
            let bundle = [(small_hash, &small[..]), (large_hash, &large[..])];
            assert_eq!(store.put_many_checked(&bundle)?, 2);
            assert_eq!(store.put_many_checked(&bundle)?, 0, "stored twice");
            assert!(!store.path_of(&small_hash).exists());
            assert!(store.path_of(&large_hash).is_file());
            store.flush()?;
        }
        // Reopened: both still there, checked on the way out.
        let store = ChunkStore::open(dir.path())?;
        assert!(store.contains(&small_hash) && store.contains(&large_hash));
        assert_eq!(store.stored_len(&small_hash)?, Some(4096));
        // Listed with their lengths, each is looked for where its length puts it.
        assert!(store.holds_listed(&small_hash, 4096));
        assert!(store.holds_listed(&large_hash, CHUNK_MIN as u32));
        assert!(!store.holds_listed(&small_hash, CHUNK_MIN as u32));
        assert!(!store.holds_listed(&large_hash, 4096));
        assert_eq!(store.get(&small_hash)?, Some(small.clone()));
        assert_eq!(store.get(&large_hash)?, Some(large));
        // A small chunk that rotted in the table is dropped when found.
        store.table()?.execute(
            "UPDATE small SET bytes = ?1 WHERE hash = ?2",
            params![&b"rot"[..], &small_hash.0[..]],
        )?;
        assert!(matches!(
            store.get(&small_hash),
            Err(ChunkError::Corrupt(_))
        ));
        assert!(!store.contains(&small_hash));
        assert!(store.put(&small_hash, &small)?);
        store.remove(&small_hash)?;
        assert_eq!(store.get_unchecked(&small_hash)?, None);
        Ok(())
    }

    #[test]
    fn chunks_are_stored_once_and_verified() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = ChunkStore::open(dir.path())?;
        let bytes = &pseudo_random(CHUNK_MIN + 10, 3)[..];
        let hash = ContentHash::of(bytes);
        assert!(store.put(&hash, bytes)?);
        assert!(!store.put(&hash, bytes)?);
        assert_eq!(store.get(&hash)?, Some(bytes.to_vec()));
        assert!(matches!(
            store.put(&hash, b"other"),
            Err(ChunkError::Mismatch(_))
        ));
        assert_eq!(store.stored_len(&hash)?, Some(bytes.len() as u64));
        fs::write(store.path_of(&hash), b"rot")?;
        assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt(_))));
        // Dropped when found, so an upload sends it again.
        assert_eq!(store.stored_len(&hash)?, None);
        assert_eq!(store.get(&hash)?, None);
        Ok(())
    }
}
