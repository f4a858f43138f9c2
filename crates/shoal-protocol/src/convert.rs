//! Conversions between wire messages and core types. Everything from the wire is validated.

use shoal_core::{
    CHUNK_MAX, ChunkRef, ChunkedContent, ContentHash, Dot, Entry, ItemId, ItemKind, Knowledge,
    ReplicaId, Version, VersionVector, WriterId,
};

use crate::messages::{
    WireChunk, WireContent, WireDot, WireEntry, WireKnowledge, WireSeen, WireVector, WireVersion,
};

/// A wire message that does not describe a valid value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// An id or hash is not hex of the right length.
    #[error("{field}: expected {expected} hex digits, got {got:?}")]
    BadHex {
        /// Which field.
        field: &'static str,
        /// How many digits were expected.
        expected: usize,
        /// What was sent.
        got: String,
    },
    /// A field holds an impossible value.
    #[error("{0}")]
    Invalid(String),
}

/// Lowercase hex of 16 bytes.
pub fn hex16(bytes: &[u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex of 32 bytes.
pub fn hex32(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], WireError> {
    let bad = || WireError::BadHex {
        field,
        expected: N * 2,
        got: text.chars().take(80).collect(),
    };
    if text.len() != N * 2 || !text.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Parses a replica id.
pub fn parse_replica(text: &str) -> Result<ReplicaId, WireError> {
    parse_hex("replica", text).map(ReplicaId)
}

/// Parses an item id.
pub fn parse_item(text: &str) -> Result<ItemId, WireError> {
    parse_hex("item", text).map(ItemId)
}

/// Parses a content or chunk hash.
pub fn parse_hash(text: &str) -> Result<ContentHash, WireError> {
    parse_hex("hash", text).map(ContentHash)
}

impl From<&Knowledge> for WireKnowledge {
    fn from(knowledge: &Knowledge) -> Self {
        let prefix = knowledge.prefix();
        WireKnowledge(
            knowledge
                .writers()
                .map(|writer| WireSeen {
                    replica: hex16(&writer.replica.0),
                    epoch: writer.epoch,
                    upto: prefix.get(writer),
                    extra: knowledge.exceptions(writer).to_vec(),
                })
                .collect(),
        )
    }
}

impl TryFrom<&WireKnowledge> for Knowledge {
    type Error = WireError;
    fn try_from(wire: &WireKnowledge) -> Result<Self, WireError> {
        let mut knowledge = Knowledge::new();
        if wire.0.len() > 100_000 {
            return Err(WireError::Invalid("knowledge has too many writers".into()));
        }
        for seen in &wire.0 {
            let writer = WriterId {
                replica: parse_replica(&seen.replica)?,
                epoch: seen.epoch,
            };
            knowledge.add_vector(
                &[Dot {
                    writer,
                    tick: seen.upto,
                }]
                .into_iter()
                .collect(),
            );
            if seen.extra.len() > 1_000_000 {
                return Err(WireError::Invalid(
                    "knowledge has too many exceptions".into(),
                ));
            }
            for tick in &seen.extra {
                if *tick == 0 {
                    return Err(WireError::Invalid("tick 0 is not a write".into()));
                }
                knowledge.add(Dot {
                    writer,
                    tick: *tick,
                });
            }
        }
        Ok(knowledge)
    }
}

impl From<&ChunkedContent> for WireContent {
    fn from(content: &ChunkedContent) -> Self {
        WireContent {
            hash: hex32(&content.hash.0),
            size: content.size,
            chunks: content
                .chunks
                .iter()
                .map(|c| WireChunk {
                    hash: hex32(&c.hash.0),
                    len: c.len,
                })
                .collect(),
            held: false,
            base: None,
            copies: Vec::new(),
        }
    }
}

impl WireContent {
    /// A content named without its chunk list, for a receiver that holds it.
    pub fn held(hash: &ContentHash, size: u64) -> WireContent {
        WireContent {
            hash: hex32(&hash.0),
            size,
            chunks: Vec::new(),
            held: true,
            base: None,
            copies: Vec::new(),
        }
    }
}

impl TryFrom<&WireContent> for ChunkedContent {
    type Error = WireError;
    /// Checks every chunk is within the protocol's sizes and that they add up to the size. A
    /// content sent without its chunk list (`held`) or as an edit of another (`base`) is
    /// refused: the receiver looks it up or rebuilds it itself (`WireContent::resolve`).
    fn try_from(wire: &WireContent) -> Result<Self, WireError> {
        if wire.held || wire.base.is_some() || !wire.copies.is_empty() {
            return Err(WireError::Invalid(format!(
                "content {} came without its whole chunk list",
                wire.hash
            )));
        }
        let mut offset = 0u64;
        let mut chunks = Vec::with_capacity(wire.chunks.len());
        for chunk in &wire.chunks {
            if chunk.len == 0 || chunk.len as usize > CHUNK_MAX {
                return Err(WireError::Invalid(format!(
                    "a chunk of {} bytes is outside the protocol's limits",
                    chunk.len
                )));
            }
            chunks.push(ChunkRef {
                hash: parse_hash(&chunk.hash)?,
                offset,
                len: chunk.len,
            });
            offset += u64::from(chunk.len);
        }
        if offset != wire.size {
            return Err(WireError::Invalid(format!(
                "chunks of content {} add up to {offset}, not {}",
                wire.hash, wire.size
            )));
        }
        named(parse_hash(&wire.hash)?, wire.size, chunks)
    }
}

/// A received chunk list with its claimed name, refused unless the name is the list's: a
/// content's name binds its chunks, so no sender can pass one content's chunks off as another.
pub(crate) fn named(
    hash: ContentHash,
    size: u64,
    chunks: Vec<ChunkRef>,
) -> Result<ChunkedContent, WireError> {
    if ChunkedContent::name_of(&chunks) != hash {
        return Err(WireError::Invalid(format!(
            "the chunk list sent for content {hash} names another content"
        )));
    }
    Ok(ChunkedContent { hash, size, chunks })
}

impl From<&VersionVector> for WireVector {
    fn from(vector: &VersionVector) -> Self {
        WireVector(
            vector
                .iter()
                .map(|(writer, tick)| WireDot {
                    replica: hex16(&writer.replica.0),
                    epoch: writer.epoch,
                    tick: *tick,
                })
                .collect(),
        )
    }
}

impl TryFrom<&WireVector> for VersionVector {
    type Error = WireError;
    fn try_from(wire: &WireVector) -> Result<Self, WireError> {
        wire.0.iter().map(Dot::try_from).collect()
    }
}

impl From<&Dot> for WireDot {
    fn from(dot: &Dot) -> Self {
        WireDot {
            replica: hex16(&dot.writer.replica.0),
            epoch: dot.writer.epoch,
            tick: dot.tick,
        }
    }
}

impl TryFrom<&WireDot> for Dot {
    type Error = WireError;
    fn try_from(wire: &WireDot) -> Result<Self, WireError> {
        if wire.tick == 0 {
            return Err(WireError::Invalid("tick 0 is not a write".into()));
        }
        Ok(Dot {
            writer: WriterId {
                replica: parse_replica(&wire.replica)?,
                epoch: wire.epoch,
            },
            tick: wire.tick,
        })
    }
}

impl WireVersion {
    /// The wire form of one item version.
    pub fn new(item: &ItemId, version: &Version) -> WireVersion {
        let entry = &version.entry;
        WireVersion {
            item: hex16(&item.0),
            dot: WireDot::from(&version.dot),
            context: WireKnowledge::from(&version.context),
            entry: WireEntry {
                parent: hex16(&entry.parent.0),
                name: entry.name.clone(),
                kind: match entry.kind {
                    ItemKind::File => "file".into(),
                    ItemKind::Directory => "directory".into(),
                },
                deleted: entry.deleted,
                content: entry.content.map(|c| hex32(&c.0)),
                size: entry.size,
                mtime_ns: entry.mtime_ns,
                executable: entry.executable,
            },
            written_at: version.written_at,
            device: version.device.clone(),
            user: version.user.clone(),
        }
    }

    /// The item id and version this describes. Names are not checked here: the layout refuses
    /// unstorable names where they would be written, and keeps the version.
    pub fn to_core(&self) -> Result<(ItemId, Version), WireError> {
        let kind = match self.entry.kind.as_str() {
            "file" => ItemKind::File,
            "directory" => ItemKind::Directory,
            other => return Err(WireError::Invalid(format!("unknown item kind {other:?}"))),
        };
        let content = self.entry.content.as_deref().map(parse_hash).transpose()?;
        if kind == ItemKind::File && !self.entry.deleted && content.is_none() {
            return Err(WireError::Invalid(
                "a live file needs a content hash".into(),
            ));
        }
        if self.entry.name.len() > 1024 || self.device.len() > 1024 || self.user.len() > 1024 {
            return Err(WireError::Invalid("name, device or user too long".into()));
        }
        let version = Version {
            dot: Dot::try_from(&self.dot)?,
            context: Knowledge::try_from(&self.context)?,
            entry: Entry {
                parent: parse_item(&self.entry.parent)?,
                name: self.entry.name.clone(),
                kind,
                deleted: self.entry.deleted,
                content,
                size: self.entry.size,
                mtime_ns: self.entry.mtime_ns,
                executable: self.entry.executable,
            },
            written_at: self.written_at,
            device: self.device.clone(),
            user: self.user.clone(),
        };
        Ok((parse_item(&self.item)?, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knowledge_and_versions_round_trip() -> Result<(), WireError> {
        let writer = WriterId {
            replica: ReplicaId([7; 16]),
            epoch: 2,
        };
        let mut knowledge = Knowledge::new();
        knowledge.add_vector(&[Dot { writer, tick: 3 }].into_iter().collect());
        knowledge.add(Dot { writer, tick: 9 });
        let wire = WireKnowledge::from(&knowledge);
        assert_eq!(Knowledge::try_from(&wire)?, knowledge);

        let version = Version {
            dot: Dot { writer, tick: 10 },
            context: knowledge.clone(),
            entry: Entry {
                parent: ItemId([1; 16]),
                name: "a.txt".into(),
                kind: ItemKind::File,
                deleted: false,
                content: Some(ContentHash([5; 32])),
                size: 4,
                mtime_ns: -3,
                executable: true,
            },
            written_at: 77,
            device: "laptop".into(),
            user: "alice".into(),
        };
        let wire = WireVersion::new(&ItemId([2; 16]), &version);
        let json = serde_json::to_string(&wire).map_err(|e| WireError::Invalid(e.to_string()))?;
        let back: WireVersion =
            serde_json::from_str(&json).map_err(|e| WireError::Invalid(e.to_string()))?;
        assert_eq!(back.to_core()?, (ItemId([2; 16]), version));
        Ok(())
    }

    #[test]
    fn a_chunk_list_must_name_its_content() -> Result<(), WireError> {
        let chunks = (0..3u8)
            .map(|i| ChunkRef {
                hash: ContentHash([i; 32]),
                offset: u64::from(i) * 100,
                len: 100,
            })
            .collect();
        let content = ChunkedContent::from_chunks(chunks);
        let wire = WireContent::from(&content);
        assert_eq!(ChunkedContent::try_from(&wire)?, content);
        let mut misnamed = wire.clone();
        misnamed.hash = ContentHash([9; 32]).to_string();
        assert!(ChunkedContent::try_from(&misnamed).is_err());
        let mut reordered = wire;
        reordered.chunks.swap(0, 1);
        assert!(ChunkedContent::try_from(&reordered).is_err());
        Ok(())
    }

    #[test]
    fn malformed_values_are_refused() {
        assert!(parse_item("xyz").is_err());
        assert!(parse_item(&"g".repeat(32)).is_err());
        let dot = WireDot {
            replica: "00".repeat(16),
            epoch: 0,
            tick: 0,
        };
        assert!(Dot::try_from(&dot).is_err());
    }
}
