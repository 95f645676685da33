//! Who is calling. The admin token (made at first start, kept in the state
//! directory with mode 0600) reaches the whole API; each node's agent token
//! (stored only as a SHA-256 hash) reaches that node's agent endpoints and
//! nothing else. An agent gets its token by enrolling with its node's
//! single-use enrollment secret (stored hashed on the node's row).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use actix_web::HttpRequest;
use actix_web::http::header;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::cluster::ClusterError;
use crate::error::ApiError;

/// Random bytes in every token: 256 bits, beyond guessing, so a fast hash
/// is the right way to store them (no password stretching needed).
const TOKEN_BYTES: usize = 32;

pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn same_hash(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The secrets a control plane keeps in its state directory.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub admin_token_hash: String,
    pub gossip_key: String,
    pub db_password: String,
    /// The replication roles' own password (replicator, rewinder).
    pub replication_password: String,
    /// Consul's management token (`consul-management-token`): a random
    /// UUID. The operator's key to the Consul UI; every node's token is
    /// derived from it.
    pub consul_management: String,
    /// Set only when this start created the admin token: it is shown once.
    pub new_admin_token: Option<String>,
    pub admin_token_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} must not be readable by group or others (mode {mode:o}); chmod 600 it")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path} is empty or malformed")]
    Malformed { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretsError + '_ {
    move |source| SecretsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the state dir 0711, or takes read and write for group and others
/// off an existing one: nobody else may list it (its files are secrets, the
/// database among them), while an agent's postgres, running as its own
/// account under `nodes/<node>/` with the local provider, may still pass
/// through it.
pub fn private_state_dir(dir: &Path) -> Result<(), SecretsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(io_err(dir))?;
    let mode = fs::metadata(dir).map_err(io_err(dir))?.permissions().mode() & 0o7777;
    if mode & 0o066 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & !0o066)).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Creates the SQLite database file 0600 before SQLite opens it (its `-wal`
/// and `-shm` files take the database file's mode), or makes an existing
/// one 0600: every order payload in it carries the database password and
/// the gossip key.
pub fn private_database_file(path: &Path) -> Result<(), SecretsError> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            for suffix in ["", "-wal", "-shm"] {
                let file = PathBuf::from(format!("{}{suffix}", path.display()));
                match fs::set_permissions(&file, fs::Permissions::from_mode(0o600)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io_err(&file)(e));
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads a secret file, or creates it with `make()` and mode 0600.
pub(crate) fn secret_file(
    path: &Path,
    make: impl FnOnce() -> String,
) -> Result<(String, bool), SecretsError> {
    match fs::read_to_string(path) {
        Ok(s) => {
            let mode = fs::metadata(path)
                .map_err(io_err(path))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(SecretsError::TooOpen {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            let value = s.trim().to_string();
            if value.is_empty() {
                return Err(SecretsError::Malformed {
                    path: path.to_path_buf(),
                });
            }
            Ok((value, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = make();
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err(path))?;
            writeln!(f, "{value}").map_err(io_err(path))?;
            f.sync_all().map_err(io_err(path))?;
            Ok((value, true))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The cluster's unique local IPv6 prefix (`<state>/ipv6-prefix`), made
/// at random the first time: the LXC provider's nodes are dual-stack in it.
/// Not a secret, but kept like one so every server on this state agrees.
pub fn ipv6_prefix(state_dir: &Path) -> Result<crate::reconcile::addressing::Ula, SecretsError> {
    private_state_dir(state_dir)?;
    let path = state_dir.join("ipv6-prefix");
    let (text, _) = secret_file(&path, || {
        let mut id = [0u8; 5];
        rand::rng().fill_bytes(&mut id);
        crate::reconcile::addressing::Ula::new(id).to_string()
    })?;
    text.parse().map_err(|_| SecretsError::Malformed { path })
}

impl Secrets {
    pub fn load_or_create(state_dir: &Path) -> Result<Self, SecretsError> {
        private_state_dir(state_dir)?;
        let admin_token_path = state_dir.join("admin-token");
        let (admin, created) = secret_file(&admin_token_path, || new_token("corral-admin-"))?;
        let (gossip_key, _) = secret_file(&state_dir.join("gossip-key"), || {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            base64::engine::general_purpose::STANDARD.encode(key)
        })?;
        let password = || {
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            hex::encode(bytes)
        };
        let (db_password, _) = secret_file(&state_dir.join("db-password"), password)?;
        let (replication_password, _) =
            secret_file(&state_dir.join("replication-password"), password)?;
        let (consul_management, _) =
            secret_file(&state_dir.join("consul-management-token"), || {
                let mut bytes = [0u8; 16];
                rand::rng().fill_bytes(&mut bytes);
                // A version 4 UUID, the form Consul takes token ids in.
                bytes[6] = (bytes[6] & 0x0f) | 0x40;
                bytes[8] = (bytes[8] & 0x3f) | 0x80;
                crate::reconcile::uuid_text(&bytes)
            })?;
        Ok(Self {
            admin_token_hash: hash_token(&admin),
            consul_management,
            gossip_key,
            db_password,
            replication_password,
            new_admin_token: created.then_some(admin),
            admin_token_path,
        })
    }

    pub fn is_admin(&self, token: &str) -> bool {
        same_hash(&hash_token(token), &self.admin_token_hash)
    }
}

/// A node an agent token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub id: i32,
    pub name: String,
}

/// Agent token hash -> node, so 10,000 long polls don't each cost a query
/// to authenticate. Entries go when a node re-enrolls or is removed.
///
/// A lookup that read the database before a revocation committed must not
/// cache what it read after the revocation has cleared the cache: every
/// `forget_node` bumps a generation, and `insert` only caches when the
/// generation is still the one read before the database lookup.
#[derive(Default)]
pub struct TokenCache {
    inner: Mutex<Tokens>,
}

#[derive(Default)]
struct Tokens {
    by_hash: HashMap<String, NodeRef>,
    generation: u64,
}

impl TokenCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, hash: &str) -> Option<NodeRef> {
        self.lock().by_hash.get(hash).cloned()
    }

    /// To read before looking a token up in the database.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Caches `hash` unless a node was forgotten since `generation` was
    /// read; returns whether it did.
    pub fn insert(&self, hash: String, node: NodeRef, generation: u64) -> bool {
        let mut t = self.lock();
        if t.generation != generation {
            return false;
        }
        t.by_hash.insert(hash, node);
        true
    }

    /// Forgets every token (after a time that other servers' revocations
    /// may not have been heard).
    pub fn forget_all(&self) {
        let mut t = self.lock();
        t.generation += 1;
        t.by_hash.clear();
    }

    pub fn forget_node(&self, node_id: i32) {
        let mut t = self.lock();
        t.generation += 1;
        t.by_hash.retain(|_, n| n.id != node_id);
    }
}

/// The authenticated caller of an API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Agent(NodeRef),
}

impl Caller {
    /// The audit-log name of the caller.
    pub fn actor(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Agent(node) => format!("agent:{}", node.name),
        }
    }

    pub fn require_admin(&self) -> Result<(), ClusterError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Agent(node) => Err(ClusterError::NotAllowed(format!(
                "the agent token of {} reaches only that node's agent endpoints",
                node.name
            ))),
        }
    }

    /// Admin, or the agent of `node` itself.
    pub fn require_node(&self, node: &str) -> Result<(), ClusterError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Agent(own) if own.name == node => Ok(()),
            Caller::Agent(own) => Err(ClusterError::NotAllowed(format!(
                "the agent token of {} does not reach node {node}",
                own.name
            ))),
        }
    }
}

/// The bearer token of a request, if it carries one.
pub fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("an Authorization: Bearer token is required".into())
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is not valid text".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
        })?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Secrets::load_or_create(dir.path()).expect("create");
        let token = first.new_admin_token.clone().expect("new token shown once");
        assert!(token.starts_with("corral-admin-"));
        let mode = fs::metadata(dir.path().join("admin-token"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = Secrets::load_or_create(dir.path()).expect("load");
        assert!(
            second.new_admin_token.is_none(),
            "printed only at first start"
        );
        assert!(second.is_admin(&token));
        assert!(!second.is_admin("corral-admin-wrong"));
        assert_eq!(second.gossip_key, first.gossip_key);
    }

    #[test]
    fn the_state_dir_cannot_be_listed_and_the_database_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        Secrets::load_or_create(&state).expect("create");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode(&state), 0o711);
        // An existing, more open one is tightened.
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).expect("chmod");
        Secrets::load_or_create(&state).expect("load");
        assert_eq!(mode(&state), 0o711);

        let db = state.join("corral.db");
        private_database_file(&db).expect("create");
        assert_eq!(mode(&db), 0o600);
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::write(state.join("corral.db-wal"), "").expect("wal");
        private_database_file(&db).expect("tighten");
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&state.join("corral.db-wal")), 0o600);
    }

    #[test]
    fn a_lookup_that_raced_a_revocation_is_not_cached() {
        let cache = TokenCache::default();
        let pg1 = NodeRef {
            id: 3,
            name: "pg1".into(),
        };
        // Read before the database lookup; meanwhile pg1 enrolls again.
        let before = cache.generation();
        cache.forget_node(pg1.id);
        assert!(!cache.insert("old-hash".into(), pg1.clone(), before));
        assert_eq!(cache.get("old-hash"), None);
        // A lookup with nothing in between is cached.
        let now = cache.generation();
        assert!(cache.insert("new-hash".into(), pg1.clone(), now));
        assert_eq!(cache.get("new-hash"), Some(pg1.clone()));
        cache.forget_node(pg1.id);
        assert_eq!(cache.get("new-hash"), None);
    }

    #[test]
    fn world_readable_token_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        Secrets::load_or_create(dir.path()).expect("create");
        let path = dir.path().join("admin-token");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Secrets::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, SecretsError::TooOpen { .. }), "{err}");
    }

    #[test]
    fn agents_reach_only_their_own_node() {
        let agent = Caller::Agent(NodeRef {
            id: 1,
            name: "nginx1".into(),
        });
        assert!(agent.require_node("nginx1").is_ok());
        assert!(matches!(
            agent.require_node("nginx2"),
            Err(ClusterError::NotAllowed(_))
        ));
        assert!(matches!(
            agent.require_admin(),
            Err(ClusterError::NotAllowed(_))
        ));
        assert!(Caller::Admin.require_node("nginx2").is_ok());
    }
}
