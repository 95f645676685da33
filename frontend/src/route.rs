//! The console's pages; the server answers `index.html` for each of these
//! paths, so a reload or a shared link lands on the same page.

use yew_router::Routable;

#[derive(Debug, Clone, PartialEq, Routable)]
pub enum Route {
    #[at("/")]
    Overview,
    #[at("/nodes/:name")]
    Node { name: String },
    #[at("/settings")]
    Settings,
    #[at("/events")]
    Events,
    #[not_found]
    #[at("/404")]
    NotFound,
}
