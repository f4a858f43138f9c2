//! Scanning: what changed on disk since the last scan becomes new versions.
//!
//! Only files whose size, modification time, inode or mode changed are read and hashed (in
//! parallel). A path that vanished while an unknown path with the same inode appeared is a
//! rename or move of the same item. A path that holds exactly what the layout wants there but
//! was not recorded (a crash after a file was renamed into place, before it was recorded) is
//! adopted, not taken for a new local change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir};
use shoal_core::{
    Entry, ItemId, ItemKind, ItemState, Knowledge, Role, STATE_DIR_NAME, TEMP_PREFIX, layout,
    validate_name,
};
use shoal_store::{
    ChunkedContent, LocalFile, LocalRecords, LocalStat, Store, Transaction, chunk_reader,
    rechunk_reader,
};

use crate::{FolderError, FolderReplica, Progress, io_error, now_ns};

/// How to scan.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Accept a folder that became empty (the user really deleted everything).
    pub allow_empty: bool,
}

/// A path the scan did not take, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The path, lossily decoded if it is not UTF-8.
    pub path: String,
    /// Why it was not synced.
    pub reason: String,
}

/// What a scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// New files and folders.
    pub created: usize,
    /// Files with new content or mode.
    pub modified: usize,
    /// Renamed or moved items.
    pub moved: usize,
    /// Deleted items.
    pub deleted: usize,
    /// Conflict copies the user removed or changed (the conflict is settled).
    pub resolved: usize,
    /// Bytes read to hash changed files.
    pub hashed_bytes: u64,
    /// Paths not synced.
    pub skipped: Vec<Skipped>,
}

impl ScanReport {
    /// Whether the scan recorded any new version.
    pub fn changed(&self) -> bool {
        self.created + self.modified + self.moved + self.deleted + self.resolved > 0
    }
}

/// What a file system entry looks like, for change detection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) kind: ItemKind,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
    pub(crate) inode: u64,
    pub(crate) executable: bool,
}

impl Found {
    /// The record of `path` showing `version` of `item`, as found on disk.
    pub(crate) fn record(
        &self,
        path: String,
        item: ItemId,
        role: Role,
        version: &shoal_core::Version,
    ) -> LocalFile {
        LocalFile {
            path,
            item,
            role,
            dot: version.dot,
            history: version.history(),
            kind: self.kind,
            content: version.entry.content,
            size: self.size,
            mtime_ns: self.mtime_ns,
            inode: self.inode,
            executable: self.executable,
        }
    }
}

fn found_from(metadata: &fs::Metadata) -> Option<Found> {
    let kind = if metadata.is_dir() {
        ItemKind::Directory
    } else if metadata.is_file() {
        ItemKind::File
    } else {
        return None;
    };
    Some(Found {
        kind,
        size: if kind == ItemKind::File {
            metadata.len()
        } else {
            0
        },
        mtime_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
        inode: metadata.ino(),
        executable: kind == ItemKind::File && metadata.permissions().mode() & 0o111 != 0,
    })
}

pub(crate) fn same_stat(found: &Found, recorded: &LocalFile) -> bool {
    same_as(
        found,
        recorded.kind,
        recorded.size,
        recorded.mtime_ns,
        recorded.inode,
        recorded.executable,
    )
}

fn same_stat_as(found: &Found, recorded: &LocalStat) -> bool {
    same_as(
        found,
        recorded.kind,
        recorded.size,
        recorded.mtime_ns,
        recorded.inode,
        recorded.executable,
    )
}

fn same_as(
    found: &Found,
    kind: ItemKind,
    size: u64,
    mtime_ns: i64,
    inode: u64,
    executable: bool,
) -> bool {
    found.kind == kind
        && (found.kind == ItemKind::Directory
            || found.size == size
                && found.mtime_ns == mtime_ns
                && found.inode == inode
                && found.executable == executable)
}

fn parent_path(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// The name of the files that exclude paths from syncing (gitignore syntax).
const IGNORE_FILE: &str = ".shoalignore";

/// The `.shoalignore` rules in force in one directory: its own file's, then its parents'.
struct Rules {
    matcher: Gitignore,
    parent: Option<Arc<Rules>>,
}

/// Whether the rules exclude `path` (absolute). The nearest file with a matching pattern
/// decides, so a folder's own file can re-include what a parent's excludes.
fn ignored(rules: Option<&Arc<Rules>>, path: &Path, is_dir: bool) -> bool {
    let mut next = rules;
    while let Some(level) = next {
        match level.matcher.matched(path, is_dir) {
            ignore::Match::None => next = level.parent.as_ref(),
            decided => return decided.is_ignore(),
        }
    }
    false
}

#[allow(clippy::unnecessary_cast)] // the field types differ between architectures
fn found_from_stat(stat: &rustix::fs::Stat) -> Option<Found> {
    let kind = match FileType::from_raw_mode(stat.st_mode as u32) {
        FileType::Directory => ItemKind::Directory,
        FileType::RegularFile => ItemKind::File,
        _ => return None,
    };
    let file = kind == ItemKind::File;
    Some(Found {
        kind,
        size: if file { stat.st_size as u64 } else { 0 },
        mtime_ns: stat.st_mtime as i64 * 1_000_000_000 + stat.st_mtime_nsec as i64,
        inode: stat.st_ino as u64,
        executable: file && stat.st_mode as u32 & 0o111 != 0,
    })
}

/// Reads a folder's directories: each is read once and its entries are stat'ed relative to it
/// (no path lookup per file).
struct Walker<'a> {
    root: &'a Path,
    skipped: &'a Mutex<Vec<Skipped>>,
    /// Taken at the first temporary file met: the right to remove them, which no process
    /// putting files in place holds meanwhile (see [`crate::WritingLock`]).
    may_remove_temps: std::sync::OnceLock<Option<crate::WritingLock>>,
}

impl Walker<'_> {
    fn skip(&self, path: String, reason: String) {
        if let Ok(mut list) = self.skipped.lock() {
            list.push(Skipped { path, reason });
        }
    }

    /// The entries of the directory at `relative` ("" for the root), and the rules in force
    /// below it.
    fn read_dir(
        &self,
        relative: &str,
        rules: Option<Arc<Rules>>,
    ) -> (Vec<(String, Found)>, Option<Arc<Rules>>) {
        let absolute = crate::absolute(self.root, relative);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let dir = match rustix::fs::open(&absolute, flags, Mode::empty()) {
            Ok(dir) => dir,
            Err(error) => {
                self.skip(String::new(), walk_error(&absolute, error));
                return (Vec::new(), rules);
            }
        };
        // Names (each with its NUL) in one buffer: no allocation per entry.
        let mut names: Vec<u8> = Vec::new();
        let mut entries: Vec<(usize, usize, FileType)> = Vec::new();
        let mut buffer: Vec<u8> = Vec::with_capacity(32 * 1024);
        let mut listing = RawDir::new(&dir, buffer.spare_capacity_mut());
        while let Some(entry) = listing.next() {
            match entry {
                Ok(entry) => {
                    let name = entry.file_name().to_bytes_with_nul();
                    if name == b".\0" || name == b"..\0" {
                        continue;
                    }
                    let start = names.len();
                    names.extend_from_slice(name);
                    entries.push((start, names.len(), entry.file_type()));
                }
                Err(error) => {
                    self.skip(String::new(), walk_error(&absolute, error));
                    break;
                }
            }
        }
        let mut rules = rules;
        let has_ignore_file = entries
            .iter()
            .any(|&(start, end, _)| &names[start..end - 1] == IGNORE_FILE.as_bytes());
        if has_ignore_file {
            rules = self.read_rules(&absolute, rules);
        }

        let mut found = Vec::with_capacity(entries.len());
        for &(start, end, listed_type) in &entries {
            let Ok(c_name) = CStr::from_bytes_with_nul(&names[start..end]) else {
                continue;
            };
            let name = c_name.to_bytes();
            let stat = rustix::fs::statat(&dir, c_name, AtFlags::SYMLINK_NOFOLLOW);
            let info = stat.as_ref().ok().and_then(found_from_stat);
            let is_dir = match &stat {
                Ok(_) => info.as_ref().is_some_and(|f| f.kind == ItemKind::Directory),
                Err(_) => listed_type == FileType::Directory,
            };
            if rules.is_some()
                && ignored(
                    rules.as_ref(),
                    &absolute.join(OsStr::from_bytes(name)),
                    is_dir,
                )
            {
                continue;
            }
            if name.starts_with(TEMP_PREFIX.as_bytes()) {
                // Left by a run that was killed before renaming it into place: never complete.
                // Unless another process is putting files in place right now: then it is
                // theirs, and left alone.
                let alone = self
                    .may_remove_temps
                    .get_or_init(|| crate::WritingLock::exclusive_now(self.root))
                    .is_some();
                if alone {
                    let _ = rustix::fs::unlinkat(&dir, c_name, AtFlags::empty());
                }
                continue;
            }
            if relative.is_empty() && name == STATE_DIR_NAME.as_bytes() {
                continue;
            }
            let text = match std::str::from_utf8(name) {
                Ok(text) => text,
                Err(_) => {
                    let lossy = String::from_utf8_lossy(name);
                    let path = if relative.is_empty() {
                        lossy.into_owned()
                    } else {
                        format!("{relative}/{lossy}")
                    };
                    self.skip(path, "the name is not valid UTF-8".into());
                    continue;
                }
            };
            let mut path = String::with_capacity(relative.len() + 1 + text.len());
            if !relative.is_empty() {
                path.push_str(relative);
                path.push('/');
            }
            path.push_str(text);
            if let Err(error) = validate_name(text) {
                self.skip(path, error.to_string());
                continue;
            }
            match info {
                Some(info) => found.push((path, info)),
                None => self.skip(
                    path,
                    "not a regular file or directory (symlinks are not synced)".into(),
                ),
            }
        }
        (found, rules)
    }

    /// The rules of the directory at `absolute` (which holds a `.shoalignore`) over `parent`.
    fn read_rules(&self, absolute: &Path, parent: Option<Arc<Rules>>) -> Option<Arc<Rules>> {
        let file = absolute.join(IGNORE_FILE);
        if !file.exists() {
            return parent;
        }
        let mut builder = GitignoreBuilder::new(absolute);
        if let Some(error) = builder.add(&file) {
            self.skip(String::new(), error.to_string());
        }
        match builder.build() {
            Ok(matcher) => Some(Arc::new(Rules { matcher, parent })),
            Err(error) => {
                self.skip(String::new(), error.to_string());
                parent
            }
        }
    }
}

fn walk_error(path: &Path, error: rustix::io::Errno) -> String {
    format!("{}: {}", path.display(), std::io::Error::from(error))
}

/// Walks the folder: every file and directory, minus shoal's own state, temporary files and
/// what `.shoalignore` files exclude; sorted by path.
fn walk(root: &Path, skipped: &Mutex<Vec<Skipped>>) -> Vec<(String, Found)> {
    let walker = Walker {
        root,
        skipped,
        may_remove_temps: std::sync::OnceLock::new(),
    };
    let mut found = Vec::new();
    // One depth at a time, its directories in parallel: no recursion, however deep the tree,
    // and only one directory open per thread.
    let mut level: Vec<(String, Option<Arc<Rules>>)> = vec![(String::new(), None)];
    while !level.is_empty() {
        let read: Vec<_> = level
            .par_iter()
            .map(|(relative, rules)| walker.read_dir(relative, rules.clone()))
            .collect();
        level = Vec::new();
        for (entries, rules) in read {
            for (path, info) in &entries {
                if info.kind == ItemKind::Directory {
                    level.push((path.clone(), rules.clone()));
                }
            }
            found.extend(entries);
        }
    }
    found.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    found
}

/// From this size, a file changed in place is cut with the help of its earlier chunk list.
const RECUT_MIN: u64 = 1 << 20;

/// Hashes a file and checks it did not change while being read. `earlier` is the chunk list
/// of what the path held before, when it may help.
fn hash_file(
    path: &Path,
    expected: &Found,
    earlier: Option<&ChunkedContent>,
) -> Option<ChunkedContent> {
    let file = fs::File::open(path).ok()?;
    let content = match earlier {
        Some(earlier) => rechunk_reader(&file, earlier).ok()?,
        None => chunk_reader(&file, expected.size).ok()?,
    };
    // The file read, not the path: one that replaced it meanwhile has another inode.
    let after = found_from(&file.metadata().ok()?)?;
    (after.inode == expected.inode
        && after.size == expected.size
        && after.mtime_ns == expected.mtime_ns
        && content.size == expected.size)
        .then_some(content)
}

/// Item states read on demand.
#[derive(Default)]
struct StateCache {
    states: HashMap<ItemId, Option<ItemState>>,
}

impl StateCache {
    fn get(
        &mut self,
        tx: &mut Transaction<'_>,
        id: &ItemId,
    ) -> Result<Option<&ItemState>, FolderError> {
        if !self.states.contains_key(id) {
            self.states
                .insert(*id, shoal_core::ItemAccess::get(tx, id)?);
        }
        Ok(self.cached(id))
    }

    fn cached(&self, id: &ItemId) -> Option<&ItemState> {
        self.states.get(id).and_then(Option::as_ref)
    }
}

struct Pending {
    entry: Entry,
    base: Knowledge,
    resolves: Vec<Knowledge>,
    /// Where the change was seen on disk, as an index into what the walk found (none for
    /// deletions and settled conflicts).
    at: Option<usize>,
    /// A new item under a new random id: no state to read or merge.
    created: bool,
    /// The chunk list of a file's new content.
    content: Option<ChunkedContent>,
}

impl Pending {
    fn new(
        entry: Entry,
        base: Knowledge,
        at: Option<usize>,
        content: Option<ChunkedContent>,
    ) -> Pending {
        Pending {
            entry,
            base,
            resolves: Vec::new(),
            at,
            created: false,
            content,
        }
    }

    fn created(entry: Entry, at: usize, content: Option<ChunkedContent>) -> Pending {
        Pending {
            created: true,
            ..Pending::new(entry, Knowledge::new(), Some(at), content)
        }
    }
}

/// How what the walk found lines up with the records, path by path.
struct Pairing {
    /// For each path found, its record (an index into the records).
    record_of: Vec<Option<usize>>,
    /// For each record, whether its path was found with the same kind.
    present: Vec<bool>,
    /// Whether every path found has a record showing the same stat, and every record was
    /// found.
    unchanged: bool,
}

/// Pairs two lists sorted by path in one pass.
fn pair(found: &[(String, Found)], records: &[LocalStat]) -> Pairing {
    let mut pairing = Pairing {
        record_of: vec![None; found.len()],
        present: vec![false; records.len()],
        unchanged: found.len() == records.len(),
    };
    let (mut i, mut j) = (0, 0);
    while i < found.len() && j < records.len() {
        let (path, info) = &found[i];
        match path.as_str().cmp(records[j].path.as_str()) {
            std::cmp::Ordering::Less => {
                pairing.unchanged = false;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                pairing.unchanged = false;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                pairing.record_of[i] = Some(j);
                pairing.present[j] = info.kind == records[j].kind;
                pairing.unchanged &= same_stat_as(info, &records[j]);
                i += 1;
                j += 1;
            }
        }
    }
    pairing
}

impl FolderReplica {
    /// Records every change made on disk since the last scan as new versions, in one
    /// transaction.
    pub fn scan(
        &mut self,
        options: &ScanOptions,
        progress: &dyn Progress,
    ) -> Result<ScanReport, FolderError> {
        let mut attempts = 1;
        loop {
            match self.scan_once(options, progress) {
                Err(FolderError::ChangedMeanwhile) if attempts < SCAN_ATTEMPTS => attempts += 1,
                done => return done,
            }
        }
    }

    /// One scan, refused (`ChangedMeanwhile`) if another process wrote the replica after
    /// the records the scan decides from were read.
    fn scan_once(
        &mut self,
        options: &ScanOptions,
        progress: &dyn Progress,
    ) -> Result<ScanReport, FolderError> {
        if !self.root.is_dir() {
            return Err(FolderError::RootMissing(self.root.clone()));
        }
        let seen = self.store.data_version()?;
        progress.start("scan", 0);
        let skipped = Mutex::new(Vec::new());
        let started = std::time::Instant::now();
        // The walk runs on the thread pool while this thread loads the records.
        let mut found = Vec::new();
        let root = &self.root;
        let store = &self.store;
        let recorded = rayon::in_place_scope(|scope| {
            scope.spawn(|_| {
                found = walk(root, &skipped);
                tracing::debug!(
                    entries = found.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "walked"
                );
            });
            let recorded = store.local_records();
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "loaded records"
            );
            recorded
        })?;
        let mut report = ScanReport {
            skipped: skipped.into_inner().unwrap_or_default(),
            ..ScanReport::default()
        };
        if found.is_empty() && !recorded.is_empty() && !options.allow_empty {
            return Err(FolderError::LooksEmpty {
                path: self.root.clone(),
                recorded: recorded.len(),
            });
        }
        let stats = recorded.stats();
        let Pairing {
            record_of,
            present,
            unchanged,
        } = pair(&found, stats);
        let record_at = |i: usize| record_of[i].map(|j| &stats[j]);

        // Renames: vanished paths by inode.
        let mut vanished_by_inode: HashMap<(u64, ItemKind), usize> = HashMap::new();
        for (j, file) in stats.iter().enumerate() {
            if !present[j] && file.role == Role::Main {
                vanished_by_inode.insert((file.inode, file.kind), j);
            }
        }
        // A new path showing a vanished file (same inode, size, time and mode) is that file
        // renamed: its content is known, so a renamed large file is not read again.
        let renamed: HashMap<usize, usize> = found
            .iter()
            .enumerate()
            .filter(|(i, (_, info))| info.kind == ItemKind::File && record_of[*i].is_none())
            .filter_map(|(i, (_, info))| {
                let old = *vanished_by_inode.get(&(info.inode, info.kind))?;
                (same_stat_as(info, &stats[old]) && stats[old].content.is_some())
                    .then_some((i, old))
            })
            .collect();

        // Hash what may have changed, in parallel.
        let to_hash: Vec<usize> = (0..found.len())
            .filter(|&i| {
                let info = &found[i].1;
                info.kind == ItemKind::File
                    && !record_at(i).is_some_and(|r| same_stat_as(info, r))
                    && !renamed.contains_key(&i)
            })
            .collect();
        progress.finish();
        progress.start("hash", to_hash.iter().map(|&i| found[i].1.size).sum());
        // A large file changed in place is mostly as it was: its earlier chunks are confirmed
        // by their hashes, and cut points are searched for only around the change.
        let mut earlier: HashMap<usize, ChunkedContent> = HashMap::new();
        for &i in &to_hash {
            let hash = record_at(i)
                .filter(|r| r.size >= RECUT_MIN && found[i].1.size >= RECUT_MIN)
                .and_then(|r| r.content);
            if let Some(content) = hash.map(|h| self.store.content(&h)).transpose()?.flatten() {
                earlier.insert(i, content);
            }
        }
        if !earlier.is_empty() {
            let mut rereading: Vec<(&str, u64)> = earlier
                .keys()
                .map(|&i| (found[i].0.as_str(), found[i].1.size))
                .collect();
            rereading.sort_unstable();
            progress.rereading(&rereading);
        }
        if unchanged && to_hash.is_empty() {
            progress.finish();
            return Ok(report);
        }

        // Files put in place before a crash can only exist while the disk lags the states.
        let laid_out = if self.store.needs_materialize()? {
            Some(self.store.load_items()?)
        } else {
            None
        };
        let desired = crate::Desired(
            laid_out
                .iter()
                .flat_map(|items| layout(items).placements)
                .collect(),
        );
        let removed_paths: Vec<&str> = stats
            .iter()
            .zip(&present)
            .filter(|(_, present)| !**present)
            .map(|(file, _)| file.path.as_str())
            .collect();
        // New items get random ids, handed out in ascending order along the walk: their
        // versions then go to the end of the item index, not to random places in it.
        let mut fresh_ids: Vec<ItemId> = record_of
            .iter()
            .filter(|r| r.is_none())
            .map(|_| ItemId(rand::random()))
            .collect();
        fresh_ids.sort_unstable_by(|a, b| b.cmp(a));

        // The files are hashed on threads of their own, block by block along the walk, while
        // this thread decides what each entry is and writes it: the one transaction is open
        // while files are still being read.
        let root = &self.root;
        let blocks: Vec<&[usize]> = to_hash.chunks(HASH_BLOCK).collect();
        let next_block = AtomicUsize::new(0);
        let (sender, receiver) = mpsc::channel();
        let hash_blocks = |sender: mpsc::Sender<(usize, Vec<Option<ChunkedContent>>)>| {
            loop {
                let b = next_block.fetch_add(1, Ordering::Relaxed);
                let Some(block) = blocks.get(b) else { break };
                let contents: Vec<Option<ChunkedContent>> = block
                    .iter()
                    .map(|&i| {
                        let (path, info) = &found[i];
                        let content =
                            hash_file(&crate::absolute(root, path), info, earlier.get(&i));
                        progress.advance(info.size);
                        content
                    })
                    .collect();
                // The receiver is gone when the scan failed: no use hashing on.
                if sender.send((b, contents)).is_err() {
                    break;
                }
            }
        };
        let walked = Walked {
            seen,
            found: &found,
            stats,
            record_of: &record_of,
            present: &present,
            recorded: &recorded,
            renamed: &renamed,
            desired: &desired,
            to_hash: &to_hash,
            removed_paths,
            vanished_by_inode,
            fresh_ids,
        };
        let store = &mut self.store;
        std::thread::scope(|scope| {
            for _ in 0..rayon::current_num_threads().max(1).min(blocks.len()) {
                let (sender, hash_blocks) = (sender.clone(), &hash_blocks);
                scope.spawn(move || hash_blocks(sender));
            }
            drop(sender);
            let hashes = Hashes::new(receiver, &to_hash, found.len());
            record_changes(walked, store, hashes, &mut report, progress, started)
        })?;
        tracing::debug!(
            versions = report.created + report.modified + report.moved + report.deleted,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "committed"
        );
        Ok(report)
    }
}

/// How many times a scan starts again when another process writes the replica meanwhile.
const SCAN_ATTEMPTS: usize = 5;

/// What a scan's walk found, paired with the records: what `record_changes` decides from.
struct Walked<'a> {
    /// The replica's data version when its records were read.
    seen: i64,
    found: &'a [(String, Found)],
    stats: &'a [LocalStat],
    record_of: &'a [Option<usize>],
    present: &'a [bool],
    recorded: &'a LocalRecords,
    renamed: &'a HashMap<usize, usize>,
    desired: &'a crate::Desired<'a>,
    to_hash: &'a [usize],
    removed_paths: Vec<&'a str>,
    vanished_by_inode: HashMap<(u64, ItemKind), usize>,
    /// Ids for new items, the smallest last.
    fresh_ids: Vec<ItemId>,
}

/// Decides what each entry found is, as its hash arrives, and records every new version and
/// record in one transaction.
fn record_changes(
    walked: Walked<'_>,
    store: &mut Store,
    mut hashes: Hashes,
    report: &mut ScanReport,
    progress: &dyn Progress,
    started: std::time::Instant,
) -> Result<(), FolderError> {
    let Walked {
        seen,
        found,
        stats,
        record_of,
        present,
        recorded,
        renamed,
        desired,
        to_hash,
        removed_paths,
        mut vanished_by_inode,
        mut fresh_ids,
    } = walked;
    let record_at = |i: usize| record_of[i].map(|j| &stats[j]);
    let bytes = to_hash.iter().map(|&i| found[i].1.size).sum();
    if !write_while_hashing(to_hash.len(), bytes) {
        hashes.wait_for_all();
    }
    let now = now_ns();
    let mut tx = store.begin()?;
    // A command (such as `resolve`) that wrote meanwhile may have moved files and their
    // records: versions decided from the records read before would contradict its own.
    if tx.data_version()? != seen {
        return Err(FolderError::ChangedMeanwhile);
    }
    // Removed first: a path whose kind changed gets its new record below.
    for path in &removed_paths {
        tx.remove_local_file(path)?;
    }
    let mut items = StateCache::default();
    let mut path_items: HashMap<&str, ItemId> = HashMap::new();
    path_items.insert("", ItemId::ROOT);
    let mut pending: BTreeMap<ItemId, Pending> = BTreeMap::new();
    let mut records: Vec<LocalFile> = Vec::new();
    let mut new_contents: Vec<ChunkedContent> = Vec::new();
    let mut moved_from: HashSet<usize> = HashSet::new();
    let mut resolves: BTreeMap<ItemId, Vec<Knowledge>> = BTreeMap::new();

    for (i, (path, info)) in found.iter().enumerate() {
        let hashed = hashes.take(i);
        if let Some(Some(content)) = &hashed {
            report.hashed_bytes += content.size;
        }
        if matches!(hashed, Some(None)) {
            report.skipped.push(Skipped {
                path: path.clone(),
                reason: format!("changed while being read ({} bytes); will retry", info.size),
            });
            continue; // changed while hashing: next scan
        }
        let content = hashed.flatten();
        let Some(parent) = path_items.get(parent_path(path)).copied() else {
            report.skipped.push(Skipped {
                path: path.clone(),
                reason: "its folder is not synced".into(),
            });
            continue;
        };
        let content_hash = content
            .as_ref()
            .map(|c| c.hash)
            .or_else(|| record_at(i).and_then(|r| r.content))
            .or_else(|| renamed.get(&i).and_then(|&j| stats[j].content));
        let entry = Entry {
            parent,
            name: file_name(path).to_owned(),
            kind: info.kind,
            deleted: false,
            content: content_hash,
            size: info.size,
            mtime_ns: info.mtime_ns,
            executable: info.executable,
        };
        // What the layout wants here: adopt it when the disk already holds exactly
        // that.
        if let Some(want) = desired.get(path.as_str()) {
            let same = want.version.entry.kind == info.kind
                && (info.kind == ItemKind::Directory
                    || want.version.entry.content == content_hash
                        && want.version.entry.executable == info.executable);
            let already = match record_at(i) {
                Some(r) => same_stat_as(info, r) && recorded.dot(r)? == want.version.dot,
                None => false,
            };
            if same && !already {
                records.push(info.record(path.clone(), want.item, want.role, want.version));
                if want.role == Role::Main {
                    path_items.insert(path, want.item);
                }
                continue;
            }
        }
        match record_at(i).filter(|r| r.kind == info.kind) {
            Some(previous) if previous.role == Role::Main => {
                path_items.insert(path, previous.item);
                if info.kind == ItemKind::File && !same_stat_as(info, previous) {
                    let previous = recorded.full(previous)?;
                    if previous.content != content_hash || previous.executable != info.executable {
                        report.modified += 1;
                        pending.insert(
                            previous.item,
                            Pending::new(entry, previous.history, Some(i), content),
                        );
                    } else {
                        records.push(LocalFile {
                            size: info.size,
                            mtime_ns: info.mtime_ns,
                            inode: info.inode,
                            ..previous
                        });
                    }
                }
            }
            Some(previous) => {
                // A conflict copy: unchanged, or changed by the user (then it
                // becomes a file of its own and the conflict is settled).
                if same_stat_as(info, previous) {
                    continue;
                }
                resolves
                    .entry(previous.item)
                    .or_default()
                    .push(recorded.full(previous)?.history);
                report.created += 1;
                pending.insert(ItemId(rand::random()), Pending::created(entry, i, content));
            }
            None => {
                let moved = vanished_by_inode
                    .get(&(info.inode, info.kind))
                    .copied()
                    .filter(|&old| {
                        info.kind == ItemKind::Directory || stats[old].content == content_hash
                    });
                match moved {
                    Some(old) => {
                        vanished_by_inode.remove(&(info.inode, info.kind));
                        moved_from.insert(old);
                        let old = recorded.full(&stats[old])?;
                        path_items.insert(path, old.item);
                        let state = items.get(&mut tx, &old.item)?;
                        let unchanged_place = state.is_some_and(|s| {
                            let w = s.winner();
                            w.entry.parent == parent && w.entry.name == entry.name
                        });
                        if unchanged_place {
                            // Moved along with its folder: same parent id and
                            // name.
                            records.push(LocalFile {
                                path: path.clone(),
                                inode: info.inode,
                                mtime_ns: info.mtime_ns,
                                ..old
                            });
                        } else {
                            report.moved += 1;
                            pending.insert(
                                old.item,
                                Pending::new(entry, old.history, Some(i), content),
                            );
                        }
                    }
                    None => {
                        // A new item: nothing else in this scan can change it, so
                        // it is written now.
                        let item = fresh_ids.pop().unwrap_or_else(|| ItemId(rand::random()));
                        path_items.insert(path, item);
                        report.created += 1;
                        let version = tx.write_new(item, entry, now)?;
                        tx.put_local_file(&info.record(path.clone(), item, Role::Main, &version))?;
                        new_contents.extend(content);
                    }
                }
            }
        }
    }
    drop(hashes);
    progress.finish();
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "hashed and decided"
    );

    // Vanished paths: deletions, or settled conflicts.
    for (j, previous) in stats.iter().enumerate() {
        if present[j] || moved_from.contains(&j) {
            continue;
        }
        if previous.role == Role::ConflictCopy {
            resolves
                .entry(previous.item)
                .or_default()
                .push(recorded.full(previous)?.history);
            continue;
        }
        if pending.contains_key(&previous.item) {
            continue;
        }
        let Some(state) = items.get(&mut tx, &previous.item)? else {
            continue;
        };
        let mut entry = state.winner().entry.clone();
        entry.deleted = true;
        entry.content = None;
        report.deleted += 1;
        pending.insert(
            previous.item,
            Pending::new(entry, recorded.full(previous)?.history, None, None),
        );
    }
    for (item, histories) in resolves {
        report.resolved += histories.len();
        match pending.get_mut(&item) {
            Some(change) => change.resolves.extend(histories),
            None => {
                let Some(state) = items.get(&mut tx, &item)? else {
                    continue;
                };
                let winner = state.winner();
                let mut change = Pending::new(winner.entry.clone(), winner.history(), None, None);
                change.resolves = histories;
                pending.insert(item, change);
            }
        }
    }

    for (item, _) in pending.iter().filter(|(_, change)| !change.created) {
        items.get(&mut tx, item)?;
    }
    let writer = tx.identity().writer();
    let mut disk_lags = false;
    for (item, change) in pending {
        new_contents.extend(change.content);
        let version = if change.created {
            tx.write_new(item, change.entry, now)?
        } else {
            let mut base = change.base;
            // Follow the deletions the shown version beat, and every settled
            // conflict.
            if let Some(state) = items.cached(&item) {
                for loser in state.losers().iter().filter(|v| v.entry.deleted) {
                    base.merge(&loser.history());
                }
            }
            for history in &change.resolves {
                base.merge(history);
            }
            let context = match items.cached(&item) {
                Some(state) => state.compact_context(base, writer),
                None => base,
            };
            let version = tx.write_local(item, change.entry, context, now)?;
            // The disk already shows a local change, unless it stands beside a
            // concurrent version (a conflict to show, or an edit that beats this
            // deletion).
            disk_lags |= shoal_core::ItemAccess::get(&mut tx, &item)?.is_some_and(|state| {
                state.versions().len() > 1 || state.winner().dot != version.dot
            });
            version
        };
        if let Some((path, info)) = change.at.map(|i| &found[i]) {
            records.push(info.record(path.clone(), item, Role::Main, &version));
        }
    }
    if disk_lags {
        tx.set_needs_materialize(true)?;
    }
    // In key order: tens of thousands of inserts at random places in a table larger
    // than SQLite's page cache read and spill pages all the time.
    new_contents.sort_unstable_by_key(|c| c.hash);
    new_contents.dedup_by_key(|c| c.hash);
    for content in &new_contents {
        tx.put_content(content)?;
    }
    for index in crate::path_order(&records, |file| &file.path) {
        tx.put_local_file(&records[index])?;
    }
    tx.commit()?;
    Ok(())
}

/// Files hashed per block handed from the hashing threads to the scan's writer.
const HASH_BLOCK: usize = 64;

/// Whether the scan's transaction may be open while `files` files of `bytes` in all are still
/// being hashed: only when that should take a few seconds at most, since other writers of the
/// replica (a `shoal resolve` beside the agent) wait meanwhile, and give up after 10 s.
fn write_while_hashing(files: usize, bytes: u64) -> bool {
    // About twice what hashing takes on a 2-core machine: 20 µs a file, 500 MB/s.
    const LIMIT_NS: u64 = 3_000_000_000;
    (files as u64)
        .saturating_mul(20_000)
        .saturating_add(bytes.saturating_mul(2))
        < LIMIT_NS
}

/// The hashes of a scan's files as the hashing threads deliver them, block by block.
struct Hashes {
    receiver: mpsc::Receiver<(usize, Vec<Option<ChunkedContent>>)>,
    arrived: HashMap<usize, std::vec::IntoIter<Option<ChunkedContent>>>,
    /// For each entry found, its place among the files to hash.
    place: Vec<Option<usize>>,
}

impl Hashes {
    fn new(
        receiver: mpsc::Receiver<(usize, Vec<Option<ChunkedContent>>)>,
        to_hash: &[usize],
        found: usize,
    ) -> Hashes {
        let mut place = vec![None; found];
        for (k, &i) in to_hash.iter().enumerate() {
            place[i] = Some(k);
        }
        Hashes {
            receiver,
            arrived: HashMap::new(),
            place,
        }
    }

    /// Waits until every file is hashed.
    fn wait_for_all(&mut self) {
        while let Ok((b, contents)) = self.receiver.recv() {
            self.arrived.insert(b, contents.into_iter());
        }
    }

    /// The content of found entry `i`, once hashed: `None` when it was not to be hashed,
    /// `Some(None)` when it changed while being read. Entries must be taken in order.
    fn take(&mut self, i: usize) -> Option<Option<ChunkedContent>> {
        let k = self.place.get(i).copied().flatten()?;
        let block = k / HASH_BLOCK;
        while !self.arrived.contains_key(&block) {
            let Ok((b, contents)) = self.receiver.recv() else {
                return Some(None); // a hashing thread ended early
            };
            self.arrived.insert(b, contents.into_iter());
        }
        let contents = self.arrived.get_mut(&block)?;
        let content = contents.next().flatten();
        if k % HASH_BLOCK == HASH_BLOCK - 1 || contents.len() == 0 {
            self.arrived.remove(&block);
        }
        Some(content)
    }
}

/// The entry at `path`, if it is a file or directory.
pub(crate) fn stat(path: &Path) -> Result<Option<Found>, FolderError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) => Ok(found_from(&metadata)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(io_error(path)(error)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The walk as it was before it read directories itself (the `ignore` crate's walker):
    /// the new one must find exactly the same.
    fn reference_walk(root: &Path, skipped: &Mutex<Vec<Skipped>>) -> BTreeMap<String, Found> {
        let found = Mutex::new(BTreeMap::new());
        let walker = ignore::WalkBuilder::new(root)
            .hidden(false)
            .ignore(false)
            .git_ignore(false)
            .git_global(false)
            .git_exclude(false)
            .parents(false)
            .follow_links(false)
            .add_custom_ignore_filename(".shoalignore")
            .filter_entry(|entry| {
                let name = entry.file_name().to_string_lossy();
                if name.starts_with(TEMP_PREFIX) {
                    let _ = fs::remove_file(entry.path());
                    return false;
                }
                !(entry.depth() == 1 && name == STATE_DIR_NAME)
            })
            .build_parallel();
        walker.run(|| {
            Box::new(|result| {
                let skip = |path: String, reason: String| {
                    skipped.lock().expect("lock").push(Skipped { path, reason });
                };
                let entry = match result {
                    Ok(entry) => entry,
                    Err(error) => {
                        skip(String::new(), error.to_string());
                        return ignore::WalkState::Continue;
                    }
                };
                if entry.depth() == 0 {
                    return ignore::WalkState::Continue;
                }
                let relative = entry.path().strip_prefix(root).expect("under the root");
                let Some(text) = relative.to_str() else {
                    skip(
                        relative.to_string_lossy().into_owned(),
                        "the name is not valid UTF-8".into(),
                    );
                    return ignore::WalkState::Skip;
                };
                if let Err(error) = validate_name(file_name(text)) {
                    skip(text.to_owned(), error.to_string());
                    return ignore::WalkState::Skip;
                }
                match entry.metadata().ok().as_ref().and_then(found_from) {
                    Some(info) => {
                        found.lock().expect("lock").insert(text.to_owned(), info);
                    }
                    None => skip(
                        text.to_owned(),
                        "not a regular file or directory (symlinks are not synced)".into(),
                    ),
                }
                ignore::WalkState::Continue
            })
        });
        found.into_inner().expect("lock")
    }

    fn write(root: &Path, path: &str, text: &str) {
        let path = crate::absolute(root, path);
        fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    fn sorted(skipped: Mutex<Vec<Skipped>>) -> Vec<(String, String)> {
        let mut list: Vec<_> = skipped
            .into_inner()
            .expect("lock")
            .into_iter()
            .map(|s| (s.path, s.reason))
            .collect();
        list.sort();
        list
    }

    #[test]
    fn a_temporary_file_is_left_alone_while_files_are_being_put_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join(STATE_DIR_NAME)).expect("mkdir");
        let temp = format!("a/{TEMP_PREFIX}busy.tmp");
        write(root, &temp, "being written by another process");
        let writing = crate::WritingLock::shared(root).expect("hold");
        let found = walk(root, &Mutex::new(Vec::new()));
        assert!(root.join(&temp).exists(), "removed while being written");
        assert!(!found.iter().any(|(path, _)| path.contains(TEMP_PREFIX)));
        drop(writing);
        walk(root, &Mutex::new(Vec::new()));
        assert!(!root.join(&temp).exists(), "a left-over is removed");
    }

    #[test]
    fn the_walk_finds_what_the_ignore_crate_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = &dir.path().canonicalize().expect("canonical");
        write(
            root,
            ".shoalignore",
            "*.log\n!keep.log\nbuild/\n/top-only\nsecret*\n",
        );
        write(root, "a/.shoalignore", "!x.log\nsub/*.tmp\n");
        for path in [
            "a/b/c.txt",
            "a/x.log",
            "a/keep.log",
            "a/y.log",
            "a/sub/y.tmp",
            "a/sub/z.txt",
            "a/top-only",
            "a/build/inside",
            "build/inside",
            "top-only",
            "keep.log",
            "other.log",
            "n1/inner",
            "n1.b",
            "n1-c",
            "n1/deeper/file",
            "secret/file",
            "empty.txt",
            "\u{e9}t\u{e9}/caf\u{e9}.txt",
            ".shoal/state.db",
            "a/.shoal/not-state",
            "bad\u{1}name/inside",
        ] {
            write(root, path, path);
        }
        fs::create_dir_all(root.join("empty-dir")).expect("mkdir");
        let deep = vec!["deep"; 300].join("/");
        write(root, &format!("{deep}/leaf"), "at the bottom");
        fs::write(root.join(OsStr::from_bytes(b"raw\xffname")), "x").expect("write");
        std::os::unix::fs::symlink("a", root.join("link")).expect("symlink");
        std::os::unix::fs::symlink("missing", root.join("a/dangling")).expect("symlink");
        let tool = root.join("a/b/tool.sh");
        fs::write(&tool, "#!/bin/sh").expect("write");
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).expect("chmod");
        let temp = format!("{TEMP_PREFIX}left.tmp");

        write(root, &format!("a/{temp}"), "partial");
        let first = walk(root, &Mutex::new(Vec::new()));
        assert!(
            !root.join("a").join(&temp).exists(),
            "a left-over temporary file is removed"
        );
        assert!(!first.iter().any(|(path, _)| path.contains(TEMP_PREFIX)));
        // Compared once the removal no longer changes the folder's time.
        let old_skipped = Mutex::new(Vec::new());
        let old = reference_walk(root, &old_skipped);
        let new_skipped = Mutex::new(Vec::new());
        let new = walk(root, &new_skipped);

        let old: Vec<(String, Found)> = old.into_iter().collect();
        assert_eq!(new, old);
        assert_eq!(sorted(new_skipped), sorted(old_skipped));
        let paths: Vec<&str> = new.iter().map(|(path, _)| path.as_str()).collect();
        for present in [
            "a/x.log",
            "a/keep.log",
            "a/top-only",
            "keep.log",
            "n1.b",
            "empty-dir",
        ] {
            assert!(paths.contains(&present), "{present} missing from {paths:?}");
        }
        for absent in [
            "a/y.log",
            "other.log",
            "top-only",
            "build",
            "a/build",
            "secret",
            ".shoal",
        ] {
            assert!(!paths.contains(&absent), "{absent} in {paths:?}");
        }
        assert!(
            new.iter()
                .any(|(path, info)| path == "a/b/tool.sh" && info.executable)
        );
        assert!(paths.contains(&format!("{deep}/leaf").as_str()));
    }
}
