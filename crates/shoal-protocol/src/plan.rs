//! Turning planned batches into wire batches: the part of serving a download that every
//! server (hub or peer) shares.

use std::collections::HashSet;

use shoal_core::{Batch, ChunkedContent, ContentHash};

use crate::{Location, WireBatch, WireContent, WireKnowledge, WireVector, WireVersion};

/// The wire form of `planned`: each batch with the chunk lists of its contents (each content
/// once per batch, looked up with `content`, or only named when the receiver said it `held` it,
/// or sent as an edit of one of the held contents `bases` offers for it), the transport
/// `locations`, and the URI of the next batch (`next_uri(index)`).
pub fn wire_batches<E>(
    planned: Vec<Batch>,
    mut content: impl FnMut(&ContentHash) -> Result<Option<ChunkedContent>, E>,
    mut bases: impl FnMut(&ChunkedContent) -> Result<Vec<ChunkedContent>, E>,
    held: &HashSet<ContentHash>,
    locations: &[Location],
    next_uri: impl Fn(usize) -> String,
) -> Result<Vec<WireBatch>, E> {
    let count = planned.len();
    planned
        .iter()
        .enumerate()
        .map(|(index, batch)| {
            let next = (index + 1 < count).then(|| next_uri(index + 1));
            wire_batch(batch, &mut content, &mut bases, held, locations, next)
        })
        .collect()
}

/// The wire form of one planned batch (see `wire_batches`), whose successor is at `next`. A
/// server that keeps a long plan converts each batch only when it is asked for.
pub fn wire_batch<E>(
    batch: &Batch,
    mut content: impl FnMut(&ContentHash) -> Result<Option<ChunkedContent>, E>,
    mut bases: impl FnMut(&ChunkedContent) -> Result<Vec<ChunkedContent>, E>,
    held: &HashSet<ContentHash>,
    locations: &[Location],
    next: Option<String>,
) -> Result<WireBatch, E> {
    let mut contents = Vec::new();
    for (hash, size) in batch.contents() {
        if held.contains(&hash) {
            // The receiver holds its chunk list: name it only.
            contents.push(WireContent::held(&hash, size));
        } else if let Some(found) = content(&hash)? {
            let candidates = if held.is_empty() || found.chunks.len() < crate::DELTA_MIN_CHUNKS {
                Vec::new()
            } else {
                bases(&found)?
            };
            contents.push(WireContent::encode(&found, &candidates));
        }
    }
    Ok(WireBatch {
        versions: wire_versions(batch),
        contents,
        locations: locations.to_vec(),
        learned: WireKnowledge::from(&batch.learned),
        last: batch.last,
        forgotten: WireVector::from(&batch.forgotten),
        next,
    })
}

/// A tag naming a set of refusals (version and reason): equal sets, equal tags, whatever the
/// order they are listed in. Hub and device compare it to know whether the device must fetch
/// the hub's list.
pub fn refusals_tag<'a>(refusals: impl IntoIterator<Item = (shoal_core::Dot, &'a str)>) -> String {
    let mut entries: Vec<(shoal_core::Dot, &str)> = refusals.into_iter().collect();
    entries.sort();
    entries.dedup();
    let mut hasher = blake3::Hasher::new_derive_key("shoal refusals v1");
    for (dot, reason) in entries {
        hasher.update(&dot.writer.replica.0);
        hasher.update(&dot.writer.epoch.to_le_bytes());
        hasher.update(&dot.tick.to_le_bytes());
        hasher.update(&(reason.len() as u64).to_le_bytes());
        hasher.update(reason.as_bytes());
    }
    hasher.finalize().to_hex()[..32].to_owned()
}

/// `REPLICA:EPOCH:TICK`, the form a version takes in a path.
pub fn dot_path(dot: &shoal_core::Dot) -> String {
    format!("{}:{}:{}", dot.writer.replica, dot.writer.epoch, dot.tick)
}

/// Reads [`dot_path`]'s form.
pub fn parse_dot_path(text: &str) -> Result<shoal_core::Dot, crate::WireError> {
    let mut parts = text.split(':');
    let (Some(replica), Some(epoch), Some(tick), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(crate::WireError::Invalid(format!(
            "{text:?} is not a version (REPLICA:EPOCH:TICK)"
        )));
    };
    let bad = |what: &str| crate::WireError::Invalid(format!("bad {what} in {text:?}"));
    let dot = shoal_core::Dot {
        writer: shoal_core::WriterId {
            replica: crate::parse_replica(replica)?,
            epoch: epoch.parse().map_err(|_| bad("epoch"))?,
        },
        tick: tick.parse().map_err(|_| bad("tick"))?,
    };
    if dot.tick == 0 {
        return Err(bad("tick"));
    }
    Ok(dot)
}

fn wire_versions(batch: &Batch) -> Vec<WireVersion> {
    batch
        .versions
        .iter()
        .map(|(id, v)| WireVersion::new(id, v))
        .collect()
}

/// The wire form of a batch being uploaded with `contents`. The receiver learns the sender's
/// whole knowledge only from the last batch of a session in which nothing was held back or
/// failed (`whole`); otherwise just the dots the batch carries.
pub fn upload_batch(batch: &Batch, contents: Vec<WireContent>, whole: bool) -> crate::UploadBatch {
    let learned = if batch.last && whole {
        batch.learned.clone()
    } else {
        batch.carried()
    };
    crate::UploadBatch {
        versions: wire_versions(batch),
        contents,
        learned: WireKnowledge::from(&learned),
        last: batch.last,
    }
}

/// The contents a caller says it holds (`DownloadRequest.held`, `ContentsKnown`): at most
/// `HELD_MAX`, each a 64-hex hash.
pub fn parse_held(list: &[String]) -> Result<HashSet<ContentHash>, crate::WireError> {
    if list.len() > crate::HELD_MAX {
        return Err(crate::WireError::Invalid(format!(
            "{} contents named; at most {}",
            list.len(),
            crate::HELD_MAX
        )));
    }
    list.iter()
        .map(|h| crate::parse_hash(h))
        .collect::<Result<_, _>>()
}

/// Most bytes a chunk bundle (`POST …/chunks`) may carry.
pub const CHUNK_BUNDLE_MAX: usize = 16 << 20;

/// A bundle frame's header: the chunk's BLAKE3 hash (32 bytes) and its length (4 bytes).
pub const FRAME_HEADER: usize = 36;

/// The bytes a chunk of `len` bytes takes in a bundle, header included.
pub fn frame_len(len: u32) -> usize {
    FRAME_HEADER + len as usize
}

/// Appends one chunk to a bundle: its BLAKE3 hash (32 bytes), its length (4 bytes, big
/// endian), its bytes.
pub fn bundle_chunk(bundle: &mut Vec<u8>, hash: &shoal_core::ContentHash, bytes: &[u8]) {
    bundle_frame_header(bundle, hash, bytes.len() as u32);
    bundle.extend_from_slice(bytes);
}

/// Appends the frame of a chunk of `len` bytes with its bytes zeroed, to be read into in
/// place; returns where its bytes start.
pub fn bundle_frame(bundle: &mut Vec<u8>, hash: &shoal_core::ContentHash, len: u32) -> usize {
    bundle_frame_header(bundle, hash, len);
    let at = bundle.len();
    bundle.resize(at + len as usize, 0);
    at
}

/// Appends only the header of a chunk's frame: its `len` bytes are to be appended next.
pub fn bundle_frame_header(bundle: &mut Vec<u8>, hash: &shoal_core::ContentHash, len: u32) {
    bundle.extend_from_slice(&hash.0);
    bundle.extend_from_slice(&len.to_be_bytes());
}

/// The chunk hash and length a bundle frame's header (`FRAME_HEADER` bytes) announces,
/// checked against the chunk size limit.
pub fn frame_header(header: &[u8]) -> Result<(shoal_core::ContentHash, usize), crate::WireError> {
    let (Some(hash), Some(len)) = (header.get(..32), header.get(32..FRAME_HEADER)) else {
        return Err(crate::WireError::Invalid(format!(
            "a chunk bundle ends inside a frame header ({} bytes left)",
            header.len()
        )));
    };
    let mut name = [0u8; 32];
    name.copy_from_slice(hash);
    let mut be = [0u8; 4];
    be.copy_from_slice(len);
    let len = u32::from_be_bytes(be) as usize;
    if len == 0 || len > shoal_core::CHUNK_MAX {
        return Err(crate::WireError::Invalid(format!(
            "a chunk of {len} bytes: chunks are 1 to {} bytes",
            shoal_core::CHUNK_MAX
        )));
    }
    Ok((shoal_core::ContentHash(name), len))
}

/// The chunks of a bundle, each checked against its hash and the chunk size limit; any fault
/// rejects the whole bundle.
pub fn unbundle_chunks(
    body: &[u8],
) -> Result<Vec<(shoal_core::ContentHash, &[u8])>, crate::WireError> {
    let bad = |why: String| crate::WireError::Invalid(why);
    let mut chunks = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (hash, len) = frame_header(rest)?;
        let Some(bytes) = rest.get(FRAME_HEADER..FRAME_HEADER + len) else {
            return Err(bad("a chunk bundle ends inside a chunk".into()));
        };
        if shoal_core::ContentHash::of(bytes) != hash {
            return Err(bad(format!("chunk {hash} does not match its bytes")));
        }
        chunks.push((hash, bytes));
        rest = &rest[FRAME_HEADER + len..];
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_round_trip_and_reject_any_fault() {
        let (a, b) = (b"first chunk".as_slice(), vec![7u8; 70_000]);
        let mut bundle = Vec::new();
        bundle_chunk(&mut bundle, &shoal_core::ContentHash::of(a), a);
        bundle_chunk(&mut bundle, &shoal_core::ContentHash::of(&b), &b);
        let back = unbundle_chunks(&bundle).expect("a good bundle");
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].1, b.as_slice());
        let mut tampered = bundle.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(unbundle_chunks(&tampered).is_err());
        assert!(unbundle_chunks(&bundle[..bundle.len() - 1]).is_err());
        assert!(unbundle_chunks(&bundle[..20]).is_err());
        assert_eq!(unbundle_chunks(&[]).map(|c| c.len()).ok(), Some(0));
    }
}
