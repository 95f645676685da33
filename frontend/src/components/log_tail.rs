//! A node's service logs, live: the newest lines, then each new one as the
//! server's long poll (`GET /nodes/{node}/logs?after=&wait=`) hands it over.
//! The search box narrows what is shown to lines containing its text.

use corral_proto::LogLine;
use std::rc::Rc;
use std::time::Duration;
use web_sys::{AbortController, AbortSignal, HtmlInputElement};
use yew::prelude::*;

use crate::api::Client;
use crate::time::clock;

/// Lines the page keeps; older ones scroll away.
const KEPT: usize = 500;

#[derive(Properties, PartialEq)]
pub struct Props {
    pub node: AttrValue,
}

#[derive(Default, PartialEq)]
struct Tail {
    lines: Vec<LogLine>,
    loaded: bool,
}

enum TailAction {
    Loaded(Vec<LogLine>),
    Arrived(Vec<LogLine>),
}

impl Reducible for Tail {
    type Action = TailAction;

    fn reduce(self: Rc<Self>, action: TailAction) -> Rc<Self> {
        let mut lines = match action {
            TailAction::Loaded(lines) => lines,
            TailAction::Arrived(new) => {
                let mut lines = self.lines.clone();
                lines.extend(new);
                lines
            }
        };
        let excess = lines.len().saturating_sub(KEPT);
        lines.drain(..excess);
        Rc::new(Tail {
            lines,
            loaded: true,
        })
    }
}

/// Whether `line` matches the search (case-insensitive; empty matches all).
fn matches(line: &LogLine, needle: &str) -> bool {
    needle.is_empty() || line.line.to_lowercase().contains(needle) || line.service.contains(needle)
}

/// Loads the newest lines, then long-polls for new ones until `signal`
/// aborts (the page went away) or the node is gone.
async fn follow(
    client: Client,
    node: String,
    tail: UseReducerDispatcher<Tail>,
    signal: Option<AbortSignal>,
) {
    let aborted = || signal.as_ref().is_some_and(AbortSignal::aborted);
    let mut last: Option<u64> = None;
    while !aborted() {
        let result = match last {
            None => client.logs(&node).await,
            Some(after) => client.logs_after(&node, after, signal.as_ref()).await,
        };
        match result {
            Ok(lines) => {
                let newest = lines.last().map(|l| l.seq);
                tail.dispatch(match last {
                    None => TailAction::Loaded(lines),
                    Some(_) => TailAction::Arrived(lines),
                });
                last = newest.or(last).or(Some(0));
            }
            Err(e) if e.status == 404 => return,
            Err(_) if aborted() => return,
            // The server is away: try again shortly, from where it was.
            Err(_) => gloo_timers::future::sleep(Duration::from_secs(2)).await,
        }
    }
}

#[component]
pub fn LogTail(props: &Props) -> Html {
    let ctx = super::console::use_ctx();
    let tail = use_reducer(Tail::default);
    let search = use_state(String::new);
    {
        let (client, dispatcher) = (ctx.client.clone(), tail.dispatcher());
        use_effect_with(props.node.clone(), move |node| {
            let abort = AbortController::new().ok();
            let signal = abort.as_ref().map(AbortController::signal);
            wasm_bindgen_futures::spawn_local(follow(client, node.to_string(), dispatcher, signal));
            move || {
                if let Some(abort) = abort {
                    abort.abort();
                }
            }
        });
    }
    let on_search = {
        let search = search.clone();
        Callback::from(move |e: InputEvent| {
            if let Some(input) = e.target_dyn_into::<HtmlInputElement>() {
                search.set(input.value());
            }
        })
    };
    let needle = search.to_lowercase();
    let shown: Vec<&LogLine> = tail.lines.iter().filter(|l| matches(l, &needle)).collect();

    html! {
        <div class="log-tail">
            <input type="search" class="log-search" placeholder="Search logs"
                   aria-label={format!("search the logs of {}", props.node)}
                   value={(*search).clone()} oninput={on_search} />
            if !tail.loaded {
                <p role="status">{ "Loading logs…" }</p>
            } else if tail.lines.is_empty() {
                <p class="empty">{ "No log lines shipped yet." }</p>
            } else if shown.is_empty() {
                <p class="empty">{ format!("No line contains {:?}.", *search) }</p>
            } else {
                <pre class="logs" tabindex="0" aria-live="polite"
                     aria-label={format!("log lines of {}", props.node)}>
                    { for shown.iter().map(|l| html! {
                        <span class="log-line" key={l.seq}>{ format!("{} {:<9} {}\n", clock(l.at), l.service, l.line) }</span>
                    }) }
                </pre>
            }
        </div>
    }
}
