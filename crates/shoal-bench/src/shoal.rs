//! Driving shoal as a user would: a hub on a free loopback port with one user, device homes
//! logged in to it, a workspace created on one device and joined on the other, `shoal agent`
//! on each (peers on or `--no-peers`), `shoal sync` and `shoal mirror`. Readings come from the
//! hub's `GET /v1/metrics` (bytes on hub connections) and each agent's `agent.json` (bytes on
//! peer connections, counted by the serving side) and `peers.json` (whom it can reach).

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::procs::{self, Daemon, Outcome, Spec};

/// The hub's one user.
const USER: &str = "bench";
/// Its password (given through `SHOAL_PASSWORD`; the hub wants at least 4 characters).
const PASSWORD: &str = "shoal-bench-password";
/// What the hub prints once it listens.
const READY: &str = "shoal hub listening on";
/// The workspace both devices share.
pub(crate) const WORKSPACE: &str = "bench";

/// The shoal binary and the bound on each command.
#[derive(Clone, Debug)]
pub(crate) struct Shoal {
    /// The `shoal` binary.
    pub(crate) bin: PathBuf,
    /// The bound on every one-shot command.
    pub(crate) timeout: Duration,
}

impl Shoal {
    /// `shoal` with the environment every run uses: a private `HOME` under `base`, the
    /// password, no colours, and `SHOAL_LOG=info` for agents (their log says what they did;
    /// `SHOAL_BENCH_LOG` gives another filter, such as `shoal_agent=debug` for a timeline).
    pub(crate) fn spec(&self, base: &Path, info_log: bool) -> Spec {
        let home = base.join("userhome");
        let _ = fs::create_dir_all(&home);
        let spec = Spec::new(&self.bin)
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", home.display().to_string())
            .env("LANG", "C.UTF-8")
            .env("SHOAL_PASSWORD", PASSWORD)
            .env("NO_COLOR", "1");
        if info_log {
            let filter = std::env::var("SHOAL_BENCH_LOG").unwrap_or_else(|_| "info".into());
            spec.env("SHOAL_LOG", filter)
        } else {
            spec
        }
    }

    /// Runs `shoal ARGS` and fails unless it exits 0.
    pub(crate) fn run(
        &self,
        base: &Path,
        args: &[&str],
        logs: &Path,
        tag: &str,
    ) -> Result<Outcome> {
        let spec = self.spec(base, false).args(args.iter().copied());
        let out = procs::run_once(&spec, self.timeout, logs, tag, false)?;
        if !out.ok() {
            bail!(out.failure(&format!("`shoal {}`", args.join(" "))));
        }
        Ok(out)
    }
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Bytes on hub connections, both ways, from a metrics reading.
pub(crate) fn hub_wire(m: &BTreeMap<String, i64>) -> i64 {
    m.get("bytes_in").copied().unwrap_or(0) + m.get("bytes_out").copied().unwrap_or(0)
}

/// A running hub with one user.
#[derive(Debug)]
pub(crate) struct Hub {
    port: u16,
    daemon: Daemon,
    /// What one metrics read adds to the hub's byte counters (subtracted from every delta).
    pub(crate) read_cost: i64,
}

impl Hub {
    /// Adds the user to a fresh data directory under `base` and starts the hub on a free
    /// loopback port (three tries, in case another process takes the port meanwhile).
    pub(crate) fn start(shoal: &Shoal, base: &Path, logs: &Path) -> Result<Self> {
        let data = base.join("hubdata");
        let data_s = data.display().to_string();
        shoal.run(
            base,
            &["hub", "user", "add", USER, "--data", &data_s],
            logs,
            "user-add",
        )?;
        let mut last = String::new();
        for attempt in 1..=3 {
            let port = free_port()?;
            let log = logs.join(format!("hub-{port}.log"));
            let listen = format!("127.0.0.1:{port}");
            let spec = shoal
                .spec(base, true)
                .args(["hub", "--data", &data_s, "--listen", &listen]);
            let mut daemon = Daemon::start(&spec, "hub", &log)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && daemon.alive() {
                if fs::read_to_string(&log).is_ok_and(|t| t.contains(READY)) {
                    return Ok(Self {
                        port,
                        daemon,
                        read_cost: 0,
                    });
                }
                thread::sleep(Duration::from_millis(20));
            }
            daemon.stop(Duration::from_secs(5));
            last = fs::read_to_string(&log).unwrap_or_default();
            crate::note(&format!("hub did not start (attempt {attempt})"));
        }
        bail!("the hub did not start: {}", tail(&last, 400))
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Its log file.
    pub(crate) fn log(&self) -> PathBuf {
        self.daemon.log().to_path_buf()
    }

    /// `GET /v1/metrics`: its `name value` lines.
    pub(crate) fn metrics(&self, token: &str) -> Result<BTreeMap<String, i64>> {
        let body = crate::http::get(self.port, "/v1/metrics", token)?;
        Ok(body
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect())
    }

    /// Measures what one metrics read adds to the byte counters: the median of the deltas
    /// between back-to-back reads (each delta holds one request and one response).
    pub(crate) fn measure_read_cost(&mut self, token: &str) -> Result<i64> {
        let mut reads = Vec::new();
        for _ in 0..6 {
            reads.push(hub_wire(&self.metrics(token)?));
        }
        let deltas: Vec<f64> = reads.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
        self.read_cost = crate::stats::median(&deltas).unwrap_or(0.0).round() as i64;
        Ok(self.read_cost)
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub(crate) fn stop(&mut self) {
        self.daemon.stop(Duration::from_secs(10));
    }
}

/// The last `n` bytes of `s` (on a character boundary).
pub(crate) fn tail(s: &str, n: usize) -> &str {
    let s = s.trim_end();
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// One device: a home, a folder, and perhaps a running agent.
#[derive(Debug)]
pub(crate) struct Device {
    /// Its name (`A`, `B`), also its device name at the hub.
    pub(crate) name: String,
    /// Its home (`--home`).
    pub(crate) home: PathBuf,
    /// The workspace's folder on it.
    pub(crate) folder: PathBuf,
    agent: Option<Daemon>,
}

impl Device {
    /// A device under `base`: `home-NAME` and `folder-NAME`.
    pub(crate) fn new(base: &Path, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            home: base.join(format!("home-{name}")),
            folder: base.join(format!("folder-{name}")),
            agent: None,
        }
    }

    fn home_arg(&self) -> String {
        self.home.display().to_string()
    }

    /// `shoal login HUB USER --device-name NAME`.
    pub(crate) fn login(&self, shoal: &Shoal, base: &Path, hub: &Hub, logs: &Path) -> Result<()> {
        let home = self.home_arg();
        let url = hub.url();
        shoal.run(
            base,
            &[
                "--home",
                &home,
                "login",
                &url,
                USER,
                "--device-name",
                &self.name,
            ],
            logs,
            &format!("login-{}", self.name),
        )?;
        Ok(())
    }

    /// `shoal workspace create|join WORKSPACE --path FOLDER` (`verb` is `create` or `join`).
    pub(crate) fn workspace(
        &self,
        shoal: &Shoal,
        base: &Path,
        verb: &str,
        logs: &Path,
    ) -> Result<()> {
        fs::create_dir_all(&self.folder)?;
        let home = self.home_arg();
        let folder = self.folder.display().to_string();
        shoal.run(
            base,
            &[
                "--home",
                &home,
                "workspace",
                verb,
                WORKSPACE,
                "--path",
                &folder,
            ],
            logs,
            &format!("{verb}-{}", self.name),
        )?;
        Ok(())
    }

    /// `shoal sync --json`, not checked; under GNU time when `measure`.
    pub(crate) fn sync(
        &self,
        shoal: &Shoal,
        base: &Path,
        logs: &Path,
        tag: &str,
        measure: bool,
    ) -> Result<Outcome> {
        let spec = shoal
            .spec(base, false)
            .args(["--home", &self.home_arg(), "sync", "--json"]);
        procs::run_once(&spec, shoal.timeout, logs, tag, measure)
    }

    /// Starts `shoal agent`: serving peers on a free loopback port, or with `--no-peers`.
    pub(crate) fn start_agent(
        &mut self,
        shoal: &Shoal,
        base: &Path,
        logs: &Path,
        peers: bool,
    ) -> Result<()> {
        for f in ["agent.json", "peers.json"] {
            // written afresh by this agent; an old one would make it look ready
            let _ = fs::remove_file(self.home.join(f));
        }
        let mut spec = shoal
            .spec(base, true)
            .args(["--home", &self.home_arg(), "agent"]);
        spec = if peers {
            spec.args(["--listen", "127.0.0.1:0"])
        } else {
            spec.arg("--no-peers")
        };
        let log = logs.join(format!("agent-{}.log", self.name));
        self.agent = Some(Daemon::start(&spec, &format!("agent {}", self.name), &log)?);
        Ok(())
    }

    /// Stops its agent, if running.
    pub(crate) fn stop_agent(&mut self) {
        if let Some(mut d) = self.agent.take() {
            d.stop(Duration::from_secs(10));
        }
    }

    /// Its agent's pid and log, if running.
    pub(crate) fn agent(&self) -> Option<(u32, PathBuf)> {
        self.agent
            .as_ref()
            .map(|d| (d.pid(), d.log().to_path_buf()))
    }

    /// Whether its agent is still running.
    pub(crate) fn agent_alive(&mut self) -> bool {
        self.agent.as_mut().is_some_and(Daemon::alive)
    }

    /// Its device token (from `device.json`), for the hub's metrics route.
    pub(crate) fn token(&self) -> Result<String> {
        let v = read_json(&self.home.join("device.json")).context("reading device.json")?;
        v.get("token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .context("device.json has no token")
    }

    /// Its agent's counters from `agent.json` (rewritten by the agent about once a second).
    pub(crate) fn counters(&self) -> BTreeMap<String, i64> {
        read_json(&self.home.join("agent.json"))
            .and_then(|v| v.get("counters").cloned())
            .and_then(|c| c.as_object().cloned())
            .map(|o| {
                o.into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_i64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Bytes on peer connections this agent served (in + out).
    pub(crate) fn peer_bytes(&self) -> i64 {
        let c = self.counters();
        c.get("peer_bytes_in").copied().unwrap_or(0) + c.get("peer_bytes_out").copied().unwrap_or(0)
    }

    /// Whether its agent has published `agent.json`.
    fn agent_published(&self) -> bool {
        read_json(&self.home.join("agent.json")).is_some()
    }

    /// Whether `peers.json` lists device `other` online, with a key and an address.
    fn knows_peer(&self, other: &str) -> bool {
        let Some(Value::Array(peers)) = read_json(&self.home.join("peers.json")) else {
            return false;
        };
        peers.iter().any(|p| {
            p.get("device_name").and_then(Value::as_str) == Some(other)
                && p.get("addresses")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
                && p.get("key").is_some_and(|k| !k.is_null())
                && p.get("status").and_then(Value::as_str) != Some("offline")
        })
    }
}

/// A JSON file, if it exists and parses.
fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

/// Waits until both agents published `agent.json`, the hub has a presence stream per agent
/// (how agents hear of changes) and, with peers, each lists the other in `peers.json` with an
/// address. Returns the seconds waited.
pub(crate) fn wait_agents_ready(
    hub: &Hub,
    devices: &mut [&mut Device],
    token: &str,
    peers: bool,
    timeout: Duration,
) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        for d in devices.iter_mut() {
            if !d.agent_alive() {
                bail!("agent {} exited before it was ready", d.name);
            }
        }
        let published = devices.iter().all(|d| d.agent_published());
        let streams = published
            && hub
                .metrics(token)
                .ok()
                .and_then(|m| m.get("presence_streams").copied())
                .unwrap_or(0)
                >= devices.len() as i64;
        let linked = !peers
            || devices.iter().all(|d| {
                devices
                    .iter()
                    .filter(|o| o.name != d.name)
                    .all(|o| d.knows_peer(&o.name))
            });
        if published && streams && linked {
            return Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > timeout {
            bail!(
                "agents not ready after {:.0} s (agent.json {published}, presence streams \
                 {streams}, peers.json {linked})",
                timeout.as_secs_f64()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}
