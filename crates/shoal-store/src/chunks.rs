//! Content-defined chunking and the chunk store.
//!
//! Content is cut at points chosen by the bytes themselves (FastCDC), so an edit in the middle
//! of a large file changes only the chunks around it; chunks are named by their BLAKE3 hash,
//! so identical chunks are stored and moved once. The cut parameters are part of the
//! protocol: changing them changes every chunk name, so they are frozen here.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
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
///
/// `expected_len` (the file's length when known, else 0) sizes the first buffer: one grown
/// from nothing takes a read per doubling, nine reads for a 4 KiB file instead of two.
pub fn chunk_reader<R: Read + Send>(
    mut reader: R,
    expected_len: u64,
) -> io::Result<ChunkedContent> {
    let mut chunks = Vec::new();
    let mut base = 0u64;
    let first = Vec::with_capacity(expected_len.min((BLOCK + CHUNK_MAX) as u64) as usize);
    let mut current = read_and_cut(&mut reader, first)?;
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
    // One buffer for every further block: a fresh one is faulted in a page at a time while
    // the kernel copies into it.
    let mut next = Vec::new();
    if !end {
        next.reserve_exact(BLOCK);
    }
    loop {
        if end {
            state.block(&data, true)?;
            break;
        }
        // The next block is read while this one is cut and hashed.
        next.clear();
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

/// Starts writing a range of `file` to disk without waiting for it, so the disk works while
/// the rest of the content arrives and the flush that makes it durable finds little left to
/// write.
#[allow(unsafe_code)]
pub fn start_writeback(file: &fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is borrowed from a live File for the whole call; the call only
    // queues writeback and touches no memory of this process. A failure only means the
    // next flush writes the range instead.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Lets threads writing one file in parallel write one at a time. The kernel admits one writer
/// at a time into a file anyway, and writers waiting for its lock spin on it, burning the
/// cores the rest of a transfer needs; waiting here, they sleep.
#[derive(Debug, Default)]
pub struct OneWriter(Mutex<()>);

impl OneWriter {
    /// Writes `parts` one after another at `offset` of `file`, in as few system calls as the
    /// kernel allows (`pwritev`), once no other thread is writing through this writer.
    pub fn write_parts_at(&self, file: &fs::File, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        let _turn = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write_parts_at(file, parts, offset)
    }
}

/// Writes `parts` one after another at `offset`: the file's lock is taken once per call, not
/// once per part.
fn write_parts_at(file: &fs::File, parts: &[&[u8]], offset: u64) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut left: &mut [io::IoSlice<'_>] = &mut slices;
    let mut at = offset;
    while !left.is_empty() {
        // At most IOV_MAX (1024 on Linux) slices per call.
        let batch = left.len().min(1024);
        let written = rustix::io::pwritev(file, &left[..batch], at)?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        at += written as u64;
        io::IoSlice::advance_slices(&mut left, written);
    }
    Ok(())
}

/// Chunks shorter than the smallest cut (a small file, or the tail of a larger one) are kept
/// in one table instead of a file each: creating a file and its inode costs far more than a
/// few kilobytes, and a first sync of many small files would create one per file.
const SMALL_BELOW: usize = CHUNK_MIN;

/// An append at least this long has its writeback started at once: a large upload is then
/// mostly on disk when its commit flushes. Below a device's bundle (1 MiB of frames, so a
/// little less of chunks), or no upload's append would qualify.
const EARLY_WRITEBACK_MIN: u64 = 256 << 10;

/// A pack takes no more chunks once it is this long; the next chunk starts a new one.
const PACK_MAX: u64 = 256 << 20;

/// At most this many packs are kept open for reading.
const OPEN_PACKS_MAX: usize = 64;

/// Chunks stored once each: small ones as rows of one SQLite table (`small.db`), the others
/// appended to pack files (`packs/`) with where each lies recorded in the same database.
/// Creating a file per chunk cost more than writing its bytes: a 512 MiB upload made about
/// 8,000 files.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    root: PathBuf,
    small: Arc<Mutex<Connection>>,
    packs: Arc<Packs>,
    /// The store was written by a version that kept each large chunk as a file of its own:
    /// those files are still read (and removed when found damaged).
    chunk_files: bool,
}

#[derive(Debug, Default)]
struct Packs {
    /// The pack this store appends to. Each opened store starts its own, so two stores (or
    /// processes) on one folder never share the end of a pack. (A pack per parallel upload
    /// was measured slower: the disk then writes several files back at once.)
    writing: Mutex<Option<PackWriter>>,
    /// Appends write their bytes one at a time.
    writes: OneWriter,
    /// Packs opened for reading, by id.
    open: Mutex<HashMap<i64, Arc<fs::File>>>,
}

#[derive(Debug)]
struct PackWriter {
    id: i64,
    file: Arc<fs::File>,
    /// Where the next chunk goes: space up to here is written or being written.
    end: u64,
}

/// Where a large chunk's bytes lie.
#[derive(Debug)]
struct Packed {
    pack: i64,
    offset: u64,
    len: u64,
}

/// Pack lengths read during one lookup of many chunks. A pack only grows, so a length read
/// earlier is read again only when a chunk reaches past it.
#[derive(Default)]
struct PackLens(HashMap<i64, u64>);

impl PackLens {
    /// How much of the packed chunk `at` its pack holds (less after a power cut).
    fn on_disk(&mut self, store: &ChunkStore, at: &Packed) -> Result<u64, ChunkError> {
        let pack_len = match self.0.get(&at.pack) {
            Some(&known) if known >= at.offset + at.len => known,
            _ => {
                let now = store.pack_len(at.pack)?;
                self.0.insert(at.pack, now);
                now
            }
        };
        Ok(at.len.min(pack_len.saturating_sub(at.offset)))
    }
}

/// Where a chunk is stored, as [`ChunkStore::locate_many`] found it.
#[derive(Debug)]
pub struct Located(Place);

#[derive(Debug)]
enum Place {
    /// A small chunk's bytes (or a chunk file's, from an earlier version), read already.
    Small(Vec<u8>),
    /// A packed chunk, and how much of it the pack holds (less after a power cut).
    Packed { at: Packed, on_disk: u64 },
}

impl Located {
    /// How many bytes the chunk has on disk.
    pub fn len(&self) -> usize {
        match &self.0 {
            Place::Small(bytes) => bytes.len(),
            Place::Packed { on_disk, .. } => usize::try_from(*on_disk).unwrap_or(usize::MAX),
        }
    }

    /// Whether the chunk has no bytes on disk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Packed {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Packed> {
        Ok(Packed {
            pack: row.get(0)?,
            offset: row.get::<_, i64>(1)?.unsigned_abs(),
            len: row.get::<_, i64>(2)?.unsigned_abs(),
        })
    }
}

impl ChunkStore {
    /// Opens (creating) a chunk store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ChunkStore, ChunkError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(Self::io(&root))?;
        let small = Connection::open(root.join("small.db"))?;
        // Commits are not synced one by one: `flush` (one syncfs) makes them durable before
        // any metadata refers to them; WAL with NORMAL still syncs before a checkpoint.
        small.pragma_update(None, "journal_mode", "WAL")?;
        small.pragma_update(None, "synchronous", "NORMAL")?;
        small.busy_timeout(std::time::Duration::from_secs(30))?;
        small.execute_batch(
            "CREATE TABLE IF NOT EXISTS small (hash BLOB PRIMARY KEY, bytes BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS packed (
                 hash BLOB PRIMARY KEY,
                 pack INTEGER NOT NULL,
                 offset INTEGER NOT NULL,
                 len INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )?;
        let chunk_files = fs::read_dir(&root)
            .map_err(Self::io(&root))?
            .flatten()
            .any(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.len() == 2
                    && name.bytes().all(|b| b.is_ascii_hexdigit())
                    && entry.file_type().is_ok_and(|t| t.is_dir())
            });
        Ok(ChunkStore {
            root,
            small: Arc::new(Mutex::new(small)),
            packs: Arc::default(),
            chunk_files,
        })
    }

    fn table(&self) -> Result<MutexGuard<'_, Connection>, ChunkError> {
        self.small.lock().map_err(|_| ChunkError::Poisoned)
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> ChunkError + use<> {
        let path = path.to_path_buf();
        move |source| ChunkError::Io { path, source }
    }

    /// A small chunk's bytes, if the table holds it.
    fn small_get(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, ChunkError> {
        Ok(self
            .table()?
            .prepare_cached("SELECT bytes FROM small WHERE hash = ?1")?
            .query_row([&hash.0[..]], |row| row.get(0))
            .optional()?)
    }

    /// Where an earlier version kept a large chunk as a file of its own.
    fn file_path(&self, hash: &ContentHash) -> PathBuf {
        let name = hash.to_string();
        self.root.join(&name[..2]).join(&name[2..])
    }

    fn pack_path(&self, pack: i64) -> PathBuf {
        self.root.join("packs").join(format!("{pack:016x}.pack"))
    }

    fn packed(&self, hash: &ContentHash) -> Result<Option<Packed>, ChunkError> {
        Ok(self
            .table()?
            .prepare_cached("SELECT pack, offset, len FROM packed WHERE hash = ?1")?
            .query_row([&hash.0[..]], Packed::from_row)
            .optional()?)
    }

    /// A pack opened for reading, or `None` if it is gone.
    fn pack_file(&self, pack: i64) -> Result<Option<Arc<fs::File>>, ChunkError> {
        let mut open = self.packs.open.lock().map_err(|_| ChunkError::Poisoned)?;
        if let Some(file) = open.get(&pack) {
            return Ok(Some(file.clone()));
        }
        let path = self.pack_path(pack);
        match fs::File::open(&path) {
            Ok(file) => {
                let file = Arc::new(file);
                // A hub holding terabytes has thousands of packs: keep few descriptors open.
                if open.len() >= OPEN_PACKS_MAX {
                    open.clear();
                }
                open.insert(pack, file.clone());
                Ok(Some(file))
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// How much of a packed chunk is on disk (less than its length only in a pack cut short
    /// by a power cut before its flush), and the pack to read it from.
    fn packed_on_disk(&self, at: &Packed) -> Result<(u64, Option<Arc<fs::File>>), ChunkError> {
        let Some(file) = self.pack_file(at.pack)? else {
            return Ok((0, None));
        };
        let pack_len = self.opened_pack_len(at.pack, &file)?;
        Ok((at.len.min(pack_len.saturating_sub(at.offset)), Some(file)))
    }

    /// How long a pack is on disk (0 if it is gone).
    fn pack_len(&self, pack: i64) -> Result<u64, ChunkError> {
        match self.pack_file(pack)? {
            Some(file) => self.opened_pack_len(pack, &file),
            None => Ok(0),
        }
    }

    fn opened_pack_len(&self, pack: i64, file: &fs::File) -> Result<u64, ChunkError> {
        Ok(file
            .metadata()
            .map_err(Self::io(&self.pack_path(pack)))?
            .len())
    }

    /// A packed chunk's bytes as they are on disk (short if the pack was cut short).
    fn read_packed(&self, at: &Packed) -> Result<Vec<u8>, ChunkError> {
        let (on_disk, file) = self.packed_on_disk(at)?;
        let mut bytes = vec![0; on_disk as usize];
        if let Some(file) = file {
            file.read_exact_at(&mut bytes, at.offset)
                .map_err(Self::io(&self.pack_path(at.pack)))?;
        }
        Ok(bytes)
    }

    /// Whether the chunk is stored.
    pub fn contains(&self, hash: &ContentHash) -> bool {
        matches!(self.stored_len(hash), Ok(Some(_)))
    }

    /// The stored length of a chunk, if it is stored: a chunk cut short by a power cut before
    /// its flush shows here without reading it.
    pub fn stored_len(&self, hash: &ContentHash) -> Result<Option<u64>, ChunkError> {
        match self.small_len(hash)? {
            Some(len) => Ok(Some(len)),
            None => self.large_len(hash),
        }
    }

    /// As [`ChunkStore::stored_len`] for each listed chunk (its hash and listed length), in
    /// order. Each is looked for only where a chunk of its length is kept (one lookup instead
    /// of two for a missing one), and all in one read transaction with each pack's length
    /// read once: a large file's thousands of chunks would otherwise cost a lock, a
    /// transaction and a file status each.
    pub fn stored_lens_listed(
        &self,
        listed: &[(ContentHash, u32)],
    ) -> Result<Vec<Option<u64>>, ChunkError> {
        let table = self.table()?;
        let tx = table.unchecked_transaction()?;
        let mut small = tx.prepare_cached("SELECT length(bytes) FROM small WHERE hash = ?1")?;
        let mut packed =
            tx.prepare_cached("SELECT pack, offset, len FROM packed WHERE hash = ?1")?;
        let mut pack_lens = PackLens::default();
        let mut lens = Vec::with_capacity(listed.len());
        for (hash, len) in listed {
            let stored = if (*len as usize) < SMALL_BELOW {
                let small: Option<i64> = small
                    .query_row([&hash.0[..]], |row| row.get(0))
                    .optional()?;
                small.map(i64::unsigned_abs)
            } else if let Some(at) = packed
                .query_row([&hash.0[..]], Packed::from_row)
                .optional()?
            {
                Some(pack_lens.on_disk(self, &at)?)
            } else if self.chunk_files {
                self.file_len(hash)?
            } else {
                None
            };
            lens.push(stored);
        }
        Ok(lens)
    }

    fn small_len(&self, hash: &ContentHash) -> Result<Option<u64>, ChunkError> {
        let small: Option<i64> = self
            .table()?
            .prepare_cached("SELECT length(bytes) FROM small WHERE hash = ?1")?
            .query_row([&hash.0[..]], |row| row.get(0))
            .optional()?;
        Ok(small.map(i64::unsigned_abs))
    }

    fn large_len(&self, hash: &ContentHash) -> Result<Option<u64>, ChunkError> {
        if let Some(at) = self.packed(hash)? {
            return Ok(Some(self.packed_on_disk(&at)?.0));
        }
        if !self.chunk_files {
            return Ok(None);
        }
        self.file_len(hash)
    }

    /// The length of a large chunk kept as a file of its own (as earlier versions kept them).
    fn file_len(&self, hash: &ContentHash) -> Result<Option<u64>, ChunkError> {
        let path = self.file_path(hash);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// How many chunks are stored.
    pub fn chunk_count(&self) -> Result<u64, ChunkError> {
        let count: i64 = self.table()?.query_row(
            "SELECT (SELECT count(*) FROM small) + (SELECT count(*) FROM packed)",
            [],
            |row| row.get(0),
        )?;
        Ok(count.unsigned_abs())
    }

    /// Stores bytes the caller has already checked against `hash` (as `unbundle_chunks` does),
    /// without hashing them again; otherwise as [`ChunkStore::put`].
    pub fn put_checked(&self, hash: &ContentHash, bytes: &[u8]) -> Result<bool, ChunkError> {
        Ok(self.put_many_checked(&[(*hash, bytes)])? == 1)
    }

    /// Stores many checked chunks (a bundle): the large ones appended to this store's pack,
    /// then every row in one transaction, so a row never names bytes not yet written. Returns
    /// how many were new.
    pub fn put_many_checked(&self, chunks: &[(ContentHash, &[u8])]) -> Result<usize, ChunkError> {
        let mut small = Vec::new();
        let mut large = Vec::new();
        let mut seen = HashSet::new();
        for (hash, bytes) in chunks {
            if bytes.len() < SMALL_BELOW {
                small.push((hash, bytes));
            } else if seen.insert(*hash) {
                large.push((hash, bytes));
            }
        }
        // The length only says where to look, and these are all large.
        let listed: Vec<(ContentHash, u32)> = large
            .iter()
            .map(|(hash, bytes)| (**hash, u32::try_from(bytes.len()).unwrap_or(u32::MAX)))
            .collect();
        let held = self.stored_lens_listed(&listed)?;
        let large: Vec<_> = large
            .into_iter()
            .zip(held)
            .filter_map(|(chunk, stored)| stored.is_none().then_some(chunk))
            .collect();
        let placed = self.append(&large)?;
        let mut stored = 0;
        let mut table = self.table()?;
        let tx = table.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT OR IGNORE INTO small (hash, bytes) VALUES (?1, ?2)")?;
            for (hash, bytes) in small {
                stored += insert.execute(params![&hash.0[..], bytes])?;
            }
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO packed (hash, pack, offset, len) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for ((hash, bytes), offset) in large.iter().zip(placed.offsets) {
                // Bytes stored twice by two concurrent uploads cost space, never a wrong row.
                stored += insert.execute(params![
                    &hash.0[..],
                    placed.pack,
                    offset as i64,
                    bytes.len() as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(stored)
    }

    /// Writes chunks one after another at the end of this store's pack; returns the pack and
    /// each chunk's offset. The space is taken under the lock, so an upload's bytes need not
    /// wait for another's to be placed; the bytes themselves are written one upload at a time.
    fn append(&self, chunks: &[(&ContentHash, &&[u8])]) -> Result<Appended, ChunkError> {
        let total: u64 = chunks.iter().map(|(_, bytes)| bytes.len() as u64).sum();
        if chunks.is_empty() {
            return Ok(Appended {
                pack: 0,
                offsets: Vec::new(),
            });
        }
        let (pack, file, start) = {
            let mut writing = self
                .packs
                .writing
                .lock()
                .map_err(|_| ChunkError::Poisoned)?;
            let current = match writing.take() {
                Some(current) if current.end < PACK_MAX => current,
                _ => self.new_pack()?,
            };
            let taken = (current.id, current.file.clone(), current.end);
            *writing = Some(PackWriter {
                end: current.end + total,
                ..current
            });
            taken
        };
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut at = start;
        for (_, bytes) in chunks {
            offsets.push(at);
            at += bytes.len() as u64;
        }
        let parts: Vec<&[u8]> = chunks.iter().map(|(_, bytes)| **bytes).collect();
        self.packs
            .writes
            .write_parts_at(&file, &parts, start)
            .map_err(Self::io(&self.pack_path(pack)))?;
        if total >= EARLY_WRITEBACK_MIN {
            start_writeback(&file, start, total);
        }
        Ok(Appended { pack, offsets })
    }

    /// A new, empty pack under a random name no other store uses.
    fn new_pack(&self) -> Result<PackWriter, ChunkError> {
        let dir = self.root.join("packs");
        fs::create_dir_all(&dir).map_err(Self::io(&dir))?;
        loop {
            // Positive, so it is stored as is in an SQLite integer.
            let id = (rand::random::<u64>() >> 1) as i64;
            let path = self.pack_path(id);
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(PackWriter {
                        id,
                        file: Arc::new(file),
                        end: 0,
                    });
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(ChunkError::Io { path, source }),
            }
        }
    }

    /// Stores bytes that must hash to `hash`; storing a chunk twice is a no-op. The chunk is
    /// found only once its bytes are written; it is durable after the next
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
        if let Some(at) = self.packed(hash)? {
            return Ok(Some(self.read_packed(&at)?));
        }
        self.file_get(hash)
    }

    /// Where each of `hashes` is stored (None: not stored), all looked up in one read
    /// transaction with each pack's length read once, to be read with
    /// [`ChunkStore::read_located_into`]: a bundle of thousands of small chunks would
    /// otherwise cost two queries, each taking and dropping the database's locks, per chunk.
    pub fn locate_many(&self, hashes: &[ContentHash]) -> Result<Vec<Option<Located>>, ChunkError> {
        let table = self.table()?;
        let tx = table.unchecked_transaction()?;
        let mut small = tx.prepare_cached("SELECT bytes FROM small WHERE hash = ?1")?;
        let mut packed =
            tx.prepare_cached("SELECT pack, offset, len FROM packed WHERE hash = ?1")?;
        let mut pack_lens = PackLens::default();
        let mut located = Vec::with_capacity(hashes.len());
        for hash in hashes {
            let bytes: Option<Vec<u8>> = small
                .query_row([&hash.0[..]], |row| row.get(0))
                .optional()?;
            if let Some(bytes) = bytes {
                located.push(Some(Located(Place::Small(bytes))));
                continue;
            }
            if let Some(at) = packed
                .query_row([&hash.0[..]], Packed::from_row)
                .optional()?
            {
                let on_disk = pack_lens.on_disk(self, &at)?;
                located.push(Some(Located(Place::Packed { at, on_disk })));
                continue;
            }
            located.push(
                self.file_get(hash)?
                    .map(|bytes| Located(Place::Small(bytes))),
            );
        }
        Ok(located)
    }

    /// Reads a located chunk's bytes, as they are on disk and unchecked (see
    /// [`ChunkStore::get_unchecked`]), into `out`, which must be [`Located::len`] long.
    pub fn read_located_into(&self, located: &Located, out: &mut [u8]) -> Result<(), ChunkError> {
        match &located.0 {
            Place::Small(bytes) => {
                if out.len() != bytes.len() {
                    return Err(ChunkError::Io {
                        path: self.root.clone(),
                        source: io::Error::other(
                            "a located chunk read into a place of another size",
                        ),
                    });
                }
                out.copy_from_slice(bytes);
            }
            Place::Packed { at, .. } => {
                if let Some(file) = self.pack_file(at.pack)? {
                    file.read_exact_at(out, at.offset)
                        .map_err(Self::io(&self.pack_path(at.pack)))?;
                }
            }
        }
        Ok(())
    }

    fn file_get(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, ChunkError> {
        if !self.chunk_files {
            return Ok(None);
        }
        let path = self.file_path(hash);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChunkError::Io { path, source }),
        }
    }

    /// Reads a chunk, checking it still matches its name. A chunk found corrupt is removed,
    /// so the next upload that needs it is asked for it again.
    pub fn get(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, ChunkError> {
        let Some(bytes) = self.get_unchecked(hash)? else {
            return Ok(None);
        };
        if ContentHash::of(&bytes) == *hash {
            return Ok(Some(bytes));
        }
        self.remove(hash)?;
        Err(ChunkError::Corrupt(*hash))
    }

    /// Forgets a chunk (when it is found damaged). A packed chunk's space is not reclaimed:
    /// the hub never deletes content, so packs are never rewritten.
    pub fn remove(&self, hash: &ContentHash) -> Result<(), ChunkError> {
        {
            let table = self.table()?;
            table
                .prepare_cached("DELETE FROM small WHERE hash = ?1")?
                .execute([&hash.0[..]])?;
            table
                .prepare_cached("DELETE FROM packed WHERE hash = ?1")?
                .execute([&hash.0[..]])?;
        }
        if !self.chunk_files {
            return Ok(());
        }
        let path = self.file_path(hash);
        match fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(ChunkError::Io {
                path,
                source: error,
            }),
            _ => Ok(()),
        }
    }
}

/// Chunks just written to a pack: which pack, and each one's offset in order.
struct Appended {
    pack: i64,
    offsets: Vec<u64>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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
    fn parts_are_written_one_after_another_in_as_many_calls_as_needed()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("parts"))?;
        // More parts than one call takes (1,024), of uneven lengths, after a gap.
        let owned: Vec<Vec<u8>> = (0..2_500u32)
            .map(|i| vec![(i % 251) as u8; 1 + (i as usize * 7) % 300])
            .collect();
        let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        write_parts_at(&file, &parts, 4096)?;
        let mut read = Vec::new();
        io::Read::read_to_end(&mut &file, &mut read)?;
        let mut expected = vec![0u8; 4096];
        expected.extend(owned.concat());
        assert_eq!(read, expected);
        Ok(())
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
        assert_eq!(chunk_reader(&data[..], 0).ok(), Some(chunk_bytes(&data)));
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
                chunk_reader(&data[..], 0).ok(),
                Some(expected.clone()),
                "size {size}"
            );
            assert_eq!(
                chunk_reader(Trickle(&data, 100_003), data.len() as u64).ok(),
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

    /// Every file under a store's root, with its length.
    fn files_under(root: &Path) -> Vec<(PathBuf, u64)> {
        let mut files = Vec::new();
        let mut folders = vec![root.to_path_buf()];
        while let Some(folder) = folders.pop() {
            for entry in fs::read_dir(&folder).into_iter().flatten().flatten() {
                let path = entry.path();
                match entry.metadata() {
                    Ok(meta) if meta.is_dir() => folders.push(path),
                    Ok(meta) => files.push((path, meta.len())),
                    Err(_) => {}
                }
            }
        }
        files
    }

    /// Runs `work(0..threads)` on threads of their own at once; the first error, if any.
    fn in_parallel(
        threads: usize,
        work: impl Fn(usize) -> Result<(), ChunkError> + Sync,
    ) -> Result<(), ChunkError> {
        std::thread::scope(|scope| {
            let work = &work;
            let running: Vec<_> = (0..threads).map(|n| scope.spawn(move || work(n))).collect();
            running
                .into_iter()
                .try_for_each(|thread| thread.join().map_err(|_| ChunkError::Poisoned)?)
        })
    }

    fn assert_all_read(store: &ChunkStore, chunks: &[Vec<u8>]) -> Result<(), ChunkError> {
        for bytes in chunks {
            assert_eq!(store.get(&ContentHash::of(bytes))?.as_ref(), Some(bytes));
        }
        Ok(())
    }

    fn packs_under(root: &Path) -> Vec<(PathBuf, u64)> {
        files_under(root)
            .into_iter()
            .filter(|(path, _)| path.extension().is_some_and(|e| e == "pack"))
            .collect()
    }

    #[test]
    fn small_chunks_live_in_the_table_and_large_ones_in_packs()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let small = pseudo_random(4096, 1);
        let large = pseudo_random(CHUNK_MIN, 2);
        let other = pseudo_random(CHUNK_MAX, 3);
        let (small_hash, large_hash, other_hash) = (
            ContentHash::of(&small),
            ContentHash::of(&large),
            ContentHash::of(&other),
        );
        {
            let store = ChunkStore::open(dir.path())?;
            let bundle = [
                (small_hash, &small[..]),
                (large_hash, &large[..]),
                (large_hash, &large[..]),
                (other_hash, &other[..]),
            ];
            assert_eq!(store.put_many_checked(&bundle)?, 3);
            assert_eq!(store.put_many_checked(&bundle)?, 0, "stored twice");
            assert_eq!(store.chunk_count()?, 3);
            // One pack holding both large chunks once each; no file per chunk.
            let packs = packs_under(dir.path());
            assert_eq!(packs.len(), 1, "{packs:?}");
            assert_eq!(packs[0].1, (CHUNK_MIN + CHUNK_MAX) as u64);
            let others: Vec<_> = files_under(dir.path())
                .into_iter()
                .filter(|(path, _)| {
                    path.extension().is_none_or(|e| e != "pack")
                        && !path.to_string_lossy().contains("small.db")
                })
                .collect();
            assert!(others.is_empty(), "{others:?}");
            store.flush()?;
        }
        // Reopened: all there, checked on the way out.
        let store = ChunkStore::open(dir.path())?;
        assert!(store.contains(&small_hash) && store.contains(&large_hash));
        assert_eq!(store.stored_len(&small_hash)?, Some(4096));
        assert_eq!(store.stored_len(&other_hash)?, Some(CHUNK_MAX as u64));
        // Listed with their lengths, each is looked for where its length puts it.
        assert!(store.stored_lens_listed(&[(small_hash, 4096)])?[0].is_some());
        assert!(store.stored_lens_listed(&[(large_hash, CHUNK_MIN as u32)])?[0].is_some());
        assert!(store.stored_lens_listed(&[(small_hash, CHUNK_MIN as u32)])?[0].is_none());
        assert!(store.stored_lens_listed(&[(large_hash, 4096)])?[0].is_none());
        let missing = ContentHash::of(b"never stored");
        assert_eq!(
            store.stored_lens_listed(&[
                (large_hash, CHUNK_MIN as u32),
                (missing, CHUNK_MIN as u32),
                (small_hash, 4096),
                (other_hash, CHUNK_MAX as u32),
                (missing, 4096),
                (small_hash, CHUNK_MIN as u32),
                (large_hash, CHUNK_MIN as u32),
            ])?,
            [
                Some(CHUNK_MIN as u64),
                None,
                Some(4096),
                Some(CHUNK_MAX as u64),
                None,
                None,
                Some(CHUNK_MIN as u64),
            ]
        );
        assert_eq!(store.get(&small_hash)?, Some(small.clone()));
        assert_eq!(store.get(&large_hash)?, Some(large));
        assert_eq!(store.get(&other_hash)?, Some(other));
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
    fn stores_on_one_folder_append_to_packs_of_their_own() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let first = ChunkStore::open(dir.path())?;
        let second = ChunkStore::open(dir.path())?;
        let chunks: Vec<Vec<u8>> = (0..40).map(|i| pseudo_random(CHUNK_AVG, 10 + i)).collect();
        // Two stores (as two processes would) writing at once, from threads of their own.
        in_parallel(2, |n| {
            let store = [&first, &second][n];
            for bytes in chunks.iter().skip(n).step_by(2) {
                store.put(&ContentHash::of(bytes), bytes)?;
            }
            Ok(())
        })?;
        assert_eq!(packs_under(dir.path()).len(), 2);
        let reopened = ChunkStore::open(dir.path())?;
        for store in [&first, &second, &reopened] {
            assert_all_read(store, &chunks)?;
        }
        // A reopened store writes a new pack and leaves the others' ends alone.
        let more = pseudo_random(CHUNK_AVG, 99);
        assert!(reopened.put(&ContentHash::of(&more), &more)?);
        assert_eq!(packs_under(dir.path()).len(), 3);
        assert_eq!(first.get(&ContentHash::of(&more))?, Some(more));
        Ok(())
    }

    #[test]
    fn parallel_appends_in_one_store_lose_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = ChunkStore::open(dir.path())?;
        let chunks: Vec<Vec<u8>> = (0..64).map(|i| pseudo_random(CHUNK_AVG, 200 + i)).collect();
        in_parallel(4, |n| {
            for pair in chunks.chunks(2).skip(n).step_by(4) {
                let bundle: Vec<_> = pair.iter().map(|b| (ContentHash::of(b), &b[..])).collect();
                store.put_many_checked(&bundle)?;
            }
            Ok(())
        })?;
        let packs = packs_under(dir.path());
        assert!((1..=4).contains(&packs.len()), "{packs:?}");
        let written: u64 = packs.iter().map(|(_, len)| len).sum();
        assert_eq!(
            written,
            (chunks.len() * CHUNK_AVG) as u64,
            "a chunk was overwritten or doubled"
        );
        Ok(assert_all_read(&store, &chunks)?)
    }

    #[test]
    fn chunks_in_more_packs_than_are_kept_open_are_all_read()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let chunks: Vec<Vec<u8>> = (0..OPEN_PACKS_MAX as u64 + 3)
            .map(|i| pseudo_random(CHUNK_MIN, 500 + i))
            .collect();
        for bytes in &chunks {
            // Each store writes a pack of its own.
            ChunkStore::open(dir.path())?.put(&ContentHash::of(bytes), bytes)?;
        }
        assert_eq!(packs_under(dir.path()).len(), chunks.len());
        let store = ChunkStore::open(dir.path())?;
        assert_all_read(&store, &chunks)?;
        // Again, now that the first packs were let go of.
        Ok(assert_all_read(&store, &chunks)?)
    }

    #[test]
    fn chunks_are_located_together_and_read_into_a_given_place()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = ChunkStore::open(dir.path())?;
        let (small, large) = (pseudo_random(100, 7), pseudo_random(CHUNK_MAX, 8));
        for bytes in [&small, &large] {
            store.put(&ContentHash::of(bytes), bytes)?;
        }
        let missing = ContentHash::of(b"never stored");
        let hashes = [ContentHash::of(&large), missing, ContentHash::of(&small)];
        let located = store.locate_many(&hashes)?;
        assert!(located[1].is_none());
        let mut out = vec![0xee; 3];
        for (found, bytes) in [(&located[0], &large), (&located[2], &small)] {
            let found = found.as_ref().ok_or("a stored chunk was not found")?;
            assert_eq!(found.len(), bytes.len());
            let start = out.len();
            out.resize(start + found.len(), 0);
            store.read_located_into(found, &mut out[start..])?;
            assert_eq!(&out[start..], &bytes[..]);
        }
        assert_eq!(&out[..3], &[0xee; 3]);
        Ok(())
    }

    #[test]
    fn a_pack_cut_short_shows_its_chunks_short_and_they_are_dropped_when_read()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = ChunkStore::open(dir.path())?;
        let (first, last) = (pseudo_random(CHUNK_AVG, 4), pseudo_random(CHUNK_AVG, 5));
        let (first_hash, last_hash) = (ContentHash::of(&first), ContentHash::of(&last));
        store.put(&first_hash, &first)?;
        store.put(&last_hash, &last)?;
        // A power cut before the flush lost the pack's last bytes.
        let (pack, len) = packs_under(dir.path()).pop().ok_or("no pack was written")?;
        fs::OpenOptions::new()
            .write(true)
            .open(&pack)?
            .set_len(len - 100)?;
        assert_eq!(store.stored_len(&last_hash)?, Some(CHUNK_AVG as u64 - 100));
        assert_eq!(store.stored_len(&first_hash)?, Some(CHUNK_AVG as u64));
        // Looked up together, the pack's length read once: the same.
        let listed = [
            (last_hash, CHUNK_AVG as u32),
            (first_hash, CHUNK_AVG as u32),
        ];
        assert_eq!(
            store.stored_lens_listed(&listed)?,
            [Some(CHUNK_AVG as u64 - 100), Some(CHUNK_AVG as u64)]
        );
        let located = store.locate_many(&[last_hash])?;
        assert_eq!(located[0].as_ref().map(Located::len), Some(CHUNK_AVG - 100));
        assert!(matches!(store.get(&last_hash), Err(ChunkError::Corrupt(_))));
        assert_eq!(
            store.stored_len(&last_hash)?,
            None,
            "kept after found short"
        );
        // Sent again, it is stored again, whole.
        assert!(store.put(&last_hash, &last)?);
        assert_eq!(store.get(&last_hash)?, Some(last));
        assert_eq!(store.get(&first_hash)?, Some(first));
        Ok(())
    }

    #[test]
    fn chunks_kept_as_files_by_earlier_versions_are_still_found()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let bytes = pseudo_random(CHUNK_AVG, 6);
        let hash = ContentHash::of(&bytes);
        let name = hash.to_string();
        fs::create_dir_all(dir.path().join(&name[..2]))?;
        fs::write(dir.path().join(&name[..2]).join(&name[2..]), &bytes)?;
        let store = ChunkStore::open(dir.path())?;
        assert!(store.stored_lens_listed(&[(hash, CHUNK_AVG as u32)])?[0].is_some());
        assert!(!store.put(&hash, &bytes)?, "stored again beside its file");
        assert_eq!(store.get(&hash)?, Some(bytes));
        assert!(packs_under(dir.path()).is_empty());
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
        let (pack, _) = packs_under(dir.path()).pop().ok_or("no pack was written")?;
        fs::OpenOptions::new()
            .write(true)
            .open(pack)?
            .write_all_at(b"rot", 0)?;
        assert!(matches!(store.get(&hash), Err(ChunkError::Corrupt(_))));
        // Dropped when found, so an upload sends it again.
        assert_eq!(store.stored_len(&hash)?, None);
        assert_eq!(store.get(&hash)?, None);
        Ok(())
    }
}
