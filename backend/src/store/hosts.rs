//! A PostgreSQL state database on several hosts, a primary and its
//! standbys: `DATABASE_URL` may name them all as libpq does
//! (`postgres://user:pw@h1:5432,h2:5432/corral`), and the server writes to
//! whichever of them is writable. sqlx takes one host per URL, so this is
//! the small connect step of corral's own: try each host, ask
//! `pg_is_in_recovery()`, point the pool at the one that says no, and keep
//! checking (every [`FOLLOW_EVERY`]) so that after a standby is promoted the
//! pool's new connections go to it.

use std::time::Duration;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sea_orm::sqlx::{self, Connection};

/// How often a server on several hosts checks that it writes to the primary.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// How often it looks for the writable host while it has none.
pub const SEARCH_EVERY: Duration = Duration::from_millis(100);
/// How long one host may take to answer whether it is writable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One host of the state database: the URL naming it alone, its options.
#[derive(Debug, Clone)]
pub struct Host {
    pub url: String,
    pub options: PgConnectOptions,
}

impl Host {
    /// `host:port`, for messages.
    pub fn target(&self) -> String {
        format!("{}:{}", self.options.get_host(), self.options.get_port())
    }
}

/// Splits a libpq-style multi-host URL into one URL per host, in the
/// order given; a URL of one host comes back alone. Each must parse.
pub fn split(url: &str) -> Result<Vec<Host>, String> {
    let urls = split_urls(url)?;
    urls.into_iter()
        .map(|url| {
            let options = url
                .parse::<PgConnectOptions>()
                .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
            Ok(Host { url, options })
        })
        .collect()
}

fn split_urls(url: &str) -> Result<Vec<String>, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "not a PostgreSQL URL: no scheme (postgres://...)".to_string())?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), authority),
    };
    if !hosts.contains(',') {
        return Ok(vec![url.to_string()]);
    }
    hosts
        .split(',')
        .map(|host| {
            if host.is_empty() {
                Err(format!("an empty host in the host list {hosts:?}"))
            } else {
                Ok(format!("{scheme}://{userinfo}{host}{tail}"))
            }
        })
        .collect()
}

/// What one host said when asked whether it takes writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Writable,
    /// A standby (in recovery): it answers, but only reads.
    Standby,
    Unreachable(String),
}

/// Connects to `host` once and asks `pg_is_in_recovery()`.
pub async fn probe(host: &PgConnectOptions) -> Probe {
    let asked = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut conn = PgConnection::connect_with(host).await?;
        let (recovering,): (bool,) = sqlx::query_as("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok::<bool, sqlx::Error>(recovering)
    })
    .await;
    match asked {
        Ok(Ok(false)) => Probe::Writable,
        Ok(Ok(true)) => Probe::Standby,
        Ok(Err(e)) => Probe::Unreachable(e.to_string()),
        Err(_) => Probe::Unreachable(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

/// The first writable host, or what each said.
pub async fn find_writable(hosts: &[Host]) -> Result<usize, Vec<(String, Probe)>> {
    let mut said = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        match probe(&host.options).await {
            Probe::Writable => return Ok(i),
            other => said.push((host.target(), other)),
        }
    }
    Err(said)
}

/// Keeps `pool` pointed at the writable host until the pool is closed: when
/// the host it writes to stops answering or turns out to be a standby, the
/// first host that is writable becomes the one its new connections go to
/// (its old connections fail their check before use and are dropped).
pub async fn follow_writable(pool: PgPool, hosts: Vec<Host>, mut current: usize) {
    let mut lost = false;
    while !pool.is_closed() {
        // While the primary is lost, look again soon: requests are waiting.
        tokio::time::sleep(if lost { SEARCH_EVERY } else { FOLLOW_EVERY }).await;
        let Some(now) = hosts.get(current) else {
            return;
        };
        lost = probe(&now.options).await != Probe::Writable;
        if !lost {
            continue;
        }
        if let Ok(found) = find_writable(&hosts).await
            && found != current
        {
            let Some(host) = hosts.get(found) else {
                return;
            };
            tracing::warn!(
                from = %now.target(),
                to = %host.target(),
                "the state database's primary moved: writing to the new one"
            );
            pool.set_connect_options(host.options.clone());
            current = found;
            lost = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_becomes_one_url_per_host() {
        let urls =
            split_urls("postgres://corral:pw@10.0.0.5:5432,10.0.0.6:5433/corral?sslmode=disable")
                .expect("splits");
        assert_eq!(
            urls,
            vec![
                "postgres://corral:pw@10.0.0.5:5432/corral?sslmode=disable",
                "postgres://corral:pw@10.0.0.6:5433/corral?sslmode=disable",
            ]
        );
    }

    #[test]
    fn a_single_host_url_is_left_as_it_is() {
        let url = "postgres://corral@127.0.0.1:5432/corral";
        assert_eq!(split_urls(url).expect("splits"), vec![url]);
        assert_eq!(split(url).expect("parses")[0].target(), "127.0.0.1:5432");
    }

    #[test]
    fn a_password_with_an_at_sign_keeps_its_hosts() {
        let urls = split_urls("postgres://u:p%40ss@h1,h2/db").expect("splits");
        assert_eq!(
            urls,
            vec!["postgres://u:p%40ss@h1/db", "postgres://u:p%40ss@h2/db"]
        );
    }

    #[test]
    fn bad_host_lists_are_refused() {
        assert!(split_urls("postgres://u@h1,,h2/db").is_err());
        assert!(split_urls("h1,h2").is_err());
        assert!(split("postgres://u@h1:notaport,h2/db").is_err());
    }
}
