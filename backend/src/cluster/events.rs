//! The audit log: reading it, and following it as it is written.

use std::sync::Arc;

use chrono::Utc;
use corral_proto::Event;
use tokio::sync::broadcast;

use super::ClusterError;
use super::peers::Wake;
use super::rows::event_from_row;
use super::{Cluster, MAX_LIST_LIMIT};
use crate::store::{self, NewEvent};

impl Cluster {
    /// Audit events after `after`, or the newest ones, oldest first.
    pub async fn events(&self, after: Option<i64>, limit: u64) -> Result<Vec<Event>, ClusterError> {
        let limit = limit.min(MAX_LIST_LIMIT);
        let rows = match after {
            Some(after) => store::events_after(self.store.conn(), after, limit).await?,
            None => store::latest_events(self.store.conn(), limit).await?,
        };
        Ok(rows.iter().map(event_from_row).collect())
    }

    /// Events as they are committed.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Writes one audit event outside any change (a provider that failed to
    /// make a node's machine, say) and publishes it to event streams.
    pub async fn record_event(
        &self,
        actor: &str,
        kind: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), ClusterError> {
        self.record_events(vec![NewEvent {
            actor: actor.into(),
            kind: kind.into(),
            subject: subject.into(),
            message: message.into(),
        }])
        .await
    }

    /// Writes events outside a change and publishes them.
    pub(super) async fn record_events(&self, events: Vec<NewEvent>) -> Result<(), ClusterError> {
        let rows = store::insert_events(self.store.conn(), events, Utc::now()).await?;
        let wake = Wake {
            events: rows.iter().map(|e| e.id).collect(),
            ..Wake::default()
        };
        if let Err(e) = self.notify_peers(self.store.conn(), &wake).await {
            // Written all the same; other servers' streams catch up later.
            tracing::warn!(error = %e, "telling other servers about events failed");
        }
        for e in &rows {
            self.publish_event(e);
        }
        Ok(())
    }
}
