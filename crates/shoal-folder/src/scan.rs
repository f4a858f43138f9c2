//! Scanning: what changed on disk since the last scan becomes new versions.
//!
//! Only files whose size, modification time, inode or mode changed are read and hashed (in
//! parallel). A path that vanished while an unknown path with the same inode appeared is a
//! rename or move of the same item. A path that holds exactly what the layout wants there but
//! was not recorded (a crash after a file was renamed into place, before it was recorded) is
//! adopted, not taken for a new local change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;
use shoal_core::{
    Entry, ItemId, ItemKind, ItemState, Knowledge, Placement, Role, STATE_DIR_NAME, TEMP_PREFIX,
    layout, validate_name,
};
use shoal_store::{ChunkedContent, LocalFile, Store, chunk_reader};

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
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub(crate) kind: ItemKind,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
    pub(crate) inode: u64,
    pub(crate) executable: bool,
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
    found.kind == recorded.kind
        && (found.kind == ItemKind::Directory
            || found.size == recorded.size
                && found.mtime_ns == recorded.mtime_ns
                && found.inode == recorded.inode
                && found.executable == recorded.executable)
}

fn parent_path(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// Walks the folder: every file and directory, minus shoal's own state, temporary files and
/// what `.shoalignore` files exclude.
fn walk(root: &Path, skipped: &Mutex<Vec<Skipped>>) -> BTreeMap<String, Found> {
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
                // Left by a run that was killed before renaming it into place: never complete.
                let _ = fs::remove_file(entry.path());
                return false;
            }
            !(entry.depth() == 1 && name == STATE_DIR_NAME)
        })
        .build_parallel();
    walker.run(|| {
        Box::new(|result| {
            let skip = |path: String, reason: String| {
                if let Ok(mut list) = skipped.lock() {
                    list.push(Skipped { path, reason });
                }
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
            let Ok(relative) = entry.path().strip_prefix(root) else {
                return ignore::WalkState::Continue;
            };
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
                    if let Ok(mut map) = found.lock() {
                        map.insert(text.to_owned(), info);
                    }
                }
                None => skip(
                    text.to_owned(),
                    "not a regular file or directory (symlinks are not synced)".into(),
                ),
            }
            ignore::WalkState::Continue
        })
    });
    found.into_inner().unwrap_or_default()
}

/// Hashes a file and checks it did not change while being read.
fn hash_file(path: &Path, expected: &Found) -> Option<ChunkedContent> {
    let file = fs::File::open(path).ok()?;
    let content = chunk_reader(file).ok()?;
    let after = found_from(&fs::symlink_metadata(path).ok()?)?;
    (after.size == expected.size
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
    fn get(&mut self, store: &Store, id: &ItemId) -> Result<Option<&ItemState>, FolderError> {
        if !self.states.contains_key(id) {
            self.states.insert(*id, store.item(id)?);
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
    /// Where the change was seen on disk (none for deletions and settled conflicts).
    at: Option<String>,
}

impl Pending {
    fn new(entry: Entry, base: Knowledge, at: Option<&String>) -> Pending {
        Pending {
            entry,
            base,
            resolves: Vec::new(),
            at: at.cloned(),
        }
    }
}

impl FolderReplica {
    /// Records every change made on disk since the last scan as new versions, in one
    /// transaction.
    pub fn scan(
        &mut self,
        options: &ScanOptions,
        progress: &dyn Progress,
    ) -> Result<ScanReport, FolderError> {
        if !self.root.is_dir() {
            return Err(FolderError::RootMissing(self.root.clone()));
        }
        progress.start("scan", 0);
        let skipped = Mutex::new(Vec::new());
        let started = std::time::Instant::now();
        let found = walk(&self.root, &skipped);
        tracing::debug!(
            entries = found.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "walked"
        );
        let mut report = ScanReport {
            skipped: skipped.into_inner().unwrap_or_default(),
            ..ScanReport::default()
        };
        let recorded = self.store.local_files()?;
        tracing::debug!(
            records = recorded.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded records"
        );
        if found.is_empty() && !recorded.is_empty() && !options.allow_empty {
            return Err(FolderError::LooksEmpty {
                path: self.root.clone(),
                recorded: recorded.len(),
            });
        }

        // Renames: vanished paths by inode.
        let mut vanished_by_inode: HashMap<(u64, ItemKind), &LocalFile> = HashMap::new();
        for (path, file) in &recorded {
            let gone = found.get(path).is_none_or(|f| f.kind != file.kind);
            if gone && file.role == Role::Main {
                vanished_by_inode.insert((file.inode, file.kind), file);
            }
        }
        // A new path showing a vanished file (same inode, size, time and mode) is that file
        // renamed: its content is known, so a renamed large file is not read again.
        let renamed: HashMap<&String, &LocalFile> = found
            .iter()
            .filter(|(path, info)| info.kind == ItemKind::File && !recorded.contains_key(*path))
            .filter_map(|(path, info)| {
                let old = vanished_by_inode.get(&(info.inode, info.kind))?;
                (same_stat(info, old) && old.content.is_some()).then_some((path, *old))
            })
            .collect();

        // Hash what may have changed, in parallel.
        let to_hash: Vec<(&String, &Found)> = found
            .iter()
            .filter(|(path, info)| {
                info.kind == ItemKind::File
                    && !recorded.get(*path).is_some_and(|r| same_stat(info, r))
                    && !renamed.contains_key(path)
            })
            .collect();
        progress.finish();
        progress.start("hash", to_hash.iter().map(|(_, f)| f.size).sum());
        let root = &self.root;
        let hashed: HashMap<String, ChunkedContent> = to_hash
            .par_iter()
            .filter_map(|(path, info)| {
                let content = hash_file(&crate::absolute(root, path), info);
                progress.advance(info.size);
                Some(((*path).clone(), content?))
            })
            .collect();
        progress.finish();
        report.hashed_bytes = hashed.values().map(|c| c.size).sum();
        for (path, info) in &to_hash {
            if !hashed.contains_key(*path) {
                report.skipped.push(Skipped {
                    path: (*path).clone(),
                    reason: format!("changed while being read ({} bytes); will retry", info.size),
                });
            }
        }

        let nothing_new = to_hash.is_empty()
            && recorded
                .iter()
                .all(|(path, r)| found.get(path).is_some_and(|f| same_stat(f, r)))
            && found.keys().all(|path| recorded.contains_key(path));
        if nothing_new {
            return Ok(report);
        }

        // Item states are read one by one, for the few items that changed.
        let mut items = StateCache::default();
        // Files put in place before a crash can only exist while the disk lags the states.
        let desired: HashMap<String, Placement> = if self.store.needs_materialize()? {
            layout(&self.store.load_items()?)
                .placements
                .into_iter()
                .map(|p| (p.path.clone(), p))
                .collect()
        } else {
            HashMap::new()
        };

        let mut path_items: HashMap<String, ItemId> = HashMap::new();
        path_items.insert(String::new(), ItemId::ROOT);
        let mut pending: BTreeMap<ItemId, Pending> = BTreeMap::new();
        let mut records: Vec<LocalFile> = Vec::new();
        let mut moved_from: BTreeSet<String> = BTreeSet::new();
        let mut resolves: BTreeMap<ItemId, Vec<Knowledge>> = BTreeMap::new();

        let record =
            |path: &str, item: ItemId, version: &shoal_core::Version, role: Role, info: &Found| {
                LocalFile {
                    path: path.to_owned(),
                    item,
                    role,
                    dot: version.dot,
                    history: version.history(),
                    kind: info.kind,
                    content: version.entry.content,
                    size: info.size,
                    mtime_ns: info.mtime_ns,
                    inode: info.inode,
                    executable: info.executable,
                }
            };

        for (path, info) in &found {
            let Some(parent) = path_items.get(parent_path(path)).copied() else {
                report.skipped.push(Skipped {
                    path: path.clone(),
                    reason: "its folder is not synced".into(),
                });
                continue;
            };
            let content = hashed.get(path);
            if info.kind == ItemKind::File
                && content.is_none()
                && !recorded.get(path).is_some_and(|r| same_stat(info, r))
                && !renamed.contains_key(path)
            {
                continue; // changed while hashing: next scan
            }
            let content_hash = content
                .map(|c| c.hash)
                .or_else(|| recorded.get(path).and_then(|r| r.content))
                .or_else(|| renamed.get(path).and_then(|r| r.content));
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
            // What the layout wants here: adopt it when the disk already holds exactly that.
            if let Some(want) = desired.get(path) {
                let same = want.version.entry.kind == info.kind
                    && (info.kind == ItemKind::Directory
                        || want.version.entry.content == content_hash
                            && want.version.entry.executable == info.executable);
                let already = recorded
                    .get(path)
                    .is_some_and(|r| r.dot == want.version.dot && same_stat(info, r));
                if same && !already {
                    records.push(record(path, want.item, &want.version, want.role, info));
                    if want.role == Role::Main {
                        path_items.insert(path.clone(), want.item);
                    }
                    continue;
                }
            }
            match recorded.get(path).filter(|r| r.kind == info.kind) {
                Some(previous) if previous.role == Role::Main => {
                    path_items.insert(path.clone(), previous.item);
                    if info.kind == ItemKind::File && !same_stat(info, previous) {
                        if previous.content != content_hash
                            || previous.executable != info.executable
                        {
                            report.modified += 1;
                            pending.insert(
                                previous.item,
                                Pending::new(entry, previous.history.clone(), Some(path)),
                            );
                        } else {
                            records.push(LocalFile {
                                size: info.size,
                                mtime_ns: info.mtime_ns,
                                inode: info.inode,
                                ..previous.clone()
                            });
                        }
                    }
                }
                Some(previous) => {
                    // A conflict copy: unchanged, or changed by the user (then it becomes a file
                    // of its own and the conflict is settled).
                    if same_stat(info, previous) {
                        continue;
                    }
                    resolves
                        .entry(previous.item)
                        .or_default()
                        .push(previous.history.clone());
                    report.created += 1;
                    pending.insert(
                        ItemId(rand::random()),
                        Pending::new(entry, Knowledge::new(), Some(path)),
                    );
                }
                None => {
                    let moved = vanished_by_inode
                        .get(&(info.inode, info.kind))
                        .copied()
                        .filter(|old| {
                            info.kind == ItemKind::Directory || old.content == content_hash
                        });
                    match moved {
                        Some(old) => {
                            vanished_by_inode.remove(&(info.inode, info.kind));
                            moved_from.insert(old.path.clone());
                            path_items.insert(path.clone(), old.item);
                            let state = items.get(&self.store, &old.item)?;
                            let unchanged_place = state.is_some_and(|s| {
                                let w = s.winner();
                                w.entry.parent == parent && w.entry.name == entry.name
                            });
                            if unchanged_place {
                                // Moved along with its folder: same parent id and name.
                                records.push(LocalFile {
                                    path: path.clone(),
                                    inode: info.inode,
                                    mtime_ns: info.mtime_ns,
                                    ..old.clone()
                                });
                            } else {
                                report.moved += 1;
                                pending.insert(
                                    old.item,
                                    Pending::new(entry, old.history.clone(), Some(path)),
                                );
                            }
                        }
                        None => {
                            let item = ItemId(rand::random());
                            path_items.insert(path.clone(), item);
                            report.created += 1;
                            pending.insert(item, Pending::new(entry, Knowledge::new(), Some(path)));
                        }
                    }
                }
            }
        }

        // Vanished paths: deletions, or settled conflicts.
        let mut removed_paths = Vec::new();
        for (path, previous) in &recorded {
            let present = found.get(path).is_some_and(|f| f.kind == previous.kind);
            if present {
                continue;
            }
            removed_paths.push(path.clone());
            if moved_from.contains(path) {
                continue;
            }
            if previous.role == Role::ConflictCopy {
                resolves
                    .entry(previous.item)
                    .or_default()
                    .push(previous.history.clone());
                continue;
            }
            if pending.contains_key(&previous.item) {
                continue;
            }
            let Some(state) = items.get(&self.store, &previous.item)? else {
                continue;
            };
            let mut entry = state.winner().entry.clone();
            entry.deleted = true;
            entry.content = None;
            report.deleted += 1;
            pending.insert(
                previous.item,
                Pending::new(entry, previous.history.clone(), None),
            );
        }
        for (item, histories) in resolves {
            report.resolved += histories.len();
            match pending.get_mut(&item) {
                Some(change) => change.resolves.extend(histories),
                None => {
                    let Some(state) = items.get(&self.store, &item)? else {
                        continue;
                    };
                    let winner = state.winner();
                    let mut change = Pending::new(winner.entry.clone(), winner.history(), None);
                    change.resolves = histories;
                    pending.insert(item, change);
                }
            }
        }

        for item in pending.keys() {
            items.get(&self.store, item)?;
        }
        // One transaction for every new version and record.
        let now = now_ns();
        let mut tx = self.store.begin()?;
        let writer = tx.identity().writer();
        let mut disk_lags = false;
        for (item, change) in pending {
            let mut base = change.base;
            // Follow the deletions the shown version beat, and every settled conflict.
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
            let at = change.at;
            if let Some(content) = at.as_ref().and_then(|path| hashed.get(path)) {
                tx.put_content(content)?;
            }
            let version = tx.write_local(item, change.entry, context, now)?;
            // The disk already shows a local change, unless it stands beside a concurrent
            // version (a conflict to show, or an edit that beats this deletion).
            disk_lags |= shoal_core::ItemAccess::get(&mut tx, &item)?.is_some_and(|state| {
                state.versions().len() > 1 || state.winner().dot != version.dot
            });
            if let Some((path, info)) = at.as_ref().and_then(|path| Some((path, found.get(path)?)))
            {
                records.push(record(path, item, &version, Role::Main, info));
            }
        }
        if disk_lags {
            tx.set_needs_materialize(true)?;
        }
        for path in &removed_paths {
            tx.remove_local_file(path)?;
        }
        for file in &records {
            tx.put_local_file(file)?;
        }
        tx.commit()?;
        Ok(report)
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
