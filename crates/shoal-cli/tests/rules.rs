//! Validation rules an owner sets on a workspace, with real processes on 127.0.0.1: each rule
//! refuses a change that breaks it; the refused version is kept, with the reason, on the hub
//! and on the author's device; nothing else is affected.

mod support;

use support::{AnyResult, Device, Hub, TestResult};

fn team(root: &std::path::Path) -> AnyResult<(Hub, Device, Device)> {
    let data = root.join("hub");
    Hub::add_user(&data, "alice", "alice-pw")?;
    Hub::add_user(&data, "bob", "bob-pw")?;
    let hub = Hub::start(&data)?;
    let (laptop, phone) = (Device::new(root, "laptop"), Device::new(root, "phone"));
    laptop.login(&hub, "alice", "alice-pw", "laptop")?;
    phone.login(&hub, "bob", "bob-pw", "phone")?;
    laptop.create("team")?;
    laptop.run(&["workspace", "invite", "team", "bob", "--role", "editor"])?;
    phone.join("team")?;
    Ok((hub, laptop, phone))
}

fn refused(summary: &serde_json::Value) -> Vec<(String, String)> {
    summary
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|round| round["refused"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_owned(),
                r["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn each_rule_refuses_a_change_and_the_author_keeps_it() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, phone) = team(root.path())?;
    laptop.write("readme.txt", "rules apply")?;
    laptop.sync()?;
    phone.sync()?;

    // Only an owner sets rules; anyone in the workspace can read them.
    let denied = phone
        .command(&["workspace", "rules", "team", "--max-file-size", "1K"])
        .output()?;
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("only an owner"));
    let bad = laptop
        .command(&["workspace", "rules", "team", "--forbid", "a/b"])
        .output()?;
    assert!(!bad.status.success(), "a pattern with '/' was accepted");
    laptop.run(&[
        "workspace",
        "rules",
        "team",
        "--max-file-size",
        "1K",
        "--forbid",
        "*.exe",
        "--quota",
        "5K",
    ])?;
    let rules: serde_json::Value =
        serde_json::from_str(&phone.run(&["workspace", "rules", "team", "--json"])?)?;
    assert_eq!(rules["max_file_size"], 1024, "{rules}");
    assert_eq!(rules["forbidden"], serde_json::json!(["*.exe"]), "{rules}");
    assert_eq!(rules["quota_bytes"], 5120, "{rules}");

    // Bob breaks each rule once, beside a change that is fine.
    phone.write("big.bin", &"x".repeat(2000))?;
    phone.write("tool.EXE", "MZ")?;
    phone.write("fine.txt", "within the rules")?;
    let summary = phone.sync()?;
    let mut got = refused(&summary);
    got.sort();
    assert_eq!(got.len(), 2, "{summary}");
    assert_eq!(got[0].0, "big.bin");
    assert!(got[0].1.contains("limit of 1024 bytes"), "{got:?}");
    assert_eq!(got[1].0, "tool.EXE");
    assert!(got[1].1.contains("*.exe"), "{got:?}");

    // The quota counts distinct content once: 5 KiB holds five more 1000-byte files, not six.
    for i in 0..6 {
        phone.write(&format!("part{i}.txt"), &format!("{i}").repeat(1000))?;
    }
    let summary = phone.sync()?;
    let over_quota = refused(&summary);
    assert!(
        !over_quota.is_empty()
            && over_quota
                .iter()
                .all(|(_, r)| r.contains("quota of 5120 bytes")),
        "{summary}"
    );

    // The author keeps every refused version, and status says why; the others never get it.
    for name in ["big.bin", "tool.EXE"] {
        assert!(
            phone.folder.join(name).exists(),
            "{name} gone from the author's device"
        );
    }
    let status: serde_json::Value = serde_json::from_str(&phone.run(&["status", "--json"])?)?;
    let listed = status[0]["refused"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(listed, 2 + over_quota.len(), "{status}");
    laptop.sync()?;
    let tree = laptop.tree();
    assert!(tree.contains_key("fine.txt"));
    assert!(
        !tree.contains_key("big.bin") && !tree.contains_key("tool.EXE"),
        "{tree:?}"
    );
    let arrived = (0..6)
        .filter(|i| tree.contains_key(&format!("part{i}.txt")))
        .count();
    assert_eq!(arrived + over_quota.len(), 6, "{tree:?}");
    // A second round sends nothing refused again.
    let again = phone.sync()?;
    assert_eq!(again[0]["uploaded"], 0, "{again}");
    assert!(refused(&again).is_empty(), "{again}");
    Ok(())
}

fn refused_names(device: &Device) -> AnyResult<Vec<String>> {
    let status: serde_json::Value = serde_json::from_str(&device.run(&["status", "--json"])?)?;
    let mut names: Vec<String> = status[0]["refused"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

#[test]
fn refusals_reach_every_device_even_through_a_peer_and_an_owner_can_lift_one() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, phone) = team(root.path())?;
    Hub::add_user(&hub.data, "carol", "carol-pw")?;
    let tablet = Device::new(root.path(), "tablet");
    tablet.login(&hub, "carol", "carol-pw", "tablet")?;
    laptop.run(&["workspace", "invite", "team", "carol", "--role", "reader"])?;
    tablet.join("team")?;
    laptop.write("readme.txt", "hello")?;
    for device in [&laptop, &phone, &tablet] {
        device.sync()?;
    }
    laptop.run(&["workspace", "rules", "team", "--forbid", "*.exe"])?;

    // Carol (a reader) writes; alice's laptop accepts it peer-to-peer and passes it on to the
    // hub, which judges it by its author: refused.
    let agents = [
        support::Agent::start(&laptop, &[])?,
        support::Agent::start(&tablet, &[])?,
    ];
    assert!(
        support::wait_for(std::time::Duration::from_secs(20), || agents
            .iter()
            .all(|a| a.reachable_contacts() >= 1)),
        "the agents did not learn of each other"
    );
    tablet.write("from-a-reader.txt", "a reader's words")?;
    assert!(
        support::wait_for(std::time::Duration::from_secs(10), || laptop
            .folder
            .join("from-a-reader.txt")
            .exists()),
        "the laptop did not accept the reader's change peer-to-peer"
    );
    // Bob (an editor) breaks a rule; his phone has no agent.
    phone.write("setup.exe", "MZ")?;
    phone.sync()?;
    let everyone = [&laptop, &phone, &tablet];
    let expected = vec!["from-a-reader.txt".to_owned(), "setup.exe".to_owned()];
    let reached = support::wait_for(std::time::Duration::from_secs(20), || {
        everyone
            .iter()
            .all(|d| d.sync().is_ok() && refused_names(d).is_ok_and(|names| names == expected))
    });
    assert!(
        reached,
        "refusals not on every device: laptop {:?}, phone {:?}, tablet {:?}\n{}",
        refused_names(&laptop),
        refused_names(&phone),
        refused_names(&tablet),
        agents[0].log()
    );
    for agent in agents {
        agent.stop();
    }
    // Kept where they were written or accepted; never spread to the others.
    assert!(tablet.folder.join("from-a-reader.txt").exists());
    assert!(laptop.folder.join("from-a-reader.txt").exists());
    assert!(!phone.folder.join("from-a-reader.txt").exists());
    assert!(phone.folder.join("setup.exe").exists());
    assert!(!laptop.folder.join("setup.exe").exists());
    let listed: serde_json::Value = serde_json::from_str(&laptop.run(&["conflicts", "--json"])?)?;
    let kinds: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["refused", "refused"], "{listed}");

    // Only an owner lifts a refusal; after the rule changes, the lifted version goes through.
    let list: serde_json::Value =
        serde_json::from_str(&laptop.run(&["workspace", "refusals", "team", "--json"])?)?;
    let exe = list
        .as_array()
        .and_then(|l| l.iter().find(|r| r["name"] == "setup.exe"))
        .and_then(|r| r["version"].as_str())
        .ok_or("setup.exe not listed")?
        .to_owned();
    assert!(
        !phone
            .command(&["workspace", "refusals", "team", "--lift", &exe])
            .output()?
            .status
            .success(),
        "an editor lifted a refusal"
    );
    laptop.run(&["workspace", "rules", "team", "--allow", "*.exe"])?;
    laptop.run(&["workspace", "refusals", "team", "--lift", &exe])?;
    phone.sync()?;
    laptop.sync()?;
    assert_eq!(
        std::fs::read_to_string(laptop.folder.join("setup.exe"))?,
        "MZ",
        "the lifted version did not arrive"
    );
    assert_eq!(refused_names(&phone)?, vec!["from-a-reader.txt".to_owned()]);
    assert_eq!(
        refused_names(&laptop)?,
        vec!["from-a-reader.txt".to_owned()]
    );
    Ok(())
}
