//! Hub-to-hub partnership: this hub holds a workspace of another hub too, and keeps the two
//! replicas in step as a protocol client of the partner (upload what it lacks, download what
//! we lack), so two regions converge.
//!
//! Only this hub is configured: it logged in to the partner as one of its users, a member of
//! the workspace. Work starts when either replica changes (our own change events, the
//! partner's event stream); nothing polls. While the partner is down, changes wait here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use shoal_client::HubClient;
use shoal_core::{BatchLimits, ContentHash, Knowledge};
use shoal_protocol::{
    ChangeEvent, CommitRequest, DownloadRequest, DownloadResult, ItemResult, TransferStatus,
    UploadBatch, WireKnowledge, WireLimits, hex16, parse_hash,
};

use crate::HubError;
use crate::accounts::{Partner, Role};
use crate::api::{Hub, Workspace, with_replica};
use crate::replica::HUB_LIMITS;

impl From<shoal_client::ClientError> for HubError {
    fn from(error: shoal_client::ClientError) -> Self {
        HubError::Partner(error.to_string())
    }
}

/// Keeps one partnership in step until the process ends.
pub(crate) fn run(hub: Arc<Hub>, partner: Partner) {
    let ws = hex16(&partner.workspace);
    let workspace = match hub.workspace(partner.workspace) {
        Ok(workspace) => workspace,
        Err(error) => {
            tracing::error!(workspace = %ws, %error, "cannot open a partnered workspace");
            return;
        }
    };
    let (wake, woken) = mpsc::channel::<()>();

    // Our own changes (uploads by devices, or what we pulled from another partner).
    let mut local = workspace.events.subscribe();
    let local_wake = wake.clone();
    std::thread::spawn(move || {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match local.blocking_recv() {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    if local_wake.send(()).is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });

    // The partner's changes: its event stream (its first event is its current tag, so a
    // reconnect after an outage catches up).
    let remote_wake = wake.clone();
    let (url, token, device, remote_ws) = (
        partner.url.clone(),
        partner.token.clone(),
        partner.device.clone(),
        ws.clone(),
    );
    std::thread::spawn(move || {
        let mut backoff = Duration::from_millis(250);
        loop {
            let stream = HubClient::new(&url, Some(&token))
                .map(|c| c.for_device(&device))
                .and_then(|c| c.events(&remote_ws));
            if let Ok(response) = stream {
                backoff = Duration::from_millis(250);
                use std::io::BufRead;
                for line in std::io::BufReader::new(response).lines() {
                    let Ok(line) = line else { break };
                    let is_event = line
                        .strip_prefix("data:")
                        .and_then(|d| serde_json::from_str::<ChangeEvent>(d.trim()).ok())
                        .is_some();
                    if is_event && remote_wake.send(()).is_err() {
                        return;
                    }
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    });

    let mut backoff = Duration::from_millis(500);
    while woken.recv().is_ok() {
        // Coalesce a burst of wake-ups into one round.
        while woken.recv_timeout(Duration::from_millis(50)).is_ok() {}
        match sync_once(&hub, &workspace, &partner, &ws) {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(error) => {
                tracing::warn!(workspace = %ws, partner = %partner.url, %error, retry_in_ms = backoff.as_millis() as u64, "partner sync failed");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                let _ = wake.send(());
            }
        }
    }
}

/// One round: what the partner lacks goes up, then what we lack comes down.
fn sync_once(
    hub: &Hub,
    workspace: &Workspace,
    partner: &Partner,
    ws: &str,
) -> Result<(), HubError> {
    let (replica, epoch) = with_replica(workspace, |r| Ok(r.identity()))?;
    let client = HubClient::new(&partner.url, Some(&partner.token))?
        .for_device(&partner.device)
        .for_replica(ws, replica, epoch);
    let chunks = with_replica(workspace, |r| Ok(r.chunk_store()))?;

    let offer = client.upload_offer(ws)?;
    let theirs = Knowledge::try_from(&offer.knowledge)?;
    let limits = HUB_LIMITS.negotiate(BatchLimits {
        max_items: offer.limits.max_items,
        max_bytes: offer.limits.max_bytes,
    });
    let ours = with_replica(workspace, |r| r.knowledge())?;
    if ours == theirs {
        return Ok(());
    }
    let planned = with_replica(workspace, |r| r.plan_upload(&theirs, limits))?;
    let mut failed_before = false;
    for (batch, contents) in planned {
        let body = shoal_protocol::upload_batch(&batch, contents, !failed_before);
        let plan = client.upload_batch(ws, &hex16(&rand::random()), &body)?;
        let location = plan
            .locations
            .iter()
            .find(|l| l.transport == "http")
            .map(|l| l.url.clone())
            .ok_or_else(|| HubError::Partner("the partner offered no http location".into()))?;
        let mut statuses = Vec::with_capacity(plan.items.len());
        for item in &plan.items {
            for hash in &item.missing {
                let hash = parse_hash(hash)?;
                let bytes = chunks.get(&hash)?.ok_or_else(|| {
                    HubError::Internal(format!("chunk {hash} of a held version is missing"))
                })?;
                client.put_chunk(&location, &hash, bytes)?;
            }
            statuses.push(TransferStatus {
                dot: item.dot.clone(),
                transferred: true,
            });
        }
        let outcome = client.commit(&plan.commit, &CommitRequest { items: statuses })?;
        failed_before |= outcome
            .items
            .iter()
            .any(|i| i.outcome != "applied" && i.outcome != "conflict");
    }

    let request = DownloadRequest {
        knowledge: WireKnowledge::from(&with_replica(workspace, |r| r.knowledge())?),
        limits: WireLimits {
            max_items: limits.max_items,
            max_bytes: limits.max_bytes,
        },
        held: Vec::new(),
    };
    let response = client.download(ws, &request)?;
    let mut wire = response.batch;
    let mut results = Vec::new();
    loop {
        // A pulled batch goes through the same door as a device's upload: validated, applied
        // only when its content is held, in one transaction.
        let batch_id = hex16(&rand::random());
        let upload = UploadBatch {
            versions: wire.versions.clone(),
            contents: wire.contents.clone(),
            learned: wire.learned.clone(),
            last: wire.last,
        };
        let plan = with_replica(workspace, |r| {
            r.upload_batch(&batch_id, &upload, Role::Editor)
        })?;
        let lengths: HashMap<ContentHash, usize> = wire
            .contents
            .iter()
            .flat_map(|c| c.chunks.iter())
            .filter_map(|c| Some((parse_hash(&c.hash).ok()?, c.len as usize)))
            .collect();
        let location = wire
            .locations
            .iter()
            .find(|l| l.transport == "http")
            .map(|l| l.url.clone());
        for item in plan.items.iter().filter(|i| i.needed) {
            let Some(location) = &location else { break };
            for hash in &item.missing {
                let hash = parse_hash(hash)?;
                let Some(len) = lengths.get(&hash) else {
                    continue;
                };
                if let Ok(bytes) = client.get_chunk(location, &hash, *len)
                    && ContentHash::of(&bytes) == hash
                {
                    chunks.put(&hash, &bytes)?;
                }
            }
        }
        chunks.flush()?;
        let statuses = wire
            .versions
            .iter()
            .map(|v| TransferStatus {
                dot: v.dot.clone(),
                transferred: true,
            })
            .collect();
        let (outcome, changed) = with_replica(workspace, |r| {
            // The partner judged these by its rules; local rules apply to local writers.
            r.commit(
                &batch_id,
                &CommitRequest { items: statuses },
                &crate::rules::Rules::default(),
                &HashMap::new(),
            )
        })?;
        if changed {
            hub.announce_change(workspace, ws, &outcome.tag_after);
        }
        for item in &outcome.items {
            let ok = item.outcome == "applied" || item.outcome == "conflict";
            results.push(ItemResult {
                dot: item.dot.clone(),
                status: if ok { "applied" } else { "failed" }.into(),
                error: (!ok).then(|| item.reason.clone().unwrap_or_default()),
            });
        }
        match wire.next.take() {
            Some(next) => wire = client.batch(&next)?,
            None => break,
        }
    }
    client.download_result(
        &response.result,
        &DownloadResult {
            items: results,
            knowledge: WireKnowledge::from(&with_replica(workspace, |r| r.knowledge())?),
        },
    )?;
    Ok(())
}
