//! Cluster settings: the load-balancing policy and the replication mode,
//! applied through `PUT /topology`; the orders that change files are
//! listed below and follow their agents' progress live.

use std::collections::HashMap;

use corral_proto::{LbPolicy, Order, ReplicationMode, Topology, TopologyChange, TopologyUpdate};
use web_sys::HtmlSelectElement;
use yew::prelude::*;

use super::console::use_ctx;
use super::order_table::OrderTable;

const POLICIES: [(LbPolicy, &str); 3] = [
    (LbPolicy::RoundRobin, "Round robin"),
    (LbPolicy::LeastConn, "Least connections"),
    (LbPolicy::UriHash, "URI hash (same URI, same webapp)"),
];
const MODES: [(ReplicationMode, &str); 3] = [
    (ReplicationMode::Async, "Asynchronous"),
    (
        ReplicationMode::Sync,
        "Synchronous (commits wait for a standby; asynchronous while none is connected)",
    ),
    (
        ReplicationMode::Strict,
        "Strict synchronous (commits wait for a standby, never fall back)",
    ),
];

fn selected(e: &Event) -> Option<String> {
    e.target_dyn_into::<HtmlSelectElement>().map(|s| s.value())
}

#[component]
pub fn Settings() -> Html {
    let ctx = use_ctx();
    let topology = use_state(|| None::<Topology>);
    let policy = use_state(|| None::<LbPolicy>);
    let mode = use_state(|| None::<ReplicationMode>);
    let saving = use_state(|| false);
    let change = use_state(|| None::<TopologyChange>);
    // Orders filed by the last change: per node, the seq they came after.
    let since = use_state(Vec::<(String, i64)>::new);
    let filed = use_state(Vec::<Order>::new);

    {
        let (ctx, topology) = (ctx.clone(), topology.clone());
        use_effect_with((), move |_| {
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.topology().await {
                    Ok(t) => topology.set(Some(t)),
                    Err(e) => ctx.fail(e),
                }
            });
        });
    }
    {
        let (ctx, filed) = (ctx.clone(), filed.clone());
        use_effect_with(
            ((*since).clone(), ctx.state.nodes_version),
            move |(since, _)| {
                let since = since.clone();
                if !since.is_empty() {
                    wasm_bindgen_futures::spawn_local(async move {
                        let mut all = Vec::new();
                        for (node, after) in since {
                            match ctx.client.orders_after(&node, after).await {
                                Ok(orders) => all.extend(orders),
                                Err(e) if e.status == 404 => {}
                                Err(e) => return ctx.fail(e),
                            }
                        }
                        filed.set(all);
                    });
                }
            },
        );
    }

    let Some(current) = (*topology).clone() else {
        return html! {
            <section class="page"><h1>{ "Settings" }</h1><p role="status">{ "Loading…" }</p></section>
        };
    };
    let chosen_policy = policy.unwrap_or(current.lb_policy);
    let chosen_mode = mode.unwrap_or(current.replication);
    let changed = chosen_policy != current.lb_policy || chosen_mode != current.replication;

    let on_policy = {
        let policy = policy.clone();
        Callback::from(move |e: Event| {
            if let Some(p) = selected(&e).and_then(|v| v.parse().ok()) {
                policy.set(Some(p));
            }
        })
    };
    let on_mode = {
        let mode = mode.clone();
        Callback::from(move |e: Event| {
            if let Some(m) = selected(&e).and_then(|v| v.parse().ok()) {
                mode.set(Some(m));
            }
        })
    };
    let onsubmit = {
        let ctx = ctx.clone();
        let (topology, saving, change, since) = (
            topology.clone(),
            saving.clone(),
            change.clone(),
            since.clone(),
        );
        let (policy, mode) = (policy.clone(), mode.clone());
        let current = current.clone();
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let update = TopologyUpdate {
                lb_policy: chosen_policy,
                replication: chosen_mode,
                ..TopologyUpdate::from(&current)
            };
            let before: HashMap<String, i64> = ctx
                .state
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.last_seq))
                .collect();
            saving.set(true);
            let (ctx, topology, saving, change, since) = (
                ctx.clone(),
                topology.clone(),
                saving.clone(),
                change.clone(),
                since.clone(),
            );
            let (policy, mode) = (policy.clone(), mode.clone());
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.set_topology(&update).await {
                    Ok(result) => {
                        topology.set(Some(result.topology.clone()));
                        policy.set(None);
                        mode.set(None);
                        change.set(Some(result));
                        match ctx.client.nodes().await {
                            Ok(nodes) => since.set(
                                nodes
                                    .iter()
                                    .filter_map(|n| {
                                        let old = before.get(&n.name).copied().unwrap_or(0);
                                        (n.last_seq > old).then(|| (n.name.clone(), old))
                                    })
                                    .collect(),
                            ),
                            Err(e) => ctx.fail(e),
                        }
                    }
                    Err(e) => ctx.fail(e),
                }
                saving.set(false);
            });
        })
    };

    html! {
        <section class="page settings" aria-labelledby="settings-title">
            <h1 id="settings-title">{ "Settings" }</h1>
            <form {onsubmit}>
                <div class="field">
                    <label for="lb-policy">{ "Load-balancing policy" }</label>
                    <select id="lb-policy" onchange={on_policy} disabled={*saving}>
                        { for POLICIES.iter().map(|(p, text)| html! {
                            <option value={p.as_str()} selected={*p == chosen_policy}>{ *text }</option>
                        }) }
                    </select>
                </div>
                <div class="field">
                    <label for="replication">{ "Replication" }</label>
                    <select id="replication" onchange={on_mode} disabled={*saving}>
                        { for MODES.iter().map(|(m, text)| html! {
                            <option value={m.as_str()} selected={*m == chosen_mode}>{ *text }</option>
                        }) }
                    </select>
                </div>
                <p class="hint">
                    { format!("Now: {} web and {} db nodes, {}, {} replication.",
                        current.web, current.db, current.lb_policy, current.replication) }
                </p>
                <button type="submit" class="primary" disabled={*saving || !changed}>
                    { if *saving { "Applying…" } else { "Apply" } }
                </button>
            </form>
            if let Some(result) = &*change {
                <section aria-labelledby="result-title" class="result">
                    <h2 id="result-title">{ "Resulting orders" }</h2>
                    <p role="status" class="applied">
                        { format!("Applied: {} orders filed.", result.orders_filed) }
                    </p>
                    <OrderTable orders={(*filed).clone()} with_node=true />
                </section>
            }
        </section>
    }
}
