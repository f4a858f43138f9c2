//! End-to-end tests of the hub and the device sync, with real `shoal hub` and `shoal` processes
//! on 127.0.0.1 in temporary directories.

mod support;

use std::time::Duration;

use support::{AnyResult, Device, Hub, TestResult, hub_metric, noise, wait_for};

/// alice on two devices and bob on one, all in workspace "team".
fn team(root: &std::path::Path) -> AnyResult<(Hub, Device, Device, Device)> {
    let data = root.join("hub");
    Hub::add_user(&data, "alice", "alice-pw")?;
    Hub::add_user(&data, "bob", "bob-pw")?;
    let hub = Hub::start(&data)?;
    let (laptop, desktop, bob) = (
        Device::new(root, "laptop"),
        Device::new(root, "desktop"),
        Device::new(root, "bob"),
    );
    laptop.login(&hub, "alice", "alice-pw", "laptop")?;
    desktop.login(&hub, "alice", "alice-pw", "desktop")?;
    bob.login(&hub, "bob", "bob-pw", "bobpc")?;
    laptop.create("team")?;
    laptop.run(&["workspace", "invite", "team", "bob", "--role", "editor"])?;
    desktop.join("team")?;
    bob.join("team")?;
    Ok((hub, laptop, desktop, bob))
}

fn sync_all(devices: &[&Device]) -> TestResult {
    for _ in 0..2 {
        for device in devices {
            device.sync()?;
        }
    }
    Ok(())
}

#[test]
fn three_devices_of_two_users_converge_through_the_hub() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, desktop, bob) = team(root.path())?;
    let all = [&laptop, &desktop, &bob];

    laptop.write("plans/q1.txt", "ship it")?;
    laptop.write("notes.txt", "first")?;
    laptop.write("old/a.txt", "a")?;
    sync_all(&all)?;
    assert_eq!(laptop.tree(), bob.tree());
    assert_eq!(laptop.tree(), desktop.tree());
    assert_eq!(
        bob.tree().get("plans/q1.txt"),
        Some(&Some("ship it".into()))
    );

    // Edits, renames, moves and deletes from different devices.
    bob.write("notes.txt", "second, by bob")?;
    std::fs::rename(desktop.folder.join("plans"), desktop.folder.join("roadmap"))?;
    std::fs::rename(
        laptop.folder.join("old/a.txt"),
        laptop.folder.join("a-moved.txt"),
    )?;
    std::fs::remove_dir(laptop.folder.join("old"))?;
    sync_all(&all)?;
    let tree = laptop.tree();
    assert_eq!(tree, desktop.tree());
    assert_eq!(tree, bob.tree());
    assert_eq!(tree.get("notes.txt"), Some(&Some("second, by bob".into())));
    assert_eq!(tree.get("roadmap/q1.txt"), Some(&Some("ship it".into())));
    assert_eq!(tree.get("a-moved.txt"), Some(&Some("a".into())));
    assert!(
        !tree.contains_key("old") && !tree.contains_key("plans"),
        "{tree:?}"
    );

    // Store and forward: the desktop is offline while the laptop changes things and then goes
    // away for good; the desktop still gets everything from the hub.
    laptop.write("while-you-were-out.txt", "hello desktop")?;
    std::fs::remove_file(laptop.folder.join("a-moved.txt"))?;
    laptop.sync()?;
    std::fs::remove_dir_all(&laptop.folder)?;
    desktop.sync()?;
    let tree = desktop.tree();
    assert_eq!(
        tree.get("while-you-were-out.txt"),
        Some(&Some("hello desktop".into()))
    );
    assert!(!tree.contains_key("a-moved.txt"));

    // Concurrent edits end as identical conflict copies everywhere.
    desktop.write("notes.txt", "desktop version")?;
    bob.write("notes.txt", "bob version")?;
    sync_all(&[&desktop, &bob])?;
    assert_eq!(desktop.tree(), bob.tree());
    let tree = bob.tree();
    let copies: Vec<_> = tree.keys().filter(|k| k.contains(".conflict-")).collect();
    assert_eq!(copies.len(), 1, "{tree:?}");
    let contents: Vec<_> = tree.values().flatten().cloned().collect();
    assert!(
        contents.contains(&"desktop version".to_string())
            && contents.contains(&"bob version".to_string())
    );
    let status: serde_json::Value = serde_json::from_str(&bob.run(&["status", "--json"])?)?;
    assert_eq!(
        status[0]["conflicts"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    Ok(())
}

#[test]
fn files_with_the_same_content_stay_separate_files() -> TestResult {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir()?;
    let (_hub, laptop, desktop, _bob) = team(root.path())?;
    for name in ["one.txt", "two.txt", "sub/three.txt"] {
        laptop.write(name, "the same words")?;
    }
    for name in ["empty-a", "empty-b"] {
        laptop.write(name, "")?;
    }
    sync_all(&[&laptop, &desktop])?;
    assert_eq!(laptop.tree(), desktop.tree());
    // Each path its own file: an edit in place of one must not show through another.
    for group in [
        &["one.txt", "two.txt", "sub/three.txt"][..],
        &["empty-a", "empty-b"],
    ] {
        let inodes: std::collections::HashSet<u64> = group
            .iter()
            .map(|name| std::fs::metadata(desktop.folder.join(name)).map(|m| m.ino()))
            .collect::<Result<_, _>>()?;
        assert_eq!(inodes.len(), group.len(), "{group:?} share an inode");
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(desktop.folder.join("one.txt"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b", and more"))?;
    assert_eq!(
        std::fs::read_to_string(desktop.folder.join("two.txt"))?,
        "the same words"
    );
    sync_all(&[&desktop, &laptop])?;
    assert_eq!(
        laptop.tree().get("one.txt"),
        Some(&Some("the same words, and more".into()))
    );
    assert_eq!(
        laptop.tree().get("two.txt"),
        Some(&Some("the same words".into()))
    );
    Ok(())
}

#[test]
fn agents_propagate_changes_without_polling_and_survive_the_hub_going_away() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, _desktop, bob) = team(root.path())?;
    let mut agents = Vec::new();
    for device in [&laptop, &bob] {
        agents.push(
            device
                .command(&["agent"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
    }
    let stop = |agents: &mut Vec<std::process::Child>| {
        for agent in agents.iter_mut() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    };
    laptop.write("live.txt", "via the agents")?;
    let arrived = wait_for(Duration::from_secs(20), || {
        bob.folder.join("live.txt").exists()
    });

    // The hub goes down: local work goes on, and flows once it is back.
    let port = hub.port;
    let data = hub.data.clone();
    hub.stop();
    laptop.write("offline.txt", "written while the hub was down")?;
    std::thread::sleep(Duration::from_millis(500));
    let _hub = Hub::start_on(&data, port)?;
    let caught_up = wait_for(Duration::from_secs(30), || {
        bob.folder.join("offline.txt").exists()
    });
    stop(&mut agents);
    assert!(arrived, "a change did not reach the other agent");
    assert!(
        caught_up,
        "a change made while the hub was down did not arrive after it came back"
    );
    Ok(())
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn a_device_restored_from_a_backup_starts_a_new_epoch_and_catches_up() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, _desktop, bob) = team(root.path())?;
    laptop.write("f1.txt", "one")?;
    laptop.sync()?;
    let backup = root.path().join("laptop-backup");
    copy_tree(&laptop.folder, &backup)?;
    let restore = || -> TestResult {
        std::fs::remove_dir_all(&laptop.folder)?;
        copy_tree(&backup, &laptop.folder)?;
        Ok(())
    };

    laptop.write("f2.txt", "two")?;
    laptop.sync()?;
    // Restored once: the hub has seen writes the laptop no longer has.
    restore()?;
    let summary = laptop.sync()?;
    assert_eq!(summary[0]["new_epoch"], true, "{summary}");
    laptop.write("f3.txt", "three")?;
    laptop.sync()?;
    // Restored again, to a copy older than the epoch it has since synced in: the hub answers
    // 409 and the laptop moves to an epoch it never used.
    restore()?;
    let summary = laptop.sync()?;
    assert_eq!(summary[0]["new_epoch"], true, "{summary}");
    laptop.write("f4.txt", "four")?;
    sync_all(&[&laptop, &bob])?;
    let tree = bob.tree();
    assert_eq!(laptop.tree(), tree);
    for (name, text) in [
        ("f1.txt", "one"),
        ("f2.txt", "two"),
        ("f3.txt", "three"),
        ("f4.txt", "four"),
    ] {
        assert_eq!(tree.get(name), Some(&Some(text.to_string())), "{tree:?}");
    }
    assert!(
        !tree.keys().any(|k| k.contains(".conflict-")),
        "a reused dot made a false conflict: {tree:?}"
    );
    Ok(())
}

fn bytes_fetched(summary: &serde_json::Value) -> u64 {
    summary.as_array().map_or(0, |rounds| {
        rounds
            .iter()
            .map(|r| {
                r["bytes_from_hub"].as_u64().unwrap_or(0)
                    + r["bytes_from_peers"].as_u64().unwrap_or(0)
            })
            .sum()
    })
}

#[test]
fn a_large_file_changed_in_the_middle_moves_only_the_changed_chunks() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, desktop, _bob) = team(root.path())?;
    let token = laptop.token()?;
    let mut big = noise(24 << 20, 6);
    std::fs::write(laptop.folder.join("big.bin"), &big)?;
    laptop.sync()?;
    let first = desktop.sync()?;
    assert_eq!(std::fs::read(desktop.folder.join("big.bin"))?, big);
    assert!(bytes_fetched(&first) >= big.len() as u64, "{first}");

    let traffic = || -> AnyResult<u64> {
        Ok(hub_metric(&hub.url, &token, "bytes_in")? + hub_metric(&hub.url, &token, "bytes_out")?)
    };

    // 100 KiB overwritten in the middle: the laptop uploads and the desktop fetches only the
    // chunks around it; the rest comes from the desktop's own copy. The new chunk list (about
    // 34 kB whole) travels both ways as an edit of the old one.
    let puts = hub_metric(&hub.url, &token, "chunk_puts")?;
    let before = traffic()?;
    big[12 << 20..(12 << 20) + (100 << 10)].copy_from_slice(&noise(100 << 10, 7));
    std::fs::write(laptop.folder.join("big.bin"), &big)?;
    laptop.sync()?;
    let uploaded = hub_metric(&hub.url, &token, "chunk_puts")? - puts;
    let second = desktop.sync()?;
    assert_eq!(std::fs::read(desktop.folder.join("big.bin"))?, big);
    let fetched = bytes_fetched(&second);
    assert!(
        fetched > 0 && fetched < 1 << 20,
        "{fetched} bytes fetched for a 100 KiB change: {second}"
    );
    assert!(
        uploaded <= 8,
        "{uploaded} chunks uploaded for a 100 KiB change"
    );
    let besides_chunks = (traffic()? - before).saturating_sub(2 * fetched);
    eprintln!("change: {besides_chunks} bytes through the hub besides the chunks");
    assert!(
        besides_chunks < 32 << 10,
        "{besides_chunks} bytes besides the chunks for a 100 KiB change in a 24 MiB file"
    );

    // Renamed: the hub and the desktop already hold the content and its chunk list, so
    // neither the content nor the list travels.
    let before = traffic()?;
    std::fs::create_dir_all(laptop.folder.join("archive"))?;
    std::fs::rename(
        laptop.folder.join("big.bin"),
        laptop.folder.join("archive/big-moved.bin"),
    )?;
    laptop.sync()?;
    let third = desktop.sync()?;
    assert_eq!(
        std::fs::read(desktop.folder.join("archive/big-moved.bin"))?,
        big
    );
    assert!(!desktop.folder.join("big.bin").exists());
    assert_eq!(bytes_fetched(&third), 0, "{third}");
    let moved = traffic()? - before;
    eprintln!("rename: {moved} bytes through the hub");
    assert!(
        moved < 32 << 10,
        "{moved} bytes through the hub for a rename of a 24 MiB file"
    );

    // Asked about a content it does not hold, the hub says so; a malformed list is refused.
    let workspaces: serde_json::Value =
        serde_json::from_str(&laptop.run(&["workspace", "list", "--json"])?)?;
    let ws = workspaces[0]["id"].as_str().ok_or("no workspace id")?;
    shoal_agent::install_default_provider();
    let ask = |contents: Vec<String>| -> AnyResult<reqwest::blocking::Response> {
        Ok(reqwest::blocking::Client::new()
            .post(format!("{}/v1/workspaces/{ws}/contents/known", hub.url))
            .bearer_auth(&token)
            .header("shoal-replica", "11".repeat(16))
            .header("shoal-epoch", "0")
            .json(&serde_json::json!({ "contents": contents }))
            .send()?)
    };
    let unknown = "ab".repeat(32);
    let answer: serde_json::Value = ask(vec![unknown])?.json()?;
    assert_eq!(answer["contents"], serde_json::json!([]), "{answer}");
    assert_eq!(ask(vec!["not hex".into()])?.status().as_u16(), 400);
    Ok(())
}

/// A download of several batches whose last batch holds an edit of a large file this device
/// holds: that batch's chunk lists are read from the replica (the download otherwise commits
/// one batch while staging the next), and the edit still travels as its changed chunks.
#[test]
fn a_later_batch_that_edits_a_held_file_follows_the_batches_before_it() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, desktop, _bob) = team(root.path())?;
    let mut big = noise(4 << 20, 11);
    std::fs::write(laptop.folder.join("big.bin"), &big)?;
    laptop.sync()?;
    desktop.sync()?;
    assert_eq!(std::fs::read(desktop.folder.join("big.bin"))?, big);

    // More files than a batch holds (2,000), recorded before the edit, so the edit comes in
    // the last batch.
    let count = 2_100;
    let staging = root.path().join("many");
    for i in 0..count {
        let dir = staging.join(format!("d{:02}", i % 21));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("f{i}.txt")), format!("file {i}"))?;
    }
    std::fs::rename(&staging, laptop.folder.join("many"))?;
    laptop.sync()?;
    big[2 << 20..(2 << 20) + (64 << 10)].copy_from_slice(&noise(64 << 10, 12));
    std::fs::write(laptop.folder.join("big.bin"), &big)?;
    laptop.sync()?;

    let summary = desktop.sync()?;
    assert_eq!(std::fs::read(desktop.folder.join("big.bin"))?, big);
    for i in 0..count {
        let path = desktop.folder.join(format!("many/d{:02}/f{i}.txt", i % 21));
        assert_eq!(std::fs::read_to_string(&path)?, format!("file {i}"));
    }
    // The edit came as its changed chunks, read against the desktop's own copy.
    let fetched = bytes_fetched(&summary);
    assert!(fetched < 1 << 20, "{fetched} bytes fetched: {summary}");
    Ok(())
}
