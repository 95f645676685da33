//! What the signed-in console knows, changed only through [`Action`]s (the
//! shape of Yew's function_todomvc). Views map it to HTML; effects that
//! fetch watch the version counters: an event about a node bumps that
//! node's counter, and whatever shows the node refetches.

use std::collections::HashMap;
use std::rc::Rc;

use corral_proto::{Event, Node};
use yew::Reducible;

use crate::sse::StreamStatus;

/// How many audit events the console keeps in memory.
pub const KEPT_EVENTS: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub nodes: Vec<Node>,
    /// False until the first node list arrives.
    pub nodes_loaded: bool,
    /// Bumped when the node list should be fetched again.
    pub nodes_version: u64,
    /// Per node: bumped by every event about it (its orders, logs or state
    /// may have changed).
    pub node_versions: HashMap<String, u64>,
    /// Nodes added from this console, whose progress is shown.
    pub added: Vec<String>,
    /// Audit events, oldest first.
    pub events: Vec<Event>,
    pub stream: StreamStatus,
    /// Failures to show, each until dismissed.
    pub notices: Vec<Notice>,
    next_notice: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub id: u32,
    pub text: String,
}

impl Default for State {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            nodes_loaded: false,
            nodes_version: 0,
            node_versions: HashMap::new(),
            added: Vec::new(),
            events: Vec::new(),
            stream: StreamStatus::Connecting,
            notices: Vec::new(),
            next_notice: 1,
        }
    }
}

pub enum Action {
    NodesLoaded(Vec<Node>),
    /// A node this console created: shown at once, its progress followed.
    NodeAdded(Node),
    /// A node's new record (e.g. `draining` after a removal request).
    NodeChanged(Node),
    EventsLoaded(Vec<Event>),
    EventReceived(Event),
    /// Time passed: fetch the node list again (heartbeats raise no events).
    Tick,
    Stream(StreamStatus),
    Fail(String),
    Dismiss(u32),
}

impl State {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn node_version(&self, name: &str) -> u64 {
        self.node_versions.get(name).copied().unwrap_or(0)
    }

    fn bump_node(&mut self, name: &str) {
        *self.node_versions.entry(name.to_string()).or_default() += 1;
    }

    fn upsert(&mut self, node: Node) {
        match self.nodes.iter_mut().find(|n| n.name == node.name) {
            Some(existing) => *existing = node,
            None => self.nodes.push(node),
        }
    }
}

/// Does an event change what the node list shows?
fn touches_nodes(kind: &str) -> bool {
    kind.starts_with("node.") || kind.starts_with("order") || kind.starts_with("topology.")
}

impl Reducible for State {
    type Action = Action;

    fn reduce(self: Rc<Self>, action: Action) -> Rc<Self> {
        let mut s = (*self).clone();
        match action {
            Action::NodesLoaded(nodes) => {
                s.nodes = nodes;
                s.nodes_loaded = true;
            }
            Action::NodeAdded(node) => {
                if !s.added.contains(&node.name) {
                    s.added.push(node.name.clone());
                }
                s.bump_node(&node.name);
                s.upsert(node);
            }
            Action::NodeChanged(node) => {
                s.bump_node(&node.name);
                s.upsert(node);
            }
            Action::EventsLoaded(events) => {
                s.events.extend(events);
                s.events.sort_by_key(|e| e.id);
                s.events.dedup_by_key(|e| e.id);
                let excess = s.events.len().saturating_sub(KEPT_EVENTS);
                s.events.drain(..excess);
            }
            Action::EventReceived(event) => {
                if touches_nodes(&event.kind) {
                    s.nodes_version += 1;
                }
                if event.kind == "node.removed" {
                    s.nodes.retain(|n| n.name != event.subject);
                }
                if event.subject == "cluster" || event.subject == "topology" {
                    let names: Vec<String> = s.nodes.iter().map(|n| n.name.clone()).collect();
                    names.iter().for_each(|n| s.bump_node(n));
                } else {
                    let subject = event.subject.clone();
                    s.bump_node(&subject);
                }
                if s.events.last().is_none_or(|last| last.id < event.id) {
                    s.events.push(event);
                }
                let excess = s.events.len().saturating_sub(KEPT_EVENTS);
                s.events.drain(..excess);
            }
            Action::Tick => s.nodes_version += 1,
            Action::Stream(status) => s.stream = status,
            // The same failure again (a server down, retried on every tick)
            // stays one notice.
            Action::Fail(text) if s.notices.iter().any(|n| n.text == text) => {}
            Action::Fail(text) => {
                let id = s.next_notice;
                s.next_notice += 1;
                s.notices.push(Notice { id, text });
                // A stuck loop must not bury the page in notices.
                let excess = s.notices.len().saturating_sub(5);
                s.notices.drain(..excess);
            }
            Action::Dismiss(id) => s.notices.retain(|n| n.id != id),
        }
        Rc::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reduce(state: Rc<State>, action: Action) -> Rc<State> {
        state.reduce(action)
    }

    #[test]
    fn a_repeated_failure_is_one_notice_until_dismissed() {
        let mut s = Rc::new(State::default());
        for _ in 0..3 {
            s = reduce(s, Action::Fail("cannot reach the server".into()));
        }
        assert_eq!(s.notices.len(), 1);
        let id = s.notices[0].id;
        s = reduce(s, Action::Dismiss(id));
        assert!(s.notices.is_empty());
        s = reduce(s, Action::Fail("cannot reach the server".into()));
        assert_eq!(s.notices.len(), 1, "shown again after a dismissal");
    }
}
