//! The data directory is private: it holds every private blob, password and token
//! hashes, and webhook signing secrets in clear (with which anyone could forge webhooks
//! the deploy agent accepts). Folders are made 0700 and files 0600 by the code that
//! makes them; a directory made before (or by hand) with wider modes is put right at
//! start, with a log line.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents, private.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Creates `path` empty and private if it does not exist (so that a library that then
/// opens it, like SQLite, keeps its mode).
pub fn touch_private(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn too_open(path: &Path) -> io::Result<bool> {
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o077 != 0)
}

/// If `dir` or its top entries are readable by others, makes everything under it private
/// (folders 0700, files 0600); returns how many entries were changed.
pub fn make_private(dir: &Path) -> io::Result<usize> {
    // A data directory given as a symbolic link: its target is what must be private.
    let dir = &std::fs::canonicalize(dir)?;
    let mut check = vec![dir.to_owned()];
    for name in [
        "meta.db",
        "meta.db-wal",
        "meta.db-shm",
        "blobs",
        "uploads",
        "auth.key",
    ] {
        let p = dir.join(name);
        if p.exists() {
            check.push(p);
        }
    }
    let mut any = false;
    for p in &check {
        any |= too_open(p)?;
    }
    if !any {
        return Ok(0);
    }
    let mut changed = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let want = if meta.is_dir() { DIR_MODE } else { FILE_MODE };
        if meta.permissions().mode() & 0o777 != want {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(want))?;
            changed += 1;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(changed)
}

/// Whether `path` can be read by users other than its owner.
pub fn readable_by_others(path: &Path) -> io::Result<bool> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o044 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_data_directory_is_made_private() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("data");
        std::fs::create_dir_all(dir.join("blobs/sha256/ab")).unwrap();
        std::fs::write(dir.join("blobs/sha256/ab/abcd"), b"x").unwrap();
        std::fs::write(dir.join("meta.db"), b"").unwrap();
        for p in ["", "blobs", "blobs/sha256", "blobs/sha256/ab"] {
            std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(dir.join("meta.db"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(make_private(&dir).unwrap() >= 5);
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(""), 0o700);
        assert_eq!(mode("blobs/sha256/ab"), 0o700);
        assert_eq!(mode("blobs/sha256/ab/abcd"), 0o600);
        assert_eq!(mode("meta.db"), 0o600);
        assert_eq!(make_private(&dir).unwrap(), 0, "nothing left to change");
        // Through a symbolic link, the target is made private.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(make_private(&link).unwrap() >= 1);
        assert_eq!(mode(""), 0o700);
    }
}
