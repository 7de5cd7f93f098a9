//! File-system helpers shared by the test suites of several crates. Each includes this file as a
//! module (`#[path = ".../crates/chatlog/tests/support/fs.rs"] mod fs;`); it uses nothing but
//! `std`.

use std::path::Path;

/// Copies the directory tree `from` to `to`, file by file (the copy shares no file with the
/// original, unlike a hard-linked checkpoint).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
