use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

both_backends! {
    async fn a_new_cluster_has_only_the_admin_node(app) {
        assert_eq!(app.node_names().await, vec!["adm1"]);
        let t = app.get_json("/api/v1/topology").await;
        assert_eq!((t["web"].as_u64(), t["db"].as_u64()), (Some(0), Some(0)));
        assert_eq!(t["lb_policy"], "round_robin");
        let adm1 = app.get_json("/api/v1/nodes/adm1").await;
        assert_eq!(adm1["address"], "127.0.11.5");
        assert_eq!(adm1["state"], "provisioning");
    }

    async fn seed_topology_creates_the_seed_nodes_at_seed_addresses(app) {
        let change = app.set_topology(2, 2, "round_robin").await;
        assert_eq!(change["created"], json!(["pg1", "pg2", "nginx1", "nginx2"]));
        let nodes = app.get_json("/api/v1/nodes").await;
        let addrs: Vec<(String, String)> = nodes
            .as_array()
            .expect("array")
            .iter()
            .map(|n| (n["name"].as_str().expect("n").into(), n["address"].as_str().expect("a").into()))
            .collect();
        for (name, addr) in [("adm1", "127.0.11.5"), ("pg1", "127.0.11.11"), ("pg2", "127.0.11.12"),
                             ("nginx1", "127.0.11.21"), ("nginx2", "127.0.11.22")] {
            assert!(addrs.contains(&(name.to_string(), addr.to_string())), "{name} at {addr} in {addrs:?}");
        }
        // Every node has its orders waiting: web 4 kinds, db 3, adm 2
        // (each a firewall first).
        let orders = app.get_json("/api/v1/nodes/nginx2/orders").await;
        let kinds: Vec<_> = orders.as_array().expect("array").iter()
            .map(|o| o["payload"]["kind"].as_str().expect("kind").to_string()).collect();
        assert_eq!(kinds, vec!["firewall", "consul", "webapp", "load_balancer"]);
        assert!(orders.as_array().expect("array").iter().all(|o| o["status"] == "pending"));
        let pg1 = app.get_json("/api/v1/nodes/pg1/orders").await;
        assert_eq!(pg1[2]["payload"]["bootstrap"], true);
        let pg2 = app.get_json("/api/v1/nodes/pg2/orders").await;
        assert_eq!(pg2[2]["payload"]["bootstrap"], false);
    }

    async fn the_same_topology_twice_files_nothing_the_second_time(app) {
        let first = app.set_topology(2, 1, "round_robin").await;
        assert!(first["orders_filed"].as_u64().expect("n") > 0);
        let events_before = app.events().await.len();
        let second = app.set_topology(2, 1, "round_robin").await;
        assert_eq!(second["orders_filed"], 0);
        assert_eq!(second["created"], json!([]));
        assert_eq!(app.events().await.len(), events_before, "no-op change logged nothing");
    }

    async fn changing_the_policy_files_one_order_per_web_node(app) {
        app.set_topology(3, 0, "round_robin").await;
        let change = app.set_topology(3, 0, "uri_hash").await;
        assert_eq!(change["orders_filed"], 3);
        for n in ["nginx1", "nginx2", "nginx3"] {
            let orders = app.get_json(&format!("/api/v1/nodes/{n}/orders?after=4")).await;
            assert_eq!(orders.as_array().map(Vec::len), Some(1), "{n}");
            assert_eq!(orders[0]["payload"]["policy"], "uri_hash");
            assert_eq!(orders[0]["seq"], 5);
        }
    }

    async fn shrinking_the_topology_drains_the_highest_nodes(app) {
        app.set_topology(3, 0, "round_robin").await;
        app.enroll("nginx2").await;
        app.enroll("nginx3").await;
        let change = app.set_topology(1, 0, "round_robin").await;
        assert_eq!(change["draining"], json!(["nginx2", "nginx3"]));
        let n3 = app.get_json("/api/v1/nodes/nginx3").await;
        assert_eq!(n3["state"], "draining");
        let orders = app.get_json("/api/v1/nodes/nginx3/orders").await;
        let last = orders.as_array().and_then(|o| o.last()).cloned().expect("orders");
        assert_eq!(last["payload"]["kind"], "drain");
    }

    async fn shrinking_removes_nodes_that_never_enrolled_at_once(app) {
        app.set_topology(3, 0, "round_robin").await;
        app.enroll("nginx2").await;
        let change = app.set_topology(1, 0, "round_robin").await;
        assert_eq!(change["draining"], json!(["nginx2"]));
        assert_eq!(app.node_names().await, vec!["adm1", "nginx1", "nginx2"]);
        assert!(app.event_kinds().await.contains(&"node.removed nginx3".to_string()));
    }

    async fn strict_replication_refiles_the_postgres_orders_like_sync(app) {
        app.set_topology(1, 2, "round_robin").await;
        for mode in ["sync", "strict", "async"] {
            let res = app
                .put("/api/v1/topology", json!({"web": 1, "db": 2, "lb_policy": "round_robin", "replication": mode}))
                .await;
            assert_eq!(res.status(), 200, "{mode}");
            let change: serde_json::Value = res.json().await.expect("json");
            assert_eq!(change["topology"]["replication"], mode);
            assert_eq!(change["orders_filed"], 2, "{mode}: one postgres order per db node");
            for n in ["pg1", "pg2"] {
                let orders = app.get_json(&format!("/api/v1/nodes/{n}/orders")).await;
                let last = orders.as_array().and_then(|o| o.last()).cloned().expect("orders");
                assert_eq!(last["payload"]["kind"], "postgres");
                assert_eq!(last["payload"]["replication"], mode, "{n}");
            }
        }
        let res = app
            .put("/api/v1/topology", json!({"web": 1, "db": 1, "lb_policy": "round_robin", "replication": "strict"}))
            .await;
        assert_error(res, 422, "unprocessable_entity").await;
    }

    async fn sync_replication_without_a_standby_is_refused_and_changes_nothing(app) {
        let res = app
            .put("/api/v1/topology", json!({"web": 1, "db": 1, "lb_policy": "round_robin", "replication": "sync"}))
            .await;
        let body = assert_error(res, 422, "unprocessable_entity").await;
        assert!(body["message"].as_str().expect("m").contains("at least 2 db"));
        assert_eq!(app.node_names().await, vec!["adm1"]);
        assert_eq!(app.get_json("/api/v1/topology").await["web"], 0);
    }

    async fn too_many_nodes_are_refused(app) {
        let res = app
            .put("/api/v1/topology", json!({"web": 20001, "db": 0, "lb_policy": "round_robin", "replication": "async"}))
            .await;
        assert_error(res, 422, "unprocessable_entity").await;
        assert_eq!(app.node_names().await, vec!["adm1"]);
    }
}

#[tokio::test]
async fn a_topology_beyond_the_address_pool_is_refused_and_changes_nothing() {
    let app = spawn_with(Backend::Sqlite, |c| {
        c.network = "127.0.11.0/27".parse().expect("net")
    })
    .await;
    // /27: adm1, 9 seed addresses per role and one pool address (.30).
    let res = app
        .put(
            "/api/v1/topology",
            json!({"web": 11, "db": 0, "lb_policy": "round_robin", "replication": "async"}),
        )
        .await;
    let body = assert_error(res, 409, "address_pool_exhausted").await;
    assert!(
        body["message"]
            .as_str()
            .expect("m")
            .contains("127.0.11.0/27")
    );
    assert_eq!(app.node_names().await, vec!["adm1"]);
    assert_eq!(app.get_json("/api/v1/topology").await["web"], 0);
    // Ten fit.
    app.set_topology(10, 0, "round_robin").await;
    assert_eq!(
        app.get_json("/api/v1/nodes/nginx10").await["address"],
        "127.0.11.30"
    );
}

#[tokio::test]
async fn state_survives_a_restart_and_the_admin_token_is_not_shown_again() {
    let dir = tempfile::tempdir().expect("dir");
    let config = || {
        let mut config = corral_server::Config::new(dir.path());
        config.listen = "127.0.0.1:0".into();
        config.workers = Some(1);
        config
    };
    let first = corral_server::Application::build(config())
        .await
        .expect("first start");
    assert!(
        first.new_admin_token().is_some(),
        "the first start shows the admin token"
    );
    drop(first);
    let app = start(config(), None).await;
    assert!(app.cluster.nodes().await.is_ok());
    app.set_topology(2, 2, "least_conn").await;
    let mut before = app.node_names().await;
    drop(app);

    let again = corral_server::Application::build(config())
        .await
        .expect("restart");
    assert!(
        again.new_admin_token().is_none(),
        "the admin token is shown only at first start"
    );
    let mut after: Vec<_> = again
        .cluster()
        .nodes()
        .await
        .expect("nodes")
        .iter()
        .map(|n| n.name.clone())
        .collect();
    before.sort();
    after.sort();
    assert_eq!(after, before);
    let topology = again.cluster().topology().await.expect("topology");
    assert_eq!(topology.lb_policy.as_str(), "least_conn");
    assert_eq!((topology.web, topology.db), (2, 2));
}
