//! "Make primary (switchover)" on a standby: files a switchover through
//! `POST /db/switchover`, disabled while the request runs, and says what
//! became of it (the order filed, or why the server refused).

use yew::prelude::*;

use super::console::use_ctx;

#[derive(Properties, PartialEq)]
pub struct Props {
    /// The standby to promote.
    pub name: AttrValue,
}

#[derive(Clone, PartialEq)]
enum Outcome {
    Idle,
    Running,
    Filed(String),
    Refused(String),
}

#[component]
pub fn SwitchoverButton(props: &Props) -> Html {
    let ctx = use_ctx();
    let outcome = use_state(|| Outcome::Idle);
    let onclick = {
        let (ctx, outcome, name) = (ctx.clone(), outcome.clone(), props.name.clone());
        Callback::from(move |_: MouseEvent| {
            outcome.set(Outcome::Running);
            let (ctx, outcome, name) = (ctx.clone(), outcome.clone(), name.clone());
            wasm_bindgen_futures::spawn_local(async move {
                match ctx.client.switchover(&name).await {
                    Ok(a) => outcome.set(Outcome::Filed(format!(
                        "Switchover {} → {} filed (order {} on {}); {} becomes primary once {} has handed over.",
                        a.from, a.to, a.seq, a.from, a.to, a.from
                    ))),
                    Err(e) if e.is_unauthorized() => {
                        outcome.set(Outcome::Idle);
                        ctx.fail(e);
                    }
                    Err(e) => outcome.set(Outcome::Refused(e.to_string())),
                }
            });
        })
    };
    let running = *outcome == Outcome::Running;
    html! {
        <div class="switchover">
            <button type="button" class="primary" {onclick} disabled={running}
                    data-switchover={props.name.clone()}>
                { if running { "Switching over…" } else { "Make primary (switchover)" } }
            </button>
            if let Outcome::Filed(text) = &*outcome {
                <p class="applied" role="status">{ text }</p>
            }
            if let Outcome::Refused(text) = &*outcome {
                <p class="error" role="alert">{ format!("Switchover refused: {text}") }</p>
            }
        </div>
    }
}
