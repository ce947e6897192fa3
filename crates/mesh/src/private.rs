//! Files that hold secrets (private keys, databases, the key-encryption key) and the
//! directories they live in: created owner-only from the start (0600 files, 0700
//! directories), never written with the umask's mode and tightened afterwards, which leaves a
//! window in which another local user can open them.

use std::{
    fs,
    io::{self, Write},
    path::Path,
};

/// Creates `dir` and any missing parents owner-only (0700); directories that exist are left
/// as they are (e.g. the parent of a database file a caller named).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    fs::create_dir_all(dir)
}

/// [`create_dir`], and `dir` itself tightened to 0700 if it already existed looser: for
/// directories that are ours alone (a data or certificate directory from an earlier run).
pub fn secure_dir(dir: &Path) -> io::Result<()> {
    create_dir(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode != 0o700 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Opens a new file for writing, owner-only when `private`; fails if it exists.
fn create_new(path: &Path, private: bool) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    options.open(path)
}

/// Replaces `path` atomically with `contents` (a temporary sibling, then a rename), so a
/// reader never sees half a file. With `private`, the file is 0600 from its creation.
pub fn write_file(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    // A leftover from a crash may have any mode: start afresh rather than reuse it.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = create_new(&tmp, private)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)
}

/// Creates an empty owner-only file at `path` unless it exists (so a program that creates
/// files with its own default mode, like SQLite, finds it already there). Returns whether it
/// was created.
pub fn touch(path: &Path) -> io::Result<bool> {
    match create_new(path, true) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn owner_only_from_the_start() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);

        let key = dir.join("key");
        write_file(&key, b"secret", true).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(fs::read(&key).unwrap(), b"secret");
        // A stale temporary file with a loose mode is not reused.
        fs::write(key.with_extension("tmp"), b"old").unwrap();
        fs::set_permissions(key.with_extension("tmp"), fs::Permissions::from_mode(0o666)).unwrap();
        write_file(&key, b"new", true).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(fs::read(&key).unwrap(), b"new");

        let public = dir.join("cert");
        write_file(&public, b"cert", false).unwrap();
        assert_eq!(fs::read(&public).unwrap(), b"cert");

        let db = dir.join("x.db");
        assert!(touch(&db).unwrap());
        assert!(!touch(&db).unwrap());
        assert_eq!(mode(&db), 0o600);

        // An existing loose directory is tightened.
        let loose = root.path().join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&loose).unwrap();
        assert_eq!(
            mode(&loose),
            0o755,
            "create_dir leaves existing directories alone"
        );
        secure_dir(&loose).unwrap();
        assert_eq!(mode(&loose), 0o700);
    }
}
