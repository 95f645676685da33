//! The progress of a node added from this console, kept current: its
//! orders are fetched again whenever an event about the node arrives.

use corral_proto::Order;
use yew::prelude::*;

use super::console::use_ctx;
use super::progress_steps::ProgressSteps;
use crate::progress::steps;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub name: AttrValue,
}

#[component]
pub fn TrackedProgress(props: &Props) -> Html {
    let ctx = use_ctx();
    let orders = use_state(|| None::<Vec<Order>>);
    let version = ctx.state.node_version(&props.name);
    {
        let (ctx, orders, name) = (ctx.clone(), orders.clone(), props.name.clone());
        use_effect_with(version, move |_| {
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.orders(&name).await {
                    Ok(list) => orders.set(Some(list)),
                    // Removed in the meantime: nothing to show, nothing wrong.
                    Err(e) if e.status == 404 => {}
                    Err(e) => ctx.fail(e),
                }
            });
        });
    }
    let Some(node) = ctx.state.node(&props.name) else {
        return html! {};
    };
    html! { <ProgressSteps steps={steps(node, orders.as_deref())} /> }
}
