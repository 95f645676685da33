//! Failures of API calls, shown until dismissed: nothing is swallowed.

use yew::prelude::*;

use crate::state::Notice;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub notices: Vec<Notice>,
    pub on_dismiss: Callback<u32>,
}

#[component]
pub fn Notices(props: &Props) -> Html {
    if props.notices.is_empty() {
        return html! {};
    }
    html! {
        <div class="notices" role="alert">
            { for props.notices.iter().map(|n| {
                let id = n.id;
                let on_dismiss = props.on_dismiss.reform(move |_: MouseEvent| id);
                html! {
                    <p class="error" key={id}>
                        <span>{ &n.text }</span>
                        <button type="button" class="quiet" onclick={on_dismiss}
                                aria-label="Dismiss this message">{ "Dismiss" }</button>
                    </p>
                }
            }) }
        </div>
    }
}
