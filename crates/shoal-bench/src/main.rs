//! `shoal-bench`: the project benchmark of issue #6.
//!
//! `shoal-bench gen` writes a seeded data set (W1, W1L, W2). `shoal-bench run` generates the
//! data it needs once, then runs shoal in each mode — two agents syncing peer-to-peer beside a
//! hub (`p2p`), two agents through the hub only (`hub`), and `shoal mirror` between two local
//! folders (`mirror`) — over every workload of the chosen sets, and writes one JSON line per
//! sample. The peers (Syncthing, rsync, Unison) are run by `../shared/bench` from
//! `bench/run-all.sh` in the same session, and `bench/all_table.py` puts both in one table.
//! Everything talks to 127.0.0.1 only.

mod http;
mod procs;
mod rng;
mod scenario;
mod shoal;
mod stats;
mod tree;
mod workload;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::scenario::{Config, Mode, Set, Sink};
use crate::workload::Data;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "shoal-bench",
    version,
    about = "The project benchmark: seeded workloads, shoal in every mode, one JSON line per sample"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// What to do.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a seeded data set into DIR (the same seed always gives the same bytes).
    Gen {
        /// w1 (10,000 × 4 KiB in 100 folders), w1l (50,000 × 4 KiB in 500), w2 (one 512 MiB file).
        #[arg(long)]
        workload: Data,
        /// The seed (default: 1 for w1, 2 for w1l, 3 for w2, as `run` uses).
        #[arg(long)]
        seed: Option<u64>,
        /// Where to write it (created).
        dir: PathBuf,
    },
    /// Run every scenario of the chosen sets and modes; one JSON line per sample.
    Run(RunArgs),
}

/// Options of `run`.
#[derive(Debug, Args)]
struct RunArgs {
    /// The shoal binary.
    #[arg(long, default_value = "target/release/shoal")]
    shoal: PathBuf,
    /// Scratch directory: data/ (the seeded sets, reused), runs/ (one folder per rep, removed
    /// after it), `logs/<mode>-<set>-<rep>/`.
    #[arg(long, default_value = "/tmp/shoal-allbench")]
    work: PathBuf,
    /// Comma list: small (W1, W3, W6 folder, W5), big (W2, W4, W6 file, W5big), large (W1L,
    /// W3L, W5L).
    #[arg(long, value_delimiter = ',', default_value = "small,big,large")]
    sets: Vec<Set>,
    /// Comma list: p2p (agents, peers on), hub (agents with --no-peers), mirror.
    #[arg(long, value_delimiter = ',', default_value = "p2p,hub,mirror")]
    modes: Vec<Mode>,
    /// Repetitions of each (set, mode), each from scratch.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// The results (JSON lines, appended). Default WORK/shoal-STAMP.jsonl; facts about the
    /// run go beside it as .meta.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Bound on every wait and every command, seconds.
    #[arg(long, default_value_t = 900.0)]
    timeout: f64,
    /// Keep each rep's folders (hub data, homes, trees) instead of removing them.
    #[arg(long)]
    keep: bool,
    /// Remove the generated data (WORK/data) at the end.
    #[arg(long)]
    drop_data: bool,
}

/// A progress line on stderr, stamped with the UTC time of day.
pub(crate) fn note(msg: &str) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    eprintln!(
        "[{:02}:{:02}:{:02}] {msg}",
        day / 3600,
        day % 3600 / 60,
        day % 60
    );
}

/// `YYYYMMDDTHHMMSS` in UTC for a time in seconds since the epoch.
fn stamp(secs: u64) -> String {
    // Days to a civil date (proleptic Gregorian), counting eras of 400 years from 0000-03-01.
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let t = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        t / 3600,
        t % 3600 / 60,
        t % 60
    )
}

/// The first line a command prints, or an empty string.
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

fn generate_data(data: Data, seed: Option<u64>, dir: &Path) -> Result<()> {
    let seed = seed.unwrap_or(data.default_seed());
    let t0 = std::time::Instant::now();
    workload::generate(data, seed, dir)?;
    note(&format!(
        "{}: {} files, {} bytes, seed {seed}, in {:.1} s: {}",
        data.name(),
        data.files(),
        data.bytes(),
        t0.elapsed().as_secs_f64(),
        dir.display()
    ));
    Ok(())
}

fn run(a: RunArgs) -> Result<bool> {
    if a.reps == 0 || a.sets.is_empty() || a.modes.is_empty() {
        bail!("--reps must be at least 1, and --sets and --modes must name something");
    }
    if !Path::new(procs::GNU_TIME).exists() {
        bail!(
            "GNU time ({}) is needed for peak RSS: apt-get install time",
            procs::GNU_TIME
        );
    }
    let bin = fs::canonicalize(&a.shoal).with_context(|| {
        format!(
            "the shoal binary {} (cargo build --release -p shoal-cli)",
            a.shoal.display()
        )
    })?;
    fs::create_dir_all(&a.work)?;
    let work = fs::canonicalize(&a.work)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let out = match a.out {
        Some(p) => p,
        None => work.join(format!("shoal-{}.jsonl", stamp(now))),
    };
    let meta_path = PathBuf::from(format!("{}.meta.json", out.with_extension("").display()));
    let mtime = fs::metadata(&bin)?
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let bin_s = bin.display().to_string();
    let commit = std::env::var("SHOAL_BENCH_BUILD_COMMIT")
        .unwrap_or_else(|_| first_line("git", &["rev-parse", "--short", "HEAD"]));
    let meta = json!({
        "started": stamp(now),
        "shoal": bin_s,
        "shoal_version": first_line(&bin_s, &["--version"]),
        "shoal_built": stamp(mtime),
        "shoal_bytes": fs::metadata(&bin)?.len(),
        "commit": commit,
        "dirty": std::env::var("SHOAL_BENCH_BUILD_DIRTY").unwrap_or_default(),
        "sets": a.sets.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "modes": a.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
        "reps": a.reps,
        "timeout_s": a.timeout,
        "work": work.display().to_string(),
        "parent_death_signal": Path::new("/usr/bin/setpriv").exists(),
    });
    if let Some(dir) = meta_path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&meta_path, serde_json::to_string_pretty(&meta)? + "\n")?;
    note(&format!("results: {}", out.display()));
    let cfg = Config {
        shoal: shoal::Shoal {
            bin,
            timeout: Duration::from_secs_f64(a.timeout),
        },
        work: work.clone(),
        sets: a.sets,
        modes: a.modes,
        reps: a.reps,
        out: out.clone(),
        timeout: Duration::from_secs_f64(a.timeout),
        keep: a.keep,
    };
    let mut sink = Sink::open(&cfg.out)?;
    let result = scenario::run(&cfg, &mut sink);
    summarize(&sink.samples);
    if a.drop_data {
        let _ = fs::remove_dir_all(work.join("data"));
    }
    result?;
    note(&format!("results: {}", out.display()));
    Ok(sink.samples.iter().all(|s| s.ok))
}

/// Medians per (mode, workload) on stderr, and hub-only against peer-to-peer.
fn summarize(samples: &[scenario::Sample]) {
    let mut groups: BTreeMap<(String, String), Vec<&scenario::Sample>> = BTreeMap::new();
    for s in samples {
        groups
            .entry((s.workload.clone(), s.mode.clone()))
            .or_default()
            .push(s);
    }
    note("summary: median over ok samples");
    let mut by_workload: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for ((wl, mode), ss) in &groups {
        let good: Vec<&&scenario::Sample> = ss.iter().filter(|s| s.ok).collect();
        let secs: Vec<f64> = good.iter().filter_map(|s| s.seconds).collect();
        let hub: Vec<f64> = good
            .iter()
            .filter_map(|s| s.hub_bytes)
            .map(|b| b as f64)
            .collect();
        let peer: Vec<f64> = good
            .iter()
            .filter_map(|s| s.peer_bytes)
            .map(|b| b as f64)
            .collect();
        let med = stats::median(&secs);
        if let Some(m) = med {
            by_workload
                .entry(wl.clone())
                .or_default()
                .insert(mode.clone(), m);
        }
        let fmt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |x| format!("{x:.0} {unit}"));
        note(&format!(
            "  {wl:<7} {mode:<6} {}/{} ok  {}  hub {}  peers {}",
            good.len(),
            ss.len(),
            med.map_or("-".to_owned(), |m| format!("{m:.3} s")),
            fmt(stats::median(&hub), "B"),
            fmt(stats::median(&peer), "B"),
        ));
    }
    for (wl, modes) in &by_workload {
        if let Some(r) = stats::ratio(modes.get("hub").copied(), modes.get("p2p").copied()) {
            note(&format!("  {wl}: hub-only / peer-to-peer {r:.2}x"));
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Gen {
            workload,
            seed,
            dir,
        } => generate_data(workload, seed, &dir).map(|()| true),
        Cmd::Run(args) => run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            note("some samples FAILED (see the results)");
            ExitCode::from(3)
        }
        Err(e) => {
            note(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_civil_dates() {
        assert_eq!(stamp(0), "19700101T000000");
        assert_eq!(stamp(951_782_400), "20000229T000000");
        assert_eq!(stamp(1_700_000_000), "20231114T221320");
    }

    #[test]
    fn command_line_parses_lists() {
        let cli = Cli::try_parse_from([
            "shoal-bench",
            "run",
            "--sets",
            "small,large",
            "--modes",
            "p2p,mirror",
            "--reps",
            "1",
        ])
        .expect("parses");
        let Cmd::Run(a) = cli.command else {
            panic!("not run");
        };
        assert_eq!(a.sets, vec![Set::Small, Set::Large]);
        assert_eq!(a.modes, vec![Mode::P2p, Mode::Mirror]);
        assert!(Cli::try_parse_from(["shoal-bench", "run", "--sets", "tiny"]).is_err());
        let g = Cli::try_parse_from(["shoal-bench", "gen", "--workload", "w1l", "/tmp/x"])
            .expect("gen parses");
        assert!(matches!(
            g.command,
            Cmd::Gen {
                workload: Data::W1l,
                seed: None,
                ..
            }
        ));
    }
}
