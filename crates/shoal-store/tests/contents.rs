//! Which held contents a changed large file's chunk list is sent against.

use shoal_core::{ChunkRef, ChunkedContent, ContentHash};
use shoal_store::Store;

fn content(tag: u8, size: u64) -> ChunkedContent {
    ChunkedContent {
        hash: ContentHash([tag; 32]),
        size,
        chunks: vec![ChunkRef {
            hash: ContentHash([tag; 32]),
            offset: 0,
            len: size as u32,
        }],
    }
}

#[test]
fn nearest_contents_are_the_accepted_ones_closest_in_size_within_a_factor_of_two()
-> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(&dir.path().join("store.db"), "test")?;
    let mut tx = store.begin()?;
    for (tag, size) in [
        (1, 100_000),
        (2, 101_000),
        (3, 98_000),
        (4, 40_000),
        (5, 250_000),
    ] {
        tx.put_content(&content(tag, size))?;
    }
    tx.commit()?;
    let tags = |found: Vec<ChunkedContent>| found.iter().map(|c| c.hash.0[0]).collect::<Vec<_>>();
    // Nearest first; 40,000 and 250,000 are outside half to twice 100,500.
    assert_eq!(
        tags(store.nearest_contents(100_500, |_| true, 10)?),
        [1, 2, 3]
    );
    assert_eq!(tags(store.nearest_contents(100_500, |_| true, 2)?), [1, 2]);
    // Only what the receiver holds.
    let held = ContentHash([3; 32]);
    assert_eq!(
        tags(store.nearest_contents(100_500, |h| *h == held, 4)?),
        [3]
    );
    // Reopened (the size index is a migration), the same answer.
    drop(store);
    let store = Store::open(&dir.path().join("store.db"), "test")?;
    assert_eq!(
        tags(store.nearest_contents(100_500, |_| true, 10)?),
        [1, 2, 3]
    );
    Ok(())
}
