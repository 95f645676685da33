//! Audit events, newest first.

use corral_proto::Event;
use yew::prelude::*;

use crate::time::stamp;

#[derive(Properties, PartialEq)]
pub struct Props {
    /// Oldest first, as kept; shown newest first.
    pub events: Vec<Event>,
}

#[component]
pub fn EventList(props: &Props) -> Html {
    if props.events.is_empty() {
        return html! { <p class="empty">{ "No events." }</p> };
    }
    html! {
        <ol class="events" reversed=true>
            { for props.events.iter().rev().map(|e| html! {
                <li key={e.id} data-kind={e.kind.clone()} data-subject={e.subject.clone()}>
                    <time datetime={e.at.to_rfc3339()}>{ stamp(e.at) }</time>
                    <span class="kind">{ &e.kind }</span>
                    <span class="subject">{ &e.subject }</span>
                    <span class="actor">{ &e.actor }</span>
                    <span class="message">{ &e.message }</span>
                </li>
            }) }
        </ol>
    }
}
