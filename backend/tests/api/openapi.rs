use crate::helpers::*;

#[test]
fn committed_openapi_yaml_matches_the_code() {
    let generated = corral_server::api::openapi_yaml();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    if committed != generated {
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).expect("write openapi.yaml");
            return;
        }
        panic!(
            "openapi.yaml is stale. Regenerate it with:\n\n    cargo run -q -p corral-server -- openapi > openapi.yaml\n"
        );
    }
}

#[tokio::test]
async fn swagger_ui_and_the_spec_are_served_from_the_binary() {
    let app = spawn_app(Backend::Sqlite).await;
    let res = app
        .http
        .get(format!("{}/docs/", app.url))
        .send()
        .await
        .expect("docs");
    assert_eq!(res.status(), 200);
    assert!(res.text().await.expect("html").contains("swagger-ui"));
    let css = app
        .http
        .get(format!("{}/docs/swagger-ui.css", app.url))
        .send()
        .await
        .expect("css");
    assert_eq!(css.status(), 200);
    let spec: serde_json::Value = app
        .http
        .get(format!("{}/api-docs/openapi.json", app.url))
        .send()
        .await
        .expect("spec")
        .json()
        .await
        .expect("json");
    assert!(spec["paths"]["/api/v1/agents/{name}/orders"]["get"].is_object());
}
