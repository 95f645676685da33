//! The cluster at a glance, drawn as its topology: the admin node, the
//! load balancers with their webapps, and the primary streaming to its
//! standbys. Nodes added here show their progress step by step.

use corral_proto::{CreateNode, MetricName, Node, NodeState, ReplicationRole, Role, ScalableRole};
use yew::prelude::*;

use super::backup_panel::BackupPanel;
use super::console::use_ctx;
use super::metric_chart::{MetricChart, WINDOW_SECS, WindowPicker};
use super::node_card::NodeCard;
use super::switchover_button::SwitchoverButton;
use super::tracked_progress::TrackedProgress;
use crate::state::Action;
use crate::time::now_ms;

/// Is this db node the primary (or, before any report, the one that will
/// bootstrap)?
fn replication_role(node: &Node) -> Option<ReplicationRole> {
    node.observed.as_ref()?.replication.as_ref().map(|r| r.role)
}

/// A standby that may be offered "Make primary": streaming, not leaving.
/// The server checks the rest (a live primary, the lag) and says why not.
pub fn can_switch_over(node: &Node) -> bool {
    node.role == Role::Db
        && node.state != NodeState::Draining
        && replication_role(node) == Some(ReplicationRole::Replica)
}

#[component]
pub fn Overview() -> Html {
    let ctx = use_ctx();
    let state = &ctx.state;
    let now = now_ms();
    let adding = use_state(|| None::<ScalableRole>);
    let window = use_state(|| WINDOW_SECS);
    let pick_window = {
        let window = window.clone();
        Callback::from(move |secs| window.set(secs))
    };

    let add = |role: ScalableRole| {
        let (ctx, adding) = (ctx.clone(), adding.clone());
        Callback::from(move |_: MouseEvent| {
            adding.set(Some(role));
            let (ctx, adding) = (ctx.clone(), adding.clone());
            wasm_bindgen_futures::spawn_local(async move {
                let spec = CreateNode {
                    role,
                    provider: None,
                };
                match ctx.client.add_node(&spec).await {
                    Ok(node) => ctx.state.dispatch(Action::NodeAdded(node)),
                    Err(e) => ctx.fail(e),
                }
                adding.set(None);
            });
        })
    };

    let of_role = |role: Role| -> Vec<&Node> {
        let mut nodes: Vec<&Node> = state.nodes.iter().filter(|n| n.role == role).collect();
        nodes.sort_by_key(|n| {
            Role::parse_node_name(&n.name)
                .map_or((u32::MAX, n.name.clone()), |(_, i)| (i, String::new()))
        });
        nodes
    };
    let adm = of_role(Role::Adm);
    let web = of_role(Role::Web);
    let db = of_role(Role::Db);
    let restores = of_role(Role::Restore);
    // The primary is who reports it; before any report, the first db node.
    let primary = db
        .iter()
        .find(|n| replication_role(n) == Some(ReplicationRole::Primary))
        .or(db.first())
        .map(|n| n.name.clone());

    let card = |node: &Node, label: Option<&'static str>, switchover: bool| {
        let progress = state.added.contains(&node.name).then(|| {
            html! { <TrackedProgress name={node.name.clone()} /> }
        });
        html! {
            <NodeCard key={node.name.clone()} node={node.clone()} now_ms={now}
                      label={label.map(AttrValue::from)}>
                { for progress }
                if switchover {
                    <SwitchoverButton name={node.name.clone()} />
                }
            </NodeCard>
        }
    };
    let empty = |what: &str| html! { <p class="empty">{ format!("No {what} yet.") }</p> };

    let consul_ui = adm.first().map(|n| {
        format!(
            "http://{}:{}/ui",
            n.address,
            corral_proto::ports::CONSUL_HTTP
        )
    });
    let busy = adding.is_some();
    // Failovers and switchovers, marked on the cluster's charts.
    let failovers: Vec<(i64, AttrValue)> = state
        .events
        .iter()
        .filter(|e| e.kind == "db.promoted")
        .map(|e| (e.at.timestamp(), AttrValue::from(e.message.clone())))
        .collect();

    html! {
        <section class="page overview" aria-labelledby="overview-title">
            <div class="toolbar">
                <h1 id="overview-title">{ "Cluster" }</h1>
                <div class="actions">
                    <button type="button" class="primary" onclick={add(ScalableRole::Web)} disabled={busy}>
                        { if *adding == Some(ScalableRole::Web) { "Adding webserver…" } else { "Add webserver" } }
                    </button>
                    <button type="button" class="primary" onclick={add(ScalableRole::Db)} disabled={busy}>
                        { if *adding == Some(ScalableRole::Db) { "Adding replica…" } else { "Add database replica" } }
                    </button>
                </div>
            </div>
            <ul class="links" aria-label="Cluster entry points">
                { for web.iter().map(|n| html! {
                    <li key={n.name.clone()}>
                        <a href={format!("http://{}/", n.address)} target="_blank" rel="noopener">
                            { format!("TodoMVC via {}", n.name) }
                        </a>
                    </li>
                }) }
                if let Some(url) = consul_ui {
                    <li><a href={url} target="_blank" rel="noopener">{ "Consul UI" }</a></li>
                }
            </ul>
            if !state.nodes_loaded {
                <p class="empty" role="status">{ "Loading nodes…" }</p>
            } else {
                <div class="topology">
                    <section class="tier tier-adm" aria-labelledby="tier-adm">
                        <h2 id="tier-adm">{ "Control plane" }</h2>
                        <div class="cards">
                            { for adm.iter().map(|n| card(n, Some("corral + Consul UI"), false)) }
                        </div>
                    </section>
                    <div class="flow" aria-hidden="true">{ "▼ work orders · Consul" }</div>
                    <section class="tier tier-web" aria-labelledby="tier-web">
                        <h2 id="tier-web">{ "Load balancers and webapps" }</h2>
                        <div class="cards">
                            if web.is_empty() { { empty("web nodes") } }
                            { for web.iter().map(|n| card(n, Some("nginx + todomvc"), false)) }
                        </div>
                    </section>
                    <div class="flow" aria-hidden="true">{ "▼ SQL: writes to the primary, reads from standbys" }</div>
                    <section class="tier tier-db" aria-labelledby="tier-db">
                        <h2 id="tier-db">{ "PostgreSQL" }</h2>
                        if db.is_empty() { { empty("db nodes") } }
                        <div class="replication">
                            <div class="cards primary">
                                { for db.iter().filter(|n| Some(&n.name) == primary.as_ref()).map(|n| card(n, Some("primary"), false)) }
                            </div>
                            if db.len() > 1 {
                                <div class="stream-arrow" aria-hidden="true">{ "WAL" }</div>
                            }
                            <div class="cards standbys">
                                { for db.iter().filter(|n| Some(&n.name) != primary.as_ref()).map(|n| {
                                    let label = match replication_role(n) {
                                        Some(ReplicationRole::Fenced) => "fenced",
                                        Some(ReplicationRole::Primary) => "primary",
                                        _ => "standby",
                                    };
                                    card(n, Some(label), can_switch_over(n))
                                }) }
                            </div>
                        </div>
                        if !restores.is_empty() {
                            <section class="restores" aria-labelledby="tier-restores">
                                <h3 id="tier-restores">{ "Restored copies (outside replication)" }</h3>
                                <div class="cards">
                                    { for restores.iter().map(|n| card(n, Some("restored from a backup"), false)) }
                                </div>
                            </section>
                        }
                        if !db.is_empty() {
                            <BackupPanel />
                        }
                    </section>
                </div>
                <section class="cluster-metrics" aria-labelledby="cluster-metrics">
                    <h2 id="cluster-metrics">{ "Cluster metrics (dashed red: failovers)" }</h2>
                    <WindowPicker value={*window} on_change={pick_window} />
                    <div class="charts">
                        <MetricChart name={MetricName::NginxRequests} total=true
                                     title="Requests/s through the load balancers"
                                     marks={failovers.clone()} window={*window} />
                        <MetricChart name={MetricName::PgLagBytes} title="Replication lag"
                                     marks={failovers.clone()} window={*window} />
                        <MetricChart name={MetricName::WebappLatencyP95} title="Webapp latency, p95"
                                     marks={failovers} window={*window} />
                    </div>
                </section>
            }
        </section>
    }
}
