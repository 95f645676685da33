//! Where the PostgreSQL servers are: a static list given on the command line,
//! or Consul's catalog of the `postgres` service, followed with blocking
//! queries. Discovery only names candidates; which one is the primary is
//! decided by probing them (see `cluster`), never by tags alone.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

/// A PostgreSQL server address, `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a host[:port] database address: {0:?}")]
pub struct ParseEndpointError(String);

impl FromStr for Endpoint {
    type Err = ParseEndpointError;

    /// `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults to 5432.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseEndpointError(s.to_string());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match s.split_once(':') {
                Some((host, port)) if !port.contains(':') => (host, Some(port)),
                Some(_) => return Err(bad()),
                None => (s, None),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !host_ok {
            return Err(bad());
        }
        let port = match port {
            None => 5432,
            Some(p) => p.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        };
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }
}

/// What discovery says a server is; only a tie-breaker, never trusted alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Primary,
    Replica,
    Untagged,
}

/// A server that may hold the todos.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub endpoint: Endpoint,
    pub tag: Tag,
}

/// The latest list of candidates, and why it may be out of date.
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    pub list: Arc<Vec<Candidate>>,
    /// Set while the source (Consul) cannot be read; `list` is then the last
    /// one known, so the data plane keeps working without Consul.
    pub error: Option<String>,
    pub source: &'static str,
}

/// A running source of candidates: a watch channel the prober follows, and
/// the task feeding it (none for a static list).
pub struct Discovery {
    pub candidates: watch::Receiver<Candidates>,
    /// Kept for a static list so the channel stays open (a closed one would
    /// wake its followers forever).
    _fixed: Option<watch::Sender<Candidates>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Discovery {
    pub fn fixed(primaries: &[Endpoint], replicas: &[Endpoint]) -> Self {
        let tagged = |tag| {
            move |e: &Endpoint| Candidate {
                endpoint: e.clone(),
                tag,
            }
        };
        let mut list: Vec<Candidate> = primaries.iter().map(tagged(Tag::Primary)).collect();
        for c in replicas.iter().map(tagged(Tag::Replica)) {
            if !list.iter().any(|known| known.endpoint == c.endpoint) {
                list.push(c);
            }
        }
        let (tx, rx) = watch::channel(Candidates {
            list: Arc::new(list),
            error: None,
            source: "static",
        });
        Discovery {
            candidates: rx,
            _fixed: Some(tx),
            task: None,
        }
    }

    /// Follows `service` in the Consul catalog at `base` (an http:// URL).
    /// Must be called inside a Tokio runtime.
    /// `token` is the ACL token the reads carry.
    pub fn consul(base: &str, service: &str, token: Option<&str>) -> Self {
        let (tx, rx) = watch::channel(Candidates {
            list: Arc::new(Vec::new()),
            error: Some("not read from consul yet".into()),
            source: "consul",
        });
        let catalog = ConsulCatalog {
            http: {
                let mut headers = reqwest::header::HeaderMap::new();
                if let Some(value) =
                    token.and_then(|t| reqwest::header::HeaderValue::from_str(t).ok())
                {
                    let mut value = value;
                    value.set_sensitive(true);
                    headers.insert("X-Consul-Token", value);
                }
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .default_headers(headers)
                    .build()
                    .unwrap_or_default()
            },
            url: format!(
                "{}/v1/health/service/{}",
                base.trim_end_matches('/'),
                service
            ),
        };
        let task = tokio::spawn(catalog.follow(tx));
        Discovery {
            candidates: rx,
            _fixed: None,
            task: Some(task),
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Consul's `/v1/health/service/<name>` entry, the parts we use.
#[derive(Debug, Deserialize)]
struct HealthEntry {
    #[serde(rename = "Node")]
    node: ConsulNode,
    #[serde(rename = "Service")]
    service: ConsulService,
}

#[derive(Debug, Deserialize)]
struct ConsulNode {
    #[serde(rename = "Address")]
    address: String,
}

#[derive(Debug, Deserialize)]
struct ConsulService {
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
}

/// Turns Consul's answer into candidates; entries with no usable address are
/// skipped rather than failing the whole list.
fn parse_health(body: &[u8]) -> Result<Vec<Candidate>, serde_json::Error> {
    let entries: Vec<HealthEntry> = serde_json::from_slice(body)?;
    let mut list: Vec<Candidate> = Vec::new();
    for entry in entries {
        let host = if entry.service.address.is_empty() {
            entry.node.address
        } else {
            entry.service.address
        };
        let Ok(endpoint) = format!("{host}:{}", entry.service.port)
            .parse::<Endpoint>()
            .or_else(|_| format!("[{host}]:{}", entry.service.port).parse())
        else {
            tracing::warn!(%host, "consul lists a postgres address that is not host:port");
            continue;
        };
        let tags = entry.service.tags.unwrap_or_default();
        let tag = if tags.iter().any(|t| t == "primary") {
            Tag::Primary
        } else if tags.iter().any(|t| t == "replica") {
            Tag::Replica
        } else {
            Tag::Untagged
        };
        if !list.iter().any(|c| c.endpoint == endpoint) {
            list.push(Candidate { endpoint, tag });
        }
    }
    list.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    Ok(list)
}

struct ConsulCatalog {
    http: reqwest::Client,
    url: String,
}

/// How long one blocking query may wait for a change; Consul adds up to
/// 1/16 of it as jitter, so the client timeout leaves room for that.
const CONSUL_WAIT: Duration = Duration::from_secs(30);

impl ConsulCatalog {
    async fn follow(self, tx: watch::Sender<Candidates>) {
        let mut index: u64 = 0;
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = tokio::time::Instant::now();
            match self.query(index).await {
                Ok((list, new_index)) => {
                    backoff = Duration::from_millis(200);
                    // Consul's rules for blocking queries: an index that goes
                    // backwards means the catalog was reset, start over.
                    index = if new_index < index { 0 } else { new_index };
                    tx.send_if_modified(|current| {
                        let changed = *current.list != list || current.error.is_some();
                        if changed {
                            tracing::info!(
                                servers = ?list.iter().map(|c| c.endpoint.to_string()).collect::<Vec<_>>(),
                                "postgres servers from consul"
                            );
                            current.list = Arc::new(list);
                            current.error = None;
                        }
                        changed
                    });
                    // An index that does not move would make this a busy
                    // loop; Consul asks clients to rate-limit themselves.
                    let min_gap = Duration::from_millis(100);
                    if started.elapsed() < min_gap {
                        tokio::time::sleep(min_gap - started.elapsed()).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, url = %self.url, "reading consul failed; keeping the last list");
                    tx.send_if_modified(|current| {
                        let changed = current.error.as_deref() != Some(error.as_str());
                        current.error = Some(error);
                        changed
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn query(&self, index: u64) -> Result<(Vec<Candidate>, u64), String> {
        let wait = format!("{}s", CONSUL_WAIT.as_secs());
        let index_text = index.to_string();
        let mut query: Vec<(&str, &str)> = vec![("passing", "1")];
        if index > 0 {
            query.push(("index", &index_text));
            query.push(("wait", &wait));
        }
        let response = self
            .http
            .get(&self.url)
            .query(&query)
            .timeout(CONSUL_WAIT + CONSUL_WAIT / 16 + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("consul unreachable: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("consul answered {}", response.status()));
        }
        let new_index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading consul's answer: {e}"))?;
        let list =
            parse_health(&body).map_err(|e| format!("consul's answer is not understood: {e}"))?;
        Ok((list, new_index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_hosts_ports_and_ipv6() {
        let e: Endpoint = "db.example:6000".parse().unwrap();
        assert_eq!((e.host.as_str(), e.port), ("db.example", 6000));
        assert_eq!("10.0.0.1".parse::<Endpoint>().unwrap().port, 5432);
        assert_eq!("[::1]".parse::<Endpoint>().unwrap().host, "::1");
        for bad in [
            "", ":5432", "a:0", "a:b", "a:1:2", "[::1", "[::1]x", "a b:1", "a/b:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn consul_entries_become_tagged_candidates() {
        let body = br#"[
          {"Node": {"Node": "pg1", "Address": "127.0.11.11"},
           "Service": {"ID": "postgres", "Service": "postgres", "Tags": ["primary"], "Address": "", "Port": 5432},
           "Checks": []},
          {"Node": {"Node": "pg2", "Address": "127.0.11.12"},
           "Service": {"ID": "postgres", "Service": "postgres", "Tags": ["replica", "x"], "Address": "127.0.0.9", "Port": 5433},
           "Checks": []},
          {"Node": {"Node": "pg3", "Address": "::1"},
           "Service": {"ID": "postgres", "Service": "postgres", "Tags": null, "Address": "", "Port": 5434},
           "Checks": []},
          {"Node": {"Node": "pg4", "Address": "not an address"},
           "Service": {"ID": "postgres", "Service": "postgres", "Tags": [], "Address": "", "Port": 5435},
           "Checks": []}
        ]"#;
        let list = parse_health(body).unwrap();
        let shown: Vec<(String, Tag)> = list
            .iter()
            .map(|c| (c.endpoint.to_string(), c.tag))
            .collect();
        assert_eq!(
            shown,
            vec![
                ("127.0.0.9:5433".to_string(), Tag::Replica),
                ("127.0.11.11:5432".to_string(), Tag::Primary),
                ("[::1]:5434".to_string(), Tag::Untagged),
            ]
        );
    }

    #[test]
    fn static_list_tags_primaries_first_and_drops_duplicates() {
        let a: Endpoint = "a".parse().unwrap();
        let b: Endpoint = "b".parse().unwrap();
        let d = Discovery::fixed(std::slice::from_ref(&a), &[a.clone(), b.clone()]);
        let list = d.candidates.borrow().list.clone();
        assert_eq!(
            *list,
            vec![
                Candidate {
                    endpoint: a,
                    tag: Tag::Primary
                },
                Candidate {
                    endpoint: b,
                    tag: Tag::Replica
                }
            ]
        );
    }
}
