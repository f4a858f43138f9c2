//! Where fetched chunks land: each read once, from the connection to its place.

use std::collections::HashMap;

use bytes::Bytes;
use shoal_client::ChunkSink;
use shoal_core::ContentHash;
use shoal_store::{ChunkRef, Piece};

/// A sink that can tell which chunks have arrived, so a fetch asks only for the others.
pub(crate) trait GroupSink: ChunkSink {
    fn holds(&self, hash: &ContentHash) -> bool;
}

/// Chunks fetched into buffers of their own, by hash.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    chunks: HashMap<ContentHash, Bytes>,
    landing: Vec<u8>,
}

impl Fetched {
    pub(crate) fn into_chunks(self) -> HashMap<ContentHash, Bytes> {
        self.chunks
    }
}

impl ChunkSink for Fetched {
    fn place(&mut self, hash: &ContentHash, len: usize) -> Option<&mut [u8]> {
        if self.chunks.contains_key(hash) {
            return None;
        }
        self.landing = vec![0u8; len];
        Some(&mut self.landing)
    }

    fn arrived(&mut self, hash: &ContentHash) {
        let bytes = std::mem::take(&mut self.landing);
        self.chunks.insert(*hash, bytes.into());
    }
}

impl GroupSink for Fetched {
    fn holds(&self, hash: &ContentHash) -> bool {
        self.chunks.contains_key(hash)
    }
}

/// Consecutive chunks of one content fetched into their places in a piece of the file: a
/// chunk's bytes are written to the file from where they were read.
#[derive(Debug)]
pub(crate) struct PieceSink<'p> {
    piece: &'p mut Piece,
    places: HashMap<ContentHash, Places>,
    /// Whether the group's chunks cover the whole span, with no gap between them.
    gapless: bool,
}

impl<'p> PieceSink<'p> {
    /// Makes `piece` the span of `group` (chunks in the order of their offsets) and expects
    /// them.
    pub(crate) fn new(piece: &'p mut Piece, group: &[(ContentHash, &ChunkRef)]) -> Self {
        let (start, end) = match (group.first(), group.last()) {
            (Some((_, first)), Some((_, last))) => {
                (first.offset, last.offset + u64::from(last.len))
            }
            _ => (0, 0),
        };
        piece.reset(start, (end - start) as usize);
        let mut places: HashMap<ContentHash, Places> = HashMap::new();
        for (_, chunk) in group {
            places
                .entry(chunk.hash)
                .or_insert_with(|| Places {
                    at: Vec::new(),
                    len: chunk.len as usize,
                    arrived: false,
                })
                .at
                .push((chunk.offset - start) as usize);
        }
        let gapless = group
            .windows(2)
            .all(|w| w[0].1.offset + u64::from(w[0].1.len) == w[1].1.offset);
        PieceSink {
            piece,
            places,
            gapless,
        }
    }

    /// Puts `bytes` (chunk `hash`, already checked) in all its places.
    pub(crate) fn fill(&mut self, hash: &ContentHash, bytes: &[u8]) {
        if let Some(place) = self.place(hash, bytes.len()) {
            place.copy_from_slice(bytes);
            self.arrived(hash);
        }
    }

    /// The stretches of the piece whose chunks have arrived, each as (its offset in the
    /// file, its bytes).
    pub(crate) fn arrived_runs(&self) -> Vec<(u64, &[u8])> {
        let mut spans: Vec<(usize, usize)> = self
            .places
            .values()
            .filter(|places| places.arrived)
            .flat_map(|places| places.at.iter().map(|&at| (at, at + places.len)))
            .collect();
        spans.sort_unstable();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (from, to) in spans {
            match runs.last_mut() {
                Some((_, end)) if *end == from => *end = to,
                _ => runs.push((from, to)),
            }
        }
        let bytes = self.piece.bytes();
        runs.into_iter()
            .map(|(from, to)| (self.piece.offset() + from as u64, &bytes[from..to]))
            .collect()
    }

    /// Whether every chunk of the group has arrived.
    pub(crate) fn complete(&self) -> bool {
        self.places.values().all(|places| places.arrived)
    }

    /// Whether the whole piece holds arrived chunks, so it may be written as one: every chunk
    /// arrived and they leave no gap between them.
    pub(crate) fn whole(&self) -> bool {
        self.gapless && self.complete()
    }
}

/// Where one chunk goes in a piece.
#[derive(Debug)]
struct Places {
    /// Its offsets in the piece (a chunk may recur).
    at: Vec<usize>,
    len: usize,
    arrived: bool,
}

impl ChunkSink for PieceSink<'_> {
    fn place(&mut self, hash: &ContentHash, len: usize) -> Option<&mut [u8]> {
        let places = self.places.get(hash)?;
        let first = *places.at.first()?;
        if places.arrived || places.len != len {
            return None;
        }
        Some(&mut self.piece.bytes_mut()[first..first + len])
    }

    fn arrived(&mut self, hash: &ContentHash) {
        let Some(places) = self.places.get_mut(hash) else {
            return;
        };
        if let Some((&first, others)) = places.at.split_first() {
            for &other in others {
                self.piece
                    .bytes_mut()
                    .copy_within(first..first + places.len, other);
            }
        }
        places.arrived = true;
    }
}

impl GroupSink for PieceSink<'_> {
    fn holds(&self, hash: &ContentHash) -> bool {
        self.places.get(hash).is_some_and(|places| places.arrived)
    }
}

/// Counts the bytes that arrive through it into another sink.
pub(crate) struct Counted<'s> {
    sink: &'s mut dyn GroupSink,
    pending: usize,
    pub(crate) bytes: u64,
}

impl<'s> Counted<'s> {
    pub(crate) fn new(sink: &'s mut dyn GroupSink) -> Self {
        Counted {
            sink,
            pending: 0,
            bytes: 0,
        }
    }
}

impl ChunkSink for Counted<'_> {
    fn place(&mut self, hash: &ContentHash, len: usize) -> Option<&mut [u8]> {
        self.pending = len;
        self.sink.place(hash, len)
    }

    fn arrived(&mut self, hash: &ContentHash) {
        self.bytes += self.pending as u64;
        self.sink.arrived(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(bytes: &[u8], offset: u64) -> ChunkRef {
        ChunkRef {
            hash: ContentHash::of(bytes),
            offset,
            len: bytes.len() as u32,
        }
    }

    /// Lands `bytes` for `hash` as a fetch would: into the place given, then told it arrived.
    fn land(sink: &mut PieceSink<'_>, bytes: &[u8]) -> bool {
        let hash = ContentHash::of(bytes);
        let Some(place) = sink.place(&hash, bytes.len()) else {
            return false;
        };
        place.copy_from_slice(bytes);
        sink.arrived(&hash);
        true
    }

    #[test]
    fn a_group_lands_in_its_places_and_a_recurring_chunk_in_each() {
        let (a, b, c) = (vec![1u8; 5000], vec![2u8; 3000], vec![3u8; 100]);
        // a, b, a, c from offset 10,000: a recurs.
        let chunks = [
            chunk(&a, 10_000),
            chunk(&b, 15_000),
            chunk(&a, 18_000),
            chunk(&c, 23_000),
        ];
        let content = ContentHash::of(b"content");
        let group: Vec<(ContentHash, &ChunkRef)> = chunks.iter().map(|c| (content, c)).collect();
        let mut piece = Piece::default();
        let mut sink = PieceSink::new(&mut piece, &group);
        let unasked = vec![4u8; 10];
        assert!(
            !land(&mut sink, &unasked),
            "a chunk not in the group found a place"
        );
        assert!(
            sink.place(&ContentHash::of(&b), 2999).is_none(),
            "a chunk of the wrong length found a place"
        );
        assert!(land(&mut sink, &a));
        assert!(!land(&mut sink, &a), "a chunk landed twice");
        assert!(sink.holds(&ContentHash::of(&a)) && !sink.complete());
        // c comes from elsewhere (this device's files, one by one).
        sink.fill(&ContentHash::of(&c), &c);
        // With b missing: two stretches, a alone and a + c.
        let runs: Vec<(u64, Vec<u8>)> = sink
            .arrived_runs()
            .into_iter()
            .map(|(at, bytes)| (at, bytes.to_vec()))
            .collect();
        assert_eq!(
            runs,
            vec![
                (10_000, a.clone()),
                (18_000, [a.clone(), c.clone()].concat())
            ]
        );
        assert!(land(&mut sink, &b));
        assert!(sink.complete());
        assert!(sink.whole());
        let whole = [a.clone(), b, a, c].concat();
        assert_eq!(piece.offset(), 10_000);
        assert_eq!(piece.bytes(), &whole[..]);
    }

    /// What is left of a group to ask again may have gaps (chunks written already): all of
    /// it arriving does not make the span between them whole.
    #[test]
    fn a_group_with_gaps_is_never_whole() {
        let (a, c) = (vec![1u8; 5000], vec![3u8; 100]);
        let chunks = [chunk(&a, 0), chunk(&c, 8000)];
        let content = ContentHash::of(b"content");
        let group: Vec<(ContentHash, &ChunkRef)> = chunks.iter().map(|c| (content, c)).collect();
        let mut piece = Piece::default();
        let mut sink = PieceSink::new(&mut piece, &group);
        assert!(land(&mut sink, &a) && land(&mut sink, &c));
        assert!(sink.complete() && !sink.whole());
        let runs: Vec<(u64, usize)> = sink
            .arrived_runs()
            .into_iter()
            .map(|(at, bytes)| (at, bytes.len()))
            .collect();
        assert_eq!(runs, vec![(0, 5000), (8000, 100)]);
    }
}
