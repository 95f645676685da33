//! `/api/v1/events`: the audit log, as a list or as a live
//! server-sent-events stream that resumes from `Last-Event-ID`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use corral_proto::{ErrorBody, Event};
use futures_util::stream;
use serde::Deserialize;
use tokio::sync::broadcast;
use utoipa::IntoParams;

use super::{limit, non_negative};
use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::error::ApiError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/events").route(web::get().to(list_events)))
        .service(web::resource("/events/stream").route(web::get().to(stream_events)));
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventsQuery {
    /// Events with a larger id, oldest first; without it, the newest events.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

/// Audit events, oldest first: those after `after`, or the newest `limit`.
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    security(("bearer" = [])),
    params(EventsQuery),
    responses(
        (status = 200, description = "Events", body = Vec<Event>),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
    )
)]
pub async fn list_events(
    cluster: web::Data<Cluster>,
    caller: Caller,
    query: web::Query<EventsQuery>,
) -> Result<web::Json<Vec<Event>>, ApiError> {
    caller.require_admin()?;
    let after = non_negative("after", query.after)?;
    let limit = limit(query.limit, 100)?;
    Ok(web::Json(cluster.events(after, limit).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct StreamQuery {
    /// Replay events after this id first (the `Last-Event-ID` header wins).
    #[param(minimum = 0)]
    after: Option<i64>,
}

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// A live `text/event-stream` of audit events: `id` is the event id,
/// `event` its kind, `data` the event as JSON. Reconnecting with
/// `Last-Event-ID` (or `after`) replays what was missed.
#[utoipa::path(
    get,
    path = "/api/v1/events/stream",
    tag = "events",
    security(("bearer" = [])),
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "Server-sent events, one per audit event", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed query or Last-Event-ID", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
    )
)]
pub async fn stream_events(
    cluster: web::Data<Cluster>,
    caller: Caller,
    req: HttpRequest,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let header_after = match req.headers().get("Last-Event-ID") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|id| *id >= 0)
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be an event id".into()))?,
        ),
        None => None,
    };
    let after = header_after.or(non_negative("after", query.after)?);
    // Subscribe before reading the backlog so nothing falls in between.
    let rx = cluster.subscribe_events();
    let (backlog, last_id) = match after {
        Some(after) => {
            let events = cluster
                .events(Some(after), crate::cluster::MAX_LIST_LIMIT)
                .await?;
            (events.into(), after)
        }
        None => (VecDeque::new(), -1),
    };
    let open = cluster.counters().event_streams.hold();
    let state = Stream {
        _open: open,
        cluster,
        rx,
        pending: backlog,
        last_id,
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE),
        started: false,
    };
    let body = stream::unfold(state, |mut s| async move {
        let chunk = s.next().await?;
        Some((Ok::<_, actix_web::Error>(chunk), s))
    });
    Ok(HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        ))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

struct Stream {
    cluster: web::Data<Cluster>,
    rx: broadcast::Receiver<Arc<Event>>,
    pending: VecDeque<Event>,
    /// The id of the last event sent (-1: none yet, send all live ones).
    last_id: i64,
    keepalive: tokio::time::Interval,
    started: bool,
    /// Counts this stream as open (`corral_event_streams`) until dropped.
    _open: crate::prometheus::Held,
}

impl Stream {
    async fn next(&mut self) -> Option<Bytes> {
        if !self.started {
            self.started = true;
            return Some(Bytes::from_static(b"retry: 2000\n\n"));
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                if event.id <= self.last_id {
                    continue;
                }
                self.last_id = event.id;
                return Some(encode(&event));
            }
            tokio::select! {
                received = self.rx.recv() => match received {
                    Ok(event) => self.pending.push_back((*event).clone()),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live channel: catch up from the log.
                        let after = self.last_id.max(0);
                        match self.cluster.events(Some(after), crate::cluster::MAX_LIST_LIMIT).await {
                            Ok(events) => self.pending.extend(events),
                            Err(_) => return None,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.keepalive.tick() => return Some(Bytes::from_static(b": keepalive\n\n")),
            }
        }
    }
}

fn encode(event: &Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        event.id, event.kind
    ))
}
