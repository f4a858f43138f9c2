//! Materializing: bringing the disk in line with the replica's layout.
//!
//! Content for incoming versions is first staged under `.shoal/tmp` and flushed, before the
//! batch's transaction lists the staged files with the rest of the batch (an unlisted file is
//! never trusted: it may be cut short); then each staged copy is moved to its target (a second
//! path with the same content gets a copy under a temporary name beside it, flushed once for
//! all of them), each only if the target is still as it was last recorded. A crash at any
//! point leaves either the old file or the complete new one, and the next scan adopts what was
//! already put in place.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use shoal_core::{ContentHash, ItemId, ItemKind, Placement, Role, TEMP_PREFIX, Version, layout};
use shoal_store::LocalFile;

use crate::scan::{Found, same_stat, stat};
use crate::{Desired, FolderError, FolderReplica, Progress, Skipped, io_error};

/// Where content for a hash can be read from, besides the replica itself.
pub trait ContentSource: Sync {
    /// Copies the content named `hash` into `dest`, returning false if it is not available
    /// (or changed while being copied).
    fn copy_to(&self, hash: &ContentHash, dest: &Path) -> bool;
}

/// What materializing did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaterializeReport {
    /// Files written (new or updated).
    pub written: usize,
    /// Files and folders renamed or moved in place, without copying content.
    pub renamed: usize,
    /// Files and folders removed.
    pub deleted: usize,
    /// Folders created.
    pub folders: usize,
    /// Content bytes written.
    pub bytes: u64,
    /// Paths left as they are for now, and why (usually: changed by the user since the last
    /// scan); retried next run.
    pub skipped: Vec<Skipped>,
    /// Items never written here because their names cannot be stored safely.
    pub refused: Vec<Skipped>,
}

fn flush_filesystem(root: &Path) -> Result<(), FolderError> {
    let dir = fs::File::open(root).map_err(io_error(root))?;
    rustix::fs::syncfs(&dir).map_err(|e| io_error(root)(e.into()))
}

fn temp_name(dir: &Path) -> PathBuf {
    dir.join(format!("{TEMP_PREFIX}{:016x}.tmp", rand::random::<u64>()))
}

/// What a batch's staging made available, for the batch's transaction
/// ([`FolderReplica::commit_batch`]). The default is a batch that brought no content.
#[derive(Default)]
pub struct Staged {
    /// Contents at hand: staged before, recorded at some path, or just fetched.
    pub(crate) available: HashSet<ContentHash>,
    /// Files just fetched and flushed, with their ids, for the batch's transaction to list.
    pub(crate) files: Vec<(ContentHash, u64)>,
}

/// Where in the staging folder the staged file `id` is: in the shard its low byte names.
/// Each fetching thread stages into a shard of its own, because threads creating files in one
/// folder wait on that folder's lock for as long as each creation takes.
fn staged_name(id: u64) -> String {
    format!("{:02x}/{id:016x}", id & 0xff)
}

/// The staged file `id` in the staging folder `staging`.
fn staged_file(staging: &Path, id: u64) -> PathBuf {
    staging.join(staged_name(id))
}

/// A new staged file id in the shard of the calling thread.
fn new_staged_id() -> u64 {
    let shard = rayon::current_thread_index().unwrap_or(0) as u64 & 0xff;
    rand::random::<u64>() & !0xff | shard
}

fn stat_matches(path: &Path, recorded: &LocalFile) -> bool {
    matches!(stat(path), Ok(Some(found)) if same_stat(&found, recorded))
}

/// A file waiting to be put in place: the staged copy itself, moved in, or a temporary copy
/// beside its target.
struct Ready<'a> {
    want: &'a Placement<'a>,
    from: ReadyFrom,
    /// Its current mode and modification time, when known (a change is then made only if
    /// needed).
    mode: Option<u32>,
    mtime_ns: Option<i64>,
}

impl Ready<'_> {
    /// Where it is moved from.
    fn source(&self, staging: &Path) -> PathBuf {
        match &self.from {
            ReadyFrom::Staged(_, id) => staged_file(staging, *id),
            ReadyFrom::Temp(temp) => temp.clone(),
        }
    }
}

/// A staged copy as found before it is put in place.
struct StagedCopy {
    id: u64,
    mode: u32,
    mtime_ns: i64,
    links: u64,
}

enum ReadyFrom {
    /// The staged copy of this content and its file's id (not a held path: a large first
    /// sync has one per file).
    Staged(ContentHash, u64),
    Temp(PathBuf),
}

/// A record to write once the files are in place. A file just placed refers to its
/// placement instead of holding a copy of its version history: a first sync writes one record
/// per file.
enum NewRecord<'a> {
    Kept(Box<LocalFile>),
    Placed {
        want: &'a Placement<'a>,
        found: Found,
    },
}

impl NewRecord<'_> {
    fn path(&self) -> &str {
        match self {
            NewRecord::Kept(file) => &file.path,
            NewRecord::Placed { want, .. } => &want.path,
        }
    }

    fn content(&self) -> Option<ContentHash> {
        match self {
            NewRecord::Kept(file) => file.content,
            NewRecord::Placed { want, .. } => want.version.entry.content,
        }
    }

    fn write(&self, tx: &mut shoal_store::Transaction<'_>) -> Result<(), FolderError> {
        match self {
            NewRecord::Kept(file) => tx.put_local_file(file)?,
            NewRecord::Placed { want, found } => tx.put_local_file(&found.record(
                want.path.clone(),
                want.item,
                want.role,
                want.version,
            ))?,
        }
        Ok(())
    }
}

/// Gives `path` the modification time and mode of `version` (`mode` and `mtime_ns` are the
/// current ones, when known: a change is then made only if needed). True when it changed
/// anything.
fn set_times_and_mode(
    path: &Path,
    version: &Version,
    mode: Option<u32>,
    mtime_ns: Option<i64>,
) -> Result<bool, FolderError> {
    let mtime = version.entry.mtime_ns.max(0);
    let mut changed = false;
    if mtime_ns != Some(mtime) {
        set_mtime(path, mtime).map_err(|e| io_error(path)(e.into()))?;
        changed = true;
    }
    let wanted = if version.entry.executable {
        0o755
    } else {
        0o644
    };
    if mode.is_none_or(|m| m & 0o7777 != wanted) {
        fs::set_permissions(path, fs::Permissions::from_mode(wanted)).map_err(io_error(path))?;
        changed = true;
    }
    Ok(changed)
}

/// Sets the access and modification times of `path` to `mtime_ns`.
fn set_mtime(path: &Path, mtime_ns: i64) -> rustix::io::Result<()> {
    let at = rustix::fs::Timespec {
        tv_sec: mtime_ns / 1_000_000_000,
        tv_nsec: (mtime_ns % 1_000_000_000) as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: at,
        last_modification: at,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// Moves `from` to `target` by a rename that never replaces; false when something appeared at
/// the target meanwhile.
fn place_new(from: &Path, target: &Path) -> Result<bool, FolderError> {
    let moved = rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        target,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    match moved.map_err(std::io::Error::from) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(io_error(from)(error)),
    }
}

/// What a file just put in place at `target` is, for its record.
fn placed_at(target: &Path) -> Result<Found, FolderError> {
    stat(target)?.ok_or_else(|| io_error(target)(std::io::ErrorKind::NotFound.into()))
}

fn parent_path(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

/// What was last recorded on disk, by path, as materialize changes it: the store's records in
/// path order, and beside them the records materialize adds (inserting into the middle of a
/// first sync's records would move all that follow).
struct Recorded {
    stored: Vec<LocalFile>,
    /// Stored records removed or replaced since.
    gone: Vec<bool>,
    added: BTreeMap<String, LocalFile>,
}

impl Recorded {
    fn new(stored: Vec<LocalFile>) -> Self {
        debug_assert!(stored.windows(2).all(|w| w[0].path < w[1].path));
        Recorded {
            gone: vec![false; stored.len()],
            stored,
            added: BTreeMap::new(),
        }
    }

    /// The index of the live stored record at `path`.
    fn stored_at(&self, path: &str) -> Option<usize> {
        self.stored
            .binary_search_by(|file| file.path.as_str().cmp(path))
            .ok()
            .filter(|index| !self.gone[*index])
    }

    fn get(&self, path: &str) -> Option<&LocalFile> {
        match self.added.get(path) {
            Some(file) => Some(file),
            None => self.stored_at(path).map(|index| &self.stored[index]),
        }
    }

    fn get_mut(&mut self, path: &str) -> Option<&mut LocalFile> {
        if self.added.contains_key(path) {
            return self.added.get_mut(path);
        }
        let index = self.stored_at(path)?;
        Some(&mut self.stored[index])
    }

    fn contains(&self, path: &str) -> bool {
        self.get(path).is_some()
    }

    fn remove(&mut self, path: &str) -> Option<LocalFile> {
        if let Some(file) = self.added.remove(path) {
            return Some(file);
        }
        let index = self.stored_at(path)?;
        self.gone[index] = true;
        Some(self.stored[index].clone())
    }

    /// Records `file` at its path, in place of whatever was recorded there.
    fn insert(&mut self, file: LocalFile) {
        if let Some(index) = self.stored_at(&file.path) {
            self.gone[index] = true;
        }
        self.added.insert(file.path.clone(), file);
    }

    /// Every record, in no particular order.
    fn iter(&self) -> impl Iterator<Item = &LocalFile> {
        self.stored
            .iter()
            .zip(&self.gone)
            .filter(|(_, gone)| !**gone)
            .map(|(file, _)| file)
            .chain(self.added.values())
    }
}

impl FolderReplica {
    /// Fetches the content of `versions` that is not at hand from `source` into the staging
    /// area and flushes it. Returns the hashes now available, and the files just staged: the
    /// batch's transaction lists them (`Transaction::put_staged`), and only a listed file is
    /// trusted, so a file cut short by a crash is never taken for whole.
    pub(crate) fn stage(
        &self,
        versions: &[(ItemId, Version)],
        source: &dyn ContentSource,
        progress: &dyn Progress,
    ) -> Result<Staged, FolderError> {
        stage(
            &self.root,
            &self.staging_dir(),
            versions,
            source,
            progress,
            |hash| {
                Ok(self.store.staged(hash)?.is_some()
                    || self.store.local_file_with(hash)?.is_some())
            },
        )
    }

    /// A stager for this replica's next batches, usable on another thread while this replica
    /// commits the batch before.
    pub fn stager(&self) -> Result<Stager, FolderError> {
        Ok(Stager {
            root: self.root.clone(),
            staging: self.staging_dir(),
            index: self.content_index()?,
        })
    }
}

/// Stages a replica's incoming batches apart from the replica, so that one batch's content is
/// written while the batch before it commits. It reads what the replica has committed through
/// its own connection; what the uncommitted batch staged is passed in.
pub struct Stager {
    root: PathBuf,
    staging: PathBuf,
    index: shoal_store::ContentIndex,
}

impl Stager {
    /// Stages the content of `versions` as [`FolderReplica::apply_batch`] does, taking what
    /// `uncommitted` (the batch before, still committing) made available as at hand.
    pub fn stage(
        &self,
        versions: &[(ItemId, Version)],
        source: &dyn ContentSource,
        progress: &dyn Progress,
        uncommitted: Option<&Staged>,
    ) -> Result<Staged, FolderError> {
        stage(
            &self.root,
            &self.staging,
            versions,
            source,
            progress,
            |hash| {
                Ok(
                    uncommitted.is_some_and(|batch| batch.available.contains(hash))
                        || self.index.is_staged(hash)?
                        || self.index.file_with(hash)?.is_some(),
                )
            },
        )
    }
}

/// Fetches the content of `versions` that `at_hand` does not find from `source` into the
/// staging folder, and flushes the file system.
fn stage(
    root: &Path,
    staging: &Path,
    versions: &[(ItemId, Version)],
    source: &dyn ContentSource,
    progress: &dyn Progress,
    at_hand: impl Fn(&ContentHash) -> Result<bool, FolderError>,
) -> Result<Staged, FolderError> {
    // Each wanted content's size and the modification time of the first version wanting it.
    let mut wanted: BTreeMap<ContentHash, (u64, i64)> = BTreeMap::new();
    let mut available = HashSet::new();
    for (_, version) in versions {
        let Some(hash) = version.entry.content.filter(|_| !version.entry.deleted) else {
            continue;
        };
        if available.contains(&hash) || wanted.contains_key(&hash) {
            continue;
        }
        if at_hand(&hash)? {
            available.insert(hash);
        } else {
            wanted.insert(hash, (version.entry.size, version.entry.mtime_ns.max(0)));
        }
    }
    if wanted.is_empty() {
        return Ok(Staged {
            available,
            files: Vec::new(),
        });
    }
    let started = std::time::Instant::now();
    progress.start("transfer", wanted.values().map(|(size, _)| size).sum());
    for shard in 0..rayon::current_num_threads().min(256) {
        let dir = staging.join(format!("{shard:02x}"));
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    }
    let fetched: Vec<(ContentHash, u64)> = wanted
        .par_iter()
        .filter_map(|(hash, (size, mtime_ns))| {
            let id = new_staged_id();
            let part = staged_file(staging, id);
            let ok = source.copy_to(hash, &part);
            if ok {
                // Set now, its inode not yet written: the batch's flush writes it once, and the
                // file is put in place later with nothing left to change (if only this version
                // wants it). Should this fail, putting it in place sets it.
                let _ = set_mtime(&part, *mtime_ns);
            } else {
                let _ = fs::remove_file(&part);
            }
            progress.advance(*size);
            ok.then_some((*hash, id))
        })
        .collect();
    progress.finish();
    let written_at = std::time::Instant::now();
    flush_filesystem(root)?;
    tracing::debug!(
        files = fetched.len(),
        write_ms = (written_at - started).as_millis() as u64,
        flush_ms = written_at.elapsed().as_millis() as u64,
        "stage: written and flushed"
    );
    available.extend(fetched.iter().map(|(hash, _)| *hash));
    Ok(Staged {
        available,
        files: fetched,
    })
}

impl FolderReplica {
    /// Brings the disk in line with the layout. Never touches a path that changed since it was
    /// last recorded; those are picked up by the next scan as local changes. Content not at
    /// hand locally is copied from `fallback` when given.
    pub fn materialize(
        &mut self,
        fallback: Option<&dyn ContentSource>,
        progress: &dyn Progress,
    ) -> Result<MaterializeReport, FolderError> {
        let mut report = MaterializeReport::default();
        let started = std::time::Instant::now();
        // Our temporary files beside their targets are not a concurrent scan's to remove.
        let _writing = crate::WritingLock::shared(&self.root)?;
        let items = self.store.load_items()?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: loaded items"
        );
        let tree = layout(&items);
        tracing::debug!(
            items = items.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: laid out"
        );
        for note in &tree.notes {
            if let shoal_core::LayoutNote::BadName { item, error } = note {
                report.refused.push(Skipped {
                    path: format!("(item {item})"),
                    reason: format!("refused from another replica: {error}"),
                });
            }
        }
        let desired = Desired(tree.placements);
        let mut recorded = Recorded::new(self.store.local_files()?);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: loaded records"
        );
        let mut new_records: Vec<NewRecord> = Vec::new();
        let mut removed_records: Vec<String> = Vec::new();

        let matches = |want: &Placement, have: &LocalFile| {
            want.item == have.item
                && want.role == have.role
                && want.version.entry.kind == have.kind
                && (have.kind == ItemKind::Directory
                    || want.version.entry.content == have.content
                        && want.version.entry.executable == have.executable)
        };
        // Where each folder is wanted (only folders move as a whole).
        let folder_path: HashMap<ItemId, &String> = desired
            .0
            .iter()
            .filter(|p| p.role == Role::Main && p.version.entry.kind == ItemKind::Directory)
            .map(|p| (p.item, &p.path))
            .collect();

        // Records whose version changed but whose content did not: bookkeeping only.
        for want in &desired.0 {
            if let Some(have) = recorded
                .get_mut(&want.path)
                .filter(|have| matches(want, have) && have.dot != want.version.dot)
            {
                have.dot = want.version.dot;
                have.history = want.version.history();
                new_records.push(NewRecord::Kept(Box::new(have.clone())));
            }
        }

        // 1. Folder moves, shallowest first: one rename moves everything inside.
        let mut folder_moves: Vec<(String, String)> = recorded
            .iter()
            .filter(|have| have.kind == ItemKind::Directory && have.role == Role::Main)
            .filter(|have| {
                !desired
                    .get(&have.path)
                    .is_some_and(|want| matches(want, have))
            })
            .filter_map(|have| Some((have.path.clone(), (*folder_path.get(&have.item)?).clone())))
            .collect();
        folder_moves.sort_by_key(|(from, _)| from.matches('/').count());
        for (from, to) in folder_moves {
            let (from_abs, to_abs) = (self.absolute(&from), self.absolute(&to));
            let parent_ok = self.absolute(parent_path(&to)).is_dir();
            if !recorded.contains(&from)
                || to.starts_with(&format!("{from}/"))
                || !parent_ok
                || stat(&to_abs)?.is_some()
                || !from_abs.is_dir()
            {
                continue;
            }
            fs::rename(&from_abs, &to_abs).map_err(io_error(&from_abs))?;
            report.renamed += 1;
            let prefix = format!("{from}/");
            let moved: Vec<String> = recorded
                .iter()
                .map(|file| &file.path)
                .filter(|p| **p == from || p.starts_with(&prefix))
                .cloned()
                .collect();
            for old in moved {
                if let Some(mut file) = recorded.remove(&old) {
                    file.path = format!("{to}{}", &old[from.len()..]);
                    removed_records.push(old);
                    new_records.push(NewRecord::Kept(Box::new(file.clone())));
                    recorded.insert(file);
                }
            }
        }

        // 2. New folders, parents first.
        for want in &desired.0 {
            let path = &want.path;
            if want.version.entry.kind != ItemKind::Directory
                || recorded.get(path).is_some_and(|h| matches(want, h))
            {
                continue;
            }
            let absolute = self.absolute(path);
            match stat(&absolute)? {
                None => {
                    if !self.absolute(parent_path(path)).is_dir() {
                        continue;
                    }
                    fs::create_dir(&absolute).map_err(io_error(&absolute))?;
                    report.folders += 1;
                }
                Some(found) if found.kind == ItemKind::Directory => {}
                Some(_) => {
                    report.skipped.push(Skipped {
                        path: path.clone(),
                        reason: "a file is in the way of a folder".into(),
                    });
                    continue;
                }
            }
            if let Some(found) = stat(&absolute)? {
                let file = LocalFile {
                    content: None,
                    ..found.record(path.clone(), want.item, want.role, want.version)
                };
                recorded.insert(file.clone());
                new_records.push(NewRecord::Kept(Box::new(file)));
            }
        }

        // 3. Files: renames where the content is already here under another path, otherwise
        //    a temporary copy beside the target.
        let wanted_files: Vec<&Placement> = desired
            .0
            .iter()
            .filter(|want| {
                want.version.entry.kind == ItemKind::File
                    && !recorded.get(&want.path).is_some_and(|h| matches(want, h))
            })
            .collect();
        // Where each wanted content, and each wanted item, is recorded on disk (a copy, or a
        // rename found without a pass over every record for each wanted file). Only the
        // records of a wanted content or item are kept: in a round of a large first sync
        // most wanted files are new, and most records are of files already in place.
        let (mut by_hash, by_item) = {
            let mut hashes: Vec<ContentHash> = wanted_files
                .iter()
                .filter_map(|want| want.version.entry.content)
                .collect();
            hashes.sort_unstable();
            hashes.dedup();
            let mut items: Vec<(ItemId, Role)> = wanted_files
                .iter()
                .map(|want| (want.item, want.role))
                .collect();
            items.sort_unstable();
            items.dedup();
            let mut by_hash: HashMap<ContentHash, Vec<String>> = HashMap::new();
            let mut by_item: HashMap<(ItemId, Role), Vec<String>> = HashMap::new();
            for file in recorded.iter().filter(|f| f.kind == ItemKind::File) {
                if let Some(hash) = file.content.filter(|h| hashes.binary_search(h).is_ok()) {
                    by_hash.entry(hash).or_default().push(file.path.clone());
                }
                let item = (file.item, file.role);
                if items.binary_search(&item).is_ok() {
                    by_item.entry(item).or_default().push(file.path.clone());
                }
            }
            (by_hash, by_item)
        };
        new_records.reserve(wanted_files.len());
        // Waiting to be put in place (borrowing the placements: a copy of each would double
        // the layout's memory on a large first sync).
        let mut ready: Vec<Ready> = Vec::with_capacity(wanted_files.len());
        // Staged contents already given to a path in this run: one inode, one path.
        let mut taken: HashSet<ContentHash> = HashSet::new();
        // Folders known to exist (one check per folder, not per file).
        let mut present_dirs: HashSet<&str> = HashSet::new();
        progress.start(
            "write",
            wanted_files.iter().map(|w| w.version.entry.size).sum(),
        );
        // The staged copy of each wanted content, looked up once and examined from every
        // thread: a first sync has one per file.
        let staging = self.staging_dir();
        let staged_ids: HashMap<ContentHash, u64> = self.store.all_staged()?.into_iter().collect();
        let staged_copies: Vec<Option<StagedCopy>> = wanted_files
            .par_iter()
            .map(|want| {
                let id = *staged_ids.get(&want.version.entry.content?)?;
                let meta = fs::symlink_metadata(staged_file(&staging, id)).ok()?;
                meta.is_file().then(|| StagedCopy {
                    id,
                    mode: meta.mode(),
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                    links: meta.nlink(),
                })
            })
            .collect();
        drop(staged_ids);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: looked up staged copies"
        );
        for (want, staged_copy) in wanted_files.into_iter().zip(staged_copies) {
            let path = &want.path;
            let target = self.absolute(path);
            let Some(hash) = want.version.entry.content else {
                continue;
            };
            let dir = self.absolute(parent_path(path));
            if !present_dirs.contains(parent_path(path)) && !dir.is_dir() {
                report.skipped.push(Skipped {
                    path: path.clone(),
                    reason: "its folder could not be created".into(),
                });
                continue;
            }
            // Same item and content recorded elsewhere, and that path is no longer wanted: a
            // rename or move.
            let old = by_item
                .get(&(want.item, want.role))
                .into_iter()
                .flatten()
                .filter_map(|candidate| recorded.get(candidate))
                .find(|have| {
                    have.content == Some(hash)
                        && have.path != *path
                        && !desired.get(&have.path).is_some_and(|w| matches(w, have))
                });
            if let Some(old) = old.cloned() {
                let from = self.absolute(&old.path);
                if stat(&target)?.is_none() && stat_matches(&from, &old) {
                    fs::rename(&from, &target).map_err(io_error(&from))?;
                    report.renamed += 1;
                    recorded.remove(&old.path);
                    removed_records.push(old.path.clone());
                    if let Some(paths) = by_hash.get_mut(&hash) {
                        paths.retain(|p| *p != old.path);
                    }
                    new_records.push(self.record_for(want)?);
                    continue;
                }
            }
            present_dirs.insert(parent_path(path));
            // The staged copy itself becomes the file, moved in when the others are (no copy,
            // and nothing left to delete). A crash after the move leaves it at its target,
            // where the next scan adopts it. Only one path may take it: any other path with
            // this content gets its own copy (made now, before the move), or an edit in place
            // of one file would show through the other.
            if let Some(copy) = &staged_copy
                && copy.links == 1
                && taken.insert(hash)
            {
                progress.advance(want.version.entry.size);
                ready.push(Ready {
                    want,
                    from: ReadyFrom::Staged(hash, copy.id),
                    mode: Some(copy.mode),
                    mtime_ns: Some(copy.mtime_ns),
                });
                continue;
            }
            let temp = temp_name(&dir);
            let copied = if let Some(copy) = &staged_copy {
                fs::copy(staged_file(&staging, copy.id), &temp).is_ok()
            } else {
                by_hash.get(&hash).into_iter().flatten().any(|source| {
                    let Some(have) = recorded.get(source) else {
                        return false;
                    };
                    let from = self.absolute(source);
                    stat_matches(&from, have)
                        && fs::copy(&from, &temp).is_ok()
                        && stat_matches(&from, have)
                }) || ready.iter().any(|earlier| {
                    earlier.want.version.entry.content == Some(hash)
                        && fs::copy(earlier.source(&staging), &temp).is_ok()
                }) || fallback.is_some_and(|source| source.copy_to(&hash, &temp))
            };
            if !copied {
                let _ = fs::remove_file(&temp);
                report.skipped.push(Skipped {
                    path: path.clone(),
                    reason: "content not available yet".into(),
                });
                continue;
            }
            progress.advance(want.version.entry.size);
            ready.push(Ready {
                want,
                from: ReadyFrom::Temp(temp),
                mode: None,
                mtime_ns: None,
            });
        }
        let changed = ready
            .par_iter()
            .map(|ready| {
                set_times_and_mode(
                    &ready.source(&staging),
                    ready.want.version,
                    ready.mode,
                    ready.mtime_ns,
                )
            })
            .try_reduce(|| false, |a, b| Ok(a || b))?;
        progress.finish();
        // A temporary copy was just written; a staged one was flushed with its batch, and needs
        // flushing again only if its time or mode changed.
        if changed || ready.iter().any(|r| matches!(r.from, ReadyFrom::Temp(_))) {
            flush_filesystem(&self.root)?;
        }
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: times set and flushed"
        );

        // 4. Removals: what is recorded but no longer wanted, files first, deepest first.
        // `ready` follows the layout's path order.
        let is_ready = |path: &str| {
            ready
                .binary_search_by(|r| r.want.path.as_str().cmp(path))
                .is_ok()
        };
        let mut unwanted: Vec<LocalFile> = recorded
            .iter()
            .filter(|have| {
                !desired
                    .get(&have.path)
                    .is_some_and(|want| matches(want, have))
            })
            .filter(|have| !is_ready(&have.path))
            .cloned()
            .collect();
        unwanted.sort_by_key(|f| {
            (
                f.kind == ItemKind::Directory,
                std::cmp::Reverse(f.path.matches('/').count()),
            )
        });
        for have in unwanted {
            let absolute = self.absolute(&have.path);
            if !stat_matches(&absolute, &have) {
                if stat(&absolute)?.is_none() {
                    removed_records.push(have.path.clone());
                } else {
                    report.skipped.push(Skipped {
                        path: have.path.clone(),
                        reason: "changed since the last scan; kept".into(),
                    });
                }
                continue;
            }
            let removed = if have.kind == ItemKind::Directory {
                fs::remove_dir(&absolute)
            } else {
                fs::remove_file(&absolute)
            };
            match removed {
                Ok(()) => {
                    report.deleted += 1;
                    removed_records.push(have.path.clone());
                }
                Err(_) => report.skipped.push(Skipped {
                    path: have.path.clone(),
                    reason: "not empty or in use; kept".into(),
                }),
            }
        }

        // 5. Put the new files in place, if their targets are as recorded. A path with nothing
        //    recorded must still be empty: the rename refuses to replace what appeared.
        let removed: HashSet<&str> = removed_records.iter().map(String::as_str).collect();
        // Each path is its own: they are put in place from every thread, and what became of
        // each is gathered in layout order. What each holds once placed, or None if left.
        let root = &self.root;
        let placements: Vec<Result<Option<Found>, FolderError>> = ready
            .par_iter()
            .map(|ready| {
                let path = &ready.want.path;
                let from = ready.source(&staging);
                let target = crate::absolute(root, path);
                let replace = match recorded.get(path) {
                    Some(have) if !removed.contains(path.as_str()) => {
                        stat_matches(&target, have).then_some(true)
                    }
                    _ => Some(false),
                };
                let placed = match replace {
                    None => false,
                    Some(true) => {
                        fs::rename(&from, &target).map_err(io_error(&from))?;
                        true
                    }
                    Some(false) => place_new(&from, &target)?,
                };
                if !placed {
                    // A staged copy stays for a later run; a temporary one goes.
                    if matches!(ready.from, ReadyFrom::Temp(_)) {
                        let _ = fs::remove_file(&from);
                    }
                    return Ok(None);
                }
                placed_at(&target).map(Some)
            })
            .collect();
        // Staged files that became files at their paths: no longer staged.
        let mut moved_in = Vec::new();
        for (ready, placement) in ready.iter().zip(placements) {
            let want = ready.want;
            let Some(found) = placement? else {
                report.skipped.push(Skipped {
                    path: want.path.clone(),
                    reason: "changed since the last scan; not overwritten".into(),
                });
                continue;
            };
            report.written += 1;
            report.bytes += want.version.entry.size;
            if let ReadyFrom::Staged(hash, _) = ready.from {
                moved_in.push(hash);
            }
            new_records.push(NewRecord::Placed { want, found });
        }
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: put in place"
        );
        if report.written + report.renamed + report.deleted + report.folders > 0 {
            flush_filesystem(&self.root)?;
        }
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: flushed"
        );

        let mut tx = self.store.begin()?;
        for path in &removed_records {
            tx.remove_local_file(path)?;
        }
        for hash in &moved_in {
            tx.remove_staged(hash)?;
        }
        // In key order, as the table is; a later record of a path still wins.
        let order = crate::path_order(&new_records, NewRecord::path);
        for index in &order {
            new_records[*index].write(&mut tx)?;
        }
        // Anything left undone (content missing, a path in the way) is retried next run.
        tx.set_needs_materialize(!report.skipped.is_empty())?;
        tx.commit()?;
        tracing::debug!(
            written = report.written,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "materialize: committed"
        );
        // What each path holds now, from the records in hand rather than reloading them all
        // (the last record of a path in `order` is the one written).
        let written = |path: &str| {
            let end = order.partition_point(|index| new_records[*index].path() <= path);
            end.checked_sub(1)
                .map(|last| &new_records[order[last]])
                .filter(|record| record.path() == path)
                .map(NewRecord::content)
        };
        self.clear_staging(&desired, |path| match written(path) {
            Some(content) => Some(content),
            None if removed.contains(path) => None,
            None => recorded.get(path).map(|have| have.content),
        })?;
        Ok(report)
    }

    fn record_for<'p>(&self, want: &'p Placement<'p>) -> Result<NewRecord<'p>, FolderError> {
        let found = placed_at(&self.absolute(&want.path))?;
        Ok(NewRecord::Placed { want, found })
    }

    /// Removes staged content no placement still waits for, and every other file in the
    /// staging folder (left by a crash before its listing, or by an older shoal). A listing
    /// goes before its file. `holds(path)` is the content recorded at a path (`None` when
    /// nothing is recorded there).
    fn clear_staging(
        &mut self,
        desired: &Desired,
        holds: impl Fn(&str) -> Option<Option<ContentHash>>,
    ) -> Result<(), FolderError> {
        let dir = self.staging_dir();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        let entries: Vec<fs::DirEntry> = entries.flatten().collect();
        if entries.is_empty() {
            return Ok(());
        }
        let waiting: HashSet<ContentHash> = desired
            .0
            .iter()
            .filter(|p| holds(&p.path).is_none_or(|content| content != p.version.entry.content))
            .filter_map(|p| p.version.entry.content)
            .collect();
        let (kept, unwanted): (Vec<_>, Vec<_>) = self
            .store
            .all_staged()?
            .into_iter()
            // A listing whose file is gone (an older shoal's layout) is no use either.
            .partition(|(hash, id)| waiting.contains(hash) && staged_file(&dir, *id).is_file());
        if !unwanted.is_empty() {
            let mut tx = self.store.begin()?;
            for (hash, _) in &unwanted {
                tx.remove_staged(hash)?;
            }
            tx.commit()?;
        }
        let kept: HashSet<String> = kept.iter().map(|(_, id)| staged_name(*id)).collect();
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            for file in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                let staged = format!("{name}/{}", file.file_name().to_string_lossy());
                if !kept.contains(&staged) {
                    let _ = fs::remove_file(file.path());
                }
            }
            // Gone when empty, so that a folder with nothing staged is found empty at once.
            let _ = fs::remove_dir(entry.path());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{Dot, Knowledge, ReplicaId, WriterId};

    fn record(path: &str, tick: u64) -> LocalFile {
        LocalFile {
            path: path.into(),
            item: ItemId([tick as u8; 16]),
            role: Role::Main,
            dot: Dot {
                writer: WriterId {
                    replica: ReplicaId([1; 16]),
                    epoch: 0,
                },
                tick,
            },
            history: Knowledge::new(),
            kind: ItemKind::File,
            content: None,
            size: tick,
            mtime_ns: 0,
            inode: tick,
            executable: false,
        }
    }

    fn paths(recorded: &Recorded) -> Vec<(String, u64)> {
        let mut all: Vec<_> = recorded.iter().map(|f| (f.path.clone(), f.size)).collect();
        all.sort();
        all
    }

    #[test]
    fn recorded_files_answer_as_a_map_would_through_removals_and_replacements() {
        let mut recorded = Recorded::new(vec![record("a", 1), record("b/c", 2), record("d", 3)]);
        assert_eq!(recorded.get("b/c").map(|f| f.size), Some(2));
        assert!(recorded.get("b").is_none());

        // Replacing a stored record hides the stored one.
        recorded.insert(record("b/c", 20));
        assert_eq!(recorded.get("b/c").map(|f| f.size), Some(20));
        // A new path between stored ones.
        recorded.insert(record("c", 30));
        assert!(recorded.contains("c"));
        if let Some(file) = recorded.get_mut("a") {
            file.size = 10;
        }
        assert_eq!(
            paths(&recorded),
            [
                ("a".into(), 10),
                ("b/c".into(), 20),
                ("c".into(), 30),
                ("d".into(), 3)
            ]
        );

        // Removing gives the record once, wherever it was kept.
        assert_eq!(recorded.remove("d").map(|f| f.size), Some(3));
        assert!(recorded.remove("d").is_none());
        assert_eq!(recorded.remove("b/c").map(|f| f.size), Some(20));
        assert!(recorded.get("b/c").is_none(), "the stored record came back");
        assert!(recorded.get_mut("d").is_none());
        recorded.insert(record("d", 40));
        assert_eq!(
            paths(&recorded),
            [("a".into(), 10), ("c".into(), 30), ("d".into(), 40)]
        );
    }
}
