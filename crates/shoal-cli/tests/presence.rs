//! Presence, relayed negotiation, device keys and metrics, against a real `shoal hub`.
//!
//! xena owns `ws1` (shared with yuri) and `ws2` (hers alone); zed is a user in neither.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{AnyResult, Device, Hub, TestResult, wait_for};

/// How long any expected event or answer may take.
const PATIENCE: Duration = Duration::from_secs(5);

/// The hub, three users' devices, and the ids the tests talk about.
struct World {
    hub: Hub,
    xena: Device,
    yuri: Device,
    zed: Device,
    ws1: String,
    ws2: String,
}

fn world(root: &std::path::Path) -> AnyResult<World> {
    let data = root.join("hub");
    for user in ["xena", "yuri", "zed"] {
        Hub::add_user(&data, user, &format!("{user}-pw"))?;
    }
    let hub = Hub::start(&data)?;
    let (xena, yuri, zed) = (
        Device::new(root, "xena"),
        Device::new(root, "yuri"),
        Device::new(root, "zed"),
    );
    xena.login(&hub, "xena", "xena-pw", "xena-laptop")?;
    yuri.login(&hub, "yuri", "yuri-pw", "yuri-desk")?;
    zed.login(&hub, "zed", "zed-pw", "zed-box")?;
    xena.create("ws1")?;
    // The same device holds ws2 in another folder.
    Device {
        home: xena.home.clone(),
        folder: root.join("xena-ws2"),
    }
    .create("ws2")?;
    xena.run(&["workspace", "invite", "ws1", "yuri", "--role", "editor"])?;
    yuri.join("ws1")?;
    let list: Value = serde_json::from_str(&xena.run(&["workspace", "list", "--json"])?)?;
    let id_of = |name: &str| -> AnyResult<String> {
        let found = list
            .as_array()
            .and_then(|l| l.iter().find(|w| w["name"] == name))
            .and_then(|w| w["id"].as_str())
            .ok_or_else(|| format!("no workspace {name} in {list}"))?;
        Ok(found.to_owned())
    };
    let (ws1, ws2) = (id_of("ws1")?, id_of("ws2")?);
    Ok(World {
        hub,
        xena,
        yuri,
        zed,
        ws1,
        ws2,
    })
}

fn device_id(device: &Device) -> AnyResult<String> {
    let config: Value = serde_json::from_slice(&std::fs::read(device.home.join("device.json"))?)?;
    Ok(config["device"].as_str().ok_or("no device id")?.to_owned())
}

/// One HTTP answer.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    /// The body as JSON (null when empty).
    fn json(&self) -> AnyResult<Value> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&self.body)?)
    }
}

/// Sends one request on a new connection. Plain sockets rather than an HTTP client: the tests
/// decide exactly when a stream hangs up, and need no TLS set-up for loopback HTTP.
fn send(
    hub: &Hub,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> AnyResult<(TcpStream, BufReader<TcpStream>)> {
    let mut socket = TcpStream::connect(("127.0.0.1", hub.port))?;
    socket.set_read_timeout(Some(PATIENCE))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    socket.write_all(head.as_bytes())?;
    socket.write_all(body.as_bytes())?;
    let reader = BufReader::new(socket.try_clone()?);
    Ok((socket, reader))
}

/// Reads a status line and headers (names in lower case).
fn read_head(reader: &mut impl BufRead) -> AnyResult<(u16, BTreeMap<String, String>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {line:?}"))?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
    }
    Ok((status, headers))
}

/// One chunk of a chunked body; `None` at its end or when the connection drops.
fn read_chunk(reader: &mut impl BufRead) -> Option<String> {
    let mut size = String::new();
    reader.read_line(&mut size).ok()?;
    let size = usize::from_str_radix(size.trim_end(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut data = vec![0; size + 2];
    reader.read_exact(&mut data).ok()?;
    data.truncate(size);
    String::from_utf8(data).ok()
}

fn request(
    hub: &Hub,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> AnyResult<Answer> {
    let (_socket, mut reader) = send(hub, method, path, headers, body)?;
    let (status, headers) = read_head(&mut reader)?;
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        std::iter::from_fn(|| read_chunk(&mut reader)).collect()
    } else {
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        String::from_utf8(body)?
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

impl World {
    /// Sends a JSON body as `device`; returns the status and the JSON answer (null if none).
    fn call(
        &self,
        device: &Device,
        method: &str,
        path: &str,
        body: Value,
    ) -> AnyResult<(u16, Value)> {
        let auth = format!("Bearer {}", device.token()?);
        let answer = request(
            &self.hub,
            method,
            path,
            &[("Authorization", &auth)],
            Some(&body),
        )?;
        Ok((answer.status, answer.json()?))
    }

    fn set_key(&self, device: &Device, key: &str) -> AnyResult<(u16, Value)> {
        self.call(device, "PUT", "/v1/device/key", json!({ "key": key }))
    }

    fn put_presence(&self, device: &Device, document: Value) -> AnyResult<(u16, Value)> {
        self.call(device, "PUT", "/v1/presence", document)
    }

    fn negotiate(&self, device: &Device, message: Value) -> AnyResult<(u16, Value)> {
        self.call(device, "POST", "/v1/negotiate", message)
    }

    /// The hub replica's tag of a workspace, from the upload offer.
    fn hub_tag(&self, device: &Device, ws: &str) -> AnyResult<String> {
        let auth = format!("Bearer {}", device.token()?);
        let replica = "7".repeat(32);
        let answer = request(
            &self.hub,
            "GET",
            &format!("/v1/workspaces/{ws}/upload"),
            &[
                ("Authorization", &auth),
                ("shoal-replica", &replica),
                ("shoal-epoch", "1"),
            ],
            None,
        )?;
        let offer = answer.json()?;
        Ok(offer["tag"]
            .as_str()
            .ok_or_else(|| format!("no tag: {} {offer}", answer.status))?
            .to_owned())
    }

    fn metrics(&self, device: &Device) -> AnyResult<BTreeMap<String, u64>> {
        let auth = format!("Bearer {}", device.token()?);
        let answer = request(
            &self.hub,
            "GET",
            "/v1/metrics",
            &[("Authorization", &auth)],
            None,
        )?;
        if answer.status != 200 {
            return Err(format!("metrics: {} {}", answer.status, answer.body).into());
        }
        let content_type = answer.headers.get("content-type").cloned();
        assert!(
            content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("text/plain")),
            "{content_type:?}"
        );
        let mut out = BTreeMap::new();
        for line in answer.body.lines() {
            let (name, value) = line.split_once(' ').ok_or("not `name value`")?;
            out.insert(name.to_owned(), value.parse()?);
        }
        Ok(out)
    }

    fn stream(&self, device: &Device) -> AnyResult<PresenceStream> {
        PresenceStream::open(&self.hub, &device.token()?)
    }
}

/// `GET /v1/presence`, read by a thread that decodes the chunked body and passes each event's
/// JSON on; the test keeps the socket to hang up.
struct PresenceStream {
    socket: TcpStream,
    events: mpsc::Receiver<Value>,
}

impl PresenceStream {
    fn open(hub: &Hub, token: &str) -> AnyResult<PresenceStream> {
        let auth = format!("Bearer {token}");
        let (socket, mut reader) = send(
            hub,
            "GET",
            "/v1/presence",
            &[("Authorization", &auth), ("Accept", "text/event-stream")],
            None,
        )?;
        let (status, headers) = read_head(&mut reader)?;
        if status != 200 {
            return Err(format!("presence stream refused: {status}").into());
        }
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("text/event-stream")
        );
        if headers.get("transfer-encoding").map(String::as_str) != Some("chunked") {
            return Err("expected a chunked body".into());
        }
        // The stream stays quiet between events for as long as the test likes.
        socket.set_read_timeout(None)?;
        let (sender, events) = mpsc::channel();
        std::thread::spawn(move || {
            let mut pending = String::new();
            while let Some(chunk) = read_chunk(&mut reader) {
                pending.push_str(&chunk);
                while let Some(end) = pending.find("\n\n") {
                    let event: String = pending.drain(..end + 2).collect();
                    for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                        if let Ok(value) = serde_json::from_str(data)
                            && sender.send(value).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Ok(PresenceStream { socket, events })
    }

    /// The next event, waiting at most `PATIENCE`.
    fn next(&self) -> AnyResult<Value> {
        Ok(self.events.recv_timeout(PATIENCE)?)
    }

    /// Skips events until one matches; fails after `PATIENCE`.
    fn until(&self, what: &str, mut matches: impl FnMut(&Value) -> bool) -> AnyResult<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) if matches(&event) => return Ok(event),
                Ok(_) => {}
                Err(_) => return Err(format!("no {what} within {PATIENCE:?}").into()),
            }
        }
    }

    /// The next `Peer` event about `device`.
    fn peer(&self, device: &str) -> AnyResult<Value> {
        self.until(&format!("peer event for {device}"), |e| {
            e["kind"] == "peer" && e["device"] == device
        })
    }

    /// The snapshot: events up to and including one `negotiate` from the hub per workspace in
    /// `workspaces` (those come last).
    fn snapshot(&self, workspaces: usize) -> AnyResult<Vec<Value>> {
        let mut events = Vec::new();
        let mut hub = 0;
        while hub < workspaces {
            let event = self.next()?;
            if event["kind"] == "negotiate" && event["from"] == "hub" {
                hub += 1;
            }
            events.push(event);
        }
        Ok(events)
    }

    fn close(self) -> TestResult {
        self.socket.shutdown(Shutdown::Both)?;
        Ok(())
    }
}

fn workspaces_of(event: &Value) -> BTreeMap<String, String> {
    event["workspaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["workspace"].as_str().unwrap_or_default().to_owned(),
                w["compact"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_contact_sees_only_shared_workspaces_with_key_addresses_and_status() -> TestResult {
    let root = tempfile::tempdir()?;
    let w = world(root.path())?;
    let (xena_id, yuri_id) = (device_id(&w.xena)?, device_id(&w.yuri)?);
    let (key, yuri_key) = ("5e".repeat(32), "6f".repeat(32));
    assert_eq!(w.set_key(&w.xena, &key)?.0, 204);
    assert_eq!(w.set_key(&w.yuri, &yuri_key)?.0, 204);

    let yuri = w.stream(&w.yuri)?;
    yuri.snapshot(1)?;
    let xena = w.stream(&w.xena)?;
    // xena connecting is news to yuri; yuri, already connected, is in xena's snapshot.
    let online = yuri.peer(&xena_id)?;
    assert_eq!(online["status"], "online");
    assert_eq!(online["key"], key.as_str());
    assert_eq!(online["user"], "xena");
    assert_eq!(online["device_name"], "xena-laptop");
    let snapshot = xena.snapshot(2)?;
    let seen_yuri = snapshot
        .iter()
        .find(|e| e["kind"] == "peer" && e["device"] == yuri_id.as_str())
        .ok_or("yuri missing from xena's snapshot")?;
    assert_eq!(seen_yuri["status"], "online");
    assert_eq!(seen_yuri["key"], yuri_key.as_str());

    let (c1, c2) = ("c1".repeat(32), "c2".repeat(32));
    let (status, _) = w.put_presence(
        &w.xena,
        json!({
            "status": "busy",
            "addresses": ["127.0.0.1:7001", "[::1]:7001"],
            "workspaces": [
                {"workspace": w.ws1, "compact": c1},
                {"workspace": w.ws2, "compact": c2},
            ],
        }),
    )?;
    assert_eq!(status, 204);
    let busy = yuri.peer(&xena_id)?;
    assert_eq!(busy["status"], "busy");
    assert_eq!(busy["addresses"], json!(["127.0.0.1:7001", "[::1]:7001"]));
    assert_eq!(busy["key"], key.as_str());
    assert_eq!(
        workspaces_of(&busy),
        BTreeMap::from([(w.ws1.clone(), c1.clone())]),
        "yuri must see ws1 only"
    );

    xena.close()?;
    let offline = yuri.peer(&xena_id)?;
    assert_eq!(offline["status"], "offline");
    assert_eq!(offline["addresses"], json!([]));
    assert_eq!(
        workspaces_of(&offline),
        BTreeMap::from([(w.ws1.clone(), c1)])
    );

    // A stream opened later starts from the last known state.
    let later = w.stream(&w.yuri)?;
    let first = later.next()?;
    assert_eq!(first["kind"], "peer");
    assert_eq!(first["device"], xena_id.as_str());
    assert_eq!(first["status"], "offline");
    assert_eq!(first["key"], key.as_str());
    // zed shares nothing with xena or yuri: his snapshot is his (empty) workspace list only.
    let zed = w.stream(&w.zed)?;
    let (status, _) = w.put_presence(&w.zed, json!({"status": "away"}))?;
    assert_eq!(status, 204);
    let marker = "0a".repeat(32);
    w.negotiate(&w.zed, json!({"workspace": w.ws1, "compact": marker}))?;
    w.put_presence(&w.yuri, json!({"status": "online"}))?;
    assert!(
        zed.events.recv_timeout(Duration::from_millis(200)).is_err(),
        "zed hears nothing"
    );
    later.close()?;
    yuri.close()?;
    Ok(())
}

#[test]
fn hub_tags_come_first_and_follow_uploads() -> TestResult {
    let root = tempfile::tempdir()?;
    let w = world(root.path())?;
    let (tag1, tag2) = (w.hub_tag(&w.xena, &w.ws1)?, w.hub_tag(&w.xena, &w.ws2)?);
    let xena = w.stream(&w.xena)?;
    let yuri = w.stream(&w.yuri)?;

    let snapshot = xena.snapshot(2)?;
    let hub: BTreeMap<String, String> = snapshot
        .iter()
        .filter(|e| e["kind"] == "negotiate")
        .map(|e| {
            assert_eq!(e["from"], "hub");
            (
                e["workspace"].as_str().unwrap_or_default().to_owned(),
                e["compact"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        hub,
        BTreeMap::from([(w.ws1.clone(), tag1.clone()), (w.ws2.clone(), tag2)])
    );
    let first_negotiate = snapshot
        .iter()
        .position(|e| e["kind"] == "negotiate")
        .ok_or("no negotiate")?;
    assert!(
        snapshot[first_negotiate..]
            .iter()
            .all(|e| e["kind"] == "negotiate")
    );
    let yuri_first = yuri.snapshot(1)?;
    assert!(
        yuri_first
            .iter()
            .filter(|e| e["kind"] == "negotiate")
            .all(|e| e["workspace"] == w.ws1.as_str() && e["compact"] == tag1.as_str())
    );

    w.xena.write("hello.txt", "hello")?;
    w.xena.sync()?;
    let new_tag = w.hub_tag(&w.xena, &w.ws1)?;
    assert_ne!(new_tag, tag1);
    for stream in [&xena, &yuri] {
        let event = stream.until("the hub's new tag", |e| {
            e["kind"] == "negotiate" && e["from"] == "hub"
        })?;
        assert_eq!(event["workspace"], w.ws1.as_str());
        assert_eq!(event["compact"], new_tag.as_str());
    }
    xena.close()?;
    yuri.close()?;
    Ok(())
}

#[test]
fn negotiations_are_relayed_to_members_only() -> TestResult {
    let root = tempfile::tempdir()?;
    let w = world(root.path())?;
    let (xena_id, yuri_id) = (device_id(&w.xena)?, device_id(&w.yuri)?);
    let yuri = w.stream(&w.yuri)?;
    yuri.snapshot(1)?;
    let relayed = |event: &Value| event["kind"] == "negotiate" && event["from"] != "hub";

    let compact = "ab".repeat(32);
    let (status, answer) = w.negotiate(
        &w.xena,
        json!({"workspace": w.ws1, "compact": compact, "to": [yuri_id]}),
    )?;
    assert_eq!((status, answer), (200, json!({"delivered": 1})));
    let event = yuri.until("a relayed negotiation", relayed)?;
    assert_eq!(
        event,
        json!({"kind": "negotiate", "from": xena_id, "workspace": w.ws1, "compact": compact})
    );

    // A non-member gets the same 404 as for a workspace that does not exist, and nobody
    // hears anything; nor does a device of a non-member of ws2.
    for to in [json!([yuri_id]), json!([])] {
        let (status, body) = w.negotiate(
            &w.zed,
            json!({"workspace": w.ws1, "compact": "cd".repeat(32), "to": to}),
        )?;
        assert_eq!(status, 404);
        assert_eq!(body["error"], "not found");
    }
    let (status, answer) = w.negotiate(
        &w.xena,
        json!({"workspace": w.ws2, "compact": "ef".repeat(32), "to": [yuri_id]}),
    )?;
    assert_eq!((status, answer), (200, json!({"delivered": 0})));
    // Events arrive in order: if the next relayed one is this marker, nothing came between.
    let marker = "12".repeat(32);
    let (status, answer) = w.negotiate(&w.xena, json!({"workspace": w.ws1, "compact": marker}))?;
    assert_eq!((status, answer), (200, json!({"delivered": 1})));
    let next = yuri.until("the marker", relayed)?;
    assert_eq!(next["compact"], marker.as_str());
    assert_eq!(next["from"], xena_id.as_str());
    // A heads-up about large files being read again travels with it.
    let (status, _) = w.negotiate(
        &w.xena,
        json!({"workspace": w.ws1, "compact": marker, "changing": ["video/cut.mov"]}),
    )?;
    assert_eq!(status, 200);
    let heads_up = yuri.until("the heads-up", relayed)?;
    assert_eq!(heads_up["changing"], json!(["video/cut.mov"]));
    yuri.close()?;
    Ok(())
}

#[test]
fn bad_presence_input_is_refused_and_changes_nothing() -> TestResult {
    let root = tempfile::tempdir()?;
    let w = world(root.path())?;
    let xena_id = device_id(&w.xena)?;
    let key = "9f".repeat(32);
    let c1 = "c1".repeat(32);
    let good = json!({
        "status": "away",
        "addresses": ["10.0.0.7:7400"],
        "workspaces": [{"workspace": w.ws1, "compact": c1}],
    });
    let xena = w.stream(&w.xena)?;
    assert_eq!(w.set_key(&w.xena, &key)?.0, 204);
    assert_eq!(w.put_presence(&w.xena, good)?.0, 204);

    let mut refused = Vec::new();
    for bad in [
        "9F".repeat(32),
        "9f".repeat(31),
        "zz".repeat(32),
        String::new(),
    ] {
        refused.push(("key", w.set_key(&w.xena, &bad)?, 400));
    }
    let presence = |addresses: Value, workspaces: Value| json!({"status": "online", "addresses": addresses, "workspaces": workspaces});
    let many: Vec<String> = (0..17).map(|i| format!("10.0.0.1:{}", 7000 + i)).collect();
    for (what, document, expected) in [
        (
            "compact",
            presence(json!([]), json!([{"workspace": w.ws1, "compact": "c1"}])),
            400,
        ),
        (
            "host name",
            presence(json!(["localhost:80"]), json!([])),
            400,
        ),
        ("no port", presence(json!(["10.0.0.1"]), json!([])), 400),
        ("17 addresses", presence(json!(many), json!([])), 400),
        ("status", json!({"status": "sleepy"}), 400),
        (
            "malformed workspace",
            presence(json!([]), json!([{"workspace": "nope", "compact": c1}])),
            404,
        ),
    ] {
        refused.push((what, w.put_presence(&w.xena, document)?, expected));
    }
    // yuri is not a member of ws2.
    let stranger = presence(json!([]), json!([{"workspace": w.ws2, "compact": c1}]));
    refused.push(("non-member", w.put_presence(&w.yuri, stranger)?, 404));
    // A member's good entry does not save a document with a stranger's entry in it.
    let mixed = presence(
        json!(["10.0.0.9:1"]),
        json!([{"workspace": w.ws1, "compact": c1}, {"workspace": w.ws2, "compact": c1}]),
    );
    refused.push(("mixed", w.put_presence(&w.yuri, mixed)?, 404));
    for (what, message, expected) in [
        (
            "negotiate compact",
            json!({"workspace": w.ws1, "compact": "xy".repeat(32)}),
            400,
        ),
        (
            "negotiate to",
            json!({"workspace": w.ws1, "compact": c1, "to": ["12"]}),
            400,
        ),
        (
            "changing outside the folder",
            json!({"workspace": w.ws1, "compact": c1, "changing": ["a/../../etc/passwd"]}),
            400,
        ),
        (
            "changing absolute",
            json!({"workspace": w.ws1, "compact": c1, "changing": ["/etc/passwd"]}),
            400,
        ),
        (
            "65 changing",
            json!({"workspace": w.ws1, "compact": c1, "changing": (0..65).map(|i| format!("f{i}")).collect::<Vec<_>>()}),
            400,
        ),
    ] {
        refused.push((what, w.negotiate(&w.xena, message)?, expected));
    }
    for (what, (status, body), expected) in &refused {
        assert_eq!(status, expected, "{what}: {body}");
        // The usual error body: what is wrong, and the request id.
        assert!(
            body["error"].is_string() && body["request"].is_string(),
            "{what}: {body}"
        );
    }
    let bad_login = json!({
        "user": "xena", "password": "xena-pw", "device_name": "bad", "device_key": "KEY",
    });
    let login = request(&w.hub, "POST", "/v1/login", &[], Some(&bad_login))?;
    assert_eq!(login.status, 400, "{}", login.body);

    // yuri, connecting now, sees xena exactly as she last said.
    let yuri = w.stream(&w.yuri)?;
    let seen = yuri.peer(&xena_id)?;
    assert_eq!(seen["key"], key.as_str());
    assert_eq!(seen["status"], "away");
    assert_eq!(seen["addresses"], json!(["10.0.0.7:7400"]));
    assert_eq!(workspaces_of(&seen), BTreeMap::from([(w.ws1.clone(), c1)]));
    // And xena sees yuri as connected with no document, not with the refused one.
    let yuri_seen = xena.peer(&device_id(&w.yuri)?)?;
    assert_eq!(yuri_seen["status"], "online");
    assert_eq!(yuri_seen["addresses"], json!([]));
    xena.close()?;
    yuri.close()?;
    Ok(())
}

#[test]
fn metrics_count_requests_bytes_sessions_and_streams() -> TestResult {
    let root = tempfile::tempdir()?;
    let w = world(root.path())?;
    let unauthenticated = request(&w.hub, "GET", "/v1/metrics", &[], None)?;
    assert_eq!(unauthenticated.status, 401);

    let before = w.metrics(&w.yuri)?;
    let names: BTreeSet<&str> = before.keys().map(String::as_str).collect();
    for name in [
        "requests",
        "download_sessions",
        "upload_batches",
        "upload_commits",
        "chunk_gets",
        "chunk_puts",
        "presence_streams",
        "negotiations_relayed",
        "bytes_in",
        "bytes_out",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    // The first answer's bytes are counted once the kernel has taken them, which this side
    // may see first: asked again until they show.
    let mut after_one = w.metrics(&w.yuri)?;
    for _ in 0..100 {
        if after_one["bytes_out"] > before["bytes_out"] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        after_one = w.metrics(&w.yuri)?;
    }
    for name in ["bytes_in", "bytes_out", "requests"] {
        assert!(
            after_one[name] > before[name],
            "{name}: {before:?} then {after_one:?}"
        );
    }

    w.xena.write("a.txt", "some content")?;
    w.xena.sync()?;
    let after_sync = w.metrics(&w.yuri)?;
    for name in [
        "download_sessions",
        "upload_batches",
        "upload_commits",
        "chunk_puts",
    ] {
        assert!(after_sync[name] > after_one[name], "{name}: {after_sync:?}");
    }
    assert!(
        after_sync["bytes_in"] > after_one["bytes_in"] + "some content".len() as u64,
        "{after_sync:?}"
    );

    let stream = w.stream(&w.yuri)?;
    stream.snapshot(1)?;
    let open = w.metrics(&w.yuri)?;
    assert_eq!(open["presence_streams"], 1, "{open:?}");
    let (status, _) = w.negotiate(
        &w.xena,
        json!({"workspace": w.ws1, "compact": "77".repeat(32)}),
    )?;
    assert_eq!(status, 200);
    let relayed = w.metrics(&w.yuri)?["negotiations_relayed"];
    assert_eq!(
        relayed,
        after_sync["negotiations_relayed"] + 1,
        "{after_sync:?}"
    );
    stream.close()?;
    assert!(wait_for(PATIENCE, || {
        w.metrics(&w.yuri).is_ok_and(|m| m["presence_streams"] == 0)
    }));
    Ok(())
}
