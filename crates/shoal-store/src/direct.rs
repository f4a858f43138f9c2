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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::chunks::OneWriter;

/// Offsets, lengths and buffer addresses of direct writes are multiples of this (the largest
/// logical block size in common use, and the page size).
const ALIGN: u64 = 4096;

/// Direct writes and reads go through a scratch buffer of this size, one per thread at a
/// time. A device fetches about 1 MiB at a time (plus at most one largest chunk), and a
/// direct write waits for the disk, so each should be as long as the piece: 256 KiB slices
/// made W2 and W4 p2p 0.1-0.2 s slower.
const SLICE: usize = (1 << 20) + (256 << 10);

/// At most this many scratch buffers per file. Four were no faster (W4's rebuild, blocks
/// preallocated), and each buffer is memory a transfer holds.
const SCRATCH_MAX: usize = 2;

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
    /// Aligned scratch buffers (`SLICE`), at most `SCRATCH_MAX`.
    scratch: Mutex<Scratch>,
    scratch_freed: Condvar,
}

impl LargeFile {
    /// Creates (or truncates) `path` at `size` bytes, ready for pieces.
    pub fn create(path: &Path, size: u64) -> io::Result<LargeFile> {
        Self::sized(path, File::create(path)?, size)
    }

    /// Opens the existing `path` for more pieces, keeping its bytes (sized to `size`).
    pub fn reopen(path: &Path, size: u64) -> io::Result<LargeFile> {
        Self::sized(path, OpenOptions::new().write(true).open(path)?, size)
    }

    fn sized(path: &Path, file: File, size: u64) -> io::Result<LargeFile> {
        file.set_len(size)?;
        // Its blocks taken now: ext4 lets one direct write at a time into a file's holes (and
        // holds the others while the disk works), but runs aligned ones into blocks already
        // taken side by side. W4's rebuild of 512 MiB took about 0.09 s less. A filesystem
        // that cannot preallocate keeps the sparse file.
        let _ = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size);
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
            scratch: Mutex::new(Scratch::default()),
            scratch_freed: Condvar::new(),
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
        let scratch = aligned(&mut buffer, SLICE);
        let mut result = Ok(());
        let mut at = lo;
        while result.is_ok() && at < hi {
            let body = &mut scratch[..(hi - at).min(SLICE as u64) as usize];
            gather(parts, at - offset, body);
            result = self.write_direct(direct, body, at);
            at += body.len() as u64;
        }
        self.give_back(buffer);
        if result.is_err() {
            // Refused (an alignment this filesystem does not take): the cache takes it all.
            self.direct_failed.store(true, Ordering::Relaxed);
            return self.buffered.write_parts_at(&self.file, parts, offset);
        }
        self.write_edge(parts, 0, lo - offset, offset)?;
        self.write_edge(parts, hi - offset, len, hi)
    }

    /// Writes `piece` at its offset: its whole blocks straight from its buffer to the disk,
    /// without a copy.
    pub fn write_piece(&self, piece: &Piece) -> io::Result<()> {
        let (offset, len) = (piece.offset, piece.len as u64);
        let end = offset + len;
        let (lo, hi) = (offset.next_multiple_of(ALIGN), end / ALIGN * ALIGN);
        let bytes = piece.bytes();
        let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| hi > lo && !self.direct_off())
        else {
            return self.buffered.write_parts_at(&self.file, &[bytes], offset);
        };
        let index = |position: u64| (position - offset) as usize;
        if self
            .write_direct(direct, &bytes[index(lo)..index(hi)], lo)
            .is_err()
        {
            self.direct_failed.store(true, Ordering::Relaxed);
            return self.buffered.write_parts_at(&self.file, &[bytes], offset);
        }
        self.write_cached(&bytes[..index(lo)], offset)?;
        self.write_cached(&bytes[index(hi)..], hi)
    }

    /// Copies `len` bytes at `from` in the file at `source` to `to` in this file, reading
    /// and writing around the page cache: a large file rebuilt from the earlier version of
    /// itself moves its unchanged bytes without a copy through this process's cache pages.
    /// Only where both sides lie alike within their blocks (a file changed in place, not
    /// shifted by an insertion), since the bytes are written from where they were read. False
    /// when they could not be copied this way, in part or at all (the caller copies them
    /// otherwise).
    pub fn copy_in(&self, source: &Path, from: u64, len: u64, to: u64) -> bool {
        let Some(direct) = self.direct.as_ref().filter(|_| !self.direct_off()) else {
            return false;
        };
        if len == 0 || from % ALIGN != to % ALIGN {
            return false;
        }
        let Ok(reader) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(source)
        else {
            return false;
        };
        let mut buffer = self.take_scratch();
        let cover = aligned(&mut buffer, SLICE + ALIGN as usize);
        let mut done = 0;
        let mut result = Ok(true);
        while done < len && matches!(result, Ok(true)) {
            let (at, dest) = (from + done, to + done);
            let skip = at % ALIGN;
            let take = (len - done).min(SLICE as u64);
            let stop = (at + take).next_multiple_of(ALIGN);
            let cover = &mut cover[..(stop - (at - skip)) as usize];
            if !read_direct(&reader, cover, at - skip, (skip + take) as usize) {
                result = Ok(false);
                break;
            }
            // Byte `dest + i` of this file is byte `skip + i` of `cover`, whose blocks line up
            // with the file's.
            let (lo, hi) = (dest.next_multiple_of(ALIGN), (dest + take) / ALIGN * ALIGN);
            let index = |position: u64| (position - dest + skip) as usize;
            result = if hi > lo {
                self.write_direct(direct, &cover[index(lo)..index(hi)], lo)
                    .and_then(|()| {
                        self.write_cached(&cover[index(dest)..index(lo)], dest)?;
                        self.write_cached(&cover[index(hi)..index(dest + take)], hi)
                    })
            } else {
                self.write_cached(&cover[index(dest)..index(dest + take)], dest)
            }
            .map(|()| true);
            done += take;
        }
        self.give_back(buffer);
        result.unwrap_or_else(|_| {
            // Refused: later pieces go through the cache.
            self.direct_failed.store(true, Ordering::Relaxed);
            false
        })
    }

    fn write_cached(&self, bytes: &[u8], at: u64) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.buffered.write_parts_at(&self.file, &[bytes], at)
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

    /// Writes bytes `from..to` of the concatenated `parts`, less than a block, at `at`
    /// through the cache.
    fn write_edge(&self, parts: &[&[u8]], from: u64, to: u64, at: u64) -> io::Result<()> {
        let mut edge = [0u8; ALIGN as usize];
        let edge = &mut edge[..(to - from) as usize];
        gather(parts, from, edge);
        self.write_cached(edge, at)
    }

    /// A scratch buffer, waiting for one when `SCRATCH_MAX` are in use.
    fn take_scratch(&self) -> Vec<u8> {
        let mut pool = self
            .scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(buffer) = pool.free.pop() {
                return buffer;
            }
            if pool.made < SCRATCH_MAX {
                pool.made += 1;
                return Vec::new();
            }
            pool = self
                .scratch_freed
                .wait(pool)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn give_back(&self, buffer: Vec<u8>) {
        self.scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .free
            .push(buffer);
        self.scratch_freed.notify_one();
    }
}

/// A piece of a large file put together in memory before it is written
/// (`LargeFile::write_piece`). Its bytes lie alike within their blocks in memory and in the
/// file, so its whole blocks can go to the disk from where they are. One buffer serves piece
/// after piece.
#[derive(Debug, Default)]
pub struct Piece {
    buffer: Vec<u8>,
    /// Where byte `offset` of the file lies in `buffer`.
    start: usize,
    offset: u64,
    len: usize,
}

impl Piece {
    /// Makes this the piece of `len` bytes at `offset` (its bytes are left as they were).
    pub fn reset(&mut self, offset: u64, len: usize) {
        let need = len + 2 * ALIGN as usize;
        if self.buffer.len() < need {
            self.buffer = vec![0u8; need];
        }
        // Less than ALIGN each, and the buffer holds 2 * ALIGN bytes more than asked.
        let block = self.buffer.as_ptr().align_offset(ALIGN as usize);
        self.start = block + (offset % ALIGN) as usize;
        self.offset = offset;
        self.len = len;
    }

    /// Where the piece starts in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The piece's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buffer[self.start..self.start + self.len]
    }

    /// The piece's bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buffer[self.start..self.start + self.len]
    }
}

/// The scratch buffers made, and those not in use.
#[derive(Debug, Default)]
struct Scratch {
    free: Vec<Vec<u8>>,
    made: usize,
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
/// buffer as needed.
fn aligned(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let need = len + ALIGN as usize;
    if buffer.len() < need {
        *buffer = vec![0u8; need];
    }
    // Less than ALIGN, and the buffer holds ALIGN bytes more than asked.
    let shift = buffer.as_ptr().align_offset(ALIGN as usize);
    &mut buffer[shift..shift + len]
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
    use crate::chunks::tests::pseudo_random;
    use std::fs;

    /// Whether `path`'s filesystem takes direct writes.
    fn takes_direct_writes(path: &Path) -> bool {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .is_ok()
    }

    #[test]
    fn a_large_file_takes_its_blocks_when_made() -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir()?;
        let probe = File::create(dir.path().join("probe"))?;
        let flags = rustix::fs::FallocateFlags::empty();
        if rustix::fs::fallocate(&probe, flags, 0, 4096).is_err() {
            return Ok(()); // this filesystem cannot preallocate: nothing to check
        }
        let size = 8u64 << 20;
        let path = dir.path().join("large");
        let _file = LargeFile::create(&path, size)?;
        let taken = fs::metadata(&path)?.blocks() * 512;
        assert!(taken >= size, "{taken} bytes taken of {size}");
        Ok(())
    }

    /// Cuts `len` bytes into pieces of odd sizes at odd offsets, in a scrambled order.
    fn scrambled_pieces(len: usize) -> Vec<(usize, usize)> {
        let mut cuts = vec![0usize];
        let mut at = 0;
        let sizes = [1, 4095, 4096, 4097, 70_001, 300_000, 8191, 1_048_576, 12];
        for size in sizes.iter().cycle() {
            at += size;
            if at >= len {
                break;
            }
            cuts.push(at);
        }
        cuts.push(len);
        let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        pieces.reverse();
        let third = pieces.len() / 3;
        pieces.rotate_left(third);
        pieces
    }

    /// Writes `data` into a new large file at `path` piece by piece (odd sizes at odd
    /// offsets, in a scrambled order) from `threads` threads, each with its own `state`, and
    /// flushes it.
    fn write_scrambled<S>(
        path: &Path,
        data: &[u8],
        threads: usize,
        state: impl Fn() -> S + Sync,
        write: impl Fn(&LargeFile, &mut S, usize, usize) + Sync,
    ) -> io::Result<LargeFile> {
        let pieces = scrambled_pieces(data.len());
        let file = LargeFile::create(path, data.len() as u64)?;
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let mut own = state();
                    while let Some(&(from, to)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                        write(&file, &mut own, from, to);
                    }
                });
            }
        });
        file.file().sync_all()?;
        Ok(file)
    }

    /// Pieces put together in memory, one buffer per thread reused at every alignment, land
    /// whole: their blocks from where they lie, their edges through the cache.
    #[test]
    fn pieces_put_together_in_memory_land_whole() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("big.part");
        let data = pseudo_random(3 * 1024 * 1024 + 12_345, 9);
        let file = write_scrambled(&path, &data, 3, Piece::default, |file, piece, from, to| {
            piece.reset(from as u64, to - from);
            piece.bytes_mut().copy_from_slice(&data[from..to]);
            file.write_piece(piece).expect("write");
        })?;
        // A misaligned block would have been refused and everything sent through the cache.
        assert_eq!(
            file.direct.is_some() && !file.direct_off(),
            takes_direct_writes(&path)
        );
        assert_eq!(fs::read(&path)?, data);
        Ok(())
    }

    /// Pieces of odd sizes at odd offsets, written by several threads in a scrambled order,
    /// some split into several parts: the file holds exactly the bytes, edges included.
    #[test]
    fn pieces_written_in_any_order_make_the_whole_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("big.part");
        let data = pseudo_random(3 * 1024 * 1024 + 12_345, 7);
        write_scrambled(
            &path,
            &data,
            4,
            || (),
            |file, (), from, to| {
                let middle = from + (to - from) / 3;
                let parts = [&data[from..middle], &data[middle..to]];
                file.write_parts_at(&parts, from as u64).expect("write");
            },
        )?;
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
        let data = pseudo_random(1 << 20, 3);
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

    /// A run of an earlier file copied in at another offset, starting and ending inside
    /// blocks; a run shifted within its blocks is left to the caller.
    #[test]
    fn a_run_copied_in_from_another_file_lands_where_asked()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let earlier = dir.path().join("earlier");
        let old = pseudo_random(2 << 20, 11);
        fs::write(&earlier, &old)?;
        let path = dir.path().join("big.part");
        let size = (3 << 20) as u64;
        let file = LargeFile::create(&path, size)?;
        let (from, len, to) = (12_345u64, 1_500_000u64, 12_345 + 100 * 4096);
        assert!(!file.copy_in(&earlier, from, len, to + 1));
        let copied = file.copy_in(&earlier, from, len, to);
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
        assert!(!file.copy_in(&earlier, (2 << 20) - 10, 100, 0));
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
