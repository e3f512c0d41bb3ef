//! An exclusive lock on a run folder, so two processes never write one run.
//!
//! The lock is the file `run.lock` in the folder, holding the holder's PID, host and start
//! time, and locked with the operating system's advisory file lock (`flock` on Unix) for as
//! long as the holder lives. The OS releases that lock when the process ends, however it
//! ends, so a lock file left by a killed process is stale by construction: the next taker
//! finds it unlocked and takes it over. Where the file system has no file locks, the PID is
//! checked instead (a holder on this host whose process is gone is stale).
//!
//! Dropping the [`RunLock`] removes `run.lock` (on every exit path of the holder, errors
//! included).

use crate::{Error, Result};
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = "run.lock";

/// Who holds (or held) a lock: the contents of `run.lock`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockHolder {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// Start of the hold, seconds since the Unix epoch.
    pub since_unix: u64,
}

impl LockHolder {
    fn this_process() -> LockHolder {
        LockHolder {
            pid: std::process::id(),
            host: host_name(),
            since_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    fn describe(&self) -> String {
        format!(
            "PID {} on host {} since {} (Unix time)",
            self.pid, self.host, self.since_unix
        )
    }
}

/// The host name (`/proc/sys/kernel/hostname`, `$HOSTNAME`, or `unknown`).
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether process `pid` is alive on this host (Linux: `/proc/PID`; elsewhere assumed alive).
pub fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// An exclusive hold on a run folder; released (and `run.lock` removed) on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    file: Option<fs::File>,
    taken_over: Option<LockHolder>,
    created: Vec<PathBuf>,
}

/// Whether `e` means that the file system has no usable file locks (NFS without a lock
/// daemon, some FUSE mounts): `Unsupported`, or ENOLCK, ENOSYS, EOPNOTSUPP on Linux.
fn locks_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || (cfg!(target_os = "linux") && matches!(e.raw_os_error(), Some(37 | 38 | 95)))
}

impl RunLock {
    /// Takes the lock of `dir`, creating the folder when it does not exist.
    ///
    /// # Errors
    /// [`Error::RunLocked`] naming the holder when another live process holds it; an io
    /// error when the folder or the lock file cannot be created.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        // The folders this call creates, outermost first (see `created`).
        let mut created = Vec::new();
        let mut missing = Some(dir);
        while let Some(d) = missing.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            created.push(d.to_path_buf());
            missing = d.parent();
        }
        created.reverse();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let result = Self::acquire_in(dir, created.clone());
        if result.is_err() {
            remove_empty(&created);
        }
        result
    }

    fn acquire_in(dir: &Path, created: Vec<PathBuf>) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..16 {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            let previous = read_holder(&mut file);
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(locked(dir, previous.as_ref()));
                }
                Err(fs::TryLockError::Error(e)) if locks_unsupported(&e) => {
                    // No file locks here: fall back to the PID of the holder.
                    if let Some(h) = &previous {
                        if h.pid != std::process::id()
                            && (h.host != host_name() || pid_alive(h.pid))
                        {
                            return Err(locked(dir, Some(h)));
                        }
                    }
                }
                Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // A holder that was releasing removed the file before unlocking it: our handle
            // may be to that removed file. Take the lock again on the file now at the path.
            if !same_file(&file, &path) {
                continue;
            }
            let me = LockHolder::this_process();
            let json = serde_json::to_vec(&me).map_err(|e| Error::msg(e.to_string()))?;
            file.set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| file.write_all(&json))
                .and_then(|_| file.sync_all())
                .map_err(|e| Error::io(&path, e))?;
            return Ok(RunLock {
                path,
                file: Some(file),
                taken_over: previous,
                created,
            });
        }
        Err(Error::msg(format!(
            "{}: could not take the run folder's lock (it kept changing)",
            path.display()
        )))
    }

    /// The holder of a stale lock this one replaced (a process that ended without
    /// releasing it), if any.
    pub fn taken_over(&self) -> Option<&LockHolder> {
        self.taken_over.as_ref()
    }

    /// Moves the held run folder to `to` (a path on the same file system that does not
    /// exist yet) while holding its lock, then releases the lock, so no other process can
    /// be writing into the folder while it moves; the moved folder keeps no `run.lock`.
    ///
    /// # Errors
    /// The rename's io error (the folder stays where it was; the lock is released).
    pub fn rename_folder(mut self, to: &Path) -> Result<()> {
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if to.exists() {
            return Err(Error::msg(format!(
                "cannot move {} to {}: the target exists",
                dir.display(),
                to.display()
            )));
        }
        fs::rename(&dir, to).map_err(|e| {
            Error::msg(format!(
                "cannot move {} to {}: {e}",
                dir.display(),
                to.display()
            ))
        })?;
        self.path = to.join(LOCK_FILE);
        Ok(())
    }

    /// The folders [`RunLock::acquire`] created (the run folder and any missing parents),
    /// outermost first: a command that fails before writing anything removes them again
    /// with [`remove_empty`] after releasing the lock.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }
}

/// Removes each folder of `dirs` (outermost first, as [`RunLock::created`] lists them) that
/// is empty, innermost first; a folder holding anything is kept, and so are its parents.
pub fn remove_empty(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        if fs::remove_dir(d).is_err() {
            return;
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock, then close (which unlocks). Only
        // when the file at the path is still ours: a user who deleted a lock they believed
        // stale may have let another process create and take a new one there.
        if let Some(f) = &self.file {
            if same_file(f, &self.path) {
                let _ = fs::remove_file(&self.path);
            }
        }
        drop(self.file.take());
    }
}

fn locked(dir: &Path, holder: Option<&LockHolder>) -> Error {
    Error::RunLocked {
        path: dir.to_path_buf(),
        holder: holder
            .map(LockHolder::describe)
            .unwrap_or_else(|| "a process that has not written its PID yet".into()),
    }
}

fn read_holder(file: &mut fs::File) -> Option<LockHolder> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(unix)]
fn same_file(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &fs::File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mor-lock-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_second_holder_is_refused_with_the_pid_until_release() -> Result<()> {
        let d = tmpdir("two");
        let a = RunLock::acquire(&d)?;
        assert!(a.taken_over().is_none());
        let held: LockHolder =
            serde_json::from_str(&fs::read_to_string(d.join(LOCK_FILE)).unwrap()).unwrap();
        assert_eq!(held.pid, std::process::id());
        let err = RunLock::acquire(&d).unwrap_err().to_string();
        assert!(
            err.contains(&format!("PID {}", std::process::id())),
            "{err}"
        );
        drop(a);
        assert!(
            !d.join(LOCK_FILE).exists(),
            "released lock file left behind"
        );
        let b = RunLock::acquire(&d)?;
        drop(b);
        let _ = fs::remove_dir_all(&d);
        Ok(())
    }

    /// A lock file replaced under a holder (deleted by hand, then taken by another process)
    /// belongs to the new holder: releasing the old lock leaves it in place.
    #[test]
    fn release_keeps_a_lock_file_that_is_not_its_own() -> Result<()> {
        let d = tmpdir("replaced");
        let a = RunLock::acquire(&d)?;
        fs::remove_file(d.join(LOCK_FILE)).unwrap();
        let other = LockHolder {
            pid: 4_000_001,
            host: host_name(),
            since_unix: 2,
        };
        fs::write(d.join(LOCK_FILE), serde_json::to_vec(&other).unwrap()).unwrap();
        drop(a);
        let now: LockHolder =
            serde_json::from_str(&fs::read_to_string(d.join(LOCK_FILE)).unwrap()).unwrap();
        assert_eq!(now, other);
        let _ = fs::remove_dir_all(&d);
        Ok(())
    }

    /// `created` lists exactly the folders the lock made, and `remove_empty` removes them
    /// again when nothing was written, while a pre-existing parent stays.
    #[test]
    fn created_parents_are_listed_and_removed_when_empty() -> Result<()> {
        let base = tmpdir("parents");
        fs::create_dir_all(&base).unwrap();
        let dir = base.join("a").join("b").join("c");
        let l = RunLock::acquire(&dir)?;
        assert_eq!(
            l.created(),
            &[base.join("a"), base.join("a/b"), base.join("a/b/c")]
        );
        let created = l.created().to_vec();
        drop(l);
        remove_empty(&created);
        assert!(!base.join("a").exists());
        assert!(base.exists());
        // A folder that received a file is kept, with its parents.
        let l = RunLock::acquire(&dir)?;
        let created = l.created().to_vec();
        fs::write(dir.join("x"), b"1").unwrap();
        drop(l);
        remove_empty(&created);
        assert!(dir.join("x").exists());
        let _ = fs::remove_dir_all(&base);
        Ok(())
    }

    /// `rename_folder` moves the folder with its files and leaves no lock behind.
    #[test]
    fn a_held_folder_moves_without_its_lock() -> Result<()> {
        let base = tmpdir("rename");
        let (from, to) = (base.join("run"), base.join("run.old"));
        let l = RunLock::acquire(&from)?;
        fs::write(from.join("weights"), b"w").unwrap();
        l.rename_folder(&to)?;
        assert!(!from.exists());
        assert_eq!(fs::read(to.join("weights")).unwrap(), b"w");
        assert!(!to.join(LOCK_FILE).exists());
        // An existing target is refused and the folder stays where it was, unlocked.
        let l = RunLock::acquire(&from)?;
        assert!(l.rename_folder(&to).is_err());
        assert!(from.exists() && !from.join(LOCK_FILE).exists());
        let _ = fs::remove_dir_all(&base);
        Ok(())
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn locks_unsupported_matches_the_linux_codes() {
        for code in [37, 38, 95] {
            assert!(locks_unsupported(&std::io::Error::from_raw_os_error(code)));
        }
        assert!(!locks_unsupported(&std::io::Error::from_raw_os_error(13)));
    }

    #[test]
    fn a_stale_lock_is_taken_over() -> Result<()> {
        let d = tmpdir("stale");
        fs::create_dir_all(&d).unwrap();
        // A lock file a killed process left: its PID, no OS lock held.
        let dead = LockHolder {
            pid: 4_000_000,
            host: host_name(),
            since_unix: 1,
        };
        fs::write(d.join(LOCK_FILE), serde_json::to_vec(&dead).unwrap()).unwrap();
        let l = RunLock::acquire(&d)?;
        assert_eq!(l.taken_over(), Some(&dead));
        let now: LockHolder =
            serde_json::from_str(&fs::read_to_string(d.join(LOCK_FILE)).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
        drop(l);
        let _ = fs::remove_dir_all(&d);
        Ok(())
    }
}
