//! Where an import of one file stands, in a small JSON file next to the input (or in
//! `--state-dir`), replaced atomically (write, fsync, rename, fsync the folder) after every batch
//! the database has committed; and the rejects log beside it, cut back to the length the
//! checkpoint recorded when an import resumes (a batch replayed after a crash logs its rejects
//! once).
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How much of the input's beginning identifies it.
const HEAD_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// The input file as given.
    pub input: String,
    /// The database it goes to (without password).
    pub database: String,
    /// SHA-256 of the input's first 64 KiB: the same file, not another with the same name.
    pub head_sha256: String,
    /// Bytes and lines of the input fully handled (written or rejected).
    pub offset: u64,
    pub line: u64,
    pub imported: u64,
    pub rejected: u64,
    /// Length of the rejects log at this point.
    pub rejects_len: u64,
    /// The whole input was handled.
    pub done: bool,
}

/// The two files kept for an input.
#[derive(Debug, Clone)]
pub struct StatePaths {
    pub progress: PathBuf,
    pub rejects: PathBuf,
}

impl StatePaths {
    pub fn for_input(input: &Path, state_dir: Option<&Path>) -> StatePaths {
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "input".into());
        let dir = match state_dir {
            Some(d) => d.to_path_buf(),
            None => input
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        StatePaths {
            progress: dir.join(format!("{name}.import-progress.json")),
            rejects: dir.join(format!("{name}.import-rejects.ndjson")),
        }
    }
}

pub fn head_sha256(input: &Path) -> std::io::Result<String> {
    let mut head = Vec::new();
    std::fs::File::open(input)?
        .take(HEAD_BYTES)
        .read_to_end(&mut head)?;
    Ok(hex(&Sha256::digest(&head)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Checkpoint {
    pub fn fresh(input: &Path, database: &str, head_sha256: String) -> Checkpoint {
        Checkpoint {
            version: 1,
            input: input.display().to_string(),
            database: database.to_string(),
            head_sha256,
            offset: 0,
            line: 0,
            imported: 0,
            rejected: 0,
            rejects_len: 0,
            done: false,
        }
    }

    /// The checkpoint left by an earlier run, if any.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is not a progress file: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Replace the progress file: after this returns, a crash leaves this checkpoint or the
    /// previous one whole, never a torn one.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    }
}

/// The rename itself is durable once the folder is synced.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    let _ = path;
    Ok(())
}

/// The rejects log, opened for appending at `len` (what the checkpoint recorded; anything after
/// it came from a batch that will be replayed).
pub fn open_rejects(path: &Path, len: u64) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.set_len(len)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_checkpoint_is_read_back() {
        let dir = std::env::temp_dir().join(format!("sentinella-cp-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.ndjson");
        std::fs::write(&input, "{}\n").unwrap();
        let paths = StatePaths::for_input(&input, None);
        assert_eq!(paths.progress, dir.join("in.ndjson.import-progress.json"));
        let mut cp = Checkpoint::fresh(&input, "sqlite://x", head_sha256(&input).unwrap());
        cp.offset = 3;
        cp.line = 1;
        cp.save(&paths.progress).unwrap();
        assert_eq!(Checkpoint::load(&paths.progress).unwrap(), Some(cp));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
