//! Route paths. The server mounts these; clients build URIs with them.

/// Log in a device: `POST`.
pub const LOGIN: &str = "/v1/login";
/// The calling device's key fingerprint: `PUT`.
pub const DEVICE_KEY: &str = "/v1/device/key";
/// Presence: `PUT` the caller's document, `GET` the long-lived stream of contacts' presence
/// and negotiation messages.
pub const PRESENCE: &str = "/v1/presence";
/// `POST` a negotiation message for the hub to relay.
pub const NEGOTIATE: &str = "/v1/negotiate";
/// Counters of the server (sessions, bytes), as text.
pub const METRICS: &str = "/v1/metrics";
/// Workspaces of the caller: `GET` lists, `POST` creates.
pub const WORKSPACES: &str = "/v1/workspaces";

/// `…/{ws}`: base of one workspace's routes.
pub fn workspace(ws: &str) -> String {
    format!("{WORKSPACES}/{ws}")
}
/// `POST` an invitation (owner only).
pub fn invitations(ws: &str) -> String {
    format!("{}/invitations", workspace(ws))
}
/// `POST` to accept an invitation and become a member.
pub fn join(ws: &str) -> String {
    format!("{}/join", workspace(ws))
}
/// `POST` the caller's knowledge: first download batch.
pub fn download(ws: &str) -> String {
    format!("{}/download", workspace(ws))
}
/// `GET` one batch of a download session.
pub fn download_batch(ws: &str, session: &str, index: usize) -> String {
    format!("{}/download/{session}/batches/{index}", workspace(ws))
}
/// `PUT` per-item results of a download session.
pub fn download_result(ws: &str, session: &str) -> String {
    format!("{}/download/{session}/result", workspace(ws))
}
/// `POST` a recovery compare.
pub fn recovery(ws: &str) -> String {
    format!("{}/recovery", workspace(ws))
}
/// `GET` the server's knowledge and limits before an upload.
pub fn upload(ws: &str) -> String {
    format!("{}/upload", workspace(ws))
}
/// `PUT` batch metadata of an upload.
pub fn upload_batch(ws: &str, batch: &str) -> String {
    format!("{}/upload/batches/{batch}", workspace(ws))
}
/// `PUT` the commit of an upload batch.
pub fn upload_commit(ws: &str, batch: &str) -> String {
    format!("{}/upload/batches/{batch}/commit", workspace(ws))
}
/// `GET` (ranged) or `PUT` one chunk; `HEAD` says whether it is held.
pub fn chunks(ws: &str) -> String {
    format!("{}/chunks", workspace(ws))
}
/// `GET` a long-lived stream of change events.
pub fn events(ws: &str) -> String {
    format!("{}/events", workspace(ws))
}
/// `POST` a negotiation message to a peer.
pub fn peer_negotiate(ws: &str) -> String {
    format!("{}/negotiate", workspace(ws))
}
/// Base of a peer's content endpoint: `GET {base}/{content}/{chunk}` (ranged) reads one
/// chunk of a content the peer holds in its folder; `POST {base}/fetch` (a `ContentFetch`)
/// answers many chunks in one bundle.
pub fn peer_contents(ws: &str) -> String {
    format!("{}/contents", workspace(ws))
}
/// `GET` the chunk list (a `WireContent`) of a content the hub holds or is receiving.
pub fn content_list(ws: &str, hash: &str) -> String {
    format!("{}/contents/{hash}", workspace(ws))
}
/// `POST` a `ContentsKnown` to the hub: which contents it holds the chunk lists of.
pub fn contents_known(ws: &str) -> String {
    format!("{}/contents/known", workspace(ws))
}
/// `GET` (members) or `PUT` (owners) a workspace's validation rules.
pub fn rules(ws: &str) -> String {
    format!("{}/rules", workspace(ws))
}
/// `GET` the refused versions of a workspace (members); `DELETE {refusals}/{version}` lifts
/// one (owners), where the version is `REPLICA:EPOCH:TICK`.
pub fn refusals(ws: &str) -> String {
    format!("{}/refusals", workspace(ws))
}
