//! End-to-end tests of `shoal mirror` on real folders, through the real binary.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;
use support::tree;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

struct Pair {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl Pair {
    fn new() -> Result<Pair, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (a, b) = (dir.path().join("laptop"), dir.path().join("desktop"));
        fs::create_dir(&a)?;
        fs::create_dir(&b)?;
        Ok(Pair { _dir: dir, a, b })
    }

    fn mirror(&self) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let output = shoal()
            .args(["mirror", "--json"])
            .arg(&self.a)
            .arg(&self.b)
            .output()?;
        if !output.status.success() {
            return Err(
                format!("mirror failed: {}", String::from_utf8_lossy(&output.stderr)).into(),
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    fn mirror_raw(&self) -> std::io::Result<Output> {
        shoal().args(["mirror"]).arg(&self.a).arg(&self.b).output()
    }
}

fn write(path: impl AsRef<Path>, text: &str) -> std::io::Result<()> {
    if let Some(parent) = path.as_ref().parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, text)
}

fn assert_same(pair: &Pair) -> BTreeMap<String, Option<String>> {
    let (a, b) = (tree(&pair.a), tree(&pair.b));
    assert_eq!(a, b, "the two folders differ");
    a
}

fn conflict_copies(tree: &BTreeMap<String, Option<String>>) -> Vec<(&String, &Option<String>)> {
    tree.iter()
        .filter(|(path, _)| path.contains(".conflict-"))
        .collect()
}

#[test]
fn creates_edits_renames_and_deletes_flow_both_ways() -> TestResult {
    let pair = Pair::new()?;
    write(pair.a.join("notes/today.txt"), "buy milk")?;
    write(pair.a.join("top.txt"), "top")?;
    write(pair.b.join("photos/cat.jpg"), "meow")?;
    pair.mirror()?;
    assert_eq!(assert_same(&pair).len(), 5);

    write(pair.b.join("notes/today.txt"), "buy milk and bread")?;
    fs::rename(pair.a.join("photos"), pair.a.join("pictures"))?;
    fs::rename(pair.a.join("top.txt"), pair.a.join("notes/moved.txt"))?;
    fs::remove_file(pair.b.join("photos/cat.jpg"))
        .or_else(|_| fs::remove_file(pair.b.join("pictures/cat.jpg")))?;
    let summary = pair.mirror()?;
    let tree = assert_same(&pair);
    assert_eq!(
        tree.get("notes/today.txt"),
        Some(&Some("buy milk and bread".into()))
    );
    assert_eq!(tree.get("notes/moved.txt"), Some(&Some("top".into())));
    assert!(
        tree.contains_key("pictures") && !tree.contains_key("photos"),
        "{tree:?}"
    );
    assert!(!tree.contains_key("pictures/cat.jpg"));
    assert_eq!(summary["conflicts"], 0);
    // A rename moves no content.
    assert_eq!(summary["b"]["written"], 0, "{summary}");
    Ok(())
}

#[test]
fn a_second_run_with_nothing_changed_does_nothing() -> TestResult {
    let pair = Pair::new()?;
    for i in 0..50 {
        write(
            pair.a.join(format!("d{}/f{i}.txt", i % 5)),
            &format!("file {i}"),
        )?;
    }
    pair.mirror()?;
    let summary = pair.mirror()?;
    for side in ["a", "b"] {
        assert_eq!(summary[side]["received"], 0);
        assert_eq!(summary[side]["written"], 0);
        assert_eq!(
            summary[side]["local_changes"]["hashed_bytes"], 0,
            "{summary}"
        );
    }
    Ok(())
}

#[test]
fn concurrent_edits_keep_both_versions_as_identical_conflict_copies() -> TestResult {
    let pair = Pair::new()?;
    write(pair.a.join("report.txt"), "v1")?;
    pair.mirror()?;
    write(pair.a.join("report.txt"), "laptop version")?;
    write(pair.b.join("report.txt"), "desktop version")?;
    let summary = pair.mirror()?;
    assert!(summary["conflicts"].as_u64() > Some(0), "{summary}");
    let tree = assert_same(&pair);
    let copies = conflict_copies(&tree);
    assert_eq!(copies.len(), 1, "{tree:?}");
    let contents: Vec<_> = [tree.get("report.txt"), Some(copies[0].1)]
        .into_iter()
        .flatten()
        .flatten()
        .cloned()
        .collect();
    assert!(
        contents.contains(&"laptop version".to_string())
            && contents.contains(&"desktop version".to_string())
    );
    // The copy says what it is: original name, device, date.
    assert!(
        copies[0].0.starts_with("report.conflict-") && copies[0].0.ends_with(".txt"),
        "{}",
        copies[0].0
    );

    // Deleting the copy on one side settles the conflict everywhere.
    fs::remove_file(pair.b.join(copies[0].0))?;
    pair.mirror()?;
    let tree = assert_same(&pair);
    assert!(conflict_copies(&tree).is_empty(), "{tree:?}");
    assert!(tree.contains_key("report.txt"));
    Ok(())
}

#[test]
fn an_edit_beats_a_concurrent_delete() -> TestResult {
    let pair = Pair::new()?;
    write(pair.a.join("keep.txt"), "v1")?;
    write(pair.a.join("other.txt"), "so the folder is not empty")?;
    pair.mirror()?;
    fs::remove_file(pair.a.join("keep.txt"))?;
    write(pair.b.join("keep.txt"), "edited")?;
    pair.mirror()?;
    let tree = assert_same(&pair);
    assert_eq!(tree.get("keep.txt"), Some(&Some("edited".into())));
    Ok(())
}

#[test]
fn two_new_files_with_one_name_both_survive() -> TestResult {
    let pair = Pair::new()?;
    pair.mirror()?;
    write(pair.a.join("plan.md"), "from laptop")?;
    write(pair.b.join("plan.md"), "from desktop")?;
    pair.mirror()?;
    let tree = assert_same(&pair);
    let values: Vec<_> = tree.values().flatten().cloned().collect();
    assert!(
        values.contains(&"from laptop".into()) && values.contains(&"from desktop".into()),
        "{tree:?}"
    );
    assert_eq!(tree.len(), 2);
    Ok(())
}

#[test]
fn a_file_put_into_a_concurrently_deleted_folder_brings_the_folder_back() -> TestResult {
    let pair = Pair::new()?;
    write(pair.a.join("project/readme.txt"), "hi")?;
    pair.mirror()?;
    fs::remove_dir_all(pair.a.join("project"))?;
    write(pair.a.join("other.txt"), "keeps the folder non-empty")?;
    write(
        pair.b.join("project/new.txt"),
        "written while the folder was deleted",
    )?;
    pair.mirror()?;
    let tree = assert_same(&pair);
    assert_eq!(
        tree.get("project/new.txt"),
        Some(&Some("written while the folder was deleted".into())),
        "{tree:?}"
    );
    assert!(!tree.contains_key("project/readme.txt"));
    Ok(())
}

#[test]
fn crossed_folder_moves_do_not_make_a_cycle_or_lose_files() -> TestResult {
    let pair = Pair::new()?;
    write(pair.a.join("x/in-x.txt"), "x")?;
    write(pair.a.join("y/in-y.txt"), "y")?;
    pair.mirror()?;
    fs::rename(pair.a.join("x"), pair.a.join("y/x"))?;
    fs::rename(pair.b.join("y"), pair.b.join("x/y"))?;
    pair.mirror()?;
    let tree = assert_same(&pair);
    let files: Vec<_> = tree
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| k.rsplit('/').next().unwrap_or(k))
        .collect();
    assert!(
        files.contains(&"in-x.txt") && files.contains(&"in-y.txt"),
        "{tree:?}"
    );
    Ok(())
}

#[test]
fn ignored_and_unrepresentable_names_are_not_synced() -> TestResult {
    let pair = Pair::new()?;
    write(pair.a.join(".shoalignore"), "*.tmp\nbuild/\n")?;
    write(pair.a.join("draft.tmp"), "scratch")?;
    write(pair.a.join("build/out.bin"), "artifact")?;
    write(pair.a.join("back\\slash.txt"), "windows would choke")?;
    write(pair.a.join("fine.txt"), "ok")?;
    let summary = pair.mirror()?;
    let b = tree(&pair.b);
    assert!(b.contains_key("fine.txt") && b.contains_key(".shoalignore"));
    assert!(
        !b.contains_key("draft.tmp")
            && !b.contains_key("build")
            && !b.contains_key("back\\slash.txt"),
        "{b:?}"
    );
    let skipped = summary["a"]["skipped"].to_string();
    assert!(
        skipped.contains("back\\\\slash.txt") && skipped.contains("separator"),
        "{skipped}"
    );
    Ok(())
}

#[test]
fn a_folder_that_suddenly_looks_empty_is_not_synced() -> TestResult {
    let pair = Pair::new()?;
    write(pair.a.join("precious.txt"), "do not lose me")?;
    pair.mirror()?;
    fs::remove_file(pair.b.join("precious.txt"))?;
    let output = pair.mirror_raw()?;
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("is empty") && message.contains("--allow-empty"),
        "{message}"
    );
    assert!(pair.a.join("precious.txt").exists());

    fs::remove_dir_all(&pair.b)?;
    let output = pair.mirror_raw()?;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not exist"));
    assert!(pair.a.join("precious.txt").exists());
    Ok(())
}

#[test]
fn usage_errors_exit_with_2_and_help_works() -> TestResult {
    assert_eq!(shoal().args(["mirror"]).output()?.status.code(), Some(2));
    let help = shoal().args(["mirror", "--help"]).output()?;
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--json"));
    Ok(())
}

fn mirror_dirs(a: &Path, b: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let output = shoal().args(["mirror", "--json"]).arg(a).arg(b).output()?;
    if !output.status.success() {
        return Err(format!("mirror failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn a_folder_restored_from_an_old_backup_converges_without_resurrecting_deletions() -> TestResult {
    let dir = tempfile::tempdir()?;
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.path().join(n));
    for folder in [&a, &b, &c] {
        fs::create_dir(folder)?;
    }
    for i in 0..5 {
        write(a.join(format!("f{i}.txt")), &format!("first {i}"))?;
    }
    mirror_dirs(&a, &b)?;
    mirror_dirs(&b, &c)?;
    copy_tree(&c, &dir.path().join("c-backup"))?;

    fs::remove_file(a.join("f1.txt"))?;
    write(a.join("f2.txt"), "second 2")?;
    write(c.join("f3.txt"), "c wrote this after its backup")?;
    let mut forgotten = 0;
    for (x, y) in [(&a, &b), (&b, &c), (&a, &c), (&a, &b)] {
        forgotten += mirror_dirs(x, y)?["tombstones_forgotten"]
            .as_u64()
            .unwrap_or(0);
    }
    // Every side has seen the deletion: its tombstone is forgotten.
    assert!(forgotten > 0);

    // c is restored from the old backup: its files and its state go back in time.
    fs::remove_dir_all(&c)?;
    copy_tree(&dir.path().join("c-backup"), &c)?;
    let mut recovered = 0;
    for (x, y) in [(&a, &c), (&b, &c), (&a, &b), (&a, &c)] {
        let summary = mirror_dirs(x, y)?;
        recovered += summary["b"]["recovered"].as_u64().unwrap_or(0)
            + summary["a"]["recovered"].as_u64().unwrap_or(0);
    }
    // The restored folder found, by a recovery compare, that its old f1.txt was deleted.
    assert!(recovered > 0);
    let trees = [tree(&a), tree(&b), tree(&c)];
    assert_eq!(trees[0], trees[1]);
    assert_eq!(trees[0], trees[2]);
    assert!(
        !trees[0].contains_key("f1.txt"),
        "a deleted file came back: {:?}",
        trees[0]
    );
    assert_eq!(trees[0].get("f2.txt"), Some(&Some("second 2".into())));
    assert_eq!(
        trees[0].get("f3.txt"),
        Some(&Some("c wrote this after its backup".into()))
    );
    Ok(())
}
