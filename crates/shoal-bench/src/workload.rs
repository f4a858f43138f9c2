//! The workloads of issue #6, generated from a seed: the same seed gives the same bytes on
//! every run. The shapes are those of the team's peer benchmark (`../shared/bench`,
//! `pb_workloads.py`): W1 10,000 × 4 KiB in 100 folders, W1L 50,000 × 4 KiB in 500, W2 one
//! 512 MiB file; W3 rewrites 3 small files in place and adds 1; W4 overwrites the middle MiB
//! of the big file in place. The bytes differ from the peers' (they come from Python's
//! generator); every byte is random either way, so neither tool can compress or deduplicate.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::rng::Rng;

/// Bytes of each small file.
pub(crate) const SMALL: usize = 4096;
/// Small files per folder.
pub(crate) const FILES_PER_DIR: usize = 100;
/// Bytes of the big file (W2).
pub(crate) const BIG_SIZE: u64 = 512 * 1024 * 1024;
/// Bytes overwritten by W4.
pub(crate) const DELTA: usize = 1024 * 1024;
/// The big file's name.
pub(crate) const BIG_NAME: &str = "big.bin";

/// A seeded data set that a scenario starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Data {
    /// 10,000 × 4 KiB in 100 folders.
    W1,
    /// 50,000 × 4 KiB in 500 folders.
    W1l,
    /// One 512 MiB file, `big.bin`.
    W2,
}

impl Data {
    /// Its name, also the name of its folder under the data directory.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Data::W1 => "w1",
            Data::W1l => "w1l",
            Data::W2 => "w2",
        }
    }

    /// How many regular files it holds.
    pub(crate) fn files(self) -> u64 {
        match self {
            Data::W1 => 10_000,
            Data::W1l => 50_000,
            Data::W2 => 1,
        }
    }

    /// How many bytes its files hold in all.
    pub(crate) fn bytes(self) -> u64 {
        match self {
            Data::W1 | Data::W1l => self.files() * SMALL as u64,
            Data::W2 => BIG_SIZE,
        }
    }

    /// The seed used unless another is given (the peer benchmark's numbers: 1, 2, 3).
    pub(crate) fn default_seed(self) -> u64 {
        match self {
            Data::W1 => 1,
            Data::W1l => 2,
            Data::W2 => 3,
        }
    }
}

/// The relative paths of a small-file tree of `files` files: `d000/f0000.bin` onwards, 100 per
/// folder, in the order their bytes are drawn.
pub(crate) fn small_paths(files: u64) -> Vec<String> {
    let per_dir = FILES_PER_DIR as u64;
    (0..files)
        .map(|i| format!("d{:03}/f{:04}.bin", i / per_dir, i % per_dir))
        .collect()
}

/// Writes data set `data` from `seed` into `dir` (created; it must not hold other files of the
/// same names). The same seed always writes the same bytes.
pub(crate) fn generate(data: Data, seed: u64, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = Rng::new(seed);
    match data {
        Data::W1 | Data::W1l => {
            let mut buf = vec![0u8; SMALL];
            for rel in small_paths(data.files()) {
                let path = dir.join(&rel);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)?;
                }
                rng.fill(&mut buf);
                fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Data::W2 => {
            let path = dir.join(BIG_NAME);
            let file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let mut out = BufWriter::with_capacity(DELTA, file);
            let mut buf = vec![0u8; DELTA];
            let mut left = BIG_SIZE;
            while left > 0 {
                let n = usize::try_from(left.min(DELTA as u64))?;
                rng.fill(&mut buf[..n]);
                out.write_all(&buf[..n])?;
                left -= n as u64;
            }
            out.flush()?;
        }
    }
    Ok(())
}

/// The data set `data` under `root` (`root/<name>`), generated once: a marker file
/// `root/<name>.done` records the seed and shape, and the set is made again only when the
/// marker is missing or says something else.
pub(crate) fn ensure(root: &Path, data: Data, seed: u64) -> Result<PathBuf> {
    let dir = root.join(data.name());
    let marker = root.join(format!("{}.done", data.name()));
    let want = format!(
        "seed {seed} files {} bytes {} generator xoshiro256**/splitmix64\n",
        data.files(),
        data.bytes()
    );
    if fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) && dir.is_dir() {
        return Ok(dir);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    generate(data, seed, &dir)?;
    fs::write(&marker, want)?;
    Ok(dir)
}

/// One file a W3 change writes: its path relative to the tree and its new bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    /// Relative path, `/`-separated.
    pub(crate) rel: String,
    /// The bytes it holds afterwards.
    pub(crate) data: Vec<u8>,
}

/// W3 on a tree of `files` small files: 3 distinct existing files get new random content and
/// one new file `d000/new_<tag>.bin` is added. Drawn from `seed` (outside the timed window).
pub(crate) fn w3_changes(files: u64, seed: u64, tag: &str) -> Vec<Change> {
    let mut rng = Rng::new(seed);
    let names = small_paths(files);
    let mut picked: Vec<u64> = Vec::with_capacity(3);
    while picked.len() < 3 {
        let i = rng.below(files);
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    let mut changes: Vec<Change> = picked
        .into_iter()
        .filter_map(|i| names.get(usize::try_from(i).ok()?).cloned())
        .map(|rel| Change {
            rel,
            data: rng.bytes(SMALL),
        })
        .collect();
    changes.push(Change {
        rel: format!("d000/new_{tag}.bin"),
        data: rng.bytes(SMALL),
    });
    changes
}

/// Writes the W3 changes under `root`, each in place (opened for writing and truncated, as an
/// editor saving over a file does).
pub(crate) fn apply_changes(root: &Path, changes: &[Change]) -> Result<()> {
    for c in changes {
        let path = root.join(&c.rel);
        fs::write(&path, &c.data).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Whether every changed file under `root` holds its new bytes.
pub(crate) fn changes_visible(root: &Path, changes: &[Change]) -> bool {
    changes
        .iter()
        .all(|c| fs::read(root.join(&c.rel)).is_ok_and(|got| got == c.data))
}

/// The 1 MiB W4 writes, drawn from `seed`.
pub(crate) fn w4_data(seed: u64) -> Vec<u8> {
    Rng::new(seed).bytes(DELTA)
}

/// Where W4 writes in a file of `size` bytes: the exact middle (256 MiB for the 512 MiB file).
pub(crate) fn middle_offset(size: u64) -> u64 {
    size / 2
}

/// W4: overwrites `data` in place at the middle of the file at `path`, keeping its size.
pub(crate) fn overwrite_middle(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let offset = middle_offset(size);
    if offset + data.len() as u64 > size {
        bail!(
            "{} is too small for a {} B overwrite in its middle",
            path.display(),
            data.len()
        );
    }
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)?;
    f.flush()?;
    Ok(())
}

/// Whether the file at `path` has `size` bytes and holds `data` at its middle.
pub(crate) fn middle_is(path: &Path, size: u64, data: &[u8]) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if f.metadata().map(|m| m.len()).ok() != Some(size) {
        return false;
    }
    if f.seek(SeekFrom::Start(middle_offset(size))).is_err() {
        return false;
    }
    let mut got = vec![0u8; data.len()];
    f.read_exact(&mut got).is_ok() && got == data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("shoal-bench-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn small_tree_bytes(seed: u64, dir: &Path) -> Vec<u8> {
        // The first folder of a W1 tree is enough to tell seeds apart.
        generate(Data::W1, seed, dir).expect("generate");
        let mut all = Vec::new();
        for rel in small_paths(FILES_PER_DIR as u64) {
            all.extend(fs::read(dir.join(rel)).expect("read"));
        }
        all
    }

    #[test]
    fn generation_is_deterministic_per_seed() {
        let root = scratch("gen");
        let a = small_tree_bytes(1, &root.join("a"));
        let b = small_tree_bytes(1, &root.join("b"));
        let c = small_tree_bytes(2, &root.join("c"));
        assert_eq!(a.len(), FILES_PER_DIR * SMALL);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // the whole tree has the advertised shape
        let files = crate::tree::list(&root.join("a")).expect("list");
        let regular = files
            .values()
            .filter(|e| matches!(e, crate::tree::Entry::File(_)))
            .count();
        assert_eq!(regular as u64, Data::W1.files());
        assert!(root.join("a/d099/f0099.bin").is_file());
        assert!(!root.join("a/d100").exists());
        fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn small_paths_have_the_peer_benchmark_names() {
        let p = small_paths(50_000);
        assert_eq!(p.len(), 50_000);
        assert_eq!(p[0], "d000/f0000.bin");
        assert_eq!(p[101], "d001/f0001.bin");
        assert_eq!(p[49_999], "d499/f0099.bin");
    }

    #[test]
    fn w3_changes_three_distinct_files_and_adds_one() {
        let c = w3_changes(10_000, 1010, "r1");
        assert_eq!(c.len(), 4);
        assert_ne!(c[0].rel, c[1].rel);
        assert_ne!(c[1].rel, c[2].rel);
        assert_ne!(c[0].rel, c[2].rel);
        assert_eq!(c[3].rel, "d000/new_r1.bin");
        assert!(c.iter().all(|x| x.data.len() == SMALL));
        assert_eq!(c, w3_changes(10_000, 1010, "r1"));
        assert_ne!(c, w3_changes(10_000, 1020, "r1"));
    }

    #[test]
    fn w4_overwrites_exactly_the_middle_mib() {
        assert_eq!(middle_offset(BIG_SIZE), 256 * 1024 * 1024);
        let root = scratch("w4");
        let path = root.join("f.bin");
        let size = 8 * DELTA as u64;
        let before: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &before).expect("write");
        let data = w4_data(3011);
        overwrite_middle(&path, &data).expect("overwrite");
        let after = fs::read(&path).expect("read");
        assert_eq!(after.len(), before.len());
        let start = usize::try_from(middle_offset(size)).expect("fits");
        let end = start + DELTA;
        assert_eq!(after[..start], before[..start]);
        assert_eq!(after[start..end], data[..]);
        assert_eq!(after[end..], before[end..]);
        assert!(middle_is(&path, size, &data));
        assert!(!middle_is(&path, size + 1, &data));
        fs::remove_dir_all(&root).expect("cleanup");
    }
}
