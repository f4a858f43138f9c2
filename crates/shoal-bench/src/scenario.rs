//! The scenarios of issue #6 and how each sample is taken.
//!
//! Every (rep, set, mode) starts from a fresh hub, two fresh device homes and fresh folders
//! (mirror: two fresh folders). Within one, the workloads of the set run in order on the same
//! tree, as in the peer benchmark:
//!
//! | set   | agents (p2p, hub)                  | mirror                    |
//! |-------|------------------------------------|---------------------------|
//! | small | W1, W3, W6 folder rename; W5 (cli) | W1, W3, W6 folder, W5     |
//! | big   | W2, W4, W6 file rename; W5big (cli)| W2, W4, W6 file, W5big    |
//! | large | W1L, W3L; W5L (cli)                | W1L, W3L, W5L             |
//!
//! With agents, a sample's clock starts just before the change is made in A's folder (for an
//! initial sync: a rename of pre-copied data into it) and stops when B's folder shows the
//! result, polled. The no-op round (W5) is timed with the agents stopped: one `shoal sync` of
//! B; it does not depend on the agents' mode, so it is taken once per rep (in the first agent
//! mode) and recorded with mode `cli`. Mirror samples time one `shoal mirror A B` process.
//! Trees are checked byte for byte after every sample, outside the timed window.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::procs::{self, Outcome};
use crate::shoal::{self, Device, Hub, Shoal};
use crate::tree;
use crate::workload::{self, BIG_NAME, BIG_SIZE, Change, Data};

/// A group of workloads sharing one tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Set {
    /// W1, W3, W6 (folder rename), W5.
    Small,
    /// W2, W4, W6 (file rename), W5big.
    Big,
    /// W1L, W3L, W5L.
    Large,
}

impl Set {
    /// Its name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Set::Small => "small",
            Set::Big => "big",
            Set::Large => "large",
        }
    }

    /// The data set it starts from.
    pub(crate) fn data(self) -> Data {
        match self {
            Set::Small => Data::W1,
            Set::Big => Data::W2,
            Set::Large => Data::W1l,
        }
    }

    /// The workloads it records, in order (the last is the no-op round).
    fn workloads(self) -> &'static [&'static str] {
        match self {
            Set::Small => &["W1", "W3", "W6dir", "W5"],
            Set::Big => &["W2", "W4", "W6file", "W5big"],
            Set::Large => &["W1L", "W3L", "W5L"],
        }
    }

    /// The top-level folder its small files live in, inside the synced folder.
    fn top(self) -> &'static str {
        match self {
            Set::Small => "w1",
            Set::Big => "",
            Set::Large => "w1l",
        }
    }
}

/// How shoal is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Both devices run `shoal agent` with peers on (the default).
    P2p,
    /// Both run `shoal agent --no-peers`: everything goes through the hub.
    Hub,
    /// `shoal mirror A B`, two local folders, no hub.
    Mirror,
}

impl Mode {
    /// Its name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::P2p => "p2p",
            Mode::Hub => "hub",
            Mode::Mirror => "mirror",
        }
    }
}

/// Peak RSS readings of one sample, KiB. With agents: VmHWM of agent A, agent B and the hub,
/// read at the end of the sample (a peak since the process started). Mirror: GNU time's `%M`
/// of the one `shoal mirror` process, in `a`. The cli no-op round: `%M` of B's `shoal sync`.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Rss {
    /// Device A (or the one mirror process).
    pub(crate) a: Option<u64>,
    /// Device B.
    pub(crate) b: Option<u64>,
    /// The hub.
    pub(crate) hub: Option<u64>,
}

/// One JSON line of the results.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Sample {
    /// Always `shoal`.
    pub(crate) tool: &'static str,
    /// `p2p`, `hub`, `mirror` or `cli`.
    pub(crate) mode: String,
    /// `W1`, `W1L`, `W2`, `W3`, `W3L`, `W4`, `W5`, `W5L`, `W5big`, `W6dir`, `W6file`.
    pub(crate) workload: String,
    /// The set it belongs to.
    pub(crate) set: String,
    /// Repetition, from 1.
    pub(crate) rep: u32,
    /// The timed window, seconds (None if it never completed).
    pub(crate) seconds: Option<f64>,
    /// Bytes on hub connections during the sample, in + out, less one metrics read.
    pub(crate) hub_bytes: Option<i64>,
    /// Bytes on peer connections during the sample (both agents' servers, in + out).
    pub(crate) peer_bytes: Option<i64>,
    /// Peak RSS readings.
    pub(crate) rss_kib: Rss,
    /// Completed in time and verified.
    pub(crate) ok: bool,
    /// What went wrong, if anything.
    pub(crate) error: Option<String>,
    /// CPU seconds of shoal's processes during the window.
    pub(crate) cpu_s: Option<f64>,
    /// CPU seconds other processes on the machine used during the window (contention).
    pub(crate) other_cpu_s: Option<f64>,
    /// Regular files in the tree afterwards.
    pub(crate) files: Option<u64>,
    /// Their bytes.
    pub(crate) bytes: Option<u64>,
    /// Anything else worth keeping (counter deltas, shoal's JSON summary…).
    pub(crate) detail: Value,
}

impl Sample {
    fn new(mode: &str, workload: &str, set: Set, rep: u32) -> Self {
        Self {
            tool: "shoal",
            mode: mode.to_owned(),
            workload: workload.to_owned(),
            set: set.name().to_owned(),
            rep,
            seconds: None,
            hub_bytes: None,
            peer_bytes: None,
            rss_kib: Rss::default(),
            ok: false,
            error: None,
            cpu_s: None,
            other_cpu_s: None,
            files: None,
            bytes: None,
            detail: Value::Null,
        }
    }

    fn fail(mut self, error: impl Into<String>) -> Self {
        self.ok = false;
        self.error = Some(error.into());
        self
    }
}

/// What `shoal-bench run` was asked to do.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The binary and the bound on each command.
    pub(crate) shoal: Shoal,
    /// Scratch directory: `data/`, `runs/`, `logs/`.
    pub(crate) work: PathBuf,
    /// Sets to run.
    pub(crate) sets: Vec<Set>,
    /// Modes to run.
    pub(crate) modes: Vec<Mode>,
    /// Repetitions.
    pub(crate) reps: u32,
    /// The results file (JSON lines, appended).
    pub(crate) out: PathBuf,
    /// Bound on each wait and command.
    pub(crate) timeout: Duration,
    /// Keep each rep's folders.
    pub(crate) keep: bool,
}

/// Where samples go: appended to the results file as they are taken, and kept.
pub(crate) struct Sink {
    file: File,
    /// Every sample so far.
    pub(crate) samples: Vec<Sample>,
}

impl Sink {
    /// Appends to `path`.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file,
            samples: Vec::new(),
        })
    }

    fn add(&mut self, s: Sample) -> Result<()> {
        let line = serde_json::to_string(&s)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        crate::note(&describe(&s));
        self.samples.push(s);
        Ok(())
    }
}

/// One progress line for a sample.
fn describe(s: &Sample) -> String {
    let mut out = format!("{} {} rep {} {}:", s.mode, s.set, s.rep, s.workload);
    match s.seconds {
        Some(t) => out.push_str(&format!(" {t:.3} s")),
        None => out.push_str(" no time"),
    }
    if let Some(b) = s.hub_bytes {
        out.push_str(&format!(", hub {}", human_bytes(b)));
    }
    if let Some(b) = s.peer_bytes {
        out.push_str(&format!(", peers {}", human_bytes(b)));
    }
    let r = &s.rss_kib;
    let mib = |v: Option<u64>| v.map_or("-".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0));
    out.push_str(&format!(
        ", RSS MiB a {} b {} hub {}",
        mib(r.a),
        mib(r.b),
        mib(r.hub)
    ));
    out.push_str(if s.ok { ", ok" } else { ", FAILED" });
    if let Some(e) = &s.error {
        out.push_str(": ");
        out.push_str(e);
    }
    out
}

/// Bytes in B, KiB or MiB.
fn human_bytes(b: i64) -> String {
    let v = b as f64;
    if v.abs() >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", v / 1024.0 / 1024.0)
    } else if v.abs() >= 1024.0 {
        format!("{:.1} KiB", v / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// `sync(1)`: the page cache is written back before a window, so the write-back of a copy made
/// for the sample does not land in it.
fn os_sync() {
    let _ = Command::new("sync").status();
}

/// `cp -a SRC DST` (DST must not exist): keeps modes and times, like the peer benchmark.
fn copy(src: &Path, dst: &Path) -> Result<()> {
    let st = Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(src)
        .arg(dst)
        .status()
        .context("running cp")?;
    if !st.success() {
        bail!("cp -a {} {} failed: {st}", src.display(), dst.display());
    }
    Ok(())
}

/// Removes a directory tree if it exists.
fn remove(dir: &Path) {
    if dir.exists()
        && let Err(e) = fs::remove_dir_all(dir)
    {
        crate::note(&format!("could not remove {}: {e}", dir.display()));
    }
}

/// Files and bytes of a tree (ignoring shoal's own).
fn tally(root: &Path) -> (u64, u64) {
    tree::list(root).map_or((0, 0), |all| {
        all.values().fold((0, 0), |(n, b), e| match e {
            tree::Entry::File(s) => (n + 1, b + s),
            _ => (n, b),
        })
    })
}

/// Runs every (rep, set, mode) in turn, each sample going to `sink` as it is taken.
pub(crate) fn run(cfg: &Config, sink: &mut Sink) -> Result<()> {
    let data_root = cfg.work.join("data");
    fs::create_dir_all(&data_root)?;
    let mut sources = Vec::new();
    for set in &cfg.sets {
        let data = set.data();
        let t0 = Instant::now();
        let dir = workload::ensure(&data_root, data, data.default_seed())?;
        crate::note(&format!(
            "data {} ready in {:.1} s: {}",
            data.name(),
            t0.elapsed().as_secs_f64(),
            dir.display()
        ));
        sources.push((*set, dir));
    }
    let first_agents = cfg.modes.iter().copied().find(|m| *m != Mode::Mirror);
    for rep in 1..=cfg.reps {
        for (set, src) in &sources {
            for mode in &cfg.modes {
                crate::note(&format!("=== {} {} rep {rep} ===", mode.name(), set.name()));
                let tag = format!("{}-{}-{rep}", mode.name(), set.name());
                let base = cfg.work.join("runs").join(&tag);
                let logs = cfg.work.join("logs").join(&tag);
                remove(&base);
                remove(&logs);
                fs::create_dir_all(&base)?;
                fs::create_dir_all(&logs)?;
                let r = Rep {
                    cfg,
                    set: *set,
                    rep,
                    src,
                    base: &base,
                    logs: &logs,
                };
                if *mode == Mode::Mirror {
                    r.mirror(sink)?;
                } else {
                    r.agents(sink, *mode, first_agents == Some(*mode))?;
                }
                if !cfg.keep {
                    remove(&base);
                }
            }
        }
    }
    Ok(())
}

/// One (rep, set, mode).
struct Rep<'a> {
    cfg: &'a Config,
    set: Set,
    rep: u32,
    src: &'a Path,
    base: &'a Path,
    logs: &'a Path,
}

/// A hub and two devices with agents running, and the readings a sample needs.
struct Rig {
    hub: Hub,
    a: Device,
    b: Device,
    token: String,
}

impl Rig {
    fn pids(&self) -> Vec<u32> {
        let mut p = vec![self.hub.pid()];
        p.extend(self.a.agent().map(|x| x.0));
        p.extend(self.b.agent().map(|x| x.0));
        p
    }

    fn logs(&self) -> Vec<PathBuf> {
        let mut l = vec![self.hub.log()];
        l.extend(self.a.agent().map(|x| x.1));
        l.extend(self.b.agent().map(|x| x.1));
        l
    }

    fn cpu(&self) -> f64 {
        self.pids()
            .iter()
            .filter_map(|p| procs::cpu_seconds(*p))
            .sum()
    }

    fn rss(&self) -> Rss {
        Rss {
            a: self.a.agent().and_then(|(p, _)| procs::peak_rss_kib(p)),
            b: self.b.agent().and_then(|(p, _)| procs::peak_rss_kib(p)),
            hub: procs::peak_rss_kib(self.hub.pid()),
        }
    }

    fn quiet(&self) -> bool {
        procs::wait_quiet(
            &self.pids(),
            &self.logs(),
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
    }
}

/// What a timed agent step does: the change made in A, and the poll of B that says it is done.
struct Step<'s> {
    workload: &'static str,
    act: Box<dyn FnOnce() -> Result<()> + 's>,
    done: Box<dyn FnMut() -> bool + 's>,
    poll: Duration,
    limit: Duration,
    verify: Box<dyn FnOnce() -> Result<(), String> + 's>,
}

impl Rep<'_> {
    fn sample(&self, mode: &str, workload: &str) -> Sample {
        Sample::new(mode, workload, self.set, self.rep)
    }

    /// The W3 changes of this rep (paths relative to the set's top folder). The seed is the
    /// peer benchmark's, `1000 + 10 × rep`, the same for every mode.
    fn w3(&self, mode: Mode) -> Vec<Change> {
        let files = self.set.data().files();
        let tag = format!("{}_{}", mode.name(), self.rep);
        workload::w3_changes(files, 1000 + 10 * u64::from(self.rep), &tag)
    }

    // ---------------------------------------------------------------- agents

    /// p2p or hub mode: hub, two devices, agents; the set's steps; the cli no-op round.
    fn agents(&self, sink: &mut Sink, mode: Mode, cli_w5: bool) -> Result<()> {
        let names = self.set.workloads();
        let (timed, noop) = names.split_at(names.len() - 1);
        let mut rig = match self.setup_agents(mode) {
            Ok(r) => r,
            Err(e) => {
                for wl in timed {
                    sink.add(self.sample(mode.name(), wl).fail(format!("setup: {e:#}")))?;
                }
                if cli_w5 {
                    sink.add(self.sample("cli", noop[0]).fail(format!("setup: {e:#}")))?;
                }
                return Ok(());
            }
        };
        let mut broken: Option<String> = None;
        for wl in timed {
            if let Some(why) = &broken {
                sink.add(self.sample(mode.name(), wl).fail(format!("skipped: {why}")))?;
                continue;
            }
            let s = self.agent_step(&mut rig, mode, wl);
            if s.seconds.is_none() {
                broken = Some(format!("{wl} did not complete"));
            }
            sink.add(s)?;
        }
        rig.a.stop_agent();
        rig.b.stop_agent();
        if cli_w5 {
            let s = match &broken {
                Some(why) => self.sample("cli", noop[0]).fail(format!("skipped: {why}")),
                None => self.noop_sync(&rig, noop[0]),
            };
            sink.add(s)?;
        }
        rig.hub.stop();
        Ok(())
    }

    fn setup_agents(&self, mode: Mode) -> Result<Rig> {
        let shoal = &self.cfg.shoal;
        let hub = Hub::start(shoal, self.base, self.logs)?;
        let mut a = Device::new(self.base, "A");
        let mut b = Device::new(self.base, "B");
        a.login(shoal, self.base, &hub, self.logs)?;
        b.login(shoal, self.base, &hub, self.logs)?;
        a.workspace(shoal, self.base, "create", self.logs)?;
        b.workspace(shoal, self.base, "join", self.logs)?;
        let token = a.token()?;
        let peers = mode == Mode::P2p;
        a.start_agent(shoal, self.base, self.logs, peers)?;
        b.start_agent(shoal, self.base, self.logs, peers)?;
        let mut rig = Rig { hub, a, b, token };
        let ready = shoal::wait_agents_ready(
            &rig.hub,
            &mut [&mut rig.a, &mut rig.b],
            &rig.token,
            peers,
            Duration::from_secs(90).min(self.cfg.timeout),
        )?;
        let cost = rig.hub.measure_read_cost(&rig.token)?;
        crate::note(&format!(
            "agents ready in {ready:.2} s; one metrics read costs {cost} B on the hub's counters"
        ));
        Ok(rig)
    }

    /// Builds and runs one timed step with agents.
    fn agent_step(&self, rig: &mut Rig, mode: Mode, wl: &'static str) -> Sample {
        let mut s = self.sample(mode.name(), wl);
        let fa = rig.a.folder.clone();
        let fb = rig.b.folder.clone();
        let top = self.set.top();
        let stage = self.base.join("stage");
        let data = self.set.data();
        let step_limit = self.cfg.timeout.min(Duration::from_secs(300));
        let src = self.src.to_path_buf();
        let step: Step<'_> = match wl {
            "W1" | "W1L" => {
                remove(&stage);
                if let Err(e) = fs::create_dir_all(&stage)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| copy(&src, &stage.join(top)))
                {
                    return s.fail(format!("staging: {e:#}"));
                }
                let (from, to) = (stage.join(top), fa.join(top));
                let bt = fb.join(top);
                let (src2, fa2, fb2, top_a) = (src.clone(), fa.clone(), fb.clone(), fa.join(top));
                Step {
                    workload: wl,
                    act: Box::new(move || Ok(fs::rename(&from, &to)?)),
                    done: Box::new(move || tree::holds(&bt, data.files(), data.bytes())),
                    poll: Duration::from_millis(if wl == "W1" { 50 } else { 100 }),
                    limit: self.cfg.timeout,
                    verify: Box::new(move || {
                        tree::compare(&src2, &top_a)?;
                        tree::compare(&fa2, &fb2)
                    }),
                }
            }
            "W2" => {
                remove(&stage);
                if let Err(e) = fs::create_dir_all(&stage)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| copy(&src.join(BIG_NAME), &stage.join(BIG_NAME)))
                {
                    return s.fail(format!("staging: {e:#}"));
                }
                let (from, to) = (stage.join(BIG_NAME), fa.join(BIG_NAME));
                let bb = fb.join(BIG_NAME);
                let (src2, fa2, fb2) = (src.clone(), fa.clone(), fb.clone());
                Step {
                    workload: wl,
                    act: Box::new(move || Ok(fs::rename(&from, &to)?)),
                    done: Box::new(move || tree::file_size(&bb) == Some(BIG_SIZE)),
                    poll: Duration::from_millis(20),
                    limit: self.cfg.timeout,
                    verify: Box::new(move || {
                        tree::compare(&src2, &fa2)?;
                        tree::compare(&fa2, &fb2)
                    }),
                }
            }
            "W3" | "W3L" => {
                let changes = self.w3(mode);
                let (ta, tb) = (fa.join(top), fb.join(top));
                let (c1, c2, c3) = (changes.clone(), changes.clone(), changes);
                let (ta2, tb2, fa2, fb2) = (ta.clone(), tb.clone(), fa.clone(), fb.clone());
                Step {
                    workload: wl,
                    act: Box::new(move || workload::apply_changes(&ta, &c1)),
                    done: Box::new(move || workload::changes_visible(&tb, &c2)),
                    poll: Duration::from_millis(5),
                    limit: step_limit,
                    verify: Box::new(move || {
                        if !workload::changes_visible(&ta2, &c3)
                            || !workload::changes_visible(&tb2, &c3)
                        {
                            return Err("the changed files do not hold their new bytes".into());
                        }
                        tree::compare(&fa2, &fb2)
                    }),
                }
            }
            "W4" => {
                let bytes = workload::w4_data(3000 + 10 * u64::from(self.rep) + 1);
                let (ba, bb) = (fa.join(BIG_NAME), fb.join(BIG_NAME));
                let (d1, d2, d3) = (bytes.clone(), bytes.clone(), bytes);
                let (ba2, bb2, fa2, fb2) = (ba.clone(), bb.clone(), fa.clone(), fb.clone());
                Step {
                    workload: wl,
                    act: Box::new(move || workload::overwrite_middle(&ba, &d1)),
                    done: Box::new(move || workload::middle_is(&bb, BIG_SIZE, &d2)),
                    poll: Duration::from_millis(10),
                    limit: step_limit,
                    verify: Box::new(move || {
                        if !workload::middle_is(&ba2, BIG_SIZE, &d3)
                            || !workload::middle_is(&bb2, BIG_SIZE, &d3)
                        {
                            return Err("big.bin does not hold the new middle MiB".into());
                        }
                        tree::compare(&fa2, &fb2)
                    }),
                }
            }
            "W6dir" => {
                let moved = format!("{top}-moved");
                let (files, bytes) = tally(&fa.join(top));
                let (from, to) = (fa.join(top), fa.join(&moved));
                let (old_b, new_b) = (fb.join(top), fb.join(&moved));
                let (old_b2, fa2, fb2) = (old_b.clone(), fa.clone(), fb.clone());
                Step {
                    workload: wl,
                    act: Box::new(move || Ok(fs::rename(&from, &to)?)),
                    done: Box::new(move || {
                        !old_b.exists() && new_b.is_dir() && tree::holds(&new_b, files, bytes)
                    }),
                    poll: Duration::from_millis(20),
                    limit: step_limit,
                    verify: Box::new(move || {
                        if old_b2.exists() {
                            return Err(format!("{} still exists", old_b2.display()));
                        }
                        tree::compare(&fa2, &fb2)
                    }),
                }
            }
            "W6file" => {
                let moved = "big-moved.bin";
                let (from, to) = (fa.join(BIG_NAME), fa.join(moved));
                let (old_b, new_b) = (fb.join(BIG_NAME), fb.join(moved));
                let (fa2, fb2) = (fa.clone(), fb.clone());
                Step {
                    workload: wl,
                    act: Box::new(move || Ok(fs::rename(&from, &to)?)),
                    done: Box::new(move || {
                        !old_b.exists() && tree::file_size(&new_b) == Some(BIG_SIZE)
                    }),
                    poll: Duration::from_millis(5),
                    limit: step_limit,
                    verify: Box::new(move || tree::compare(&fa2, &fb2)),
                }
            }
            other => return s.fail(format!("no agent step named {other}")),
        };
        let r = self.timed_agent_step(rig, step, &mut s);
        remove(&stage);
        if let Err(e) = r {
            s.ok = false;
            s.error = Some(format!("{e:#}"));
        }
        s
    }

    /// The measurement around a step: quiet, readings, clock, poll, quiet, readings, check.
    fn timed_agent_step(&self, rig: &mut Rig, mut step: Step<'_>, s: &mut Sample) -> Result<()> {
        os_sync();
        let quiet_before = rig.quiet();
        let m0 = rig.hub.metrics(&rig.token)?;
        let (ca0, cb0) = (rig.a.counters(), rig.b.counters());
        let p0 = rig.a.peer_bytes() + rig.b.peer_bytes();
        let cpu0 = rig.cpu();
        let host0 = procs::host_busy_seconds();
        let own0 = procs::own_cpu_seconds();
        let t0 = Instant::now();
        (step.act)()?;
        let mut seconds = None;
        loop {
            if (step.done)() {
                seconds = Some(t0.elapsed().as_secs_f64());
                break;
            }
            if t0.elapsed() > step.limit {
                break;
            }
            thread::sleep(step.poll);
        }
        let window = t0.elapsed().as_secs_f64();
        let cpu = rig.cpu() - cpu0;
        let own = procs::own_cpu_seconds() - own0;
        let host = procs::host_busy_seconds();
        s.seconds = seconds;
        s.cpu_s = Some(round3(cpu));
        s.other_cpu_s = host.zip(host0).map(|(h1, h0)| round3(h1 - h0 - cpu - own));
        // After the window: whatever the change still causes (A's upload to the hub in p2p
        // mode, acknowledgements) is counted too, once everything is quiet again. agent.json
        // is rewritten about once a second, so its counters are read after a further pause.
        let quiet_after = rig.quiet();
        thread::sleep(Duration::from_millis(1500));
        let m1 = rig.hub.metrics(&rig.token)?;
        let (ca1, cb1) = (rig.a.counters(), rig.b.counters());
        let p1 = rig.a.peer_bytes() + rig.b.peer_bytes();
        let raw = shoal::hub_wire(&m1) - shoal::hub_wire(&m0);
        s.hub_bytes = Some(raw - rig.hub.read_cost);
        s.peer_bytes = Some(p1 - p0);
        s.rss_kib = rig.rss();
        let (files, bytes) = tally(&rig.b.folder);
        s.files = Some(files);
        s.bytes = Some(bytes);
        s.detail = json!({
            "window_s": round3(window),
            "quiet_before": quiet_before,
            "quiet_after": quiet_after,
            "hub_bytes_raw": raw,
            "metrics_read_cost": rig.hub.read_cost,
            "hub": delta(&m1, &m0),
            "agent_a": delta(&ca1, &ca0),
            "agent_b": delta(&cb1, &cb0),
        });
        let mut problems = Vec::new();
        if seconds.is_none() {
            problems.push(format!(
                "{} not visible on B within {:.0} s",
                step.workload,
                step.limit.as_secs_f64()
            ));
        }
        for d in [&mut rig.a, &mut rig.b] {
            if !d.agent_alive() {
                problems.push(format!("agent {} exited", d.name));
            }
        }
        if let Err(e) = (step.verify)() {
            problems.push(format!("check: {e}"));
        }
        s.ok = problems.is_empty();
        if !problems.is_empty() {
            s.error = Some(problems.join("; "));
        }
        Ok(())
    }

    /// The no-op round with the agents stopped: A and B each sync once to settle, then B's
    /// `shoal sync --json` is timed and its hub bytes counted.
    fn noop_sync(&self, rig: &Rig, wl: &str) -> Sample {
        let mut s = self.sample("cli", wl);
        let shoal = &self.cfg.shoal;
        let mut run = || -> Result<Outcome> {
            for (d, tag) in [(&rig.a, "settle-A"), (&rig.b, "settle-B")] {
                let o = d.sync(shoal, self.base, self.logs, &format!("{wl}-{tag}"), false)?;
                if !o.ok() {
                    bail!(o.failure(&format!("settling sync of {}", d.name)));
                }
            }
            os_sync();
            let m0 = rig.hub.metrics(&rig.token)?;
            let host0 = procs::host_busy_seconds();
            let own0 = procs::own_cpu_seconds();
            let hub_cpu0 = procs::cpu_seconds(rig.hub.pid()).unwrap_or(0.0);
            let o = rig
                .b
                .sync(shoal, self.base, self.logs, &format!("{wl}-timed-B"), true)?;
            let hub_cpu = procs::cpu_seconds(rig.hub.pid()).unwrap_or(0.0) - hub_cpu0;
            let own = procs::own_cpu_seconds() - own0;
            let m1 = rig.hub.metrics(&rig.token)?;
            let cpu = o.cpu_s.unwrap_or(0.0) + hub_cpu;
            s.cpu_s = Some(round3(cpu));
            s.other_cpu_s = procs::host_busy_seconds()
                .zip(host0)
                .map(|(h1, h0)| round3(h1 - h0 - cpu - own));
            let raw = shoal::hub_wire(&m1) - shoal::hub_wire(&m0);
            s.hub_bytes = Some(raw - rig.hub.read_cost);
            s.peer_bytes = Some(0);
            s.detail = json!({"hub_bytes_raw": raw, "metrics_read_cost": rig.hub.read_cost,
                              "hub": delta(&m1, &m0)});
            Ok(o)
        };
        let o = match run() {
            Ok(o) => o,
            Err(e) => return s.fail(format!("{e:#}")),
        };
        s.seconds = o.ok().then_some(round4(o.wall));
        s.rss_kib = Rss {
            a: None,
            b: o.maxrss_kib,
            hub: procs::peak_rss_kib(rig.hub.pid()),
        };
        let (files, bytes) = tally(&rig.b.folder);
        s.files = Some(files);
        s.bytes = Some(bytes);
        let summary: Option<Value> = serde_json::from_str(&o.stdout).ok();
        let mut problems = Vec::new();
        if !o.ok() {
            problems.push(o.failure("no-op sync of B"));
        }
        match &summary {
            Some(Value::Array(items)) => {
                for item in items {
                    if item.get("error").is_some() {
                        problems.push(format!("sync reported an error: {item}"));
                    }
                    let moved = ["uploaded", "downloaded"]
                        .iter()
                        .any(|k| item.get(*k).and_then(Value::as_u64).unwrap_or(0) > 0);
                    if moved {
                        problems.push(format!("a no-op sync moved something: {item}"));
                    }
                }
            }
            _ => problems.push("stdout is not a JSON summary".into()),
        }
        if let Err(e) = tree::compare(&rig.a.folder, &rig.b.folder) {
            problems.push(format!("check: {e}"));
        }
        if let Value::Object(m) = &mut s.detail {
            m.insert("summary".into(), summary.unwrap_or(Value::Null));
        }
        s.ok = problems.is_empty();
        if !problems.is_empty() {
            s.error = Some(problems.join("; "));
        }
        s
    }

    // ---------------------------------------------------------------- mirror

    /// Mirror mode: two plain folders and one `shoal mirror A B --json` per workload.
    fn mirror(&self, sink: &mut Sink) -> Result<()> {
        let a = self.base.join("A");
        let b = self.base.join("B");
        fs::create_dir_all(&a)?;
        fs::create_dir_all(&b)?;
        let top = self.set.top();
        let mut broken: Option<String> = None;
        for wl in self.set.workloads() {
            if let Some(why) = &broken {
                sink.add(self.sample("mirror", wl).fail(format!("skipped: {why}")))?;
                continue;
            }
            let s = self.mirror_step(wl, &a, &b, top);
            if s.seconds.is_none() {
                broken = Some(format!("{wl} did not complete"));
            }
            sink.add(s)?;
        }
        Ok(())
    }

    /// One mirror workload: the change (untimed), then the timed run and the check.
    fn mirror_step(&self, wl: &str, a: &Path, b: &Path, top: &str) -> Sample {
        let mut s = self.sample("mirror", wl);
        let mut expect_changes: Option<Vec<Change>> = None;
        let mut expect_middle: Option<Vec<u8>> = None;
        let prepared: Result<()> = (|| {
            match wl {
                "W1" | "W1L" => copy(self.src, &a.join(top))?,
                "W2" => copy(&self.src.join(BIG_NAME), &a.join(BIG_NAME))?,
                "W3" | "W3L" => {
                    let changes = self.w3(Mode::Mirror);
                    workload::apply_changes(&a.join(top), &changes)?;
                    expect_changes = Some(changes);
                }
                "W4" => {
                    let bytes = workload::w4_data(3000 + 10 * u64::from(self.rep) + 1);
                    workload::overwrite_middle(&a.join(BIG_NAME), &bytes)?;
                    expect_middle = Some(bytes);
                }
                "W6dir" => fs::rename(a.join(top), a.join(format!("{top}-moved")))?,
                "W6file" => fs::rename(a.join(BIG_NAME), a.join("big-moved.bin"))?,
                "W5" | "W5L" | "W5big" => {}
                other => bail!("no mirror step named {other}"),
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            return s.fail(format!("preparing: {e:#}"));
        }
        os_sync();
        let spec = self.cfg.shoal.spec(self.base, false).args([
            "--home".into(),
            self.base.join("home").into_os_string(),
            "mirror".into(),
            a.as_os_str().to_owned(),
            b.as_os_str().to_owned(),
            "--json".into(),
        ]);
        let host0 = procs::host_busy_seconds();
        let own0 = procs::own_cpu_seconds();
        let o = match procs::run_once(
            &spec,
            self.cfg.timeout,
            self.logs,
            &format!("{wl}-mirror"),
            true,
        ) {
            Ok(o) => o,
            Err(e) => return s.fail(format!("{e:#}")),
        };
        let own = procs::own_cpu_seconds() - own0;
        s.cpu_s = o.cpu_s.map(round3);
        s.other_cpu_s = procs::host_busy_seconds()
            .zip(host0)
            .map(|(h1, h0)| round3(h1 - h0 - o.cpu_s.unwrap_or(0.0) - own));
        s.seconds = o.ok().then_some(round4(o.wall));
        s.rss_kib = Rss {
            a: o.maxrss_kib,
            b: None,
            hub: None,
        };
        let (files, bytes) = tally(b);
        s.files = Some(files);
        s.bytes = Some(bytes);
        let summary: Option<Value> = serde_json::from_str(&o.stdout).ok();
        let mut problems = Vec::new();
        if !o.ok() {
            problems.push(o.failure("shoal mirror"));
        }
        match &summary {
            None => problems.push("stdout is not one JSON object".into()),
            Some(v) if wl.starts_with("W5") => {
                // a no-op run must carry nothing either way
                let moved: u64 = ["a_to_b", "b_to_a"]
                    .iter()
                    .filter_map(|k| v.get(*k).and_then(Value::as_u64))
                    .sum();
                if moved > 0 {
                    problems.push(format!("a no-op run carried {moved} changes"));
                }
            }
            Some(_) => {}
        }
        let check = match wl {
            "W1" | "W1L" => tree::compare(self.src, &a.join(top)),
            "W2" => tree::compare(self.src, a),
            "W3" | "W3L" => match &expect_changes {
                Some(c)
                    if workload::changes_visible(&b.join(top), c)
                        && workload::changes_visible(&a.join(top), c) =>
                {
                    Ok(())
                }
                _ => Err("the changed files do not hold their new bytes".into()),
            },
            "W4" => match &expect_middle {
                Some(m)
                    if workload::middle_is(&b.join(BIG_NAME), BIG_SIZE, m)
                        && workload::middle_is(&a.join(BIG_NAME), BIG_SIZE, m) =>
                {
                    Ok(())
                }
                _ => Err("big.bin does not hold the new middle MiB".into()),
            },
            "W6dir" if b.join(top).exists() => Err(format!("{top}/ still exists in B")),
            "W6file" if b.join(BIG_NAME).exists() => Err("big.bin still exists in B".into()),
            _ => Ok(()),
        }
        .and_then(|()| tree::compare(a, b));
        if let Err(e) = check {
            problems.push(format!("check: {e}"));
        }
        s.detail = json!({ "summary": summary });
        s.ok = problems.is_empty();
        if !problems.is_empty() {
            s.error = Some(problems.join("; "));
        }
        s
    }
}

/// The change of every counter between two readings.
fn delta(after: &BTreeMap<String, i64>, before: &BTreeMap<String, i64>) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0);
        if d != 0 {
            m.insert(k.clone(), json!(d));
        }
    }
    Value::Object(m)
}

/// Rounded to milliseconds.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Rounded to a tenth of a millisecond.
fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}
