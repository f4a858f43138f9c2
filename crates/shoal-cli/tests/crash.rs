//! Kills `shoal mirror` with SIGKILL at random moments, 50 times, changing both folders in
//! between. At every kill no partial file may be visible; at the end a normal run must leave
//! both folders identical with every change present.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The test's own model of one folder: path → content. Each side writes only under its own
/// prefix, so the final state of both folders is exactly the union of the two models.
type Model = BTreeMap<String, Vec<u8>>;

fn content(rng: &mut StdRng, serial: &mut u64) -> Vec<u8> {
    *serial += 1;
    let size = if rng.random_range(0..10) == 0 {
        rng.random_range(1 << 20..3 << 20)
    } else {
        rng.random_range(10..20_000)
    };
    let mut bytes = format!("content #{serial} ").into_bytes();
    bytes.extend((0..size).map(|i| (i as u64 * 31 + *serial) as u8));
    bytes
}

fn mutate(
    root: &Path,
    prefix: &str,
    model: &mut Model,
    written: &mut BTreeSet<Vec<u8>>,
    rng: &mut StdRng,
    serial: &mut u64,
) -> TestResult {
    for _ in 0..rng.random_range(1..30) {
        let existing: Vec<String> = model.keys().cloned().collect();
        match rng.random_range(0..4) {
            0 | 1 => {
                let path = format!(
                    "{prefix}/d{}/f{}.bin",
                    rng.random_range(0..5),
                    rng.random_range(0..60)
                );
                let bytes = content(rng, serial);
                let absolute = root.join(&path);
                fs::create_dir_all(absolute.parent().ok_or("no parent")?)?;
                fs::write(&absolute, &bytes)?;
                written.insert(bytes.clone());
                model.insert(path, bytes);
            }
            2 if !existing.is_empty() => {
                let path = &existing[rng.random_range(0..existing.len())];
                fs::remove_file(root.join(path))?;
                model.remove(path);
            }
            3 if !existing.is_empty() => {
                let from = existing[rng.random_range(0..existing.len())].clone();
                let to = format!(
                    "{prefix}/d{}/r{}.bin",
                    rng.random_range(0..5),
                    rng.random_range(0..1000)
                );
                if model.contains_key(&to) {
                    continue;
                }
                fs::create_dir_all(root.join(&to).parent().ok_or("no parent")?)?;
                fs::rename(root.join(&from), root.join(&to))?;
                let bytes = model.remove(&from).ok_or("missing")?;
                model.insert(to, bytes);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Regular files below `root`, minus shoal's state and its temporary files.
fn visible_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == ".shoal" || name.starts_with(".~shoal.") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = fs::read(&path) {
                let relative = path
                    .strip_prefix(root)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.insert(relative, bytes);
            }
        }
    }
    out
}

#[test]
fn mirror_survives_sigkill_at_random_moments() -> TestResult {
    let seed = std::env::var("SHOAL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261122u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir(&a)?;
    fs::create_dir(&b)?;
    let (mut model_a, mut model_b) = (Model::new(), Model::new());
    let mut written = BTreeSet::new();
    let mut serial = 0;
    // Each side keeps a file of its own so neither ever looks emptied.
    for (root, model, prefix) in [(&a, &mut model_a, "from-a"), (&b, &mut model_b, "from-b")] {
        let bytes = format!("anchor of {prefix}").into_bytes();
        fs::create_dir_all(root.join(prefix))?;
        fs::write(root.join(prefix).join("anchor.txt"), &bytes)?;
        written.insert(bytes.clone());
        model.insert(format!("{prefix}/anchor.txt"), bytes);
    }

    let mut kills = 0;
    // Kill delays adapt to how fast runs are on this machine, so most runs die mid-way.
    let mut max_delay_ms = 50u64;
    for round in 0..50 {
        if rng.random_bool(0.5) {
            mutate(
                &a,
                "from-a",
                &mut model_a,
                &mut written,
                &mut rng,
                &mut serial,
            )?;
        } else {
            mutate(
                &b,
                "from-b",
                &mut model_b,
                &mut written,
                &mut rng,
                &mut serial,
            )?;
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("mirror")
            .arg(&a)
            .arg(&b)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..max_delay_ms)));
        if child.try_wait()?.is_none() {
            child.kill()?; // SIGKILL
            kills += 1;
            max_delay_ms = (max_delay_ms + 5).min(200);
        } else {
            max_delay_ms = (max_delay_ms * 3 / 4).max(4);
        }
        let status = child.wait_with_output()?;
        if status.status.success() || status.status.code().is_none() {
            // Killed or finished: either way, no partial file may be visible.
        } else {
            return Err(format!(
                "round {round}: mirror failed: {}",
                String::from_utf8_lossy(&status.stderr)
            )
            .into());
        }
        for root in [&a, &b] {
            for (path, bytes) in visible_files(root) {
                assert!(
                    written.contains(&bytes),
                    "round {round}: {path} in {} is partial or unknown",
                    root.display()
                );
            }
        }
    }
    assert!(
        kills >= 25,
        "only {kills} of 50 runs were killed mid-way; the test is not testing crashes"
    );

    // Recovery: normal runs finish the job.
    for _ in 0..2 {
        let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("mirror")
            .arg(&a)
            .arg(&b)
            .output()?;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let (final_a, final_b) = (visible_files(&a), visible_files(&b));
    let only_a: Vec<_> = final_a
        .keys()
        .filter(|k| !final_b.contains_key(*k))
        .collect();
    let only_b: Vec<_> = final_b
        .keys()
        .filter(|k| !final_a.contains_key(*k))
        .collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "only in a: {only_a:?}; only in b: {only_b:?}"
    );
    assert!(final_a == final_b, "contents differ");
    let mut expected = model_a;
    expected.extend(model_b);
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !final_a.contains_key(*k))
        .collect();
    let extra: Vec<_> = final_a
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "lost: {missing:?}; invented: {extra:?}"
    );
    assert!(final_a == expected, "a file has the wrong content");
    Ok(())
}
