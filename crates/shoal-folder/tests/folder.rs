//! Folder-replica behaviour that needs a hand inside a sync: a user editing a file between the
//! scan and the apply, and a hostile name arriving from another replica.

use std::fs;

use shoal_core::{Entry, ItemId, ItemKind, Knowledge};
use shoal_folder::{BatchLimits, FolderReplica, MirrorOptions, NoProgress, ScanOptions, mirror};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Two empty folders, `a` and `b`, in a temporary directory (kept alive by the first value).
fn two_folders()
-> Result<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&a)?;
    fs::create_dir_all(&b)?;
    Ok((dir, a, b))
}

#[test]
fn a_file_changed_after_the_scan_is_never_overwritten() -> TestResult {
    let (_dir, a, b) = two_folders()?;
    fs::write(a.join("doc.txt"), "v1")?;
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;

    fs::write(a.join("doc.txt"), "edited on a")?;
    let mut side_a = FolderReplica::open(&a, "a")?;
    let mut side_b = FolderReplica::open(&b, "b")?;
    side_a.scan(&ScanOptions::default(), &NoProgress)?;
    side_b.scan(&ScanOptions::default(), &NoProgress)?;
    side_b.receive_from(&side_a, BatchLimits::default(), &NoProgress)?;
    // The user saves on b after b's scan, before the incoming change lands.
    fs::write(b.join("doc.txt"), "edited on b, late")?;
    let source = side_a.content_source()?;
    let report = side_b.materialize(Some(&source), &NoProgress)?;
    assert_eq!(fs::read_to_string(b.join("doc.txt"))?, "edited on b, late");
    assert!(
        report.skipped.iter().any(|s| s.path == "doc.txt"),
        "{report:?}"
    );
    drop((side_a, side_b));

    // The next run sees the late edit as a concurrent change: both versions survive.
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    let mut contents: Vec<String> = fs::read_dir(&b)?
        .flatten()
        .filter(|e| e.file_name() != ".shoal")
        .map(|e| fs::read_to_string(e.path()))
        .collect::<Result<_, _>>()?;
    contents.sort();
    assert_eq!(contents, ["edited on a", "edited on b, late"]);
    Ok(())
}

#[test]
fn a_hostile_name_from_another_replica_is_refused_and_nothing_is_written() -> TestResult {
    let (dir, a, b) = two_folders()?;
    fs::write(a.join("fine.txt"), "ok")?;
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;

    // A misbehaving replica writes versions whose names try to escape or hide.
    {
        let mut side_a = FolderReplica::open(&a, "a")?;
        let mut tx = side_a.store_mut().begin()?;
        for (n, name) in [
            "..",
            "../escape.txt",
            "a/b",
            ".~shoal.fake.tmp",
            "nul\0byte",
        ]
        .iter()
        .enumerate()
        {
            let entry = Entry {
                parent: ItemId::ROOT,
                name: (*name).to_owned(),
                kind: ItemKind::Directory,
                deleted: false,
                content: None,
                size: 0,
                mtime_ns: 0,
                executable: false,
            };
            tx.write_local(ItemId([n as u8 + 1; 16]), entry, Knowledge::new(), 1)?;
        }
        tx.commit()?;
    }
    let report = mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    assert_eq!(
        report.b.materialize.refused.len(),
        5,
        "{:?}",
        report.b.materialize
    );
    let mut names: Vec<String> = fs::read_dir(&b)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".shoal", "fine.txt"]);
    assert!(!dir.path().join("escape.txt").exists());
    Ok(())
}

#[test]
fn a_renamed_file_is_not_read_again_but_a_renamed_and_edited_one_is() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("a");
    fs::create_dir_all(root.join("sub"))?;
    let bytes: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(root.join("big.bin"), &bytes)?;
    let mut replica = FolderReplica::open(&root, "a")?;
    let first = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert_eq!(first.hashed_bytes, bytes.len() as u64);

    fs::rename(root.join("big.bin"), root.join("sub/moved.bin"))?;
    let moved = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert_eq!((moved.moved, moved.created), (1, 0), "{moved:?}");
    assert_eq!(moved.hashed_bytes, 0, "a plain rename was read again");

    // Edited, then renamed: the time changed, so it is read, and still recognised as a move
    // only if its content is the same (here it is not: a new file replaces the old one).
    let mut edited = bytes.clone();
    edited[0] ^= 1;
    fs::write(root.join("sub/moved.bin"), &edited)?;
    fs::rename(root.join("sub/moved.bin"), root.join("again.bin"))?;
    let changed = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert_eq!(changed.hashed_bytes, edited.len() as u64, "{changed:?}");
    Ok(())
}

/// Records what a scan says it is about to read again.
#[derive(Default)]
struct Rereading(std::sync::Mutex<Vec<(String, u64)>>);

impl shoal_folder::Progress for Rereading {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
    fn rereading(&self, files: &[(&str, u64)]) {
        if let Ok(mut seen) = self.0.lock() {
            seen.extend(files.iter().map(|(path, size)| ((*path).to_owned(), *size)));
        }
    }
}

#[test]
fn a_scan_says_which_large_files_changed_in_place_before_reading_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("a");
    fs::create_dir_all(root.join("sub"))?;
    let bytes: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    fs::write(root.join("sub/big.bin"), &bytes)?;
    fs::write(root.join("kept.bin"), &bytes)?;
    fs::write(root.join("small.txt"), b"small")?;
    let mut replica = FolderReplica::open(&root, "a")?;
    let first = Rereading::default();
    replica.scan(&ScanOptions::default(), &first)?;
    assert!(
        first.0.lock().map_err(|_| "poisoned")?.is_empty(),
        "new files are not read again"
    );

    // Edited in place (a large and a small file), a large file added, one left alone.
    let mut edited = bytes.clone();
    edited[1 << 20] ^= 1;
    edited.extend_from_slice(b"longer");
    fs::write(root.join("sub/big.bin"), &edited)?;
    fs::write(root.join("small.txt"), b"smaller")?;
    fs::write(root.join("added.bin"), &bytes)?;
    let second = Rereading::default();
    replica.scan(&ScanOptions::default(), &second)?;
    assert_eq!(
        *second.0.lock().map_err(|_| "poisoned")?,
        [("sub/big.bin".to_owned(), edited.len() as u64)]
    );
    Ok(())
}

/// Every file of a folder but shoal's state, with its bytes.
type Tree = Vec<(String, Vec<u8>)>;

fn tree(root: &std::path::Path) -> Result<Tree, Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.strip_prefix(root)?.starts_with(".shoal") {
                continue;
            }
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else {
                let relative = path.strip_prefix(root)?.to_string_lossy().into_owned();
                files.push((relative, fs::read(&path)?));
            }
        }
    }
    files.sort();
    Ok(files)
}

#[test]
fn every_kind_of_local_change_is_found_and_follows_the_recorded_version() -> TestResult {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&b)?;
    for folder in ["d1", "d2", "d3"] {
        for file in [
            "grow",
            "same-size",
            "touch",
            "mode",
            "move",
            "gone",
            "copy",
            "kind",
        ] {
            let path = a.join(folder).join(file);
            fs::create_dir_all(a.join(folder))?;
            fs::write(path, format!("{folder}/{file} v1"))?;
        }
    }
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    let mut replica = FolderReplica::open(&a, "a")?;
    let quiet = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert!(!quiet.changed(), "{quiet:?}");

    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    fs::write(a.join("d1/grow"), "d1/grow v2, longer")?;
    // Same size, new bytes: only the time (and the content) tell.
    let same = fs::OpenOptions::new()
        .write(true)
        .open(a.join("d1/same-size"))?;
    std::io::Write::write_all(&mut &same, b"D1/SAME-SIZE V1")?;
    same.set_modified(later)?;
    drop(same);
    // A new time alone is no new version, but the record follows it.
    fs::File::options()
        .write(true)
        .open(a.join("d2/touch"))?
        .set_modified(later)?;
    fs::set_permissions(a.join("d2/mode"), fs::Permissions::from_mode(0o755))?;
    fs::rename(a.join("d2/move"), a.join("d3/moved"))?;
    fs::remove_file(a.join("d3/gone"))?;
    // Same bytes, size and time under a new inode: read again, same content, no new version.
    let copy = a.join("d3/copy");
    let modified = fs::metadata(&copy)?.modified()?;
    fs::copy(&copy, a.join("d3/copy.new"))?;
    fs::rename(a.join("d3/copy.new"), &copy)?;
    fs::File::options()
        .write(true)
        .open(&copy)?
        .set_modified(modified)?;
    fs::remove_file(a.join("d3/kind"))?;
    fs::create_dir(a.join("d3/kind"))?;

    let report = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert_eq!(
        (
            report.modified,
            report.moved,
            report.deleted,
            report.created
        ),
        (3, 1, 2, 1),
        "{report:?}"
    );
    let records: std::collections::BTreeMap<String, shoal_store::LocalFile> = replica
        .store()
        .local_files()?
        .into_iter()
        .map(|f| (f.path.clone(), f))
        .collect();
    let touched = fs::metadata(a.join("d2/touch"))?;
    assert_eq!(
        records["d2/touch"].mtime_ns,
        std::os::unix::fs::MetadataExt::mtime(&touched) * 1_000_000_000
            + std::os::unix::fs::MetadataExt::mtime_nsec(&touched)
    );
    assert_eq!(
        records["d3/copy"].inode,
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(&copy)?)
    );
    let again = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert!(!again.changed(), "{again:?}");
    assert_eq!(again.hashed_bytes, 0);
    drop(replica);

    // Each edit follows the version it replaced: no conflict, and b ends up the same.
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    assert_eq!(tree(&a)?, tree(&b)?);
    assert!(FolderReplica::open(&b, "b")?.conflicts()?.is_empty());
    assert!(FolderReplica::open(&a, "a")?.conflicts()?.is_empty());
    Ok(())
}

#[test]
fn each_path_gets_its_own_hash_when_many_blocks_are_hashed_while_written() -> TestResult {
    // Several hundred files, so the scan's hashing hands over many blocks; every third one
    // edited and new ones between the old, so hashed and unhashed entries interleave.
    let (_dir, a, b) = two_folders()?;
    for n in 0..600 {
        fs::create_dir_all(a.join(format!("d{}", n % 7)))?;
        fs::write(a.join(format!("d{}/f{n:04}", n % 7)), format!("first {n}"))?;
    }
    let mut replica = FolderReplica::open(&a, "a")?;
    let first = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert_eq!(first.created, 607, "{first:?}");
    for n in (0..600).step_by(3) {
        fs::write(
            a.join(format!("d{}/f{n:04}", n % 7)),
            format!("edited {n}, longer"),
        )?;
    }
    for n in 0..400 {
        fs::write(a.join(format!("d{}/f{n:04}b", n % 7)), format!("new {n}"))?;
    }
    fs::remove_file(a.join("d3/f0003"))?;
    let second = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert_eq!(
        (second.modified, second.created, second.deleted),
        (199, 400, 1),
        "{second:?}"
    );
    for file in replica.store().local_files()? {
        if file.kind != ItemKind::File {
            continue;
        }
        let bytes = fs::read(a.join(&file.path))?;
        assert_eq!(
            file.content,
            Some(shoal_store::chunk_bytes(&bytes).hash),
            "{}",
            file.path
        );
        assert_eq!(file.size, bytes.len() as u64, "{}", file.path);
    }
    let again = replica.scan(&ScanOptions::default(), &NoProgress)?;
    assert!(!again.changed(), "{again:?}");
    drop(replica);
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    assert_eq!(tree(&a)?, tree(&b)?);
    Ok(())
}

#[test]
fn a_new_replica_lays_out_only_after_it_receives_something() -> TestResult {
    let (_dir, a, b) = two_folders()?;
    fs::write(a.join("doc.txt"), "written on a")?;
    let mut side_a = FolderReplica::open(&a, "a")?;
    let mut side_b = FolderReplica::open(&b, "b")?;
    // Its own files, just scanned, are already where its layout puts them.
    side_a.scan(&ScanOptions::default(), &NoProgress)?;
    assert!(!side_a.store().needs_materialize()?);
    side_b.scan(&ScanOptions::default(), &NoProgress)?;
    assert!(!side_b.store().needs_materialize()?);
    side_b.receive_from(&side_a, BatchLimits::default(), &NoProgress)?;
    assert!(side_b.store().needs_materialize()?);
    let source = side_a.content_source()?;
    side_b.materialize(Some(&source), &NoProgress)?;
    assert!(!side_b.store().needs_materialize()?);
    assert_eq!(fs::read_to_string(b.join("doc.txt"))?, "written on a");
    Ok(())
}

/// A staged file counts only once its batch's transaction lists it: whatever else lies in
/// the staging folder (a file cut short by a crash, an older shoal's file named by its hash)
/// is never taken for the content, and is cleared.
#[test]
fn an_unlisted_staged_file_is_never_trusted_and_is_cleared() -> TestResult {
    let (_dir, a, b) = two_folders()?;
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    let body = b"the whole content. ".repeat(300);
    fs::write(a.join("doc.txt"), &body)?;
    let staging = b.join(".shoal").join("tmp");
    let hash = shoal_core::ContentHash::of(&body);
    fs::write(staging.join(hash.to_string()), b"cut short")?;
    fs::write(staging.join("00000000000000aa"), b"cut short")?;

    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    assert_eq!(fs::read(b.join("doc.txt"))?, body);
    assert_eq!(fs::read_dir(&staging)?.count(), 0);
    Ok(())
}

#[test]
fn paths_sharing_a_content_land_each_with_its_own_time() -> TestResult {
    // One staged copy for eight paths: the time set while staging is one version's, and each
    // path must still end up with its own.
    let (_dir, a, b) = two_folders()?;
    let base = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let names = [
        "1.txt",
        "2.txt",
        "3.txt",
        "4.txt",
        "5.txt",
        "6.txt",
        "7.txt",
        "8.txt",
        "alone.txt",
    ];
    // Made and scanned one by one, last path first: the versions do not come in path order.
    let mut side_a = FolderReplica::open(&a, "a")?;
    for (n, name) in names.iter().enumerate().rev() {
        let body = if *name == "alone.txt" {
            "another content"
        } else {
            "the same bytes"
        };
        fs::write(a.join(name), body)?;
        let at = base + std::time::Duration::from_nanos(n as u64 * 1_000_000_123);
        fs::File::options()
            .write(true)
            .open(a.join(name))?
            .set_modified(at)?;
        side_a.scan(&ScanOptions::default(), &NoProgress)?;
    }
    drop(side_a);
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    for name in names {
        let (theirs, ours) = (fs::metadata(a.join(name))?, fs::metadata(b.join(name))?);
        assert_eq!(ours.modified()?, theirs.modified()?, "{name}");
        assert_eq!(fs::read(a.join(name))?, fs::read(b.join(name))?, "{name}");
    }
    let again = FolderReplica::open(&b, "b")?.scan(&ScanOptions::default(), &NoProgress)?;
    assert!(!again.changed(), "{again:?}");
    Ok(())
}

#[test]
fn many_files_land_with_their_times_and_modes_except_where_the_user_came_first() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, a, b) = two_folders()?;
    let path = |n: usize| format!("d{}/f{n}.txt", n % 8);
    for folder in 0..8 {
        fs::create_dir_all(a.join(format!("d{folder}")))?;
    }
    for n in 0..300 {
        fs::write(a.join(path(n)), format!("old {n}"))?;
    }
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;

    // On a: every file edited, as many new, every fifth one executable.
    for n in 0..600 {
        fs::write(a.join(path(n)), format!("new {n}"))?;
        if n % 5 == 0 {
            fs::set_permissions(a.join(path(n)), fs::Permissions::from_mode(0o755))?;
        }
    }
    let mut side_a = FolderReplica::open(&a, "a")?;
    let mut side_b = FolderReplica::open(&b, "b")?;
    side_a.scan(&ScanOptions::default(), &NoProgress)?;
    side_b.scan(&ScanOptions::default(), &NoProgress)?;
    side_b.receive_from(&side_a, BatchLimits::default(), &NoProgress)?;
    // After b's scan the user edits one file and makes another where a new one is coming.
    let (edited, made) = (path(3), path(401));
    fs::write(b.join(&edited), "edited on b, late")?;
    fs::write(b.join(&made), "made on b first")?;
    let source = side_a.content_source()?;
    let report = side_b.materialize(Some(&source), &NoProgress)?;

    let mut skipped: Vec<&str> = report.skipped.iter().map(|s| s.path.as_str()).collect();
    skipped.sort();
    assert_eq!(skipped, [made.as_str(), edited.as_str()], "{report:?}");
    assert_eq!(report.written, 598, "{report:?}");
    for n in 0..600 {
        let (from, to) = (a.join(path(n)), b.join(path(n)));
        let landed = fs::read_to_string(&to)?;
        if path(n) == edited {
            assert_eq!(landed, "edited on b, late");
        } else if path(n) == made {
            assert_eq!(landed, "made on b first");
        } else {
            assert_eq!(landed, format!("new {n}"), "{}", path(n));
            let (theirs, ours) = (fs::metadata(&from)?, fs::metadata(&to)?);
            assert_eq!(theirs.modified()?, ours.modified()?, "{}", path(n));
            assert_eq!(
                theirs.permissions().mode() & 0o111 != 0,
                ours.permissions().mode() & 0o111 != 0,
                "{}",
                path(n)
            );
        }
    }
    Ok(())
}

/// Counts what is copied from another replica's files.
struct Counting {
    inner: shoal_folder::FolderSource,
    copied: std::sync::Mutex<Vec<shoal_core::ContentHash>>,
}

impl shoal_folder::ContentSource for Counting {
    fn copy_to(&self, hash: &shoal_core::ContentHash, dest: &std::path::Path) -> bool {
        let copied = self.inner.copy_to(hash, dest);
        if copied {
            self.copied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(*hash);
        }
        copied
    }
}

/// A batch is staged while the one before it commits (as a download does): content that
/// batch staged, or that an earlier batch committed, is at hand and not copied again; a batch
/// staged but never committed (a crash) leaves nothing that is trusted, and the next sync
/// brings the rest.
#[test]
fn a_batch_staged_while_the_one_before_commits_copies_no_content_twice() -> TestResult {
    let (_dir, a, b) = two_folders()?;
    // Thirteen files in batches of five: twelve hold six contents, each twice, so that every
    // content comes again in a later batch; the thirteenth has a content of its own.
    let body = |i: usize| match i {
        12 => "only here ".repeat(200),
        _ => format!("content {} ", i % 6).repeat(200),
    };
    for i in 0..13 {
        fs::write(a.join(format!("f{i:02}.txt")), body(i))?;
    }
    let mut side_a = FolderReplica::open(&a, "a")?;
    let mut side_b = FolderReplica::open(&b, "b")?;
    side_a.scan(&ScanOptions::default(), &NoProgress)?;
    side_b.scan(&ScanOptions::default(), &NoProgress)?;
    let offer = shoal_core::SyncOffer {
        knowledge: side_a.store().knowledge()?,
        forgotten: side_a.store().forgotten()?,
    };
    let missing = side_a.store().missing_for(&side_b.store().knowledge()?)?;
    let limits = BatchLimits {
        max_items: 5,
        ..BatchLimits::default()
    };
    let batches = shoal_core::plan_batches(missing, &offer, limits);
    assert_eq!(batches.len(), 3);
    let contents = |batch: &shoal_core::Batch| -> Result<Vec<_>, Box<dyn std::error::Error>> {
        let mut lists = Vec::new();
        for (_, version) in &batch.versions {
            if let Some(hash) = version.entry.content {
                lists.extend(side_a.store().content(&hash)?);
            }
        }
        Ok(lists)
    };
    let source = Counting {
        inner: side_a.content_source()?,
        copied: std::sync::Mutex::new(Vec::new()),
    };
    let stager = side_b.stager()?;
    let mut session = shoal_core::Receiving::new();

    let first = stager.stage(&batches[0].versions, &source, &NoProgress, None)?;
    let second = stager.stage(&batches[1].versions, &source, &NoProgress, Some(&first))?;
    let report = side_b.commit_batch(&mut session, &batches[0], &contents(&batches[0])?, &first)?;
    assert_eq!(report.received, 5);
    let third = stager.stage(&batches[2].versions, &source, &NoProgress, Some(&second))?;
    side_b.commit_batch(&mut session, &batches[1], &contents(&batches[1])?, &second)?;
    let copied = source
        .copied
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let distinct: std::collections::HashSet<_> = copied.iter().collect();
    assert_eq!(copied.len(), distinct.len(), "a content was copied twice");
    assert_eq!(copied.len(), 7);

    // The third batch is never committed: its files are not laid out, and what it staged is
    // cleared.
    let third_names: std::collections::HashSet<String> = batches[2]
        .versions
        .iter()
        .map(|(_, version)| version.entry.name.clone())
        .collect();
    drop(third);
    drop(side_b);
    let mut side_b = FolderReplica::open(&b, "b")?;
    side_b.materialize(None, &NoProgress)?;
    for i in 0..13 {
        let name = format!("f{i:02}.txt");
        if third_names.contains(&name) {
            assert!(
                !b.join(&name).exists(),
                "{name} came from an uncommitted batch"
            );
        } else {
            assert_eq!(fs::read_to_string(b.join(&name))?, body(i));
        }
    }
    assert_eq!(tree(&b.join(".shoal").join("tmp"))?, Tree::new());

    drop(side_b);
    mirror(&a, &b, &MirrorOptions::default(), &NoProgress)?;
    for i in 0..13 {
        assert_eq!(fs::read_to_string(b.join(format!("f{i:02}.txt")))?, body(i));
    }
    Ok(())
}

/// Another process writing the replica (as `shoal resolve` does while the agent runs) after a
/// scan read the records but before it writes: the scan starts again from the new records,
/// instead of recording a version beside the other writer's as if the two were concurrent.
#[test]
fn a_scan_overtaken_by_another_writer_starts_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("a");
    fs::create_dir_all(&root)?;
    fs::write(root.join("doomed.txt"), "soon gone")?;
    fs::write(root.join("stays.txt"), "here to stay")?;
    let mut scanner = FolderReplica::open(&root, "a")?;
    scanner.scan(&ScanOptions::default(), &NoProgress)?;

    let mut other = FolderReplica::open(&root, "a")?;
    let items = other.store().load_items()?;
    let (item, state) = items
        .iter()
        .find(|(_, state)| state.winner().entry.name == "doomed.txt")
        .ok_or("the file has no item")?;
    let item = *item;
    let mut entry = state.winner().entry.clone();
    entry.deleted = true;
    entry.content = None;
    let context = state.winner().history();
    // The other writer deletes the file and its record in a transaction it holds...
    fs::remove_file(root.join("doomed.txt"))?;
    let mut tx = other.store_mut().begin()?;
    let deleted = tx.write_local(item, entry, context, 1)?;
    tx.remove_local_file("doomed.txt")?;
    // ...while the scan reads the records as they were and waits to write.
    let scanning = std::thread::spawn(move || scanner.scan(&ScanOptions::default(), &NoProgress));
    std::thread::sleep(std::time::Duration::from_millis(300));
    tx.commit()?;
    let report = scanning.join().map_err(|_| "the scan panicked")??;
    assert!(!report.changed(), "{report:?}");
    let items = other.store().load_items()?;
    assert_eq!(items[&item].versions(), std::slice::from_ref(&deleted));
    Ok(())
}
