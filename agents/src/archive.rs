//! `corral-agent archive-wal --spool DIR PATH NAME`: PostgreSQL's
//! `archive_command`. Copies a finished WAL file into the node's spool
//! durably (temporary name, fsync, rename, fsync of the directory), where
//! the agent's shipper picks it up for adm1's store. Exits non-zero on any
//! failure, so PostgreSQL keeps the segment and tries again; a file already
//! spooled with the same contents is success (an archive repeated after a
//! crash), one with other contents is a failure.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct ArchiveArgs {
    /// The spool directory.
    #[arg(long)]
    pub spool: PathBuf,
    /// `%p`: the file, relative to the data directory (the working
    /// directory of the command).
    pub path: PathBuf,
    /// `%f`: its name.
    pub name: String,
}

pub fn archive_wal(args: &ArchiveArgs) -> Result<(), String> {
    if !corral_proto::backup::is_wal_file_name(&args.name) {
        return Err(format!("{:?} is not a WAL file name", args.name));
    }
    let data =
        std::fs::read(&args.path).map_err(|e| format!("reading {}: {e}", args.path.display()))?;
    let dest = args.spool.join(&args.name);
    if let Ok(existing) = std::fs::read(&dest) {
        return if existing == data {
            Ok(())
        } else {
            Err(format!(
                "{} is already spooled with other contents",
                dest.display()
            ))
        };
    }
    write_durably(&args.spool, &dest, &data)
}

fn write_durably(dir: &Path, dest: &Path, data: &[u8]) -> Result<(), String> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("spooling {}: {e}", dest.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, src: &Path, name: &str) -> ArchiveArgs {
        ArchiveArgs {
            spool: dir.to_path_buf(),
            path: src.to_path_buf(),
            name: name.into(),
        }
    }

    #[test]
    fn a_segment_is_spooled_once_and_a_repeat_with_the_same_bytes_succeeds() {
        let dir = tempfile::tempdir().expect("tmp");
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).expect("mkdir");
        let src = dir.path().join("seg");
        std::fs::write(&src, b"wal bytes").expect("write");
        let name = "000000010000000000000001";
        archive_wal(&args(&spool, &src, name)).expect("archive");
        assert_eq!(std::fs::read(spool.join(name)).expect("read"), b"wal bytes");
        archive_wal(&args(&spool, &src, name)).expect("repeat");
        std::fs::write(&src, b"other bytes").expect("write");
        assert!(archive_wal(&args(&spool, &src, name)).is_err());
    }

    #[test]
    fn a_missing_spool_fails_so_postgres_keeps_the_segment() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("seg");
        std::fs::write(&src, b"wal").expect("write");
        let err = archive_wal(&args(
            &dir.path().join("nope"),
            &src,
            "000000010000000000000001",
        ))
        .expect_err("no spool");
        assert!(err.contains("spooling"), "{err}");
        assert!(archive_wal(&args(dir.path(), &src, "../../etc/passwd")).is_err());
    }
}
