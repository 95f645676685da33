//! Backups through the real endpoints with simulated agents: a backup
//! ordered on the streaming standby, its files uploaded and checked, the
//! report, the WAL archive, the restore request, and every bad input
//! refused with a 4xx that changes nothing.

use reqwest::Method;
use serde_json::{Value, json};
use sha2::Digest;

use crate::both_backends;
use crate::db::{beat, db_heartbeat, db_pair};
use crate::helpers::*;

pub fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

pub async fn upload(
    app: &TestApp,
    token: &str,
    path: &str,
    data: &'static [u8],
    sum: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .as_token(token, Method::PUT, path)
        .header("content-type", "application/octet-stream")
        .body(data);
    if let Some(s) = sum {
        req = req.header("x-content-sha256", s);
    }
    req.send().await.expect("upload")
}

/// Orders a backup with pg1 primary and pg2 streaming; returns its id and
/// the tokens.
async fn ordered(app: &TestApp) -> (i64, String, String) {
    let (pg1, pg2) = db_pair(app).await;
    beat(app, &pg1, "pg1", db_heartbeat("primary", 0, 1)).await;
    beat(app, &pg2, "pg2", db_heartbeat("replica", 0, 1)).await;
    let res = app.post("/api/v1/backups", json!({})).await;
    assert_eq!(res.status(), 202);
    let backup: Value = res.json().await.expect("json");
    assert_eq!(backup["node"], "pg2", "taken on the streaming standby");
    assert_eq!(backup["status"], "running");
    (backup["id"].as_i64().expect("id"), pg1, pg2)
}

both_backends! {
    async fn a_backup_is_ordered_on_the_standby_and_done_once_its_files_are_verified(app) {
        let (id, pg1, pg2) = ordered(&app).await;
        let orders = app.get_json("/api/v1/nodes/pg2/orders").await;
        let order = orders
            .as_array()
            .expect("orders")
            .iter()
            .find(|o| o["payload"]["kind"] == "backup")
            .cloned()
            .expect("a backup order on pg2");
        assert_eq!(order["payload"]["id"], id);
        // Only one at a time.
        assert_error(app.post("/api/v1/backups", json!({})).await, 409, "backup_in_progress").await;

        let base = format!("/api/v1/agents/pg2/backups/{id}/files/base.tar");
        // Bad uploads are refused and leave nothing.
        assert_error(upload(&app, &pg2, &base, b"tar bytes", None).await, 422, "unprocessable_entity").await;
        assert_error(upload(&app, &pg2, &base, b"tar bytes", Some("xyz")).await, 422, "unprocessable_entity").await;
        assert_error(upload(&app, &pg2, &base, b"tar bytes", Some(&sha(b"other"))).await, 422, "checksum_mismatch").await;
        assert_error(upload(&app, &pg1, &base, b"tar bytes", Some(&sha(b"tar bytes"))).await, 403, "forbidden").await;
        let odd = format!("/api/v1/agents/pg2/backups/{id}/files/passwd");
        assert_error(upload(&app, &pg2, &odd, b"x", Some(&sha(b"x"))).await, 422, "unprocessable_entity").await;
        let other = format!("/api/v1/agents/pg1/backups/{id}/files/base.tar");
        assert_error(upload(&app, &pg1, &other, b"x", Some(&sha(b"x"))).await, 404, "not_found").await;
        assert!(!app.state.join(format!("backups/base/{id}/base.tar")).exists());

        // A report naming a file the store lacks is refused.
        let report = |files: Value| json!({
            "files": files, "wal_start_lsn": "0/3000028", "wal_end_lsn": "0/3000100", "timeline": 1,
        });
        let file = json!([{"name": "base.tar", "size": 9, "sha256": sha(b"tar bytes")}]);
        let report_path = format!("/api/v1/agents/pg2/backups/{id}/report");
        let res = app.as_token(&pg2, Method::POST, &report_path).json(&report(file.clone())).send().await.expect("report");
        assert_error(res, 422, "files_missing").await;

        let res = upload(&app, &pg2, &base, b"tar bytes", Some(&sha(b"tar bytes"))).await;
        assert_eq!(res.status(), 201);
        let stored = std::fs::read(app.state.join(format!("backups/base/{id}/base.tar"))).expect("stored");
        assert_eq!(stored, b"tar bytes");
        let bad_lsn = json!({"files": file, "wal_start_lsn": "yesterday", "wal_end_lsn": "0/1", "timeline": 1});
        let res = app.as_token(&pg2, Method::POST, &report_path).json(&bad_lsn).send().await.expect("report");
        assert_error(res, 422, "unprocessable_entity").await;
        let res = app.as_token(&pg2, Method::POST, &report_path).json(&report(file)).send().await.expect("report");
        assert_eq!(res.status(), 200);
        let done: Value = res.json().await.expect("json");
        assert_eq!(done["status"], "done");
        assert_eq!(done["size_bytes"], 9);
        assert_eq!(done["wal_start_lsn"], "0/3000028");
        let list = app.get_json("/api/v1/backups").await;
        assert_eq!(list[0]["id"], id);
        assert_eq!(list[0]["status"], "done");
        assert!(app.event_kinds().await.contains(&"backup.done pg2".to_string()));
        // Finished: no more uploads, no second report.
        assert_error(upload(&app, &pg2, &base, b"tar bytes", Some(&sha(b"tar bytes"))).await, 409, "backup_finished").await;
        let status = app.get_json("/api/v1/backups/status").await;
        assert_eq!(status["last_done"]["id"], id);
        assert_eq!(status["overdue"], false);
    }

    async fn a_failed_backup_order_fails_the_backup(app) {
        let (id, _, pg2) = ordered(&app).await;
        let orders = app.get_json("/api/v1/nodes/pg2/orders").await;
        let seq = orders
            .as_array()
            .expect("orders")
            .iter()
            .find(|o| o["payload"]["kind"] == "backup")
            .and_then(|o| o["seq"].as_i64())
            .expect("seq");
        let res = app
            .as_token(&pg2, Method::POST, &format!("/api/v1/agents/pg2/orders/{seq}/result"))
            .json(&json!({"outcome": "failed", "message": "pg_basebackup: could not connect"}))
            .send()
            .await
            .expect("result");
        assert_eq!(res.status(), 200);
        let list = app.get_json("/api/v1/backups").await;
        assert_eq!(list[0]["id"], id);
        assert_eq!(list[0]["status"], "failed");
        assert!(list[0]["error"].as_str().is_some_and(|e| e.contains("could not connect")));
        // The next one may be taken.
        assert_eq!(app.post("/api/v1/backups", json!({})).await.status(), 202);
    }

    async fn wal_is_archived_with_its_checksum_and_read_back_only_by_a_restore(app) {
        let (pg1, _) = db_pair(&app).await;
        let seg = "000000010000000000000003";
        let path = format!("/api/v1/agents/pg1/wal/{seg}");
        assert_error(upload(&app, &pg1, &path, b"wal", Some(&sha(b"lost"))).await, 422, "checksum_mismatch").await;
        assert_error(upload(&app, &pg1, "/api/v1/agents/pg1/wal/..%2Fcorral.db", b"x", Some(&sha(b"x"))).await, 422, "unprocessable_entity").await;
        assert_eq!(upload(&app, &pg1, &path, b"wal", Some(&sha(b"wal"))).await.status(), 204);
        // Again after a lost answer: fine; other bytes: refused.
        assert_eq!(upload(&app, &pg1, &path, b"wal", Some(&sha(b"wal"))).await.status(), 204);
        assert_error(upload(&app, &pg1, &path, b"new", Some(&sha(b"new"))).await, 409, "already_stored").await;
        assert_eq!(std::fs::read(app.state.join(format!("backups/wal/{seg}"))).expect("stored"), b"wal");
        // A node restoring nothing reads nothing; the admin can.
        let res = app.as_token(&pg1, Method::GET, &path).send().await.expect("get");
        assert_error(res, 403, "forbidden").await;
        let res = app.request(Method::GET, "/api/v1/agents/pg1/wal").send().await.expect("list");
        assert_eq!(res.json::<Value>().await.expect("json"), json!([seg]));
        let res = app.request(Method::GET, &path).send().await.expect("get");
        assert_eq!(res.headers()["x-content-sha256"], sha(b"wal").as_str());
        assert_eq!(res.bytes().await.expect("bytes").as_ref(), b"wal");
    }

    async fn a_restore_with_no_backup_before_its_time_or_bad_input_is_refused_and_files_nothing(app) {
        db_pair(&app).await;
        let orders_before = app.get_json("/api/v1/nodes/adm1/orders").await;
        let restore = |body: Value| app.post("/api/v1/db/restore", body);
        assert_error(restore(json!({"to": "r1"})).await, 422, "no_backup_before").await;
        assert_error(restore(json!({"to": "r1", "time": "2020-01-01T00:00:00Z"})).await, 422, "no_backup_before").await;
        assert_error(restore(json!({"to": "r1", "time": "2999-01-01T00:00:00Z"})).await, 422, "unprocessable_entity").await;
        assert_error(restore(json!({"to": "R 1"})).await, 422, "unprocessable_entity").await;
        assert_error(restore(json!({"to": "r1", "port": 22})).await, 422, "unprocessable_entity").await;
        assert_error(restore(json!({"to": "r1", "time": "noon"})).await, 422, "unprocessable_entity").await;
        assert_error(restore(json!({"to": "r1", "extra": 1})).await, 422, "unprocessable_entity").await;
        assert_eq!(app.get_json("/api/v1/nodes/adm1/orders").await, orders_before);
        assert_error(app.post("/api/v1/backups", json!({})).await, 409, "no_db_node").await;
        assert_eq!(app.get_json("/api/v1/backups").await, json!([]));
    }

    async fn a_restore_into_a_new_node_makes_a_restore_node_the_topology_does_not_count(app) {
        let (id, _, pg2) = ordered(&app).await;
        let base = format!("/api/v1/agents/pg2/backups/{id}/files/base.tar");
        assert_eq!(upload(&app, &pg2, &base, b"tar bytes", Some(&sha(b"tar bytes"))).await.status(), 201);
        let report = json!({
            "files": [{"name": "base.tar", "size": 9, "sha256": sha(b"tar bytes")}],
            "wal_start_lsn": "0/3000028", "wal_end_lsn": "0/3000100", "timeline": 1,
        });
        let path = format!("/api/v1/agents/pg2/backups/{id}/report");
        let res = app.as_token(&pg2, Method::POST, &path).json(&report).send().await.expect("report");
        assert_eq!(res.status(), 200);
        let topology = app.get_json("/api/v1/topology").await;
        let nodes = app.get_json("/api/v1/nodes").await;

        // Bad input makes no node and files nothing.
        let restore = |body: Value| app.post("/api/v1/db/restore", body);
        assert_error(restore(json!({"to": "r1", "provider": "local"})).await, 422, "unprocessable_entity").await;
        assert_error(restore(json!({"to": "r1", "new_node": true, "provider": "virtualbox"})).await, 422, "provider_not_configured").await;
        assert_error(restore(json!({"to": "R1", "new_node": true})).await, 422, "unprocessable_entity").await;
        assert_error(restore(json!({"to": "r1", "new_node": "yes"})).await, 422, "unprocessable_entity").await;
        assert_eq!(app.get_json("/api/v1/nodes").await, nodes);

        let res = restore(json!({"to": "r1", "new_node": true})).await;
        assert_eq!(res.status(), 202);
        let accepted: Value = res.json().await.expect("json");
        assert_eq!(accepted["node"], "restore1", "{accepted}");
        assert_eq!(accepted["port"], 5432, "{accepted}");
        assert_eq!(accepted["backup_id"], id);
        let node = app.get_json("/api/v1/nodes/restore1").await;
        assert_eq!(node["role"], "restore", "{node}");
        assert_eq!(node["state"], "provisioning", "{node}");
        // Every node's orders (Consul, firewall), then the restore: no
        // PostgreSQL of the cluster, nothing on the other nodes.
        let orders = app.get_json("/api/v1/nodes/restore1/orders").await;
        let kinds: Vec<&str> = orders.as_array().expect("orders").iter().filter_map(|o| o["payload"]["kind"].as_str()).collect();
        assert_eq!(kinds.len(), 3, "{orders}");
        assert!(kinds.contains(&"consul") && kinds.contains(&"firewall"), "{kinds:?}");
        assert_eq!(kinds.last(), Some(&"restore"), "{kinds:?}");
        let restore_order = &orders[2]["payload"];
        assert_eq!((restore_order["name"].as_str(), restore_order["port"].as_i64()), (Some("r1"), Some(5432)));
        assert_eq!(app.get_json("/api/v1/topology").await, topology, "the topology does not count it");
        let events = app.event_kinds().await;
        assert!(events.contains(&"node.created restore1".to_string()), "{events:?}");
        assert!(events.contains(&"db.restore_requested restore1".to_string()), "{events:?}");

        // Another gets a node of its own, at another address.
        let res = restore(json!({"to": "r2", "new_node": true})).await;
        assert_eq!(res.status(), 202);
        let second = app.get_json("/api/v1/nodes/restore2").await;
        assert_ne!(second["address"], node["address"]);

        // Removing one leaves the topology as it was.
        let res = app.request(Method::DELETE, "/api/v1/nodes/restore1").send().await.expect("delete");
        assert!(res.status().is_success(), "{}", res.status());
        assert_eq!(app.get_json("/api/v1/topology").await, topology);
        let names: Vec<Value> = app.get_json("/api/v1/nodes").await.as_array().expect("nodes").iter().map(|n| n["name"].clone()).collect();
        assert!(!names.contains(&json!("restore1")) && names.contains(&json!("restore2")), "{names:?}");
    }

    async fn a_backup_schedule_that_does_not_parse_is_refused(app) {
        let res = app
            .put(
                "/api/v1/topology",
                json!({"web": 0, "db": 0, "lb_policy": "round_robin", "replication": "async",
                       "backup": {"schedule": "3 am", "keep": 7}}),
            )
            .await;
        let body = assert_error(res, 422, "unprocessable_entity").await;
        assert!(body["message"].as_str().is_some_and(|m| m.contains("HH:MM")), "{body}");
        let topology = app.get_json("/api/v1/topology").await;
        assert!(topology.get("backup").is_none(), "{topology}");
        let res = app
            .put(
                "/api/v1/topology",
                json!({"web": 0, "db": 0, "lb_policy": "round_robin", "replication": "async",
                       "backup": {"schedule": "03:00", "keep": 7}}),
            )
            .await;
        assert_eq!(res.status(), 200);
        let topology = app.get_json("/api/v1/topology").await;
        assert_eq!(topology["backup"], json!({"schedule": "03:00", "keep": 7}));
    }
}
