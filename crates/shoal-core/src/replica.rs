//! An in-memory replica: the reference model of a replica's behaviour.
//!
//! Durable replicas (the store) keep the same state in SQLite and call the same functions;
//! this one exists so the model can be exercised exhaustively (property tests, simulations)
//! without a disk.

use std::collections::BTreeMap;

use crate::ids::{Dot, Epoch, ItemId, ReplicaId, WriterId};
use crate::item::{Entry, ItemState, Version};
use crate::knowledge::Knowledge;
use crate::sync::{
    ApplyReport, Batch, BatchLimits, ItemAccess, Receiving, SyncOffer, dead_versions,
    missing_versions, plan_batches,
};
use crate::vector::VersionVector;

/// A whole replica held in memory.
#[derive(Clone, Debug)]
pub struct MemReplica {
    /// Which replica this is.
    pub id: ReplicaId,
    /// Its current epoch.
    pub epoch: Epoch,
    /// The last tick it handed out in this epoch.
    pub tick: u64,
    /// The device name written into its versions.
    pub device: String,
    /// Everything it has seen.
    pub knowledge: Knowledge,
    /// Covers every tombstone it has forgotten.
    pub forgotten: VersionVector,
    /// Current item states.
    pub items: BTreeMap<ItemId, ItemState>,
}

impl ItemAccess for BTreeMap<ItemId, ItemState> {
    type Error = std::convert::Infallible;
    fn get(&mut self, id: &ItemId) -> Result<Option<ItemState>, Self::Error> {
        Ok(BTreeMap::get(self, id).cloned())
    }
    fn put(&mut self, id: ItemId, state: &ItemState) -> Result<(), Self::Error> {
        self.insert(id, state.clone());
        Ok(())
    }
}

impl MemReplica {
    /// An empty replica.
    pub fn new(id: ReplicaId, device: impl Into<String>) -> MemReplica {
        MemReplica {
            id,
            epoch: 0,
            tick: 0,
            device: device.into(),
            knowledge: Knowledge::new(),
            forgotten: VersionVector::new(),
            items: BTreeMap::new(),
        }
    }

    /// The writer id its new versions carry.
    pub fn writer(&self) -> WriterId {
        WriterId {
            replica: self.id,
            epoch: self.epoch,
        }
    }

    /// Writes a new version of `item` made from `based_on` (what the writer saw).
    pub fn write(&mut self, item: ItemId, entry: Entry, based_on: Knowledge, now: i64) -> Version {
        self.tick += 1;
        let dot = Dot {
            writer: self.writer(),
            tick: self.tick,
        };
        let version = Version {
            dot,
            context: based_on,
            entry,
            written_at: now,
            device: self.device.clone(),
            user: String::new(),
        };
        self.knowledge.add(dot);
        match self.items.get_mut(&item) {
            Some(state) => {
                state.merge(version.clone());
            }
            None => {
                self.items.insert(item, ItemState::new(version.clone()));
            }
        }
        version
    }

    /// An edit as a user makes it: on top of the version shown (the winner) and any deletions
    /// it beat, leaving concurrent edits in place as conflicts.
    pub fn edit(&mut self, item: ItemId, entry: Entry, now: i64) -> Version {
        let writer = self.writer();
        let based_on = self
            .items
            .get(&item)
            .map(|s| s.context_for(writer, |v| shown(s, v)))
            .unwrap_or_default();
        self.write(item, entry, based_on, now)
    }

    /// A resolution: a write that supersedes every current version of the item.
    pub fn resolve(&mut self, item: ItemId, entry: Entry, now: i64) -> Version {
        let writer = self.writer();
        let based_on = self
            .items
            .get(&item)
            .map(|s| s.context_for(writer, |_| true))
            .unwrap_or_default();
        self.write(item, entry, based_on, now)
    }

    /// What this replica offers as a sender.
    pub fn offer(&self) -> SyncOffer {
        SyncOffer {
            knowledge: self.knowledge.clone(),
            forgotten: self.forgotten.clone(),
        }
    }

    /// The batches a receiver holding `receiver` lacks.
    pub fn batches_for(&self, receiver: &Knowledge, limits: BatchLimits) -> Vec<Batch> {
        plan_batches(
            missing_versions(&self.items, receiver),
            &self.offer(),
            limits,
        )
    }

    /// Applies the next batch of an enumeration atomically.
    pub fn apply(
        &mut self,
        session: &mut Receiving,
        batch: &Batch,
        arrived: impl Fn(&ItemId, &Version) -> bool,
    ) -> ApplyReport {
        let report = match session.apply(&mut self.items, &mut self.knowledge, batch, arrived) {
            Ok(report) => report,
            Err(never) => match never {},
        };
        if let Some(forgotten) = &report.learned_forgotten {
            self.forgotten.merge(forgotten);
        }
        report
    }

    /// Before syncing from a sender: notices that the sender has seen writes of ours that we
    /// no longer have (we were restored from an old copy) and, if so, starts a new epoch so
    /// our next writes never reuse those dots. Returns whether it did.
    pub fn observe(&mut self, sender: &Knowledge) -> bool {
        if sender.highest(&self.writer()) > self.tick {
            self.new_epoch();
            return true;
        }
        false
    }

    /// Starts a new epoch, as after a restore or reset.
    pub fn new_epoch(&mut self) {
        self.epoch += 1;
        self.tick = 0;
    }

    /// Drops versions a sender showed to be dead (see [`SyncOffer::needs_recovery`]), and
    /// adopts the sender's forgotten tombstones.
    pub fn recover(&mut self, sender: &MemReplica) -> usize {
        let dead = dead_versions(&self.items, &sender.knowledge, |id, dot| {
            sender
                .items
                .get(id)
                .is_some_and(|state| state.has_seen(dot))
        });
        for (id, dot) in &dead {
            if let Some(kept) = self
                .items
                .remove(id)
                .and_then(|state| state.without(|v| v.dot == *dot))
            {
                self.items.insert(*id, kept);
            }
        }
        // The versions just dropped were superseded by tombstones the sender forgot: from now
        // on this replica must also tell others those deletions happened.
        self.forgotten.merge(&sender.forgotten);
        dead.len()
    }

    /// Forgets every tombstone whose deletion everyone has seen (`watermark`). Returns the
    /// number of tombstones dropped.
    pub fn forget(&mut self, watermark: &VersionVector) -> usize {
        let mut count = 0;
        let items = std::mem::take(&mut self.items);
        for (id, state) in items {
            let (kept, dots) = state.forget_tombstones(watermark);
            count += dots.len();
            for dot in dots {
                self.forgotten.add(dot);
            }
            if let Some(kept) = kept {
                self.items.insert(id, kept);
            }
        }
        count
    }
}

/// Whether a user's edit of the item follows `version`: the winner they see, and every
/// deletion it beat. Concurrent edits stay in place as conflicts.
pub fn shown(state: &ItemState, version: &Version) -> bool {
    version.dot == state.winner().dot || version.entry.deleted
}

/// One complete sync from `sender` to `receiver`, applying at most `cut_after` batches (all
/// when `None`) and failing the content of versions `fail` picks. Returns batches applied.
pub fn sync_once(
    sender: &MemReplica,
    receiver: &mut MemReplica,
    limits: BatchLimits,
    cut_after: Option<usize>,
    fail: impl Fn(&ItemId, &Version) -> bool,
) -> usize {
    receiver.observe(&sender.knowledge);
    let offer = sender.offer();
    if offer.needs_recovery(&receiver.knowledge) {
        receiver.recover(sender);
    }
    let batches = sender.batches_for(&receiver.knowledge, limits);
    let mut applied = 0;
    let mut session = Receiving::new();
    for batch in batches.iter().take(cut_after.unwrap_or(usize::MAX)) {
        receiver.apply(&mut session, batch, |id, v| !fail(id, v));
        applied += 1;
    }
    applied
}
