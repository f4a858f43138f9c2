//! Progress reporting, so a terminal can draw bars and a log can print lines.

/// Receives progress of long operations. Implementations must be cheap and thread-safe.
pub trait Progress: Sync {
    /// A new phase begins with `total` units of work (0 when unknown).
    fn start(&self, phase: &str, total: u64);
    /// `units` more are done.
    fn advance(&self, units: u64);
    /// The current phase is over.
    fn finish(&self);
    /// A scan is about to read again these files of at least 1 MiB, each `(path, size)`,
    /// which changed in place since it last read them. Called before their reading starts, so
    /// that whoever holds a copy can get ready for the change.
    fn rereading(&self, _files: &[(&str, u64)]) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
