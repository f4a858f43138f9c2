//! The processes the benchmark starts, and what `/proc` says about them.
//!
//! Only processes started here are ever signalled, always by their own pid (or, for a one-shot
//! command on timeout, by the process group it was started in). Long-running ones (hub, agents)
//! are started through `setpriv --pdeathsig TERM` when it exists, so they get SIGTERM from the
//! kernel if the benchmark dies (Ctrl-C, `timeout`, a crash), and a [`Daemon`] stops its process
//! when dropped, which covers errors and panics.

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// util-linux `setpriv`, used to set the parent-death signal of long-running children.
const SETPRIV: &str = "/usr/bin/setpriv";
/// GNU time, used for the peak RSS and CPU of one-shot commands.
pub(crate) const GNU_TIME: &str = "/usr/bin/time";

/// A command to run: program, arguments and the whole environment (nothing is inherited).
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
}

impl Spec {
    /// `program` with no arguments and an empty environment.
    pub(crate) fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Adds one argument.
    pub(crate) fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds arguments.
    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable.
    pub(crate) fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// The command line, for messages.
    pub(crate) fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// A `Command` running `prefix…` then this program, with this environment only.
    fn command(&self, prefix: &[OsString]) -> Command {
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args).env_clear();
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// A long-running child (hub or agent), its output going to a log file. Stopped on drop.
#[derive(Debug)]
pub(crate) struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `spec` with stdout and stderr appended to `log`.
    pub(crate) fn start(spec: &Spec, name: &str, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let prefix: Vec<OsString> = if Path::new(SETPRIV).exists() {
            vec![
                SETPRIV.into(),
                "--pdeathsig".into(),
                "TERM".into(),
                "--".into(),
            ]
        } else {
            Vec::new()
        };
        let child = spec
            .command(&prefix)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", spec.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it is still running.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; reaps it. Does nothing if it has exited.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if !self.alive() {
            return;
        }
        // Not reaped yet, so the pid is still this child's.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if !self.alive() {
                if t0.elapsed() > Duration::from_secs(2) {
                    crate::note(&format!(
                        "{} took {:.1} s to exit on SIGTERM",
                        self.name,
                        t0.elapsed().as_secs_f64()
                    ));
                }
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        crate::note(&format!(
            "{} did not exit on SIGTERM; killing it",
            self.name
        ));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// What a one-shot command did.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcome {
    /// Its exit code (None if killed by a signal or timed out).
    pub(crate) code: Option<i32>,
    /// Wall time from spawn to exit, seconds.
    pub(crate) wall: f64,
    /// Whether it was killed for running too long.
    pub(crate) timed_out: bool,
    /// Its standard output.
    pub(crate) stdout: String,
    /// Its standard error.
    pub(crate) stderr: String,
    /// Peak RSS (GNU time `%M`), when measured.
    pub(crate) maxrss_kib: Option<u64>,
    /// User + system CPU seconds (GNU time), when measured.
    pub(crate) cpu_s: Option<f64>,
}

impl Outcome {
    /// Exited 0 in time.
    pub(crate) fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// Why it is not ok, with the tail of its stderr.
    pub(crate) fn failure(&self, what: &str) -> String {
        let tail: String = {
            let t = self.stderr.trim();
            let start = t.len().saturating_sub(400);
            let start = (start..=t.len())
                .find(|i| t.is_char_boundary(*i))
                .unwrap_or(0);
            t[start..].to_owned()
        };
        if self.timed_out {
            format!("{what}: timed out after {:.0} s; stderr: {tail}", self.wall)
        } else {
            format!("{what}: exit {:?}; stderr: {tail}", self.code)
        }
    }
}

/// Runs `spec` to completion (killed after `timeout`), its output kept in `logs/<tag>.out` and
/// `.err`. With `measure`, it runs under GNU time for its peak RSS and CPU. It gets a process
/// group of its own, so a timeout kills whatever it started too.
pub(crate) fn run_once(
    spec: &Spec,
    timeout: Duration,
    logs: &Path,
    tag: &str,
    measure: bool,
) -> Result<Outcome> {
    use std::os::unix::process::CommandExt;
    fs::create_dir_all(logs)?;
    let out_p = logs.join(format!("{tag}.out"));
    let err_p = logs.join(format!("{tag}.err"));
    let time_p = logs.join(format!("{tag}.time"));
    let prefix: Vec<OsString> = if measure {
        vec![
            GNU_TIME.into(),
            "-f".into(),
            "%M %U %S".into(),
            "-o".into(),
            time_p.clone().into_os_string(),
        ]
    } else {
        Vec::new()
    };
    let mut cmd = spec.command(&prefix);
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_p)?)
        .stderr(File::create(&err_p)?)
        .process_group(0);
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", spec.display()))?;
    let pid = child.id();
    // A thread waits, so the exit is timed to the moment it happens rather than to a poll.
    let (tx, rx) = mpsc::channel::<(std::io::Result<ExitStatus>, Instant)>();
    let waiter = thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send((status, Instant::now()));
    });
    let mut timed_out = false;
    let got = match rx.recv_timeout(timeout) {
        Ok(v) => Some(v),
        Err(_) => {
            timed_out = true;
            // The group we created for it: the command and anything it started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
            rx.recv_timeout(Duration::from_secs(30)).ok()
        }
    };
    let _ = waiter.join();
    let (code, t1) = match got {
        Some((Ok(status), t1)) => (status.code(), t1),
        Some((Err(_), t1)) => (None, t1),
        None => (None, Instant::now()),
    };
    let mut outcome = Outcome {
        code: if timed_out { None } else { code },
        wall: (t1 - t0).as_secs_f64(),
        timed_out,
        stdout: fs::read_to_string(&out_p).unwrap_or_default(),
        stderr: fs::read_to_string(&err_p).unwrap_or_default(),
        ..Outcome::default()
    };
    if measure && let Ok(text) = fs::read_to_string(&time_p) {
        // The last line is ours; GNU time puts "Command exited with non-zero status" above it.
        if let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 3 {
                outcome.maxrss_kib = f[0].parse().ok();
                outcome.cpu_s = match (f[1].parse::<f64>(), f[2].parse::<f64>()) {
                    (Ok(u), Ok(s)) => Some(u + s),
                    _ => None,
                };
            }
        }
    }
    Ok(outcome)
}

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`), in KiB.
pub(crate) fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak resident memory of a running process (`VmHWM`), KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// User + system clock ticks a process has used (`/proc/PID/stat`).
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = f.get(11)?.parse().ok()?;
    let system: u64 = f.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
fn ticks_per_second() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU seconds a process has used.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_ticks(pid).map(|t| t as f64 / ticks_per_second())
}

/// CPU seconds this benchmark process has used (all its threads).
pub(crate) fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// Busy CPU seconds of the whole machine since boot (all CPUs; idle and iowait excluded).
pub(crate) fn host_busy_seconds() -> Option<f64> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    let idle = v[3] + v[4];
    Some((v.iter().sum::<u64>() - idle) as f64 / ticks_per_second())
}

/// Waits until none of `pids` used a clock tick and none of `logs` grew for `hold`; gives up
/// after `max`. Returns whether it got quiet.
pub(crate) fn wait_quiet(pids: &[u32], logs: &[PathBuf], hold: Duration, max: Duration) -> bool {
    let t0 = Instant::now();
    let snap = || {
        let ticks: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
        let sizes: Vec<Option<u64>> = logs
            .iter()
            .map(|l| fs::metadata(l).ok().map(|m| m.len()))
            .collect();
        (ticks, sizes)
    };
    let mut last = snap();
    let mut since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = snap();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= hold {
            return true;
        }
        if t0.elapsed() > max {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_proc_entries() {
        let me = std::process::id();
        assert!(peak_rss_kib(me).is_some_and(|k| k > 0));
        assert!(cpu_ticks(me).is_some());
        assert!(host_busy_seconds().is_some_and(|s| s > 0.0));
        assert_eq!(status_kib(me, "NoSuchField"), None);
    }

    #[test]
    fn one_shot_commands_report_exit_and_time_out() {
        let logs = std::env::temp_dir().join(format!("shoal-bench-procs-{}", std::process::id()));
        let ok = run_once(
            &Spec::new("/bin/sh").args(["-c", "echo hi; exit 3"]),
            Duration::from_secs(10),
            &logs,
            "three",
            false,
        )
        .expect("run");
        assert_eq!(ok.code, Some(3));
        assert_eq!(ok.stdout, "hi\n");
        assert!(!ok.ok());
        let slow = run_once(
            &Spec::new("/bin/sleep").arg("30"),
            Duration::from_millis(300),
            &logs,
            "slow",
            false,
        )
        .expect("run");
        assert!(slow.timed_out);
        assert!(slow.wall < 10.0);
        let _ = fs::remove_dir_all(&logs);
    }
}
