//! A node's way into service as a list of steps, each done, current,
//! waiting or failed (with the reason).

use yew::prelude::*;

use crate::progress::{Step, StepState, all_done};

#[derive(Properties, PartialEq)]
pub struct Props {
    pub steps: Vec<Step>,
}

#[component]
pub fn ProgressSteps(props: &Props) -> Html {
    let done = all_done(&props.steps);
    html! {
        <div class={classes!("progress", done.then_some("complete"))}>
            <ol aria-label="Progress">
                { for props.steps.iter().map(|step| {
                    let (state, mark) = match &step.state {
                        StepState::Done => ("done", "✓"),
                        StepState::Current => ("current", "…"),
                        StepState::Waiting => ("waiting", "·"),
                        StepState::Failed(_) => ("failed", "✗"),
                    };
                    html! {
                        <li class={state} data-step={step.label} data-state={state}>
                            <span class="mark" aria-hidden="true">{ mark }</span>
                            { step.label }
                            <span class="visually-hidden">{ format!(": {state}") }</span>
                            if let StepState::Failed(why) = &step.state {
                                <p class="error">{ why }</p>
                            }
                        </li>
                    }
                }) }
            </ol>
        </div>
    }
}
