//! A folder replica: a directory on disk seen as shoal items.
//!
//! Scanning turns what changed on disk since the last scan into new versions; materializing
//! turns the replica's current layout back into files, atomically and never over a file the
//! user changed in the meantime. [`mirror`] syncs two folders with each other.

mod apply;
mod conflicts;
mod mirror;
mod progress;
mod scan;

use std::path::{Path, PathBuf};

pub use shoal_core::BatchLimits;
use shoal_core::{NameError, STATE_DIR_NAME};
use shoal_store::{Store, StoreError};

pub use apply::{ContentSource, MaterializeReport, Staged, Stager};
pub use conflicts::{Conflict, ConflictKind, ConflictVersion, Resolution, ResolveReport};
pub use mirror::{FolderSource, MirrorOptions, MirrorReport, ReceiveReport, SideReport, mirror};
pub use progress::{NoProgress, Progress};
pub use scan::{ScanOptions, ScanReport, Skipped};

/// Why a folder operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FolderError {
    /// The folder does not exist (an unmounted disk, a typo): nothing is synced.
    #[error("{0} does not exist or is not a directory; not syncing it")]
    RootMissing(PathBuf),
    /// The folder suddenly looks empty although files were synced before.
    #[error(
        "{path} is empty but held {recorded} synced entries at the last run; refusing to delete them everywhere (if you really emptied it, run again with --allow-empty)"
    )]
    LooksEmpty {
        /// The folder.
        path: PathBuf,
        /// How many entries were recorded.
        recorded: usize,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A name from another replica cannot be written here.
    #[error("refused name: {0}")]
    Name(#[from] NameError),
    /// Another process kept writing this replica while its folder was scanned.
    #[error("the replica kept changing during the scan (another shoal process is writing it)")]
    ChangedMeanwhile,
    /// No conflict is listed at that path.
    #[error("no conflict at {0:?}; see `shoal conflicts`")]
    NoConflict(String),
    /// The resolution does not fit the conflict.
    #[error("{0}")]
    BadResolution(String),
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FolderError + '_ {
    move |source| FolderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

const STATE_DB: &str = "state.db";
/// Held shared by whoever puts files in place (they leave temporary files beside their
/// targets meanwhile), exclusively by a scan that removes stray ones.
const WRITING_LOCK: &str = "writing.lock";

/// A hold on a folder's writing lock, released when dropped.
pub(crate) struct WritingLock {
    _held: std::fs::File,
}

impl WritingLock {
    fn open(root: &Path) -> Result<std::fs::File, FolderError> {
        let path = root.join(STATE_DIR_NAME).join(WRITING_LOCK);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))
    }

    /// The shared hold, waiting while a scan holds it exclusively.
    pub(crate) fn shared(root: &Path) -> Result<WritingLock, FolderError> {
        let file = Self::open(root)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| io_error(&root.join(STATE_DIR_NAME))(e.into()))?;
        Ok(WritingLock { _held: file })
    }

    /// The exclusive hold, if nobody is putting files in place in `root` right now.
    pub(crate) fn exclusive_now(root: &Path) -> Option<WritingLock> {
        let file = Self::open(root).ok()?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
        Some(WritingLock { _held: file })
    }
}

/// One folder and its replica state in `<folder>/.shoal/`.
pub struct FolderReplica {
    root: PathBuf,
    store: Store,
}

impl FolderReplica {
    /// Opens the folder's replica, creating its state on first use.
    pub fn open(root: &Path, device: &str) -> Result<FolderReplica, FolderError> {
        if !root.is_dir() {
            return Err(FolderError::RootMissing(root.to_path_buf()));
        }
        let root = root.canonicalize().map_err(io_error(root))?;
        let state = root.join(STATE_DIR_NAME);
        std::fs::create_dir_all(state.join("tmp")).map_err(io_error(&state))?;
        let store = Store::open(&state.join(STATE_DB), device)?;
        Ok(FolderReplica { root, store })
    }

    /// Names `user` as the author of the versions this replica writes from now on.
    pub fn set_author(&mut self, user: &str) {
        self.store.set_author(user);
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The replica's metadata.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The replica's metadata, for changes.
    pub fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    pub(crate) fn state_db(&self) -> PathBuf {
        state_db_at(&self.root)
    }

    pub(crate) fn staging_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR_NAME).join("tmp")
    }

    /// The absolute path of a slash-separated relative path inside the folder.
    pub(crate) fn absolute(&self, relative: &str) -> PathBuf {
        absolute(&self.root, relative)
    }
}

/// `root` joined with a slash-separated relative path.
pub(crate) fn state_db_at(root: &Path) -> PathBuf {
    root.join(STATE_DIR_NAME).join(STATE_DB)
}

pub(crate) fn absolute(root: &Path, relative: &str) -> PathBuf {
    let mut path = root.to_path_buf();
    if !relative.is_empty() {
        path.extend(relative.split('/'));
    }
    path
}

/// Wall-clock time in nanoseconds since the Unix epoch (the core takes time as a value).
pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The indices of `records` in path order, records of one path in the order given (the last
/// is the one a table keyed by path keeps). Sorting indices, not records: a stable sort of
/// tens of thousands of records would copy half of them into a buffer first.
pub(crate) fn path_order<T>(records: &[T], path: impl Fn(&T) -> &str) -> Vec<usize> {
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by(|a, b| path(&records[*a]).cmp(path(&records[*b])));
    order
}

/// The layout's placements, sorted by path (as the layout gives them), found by path.
pub(crate) struct Desired<'a>(pub(crate) Vec<shoal_core::Placement<'a>>);

impl<'a> Desired<'a> {
    pub(crate) fn get(&self, path: &str) -> Option<&shoal_core::Placement<'a>> {
        self.0
            .binary_search_by(|p| p.path.as_str().cmp(path))
            .ok()
            .map(|index| &self.0[index])
    }
}
