//! A real S3-compatible server for tests: `s3s-fs` (the s3s project's
//! S3 server over a directory, SigV4 authentication on), which
//! `scripts/setup.sh` installs into `~/.cache/corral/`. Objects are plain
//! files under `<root>/<bucket>/<key>`, so a test can check the bytes that
//! arrived without going through the client under test. It keeps its data
//! across a stop and a start, like a real bucket across an outage.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Result, err, free_port, wait_until};

/// The s3s-fs version `scripts/setup.sh` installs (the newest that builds
/// with the pinned toolchain).
pub const S3S_FS_VERSION: &str = "0.14.1";

/// Where the s3s-fs binary is: `CORRAL_S3S_FS`, else setup's cache, else
/// `PATH`.
pub fn s3s_fs_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CORRAL_S3S_FS") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache"));
    let cached = cache
        .join("corral")
        .join(format!("s3s-fs-{S3S_FS_VERSION}"))
        .join("bin/s3s-fs");
    if cached.is_file() {
        return Ok(cached);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file());
    on_path.ok_or_else(|| {
        err(format!(
            "s3s-fs not found ({} or PATH): run scripts/setup.sh --s3",
            cached.display()
        ))
    })
}

pub struct S3Server {
    child: Option<Child>,
    host: String,
    port: u16,
    root: tempfile::TempDir,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Server {
    /// Starts a server on `host` (a free port) with `bucket` made.
    pub fn start(host: &str, bucket: &str) -> Result<Self> {
        let root = tempfile::tempdir().map_err(|e| err(format!("s3 root: {e}")))?;
        fs::create_dir_all(root.path().join(bucket))
            .map_err(|e| err(format!("making bucket {bucket}: {e}")))?;
        let mut server = Self {
            child: None,
            host: host.to_string(),
            port: free_port(host)?,
            root,
            access_key: "corraltest".into(),
            secret_key: format!("secret-{:x}", std::process::id()),
        };
        server.restart()?;
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The file an object's bytes are stored in.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Starts the server again (same address, same data) after a stop.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(".s3s-fs.log"))
            .map_err(|e| err(format!("s3s-fs log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| err(format!("s3s-fs log: {e}")))?;
        let child = Command::new("setpriv")
            .arg("--pdeathsig=KILL")
            .arg("--")
            .arg(s3s_fs_bin()?)
            .args(["--host", &self.host, "--port", &self.port.to_string()])
            .args(["--access-key", &self.access_key])
            .args(["--secret-key", &self.secret_key])
            .arg(self.root.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| err(format!("starting s3s-fs: {e}")))?;
        self.child = Some(child);
        let addr = format!("{}:{}", self.host, self.port);
        wait_until("s3s-fs to listen", Duration::from_secs(10), || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(err(format!("s3s-fs exited at start: {status}")));
            }
            Ok(TcpStream::connect(&addr).is_ok())
        })
    }

    /// Stops the server (kill and reap); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
