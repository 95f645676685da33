//! Host agents (`corral-agent host`): nodes of a provider whose machines a
//! host agent makes are refused while none is connected, and what host
//! agents send is checked like everything else.

use reqwest::Method;
use serde_json::json;

use crate::both_backends;
use crate::helpers::*;

both_backends! {
    with |c| c.providers = vec![corral_proto::Provider::Local, corral_proto::Provider::Virtualbox];

    async fn a_virtualbox_node_without_a_host_agent_is_refused_and_nothing_is_made(app) {
        let before = app.node_names().await;
        let res = app.post("/api/v1/nodes", json!({"role": "web", "provider": "virtualbox"})).await;
        let body = assert_error(res, 409, "host_agent_missing").await;
        let message = body["message"].as_str().expect("message");
        assert!(message.contains("no host agent for the virtualbox provider is connected"), "{message}");
        assert!(message.contains("corral-agent host --provider virtualbox"), "{message}");
        assert_eq!(app.node_names().await, before);
        assert_eq!(app.get_json("/api/v1/topology").await["web"], 0);
    }

    async fn a_polling_host_agent_lets_virtualbox_nodes_be_added(app) {
        // On PostgreSQL a server answers host polls once it holds the leader
        // lock, moments after it starts; until then 503, as a host agent
        // given several servers expects from one that does not lead.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let res = loop {
            let res = app.post("/api/v1/hosts/virtualbox/poll?wait=0", json!({"machines": []})).await;
            if res.status() != 503 || std::time::Instant::now() > deadline {
                break res;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<serde_json::Value>().await.expect("json"), json!({"orders": []}));
        let res = app.post("/api/v1/nodes", json!({"role": "web", "provider": "virtualbox"})).await;
        assert_eq!(res.status(), 201);
        let node: serde_json::Value = res.json().await.expect("json");
        assert_eq!(node["provider"], "virtualbox");
        assert_eq!(node["state"], "provisioning");
    }

    async fn host_agent_calls_refuse_bad_input_and_change_nothing(app) {
        // Not a provider host agents serve here, or no provider at all.
        let res = app.post("/api/v1/hosts/lxc/poll", json!({"machines": []})).await;
        assert_error(res, 422, "provider_not_configured").await;
        let res = app.post("/api/v1/hosts/nope/poll", json!({"machines": []})).await;
        assert_eq!(res.status(), 400);
        // A machine name off the scheme, an unknown field.
        let res = app.post("/api/v1/hosts/virtualbox/poll", json!({"machines": [{"node": "../x", "status": "running"}]})).await;
        assert_eq!(res.status(), 422);
        let res = app.post("/api/v1/hosts/virtualbox/poll", json!({"machines": [], "extra": 1})).await;
        assert_eq!(res.status(), 422);
        // None of those counted as a host agent.
        let res = app.post("/api/v1/nodes", json!({"role": "web", "provider": "virtualbox"})).await;
        assert_error(res, 409, "host_agent_missing").await;
        // An answer to an order nobody filed.
        let res = app.post("/api/v1/hosts/virtualbox/orders/42/result", json!({"ok": true, "message": "", "machines": []})).await;
        assert_eq!(res.status(), 404);
        // A node's agent token is no host agent's.
        let nginx1 = app.add_node("web").await;
        let token = app.enroll(nginx1["name"].as_str().expect("name")).await;
        let res = app
            .as_token(&token, Method::POST, "/api/v1/hosts/virtualbox/poll")
            .json(&json!({"machines": []}))
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 403);
    }
}
