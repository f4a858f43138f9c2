//! Identifiers: replicas, items, writers and dots.
//!
//! Ids are opaque 128-bit values chosen by the caller (the core never draws randomness), so
//! tests can use small deterministic ids and real replicas use random ones.

use std::fmt;

/// One copy of one workspace on one device or hub.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(pub [u8; 16]);

/// A stable identity of a file, directory, record or message, surviving renames and moves.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ItemId(pub [u8; 16]);

/// Bumped whenever a replica is restored or reset, so that versions written after a restore
/// never reuse a dot that the pre-restore replica already handed out.
pub type Epoch = u32;

/// The key of every version vector entry: a replica in one epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriterId {
    /// The replica that wrote.
    pub replica: ReplicaId,
    /// The epoch the replica was in when it wrote.
    pub epoch: Epoch,
}

/// One write: the writer and its tick, which only grows within a writer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    /// Who wrote.
    pub writer: WriterId,
    /// The writer's counter at that write, starting at 1.
    pub tick: u64,
}

impl ItemId {
    /// The root directory of a workspace: the parent of every top-level item.
    pub const ROOT: ItemId = ItemId([0; 16]);

    /// A deterministic id derived from other data (used for items every replica must agree on).
    pub fn derived(context: &str, material: &[u8]) -> ItemId {
        let hash = blake3::derive_key(context, material);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash[..16]);
        ItemId(id)
    }

    /// The first six hex digits, for names a person reads.
    pub fn short(&self) -> String {
        hex(&self.0[..3])
    }
}

impl ReplicaId {
    /// The first eight hex digits, for logs and conflict names.
    pub fn short(&self) -> String {
        hex(&self.0[..4])
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 32 hex digits into 16 bytes.
pub fn parse_hex16(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}
impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "R{}", self.short())
    }
}
impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}
impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "I{}", self.short())
    }
}
impl fmt::Debug for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}.{}", self.replica, self.epoch)
    }
}
impl fmt::Debug for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{}", self.writer, self.tick)
    }
}
