//! The agent daemon: keeps every workspace of a device in sync with the hub.
//!
//! Three things ask for a sync: the file watcher (a hint, coalesced over a short delay), the
//! hub's change-event stream (a long-lived connection; its first event tells a device that was
//! away whether it missed anything), and a periodic rescan as a backstop. No loop polls the hub.
//! While the hub is down, syncs are retried with exponential backoff; local changes wait in the
//! folder's replica and go up when it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use shoal_folder::NoProgress;
use shoal_protocol::ChangeEvent;

use crate::client::HubClient;
use crate::home::{Home, SyncRecord};
use crate::{AgentError, sync_workspace};

/// Timing of the daemon.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Full rescan of every folder this often, whatever the watcher says.
    pub rescan: Duration,
    /// Wait this long after a file event for more before syncing.
    pub debounce: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            rescan: Duration::from_secs(300),
            debounce: Duration::from_millis(200),
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Listens to one workspace's change events; asks for a sync when the hub's tag is not the
/// one this device last synced to. Reconnects with backoff.
fn listen(home: Home, client: HubClient, workspace: String, signals: Sender<Signal>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match client.events(&workspace) {
            Ok(response) => {
                backoff = Duration::from_millis(250);
                for line in std::io::BufReader::new(response).lines() {
                    let Ok(line) = line else { break };
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let Ok(event) = serde_json::from_str::<ChangeEvent>(data.trim()) else {
                        continue;
                    };
                    let known = home.sync_record(&workspace).ok().and_then(|r| r.hub_tag);
                    if known.as_deref() != Some(event.tag.as_str())
                        && signals.send(Signal::hub(&workspace)).is_err()
                    {
                        return;
                    }
                }
                // The stream ended: the hub went away. Sync when it is back, to catch up.
                if signals.send(Signal::hub(&workspace)).is_err() {
                    return;
                }
            }
            Err(AgentError::NotFound(_) | AgentError::Unauthorized(_)) => {
                tracing::warn!(%workspace, "the hub no longer lets this device see the workspace");
                return;
            }
            Err(error) => tracing::debug!(%workspace, %error, "event stream unavailable"),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// A request to sync one workspace, and whether it came from the file watcher (whose events
/// come in bursts worth waiting out) or from the hub (act at once).
struct Signal {
    workspace: String,
    from_files: bool,
}

impl Signal {
    fn hub(workspace: &str) -> Signal {
        Signal {
            workspace: workspace.to_owned(),
            from_files: false,
        }
    }
}

/// Runs until the process is stopped.
pub fn run_agent(home: &Home, options: &AgentOptions) -> Result<(), AgentError> {
    let device = home.device()?;
    let workspaces = home.workspaces()?;
    let (signals, inbox) = mpsc::channel::<Signal>();
    let client = HubClient::new(&device.hub, Some(&device.token))?;

    let mut watchers = Vec::new();
    for workspace in &workspaces {
        let id = workspace.id.clone();
        let sender = signals.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // Our own state and temporary files are not changes.
                let relevant = event.paths.iter().any(|p| {
                    !p.components().any(|c| c.as_os_str() == ".shoal")
                        && !p.file_name().is_some_and(|n| {
                            n.to_string_lossy().starts_with(shoal_core::TEMP_PREFIX)
                        })
                });
                if relevant && !event.kind.is_access() {
                    let _ = sender.send(Signal {
                        workspace: id.clone(),
                        from_files: true,
                    });
                }
            })
            .map_err(|e| {
                AgentError::Config(format!("cannot watch {}: {e}", workspace.path.display()))
            })?;
        watcher
            .watch(&workspace.path, RecursiveMode::Recursive)
            .map_err(|e| {
                AgentError::Config(format!("cannot watch {}: {e}", workspace.path.display()))
            })?;
        watchers.push(watcher);

        let (home, client, id, sender) = (
            home.clone(),
            client.clone(),
            workspace.id.clone(),
            signals.clone(),
        );
        std::thread::spawn(move || listen(home, client, id, sender));
        let _ = signals.send(Signal::hub(&workspace.id));
    }
    tracing::info!(workspaces = workspaces.len(), hub = %device.hub, "agent running");
    println!("shoal agent running with {} workspace(s)", workspaces.len());

    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut retry_at: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
    let mut next_rescan = Instant::now() + options.rescan;
    loop {
        let now = Instant::now();
        let next_retry = retry_at.values().map(|(at, _)| *at).min();
        let wake = next_retry.map_or(next_rescan, |r| r.min(next_rescan));
        match inbox.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(signal) => {
                let wait = signal.from_files;
                pending.insert(signal.workspace);
                // Coalesce a burst of file events into one sync; a hub event needs no wait.
                if wait {
                    let until = Instant::now() + options.debounce;
                    while let Ok(signal) =
                        inbox.recv_timeout(until.saturating_duration_since(Instant::now()))
                    {
                        pending.insert(signal.workspace);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        let now = Instant::now();
        if now >= next_rescan {
            pending.extend(workspaces.iter().map(|w| w.id.clone()));
            next_rescan = now + options.rescan;
        }
        for (id, (at, _)) in &retry_at {
            if *at <= now {
                pending.insert(id.clone());
            }
        }
        for id in std::mem::take(&mut pending) {
            let Some(workspace) = workspaces.iter().find(|w| w.id == id) else {
                continue;
            };
            let started = Instant::now();
            let result = sync_workspace(&device, workspace, &NoProgress);
            let mut record = home.sync_record(&id).unwrap_or_default();
            record.at = now_ns();
            match result {
                Ok(report) => {
                    tracing::info!(
                        workspace = %workspace.name,
                        uploaded = report.uploaded,
                        downloaded = report.downloaded,
                        conflicts = report.conflicts,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "synced"
                    );
                    record = SyncRecord {
                        at: record.at,
                        last_success: Some(record.at),
                        error: None,
                        hub_tag: Some(report.hub_tag),
                    };
                    retry_at.remove(&id);
                }
                Err(error) => {
                    let delay = retry_at
                        .get(&id)
                        .map_or(Duration::from_millis(500), |(_, d)| {
                            (*d * 2).min(Duration::from_secs(30))
                        });
                    tracing::warn!(workspace = %workspace.name, %error, retry_in_ms = delay.as_millis() as u64, "sync failed");
                    record.error = Some(error.to_string());
                    retry_at.insert(id.clone(), (Instant::now() + delay, delay));
                }
            }
            if let Err(error) = home.save_sync_record(&id, &record) {
                tracing::warn!(%error, "cannot save the sync record");
            }
        }
    }
}
