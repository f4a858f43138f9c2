//! Two-way sync of two local folders, the job Unison does.
//!
//! Each folder is a replica with its own state in `.shoal/`. A run scans both, sends each the
//! versions it lacks (batch by batch, content staged before each batch commits), then brings
//! both folders in line with their layouts. Running it again with nothing changed reads two
//! directory trees and exchanges two knowledge values.

use std::fs;
use std::path::{Path, PathBuf};

use shoal_core::{BatchLimits, ContentHash, Receiving, SyncOffer, dead_versions, plan_batches};
use shoal_store::ContentIndex;

use crate::apply::ContentSource;
use crate::scan::{same_stat, stat};
use crate::{
    FolderError, FolderReplica, MaterializeReport, Progress, ScanOptions, ScanReport, now_ns,
};

/// How to mirror.
#[derive(Clone, Debug, Default)]
pub struct MirrorOptions {
    /// Accept a folder that became empty.
    pub allow_empty: bool,
    /// Batch limits (defaults when `None`).
    pub limits: Option<BatchLimits>,
}

/// What happened on one side.
#[derive(Clone, Debug, Default)]
pub struct SideReport {
    /// The folder.
    pub path: PathBuf,
    /// Local changes found by the scan.
    pub scan: ScanReport,
    /// What was received from the other side.
    pub received: ReceiveReport,
    /// Disk changes made.
    pub materialize: MaterializeReport,
}

/// What a mirror run did, per side.
#[derive(Clone, Debug, Default)]
pub struct MirrorReport {
    /// The first folder.
    pub a: SideReport,
    /// The second folder.
    pub b: SideReport,
    /// Whether either side had to start a new epoch (its state was restored from an old copy).
    pub new_epoch: bool,
    /// Tombstones forgotten on both sides because every known replica has seen them.
    pub forgotten: usize,
}

/// Reads content from a folder replica's files, checking each did not change since it was
/// recorded.
pub struct FolderSource {
    root: PathBuf,
    index: ContentIndex,
}

impl FolderReplica {
    /// This folder as a source of content for another replica.
    pub fn content_source(&self) -> Result<FolderSource, FolderError> {
        Ok(FolderSource {
            root: self.root().to_path_buf(),
            index: self.content_index()?,
        })
    }

    /// A read-only view of this replica's recorded files and chunk lists, for other threads.
    pub fn content_index(&self) -> Result<ContentIndex, FolderError> {
        Ok(ContentIndex::open(&self.state_db())?)
    }

    /// The same view of the replica of the folder at `root`, without opening the replica.
    pub fn content_index_at(root: &Path) -> Result<ContentIndex, FolderError> {
        Ok(ContentIndex::open(&crate::state_db_at(root))?)
    }

    /// Receives every version `from` has and this replica lacks, batch by batch: content is
    /// staged first, then each batch commits in one transaction. The disk is not touched
    /// until [`FolderReplica::materialize`].
    pub fn receive_from(
        &mut self,
        from: &FolderReplica,
        limits: BatchLimits,
        progress: &dyn Progress,
    ) -> Result<ReceiveReport, FolderError> {
        let mut report = ReceiveReport::default();
        send(from, self, limits, &mut report, progress)?;
        Ok(report)
    }
}

/// What receiving from another replica did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Items whose state changed.
    pub received: usize,
    /// Items now in conflict.
    pub conflicts: usize,
    /// Versions whose content could not be fetched (offered again next time).
    pub failed: usize,
    /// Versions dropped by a recovery compare: deleted elsewhere, with the deletion since
    /// forgotten (this replica had come back from behind the watermark).
    pub recovered: usize,
}

impl ContentSource for FolderSource {
    fn copy_to(&self, hash: &ContentHash, dest: &Path) -> bool {
        let Ok(Some(file)) = self.index.file_with(hash) else {
            return false;
        };
        let mut source = self.root.clone();
        source.extend(file.path.split('/'));
        let unchanged = || matches!(stat(&source), Ok(Some(found)) if same_stat(&found, &file));
        unchanged() && fs::copy(&source, dest).is_ok() && unchanged()
    }
}

fn device_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "root".into())
}

/// Syncs folders `a` and `b` both ways.
pub fn mirror(
    a: &Path,
    b: &Path,
    options: &MirrorOptions,
    progress: &dyn Progress,
) -> Result<MirrorReport, FolderError> {
    let mut side_a = FolderReplica::open(a, &device_name(a))?;
    let mut side_b = FolderReplica::open(b, &device_name(b))?;
    if side_a.root() == side_b.root() {
        return Err(FolderError::Io {
            path: side_a.root().to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "both sides are the same folder",
            ),
        });
    }
    let mut report = MirrorReport::default();
    report.a.path = side_a.root().to_path_buf();
    report.b.path = side_b.root().to_path_buf();

    // A side whose state was restored from an old copy must not reuse dots it handed out.
    let (knowledge_a, knowledge_b) = (side_a.store().knowledge()?, side_b.store().knowledge()?);
    report.new_epoch |= observe(&mut side_a, &knowledge_b)?;
    report.new_epoch |= observe(&mut side_b, &knowledge_a)?;

    let started = std::time::Instant::now();
    let phase = |name: &str| {
        tracing::debug!(
            phase = name,
            elapsed_ms = started.elapsed().as_millis() as u64
        )
    };
    let scan = ScanOptions {
        allow_empty: options.allow_empty,
    };
    report.a.scan = side_a.scan(&scan, progress)?;
    report.b.scan = side_b.scan(&scan, progress)?;
    phase("scanned");

    let limits = options.limits.unwrap_or_default();
    report.b.received = side_b.receive_from(&side_a, limits, progress)?;
    report.a.received = side_a.receive_from(&side_b, limits, progress)?;
    phase("exchanged");

    if side_b.store().needs_materialize()? {
        let source_a = side_a.content_source()?;
        report.b.materialize = side_b.materialize(Some(&source_a), progress)?;
    }
    if side_a.store().needs_materialize()? {
        let source_b = side_b.content_source()?;
        report.a.materialize = side_a.materialize(Some(&source_b), progress)?;
    }
    phase("materialized");

    remember_partner(&mut side_a, &side_b)?;
    remember_partner(&mut side_b, &side_a)?;
    for side in [&mut side_a, &mut side_b] {
        let mut tx = side.store_mut().begin()?;
        report.forgotten += tx.forget_behind_watermark()?;
        tx.commit()?;
    }
    phase("done");
    Ok(report)
}

fn observe(side: &mut FolderReplica, other: &shoal_core::Knowledge) -> Result<bool, FolderError> {
    let writer = side.store().identity().writer();
    let tick = side.store().tick()?;
    if other.highest(&writer) > tick {
        let mut tx = side.store_mut().begin()?;
        tx.new_epoch()?;
        tx.commit()?;
        return Ok(true);
    }
    Ok(false)
}

/// One direction: every version `to` lacks, batch by batch.
fn send(
    from: &FolderReplica,
    to: &mut FolderReplica,
    limits: BatchLimits,
    report: &mut ReceiveReport,
    progress: &dyn Progress,
) -> Result<(), FolderError> {
    let offer = SyncOffer {
        knowledge: from.store().knowledge()?,
        forgotten: from.store().forgotten()?,
    };
    let receiver = to.store().knowledge()?;
    if offer.needs_recovery(&receiver) {
        let mut dead = Vec::new();
        for (item, dot) in to.recovery_candidates(&offer.knowledge)? {
            if !from.store().has_seen(&item, &dot)? {
                dead.push((item, dot));
            }
        }
        report.recovered += to.drop_dead(&dead, &offer.forgotten)?;
    }
    let missing = from.store().missing_for(&receiver)?;
    if missing.is_empty() && receiver.covers_knowledge(&offer.knowledge) {
        return Ok(());
    }
    let source = from.content_source()?;
    let mut session = Receiving::new();
    for batch in plan_batches(missing, &offer, limits) {
        let mut contents = Vec::new();
        for (_, version) in &batch.versions {
            if let Some(content) = version
                .entry
                .content
                .and_then(|h| from.store().content(&h).transpose())
            {
                contents.push(content?);
            }
        }
        let applied = to.apply_batch(&mut session, &batch, &contents, &source, progress)?;
        report.received += applied.received;
        report.conflicts += applied.conflicts;
        report.failed += applied.failed;
    }
    Ok(())
}

impl FolderReplica {
    /// Live versions held here whose dots a sender has seen: the candidates a recovery compare
    /// asks the sender about.
    pub fn recovery_candidates(
        &self,
        sender_knowledge: &shoal_core::Knowledge,
    ) -> Result<Vec<(shoal_core::ItemId, shoal_core::Dot)>, FolderError> {
        let items = self.store().load_items()?;
        Ok(dead_versions(&items, sender_knowledge, |_, _| false))
    }

    /// Drops versions a recovery compare found dead, and adopts the sender's forgotten
    /// tombstones so this replica passes the news of those deletions on. Returns how many.
    pub fn drop_dead(
        &mut self,
        dead: &[(shoal_core::ItemId, shoal_core::Dot)],
        forgotten: &shoal_core::VersionVector,
    ) -> Result<usize, FolderError> {
        let mut tx = self.store_mut().begin()?;
        for (item, dot) in dead {
            tx.remove_versions(item, &[*dot])?;
        }
        tx.add_forgotten(forgotten)?;
        tx.set_needs_materialize(true)?;
        tx.commit()?;
        Ok(dead.len())
    }

    /// Applies the next batch of an enumeration: stages the content it needs from `source`,
    /// then commits the batch in one transaction (versions whose content did not arrive are
    /// skipped and offered again next time). `contents` are the chunk lists of its contents.
    pub fn apply_batch(
        &mut self,
        session: &mut Receiving,
        batch: &shoal_core::Batch,
        contents: &[shoal_store::ChunkedContent],
        source: &dyn ContentSource,
        progress: &dyn Progress,
    ) -> Result<ReceiveReport, FolderError> {
        let staged = self.stage(&batch.versions, source, progress)?;
        self.commit_batch(session, batch, contents, &staged)
    }

    /// Commits a batch whose content `staged` holds, in one transaction. Batches are
    /// committed in the order they were received.
    pub fn commit_batch(
        &mut self,
        session: &mut Receiving,
        batch: &shoal_core::Batch,
        contents: &[shoal_store::ChunkedContent],
        staged: &crate::apply::Staged,
    ) -> Result<ReceiveReport, FolderError> {
        let crate::apply::Staged { available, files } = staged;
        let mut tx = self.store_mut().begin()?;
        for (hash, id) in files {
            tx.put_staged(hash, *id)?;
        }
        // In key order, as the table is (see the scan's commit).
        let mut by_hash: Vec<&shoal_store::ChunkedContent> = contents.iter().collect();
        by_hash.sort_unstable_by_key(|c| c.hash);
        for content in by_hash {
            tx.put_content(content)?;
        }
        let mut knowledge = tx.knowledge().clone();
        let applied = session.apply(&mut tx, &mut knowledge, batch, |_, v| {
            v.entry.deleted || v.entry.content.is_none_or(|h| available.contains(&h))
        })?;
        *tx.knowledge_mut() = knowledge;
        if !applied.changed.is_empty() {
            tx.set_needs_materialize(true)?;
        }
        if let Some(forgotten) = &applied.learned_forgotten {
            tx.add_forgotten(forgotten)?;
        }
        tx.commit()?;
        Ok(ReceiveReport {
            received: applied.changed.len(),
            conflicts: applied.conflicts.len(),
            failed: applied.failed.len(),
            recovered: 0,
        })
    }
}

fn remember_partner(side: &mut FolderReplica, partner: &FolderReplica) -> Result<(), FolderError> {
    let knowledge = partner.store().knowledge()?;
    let replica = partner.store().identity().replica;
    if side.store().partners()?.get(&replica) == Some(&knowledge) {
        return Ok(());
    }
    let mut tx = side.store_mut().begin()?;
    tx.set_partner(replica, &knowledge, now_ns())?;
    tx.commit()?;
    Ok(())
}
