//! Which item names a replica accepts, and how conflict copies are named.
//!
//! Names arrive from other replicas and so from the network: a name must never reach outside
//! its parent directory or be something a file system cannot store.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The empty string names nothing.
    #[error("the name is empty")]
    Empty,
    /// `.` and `..` would address the directory itself or its parent.
    #[error("the name {0:?} refers to a directory itself or its parent")]
    DotOrDotDot(String),
    /// A separator would make the name a path.
    #[error("the name {0:?} contains a path separator")]
    Separator(String),
    /// NUL and other control characters cannot be stored or shown safely.
    #[error("the name {0:?} contains a control character")]
    ControlCharacter(String),
    /// File systems limit a name to 255 bytes.
    #[error("the name is {0} bytes long; the limit is 255")]
    TooLong(usize),
    /// Names shoal keeps for its own state and temporary files.
    #[error("the name {0:?} is reserved for shoal's own files")]
    Reserved(String),
}

/// The folder that holds a folder replica's own state, at its root.
pub const STATE_DIR_NAME: &str = ".shoal";
/// Prefix of the temporary files a replica writes before renaming them into place.
pub const TEMP_PREFIX: &str = ".~shoal.";

/// Checks that `name` is a single, storable path component.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(NameError::DotOrDotDot(name.to_owned()));
    }
    if name.contains(['/', '\\']) {
        return Err(NameError::Separator(name.to_owned()));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter(name.to_owned()));
    }
    if name.len() > 255 {
        return Err(NameError::TooLong(name.len()));
    }
    if name.starts_with(TEMP_PREFIX) {
        return Err(NameError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Splits `name` into stem and extension (with its dot); dotfiles and names without a dot
/// have no extension.
/// A name's stem and extension (".txt", with the dot; empty for none or a leading dot).
pub fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(0) | None => (name, ""),
        Some(index) => name.split_at(index),
    }
}

/// The name of a conflict copy: `report.conflict-laptop-2026-11-22-153000.txt`. The original
/// name, the device that wrote the losing version and when, so a person knows what it is.
pub fn conflict_copy_name(original: &str, device: &str, written_at_ns: i64) -> String {
    let (stem, extension) = split_extension(original);
    let device: String = device
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let stamp = utc_stamp(written_at_ns);
    let mut name = format!("{stem}.conflict-{device}-{stamp}{extension}");
    while name.len() > 255 {
        name.remove(0);
    }
    name
}

/// `YYYY-MM-DD-HHMMSS` in UTC, computed without a clock or time-zone database.
pub fn utc_stamp(ns: i64) -> String {
    let seconds = ns.div_euclid(1_000_000_000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}-{:02}{:02}{:02}",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a\\b",
            "nul\0",
            "tab\t",
            ".~shoal.x.tmp",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            validate_name(&"x".repeat(256)),
            Err(NameError::TooLong(256))
        );
        for good in ["a.txt", ".hidden", "ünïcödé", "with space", "..dots"] {
            assert_eq!(validate_name(good), Ok(()), "{good:?} refused");
        }
    }

    #[test]
    fn conflict_copies_keep_name_device_and_date() {
        // 2026-11-22 15:30:00 UTC
        let at = 1_795_361_400 * 1_000_000_000;
        assert_eq!(
            conflict_copy_name("report.txt", "laptop", at),
            "report.conflict-laptop-2026-11-22-153000.txt"
        );
        assert_eq!(
            conflict_copy_name(".bashrc", "my pc", at),
            ".bashrc.conflict-my_pc-2026-11-22-153000"
        );
        assert_eq!(utc_stamp(0), "1970-01-01-000000");
        assert_eq!(utc_stamp(951_782_400 * 1_000_000_000), "2000-02-29-000000");
    }
}
