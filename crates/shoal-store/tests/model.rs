//! The SQLite store must behave exactly like the in-memory reference replica: fed the same
//! batches, it holds the same item states and knowledge, survives reopening, and enumerates the
//! same missing versions for any receiver.

use std::collections::BTreeSet;

use proptest::prelude::*;
use shoal_core::{
    BatchLimits, ContentHash, Entry, ItemId, ItemKind, MemReplica, Receiving, ReplicaId,
    missing_versions,
};
use shoal_store::Store;

#[derive(Clone, Debug)]
enum Op {
    Write {
        writer: usize,
        item: u8,
        delete: bool,
    },
    Sync {
        from: usize,
        to: usize,
    },
    Feed {
        from: usize,
        cut: Option<usize>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..12u8, proptest::bool::weighted(0.2))
            .prop_map(|(writer, item, delete)| Op::Write { writer, item, delete }),
        1 => (0..3usize, 0..3usize).prop_map(|(from, to)| Op::Sync { from, to }),
        2 => (0..3usize, proptest::option::of(0..3usize)).prop_map(|(from, cut)| Op::Feed { from, cut }),
    ]
}

fn entry(item: u8, tick: i64, delete: bool) -> Entry {
    Entry {
        parent: ItemId::ROOT,
        name: format!("f{item}"),
        kind: ItemKind::File,
        deleted: delete,
        content: (!delete).then(|| ContentHash::of(&tick.to_le_bytes())),
        size: 3,
        mtime_ns: tick,
        executable: false,
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.path().join("state.db");
    let fail = |e: shoal_store::StoreError| TestCaseError::fail(e.to_string());
    let mut store = Store::open(&path, "store").map_err(fail)?;
    let mut twin = MemReplica::new(store.identity().replica, "store");
    let mut writers: Vec<MemReplica> = (0..3)
        .map(|i| MemReplica::new(ReplicaId([i + 1; 16]), format!("w{i}")))
        .collect();
    let limits = BatchLimits {
        max_items: 2,
        max_bytes: 1 << 20,
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write {
                writer,
                item,
                delete,
            } => {
                let id = ItemId([item; 16]);
                writers[writer].edit(id, entry(item, step as i64, delete), step as i64);
            }
            Op::Sync { from, to } if from != to => {
                let sender = writers[from].clone();
                shoal_core::sync_once(&sender, &mut writers[to], limits, None, |_, _| false);
            }
            Op::Sync { .. } => {}
            Op::Feed { from, cut } => {
                let sender = &writers[from];
                let receiver_knowledge = store.knowledge().map_err(fail)?;
                prop_assert_eq!(&receiver_knowledge, &twin.knowledge);
                let batches = sender.batches_for(&receiver_knowledge, limits);
                let mut session = Receiving::new();
                let mut twin_session = Receiving::new();
                for batch in batches.iter().take(cut.unwrap_or(usize::MAX)) {
                    let mut tx = store.begin().map_err(fail)?;
                    let mut knowledge = tx.knowledge().clone();
                    session
                        .apply(&mut tx, &mut knowledge, batch, |_, _| true)
                        .map_err(fail)?;
                    *tx.knowledge_mut() = knowledge;
                    tx.commit().map_err(fail)?;
                    twin.apply(&mut twin_session, batch, |_, _| true);
                }
            }
        }
    }
    // Reopen: everything must have been durable.
    drop(store);
    let store = Store::open(&path, "store").map_err(fail)?;
    prop_assert_eq!(store.load_items().map_err(fail)?, twin.items.clone());
    prop_assert_eq!(store.knowledge().map_err(fail)?, twin.knowledge.clone());
    for writer in &writers {
        let from_store: BTreeSet<_> = store
            .missing_for(&writer.knowledge)
            .map_err(fail)?
            .into_iter()
            .map(|(id, v)| (id, v.dot))
            .collect();
        let from_twin: BTreeSet<_> = missing_versions(&twin.items, &writer.knowledge)
            .into_iter()
            .map(|(id, v)| (id, v.dot))
            .collect();
        prop_assert_eq!(from_store, from_twin);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse::<u32>().ok()).map_or(200, |c| c / 10),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_the_reference_replica(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}
