//! Property test of the sync model: random edits, renames, moves, deletes, resolutions,
//! partial and failing syncs, forgetting and restores across several replicas. Afterwards a
//! full exchange must leave every replica with identical state, and every version anyone
//! wrote must be current, superseded by a current version, or a forgotten tombstone.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use shoal_core::{
    BatchLimits, ContentHash, Dot, Entry, ItemId, ItemKind, MemReplica, ReplicaId, Version,
    VersionVector, layout, sync_once,
};

const REPLICAS: usize = 4;
const NAMES: [&str; 4] = ["a", "b", "c.txt", "d.txt"];

#[derive(Clone, Debug)]
enum Op {
    Create {
        replica: usize,
        parent: usize,
        name: usize,
        directory: bool,
    },
    Edit {
        replica: usize,
        item: usize,
    },
    Rename {
        replica: usize,
        item: usize,
        name: usize,
    },
    Move {
        replica: usize,
        item: usize,
        parent: usize,
    },
    Delete {
        replica: usize,
        item: usize,
    },
    Resolve {
        replica: usize,
        item: usize,
    },
    Sync {
        from: usize,
        to: usize,
        cut: Option<usize>,
        fail_mod: u8,
    },
    Snapshot {
        replica: usize,
    },
    Restore {
        replica: usize,
    },
    Forget {
        replica: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let r = 0..REPLICAS;
    prop_oneof![
        4 => (r.clone(), any::<usize>(), 0..NAMES.len(), any::<bool>())
            .prop_map(|(replica, parent, name, directory)| Op::Create { replica, parent, name, directory }),
        4 => (r.clone(), any::<usize>()).prop_map(|(replica, item)| Op::Edit { replica, item }),
        2 => (r.clone(), any::<usize>(), 0..NAMES.len()).prop_map(|(replica, item, name)| Op::Rename { replica, item, name }),
        2 => (r.clone(), any::<usize>(), any::<usize>()).prop_map(|(replica, item, parent)| Op::Move { replica, item, parent }),
        2 => (r.clone(), any::<usize>()).prop_map(|(replica, item)| Op::Delete { replica, item }),
        1 => (r.clone(), any::<usize>()).prop_map(|(replica, item)| Op::Resolve { replica, item }),
        10 => (r.clone(), r.clone(), proptest::option::weighted(0.3, 0..3usize), 0..4u8)
            .prop_map(|(from, to, cut, fail_mod)| Op::Sync { from, to, cut, fail_mod }),
        1 => r.clone().prop_map(|replica| Op::Snapshot { replica }),
        1 => r.clone().prop_map(|replica| Op::Restore { replica }),
        1 => r.prop_map(|replica| Op::Forget { replica }),
    ]
}

struct World {
    replicas: Vec<MemReplica>,
    snapshots: Vec<Option<MemReplica>>,
    written: Vec<(ItemId, Version)>,
    lost_with_restore: BTreeSet<Dot>,
    forgotten_tombstones: Vec<(ItemId, shoal_core::Knowledge)>,
    next_item: u64,
    clock: i64,
}

fn replica_id(index: usize) -> ReplicaId {
    ReplicaId([index as u8 + 1; 16])
}

impl World {
    fn new() -> World {
        World {
            replicas: (0..REPLICAS)
                .map(|i| MemReplica::new(replica_id(i), format!("dev{i}")))
                .collect(),
            snapshots: vec![None; REPLICAS],
            written: Vec::new(),
            lost_with_restore: BTreeSet::new(),
            forgotten_tombstones: Vec::new(),
            next_item: 1,
            clock: 1_000,
        }
    }

    fn tick(&mut self) -> i64 {
        // Coarse clock so that equal timestamps (and dot tie-breaks) happen often.
        self.clock += 1;
        self.clock / 3
    }

    /// Items of a replica that are live (winner not deleted), in id order.
    fn live(&self, replica: usize) -> Vec<(ItemId, Entry)> {
        self.replicas[replica]
            .items
            .iter()
            .filter(|(_, s)| !s.winner().entry.deleted)
            .map(|(id, s)| (*id, s.winner().entry.clone()))
            .collect()
    }

    fn directories(&self, replica: usize) -> Vec<ItemId> {
        let mut dirs = vec![ItemId::ROOT];
        dirs.extend(
            self.live(replica)
                .into_iter()
                .filter(|(_, e)| e.kind == ItemKind::Directory)
                .map(|(id, _)| id),
        );
        dirs
    }

    fn pick(&self, replica: usize, choice: usize) -> Option<(ItemId, Entry)> {
        let live = self.live(replica);
        (!live.is_empty()).then(|| live[choice % live.len()].clone())
    }

    fn record(&mut self, item: ItemId, version: Version) {
        self.written.push((item, version));
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Create {
                replica,
                parent,
                name,
                directory,
            } => {
                let dirs = self.directories(replica);
                let parent = dirs[parent % dirs.len()];
                let item = ItemId::derived("test item", &self.next_item.to_le_bytes());
                self.next_item += 1;
                let now = self.tick();
                let entry = Entry {
                    parent,
                    name: NAMES[name].to_owned(),
                    kind: if directory {
                        ItemKind::Directory
                    } else {
                        ItemKind::File
                    },
                    deleted: false,
                    content: (!directory).then(|| ContentHash::of(&now.to_le_bytes())),
                    size: if directory { 0 } else { 10 },
                    mtime_ns: now,
                    executable: false,
                };
                let v = self.replicas[replica].edit(item, entry, now);
                self.record(item, v);
            }
            Op::Edit { replica, item } => {
                if let Some((id, mut entry)) = self
                    .pick(replica, item)
                    .filter(|(_, e)| e.kind == ItemKind::File)
                {
                    let now = self.tick();
                    entry.content = Some(ContentHash::of(&now.to_le_bytes()));
                    entry.mtime_ns = now;
                    let v = self.replicas[replica].edit(id, entry, now);
                    self.record(id, v);
                }
            }
            Op::Rename {
                replica,
                item,
                name,
            } => {
                if let Some((id, mut entry)) = self.pick(replica, item) {
                    entry.name = NAMES[name].to_owned();
                    let now = self.tick();
                    let v = self.replicas[replica].edit(id, entry, now);
                    self.record(id, v);
                }
            }
            Op::Move {
                replica,
                item,
                parent,
            } => {
                if let Some((id, mut entry)) = self.pick(replica, item) {
                    let dirs = self.directories(replica);
                    let target = dirs[parent % dirs.len()];
                    // A device cannot move a folder into itself; concurrent moves can still cycle.
                    if target == id || self.is_ancestor(replica, id, target) {
                        return;
                    }
                    entry.parent = target;
                    let now = self.tick();
                    let v = self.replicas[replica].edit(id, entry, now);
                    self.record(id, v);
                }
            }
            Op::Delete { replica, item } => {
                if let Some((id, mut entry)) = self.pick(replica, item) {
                    entry.deleted = true;
                    entry.content = None;
                    let now = self.tick();
                    let v = self.replicas[replica].edit(id, entry, now);
                    self.record(id, v);
                }
            }
            Op::Resolve { replica, item } => {
                if let Some((id, entry)) = self.pick(replica, item) {
                    let now = self.tick();
                    let v = self.replicas[replica].resolve(id, entry, now);
                    self.record(id, v);
                }
            }
            Op::Sync {
                from,
                to,
                cut,
                fail_mod,
            } => {
                if from == to {
                    return;
                }
                let sender = self.replicas[from].clone();
                let limits = BatchLimits {
                    max_items: 3,
                    max_bytes: 1 << 20,
                };
                // Fail the content of some versions, deterministically by their tick.
                sync_once(&sender, &mut self.replicas[to], limits, cut, |_, v| {
                    fail_mod > 0 && v.dot.tick % 5 == u64::from(fail_mod)
                });
            }
            Op::Snapshot { replica } => {
                self.snapshots[replica] = Some(self.replicas[replica].clone())
            }
            Op::Restore { replica } => {
                let Some(snapshot) = self.snapshots[replica].clone() else {
                    return;
                };
                // Versions only the restored replica had (and the snapshot lacks) are gone with it.
                for (_, v) in &self.written {
                    let elsewhere = self
                        .replicas
                        .iter()
                        .enumerate()
                        .any(|(i, r)| i != replica && r.knowledge.contains(&v.dot));
                    if !elsewhere && !snapshot.knowledge.contains(&v.dot) {
                        self.lost_with_restore.insert(v.dot);
                    }
                }
                let mut restored = snapshot;
                restored.epoch = self.replicas[replica].epoch;
                restored.new_epoch();
                self.replicas[replica] = restored;
            }
            Op::Forget { replica } => {
                let watermark = self.watermark();
                let before = self.replicas[replica].items.clone();
                self.replicas[replica].forget(&watermark);
                for (id, state) in before {
                    for v in state.versions() {
                        if v.is_forgettable(&watermark) {
                            self.forgotten_tombstones.push((id, v.history()));
                        }
                    }
                }
            }
        }
    }

    fn is_ancestor(&self, replica: usize, ancestor: ItemId, mut item: ItemId) -> bool {
        let items = &self.replicas[replica].items;
        for _ in 0..64 {
            if item == ancestor {
                return true;
            }
            match items.get(&item) {
                Some(state) if item != ItemId::ROOT => item = state.winner().entry.parent,
                _ => return false,
            }
        }
        true
    }

    /// What every replica has seen: the meet of all knowledge prefixes.
    fn watermark(&self) -> VersionVector {
        let mut iter = self.replicas.iter().map(|r| r.knowledge.prefix());
        let first = iter.next().unwrap_or_default();
        iter.fold(first, |acc, k| acc.meet(&k))
    }

    fn exchange_everything(&mut self) {
        if std::env::var("TRACE").is_ok() {
            for r in &self.replicas {
                eprintln!(
                    "{:?} k={:?} f={:?} items={:?}",
                    r.id,
                    r.knowledge,
                    r.forgotten,
                    r.items
                        .iter()
                        .map(|(i, s)| (
                            i,
                            s.versions()
                                .iter()
                                .map(|v| (v.dot, v.entry.deleted))
                                .collect::<Vec<_>>()
                        ))
                        .collect::<Vec<_>>()
                );
            }
        }
        for _ in 0..2 {
            for from in 0..REPLICAS {
                for to in 0..REPLICAS {
                    if from != to {
                        let sender = self.replicas[from].clone();
                        sync_once(
                            &sender,
                            &mut self.replicas[to],
                            BatchLimits::default(),
                            None,
                            |_, _| false,
                        );
                    }
                }
            }
        }
    }
}

fn check(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut world = World::new();
    for (step, op) in ops.iter().enumerate() {
        let before: Vec<_> = world.replicas.iter().map(|r| r.items.clone()).collect();
        world.run(op);
        // Knowledge never claims a version the replica neither holds nor has superseded.
        for replica in &world.replicas {
            for (item, version) in &world.written {
                if replica.knowledge.contains(&version.dot)
                    && !world.lost_with_restore.contains(&version.dot)
                {
                    let held = replica
                        .items
                        .get(item)
                        .is_some_and(|s| s.has_seen(&version.dot));
                    let forgotten = world
                        .forgotten_tombstones
                        .iter()
                        .any(|(id, h)| id == item && h.contains(&version.dot));
                    prop_assert!(
                        held || forgotten,
                        "step {} {:?}: {:?} knows {:?} of {:?} but holds {:?}; before {:?}",
                        step,
                        op,
                        replica.id,
                        version.dot,
                        item,
                        replica.items.get(item),
                        before.iter().map(|b| b.get(item)).collect::<Vec<_>>()
                    );
                }
            }
        }
    }
    world.exchange_everything();
    // Tombstones everyone has seen are forgotten everywhere: forgetting is allowed to differ
    // between replicas only until they all pass the watermark.
    let watermark = world.watermark();
    for index in 0..REPLICAS {
        world.run(&Op::Forget { replica: index });
    }
    let _ = watermark;

    let first = &world.replicas[0];
    for other in &world.replicas[1..] {
        for id in first.items.keys().chain(other.items.keys()) {
            prop_assert_eq!(
                first.items.get(id),
                other.items.get(id),
                "{:?} differs between {:?} and {:?}",
                id,
                first.id,
                other.id
            );
        }
        prop_assert_eq!(&first.knowledge, &other.knowledge);
        prop_assert_eq!(first.knowledge.compact(), other.knowledge.compact());
    }

    // The tree is the same everywhere and is a real tree: unique paths, parents are folders.
    let tree = layout(&first.items);
    for other in &world.replicas[1..] {
        prop_assert_eq!(&tree, &layout(&other.items));
    }
    let mut folders: BTreeSet<String> = BTreeSet::new();
    let mut paths: BTreeSet<&str> = BTreeSet::new();
    for placement in &tree.placements {
        prop_assert!(
            paths.insert(&placement.path),
            "duplicate path {}",
            placement.path
        );
        if let Some((parent, _)) = placement.path.rsplit_once('/') {
            prop_assert!(
                folders.contains(parent),
                "{} has no parent folder",
                placement.path
            );
        }
        if placement.version.entry.kind == ItemKind::Directory {
            folders.insert(placement.path.clone());
        }
    }
    // Every live item is shown.
    let shown: BTreeSet<ItemId> = tree.placements.iter().map(|p| p.item).collect();
    for (id, state) in &first.items {
        if !state.winner().entry.deleted {
            prop_assert!(shown.contains(id), "live item {:?} not shown", id);
        }
    }

    // No version lost.
    let current: BTreeMap<ItemId, Vec<&Version>> = first
        .items
        .iter()
        .map(|(id, s)| (*id, s.versions().iter().collect()))
        .collect();
    for (item, version) in &world.written {
        if world.lost_with_restore.contains(&version.dot) {
            continue;
        }
        let kept = current.get(item).is_some_and(|vs| {
            vs.iter()
                .any(|c| c.dot == version.dot || c.context.contains(&version.dot))
        });
        let forgotten = world
            .forgotten_tombstones
            .iter()
            .any(|(id, history)| id == item && history.contains(&version.dot));
        prop_assert!(
            kept || forgotten,
            "version {:?} of {:?} was lost",
            version.dot,
            item
        );
    }
    // Every live file loser is visible as a conflict copy.
    let copies = tree
        .placements
        .iter()
        .filter(|p| p.role == shoal_core::Role::ConflictCopy)
        .count();
    let live_losers: usize = first
        .items
        .values()
        .filter(|s| s.winner().entry.kind == ItemKind::File && !s.winner().entry.deleted)
        .map(|s| s.losers().iter().filter(|v| !v.entry.deleted).count())
        .sum();
    prop_assert_eq!(copies, live_losers);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2_000),
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn replicas_converge_and_lose_nothing(ops in proptest::collection::vec(op(), 1..200)) {
        check(&ops)?;
    }
}

/// Cases the property test once found, kept so they run on every build.
#[test]
fn regression_restore_after_forgotten_delete() {
    use Op::*;
    let mut ops: Vec<Op> = (0..6)
        .map(|_| Create {
            replica: 0,
            parent: 0,
            name: 0,
            directory: false,
        })
        .collect();
    ops.extend([
        Snapshot { replica: 0 },
        Create {
            replica: 0,
            parent: 0,
            name: 0,
            directory: false,
        },
        Restore { replica: 0 },
        Delete {
            replica: 0,
            item: 220484793300543657,
        },
        Sync {
            from: 0,
            to: 1,
            cut: None,
            fail_mod: 2,
        },
        Sync {
            from: 0,
            to: 2,
            cut: None,
            fail_mod: 2,
        },
        Sync {
            from: 0,
            to: 3,
            cut: None,
            fail_mod: 2,
        },
        Forget { replica: 1 },
        Restore { replica: 0 },
    ]);
    if let Err(error) = check(&ops) {
        panic!("{error}");
    }
}

#[test]
fn regression_forget_then_two_restores() {
    use Op::*;
    let c = |replica| Create {
        replica,
        parent: 0,
        name: 0,
        directory: false,
    };
    let ops = vec![
        Snapshot { replica: 0 },
        c(2),
        c(0),
        c(0),
        c(0),
        Restore { replica: 0 },
        c(0),
        Sync {
            from: 2,
            to: 1,
            cut: None,
            fail_mod: 2,
        },
        Delete {
            replica: 1,
            item: 0,
        },
        c(1),
        c(0),
        Move {
            replica: 1,
            item: 0,
            parent: 0,
        },
        Sync {
            from: 1,
            to: 2,
            cut: None,
            fail_mod: 2,
        },
        Rename {
            replica: 3,
            item: 0,
            name: 0,
        },
        Sync {
            from: 1,
            to: 0,
            cut: None,
            fail_mod: 0,
        },
        c(0),
        c(0),
        c(0),
        Sync {
            from: 0,
            to: 3,
            cut: None,
            fail_mod: 0,
        },
        Delete {
            replica: 2,
            item: 0,
        },
        Snapshot { replica: 3 },
        Sync {
            from: 2,
            to: 0,
            cut: None,
            fail_mod: 0,
        },
        Sync {
            from: 0,
            to: 3,
            cut: None,
            fail_mod: 0,
        },
        Sync {
            from: 2,
            to: 1,
            cut: None,
            fail_mod: 0,
        },
        c(0),
        c(0),
        Forget { replica: 3 },
        Restore { replica: 0 },
        Sync {
            from: 1,
            to: 0,
            cut: None,
            fail_mod: 1,
        },
        Sync {
            from: 3,
            to: 0,
            cut: None,
            fail_mod: 1,
        },
        Restore { replica: 3 },
    ];
    if let Err(error) = check(&ops) {
        panic!("{error}");
    }
}
