//! The hub and device commands: argument glue over `shoal-hub` and `shoal-agent`.

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use shoal_agent::{DeviceConfig, Home, HubClient, WorkspaceEntry};

use crate::Reporter;

#[derive(Args)]
pub(crate) struct HubArgs {
    /// The data directory (accounts, workspace replicas, content).
    #[arg(
        long,
        global = true,
        env = "SHOAL_HUB_DATA",
        default_value = "shoal-hub-data"
    )]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    #[command(subcommand)]
    command: Option<HubCommand>,
}

#[derive(Subcommand)]
enum HubCommand {
    /// Manage the hub's users.
    #[command(subcommand)]
    User(UserCommand),
    /// Partner this hub with another for a workspace, so both hold it and converge.
    #[command(subcommand)]
    Partner(PartnerCommand),
}

#[derive(Subcommand)]
enum PartnerCommand {
    /// Hold a workspace of the hub at URL here too (password of USER there from
    /// SHOAL_PASSWORD, else a prompt). Takes effect when the hub (re)starts.
    Add {
        /// The partner hub, e.g. http://127.0.0.1:7700.
        url: String,
        /// A user there who has joined the workspace.
        user: String,
        /// The workspace's name there.
        workspace: String,
        /// The local user who owns the workspace here (and invites this hub's users).
        #[arg(long)]
        owner: String,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user, or reset their password (password from SHOAL_PASSWORD, else a prompt).
    Add {
        /// The user name.
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum WorkspaceCommand {
    /// Create a workspace whose files live in DIR.
    Create {
        /// Workspace name.
        name: String,
        /// The folder to sync.
        #[arg(long)]
        path: PathBuf,
    },
    /// Invite a user to a workspace you own.
    Invite {
        /// Workspace name.
        name: String,
        /// The user invited.
        user: String,
        /// Their role.
        #[arg(long, default_value = "editor", value_parser = ["owner", "editor", "reader"])]
        role: String,
    },
    /// Join a workspace you were invited to (or add this device to one of yours).
    Join {
        /// Workspace name.
        name: String,
        /// The folder to sync it into.
        #[arg(long)]
        path: PathBuf,
        /// Join it at this hub (logged in with `shoal login`) rather than the first one; a
        /// workspace partnered between hubs can be joined at each and syncs with all.
        #[arg(long)]
        hub: Option<String>,
    },
    /// Show or change a workspace's validation rules (changing them: owners only). The hub
    /// refuses a change that breaks one and keeps it, with the reason, for `shoal status`.
    Rules {
        /// Workspace name.
        name: String,
        /// Refuse files larger than this (bytes; K, M, G suffixes for KiB, MiB, GiB).
        #[arg(long, value_parser = parse_size)]
        max_file_size: Option<u64>,
        /// Refuse names matching this pattern (`*` and `?`, case ignored), e.g. '*.exe'.
        #[arg(long)]
        forbid: Vec<String>,
        /// Stop refusing names matching this pattern.
        #[arg(long)]
        allow: Vec<String>,
        /// Refuse new content once the workspace holds this much (K, M, G suffixes).
        #[arg(long, value_parser = parse_size)]
        quota: Option<u64>,
        /// Remove every rule first.
        #[arg(long)]
        clear: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the versions the hub refused in a workspace, or (owners) lift a refusal after
    /// changing a rule: the author's device then offers the version again.
    Refusals {
        /// Workspace name.
        name: String,
        /// Lift the refusal of this version (`REPLICA:EPOCH:TICK`, as listed).
        #[arg(long)]
        lift: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Workspaces on the hub and on this device.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn home(explicit: Option<PathBuf>) -> anyhow::Result<Home> {
    let dir = match explicit {
        Some(dir) => dir,
        None => PathBuf::from(std::env::var_os("HOME").context("set --home or SHOAL_HOME")?)
            .join(".shoal"),
    };
    Ok(Home::open(&dir)?)
}

/// The password from SHOAL_PASSWORD, else asked on the terminal without echo.
fn password(prompt: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("SHOAL_PASSWORD") {
        return Ok(password);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("no password: set SHOAL_PASSWORD or run on a terminal");
    }
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let saved = rustix::termios::tcgetattr(&stdin).ok();
    if let Some(saved) = &saved {
        let mut quiet = saved.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet);
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(saved) = &saved {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, saved);
    }
    eprintln!();
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

pub(crate) fn hub(args: HubArgs) -> anyhow::Result<()> {
    match args.command {
        Some(HubCommand::User(UserCommand::Add { name })) => {
            let password = password(&format!("password for {name}: "))?;
            shoal_hub::add_user(&args.data, &name, &password)?;
            println!("user {name} added to the hub at {}", args.data.display());
            Ok(())
        }
        Some(HubCommand::Partner(PartnerCommand::Add {
            url,
            user,
            workspace,
            owner,
        })) => {
            let password = password(&format!("password for {user} at {url}: "))?;
            let id = shoal_hub::add_partner(&args.data, &url, &user, &password, &workspace, &owner)
                .context("adding the partnership")?;
            println!("workspace {workspace} ({id}) is now held here too, partnered with {url}");
            Ok(())
        }
        None => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(shoal_hub::serve(shoal_hub::HubConfig {
                data: args.data,
                listen: args.listen,
            }))?;
            Ok(())
        }
    }
}

pub(crate) fn agent(home: &Home, listen: std::net::SocketAddr, peers: bool) -> anyhow::Result<()> {
    let mut options = shoal_agent::AgentOptions {
        listen,
        peers,
        ..Default::default()
    };
    if let Some(seconds) = std::env::var("SHOAL_RESCAN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        options.rescan = std::time::Duration::from_secs(seconds);
    }
    shoal_agent::run_agent(home, &options)?;
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "device".into())
}

pub(crate) fn login(
    home: &Home,
    hub: &str,
    user: &str,
    device_name: Option<String>,
) -> anyhow::Result<()> {
    let device_name = device_name.unwrap_or_else(host_name);
    let password = password(&format!("password for {user} at {hub}: "))?;
    let answer = HubClient::new(hub, None)?
        .login(
            user,
            &password,
            &device_name,
            Some(&home.identity()?.fingerprint()),
        )
        .context("logging in")?;
    home.save_login(&DeviceConfig {
        hub: hub.trim_end_matches('/').to_owned(),
        user: answer.user,
        token: answer.token,
        device: answer.device,
        device_name: device_name.clone(),
    })?;
    println!("logged in to {hub} as {user} (device {device_name})");
    Ok(())
}

fn client(home: &Home) -> anyhow::Result<(DeviceConfig, HubClient)> {
    let device = home.device()?;
    let client = HubClient::new(&device.hub, Some(&device.token))?;
    Ok((device, client))
}

fn prepare_folder(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path.canonicalize()?)
}

/// Records that this device holds a workspace in `path` (created if missing), synced with
/// `hub` (among the others it is already synced with).
fn hold(
    home: &Home,
    info: shoal_protocol::WorkspaceInfo,
    path: &Path,
    hub: &str,
) -> anyhow::Result<PathBuf> {
    let path = prepare_folder(path)?;
    let primary = home.device()?.hub;
    let existing = home.workspaces()?.into_iter().find(|w| w.id == info.id);
    let mut hubs = match &existing {
        Some(entry) if entry.path != path => bail!(
            "workspace {} is already held here in {}",
            entry.name,
            entry.path.display()
        ),
        Some(entry) => entry.hubs_or(&primary),
        None => Vec::new(),
    };
    if !hubs.iter().any(|h| h == hub) {
        hubs.push(hub.to_owned());
    }
    // One hub, the main one: the short form.
    if hubs == [primary] {
        hubs.clear();
    }
    home.put_workspace(WorkspaceEntry {
        id: info.id,
        name: info.name,
        path: path.clone(),
        role: info.role,
        hubs,
    })?;
    Ok(path)
}

pub(crate) fn workspace(home: &Home, command: WorkspaceCommand) -> anyhow::Result<()> {
    let (device, client) = match &command {
        WorkspaceCommand::Join { hub: Some(hub), .. } => {
            let login = home.login_for(hub)?;
            let client = HubClient::new(&login.hub, Some(&login.token))?;
            (login, client)
        }
        _ => client(home)?,
    };
    match command {
        WorkspaceCommand::Create { name, path } => {
            let info = client.create_workspace(&name)?;
            let path = hold(home, info.clone(), &path, &device.hub)?;
            println!(
                "created workspace {name} ({}) in {}",
                info.id,
                path.display()
            );
        }
        WorkspaceCommand::Invite { name, user, role } => {
            let id = find(&client, &name, |w| w.joined)?.id;
            client.invite(&id, &user, &role)?;
            println!("invited {user} to {name} as {role}");
        }
        WorkspaceCommand::Join { name, path, .. } => {
            let found = find(&client, &name, |_| true)?;
            let info = if found.joined {
                found
            } else {
                client.join(&found.id)?
            };
            let path = hold(home, info, &path, &device.hub)?;
            println!(
                "joined {name} at {} in {}; run `shoal sync` or `shoal agent`",
                device.hub,
                path.display()
            );
        }
        WorkspaceCommand::Rules {
            name,
            max_file_size,
            forbid,
            allow,
            quota,
            clear,
            json,
        } => {
            let id = find(&client, &name, |w| w.joined)?.id;
            let mut rules = if clear {
                shoal_protocol::WorkspaceRules::default()
            } else {
                client.rules(&id)?
            };
            let changing = clear
                || max_file_size.is_some()
                || quota.is_some()
                || !forbid.is_empty()
                || !allow.is_empty();
            if let Some(max) = max_file_size {
                rules.max_file_size = Some(max);
            }
            if let Some(quota) = quota {
                rules.quota_bytes = Some(quota);
            }
            rules.forbidden.retain(|p| !allow.contains(p));
            for pattern in forbid {
                if !rules.forbidden.contains(&pattern) {
                    rules.forbidden.push(pattern);
                }
            }
            if changing {
                client.set_rules(&id, &rules)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rules)?);
            } else {
                let or_none =
                    |v: Option<u64>| v.map_or("none".to_owned(), |v| format!("{v} bytes"));
                println!(
                    "{name}: largest file {}, quota {}",
                    or_none(rules.max_file_size),
                    or_none(rules.quota_bytes)
                );
                if rules.forbidden.is_empty() {
                    println!("  no forbidden names");
                }
                for pattern in &rules.forbidden {
                    println!("  forbidden: {pattern}");
                }
            }
        }
        WorkspaceCommand::Refusals { name, lift, json } => {
            let id = find(&client, &name, |w| w.joined)?.id;
            if let Some(version) = lift {
                client.lift_refusal(&id, &version)?;
                println!(
                    "lifted the refusal of {version}; its author's device offers it again at its next sync"
                );
                return Ok(());
            }
            let refusals = client.refusals(&id)?;
            let rows: Vec<serde_json::Value> = refusals
                .iter()
                .map(|r| {
                    let v = &r.version;
                    serde_json::json!({
                        "version": format!("{}:{}:{}", v.dot.replica, v.dot.epoch, v.dot.tick),
                        "name": v.entry.name, "device": v.device, "user": v.user,
                        "size": v.entry.size, "reason": r.reason,
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("{name}: nothing refused");
            } else {
                for row in &rows {
                    println!(
                        "{} by {} on {} ({}): {}",
                        row["name"].as_str().unwrap_or(""),
                        row["user"].as_str().unwrap_or(""),
                        row["device"].as_str().unwrap_or(""),
                        row["version"].as_str().unwrap_or(""),
                        row["reason"].as_str().unwrap_or("")
                    );
                }
            }
        }
        WorkspaceCommand::List { json } => {
            let remote = client.workspaces()?;
            let local = home.workspaces()?;
            let rows: Vec<serde_json::Value> = remote
                .iter()
                .map(|w| {
                    let here = local.iter().find(|l| l.id == w.id);
                    serde_json::json!({
                        "id": w.id, "name": w.name, "role": w.role, "owner": w.owner, "joined": w.joined,
                        "path": here.map(|l| l.path.display().to_string()),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for (w, row) in remote.iter().zip(&rows) {
                    let state = if w.joined {
                        w.role.clone()
                    } else {
                        format!("invited as {}", w.role)
                    };
                    let path = row["path"].as_str().unwrap_or("not on this device");
                    println!("{}  ({state}, owner {})  {path}", w.name, w.owner);
                }
            }
        }
    }
    Ok(())
}

fn find(
    client: &HubClient,
    name: &str,
    filter: impl Fn(&shoal_protocol::WorkspaceInfo) -> bool,
) -> anyhow::Result<shoal_protocol::WorkspaceInfo> {
    let matches: Vec<_> = client
        .workspaces()?
        .into_iter()
        .filter(|w| (w.name == name || w.id == name) && filter(w))
        .collect();
    match matches.len() {
        0 => bail!("no workspace named {name:?} on the hub for this user"),
        1 => Ok(matches.into_iter().next().context("one match")?),
        _ => bail!("several workspaces are named {name:?}; use the id from `shoal workspace list`"),
    }
}

pub(crate) fn sync(home: &Home, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let primary = home.device()?;
    let reporter = Reporter::new();
    let mut summaries = Vec::new();
    let mut failed = false;
    // Peers this device heard of (a running agent keeps the list): pulled from first, as the
    // nearest holders; one that cannot be reached is simply skipped.
    let contacts = shoal_agent::Contacts::from_list(home.peers()?);
    let identity = home.identity()?;
    for workspace in home.workspace(name)? {
        let ours = shoal_agent::compact_knowledge(&primary.device_name, &workspace).ok();
        // Content the hub sends is asked of these first (nearer); one that lacks it is asked
        // no more for that content.
        let mut nearby = Vec::new();
        for peer in contacts.reachable(&workspace.id) {
            let (Some(address), Some(key)) = (peer.addresses.first(), peer.key.as_deref()) else {
                continue;
            };
            if peer.device != primary.device
                && let Ok(client) = shoal_agent::peer_client(address, &identity, key)
            {
                nearby.push(client);
            }
            // Known to hold what we hold (as the agent last heard): no pull, no handshake.
            // If it changed since, the hub round below still finds it nearer.
            let same = peer
                .workspaces
                .iter()
                .any(|w| w.workspace == workspace.id && Some(&w.compact) == ours.as_ref());
            if same {
                continue;
            }
            let pulled = shoal_agent::peer_client(address, &identity, key).and_then(|client| {
                shoal_agent::pull_from_peer(&primary, &workspace, &client, &reporter)
            });
            let Ok(report) = pulled else { continue };
            summaries.push(serde_json::json!({
                "workspace": workspace.name,
                "peer": peer.device_name,
                "downloaded": report.downloaded,
                // All from that peer (its batches name it as the place to fetch from).
                "bytes_downloaded": report.bytes_from_peers + report.bytes_from_hub,
                "conflicts": report.conflicts,
            }));
            if !json {
                println!(
                    "{}: received {} from peer {}",
                    workspace.name, report.downloaded, peer.device_name
                );
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mut record = home.sync_record(&workspace.id)?;
        record.at = now;
        // Each hub in turn, carrying only the replica's knowledge from one to the next.
        for hub in workspace.hubs_or(&primary.hub) {
            let result = home.login_for(&hub).and_then(|login| {
                shoal_agent::sync_workspace_with(&login, &workspace, &nearby, &reporter)
            });
            match result {
                Ok(report) => {
                    record.last_success = Some(now);
                    record.error = None;
                    if hub == primary.hub {
                        record.hub_tag = Some(report.hub_tag.clone());
                    }
                    summaries.push(serde_json::json!({
                    "workspace": workspace.name,
                    "hub": hub,
                    "uploaded": report.uploaded,
                    "refused": report.refused.iter().map(|(n, r)| serde_json::json!({"name": n, "reason": r})).collect::<Vec<_>>(),
                    "upload_failed": report.upload_failed,
                    "chunks_uploaded": report.chunks_uploaded,
                    "bytes_uploaded": report.bytes_uploaded,
                    "downloaded": report.downloaded,
                    "download_failed": report.download_failed,
                    "conflicts": report.conflicts,
                    "recovered": report.recovered,
                    "new_epoch": report.new_epoch,
                    "written": report.materialize.written,
                    "bytes_from_peers": report.bytes_from_peers,
                    "bytes_from_hub": report.bytes_from_hub,
                    "bytes_written": report.materialize.bytes,
                    "local_changes": report.scan.created + report.scan.modified + report.scan.moved + report.scan.deleted + report.scan.resolved,
                }));
                    if !json {
                        println!(
                            "{}: sent {} change(s), received {}, {} conflict(s), {} refused",
                            workspace.name,
                            report.uploaded,
                            report.downloaded,
                            report.conflicts,
                            report.refused.len()
                        );
                        for (name, reason) in &report.refused {
                            println!("  refused: {name}: {reason}");
                        }
                    }
                }
                Err(error) => {
                    failed = true;
                    record.error = Some(error.to_string());
                    summaries.push(
                    serde_json::json!({"workspace": workspace.name, "hub": hub, "error": error.to_string()}),
                );
                    if !json {
                        eprintln!("{} at {hub}: {error}", workspace.name);
                    }
                }
            }
        }
        home.save_sync_record(&workspace.id, &record)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    if failed {
        bail!("some workspaces did not sync");
    }
    Ok(())
}

pub(crate) fn status(home: &Home, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let statuses = shoal_agent::status(home, name)?;
    if json {
        let rows: Vec<serde_json::Value> = statuses
            .iter()
            .map(|s| {
                serde_json::json!({
                    "workspace": s.workspace.name,
                    "id": s.workspace.id,
                    "path": s.workspace.path,
                    "in_sync": s.in_sync(),
                    "hub_reachable": s.hub_reachable,
                    "pending_upload": s.pending_upload,
                    "behind": s.behind,
                    "disk_pending": s.disk_pending,
                    "conflicts": s.conflicts.iter().map(|c| serde_json::json!({"name": c.name, "versions": c.versions})).collect::<Vec<_>>(),
                    "refused": s.refused.iter().map(|r| serde_json::json!({"name": r.name, "reason": r.reason})).collect::<Vec<_>>(),
                    "last_sync_ns": s.last_sync,
                    "last_error": s.last_error,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for s in &statuses {
        let state = if s.in_sync() {
            "in sync"
        } else if !s.hub_reachable {
            "hub unreachable"
        } else {
            "not in sync"
        };
        println!("{}: {state}", s.workspace.name);
        if let Some(pending) = s.pending_upload.filter(|p| *p > 0) {
            println!("  {pending} change(s) waiting to be sent");
        }
        if s.behind == Some(true) {
            println!("  the hub has changes not yet received");
        }
        for c in &s.conflicts {
            println!("  conflict: {} ({} versions)", c.name, c.versions);
        }
        for r in &s.refused {
            println!("  refused: {}: {}", r.name, r.reason);
        }
        if let Some(error) = &s.last_error {
            println!("  last sync failed: {error}");
        }
    }
    Ok(())
}

pub(crate) fn presence(home: &Home, status: Option<&str>, json: bool) -> anyhow::Result<()> {
    if let Some(status) = status {
        let status: shoal_protocol::Availability =
            serde_json::from_value(serde_json::Value::String(status.to_owned()))?;
        home.save_availability(status)?;
        println!("this device now shows as {}", availability_name(status));
        return Ok(());
    }
    let own = home.availability()?;
    let names: std::collections::HashMap<String, String> = home
        .workspaces()?
        .into_iter()
        .map(|w| (w.id, w.name))
        .collect();
    let contacts = home.peers()?;
    if json {
        let rows: Vec<serde_json::Value> = contacts
            .iter()
            .map(|p| {
                serde_json::json!({
                    "device": p.device, "device_name": p.device_name, "user": p.user,
                    "status": p.status, "addresses": p.addresses, "key": p.key,
                    "workspaces": p.workspaces.iter()
                        .map(|w| names.get(&w.workspace).cloned().unwrap_or_else(|| w.workspace.clone()))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = serde_json::json!({ "status": own, "contacts": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("this device: {}", availability_name(own));
    if contacts.is_empty() {
        println!("no contacts heard of yet (the agent learns them from the hub)");
    }
    for peer in &contacts {
        let shared: Vec<&str> = peer
            .workspaces
            .iter()
            .map(|w| {
                names
                    .get(&w.workspace)
                    .map_or(w.workspace.as_str(), String::as_str)
            })
            .collect();
        println!(
            "{} ({}) — {}; shares {}",
            peer.device_name,
            peer.user,
            availability_name(peer.status),
            shared.join(", ")
        );
    }
    Ok(())
}

fn availability_name(status: shoal_protocol::Availability) -> &'static str {
    use shoal_protocol::Availability::*;
    match status {
        Online => "online",
        Away => "away",
        Busy => "busy",
        NotReceiving => "online, not receiving messages",
        Offline => "offline",
    }
}

fn conflict_json(conflict: &shoal_folder::Conflict) -> serde_json::Value {
    let versions: Vec<serde_json::Value> = conflict
        .versions
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let version = &v.version;
            serde_json::json!({
                "number": index + 1,
                "item": v.item.to_string(),
                "version": shoal_protocol::dot_path(&version.dot),
                "device": version.device,
                "user": version.user,
                "written_at_ns": version.written_at,
                "written_at": shoal_core::utc_stamp(version.written_at),
                "size": version.entry.size,
                "deleted": version.entry.deleted,
                "name": version.entry.name,
                "shown_at": v.shown_at,
                "winner": v.winner,
            })
        })
        .collect();
    serde_json::json!({
        "path": conflict.path,
        "kind": conflict.kind.as_str(),
        "versions": versions,
    })
}

pub(crate) fn conflicts(home: &Home, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let device = home.device()?;
    let mut rows = Vec::new();
    for workspace in home.workspace(name)? {
        let folder = shoal_agent::open_folder(&device, &workspace)?;
        let listed = folder.conflicts()?;
        // Versions the hub refused are kept and listed here too, with the reason.
        let refused = folder.store().refused()?;
        if json {
            for conflict in &listed {
                let mut row = conflict_json(conflict);
                row["workspace"] = serde_json::Value::String(workspace.name.clone());
                rows.push(row);
            }
            for (_, version, reason) in &refused {
                rows.push(serde_json::json!({
                    "workspace": workspace.name,
                    "path": version.entry.name,
                    "kind": "refused",
                    "reason": reason,
                    "versions": [{
                        "number": 1,
                        "version": shoal_protocol::dot_path(&version.dot),
                        "device": version.device, "user": version.user,
                        "written_at_ns": version.written_at,
                        "written_at": shoal_core::utc_stamp(version.written_at),
                        "size": version.entry.size, "deleted": version.entry.deleted,
                        "name": version.entry.name,
                    }],
                }));
            }
            continue;
        }
        for (_, version, reason) in &refused {
            println!(
                "{}: {} (refused by the hub: {reason}; written by {} on {})",
                workspace.name, version.entry.name, version.user, version.device
            );
        }
        if listed.is_empty() && refused.is_empty() {
            println!("{}: no conflicts", workspace.name);
        }
        for conflict in &listed {
            println!(
                "{}: {} ({})",
                workspace.name,
                conflict.path,
                conflict.kind.as_str()
            );
            for (index, v) in conflict.versions.iter().enumerate() {
                let version = &v.version;
                let who = if version.user.is_empty() {
                    version.device.clone()
                } else {
                    format!("{} on {}", version.user, version.device)
                };
                let what = if version.entry.deleted {
                    "deleted".to_owned()
                } else {
                    format!("{} bytes", version.entry.size)
                };
                let place = match (&v.shown_at, v.winner) {
                    (Some(at), true) => format!("shown at {at}"),
                    (Some(at), false) => format!("kept at {at}"),
                    (None, _) => "not shown".to_owned(),
                };
                println!(
                    "  {}. {who}, {} UTC, {what}, {place}{}",
                    index + 1,
                    shoal_core::utc_stamp(version.written_at),
                    if v.winner { " (winner)" } else { "" }
                );
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

pub(crate) fn resolve(
    home: &Home,
    workspace: Option<&str>,
    path: &str,
    how: &shoal_folder::Resolution,
    then_sync: bool,
    json: bool,
) -> anyhow::Result<()> {
    let device = home.device()?;
    let held = home.workspace(workspace)?;
    let entry = match held.as_slice() {
        [one] => one.clone(),
        _ => bail!("this device holds several workspaces; say which with --workspace"),
    };
    let mut folder = shoal_agent::open_folder(&device, &entry)?;
    let report = folder
        .resolve(path, how, &Reporter::new())
        .with_context(|| format!("resolving {path}"))?;
    drop(folder);
    let mut synced = None;
    if then_sync {
        let mut ok = true;
        for hub in entry.hubs_or(&device.hub) {
            let result = home
                .login_for(&hub)
                .and_then(|login| shoal_agent::sync_workspace(&login, &entry, &Reporter::new()));
            if let Err(error) = result {
                ok = false;
                if !json {
                    eprintln!(
                        "not synced with {hub} yet: {error}; the resolution goes with the next sync"
                    );
                }
            }
        }
        synced = Some(ok);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "workspace": entry.name, "path": path, "versions_written": report.versions,
                "written": report.materialize.written, "synced": synced,
            }))?
        );
    } else {
        println!("resolved {path} in {}", entry.name);
    }
    Ok(())
}

/// "1500", "64K", "10M", "2G" (binary multiples).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size: a number with an optional K, M or G"))?;
    let factor: u64 = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("unknown size unit in {text:?}: K, M or G")),
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}
