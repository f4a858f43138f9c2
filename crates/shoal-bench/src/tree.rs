//! Looking at folder trees: how many files (cheaply, while a sync is running) and whether two
//! trees hold the same files with the same bytes (exactly, after it). shoal's own state (the
//! top-level `.shoal/`) and its temporary files (`.~shoal*`) are not part of a tree.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;

/// What a path in a tree is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A folder.
    Dir,
    /// A regular file of this many bytes.
    File(u64),
    /// Anything else (symlink, socket…): never expected in these trees.
    Other,
}

/// Whether a name is shoal's and not the user's: `.shoal` at the top, `.~shoal*` anywhere.
fn ignored(name: &str, top: bool) -> bool {
    (top && name == ".shoal") || name.starts_with(".~shoal")
}

/// Every path under `root` (relative, `/`-separated) with what it is, sorted.
pub(crate) fn list(root: &Path) -> io::Result<BTreeMap<String, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for item in fs::read_dir(&dir)? {
            let item = item?;
            let name = item.file_name().to_string_lossy().into_owned();
            if ignored(&name, prefix.is_empty()) {
                continue;
            }
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let kind = item.file_type()?;
            if kind.is_dir() {
                out.insert(rel.clone(), Entry::Dir);
                stack.push((item.path(), rel));
            } else if kind.is_file() {
                out.insert(rel, Entry::File(item.metadata()?.len()));
            } else {
                out.insert(rel, Entry::Other);
            }
        }
    }
    Ok(out)
}

/// How many regular files lie under `root`, from directory entries alone (no `stat` per file),
/// so it can be polled while a sync runs. A missing or unreadable folder counts 0.
pub(crate) fn count_files(root: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![(root.to_path_buf(), true)];
    while let Some((dir, top)) = stack.pop() {
        let Ok(items) = fs::read_dir(&dir) else {
            continue;
        };
        for item in items.flatten() {
            let name = item.file_name();
            if ignored(&name.to_string_lossy(), top) {
                continue;
            }
            match item.file_type() {
                Ok(t) if t.is_dir() => stack.push((item.path(), false)),
                Ok(t) if t.is_file() => n += 1,
                _ => {}
            }
        }
    }
    n
}

/// Whether `root` holds exactly `files` regular files of `bytes` bytes in all. Files appear
/// under their names only complete (shoal writes a temporary name and renames), so this
/// is the moment the tree has arrived; the bytes are summed only once the count is right.
pub(crate) fn holds(root: &Path, files: u64, bytes: u64) -> bool {
    if count_files(root) != files {
        return false;
    }
    let Ok(all) = list(root) else {
        return false;
    };
    let mut got_files = 0;
    let mut got_bytes = 0;
    for e in all.values() {
        if let Entry::File(size) = e {
            got_files += 1;
            got_bytes += size;
        }
    }
    got_files == files && got_bytes == bytes
}

/// The size of the file at `path`, if it is one.
pub(crate) fn file_size(path: &Path) -> Option<u64> {
    fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// Whether two files hold the same bytes (compared 1 MiB at a time).
pub(crate) fn same_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Checks that the trees at `want` and `got` hold the same paths, the same kinds, and files with
/// the same bytes. The error names the first differences.
pub(crate) fn compare(want: &Path, got: &Path) -> Result<(), String> {
    let lw = list(want).map_err(|e| format!("listing {}: {e}", want.display()))?;
    let lg = list(got).map_err(|e| format!("listing {}: {e}", got.display()))?;
    let mut problems = Vec::new();
    for (rel, e) in &lw {
        match lg.get(rel) {
            None => problems.push(format!("missing {rel}")),
            Some(g) if g != e => problems.push(format!("{rel}: {g:?}, expected {e:?}")),
            Some(_) => {}
        }
    }
    for rel in lg.keys().filter(|rel| !lw.contains_key(*rel)) {
        problems.push(format!("extra {rel}"));
    }
    if problems.is_empty() {
        for (rel, e) in &lw {
            if let Entry::File(_) = e {
                match same_bytes(&want.join(rel), &got.join(rel)) {
                    Ok(true) => {}
                    Ok(false) => problems.push(format!("{rel}: different bytes")),
                    Err(err) => problems.push(format!("{rel}: {err}")),
                }
                if problems.len() >= 5 {
                    break;
                }
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(5);
    Err(format!(
        "{} differs from {} ({} entries vs {}): {}{}",
        got.display(),
        want.display(),
        lg.len(),
        lw.len(),
        problems.join("; "),
        if n > 5 { "; …" } else { "" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("shoal-bench-tree-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn write(root: &Path, rel: &str, data: &[u8]) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, data).expect("write");
    }

    #[test]
    fn shoal_state_and_temporary_files_are_not_counted() {
        let root = scratch("count");
        write(&root, "a/x.bin", b"1234");
        write(&root, "a/.~shoal.x.tmp", b"partial");
        write(&root, ".shoal/db", b"state");
        let deep: &[u8] = b"a user's file of that name, not at the top";
        write(&root, "b/.shoal", deep);
        assert_eq!(count_files(&root), 2);
        assert!(holds(&root, 2, 4 + deep.len() as u64));
        assert!(!holds(&root, 2, 4));
        assert!(!holds(&root.join("missing"), 1, 0));
        fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn compare_finds_missing_extra_and_changed_files() {
        let root = scratch("compare");
        let (a, b) = (root.join("a"), root.join("b"));
        write(&a, "d/f1", b"same");
        write(&a, "d/f2", b"abcd");
        write(&b, "d/f1", b"same");
        write(&b, "d/f2", b"abcd");
        write(&b, ".shoal/state", b"ignored");
        assert_eq!(compare(&a, &b), Ok(()));
        write(&b, "d/f2", b"abce");
        let err = compare(&a, &b).expect_err("changed byte");
        assert!(err.contains("d/f2: different bytes"), "{err}");
        write(&b, "d/f2", b"abcd");
        write(&b, "d/f3", b"new");
        let err = compare(&a, &b).expect_err("extra file");
        assert!(err.contains("extra d/f3"), "{err}");
        fs::remove_file(b.join("d/f3")).expect("rm");
        fs::create_dir(b.join("left-behind")).expect("mkdir");
        let err = compare(&a, &b).expect_err("extra folder");
        assert!(err.contains("extra left-behind"), "{err}");
        fs::remove_dir_all(&root).expect("cleanup");
    }
}
