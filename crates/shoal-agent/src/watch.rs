//! Watching a workspace's folder with inotify: every directory but the state folder, for the
//! events that can mean a change.
//!
//! A general-purpose watcher also asks for every open: the agent's own hashing, serving and
//! uploading open each file, and each open was an event for the watcher's thread to read,
//! turn into paths and drop (a first sync of 10,000 files cost the sender and the receiver
//! about 0.1 to 0.2 CPU-s each). Events are hints: any of them, or a lost one (the queue
//! overflowed), only marks the folder for a scan.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

/// What can change a folder: its entries (created, deleted, moved, written) and their
/// metadata (mode and times are part of a version). Never a symlink's target.
fn mask() -> WatchMask {
    WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MODIFY
        | WatchMask::MOVE_SELF
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DONT_FOLLOW
}

/// A running watch; its thread reads events for as long as the agent runs.
pub(crate) struct FolderWatch {
    _reader: std::thread::JoinHandle<()>,
}

/// A file modified and not closed since is taken to be still being written for this long
/// after its last write (a file truncated by name, or written by a process that keeps it
/// open, is never closed).
const WRITING_WINDOW: Duration = Duration::from_secs(1);

/// Whether a file in the watched folder may still be being written: one was modified and has
/// not been closed, moved away or deleted since. A folder whose writes are all closed can be
/// scanned at once; one being written is better left until it is quiet.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// Until when the last unclosed write counts (None: every write was closed).
    open_until: Mutex<Option<Instant>>,
}

impl Writes {
    /// Whether a write may still be going on.
    pub(crate) fn open(&self) -> bool {
        self.open_until
            .lock()
            .map_or(true, |until| until.is_some_and(|t| Instant::now() < t))
    }

    fn set(&self, until: Option<Instant>) {
        if let Ok(mut open_until) = self.open_until.lock() {
            *open_until = until;
        }
    }
}

/// Watches `root` and every directory below it except `root/.shoal`, calling `changed` after
/// each read of events that holds a change (or when events may have been lost), and keeping
/// `writes` up to date before each call.
pub(crate) fn watch_folder(
    root: &Path,
    writes: Arc<Writes>,
    changed: impl Fn() + Send + 'static,
) -> std::io::Result<FolderWatch> {
    let inotify = Inotify::init()?;
    let mut dirs = HashMap::new();
    add_tree(&mut inotify.watches(), &mut dirs, root, root)?;
    let root = root.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("shoal-watch".into())
        .spawn(move || read_events(inotify, dirs, &root, &writes, changed))?;
    Ok(FolderWatch { _reader: reader })
}

fn read_events(
    mut inotify: Inotify,
    mut dirs: HashMap<WatchDescriptor, PathBuf>,
    root: &Path,
    writes: &Writes,
    changed: impl Fn(),
) {
    let mut buffer = vec![0u8; 64 << 10];
    // Files modified and not closed since, with the time of their last write.
    let mut unclosed: HashMap<(WatchDescriptor, OsString), Instant> = HashMap::new();
    loop {
        let events = match inotify.read_events_blocking(&mut buffer) {
            Ok(events) => events,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Nothing more will be heard: the rescan backstop takes over.
                changed();
                return;
            }
        };
        let mut change = false;
        let mut new_dirs = Vec::new();
        let now = Instant::now();
        for event in events {
            if event.mask.contains(EventMask::IGNORED) {
                dirs.remove(&event.wd);
                unclosed.retain(|(wd, _), _| *wd != event.wd);
                continue;
            }
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                // Closes may have been lost with the rest: writes count as open a while.
                unclosed.clear();
                unclosed.insert((event.wd.clone(), OsString::new()), now);
                change = true;
                continue;
            }
            let dir = dirs.get(&event.wd);
            let ours = event.name.is_some_and(|name| {
                name.as_bytes()
                    .starts_with(shoal_core::TEMP_PREFIX.as_bytes())
                    || dir.is_some_and(|d| d == root) && name == shoal_core::STATE_DIR_NAME
            });
            if ours {
                continue;
            }
            change = true;
            if let Some(name) = event
                .name
                .filter(|_| !event.mask.contains(EventMask::ISDIR))
            {
                let key = (event.wd.clone(), name.to_os_string());
                if event.mask.contains(EventMask::MODIFY) {
                    unclosed.insert(key, now);
                } else if event
                    .mask
                    .intersects(EventMask::CLOSE_WRITE | EventMask::DELETE | EventMask::MOVED_FROM)
                {
                    unclosed.remove(&key);
                }
            }
            // A folder made or moved in is watched too, with whatever it already holds.
            if event.mask.contains(EventMask::ISDIR)
                && event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                && let (Some(dir), Some(name)) = (dir, event.name)
            {
                new_dirs.push(dir.join(name));
            }
        }
        for dir in new_dirs {
            // Gone again, or out of watches: the scan still finds what it holds.
            let _ = add_tree(&mut inotify.watches(), &mut dirs, &dir, root);
        }
        unclosed.retain(|_, last| now.duration_since(*last) < WRITING_WINDOW);
        writes.set(unclosed.values().max().map(|last| *last + WRITING_WINDOW));
        if change {
            changed();
        }
    }
}

/// Watches `dir` and the directories below it, never following a symlink, leaving out the
/// state folder at the root.
fn add_tree(
    watches: &mut Watches,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    dir: &Path,
    root: &Path,
) -> std::io::Result<()> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let wd = match watches.add(&dir, mask() | WatchMask::ONLYDIR) {
            Ok(wd) => wd,
            // Removed meanwhile (or replaced by a file): nothing to watch there.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ENOTDIR)
                ) =>
            {
                continue;
            }
            Err(error) => return Err(error),
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            dirs.insert(wd, dir);
            continue;
        };
        for entry in entries.flatten() {
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let state = dir == root && entry.file_name() == shoal_core::STATE_DIR_NAME;
            if is_dir && !state {
                pending.push(entry.path());
            }
        }
        dirs.insert(wd, dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn next(rx: &mpsc::Receiver<()>) -> bool {
        rx.recv_timeout(Duration::from_secs(2)).is_ok()
    }

    fn quiet(rx: &mpsc::Receiver<()>) -> bool {
        rx.recv_timeout(Duration::from_millis(300)).is_err()
    }

    #[test]
    fn changes_anywhere_below_are_heard_and_the_agents_own_files_are_not()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        std::fs::create_dir_all(root.join(".shoal/tmp"))?;
        std::fs::create_dir_all(root.join("a/b"))?;
        std::fs::write(root.join("a/b/old.txt"), "old")?;
        let (tx, rx) = mpsc::channel();
        let _watch = watch_folder(root, Arc::default(), move || {
            let _ = tx.send(());
        })?;

        // Reading is not a change; the state folder and temporary files are the agent's own.
        let _ = std::fs::read(root.join("a/b/old.txt"))?;
        std::fs::write(root.join(".shoal/tmp/staged"), "x")?;
        std::fs::write(root.join(".shoal/state.db"), "x")?;
        std::fs::write(
            root.join(format!("a/{}1.tmp", shoal_core::TEMP_PREFIX)),
            "x",
        )?;
        assert!(quiet(&rx));

        // Edits in a folder that was there from the start.
        std::fs::write(root.join("a/b/old.txt"), "new")?;
        assert!(next(&rx));
        while !quiet(&rx) {}

        // A folder made after the start is watched too, and so is one moved in whole.
        std::fs::create_dir(root.join("a/later"))?;
        assert!(next(&rx));
        while !quiet(&rx) {}
        std::fs::write(root.join("a/later/file.txt"), "x")?;
        assert!(next(&rx));
        while !quiet(&rx) {}
        let outside = tempfile::tempdir()?;
        std::fs::create_dir_all(outside.path().join("tree/deep"))?;
        std::fs::rename(outside.path().join("tree"), root.join("tree"))?;
        assert!(next(&rx));
        while !quiet(&rx) {}
        std::fs::write(root.join("tree/deep/file.txt"), "x")?;
        assert!(next(&rx));
        while !quiet(&rx) {}

        // A mode change is a change (mode is part of a version).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("tree/deep/file.txt"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        assert!(next(&rx));
        Ok(())
    }

    #[test]
    fn a_file_counts_as_being_written_until_it_is_closed() -> Result<(), Box<dyn std::error::Error>>
    {
        use std::io::Write;
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let writes = Arc::new(Writes::default());
        let (tx, rx) = mpsc::channel();
        let _watch = watch_folder(root, writes.clone(), move || {
            let _ = tx.send(());
        })?;
        assert!(!writes.open());

        let mut file = std::fs::File::create(root.join("doc.txt"))?;
        file.write_all(b"first half")?;
        assert!(next(&rx));
        while !quiet(&rx) {}
        assert!(writes.open(), "written and still open");
        file.write_all(b", second half")?;
        drop(file);
        assert!(next(&rx));
        while !quiet(&rx) {}
        assert!(!writes.open(), "closed");

        // Moved in whole, or deleted: nothing left open.
        let outside = tempfile::tempdir()?;
        std::fs::write(outside.path().join("whole.bin"), b"all of it")?;
        std::fs::rename(outside.path().join("whole.bin"), root.join("whole.bin"))?;
        assert!(next(&rx));
        while !quiet(&rx) {}
        assert!(!writes.open(), "moved in");
        let mut file = std::fs::File::create(root.join("gone.txt"))?;
        file.write_all(b"x")?;
        std::fs::remove_file(root.join("gone.txt"))?;
        assert!(next(&rx));
        while !quiet(&rx) {}
        assert!(!writes.open(), "deleted while open");

        // A file kept open counts only for a while after its last write.
        file.write_all(b"into the deleted file")?;
        let mut kept = std::fs::File::create(root.join("log.txt"))?;
        kept.write_all(b"line")?;
        assert!(next(&rx));
        while !quiet(&rx) {}
        assert!(writes.open());
        std::thread::sleep(WRITING_WINDOW);
        assert!(!writes.open(), "no write for a while");
        Ok(())
    }
}
