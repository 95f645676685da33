//! One node: its record, its progress, its work orders with their results,
//! its recent service logs, and removal (drain first, after confirmation).

use corral_proto::{MetricName, Node, Order, Role};
use yew::prelude::*;
use yew_router::prelude::*;

use super::console::use_ctx;
use super::log_tail::LogTail;
use super::metric_chart::{MetricChart, WINDOW_SECS, WindowPicker};
use super::node_card::NodeCard;
use super::order_table::OrderTable;
use super::overview::can_switch_over;
use super::progress_steps::ProgressSteps;
use super::switchover_button::SwitchoverButton;
use crate::api::Removal;
use crate::progress::steps;
use crate::route::Route;
use crate::state::Action;
use crate::time::now_ms;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub name: AttrValue,
}

/// What is known of the node.
#[derive(Clone, PartialEq)]
enum Loaded {
    Loading,
    Found(Box<Node>),
    Gone(String),
}

/// The charts a node of `role` shows: host and own processes for all, then
/// what its services do.
fn charts_of(role: Role) -> Vec<(MetricName, &'static str)> {
    let mut charts = vec![
        (MetricName::CpuHost, "Host CPU"),
        (MetricName::CpuNode, "CPU of the node's processes"),
        (MetricName::MemNode, "Memory of the node's processes"),
        (MetricName::NetRx, "Network received"),
    ];
    match role {
        Role::Web => charts.extend([
            (MetricName::NginxRequests, "nginx requests"),
            (MetricName::Nginx5xx, "nginx 5xx answers"),
            (MetricName::WebappRequests, "Webapp requests"),
            (MetricName::WebappLatencyP95, "Webapp latency, p95"),
        ]),
        Role::Db => charts.extend([
            (MetricName::PgCommits, "Commits"),
            (MetricName::PgConnections, "Connections"),
            (MetricName::PgLagBytes, "Replication lag"),
        ]),
        Role::Adm | Role::Restore => charts.push((MetricName::DiskUsed, "Disk used")),
    }
    charts
}

#[component]
pub fn NodeDetail(props: &Props) -> Html {
    let ctx = use_ctx();
    let name = props.name.clone();
    let node = use_state(|| Loaded::Loading);
    let orders = use_state(|| None::<Vec<Order>>);
    let confirming = use_state(|| false);
    let removing = use_state(|| false);
    let window = use_state(|| WINDOW_SECS);
    let pick_window = {
        let window = window.clone();
        Callback::from(move |secs| window.set(secs))
    };

    // Everything about the node again after an event about it, and on the
    // console's tick (heartbeats arrive without events; logs follow on
    // their own, in the tail).
    let deps = (ctx.state.node_version(&name), ctx.state.nodes_version);
    {
        let (ctx, name) = (ctx.clone(), name.clone());
        let (node, orders) = (node.clone(), orders.clone());
        use_effect_with(deps, move |_| {
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.node(&name).await {
                    Ok(n) => node.set(Loaded::Found(Box::new(n))),
                    Err(e) if e.status == 404 => {
                        node.set(Loaded::Gone(e.message));
                        return;
                    }
                    Err(e) => return ctx.fail(e),
                }
                match ctx.client.orders(&name).await {
                    Ok(o) => orders.set(Some(o)),
                    Err(e) if e.status == 404 => {}
                    Err(e) => ctx.fail(e),
                }
            });
        });
    }

    let back = html! {
        <p><Link<Route> to={Route::Overview}>{ "← Overview" }</Link<Route>></p>
    };
    let node = match &*node {
        Loaded::Loading => {
            return html! {
                <section class="page">{ back }<p role="status">{ format!("Loading {name}…") }</p></section>
            };
        }
        Loaded::Gone(why) => {
            return html! {
                <section class="page node-detail">
                    { back }
                    <h1>{ name.to_string() }</h1>
                    <p class="gone" role="status">{ format!("{name} is not in the cluster ({why}).") }</p>
                </section>
            };
        }
        Loaded::Found(node) => node.as_ref().clone(),
    };

    let on_ask = {
        let confirming = confirming.clone();
        Callback::from(move |_: MouseEvent| confirming.set(true))
    };
    let on_cancel = {
        let confirming = confirming.clone();
        Callback::from(move |_: MouseEvent| confirming.set(false))
    };
    let on_remove = {
        let (ctx, name) = (ctx.clone(), name.clone());
        let (confirming, removing) = (confirming.clone(), removing.clone());
        Callback::from(move |_: MouseEvent| {
            removing.set(true);
            let (ctx, name) = (ctx.clone(), name.clone());
            let (confirming, removing) = (confirming.clone(), removing.clone());
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.remove_node(&name).await {
                    Ok(Removal::Draining(node)) => ctx.state.dispatch(Action::NodeChanged(*node)),
                    // Gone at once: the node.removed event updates the page.
                    Ok(Removal::Removed) => {}
                    Err(e) => ctx.fail(e),
                }
                confirming.set(false);
                removing.set(false);
            });
        })
    };

    let draining = node.state == corral_proto::NodeState::Draining;
    html! {
        <section class="page node-detail" aria-labelledby="node-title">
            { back }
            <div class="toolbar">
                <h1 id="node-title">{ format!("{} ({})", node.name, node.role) }</h1>
                if node.role != Role::Adm && !draining {
                    <div class="actions">
                        if can_switch_over(&node) {
                            <SwitchoverButton name={node.name.clone()} />
                        }
                        if !*confirming {
                            <button type="button" class="danger" onclick={on_ask}>{ "Remove…" }</button>
                        }
                    </div>
                }
            </div>
            if *confirming {
                <div class="confirm" role="alertdialog" aria-labelledby="confirm-text">
                    <p id="confirm-text">
                        { format!("Remove {}? Its agent drains it first: it leaves the load balancers and stops its services, then the node is removed.", node.name) }
                    </p>
                    <button type="button" class="danger" onclick={on_remove} disabled={*removing}>
                        { if *removing { "Removing…" } else { "Yes, drain and remove" } }
                    </button>
                    <button type="button" class="quiet" onclick={on_cancel} disabled={*removing}>{ "Cancel" }</button>
                </div>
            }
            if draining {
                <p class="notice" role="status">{ format!("{} is draining; it is removed once its agent reports the drain done.", node.name) }</p>
            }
            <NodeCard node={node.clone()} now_ms={now_ms()} full_details=true>
                <ProgressSteps steps={steps(&node, orders.as_deref())} />
            </NodeCard>
            <h2>{ "Metrics" }</h2>
            <WindowPicker value={*window} on_change={pick_window} />
            <div class="charts">
                { for charts_of(node.role).iter().map(|(metric, title)| html! {
                    <MetricChart key={metric.as_str()} name={*metric} title={*title}
                                 node={Some(node.name.clone())} window={*window} />
                }) }
            </div>
            <h2>{ "Work orders" }</h2>
            if let Some(orders) = &*orders {
                <OrderTable orders={orders.clone()} />
            } else {
                <p role="status">{ "Loading orders…" }</p>
            }
            <h2>{ "Logs" }</h2>
            <LogTail node={node.name.clone()} />
        </section>
    }
}
