//! Turning planned batches into wire batches: the part of serving a download that every
//! server (hub or peer) shares.

use std::collections::HashSet;

use shoal_core::{Batch, ChunkedContent, ContentHash};

use crate::{Location, WireBatch, WireContent, WireKnowledge, WireVector, WireVersion};

/// The wire form of `planned`: each batch with the chunk lists of its contents (each content
/// once per batch, looked up with `content`), the transport `locations`, and the URI of the
/// next batch (`next_uri(index)`).
pub fn wire_batches<E>(
    planned: Vec<Batch>,
    mut content: impl FnMut(&ContentHash) -> Result<Option<ChunkedContent>, E>,
    locations: &[Location],
    next_uri: impl Fn(usize) -> String,
) -> Result<Vec<WireBatch>, E> {
    let count = planned.len();
    let mut batches = Vec::with_capacity(count);
    for (index, batch) in planned.into_iter().enumerate() {
        let mut contents = Vec::new();
        let mut seen = HashSet::new();
        for (_, version) in &batch.versions {
            let hash = version
                .entry
                .content
                .filter(|h| !version.entry.deleted && seen.insert(*h));
            if let Some(found) = hash.map(|h| content(&h)).transpose()?.flatten() {
                contents.push(WireContent::from(&found));
            }
        }
        batches.push(WireBatch {
            versions: batch
                .versions
                .iter()
                .map(|(id, v)| WireVersion::new(id, v))
                .collect(),
            contents,
            locations: locations.to_vec(),
            learned: WireKnowledge::from(&batch.learned),
            last: batch.last,
            forgotten: WireVector::from(&batch.forgotten),
            next: (index + 1 < count).then(|| next_uri(index + 1)),
        });
    }
    Ok(batches)
}
