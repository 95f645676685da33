//! The audit log, newest first, live, filterable by node.

use web_sys::HtmlSelectElement;
use yew::prelude::*;

use super::console::use_ctx;
use super::event_list::EventList;

#[component]
pub fn EventsPage() -> Html {
    let ctx = use_ctx();
    let filter = use_state(String::new);
    let mut subjects: Vec<String> = ctx
        .state
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .chain(ctx.state.events.iter().map(|e| e.subject.clone()))
        .collect();
    subjects.sort();
    subjects.dedup();
    let events: Vec<_> = ctx
        .state
        .events
        .iter()
        .filter(|e| filter.is_empty() || e.subject == *filter)
        .cloned()
        .collect();
    let onchange = {
        let filter = filter.clone();
        Callback::from(move |e: Event| {
            if let Some(select) = e.target_dyn_into::<HtmlSelectElement>() {
                filter.set(select.value());
            }
        })
    };
    html! {
        <section class="page" aria-labelledby="events-title">
            <div class="toolbar">
                <h1 id="events-title">{ "Events" }</h1>
                <div class="actions">
                    <label for="event-filter">{ "Node" }</label>
                    <select id="event-filter" {onchange}>
                        <option value="" selected={filter.is_empty()}>{ "all" }</option>
                        { for subjects.iter().map(|s| html! {
                            <option value={s.clone()} selected={*s == *filter}>{ s }</option>
                        }) }
                    </select>
                </div>
            </div>
            <p class="hint">{ format!("{} events, newest first; new ones appear as they happen.", events.len()) }</p>
            <EventList {events} />
        </section>
    }
}
