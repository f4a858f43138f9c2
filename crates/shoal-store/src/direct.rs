//! Large files written around the page cache.
//!
//! A large download's bytes are not read again soon, yet written through the page cache they
//! cost a copy into freshly allocated pages each, and on a virtual machine that hands freed
//! pages back to its host that copy can cost more than the disk write. Whole aligned blocks
//! therefore go straight to the disk (`O_DIRECT`); only the unaligned edges of each piece go
//! through the cache. Durability is unchanged: the file is still flushed before it is used.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::chunks::OneWriter;

/// Offsets, lengths and buffer addresses of direct writes are multiples of this (the largest
/// logical block size in common use, and the page size).
const ALIGN: u64 = 4096;

/// A file of known size written in pieces, in any order, from several threads.
#[derive(Debug)]
pub struct LargeFile {
    file: File,
    /// The same file opened for direct writes, while the filesystem accepts them.
    direct: Option<File>,
    direct_failed: AtomicBool,
    /// Edges (and everything, without direct writes) go through the cache one writer at a
    /// time.
    buffered: OneWriter,
    /// Aligned scratch buffers, one per thread writing at a time.
    scratch: Mutex<Vec<Vec<u8>>>,
}

impl LargeFile {
    /// Creates (or truncates) `path` at `size` bytes, ready for pieces.
    pub fn create(path: &Path, size: u64) -> io::Result<LargeFile> {
        let file = File::create(path)?;
        file.set_len(size)?;
        // Not every filesystem takes direct writes (tmpfs on older kernels, some FUSE ones):
        // then everything goes through the cache as before.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(LargeFile {
            file,
            direct,
            direct_failed: AtomicBool::new(false),
            buffered: OneWriter::default(),
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// The file, for flushing, copying into and reading back.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes `parts` one after another at `offset`.
    pub fn write_parts_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let end = offset + len;
        let (lo, hi) = (offset.next_multiple_of(ALIGN), end / ALIGN * ALIGN);
        let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| hi > lo && !self.direct_off())
        else {
            return self.buffered.write_parts_at(&self.file, parts, offset);
        };
        let mut buffer = self.take_scratch();
        let (body, fits) = aligned(&mut buffer, (hi - lo) as usize);
        let result = if fits {
            gather(parts, lo - offset, body);
            self.write_direct(direct, body, lo)
        } else {
            Err(io::ErrorKind::OutOfMemory.into())
        };
        self.give_back(buffer);
        if result.is_err() {
            // Refused (an alignment this filesystem does not take): the cache takes it all.
            self.direct_failed.store(true, Ordering::Relaxed);
            return self.buffered.write_parts_at(&self.file, parts, offset);
        }
        if lo > offset {
            self.write_slice(parts, 0, lo - offset, offset)?;
        }
        if end > hi {
            self.write_slice(parts, hi - offset, len, hi)?;
        }
        Ok(())
    }

    /// Copies `len` bytes at `from` in the file at `source` to `to` in this file, reading
    /// and writing around the page cache: a large file rebuilt from the earlier version of
    /// itself moves its unchanged bytes without a copy through this process's cache pages.
    /// False when the bytes could not be read that way (the caller copies them otherwise).
    pub fn copy_in(&self, source: &Path, from: u64, len: u64, to: u64) -> io::Result<bool> {
        if self.direct.is_none() || self.direct_off() || len == 0 {
            return Ok(false);
        }
        let Ok(reader) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(source)
        else {
            return Ok(false);
        };
        let start = from / ALIGN * ALIGN;
        let stop = (from + len).next_multiple_of(ALIGN);
        let mut buffer = self.take_scratch();
        let (cover, fits) = aligned(&mut buffer, (stop - start) as usize);
        let skip = (from - start) as usize;
        let read = fits && read_direct(&reader, cover, start, skip + len as usize);
        let result = if read {
            self.write_parts_at(&[&cover[skip..skip + len as usize]], to)
                .map(|()| true)
        } else {
            Ok(false)
        };
        self.give_back(buffer);
        result
    }

    fn direct_off(&self) -> bool {
        self.direct_failed.load(Ordering::Relaxed)
    }

    fn write_direct(&self, direct: &File, mut body: &[u8], mut at: u64) -> io::Result<()> {
        while !body.is_empty() {
            let written = direct.write_at(body, at)?;
            // A short direct write ends on a block boundary or not at all.
            if written == 0 || !(written as u64).is_multiple_of(ALIGN) {
                return Err(io::ErrorKind::WriteZero.into());
            }
            body = &body[written..];
            at += written as u64;
        }
        Ok(())
    }

    /// Writes bytes `from..to` of the concatenated `parts` at `at`, through the cache.
    fn write_slice(&self, parts: &[&[u8]], from: u64, to: u64, at: u64) -> io::Result<()> {
        let mut piece = vec![0u8; (to - from) as usize];
        gather(parts, from, &mut piece);
        self.buffered.write_parts_at(&self.file, &[&piece], at)
    }

    fn take_scratch(&self) -> Vec<u8> {
        self.scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    fn give_back(&self, buffer: Vec<u8>) {
        self.scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(buffer);
    }
}

/// Fills `cover` from `at` with direct reads; true once at least `need` bytes arrived (the
/// last block may run past the end of the file).
fn read_direct(reader: &File, cover: &mut [u8], mut at: u64, need: usize) -> bool {
    let mut got = 0;
    while got < need {
        match reader.read_at(&mut cover[got..], at) {
            Ok(0) | Err(_) => return false,
            Ok(read) => {
                got += read;
                at += read as u64;
                // Past a short read the next one would start unaligned.
                if !(read as u64).is_multiple_of(ALIGN) && got < need {
                    return false;
                }
            }
        }
    }
    true
}

/// `len` bytes of `buffer` starting at an address that is a multiple of `ALIGN`, growing the
/// buffer as needed; false when the length cannot be had.
fn aligned(buffer: &mut Vec<u8>, len: usize) -> (&mut [u8], bool) {
    let need = len + ALIGN as usize;
    if buffer.len() < need {
        // A fresh buffer: its address, and so the shift, is settled once it stops growing.
        *buffer = vec![0u8; need];
    }
    let shift = buffer.as_ptr().align_offset(ALIGN as usize);
    match buffer.get_mut(shift..shift + len) {
        Some(body) => (body, true),
        None => (&mut [], false),
    }
}

/// Copies bytes `from..from + out.len()` of the concatenated `parts` into `out`.
fn gather(parts: &[&[u8]], from: u64, out: &mut [u8]) {
    let mut skip = from as usize;
    let mut filled = 0;
    for part in parts {
        if filled == out.len() {
            break;
        }
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        let take = (part.len() - skip).min(out.len() - filled);
        out[filled..filled + take].copy_from_slice(&part[skip..skip + take]);
        filled += take;
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Whether `path`'s filesystem takes direct writes.
    fn takes_direct_writes(path: &Path) -> bool {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .is_ok()
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Pieces of odd sizes at odd offsets, written by several threads in a scrambled order,
    /// some split into several parts: the file holds exactly the bytes, edges included.
    #[test]
    fn pieces_written_in_any_order_make_the_whole_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("big.part");
        let data = noise(3 * 1024 * 1024 + 12_345, 7);
        let mut cuts = vec![0usize];
        let mut at = 0;
        let sizes = [1, 4095, 4096, 4097, 70_001, 300_000, 8191, 1_048_576, 12];
        for size in sizes.iter().cycle() {
            at += size;
            if at >= data.len() {
                break;
            }
            cuts.push(at);
        }
        cuts.push(data.len());
        let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        pieces.reverse();
        let third = pieces.len() / 3;
        pieces.rotate_left(third);
        let file = LargeFile::create(&path, data.len() as u64)?;
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    while let Some(&(from, to)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let middle = from + (to - from) / 3;
                        let parts = [&data[from..middle], &data[middle..to]];
                        file.write_parts_at(&parts, from as u64).expect("write");
                    }
                });
            }
        });
        file.file().sync_all()?;
        assert_eq!(fs::read(&path)?, data);
        Ok(())
    }

    /// Where the filesystem takes direct writes, an aligned piece's body bypasses the cache
    /// (the test's own check that the direct path is the one taken here).
    #[test]
    fn the_direct_path_is_taken_where_the_filesystem_allows_it()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("big.part");
        let data = noise(1 << 20, 3);
        let file = LargeFile::create(&path, data.len() as u64 + 100)?;
        file.write_parts_at(&[&data[..100]], 0)?;
        file.write_parts_at(&[&data[100..]], 100)?;
        file.write_parts_at(&[&[9u8; 100]], data.len() as u64)?;
        let direct = takes_direct_writes(&path);
        assert_eq!(file.direct.is_some() && !file.direct_off(), direct);
        let mut expected = data.clone();
        expected.extend_from_slice(&[9u8; 100]);
        assert_eq!(fs::read(&path)?, expected);
        Ok(())
    }

    /// A run of an earlier file copied in at another offset, unaligned on both sides.
    #[test]
    fn a_run_copied_in_from_another_file_lands_where_asked()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let earlier = dir.path().join("earlier");
        let old = noise(2 << 20, 11);
        fs::write(&earlier, &old)?;
        let path = dir.path().join("big.part");
        let size = (3 << 20) as u64;
        let file = LargeFile::create(&path, size)?;
        let (from, len, to) = (12_345u64, 1_500_000u64, 777_777u64);
        let copied = file.copy_in(&earlier, from, len, to)?;
        assert_eq!(copied, takes_direct_writes(&path));
        if !copied {
            return Ok(());
        }
        let written = fs::read(&path)?;
        assert_eq!(
            &written[to as usize..(to + len) as usize],
            &old[from as usize..(from + len) as usize]
        );
        assert!(written[..to as usize].iter().all(|b| *b == 0));
        // Past the end of the earlier file there is nothing to copy.
        assert!(!file.copy_in(&earlier, (2 << 20) - 10, 100, 0)?);
        Ok(())
    }

    #[test]
    fn gather_takes_a_range_across_parts() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let mut out = [0u8; 4];
        gather(&parts, 2, &mut out);
        assert_eq!(&out, b"cdef");
    }
}
