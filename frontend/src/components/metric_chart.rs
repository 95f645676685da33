//! One metric over a chosen window (the last hour by default, up to the 30
//! days aggregates are kept) as an SVG line chart drawn here (no
//! charting library): a line per node, optionally their total, and marks
//! at moments worth seeing against it (failovers). It asks the metrics API
//! again every 10 s, the agents' sampling interval: samples are not audit
//! events, so they do not come down the event stream.

use corral_proto::{MetricName, MetricSeries};
use gloo_timers::callback::Interval;
use yew::prelude::*;

use super::console::use_ctx;
use crate::chart::{self, HEIGHT, WIDTH};

/// The window shown unless another is picked, in seconds.
pub const WINDOW_SECS: i64 = 3600;
const REFRESH_MS: u32 = 10_000;

/// The windows [`WindowPicker`] offers: the server answers up to 6 hours
/// of the last day with raw 10-second points, longer ones with 5-minute
/// aggregates (kept 30 days).
pub const WINDOWS: [(i64, &str, &str); 5] = [
    (3600, "1 h", "hour"),
    (6 * 3600, "6 h", "6 hours"),
    (86_400, "1 day", "day"),
    (7 * 86_400, "7 days", "7 days"),
    (30 * 86_400, "30 days", "30 days"),
];

/// "the last {this}": `hour`, `6 hours`, ...
fn window_words(secs: i64) -> String {
    WINDOWS
        .iter()
        .find(|(w, _, _)| *w == secs)
        .map_or_else(|| format!("{secs} s"), |(_, _, words)| (*words).to_string())
}

#[derive(Properties, PartialEq, Clone)]
pub struct Props {
    pub name: MetricName,
    pub title: AttrValue,
    /// One node's series; every node's when absent.
    #[prop_or_default]
    pub node: Option<AttrValue>,
    /// Also draw the sum of every node's series.
    #[prop_or_default]
    pub total: bool,
    /// Vertical marks: (seconds since the epoch, what happened).
    #[prop_or_default]
    pub marks: Vec<(i64, AttrValue)>,
    /// Seconds up to now shown.
    #[prop_or(WINDOW_SECS)]
    pub window: i64,
}

#[derive(Clone, PartialEq)]
enum Loaded {
    Loading,
    Got(Box<MetricSeries>),
    Failed(String),
}

#[component]
pub fn MetricChart(props: &Props) -> Html {
    let ctx = use_ctx();
    let loaded = use_state(|| Loaded::Loading);
    {
        let loaded = loaded.clone();
        use_effect_with(
            (props.name, props.node.clone(), props.window),
            move |(name, node, window)| {
                let (name, node, window) = (*name, node.clone(), *window);
                loaded.set(Loaded::Loading);
                let fetch = move || {
                    let (client, loaded, node) = (ctx.client.clone(), loaded.clone(), node.clone());
                    wasm_bindgen_futures::spawn_local(async move {
                        match client.metric(name, node.as_deref(), window).await {
                            Ok(s) => loaded.set(Loaded::Got(Box::new(s))),
                            Err(e) => loaded.set(Loaded::Failed(e.to_string())),
                        }
                    });
                };
                fetch();
                let interval = Interval::new(REFRESH_MS, fetch);
                move || drop(interval)
            },
        );
    }

    let body = match &*loaded {
        Loaded::Loading => html! { <p class="chart-note" role="status">{ "Loading…" }</p> },
        Loaded::Failed(why) => {
            html! { <p class="chart-note">{ format!("Metrics unavailable: {why}") }</p> }
        }
        Loaded::Got(s) if s.series.iter().all(|n| n.points.is_empty()) => {
            html! { <p class="chart-note">{ format!("No samples in the last {} yet.", window_words(props.window)) }</p> }
        }
        Loaded::Got(s) => draw(props, s),
    };
    html! {
        <figure class="chart" data-metric={props.name.as_str()}>
            <figcaption>{ props.title.clone() }</figcaption>
            { body }
        </figure>
    }
}

fn draw(props: &Props, s: &MetricSeries) -> Html {
    let (from, to) = (s.to - props.window, s.to);
    let total = props.total.then(|| chart::sum(&s.series));
    let top = chart::nice_max(
        s.series
            .iter()
            .flat_map(|n| n.points.iter())
            .chain(total.iter().flatten())
            .map(|p| p.value)
            .fold(0.0, f64::max),
    );
    let latest = |points: &[corral_proto::MetricPoint]| {
        points
            .last()
            .map(|p| chart::format_value(p.value, &s.unit))
            .unwrap_or_default()
    };
    let mut legend: Vec<(String, String, usize)> = s
        .series
        .iter()
        .enumerate()
        .map(|(i, n)| (n.node.clone(), latest(&n.points), i % 6))
        .collect();
    if let Some(t) = &total {
        legend.push(("total".into(), latest(t), 6));
    }
    let label = legend
        .iter()
        .map(|(n, v, _)| format!("{n} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    html! {
        <>
            <svg class="chart-plot" viewBox={format!("0 0 {WIDTH} {HEIGHT}")} role="img"
                 aria-label={format!("{} over the last {}: now {label}", props.title, window_words(props.window))}>
                <line class="chart-grid" x1="0" y1={(HEIGHT / 2.0).to_string()} x2={WIDTH.to_string()} y2={(HEIGHT / 2.0).to_string()} />
                { for props.marks.iter().filter_map(|(at, what)| {
                    let x = chart::x_of(*at, from, to)?.to_string();
                    Some(html! {
                        <line class="chart-mark" x1={x.clone()} y1="0" x2={x} y2={HEIGHT.to_string()}>
                            <title>{ what.clone() }</title>
                        </line>
                    })
                }) }
                { for s.series.iter().enumerate().map(|(i, n)| html! {
                    <polyline class={format!("series series-{}", i % 6)} data-node={n.node.clone()}
                              points={chart::polyline(&n.points, from, to, top)} />
                }) }
                // The newest point of each line as a dot: a single sample
                // makes no line, and the end is what people look for.
                { for s.series.iter().enumerate().filter_map(|(i, n)| {
                    let (x, y) = chart::xy(n.points.last()?, from, to, top)?;
                    Some(html! {
                        <circle class={format!("dot series-{}", i % 6)} cx={format!("{x:.1}")}
                                cy={format!("{y:.1}")} r="7" />
                    })
                }) }
                if let Some(t) = &total {
                    <polyline class="series series-total" data-node="total"
                              points={chart::polyline(t, from, to, top)} />
                }
            </svg>
            <div class="chart-axis">
                <span>{ format!("top {}", chart::format_value(top, &s.unit)) }</span>
                <span>{ format!("{} ago → now", WINDOWS.iter().find(|(w, _, _)| *w == props.window).map_or("", |(_, short, _)| short)) }</span>
            </div>
            <ul class="chart-legend">
                { for legend.into_iter().map(|(node, value, i)| html! {
                    <li class={format!("legend-{i}")}><span class="swatch"></span>{ format!("{node} {value}") }</li>
                }) }
            </ul>
        </>
    }
}

#[derive(Properties, PartialEq, Clone)]
pub struct PickerProps {
    pub value: i64,
    pub on_change: Callback<i64>,
}

/// Buttons choosing the charts' window.
#[component]
pub fn WindowPicker(props: &PickerProps) -> Html {
    html! {
        <div class="chart-window" role="group" aria-label="Time range of the charts">
            { for WINDOWS.iter().map(|(secs, short, _)| {
                let (secs, on_change) = (*secs, props.on_change.clone());
                html! {
                    <button type="button" class="quiet" data-window={secs.to_string()}
                            aria-pressed={(secs == props.value).to_string()}
                            onclick={Callback::from(move |_| on_change.emit(secs))}>
                        { *short }
                    </button>
                }
            }) }
        </div>
    }
}
