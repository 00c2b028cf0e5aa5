//! Probes: health checks that Varnish sends to the backends of the directors that use them.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Director, ListProbesRequest, Probe};

use crate::Result;
use crate::resource::{
    Condition, Resource, Tx, Value, clusters_of_directors_with, ensure_unique, ensure_unused,
    name_prefix, updated,
};
use crate::rows::{duration_column, flag, micros, port};

impl Resource for Probe {
    const TABLE: &'static str = "probes";
    const COLLECTION: &'static str = "probes";
    const MESSAGE: &'static str = "vaas.v1.Probe";
    const KIND: &'static str = "probe";
    const FIELD: &'static str = "probe";
    type Filter = ListProbesRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("name", (&self.name).into()),
            ("url", (&self.url).into()),
            (
                "expected_response",
                self.expected_response.unwrap_or_default().into(),
            ),
            ("interval_micros", micros(&self.interval)),
            ("timeout_micros", micros(&self.timeout)),
            ("window_size", self.window.unwrap_or_default().into()),
            ("threshold", self.threshold.unwrap_or_default().into()),
            ("start_as_healthy", self.start_as_healthy.into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<Probe> {
        Ok(Probe {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            url: row.try_get("url")?,
            expected_response: Some(port(row, "expected_response")?),
            interval: duration_column(row, "interval_micros")?,
            timeout: duration_column(row, "timeout_micros")?,
            window: Some(port(row, "window_size")?),
            threshold: Some(port(row, "threshold")?),
            start_as_healthy: flag(row, "start_as_healthy")?,
        })
    }

    fn conditions(filter: &ListProbesRequest) -> Vec<Condition> {
        name_prefix(&filter.name_prefix)
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unique(tx, self, "name", &self.name, "probe.name").await
    }

    /// A changed probe reloads the clusters of the directors that use it; a new one is used by
    /// none yet, and one in use cannot be deleted.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&Probe>,
        after: Option<&Probe>,
    ) -> Result<BTreeSet<i64>> {
        match updated(before, after) {
            Some(after) => clusters_of_directors_with(tx, "probe_id", after.id).await,
            None => Ok(BTreeSet::new()),
        }
    }

    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<Probe, Director>(tx, self, "probe_id").await
    }
}
