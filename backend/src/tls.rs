//! TLS between the control plane and its agents. At first start the server
//! makes a cluster CA (ECDSA P-256, rcgen) in `<state-dir>/tls/`: `ca.pem`,
//! which agents and the CLI pin, and `ca-key.pem` (0600), which never leaves
//! the state directory. Every start issues a fresh server certificate from
//! it for the names and addresses the server is reached at, so a new
//! address needs no manual step. Agents receive `ca.pem` with their
//! enrollment secret (the provider writes both into the machine); the CLI
//! reads it from the state directory or `--ca`.
//!
//! Plain HTTP is allowed on a loopback address only: there the traffic
//! never leaves the host.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Whether the API is served over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsMode {
    /// TLS unless the listen address is a loopback one.
    #[default]
    Auto,
    /// Always TLS, loopback too.
    On,
    /// Plain HTTP: refused on any address but a loopback one.
    Off,
}

impl TlsMode {
    /// Whether a server listening on `ip` serves TLS; an error when plain
    /// HTTP was asked for off loopback.
    pub fn resolve(self, ip: IpAddr) -> Result<bool, TlsError> {
        match self {
            TlsMode::On => Ok(true),
            TlsMode::Auto => Ok(!ip.is_loopback()),
            TlsMode::Off if ip.is_loopback() => Ok(false),
            TlsMode::Off => Err(TlsError::PlainOffLoopback(ip)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "plain HTTP is allowed on a loopback address only, not on {0}: agent tokens would cross \
         the network in cleartext (drop --tls off)"
    )]
    PlainOffLoopback(IpAddr),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable {what}: {detail}")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cluster CA and this start's server certificate.
pub struct ServerTls {
    /// The CA certificate (PEM) clients pin.
    pub ca_pem: String,
    pub ca_path: PathBuf,
    pub config: rustls::ServerConfig,
}

/// The CA's parameters: always the same, so the CA certificate made again
/// from its key at a later start has the same name and key as the one
/// clients pinned, and what it signs verifies against that.
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "corral");
    dn.push(DnType::CommonName, "corral cluster CA");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// The CA key, made (with its certificate) at the first call.
fn load_or_create_ca(dir: &Path) -> Result<(KeyPair, String, PathBuf), TlsError> {
    let key_path = dir.join("ca-key.pem");
    let ca_path = dir.join("ca.pem");
    match fs::read_to_string(&key_path) {
        Ok(pem) => {
            let key = KeyPair::from_pem(&pem).map_err(|e| TlsError::Malformed {
                path: key_path.clone(),
                what: "CA key",
                detail: e.to_string(),
            })?;
            let ca_pem = fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
            Ok((key, ca_pem, ca_path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            write_new(&key_path, &key.serialize_pem(), 0o600)?;
            let ca_pem = cert.pem();
            write_new(&ca_path, &ca_pem, 0o644)?;
            tracing::info!(ca = %ca_path.display(), "made the cluster CA");
            Ok((key, ca_pem, ca_path))
        }
        Err(e) => Err(io_err(&key_path)(e)),
    }
}

/// Loads (or makes, at first start) the CA in `<state_dir>/tls/` and issues
/// a server certificate for `names` (DNS names or IP addresses).
pub fn load_or_create(state_dir: &Path, names: &[String]) -> Result<ServerTls, TlsError> {
    let dir = state_dir.join("tls");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir))?;
    let (ca_key, ca_pem, ca_path) = load_or_create_ca(&dir)?;
    let ca = ca_params()?.self_signed(&ca_key)?;

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "corral");
    dn.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("corral"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write_new(&dir.join("server.pem"), &cert.pem(), 0o644)?;
    write_new(&dir.join("server-key.pem"), &key.serialize_pem(), 0o600)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)?;
    Ok(ServerTls {
        ca_pem,
        ca_path,
        config,
    })
}

/// An HTTP client that trusts the cluster CA in `ca_pem` (and nothing
/// else) when given one.
pub fn client_builder(ca_pem: Option<&[u8]>) -> Result<reqwest::ClientBuilder, String> {
    let builder = reqwest::Client::builder();
    match ca_pem {
        None => Ok(builder),
        Some(pem) => {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| format!("the cluster CA is not a PEM certificate: {e}"))?;
            Ok(builder
                .use_rustls_tls()
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn plain_http_only_on_loopback() {
        let lo: IpAddr = "127.0.11.5".parse().expect("ip");
        let lan: IpAddr = "192.168.11.5".parse().expect("ip");
        assert_eq!(TlsMode::Auto.resolve(lo).ok(), Some(false));
        assert_eq!(TlsMode::Auto.resolve(lan).ok(), Some(true));
        assert_eq!(TlsMode::On.resolve(lo).ok(), Some(true));
        assert_eq!(TlsMode::Off.resolve(lo).ok(), Some(false));
        assert!(matches!(
            TlsMode::Off.resolve(lan),
            Err(TlsError::PlainOffLoopback(_))
        ));
        assert!(TlsMode::Auto.resolve("::1".parse().expect("ip")).ok() == Some(false));
    }

    #[test]
    fn the_ca_is_made_once_with_a_private_key_and_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = load_or_create(dir.path(), &["adm1".into(), "192.168.11.5".into()])
            .expect("first start");
        let second =
            load_or_create(dir.path(), &["adm1".into(), "10.0.0.5".into()]).expect("second start");
        assert_eq!(first.ca_pem, second.ca_pem, "the pinned CA stays");
        assert!(first.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let mode = |p: &str| {
            fs::metadata(dir.path().join(p))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("tls"), 0o700);
        assert_eq!(mode("tls/ca-key.pem"), 0o600);
        assert_eq!(mode("tls/server-key.pem"), 0o600);
    }
}
