//! Topologies beyond one hub, with real processes on 127.0.0.1: two hubs partnered on a
//! workspace (configured on `shoal hub`), and a device syncing with both, carrying only its
//! replica's knowledge from one to the other.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{AnyResult, Device, Hub, TestResult, wait_for};

struct World {
    _hub_a: Hub,
    _hub_b: Hub,
    /// alice at hub A.
    laptop: Device,
    /// bob at hub B.
    phone: Device,
    /// alice at A and bob at B, one folder.
    roamer: Device,
}

fn world(root: &std::path::Path) -> AnyResult<World> {
    let (data_a, data_b) = (root.join("hub-a"), root.join("hub-b"));
    Hub::add_user(&data_a, "alice", "alice-pw")?;
    Hub::add_user(&data_a, "relay", "relay-pw")?;
    Hub::add_user(&data_b, "bob", "bob-pw")?;
    let hub_a = Hub::start(&data_a)?;

    let laptop = Device::new(root, "laptop");
    laptop.login(&hub_a, "alice", "alice-pw", "laptop")?;
    laptop.create("team")?;
    laptop.write("plan.txt", "from the start")?;
    laptop.sync()?;
    laptop.run(&["workspace", "invite", "team", "relay"])?;
    let relay = Device::new(root, "relay");
    relay.login(&hub_a, "relay", "relay-pw", "relay")?;
    relay.join("team")?;

    // Hub B holds team too, owned there by bob, syncing with A as "relay".
    let output = support::shoal()
        .args([
            "hub", "partner", "add", &hub_a.url, "relay", "team", "--owner", "bob", "--data",
        ])
        .arg(&data_b)
        .env("SHOAL_PASSWORD", "relay-pw")
        .output()?;
    support::check(&output)?;
    let hub_b = Hub::start(&data_b)?;

    let phone = Device::new(root, "phone");
    phone.login(&hub_b, "bob", "bob-pw", "phone")?;
    phone.join("team")?;

    let roamer = Device::new(root, "roamer");
    roamer.login(&hub_a, "alice", "alice-pw", "roamer")?;
    roamer.login(&hub_b, "bob", "bob-pw", "roamer")?;
    roamer.join("team")?;
    let path = roamer.folder.display().to_string();
    roamer.run(&[
        "workspace",
        "join",
        "team",
        "--path",
        &path,
        "--hub",
        &hub_b.url,
    ])?;
    Ok(World {
        _hub_a: hub_a,
        _hub_b: hub_b,
        laptop,
        phone,
        roamer,
    })
}

fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (!v.is_empty()).then(|| (*v).to_owned())))
        .collect()
}

/// Syncs every device until all hold `expected` (the partner hubs catch up on their own).
fn converge(world: &World, expected: &BTreeMap<String, Option<String>>) -> TestResult {
    let devices = [&world.laptop, &world.phone, &world.roamer];
    let done = wait_for(Duration::from_secs(30), || {
        devices.iter().all(|d| d.sync().is_ok()) && devices.iter().all(|d| d.tree() == *expected)
    });
    if !done {
        let trees: Vec<_> = devices.iter().map(|d| d.tree()).collect();
        return Err(format!("no convergence: expected {expected:?}, got {trees:?}").into());
    }
    Ok(())
}

#[test]
fn partnered_hubs_and_a_device_on_both_converge_as_one_hub_would() -> TestResult {
    let root = tempfile::tempdir()?;
    let world = world(root.path())?;
    converge(&world, &files(&[("plan.txt", "from the start")]))?;

    // The hubs alone carry changes between their devices (the roamer stays out of it).
    world.laptop.write("via-partners.txt", "A to B")?;
    world.phone.write("back.txt", "B to A")?;
    let pair = [&world.laptop, &world.phone];
    let carried = wait_for(Duration::from_secs(30), || {
        pair.iter().all(|d| d.sync().is_ok())
            && pair.iter().all(|d| {
                d.folder.join("via-partners.txt").exists() && d.folder.join("back.txt").exists()
            })
    });
    assert!(
        carried,
        "the partner hubs did not carry changes between their devices"
    );
    std::fs::remove_file(world.laptop.folder.join("via-partners.txt"))?;
    std::fs::remove_file(world.laptop.folder.join("back.txt"))?;
    converge(&world, &files(&[("plan.txt", "from the start")]))?;

    // Changes at both hubs and on the device that uses both.
    world
        .laptop
        .write("from-a.txt", "written at hub A's side")?;
    world.phone.write("from-b.txt", "written at hub B's side")?;
    world
        .roamer
        .write("docs/roaming.txt", "written on the roamer")?;
    converge(
        &world,
        &files(&[
            ("plan.txt", "from the start"),
            ("from-a.txt", "written at hub A's side"),
            ("from-b.txt", "written at hub B's side"),
            ("docs", ""),
            ("docs/roaming.txt", "written on the roamer"),
        ]),
    )?;

    // Edits, a rename and a delete, each from a different side.
    world.phone.write("plan.txt", "edited on bob's phone")?;
    std::fs::rename(
        world.laptop.folder.join("from-b.txt"),
        world.laptop.folder.join("docs/from-b.txt"),
    )?;
    std::fs::remove_file(world.roamer.folder.join("from-a.txt"))?;
    let expected = files(&[
        ("plan.txt", "edited on bob's phone"),
        ("docs", ""),
        ("docs/from-b.txt", "written at hub B's side"),
        ("docs/roaming.txt", "written on the roamer"),
    ]);
    converge(&world, &expected)?;

    // Settled: a round with both hubs moves nothing, at either.
    let summary = world.roamer.sync()?;
    let rounds = summary.as_array().ok_or("no summary")?;
    assert_eq!(
        rounds.len(),
        2,
        "the roamer syncs with both hubs: {summary}"
    );
    for round in rounds {
        assert_eq!(round["uploaded"], 0, "{summary}");
        assert_eq!(round["downloaded"], 0, "{summary}");
    }
    for device in [&world.laptop, &world.phone, &world.roamer] {
        assert!(
            device
                .tree()
                .keys()
                .all(|name| !name.contains(".conflict-")),
            "a false conflict on {}",
            device.folder.display()
        );
    }
    Ok(())
}
