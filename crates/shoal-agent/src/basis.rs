//! Copies of large files made while another device reads its changed version of them.
//!
//! A device whose scan finds a large file changed in place says so before reading it again
//! (`Negotiation::changing`). A device holding that file as it recorded it starts copying it
//! into `.shoal/early/` at once, and the download that later brings the new version builds it
//! in that copy: only the chunks that are not at the same place in the old version are
//! written then. Otherwise the copy of the unchanged part, most of the work for a large file
//! edited in place (the new version is written whole beside the old, never over it), would
//! only start once the change had arrived.
//!
//! A copy is trusted only when its file was as recorded before and after the copy (the same
//! check a copy of local chunks makes). The folder is emptied when the agent starts, and a
//! copy no download takes within [`KEEP`] is removed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shoal_core::{ChunkedContent, ContentHash, ItemKind};
use shoal_protocol::hex32;

use crate::early::early_dir;
use crate::sync::{PARALLEL_TRANSFERS, Stamp, copy_range};

/// Files from this size are copied ahead when another device says it is changing them.
pub(crate) const BASIS_MIN: u64 = 16 << 20;
/// At most this many copies run at once; further heads-ups wait for their download.
const COPYING_MAX: usize = 2;
/// A copy no download took within this long is removed (the change never came, or the file
/// was only touched): it holds as much disk as the file.
const KEEP: Duration = Duration::from_secs(2 * 60);
/// What one copying thread takes at a time.
const SPAN: u64 = 8 << 20;

struct Basis {
    /// The version copied: which chunk lies where.
    old: Arc<ChunkedContent>,
    file: PathBuf,
    ready: bool,
    at: Instant,
}

/// The copies made ahead, or being made, per workspace and old content.
#[derive(Default)]
pub(crate) struct Bases {
    slots: Mutex<HashMap<(String, ContentHash), Basis>>,
    changed: Condvar,
    /// Copies finished, and those a download built its new version in.
    pub(crate) copied: AtomicU64,
    pub(crate) used: AtomicU64,
}

impl Bases {
    fn slots(&self) -> MutexGuard<'_, HashMap<(String, ContentHash), Basis>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts copying the files at `paths` (as another device of workspace `ws` named them)
    /// in the folder `root`, each on threads of its own: those recorded as large files, still
    /// as recorded, and not copied or being copied already.
    pub(crate) fn start(self: &Arc<Self>, ws: &str, root: &Path, paths: &[String]) {
        self.sweep();
        let Ok(index) = shoal_folder::FolderReplica::content_index_at(root) else {
            return;
        };
        for path in paths {
            let Ok(Some(file)) = index.file_at(path) else {
                continue;
            };
            let Some(hash) = file
                .content
                .filter(|_| file.kind == ItemKind::File && file.size >= BASIS_MIN)
            else {
                continue;
            };
            let Ok(Some(old)) = index.content(&hash) else {
                continue;
            };
            let mut source = root.to_path_buf();
            source.extend(file.path.split('/'));
            let recorded = Stamp::recorded(&file);
            // Changed here too since the scan: a conflict to come, not a copy to make.
            if File::open(&source).ok().and_then(|f| Stamp::of(&f)) != Some(recorded) {
                continue;
            }
            let dest = early_dir(root).join(format!("{}.basis", hex32(&hash.0)));
            if !self.reserve(ws, hash, old, &dest) {
                continue;
            }
            let done = Finish {
                bases: self.clone(),
                ws: ws.to_owned(),
                hash,
                copied: false,
            };
            let spawned = std::thread::Builder::new()
                .name("basis-copy".into())
                .spawn(move || {
                    // The whole guard moves here, not just the field set below.
                    let mut done = done;
                    let started = Instant::now();
                    done.copied = copy(&source, recorded, &dest);
                    tracing::debug!(
                        content = %hash,
                        copied = done.copied,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "copied ahead of a change"
                    );
                });
            // Not started: the dropped closure's `Finish` ended the slot.
            if let Err(error) = spawned {
                tracing::debug!(%error, "cannot copy ahead");
            }
        }
    }

    fn reserve(&self, ws: &str, hash: ContentHash, old: ChunkedContent, file: &Path) -> bool {
        let mut slots = self.slots();
        let copying = slots.values().filter(|b| !b.ready).count();
        let key = (ws.to_owned(), hash);
        if copying >= COPYING_MAX || slots.contains_key(&key) {
            return false;
        }
        slots.insert(
            key,
            Basis {
                old: Arc::new(old),
                file: file.to_path_buf(),
                ready: false,
                at: Instant::now(),
            },
        );
        true
    }

    fn finish(&self, ws: &str, hash: &ContentHash, copied: bool) {
        let key = (ws.to_owned(), *hash);
        let mut slots = self.slots();
        if copied {
            if let Some(basis) = slots.get_mut(&key) {
                basis.ready = true;
                basis.at = Instant::now();
                self.copied.fetch_add(1, Ordering::Relaxed);
            }
        } else if let Some(basis) = slots.remove(&key) {
            let _ = fs::remove_file(&basis.file);
        }
        self.changed.notify_all();
    }

    /// Moves to `dest` the copy of workspace `ws` that holds most of `content` already in
    /// place (at least half of its bytes), first waiting for it if it is still being made.
    /// Returns the offsets of `content`'s chunks already in place there; none without such a
    /// copy.
    pub(crate) fn take(
        &self,
        ws: &str,
        content: &ChunkedContent,
        dest: &Path,
    ) -> Option<HashSet<u64>> {
        let mut slots = self.slots();
        let (key, placed) = slots
            .iter()
            .filter(|((w, _), _)| w == ws)
            .map(|(key, basis)| (key.clone(), in_place(&basis.old, content)))
            .max_by_key(|(_, (_, bytes))| *bytes)?;
        let (placed, bytes) = placed;
        if bytes == 0 || bytes < content.size / 2 {
            return None;
        }
        while slots.get(&key).is_some_and(|b| !b.ready) {
            slots = self
                .changed
                .wait_timeout(slots, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let basis = slots.remove(&key)?;
        drop(slots);
        if fs::rename(&basis.file, dest).is_err() {
            let _ = fs::remove_file(&basis.file);
            return None;
        }
        self.used.fetch_add(1, Ordering::Relaxed);
        Some(placed)
    }

    /// Removes the copies no download took in time.
    pub(crate) fn sweep(&self) {
        self.slots().retain(|_, basis| {
            let stale = basis.ready && basis.at.elapsed() > KEEP;
            if stale {
                let _ = fs::remove_file(&basis.file);
            }
            !stale
        });
    }
}

/// Ends a copy's slot when its thread ends, however it ends: a download waiting for the copy
/// must not wait for ever.
struct Finish {
    bases: Arc<Bases>,
    ws: String,
    hash: ContentHash,
    copied: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.bases.finish(&self.ws, &self.hash, self.copied);
    }
}

/// The offsets of `content`'s chunks that lie at the same place in `old`, and their bytes.
fn in_place(old: &ChunkedContent, content: &ChunkedContent) -> (HashSet<u64>, u64) {
    let at: HashMap<u64, (ContentHash, u32)> = old
        .chunks
        .iter()
        .map(|c| (c.offset, (c.hash, c.len)))
        .collect();
    let mut bytes = 0;
    let placed = content
        .chunks
        .iter()
        .filter(|c| at.get(&c.offset) == Some(&(c.hash, c.len)))
        .map(|c| {
            bytes += u64::from(c.len);
            c.offset
        })
        .collect();
    (placed, bytes)
}

/// Copies the file at `source` to `dest`, around the page cache where the filesystem allows,
/// several spans at once. True only when the source was as `recorded` before and after.
fn copy(source: &Path, recorded: Stamp, dest: &Path) -> bool {
    let Ok(file) = File::open(source) else {
        return false;
    };
    if Stamp::of(&file) != Some(recorded) {
        return false;
    }
    let size = recorded.size();
    let made = dest
        .parent()
        .is_some_and(|dir| fs::create_dir_all(dir).is_ok());
    let Some(out) = made
        .then(|| shoal_store::LargeFile::create(dest, size).ok())
        .flatten()
    else {
        return false;
    };
    let spans: Vec<(u64, u64)> = (0..size)
        .step_by(SPAN as usize)
        .map(|at| (at, SPAN.min(size - at)))
        .collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_TRANSFERS {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(&(at, len)) = spans.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    if !(out.copy_in(source, at, len, at)
                        || copy_range(&file, at, out.file(), at, len))
                    {
                        failed.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let copied = !failed.load(Ordering::Relaxed) && Stamp::of(&file) == Some(recorded);
    if !copied {
        let _ = fs::remove_file(dest);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes::noise;
    use shoal_folder::{FolderReplica, NoProgress, ScanOptions};

    fn wait_until(done: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(20);
        while !done() {
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    #[test]
    fn a_file_as_recorded_is_copied_ahead_and_taken_by_a_version_sharing_its_places()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("folder");
        std::fs::create_dir(&root)?;
        let old = noise(20 << 20, 1);
        std::fs::write(root.join("big.bin"), &old)?;
        std::fs::write(root.join("small.bin"), b"too small to copy ahead")?;
        let mut folder = FolderReplica::open(&root, "d")?;
        folder.scan(&ScanOptions::default(), &NoProgress)?;

        let bases = Arc::new(Bases::default());
        let paths = ["small.bin", "nowhere.bin", "../big.bin", "big.bin"].map(String::from);
        bases.start("w", &root, &paths);
        assert!(wait_until(|| bases.copied.load(Ordering::Relaxed) == 1));
        assert_eq!(
            bases.slots().len(),
            1,
            "only the large recorded file is copied"
        );

        // A version with one megabyte rewritten in the middle shares most chunk places.
        let mut new = old.clone();
        new[8 << 20..9 << 20].copy_from_slice(&noise(1 << 20, 2));
        let content = shoal_store::chunk_bytes(&new);
        // Another workspace's copy, or a content sharing nothing, is not taken.
        let dest = dir.path().join("dest.bin");
        assert!(bases.take("other", &content, &dest).is_none());
        let unrelated = shoal_store::chunk_bytes(&noise(20 << 20, 3));
        assert!(bases.take("w", &unrelated, &dest).is_none());

        let placed = bases.take("w", &content, &dest).ok_or("no copy taken")?;
        assert_eq!(std::fs::read(&dest)?, old, "the copy is the old version");
        for chunk in &content.chunks {
            let (start, end) = (
                chunk.offset as usize,
                chunk.offset as usize + chunk.len as usize,
            );
            let same = old.get(start..end) == Some(&new[start..end]);
            // A chunk counted in place holds its bytes there; the changed ones are not.
            if placed.contains(&chunk.offset) {
                assert!(same, "chunk at {start} counted in place but changed");
            }
        }
        assert!(
            placed.len() + 40 > content.chunks.len(),
            "most chunks are in place"
        );
        assert_eq!(bases.used.load(Ordering::Relaxed), 1);
        assert!(bases.take("w", &content, &dest).is_none(), "taken once");

        // Changed since the scan: not copied.
        std::fs::write(root.join("big.bin"), &new)?;
        std::fs::File::options()
            .write(true)
            .open(root.join("big.bin"))?
            .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))?;
        bases.start("w", &root, &paths);
        assert!(bases.slots().is_empty());
        assert_eq!(bases.copied.load(Ordering::Relaxed), 1);
        Ok(())
    }
}
