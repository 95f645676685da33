//! `GET /api/v1/servers`, and the CORS answers that let the web UI loaded
//! from one server go on with another when its own stops answering.
//!
//! Only the origins of the configured servers (this one and its `--peer`s)
//! are allowed, and only for the API: a page from anywhere else gets no
//! CORS header, so the browser keeps it from reading answers as before.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use corral_proto::{ErrorBody, Servers};

use crate::auth::Caller;
use crate::error::ApiError;

/// The control-plane servers of this cluster: this one first.
#[derive(Debug, Clone, Default)]
pub struct ServerUrls {
    urls: Vec<String>,
    origins: Vec<String>,
}

impl ServerUrls {
    pub fn new(own: String, peers: &[String]) -> Self {
        let mut urls = vec![own];
        for peer in peers {
            let peer = peer.trim_end_matches('/').to_string();
            if !urls.contains(&peer) {
                urls.push(peer);
            }
        }
        let origins = urls.iter().filter_map(|u| origin_of(u)).collect();
        Self { urls, origins }
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| o == origin)
    }
}

/// `scheme://host[:port]` as a browser sends it in `Origin` (the default
/// port left out), or None for what is not a URL.
pub fn origin_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/servers").route(web::get().to(list_servers)));
}

/// The control-plane servers sharing this cluster's state, this one first.
/// The web UI calls the next one when the one it talks to stops answering.
#[utoipa::path(
    get,
    path = "/api/v1/servers",
    tag = "meta",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "This server and its peers", body = Servers),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "An agent token", body = ErrorBody),
    )
)]
pub async fn list_servers(
    urls: Option<web::Data<ServerUrls>>,
    caller: Caller,
) -> Result<web::Json<Servers>, ApiError> {
    caller.require_admin()?;
    Ok(web::Json(Servers {
        servers: urls.map(|u| u.urls.clone()).unwrap_or_default(),
    }))
}

/// Headers a cross-origin call of the UI sends.
const ALLOWED_HEADERS: &str = "authorization, content-type, accept, last-event-id";
/// Headers of an answer the UI reads.
const EXPOSED_HEADERS: &str = "location, retry-after";

/// Answers CORS preflights of the other servers' pages and marks their
/// calls' answers (refusals included) readable to them; everything else
/// passes as it is.
pub async fn cors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|origin| {
            req.path().starts_with("/api/")
                && req
                    .app_data::<web::Data<ServerUrls>>()
                    .is_some_and(|urls| urls.allows(origin))
        });
    let Some(origin) = origin else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    if req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let answer = HttpResponse::NoContent()
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
            .insert_header((
                header::ACCESS_CONTROL_ALLOW_METHODS,
                "GET, POST, PUT, DELETE",
            ))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOWED_HEADERS))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
            .insert_header((header::VARY, "Origin"))
            .finish();
        return Ok(req.into_response(answer));
    }
    // Refusals are responses by now (see `authenticate`); an error still
    // left goes on as it is.
    let mut res = next.call(req).await?.map_into_boxed_body();
    let headers = res.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_str(&origin).expect("an Origin header is a header value"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        header::HeaderValue::from_static(EXPOSED_HEADERS),
    );
    headers.append(header::VARY, header::HeaderValue::from_static("Origin"));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_those_a_browser_sends() {
        assert_eq!(
            origin_of("https://192.168.11.5:7070/").as_deref(),
            Some("https://192.168.11.5:7070")
        );
        assert_eq!(
            origin_of("https://adm1.example:443").as_deref(),
            Some("https://adm1.example")
        );
        assert_eq!(origin_of("not a url"), None);
        let urls = ServerUrls::new(
            "http://127.0.0.1:7070".into(),
            &[
                "http://127.0.0.2:7070/".into(),
                "http://127.0.0.1:7070".into(),
            ],
        );
        assert_eq!(
            urls.urls,
            vec!["http://127.0.0.1:7070", "http://127.0.0.2:7070"]
        );
        assert!(urls.allows("http://127.0.0.2:7070"));
        assert!(!urls.allows("http://127.0.0.3:7070"));
        assert!(!urls.allows("http://127.0.0.2:7071"));
    }
}
