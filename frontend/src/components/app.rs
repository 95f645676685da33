//! The root: signed out it shows the sign-in form, signed in the console.

use yew::prelude::*;
use yew_router::BrowserRouter;

use super::console::Console;
use super::sign_in::SignIn;
use crate::session;

#[component]
pub fn App() -> Html {
    let token = use_state(session::load);
    // Why the last session ended, shown on the sign-in form.
    let ended = use_state(|| None::<String>);

    let on_signed_in = {
        let (token, ended) = (token.clone(), ended.clone());
        Callback::from(move |t: String| {
            session::save(&t);
            ended.set(None);
            token.set(Some(t));
        })
    };
    let on_signed_out = {
        let (token, ended) = (token.clone(), ended.clone());
        Callback::from(move |why: Option<String>| {
            session::clear();
            ended.set(why);
            token.set(None);
        })
    };

    html! {
        <BrowserRouter>
            if let Some(t) = (*token).clone() {
                <Console key={t.clone()} token={AttrValue::from(t.clone())} {on_signed_out} />
            } else {
                <SignIn {on_signed_in} notice={(*ended).clone()} />
            }
        </BrowserRouter>
    }
}
