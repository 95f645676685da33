//! The live audit-event stream (`GET /api/v1/events/stream`) read over
//! `fetch`, because `EventSource` cannot send the `Authorization` header and
//! the token does not belong in a URL. Frames are parsed as they arrive;
//! a dropped connection is retried with `Last-Event-ID`, so nothing is
//! missed; it goes to another server when this one cannot be reached (see
//! [`Client::send`]). Dropping the [`EventStream`] aborts the request.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use corral_proto::Event;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{AbortController, ReadableStreamDefaultReader};
use yew::Callback;

use crate::api::{ApiError, Client};

/// Whether the stream is flowing, for the indicator in the header.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamStatus {
    Connecting,
    /// Flowing; from another server than the page's own when named (its
    /// own stopped answering).
    Live(Option<String>),
    /// Lost; retrying. The text says why.
    Retrying(String),
}

/// Splits complete `\n\n`-terminated frames off `buffer` and returns the
/// events among them (comments, `retry:` and unknown data are skipped).
pub fn take_events(buffer: &mut String) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(end) = buffer.find("\n\n") {
        let frame: String = buffer.drain(..end + 2).collect();
        let data: Vec<&str> = frame
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if !data.is_empty()
            && let Ok(event) = serde_json::from_str::<Event>(&data.join("\n"))
        {
            events.push(event);
        }
    }
    events
}

/// A running stream; dropping it stops it.
pub struct EventStream {
    abort: AbortController,
    stopped: Rc<Cell<bool>>,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.stopped.set(true);
        self.abort.abort();
    }
}

impl EventStream {
    /// Follows the stream from now on (after `after`, when given), handing
    /// each event to `on_event`. A 401 goes to `on_unauthorized` and ends it.
    pub fn start(
        client: Client,
        after: Option<i64>,
        on_event: Callback<Event>,
        on_status: Callback<StreamStatus>,
        on_unauthorized: Callback<ApiError>,
    ) -> Option<Self> {
        let abort = AbortController::new().ok()?;
        let stopped = Rc::new(Cell::new(false));
        let stream = Self {
            abort: abort.clone(),
            stopped: stopped.clone(),
        };
        spawn_local(async move {
            let mut last_id = after;
            let mut failures = 0u32;
            while !stopped.get() {
                on_status.emit(StreamStatus::Connecting);
                let outcome = follow(&client, &abort, &mut last_id, &on_event, &on_status).await;
                if stopped.get() {
                    break;
                }
                match outcome {
                    Err(e) if e.is_unauthorized() => {
                        on_unauthorized.emit(e);
                        break;
                    }
                    Err(e) => {
                        failures += 1;
                        on_status.emit(StreamStatus::Retrying(e.to_string()));
                    }
                    Ok(()) => {
                        failures = 0;
                        on_status.emit(StreamStatus::Retrying("the stream ended".into()));
                    }
                }
                let backoff = 500 * u64::from(failures.min(8)) + 500;
                gloo_timers::future::sleep(Duration::from_millis(backoff)).await;
            }
        });
        Some(stream)
    }
}

/// One connection: read frames until the stream ends or fails.
async fn follow(
    client: &Client,
    abort: &AbortController,
    last_id: &mut Option<i64>,
    on_event: &Callback<Event>,
    on_status: &Callback<StreamStatus>,
) -> Result<(), ApiError> {
    let path = match last_id {
        Some(id) => format!("/api/v1/events/stream?after={id}"),
        None => "/api/v1/events/stream".to_string(),
    };
    let response = client
        .send("GET", &path, None, Some(&abort.signal()))
        .await?;
    if !response.ok() {
        return Err(ApiError {
            status: response.status(),
            code: "stream".into(),
            message: format!("the event stream answered {}", response.status()),
        });
    }
    let body = response.body().ok_or_else(|| ApiError {
        status: response.status(),
        code: "stream".into(),
        message: "the event stream has no body".into(),
    })?;
    let reader: ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|_| network("the browser cannot read streams"))?;
    on_status.emit(StreamStatus::Live(client.other_server()));
    let mut buffer = String::new();
    let mut pending_bytes: Vec<u8> = Vec::new();
    loop {
        let chunk = JsFuture::from(reader.read())
            .await
            .map_err(|e| network(&format!("{e:?}")))?;
        let done = js_sys::Reflect::get(&chunk, &JsValue::from_str("done"))
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            return Ok(());
        }
        let value = js_sys::Reflect::get(&chunk, &JsValue::from_str("value"))
            .map_err(|_| network("a stream chunk without a value"))?;
        pending_bytes.extend(js_sys::Uint8Array::new(&value).to_vec());
        // A chunk may end inside a multi-byte character: keep the tail.
        let valid = match std::str::from_utf8(&pending_bytes) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        buffer.push_str(&String::from_utf8_lossy(&pending_bytes[..valid]));
        pending_bytes.drain(..valid);
        for event in take_events(&mut buffer) {
            *last_id = Some(event.id);
            on_event.emit(event);
        }
    }
}

fn network(message: &str) -> ApiError {
    ApiError {
        status: 0,
        code: "network".into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_become_events_and_partial_frames_wait() {
        let mut buffer = String::from(
            "retry: 2000\n\n: keepalive\n\nid: 7\nevent: node.created\ndata: {\"id\":7,\"at\":\"2026-11-25T10:00:00Z\",\"actor\":\"admin\",\"kind\":\"node.created\",\"subject\":\"nginx3\",\"message\":\"m\"}\n\nid: 8\nevent: x\ndata: {\"id\":8,",
        );
        let events = take_events(&mut buffer);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].subject, "nginx3");
        assert!(buffer.starts_with("id: 8"), "the partial frame stays");
    }
}
