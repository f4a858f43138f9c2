//! The `shoal` command: parses arguments and calls the library crates. No sync logic here.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_folder::{MirrorOptions, MirrorReport, Progress, SideReport};

mod devices;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Local-first sync of folders, lists and conversations"
)]
struct Cli {
    /// The device's home: its login, workspaces and settings (default ~/.shoal).
    #[arg(long, global = true, env = "SHOAL_HOME")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two-way sync of two local folders (state kept in each folder's .shoal/).
    Mirror {
        /// The first folder.
        dir_a: PathBuf,
        /// The second folder.
        dir_b: PathBuf,
        /// Print a JSON summary on standard output.
        #[arg(long)]
        json: bool,
        /// Sync even if a folder that held files is now empty (it really was emptied).
        #[arg(long)]
        allow_empty: bool,
    },
    /// Run the hub (the server), or manage its users.
    Hub(devices::HubArgs),
    /// Run the device agent: watch folders, serve peers, sync continuously with peers and hub.
    Agent {
        /// Where to serve the protocol to peers (TLS), e.g. 127.0.0.1:7701; port 0 picks one.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Do not sync with peers directly: everything goes through the hub.
        #[arg(long)]
        no_peers: bool,
    },
    /// Log this device in to a hub (password from SHOAL_PASSWORD, else a prompt).
    Login {
        /// The hub, e.g. http://127.0.0.1:7700.
        hub_url: String,
        /// The user.
        user: String,
        /// A name for this device (default: the host name).
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Create, invite to, join or list workspaces.
    #[command(subcommand)]
    Workspace(devices::WorkspaceCommand),
    /// One full sync round with the hub, then exit.
    Sync {
        /// Only this workspace.
        name: Option<String>,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Per workspace: in sync or not, pending items, conflicts, refusals, last sync, hub.
    Status {
        /// Only this workspace.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List unresolved conflicts: what collided, every version with its device, user, time
    /// and size, and which one is shown.
    Conflicts {
        /// Only this workspace.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Settle a conflict (as `shoal conflicts` lists it); the resolution syncs like any change.
    #[command(group(clap::ArgGroup::new("how").required(true).args(["keep", "both", "merged"])))]
    Resolve {
        /// The conflict's path, as `shoal conflicts` shows it.
        path: String,
        /// The workspace (needed when this device holds several).
        #[arg(long)]
        workspace: Option<String>,
        /// Keep version N of the listing (1 is the one shown now).
        #[arg(long)]
        keep: Option<usize>,
        /// Keep every version, each under its own name.
        #[arg(long)]
        both: bool,
        /// Replace every version with this file (a merge you made).
        #[arg(long)]
        merged: Option<std::path::PathBuf>,
        /// Do not sync afterwards.
        #[arg(long)]
        no_sync: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set this device's presence, or show its contacts' (as the hub last said).
    Presence {
        /// The status to show contacts; the running agent publishes it at once.
        #[arg(value_parser = ["online", "away", "busy", "not_receiving"])]
        status: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A progress bar on a terminal, log lines otherwise.
pub(crate) struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub(crate) fn new() -> Reporter {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{msg:>9} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        Reporter { bar }
    }
}

impl Progress for Reporter {
    fn start(&self, phase: &str, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.reset();
                bar.set_length(total);
                bar.set_message(phase.to_owned());
            }
            None => tracing::info!(phase, total, "started"),
        }
    }
    fn advance(&self, units: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(units);
        }
    }
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn side_json(side: &SideReport) -> serde_json::Value {
    serde_json::json!({
        "path": side.path,
        "local_changes": {
            "created": side.scan.created,
            "modified": side.scan.modified,
            "moved": side.scan.moved,
            "deleted": side.scan.deleted,
            "resolved": side.scan.resolved,
            "hashed_bytes": side.scan.hashed_bytes,
        },
        "received": side.received.received,
        "conflicts": side.received.conflicts,
        "failed": side.received.failed,
        "recovered": side.received.recovered,
        "written": side.materialize.written,
        "renamed": side.materialize.renamed,
        "deleted": side.materialize.deleted,
        "folders_created": side.materialize.folders,
        "bytes_written": side.materialize.bytes,
        "skipped": side.scan.skipped.iter().chain(&side.materialize.skipped).chain(&side.materialize.refused)
            .map(|s| serde_json::json!({"path": s.path, "reason": s.reason})).collect::<Vec<_>>(),
    })
}

fn print_mirror(report: &MirrorReport, json: bool) -> anyhow::Result<()> {
    if json {
        let value = serde_json::json!({
            "a_to_b": report.b.received.received,
            "b_to_a": report.a.received.received,
            "conflicts": report.a.received.conflicts + report.b.received.conflicts,
            "bytes": report.a.materialize.bytes + report.b.materialize.bytes,
            "new_epoch": report.new_epoch,
            "tombstones_forgotten": report.forgotten,
            "a": side_json(&report.a),
            "b": side_json(&report.b),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    for (label, side) in [("a", &report.a), ("b", &report.b)] {
        println!(
            "{label}: {} — received {} change(s), {} conflict(s), wrote {} file(s) ({} bytes), renamed {}, deleted {}",
            side.path.display(),
            side.received.received,
            side.received.conflicts,
            side.materialize.written,
            side.materialize.bytes,
            side.materialize.renamed,
            side.materialize.deleted
        );
        for skipped in side
            .scan
            .skipped
            .iter()
            .chain(&side.materialize.skipped)
            .chain(&side.materialize.refused)
        {
            println!("  not synced: {} ({})", skipped.path, skipped.reason);
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mirror {
            dir_a,
            dir_b,
            json,
            allow_empty,
        } => {
            let options = MirrorOptions {
                allow_empty,
                ..MirrorOptions::default()
            };
            let reporter = Reporter::new();
            let report =
                shoal_folder::mirror(&dir_a, &dir_b, &options, &reporter).with_context(|| {
                    format!("mirroring {} and {}", dir_a.display(), dir_b.display())
                })?;
            print_mirror(&report, json)
        }
        Command::Hub(args) => devices::hub(args),
        Command::Agent { listen, no_peers } => {
            devices::agent(&devices::home(cli.home)?, listen, !no_peers)
        }
        Command::Login {
            hub_url,
            user,
            device_name,
        } => devices::login(&devices::home(cli.home)?, &hub_url, &user, device_name),
        Command::Workspace(command) => devices::workspace(&devices::home(cli.home)?, command),
        Command::Sync { name, json } => {
            devices::sync(&devices::home(cli.home)?, name.as_deref(), json)
        }
        Command::Status { name, json } => {
            devices::status(&devices::home(cli.home)?, name.as_deref(), json)
        }
        Command::Conflicts { name, json } => {
            devices::conflicts(&devices::home(cli.home)?, name.as_deref(), json)
        }
        Command::Resolve {
            path,
            workspace,
            keep,
            both,
            merged,
            no_sync,
            json,
        } => {
            let how = match (keep, merged) {
                (Some(n), _) => shoal_folder::Resolution::Keep(n),
                (None, Some(file)) => shoal_folder::Resolution::Merged(file),
                (None, None) if both => shoal_folder::Resolution::Both,
                (None, None) => unreachable_resolution()?,
            };
            devices::resolve(
                &devices::home(cli.home)?,
                workspace.as_deref(),
                &path,
                &how,
                !no_sync,
                json,
            )
        }
        Command::Presence { status, json } => {
            devices::presence(&devices::home(cli.home)?, status.as_deref(), json)
        }
    }
}

/// clap's argument group already requires one way to resolve.
fn unreachable_resolution() -> anyhow::Result<shoal_folder::Resolution> {
    anyhow::bail!("say how to resolve: --keep N, --both or --merged FILE")
}

/// Gives glibc's malloc one arena. By default it hands threads up to eight arenas per core
/// and keeps freed memory in each, so the transfer threads (each with a bundle of a few
/// megabytes) doubled peak memory: W1 peer-to-peer measured 83 MiB per device, 42 MiB with one
/// arena, at the same speed.
#[allow(unsafe_code)]
fn cap_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called first thing in main, before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Lets the hub keep the memory it frees for its next requests. By default glibc maps each
/// buffer of a megabyte or more on its own and unmaps it when freed, and gives back a heap's
/// free top, so the next bundle faults in fresh pages; on a virtual machine that hands freed
/// pages back to its host, each such fault costs the host one too. W2 through the hub by
/// hand: 2.59 / 2.62 / 2.90 s untuned, 2.02 / 2.03 s with the hub tuned in the next series;
/// the hub's peak RSS 30-33 -> 48-58 MiB. (Devices tuned the same way gained less and held
/// 5-8 MiB more on W1L, whose memory target is tight.)
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: as above; called from main before the hub starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if matches!(cli.command, Command::Hub(_)) {
        keep_freed_memory();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shoal: {error:#}");
            ExitCode::from(1)
        }
    }
}
