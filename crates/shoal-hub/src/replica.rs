//! One workspace's replica on the hub: its metadata store, its chunks, and the download and
//! upload sessions in progress.
//!
//! Everything here is blocking (SQLite, files); the HTTP layer calls it on blocking threads,
//! one request per workspace at a time.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use shoal_core::{
    BatchLimits, ContentHash, Dot, ItemId, Knowledge, Receiving, ReplicaId, SyncOffer, Version,
    plan_batches,
};
use shoal_protocol::{
    CommitItem, CommitRequest, CommitResponse, DownloadResponse, ItemDot, Location,
    RecoveryResponse, UploadBatch, UploadOffer, UploadPlan, UploadPlanItem, WireBatch, WireContent,
    WireDot, WireKnowledge, WireLimits, WireVector, hex16, hex32, parse_item, routes, wire_batches,
};
use shoal_store::{ChunkStore, ChunkedContent, Store};

use crate::HubError;
use crate::accounts::Role;
use crate::rules::Rules;

/// The hub's batch limits (a caller's smaller limits win).
pub(crate) const HUB_LIMITS: BatchLimits = BatchLimits {
    max_items: 1_000,
    max_bytes: 64 << 20,
};
/// Contents at least this large are announced to the other devices while they upload
/// (`PresenceEvent::Arriving`): fetching them can then overlap the upload.
pub(crate) const ARRIVING_MIN: u64 = 8 << 20;
/// How long an unfinished session is kept.
const SESSION_TTL: Duration = Duration::from_secs(30 * 60);

struct DownloadSession {
    batches: Vec<WireBatch>,
    created: Instant,
}

struct PendingUpload {
    versions: Vec<(ItemId, Version)>,
    contents: HashMap<ContentHash, ChunkedContent>,
    learned: Knowledge,
    last: bool,
    role: Role,
    /// Large contents most of whose chunks are still to come: others may fetch them as they
    /// arrive. (A content mostly held already is a file changed in a few places, which the
    /// others rebuild from their own copy instead.)
    arriving: HashSet<ContentHash>,
    created: Instant,
}

/// Why a commit refuses `version` on its own merits, if it does: a reader wrote it (judged by
/// its author's role when the hub knows the author, since a peer may upload a reader's version
/// it accepted, else by the uploader's) or uploads it, its name could escape a folder or
/// cannot be stored (so no other device ever receives it), or it breaks a rule on size or
/// names. The quota, which depends on the whole batch, is checked apart.
fn own_refusal(
    version: &Version,
    uploader: Role,
    authors: &HashMap<ReplicaId, Role>,
    rules: &Rules,
) -> Option<String> {
    let author = authors
        .get(&version.dot.writer.replica)
        .copied()
        .unwrap_or(uploader);
    if uploader == Role::Reader || author == Role::Reader {
        return Some("readers cannot change this workspace".into());
    }
    if let Err(error) = shoal_core::validate_name(&version.entry.name) {
        return Some(format!("invalid name: {error}"));
    }
    rules.refusal(&version.entry)
}

/// A workspace replica held by the hub.
pub(crate) struct WorkspaceReplica {
    id: String,
    store: Store,
    chunks: ChunkStore,
    downloads: HashMap<String, DownloadSession>,
    uploads: HashMap<String, PendingUpload>,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn random_id() -> String {
    hex16(&rand::random())
}

/// The replica tag: the compact knowledge, in hex.
pub(crate) fn tag(knowledge: &Knowledge) -> String {
    knowledge.compact().to_string()
}

impl WorkspaceReplica {
    /// Opens (creating) the replica of workspace `id` under `dir`.
    pub(crate) fn open(dir: &Path, id: &str) -> Result<WorkspaceReplica, HubError> {
        std::fs::create_dir_all(dir).map_err(|e| HubError::Io(dir.to_path_buf(), e))?;
        let store = Store::open(&dir.join("state.db"), "hub")?;
        let chunk_dir = dir.join("chunks");
        let chunks = ChunkStore::open(&chunk_dir)?;
        Ok(WorkspaceReplica {
            id: id.to_owned(),
            store,
            chunks,
            downloads: HashMap::new(),
            uploads: HashMap::new(),
        })
    }

    fn expire(&mut self) {
        self.downloads
            .retain(|_, s| s.created.elapsed() < SESSION_TTL);
        self.uploads
            .retain(|_, s| s.created.elapsed() < SESSION_TTL);
    }

    /// The replica's id and epoch (the hub's identity when it syncs with a partner hub).
    pub(crate) fn identity(&self) -> (ReplicaId, u32) {
        let identity = self.store.identity();
        (identity.replica, identity.epoch)
    }

    /// The replica's knowledge.
    pub(crate) fn knowledge(&self) -> Result<Knowledge, HubError> {
        Ok(self.store.knowledge()?)
    }

    /// What a partner holding `theirs` lacks, in batches, each with the chunk lists of its
    /// contents.
    pub(crate) fn plan_upload(
        &self,
        theirs: &Knowledge,
        limits: BatchLimits,
    ) -> Result<Vec<(shoal_core::Batch, Vec<WireContent>)>, HubError> {
        let missing = self.store.missing_for(theirs)?;
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let offer = SyncOffer {
            knowledge: self.store.knowledge()?,
            forgotten: self.store.forgotten()?,
        };
        let mut planned = Vec::new();
        for batch in plan_batches(missing, &offer, limits) {
            let mut contents = Vec::new();
            for (hash, _) in batch.contents() {
                if let Some(content) = self.store.content(&hash)? {
                    contents.push(WireContent::from(&content));
                }
            }
            planned.push((batch, contents));
        }
        Ok(planned)
    }

    /// The tag of the refused versions held.
    pub(crate) fn refusals_tag(&self) -> Result<String, HubError> {
        let refused = self.store.refused()?;
        Ok(shoal_protocol::refusals_tag(
            refused
                .iter()
                .map(|(_, v, reason)| (v.dot, reason.as_str())),
        ))
    }

    /// Every refused version held, with the reason.
    pub(crate) fn refusals(&self) -> Result<Vec<shoal_protocol::Refusal>, HubError> {
        Ok(self
            .store
            .refused()?
            .iter()
            .map(|(item, version, reason)| shoal_protocol::Refusal {
                version: shoal_protocol::WireVersion::new(item, version),
                reason: reason.clone(),
            })
            .collect())
    }

    /// Lifts a refusal: the version is forgotten as refused, so its author offers it again and
    /// it is judged by the rules as they are then. False if it was not refused.
    pub(crate) fn lift(&mut self, dot: &Dot) -> Result<bool, HubError> {
        if !self.store.is_refused(dot)? {
            return Ok(false);
        }
        let mut tx = self.store.begin()?;
        tx.remove_refused(dot)?;
        tx.commit()?;
        Ok(true)
    }

    /// The replica's current tag.
    pub(crate) fn tag(&self) -> Result<String, HubError> {
        Ok(tag(&self.store.knowledge()?))
    }

    /// Refuses a caller whose epoch went backwards (its state was restored from an old copy).
    pub(crate) fn check_epoch(&self, replica: &ReplicaId, epoch: u32) -> Result<(), HubError> {
        match self.store.partner_epoch(replica)? {
            Some(known) if epoch < known => Err(HubError::StaleEpoch { known, got: epoch }),
            _ => Ok(()),
        }
    }

    fn locations(&self) -> Vec<Location> {
        vec![Location {
            transport: "http".into(),
            url: routes::chunks(&self.id),
        }]
    }

    /// Starts a download for a caller holding `knowledge`.
    pub(crate) fn download(
        &mut self,
        knowledge: &Knowledge,
        held: &HashSet<ContentHash>,
        limits: WireLimits,
    ) -> Result<DownloadResponse, HubError> {
        self.expire();
        let limits = HUB_LIMITS.negotiate(BatchLimits {
            max_items: limits.max_items,
            max_bytes: limits.max_bytes,
        });
        let offer = SyncOffer {
            knowledge: self.store.knowledge()?,
            forgotten: self.store.forgotten()?,
        };
        let recovery = offer.needs_recovery(knowledge);
        let missing = self.store.missing_for(knowledge)?;
        let session = random_id();
        let planned = plan_batches(missing, &offer, limits);
        let (store, id) = (&self.store, &self.id);
        let batches = wire_batches(
            planned,
            |hash| store.content(hash),
            |content| store.held_bases(content, held, shoal_protocol::DELTA_BASES),
            held,
            &self.locations(),
            |index| routes::download_batch(id, &session, index),
        )?;
        let first = batches
            .first()
            .cloned()
            .ok_or(HubError::Internal("no batch planned".into()))?;
        self.downloads.insert(
            session.clone(),
            DownloadSession {
                batches,
                created: Instant::now(),
            },
        );
        Ok(DownloadResponse {
            batch: first,
            result: routes::download_result(&self.id, &session),
            recovery,
            tag: tag(&offer.knowledge),
        })
    }

    /// One batch of a download session.
    pub(crate) fn download_batch(
        &mut self,
        session: &str,
        index: usize,
    ) -> Result<WireBatch, HubError> {
        self.expire();
        self.downloads
            .get(session)
            .and_then(|s| s.batches.get(index))
            .cloned()
            .ok_or(HubError::NotFound)
    }

    /// The caller reports what it applied: the hub remembers its knowledge and epoch.
    pub(crate) fn download_result(
        &mut self,
        session: &str,
        replica: ReplicaId,
        epoch: u32,
        knowledge: &Knowledge,
    ) -> Result<(), HubError> {
        if self.downloads.remove(session).is_none() {
            return Err(HubError::NotFound);
        }
        let mut tx = self.store.begin()?;
        tx.set_partner(replica, knowledge, now_ns())?;
        tx.set_partner_epoch(replica, epoch)?;
        tx.commit()?;
        Ok(())
    }

    /// Which of the candidates the hub has seen but no longer holds: dead.
    pub(crate) fn recovery(&self, candidates: &[ItemDot]) -> Result<RecoveryResponse, HubError> {
        let knowledge = self.store.knowledge()?;
        let mut dead = Vec::new();
        for candidate in candidates {
            let item = parse_item(&candidate.item)?;
            let dot = Dot::try_from(&candidate.dot)?;
            if knowledge.contains(&dot) && !self.store.has_seen(&item, &dot)? {
                dead.push(candidate.clone());
            }
        }
        Ok(RecoveryResponse {
            dead,
            forgotten: WireVector::from(&self.store.forgotten()?),
        })
    }

    /// What the hub has, before an upload.
    pub(crate) fn upload_offer(&self) -> Result<UploadOffer, HubError> {
        let knowledge = self.store.knowledge()?;
        Ok(UploadOffer {
            tag: tag(&knowledge),
            knowledge: WireKnowledge::from(&knowledge),
            limits: WireLimits {
                max_items: HUB_LIMITS.max_items,
                max_bytes: HUB_LIMITS.max_bytes,
            },
            batches: format!("{}/upload/batches", routes::workspace(&self.id)),
            refusals: self.refusals_tag()?,
        })
    }

    /// Batch metadata of an upload: says which content the hub still needs.
    pub(crate) fn upload_batch(
        &mut self,
        batch_id: &str,
        batch: &UploadBatch,
        role: Role,
    ) -> Result<UploadPlan, HubError> {
        self.expire();
        if batch_id.is_empty()
            || batch_id.len() > 64
            || !batch_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(HubError::BadRequest(
                "the batch id must be 1 to 64 letters, digits or dashes".into(),
            ));
        }
        if batch.versions.len() > HUB_LIMITS.max_items {
            return Err(HubError::TooLarge(format!(
                "{} versions in one batch; the limit is {}",
                batch.versions.len(),
                HUB_LIMITS.max_items
            )));
        }
        let mut versions = Vec::with_capacity(batch.versions.len());
        for wire in &batch.versions {
            versions.push(wire.to_core()?);
        }
        let mut contents = HashMap::new();
        for wire in &batch.contents {
            // Named without its chunk list, or sent as an edit of another content's list: the
            // uploader asked and was told the content (or the base) is held here.
            let held_here = |hash: ContentHash| {
                self.store.content(&hash)?.ok_or_else(|| {
                    HubError::BadRequest(format!(
                        "content {hash} is not held here; send its chunk list"
                    ))
                })
            };
            let content = if wire.held {
                held_here(shoal_protocol::parse_hash(&wire.hash)?)?
            } else {
                match wire.base_hash()? {
                    Some(base) => wire.resolve(Some(&held_here(base)?))?,
                    None => ChunkedContent::try_from(wire)?,
                }
            };
            contents.insert(content.hash, content);
        }
        // Every chunk of every content wanted, looked up at once: a batch of a thousand
        // small files is a thousand lookups in one transaction, not a thousand transactions.
        let mut wanted: Vec<Option<&ChunkedContent>> = Vec::with_capacity(versions.len());
        for (_, version) in &versions {
            // A reader's versions are refused at commit: no content is asked for.
            let Some(hash) = version
                .entry
                .content
                .filter(|_| !version.entry.deleted && role != Role::Reader)
            else {
                wanted.push(None);
                continue;
            };
            let content = contents.get(&hash).ok_or_else(|| {
                HubError::BadRequest(format!("no chunk list sent for content {hash}"))
            })?;
            if content.size != version.entry.size {
                return Err(HubError::BadRequest(format!(
                    "content {hash} has size {}, the version says {}",
                    content.size, version.entry.size
                )));
            }
            wanted.push(Some(content));
        }
        let mut listed: Vec<(ContentHash, u32)> = Vec::new();
        let mut spans = Vec::with_capacity(wanted.len());
        for content in &wanted {
            let start = listed.len();
            let mut seen = HashSet::new();
            listed.extend(
                content
                    .iter()
                    .flat_map(|c| &c.chunks)
                    .filter(|chunk| seen.insert(chunk.hash))
                    .map(|chunk| (chunk.hash, chunk.len)),
            );
            spans.push(start..listed.len());
        }
        let held = self.chunks.stored_lens_listed(&listed)?;
        let mut items = Vec::with_capacity(versions.len());
        let mut arriving = HashSet::new();
        for (((_, version), content), span) in versions.iter().zip(&wanted).zip(spans) {
            let mut missing = Vec::new();
            let mut missing_bytes = 0u64;
            for ((hash, len), stored) in listed[span.clone()].iter().zip(&held[span]) {
                if stored.is_none() {
                    missing.push(hex32(&hash.0));
                    missing_bytes += u64::from(*len);
                }
            }
            if let Some(content) = content
                && missing_bytes >= ARRIVING_MIN
                && missing_bytes >= content.size / 4 * 3
            {
                arriving.insert(content.hash);
            }
            items.push(UploadPlanItem {
                dot: WireDot::from(&version.dot),
                needed: !missing.is_empty(),
                missing,
            });
        }
        self.uploads.insert(
            batch_id.to_owned(),
            PendingUpload {
                versions,
                contents,
                learned: Knowledge::try_from(&batch.learned)?,
                last: batch.last,
                role,
                arriving,
                created: Instant::now(),
            },
        );
        Ok(UploadPlan {
            items,
            locations: self
                .locations()
                .into_iter()
                .filter(|l| l.transport == "http")
                .collect(),
            commit: routes::upload_commit(&self.id, batch_id),
        })
    }

    /// The large contents of an upload batch's versions that are still to arrive and that
    /// the commit would accept on the versions' own merits (`own_refusal`): what the other
    /// devices may fetch while they upload.
    pub(crate) fn arriving(
        &self,
        batch_id: &str,
        rules: &Rules,
        authors: &HashMap<ReplicaId, Role>,
    ) -> Vec<ContentHash> {
        let Some(pending) = self.uploads.get(batch_id) else {
            return Vec::new();
        };
        let mut arriving: Vec<ContentHash> = pending
            .versions
            .iter()
            .filter(|(_, v)| {
                !v.entry.deleted && own_refusal(v, pending.role, authors, rules).is_none()
            })
            .filter_map(|(_, v)| v.entry.content)
            .filter(|hash| pending.arriving.contains(hash))
            .collect();
        arriving.sort();
        arriving.dedup();
        arriving
    }

    /// The chunk list of a content this replica holds, or that an upload in progress brings.
    pub(crate) fn content_list(
        &self,
        hash: &ContentHash,
    ) -> Result<Option<ChunkedContent>, HubError> {
        if let Some(content) = self.store.content(hash)? {
            return Ok(Some(content));
        }
        Ok(self
            .uploads
            .values()
            .filter(|pending| pending.role != Role::Reader)
            .find_map(|pending| pending.contents.get(hash).cloned()))
    }

    /// The workspace's chunks, for reads and writes that need no lock on the replica (chunks
    /// are named by their content, and a chunk's row is written only after its bytes).
    pub(crate) fn chunk_store(&self) -> ChunkStore {
        self.chunks.clone()
    }

    /// Whether the chunk list of a content is held.
    pub(crate) fn has_content(&self, hash: &ContentHash) -> Result<bool, HubError> {
        Ok(self.store.content(hash)?.is_some())
    }

    /// Whether a chunk is held.
    pub(crate) fn has_chunk(&self, hash: &ContentHash) -> bool {
        self.chunks.contains(hash)
    }

    /// Which of `contents` the hub holds every chunk of, at full length and consistent with
    /// their names, all their chunks looked up at once. A chunk found short (its pack cut by a
    /// power cut) is dropped, so that it is asked for again.
    fn complete_contents<'a>(
        &self,
        contents: impl IntoIterator<Item = &'a ChunkedContent>,
    ) -> Result<HashSet<ContentHash>, HubError> {
        let contents: Vec<&ChunkedContent> =
            contents.into_iter().filter(|c| c.is_consistent()).collect();
        let listed: Vec<(ContentHash, u32)> = contents
            .iter()
            .flat_map(|c| c.chunks.iter().map(|chunk| (chunk.hash, chunk.len)))
            .collect();
        let stored = self.chunks.stored_lens_listed(&listed)?;
        let mut complete = HashSet::new();
        let mut at = 0;
        for content in contents {
            let span = at..at + content.chunks.len();
            at = span.end;
            let mut whole = true;
            for ((hash, len), stored) in listed[span.clone()].iter().zip(&stored[span]) {
                match stored {
                    Some(stored) if *stored == u64::from(*len) => {}
                    Some(_) => {
                        self.chunks.remove(hash)?;
                        whole = false;
                    }
                    None => whole = false,
                }
            }
            if whole {
                complete.insert(content.hash);
            }
        }
        Ok(complete)
    }

    /// Commits an upload batch: applies every version whose content arrived, refuses what
    /// the uploader may not write. Returns the outcome and whether anything changed.
    pub(crate) fn commit(
        &mut self,
        batch_id: &str,
        request: &CommitRequest,
        rules: &crate::rules::Rules,
        authors: &HashMap<ReplicaId, Role>,
    ) -> Result<(CommitResponse, bool), HubError> {
        // Check the request before taking the batch, so a malformed commit can be corrected
        // and sent again. The caller's transfer statuses are checked for form only: the hub
        // trusts only what it holds itself when deciding whether content arrived.
        for status in &request.items {
            Dot::try_from(&status.dot)?;
        }
        let Some(pending) = self.uploads.remove(batch_id) else {
            return Err(HubError::NotFound);
        };
        let knowledge_before = self.store.knowledge()?;
        let mut outcomes: HashMap<Dot, (String, Option<String>)> = HashMap::new();
        let mut arrived: HashSet<Dot> = HashSet::new();
        let mut stored = if rules.quota_bytes.is_some() {
            self.store.content_bytes()?
        } else {
            0
        };
        let mut quota_counted: HashSet<ContentHash> = HashSet::new();
        let started = std::time::Instant::now();
        // Which contents are held already, and which arrived whole: all looked up at once.
        let held: HashSet<ContentHash> = self.store.reading(|store| {
            let mut held = HashSet::new();
            for hash in pending.contents.keys() {
                if store.content(hash)?.is_some() {
                    held.insert(*hash);
                }
            }
            Ok::<_, HubError>(held)
        })?;
        let complete = self.complete_contents(
            pending
                .contents
                .values()
                .filter(|content| !held.contains(&content.hash)),
        )?;
        for (_, version) in &pending.versions {
            let dot = version.dot;
            if let Some(reason) = own_refusal(version, pending.role, authors, rules) {
                outcomes.insert(dot, ("refused".into(), Some(reason)));
                continue;
            }
            // The quota counts each distinct content once; content already held is free.
            if let (Some(quota), Some(hash)) = (
                rules.quota_bytes,
                version.entry.content.filter(|_| !version.entry.deleted),
            ) && !held.contains(&hash)
                && !quota_counted.contains(&hash)
            {
                if stored + version.entry.size > quota {
                    outcomes.insert(
                        dot,
                        (
                            "refused".into(),
                            Some(format!(
                                "this workspace's quota of {quota} bytes would be exceeded ({stored} bytes held)"
                            )),
                        ),
                    );
                    continue;
                }
                stored += version.entry.size;
                quota_counted.insert(hash);
            }
            let content_ok = match version.entry.content.filter(|_| !version.entry.deleted) {
                None => true,
                Some(hash) => {
                    pending.contents.contains_key(&hash)
                        && (held.contains(&hash) || complete.contains(&hash))
                }
            };
            if content_ok {
                arrived.insert(dot);
            } else {
                outcomes.insert(
                    dot,
                    ("failed".into(), Some("content did not arrive".into())),
                );
            }
        }
        let batch = shoal_core::Batch {
            versions: pending.versions.clone(),
            learned: pending.learned.clone(),
            last: pending.last,
            forgotten: Default::default(),
        };
        let checked_ms = started.elapsed().as_millis() as u64;
        // The chunks these versions need must be durable before the versions are.
        if !arrived.is_empty() {
            self.chunks.flush()?;
        }
        let flushed_ms = started.elapsed().as_millis() as u64;
        let now = now_ns();
        let mut tx = self.store.begin()?;
        for (_, version) in &pending.versions {
            let content = version.entry.content.and_then(|h| pending.contents.get(&h));
            if let Some(content) = content.filter(|_| arrived.contains(&version.dot)) {
                tx.put_content(content)?;
            }
        }
        let mut knowledge = tx.knowledge().clone();
        let report = Receiving::new().apply(&mut tx, &mut knowledge, &batch, |_, v| {
            arrived.contains(&v.dot)
        })?;
        *tx.knowledge_mut() = knowledge;
        for (item, version) in &pending.versions {
            if let Some((_, Some(reason))) =
                outcomes.get(&version.dot).filter(|(o, _)| o == "refused")
            {
                tx.put_refused(*item, version, reason, now)?;
            }
        }
        tx.commit()?;
        tracing::debug!(
            versions = pending.versions.len(),
            checked_ms,
            flushed_ms,
            committed_ms = started.elapsed().as_millis() as u64,
            "commit"
        );
        let conflicts: HashSet<ItemId> = report.conflicts.iter().copied().collect();
        let items = pending
            .versions
            .iter()
            .map(|(item, version)| {
                let (outcome, reason) = outcomes.get(&version.dot).cloned().unwrap_or_else(|| {
                    if conflicts.contains(item) {
                        ("conflict".into(), None)
                    } else {
                        ("applied".into(), None)
                    }
                });
                CommitItem {
                    dot: WireDot::from(&version.dot),
                    outcome,
                    reason,
                }
            })
            .collect();
        let knowledge_after = self.store.knowledge()?;
        let changed = knowledge_after != knowledge_before;
        Ok((
            CommitResponse {
                items,
                tag_before: tag(&knowledge_before),
                tag_after: tag(&knowledge_after),
            },
            changed,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{Entry, ItemKind, MemReplica};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// `len` bytes no chunk of which repeats (xorshift from `seed`).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// One upload batch of a new device writing each of `files` (name, content) anew.
    fn upload_of(files: &[(&str, &ChunkedContent)]) -> Result<UploadBatch, HubError> {
        let mut writer = MemReplica::new(ReplicaId([7; 16]), "writer");
        let mut lists = Vec::new();
        for (index, (name, content)) in files.iter().enumerate() {
            let entry = Entry {
                parent: ItemId::ROOT,
                name: (*name).into(),
                kind: ItemKind::File,
                deleted: false,
                content: Some(content.hash),
                size: content.size,
                mtime_ns: 0,
                executable: false,
            };
            writer.write(ItemId([index as u8 + 1; 16]), entry, Knowledge::new(), 1);
            lists.push(WireContent::from(*content));
        }
        let batch = writer
            .batches_for(&Knowledge::new(), HUB_LIMITS)
            .pop()
            .ok_or_else(|| HubError::BadRequest("nothing to upload".into()))?;
        Ok(shoal_protocol::upload_batch(&batch, lists, true))
    }

    #[test]
    fn only_large_new_contents_an_upload_may_write_are_announced_and_listed_while_they_arrive()
    -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut replica = WorkspaceReplica::open(dir.path(), "00")?;
        let size = ARRIVING_MIN as usize + (1 << 20);
        let (large, small) = (
            shoal_store::chunk_bytes(&noise(size, 1)),
            shoal_store::chunk_bytes(&noise(1 << 20, 2)),
        );
        let held_bytes = noise(size, 3);
        let (held, forbidden) = (
            shoal_store::chunk_bytes(&held_bytes),
            shoal_store::chunk_bytes(&noise(size, 4)),
        );
        // Most of `held` is here already: a file changed in a few places.
        for chunk in &held.chunks[1..] {
            let start = chunk.offset as usize;
            replica
                .chunks
                .put(&chunk.hash, &held_bytes[start..start + chunk.len as usize])?;
        }
        let rules = Rules::from_wire(&shoal_protocol::WorkspaceRules {
            forbidden: vec!["*.iso".into()],
            ..Default::default()
        })?;
        let upload = upload_of(&[
            ("large.bin", &large),
            ("small.bin", &small),
            ("held.bin", &held),
            ("disk.iso", &forbidden),
        ])?;
        replica.upload_batch("editor", &upload, Role::Editor)?;
        let nobody = HashMap::new();
        assert_eq!(
            replica.arriving("editor", &rules, &nobody),
            vec![large.hash]
        );
        // The same upload written by a reader's replica is refused at commit: not offered.
        let readers = HashMap::from([(ReplicaId([7; 16]), Role::Reader)]);
        assert!(replica.arriving("editor", &rules, &readers).is_empty());
        assert_eq!(replica.content_list(&large.hash)?, Some(large.clone()));
        assert_eq!(replica.content_list(&noise_name(5))?, None);
        // A reader's upload is refused at commit: nothing of it is offered.
        replica.upload_batch(
            "reader",
            &upload_of(&[("other.bin", &forbidden)])?,
            Role::Reader,
        )?;
        let permissive = Rules::from_wire(&shoal_protocol::WorkspaceRules::default())?;
        assert!(replica.arriving("reader", &permissive, &nobody).is_empty());
        assert!(
            replica
                .arriving("no such batch", &permissive, &nobody)
                .is_empty()
        );
        Ok(())
    }

    fn noise_name(seed: u64) -> ContentHash {
        ContentHash::of(&noise(64, seed))
    }

    #[test]
    fn a_content_is_complete_only_when_its_chunks_are_held_whole_and_name_it() -> TestResult {
        let dir = tempfile::tempdir()?;
        let replica = WorkspaceReplica::open(dir.path(), "00")?;
        let complete = |content: &ChunkedContent| -> Result<bool, HubError> {
            Ok(replica
                .complete_contents([content])?
                .contains(&content.hash))
        };
        let bytes = noise(1_000_000, 0x2545_f491_4f6c_dd1d);
        let content = shoal_store::chunk_bytes(&bytes);
        assert!(content.chunks.len() > 1);
        assert!(!complete(&content)?, "nothing held yet");
        for chunk in &content.chunks {
            let start = chunk.offset as usize;
            replica
                .chunks
                .put(&chunk.hash, &bytes[start..start + chunk.len as usize])?;
        }
        assert!(complete(&content)?);
        // Looked up together with a content that did not arrive, each is judged on its own.
        let missing = shoal_store::chunk_bytes(&noise(300_000, 0x9e37_79b9_7f4a_7c15));
        assert_eq!(
            replica.complete_contents([&missing, &content])?,
            HashSet::from([content.hash])
        );
        // A name that is not its chunk list's is never complete.
        let mut misnamed = content.clone();
        misnamed.hash = ContentHash::of(&bytes);
        assert!(!complete(&misnamed)?);
        // The pack cut short on disk (a power cut before the flush) takes the end of the last
        // chunk written with it: the content is not complete, and the bad chunk goes.
        let damaged = content.chunks.last().ok_or("no chunks")?;
        let packs = dir.path().join("chunks").join("packs");
        let pack = std::fs::read_dir(&packs)?
            .next()
            .ok_or("no pack was written")??
            .path();
        let file = std::fs::OpenOptions::new().write(true).open(&pack)?;
        file.set_len(file.metadata()?.len() - 10)?;
        assert!(!complete(&content)?);
        assert!(
            !replica.chunks.contains(&damaged.hash),
            "the damaged chunk was kept"
        );
        assert!(replica.chunks.contains(&content.chunks[0].hash));
        Ok(())
    }
}
