//! Users, devices, workspaces and memberships, in the hub's own SQLite database.
//!
//! Passwords are stored as argon2id PHC strings; device tokens as their BLAKE3 hash, so a copy
//! of the database lets nobody log in.

use std::collections::HashSet;
use std::path::Path;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use rusqlite::{Connection, OptionalExtension, params};

use crate::HubError;

/// What a member may do in a workspace.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Role {
    /// Reads only; changes are refused.
    Reader,
    /// Reads and writes.
    Editor,
    /// Reads, writes, invites.
    Owner,
}

impl Role {
    /// The role's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Editor => "editor",
            Role::Owner => "owner",
        }
    }

    /// Parses a role name.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "reader" => Some(Role::Reader),
            "editor" => Some(Role::Editor),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// An authenticated device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Device {
    /// Device id.
    pub(crate) id: [u8; 16],
    /// Its user's id.
    pub(crate) user: i64,
    /// Its user's name.
    pub(crate) user_name: String,
}

/// What peers are shown about a device besides its presence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeviceCard {
    /// Its user's id.
    pub(crate) user: i64,
    /// Its user's name.
    pub(crate) user_name: String,
    /// The device's name.
    pub(crate) name: String,
    /// The key fingerprint the hub vouches for, if the device registered one.
    pub(crate) key: Option<String>,
}

/// One workspace as a user sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Membership {
    /// Workspace id.
    pub(crate) workspace: [u8; 16],
    /// Workspace name.
    pub(crate) name: String,
    /// The user's role.
    pub(crate) role: Role,
    /// Whether the user accepted (false: only invited).
    pub(crate) joined: bool,
    /// The owner's name.
    pub(crate) owner: String,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, password TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id BLOB PRIMARY KEY, user INTEGER NOT NULL REFERENCES users (id), name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE, key TEXT
);
CREATE TABLE IF NOT EXISTS workspaces (
    id BLOB PRIMARY KEY, name TEXT NOT NULL, owner INTEGER NOT NULL REFERENCES users (id),
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS replicas (
    replica BLOB PRIMARY KEY, workspace BLOB NOT NULL, device BLOB NOT NULL REFERENCES devices (id)
);
CREATE TABLE IF NOT EXISTS rules (
    workspace BLOB PRIMARY KEY REFERENCES workspaces (id), max_file_size INTEGER,
    forbidden TEXT NOT NULL DEFAULT '[]', quota_bytes INTEGER
);
CREATE TABLE IF NOT EXISTS partners (
    workspace BLOB NOT NULL REFERENCES workspaces (id), url TEXT NOT NULL, token TEXT NOT NULL,
    device TEXT NOT NULL, PRIMARY KEY (workspace, url)
);
CREATE TABLE IF NOT EXISTS members (
    workspace BLOB NOT NULL REFERENCES workspaces (id), user INTEGER NOT NULL REFERENCES users (id),
    role TEXT NOT NULL, joined INTEGER NOT NULL, PRIMARY KEY (workspace, user)
);
"#;

// Every request authenticates and checks membership, so these two statements stay prepared.
// They use subqueries, not joins: in this SQLite build a join whose WHERE clause names a bound
// parameter is prepared again at every execution (about 30 µs each; 17% of the hub's CPU
// during W2 through the hub), while a subquery is not.
const AUTHENTICATE: &str = "SELECT d.id, d.user, (SELECT name FROM users WHERE id = d.user)
     FROM devices d WHERE d.token_hash = ?1";
const MEMBERSHIP: &str = "SELECT m.workspace,
     (SELECT name FROM workspaces WHERE id = m.workspace), m.role, m.joined,
     (SELECT u.name FROM workspaces w, users u WHERE w.id = m.workspace AND u.id = w.owner)
     FROM members m WHERE m.workspace = ?1 AND m.user = ?2";

/// The accounts database.
pub(crate) struct Accounts {
    conn: Connection,
}

/// Argon2 takes 19 MiB per hash by design. Every check runs on one dedicated thread: the
/// allocator keeps memory per thread, so checks spread over many request threads would each
/// leave 19 MiB behind.
fn password_matches(password: &str, hash: &str) -> bool {
    type Job = (String, String, std::sync::mpsc::Sender<bool>);
    static WORKER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let sender = WORKER.get_or_init(|| {
        let (sender, jobs) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (password, hash, answer) in jobs {
                let ok = Argon2::default()
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok();
                let _ = answer.send(ok);
            }
        });
        std::sync::Mutex::new(sender)
    });
    let (answer, result) = std::sync::mpsc::channel();
    let sent = sender
        .lock()
        .map(|s| {
            s.send((password.to_owned(), hash.to_owned(), answer))
                .is_ok()
        })
        .unwrap_or(false);
    sent && result.recv().unwrap_or(false)
}

fn hash_token(token: &str) -> Vec<u8> {
    blake3::derive_key("shoal device token v1", token.as_bytes()).to_vec()
}

impl Accounts {
    /// Opens (creating) `hub.db` in `data`.
    pub(crate) fn open(data: &Path) -> Result<Accounts, HubError> {
        std::fs::create_dir_all(data).map_err(|e| HubError::Io(data.to_path_buf(), e))?;
        let conn = Connection::open(data.join("hub.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        add_key_column(&conn)?;
        Ok(Accounts { conn })
    }

    /// Adds a user (or replaces their password).
    pub(crate) fn add_user(&self, name: &str, password: &str) -> Result<(), HubError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || "-_.".contains(c))
        {
            return Err(HubError::BadRequest(format!(
                "invalid user name {name:?}: use letters, digits, - _ ."
            )));
        }
        if password.len() < 4 {
            return Err(HubError::BadRequest(
                "the password is too short (at least 4 characters)".into(),
            ));
        }
        let hash = Argon2::default()
            .hash_password(password.as_bytes())
            .map_err(|e| HubError::Internal(format!("hashing the password: {e}")))?
            .to_string();
        self.conn.execute(
            "INSERT INTO users (name, password) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET password = excluded.password",
            params![name, hash],
        )?;
        Ok(())
    }

    /// Checks a password and registers a new device; returns its id and token.
    pub(crate) fn login(
        &self,
        name: &str,
        password: &str,
        device_name: &str,
        key: Option<&str>,
    ) -> Result<([u8; 16], String), HubError> {
        // Checked before the password, so a bad key registers no device.
        if let Some(key) = key {
            check_key(key)?;
        }
        let found: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT id, password FROM users WHERE name = ?1",
                params![name],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((user, hash)) = found else {
            return Err(HubError::Unauthorized);
        };
        if !password_matches(password, &hash) {
            return Err(HubError::Unauthorized);
        }
        let device: [u8; 16] = rand::random();
        let token: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.conn.execute(
            "INSERT INTO devices (id, user, name, token_hash, key) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![device.to_vec(), user, device_name, hash_token(&token), key],
        )?;
        Ok((device, token))
    }

    /// Sets (replaces) a device's key fingerprint.
    pub(crate) fn set_device_key(&self, device: &[u8; 16], key: &str) -> Result<(), HubError> {
        check_key(key)?;
        let updated = self.conn.execute(
            "UPDATE devices SET key = ?1 WHERE id = ?2",
            params![key, device.to_vec()],
        )?;
        if updated == 0 {
            return Err(HubError::Unauthorized);
        }
        Ok(())
    }

    /// A device's user, name and key, if the device exists.
    pub(crate) fn device_card(&self, device: &[u8; 16]) -> Result<Option<DeviceCard>, HubError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT users.id, users.name, devices.name, devices.key FROM devices
                 JOIN users ON users.id = devices.user WHERE devices.id = ?1",
            )?
            .query_row(params![device.to_vec()], |row| {
                Ok(DeviceCard {
                    user: row.get(0)?,
                    user_name: row.get(1)?,
                    name: row.get(2)?,
                    key: row.get(3)?,
                })
            })
            .optional()?)
    }

    /// The workspaces a user has joined (invitations not yet accepted do not count).
    pub(crate) fn joined_workspaces(&self, user: i64) -> Result<HashSet<[u8; 16]>, HubError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT workspace FROM members WHERE user = ?1 AND joined = 1")?;
        let rows = statement.query_map(params![user], |row| row.get::<_, Vec<u8>>(0))?;
        let mut out = HashSet::new();
        for row in rows {
            if let Ok(id) = <[u8; 16]>::try_from(row?) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// The device a bearer token belongs to.
    pub(crate) fn authenticate(&self, token: &str) -> Result<Device, HubError> {
        self.conn
            .prepare_cached(AUTHENTICATE)?
            .query_row(params![hash_token(token)], |row| {
                let id: Vec<u8> = row.get(0)?;
                Ok((id, row.get(1)?, row.get::<_, Option<String>>(2)?))
            })
            .optional()?
            .and_then(|(id, user, user_name)| {
                Some(Device {
                    id: id.try_into().ok()?,
                    user,
                    user_name: user_name?,
                })
            })
            .ok_or(HubError::Unauthorized)
    }

    /// Creates a workspace owned by `user`.
    pub(crate) fn create_workspace(&self, user: i64, name: &str) -> Result<Membership, HubError> {
        self.create_workspace_with_id(user, rand::random(), name)
    }

    /// Creates a workspace with a given id (a partner hub's workspace, held here too).
    pub(crate) fn create_workspace_with_id(
        &self,
        user: i64,
        id: [u8; 16],
        name: &str,
    ) -> Result<Membership, HubError> {
        if name.is_empty() || name.len() > 128 || name.contains(['/', '\0']) {
            return Err(HubError::BadRequest(format!(
                "invalid workspace name {name:?}"
            )));
        }
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO workspaces (id, name, owner) VALUES (?1, ?2, ?3)",
            params![id.to_vec(), name, user],
        )?;
        if inserted == 0 {
            return Err(HubError::Conflict(format!(
                "you already have a workspace named {name:?}"
            )));
        }
        self.conn.execute(
            "INSERT INTO members (workspace, user, role, joined) VALUES (?1, ?2, 'owner', 1)",
            params![id.to_vec(), user],
        )?;
        self.membership(&id, user)?
            .ok_or(HubError::Internal("workspace vanished".into()))
    }

    /// Every workspace the user is a member of or invited to.
    pub(crate) fn memberships(&self, user: i64) -> Result<Vec<Membership>, HubError> {
        let mut statement = self.conn.prepare(
            "SELECT w.id, w.name, m.role, m.joined, u.name FROM members m
             JOIN workspaces w ON w.id = m.workspace JOIN users u ON u.id = w.owner
             WHERE m.user = ?1 ORDER BY w.name",
        )?;
        let rows = statement.query_map(params![user], membership_from)?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(membership) = row? {
                out.push(membership);
            }
        }
        Ok(out)
    }

    /// The user's membership of one workspace, if any.
    pub(crate) fn membership(
        &self,
        workspace: &[u8; 16],
        user: i64,
    ) -> Result<Option<Membership>, HubError> {
        Ok(self
            .conn
            .prepare_cached(MEMBERSHIP)?
            .query_row(params![workspace.to_vec(), user], membership_from)
            .optional()?
            .flatten())
    }

    /// Invites a user (by name) with a role; only an owner may.
    pub(crate) fn invite(
        &self,
        workspace: &[u8; 16],
        by: i64,
        user: &str,
        role: Role,
    ) -> Result<(), HubError> {
        let Some(inviter) = self.membership(workspace, by)?.filter(|m| m.joined) else {
            return Err(HubError::NotFound);
        };
        if inviter.role != Role::Owner {
            return Err(HubError::Forbidden("only an owner can invite".into()));
        }
        if user == inviter.owner || self.user_id(user)? == Some(by) {
            // The owner's own role never changes: a workspace always keeps someone who can invite.
            return Err(HubError::BadRequest(format!(
                "{user} owns or already administers this workspace; their role cannot change"
            )));
        }
        let invitee: Option<i64> = self
            .conn
            .query_row("SELECT id FROM users WHERE name = ?1", params![user], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(invitee) = invitee else {
            return Err(HubError::BadRequest(format!(
                "there is no user named {user:?}"
            )));
        };
        self.conn.execute(
            "INSERT INTO members (workspace, user, role, joined) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT (workspace, user) DO UPDATE SET role = excluded.role",
            params![workspace.to_vec(), invitee, role.as_str()],
        )?;
        Ok(())
    }

    pub(crate) fn user_id(&self, name: &str) -> Result<Option<i64>, HubError> {
        Ok(self
            .conn
            .query_row("SELECT id FROM users WHERE name = ?1", params![name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Accepts an invitation.
    pub(crate) fn join(&self, workspace: &[u8; 16], user: i64) -> Result<Membership, HubError> {
        let updated = self.conn.execute(
            "UPDATE members SET joined = 1 WHERE workspace = ?1 AND user = ?2",
            params![workspace.to_vec(), user],
        )?;
        if updated == 0 {
            return Err(HubError::NotFound);
        }
        self.membership(workspace, user)?.ok_or(HubError::NotFound)
    }
}

/// Adds `devices.key` to a database made before devices had keys.
fn add_key_column(conn: &Connection) -> Result<(), HubError> {
    let mut columns = conn.prepare("SELECT name FROM pragma_table_info('devices')")?;
    let names = columns.query_map([], |row| row.get::<_, String>(0))?;
    for name in names {
        if name? == "key" {
            return Ok(());
        }
    }
    conn.execute("ALTER TABLE devices ADD COLUMN key TEXT", [])?;
    Ok(())
}

/// A key fingerprint is BLAKE3 output in lowercase hex: one spelling per key, so peers can
/// compare it as a string.
fn check_key(key: &str) -> Result<(), HubError> {
    if key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(HubError::BadRequest(format!(
            "device key: expected 64 lowercase hex digits, got {:?}",
            key.chars().take(80).collect::<String>()
        )))
    }
}

/// A membership row: workspace id, workspace name, role, joined, owner's name. A missing name
/// (no such workspace or owner) means no membership.
fn membership_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Membership>> {
    let id: Vec<u8> = row.get(0)?;
    let role: String = row.get(2)?;
    let joined: i64 = row.get(3)?;
    let (Some(name), Some(owner)) = (row.get(1)?, row.get(4)?) else {
        return Ok(None);
    };
    Ok(Some(Membership {
        workspace: match id.try_into() {
            Ok(id) => id,
            Err(_) => return Ok(None),
        },
        name,
        role: match Role::parse(&role) {
            Some(role) => role,
            None => return Ok(None),
        },
        joined: joined != 0,
        owner,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn databases_from_before_device_keys_gain_the_column() -> TestResult {
        let dir = tempfile::tempdir()?;
        {
            // The devices table as it was before keys.
            let conn = Connection::open(dir.path().join("hub.db"))?;
            conn.execute_batch(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, password TEXT NOT NULL);
                 CREATE TABLE devices (id BLOB PRIMARY KEY, user INTEGER NOT NULL REFERENCES users (id),
                     name TEXT NOT NULL, token_hash BLOB NOT NULL UNIQUE);
                 INSERT INTO users (id, name, password) VALUES (1, 'old', 'x');
                 INSERT INTO devices (id, user, name, token_hash) VALUES (x'00000000000000000000000000000001', 1, 'box', x'01');",
            )?;
        }
        let accounts = Accounts::open(dir.path())?;
        let old = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let card = accounts.device_card(&old)?.ok_or("no card")?;
        assert_eq!((card.name.as_str(), card.key), ("box", None));
        let key = "ab".repeat(32);
        accounts.set_device_key(&old, &key)?;
        assert_eq!(accounts.device_card(&old)?.ok_or("no card")?.key, Some(key));
        // Opening again finds the column and leaves it.
        drop(accounts);
        Accounts::open(dir.path())?;
        Ok(())
    }

    #[test]
    fn each_requests_statements_are_prepared_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        let accounts = Accounts::open(dir.path())?;
        for name in ["ann", "bob"] {
            accounts.add_user(name, "pw-pw")?;
        }
        let (_, ann_token) = accounts.login("ann", "pw-pw", "laptop", None)?;
        let (_, bob_token) = accounts.login("bob", "pw-pw", "phone", None)?;
        let ann = accounts.authenticate(&ann_token)?;
        let bob = accounts.authenticate(&bob_token)?;
        let made = accounts.create_workspace(ann.user, "notes")?;
        for _ in 0..3 {
            for (token, user) in [(&ann_token, &ann), (&bob_token, &bob)] {
                assert_eq!(accounts.authenticate(token)?.user, user.user);
            }
            let mine = accounts
                .membership(&made.workspace, ann.user)?
                .ok_or("no membership")?;
            assert_eq!((mine.name.as_str(), mine.owner.as_str()), ("notes", "ann"));
            assert_eq!(mine.role, Role::Owner);
            assert!(accounts.membership(&made.workspace, bob.user)?.is_none());
        }
        assert!(matches!(
            accounts.authenticate("nobody"),
            Err(HubError::Unauthorized)
        ));
        for sql in [AUTHENTICATE, MEMBERSHIP] {
            let statement = accounts.conn.prepare_cached(sql)?;
            let again = statement.get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(again, 0, "{sql}");
        }
        Ok(())
    }

    #[test]
    fn keys_are_64_lowercase_hex_digits() -> TestResult {
        let dir = tempfile::tempdir()?;
        let accounts = Accounts::open(dir.path())?;
        accounts.add_user("ann", "ann-pw")?;
        let key = "0f".repeat(32);
        let (device, _) = accounts.login("ann", "ann-pw", "laptop", Some(&key))?;
        for bad in [
            "AB".repeat(32),
            "ab".repeat(31),
            "zz".repeat(32),
            String::new(),
        ] {
            assert!(matches!(
                accounts.set_device_key(&device, &bad),
                Err(HubError::BadRequest(_))
            ));
            assert!(matches!(
                accounts.login("ann", "ann-pw", "phone", Some(&bad)),
                Err(HubError::BadRequest(_))
            ));
        }
        let card = accounts.device_card(&device)?.ok_or("no card")?;
        assert_eq!(card.key, Some(key));
        let devices: i64 = accounts
            .conn
            .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))?;
        assert_eq!(devices, 1, "a refused key registers no device");
        Ok(())
    }
}

/// A partner hub that holds one of this hub's workspaces too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Partner {
    /// The workspace.
    pub(crate) workspace: [u8; 16],
    /// The partner hub's base URL.
    pub(crate) url: String,
    /// This hub's device token there.
    pub(crate) token: String,
    /// This hub's device id there.
    pub(crate) device: String,
}

impl Accounts {
    /// Records (or replaces) a partnership.
    pub(crate) fn add_partner(&self, partner: &Partner) -> Result<(), HubError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO partners (workspace, url, token, device) VALUES (?1, ?2, ?3, ?4)",
            params![
                partner.workspace.to_vec(),
                partner.url,
                partner.token,
                partner.device
            ],
        )?;
        Ok(())
    }

    /// Every partnership.
    pub(crate) fn partners(&self) -> Result<Vec<Partner>, HubError> {
        let mut statement = self
            .conn
            .prepare("SELECT workspace, url, token, device FROM partners ORDER BY url")?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
            ))
        })?;
        let mut partners = Vec::new();
        for row in rows {
            let (workspace, url, token, device) = row?;
            let workspace = workspace.try_into().map_err(|_| {
                HubError::Internal("a partner's workspace id is not 16 bytes".into())
            })?;
            partners.push(Partner {
                workspace,
                url,
                token,
                device,
            });
        }
        Ok(partners)
    }
}

impl Accounts {
    /// A workspace's validation rules (none set: the default, which accepts everything).
    pub(crate) fn rules(&self, workspace: &[u8; 16]) -> Result<crate::rules::Rules, HubError> {
        let row: Option<(Option<i64>, String, Option<i64>)> = self
            .conn
            .query_row(
                "SELECT max_file_size, forbidden, quota_bytes FROM rules WHERE workspace = ?1",
                params![workspace.to_vec()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((max, forbidden, quota)) = row else {
            return Ok(crate::rules::Rules::default());
        };
        let forbidden: Vec<String> = serde_json::from_str(&forbidden)
            .map_err(|e| HubError::Internal(format!("stored rules are unreadable: {e}")))?;
        Ok(crate::rules::Rules {
            max_file_size: max.map(|m| m as u64),
            forbidden,
            quota_bytes: quota.map(|q| q as u64),
        })
    }

    /// Sets a workspace's rules; owners only.
    pub(crate) fn set_rules(
        &self,
        workspace: &[u8; 16],
        user: i64,
        rules: &crate::rules::Rules,
    ) -> Result<(), HubError> {
        match self.membership(workspace, user)? {
            Some(m) if m.joined && m.role == Role::Owner => {}
            Some(m) if m.joined => {
                return Err(HubError::Forbidden(
                    "only an owner can change the workspace's rules".into(),
                ));
            }
            _ => return Err(HubError::NotFound),
        }
        let forbidden = serde_json::to_string(&rules.forbidden)
            .map_err(|e| HubError::Internal(e.to_string()))?;
        let as_sql = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        self.conn.execute(
            "INSERT OR REPLACE INTO rules (workspace, max_file_size, forbidden, quota_bytes)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                workspace.to_vec(),
                as_sql(rules.max_file_size),
                forbidden,
                as_sql(rules.quota_bytes)
            ],
        )?;
        Ok(())
    }
}

impl Accounts {
    /// Records which device a workspace replica belongs to, the first time the device syncs it
    /// (so the hub can judge a version by its author, whoever uploads it). A replica id already
    /// recorded keeps its first device.
    pub(crate) fn register_replica(
        &self,
        workspace: &[u8; 16],
        replica: &shoal_core::ReplicaId,
        device: &[u8; 16],
    ) -> Result<(), HubError> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO replicas (replica, workspace, device) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                replica.0.to_vec(),
                workspace.to_vec(),
                device.to_vec()
            ])?;
        Ok(())
    }

    /// The role in `workspace` of the user behind each replica recorded for it.
    pub(crate) fn author_roles(
        &self,
        workspace: &[u8; 16],
    ) -> Result<std::collections::HashMap<shoal_core::ReplicaId, Role>, HubError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT replicas.replica, members.role FROM replicas
             JOIN devices ON devices.id = replicas.device
             JOIN members ON members.user = devices.user AND members.workspace = replicas.workspace
             WHERE replicas.workspace = ?1",
        )?;
        let rows = statement.query_map(params![workspace.to_vec()], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut roles = std::collections::HashMap::new();
        for row in rows {
            let (replica, role) = row?;
            let (Ok(replica), Some(role)) = (<[u8; 16]>::try_from(replica), Role::parse(&role))
            else {
                continue;
            };
            roles.insert(shoal_core::ReplicaId(replica), role);
        }
        Ok(roles)
    }
}
