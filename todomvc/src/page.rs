//! The TodoMVC page, embedded in the binary: the standard markup and
//! class names, todomvc-app-css, and a small script that keeps the list in
//! the API (so a reload, or another browser, shows the same list).

use actix_web::http::header;
use actix_web::{HttpResponse, web};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const TODOMVC_CSS: &str = include_str!("../assets/todomvc-app-css.css");

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/",
        web::get().to(|| asset("text/html; charset=utf-8", INDEX_HTML)),
    )
    .route(
        "/app.js",
        web::get().to(|| asset("text/javascript; charset=utf-8", APP_JS)),
    )
    .route(
        "/todomvc-app.css",
        web::get().to(|| asset("text/css; charset=utf-8", TODOMVC_CSS)),
    );
}

async fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        // Revalidate on every load so a new binary's page is used at once.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}
