//! Conflicts a person can see and settle, with real processes on 127.0.0.1: every kind arises
//! through the hub and peer-to-peer, is listed identically on every device, and is settled
//! from any device, after which it is gone everywhere.

mod support;

use std::time::Duration;

use support::{Agent, AnyResult, Device, Hub, TestResult, team, wait_for};

fn sync_all(devices: &[&Device]) -> TestResult {
    for _ in 0..2 {
        for device in devices {
            device.sync()?;
        }
    }
    Ok(())
}

fn conflicts(device: &Device) -> AnyResult<serde_json::Value> {
    Ok(serde_json::from_str(
        &device.run(&["conflicts", "--json"])?,
    )?)
}

/// The conflict list, the same on every device.
fn listed_alike(devices: &[&Device]) -> AnyResult<serde_json::Value> {
    let first = conflicts(devices[0])?;
    for device in &devices[1..] {
        assert_eq!(
            conflicts(device)?,
            first,
            "{} lists differently",
            device.folder.display()
        );
    }
    Ok(first)
}

fn read(device: &Device, path: &str) -> Option<String> {
    std::fs::read_to_string(device.folder.join(path)).ok()
}

#[test]
fn every_kind_through_the_hub_is_listed_alike_and_settled_from_any_device() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, desktop, phone) = team(root.path())?;
    let all = [&laptop, &desktop, &phone];
    laptop.write("notes.txt", "v0")?;
    laptop.write("gone.txt", "soon deleted")?;
    laptop.write("moved.txt", "moves twice")?;
    laptop.write("merge.txt", "base")?;
    std::fs::create_dir_all(laptop.folder.join("a"))?;
    std::fs::create_dir_all(laptop.folder.join("b"))?;
    sync_all(&all)?;
    assert_eq!(listed_alike(&all)?, serde_json::json!([]));

    // Concurrent changes on alice's laptop and bob's phone, of every kind.
    laptop.write("notes.txt", "laptop's edit")?;
    phone.write("notes.txt", "phone's longer edit")?;
    std::fs::remove_file(laptop.folder.join("gone.txt"))?;
    phone.write("gone.txt", "edited while deleted")?;
    std::fs::rename(
        laptop.folder.join("moved.txt"),
        laptop.folder.join("a/moved.txt"),
    )?;
    std::fs::rename(
        phone.folder.join("moved.txt"),
        phone.folder.join("b/moved.txt"),
    )?;
    laptop.write("same.txt", "the laptop's same")?;
    phone.write("same.txt", "the phone's same")?;
    laptop.write("merge.txt", "laptop side")?;
    phone.write("merge.txt", "phone side")?;
    sync_all(&all)?;

    let listed = listed_alike(&all)?;
    let kinds: Vec<(String, String)> = listed
        .as_array()
        .ok_or("not a list")?
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap_or("").to_owned(),
                c["kind"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for (path, kind) in [
        ("gone.txt", "edit/delete"),
        ("merge.txt", "edit/edit"),
        ("notes.txt", "edit/edit"),
        ("same.txt", "name"),
    ] {
        assert!(
            kinds.contains(&(path.to_owned(), kind.to_owned())),
            "{path} not listed as {kind}: {listed}"
        );
    }
    assert!(
        kinds
            .iter()
            .any(|(path, kind)| path.ends_with("moved.txt") && kind == "move"),
        "no move conflict: {listed}"
    );
    // Each version says who wrote it, when, how big, and which is shown.
    let notes = listed
        .as_array()
        .and_then(|l| l.iter().find(|c| c["path"] == "notes.txt"))
        .ok_or("no notes.txt")?;
    let versions = notes["versions"].as_array().ok_or("no versions")?;
    assert_eq!(versions.len(), 2, "{notes}");
    assert_eq!(versions[0]["winner"], true);
    let mut authors: Vec<(String, String)> = versions
        .iter()
        .map(|v| {
            (
                v["user"].as_str().unwrap_or("").to_owned(),
                v["device"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    authors.sort();
    assert_eq!(
        authors,
        vec![
            ("alice".to_owned(), "laptop".to_owned()),
            ("bob".to_owned(), "phone".to_owned())
        ]
    );
    assert!(
        versions
            .iter()
            .all(|v| v["size"].as_u64().is_some() && v["written_at"].is_string())
    );
    let loser_text = if versions[1]["device"] == "phone" {
        "phone's longer edit"
    } else {
        "laptop's edit"
    };

    // Settled from the desktop, which wrote none of them.
    desktop.run(&["resolve", "notes.txt", "--keep", "2"])?;
    desktop.run(&["resolve", "gone.txt", "--keep", "1"])?;
    desktop.run(&["resolve", "same.txt", "--both"])?;
    let moved = kinds
        .iter()
        .find(|(path, kind)| path.ends_with("moved.txt") && kind == "move")
        .map(|(path, _)| path.clone())
        .ok_or("no move")?;
    desktop.run(&["resolve", &moved, "--keep", "1"])?;
    let merged = root.path().join("merged.txt");
    std::fs::write(&merged, "laptop side + phone side")?;
    let merged_arg = merged.display().to_string();
    desktop.run(&["resolve", "merge.txt", "--merged", &merged_arg])?;
    sync_all(&all)?;

    assert_eq!(
        listed_alike(&all)?,
        serde_json::json!([]),
        "conflicts left after resolving"
    );
    for device in all {
        assert_eq!(read(device, "notes.txt").as_deref(), Some(loser_text));
        assert_eq!(
            read(device, "gone.txt").as_deref(),
            Some("edited while deleted")
        );
        assert_eq!(
            read(device, "merge.txt").as_deref(),
            Some("laptop side + phone side")
        );
        assert_eq!(read(device, &moved).as_deref(), Some("moves twice"));
        let same: Vec<String> = device
            .tree()
            .into_iter()
            .filter(|(p, _)| p.starts_with("same"))
            .filter_map(|(_, text)| text)
            .collect();
        assert_eq!(
            same.len(),
            2,
            "both same.txt kept on {}",
            device.folder.display()
        );
        assert!(
            device.tree().keys().all(|p| !p.contains(".conflict-")),
            "a conflict copy is left on {}: {:?}",
            device.folder.display(),
            device.tree().keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(laptop.tree(), phone.tree());
    assert_eq!(laptop.tree(), desktop.tree());
    Ok(())
}

fn free_port() -> AnyResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn every_kind_made_peer_to_peer_is_listed_alike_and_settled_peer_to_peer() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, _desktop, phone) = team(root.path())?;
    laptop.write("plan.txt", "first")?;
    laptop.write("gone.txt", "soon deleted")?;
    laptop.write("moved.txt", "moves twice")?;
    laptop.sync()?;
    phone.sync()?;
    // Fixed ports, so the agents find each other again after a restart without the hub.
    let ports = [free_port()?, free_port()?];
    let listen = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let start = |device: &Device, i: usize| Agent::start(device, &["--listen", &listen(i)]);
    let agents = [start(&laptop, 0)?, start(&phone, 1)?];
    assert!(
        wait_for(Duration::from_secs(20), || agents
            .iter()
            .all(|a| a.reachable_contacts() >= 1)),
        "the agents did not learn of each other"
    );
    for agent in agents {
        agent.stop();
    }
    // No hub, and both devices change the same things before they meet again.
    let (port, data) = (hub.port, hub.data.clone());
    hub.stop();
    laptop.write("plan.txt", "alice's plan")?;
    phone.write("plan.txt", "bob's plan")?;
    std::fs::remove_file(laptop.folder.join("gone.txt"))?;
    phone.write("gone.txt", "edited while deleted")?;
    std::fs::rename(
        laptop.folder.join("moved.txt"),
        laptop.folder.join("moved-by-alice.txt"),
    )?;
    std::fs::rename(
        phone.folder.join("moved.txt"),
        phone.folder.join("moved-by-bob.txt"),
    )?;
    laptop.write("same.txt", "alice's same")?;
    phone.write("same.txt", "bob's same")?;
    let agents = [start(&laptop, 0)?, start(&phone, 1)?];
    let both = [&laptop, &phone];
    let met = wait_for(Duration::from_secs(20), || {
        both.iter()
            .all(|d| conflicts(d).is_ok_and(|c| c.as_array().is_some_and(|l| l.len() == 4)))
            && listed_alike(&both).is_ok()
    });
    assert!(
        met,
        "the conflicts did not meet on both: {:?} / {:?}\n{}\n{}",
        laptop.tree().keys().collect::<Vec<_>>(),
        phone.tree().keys().collect::<Vec<_>>(),
        agents[0].log(),
        agents[1].log()
    );
    let listed = listed_alike(&both)?;
    let mut kinds: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["kind"].as_str())
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["edit/delete", "edit/edit", "move", "name"],
        "{listed}"
    );
    let moved = listed
        .as_array()
        .and_then(|l| l.iter().find(|c| c["kind"] == "move"))
        .and_then(|c| c["path"].as_str())
        .ok_or("no move")?
        .to_owned();

    // Bob settles them on his phone; the laptop hears of it directly.
    phone.run(&["resolve", "plan.txt", "--both", "--no-sync"])?;
    phone.run(&["resolve", "gone.txt", "--keep", "2", "--no-sync"])?;
    phone.run(&["resolve", &moved, "--keep", "1", "--no-sync"])?;
    phone.run(&["resolve", "same.txt", "--keep", "1", "--no-sync"])?;
    let settled = wait_for(Duration::from_secs(20), || {
        both.iter()
            .all(|d| conflicts(d).is_ok_and(|c| c == serde_json::json!([])))
            && laptop.tree() == phone.tree()
    });
    assert!(
        settled,
        "not settled on both:\n{:?}\n{:?}\n{:?}\n{:?}\n{}\n{}",
        conflicts(&laptop),
        conflicts(&phone),
        laptop.tree(),
        phone.tree(),
        agents[0].log(),
        agents[1].log()
    );
    let texts: Vec<String> = laptop.tree().into_values().flatten().collect();
    assert!(texts.contains(&"alice's plan".to_owned()) && texts.contains(&"bob's plan".to_owned()));
    assert!(
        !laptop.folder.join("gone.txt").exists(),
        "the deletion was kept"
    );
    assert_eq!(texts.iter().filter(|t| *t == "moves twice").count(), 1);
    assert_eq!(
        texts.iter().filter(|t| t.ends_with("same")).count(),
        1,
        "one same.txt kept: {texts:?}"
    );

    // The hub comes back and agrees.
    let hub = Hub::start_on(&data, port)?;
    let tablet = Device::new(root.path(), "tablet");
    tablet.login(&hub, "bob", "bob-pw", "tablet")?;
    tablet.join("team")?;
    let caught_up = wait_for(Duration::from_secs(30), || {
        tablet.sync().is_ok() && tablet.tree() == laptop.tree()
    });
    assert!(caught_up, "the hub did not catch up with the resolutions");
    assert_eq!(conflicts(&tablet)?, serde_json::json!([]));
    Ok(())
}

/// Every version a device's replica holds now: (item, dot, version).
fn held(device: &Device) -> AnyResult<Vec<(shoal_core::ItemId, shoal_core::Version)>> {
    let store = shoal_store::Store::open(&device.folder.join(".shoal").join("state.db"), "test")?;
    let mut out = Vec::new();
    for (item, state) in store.load_items()? {
        for version in state.versions() {
            out.push((item, version.clone()));
        }
    }
    for (item, version, _) in store.refused()? {
        out.push((item, version));
    }
    Ok(out)
}

#[test]
fn no_version_written_is_lost_by_a_conflict_or_its_resolution() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, desktop, phone) = team(root.path())?;
    let all = [&laptop, &desktop, &phone];
    let mut seen: Vec<(shoal_core::ItemId, shoal_core::Version)> = Vec::new();
    let mut step = |devices: &[&Device]| -> TestResult {
        for _ in 0..2 {
            for device in devices {
                device.sync()?;
                seen.extend(held(device)?);
            }
        }
        Ok(())
    };
    laptop.write("a.txt", "a0")?;
    laptop.write("b.txt", "b0")?;
    laptop.write("c.txt", "c0")?;
    step(&all)?;
    // Three rounds of colliding edits, deletes and renames, each settled a different way.
    laptop.write("a.txt", "a from the laptop")?;
    phone.write("a.txt", "a from the phone")?;
    desktop.write("a.txt", "a from the desktop")?;
    std::fs::remove_file(phone.folder.join("b.txt"))?;
    laptop.write("b.txt", "b edited")?;
    std::fs::rename(
        laptop.folder.join("c.txt"),
        laptop.folder.join("c-laptop.txt"),
    )?;
    std::fs::rename(phone.folder.join("c.txt"), phone.folder.join("c-phone.txt"))?;
    step(&all)?;
    phone.run(&["resolve", "a.txt", "--both"])?;
    laptop.run(&["resolve", "b.txt", "--keep", "1"])?;
    let listed = conflicts(&desktop)?;
    let moved = listed
        .as_array()
        .and_then(|l| l.iter().find(|c| c["kind"] == "move"))
        .ok_or_else(|| format!("no move conflict: {listed}"))?;
    let path = moved["path"].as_str().ok_or("no path")?.to_owned();
    desktop.run(&["resolve", &path, "--keep", "2"])?;
    step(&all)?;
    laptop.write("a.txt", "again from the laptop")?;
    phone.write("a.txt", "again from the phone")?;
    // A change the hub refuses is kept too.
    laptop.run(&["workspace", "rules", "team", "--forbid", "*.tmp"])?;
    phone.write("scratch.tmp", "refused, not lost")?;
    step(&all)?;
    let merged = root.path().join("merged.txt");
    std::fs::write(&merged, "merged at last")?;
    let merged = merged.display().to_string();
    desktop.run(&["resolve", "a.txt", "--merged", &merged])?;
    step(&all)?;

    // Every version ever held is current, superseded by a later version of its item, or kept
    // as refused (refused versions are in `held` too): none vanished.
    let mut finals = Vec::new();
    for device in all {
        finals.extend(held(device)?);
    }
    assert!(seen.len() > 10, "too few versions seen: {}", seen.len());
    let refused: Vec<shoal_core::Dot> = all
        .iter()
        .map(|d| {
            shoal_store::Store::open(&d.folder.join(".shoal").join("state.db"), "test")
                .and_then(|s| s.refused())
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .map(|(_, v, _)| v.dot)
        .collect();
    let scratch = seen
        .iter()
        .find(|(_, v)| v.entry.name == "scratch.tmp")
        .ok_or("the refused version was never seen")?;
    assert!(
        refused.contains(&scratch.1.dot),
        "the refused version is not kept as refused"
    );
    assert!(
        phone.folder.join("scratch.tmp").exists(),
        "the refused file left its author"
    );
    for (item, version) in &seen {
        let current = finals
            .iter()
            .any(|(i, v)| i == item && v.dot == version.dot);
        let superseded = finals
            .iter()
            .any(|(i, v)| i == item && v.context.contains(&version.dot));
        assert!(
            current || superseded,
            "version {:?} of {item} ({:?}, by {}) was lost",
            version.dot,
            version.entry.name,
            version.device
        );
    }
    // No conflict is left; the refusal is listed, alike on every device.
    let listed = listed_alike(&all)?;
    let kinds: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["refused"], "{listed}");
    // The two losing texts of the first round live on under names of their own (the winner's
    // name was edited again since).
    let texts: Vec<String> = laptop.tree().into_values().flatten().collect();
    let kept = [
        "a from the laptop",
        "a from the phone",
        "a from the desktop",
    ]
    .iter()
    .filter(|text| texts.iter().any(|t| t == *text))
    .count();
    assert_eq!(kept, 2, "{texts:?}");
    Ok(())
}
