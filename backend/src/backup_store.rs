//! adm1's backup store: the files of base backups (`base/<id>/`) and the
//! archived WAL (`wal/`) under `<state-dir>/backups`, each beside a
//! `<file>.sha256` that holds its SHA-256. Uploads are streamed to disk
//! (never held whole in memory), hashed on the way, checked against the
//! checksum the sender computed, fsynced and only then renamed into place,
//! so a file under its final name is always whole and verified.

use std::path::{Path, PathBuf};

use actix_web::web::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest WAL file accepted (segments are 16 MiB).
pub const MAX_WAL_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreFileError {
    #[error("checksum mismatch: the sender said {expected}, the bytes received hash to {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("{name} is already stored with other contents (sha256 {stored})")]
    Differs { name: String, stored: String },
    #[error("upload over {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the upload broke off: {0}")]
    Body(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreFileError {
    let what = what.into();
    move |source| StoreFileError::Io { what, source }
}

/// Whether `s` looks like a hex SHA-256.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Clone)]
pub struct BackupStore {
    root: PathBuf,
}

impl BackupStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn base_dir(&self, id: i64) -> PathBuf {
        self.root.join("base").join(id.to_string())
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.root.join("wal")
    }

    /// Streams `body` into `dest`: written to a temporary name, hashed,
    /// compared with `expected`, fsynced, renamed. With `keep_existing`, a
    /// file already there with the same checksum is kept (an upload
    /// repeated after a lost answer) and one with another is refused.
    /// Returns the size and the checksum.
    pub async fn receive<S, E>(
        &self,
        dest: &Path,
        mut body: S,
        expected: &str,
        limit: Option<u64>,
        keep_existing: bool,
    ) -> Result<(u64, String), StoreFileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        create_private_dir(&dir).await?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let part = dir.join(format!(".{name}.{:016x}.part", rand::random::<u64>()));
        let result = async {
            // Chunks arrive in tens of KiB; each tokio file write is a trip
            // to the blocking pool, so they are gathered a MiB at a time.
            let mut file = tokio::io::BufWriter::with_capacity(
                1 << 20,
                tokio::fs::File::create(&part)
                    .await
                    .map_err(io(format!("creating {}", part.display())))?,
            );
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| StoreFileError::Body(e.to_string()))?;
                size += chunk.len() as u64;
                if let Some(limit) = limit
                    && size > limit
                {
                    return Err(StoreFileError::TooLarge { limit });
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(io(format!("writing {}", part.display())))?;
            }
            let actual = hex::encode(hasher.finalize());
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(StoreFileError::ChecksumMismatch {
                    expected: expected.to_string(),
                    actual,
                });
            }
            file.flush()
                .await
                .map_err(io(format!("writing {}", part.display())))?;
            file.get_ref()
                .sync_all()
                .await
                .map_err(io(format!("fsync {}", part.display())))?;
            Ok((size, actual))
        }
        .await;
        let (size, actual) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(e);
            }
        };
        if keep_existing && let Some(stored) = self.checksum(dest).await {
            let _ = tokio::fs::remove_file(&part).await;
            return if stored == actual {
                Ok((size, actual))
            } else {
                Err(StoreFileError::Differs { name, stored })
            };
        }
        let sum_path = sidecar(dest);
        // The directory is private (0700): the sidecar needs no mode of its own.
        tokio::fs::write(&sum_path, format!("{actual}\n"))
            .await
            .map_err(io(format!("writing {}", sum_path.display())))?;
        tokio::fs::rename(&part, dest)
            .await
            .map_err(io(format!("renaming into {}", dest.display())))?;
        sync_dir(&dir).await;
        Ok((size, actual))
    }

    /// The stored checksum of `path`, when the file and its checksum exist.
    pub async fn checksum(&self, path: &Path) -> Option<String> {
        if !tokio::fs::try_exists(path).await.unwrap_or(false) {
            return None;
        }
        let text = tokio::fs::read_to_string(sidecar(path)).await.ok()?;
        let sum = text.trim().to_string();
        is_sha256(&sum).then_some(sum)
    }

    /// The archived WAL files, sorted by name.
    pub async fn wal_names(&self) -> Result<Vec<String>, StoreFileError> {
        let dir = self.wal_dir();
        let mut names = Vec::new();
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(io(format!("listing {}", dir.display()))(e)),
        };
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(io(format!("listing {}", dir.display())))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if corral_proto::backup::is_wal_file_name(&name) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Deletes a base backup's files.
    pub async fn remove_base(&self, id: i64) {
        let dir = self.base_dir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a backup failed");
        }
    }

    /// Deletes archived WAL segments older than `segment` (a WAL file
    /// name): no kept base backup needs them. History files stay.
    pub async fn prune_wal_before(&self, segment: &str) -> Result<usize, StoreFileError> {
        let mut removed = 0;
        for name in self.wal_names().await? {
            if !wal_older_than(&name, segment) {
                continue;
            }
            let path = self.wal_dir().join(&name);
            let _ = tokio::fs::remove_file(sidecar(&path)).await;
            let _ = tokio::fs::remove_file(s3_marker(&path)).await;
            if tokio::fs::remove_file(&path).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether `path` is in the offsite bucket with its current checksum
    /// (its `<file>.s3` marker holds that checksum).
    pub async fn in_s3(&self, path: &Path) -> bool {
        let Some(sum) = self.checksum(path).await else {
            return false;
        };
        tokio::fs::read_to_string(s3_marker(path))
            .await
            .is_ok_and(|m| m.trim() == sum)
    }

    /// Notes that `path` with checksum `sha256` is in the offsite bucket.
    pub async fn mark_in_s3(&self, path: &Path, sha256: &str) -> Result<(), StoreFileError> {
        let marker = s3_marker(path);
        tokio::fs::write(&marker, format!("{sha256}\n"))
            .await
            .map_err(io(format!("writing {}", marker.display())))
    }
}

/// Whether archived WAL file `name` is older than `segment` (a WAL file
/// name), so no base backup starting at `segment` or later needs it.
/// History files are always kept: they are tiny and recovery reads them.
pub fn wal_older_than(name: &str, segment: &str) -> bool {
    !name.ends_with(".history") && name.get(8..24) < segment.get(8..24)
}

fn s3_marker(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".s3");
    PathBuf::from(s)
}

fn sidecar(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

async fn create_private_dir(dir: &Path) -> Result<(), StoreFileError> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io(format!("creating {}", dir.display())))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(io(format!("chmod {}", dir.display())))
}

async fn sync_dir(dir: &Path) {
    if let Ok(d) = tokio::fs::File::open(dir).await {
        let _ = d.sync_all().await;
    }
}

/// A file (or a part of one) as a stream of chunks, for a body that is
/// never held whole in memory.
pub fn file_stream<R: tokio::io::AsyncRead + Unpin + 'static>(
    file: R,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + 'static {
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[tokio::test]
    async fn a_verified_upload_lands_under_its_name_with_its_checksum() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BackupStore::new(dir.path());
        let dest = store.wal_dir().join("000000010000000000000001");
        let (size, sum) = store
            .receive(
                &dest,
                chunks(&[b"hello ", b"wal"]),
                &sha(b"hello wal"),
                None,
                true,
            )
            .await
            .expect("receive");
        assert_eq!(size, 9);
        assert_eq!(std::fs::read(&dest).expect("read"), b"hello wal");
        assert_eq!(store.checksum(&dest).await, Some(sum));
        assert_eq!(
            store.wal_names().await.expect("list"),
            vec!["000000010000000000000001"]
        );
    }

    #[tokio::test]
    async fn a_checksum_mismatch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BackupStore::new(dir.path());
        let dest = store.wal_dir().join("000000010000000000000001");
        let err = store
            .receive(&dest, chunks(&[b"garbled"]), &sha(b"original"), None, true)
            .await
            .expect_err("mismatch");
        assert!(
            matches!(err, StoreFileError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(store.wal_dir()).expect("dir").count(), 0);
    }

    #[tokio::test]
    async fn a_repeated_upload_is_kept_and_a_different_one_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BackupStore::new(dir.path());
        let dest = store.wal_dir().join("000000010000000000000001");
        store
            .receive(&dest, chunks(&[b"one"]), &sha(b"one"), None, true)
            .await
            .expect("first");
        store
            .receive(&dest, chunks(&[b"one"]), &sha(b"one"), None, true)
            .await
            .expect("repeat");
        let err = store
            .receive(&dest, chunks(&[b"two"]), &sha(b"two"), None, true)
            .await
            .expect_err("differs");
        assert!(matches!(err, StoreFileError::Differs { .. }), "{err}");
        assert_eq!(std::fs::read(&dest).expect("read"), b"one");
    }
}
