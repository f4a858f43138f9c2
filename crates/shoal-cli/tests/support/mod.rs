//! A tiny vocabulary for end-to-end tests with real processes: start a hub, make devices,
//! write files, sync, compare trees.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;
pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Incompressible pseudo-random bytes (no repeated chunks), the same for the same seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

/// A hub process on a free loopback port, stopped when dropped.
pub struct Hub {
    child: Child,
    pub url: String,
    pub data: PathBuf,
    pub port: u16,
}

impl Hub {
    pub fn start(data: &Path) -> AnyResult<Hub> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Hub::start_on(data, port)
    }

    pub fn start_on(data: &Path, port: u16) -> AnyResult<Hub> {
        let mut child = shoal()
            .args(["hub", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            return Err(format!("hub did not start: {line:?}").into());
        }
        Ok(Hub {
            child,
            url: format!("http://127.0.0.1:{port}"),
            data: data.to_path_buf(),
            port,
        })
    }

    pub fn add_user(data: &Path, name: &str, password: &str) -> TestResult {
        let output = shoal()
            .args(["hub", "user", "add", name, "--data"])
            .arg(data)
            .env("SHOAL_PASSWORD", password)
            .output()?;
        check(&output)?;
        Ok(())
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn check(output: &Output) -> AnyResult<String> {
    if !output.status.success() {
        return Err(format!(
            "command failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One device: a home and a workspace folder.
pub struct Device {
    pub home: PathBuf,
    pub folder: PathBuf,
}

impl Device {
    pub fn new(root: &Path, name: &str) -> Device {
        Device {
            home: root.join(format!("{name}-home")),
            folder: root.join(format!("{name}-files")),
        }
    }

    pub fn run(&self, args: &[&str]) -> AnyResult<String> {
        check(&self.command(args).output()?)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = shoal();
        command.arg("--home").arg(&self.home).args(args);
        command
    }

    pub fn login(&self, hub: &Hub, user: &str, password: &str, device: &str) -> TestResult {
        check(
            &self
                .command(&["login", &hub.url, user, "--device-name", device])
                .env("SHOAL_PASSWORD", password)
                .output()?,
        )?;
        Ok(())
    }

    pub fn create(&self, workspace: &str) -> TestResult {
        let path = self.folder.display().to_string();
        self.run(&["workspace", "create", workspace, "--path", &path])?;
        Ok(())
    }

    pub fn join(&self, workspace: &str) -> TestResult {
        let path = self.folder.display().to_string();
        self.run(&["workspace", "join", workspace, "--path", &path])?;
        Ok(())
    }

    pub fn sync(&self) -> AnyResult<serde_json::Value> {
        let out = self.run(&["sync", "--json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn token(&self) -> AnyResult<String> {
        let device: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.home.join("device.json"))?)?;
        Ok(device["token"].as_str().ok_or("no token")?.to_owned())
    }

    pub fn write(&self, path: &str, text: &str) -> TestResult {
        let target = self.folder.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(target, text)?;
        Ok(())
    }

    pub fn tree(&self) -> BTreeMap<String, Option<String>> {
        tree(&self.folder)
    }
}

/// Every file and folder below `root` (minus `.shoal`), with file contents.
pub fn tree(root: &Path) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let relative = path
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if relative == ".shoal" {
                continue;
            }
            if path.is_dir() {
                out.insert(relative, None);
                stack.push(path);
            } else {
                out.insert(
                    relative,
                    Some(std::fs::read_to_string(&path).unwrap_or_else(|_| "<binary>".into())),
                );
            }
        }
    }
    out
}

/// Waits until `condition` holds, up to `limit`.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// A running `shoal agent`, stopped when dropped. Its log goes to `agent.log` in its home.
pub struct Agent {
    child: Child,
    pub home: PathBuf,
}

impl Agent {
    pub fn start(device: &Device, extra: &[&str]) -> AnyResult<Agent> {
        std::fs::create_dir_all(&device.home)?;
        // A file from an earlier run of the same home must not pass for this one.
        let _ = std::fs::remove_file(device.home.join("agent.json"));
        let log = std::fs::File::create(device.home.join("agent.log"))?;
        let mut args = vec!["agent"];
        args.extend_from_slice(extra);
        let child = device
            .command(&args)
            .env(
                "SHOAL_LOG",
                std::env::var("SHOAL_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let agent = Agent {
            child,
            home: device.home.clone(),
        };
        if !wait_for(Duration::from_secs(20), || agent.state().is_some()) {
            return Err("the agent did not start".into());
        }
        Ok(agent)
    }

    /// What the agent publishes in its home (address, key, counters).
    pub fn state(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(self.home.join("agent.json")).ok()?).ok()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.state()
            .and_then(|s| s["counters"][name].as_u64())
            .unwrap_or(0)
    }

    /// Sync sessions this agent started or served.
    pub fn sessions(&self) -> u64 {
        self.counter("hub_sessions") + self.counter("peer_pulls") + self.counter("peer_served")
    }

    /// How many contact devices it knows with an address.
    pub fn reachable_contacts(&self) -> usize {
        std::fs::read(self.home.join("peers.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.as_array().cloned())
            .map(|peers| {
                peers
                    .iter()
                    .filter(|p| p["addresses"].as_array().is_some_and(|a| !a.is_empty()))
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("agent.log")).unwrap_or_default()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP GET on the hub with a device token; returns the body.
pub fn hub_get(hub_url: &str, path: &str, token: &str) -> AnyResult<String> {
    use std::io::{Read, Write};
    let address = hub_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {head}").into());
    }
    Ok(body.to_owned())
}

/// One counter from the hub's metrics.
pub fn hub_metric(hub_url: &str, token: &str, name: &str) -> AnyResult<u64> {
    let body = hub_get(hub_url, "/v1/metrics", token)?;
    body.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().parse().ok())
        .ok_or_else(|| format!("no metric {name} in {body:?}").into())
}

/// alice on a laptop and a desktop and bob on a phone, all in workspace "team" (bob an
/// editor), on a fresh hub under `root`.
pub fn team(root: &Path) -> AnyResult<(Hub, Device, Device, Device)> {
    let data = root.join("hub");
    Hub::add_user(&data, "alice", "alice-pw")?;
    Hub::add_user(&data, "bob", "bob-pw")?;
    let hub = Hub::start(&data)?;
    let (laptop, desktop, phone) = (
        Device::new(root, "laptop"),
        Device::new(root, "desktop"),
        Device::new(root, "phone"),
    );
    laptop.login(&hub, "alice", "alice-pw", "laptop")?;
    desktop.login(&hub, "alice", "alice-pw", "desktop")?;
    phone.login(&hub, "bob", "bob-pw", "phone")?;
    laptop.create("team")?;
    laptop.run(&["workspace", "invite", "team", "bob", "--role", "editor"])?;
    desktop.join("team")?;
    phone.join("team")?;
    Ok((hub, laptop, desktop, phone))
}
