//! The signed-in console: owns the [`State`], keeps it in step with the
//! server (node list, audit log, the live event stream, a slow tick for
//! heartbeat ages) and routes to the pages.

use std::cell::RefCell;
use std::rc::Rc;

use gloo_timers::callback::Interval;
use yew::prelude::*;
use yew_router::prelude::*;

use super::events_page::EventsPage;
use super::header::Header;
use super::node_detail::NodeDetail;
use super::notices::Notices;
use super::overview::Overview;
use super::settings::Settings;
use crate::api::{ApiError, Client};
use crate::route::Route;
use crate::sse::{EventStream, StreamStatus};
use crate::state::{Action, State};

/// What every page needs: the API client and the shared state.
#[derive(Clone, PartialEq)]
pub struct Ctx {
    pub client: Client,
    pub state: UseReducerHandle<State>,
    on_unauthorized: Callback<ApiError>,
}

impl Ctx {
    /// Shows a failure; a rejected token ends the session instead.
    pub fn fail(&self, error: ApiError) {
        if error.is_unauthorized() {
            self.on_unauthorized.emit(error);
        } else {
            self.state.dispatch(Action::Fail(error.to_string()));
        }
    }
}

#[derive(Properties, PartialEq)]
pub struct Props {
    pub token: AttrValue,
    /// Signed out, with the reason when it was not the user's choice.
    pub on_signed_out: Callback<Option<String>>,
}

/// How often the node list is fetched even without events: heartbeats
/// that change nothing raise none, and their age should stay current.
const TICK_MS: u32 = 5_000;

#[component]
pub fn Console(props: &Props) -> Html {
    let state = use_reducer(State::default);
    let client = use_memo(props.token.clone(), |t| Client::new(t.to_string()));
    let on_unauthorized = {
        let on_signed_out = props.on_signed_out.clone();
        Callback::from(move |_: ApiError| {
            on_signed_out.emit(Some(
                "The server no longer accepts this token. Sign in again.".into(),
            ))
        })
    };
    let ctx = Ctx {
        client: (*client).clone(),
        state: state.clone(),
        on_unauthorized: on_unauthorized.clone(),
    };

    // The node list: on start, after relevant events and on every tick.
    // Requests never overlap; a change during one asks for one more.
    let fetching = use_mut_ref(|| (false, false));
    {
        let ctx = ctx.clone();
        use_effect_with(state.nodes_version, move |_| {
            fetch_nodes(ctx, fetching);
        });
    }

    // The audit log so far, then the live stream from there on.
    let stream = use_mut_ref(|| None::<EventStream>);
    {
        let ctx = ctx.clone();
        use_effect_with((), move |_| {
            let dispatcher = ctx.state.dispatcher();
            let started = stream.clone();
            wasm_bindgen_futures::spawn_local(async move {
                // The other servers, to go on with if this one stops
                // answering; without them the page keeps to its own.
                if let Err(e) = ctx.client.discover_servers().await
                    && e.is_unauthorized()
                {
                    ctx.fail(e);
                    return;
                }
                let after = match ctx.client.events(500).await {
                    Ok(events) => {
                        let last = events.last().map(|e| e.id);
                        dispatcher.dispatch(Action::EventsLoaded(events));
                        last
                    }
                    Err(e) => {
                        ctx.fail(e);
                        None
                    }
                };
                let on_event = {
                    let d = dispatcher.clone();
                    Callback::from(move |e| d.dispatch(Action::EventReceived(e)))
                };
                let on_status = {
                    let d = dispatcher.clone();
                    Callback::from(move |s: StreamStatus| d.dispatch(Action::Stream(s)))
                };
                *started.borrow_mut() = EventStream::start(
                    ctx.client.clone(),
                    after,
                    on_event,
                    on_status,
                    ctx.on_unauthorized.clone(),
                );
            });
            move || drop(stream.borrow_mut().take())
        });
    }

    {
        let dispatcher = state.dispatcher();
        use_effect_with((), move |_| {
            let interval = Interval::new(TICK_MS, move || dispatcher.dispatch(Action::Tick));
            move || drop(interval)
        });
    }

    let on_sign_out = {
        let on_signed_out = props.on_signed_out.clone();
        Callback::from(move |_| on_signed_out.emit(None))
    };
    let on_dismiss = {
        let dispatcher = state.dispatcher();
        Callback::from(move |id| dispatcher.dispatch(Action::Dismiss(id)))
    };

    html! {
        <ContextProvider<Ctx> context={ctx}>
            <Header stream={state.stream.clone()} {on_sign_out} />
            <Notices notices={state.notices.clone()} {on_dismiss} />
            <main id="main">
                <Switch<Route> render={switch} />
            </main>
        </ContextProvider<Ctx>>
    }
}

fn switch(route: Route) -> Html {
    match route {
        Route::Overview => html! { <Overview /> },
        Route::Node { name } => {
            let key = name.clone();
            html! { <NodeDetail {key} name={AttrValue::from(name)} /> }
        }
        Route::Settings => html! { <Settings /> },
        Route::Events => html! { <EventsPage /> },
        Route::NotFound => html! {
            <section class="page">
                <h1>{ "No such page" }</h1>
                <p><Link<Route> to={Route::Overview}>{ "Back to the overview" }</Link<Route>></p>
            </section>
        },
    }
}

fn fetch_nodes(ctx: Ctx, fetching: Rc<RefCell<(bool, bool)>>) {
    {
        let mut f = fetching.borrow_mut();
        if f.0 {
            f.1 = true;
            return;
        }
        *f = (true, false);
    }
    let dispatcher = ctx.state.dispatcher();
    wasm_bindgen_futures::spawn_local(async move {
        loop {
            match ctx.client.nodes().await {
                Ok(nodes) => dispatcher.dispatch(Action::NodesLoaded(nodes)),
                Err(e) => ctx.fail(e),
            }
            let mut f = fetching.borrow_mut();
            if f.1 {
                f.1 = false;
            } else {
                f.0 = false;
                break;
            }
        }
    });
}

/// The console context; every page is rendered inside it.
#[hook]
pub fn use_ctx() -> Ctx {
    use_context::<Ctx>().expect("pages render inside the console")
}
