//! One node in the topology picture: address, lifecycle state, health,
//! last heartbeat, its services and replication as its agent reported them.

use corral_proto::{Node, NodeHealth, ReplicationRole, ReplicationStatus, Role};
use yew::prelude::*;
use yew_router::prelude::*;

use crate::progress::passing;
use crate::route::Route;
use crate::time::ago;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub node: Node,
    pub now_ms: i64,
    /// What the node is in the picture (`primary`, `standby`, ...).
    #[prop_or_default]
    pub label: Option<AttrValue>,
    /// Show services' details in full (the node's own page) rather than
    /// their first words (the overview).
    #[prop_or_default]
    pub full_details: bool,
    /// Extra lines under the node (its progress).
    #[prop_or_default]
    pub children: Html,
}

/// The first words of a service detail; Consul's check output can run to
/// a screenful of JSON.
fn brief(detail: &str) -> String {
    const MAX: usize = 40;
    match detail.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &detail[..cut]),
        None => detail.to_string(),
    }
}

pub fn health_text(health: NodeHealth) -> &'static str {
    match health {
        NodeHealth::Unknown => "no heartbeat yet",
        NodeHealth::Healthy => "healthy",
        NodeHealth::Stale => "stale",
    }
}

pub fn role_text(role: ReplicationRole) -> &'static str {
    match role {
        ReplicationRole::Primary => "primary",
        ReplicationRole::Replica => "replica",
        ReplicationRole::Fenced => "fenced",
    }
}

/// `12 KiB, 40 ms` with what is known of the lag.
fn lag_text(r: &ReplicationStatus) -> String {
    let bytes = r.lag_bytes.map(|b| match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{} KiB", b / 1024),
        _ => format!("{} MiB", b / 1_048_576),
    });
    let ms = r.lag_ms.map(|ms| format!("{ms} ms"));
    [bytes, ms]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
}

#[component]
pub fn NodeCard(props: &Props) -> Html {
    let node = &props.node;
    let observed = node.observed.as_ref();
    let services = observed.map(|o| o.services.clone()).unwrap_or_default();
    let heartbeat = node
        .last_heartbeat
        .map_or_else(|| "never".to_string(), |at| ago(at, props.now_ms));
    let health_class = format!("health-{}", health_text(node.health).replace(' ', "-"));
    html! {
        <article class={classes!("node", format!("role-{}", node.role), format!("state-{}", node.state), health_class)}
                 data-node={node.name.clone()} aria-labelledby={format!("node-{}", node.name)}>
            <header>
                <h3 id={format!("node-{}", node.name)}>
                    <Link<Route> to={Route::Node { name: node.name.clone() }}>{ &node.name }</Link<Route>>
                </h3>
                if let Some(label) = &props.label {
                    <span class="label">{ label }</span>
                }
            </header>
            <dl>
                <dt>{ "address" }</dt><dd class="address">{ &node.address }</dd>
                <dt>{ "state" }</dt><dd class="lifecycle">{ node.state.as_str() }</dd>
                <dt>{ "health" }</dt><dd class="health">{ health_text(node.health) }</dd>
                <dt>{ "heartbeat" }</dt><dd class="heartbeat">{ heartbeat }</dd>
                if let Some(r) = observed.and_then(|o| o.replication.as_ref()) {
                    <dt>{ "replication" }</dt>
                    <dd class="replication-role">
                        { role_text(r.role) }
                        if let Some(state) = &r.state { { format!(", {state}") } }
                    </dd>
                    if r.lag_bytes.is_some() || r.lag_ms.is_some() {
                        <dt>{ "lag" }</dt>
                        <dd class="replication-lag">{ lag_text(r) }</dd>
                    }
                    if let Some(timeline) = r.timeline {
                        <dt>{ "timeline" }</dt>
                        <dd class="replication-timeline">{ timeline }</dd>
                    }
                    if let Some(standby) = &r.sync_standby {
                        <dt>{ "sync standby" }</dt>
                        <dd class="sync-standby">{ standby }</dd>
                    }
                    if let Some(leader) = &r.leader {
                        <dt>{ "leader" }</dt>
                        <dd class="leader">{ leader }</dd>
                    }
                }
            </dl>
            if observed.and_then(|o| o.replication.as_ref()).is_some_and(|r| r.degraded) {
                <p class="badge degraded" role="status">
                    { "degraded: commits do not wait for a standby" }
                </p>
            }
            if !services.is_empty() {
                <ul class="services" aria-label={format!("services of {}", node.name)}>
                    { for services.iter().map(|s| {
                        let ok = passing(s);
                        html! {
                            <li key={s.name.clone()} data-service={s.name.clone()}
                                class={classes!(format!("svc-{:?}", s.state).to_lowercase(), ok.then_some("passing"))}>
                                <span class="svc-name">{ &s.name }</span>
                                <span class="svc-state">{ format!("{:?}", s.state).to_lowercase() }</span>
                                if let Some(d) = &s.detail {
                                    <span class="svc-detail" title={d.clone()}>
                                        { if props.full_details { d.clone() } else { brief(d) } }
                                    </span>
                                }
                            </li>
                        }
                    }) }
                </ul>
            }
            if node.role == Role::Web {
                <a class="open" href={format!("http://{}/", node.address)} target="_blank" rel="noopener">
                    { "Open TodoMVC" }
                </a>
            }
            { props.children.clone() }
        </article>
    }
}
