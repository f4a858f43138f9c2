//! A small canonical binary encoding for knowledge and versions.
//!
//! The core needs one byte form that is the same everywhere: the compact knowledge is a hash of
//! it, and the store persists versions with it. Unsigned varints, length-prefixed strings.

use crate::ids::{Dot, ItemId, ReplicaId, WriterId};

/// Writes the canonical encoding.
#[derive(Default)]
pub struct Encoder {
    bytes: Vec<u8>,
}

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("input ends early")]
    Truncated,
    /// A value is out of range or inconsistent.
    #[error("invalid encoding: {0}")]
    Invalid(&'static str),
    /// Bytes remain after the value.
    #[error("trailing bytes after the value")]
    Trailing,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }
    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
    /// An unsigned LEB128 varint.
    pub fn uvarint(&mut self, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.bytes.push(byte);
                return;
            }
            self.bytes.push(byte | 0x80);
        }
    }
    /// A signed varint (zig-zag).
    pub fn ivarint(&mut self, value: i64) {
        self.uvarint(((value << 1) ^ (value >> 63)) as u64);
    }
    /// Raw bytes of known length.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
    /// A length-prefixed string.
    pub fn string(&mut self, text: &str) {
        self.uvarint(text.len() as u64);
        self.raw(text.as_bytes());
    }
    /// A writer id.
    pub fn writer(&mut self, writer: &WriterId) {
        self.raw(&writer.replica.0);
        self.uvarint(u64::from(writer.epoch));
    }
    /// A dot.
    pub fn dot(&mut self, dot: &Dot) {
        self.writer(&dot.writer);
        self.uvarint(dot.tick);
    }
    /// An item id.
    pub fn item(&mut self, item: &ItemId) {
        self.raw(&item.0);
    }
}

/// Reads the canonical encoding.
pub struct Decoder<'a> {
    bytes: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// Reads from `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Decoder { bytes }
    }
    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing)
        }
    }
    /// An unsigned varint.
    pub fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first().ok_or(DecodeError::Truncated)?;
            self.bytes = rest;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Invalid("varint overflow"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid("varint too long"))
    }
    /// A signed varint.
    pub fn ivarint(&mut self) -> Result<i64, DecodeError> {
        let raw = self.uvarint()?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }
    /// A count that must fit in the remaining input (one byte per element at least).
    pub fn length(&mut self) -> Result<usize, DecodeError> {
        let count = self.uvarint()?;
        if count > self.bytes.len() as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(count as usize)
    }
    /// `N` raw bytes.
    pub fn raw<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        if self.bytes.len() < N {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(N);
        self.bytes = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }
    /// A length-prefixed UTF-8 string.
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.length()?;
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        String::from_utf8(head.to_vec()).map_err(|_| DecodeError::Invalid("string is not UTF-8"))
    }
    /// A writer id.
    pub fn writer(&mut self) -> Result<WriterId, DecodeError> {
        let replica = ReplicaId(self.raw()?);
        let epoch =
            u32::try_from(self.uvarint()?).map_err(|_| DecodeError::Invalid("epoch overflow"))?;
        Ok(WriterId { replica, epoch })
    }
    /// A dot.
    pub fn dot(&mut self) -> Result<Dot, DecodeError> {
        let writer = self.writer()?;
        let tick = self.uvarint()?;
        if tick == 0 {
            return Err(DecodeError::Invalid("tick 0 is not a write"));
        }
        Ok(Dot { writer, tick })
    }
    /// An item id.
    pub fn item(&mut self) -> Result<ItemId, DecodeError> {
        Ok(ItemId(self.raw()?))
    }
}
