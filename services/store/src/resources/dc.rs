//! Datacenters: where servers and backends live; a symbol names them in VCL.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Backend, Dc, ListDcsRequest, VarnishServer};

use crate::resource::{Condition, Resource, Tx, Value, ensure_unused, ids, name_prefix, updated};
use crate::{Error, Result};

impl Resource for Dc {
    const TABLE: &'static str = "dcs";
    const COLLECTION: &'static str = "dcs";
    const MESSAGE: &'static str = "vaas.v1.Dc";
    const KIND: &'static str = "dc";
    const FIELD: &'static str = "dc";
    type Filter = ListDcsRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("name", (&self.name).into()),
            ("symbol", (&self.symbol).into()),
        ]
    }

    fn from_row(row: &AnyRow) -> Result<Dc> {
        Ok(Dc {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            symbol: row.try_get("symbol")?,
        })
    }

    fn conditions(filter: &ListDcsRequest) -> Vec<Condition> {
        name_prefix(&filter.name_prefix)
    }

    /// Rejects a symbol that equals another after "-" becomes "_", ignoring case (they would
    /// collide in VCL, whose symbols are case-insensitive).
    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        let vcl_symbol = |symbol: &str| symbol.replace('-', "_").to_ascii_lowercase();
        let others: Vec<(i64, String)> = sqlx::query_as("SELECT id, symbol FROM dcs")
            .fetch_all(&mut **tx)
            .await?;
        let collides = others
            .iter()
            .any(|(id, other)| *id != self.id && vcl_symbol(other) == vcl_symbol(&self.symbol));
        if collides {
            return Err(Error::AlreadyExists {
                field: "dc.symbol",
                value: self.symbol.clone(),
            });
        }
        Ok(())
    }

    /// A renamed datacenter changes the VCL of the clusters with servers or backends in it.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&Dc>,
        after: Option<&Dc>,
    ) -> Result<BTreeSet<i64>> {
        let Some(after) = updated(before, after) else {
            return Ok(BTreeSet::new());
        };
        ids(
            tx,
            "SELECT cluster_id FROM varnish_servers WHERE dc_id = $1 \
             UNION SELECT dcl.cluster_id FROM director_clusters dcl \
             JOIN backends b ON b.director_id = dcl.director_id WHERE b.dc_id = $1",
            after.id,
        )
        .await
    }

    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<Dc, VarnishServer>(tx, self, "dc_id").await?;
        ensure_unused::<Dc, Backend>(tx, self, "dc_id").await
    }
}
