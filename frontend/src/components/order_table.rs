//! Work orders as a table: newest first, with status and the agent's words.

use corral_proto::Order;
use yew::prelude::*;

use crate::time::stamp;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub orders: Vec<Order>,
    /// Show the node column (when orders of several nodes are listed).
    #[prop_or_default]
    pub with_node: bool,
}

#[component]
pub fn OrderTable(props: &Props) -> Html {
    if props.orders.is_empty() {
        return html! { <p class="empty">{ "No work orders." }</p> };
    }
    let mut orders = props.orders.clone();
    orders.sort_by(|a, b| (&b.updated_at, &b.node, b.seq).cmp(&(&a.updated_at, &a.node, a.seq)));
    html! {
        <div class="table-wrap">
            <table class="orders">
                <thead>
                    <tr>
                        if props.with_node { <th scope="col">{ "node" }</th> }
                        <th scope="col">{ "seq" }</th>
                        <th scope="col">{ "kind" }</th>
                        <th scope="col">{ "status" }</th>
                        <th scope="col">{ "result" }</th>
                        <th scope="col">{ "updated" }</th>
                    </tr>
                </thead>
                <tbody>
                    { for orders.iter().map(|o| html! {
                        <tr key={format!("{}-{}", o.node, o.seq)} class={format!("order-{}", o.status)}
                            data-seq={o.seq.to_string()}>
                            if props.with_node { <td>{ &o.node }</td> }
                            <td>{ o.seq }</td>
                            <td>{ o.payload.kind().as_str() }</td>
                            <td class="status">{ o.status.as_str() }</td>
                            <td class="result">{ o.result.clone().unwrap_or_default() }</td>
                            <td>{ stamp(o.updated_at) }</td>
                        </tr>
                    }) }
                </tbody>
            </table>
        </div>
    }
}
