//! Peer-to-peer sync beside the hub, with real `shoal hub` and `shoal agent` processes on
//! 127.0.0.1 in temporary directories: agents serve the protocol to each other over TLS with
//! device keys the hub vouches for, hear of each other through presence, and tell each other
//! of changes with negotiation messages.

mod support;

use std::time::{Duration, Instant};

use support::{Agent, AnyResult, Device, Hub, TestResult, hub_metric, noise, wait_for};

/// alice on two devices and bob on one, all in workspace "team", synced once.
fn team(root: &std::path::Path) -> AnyResult<(Hub, Device, Device, Device)> {
    let (hub, laptop, desktop, phone) = support::team(root)?;
    laptop.write("start.txt", "before the agents")?;
    for device in [&laptop, &desktop, &phone] {
        device.sync()?;
    }
    Ok((hub, laptop, desktop, phone))
}

/// Waits until every agent knows the addresses of `contacts` other devices.
fn wait_for_contacts(agents: &[&Agent], contacts: usize) -> TestResult {
    let known = wait_for(Duration::from_secs(20), || {
        agents.iter().all(|a| a.reachable_contacts() >= contacts)
    });
    if !known {
        let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
        return Err(format!(
            "agents did not learn of each other:\n{}",
            logs.join("\n---\n")
        )
        .into());
    }
    Ok(())
}

fn conflict_copies(device: &Device) -> Vec<String> {
    device
        .tree()
        .into_keys()
        .filter(|name| name.contains(".conflict-"))
        .collect()
}

#[test]
fn peers_keep_syncing_while_the_hub_is_down_and_the_hub_catches_up() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, desktop, phone) = team(root.path())?;
    let agents = [
        Agent::start(&laptop, &[])?,
        Agent::start(&desktop, &[])?,
        Agent::start(&phone, &[])?,
    ];
    wait_for_contacts(&agents.iter().collect::<Vec<_>>(), 2)?;

    // With the hub up, a change goes straight to the peers.
    laptop.write("notes/live.txt", "from the laptop")?;
    let arrived = wait_for(Duration::from_secs(10), || {
        desktop.folder.join("notes/live.txt").exists()
            && phone.folder.join("notes/live.txt").exists()
    });
    assert!(
        arrived,
        "a change did not reach the peers:\n{}",
        agents[1].log()
    );
    // Counters reach agent.json within a second.
    assert!(
        wait_for(Duration::from_secs(5), || agents[1].counter("peer_pulls")
            + agents[2].counter("peer_pulls")
            > 0
            && agents[0].counter("peer_served") > 0),
        "the change did not travel peer-to-peer:\n{}\n---\n{}",
        agents[0].log(),
        agents[1].log()
    );

    // The hub goes down: the peers still exchange changes, both ways.
    let (port, data) = (hub.port, hub.data.clone());
    hub.stop();
    let token = laptop.token()?;
    laptop.write("while-down.txt", "the hub is gone")?;
    phone.write("from-phone.txt", "bob too")?;
    let started = Instant::now();
    let exchanged = wait_for(Duration::from_secs(10), || {
        [&laptop, &desktop, &phone].iter().all(|d| {
            d.folder.join("while-down.txt").exists() && d.folder.join("from-phone.txt").exists()
        })
    });
    assert!(
        exchanged,
        "peers did not sync without the hub:\n{}\n---\n{}",
        agents[0].log(),
        agents[2].log()
    );
    eprintln!("exchanged without the hub in {:?}", started.elapsed());

    // The hub returns and catches up from whoever has the changes; nothing is duplicated.
    let hub = Hub::start_on(&data, port)?;
    let caught_up = wait_for(Duration::from_secs(30), || {
        hub_metric(&hub.url, &token, "upload_commits").is_ok_and(|n| n > 0)
    });
    assert!(caught_up, "nobody uploaded to the returned hub");
    // A device that was never online with the others gets everything from the hub alone.
    let tablet = Device::new(root.path(), "tablet");
    tablet.login(&hub, "bob", "bob-pw", "tablet")?;
    tablet.join("team")?;
    let complete = wait_for(Duration::from_secs(30), || {
        tablet.sync().is_ok() && tablet.tree() == laptop.tree()
    });
    for agent in agents {
        agent.stop();
    }
    assert!(
        complete,
        "the hub did not catch up: {:?} vs {:?}",
        tablet.tree(),
        laptop.tree()
    );
    for device in [&laptop, &desktop, &phone, &tablet] {
        assert_eq!(
            device.tree(),
            laptop.tree(),
            "{} differs",
            device.folder.display()
        );
        assert!(
            conflict_copies(device).is_empty(),
            "false conflict on {}",
            device.folder.display()
        );
        let status: serde_json::Value = serde_json::from_str(&device.run(&["status", "--json"])?)?;
        assert_eq!(
            status[0]["conflicts"].as_array().map(Vec::len),
            Some(0),
            "{status}"
        );
    }
    Ok(())
}

#[test]
fn a_key_the_hub_did_not_vouch_for_gets_nothing() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, desktop, _phone) = team(root.path())?;
    let agents = [Agent::start(&laptop, &[])?, Agent::start(&desktop, &[])?];
    wait_for_contacts(&agents.iter().collect::<Vec<_>>(), 1)?;
    let state = agents[1].state().ok_or("no agent state")?;
    let address = state["listen"].as_str().ok_or("no address")?.to_owned();
    let key = state["key"].as_str().ok_or("no key")?.to_owned();
    let workspaces: serde_json::Value =
        serde_json::from_str(&laptop.run(&["workspace", "list", "--json"])?)?;
    let ws = workspaces[0]["id"]
        .as_str()
        .ok_or("no workspace id")?
        .to_owned();
    let request = shoal_protocol::DownloadRequest {
        knowledge: shoal_protocol::WireKnowledge(Vec::new()),
        limits: shoal_protocol::WireLimits {
            max_items: 100,
            max_bytes: 1 << 20,
        },
        held: Vec::new(),
    };

    // The laptop's own key, vouched for by the hub: served.
    let vouched = shoal_agent::Home::open(&laptop.home)?.identity()?;
    let client = shoal_agent::peer_client(&address, &vouched, &key)?;
    let answer = client.download(&ws, &request)?;
    assert!(
        !answer.batch.versions.is_empty(),
        "a vouched peer got nothing"
    );
    // Many chunks in one answer: every chunk of every content offered, each checked by the
    // client; contents the peer does not hold are left out; bad requests change nothing.
    let contents: Vec<shoal_core::ChunkedContent> = answer
        .batch
        .contents
        .iter()
        .map(shoal_core::ChunkedContent::try_from)
        .collect::<Result<_, _>>()?;
    let location = shoal_protocol::routes::peer_contents(&ws);
    let wanted: Vec<_> = contents
        .iter()
        .map(|c| (c.hash, c.chunks.iter().map(|k| k.hash).collect::<Vec<_>>()))
        .collect();
    let bundle = client.fetch_content_bundle(&location, &wanted)?;
    let expected: std::collections::HashSet<_> = wanted
        .iter()
        .flat_map(|(_, chunks)| chunks.clone())
        .collect();
    let served: std::collections::HashSet<_> = bundle.iter().map(|(hash, _)| *hash).collect();
    assert!(!expected.is_empty(), "the team's folder holds no content");
    assert_eq!(served, expected, "the peer left out chunks it holds");
    let unknown = shoal_core::ContentHash::of(b"nobody holds this");
    assert!(
        client
            .fetch_content_bundle(&location, &[(unknown, vec![unknown])])?
            .is_empty(),
        "served a content it does not hold"
    );
    // Contents the caller says it holds are named without their chunk lists.
    let held_request = shoal_protocol::DownloadRequest {
        held: contents
            .iter()
            .map(|c| shoal_protocol::hex32(&c.hash.0))
            .collect(),
        ..request.clone()
    };
    let named = client.download(&ws, &held_request)?.batch.contents;
    assert!(
        !named.is_empty() && named.iter().all(|c| c.held && c.chunks.is_empty()),
        "{named:?}"
    );
    let too_many = vec![(unknown, vec![unknown; 20_000])];
    assert!(
        client.fetch_content_bundle(&location, &too_many).is_err(),
        "an oversized fetch was answered"
    );

    // A fresh key nobody vouched for: the handshake fails, nothing is served.
    let refused_before = agents[1].counter("peer_refused");
    let stranger = shoal_agent::DeviceIdentity::generate()?;
    let client = shoal_agent::peer_client(&address, &stranger, &key)?;
    let error = client
        .download(&ws, &request)
        .expect_err("an unvouched key was served");
    assert!(
        matches!(error, shoal_agent::ClientError::Unreachable(_)),
        "{error}"
    );
    assert!(wait_for(Duration::from_secs(5), || agents[1]
        .counter("peer_refused")
        > refused_before));

    // A vouched key calling a server that is not the device it meant: refused by the client.
    let wrong = shoal_agent::peer_client(&address, &vouched, &stranger.fingerprint())?;
    assert!(
        wrong.download(&ws, &request).is_err(),
        "the client trusted the wrong server"
    );

    // A vouched peer asking about a workspace it does not share: not found.
    let made_up = "0123456789abcdef0123456789abcdef";
    let client = shoal_agent::peer_client(&address, &vouched, &key)?;
    let error = client
        .download(made_up, &request)
        .expect_err("served an unknown workspace");
    assert!(
        matches!(error, shoal_agent::ClientError::NotFound(_)),
        "{error}"
    );
    let error = client
        .fetch_content_bundle(&shoal_protocol::routes::peer_contents(made_up), &wanted)
        .expect_err("served chunks of an unknown workspace");
    assert!(
        matches!(error, shoal_agent::ClientError::NotFound(_)),
        "{error}"
    );
    Ok(())
}

#[test]
fn twenty_idle_agents_start_no_sync_session() -> TestResult {
    let root = tempfile::tempdir()?;
    let data = root.path().join("hub");
    let users: Vec<String> = (0..5).map(|u| format!("user{u}")).collect();
    for user in &users {
        Hub::add_user(&data, user, "pass")?;
    }
    let hub = Hub::start(&data)?;
    // Workspace k belongs to user k and is shared with user k+1; each workspace is held by
    // two devices of each of its two users: 20 devices, 5 workspaces.
    let mut devices = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for d in 0..4 {
            let device = Device::new(root.path(), &format!("u{u}d{d}"));
            device.login(&hub, user, "pass", &format!("u{u}d{d}"))?;
            devices.push((u, d, device));
        }
    }
    for (u, d, device) in &devices {
        if *d == 0 {
            device.create(&format!("ws{u}"))?;
            device.run(&[
                "workspace",
                "invite",
                &format!("ws{u}"),
                &users[(u + 1) % 5],
            ])?;
            device.write("readme.txt", &format!("workspace {u}"))?;
        }
    }
    for (u, d, device) in &devices {
        if *d == 1 {
            device.join(&format!("ws{u}"))?;
        } else if *d >= 2 {
            device.join(&format!("ws{}", (u + 4) % 5))?;
        }
    }
    for (_, _, device) in &devices {
        device.sync()?;
    }
    let agents: Vec<Agent> = devices
        .iter()
        .map(|(_, _, device)| Agent::start(device, &[]))
        .collect::<AnyResult<_>>()?;
    wait_for_contacts(&agents.iter().collect::<Vec<_>>(), 3)?;

    // Let the start-up settle: nothing changes for 3 s.
    let mut last = (0, Instant::now());
    let settled = wait_for(Duration::from_secs(60), || {
        let total: u64 = agents.iter().map(Agent::sessions).sum();
        if total != last.0 {
            last = (total, Instant::now());
        }
        last.1.elapsed() > Duration::from_secs(3)
    });
    assert!(settled, "the agents never settled");

    let token = devices[0].2.token()?;
    let sessions_before: u64 = agents.iter().map(Agent::sessions).sum();
    let peer_bytes = |agents: &[Agent]| -> u64 {
        agents
            .iter()
            .map(|a| a.counter("peer_bytes_in") + a.counter("peer_bytes_out"))
            .sum()
    };
    let peer_bytes_before = peer_bytes(&agents);
    let hub_sessions = |hub: &Hub| -> AnyResult<u64> {
        Ok(hub_metric(&hub.url, &token, "download_sessions")?
            + hub_metric(&hub.url, &token, "upload_batches")?)
    };
    let hub_sessions_before = hub_sessions(&hub)?;
    let hub_bytes_before =
        hub_metric(&hub.url, &token, "bytes_out")? + hub_metric(&hub.url, &token, "bytes_in")?;

    std::thread::sleep(Duration::from_secs(60));

    let sessions = agents.iter().map(Agent::sessions).sum::<u64>() - sessions_before;
    let hub_new_sessions = hub_sessions(&hub)? - hub_sessions_before;
    let peer_traffic = peer_bytes(&agents) - peer_bytes_before;
    // The metrics requests themselves cross the same counters; count only what is beyond them.
    let hub_traffic = hub_metric(&hub.url, &token, "bytes_out")?
        + hub_metric(&hub.url, &token, "bytes_in")?
        - hub_bytes_before;
    eprintln!(
        "60 s idle, 20 agents: {sessions} sessions, hub {hub_new_sessions} sessions, {hub_traffic} B through the hub, {peer_traffic} B between peers"
    );
    assert_eq!(sessions, 0, "idle agents started sync sessions");
    assert_eq!(
        hub_new_sessions, 0,
        "the hub served sync sessions to idle agents"
    );
    assert_eq!(peer_traffic, 0, "idle peers talked to each other");
    // Keep-alives on 20 presence streams and the metrics calls; well under 1 KiB per agent.
    assert!(
        hub_traffic < 20 * 1024,
        "{hub_traffic} bytes through the hub while idle"
    );
    Ok(())
}

#[test]
fn content_comes_from_a_peer_before_the_hub() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, desktop, _phone) = team(root.path())?;
    let token = laptop.token()?;
    let laptop_agent = Agent::start(&laptop, &[])?;
    let desktop_agent = Agent::start(&desktop, &[])?;
    wait_for_contacts(&[&laptop_agent, &desktop_agent], 1)?;
    // The desktop goes quiet; it keeps the contacts it heard of.
    desktop_agent.stop();

    let commits = hub_metric(&hub.url, &token, "upload_commits")?;
    // Large enough for its chunk list to travel as an edit when it changes (64+ chunks), and
    // to be put together piece by piece around the page cache (8 MiB and up).
    let big = noise(10 << 20, 11);
    std::fs::write(laptop.folder.join("big.bin"), &big)?;
    assert!(
        wait_for(Duration::from_secs(20), || {
            hub_metric(&hub.url, &token, "upload_commits").is_ok_and(|n| n > commits)
        }),
        "the laptop's agent did not upload"
    );

    let chunk_gets = hub_metric(&hub.url, &token, "chunk_gets")?;
    let summary = desktop.sync()?;
    assert_eq!(std::fs::read(desktop.folder.join("big.bin"))?, big);
    let (from_peer, from_hub) = content_bytes(&summary)?;
    assert!(
        from_peer >= big.len() as u64 && from_hub == 0,
        "not from the peer: {summary}"
    );
    assert_eq!(
        hub_metric(&hub.url, &token, "chunk_gets")?,
        chunk_gets,
        "the hub served content a peer held: {summary}"
    );

    // 64 KiB changed in the middle: the desktop builds the new version from its own copy and
    // fetches only the chunks around the change, still from the peer.
    let mut changed = big.clone();
    let middle = changed.len() / 2;
    for byte in &mut changed[middle..middle + (64 << 10)] {
        *byte = byte.wrapping_add(1);
    }
    let commits = hub_metric(&hub.url, &token, "upload_commits")?;
    std::fs::write(laptop.folder.join("big.bin"), &changed)?;
    assert!(
        wait_for(Duration::from_secs(20), || {
            hub_metric(&hub.url, &token, "upload_commits").is_ok_and(|n| n > commits)
        }),
        "the laptop's agent did not upload the change"
    );
    let summary = desktop.sync()?;
    assert!(
        std::fs::read(desktop.folder.join("big.bin"))? == changed,
        "the changed file differs"
    );
    let (from_peer, from_hub) = content_bytes(&summary)?;
    assert!(
        from_peer > 0 && from_peer < 1 << 20 && from_hub == 0,
        "more than the changed chunks travelled: {summary}"
    );
    Ok(())
}

/// Content bytes a `shoal sync` summary says came from peers (pulled from one, or fetched
/// from one during a hub round) and from the hub.
fn content_bytes(summary: &serde_json::Value) -> AnyResult<(u64, u64)> {
    let rounds = summary.as_array().ok_or("no summary")?;
    let from_peer = rounds
        .iter()
        .map(|round| {
            round["bytes_from_peers"].as_u64().unwrap_or(0)
                + round
                    .get("peer")
                    .and(round["bytes_downloaded"].as_u64())
                    .unwrap_or(0)
        })
        .sum();
    let from_hub = rounds
        .iter()
        .map(|round| round["bytes_from_hub"].as_u64().unwrap_or(0))
        .sum();
    Ok((from_peer, from_hub))
}

/// Bytes the hub's connections carried during `work`, less one metrics call's own cost.
fn hub_bytes_during(hub: &Hub, token: &str, work: impl FnOnce() -> TestResult) -> AnyResult<u64> {
    let total = || -> AnyResult<u64> {
        Ok(hub_metric(&hub.url, token, "bytes_in")? + hub_metric(&hub.url, token, "bytes_out")?)
    };
    let (before, again) = (total()?, total()?);
    let metrics_cost = again - before;
    work()?;
    let after = total()?;
    Ok((after - again).saturating_sub(metrics_cost))
}

#[test]
fn a_round_with_nothing_new_costs_under_a_kibibyte_whatever_the_size() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, desktop, _phone) = team(root.path())?;
    let token = laptop.token()?;
    laptop.sync()?;
    desktop.sync()?;
    let small = hub_bytes_during(&hub, &token, || desktop.sync().map(drop))?;

    for i in 0..2000 {
        laptop.write(&format!("many/{:02}/{i}.txt", i % 40), &format!("file {i}"))?;
    }
    laptop.sync()?;
    desktop.sync()?;
    laptop.sync()?;
    let large = hub_bytes_during(&hub, &token, || desktop.sync().map(drop))?;
    eprintln!("no-op round: {small} B with 1 file, {large} B with 2001 files");
    assert!(small < 1024, "{small} bytes for a no-op round");
    assert!(
        large < 1024,
        "{large} bytes for a no-op round over 2001 files"
    );
    Ok(())
}

#[test]
fn a_status_set_on_one_device_shows_on_its_contacts() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, _desktop, phone) = team(root.path())?;
    let agents = [Agent::start(&laptop, &[])?, Agent::start(&phone, &[])?];
    wait_for_contacts(&agents.iter().collect::<Vec<_>>(), 1)?;
    let status_of = |viewer: &Device, name: &str| -> Option<String> {
        let out = viewer.run(&["presence", "--json"]).ok()?;
        let value: serde_json::Value = serde_json::from_str(&out).ok()?;
        value["contacts"]
            .as_array()?
            .iter()
            .find(|c| c["device_name"] == name)
            .and_then(|c| c["status"].as_str().map(str::to_owned))
    };
    assert_eq!(status_of(&phone, "laptop").as_deref(), Some("online"));
    laptop.run(&["presence", "busy"])?;
    assert!(
        wait_for(Duration::from_secs(10), || status_of(&phone, "laptop")
            .as_deref()
            == Some("busy")),
        "bob's phone did not see the laptop become busy"
    );
    // The list names the workspaces the two share.
    let out: serde_json::Value = serde_json::from_str(&phone.run(&["presence", "--json"])?)?;
    let laptop_row = out["contacts"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["device_name"] == "laptop").cloned())
        .ok_or("the laptop is not listed")?;
    assert_eq!(
        laptop_row["workspaces"],
        serde_json::json!(["team"]),
        "{out}"
    );
    assert_eq!(laptop_row["user"], "alice", "{out}");
    Ok(())
}

#[test]
fn a_device_that_cannot_be_reached_hears_through_the_hub() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, _desktop, phone) = team(root.path())?;
    let token = laptop.token()?;
    // The phone serves no peers (say, behind a firewall): the laptop cannot call it.
    let agents = [
        Agent::start(&laptop, &[])?,
        Agent::start(&phone, &["--no-peers"])?,
    ];
    // The laptop must know the phone is online (it has no address) before the change, or it
    // would have no one to tell.
    let phone_online = || {
        std::fs::read(agents[0].home.join("peers.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|peers| {
                peers
                    .iter()
                    .any(|p| p["device_name"] == "phone" && p["status"].as_str() != Some("offline"))
            })
    };
    assert!(
        wait_for(Duration::from_secs(20), phone_online),
        "the laptop did not hear the phone is online"
    );
    let relayed = hub_metric(&hub.url, &token, "negotiations_relayed")?;
    laptop.write("relayed.txt", "told through the hub")?;
    assert!(
        wait_for(Duration::from_secs(10), || phone
            .folder
            .join("relayed.txt")
            .exists()),
        "the change did not reach the phone:\n{}",
        agents[1].log()
    );
    assert!(
        hub_metric(&hub.url, &token, "negotiations_relayed")? > relayed,
        "nothing relayed:\n{}\n{}",
        agents[0].log(),
        agents[1].log()
    );
    assert_eq!(
        agents[1].counter("peer_pulls"),
        0,
        "the phone pulled from a peer"
    );
    Ok(())
}

#[test]
fn a_pull_of_several_batches_arrives_whole_and_the_hub_still_gets_it() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, laptop, desktop, _phone) = team(root.path())?;
    let token = laptop.token()?;
    let agents = [Agent::start(&laptop, &[])?, Agent::start(&desktop, &[])?];
    wait_for_contacts(&agents.iter().collect::<Vec<_>>(), 1)?;
    let commits = hub_metric(&hub.url, &token, "upload_commits")?;

    // More files than a peer batch holds (2,000): the next batch is fetched while the one
    // before is written, and the hub upload waits while the peer pulls.
    let count = 2_300;
    let staging = root.path().join("many");
    for i in 0..count {
        let dir = staging.join(format!("d{:02}", i % 23));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join(format!("f{i}.txt")),
            format!("file {i} {}", i * 7919),
        )?;
    }
    std::fs::rename(&staging, laptop.folder.join("many"))?;
    let all_there = || {
        (0..count).all(|i| {
            let path = desktop.folder.join(format!("many/d{:02}/f{i}.txt", i % 23));
            std::fs::read_to_string(path).is_ok_and(|text| text == format!("file {i} {}", i * 7919))
        })
    };
    assert!(
        wait_for(Duration::from_secs(60), all_there),
        "not every file arrived whole:\n{}",
        agents[1].log()
    );
    // Counters reach agent.json within a second.
    assert!(
        wait_for(Duration::from_secs(5), || agents[1].counter("peer_pulls")
            > 0),
        "the files did not come from the peer:\n{}",
        agents[1].log()
    );
    assert!(
        wait_for(Duration::from_secs(60), || {
            hub_metric(&hub.url, &token, "upload_commits").is_ok_and(|n| n > commits)
        }),
        "the hub never got the files:\n{}",
        agents[0].log()
    );
    Ok(())
}

#[test]
fn a_large_upload_is_fetched_as_it_arrives_and_the_download_takes_it() -> TestResult {
    let root = tempfile::tempdir()?;
    let (_hub, laptop, _desktop, phone) = team(root.path())?;
    // Left by an earlier run that crashed: never trusted, gone once the agent starts.
    let early = phone.folder.join(".shoal").join("early");
    std::fs::create_dir_all(&early)?;
    std::fs::write(early.join("left-over.part"), b"cut short")?;
    // Through the hub only: neither may pull from the other.
    let agents = [
        Agent::start(&laptop, &["--no-peers"])?,
        Agent::start(&phone, &["--no-peers"])?,
    ];
    assert!(!early.join("left-over.part").exists());

    // Large enough for the hub to announce while it arrives (8 MiB and up).
    let bytes = noise(12 << 20, 41);
    let staged = root.path().join("large.bin");
    std::fs::write(&staged, &bytes)?;
    std::fs::rename(&staged, laptop.folder.join("large.bin"))?;
    let arrived = || std::fs::read(phone.folder.join("large.bin")).is_ok_and(|b| b == bytes);
    assert!(
        wait_for(Duration::from_secs(60), arrived),
        "the file did not arrive whole:\n{}",
        agents[1].log()
    );
    // Counters reach agent.json within a second.
    let taken = wait_for(Duration::from_secs(5), || {
        agents[1].counter("early_fetched") == 1 && agents[1].counter("early_claimed") == 1
    });
    assert!(
        taken,
        "the phone did not fetch the content while it arrived and use it (fetched {}, used {}):\n{}",
        agents[1].counter("early_fetched"),
        agents[1].counter("early_claimed"),
        agents[1].log()
    );
    assert_eq!(
        agents[0].counter("early_fetched"),
        0,
        "the uploader was told of its own upload"
    );
    let left: Vec<_> = std::fs::read_dir(&early)?.collect();
    assert!(left.is_empty(), "fetched-early files stayed: {left:?}");
    Ok(())
}

#[test]
fn a_large_file_changed_in_place_is_built_in_a_copy_made_while_it_was_read() -> TestResult {
    for (mode, flags) in [
        ("through the hub", &["--no-peers"][..]),
        ("peer to peer", &[]),
    ] {
        let root = tempfile::tempdir()?;
        let (_hub, laptop, _desktop, phone) = team(root.path())?;
        let agents = [Agent::start(&laptop, flags)?, Agent::start(&phone, flags)?];
        if flags.is_empty() {
            wait_for_contacts(&agents.iter().collect::<Vec<_>>(), 1)?;
        }

        // Large enough to be copied ahead (16 MiB and up).
        let mut bytes = noise(24 << 20, 43);
        let staged = root.path().join("large.bin");
        std::fs::write(&staged, &bytes)?;
        std::fs::rename(&staged, laptop.folder.join("large.bin"))?;
        let on_phone = phone.folder.join("large.bin");
        let holds = |expected: &[u8]| std::fs::read(&on_phone).is_ok_and(|b| b == expected);
        assert!(
            wait_for(Duration::from_secs(60), || holds(&bytes)),
            "{mode}: the file did not arrive whole:\n{}",
            agents[1].log()
        );

        // One megabyte rewritten in the middle, in place.
        let middle = 11 << 20;
        bytes[middle..middle + (1 << 20)].copy_from_slice(&noise(1 << 20, 44));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(laptop.folder.join("large.bin"))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(middle as u64))?;
        std::io::Write::write_all(&mut file, &bytes[middle..middle + (1 << 20)])?;
        drop(file);
        assert!(
            wait_for(Duration::from_secs(60), || holds(&bytes)),
            "{mode}: the change did not arrive:\n{}",
            agents[1].log()
        );
        // Counters reach agent.json within a second.
        let used = wait_for(Duration::from_secs(5), || {
            agents[1].counter("bases_copied") == 1 && agents[1].counter("bases_used") == 1
        });
        assert!(
            used,
            "{mode}: the phone did not copy its version ahead and build the new one in it \
             (copied {}, used {}):\n{}\n{}",
            agents[1].counter("bases_copied"),
            agents[1].counter("bases_used"),
            agents[0].log(),
            agents[1].log()
        );
        assert_eq!(
            agents[0].counter("bases_copied"),
            0,
            "{mode}: the laptop copied"
        );
        let early = phone.folder.join(".shoal").join("early");
        let left: Vec<_> = std::fs::read_dir(&early)?.collect();
        assert!(left.is_empty(), "{mode}: copies stayed: {left:?}");
    }
    Ok(())
}
