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
