//! The hub's answers to outsiders, readers and bad input, route by route, with a real hub.

mod support;

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::json;
use support::{AnyResult, Device, Hub, TestResult, noise};

fn hub_with_workspace(root: &std::path::Path) -> AnyResult<(Hub, Device, String)> {
    let data = root.join("hub");
    for (user, password) in [
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("carol", "carol-pw"),
    ] {
        Hub::add_user(&data, user, password)?;
    }
    let hub = Hub::start(&data)?;
    let alice = Device::new(root, "alice");
    alice.login(&hub, "alice", "alice-pw", "alice-laptop")?;
    alice.create("secret")?;
    alice.write("plan.txt", "the plan")?;
    alice.sync()?;
    let list: serde_json::Value =
        serde_json::from_str(&alice.run(&["workspace", "list", "--json"])?)?;
    let id = list[0]["id"].as_str().ok_or("no id")?.to_owned();
    Ok((hub, alice, id))
}

/// Every workspace route, as (method, path, body).
fn routes(ws: &str) -> Vec<(reqwest::Method, String, Option<serde_json::Value>)> {
    use reqwest::Method;
    let chunk = "00".repeat(32);
    let knowledge = json!({"knowledge": [], "limits": {"max_items": 10, "max_bytes": 1000}});
    vec![
        (
            Method::POST,
            format!("/v1/workspaces/{ws}/invitations"),
            Some(json!({"user": "carol", "role": "owner"})),
        ),
        (
            Method::POST,
            format!("/v1/workspaces/{ws}/download"),
            Some(knowledge),
        ),
        (
            Method::GET,
            format!("/v1/workspaces/{ws}/download/abc/batches/0"),
            None,
        ),
        (
            Method::PUT,
            format!("/v1/workspaces/{ws}/download/abc/result"),
            Some(json!({"items": [], "knowledge": []})),
        ),
        (
            Method::POST,
            format!("/v1/workspaces/{ws}/recovery"),
            Some(json!({"candidates": []})),
        ),
        (Method::GET, format!("/v1/workspaces/{ws}/upload"), None),
        (
            Method::PUT,
            format!("/v1/workspaces/{ws}/upload/batches/b1"),
            Some(json!({"versions": [], "contents": [], "learned": [], "last": true})),
        ),
        (
            Method::PUT,
            format!("/v1/workspaces/{ws}/upload/batches/b1/commit"),
            Some(json!({"items": []})),
        ),
        (
            Method::GET,
            format!("/v1/workspaces/{ws}/chunks/{chunk}"),
            None,
        ),
        (
            Method::HEAD,
            format!("/v1/workspaces/{ws}/chunks/{chunk}"),
            None,
        ),
        (
            Method::PUT,
            format!("/v1/workspaces/{ws}/chunks/{chunk}"),
            None,
        ),
        (Method::GET, format!("/v1/workspaces/{ws}/events"), None),
        (Method::POST, format!("/v1/workspaces/{ws}/chunks"), None),
        (
            Method::POST,
            format!("/v1/workspaces/{ws}/chunks/fetch"),
            Some(json!({"chunks": []})),
        ),
        (
            Method::POST,
            format!("/v1/workspaces/{ws}/contents/known"),
            Some(json!({"contents": []})),
        ),
        (
            Method::GET,
            format!("/v1/workspaces/{ws}/contents/{chunk}"),
            None,
        ),
        (Method::GET, format!("/v1/workspaces/{ws}/rules"), None),
        (
            Method::PUT,
            format!("/v1/workspaces/{ws}/rules"),
            Some(json!({"forbidden": ["*.exe"]})),
        ),
        (Method::GET, format!("/v1/workspaces/{ws}/refusals"), None),
        (
            Method::DELETE,
            format!("/v1/workspaces/{ws}/refusals/{}:0:1", "11".repeat(16)),
            None,
        ),
    ]
}

fn call(
    client: &Client,
    hub: &Hub,
    token: Option<&str>,
    (method, path, body): &(reqwest::Method, String, Option<serde_json::Value>),
) -> AnyResult<reqwest::blocking::Response> {
    let mut request = client
        .request(method.clone(), format!("{}{path}", hub.url))
        .header("shoal-replica", "11".repeat(16))
        .header("shoal-epoch", "0");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    Ok(request.send()?)
}

fn upload_tag(client: &Client, hub: &Hub, token: &str, ws: &str) -> AnyResult<String> {
    let offer: serde_json::Value = client
        .get(format!("{}/v1/workspaces/{ws}/upload", hub.url))
        .bearer_auth(token)
        .header("shoal-replica", "11".repeat(16))
        .header("shoal-epoch", "0")
        .send()?
        .json()?;
    Ok(offer["tag"].as_str().ok_or("no tag")?.to_owned())
}

#[test]
fn outsiders_get_nothing_from_any_route() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, _alice, ws) = hub_with_workspace(root.path())?;
    let carol = Device::new(root.path(), "carol");
    carol.login(&hub, "carol", "carol-pw", "carol-pc")?;
    let token = carol.token()?;
    shoal_agent::install_default_provider();
    let client = Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    let nonexistent = "ab".repeat(16);
    for route in routes(&ws).iter().chain(routes(&nonexistent).iter()) {
        let response = call(&client, &hub, Some(&token), route)?;
        // Outsiders cannot tell a real workspace from a made-up one.
        assert_eq!(
            response.status(),
            StatusCode::NOT_FOUND,
            "{} {} gave {}",
            route.0,
            route.1,
            response.status()
        );
        // And nobody gets in without a token.
        let anonymous = call(&client, &hub, None, route)?;
        assert_eq!(
            anonymous.status(),
            StatusCode::UNAUTHORIZED,
            "{} {} without a token",
            route.0,
            route.1
        );
    }
    let listed: serde_json::Value = client
        .get(format!("{}/v1/workspaces", hub.url))
        .bearer_auth(&token)
        .send()?
        .json()?;
    assert_eq!(listed, json!([]));
    // A wrong password is refused.
    let wrong = client
        .post(format!("{}/v1/login", hub.url))
        .json(&json!({"user": "alice", "password": "nope", "device_name": "x"}))
        .send()?;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}

#[test]
fn a_readers_change_is_refused_and_kept_as_refused() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, alice, ws) = hub_with_workspace(root.path())?;
    alice.run(&["workspace", "invite", "secret", "bob", "--role", "reader"])?;
    let bob = Device::new(root.path(), "bob");
    bob.login(&hub, "bob", "bob-pw", "bob-pc")?;
    bob.join("secret")?;
    bob.sync()?;
    assert_eq!(bob.tree().get("plan.txt"), Some(&Some("the plan".into())));

    bob.write("plan.txt", "bob rewrote the plan")?;
    let summary = bob.sync()?;
    let refused = &summary[0]["refused"];
    assert_eq!(refused.as_array().map(Vec::len), Some(1), "{summary}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("reader"),
        "{summary}"
    );
    // Kept on the device, shown by status, and not sent again.
    assert_eq!(
        bob.tree().get("plan.txt"),
        Some(&Some("bob rewrote the plan".into()))
    );
    let status: serde_json::Value = serde_json::from_str(&bob.run(&["status", "--json"])?)?;
    assert_eq!(
        status[0]["refused"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(status[0]["pending_upload"], 0, "{status}");
    // The hub kept it too, marked refused, and nobody else received it.
    alice.sync()?;
    assert_eq!(alice.tree().get("plan.txt"), Some(&Some("the plan".into())));
    let hub_db = rusqlite_count(&hub.data.join("workspaces").join(&ws).join("state.db"))?;
    assert_eq!(hub_db, 1);
    // A reader cannot put content either.
    shoal_agent::install_default_provider();
    let client = Client::new();
    let put = client
        .put(format!(
            "{}/v1/workspaces/{ws}/chunks/{}",
            hub.url,
            blake3::hash(b"x").to_hex()
        ))
        .bearer_auth(bob.token()?)
        .body("x")
        .send()?;
    assert_eq!(put.status(), StatusCode::FORBIDDEN);
    let mut bundle = Vec::new();
    shoal_protocol::bundle_chunk(&mut bundle, &shoal_core::ContentHash::of(b"x"), b"x");
    let post = client
        .post(format!("{}/v1/workspaces/{ws}/chunks", hub.url))
        .bearer_auth(bob.token()?)
        .body(bundle)
        .send()?;
    assert_eq!(
        post.status(),
        StatusCode::FORBIDDEN,
        "a reader put a chunk bundle"
    );
    Ok(())
}

#[test]
fn a_chunk_bundle_with_any_fault_stores_nothing() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, alice, ws) = hub_with_workspace(root.path())?;
    shoal_agent::install_default_provider();
    let client = Client::new();
    let url = format!("{}/v1/workspaces/{ws}/chunks", hub.url);
    let (good, other) = (b"a good chunk".as_slice(), b"another chunk".as_slice());
    let mut bundle = Vec::new();
    shoal_protocol::bundle_chunk(&mut bundle, &shoal_core::ContentHash::of(good), good);
    // The second frame claims the first one's hash.
    shoal_protocol::bundle_chunk(&mut bundle, &shoal_core::ContentHash::of(good), other);
    let chunk_dir = hub.data.join("workspaces").join(&ws).join("chunks");
    let before = stored_bytes(&chunk_dir);
    let response = client
        .post(&url)
        .bearer_auth(alice.token()?)
        .body(bundle)
        .send()?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let message: serde_json::Value = response.json()?;
    assert!(
        message["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not match")),
        "{message}"
    );
    let held = stored_bytes(&chunk_dir) - before;
    assert_eq!(held, 0, "a faulty bundle stored {held} bytes of chunks");
    // Small chunks are kept in a table, not as files: ask the hub itself.
    let good_hash = shoal_core::ContentHash::of(good).to_string();
    let head = client
        .head(format!("{url}/{good_hash}"))
        .bearer_auth(alice.token()?)
        .send()?;
    assert_eq!(
        head.status(),
        StatusCode::NOT_FOUND,
        "a faulty bundle stored its good chunk"
    );
    // Truncated in a frame header: refused too.
    let response = client
        .post(&url)
        .bearer_auth(alice.token()?)
        .body(vec![0u8; 20])
        .send()?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Fetching names chunks by hash: a malformed one is refused.
    let response = client
        .post(format!("{url}/fetch"))
        .bearer_auth(alice.token()?)
        .json(&json!({"chunks": ["not-a-hash"]}))
        .send()?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // A good bundle is stored whole.
    let mut bundle = Vec::new();
    shoal_protocol::bundle_chunk(&mut bundle, &shoal_core::ContentHash::of(good), good);
    shoal_protocol::bundle_chunk(&mut bundle, &shoal_core::ContentHash::of(other), other);
    let response = client
        .post(&url)
        .bearer_auth(alice.token()?)
        .body(bundle)
        .send()?;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: serde_json::Value = response.json()?;
    assert_eq!(answer["stored"], 2, "{answer}");
    for bytes in [good, other] {
        let hash = shoal_core::ContentHash::of(bytes).to_string();
        let head = client
            .head(format!("{url}/{hash}"))
            .bearer_auth(alice.token()?)
            .send()?;
        assert!(head.status().is_success(), "{}", head.status());
    }
    // And fetched back in one answer, chunks the hub lacks left out.
    let fetched = client
        .post(format!("{url}/fetch"))
        .bearer_auth(alice.token()?)
        .json(&json!({"chunks": [
            shoal_core::ContentHash::of(other).to_string(),
            "ab".repeat(32),
            shoal_core::ContentHash::of(good).to_string(),
        ]}))
        .send()?
        .bytes()?;
    let chunks = shoal_protocol::unbundle_chunks(&fetched)?;
    let got: Vec<&[u8]> = chunks.iter().map(|(_, b)| *b).collect();
    assert_eq!(got, vec![other, good]);
    Ok(())
}

/// Bytes in the chunk store's files other than its database (packs, or a file per chunk).
fn stored_bytes(dir: &std::path::Path) -> u64 {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if !entry.file_name().to_string_lossy().starts_with("small.db") {
                count += entry.metadata().map_or(0, |m| m.len());
            }
        }
    }
    count
}

/// Refused versions the hub keeps, counted from its workspace database with the sqlite3 file
/// format read by the store crate's own reader (the hub must be allowed to run meanwhile).
fn rusqlite_count(path: &std::path::Path) -> AnyResult<usize> {
    let store = shoal_store::Store::open(path, "reader")?;
    Ok(store.refused()?.len())
}

#[test]
fn malformed_and_oversized_requests_are_refused_and_change_nothing() -> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, alice, ws) = hub_with_workspace(root.path())?;
    let token = alice.token()?;
    // No connection reuse: the hub closes a connection after refusing an oversized body, and a
    // pooled connection could be picked up just as it closes.
    shoal_agent::install_default_provider();
    let client = Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()?;
    let before = upload_tag(&client, &hub, &token, &ws)?;
    let url = |path: &str| format!("{}/v1/workspaces/{ws}{path}", hub.url);
    let sync_headers = |r: reqwest::blocking::RequestBuilder| {
        r.bearer_auth(&token)
            .header("shoal-replica", "11".repeat(16))
            .header("shoal-epoch", "0")
    };

    // Malformed JSON, wrong types, bad ids: 400 with a message.
    let bad_json = sync_headers(client.post(url("/download")))
        .header("content-type", "application/json")
        .body("{not json")
        .send()?;
    assert_eq!(bad_json.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = bad_json.json()?;
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()) && body["request"].as_str().is_some()
    );
    let wrong_type = sync_headers(client.post(url("/download")))
        .json(&json!({"knowledge": "x"}))
        .send()?;
    assert_eq!(wrong_type.status(), StatusCode::BAD_REQUEST);
    let bad_id = sync_headers(client.post(url("/download")))
        .json(&json!({"knowledge": [{"replica": "zz", "epoch": 0, "upto": 1}], "limits": {"max_items": 1, "max_bytes": 1}}))
        .send()?;
    assert_eq!(bad_id.status(), StatusCode::BAD_REQUEST);
    let no_identity = client
        .post(url("/download"))
        .bearer_auth(&token)
        .json(&json!({"knowledge": [], "limits": {"max_items": 1, "max_bytes": 1}}))
        .send()?;
    assert_eq!(no_identity.status(), StatusCode::BAD_REQUEST);

    // A chunk whose bytes do not match its name; a chunk over the limit; a body over 32 MiB.
    let mismatched =
        sync_headers(client.put(url(&format!("/chunks/{}", blake3::hash(b"one").to_hex()))))
            .body("two")
            .send()?;
    assert_eq!(mismatched.status(), StatusCode::BAD_REQUEST);
    let big_chunk = vec![7u8; 1 << 20];
    let too_big = sync_headers(client.put(url(&format!(
        "/chunks/{}",
        blake3::hash(&big_chunk).to_hex()
    ))))
    .body(big_chunk)
    .send()?;
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let huge = format!(
        "{{\"versions\": [], \"contents\": [], \"learned\": [], \"last\": true, \"pad\": \"{}\"}}",
        "x".repeat(33 << 20)
    );
    let oversized = sync_headers(client.put(url("/upload/batches/b2")))
        .header("content-type", "application/json")
        .body(huge)
        .send()?;
    assert_eq!(oversized.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A chunk list sent as an edit of a content the hub does not hold, or with a run outside
    // any base, is refused before anything is planned.
    let edited = |copies: serde_json::Value| {
        json!({"versions": [], "last": false, "learned": [], "contents": [{
            "hash": "cd".repeat(32), "size": 10, "chunks": [], "base": "ef".repeat(32),
            "copies": copies}]})
    };
    for body in [
        edited(json!([{"at": 0, "from": 0, "count": 1}])),
        edited(json!([{"at": 0, "from": 4_000_000_000u32, "count": 4_000_000_000u32}])),
    ] {
        let refused = sync_headers(client.put(url("/upload/batches/b4")))
            .json(&body)
            .send()?;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        let answer: serde_json::Value = refused.json()?;
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("not held")),
            "{answer}"
        );
    }

    // A version whose name would escape its folder is refused at commit.
    let version = json!({
        "item": "42".repeat(16),
        "dot": {"replica": "11".repeat(16), "epoch": 0, "tick": 1},
        "context": [],
        "entry": {"parent": "00".repeat(16), "name": "../escape", "kind": "directory", "deleted": false,
                  "content": null, "size": 0, "mtime_ns": 0, "executable": false},
        "written_at": 1, "device": "evil"
    });
    let plan: serde_json::Value = sync_headers(client.put(url("/upload/batches/b3")))
        .json(&json!({"versions": [version], "contents": [], "learned": [], "last": false}))
        .send()?
        .json()?;
    let commit: serde_json::Value = sync_headers(client.put(format!("{}{}", hub.url, plan["commit"].as_str().ok_or("no commit")?)))
        .json(&json!({"items": [{"dot": {"replica": "11".repeat(16), "epoch": 0, "tick": 1}, "transferred": true}]}))
        .send()?
        .json()?;
    assert_eq!(commit["items"][0]["outcome"], "refused", "{commit}");
    assert_eq!(commit["tag_before"], commit["tag_after"]);

    // Nothing above changed the workspace.
    assert_eq!(upload_tag(&client, &hub, &token, &ws)?, before);
    Ok(())
}

#[test]
fn an_interrupted_upload_resumes_without_resending_chunks_and_failed_items_are_retried()
-> TestResult {
    let root = tempfile::tempdir()?;
    let (hub, alice, ws) = hub_with_workspace(root.path())?;
    // 24 MiB of incompressible data: several hundred chunks.
    let big = noise(24 << 20, 1);
    std::fs::write(alice.folder.join("big.bin"), &big)?;
    let chunk_dir = hub.data.join("workspaces").join(&ws).join("chunks");
    // Read beside the running hub, as a second process would.
    let count_chunks = || -> usize {
        shoal_store::ChunkStore::open(&chunk_dir)
            .and_then(|store| store.chunk_count())
            .map_or(0, |count| count as usize)
    };
    let before = count_chunks();
    let mut sync = alice
        .command(&["sync", "--json"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let started = support::wait_for(std::time::Duration::from_secs(60), || {
        count_chunks() >= before + 20
    });
    sync.kill()?;
    sync.wait()?;
    assert!(started, "the upload never started");
    // Requests already received finish on the hub after the client dies: wait until the count
    // settles before taking it.
    let mut settled = count_chunks();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = count_chunks();
        if now == settled {
            break;
        }
        settled = now;
    }
    let after_cut = settled - before;

    let summary = alice.sync()?;
    let resumed = summary[0]["chunks_uploaded"].as_u64().ok_or("no count")? as usize;
    let total = count_chunks() - before;
    assert!(
        after_cut < total,
        "the first run was not cut off ({after_cut} of {total} chunks)"
    );
    assert_eq!(
        resumed,
        total - after_cut,
        "completed chunks were sent again"
    );

    // One item whose content does not arrive: the others are applied, it is retried.
    alice.write("good.txt", "fine")?;
    alice.write("broken.txt", "withheld")?;
    let output = alice
        .command(&["sync", "--json"])
        .env("SHOAL_FAULT_SKIP_UPLOAD", "broken")
        .output()?;
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary[0]["upload_failed"], 1, "{summary}");
    let bob = Device::new(root.path(), "alice-second");
    bob.login(&hub, "alice", "alice-pw", "second")?;
    bob.join("secret")?;
    bob.sync()?;
    let tree = bob.tree();
    assert!(
        tree.contains_key("good.txt") && !tree.contains_key("broken.txt"),
        "{tree:?}"
    );
    assert_eq!(std::fs::read(bob.folder.join("big.bin"))?, big);
    alice.sync()?;
    bob.sync()?;
    assert_eq!(bob.tree().get("broken.txt"), Some(&Some("withheld".into())));
    Ok(())
}
