//! The top bar: where you are, whether live updates flow, sign out.

use yew::prelude::*;
use yew_router::prelude::*;

use crate::route::Route;
use crate::sse::StreamStatus;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub stream: StreamStatus,
    pub on_sign_out: Callback<()>,
}

#[component]
pub fn Header(props: &Props) -> Html {
    let route = use_route::<Route>();
    let link = |to: Route, text: &'static str| {
        let current = match (&route, &to) {
            (Some(Route::Node { .. }), Route::Overview) => true,
            (Some(r), to) => r == to,
            _ => false,
        };
        html! {
            <li>
                <Link<Route> to={to} classes={classes!(current.then_some("current"))}>
                    { text }
                </Link<Route>>
            </li>
        }
    };
    let (class, text) = match &props.stream {
        StreamStatus::Live(None) => ("live", "live".to_string()),
        StreamStatus::Live(Some(server)) => ("live", format!("live via {server}")),
        StreamStatus::Connecting => ("connecting", "connecting…".to_string()),
        StreamStatus::Retrying(why) => ("retrying", format!("reconnecting ({why})")),
    };
    let on_sign_out = props.on_sign_out.reform(|_: MouseEvent| ());
    html! {
        <header class="top">
            <a class="skip" href="#main">{ "Skip to content" }</a>
            <span class="brand">{ "corral" }</span>
            <nav aria-label="Pages">
                <ul>
                    { link(Route::Overview, "Overview") }
                    { link(Route::Settings, "Settings") }
                    { link(Route::Events, "Events") }
                </ul>
            </nav>
            <span class={classes!("stream", class)} role="status" title="Live updates from the server">
                { text }
            </span>
            <button type="button" class="quiet" onclick={on_sign_out}>{ "Sign out" }</button>
        </header>
    }
}
