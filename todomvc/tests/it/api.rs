//! The Todo-Backend API against a real PostgreSQL: the specification's own
//! walk-through, URLs behind a proxy, CORS, the headers every answer
//! carries, and bad input answered with a 4xx JSON error and nothing written.

use std::time::Duration;

use futures_util::stream;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Session, TestApp, eventually, shared_app_database, shared_psql};

async fn app_on_shared_db(prefix: &str) -> anyhow::Result<(TestApp, String)> {
    let (at, db) = shared_app_database(prefix)?;
    let app = TestApp::spawn(&["--db-primary", &at, "--db-name", &db]).await?;
    app.wait_writable().await?;
    Ok((app, db))
}

/// The checks of the public Todo-Backend spec runner, in its order, by a
/// client that sends no cookies (as the cross-origin runner does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todo_backend_spec_walkthrough_passes() -> anyhow::Result<()> {
    let (app, _db) = app_on_shared_db("spec").await?;
    let c = app.session();
    let root = "/todos";

    // The api root responds to GET, POST and DELETE; after DELETE it is empty.
    assert_eq!(c.get(root).await?.status, 200);
    let r = c.post_json(root, &json!({"title": "a todo"})).await?;
    assert_eq!(r.status, 201);
    assert_eq!(r.json["title"], "a todo");
    assert_eq!(c.delete(root).await?.status, 204);
    let r = c.get(root).await?;
    assert_eq!(r.json, json!([]));

    // A new todo is listed, not completed, and has a url that returns it.
    let r = c.post_json(root, &json!({"title": "walk the dog"})).await?;
    assert_eq!(r.json["completed"], false);
    let url = r.json["url"].as_str().expect("url").to_string();
    assert!(url.starts_with(&format!("{}/todos/", app.base)), "{url}");
    assert_eq!(r.header("location"), Some(url.as_str()));
    assert_eq!(c.get(root).await?.titles(), vec!["walk the dog"]);
    let r = c.get(&url).await?;
    assert_eq!(
        (r.status, r.json["title"].clone()),
        (200, json!("walk the dog"))
    );

    // Two todos posted at once both land; navigate from the list by url.
    let (first, second) = (
        json!({"title": "todo the first"}),
        json!({"title": "todo the second"}),
    );
    let (a, b) = tokio::join!(c.post_json(root, &first), c.post_json(root, &second));
    assert_eq!((a?.status, b?.status), (201, 201));
    let listed = c.get(root).await?;
    assert_eq!(listed.json.as_array().map(Vec::len), Some(3));
    let listed_url = listed.json[0]["url"].as_str().expect("url");
    assert_eq!(c.get(listed_url).await?.json["title"], "walk the dog");
    for todo in listed.json.as_array().into_iter().flatten().skip(1) {
        assert_eq!(
            c.delete(todo["url"].as_str().expect("url")).await?.status,
            204
        );
    }

    // PATCH changes the title and the completedness, and the change persists.
    let r = c
        .patch_json(&url, &json!({"title": "bathe the cat"}))
        .await?;
    assert_eq!(
        (r.status, r.json["title"].clone()),
        (200, json!("bathe the cat"))
    );
    let r = c.patch_json(&url, &json!({"completed": true})).await?;
    assert_eq!(r.json["completed"], true);
    let r = c.get(&url).await?;
    assert_eq!(r.json["title"], "bathe the cat");
    assert_eq!(r.json["completed"], true);

    // Both at once, and the list agrees.
    let r = c
        .patch_json(&url, &json!({"title": "changed title", "completed": false}))
        .await?;
    assert_eq!(
        (r.json["title"].as_str(), r.json["completed"].as_bool()),
        (Some("changed title"), Some(false))
    );
    let listed = c.get(root).await?;
    assert_eq!(listed.json[0]["title"], "changed title");
    assert_eq!(listed.json[0]["completed"], false);

    // DELETE on the todo's url removes it.
    assert_eq!(c.delete(&url).await?.status, 204);
    assert_eq!(c.get(&url).await?.status, 404);
    assert_eq!(c.get(root).await?.json, json!([]));

    // Order round-trips on create and on PATCH.
    let r = c
        .post_json(root, &json!({"title": "ordered", "order": 523}))
        .await?;
    assert_eq!(r.json["order"], 523);
    let url = r.json["url"].as_str().expect("url").to_string();
    let r = c.patch_json(&url, &json!({"order": 95})).await?;
    assert_eq!(r.json["order"], 95);
    assert_eq!(c.get(&url).await?.json["order"], 95);
    Ok(())
}

/// The list is rendered by PostgreSQL and a single todo by the app: both
/// must give exactly the same JSON, whatever the title holds.
/// A list read answers at most a page (1,000 by default); `Link: rel=next`
/// leads through the rest, and a bad page is a 400 that reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lists_come_in_pages_linked_to_the_next() -> anyhow::Result<()> {
    let (app, _db) = app_on_shared_db("pages").await?;
    let c = app.session();
    for i in 0..5 {
        c.post_json("/todos", &json!({"title": format!("t{i}"), "order": i}))
            .await?;
    }
    let mut titles = Vec::new();
    let mut path = "/todos?limit=2".to_string();
    let mut pages = 0;
    loop {
        let r = c.get(&path).await?;
        assert_eq!(r.status, 200, "{}", r.text);
        pages += 1;
        titles.extend(r.titles());
        let Some(link) = r.header("link") else { break };
        let url = link
            .strip_prefix('<')
            .and_then(|l| l.split_once(">; rel=\"next\""))
            .map(|(url, _)| url.to_string())
            .unwrap_or_else(|| panic!("a Link header like <url>; rel=\"next\": {link}"));
        path = url[url.find("/todos").expect("path")..].to_string();
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!(
        (pages, titles),
        (
            3,
            vec!["t0", "t1", "t2", "t3", "t4"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        )
    );
    // The whole list fits the default page: no Link.
    let r = c.get("/todos").await?;
    assert_eq!((r.titles().len(), r.header("link")), (5, None));
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "offset=-1",
        "offset=",
        "limit=1e3",
    ] {
        let r = c.get(&format!("/todos?{bad}")).await?;
        assert_eq!(
            (r.status, r.json["error"].as_str()),
            (400, Some("bad_query")),
            "{bad}: {}",
            r.text
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_todos_are_exactly_the_todos_fetched_alone() -> anyhow::Result<()> {
    let (app, _db) = app_on_shared_db("same").await?;
    let c = app.session();
    let titles = [
        "plain",
        "quotes \" and backslash \\ and slash /",
        "tab\tnewline\ncarriage\r bell\u{7}",
        "ünïcödé — 漢字 — 🦀",
        "<script>alert(1)</script> & ampersand",
        "  spaces kept  ",
    ];
    let orders = [
        json!(null),
        json!(-3),
        json!(9_007_199_254_740_991_i64),
        json!(0),
    ];
    for (i, title) in titles.iter().enumerate() {
        let mut body = json!({"title": title, "completed": i % 2 == 1});
        if let Some(order) = orders.get(i) {
            body["order"] = order.clone();
        }
        let r = c.post_json("/todos", &body).await?;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.json["title"], *title, "titles round-trip exactly");
    }
    let list = c.get("/todos").await?;
    let listed = list.json.as_array().expect("array");
    assert_eq!(listed.len(), titles.len());
    for todo in listed {
        let alone = c.get(todo["url"].as_str().expect("url")).await?;
        assert_eq!(*todo, alone.json);
        let keys: Vec<&String> = todo.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["completed", "id", "order", "title", "url"]);
    }
    // In `order` first (nulls last), then by creation.
    let orders: Vec<Value> = listed.iter().map(|t| t["order"].clone()).collect();
    assert_eq!(
        orders,
        vec![
            json!(-3),
            json!(0),
            json!(9_007_199_254_740_991_i64),
            json!(null),
            json!(null),
            json!(null)
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todo_urls_follow_forwarded_proto_and_host() -> anyhow::Result<()> {
    let (app, _db) = app_on_shared_db("fwd").await?;
    let c = app.session();
    let r = c
        .send(
            c.request(Method::POST, "/todos")
                .header("Host", "todo.example")
                .header("X-Forwarded-Proto", "https")
                .body(r#"{"title":"behind nginx"}"#),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json["id"].as_i64().expect("id");
    assert_eq!(r.json["url"], format!("https://todo.example/todos/{id}"));
    assert_eq!(
        r.header("location"),
        Some(format!("https://todo.example/todos/{id}").as_str())
    );
    // Without proxy headers the url is the one the client used.
    let r = c.get("/todos").await?;
    assert_eq!(r.json[0]["url"], format!("{}/todos/{id}", app.base));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_any_origin_including_preflight_for_patch_and_delete() -> anyhow::Result<()> {
    let (app, _db) = app_on_shared_db("cors").await?;
    let c = app.session();
    for method in ["PATCH", "DELETE", "POST"] {
        let r = c
            .send(
                c.request(Method::OPTIONS, "/todos/1")
                    .header("Origin", "https://www.todobackend.com")
                    .header("Access-Control-Request-Method", method)
                    .header("Access-Control-Request-Headers", "content-type"),
            )
            .await?;
        assert!(
            (200..300).contains(&r.status),
            "preflight {method}: {}",
            r.status
        );
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        let methods = r.header("access-control-allow-methods").unwrap_or("");
        assert!(methods.contains(method), "{method} not in {methods:?}");
        let headers = r.header("access-control-allow-headers").unwrap_or("");
        assert!(
            headers.to_ascii_lowercase().contains("content-type"),
            "{headers:?}"
        );
    }
    // Actual requests, including failing ones, carry the header too.
    for (method, path) in [(Method::GET, "/todos"), (Method::GET, "/todos/999999")] {
        let r = c
            .send(
                c.request(method, path)
                    .header("Origin", "https://elsewhere.example"),
            )
            .await?;
        assert_eq!(r.header("access-control-allow-origin"), Some("*"), "{path}");
    }
    let r = c
        .send(
            c.request(Method::POST, "/todos")
                .header("Origin", "https://elsewhere.example")
                .header("Content-Type", "application/json")
                .body(r#"{"title":"from afar"}"#),
        )
        .await?;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let exposed = r.header("access-control-expose-headers").unwrap_or("");
    assert!(exposed.contains("Location"), "{exposed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_name_the_node_and_carry_a_request_id() -> anyhow::Result<()> {
    let (app, _db) = app_on_shared_db("hdrs").await?;
    let c = app.session();
    let a = c.get("/todos").await?;
    let b = c.get("/nope").await?;
    for r in [&a, &b] {
        assert_eq!(r.header("x-served-by"), Some("test-node"));
    }
    let (ida, idb) = (a.header("x-request-id"), b.header("x-request-id"));
    assert!(ida.is_some_and(|id| id.len() >= 8), "{ida:?}");
    assert_ne!(ida, idb, "every request gets its own id");
    // A sane id from the client (nginx's $request_id) is kept, a wild one is not.
    let r = c
        .send(
            c.request(Method::GET, "/todos")
                .header("X-Request-Id", "abc-123"),
        )
        .await?;
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    let r = c
        .send(
            c.request(Method::GET, "/todos")
                .header("X-Request-Id", "a b\"c"),
        )
        .await?;
    assert_ne!(r.header("x-request-id"), Some("a b\"c"));
    // API answers must not be cached: a cached list is stale after a write.
    assert_eq!(a.header("cache-control"), Some("no-store"));
    Ok(())
}

fn error_code(r: &crate::support::Reply) -> &str {
    r.json["error"].as_str().unwrap_or("<no JSON error>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_4xx_json_error_and_writes_nothing() -> anyhow::Result<()> {
    let (app, db) = app_on_shared_db("bad").await?;
    let c = app.session();
    let too_long = "x".repeat(todomvc::todo::TITLE_MAX_CHARS + 1);
    let bodies: Vec<(String, u16, &str)> = vec![
        (r#"{"title":"#.into(), 400, "invalid_json"),
        ("not json".into(), 400, "invalid_json"),
        ("".into(), 400, "invalid_json"),
        ("[]".into(), 422, "invalid_todo"),
        (r#""a title""#.into(), 422, "invalid_todo"),
        ("{}".into(), 422, "invalid_todo"),
        (r#"{"title":5}"#.into(), 422, "invalid_todo"),
        (r#"{"title":null}"#.into(), 422, "invalid_todo"),
        (r#"{"title":""}"#.into(), 422, "invalid_todo"),
        (r#"{"title":"   "}"#.into(), 422, "invalid_todo"),
        (r#"{"title":"a\u0000b"}"#.into(), 422, "invalid_todo"),
        (
            json!({ "title": too_long }).to_string(),
            422,
            "invalid_todo",
        ),
        (
            r#"{"title":"a","completed":"yes"}"#.into(),
            422,
            "invalid_todo",
        ),
        (r#"{"title":"a","order":1.5}"#.into(), 422, "invalid_todo"),
        (r#"{"title":"a","order":"7"}"#.into(), 422, "invalid_todo"),
    ];
    for (body, status, code) in &bodies {
        let r = c
            .send(
                c.request(Method::POST, "/todos")
                    .header("Content-Type", "application/json")
                    .body(body.clone()),
            )
            .await?;
        assert_eq!(r.status, *status, "POST {body:.60}: {}", r.text);
        assert_eq!(error_code(&r), *code, "POST {body:.60}");
        assert!(
            r.json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "a message says what is wrong: {}",
            r.text
        );
    }

    // Huge bodies: announced, and streamed without a length.
    let huge = format!(r#"{{"title":"{}"}}"#, "x".repeat(1 << 20));
    let r = c
        .send(c.request(Method::POST, "/todos").body(huge.clone()))
        .await?;
    assert_eq!((r.status, error_code(&r)), (413, "payload_too_large"));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge
        .into_bytes()
        .chunks(8192)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let r = c
        .send(
            c.request(Method::POST, "/todos")
                .body(reqwest::Body::wrap_stream(stream::iter(chunks))),
        )
        .await?;
    assert_eq!((r.status, error_code(&r)), (413, "payload_too_large"));

    assert_eq!(shared_psql(&db, "SELECT count(*) FROM todos")?, "0");

    // A todo to aim bad PATCHes at; it must come out unchanged.
    let longest = "é".repeat(todomvc::todo::TITLE_MAX_CHARS);
    let r = c.add(&longest).await?;
    assert_eq!(
        r.json["title"],
        longest.as_str(),
        "the limit itself is allowed"
    );
    let url = r.json["url"].as_str().expect("url").to_string();
    for (body, status) in [
        (r#"{"title":""}"#, 422),
        (r#"{"completed":"true"}"#, 422),
        (r#"{"completed":null}"#, 422),
        (r#"{"order":[1]}"#, 422),
        (r#"{"title":"#, 400),
    ] {
        let r = c
            .send(c.request(Method::PATCH, &url).body(body.to_string()))
            .await?;
        assert_eq!(r.status, status, "PATCH {body}: {}", r.text);
    }
    let r = c.get(&url).await?;
    assert_eq!(
        (r.json["title"].as_str(), r.json["completed"].as_bool()),
        (Some(longest.as_str()), Some(false))
    );

    // Unknown ids and ids that are no ids.
    for path in [
        "/todos/999999",
        "/todos/abc",
        "/todos/-1",
        "/todos/0",
        "/todos/99999999999999999999",
    ] {
        for method in [Method::GET, Method::PATCH, Method::DELETE] {
            let r = c
                .send(c.request(method.clone(), path).body(r#"{"title":"x"}"#))
                .await?;
            assert_eq!(
                (r.status, error_code(&r)),
                (404, "not_found"),
                "{method} {path}"
            );
        }
    }
    // Unknown paths and methods.
    let r = c.get("/nothing/here").await?;
    assert_eq!((r.status, error_code(&r)), (404, "not_found"));
    let r = c.send(c.request(Method::PUT, "/todos").body("{}")).await?;
    assert_eq!((r.status, error_code(&r)), (405, "method_not_allowed"));
    assert!(r.header("allow").is_some_and(|a| a.contains("POST")));

    assert_eq!(shared_psql(&db, "SELECT count(*) FROM todos")?, "1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_is_served_with_todomvc_markup_and_no_external_assets() -> anyhow::Result<()> {
    let (app, _db) = app_on_shared_db("page").await?;
    let c = Session::new(&app.base);
    let r = c.get("/").await?;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/html"))
    );
    for class in [
        "todoapp",
        "new-todo",
        "toggle-all",
        "todo-list",
        "todo-count",
        "filters",
        "clear-completed",
    ] {
        assert!(
            r.text.contains(&format!("class=\"{class}")),
            "markup lacks .{class}"
        );
    }
    assert!(
        !r.text.contains("://cdn") && !r.text.contains("src=\"http"),
        "no CDN"
    );
    for asset in ["/app.js", "/todomvc-app.css"] {
        let r = c.get(asset).await?;
        assert_eq!(r.status, 200, "{asset}");
        assert!(r.text.len() > 1000, "{asset} is the real thing");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_and_writes_are_503_when_no_database_answers() -> anyhow::Result<()> {
    // A port nobody listens on.
    let port = corral_testkit::free_port("127.0.0.1")?;
    let app = TestApp::spawn(&["--db-primary", &format!("127.0.0.1:{port}")]).await?;
    eventually("a probe has run", Duration::from_secs(10), || async {
        Ok(app.health().await?.json["probed_ms_ago"].is_number())
    })
    .await?;
    let h = app.health().await?;
    assert_eq!(h.status, 503, "{}", h.text);
    assert_eq!(h.json["status"], "unavailable");
    assert_eq!(h.json["servers"][0]["state"], "down");
    let c = app.session();
    let r = c.post_json("/todos", &json!({"title": "lost?"})).await?;
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    assert_eq!(r.json["error"], "unavailable");
    // The public answer names no database endpoint and no driver error,
    // only the request id the details are logged under.
    let message = r.json["message"].as_str().unwrap_or_default();
    let id = r.header("x-request-id").expect("a request id");
    assert!(
        message.starts_with("database unavailable; request id "),
        "{message}"
    );
    assert!(message.contains(id), "{message}");
    assert!(
        !message.contains(&port.to_string()) && !message.contains("127.0.0.1"),
        "{message}"
    );
    let r = c.get("/todos").await?;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (503, Some("unavailable"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn also_listen_serves_the_same_app_on_another_address_such_as_ipv6() -> anyhow::Result<()> {
    let db = corral_testkit::free_port("127.0.0.1")?;
    let v6 = corral_testkit::free_port("::1")?;
    let also = format!("[::1]:{v6}");
    let app = TestApp::spawn(&[
        "--db-primary",
        &format!("127.0.0.1:{db}"),
        "--also-listen",
        &also,
    ])
    .await?;
    let over_v6 = Session::new(&format!("http://{also}"));
    let page = over_v6.get("/").await?;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(page.header("x-served-by"), Some("test-node"));
    // The same process: the IPv4 listener answers as well.
    assert_eq!(app.session().get("/").await?.status, 200);
    Ok(())
}
