//! One sync round of one workspace with the hub: scan, upload what the hub lacks, download
//! what this device lacks, bring the folder in line.

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use shoal_core::{
    Batch, BatchLimits, ContentHash, Dot, ItemId, Knowledge, Receiving, SyncOffer, Version,
    VersionVector, plan_batches,
};
use shoal_folder::{
    ContentSource, FolderReplica, MaterializeReport, Progress, ScanOptions, ScanReport, Staged,
    Stager,
};
use shoal_protocol::{
    CommitRequest, DownloadRequest, DownloadResult, ItemDot, ItemResult, Location, RecoveryRequest,
    TransferStatus, WireBatch, WireContent, WireDot, WireKnowledge, WireLimits, hex16, hex32,
    parse_item,
};
use shoal_store::{ChunkRef, ChunkedContent, ContentIndex, LocalFile};

use crate::AgentError;
use crate::early::Early;
use crate::home::{DeviceConfig, WorkspaceEntry};
use crate::sinks::{Counted, Fetched, GroupSink, PieceSink};
use shoal_client::HubClient;

/// What one sync round did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Local changes found by the scan.
    pub scan: ScanReport,
    /// Versions the hub applied.
    pub uploaded: usize,
    /// Versions the hub refused, with the reason.
    pub refused: Vec<(String, String)>,
    /// Versions whose upload failed (retried next round).
    pub upload_failed: usize,
    /// Chunks put to the hub.
    pub chunks_uploaded: usize,
    /// Bytes put to the hub.
    pub bytes_uploaded: u64,
    /// Items changed by what was downloaded.
    pub downloaded: usize,
    /// Items now in conflict.
    pub conflicts: usize,
    /// Versions whose download failed (retried next round).
    pub download_failed: usize,
    /// Versions dropped by a recovery compare.
    pub recovered: usize,
    /// Disk changes.
    pub materialize: MaterializeReport,
    /// The hub's tag at the end.
    pub hub_tag: String,
    /// Whether the replica had to start a new epoch (it was restored from an old copy).
    pub new_epoch: bool,
    /// Refusals taken from the hub's list (new ones, or lifted ones).
    pub refusals_changed: usize,
    /// Bytes of content fetched from peers rather than from the hub.
    pub bytes_from_peers: u64,
    /// Bytes of content fetched from the other side of the session (the hub, or the peer a
    /// pull is from).
    pub bytes_from_hub: u64,
}

/// Fault injection for tests: names containing this text have their content withheld.
const FAULT_SKIP_UPLOAD: &str = "SHOAL_FAULT_SKIP_UPLOAD";

fn batch_from_wire(wire: &WireBatch) -> Result<Batch, AgentError> {
    let mut versions = Vec::with_capacity(wire.versions.len());
    for version in &wire.versions {
        versions.push(version.to_core()?);
    }
    Ok(Batch {
        versions,
        learned: Knowledge::try_from(&wire.learned)?,
        last: wire.last,
        forgotten: VersionVector::try_from(&wire.forgotten)?,
    })
}

/// Content held by the hub, fetched chunk by chunk with the first transport that works;
/// peers that may hold it are asked first (they are nearer).
struct HubSource<'a> {
    client: &'a HubClient,
    contents: HashMap<ContentHash, ChunkedContent>,
    locations: Vec<Location>,
    workspace: &'a str,
    peers: &'a [HubClient],
    /// (peer, content) pairs a peer did not have: not asked again.
    misses: std::sync::Mutex<HashSet<(usize, ContentHash)>>,
    from_peers: std::sync::atomic::AtomicU64,
    from_hub: std::sync::atomic::AtomicU64,
    /// Chunks fetched ahead in bundles, by hash, with how many more times each is wanted:
    /// given up at its last use, so a batch's chunks leave memory as its files are written
    /// (while the next batch's arrive).
    prefetched: Mutex<HashMap<ContentHash, (Bytes, usize)>>,
    /// Chunks this device already holds in its files (the older contents of the items being
    /// received): (file, offset, length) by hash, read instead of fetched.
    local: HashMap<ContentHash, (PathBuf, u64, u32)>,
    /// What the scan recorded of each of those files.
    stamps: HashMap<PathBuf, Stamp>,
    /// How many of the batch's contents (in its order) prefetching has gone through.
    covered: usize,
    /// Where chunk lists not in `contents` are looked up (the replica's own store).
    index: Option<ContentIndex>,
    /// Contents fetched while their upload was arriving at the hub, taken whole.
    early: Option<&'a Early>,
}

/// What the scan recorded of a file: while its size, modification time and inode are
/// unchanged, its bytes are those the scan hashed (the rescan trusts the same).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stamp {
    size: u64,
    mtime_ns: i64,
    inode: u64,
}

impl Stamp {
    pub(crate) fn of(file: &File) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().ok()?;
        Some(Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            inode: meta.ino(),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn recorded(file: &LocalFile) -> Stamp {
        Stamp {
            size: file.size,
            mtime_ns: file.mtime_ns,
            inode: file.inode,
        }
    }
}

/// Appends `pieces` of the file `handle` to `bundle` as chunk frames, read in place. A file
/// as the scan recorded it (`stamp`) before and after the reads holds the bytes the scan
/// hashed, so they are not hashed again; otherwise each piece is checked against its hash.
/// Returns false, with `bundle` as it was, when a piece cannot be read or does not match.
/// Moves `handle`'s position: it must be the caller's own.
pub(crate) fn bundle_pieces<P: std::borrow::Borrow<ChunkRef>>(
    bundle: &mut Vec<u8>,
    handle: &File,
    stamp: Stamp,
    pieces: &[P],
) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let start = bundle.len();
    let as_scanned = || Stamp::of(handle) == Some(stamp);
    let trusted = as_scanned();
    let mut bodies = Vec::with_capacity(pieces.len());
    // Read by appending: bytes read into a bundle's spare room need not be zeroed first, as
    // a slice to read into would.
    let mut reader = handle;
    let mut position = None;
    for piece in pieces {
        let piece = piece.borrow();
        shoal_protocol::bundle_frame_header(bundle, &piece.hash, piece.len);
        let at = bundle.len();
        let len = u64::from(piece.len);
        let read = if position == Some(piece.offset) {
            Ok(piece.offset)
        } else {
            reader.seek(SeekFrom::Start(piece.offset))
        }
        .and_then(|_| reader.take(len).read_to_end(bundle));
        if !matches!(read, Ok(n) if n as u64 == len) {
            bundle.truncate(start);
            return false;
        }
        position = Some(piece.offset + len);
        bodies.push(at);
    }
    if trusted && as_scanned() {
        return true;
    }
    let intact = pieces.iter().zip(&bodies).all(|(piece, &at)| {
        let piece = piece.borrow();
        ContentHash::of(&bundle[at..at + piece.len as usize]) == piece.hash
    });
    if !intact {
        bundle.truncate(start);
    }
    intact
}

/// Contents at least this large are written around the page cache where the filesystem
/// allows (`shoal_store::LargeFile`), and groups copied from local files have their
/// writeback started once copied.
const LARGE_CONTENT_MIN: u64 = 8 << 20;

/// Gives the memory freed by a batch back to the system. Its chunks were allocated on several
/// threads, so the allocator holds them in several arenas that it would otherwise keep, and
/// the next batch would grow the process further instead of reusing them.
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: malloc_trim takes no pointers and only returns free pages of the allocator's
    // own heaps to the kernel; it is safe to call at any time from any thread.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Copies `len` bytes between two files inside the kernel (no pass through this process).
pub(crate) fn copy_range(source: &File, mut from: u64, dest: &File, mut to: u64, len: u64) -> bool {
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        match rustix::fs::copy_file_range(source, Some(&mut from), dest, Some(&mut to), want) {
            Ok(0) | Err(_) => return false,
            Ok(copied) => left -= copied as u64,
        }
    }
    true
}

/// Contents up to this size are fetched ahead in bundles; larger ones chunk by chunk (ranged,
/// resumable).
const PREFETCH_CONTENT_MAX: u64 = 1 << 20;
/// At most this much is held fetched ahead at once.
const PREFETCH_MAX: u64 = 32 << 20;
/// Of the next batch, while the current one is written, at most this much: the rest comes
/// when it is the current one, so two batches' chunks are not held at once.
const AHEAD_MAX: u64 = 2 << 20;

impl<'a> HubSource<'a> {
    fn new(
        client: &'a HubClient,
        contents: HashMap<ContentHash, ChunkedContent>,
        locations: Vec<Location>,
        workspace: &'a str,
        peers: &'a [HubClient],
    ) -> HubSource<'a> {
        HubSource {
            client,
            contents,
            locations,
            workspace,
            peers,
            misses: Default::default(),
            from_peers: Default::default(),
            from_hub: Default::default(),
            prefetched: Mutex::default(),
            local: HashMap::new(),
            stamps: HashMap::new(),
            index: None,
            covered: 0,
            early: None,
        }
    }

    /// Takes the contents fetched early from `early` instead of fetching them.
    fn with_early(mut self, early: Option<&'a Early>) -> Self {
        self.early = early;
        self
    }

    /// Lets chunks of the files already here stand in for fetched ones: when a large file
    /// changes a little, only the chunks that changed travel.
    fn with_local(mut self, local: LocalChunks) -> Self {
        self.local = local.chunks;
        self.stamps = local.stamps;
        self
    }

    /// Looks up in `index` the chunk lists of contents it was not given.
    fn with_index(mut self, index: ContentIndex) -> Self {
        self.index = Some(index);
        self
    }

    /// A chunk read from a file of this device, if one holds it unchanged (`open` keeps the
    /// files already opened).
    fn local_chunk(&self, chunk: &ChunkRef, open: &mut HashMap<PathBuf, File>) -> Option<Vec<u8>> {
        let (path, offset, len) = self.local.get(&chunk.hash)?;
        if !open.contains_key(path) {
            open.insert(path.clone(), File::open(path).ok()?);
        }
        let file = open.get(path)?;
        let mut bytes = vec![0u8; *len as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, *offset).ok()?;
        (ContentHash::of(&bytes) == chunk.hash).then_some(bytes)
    }

    /// Copies `group` (consecutive chunks of one content) into `dest` with one read and one
    /// write when this device holds all of them, in the same order, in one of its files: the
    /// common case of a large file changed in a few places. Every chunk is checked; false
    /// leaves the group to be copied chunk by chunk.
    fn copy_local_run(
        &self,
        group: &[(ContentHash, &ChunkRef)],
        dest: &File,
        large: Option<&shoal_store::LargeFile>,
        run: &mut Vec<u8>,
    ) -> bool {
        let Some((_, first)) = group.first() else {
            return false;
        };
        let Some((path, start, _)) = self.local.get(&first.hash) else {
            return false;
        };
        let mut end = first.offset;
        for (_, chunk) in group {
            let at = chunk.offset.checked_sub(first.offset);
            let held_here = self.local.get(&chunk.hash).is_some_and(|(p, offset, len)| {
                p == path && *len == chunk.len && offset.checked_sub(*start) == at
            });
            if !held_here || chunk.offset != end {
                return false;
            }
            end += u64::from(chunk.len);
        }
        let Ok(source) = File::open(path) else {
            return false;
        };
        // A file still as the scan saw it holds the bytes the scan hashed: copied in the
        // kernel without reading or hashing them here. Changed during the copy, it is read
        // and checked below instead.
        let as_scanned = |source: &File| {
            self.stamps
                .get(path)
                .is_some_and(|stamp| Stamp::of(source).as_ref() == Some(stamp))
        };
        let len = end - first.offset;
        if as_scanned(&source) {
            // A large file's run goes around the page cache where it can, else in the kernel.
            let copied = large.is_some_and(|l| l.copy_in(path, *start, len, first.offset))
                || copy_range(&source, *start, dest, first.offset, len);
            if copied && as_scanned(&source) {
                return true;
            }
        }
        run.resize((end - first.offset) as usize, 0);
        if std::os::unix::fs::FileExt::read_exact_at(&source, run, *start).is_err() {
            return false;
        }
        let intact = group.iter().all(|(_, chunk)| {
            let at = (chunk.offset - first.offset) as usize;
            ContentHash::of(&run[at..at + chunk.len as usize]) == chunk.hash
        });
        intact && std::os::unix::fs::FileExt::write_all_at(dest, run, first.offset).is_ok()
    }

    /// Fetches the chunks of the small contents among `contents` in bundles of a few
    /// megabytes, several at once, from the nearest holder: thousands of small files then cost
    /// a few requests. Anything not fetched here is fetched when its content is copied.
    /// `budget` bounds the bytes fetched; a later call goes on where the last one stopped.
    fn prefetch(&mut self, contents: &[ChunkedContent], budget: u64) {
        let mut total = 0u64;
        let mut uses: HashMap<ContentHash, usize> = HashMap::new();
        let mut wanted: Vec<(ContentHash, &ChunkRef)> = Vec::new();
        let start = self.covered.min(contents.len());
        for content in &contents[start..] {
            if content.size <= PREFETCH_CONTENT_MAX {
                if total + content.size > budget {
                    break;
                }
                for chunk in &content.chunks {
                    let count = uses.entry(chunk.hash).or_default();
                    *count += 1;
                    if *count == 1 {
                        total += u64::from(chunk.len);
                        wanted.push((content.hash, chunk));
                    }
                }
            }
            self.covered += 1;
        }
        if wanted.len() < 2 {
            return;
        }
        let groups = bundle_groups(wanted);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let fetched: Vec<HashMap<ContentHash, Bytes>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..PARALLEL_TRANSFERS.min(groups.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut got = HashMap::new();
                        loop {
                            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(group) = groups.get(index) else {
                                break;
                            };
                            let mut fetched = Fetched::default();
                            self.fetch_group(group, &mut fetched);
                            got.extend(fetched.into_chunks());
                        }
                        got
                    })
                })
                .collect();
            workers.into_iter().filter_map(|w| w.join().ok()).collect()
        });
        let mut prefetched = lock(&self.prefetched);
        for (hash, bytes) in fetched.into_iter().flatten() {
            let count = uses.get(&hash).copied().unwrap_or(1);
            prefetched.insert(hash, (bytes, count));
        }
    }

    /// One bundle's worth of chunks from the nearest holders: peers first, then the hub's
    /// locations, each chunk read into its place in `sink` and checked there. The caller
    /// fetches any that did not arrive one by one.
    fn fetch_group(&self, group: &[(ContentHash, &ChunkRef)], sink: &mut dyn GroupSink) {
        use std::sync::atomic::Ordering::Relaxed;
        let missing = |sink: &dyn GroupSink| -> Vec<(ContentHash, &ChunkRef)> {
            let mut asked = HashSet::new();
            group
                .iter()
                .filter(|(_, chunk)| !sink.holds(&chunk.hash) && asked.insert(chunk.hash))
                .copied()
                .collect()
        };
        for (index, peer) in self.peers.iter().enumerate() {
            let wanted: Vec<(ContentHash, &ChunkRef)> = missing(sink)
                .into_iter()
                .filter(|(content, _)| {
                    self.misses
                        .lock()
                        .map(|m| !m.contains(&(index, *content)))
                        .unwrap_or(false)
                })
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let location = shoal_protocol::routes::peer_contents(self.workspace);
            let mut counted = Counted::new(sink);
            // A broken answer keeps the chunks that arrived before the fault.
            let _ = peer.fetch_content_chunks_into(&location, &by_content(&wanted), &mut counted);
            self.from_peers.fetch_add(counted.bytes, Relaxed);
            // A peer holds a content whole or not at all: don't ask it for the rest again.
            if let Ok(mut misses) = self.misses.lock() {
                for (content, chunk) in &wanted {
                    if !sink.holds(&chunk.hash) {
                        misses.insert((index, *content));
                    }
                }
            }
        }
        for location in &self.locations {
            let rest = missing(sink);
            if rest.is_empty() {
                break;
            }
            let mut counted = Counted::new(sink);
            let _ = match location.transport.as_str() {
                "http" => {
                    let hashes: Vec<ContentHash> = rest.iter().map(|(_, c)| c.hash).collect();
                    self.client
                        .fetch_chunks_into(&location.url, &hashes, &mut counted)
                }
                "peer" => self.client.fetch_content_chunks_into(
                    &location.url,
                    &by_content(&rest),
                    &mut counted,
                ),
                _ => continue,
            };
            let counter = if location.transport == "peer" {
                &self.from_peers
            } else {
                &self.from_hub
            };
            counter.fetch_add(counted.bytes, Relaxed);
        }
    }

    fn fetch_from_peers(&self, content: &ContentHash, chunk: &ChunkRef) -> Option<Vec<u8>> {
        let base = format!(
            "{}/{}",
            shoal_protocol::routes::peer_contents(self.workspace),
            hex32(&content.0)
        );
        for (index, peer) in self.peers.iter().enumerate() {
            let missed = self
                .misses
                .lock()
                .map(|m| m.contains(&(index, *content)))
                .unwrap_or(true);
            if missed {
                continue;
            }
            match peer.get_chunk(&base, &chunk.hash, chunk.len as usize) {
                Ok(bytes) if ContentHash::of(&bytes) == chunk.hash => return Some(bytes),
                _ => {
                    if let Ok(mut misses) = self.misses.lock() {
                        misses.insert((index, *content));
                    }
                }
            }
        }
        None
    }

    /// A chunk fetched ahead; its last use takes it out of memory.
    fn take_prefetched(&self, hash: &ContentHash) -> Option<Bytes> {
        let mut prefetched = lock(&self.prefetched);
        let (bytes, left) = prefetched.get_mut(hash)?;
        if *left > 1 {
            *left -= 1;
            return Some(bytes.clone());
        }
        prefetched.remove(hash).map(|(bytes, _)| bytes)
    }

    fn chunk(&self, content: &ContentHash, chunk: &ChunkRef) -> Option<Bytes> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(bytes) = self.take_prefetched(&chunk.hash) {
            return Some(bytes); // counted when fetched
        }
        if let Some(bytes) = self.fetch_from_peers(content, chunk) {
            self.from_peers.fetch_add(bytes.len() as u64, Relaxed);
            return Some(bytes.into());
        }
        let (bytes, from_peer) = self.fetch_from_locations(content, chunk)?;
        let counter = if from_peer {
            &self.from_peers
        } else {
            &self.from_hub
        };
        counter.fetch_add(bytes.len() as u64, Relaxed);
        Some(bytes.into())
    }

    /// One chunk from the first location that has it, and whether that is a peer.
    fn fetch_from_locations(
        &self,
        content: &ContentHash,
        chunk: &ChunkRef,
    ) -> Option<(Vec<u8>, bool)> {
        for location in &self.locations {
            let bytes = match location.transport.as_str() {
                "http" => self
                    .client
                    .get_chunk(&location.url, &chunk.hash, chunk.len as usize)
                    .ok(),
                // A peer serves chunks of the files it holds, named by content and chunk.
                "peer" => self
                    .client
                    .get_chunk(
                        &format!("{}/{}", location.url, hex32(&content.0)),
                        &chunk.hash,
                        chunk.len as usize,
                    )
                    .ok(),
                _ => None,
            };
            if let Some(bytes) = bytes.filter(|b| ContentHash::of(b) == chunk.hash) {
                return Some((bytes, location.transport == "peer"));
            }
        }
        None
    }

    /// Puts `group` (consecutive chunks of content `hash`) together in `piece`: from this
    /// device's files where they hold its chunks, else fetched straight into their places.
    /// False when a chunk could not be had.
    fn fill_piece(
        &self,
        hash: &ContentHash,
        group: &[(ContentHash, &ChunkRef)],
        piece: &mut shoal_store::Piece,
    ) -> bool {
        let mut sink = PieceSink::new(piece, group);
        let mut open = HashMap::new();
        for (_, chunk) in group {
            if !sink.holds(&chunk.hash)
                && let Some(bytes) = self.local_chunk(chunk, &mut open)
            {
                sink.fill(&chunk.hash, &bytes);
            }
        }
        let remote: Vec<(ContentHash, &ChunkRef)> = group
            .iter()
            .filter(|(_, c)| !sink.holds(&c.hash) && !lock(&self.prefetched).contains_key(&c.hash))
            .copied()
            .collect();
        if remote.len() > 1 {
            self.fetch_group(&remote, &mut sink);
        }
        for (_, chunk) in group {
            if sink.holds(&chunk.hash) {
                continue;
            }
            match self.chunk(hash, chunk) {
                Some(bytes) => sink.fill(&chunk.hash, &bytes),
                None => return false,
            }
        }
        sink.whole()
    }

    /// The chunks of `group` (of content `hash`) in order: from this device's files where
    /// they hold them, fetched ahead, or fetched now. None when a chunk could not be had.
    fn gather_group(
        &self,
        hash: &ContentHash,
        group: &[(ContentHash, &ChunkRef)],
    ) -> Option<Vec<Bytes>> {
        let mut here: HashMap<ContentHash, Bytes> = HashMap::new();
        let mut open = HashMap::new();
        for (_, chunk) in group {
            if let Some(bytes) = self.local_chunk(chunk, &mut open) {
                here.insert(chunk.hash, bytes.into());
            }
        }
        let remote: Vec<(ContentHash, &ChunkRef)> = group
            .iter()
            .filter(|(_, c)| {
                !lock(&self.prefetched).contains_key(&c.hash) && !here.contains_key(&c.hash)
            })
            .copied()
            .collect();
        if remote.len() > 1 {
            let mut fetched = Fetched::default();
            self.fetch_group(&remote, &mut fetched);
            here.extend(fetched.into_chunks());
        }
        group
            .iter()
            .map(|(_, chunk)| match here.get(&chunk.hash) {
                Some(bytes) => Some(bytes.clone()),
                None => self.chunk(hash, chunk),
            })
            .collect()
    }
}

impl ContentSource for HubSource<'_> {
    /// Fetches the chunks in bundles of consecutive chunks, several bundles at once, each
    /// chunk written at its offset; every chunk is checked against its name, so the assembled
    /// file is the content named `hash`.
    fn copy_to(&self, hash: &ContentHash, dest: &std::path::Path) -> bool {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        if self
            .early
            .is_some_and(|early| early.claim(self.workspace, hash, dest))
        {
            return true;
        }
        let looked_up;
        let content = match self.contents.get(hash) {
            Some(content) => content,
            None => {
                looked_up = self
                    .index
                    .as_ref()
                    .and_then(|i| i.content(hash).ok().flatten());
                match &looked_up {
                    Some(content) => content,
                    None => return false,
                }
            }
        };
        // A large file may be built in a copy of its earlier version made while the other
        // device read the change: the chunks still in place there are not written again.
        let mut in_place = HashSet::new();
        let large = if content.size >= LARGE_CONTENT_MIN {
            let basis = self
                .early
                .and_then(|early| early.bases.take(self.workspace, content, dest));
            let opened = match basis {
                Some(placed) => {
                    in_place = placed;
                    shoal_store::LargeFile::reopen(dest, content.size)
                }
                None => shoal_store::LargeFile::create(dest, content.size),
            };
            match opened {
                Ok(large) => Some(large),
                Err(_) => return false,
            }
        } else {
            None
        };
        let small;
        let file = match &large {
            Some(large) => large.file(),
            None => {
                let Ok(file) = File::create(dest) else {
                    return false;
                };
                small = file;
                // Sized first when chunks may land out of order; a one-chunk file is written
                // whole.
                if content.chunks.len() > 1 && small.set_len(content.size).is_err() {
                    return false;
                }
                &small
            }
        };
        let groups = bundle_groups(content.chunks.iter().map(|c| (*hash, c)).collect());
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let writer = shoal_store::OneWriter::default();
        let work = || {
            let mut run = Vec::new();
            let mut piece = shoal_store::Piece::default();
            while !failed.load(Relaxed) {
                let Some(group) = groups.get(next.fetch_add(1, Relaxed)) else {
                    return;
                };
                let (Some((_, first)), Some((_, last))) = (group.first(), group.last()) else {
                    continue;
                };
                if !in_place.is_empty() && group.iter().all(|(_, c)| in_place.contains(&c.offset)) {
                    continue;
                }
                let span = (
                    first.offset,
                    last.offset + u64::from(last.len) - first.offset,
                );
                if self.copy_local_run(group, file, large.as_ref(), &mut run) {
                    if large.is_some() {
                        shoal_store::start_writeback(file, span.0, span.1);
                    }
                    continue;
                }
                let written = match &large {
                    Some(large) => {
                        if !self.fill_piece(hash, group, &mut piece) {
                            failed.store(true, Relaxed);
                            return;
                        }
                        large.write_piece(&piece)
                    }
                    None => {
                        let Some(parts) = self.gather_group(hash, group) else {
                            failed.store(true, Relaxed);
                            return;
                        };
                        // The group's chunks follow one another: one write for all of them.
                        let slices: Vec<&[u8]> = parts.iter().map(|b| &b[..]).collect();
                        writer.write_parts_at(file, &slices, span.0)
                    }
                };
                if written.is_err() {
                    failed.store(true, Relaxed);
                    return;
                }
            }
        };
        let workers = PARALLEL_TRANSFERS.min(groups.len());
        if workers <= 1 {
            work(); // most files: one bundle or less, no thread needed
        } else {
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(work);
                }
            });
        }
        !failed.load(Relaxed)
    }
}

/// A cache's lock. Nothing panics while holding one, so a poisoned lock holds whole data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Contents at least this large are looked for in the older versions of their items.
const LOCAL_REUSE_MIN: u64 = 1 << 20;

/// Where the chunks of the files this batch replaces are, for the large contents it brings:
/// a file changed in a few places then costs only the chunks that changed.
fn local_chunks(
    folder: &FolderReplica,
    entry: &WorkspaceEntry,
    batch: &Batch,
    contents: &[ChunkedContent],
) -> Result<LocalChunks, AgentError> {
    let mut local = LocalChunks::default();
    let large: HashSet<ContentHash> = contents
        .iter()
        .filter(|c| c.size >= LOCAL_REUSE_MIN)
        .map(|c| c.hash)
        .collect();
    let items: HashSet<ItemId> = batch
        .versions
        .iter()
        .filter(|(_, v)| v.entry.content.is_some_and(|c| large.contains(&c)))
        .map(|(item, _)| *item)
        .collect();
    if items.is_empty() {
        return Ok(local);
    }
    let store = folder.store();
    for file in store.local_files()? {
        let Some(old) = file.content.filter(|_| items.contains(&file.item)) else {
            continue;
        };
        let Some(held) = store.content(&old)? else {
            continue;
        };
        let mut path = entry.path.clone();
        path.extend(file.path.split('/'));
        for chunk in held.chunks {
            local
                .chunks
                .insert(chunk.hash, (path.clone(), chunk.offset, chunk.len));
        }
        local.stamps.insert(path, Stamp::recorded(&file));
    }
    Ok(local)
}

/// Chunks this device holds in its files, where, and what the scan recorded of those files.
#[derive(Default)]
struct LocalChunks {
    chunks: HashMap<ContentHash, (PathBuf, u64, u32)>,
    stamps: HashMap<PathBuf, Stamp>,
}

/// Cuts a list of chunks (each with its content) into groups of about `BUNDLE_TARGET` bytes,
/// in order.
pub(crate) fn bundle_groups(
    chunks: Vec<(ContentHash, &ChunkRef)>,
) -> Vec<Vec<(ContentHash, &ChunkRef)>> {
    let mut groups: Vec<Vec<(ContentHash, &ChunkRef)>> = Vec::new();
    let mut size = 0usize;
    for (content, chunk) in chunks {
        if groups.is_empty() || size + chunk.len as usize > BUNDLE_TARGET {
            groups.push(Vec::new());
            size = 0;
        }
        size += chunk.len as usize;
        if let Some(group) = groups.last_mut() {
            group.push((content, chunk));
        }
    }
    groups
}

/// The chunks of a group by content, as a peer's content fetch names them.
fn by_content(group: &[(ContentHash, &ChunkRef)]) -> Vec<(ContentHash, Vec<ContentHash>)> {
    let mut out: Vec<(ContentHash, Vec<ContentHash>)> = Vec::new();
    for (content, chunk) in group {
        match out.last_mut() {
            Some((last, chunks)) if last == content => chunks.push(chunk.hash),
            _ => out.push((*content, vec![chunk.hash])),
        }
    }
    out
}

/// Reads one chunk of a local content from the file that holds it, checking the bytes.
/// How many chunk transfers run at once: enough to keep the connection busy while one side
/// hashes or writes.
pub(crate) const PARALLEL_TRANSFERS: usize = 4;

/// Bundles are sent once they hold this much: large enough that per-request costs vanish,
/// small enough to keep a few in flight.
const BUNDLE_TARGET: usize = 1 << 20;

/// What a bundle being filled is given room for: a piece of about `BUNDLE_TARGET` bytes
/// added to a bundle not yet full.
const BUNDLE_CAPACITY: usize = BUNDLE_TARGET + (256 << 10);

/// One item's content to send: the chunks the hub lacks and the file holding them.
struct Outgoing<'a> {
    path: PathBuf,
    /// The file as the scan recorded it.
    stamp: Stamp,
    chunks: Vec<&'a ChunkRef>,
}

/// Sends the chunks of every outgoing item in bundles, several requests in flight, each worker
/// filling its own bundle from the files it reads. An item whose file changed or vanished is
/// reported as not sent (false). Returns per item whether it was sent, and (chunks, bytes).
fn send_contents(
    client: &HubClient,
    location: &str,
    outgoing: &[Outgoing<'_>],
    give_way: &(dyn Fn() + Sync),
) -> Result<(Vec<bool>, usize, u64), AgentError> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let sent: Vec<AtomicBool> = outgoing.iter().map(|_| AtomicBool::new(true)).collect();
    // Work in pieces of about a bundle each, so one large file is read, checked and sent by
    // every worker at once.
    let mut pieces: Vec<(usize, &[&ChunkRef])> = Vec::new();
    for (index, item) in outgoing.iter().enumerate() {
        let mut start = 0;
        let mut size = 0usize;
        for (at, chunk) in item.chunks.iter().enumerate() {
            if size > 0 && size + chunk.len as usize > BUNDLE_TARGET {
                pieces.push((index, &item.chunks[start..at]));
                start = at;
                size = 0;
            }
            size += chunk.len as usize;
        }
        pieces.push((index, &item.chunks[start..]));
    }
    let next = AtomicUsize::new(0);
    let (chunk_count, byte_count) = (AtomicUsize::new(0), AtomicU64::new(0));
    let results: Vec<Result<(), AgentError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PARALLEL_TRANSFERS.min(pieces.len().max(1)))
            .map(|_| {
                scope.spawn(|| -> Result<(), AgentError> {
                    // One bundle buffer per worker, refilled once sent: a fresh one each time
                    // would be fresh pages each time, faulted in and zeroed by the kernel.
                    let mut bundle = Vec::new();
                    while let Some(&(index, chunks)) =
                        pieces.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        if !sent[index].load(Ordering::Relaxed) {
                            continue;
                        }
                        give_way();
                        let Ok(handle) = File::open(&outgoing[index].path) else {
                            sent[index].store(false, Ordering::Relaxed);
                            continue;
                        };
                        let frames: usize = chunks
                            .iter()
                            .map(|c| shoal_protocol::frame_len(c.len))
                            .sum();
                        if !bundle.is_empty() && bundle.len() + frames > BUNDLE_CAPACITY {
                            client.put_chunk_bundle(location, &bundle)?;
                            bundle.clear();
                        }
                        if bundle.capacity() == 0 {
                            bundle.reserve_exact(BUNDLE_CAPACITY.max(frames));
                        }
                        if !bundle_pieces(&mut bundle, &handle, outgoing[index].stamp, chunks) {
                            // Changed since the scan: the next scan makes a new version.
                            sent[index].store(false, Ordering::Relaxed);
                            continue;
                        }
                        chunk_count.fetch_add(chunks.len(), Ordering::Relaxed);
                        byte_count.fetch_add(
                            chunks.iter().map(|c| u64::from(c.len)).sum(),
                            Ordering::Relaxed,
                        );
                        if bundle.len() >= BUNDLE_TARGET {
                            client.put_chunk_bundle(location, &bundle)?;
                            bundle.clear();
                        }
                    }
                    if !bundle.is_empty() {
                        client.put_chunk_bundle(location, &bundle)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(AgentError::Protocol("an upload worker failed".into())))
            })
            .collect()
    });
    for result in results {
        result?;
    }
    Ok((
        sent.iter().map(|s| s.load(Ordering::Relaxed)).collect(),
        chunk_count.into_inner(),
        byte_count.into_inner(),
    ))
}

/// Syncs one workspace with the hub, once.
pub fn sync_workspace(
    device: &DeviceConfig,
    entry: &WorkspaceEntry,
    progress: &dyn Progress,
) -> Result<SyncReport, AgentError> {
    sync_workspace_with(device, entry, &[], progress)
}

/// Syncs one workspace with the hub, once, fetching content from `peers` (clients of peers
/// sharing the workspace) before the hub when they hold it.
pub fn sync_workspace_with(
    device: &DeviceConfig,
    entry: &WorkspaceEntry,
    peers: &[HubClient],
    progress: &dyn Progress,
) -> Result<SyncReport, AgentError> {
    sync_workspace_scanning(device, entry, peers, progress, &SyncOptions::default())
}

/// How a hub sync fits around an agent's other work.
pub(crate) struct SyncOptions<'a> {
    /// Scan the folder first; a caller that watches it and saw nothing change since its last
    /// scan leaves it out.
    pub scan_first: bool,
    /// Called between the upload's pieces; a caller serving peers waits there while they
    /// pull.
    pub give_way: &'a (dyn Fn() + Sync),
    /// Upload only the versions this replica wrote: those it just received from a peer are
    /// their author's to upload, and are left for a later sync.
    pub own_versions_only: bool,
    /// Contents fetched while their upload was still arriving at the hub, which the
    /// download takes instead of fetching them again.
    pub early: Option<&'a Early>,
}

impl Default for SyncOptions<'_> {
    fn default() -> Self {
        SyncOptions {
            scan_first: true,
            give_way: &|| {},
            own_versions_only: false,
            early: None,
        }
    }
}

/// [`sync_workspace_with`], fitted around other work by `options`.
pub(crate) fn sync_workspace_scanning(
    device: &DeviceConfig,
    entry: &WorkspaceEntry,
    peers: &[HubClient],
    progress: &dyn Progress,
    options: &SyncOptions<'_>,
) -> Result<SyncReport, AgentError> {
    let scan_first = options.scan_first;
    let scan = |folder: &mut FolderReplica| -> Result<ScanReport, AgentError> {
        Ok(if scan_first {
            folder.scan(&ScanOptions::default(), progress)?
        } else {
            ScanReport::default()
        })
    };
    let mut folder = open_folder(device, entry)?;
    let base = HubClient::new(&device.hub, Some(&device.token))?.for_device(&device.device);
    let mut report = SyncReport::default();

    // The hub's knowledge first: it tells us if our state went back in time. When the hub
    // already knows exactly what we know, it says so in one small answer.
    let identity = folder.store().identity().clone();
    let mut client = base.for_replica(&entry.id, identity.replica, identity.epoch);
    let ours = folder.store().knowledge()?.compact().to_string();
    let refusals = local_refusals_tag(&folder)?;
    let mut scanned = None;
    let offer = match client
        .upload_offer_unless(&entry.id, &ours, &refusals)
        .map_err(AgentError::from)
    {
        Err(AgentError::StaleEpoch { known }) => {
            // Restored from an old copy: continue in an epoch never used before, then a full
            // exchange (our knowledge is older, so the hub sends what we lost).
            new_epoch_after(&mut folder, known)?;
            let identity = folder.store().identity().clone();
            client = base.for_replica(&entry.id, identity.replica, identity.epoch);
            report.new_epoch = true;
            client.upload_offer(&entry.id)?
        }
        Ok(None) => {
            let scan = scan(&mut folder)?;
            let unchanged = folder.store().knowledge()?.compact().to_string() == ours;
            // A folder still waiting to be brought in line may need content from the hub.
            if unchanged && !folder.store().needs_materialize()? {
                // Nothing new on either side.
                report.scan = scan;
                report.hub_tag = ours;
                return Ok(report);
            }
            scanned = Some(scan);
            client.upload_offer(&entry.id)?
        }
        other => other?.ok_or_else(|| AgentError::Protocol("no offer".into()))?,
    };
    if offer.refusals != refusals {
        // The hub refused (or stopped refusing) something: take its list as ours.
        report.refusals_changed = adopt_refusals(&mut folder, &client.refusals(&entry.id)?)?;
    }
    let hub_knowledge = Knowledge::try_from(&offer.knowledge)?;
    // The hub has seen writes of ours that we no longer have: we were restored. Our next
    // writes must not reuse those dots.
    let replica = folder.store().identity().replica;
    let writer = folder.store().identity().writer();
    if hub_knowledge.highest(&writer) > folder.store().tick()? {
        let latest = hub_knowledge
            .writers()
            .filter(|w| w.replica == replica)
            .map(|w| w.epoch)
            .max()
            .unwrap_or(0);
        new_epoch_after(&mut folder, latest)?;
        let identity = folder.store().identity().clone();
        client = base.for_replica(&entry.id, identity.replica, identity.epoch);
        report.new_epoch = true;
    }

    report.scan = match scanned {
        Some(scan) => scan,
        None => scan(&mut folder)?,
    };
    let limits = BatchLimits::default().negotiate(BatchLimits {
        max_items: offer.limits.max_items,
        max_bytes: offer.limits.max_bytes,
    });
    upload(
        &mut folder,
        &client,
        entry,
        &hub_knowledge,
        limits,
        options,
        &mut report,
    )?;
    let remote = Remote {
        client: &client,
        knowledge: &hub_knowledge,
        limits,
        peers,
        early: options.early,
    };
    download(&mut folder, remote, entry, progress, &mut report)?;
    Ok(report)
}

/// Scans, then downloads from a peer what this device lacks and brings the folder in line.
/// Peers only pull, so nothing goes up; the peer pulls from us in turn when it hears our
/// knowledge.
pub fn pull_from_peer(
    device: &DeviceConfig,
    entry: &WorkspaceEntry,
    peer: &HubClient,
    progress: &dyn Progress,
) -> Result<SyncReport, AgentError> {
    pull_from_peer_with(device, entry, peer, progress, true, None)
}

/// [`pull_from_peer`], scanning the folder first only when `scan_first`: a caller that watches
/// the folder and saw nothing change since its last scan leaves it out. Contents in `early`
/// (fetched from the hub while their upload arrived) are taken instead of fetched.
pub(crate) fn pull_from_peer_with(
    device: &DeviceConfig,
    entry: &WorkspaceEntry,
    peer: &HubClient,
    progress: &dyn Progress,
    scan_first: bool,
    early: Option<&Early>,
) -> Result<SyncReport, AgentError> {
    let mut folder = open_folder(device, entry)?;
    // Local changes first, as they are: a rename not yet scanned would otherwise look like a
    // new file once the peer's versions are in place.
    let mut report = SyncReport::default();
    if scan_first {
        report.scan = folder.scan(&ScanOptions::default(), progress)?;
    }
    let remote = Remote {
        client: peer,
        knowledge: &Knowledge::new(),
        limits: BatchLimits::default(),
        peers: &[],
        early,
    };
    download(&mut folder, remote, entry, progress, &mut report)?;
    Ok(report)
}

/// Scans a workspace's folder for local changes, without talking to anyone.
pub fn scan_workspace(
    device: &DeviceConfig,
    entry: &WorkspaceEntry,
    progress: &dyn shoal_folder::Progress,
) -> Result<ScanReport, AgentError> {
    let mut folder = open_folder(device, entry)?;
    Ok(folder.scan(&ScanOptions::default(), progress)?)
}

/// The compact knowledge of a workspace's replica on this device (hex).
pub fn compact_knowledge(device_name: &str, entry: &WorkspaceEntry) -> Result<String, AgentError> {
    let folder = FolderReplica::open(&entry.path, device_name)?;
    Ok(folder.store().knowledge()?.compact().to_string())
}

/// A workspace's folder replica, writing versions as this device and its user.
pub fn open_folder(
    device: &DeviceConfig,
    entry: &WorkspaceEntry,
) -> Result<FolderReplica, AgentError> {
    let mut folder = FolderReplica::open(&entry.path, &device.device_name)?;
    folder.set_author(&device.user);
    Ok(folder)
}

/// The refusals' tag of what this replica holds as refused.
fn local_refusals_tag(folder: &FolderReplica) -> Result<String, AgentError> {
    let refused = folder.store().refused()?;
    Ok(shoal_protocol::refusals_tag(
        refused
            .iter()
            .map(|(_, v, reason)| (v.dot, reason.as_str())),
    ))
}

/// Makes this replica's refused versions the hub's: a version the hub refused (whoever
/// uploaded it, say a peer that accepted it directly) is marked refused here too, kept and no
/// longer offered; one whose refusal an owner lifted is offered again. Returns how many
/// changed.
fn adopt_refusals(
    folder: &mut FolderReplica,
    hub: &[shoal_protocol::Refusal],
) -> Result<usize, AgentError> {
    let mut theirs: HashMap<Dot, (ItemId, Version, String)> = HashMap::new();
    for refusal in hub {
        let (item, version) = refusal.version.to_core()?;
        theirs.insert(version.dot, (item, version, refusal.reason.clone()));
    }
    let ours = folder.store().refused()?;
    let now = now_ns();
    let mut changed = 0;
    let mut tx = folder.store_mut().begin()?;
    for (_, version, reason) in &ours {
        match theirs.get(&version.dot) {
            Some((_, _, hub_reason)) if hub_reason == reason => {}
            _ => {
                tx.remove_refused(&version.dot)?;
                changed += 1;
            }
        }
    }
    for (dot, (item, version, reason)) in &theirs {
        let same = ours.iter().any(|(_, v, r)| v.dot == *dot && r == reason);
        if !same {
            tx.put_refused(*item, version, reason, now)?;
            changed += 1;
        }
    }
    tx.commit()?;
    Ok(changed)
}

/// Moves the replica to an epoch after both its own and `known`.
fn new_epoch_after(folder: &mut FolderReplica, known: u32) -> Result<(), AgentError> {
    let mut tx = folder.store_mut().begin()?;
    tx.new_epoch()?;
    while tx.identity().epoch <= known {
        tx.new_epoch()?;
    }
    tx.commit()?;
    Ok(())
}

fn upload(
    folder: &mut FolderReplica,
    client: &HubClient,
    entry: &WorkspaceEntry,
    hub_knowledge: &Knowledge,
    limits: BatchLimits,
    options: &SyncOptions<'_>,
    report: &mut SyncReport,
) -> Result<(), AgentError> {
    let give_way = options.give_way;
    let store = folder.store();
    let own = store.identity().replica;
    let mut missing = store.missing_for(hub_knowledge)?;
    let found = missing.len();
    if options.own_versions_only {
        missing.retain(|(_, version)| version.dot.writer.replica == own);
    }
    // A refused version stays refused until an owner lifts it; it is not offered again.
    store.drop_refused(&mut missing)?;
    let withheld = missing.len() < found;
    if missing.is_empty() {
        return Ok(());
    }
    let offer = SyncOffer {
        knowledge: store.knowledge()?,
        forgotten: store.forgotten()?,
    };
    let skip = std::env::var(FAULT_SKIP_UPLOAD)
        .ok()
        .filter(|s| !s.is_empty());
    // With a version held back, the hub must not learn our whole knowledge (which includes
    // it); it learns only the dots it receives.
    let mut failed_before = withheld;
    let mut refused: Vec<(ItemId, Version, String)> = Vec::new();
    for batch in plan_batches(missing, &offer, limits) {
        give_way();
        let started = std::time::Instant::now();
        let mut contents: HashMap<ContentHash, ChunkedContent> = HashMap::new();
        for (_, version) in &batch.versions {
            let hash = version.entry.content.filter(|_| !version.entry.deleted);
            if let Some(content) = hash.map(|h| store.content(&h)).transpose()?.flatten() {
                contents.insert(content.hash, content);
            }
        }
        // Large contents the hub already holds (a renamed or copied file) go without their
        // chunk lists; the others, where the hub holds a similar content (an older version of
        // a changed file), as edits of that content's list.
        let mut bases: HashMap<ContentHash, Vec<ChunkedContent>> = HashMap::new();
        let mut asked: Vec<ContentHash> = Vec::new();
        for content in contents.values().filter(|c| c.size >= LOCAL_REUSE_MIN) {
            asked.push(content.hash);
            if content.chunks.len() >= shoal_protocol::DELTA_MIN_CHUNKS {
                let near = store.nearest_contents(
                    content.size,
                    |h| !contents.contains_key(h),
                    shoal_protocol::DELTA_BASES,
                )?;
                asked.extend(near.iter().map(|c| c.hash));
                bases.insert(content.hash, near);
            }
        }
        asked.sort_unstable_by_key(|h| h.0);
        asked.dedup();
        asked.truncate(shoal_protocol::HELD_MAX);
        let known = if asked.is_empty() {
            HashSet::new()
        } else {
            client.contents_known(&entry.id, &asked).unwrap_or_default()
        };
        let body = shoal_protocol::upload_batch(
            &batch,
            contents
                .values()
                .map(|c| {
                    if known.contains(&c.hash) {
                        return WireContent::held(&c.hash, c.size);
                    }
                    let held_bases: Vec<ChunkedContent> = bases
                        .remove(&c.hash)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|b| known.contains(&b.hash))
                        .collect();
                    WireContent::encode(c, &held_bases)
                })
                .collect(),
            !failed_before,
        );
        let batch_id = hex16(&rand::random());
        let asked_ms = started.elapsed().as_millis() as u64;
        let plan = client.upload_batch(&entry.id, &batch_id, &body)?;
        let planned_ms = started.elapsed().as_millis() as u64;
        let location = plan
            .locations
            .iter()
            .find(|l| l.transport == "http")
            .map(|l| l.url.clone())
            .ok_or_else(|| {
                AgentError::Protocol("the hub offered no http location for uploads".into())
            })?;
        // Every item's missing chunks, read from its file, in shared bundles.
        let mut outgoing = Vec::new();
        let mut sends: Vec<Option<usize>> = Vec::with_capacity(plan.items.len());
        for ((_, version), planned) in batch.versions.iter().zip(&plan.items) {
            if !planned.needed {
                sends.push(None);
                continue;
            }
            let withheld = skip
                .as_deref()
                .is_some_and(|s| version.entry.name.contains(s));
            let content = version.entry.content.and_then(|h| contents.get(&h));
            let file = match content {
                Some(content) if !withheld => folder.store().local_file_with(&content.hash)?,
                _ => None,
            };
            let (Some(content), Some(file)) = (content, file) else {
                sends.push(Some(usize::MAX));
                continue;
            };
            let wanted: HashSet<&str> = planned.missing.iter().map(String::as_str).collect();
            let mut seen = HashSet::new();
            let chunks = content
                .chunks
                .iter()
                .filter(|c| wanted.contains(hex32(&c.hash.0).as_str()) && seen.insert(c.hash))
                .collect();
            let mut path = folder.root().to_path_buf();
            path.extend(file.path.split('/'));
            sends.push(Some(outgoing.len()));
            outgoing.push(Outgoing {
                path,
                stamp: Stamp::recorded(&file),
                chunks,
            });
        }
        let (sent, chunk_count, byte_count) =
            send_contents(client, &location, &outgoing, give_way)?;
        report.chunks_uploaded += chunk_count;
        report.bytes_uploaded += byte_count;
        let mut statuses = Vec::new();
        for ((_, version), send) in batch.versions.iter().zip(&sends) {
            let transferred = match send {
                None => true,
                Some(index) => sent.get(*index).copied().unwrap_or(false),
            };
            statuses.push(TransferStatus {
                dot: WireDot::from(&version.dot),
                transferred,
            });
        }
        let sent_ms = started.elapsed().as_millis() as u64;
        let outcome = client.commit(&plan.commit, &CommitRequest { items: statuses })?;
        tracing::debug!(
            items = batch.versions.len(),
            chunks = chunk_count,
            asked_ms,
            planned_ms,
            sent_ms,
            committed_ms = started.elapsed().as_millis() as u64,
            "upload: batch"
        );
        let by_dot: HashMap<Dot, &(ItemId, Version)> =
            batch.versions.iter().map(|e| (e.1.dot, e)).collect();
        for item in &outcome.items {
            let dot = Dot::try_from(&item.dot)?;
            match item.outcome.as_str() {
                "applied" | "conflict" => report.uploaded += 1,
                "refused" => {
                    let reason = item
                        .reason
                        .clone()
                        .unwrap_or_else(|| "refused by the hub".into());
                    if let Some((id, version)) = by_dot.get(&dot) {
                        report
                            .refused
                            .push((version.entry.name.clone(), reason.clone()));
                        refused.push((*id, version.clone(), reason));
                    }
                    failed_before = true;
                }
                _ => {
                    report.upload_failed += 1;
                    failed_before = true;
                }
            }
        }
    }
    if !refused.is_empty() {
        // Kept, marked refused: the version stays on this device and `status` shows it.
        let now = now_ns();
        let mut tx = folder.store_mut().begin()?;
        for (item, version, reason) in &refused {
            tx.put_refused(*item, version, reason, now)?;
        }
        tx.commit()?;
    }
    Ok(())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The other side of a download: who to ask, what it knows, limits, and the peers to try
/// first for content.
struct Remote<'a> {
    client: &'a HubClient,
    knowledge: &'a Knowledge,
    limits: BatchLimits,
    peers: &'a [HubClient],
    early: Option<&'a Early>,
}

/// A batch's contents and a source with its small files' chunks fetched, up to `budget`
/// bytes (this batch's contents only: cloning every list received so far for each batch
/// held two copies of them at the end of a large download).
fn batch_source<'a>(
    client: &'a HubClient,
    contents: &[ChunkedContent],
    locations: Vec<Location>,
    workspace: &'a str,
    peers: &'a [HubClient],
    budget: u64,
) -> HubSource<'a> {
    let mut source = HubSource::new(
        client,
        contents.iter().map(|c| (c.hash, c.clone())).collect(),
        locations,
        workspace,
        peers,
    );
    source.prefetch(contents, budget);
    source
}

/// Where a batch's content is fetched from: its own locations, else those given before.
fn batch_locations(wire: &WireBatch, before: &[Location]) -> Vec<Location> {
    if wire.locations.is_empty() {
        before.to_vec()
    } else {
        wire.locations.clone()
    }
}

/// The chunk lists of a batch's contents, some taken from the replica (held here, or the
/// base of an edit).
fn resolve_contents(
    folder: &FolderReplica,
    wire: &WireBatch,
) -> Result<Vec<ChunkedContent>, AgentError> {
    let mut contents = Vec::with_capacity(wire.contents.len());
    for content in &wire.contents {
        contents.push(if content.held {
            // We said we hold its chunk list.
            let hash = shoal_protocol::parse_hash(&content.hash)?;
            folder.store().content(&hash)?.ok_or_else(|| {
                AgentError::Protocol(format!("content {hash} came without its chunk list"))
            })?
        } else {
            // An edit of a list we hold (a large file changed in a few places).
            let base = match content.base_hash()? {
                Some(base) => folder.store().content(&base)?,
                None => None,
            };
            content.resolve(base.as_ref())?
        });
    }
    Ok(contents)
}

/// The next batch, fetched while the current one is written.
struct Ahead<'a> {
    wire: WireBatch,
    /// Its contents and a source with part of their chunks, when its chunk lists need
    /// nothing from the replica (none held here, none an edit of one).
    fetched: Option<(Vec<ChunkedContent>, HubSource<'a>)>,
}

fn fetch_ahead<'a>(
    client: &'a HubClient,
    next: &str,
    locations: &[Location],
    workspace: &'a str,
    peers: &'a [HubClient],
) -> Result<Ahead<'a>, AgentError> {
    let wire = client.batch(next)?;
    let mut contents = Vec::with_capacity(wire.contents.len());
    for content in &wire.contents {
        if content.held || content.base_hash()?.is_some() {
            return Ok(Ahead {
                wire,
                fetched: None,
            });
        }
        contents.push(content.resolve(None)?);
    }
    let locations = batch_locations(&wire, locations);
    let source = batch_source(client, &contents, locations, workspace, peers, AHEAD_MAX);
    Ok(Ahead {
        wire,
        fetched: Some((contents, source)),
    })
}

fn download(
    folder: &mut FolderReplica,
    remote: Remote<'_>,
    entry: &WorkspaceEntry,
    progress: &dyn Progress,
    report: &mut SyncReport,
) -> Result<(), AgentError> {
    let Remote {
        client,
        knowledge: hub_knowledge,
        limits,
        peers,
        early,
    } = remote;
    let request = DownloadRequest {
        knowledge: WireKnowledge::from(&folder.store().knowledge()?),
        limits: WireLimits {
            max_items: limits.max_items,
            max_bytes: limits.max_bytes,
        },
        // Chunk lists of large contents we hold need not travel again (a renamed file).
        held: folder
            .store()
            .contents_at_least(LOCAL_REUSE_MIN, shoal_protocol::HELD_MAX)?
            .iter()
            .map(|h| hex32(&h.0))
            .collect(),
    };
    let started = std::time::Instant::now();
    let response = client.download(&entry.id, &request)?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "download: planned"
    );
    report.hub_tag = response.tag.clone();
    if response.recovery {
        let candidates = folder.recovery_candidates(hub_knowledge)?;
        if !candidates.is_empty() {
            let answer = client.recovery(
                &entry.id,
                &RecoveryRequest {
                    candidates: candidates
                        .iter()
                        .map(|(item, dot)| ItemDot {
                            item: hex16(&item.0),
                            dot: WireDot::from(dot),
                        })
                        .collect(),
                },
            )?;
            let mut dead = Vec::new();
            for found in &answer.dead {
                dead.push((parse_item(&found.item)?, Dot::try_from(&found.dot)?));
            }
            report.recovered +=
                folder.drop_dead(&dead, &VersionVector::try_from(&answer.forgotten)?)?;
        }
    }
    let mut session = Receiving::new();
    let mut wire = response.batch;
    let mut results = Vec::new();
    let mut locations: Vec<Location> = Vec::new();
    // The next batch's contents and chunks, fetched while this one was written.
    let mut fetched_ahead: Option<(Vec<ChunkedContent>, HubSource)> = None;
    // Each batch is staged while the one before it commits: the disk takes the new files while
    // the database takes the batch before. Opened with the first batch that brings anything
    // (most rounds bring nothing).
    let mut stager: Option<Stager> = None;
    let mut uncommitted: Option<(Batch, Vec<ChunkedContent>, Staged)> = None;
    let mut batch_started = std::time::Instant::now();
    loop {
        let batch = batch_from_wire(&wire)?;
        locations = batch_locations(&wire, &locations);
        let (contents, source) = match fetched_ahead.take() {
            Some((contents, mut source)) => {
                source.prefetch(&contents, PREFETCH_MAX);
                (contents, source)
            }
            None => {
                // Its chunk lists are read from the replica. What they name was held before
                // this download began, but the replica is read only once the batch before is in.
                if let Some(before) = uncommitted.take() {
                    commit(folder, &mut session, &before, &mut results, report)?;
                }
                let contents = resolve_contents(folder, &wire)?;
                let source = batch_source(
                    client,
                    &contents,
                    locations.clone(),
                    &entry.id,
                    peers,
                    PREFETCH_MAX,
                );
                (contents, source)
            }
        };
        let local = local_chunks(folder, entry, &batch, &contents)?;
        let source = source.with_local(local).with_early(early);
        if stager.is_none() && !batch.versions.is_empty() {
            stager = Some(folder.stager()?);
        }
        let fetched_at = std::time::Instant::now();
        // The next batch is asked for, and its small files' chunks fetched, while this one
        // is written: the sender reads while the receiver writes.
        let next = wire.next.take();
        let (staged, committed, ahead) = std::thread::scope(|scope| {
            let ahead = next.as_ref().map(|next| {
                let locations = &locations;
                scope.spawn(move || fetch_ahead(client, next, locations, &entry.id, peers))
            });
            let (stager, before, batch, source) =
                (stager.as_ref(), uncommitted.as_ref(), &batch, &source);
            let staging = scope.spawn(move || match stager {
                Some(stager) => stager.stage(
                    &batch.versions,
                    source,
                    progress,
                    before.map(|(_, _, staged)| staged),
                ),
                None => Ok(Staged::default()),
            });
            let committed =
                before.map(|before| commit(folder, &mut session, before, &mut results, report));
            // A panic while staging is a bug: it goes on up as one.
            let staged = staging
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let ahead = ahead.map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(AgentError::Protocol(
                        "fetching the next batch failed".into(),
                    ))
                })
            });
            (staged, committed, ahead)
        });
        committed.transpose()?;
        let staged = staged?;
        tracing::debug!(
            items = batch.versions.len(),
            fetch_ms = (fetched_at - batch_started).as_millis() as u64,
            apply_ms = fetched_at.elapsed().as_millis() as u64,
            "download: batch staged, the one before committed"
        );
        report.bytes_from_peers += source.from_peers.load(std::sync::atomic::Ordering::Relaxed);
        report.bytes_from_hub += source.from_hub.load(std::sync::atomic::Ordering::Relaxed);
        drop(source);
        uncommitted = Some((batch, contents, staged));
        release_freed_memory();
        batch_started = std::time::Instant::now();
        match ahead {
            Some(ahead) => {
                let ahead = ahead?;
                wire = ahead.wire;
                fetched_ahead = ahead.fetched;
            }
            None => break,
        }
    }
    if let Some(last) = uncommitted.take() {
        commit(folder, &mut session, &last, &mut results, report)?;
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "download: applied"
    );
    // The files go in place before the result ends the session: until then the sender's
    // session stands (materialize may fetch from it), and a peer's hub upload, which gives
    // way to open pulls, does not compete with this device's writes.
    let materialized = if folder.store().needs_materialize()? {
        // Chunk lists come from the store, where each batch recorded them: holding every list
        // received would cost memory in proportion to the whole download.
        let source = HubSource::new(client, HashMap::new(), locations, &entry.id, peers)
            .with_index(folder.content_index()?)
            .with_early(early);
        let materialized = folder.materialize(Some(&source), progress);
        report.bytes_from_peers += source.from_peers.into_inner();
        report.bytes_from_hub += source.from_hub.into_inner();
        Some(materialized)
    } else {
        None
    };
    // Spelled out for the wire only now: a large download's results, as sent, would take
    // several times the memory while materialize holds the whole layout.
    let items = results
        .iter()
        .map(|(dot, applied)| ItemResult {
            dot: WireDot::from(dot),
            status: if *applied {
                "applied".into()
            } else {
                "failed".into()
            },
            error: (!applied).then(|| "content could not be fetched".into()),
        })
        .collect();
    drop(results);
    client.download_result(
        &response.result,
        &DownloadResult {
            items,
            knowledge: WireKnowledge::from(&folder.store().knowledge()?),
        },
    )?;
    if let Some(materialized) = materialized {
        report.materialize = materialized?;
    }
    Ok(())
}

/// Commits a staged batch, and notes per version whether it was applied.
fn commit(
    folder: &mut FolderReplica,
    session: &mut Receiving,
    (batch, contents, staged): &(Batch, Vec<ChunkedContent>, Staged),
    results: &mut Vec<(Dot, bool)>,
    report: &mut SyncReport,
) -> Result<(), AgentError> {
    let applied = folder.commit_batch(session, batch, contents, staged)?;
    report.downloaded += applied.received;
    report.conflicts += applied.conflicts;
    report.download_failed += applied.failed;
    let knowledge = folder.store().knowledge()?;
    results.extend(
        batch
            .versions
            .iter()
            .map(|(_, version)| (version.dot, knowledge.contains(&version.dot))),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes::noise;
    use std::path::Path;
    use std::time::Duration;

    /// Writes `bytes` to `path` with the byte at `at` flipped, dated later: a change the
    /// scan's record no longer matches.
    fn change_later(path: &Path, bytes: &[u8], at: usize) -> std::io::Result<()> {
        let mut changed = bytes.to_vec();
        changed[at] ^= 0xff;
        std::fs::write(path, &changed)?;
        let later = std::time::SystemTime::now() + Duration::from_secs(5);
        File::options().write(true).open(path)?.set_modified(later)
    }

    /// The whole of `content`, copied from `held` by `copy_local_run` a group at a time, into
    /// a plain file or a `LargeFile` (around the page cache).
    fn copy_from_local(
        held: &Path,
        content: &ChunkedContent,
        stamp: Option<Stamp>,
        dest: &Path,
        large: bool,
    ) -> Result<bool, Box<dyn std::error::Error>> {
        let client = HubClient::new("http://127.0.0.1:9", None)?;
        let mut local = LocalChunks::default();
        for chunk in &content.chunks {
            local
                .chunks
                .insert(chunk.hash, (held.to_path_buf(), chunk.offset, chunk.len));
        }
        if let Some(stamp) = stamp {
            local.stamps.insert(held.to_path_buf(), stamp);
        }
        let source =
            HubSource::new(&client, HashMap::new(), Vec::new(), "w", &[]).with_local(local);
        let groups = bundle_groups(content.chunks.iter().map(|c| (content.hash, c)).collect());
        let mut run = Vec::new();
        let out = shoal_store::LargeFile::create(dest, content.size)?;
        let large = large.then_some(&out);
        Ok(groups
            .iter()
            .all(|group| source.copy_local_run(group, out.file(), large, &mut run)))
    }

    #[test]
    fn local_chunks_are_copied_unread_only_from_a_file_as_scanned()
    -> Result<(), Box<dyn std::error::Error>> {
        for large in [false, true] {
            let dir = tempfile::tempdir()?;
            let held = dir.path().join("held.bin");
            let dest = dir.path().join("dest.bin");
            let bytes = noise(5 << 20, 11);
            std::fs::write(&held, &bytes)?;
            let content = shoal_store::chunk_bytes(&bytes);
            let as_scanned = Stamp::of(&File::open(&held)?);
            assert!(as_scanned.is_some());

            // As scanned, or with a stale record (then every chunk is read and checked).
            assert!(copy_from_local(&held, &content, as_scanned, &dest, large)?);
            assert_eq!(std::fs::read(&dest)?, bytes);
            std::fs::remove_file(&dest)?;
            assert!(copy_from_local(&held, &content, None, &dest, large)?);
            assert_eq!(std::fs::read(&dest)?, bytes);

            // Changed since the scan (same size, other bytes, a new modification time): the
            // record no longer matches, the check finds the changed chunk, and the copy is
            // refused.
            change_later(&held, &bytes, 3 << 20)?;
            assert_ne!(Stamp::of(&File::open(&held)?), as_scanned);
            assert!(!copy_from_local(&held, &content, as_scanned, &dest, large)?);
        }
        Ok(())
    }

    /// Pieces read for a bundle: unhashed from a file as scanned, checked otherwise, and a
    /// changed file leaves the bundle as it was.
    #[test]
    fn bundled_pieces_are_checked_unless_the_file_is_as_scanned()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let held = dir.path().join("held.bin");
        let bytes = noise(3 << 20, 5);
        std::fs::write(&held, &bytes)?;
        let content = shoal_store::chunk_bytes(&bytes);
        let as_scanned = Stamp::of(&File::open(&held)?).ok_or("no stamp")?;
        let pieces: Vec<&ChunkRef> = content.chunks.iter().skip(2).take(5).collect();
        let expected = |bundle: &[u8]| -> Result<(), Box<dyn std::error::Error>> {
            let frames = shoal_protocol::unbundle_chunks(bundle)?;
            assert_eq!(frames.len(), pieces.len());
            for ((hash, body), piece) in frames.iter().zip(&pieces) {
                assert_eq!(*hash, piece.hash);
                let at = piece.offset as usize;
                assert_eq!(*body, &bytes[at..at + piece.len as usize]);
            }
            Ok(())
        };
        let mut bundle = b"earlier frames".to_vec();
        assert!(bundle_pieces(
            &mut bundle,
            &File::open(&held)?,
            as_scanned,
            &pieces
        ));
        expected(&bundle[14..])?;
        // A stale record: every piece is checked, and they still match.
        let stale = Stamp {
            mtime_ns: as_scanned.mtime_ns - 1,
            ..as_scanned
        };
        let mut bundle = Vec::new();
        assert!(bundle_pieces(
            &mut bundle,
            &File::open(&held)?,
            stale,
            &pieces
        ));
        expected(&bundle)?;

        // Changed inside one of the pieces: the record no longer matches, the check finds it,
        // and the bundle is left as it was.
        change_later(&held, &bytes, pieces[3].offset as usize + 7)?;
        let mut bundle = b"earlier frames".to_vec();
        assert!(!bundle_pieces(
            &mut bundle,
            &File::open(&held)?,
            as_scanned,
            &pieces
        ));
        assert_eq!(bundle, b"earlier frames");
        Ok(())
    }

    #[test]
    fn a_content_whose_list_is_not_in_memory_is_found_in_the_store()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("folder");
        std::fs::create_dir(&root)?;
        let held = root.join("held.bin");
        let bytes = noise(3 << 20, 12);
        std::fs::write(&held, &bytes)?;
        let mut folder = FolderReplica::open(&root, "d")?;
        folder.scan(
            &shoal_folder::ScanOptions::default(),
            &shoal_folder::NoProgress,
        )?;
        let content = shoal_store::chunk_bytes(&bytes);
        let mut local = LocalChunks::default();
        for chunk in &content.chunks {
            local
                .chunks
                .insert(chunk.hash, (held.clone(), chunk.offset, chunk.len));
        }
        // Nothing listens at the hub's address: every chunk must come from the held file.
        let client = HubClient::new("http://127.0.0.1:9", None)?;
        let source =
            HubSource::new(&client, HashMap::new(), Vec::new(), "w", &[]).with_local(local);
        let dest = dir.path().join("dest.bin");
        assert!(!source.copy_to(&content.hash, &dest));
        let source = source.with_index(folder.content_index()?);
        assert!(source.copy_to(&content.hash, &dest));
        assert_eq!(std::fs::read(&dest)?, bytes);
        Ok(())
    }
}
