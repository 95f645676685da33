//! The steps a new node goes through, from what the API reports: created,
//! agent enrolled, orders applied, healthy, and (web nodes) in the load
//! balancers. Pure, so the rules are unit-tested without a browser.

use std::collections::BTreeMap;

use corral_proto::{
    Node, NodeHealth, NodeState, Order, OrderKind, OrderStatus, Role, ServiceState, ServiceStatus,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    Done,
    /// The step being waited for now.
    Current,
    Waiting,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub label: &'static str,
    pub state: StepState,
}

/// Is a service up and passing its checks? The agent reports Consul's
/// verdict in `detail` when a check is not passing.
pub fn passing(service: &ServiceStatus) -> bool {
    let detail = service.detail.as_deref().unwrap_or("").to_ascii_lowercase();
    service.state == ServiceState::Running
        && !detail.contains("critical")
        && !detail.contains("warning")
}

pub fn service<'a>(node: &'a Node, name: &str) -> Option<&'a ServiceStatus> {
    node.observed
        .as_ref()?
        .services
        .iter()
        .find(|s| s.name == name)
}

/// The newest order of each kind (what the node is meant to be now).
fn current_orders(orders: &[Order]) -> Vec<&Order> {
    let mut newest: BTreeMap<OrderKind, &Order> = BTreeMap::new();
    for order in orders {
        let kind = order.payload.kind();
        if newest.get(&kind).is_none_or(|o| o.seq < order.seq) {
            newest.insert(kind, order);
        }
    }
    newest.into_values().collect()
}

/// Where `node` is on its way into service. `orders` is `None` until they
/// have been fetched.
pub fn steps(node: &Node, orders: Option<&[Order]>) -> Vec<Step> {
    let enrolled = node.state != NodeState::Provisioning;
    let orders_outcome = match orders {
        None => None,
        Some(orders) => {
            let current = current_orders(orders);
            if let Some(failed) = current.iter().find(|o| o.status == OrderStatus::Failed) {
                Some(Err(format!(
                    "order {} ({}) failed: {}",
                    failed.seq,
                    failed.payload.kind(),
                    failed.result.as_deref().unwrap_or("no reason given")
                )))
            } else if !current.is_empty()
                && current.iter().all(|o| o.status == OrderStatus::Applied)
            {
                Some(Ok(()))
            } else {
                None
            }
        }
    };
    let services: &[ServiceStatus] = node
        .observed
        .as_ref()
        .map(|o| o.services.as_slice())
        .unwrap_or(&[]);
    let healthy = if let Some(bad) = services.iter().find(|s| s.state == ServiceState::Failed) {
        Some(Err(format!(
            "{} failed{}",
            bad.name,
            bad.detail
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        )))
    } else if node.health == NodeHealth::Healthy
        && !services.is_empty()
        && services.iter().all(|s| s.state == ServiceState::Running)
    {
        Some(Ok(()))
    } else {
        None
    };
    let mut raw: Vec<(&'static str, Option<Result<(), String>>)> = vec![
        ("created", Some(Ok(()))),
        ("agent enrolled", enrolled.then_some(Ok(()))),
        ("orders applied", orders_outcome),
        ("healthy", healthy),
    ];
    if node.role == Role::Web {
        // nginx routes to the webapps whose Consul check passes; the agent
        // reports the check's verdict in the service's detail.
        let in_lb = service(node, corral_proto::WEBAPP_SERVICE)
            .is_some_and(|s| {
                passing(s) && s.detail.as_deref().is_some_and(|d| d.contains("passing"))
            })
            .then_some(Ok(()));
        raw.push(("in the load balancers", in_lb));
    }
    // One step is awaited now: the first not done, unless one failed.
    let mut current_given = false;
    raw.into_iter()
        .map(|(label, outcome)| {
            let state = match outcome {
                Some(Ok(())) => StepState::Done,
                Some(Err(why)) => {
                    current_given = true;
                    StepState::Failed(why)
                }
                None if !current_given => {
                    current_given = true;
                    StepState::Current
                }
                None => StepState::Waiting,
            };
            Step { label, state }
        })
        .collect()
}

pub fn all_done(steps: &[Step]) -> bool {
    steps.iter().all(|s| s.state == StepState::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use corral_proto::{ObservedState, Provider, WebappSpec, WorkOrder};

    /// Any fixed time will do (chrono's clock is not built for the UI).
    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_000_000, 0).expect("a valid time")
    }

    fn node(state: NodeState, services: &[(&str, ServiceState)]) -> Node {
        Node {
            name: "nginx3".into(),
            role: Role::Web,
            address: "127.0.11.23".into(),
            provider: Provider::Local,
            state,
            health: if services.is_empty() {
                NodeHealth::Unknown
            } else {
                NodeHealth::Healthy
            },
            last_seq: 1,
            last_heartbeat: None,
            observed: (!services.is_empty()).then(|| ObservedState {
                agent_version: "0.1.0".into(),
                applied_seq: 1,
                services: services
                    .iter()
                    .map(|(name, state)| ServiceStatus {
                        name: name.to_string(),
                        state: *state,
                        pid: None,
                        restarts: 0,
                        version: None,
                        detail: (*name == "todomvc" && *state == ServiceState::Running)
                            .then(|| "consul check passing: HTTP GET /healthz: 200 OK".into()),
                    })
                    .collect(),
                replication: None,
                metrics: None,
            }),
            created_at: at(),
        }
    }

    fn order(seq: i64, status: OrderStatus, result: Option<&str>) -> Order {
        Order {
            node: "nginx3".into(),
            seq,
            payload: WorkOrder::Webapp(WebappSpec {
                port: 8080,
                database: "todo".into(),
                user: "todo".into(),
                password: "x".into(),
                consul_token: None,
                address_v6: None,
            }),
            status,
            result: result.map(String::from),
            created_at: at(),
            updated_at: at(),
        }
    }

    fn states(steps: &[Step]) -> Vec<StepState> {
        steps.iter().map(|s| s.state.clone()).collect()
    }

    #[test]
    fn a_new_node_waits_for_its_agent() {
        let steps = steps(&node(NodeState::Provisioning, &[]), None);
        use StepState::*;
        assert_eq!(states(&steps), [Done, Current, Waiting, Waiting, Waiting]);
    }

    #[test]
    fn a_failed_order_shows_its_result_text() {
        let orders = [order(1, OrderStatus::Failed, Some("nginx: bind failed"))];
        let steps = steps(&node(NodeState::Active, &[]), Some(&orders));
        assert_eq!(
            steps[2].state,
            StepState::Failed("order 1 (webapp) failed: nginx: bind failed".into())
        );
        assert_eq!(steps[3].state, StepState::Waiting, "nothing is awaited");
    }

    #[test]
    fn a_newer_order_of_the_same_kind_supersedes_a_failure() {
        let orders = [
            order(1, OrderStatus::Failed, Some("x")),
            order(2, OrderStatus::Applied, None),
        ];
        let n = node(
            NodeState::Active,
            &[
                ("nginx", ServiceState::Running),
                ("todomvc", ServiceState::Running),
            ],
        );
        assert!(all_done(&steps(&n, Some(&orders))));
    }

    #[test]
    fn a_running_webapp_without_a_passing_check_is_not_in_the_load_balancers() {
        let orders = [order(1, OrderStatus::Applied, None)];
        let mut n = node(NodeState::Active, &[("todomvc", ServiceState::Running)]);
        if let Some(o) = n.observed.as_mut() {
            o.services[0].detail = Some("consul check critical: connection refused".into());
        }
        let s = steps(&n, Some(&orders));
        assert_eq!(s[3].state, StepState::Done);
        assert_eq!(s[4].state, StepState::Current);
    }

    #[test]
    fn a_web_node_is_in_the_load_balancers_once_todomvc_passes() {
        let orders = [order(1, OrderStatus::Applied, None)];
        let n = node(NodeState::Active, &[("todomvc", ServiceState::Starting)]);
        let s = steps(&n, Some(&orders));
        assert_eq!(s[3].state, StepState::Current);
        assert_eq!(s[4].state, StepState::Waiting);
    }
}
