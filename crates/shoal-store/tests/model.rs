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

/// The scan writes a new item's first version without reading anything: it must be stored,
/// known and offered exactly like a version written the general way.
#[test]
fn a_new_item_written_without_reads_is_stored_like_any_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    let mut store = Store::open(&path, "store").expect("open");
    let (fresh, general) = (ItemId([7; 16]), ItemId([9; 16]));
    let mut tx = store.begin().expect("begin");
    let first = tx
        .write_new(fresh, entry(7, 5, false), 11)
        .expect("write_new");
    let second = tx
        .write_local(
            general,
            entry(7, 5, false),
            shoal_core::Knowledge::new(),
            11,
        )
        .expect("write_local");
    tx.commit().expect("commit");
    drop(store);

    let store = Store::open(&path, "store").expect("reopen");
    assert_eq!(store.tick().expect("tick"), 2);
    assert_eq!((first.dot.tick, second.dot.tick), (1, 2));
    let knowledge = store.knowledge().expect("knowledge");
    assert!(knowledge.contains(&first.dot) && knowledge.contains(&second.dot));
    let items = store.load_items().expect("items");
    assert_eq!(items[&fresh].versions(), std::slice::from_ref(&first));
    assert_eq!(items[&general].versions(), std::slice::from_ref(&second));
    let (a, b) = (&items[&fresh].versions()[0], &items[&general].versions()[0]);
    assert_eq!(
        (&a.entry, &a.context, &a.device),
        (&b.entry, &b.context, &b.device)
    );
    let offered: BTreeSet<_> = store
        .missing_for(&shoal_core::Knowledge::new())
        .expect("missing")
        .into_iter()
        .map(|(id, v)| (id, v.dot))
        .collect();
    assert_eq!(
        offered,
        BTreeSet::from([(fresh, first.dot), (general, second.dot)])
    );
}

/// A version refused by a hub is dropped from what is offered, and only that one.
#[test]
fn refused_versions_are_dropped_from_an_offer_and_the_others_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = Store::open(&dir.path().join("state.db"), "store").expect("open");
    let mut tx = store.begin().expect("begin");
    let written: Vec<_> = (0..5u8)
        .map(|n| {
            let item = ItemId([n + 1; 16]);
            (
                item,
                tx.write_new(item, entry(n, 5, false), 11).expect("write"),
            )
        })
        .collect();
    tx.commit().expect("commit");

    let mut offer = store
        .missing_for(&shoal_core::Knowledge::new())
        .expect("missing");
    assert!(!store.drop_refused(&mut offer).expect("nothing refused yet"));
    assert_eq!(offer.len(), 5);

    let mut tx = store.begin().expect("begin");
    for (item, version) in [&written[1], &written[3]] {
        tx.put_refused(*item, version, "readers cannot write", 12)
            .expect("refuse");
    }
    tx.commit().expect("commit");
    assert!(store.drop_refused(&mut offer).expect("drop"));
    let kept: BTreeSet<_> = offer.iter().map(|(_, v)| v.dot).collect();
    let expected: BTreeSet<_> = [0, 2, 4].iter().map(|&n| written[n].1.dot).collect();
    assert_eq!(kept, expected);
}

/// A read transaction ends however its work ends: the next write transaction starts.
#[test]
fn a_read_transaction_ends_however_its_work_ends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = Store::open(&dir.path().join("state.db"), "store").expect("open");
    let knowledge = store.reading(|store| store.knowledge()).expect("knowledge");
    assert_eq!(knowledge, shoal_core::Knowledge::new());
    let failed: Result<(), shoal_store::StoreError> =
        store.reading(|_| Err(shoal_store::StoreError::TooNew { found: 9, known: 1 }));
    assert!(failed.is_err());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.reading(|_| -> Result<(), shoal_store::StoreError> { panic!("work failed") })
    }));
    assert!(panicked.is_err());
    let mut tx = store.begin().expect("a write transaction after both");
    tx.write_new(ItemId([1; 16]), entry(1, 5, false), 11)
        .expect("write");
    tx.commit().expect("commit");
    assert_eq!(store.tick().expect("tick"), 1);
}

/// Two processes writing one replica (the agent's scan and a command such as `resolve`) never
/// hand out one dot twice, nor lose each other's knowledge: a transaction reads the last tick
/// and the knowledge once it holds the write lock, not before it waits for it.
#[test]
fn a_write_waiting_for_another_process_comes_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    let mut first = Store::open(&path, "store").expect("open");
    let mut second = Store::open(&path, "store").expect("open again");
    let mut tx = first.begin().expect("begin");
    let one = tx
        .write_new(ItemId([1; 16]), entry(1, 1, false), 1)
        .expect("write");
    let waiting = std::thread::spawn(move || {
        // Waits for the write lock `first` holds.
        let mut tx = second.begin()?;
        let two = tx.write_new(ItemId([2; 16]), entry(2, 2, false), 2)?;
        tx.commit()?;
        Ok::<_, shoal_store::StoreError>(two)
    });
    // Time for the second writer to start waiting; starting later, it would only read after
    // the commit anyway.
    std::thread::sleep(std::time::Duration::from_millis(300));
    tx.commit().expect("commit");
    let two = waiting
        .join()
        .expect("writer thread")
        .expect("the waiting write");
    assert_eq!((one.dot.tick, two.dot.tick), (1, 2));
    let store = Store::open(&path, "store").expect("reopen");
    assert_eq!(store.tick().expect("tick"), 2);
    let knowledge = store.knowledge().expect("knowledge");
    assert!(knowledge.contains(&one.dot) && knowledge.contains(&two.dot));
}
