//! Validation rules an owner sets on a workspace: the hub refuses a change that breaks one,
//! and keeps the refused version with the reason.

use shoal_core::{Entry, ItemKind};
use shoal_protocol::WorkspaceRules;

use crate::HubError;

/// At most this many forbidden-name patterns, each at most this long.
const MAX_PATTERNS: usize = 256;
const MAX_PATTERN_LEN: usize = 255;

/// A workspace's rules (none set: everything a writer may write is accepted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rules {
    pub(crate) max_file_size: Option<u64>,
    pub(crate) forbidden: Vec<String>,
    pub(crate) quota_bytes: Option<u64>,
}

impl Rules {
    /// Rules from the wire, checked.
    pub(crate) fn from_wire(wire: &WorkspaceRules) -> Result<Rules, HubError> {
        if wire.forbidden.len() > MAX_PATTERNS {
            return Err(HubError::BadRequest(format!(
                "at most {MAX_PATTERNS} forbidden-name patterns"
            )));
        }
        for pattern in &wire.forbidden {
            if pattern.is_empty()
                || pattern.len() > MAX_PATTERN_LEN
                || pattern.contains(['/', '\0'])
            {
                return Err(HubError::BadRequest(format!(
                    "invalid name pattern {pattern:?}: 1 to {MAX_PATTERN_LEN} bytes, no '/'"
                )));
            }
        }
        Ok(Rules {
            max_file_size: wire.max_file_size,
            forbidden: wire.forbidden.clone(),
            quota_bytes: wire.quota_bytes,
        })
    }

    /// The wire form.
    pub(crate) fn to_wire(&self) -> WorkspaceRules {
        WorkspaceRules {
            max_file_size: self.max_file_size,
            forbidden: self.forbidden.clone(),
            quota_bytes: self.quota_bytes,
        }
    }

    /// Why a version with this entry breaks a rule on its own (size, name), if it does.
    pub(crate) fn refusal(&self, entry: &Entry) -> Option<String> {
        if entry.deleted {
            return None;
        }
        if let Some(pattern) = self
            .forbidden
            .iter()
            .find(|pattern| glob_matches(pattern, &entry.name))
        {
            return Some(format!(
                "names matching {pattern:?} are not allowed in this workspace"
            ));
        }
        match self.max_file_size {
            Some(max) if entry.kind == ItemKind::File && entry.size > max => Some(format!(
                "{} bytes is over this workspace's limit of {max} bytes per file",
                entry.size
            )),
            _ => None,
        }
    }
}

/// Whether `name` matches `pattern` (`*` any run, `?` one character), ignoring case.
fn glob_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.to_lowercase().chars().collect();
    let name: Vec<char> = name.to_lowercase().chars().collect();
    // Classic two-pointer match with backtracking to the last star.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(c) if *c == '?' || *c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::ItemId;

    fn file(name: &str, size: u64) -> Entry {
        Entry {
            parent: ItemId::ROOT,
            name: name.into(),
            kind: ItemKind::File,
            deleted: false,
            content: None,
            size,
            mtime_ns: 0,
            executable: false,
        }
    }

    #[test]
    fn patterns_match_names_ignoring_case() {
        assert!(glob_matches("*.exe", "setup.EXE"));
        assert!(glob_matches("*.exe", ".exe"));
        assert!(!glob_matches("*.exe", "setup.exe.txt"));
        assert!(glob_matches("thumbs.db", "Thumbs.db"));
        assert!(glob_matches("~$*", "~$report.docx"));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a?c", "ac"));
        assert!(glob_matches("*", "anything"));
    }

    #[test]
    fn each_rule_names_its_reason() {
        let rules = Rules {
            max_file_size: Some(10),
            forbidden: vec!["*.exe".into()],
            quota_bytes: None,
        };
        assert_eq!(rules.refusal(&file("small.txt", 10)), None);
        assert!(
            rules
                .refusal(&file("big.txt", 11))
                .is_some_and(|r| r.contains("limit of 10"))
        );
        assert!(
            rules
                .refusal(&file("x.exe", 1))
                .is_some_and(|r| r.contains("*.exe"))
        );
        let mut gone = file("x.exe", 100);
        gone.deleted = true;
        assert_eq!(rules.refusal(&gone), None, "deleting is always allowed");
    }
}
