//! Chunk lists sent as edits of a list the receiver already holds (`WireContent.base`), so a
//! large file changed in a few places costs a few entries on the wire instead of its whole list.

use std::collections::HashMap;

use shoal_core::{CHUNK_MAX, ChunkRef, ChunkedContent, ContentHash};

use crate::convert::{WireError, hex32, parse_hash};
use crate::messages::{WireChunk, WireContent, WireCopy};

/// Lists shorter than this travel whole: an edit would save too little to matter.
pub const DELTA_MIN_CHUNKS: usize = 64;

/// How many candidate bases a sender tries for one content (the held contents nearest in size).
pub const DELTA_BASES: usize = 4;

/// Rough JSON sizes, to tell whether an edit is worth sending.
const CHUNK_ENTRY_BYTES: usize = 88;
const COPY_ENTRY_BYTES: usize = 36;

impl WireContent {
    /// The wire form of `content` for a receiver holding the chunk lists of `bases`: an edit of
    /// the base that makes the shortest message, when that is under half the whole list; the
    /// whole list otherwise.
    pub fn encode(content: &ChunkedContent, bases: &[ChunkedContent]) -> WireContent {
        let whole = content.chunks.len() * CHUNK_ENTRY_BYTES;
        if content.chunks.len() < DELTA_MIN_CHUNKS {
            return WireContent::from(content);
        }
        let best = bases
            .iter()
            .filter(|base| base.hash != content.hash)
            .map(|base| (base, edit_of(content, base)))
            .min_by_key(|(base, (copies, chunks))| {
                (
                    copies.len() * COPY_ENTRY_BYTES + chunks.len() * CHUNK_ENTRY_BYTES,
                    base.hash.0,
                )
            });
        match best {
            Some((base, (copies, chunks)))
                if (copies.len() * COPY_ENTRY_BYTES + chunks.len() * CHUNK_ENTRY_BYTES) * 2
                    < whole =>
            {
                WireContent {
                    hash: hex32(&content.hash.0),
                    size: content.size,
                    chunks,
                    held: false,
                    base: Some(hex32(&base.hash.0)),
                    copies,
                }
            }
            _ => WireContent::from(content),
        }
    }

    /// The content this list is an edit of, if it is one.
    pub fn base_hash(&self) -> Result<Option<ContentHash>, WireError> {
        self.base.as_deref().map(parse_hash).transpose()
    }

    /// The chunk list, checked: rebuilt from `base` (the content named by `base_hash`) when
    /// sent as an edit, taken as sent otherwise. Runs must be in order, inside the base, and
    /// everything must add up to the size.
    pub fn resolve(&self, base: Option<&ChunkedContent>) -> Result<ChunkedContent, WireError> {
        let Some(wanted) = self.base_hash()? else {
            return ChunkedContent::try_from(self);
        };
        let base = match base {
            Some(base) if base.hash == wanted => base,
            _ => {
                return Err(WireError::Invalid(format!(
                    "content {} is an edit of {wanted}, which is not held here",
                    self.hash
                )));
            }
        };
        let invalid = |why: String| WireError::Invalid(format!("content {}: {why}", self.hash));
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut offset = 0u64;
        let mut push = |chunks: &mut Vec<ChunkRef>, hash: ContentHash, len: u32| {
            if len == 0 || len as usize > CHUNK_MAX {
                return Err(invalid(format!(
                    "a chunk of {len} bytes is outside the protocol's limits"
                )));
            }
            chunks.push(ChunkRef { hash, offset, len });
            offset += u64::from(len);
            // Checked as it grows, so a hostile edit cannot make a huge list.
            if offset > self.size {
                return Err(invalid(format!("chunks add up to more than {}", self.size)));
            }
            Ok(())
        };
        let mut literals = self.chunks.iter();
        for copy in &self.copies {
            let at = copy.at as usize;
            if at < chunks.len() || copy.count == 0 {
                return Err(invalid("copied runs overlap or are empty".into()));
            }
            while chunks.len() < at {
                let chunk = literals
                    .next()
                    .ok_or_else(|| invalid("a copied run starts past the list".into()))?;
                push(&mut chunks, parse_hash(&chunk.hash)?, chunk.len)?;
            }
            let from = copy.from as usize;
            let run = base
                .chunks
                .get(from..from + copy.count as usize)
                .ok_or_else(|| invalid("a copied run lies outside the base".into()))?;
            for chunk in run {
                push(&mut chunks, chunk.hash, chunk.len)?;
            }
        }
        for chunk in literals {
            push(&mut chunks, parse_hash(&chunk.hash)?, chunk.len)?;
        }
        if offset != self.size {
            return Err(invalid(format!(
                "chunks add up to {offset}, not {}",
                self.size
            )));
        }
        crate::convert::named(parse_hash(&self.hash)?, self.size, chunks)
    }
}

/// `content`'s list as runs of `base`'s chunks and the chunks between them.
fn edit_of(content: &ChunkedContent, base: &ChunkedContent) -> (Vec<WireCopy>, Vec<WireChunk>) {
    let mut first_at: HashMap<ContentHash, usize> = HashMap::with_capacity(base.chunks.len());
    for (index, chunk) in base.chunks.iter().enumerate() {
        first_at.entry(chunk.hash).or_insert(index);
    }
    let mut copies = Vec::new();
    let mut literals = Vec::new();
    let mut i = 0;
    while i < content.chunks.len() {
        match first_at.get(&content.chunks[i].hash) {
            Some(&from) => {
                let count = content.chunks[i..]
                    .iter()
                    .zip(&base.chunks[from..])
                    .take_while(|(a, b)| a.hash == b.hash && a.len == b.len)
                    .count();
                copies.push(WireCopy {
                    at: i as u32,
                    from: from as u32,
                    count: count as u32,
                });
                i += count;
            }
            None => {
                literals.push(WireChunk {
                    hash: hex32(&content.chunks[i].hash.0),
                    len: content.chunks[i].len,
                });
                i += 1;
            }
        }
    }
    (copies, literals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(seed: u8, lens: &[u32]) -> ChunkedContent {
        let mut offset = 0;
        let chunks = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let chunk = ChunkRef {
                    hash: ContentHash(*blake3::hash(&[seed, i as u8, (i >> 8) as u8]).as_bytes()),
                    offset,
                    len,
                };
                offset += u64::from(len);
                chunk
            })
            .collect::<Vec<_>>();
        ChunkedContent::from_chunks(chunks)
    }

    /// `base` with chunks `range` replaced by `new`'s chunks of the same positions.
    fn edited(
        base: &ChunkedContent,
        new: &ChunkedContent,
        range: std::ops::Range<usize>,
    ) -> ChunkedContent {
        let mut chunks: Vec<ChunkRef> = base.chunks.clone();
        for i in range {
            chunks[i] = new.chunks[i];
        }
        let mut offset = 0;
        for chunk in &mut chunks {
            chunk.offset = offset;
            offset += u64::from(chunk.len);
        }
        ChunkedContent::from_chunks(chunks)
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn a_list_changed_in_the_middle_travels_as_a_short_edit_and_rebuilds_exactly() -> TestResult {
        let base = content(1, &[65_536; 500]);
        let other = content(2, &[40_000; 500]);
        let changed = edited(&base, &other, 200..215);
        let wire = WireContent::encode(&changed, &[other.clone(), base.clone()]);
        assert_eq!(wire.base_hash()?, Some(base.hash));
        assert_eq!(wire.chunks.len(), 15);
        assert_eq!(wire.copies.len(), 2);
        let json = serde_json::to_vec(&wire)?;
        let whole = serde_json::to_vec(&WireContent::from(&changed))?;
        assert!(
            json.len() * 20 < whole.len(),
            "{} vs {}",
            json.len(),
            whole.len()
        );
        assert_eq!(wire.resolve(Some(&base))?, changed);
        // Without its base (or with another) it is refused, never guessed.
        assert!(wire.resolve(None).is_err());
        assert!(wire.resolve(Some(&other)).is_err());
        assert!(ChunkedContent::try_from(&wire).is_err());
        Ok(())
    }

    #[test]
    fn unrelated_or_short_lists_travel_whole() -> TestResult {
        let base = content(1, &[65_536; 500]);
        let unrelated = content(3, &[65_536; 500]);
        assert_eq!(
            WireContent::encode(&unrelated, std::slice::from_ref(&base)),
            WireContent::from(&unrelated)
        );
        let short = content(4, &[1_000; 10]);
        let short_edit = edited(&short, &content(5, &[1_000; 10]), 0..1);
        assert_eq!(
            WireContent::encode(&short_edit, &[short]),
            WireContent::from(&short_edit)
        );
        // A list that grew keeps its runs; the tail travels as chunks.
        let mut grown = base.clone();
        grown
            .chunks
            .extend(content(6, &[70_000; 3]).chunks.iter().map(|c| ChunkRef {
                offset: 500 * 65_536,
                ..*c
            }));
        let mut offset = 0;
        for chunk in &mut grown.chunks {
            chunk.offset = offset;
            offset += u64::from(chunk.len);
        }
        grown.size = offset;
        grown.hash = ChunkedContent::name_of(&grown.chunks);
        let wire = WireContent::encode(&grown, std::slice::from_ref(&base));
        assert_eq!((wire.copies.len(), wire.chunks.len()), (1, 3));
        assert_eq!(wire.resolve(Some(&base))?, grown);
        Ok(())
    }

    #[test]
    fn hostile_edits_are_refused() -> TestResult {
        let base = content(1, &[65_536; 100]);
        let changed = edited(&base, &content(2, &[65_536; 100]), 50..51);
        let good = WireContent::encode(&changed, std::slice::from_ref(&base));
        assert_eq!(good.resolve(Some(&base))?, changed);
        let with = |f: &dyn Fn(&mut WireContent)| {
            let mut wire = good.clone();
            f(&mut wire);
            wire.resolve(Some(&base))
        };
        // A run outside the base, overlapping runs, an empty run, a run past the literals.
        assert!(with(&|w| w.copies[1].from = 99).is_err());
        assert!(with(&|w| w.copies[1].at = 10).is_err());
        assert!(with(&|w| w.copies[0].count = 0).is_err());
        assert!(with(&|w| w.copies[1].at = 60).is_err());
        // Sizes that do not add up, a huge repeated run, a bad chunk length.
        assert!(with(&|w| w.size += 1).is_err());
        assert!(
            with(&|w| {
                w.chunks.clear();
                w.copies = (0..1000)
                    .map(|k| WireCopy {
                        at: k * 100,
                        from: 0,
                        count: 100,
                    })
                    .collect();
            })
            .is_err()
        );
        assert!(with(&|w| w.chunks[0].len = 0).is_err());
        assert!(with(&|w| w.base = Some("zz".into())).is_err());
        // A list that rebuilds fine but names another content.
        assert!(with(&|w| w.hash = base.hash.to_string()).is_err());
        Ok(())
    }
}
