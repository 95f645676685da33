//! `/healthz` for Consul's HTTP check: 200 while a primary or a caught-up
//! replica answered the last probe, 503 otherwise, with the details as JSON.
//! It reads the prober's latest picture and never queries the database
//! itself, so a check cannot hang on a dead server.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use serde::Serialize;

use crate::AppState;
use crate::cluster::NodeReport;

#[derive(Serialize)]
struct Health<'a> {
    /// `ok` (writes and reads), `read-only` (replicas only), `unavailable`,
    /// or `stale` (the prober has not reported for too long).
    status: &'static str,
    node: &'a str,
    writable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<&'a str>,
    discovery: Discovery<'a>,
    servers: &'a [NodeReport],
    #[serde(skip_serializing_if = "Option::is_none")]
    probed_ms_ago: Option<u64>,
}

#[derive(Serialize)]
struct Discovery<'a> {
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let topology = state.cluster.topology();
    let age = topology.probed_at.map(|at| at.elapsed());
    let fresh = age.is_some_and(|age| age <= state.cluster.staleness_limit());
    let writable = fresh && topology.primary.is_some();
    let readable = fresh && topology.has_caught_up_replica();
    let status = match (age, fresh) {
        (Some(_), false) => "stale",
        _ if writable => "ok",
        _ if readable => "read-only",
        _ => "unavailable",
    };
    let body = Health {
        status,
        node: &state.node,
        writable,
        problem: topology.problem.as_deref(),
        discovery: Discovery {
            source: topology.discovery_source,
            error: topology.discovery_error.as_deref(),
        },
        servers: &topology.reports,
        probed_ms_ago: age.map(|a| a.as_millis() as u64),
    };
    let mut response = if writable || readable {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(body)
}
