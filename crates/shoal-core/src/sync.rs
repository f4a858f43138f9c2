//! One direction of a sync: enumerating what the other side lacks, in bounded batches, and
//! applying a batch on the receiving side.
//!
//! The receiver sends its knowledge; the sender lists every current version whose dot the
//! receiver has not seen, ordered by writer and tick, cut into batches by count and bytes. Each
//! batch says what the receiver knows once it has applied it: the batch's own dots, and on the
//! last batch the sender's whole knowledge. So a sync cut off between batches keeps what it
//! applied and resumes with exactly the rest.

use crate::ids::{Dot, ItemId};
use crate::item::{ItemState, MergeOutcome, Version};
use crate::knowledge::Knowledge;
use crate::vector::VersionVector;

/// How large one batch may be; each side states its own and the smaller wins.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BatchLimits {
    /// Most versions in one batch.
    pub max_items: usize,
    /// Most content bytes in one batch (a single larger item still travels, alone).
    pub max_bytes: u64,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_items: 2_000,
            max_bytes: 64 << 20,
        }
    }
}

impl BatchLimits {
    /// The limits both sides accept.
    pub fn negotiate(self, other: BatchLimits) -> BatchLimits {
        BatchLimits {
            max_items: self.max_items.min(other.max_items).max(1),
            max_bytes: self.max_bytes.min(other.max_bytes).max(1),
        }
    }
}

/// What a sender says about itself before sending batches.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SyncOffer {
    /// Everything the sender has seen.
    pub knowledge: Knowledge,
    /// A vector covering every tombstone the sender has forgotten.
    pub forgotten: VersionVector,
}

impl SyncOffer {
    /// Whether a receiver holding `knowledge` must run a recovery compare before trusting
    /// the batches: it has not seen some deletion the sender has since forgotten, so it may
    /// hold versions the sender knows to be dead.
    pub fn needs_recovery(&self, receiver: &Knowledge) -> bool {
        !receiver.covers(&self.forgotten)
    }
}

/// A run of versions and what applying them teaches the receiver.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Batch {
    /// Versions, in writer-then-tick order.
    pub versions: Vec<(ItemId, Version)>,
    /// What the receiver knows after applying every version of this batch.
    pub learned: Knowledge,
    /// Whether this is the final batch of the enumeration.
    pub last: bool,
    /// On the final batch, the sender's forgotten tombstones: whoever learns the sender's
    /// knowledge learns that those deletions happened, and must pass that on.
    pub forgotten: VersionVector,
}

impl Batch {
    /// The contents the live versions of this batch name, each once, with its size: the
    /// chunk lists a sender must include.
    pub fn contents(&self) -> Vec<(crate::ContentHash, u64)> {
        let mut seen = std::collections::HashSet::new();
        self.versions
            .iter()
            .filter(|(_, v)| !v.entry.deleted)
            .filter_map(|(_, v)| v.entry.content.map(|h| (h, v.entry.size)))
            .filter(|(h, _)| seen.insert(*h))
            .collect()
    }

    /// Only the dots this batch carries: what a receiver may learn from it when the sender
    /// held something back (or an earlier batch failed), instead of `learned`.
    pub fn carried(&self) -> Knowledge {
        let mut dots = Knowledge::new();
        self.versions.iter().for_each(|(_, v)| dots.add(v.dot));
        dots
    }
}

/// Every current version in `items` that `receiver` has not seen, in canonical order.
pub fn missing_versions<'a>(
    items: impl IntoIterator<Item = (&'a ItemId, &'a ItemState)>,
    receiver: &Knowledge,
) -> Vec<(ItemId, Version)> {
    items
        .into_iter()
        .flat_map(|(id, state)| state.versions().iter().map(move |v| (*id, v)))
        .filter(|(_, v)| !receiver.contains(&v.dot))
        .map(|(id, v)| (id, v.clone()))
        .collect()
}

/// Cuts the versions the receiver lacks into batches. `sender` is what the sender offered at
/// the moment `missing` was enumerated.
pub fn plan_batches(
    mut missing: Vec<(ItemId, Version)>,
    sender: &SyncOffer,
    limits: BatchLimits,
) -> Vec<Batch> {
    missing.sort_by_key(|(_, v)| v.dot);
    // Where each batch starts.
    let mut starts = vec![0];
    let (mut count, mut bytes) = (0usize, 0u64);
    for (index, (_, version)) in missing.iter().enumerate() {
        let weight = entry_weight(version);
        if count > 0 && (count >= limits.max_items || bytes + weight > limits.max_bytes) {
            starts.push(index);
            count = 0;
            bytes = 0;
        }
        count += 1;
        bytes += weight;
    }
    // Cut from the end, giving back what each cut leaves: a large first sync's versions are
    // then held about once while they are cut, not twice.
    let mut batches = Vec::with_capacity(starts.len());
    while let Some(start) = starts.pop() {
        let versions = missing.split_off(start);
        missing.shrink_to_fit();
        batches.push(if batches.is_empty() {
            Batch {
                versions,
                learned: sender.knowledge.clone(),
                last: true,
                forgotten: sender.forgotten.clone(),
            }
        } else {
            partial_batch(versions)
        });
    }
    batches.reverse();
    batches
}

fn partial_batch(versions: Vec<(ItemId, Version)>) -> Batch {
    let mut learned = Knowledge::new();
    for (_, version) in &versions {
        learned.add(version.dot);
    }
    Batch {
        versions,
        learned,
        last: false,
        forgotten: VersionVector::new(),
    }
}

/// The bytes a version costs in a batch: content plus a fixed allowance for metadata.
pub fn entry_weight(version: &Version) -> u64 {
    version.entry.size + 128 + version.entry.name.len() as u64
}

/// Access to a replica's item states while a batch is applied (inside one transaction).
pub trait ItemAccess {
    /// Failure of the underlying storage.
    type Error;
    /// The current state of an item, if held.
    fn get(&mut self, id: &ItemId) -> Result<Option<ItemState>, Self::Error>;
    /// Replaces an item's state.
    fn put(&mut self, id: ItemId, state: &ItemState) -> Result<(), Self::Error>;
}

/// What applying one batch did.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct ApplyReport {
    /// Items whose state changed (applied or now in conflict).
    pub changed: Vec<ItemId>,
    /// Items that are now in conflict.
    pub conflicts: Vec<ItemId>,
    /// Versions skipped because their content could not be fetched.
    pub failed: Vec<Dot>,
    /// Forgotten tombstones the receiver must now record as its own (see [`Batch::forgotten`]).
    pub learned_forgotten: Option<VersionVector>,
}

/// The receiving side of one enumeration, batch after batch.
///
/// The last batch teaches the sender's whole knowledge, which is true only if every earlier
/// batch of the same enumeration was applied in full; once any version failed, the receiver
/// learns only the dots it applied, so the failed versions are offered again next time.
#[derive(Clone, Default, Debug)]
pub struct Receiving {
    failed_before: bool,
}

impl Receiving {
    /// A new enumeration.
    pub fn new() -> Receiving {
        Receiving::default()
    }

    /// Applies the next batch of the enumeration (see [`apply_batch`]).
    pub fn apply<A: ItemAccess>(
        &mut self,
        access: &mut A,
        knowledge: &mut Knowledge,
        batch: &Batch,
        arrived: impl Fn(&ItemId, &Version) -> bool,
    ) -> Result<ApplyReport, A::Error> {
        let report = apply_batch(access, knowledge, batch, self.failed_before, arrived)?;
        self.failed_before |= !report.failed.is_empty();
        Ok(report)
    }
}

/// Applies one batch: merges each version whose content arrived and adds what it teaches to
/// `knowledge`. `failed_before` says an earlier batch of the same enumeration had failures;
/// callers normally go through [`Receiving`].
pub fn apply_batch<A: ItemAccess>(
    access: &mut A,
    knowledge: &mut Knowledge,
    batch: &Batch,
    failed_before: bool,
    arrived: impl Fn(&ItemId, &Version) -> bool,
) -> Result<ApplyReport, A::Error> {
    let mut report = ApplyReport::default();
    let mut applied = Knowledge::new();
    for (id, version) in &batch.versions {
        if !arrived(id, version) {
            report.failed.push(version.dot);
            continue;
        }
        applied.add(version.dot);
        if knowledge.contains(&version.dot) {
            continue;
        }
        let (outcome, state) = match access.get(id)? {
            Some(mut state) => (state.merge(version.clone()), state),
            None => (MergeOutcome::Applied, ItemState::new(version.clone())),
        };
        match outcome {
            MergeOutcome::Stale => {}
            MergeOutcome::Applied => {
                access.put(*id, &state)?;
                report.changed.push(*id);
            }
            MergeOutcome::Conflict => {
                access.put(*id, &state)?;
                report.changed.push(*id);
                report.conflicts.push(*id);
            }
        }
    }
    if report.failed.is_empty() && !(batch.last && failed_before) {
        knowledge.merge(&batch.learned);
        if batch.last {
            report.learned_forgotten = Some(batch.forgotten.clone());
        }
    } else {
        knowledge.merge(&applied);
    }
    Ok(report)
}

/// Recovery after a forgotten deletion: a version the receiver holds is dead when the sender
/// has seen it (`sender_knowledge`) yet the sender's state of the item neither holds it nor
/// supersedes it (`sender_has_seen`): whatever superseded it there was a tombstone, since
/// forgotten. Ordinary merging cannot remove such a version, as nothing left supersedes it.
/// Only live versions are dead in this sense: a tombstone the receiver still holds is kept, so
/// that it goes on superseding what it deleted wherever it travels next.
pub fn dead_versions<'a>(
    held: impl IntoIterator<Item = (&'a ItemId, &'a ItemState)>,
    sender_knowledge: &Knowledge,
    sender_has_seen: impl Fn(&ItemId, &Dot) -> bool,
) -> Vec<(ItemId, Dot)> {
    held.into_iter()
        .flat_map(|(id, state)| state.versions().iter().map(move |v| (*id, v)))
        .filter(|(_, v)| !v.entry.deleted)
        .map(|(id, v)| (id, v.dot))
        .filter(|(id, dot)| sender_knowledge.contains(dot) && !sender_has_seen(id, dot))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Entry, ItemKind, ReplicaId, WriterId};

    fn version(writer: u8, tick: u64, size: u64) -> (ItemId, Version) {
        let dot = Dot {
            writer: WriterId {
                replica: ReplicaId([writer; 16]),
                epoch: 0,
            },
            tick,
        };
        let entry = Entry {
            parent: ItemId([0; 16]),
            name: format!("f{writer}-{tick}"),
            kind: ItemKind::File,
            deleted: false,
            content: None,
            size,
            mtime_ns: 0,
            executable: false,
        };
        let version = Version {
            dot,
            context: Knowledge::new(),
            entry,
            written_at: 0,
            device: String::new(),
            user: String::new(),
        };
        (ItemId([writer ^ tick as u8; 16]), version)
    }

    #[test]
    fn batches_keep_dot_order_and_both_limits_and_only_the_last_teaches_everything() {
        // Two writers, sizes cycling so that the byte limit cuts some batches early; one
        // version alone heavier than the limit.
        let mut missing: Vec<(ItemId, Version)> = (1..=40)
            .flat_map(|tick| [version(2, tick, tick % 7 * 100), version(1, tick, 50)])
            .collect();
        missing.push(version(3, 1, 10_000));
        let sender = SyncOffer {
            knowledge: {
                let mut all = Knowledge::new();
                missing.iter().for_each(|(_, v)| all.add(v.dot));
                all
            },
            forgotten: VersionVector::new(),
        };
        let limits = BatchLimits {
            max_items: 7,
            max_bytes: 1_500,
        };
        let mut expected = missing.clone();
        expected.sort_by_key(|(_, v)| v.dot);
        let batches = plan_batches(missing, &sender, limits);

        let joined: Vec<(ItemId, Version)> =
            batches.iter().flat_map(|b| b.versions.clone()).collect();
        assert_eq!(joined, expected, "every version once, in dot order");
        let last = batches.len() - 1;
        for (index, batch) in batches.iter().enumerate() {
            assert!(!batch.versions.is_empty());
            assert!(batch.versions.len() <= limits.max_items);
            let bytes: u64 = batch.versions.iter().map(|(_, v)| entry_weight(v)).sum();
            assert!(batch.versions.len() == 1 || bytes <= limits.max_bytes);
            assert_eq!(batch.last, index == last);
            if index == last {
                assert_eq!(batch.learned, sender.knowledge);
            } else {
                assert_eq!(batch.learned, batch.carried());
                // Cut only where the next version would break a limit.
                let next = &batches[index + 1].versions[0].1;
                assert!(
                    batch.versions.len() == limits.max_items
                        || bytes + entry_weight(next) > limits.max_bytes
                );
            }
        }
        assert!(batches.len() > 81 / 7, "the byte limit cut some batches");

        let empty = plan_batches(Vec::new(), &sender, limits);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].last && empty[0].versions.is_empty());
    }
}
