//! Version vectors: per-writer counters, used as the causal context of a version.

use std::collections::BTreeMap;

use crate::ids::{Dot, WriterId};

/// For each writer, the highest tick seen. A context never holds zero entries.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    entries: BTreeMap<WriterId, u64>,
}

impl VersionVector {
    /// An empty vector: nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest tick seen of `writer` (0 when none).
    pub fn get(&self, writer: &WriterId) -> u64 {
        self.entries.get(writer).copied().unwrap_or(0)
    }

    /// Whether `dot` is covered.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.get(&dot.writer) >= dot.tick
    }

    /// Raises the entry for the dot's writer to at least its tick.
    pub fn add(&mut self, dot: Dot) {
        if dot.tick == 0 {
            return;
        }
        let entry = self.entries.entry(dot.writer).or_insert(0);
        *entry = (*entry).max(dot.tick);
    }

    /// Pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (writer, tick) in &other.entries {
            self.add(Dot {
                writer: *writer,
                tick: *tick,
            });
        }
    }

    /// Whether every entry of `other` is covered by `self`.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other
            .entries
            .iter()
            .all(|(writer, tick)| self.get(writer) >= *tick)
    }

    /// Entries in canonical (sorted) order.
    pub fn iter(&self) -> impl Iterator<Item = (&WriterId, &u64)> {
        self.entries.iter()
    }

    /// Number of writers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no writer is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Pointwise minimum with `other`; writers missing on either side drop out.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let entries = self
            .entries
            .iter()
            .filter_map(|(writer, tick)| {
                let min = (*tick).min(other.get(writer));
                (min > 0).then_some((*writer, min))
            })
            .collect();
        VersionVector { entries }
    }
}

impl std::fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.entries.iter()).finish()
    }
}

impl FromIterator<Dot> for VersionVector {
    fn from_iter<I: IntoIterator<Item = Dot>>(iter: I) -> Self {
        let mut vector = VersionVector::new();
        for dot in iter {
            vector.add(dot);
        }
        vector
    }
}
