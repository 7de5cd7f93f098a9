//! File names in a log directory. The only place that builds or parses them.
//!
//! - `00000000000000000001.seg`: a segment whose first entry has log index 1 (20 digits, so
//!   names sort like their indexes).
//! - `00000000000000000001.idx`: the sparse offset index of that segment once it is sealed.
//! - `spare.seg`: a preallocated file waiting to become the next segment.
//! - `*.tmp`: a file being written before an atomic rename.
//! - `LOCK`: held exclusively by the process that has the log open.

use std::path::{Path, PathBuf};

/// Name of the lock file.
pub const LOCK: &str = "LOCK";
/// Name of the preallocated next segment.
pub const SPARE: &str = "spare.seg";

/// What a directory entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A segment with its first index.
    Segment(u64),
    /// A sealed segment's index with the segment's first index.
    Index(u64),
    /// Leftovers of an interrupted operation, removed on open.
    Leftover,
    /// Anything else (left alone).
    Other,
}

/// Path of the segment starting at `first_index`.
pub fn segment(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}.seg"))
}

/// Path of the index of the segment starting at `first_index`.
pub fn index(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}.idx"))
}

/// Path of a temporary file used while atomically writing `path`.
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Classifies a directory entry by name.
pub fn parse(name: &str) -> Entry {
    if name == SPARE || name.ends_with(".tmp") {
        return Entry::Leftover;
    }
    let parse_index = |stem: &str| {
        (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
            .then(|| stem.parse::<u64>().ok())
            .flatten()
    };
    if let Some(i) = name.strip_suffix(".seg").and_then(parse_index) {
        return Entry::Segment(i);
    }
    if let Some(i) = name.strip_suffix(".idx").and_then(parse_index) {
        return Entry::Index(i);
    }
    Entry::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_and_sort_like_indexes() {
        let dir = Path::new("/d");
        let a = segment(dir, 9);
        let b = segment(dir, 10);
        assert!(a < b);
        let name = |p: &PathBuf| p.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(parse(&name(&a)), Entry::Segment(9));
        assert_eq!(parse(&name(&index(dir, u64::MAX))), Entry::Index(u64::MAX));
        assert_eq!(parse(SPARE), Entry::Leftover);
        assert_eq!(parse(&name(&temporary(&index(dir, 3)))), Entry::Leftover);
        assert_eq!(parse("12.seg"), Entry::Other);
        assert_eq!(parse("LOCK"), Entry::Other);
    }
}
