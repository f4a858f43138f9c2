//! Contents fetched while another device is still uploading them.
//!
//! The hub announces the large contents of an upload as it plans it
//! (`PresenceEvent::Arriving`). The agent then fetches their chunks as they reach the hub into
//! a file under `.shoal/early/`, and the download that later brings the committed version
//! moves that file into its staging area instead of fetching the content again: the two
//! transfers overlap instead of following one another.
//!
//! Only this process's record of a finished fetch is trusted (each chunk was checked against
//! its name as it came, and the chunk list against the content's name); the folder is emptied
//! when the agent starts, and the staging that takes a file flushes it like any other. A
//! content no download takes within [`KEEP`] is removed.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shoal_client::HubClient;
use shoal_core::{ChunkRef, ContentHash, STATE_DIR_NAME};
use shoal_protocol::{hex32, routes};

use crate::AgentError;
use crate::sinks::{GroupSink, PieceSink};
use crate::sync::{PARALLEL_TRANSFERS, bundle_groups};

/// At most this many contents are fetched early at once; others wait for their download.
const FETCHING_MAX: usize = 2;
/// A fetch that got nothing for this long gives up (the upload stopped).
const STALL_MAX: Duration = Duration::from_secs(30);
/// A fetched content no download took within this long is removed (its upload was refused,
/// or another version won).
const KEEP: Duration = Duration::from_secs(10 * 60);
/// The pause before asking again for chunks that had not reached the hub yet.
const RETRY_AFTER: Duration = Duration::from_millis(20);

/// Where a folder's early contents are kept: outside the staging folder, which materialize
/// clears of anything it did not list.
pub(crate) fn early_dir(root: &Path) -> PathBuf {
    root.join(STATE_DIR_NAME).join("early")
}

/// Removes what an earlier run left in a folder's early area: nothing there is trusted.
pub(crate) fn clear(root: &Path) {
    let dir = early_dir(root);
    if dir.exists()
        && let Err(error) = fs::remove_dir_all(&dir)
    {
        tracing::warn!(path = %dir.display(), %error, "cannot clear fetched-early contents");
    }
}

enum Slot {
    Fetching,
    Ready { path: PathBuf, at: Instant },
}

/// The contents an agent fetched early, or is fetching, per workspace.
#[derive(Default)]
pub(crate) struct Early {
    slots: Mutex<HashMap<(String, ContentHash), Slot>>,
    changed: Condvar,
    /// Contents fetched whole, and those a download took.
    pub(crate) fetched: AtomicU64,
    pub(crate) claimed: AtomicU64,
    /// Large files copied ahead of their change.
    pub(crate) bases: Arc<crate::basis::Bases>,
}

impl Early {
    fn slots(&self) -> MutexGuard<'_, HashMap<(String, ContentHash), Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `(ws, hash)` for a fetch: false when it is fetched or being fetched already, or
    /// when enough fetches run.
    fn reserve(&self, ws: &str, hash: &ContentHash) -> bool {
        let mut slots = self.slots();
        let running = slots
            .values()
            .filter(|s| matches!(s, Slot::Fetching))
            .count();
        let key = (ws.to_owned(), *hash);
        if running >= FETCHING_MAX || slots.contains_key(&key) {
            return false;
        }
        slots.insert(key, Slot::Fetching);
        true
    }

    fn finish(&self, ws: &str, hash: &ContentHash, path: Option<PathBuf>) {
        let key = (ws.to_owned(), *hash);
        let mut slots = self.slots();
        match path {
            Some(path) => {
                self.fetched.fetch_add(1, Ordering::Relaxed);
                slots.insert(
                    key,
                    Slot::Ready {
                        path,
                        at: Instant::now(),
                    },
                );
            }
            None => {
                slots.remove(&key);
            }
        }
        self.changed.notify_all();
    }

    /// Moves the early copy of `hash` to `dest`, first waiting for a fetch of it in progress
    /// (a fetch ends on its own, whole or given up). False when there is none.
    pub(crate) fn claim(&self, ws: &str, hash: &ContentHash, dest: &Path) -> bool {
        let key = (ws.to_owned(), *hash);
        let mut slots = self.slots();
        while matches!(slots.get(&key), Some(Slot::Fetching)) {
            slots = self
                .changed
                .wait_timeout(slots, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let Some(Slot::Ready { path, .. }) = slots.remove(&key) else {
            return false;
        };
        drop(slots);
        let moved = fs::rename(&path, dest).is_ok();
        if moved {
            self.claimed.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = fs::remove_file(&path);
        }
        moved
    }

    /// Removes the copies no download took in time.
    pub(crate) fn sweep(&self) {
        let mut slots = self.slots();
        slots.retain(|_, slot| match slot {
            Slot::Ready { path, at } if at.elapsed() > KEEP => {
                let _ = fs::remove_file(path);
                false
            }
            _ => true,
        });
    }

    /// Starts fetching `contents` of workspace `ws`, whose folder is `root`, each on threads
    /// of its own; those this device holds already, or fetches already, are left out.
    pub(crate) fn start(
        self: &Arc<Self>,
        client: &HubClient,
        ws: &str,
        root: &Path,
        contents: Vec<ContentHash>,
    ) {
        self.sweep();
        let index = shoal_folder::FolderReplica::content_index_at(root).ok();
        for hash in contents {
            let held = index
                .as_ref()
                .is_some_and(|i| i.file_with(&hash).ok().flatten().is_some());
            if held || !self.reserve(ws, &hash) {
                continue;
            }
            let (early, client, workspace, dir) =
                (self.clone(), client.clone(), ws.to_owned(), early_dir(root));
            let spawned = std::thread::Builder::new()
                .name("early-fetch".into())
                .spawn(move || {
                    let started = Instant::now();
                    let fetched = fetch(&client, &workspace, &dir, &hash);
                    match &fetched {
                        Ok(_) => tracing::debug!(
                            content = %hash,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "fetched early"
                        ),
                        Err(error) => {
                            tracing::debug!(content = %hash, %error, "early fetch gave up")
                        }
                    }
                    early.finish(&workspace, &hash, fetched.ok());
                });
            if spawned.is_err() {
                self.finish(ws, &hash, None);
            }
        }
    }
}

/// Fetches the content `hash` of workspace `ws` into a file under `dir`, chunk by chunk as
/// they reach the hub. Returns the file once every chunk is in it.
fn fetch(
    client: &HubClient,
    ws: &str,
    dir: &Path,
    hash: &ContentHash,
) -> Result<PathBuf, AgentError> {
    let content = client.content_list(ws, hash)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error: std::io::Error| AgentError::Io(path, error)
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(format!("{}.part", hex32(&hash.0)));
    // Only large contents are announced: written around the page cache.
    let file = shoal_store::LargeFile::create(&path, content.size).map_err(io(&path))?;
    let groups = bundle_groups(content.chunks.iter().map(|c| (*hash, c)).collect());
    let left = AtomicUsize::new(groups.len());
    let queue = Mutex::new(VecDeque::from(groups));
    let failed = AtomicBool::new(false);
    let progress = Mutex::new(Instant::now());
    let location = routes::chunks(ws);
    let work = || {
        let mut piece = shoal_store::Piece::default();
        while !failed.load(Ordering::Relaxed) && left.load(Ordering::Acquire) > 0 {
            let next = queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            let stalled = || {
                progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .elapsed()
                    > STALL_MAX
            };
            let Some(group) = next else {
                // The rest is being asked for by the other threads.
                if stalled() {
                    failed.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(RETRY_AFTER);
                continue;
            };
            let mut wanted: Vec<ContentHash> = group.iter().map(|(_, c)| c.hash).collect();
            wanted.sort();
            wanted.dedup();
            let mut sink = PieceSink::new(&mut piece, &group);
            match client
                .fetch_chunks_into(&location, &wanted, &mut sink)
                .map_err(AgentError::from)
            {
                // What arrived before a transient fault is kept; the rest is asked again.
                Ok(()) => {}
                Err(error) if error.is_transient() => {}
                Err(_) => {
                    failed.store(true, Ordering::Relaxed);
                    return;
                }
            }
            let rest: Vec<(ContentHash, &ChunkRef)> = group
                .iter()
                .filter(|(_, chunk)| !sink.holds(&chunk.hash))
                .copied()
                .collect();
            let arrived = rest.len() < group.len();
            // A group asked again may have gaps (its chunks that came the first time): only
            // a gapless one is written as one piece.
            let written = if sink.whole() {
                drop(sink);
                file.write_piece(&piece)
            } else {
                sink.arrived_runs()
                    .into_iter()
                    .try_for_each(|(at, bytes)| file.write_parts_at(&[bytes], at))
            };
            if written.is_err() {
                failed.store(true, Ordering::Relaxed);
                return;
            }
            if arrived {
                *progress.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
            }
            if rest.is_empty() {
                left.fetch_sub(1, Ordering::Release);
                continue;
            }
            // Back to the front: the upload comes roughly in order, so what lies further on
            // has not arrived either.
            queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_front(rest);
            if !arrived {
                if stalled() {
                    failed.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(RETRY_AFTER);
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_TRANSFERS {
            scope.spawn(work);
        }
    });
    if failed.load(Ordering::Relaxed) {
        let _ = fs::remove_file(&path);
        return Err(AgentError::Protocol(format!(
            "content {hash} did not finish arriving at the hub"
        )));
    }
    // Flushed now, while the hub flushes the upload before its commit: the staging that takes
    // the file then finds nothing left to write. Staging flushes again in any case.
    file.file().sync_data().map_err(io(&path))?;
    Ok(path)
}
