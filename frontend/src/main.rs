//! corral's web UI: sign in with the admin token, watch the cluster live,
//! add and remove nodes, change settings, read the audit log. A Yew app
//! rendered in the browser, talking only to the REST API of the server
//! that serves it.

#![forbid(unsafe_code)]

mod api;
mod chart;
mod components;
mod progress;
mod route;
mod session;
mod sse;
mod state;
mod time;

fn main() {
    yew::Renderer::<components::app::App>::new().render();
}
