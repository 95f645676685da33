use std::collections::HashSet;

use reqwest::Method;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

both_backends! {
    async fn adding_a_web_node_allocates_the_next_name_and_address_and_files_its_orders(app) {
        let res = app.post("/api/v1/nodes", json!({"role": "web"})).await;
        assert_eq!(res.status(), 201);
        assert_eq!(
            res.headers().get("location").and_then(|v| v.to_str().ok()),
            Some("/api/v1/nodes/nginx1")
        );
        let node: serde_json::Value = res.json().await.expect("json");
        assert_eq!(node["name"], "nginx1");
        assert_eq!(node["address"], "127.0.11.21");
        assert_eq!(node["state"], "provisioning");
        assert_eq!(node["health"], "unknown");
        assert_eq!(node["last_seq"], 4);
        let orders = app.get_json("/api/v1/nodes/nginx1/orders").await;
        let seqs: Vec<_> = orders.as_array().expect("array").iter().map(|o| o["seq"].as_i64()).collect();
        assert_eq!(seqs, vec![Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(orders[0]["payload"]["kind"], "firewall");
        assert_eq!(orders[0]["payload"]["public_tcp"], json!([80]));
        assert_eq!(orders[3]["payload"], json!({"kind": "load_balancer", "port": 80, "service": "todomvc", "policy": "round_robin"}));
        let second = app.add_node("web").await;
        assert_eq!((second["name"].as_str(), second["address"].as_str()), (Some("nginx2"), Some("127.0.11.22")));
        assert_eq!(app.get_json("/api/v1/topology").await["web"], 2);
        let db = app.add_node("db").await;
        assert_eq!((db["name"].as_str(), db["address"].as_str()), (Some("pg1"), Some("127.0.11.11")));
        assert!(app.event_kinds().await.contains(&"node.created nginx2".to_string()));
    }

    async fn an_adm_node_cannot_be_added(app) {
        let res = app.post("/api/v1/nodes", json!({"role": "adm"})).await;
        assert_error(res, 422, "unprocessable_entity").await;
        assert_eq!(app.node_names().await, vec!["adm1"]);
    }

    async fn a_provider_the_server_does_not_run_is_refused_and_changes_nothing(app) {
        let events_before = app.event_kinds().await;
        let res = app.post("/api/v1/nodes", json!({"role": "db", "provider": "virtualbox"})).await;
        let body = assert_error(res, 422, "provider_not_configured").await;
        assert_eq!(
            body["message"],
            "provider virtualbox is not configured on this server (configured: local, manual)"
        );
        assert_eq!(app.node_names().await, vec!["adm1"]);
        assert_eq!(app.get_json("/api/v1/topology").await["db"], 0);
        assert_eq!(app.event_kinds().await, events_before);
    }

    async fn node_changes_are_signalled_but_other_changes_are_not(app) {
        let mut changes = app.cluster.subscribe_node_changes();
        changes.borrow_and_update();
        app.add_node("web").await;
        assert!(changes.has_changed().expect("open"), "a node was created");
        changes.borrow_and_update();
        app.set_topology(1, 0, "uri_hash").await;
        assert!(!changes.has_changed().expect("open"), "only orders were filed");
        let token = app.enroll("nginx1").await;
        assert!(changes.has_changed().expect("open"), "nginx1 became active");
        changes.borrow_and_update();
        assert_eq!(app.delete("/api/v1/nodes/nginx1").await.status(), 202);
        assert!(changes.has_changed().expect("open"), "nginx1 is draining");
        changes.borrow_and_update();
        let orders = app.get_json("/api/v1/nodes/nginx1/orders").await;
        let drain = orders.as_array().and_then(|o| o.last()).expect("the drain order");
        assert_eq!(drain["payload"]["kind"], "drain");
        let res = app
            .as_token(&token, Method::POST, &format!("/api/v1/agents/nginx1/orders/{}/result", drain["seq"]))
            .json(&json!({"outcome": "applied", "message": "drained"}))
            .send().await.expect("result");
        assert_eq!(res.status(), 200);
        assert!(changes.has_changed().expect("open"), "nginx1 was removed");
        assert_eq!(app.node_names().await, vec!["adm1"]);
    }

    async fn concurrent_adds_get_distinct_names_and_addresses(app) {
        let adds = (0..8).map(|_| app.post("/api/v1/nodes", json!({"role": "web"})));
        let results = futures_util::future::join_all(adds).await;
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for res in results {
            assert_eq!(res.status(), 201);
            let node: serde_json::Value = res.json().await.expect("json");
            names.insert(node["name"].as_str().expect("name").to_string());
            addrs.insert(node["address"].as_str().expect("address").to_string());
        }
        assert_eq!((names.len(), addrs.len()), (8, 8));
        assert_eq!(app.get_json("/api/v1/topology").await["web"], 8);
    }

    async fn removing_a_node_that_never_enrolled_removes_it_at_once(app) {
        app.add_node("web").await;
        app.add_node("web").await;
        let res = app.delete("/api/v1/nodes/nginx2").await;
        assert_eq!(res.status(), 204);
        assert_error(app.get("/api/v1/nodes/nginx2").await, 404, "not_found").await;
        assert_error(app.get("/api/v1/nodes/nginx2/orders").await, 404, "not_found").await;
        assert_eq!(app.get_json("/api/v1/topology").await["web"], 1);
        assert!(app.event_kinds().await.contains(&"node.removed nginx2".to_string()));
    }

    async fn removing_an_enrolled_node_drains_it_and_removes_it_once_drained(app) {
        app.add_node("web").await;
        let token = app.enroll("nginx1").await;
        let res = app.delete("/api/v1/nodes/nginx1").await;
        assert_eq!(res.status(), 202);
        let node: serde_json::Value = res.json().await.expect("json");
        assert_eq!(node["state"], "draining");
        assert_eq!(app.get_json("/api/v1/topology").await["web"], 0);
        // Asking again is harmless and changes nothing.
        assert_eq!(app.delete("/api/v1/nodes/nginx1").await.status(), 202);
        let poll: serde_json::Value = app
            .as_token(&token, Method::GET, "/api/v1/agents/nginx1/orders?after=4")
            .send().await.expect("poll").json().await.expect("json");
        assert_eq!(poll["orders"].as_array().map(Vec::len), Some(1));
        assert_eq!(poll["orders"][0]["payload"]["kind"], "drain");
        let seq = poll["orders"][0]["seq"].as_i64().expect("seq");
        // Still there until the agent says it drained.
        assert_eq!(app.get("/api/v1/nodes/nginx1").await.status(), 200);
        let res = app
            .as_token(&token, Method::POST, &format!("/api/v1/agents/nginx1/orders/{seq}/result"))
            .json(&json!({"outcome": "applied", "message": "stopped nginx and todomvc"}))
            .send().await.expect("result");
        assert_eq!(res.status(), 200);
        assert_error(app.get("/api/v1/nodes/nginx1").await, 404, "not_found").await;
        // The removed node's token is dead.
        let res = app.as_token(&token, Method::GET, "/api/v1/agents/nginx1/orders").send().await.expect("poll");
        assert_error(res, 401, "unauthorized").await;
        let kinds = app.event_kinds().await;
        for k in ["node.draining nginx1", "order.applied nginx1", "node.removed nginx1"] {
            assert!(kinds.contains(&k.to_string()), "{k} in {kinds:?}");
        }
    }

    async fn force_removes_a_draining_node_at_once(app) {
        app.add_node("db").await;
        app.enroll("pg1").await;
        assert_eq!(app.delete("/api/v1/nodes/pg1").await.status(), 202);
        assert_eq!(app.delete("/api/v1/nodes/pg1?force=true").await.status(), 204);
        assert_eq!(app.node_names().await, vec!["adm1"]);
        assert_eq!(app.get_json("/api/v1/topology").await["db"], 0);
    }

    async fn the_admin_node_cannot_be_removed(app) {
        let res = app.delete("/api/v1/nodes/adm1").await;
        assert_error(res, 409, "conflict").await;
        assert_eq!(app.node_names().await, vec!["adm1"]);
    }

    async fn unknown_nodes_are_404(app) {
        assert_error(app.get("/api/v1/nodes/nginx9").await, 404, "not_found").await;
        assert_error(app.delete("/api/v1/nodes/nginx9").await, 404, "not_found").await;
        assert_error(app.get("/api/v1/nodes/NOT_A_NAME").await, 404, "not_found").await;
    }

    async fn orders_list_pages_with_after_and_limit(app) {
        app.set_topology(1, 0, "round_robin").await;
        app.set_topology(1, 0, "least_conn").await;
        app.set_topology(1, 0, "uri_hash").await;
        let page = app.get_json("/api/v1/nodes/nginx1/orders?after=2&limit=2").await;
        let seqs: Vec<_> = page.as_array().expect("array").iter().map(|o| o["seq"].as_i64()).collect();
        assert_eq!(seqs, vec![Some(3), Some(4)]);
    }
}

mod providers {
    use super::*;

    both_backends! {
        with |c| c.providers = vec![corral_proto::Provider::Local, corral_proto::Provider::Lxc];

        async fn a_node_with_a_configured_provider_keeps_it(app) {
            let res = app.post("/api/v1/nodes", json!({"role": "db", "provider": "lxc"})).await;
            assert_eq!(res.status(), 201);
            let node: serde_json::Value = res.json().await.expect("json");
            assert_eq!(node["provider"], "lxc");
            assert_eq!(app.get_json("/api/v1/nodes/adm1").await["provider"], "local");
            // Agents installed by hand (`apt install corral-agent`) are
            // always welcome; a provider the server does not run is not.
            let res = app.post("/api/v1/nodes", json!({"role": "web", "provider": "manual"})).await;
            assert_eq!(res.status(), 201);
            let res = app.post("/api/v1/nodes", json!({"role": "web", "provider": "virtualbox"})).await;
            let body = assert_error(res, 422, "provider_not_configured").await;
            assert_eq!(
                body["message"],
                "provider virtualbox is not configured on this server (configured: local, lxc, manual)"
            );
        }
    }
}
