//! Routes: conditions that send matching requests to a director (pass or pipe), tried by
//! priority before the directors' own route expressions. A route applies to the clusters it lists
//! (the `route_clusters` link table) or, in sync, to every cluster that serves its director.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Cluster, Director, ListRoutesRequest, Route};

use crate::resource::{
    Change, ClusterLinks, Condition, Resource, Tx, Value, ensure_reference, ids,
};
use crate::rows::{decode_messages, encode_messages, flag, join_list, split_list};
use crate::{Error, Result};

/// The routes that apply to the cluster bound to every `?`: listed, or in sync with a director
/// the cluster serves.
pub(crate) const ROUTES_OF_CLUSTER: &str = "(id IN (SELECT route_id FROM route_clusters \
     WHERE cluster_id = ?) OR (clusters_in_sync = 1 AND director_id IN \
     (SELECT director_id FROM director_clusters WHERE cluster_id = ?)))";

/// The clusters a route lists (none while it is in sync with its director).
const CLUSTERS: ClusterLinks = ClusterLinks {
    table: "route_clusters",
    owner_column: "route_id",
};

impl Resource for Route {
    const TABLE: &'static str = "routes";
    const COLLECTION: &'static str = "routes";
    const MESSAGE: &'static str = "vaas.v1.Route";
    const KIND: &'static str = "route";
    const FIELD: &'static str = "route";
    const CHANGES_ROUTING: bool = true;
    type Filter = ListRoutesRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("conditions", Value::Text(encode_messages(&self.conditions))),
            ("priority", self.priority.into()),
            ("clusters_in_sync", self.clusters_in_sync.into()),
            ("director_id", self.director_id.into()),
            ("action", self.action.into()),
            (
                "positive_urls",
                join_list(&self.positive_urls).as_str().into(),
            ),
            ("description", (&self.description).into()),
        ]
    }

    /// Converts a row; `cluster_ids` come from the link table in [`Resource::load_links`].
    fn from_row(row: &AnyRow) -> Result<Route> {
        Ok(Route {
            id: row.try_get("id")?,
            conditions: decode_messages(
                &row.try_get::<String, _>("conditions")?,
                "route condition",
            )?,
            priority: row.try_get::<i64, _>("priority")? as u32,
            cluster_ids: Vec::new(),
            clusters_in_sync: flag(row, "clusters_in_sync")?,
            director_id: row.try_get("director_id")?,
            action: row.try_get::<i64, _>("action")? as i32,
            positive_urls: split_list(row.try_get("positive_urls")?),
            description: row.try_get("description")?,
        })
    }

    fn conditions(filter: &ListRoutesRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.director_id != 0 {
            conditions.push(Condition::new("director_id = ?", filter.director_id));
        }
        if filter.cluster_id != 0 {
            conditions.push(Condition::new(ROUTES_OF_CLUSTER, filter.cluster_id));
        }
        conditions
    }

    /// The director must exist and be routable, and every listed cluster must serve it.
    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_reference::<Director>(tx, "route.director_id", self.director_id).await?;
        let is_virtual: i64 = sqlx::query_scalar("SELECT is_virtual FROM directors WHERE id = $1")
            .bind(self.director_id)
            .fetch_one(&mut **tx)
            .await?;
        if is_virtual != 0 {
            return Err(Error::Invalid {
                field: "route.director_id".to_owned(),
                reason: format!(
                    "names director {}, which is virtual: routes never choose virtual directors",
                    self.director_id
                ),
            });
        }
        let serving = director_clusters(tx, self.director_id).await?;
        for (index, &cluster_id) in self.cluster_ids.iter().enumerate() {
            let field = format!("route.cluster_ids[{index}]");
            ensure_reference::<Cluster>(tx, "route.cluster_ids", cluster_id).await?;
            if !serving.contains(&cluster_id) {
                return Err(Error::Invalid {
                    field,
                    reason: format!(
                        "names cluster {cluster_id}, which does not serve director {}",
                        self.director_id
                    ),
                });
            }
        }
        Ok(())
    }

    /// The clusters the route applied to and applies to now.
    async fn affected(
        tx: &mut Tx<'_>,
        before: Option<&Route>,
        after: Option<&Route>,
    ) -> Result<BTreeSet<i64>> {
        let mut clusters = BTreeSet::new();
        for route in before.into_iter().chain(after) {
            if route.clusters_in_sync {
                clusters.extend(director_clusters(tx, route.director_id).await?);
            } else {
                clusters.extend(route.cluster_ids.iter().copied());
            }
        }
        Ok(clusters)
    }

    async fn save_links(&self, tx: &mut Tx<'_>, id: i64, _: Change<'_>) -> Result<()> {
        CLUSTERS.save(tx, id, &self.cluster_ids).await
    }

    async fn load_links(tx: &mut Tx<'_>, routes: &mut [Route]) -> Result<()> {
        CLUSTERS
            .fill(tx, routes, |item| item.id, |item| &mut item.cluster_ids)
            .await
    }
}

/// Returns the clusters that serve the director.
async fn director_clusters(tx: &mut Tx<'_>, director_id: i64) -> Result<BTreeSet<i64>> {
    ids(
        tx,
        "SELECT cluster_id FROM director_clusters WHERE director_id = $1",
        director_id,
    )
    .await
}
