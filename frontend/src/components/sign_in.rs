//! Sign in with the admin token. The token is checked against the API
//! before it is kept, so a wrong one is told at once.

use web_sys::HtmlInputElement;
use yew::prelude::*;

use crate::api::Client;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub on_signed_in: Callback<String>,
    /// Why the previous session ended, if it did on its own.
    #[prop_or_default]
    pub notice: Option<String>,
}

#[component]
pub fn SignIn(props: &Props) -> Html {
    let input = use_node_ref();
    let busy = use_state(|| false);
    let error = use_state(|| None::<String>);

    let onsubmit = {
        let (input, busy, error) = (input.clone(), busy.clone(), error.clone());
        let on_signed_in = props.on_signed_in.clone();
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let Some(field) = input.cast::<HtmlInputElement>() else {
                return;
            };
            let token = field.value().trim().to_string();
            if token.is_empty() {
                error.set(Some("Enter the admin token.".into()));
                return;
            }
            busy.set(true);
            error.set(None);
            let (busy, error, on_signed_in) = (busy.clone(), error.clone(), on_signed_in.clone());
            wasm_bindgen_futures::spawn_local(async move {
                match Client::new(token.clone()).nodes().await {
                    Ok(_) => on_signed_in.emit(token),
                    Err(e) => {
                        error.set(Some(match e.status {
                            401 => "That token was not accepted. Use the admin token from the \
                                    server's state directory (.corral/admin-token)."
                                .to_string(),
                            403 => "That is a node's agent token; the console needs the admin \
                                    token."
                                .to_string(),
                            _ => e.to_string(),
                        }));
                        busy.set(false);
                    }
                }
            });
        })
    };

    html! {
        <main class="sign-in">
            <form {onsubmit} aria-describedby="sign-in-help">
                <h1>{ "corral" }</h1>
                <p id="sign-in-help">
                    { "Sign in with the admin token. It is printed at the server's first start and kept in " }
                    <code>{ ".corral/admin-token" }</code>{ "." }
                </p>
                if let Some(notice) = &props.notice {
                    <p class="notice" role="status">{ notice }</p>
                }
                <label for="token">{ "Admin token" }</label>
                <input id="token" ref={input} type="password" autocomplete="current-password"
                       spellcheck="false" required=true disabled={*busy} />
                if let Some(error) = &*error {
                    <p class="error" role="alert" id="sign-in-error">{ error }</p>
                }
                <button type="submit" class="primary" disabled={*busy}>
                    { if *busy { "Signing in…" } else { "Sign in" } }
                </button>
            </form>
        </main>
    }
}
