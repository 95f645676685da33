//! One component per file, as in Yew's function_todomvc: pages read the
//! console context; the pieces they are made of take props and report
//! through `on_*` callbacks.

pub mod app;
pub mod backup_panel;
pub mod console;
pub mod event_list;
pub mod events_page;
pub mod header;
pub mod log_tail;
pub mod metric_chart;
pub mod node_card;
pub mod node_detail;
pub mod notices;
pub mod order_table;
pub mod overview;
pub mod progress_steps;
pub mod settings;
pub mod sign_in;
pub mod switchover_button;
pub mod tracked_progress;
