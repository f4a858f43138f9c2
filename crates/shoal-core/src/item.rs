//! Items, their versions, and the per-item merge that keeps every concurrent version.
//!
//! An item's state is the set of its versions that no other known version supersedes (an
//! antichain under "happened before"). Merging is a pure set operation, so two replicas that
//! have seen the same versions hold the same state whatever the order they saw them in. One
//! version of the set is the winner by a fixed rule; the others are conflict losers, kept.

use std::cmp::Ordering;

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::ids::{Dot, ItemId, WriterId};
use crate::knowledge::Knowledge;
use crate::vector::VersionVector;

/// What an item is.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum ItemKind {
    /// A directory: a parent for other items, no content.
    Directory,
    /// A regular file with content.
    File,
}

/// A BLAKE3 hash naming a file's whole content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }
}

impl std::fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "C{}", crate::ids::hex(&self.0[..4]))
    }
}
impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::ids::hex(&self.0))
    }
}

/// The state one version gives an item. A deletion keeps the last parent and name, so a
/// deleted directory can be brought back when a concurrent edit puts something inside it.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Entry {
    /// The directory holding the item ([`ItemId::ROOT`] at the top).
    pub parent: ItemId,
    /// The item's name within its parent.
    pub name: String,
    /// File or directory.
    pub kind: ItemKind,
    /// True for a tombstone.
    pub deleted: bool,
    /// For live files, the whole-content hash.
    pub content: Option<ContentHash>,
    /// Content size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Whether the file is executable.
    pub executable: bool,
}

/// One write of one item.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Version {
    /// Which write this is.
    pub dot: Dot,
    /// Every earlier write of this item that this one was made from (and so supersedes). An
    /// exact set, not a plain vector: a write may follow one concurrent version of the item
    /// and not another by the same writer.
    pub context: Knowledge,
    /// The resulting state.
    pub entry: Entry,
    /// When it was written by the writer's clock (nanoseconds since the Unix epoch); used only
    /// to order concurrent versions and to name conflict copies.
    pub written_at: i64,
    /// The name of the device that wrote it, for people reading conflict copies.
    pub device: String,
    /// The user the writing device belongs to (empty where there are no users, as in
    /// `shoal mirror`).
    pub user: String,
}

impl Version {
    /// The context plus this version's own dot: everything it supersedes, and itself.
    pub fn history(&self) -> Knowledge {
        let mut history = self.context.clone();
        history.add(self.dot);
        history
    }

    /// Whether this is a tombstone that may be forgotten: every replica has seen it and
    /// everything it superseded (`watermark` covers its whole history). Requiring the history,
    /// not only the dot, means any replica that still holds a superseded version (say, one
    /// restored from a backup) meets a sender that knows that version's dot, and so learns in a
    /// recovery compare that it is dead.
    pub fn is_forgettable(&self, watermark: &VersionVector) -> bool {
        self.entry.deleted
            && self
                .history()
                .writers()
                .all(|w| watermark.get(w) >= self.history().highest(w))
    }

    /// Whether this version causally follows `other`.
    pub fn supersedes(&self, other: &Version) -> bool {
        self.context.contains(&other.dot)
    }

    /// The fixed order concurrent versions are ranked by: edits beat deletes, then the later
    /// write, then the greater dot. Every replica computes the same winner.
    pub fn rank_cmp(&self, other: &Version) -> Ordering {
        (!self.entry.deleted, self.written_at, self.dot).cmp(&(
            !other.entry.deleted,
            other.written_at,
            other.dot,
        ))
    }

    /// Canonical bytes.
    pub fn encode(&self, out: &mut Encoder) {
        out.dot(&self.dot);
        self.context.encode(out);
        let entry = &self.entry;
        out.item(&entry.parent);
        out.string(&entry.name);
        let flags = u64::from(entry.kind == ItemKind::File)
            | u64::from(entry.deleted) << 1
            | u64::from(entry.executable) << 2
            | u64::from(entry.content.is_some()) << 3;
        out.uvarint(flags);
        if let Some(content) = &entry.content {
            out.raw(&content.0);
        }
        out.uvarint(entry.size);
        out.ivarint(entry.mtime_ns);
        out.ivarint(self.written_at);
        out.string(&self.device);
        out.string(&self.user);
    }

    /// Reads what [`Version::encode`] wrote.
    pub fn decode(input: &mut Decoder<'_>) -> Result<Version, DecodeError> {
        let dot = input.dot()?;
        let context = Knowledge::decode(input)?;
        let parent = input.item()?;
        let name = input.string()?;
        let flags = input.uvarint()?;
        if flags > 0b1111 {
            return Err(DecodeError::Invalid("unknown entry flags"));
        }
        let content = if flags & 8 != 0 {
            Some(ContentHash(input.raw()?))
        } else {
            None
        };
        let entry = Entry {
            parent,
            name,
            kind: if flags & 1 != 0 {
                ItemKind::File
            } else {
                ItemKind::Directory
            },
            deleted: flags & 2 != 0,
            executable: flags & 4 != 0,
            content,
            size: input.uvarint()?,
            mtime_ns: input.ivarint()?,
        };
        let written_at = input.ivarint()?;
        let device = input.string()?;
        // Versions stored before authors were recorded end here.
        let user = if input.is_empty() {
            String::new()
        } else {
            input.string()?
        };
        Ok(Version {
            dot,
            context,
            entry,
            written_at,
            device,
            user,
        })
    }

    /// Canonical bytes as a vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Encoder::new();
        self.encode(&mut out);
        out.into_bytes()
    }

    /// Parses canonical bytes, rejecting trailing garbage.
    pub fn from_bytes(bytes: &[u8]) -> Result<Version, DecodeError> {
        let mut input = Decoder::new(bytes);
        let version = Version::decode(&mut input)?;
        input.finish()?;
        Ok(version)
    }
}

/// What merging one incoming version did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MergeOutcome {
    /// Already held, or superseded by a held version: nothing changed.
    Stale,
    /// The version replaced everything it supersedes and is the only current version.
    Applied,
    /// The version is current beside at least one concurrent version.
    Conflict,
}

/// How the current versions of one item disagree.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ItemConflict {
    /// Two or more concurrent edits.
    EditEdit,
    /// An edit concurrent with a deletion (the edit wins).
    EditDelete,
}

/// The current versions of one item: never empty, winner first, losers after in rank order.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ItemState {
    versions: Vec<Version>,
}

impl ItemState {
    /// A state holding one version.
    pub fn new(version: Version) -> ItemState {
        ItemState {
            versions: vec![version],
        }
    }

    /// Rebuilds a state from stored versions, keeping only those nothing else supersedes.
    pub fn from_versions(versions: impl IntoIterator<Item = Version>) -> Option<ItemState> {
        let mut iter = versions.into_iter();
        let mut state = ItemState::new(iter.next()?);
        for version in iter {
            state.merge(version);
        }
        Some(state)
    }

    /// Current versions, winner first.
    pub fn versions(&self) -> &[Version] {
        &self.versions
    }

    /// The version every replica shows.
    pub fn winner(&self) -> &Version {
        &self.versions[0]
    }

    /// Concurrent versions that lost, kept for the user.
    pub fn losers(&self) -> &[Version] {
        &self.versions[1..]
    }

    /// The kind of disagreement, if the item has more than one current version.
    pub fn conflict(&self) -> Option<ItemConflict> {
        if self.versions.len() < 2 {
            None
        } else if self.versions.iter().any(|v| v.entry.deleted) {
            Some(ItemConflict::EditDelete)
        } else {
            Some(ItemConflict::EditEdit)
        }
    }

    /// Whether `dot` is held or superseded here.
    pub fn has_seen(&self, dot: &Dot) -> bool {
        self.versions
            .iter()
            .any(|v| v.dot == *dot || v.context.contains(dot))
    }

    /// Merges one version: drops what it supersedes, ignores it if it is already covered.
    pub fn merge(&mut self, incoming: Version) -> MergeOutcome {
        if self.has_seen(&incoming.dot) {
            return MergeOutcome::Stale;
        }
        self.versions.retain(|held| !incoming.supersedes(held));
        self.versions.push(incoming);
        self.versions.sort_by(|a, b| b.rank_cmp(a));
        if self.versions.len() == 1 {
            MergeOutcome::Applied
        } else {
            MergeOutcome::Conflict
        }
    }

    /// The context for a new write by `writer` that follows the current versions `covered`
    /// picks (and, through them, their histories) and no other.
    pub fn context_for(&self, writer: WriterId, covered: impl Fn(&Version) -> bool) -> Knowledge {
        let mut history = Knowledge::new();
        for version in self.versions.iter().filter(|v| covered(v)) {
            history.merge(&version.history());
        }
        self.compact_context(history, writer)
    }

    /// Keeps a context small: the writer folds its own entries into a plain counter, up to
    /// (not including) its oldest write that stays concurrent. Every own write below that is
    /// covered or an ancestor of a concurrent version, so covering it loses nothing; other
    /// writers' entries stay exact, and are folded when those writers write next.
    pub fn compact_context(&self, mut history: Knowledge, writer: WriterId) -> Knowledge {
        // The fold below claims own writes that are ancestors of a version left concurrent;
        // claim what they had seen too (it is in that version's context). Otherwise a replica
        // that holds such an ancestor but not yet its concurrent descendant would drop the
        // ancestor on receiving this write and keep nothing that covers what the ancestor had
        // superseded. Covering a concurrent version's ancestors never covers the version.
        for version in &self.versions {
            if !history.contains(&version.dot) {
                history.merge(&version.context);
            }
        }
        let highest_covered = history.highest(&writer);
        let oldest_uncovered = self
            .versions
            .iter()
            .filter(|v| v.dot.writer == writer && !history.contains(&v.dot))
            .map(|v| v.dot.tick)
            .min();
        let fold_to =
            oldest_uncovered.map_or(highest_covered, |tick| highest_covered.min(tick - 1));
        history.add_vector(
            &[Dot {
                writer,
                tick: fold_to,
            }]
            .into_iter()
            .collect::<VersionVector>(),
        );
        history
    }

    /// Drops tombstones every replica has seen (see [`Version::is_forgettable`]); a
    /// tombstone carries no data, so nothing a user wrote goes with it. Returns the dots
    /// dropped, and `None` for the state when nothing is left of the item.
    pub fn forget_tombstones(self, watermark: &VersionVector) -> (Option<ItemState>, Vec<Dot>) {
        let (forgotten, kept): (Vec<Version>, Vec<Version>) = self
            .versions
            .into_iter()
            .partition(|v| v.is_forgettable(watermark));
        let dots = forgotten.iter().map(|v| v.dot).collect();
        (
            (!kept.is_empty()).then_some(ItemState { versions: kept }),
            dots,
        )
    }

    /// Drops the given current versions (a recovery sync found them dead elsewhere). Returns
    /// `None` when nothing is left.
    pub fn without(mut self, dead: impl Fn(&Version) -> bool) -> Option<ItemState> {
        self.versions.retain(|v| !dead(v));
        (!self.versions.is_empty()).then_some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ReplicaId, WriterId};

    fn dot(replica: u8, tick: u64) -> Dot {
        Dot {
            writer: WriterId {
                replica: ReplicaId([replica; 16]),
                epoch: 0,
            },
            tick,
        }
    }

    fn version(d: Dot, context: &[Dot], deleted: bool, at: i64) -> Version {
        Version {
            dot: d,
            context: {
                let mut k = Knowledge::new();
                k.add_vector(&context.iter().copied().collect());
                k
            },
            entry: Entry {
                parent: ItemId::ROOT,
                name: "a.txt".into(),
                kind: ItemKind::File,
                deleted,
                content: (!deleted).then(|| ContentHash::of(&at.to_le_bytes())),
                size: 8,
                mtime_ns: at,
                executable: false,
            },
            written_at: at,
            device: format!("dev{}", d.writer.replica.0[0]),
            user: String::new(),
        }
    }

    #[test]
    fn later_version_replaces_what_it_supersedes() {
        let mut state = ItemState::new(version(dot(1, 1), &[], false, 10));
        assert_eq!(
            state.merge(version(dot(2, 1), &[dot(1, 1)], false, 5)),
            MergeOutcome::Applied
        );
        assert_eq!(state.versions().len(), 1);
        assert_eq!(
            state.merge(version(dot(1, 1), &[], false, 10)),
            MergeOutcome::Stale
        );
    }

    #[test]
    fn concurrent_edits_keep_both_and_pick_the_later_write() {
        let base = dot(1, 1);
        let mut state = ItemState::new(version(base, &[], false, 1));
        state.merge(version(dot(2, 1), &[base], false, 20));
        assert_eq!(
            state.merge(version(dot(3, 1), &[base], false, 30)),
            MergeOutcome::Conflict
        );
        assert_eq!(state.winner().dot, dot(3, 1));
        assert_eq!(state.conflict(), Some(ItemConflict::EditEdit));
    }

    #[test]
    fn edits_beat_deletes_even_when_the_delete_is_later() {
        let base = dot(1, 1);
        let mut state = ItemState::new(version(dot(2, 1), &[base], true, 99));
        state.merge(version(dot(3, 1), &[base], false, 1));
        assert!(!state.winner().entry.deleted);
        assert_eq!(state.conflict(), Some(ItemConflict::EditDelete));
    }

    #[test]
    fn merge_order_does_not_matter() {
        let base = dot(1, 1);
        let a = version(dot(2, 1), &[base], false, 5);
        let b = version(dot(3, 1), &[base], false, 5);
        let c = version(dot(2, 2), &[base, dot(2, 1)], true, 6);
        let orders = [[&a, &b, &c], [&c, &b, &a], [&b, &c, &a]];
        let results: Vec<_> = orders
            .iter()
            .map(|order| ItemState::from_versions(order.iter().map(|v| (*v).clone())))
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn version_encoding_round_trips() {
        let v = version(dot(4, 7), &[dot(1, 3), dot(2, 9)], false, -5);
        assert_eq!(Version::from_bytes(&v.to_bytes()), Ok(v));
    }
}
