//! The web UI at `/`: files of the built directory, `index.html` for page
//! paths, the API's 404s untouched, and a note when no UI is built.

use std::path::PathBuf;

use crate::helpers::*;

async fn app_with_ui(dir: Option<PathBuf>) -> TestApp {
    spawn_with(Backend::Sqlite, |config| config.ui_dir = dir).await
}

fn built_ui() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("ui dir");
    std::fs::write(
        dir.path().join("index.html"),
        "<!doctype html><title>corral ui</title>",
    )
    .expect("index");
    std::fs::write(dir.path().join("app-1234.wasm"), b"\0asm").expect("wasm");
    dir
}

#[tokio::test]
async fn the_ui_is_served_with_index_html_for_its_page_paths() {
    let ui = built_ui();
    let app = app_with_ui(Some(ui.path().to_path_buf())).await;
    for page in ["/", "/nodes/nginx1", "/settings", "/events"] {
        let res = app
            .http
            .get(format!("{}{page}", app.url))
            .send()
            .await
            .expect("get");
        assert_eq!(res.status(), 200, "{page}");
        assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(res.headers()["cache-control"], "no-cache");
        assert!(res.text().await.expect("body").contains("corral ui"));
    }
    let res = app
        .http
        .get(format!("{}/app-1234.wasm", app.url))
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/wasm");
    assert!(
        res.headers()["cache-control"]
            .to_str()
            .expect("ascii")
            .contains("immutable")
    );
    assert_eq!(res.bytes().await.expect("bytes").as_ref(), b"\0asm");
}

#[tokio::test]
async fn api_paths_and_missing_files_never_fall_back_to_the_ui() {
    let ui = built_ui();
    let app = app_with_ui(Some(ui.path().to_path_buf())).await;
    assert_error(app.get("/api/v1/nope").await, 404, "not_found").await;
    assert_error(app.get("/api/v2/nodes").await, 404, "not_found").await;
    assert_error(app.get("/missing-5678.js").await, 404, "not_found").await;
    assert_error(app.get("/../Cargo.toml").await, 404, "not_found").await;
    let res = app
        .http
        .post(format!("{}/settings", app.url))
        .send()
        .await
        .expect("post");
    assert_error(res, 404, "not_found").await;
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn without_a_built_ui_the_root_says_how_to_build_it() {
    let app = app_with_ui(None).await;
    let body = assert_error(app.get("/").await, 404, "ui_not_built").await;
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("scripts/build-ui.sh")
    );
    let page = app
        .http
        .get(format!("{}/nodes/pg1", app.url))
        .header("accept", "text/html")
        .send()
        .await
        .expect("get");
    assert_eq!(page.status(), 404);
    assert!(
        page.text()
            .await
            .expect("body")
            .contains("scripts/build-ui.sh")
    );
}
