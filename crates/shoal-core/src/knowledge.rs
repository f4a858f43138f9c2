//! Knowledge: everything a replica has seen, as a version vector plus exceptions.
//!
//! After a complete sync a replica's knowledge is a plain vector (one counter per writer). A
//! sync cut off after some batches leaves the replica knowing scattered dots beyond its
//! counters; those are the exceptions, and they fold back into the counters as soon as the
//! gaps fill.

use crate::codec::{DecodeError, Decoder, Encoder};
use crate::ids::{Dot, WriterId};
use crate::vector::VersionVector;

/// The ticks of one writer that were seen. Sorted vectors, not trees: a knowledge is small,
/// copied and decoded often (every stored version carries one as its context).
#[derive(Clone, Default, PartialEq, Eq, Hash, Debug)]
struct Seen {
    /// Every tick in `1..=upto` has been seen.
    upto: u64,
    /// Ticks above `upto + 1` seen out of order, ascending.
    extra: Vec<u64>,
}

impl Seen {
    fn contains(&self, tick: u64) -> bool {
        tick <= self.upto || self.extra.binary_search(&tick).is_ok()
    }

    fn add(&mut self, tick: u64) {
        if tick <= self.upto {
            return;
        }
        if let Err(position) = self.extra.binary_search(&tick) {
            self.extra.insert(position, tick);
            self.normalize();
        }
    }

    fn add_upto(&mut self, upto: u64) {
        if upto > self.upto {
            self.upto = upto;
            self.normalize();
        }
    }

    fn normalize(&mut self) {
        let upto = self.upto;
        let below = self.extra.partition_point(|tick| *tick <= upto);
        self.extra.drain(..below);
        let mut folded = 0;
        while self.extra.get(folded) == Some(&(self.upto + 1)) {
            self.upto += 1;
            folded += 1;
        }
        self.extra.drain(..folded);
    }

    fn highest(&self) -> u64 {
        self.extra.last().copied().unwrap_or(self.upto)
    }
}

/// What a replica has seen: for each writer, a prefix of ticks and exceptions above it.
#[derive(Clone, Default, PartialEq, Eq, Hash, Debug)]
pub struct Knowledge {
    /// Sorted by writer.
    writers: Vec<(WriterId, Seen)>,
}

impl Knowledge {
    /// Knows nothing.
    pub fn new() -> Self {
        Self::default()
    }

    fn seen(&self, writer: &WriterId) -> Option<&Seen> {
        self.writers
            .binary_search_by(|(w, _)| w.cmp(writer))
            .ok()
            .map(|index| &self.writers[index].1)
    }

    fn seen_mut(&mut self, writer: WriterId) -> &mut Seen {
        let index = match self.writers.binary_search_by(|(w, _)| w.cmp(&writer)) {
            Ok(index) => index,
            Err(index) => {
                // Exactly one more: a knowledge has a handful of writers, and a tree holds one
                // per version (a doubling would leave most of each allocation unused).
                self.writers.reserve_exact(1);
                self.writers.insert(index, (writer, Seen::default()));
                index
            }
        };
        &mut self.writers[index].1
    }

    /// Whether the write `dot` has been seen.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.seen(&dot.writer)
            .is_some_and(|seen| seen.contains(dot.tick))
    }

    /// Records one write as seen.
    pub fn add(&mut self, dot: Dot) {
        if dot.tick > 0 {
            self.seen_mut(dot.writer).add(dot.tick);
        }
    }

    /// Records every write covered by a vector as seen.
    pub fn add_vector(&mut self, vector: &VersionVector) {
        for (writer, tick) in vector.iter() {
            if *tick > 0 {
                self.seen_mut(*writer).add_upto(*tick);
            }
        }
    }

    /// Union: afterwards `self` has seen what either side had.
    pub fn merge(&mut self, other: &Knowledge) {
        for (writer, seen) in &other.writers {
            let mine = self.seen_mut(*writer);
            mine.add_upto(seen.upto);
            for tick in &seen.extra {
                mine.add(*tick);
            }
        }
    }

    /// Whether every write in `vector` has been seen. (Exceptions never start right above the
    /// prefix, so "all ticks up to n" means "the prefix reaches n".)
    pub fn covers(&self, vector: &VersionVector) -> bool {
        vector
            .iter()
            .all(|(writer, tick)| self.seen(writer).map_or(0, |seen| seen.upto) >= *tick)
    }

    /// Whether `self` has seen everything `other` has.
    pub fn covers_knowledge(&self, other: &Knowledge) -> bool {
        other.writers.iter().all(|(writer, seen)| {
            let mine = self.seen(writer);
            mine.map_or(0, |m| m.upto) >= seen.upto
                && seen
                    .extra
                    .iter()
                    .all(|tick| mine.is_some_and(|m| m.contains(*tick)))
        })
    }

    /// The gap-free part: for each writer the prefix of ticks all seen.
    pub fn prefix(&self) -> VersionVector {
        self.writers
            .iter()
            .map(|(writer, seen)| Dot {
                writer: *writer,
                tick: seen.upto,
            })
            .collect()
    }

    /// The ticks of `writer` seen above its prefix, ascending.
    pub fn exceptions(&self, writer: &WriterId) -> &[u64] {
        self.seen(writer).map_or(&[], |seen| &seen.extra)
    }

    /// The highest tick seen of `writer`, counting exceptions.
    pub fn highest(&self, writer: &WriterId) -> u64 {
        self.seen(writer).map_or(0, Seen::highest)
    }

    /// The ticks of `writer` that are seen, at or below `upto`, as ranges `(first, last)`.
    pub fn ranges(&self, writer: &WriterId) -> Vec<(u64, u64)> {
        let Some(seen) = self.seen(writer) else {
            return Vec::new();
        };
        let mut ranges = Vec::new();
        if seen.upto > 0 {
            ranges.push((1, seen.upto));
        }
        for tick in &seen.extra {
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 == *tick => *last = *tick,
                _ => ranges.push((*tick, *tick)),
            }
        }
        ranges
    }

    /// Writers with at least one seen tick, in canonical order.
    pub fn writers(&self) -> impl Iterator<Item = &WriterId> {
        self.writers.iter().map(|(writer, _)| writer)
    }

    /// Number of exception ticks (zero after every completed sync).
    pub fn exception_count(&self) -> usize {
        self.writers.iter().map(|(_, seen)| seen.extra.len()).sum()
    }

    /// The canonical encoding: equal knowledge always encodes to equal bytes.
    pub fn encode(&self, out: &mut Encoder) {
        let writers: Vec<_> = self
            .writers
            .iter()
            .filter(|(_, s)| s.upto > 0 || !s.extra.is_empty())
            .collect();
        out.uvarint(writers.len() as u64);
        for (writer, seen) in writers {
            out.writer(writer);
            out.uvarint(seen.upto);
            out.uvarint(seen.extra.len() as u64);
            let mut previous = seen.upto;
            for tick in &seen.extra {
                out.uvarint(tick - previous);
                previous = *tick;
            }
        }
    }

    /// Reads what [`Knowledge::encode`] wrote.
    pub fn decode(input: &mut Decoder<'_>) -> Result<Knowledge, DecodeError> {
        let mut knowledge = Knowledge::new();
        let count = input.length()?;
        // Bounded by the input's length; exact, as a tree decodes one knowledge per record.
        knowledge.writers.reserve_exact(count);
        for _ in 0..count {
            let writer = input.writer()?;
            let mut seen = Seen {
                upto: input.uvarint()?,
                extra: Vec::new(),
            };
            let extras = input.length()?;
            seen.extra.reserve(extras);
            let mut previous = seen.upto;
            for _ in 0..extras {
                let delta = input.uvarint()?;
                if delta == 0 {
                    return Err(DecodeError::Invalid("knowledge exceptions must increase"));
                }
                previous = previous
                    .checked_add(delta)
                    .ok_or(DecodeError::Invalid("tick overflow"))?;
                seen.extra.push(previous);
            }
            seen.normalize();
            if knowledge
                .writers
                .last()
                .is_some_and(|(last, _)| *last >= writer)
            {
                return Err(DecodeError::Invalid("knowledge writers out of order"));
            }
            if seen.upto > 0 || !seen.extra.is_empty() {
                knowledge.writers.push((writer, seen));
            }
        }
        Ok(knowledge)
    }

    /// Canonical bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Encoder::new();
        self.encode(&mut out);
        out.into_bytes()
    }

    /// Parses canonical bytes, rejecting trailing garbage.
    pub fn from_bytes(bytes: &[u8]) -> Result<Knowledge, DecodeError> {
        let mut input = Decoder::new(bytes);
        let knowledge = Knowledge::decode(&mut input)?;
        input.finish()?;
        Ok(knowledge)
    }

    /// The compact form: a hash of the canonical encoding. Equal hashes mean "in sync".
    pub fn compact(&self) -> CompactKnowledge {
        CompactKnowledge(blake3::derive_key("shoal knowledge v1", &self.to_bytes()))
    }
}

/// A 32-byte digest of a knowledge, cheap to send in presence and negotiation messages.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompactKnowledge(pub [u8; 32]);

impl std::fmt::Debug for CompactKnowledge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "K{}", crate::ids::hex(&self.0[..6]))
    }
}
impl std::fmt::Display for CompactKnowledge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::ids::hex(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ReplicaId;

    fn writer(n: u8) -> WriterId {
        WriterId {
            replica: ReplicaId([n; 16]),
            epoch: 0,
        }
    }

    #[test]
    fn exceptions_fold_into_the_prefix_when_gaps_fill() {
        let w = writer(1);
        let mut k = Knowledge::new();
        k.add(Dot { writer: w, tick: 3 });
        k.add(Dot { writer: w, tick: 2 });
        assert_eq!(k.exception_count(), 2);
        assert!(!k.contains(&Dot { writer: w, tick: 1 }));
        k.add(Dot { writer: w, tick: 1 });
        assert_eq!(k.exception_count(), 0);
        assert_eq!(k.prefix().get(&w), 3);
    }

    #[test]
    fn encoding_round_trips_and_compact_form_tracks_content() {
        let mut k = Knowledge::new();
        k.add(Dot {
            writer: writer(1),
            tick: 1,
        });
        k.add(Dot {
            writer: writer(2),
            tick: 5,
        });
        let bytes = k.to_bytes();
        assert_eq!(Knowledge::from_bytes(&bytes).ok(), Some(k.clone()));
        let before = k.compact();
        k.add(Dot {
            writer: writer(2),
            tick: 1,
        });
        assert_ne!(before, k.compact());
        assert!(Knowledge::from_bytes(&[1, 2, 3]).is_err());
    }

    #[test]
    fn covers_knowledge_sees_exceptions() {
        let w = writer(1);
        let mut a = Knowledge::new();
        a.add(Dot { writer: w, tick: 4 });
        let mut b = Knowledge::new();
        b.add_vector(&[Dot { writer: w, tick: 4 }].into_iter().collect());
        assert!(b.covers_knowledge(&a));
        assert!(!a.covers_knowledge(&b));
    }
}
