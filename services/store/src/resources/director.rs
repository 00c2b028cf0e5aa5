//! Directors: a set of backends behind one load-balancing policy, served by some clusters (the
//! `director_clusters` link table) and chosen by a route.

use std::collections::BTreeSet;

use sqlx::Row;
use sqlx::any::AnyRow;
use vaas_proto::v1::{Backend, Cluster, Director, ListDirectorsRequest, Probe, Route, TimeProfile};

use crate::resource::ensure_unused;
use crate::resource::{
    Change, ClusterLinks, Condition, Resource, Tx, Value, ensure_reference, ensure_unique,
};
use crate::rows::flag;
use crate::{Error, Result};

/// The clusters that serve a director.
const CLUSTERS: ClusterLinks = ClusterLinks {
    table: "director_clusters",
    owner_column: "director_id",
};

impl Resource for Director {
    const TABLE: &'static str = "directors";
    const COLLECTION: &'static str = "directors";
    const MESSAGE: &'static str = "vaas.v1.Director";
    const KIND: &'static str = "director";
    const FIELD: &'static str = "director";
    const CHANGES_ROUTING: bool = true;
    type Filter = ListDirectorsRequest;

    fn id(&self) -> i64 {
        self.id
    }

    fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    fn columns(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("name", (&self.name).into()),
            ("service", (&self.service).into()),
            ("mode", self.mode.into()),
            ("router", self.router.into()),
            ("route_expression", (&self.route_expression).into()),
            ("active_active", self.active_active.unwrap_or(true).into()),
            ("enabled", self.enabled.unwrap_or(true).into()),
            ("probe_id", optional_reference(self.probe_id)),
            ("time_profile_id", optional_reference(self.time_profile_id)),
            ("protocol", self.protocol.into()),
            ("hashing_policy", self.hashing_policy.into()),
            ("remove_path", self.remove_path.into()),
            ("is_virtual", self.r#virtual.into()),
            ("service_mesh_label", (&self.service_mesh_label).into()),
            ("service_tag", (&self.service_tag).into()),
            (
                "reachable_via_service_mesh",
                self.reachable_via_service_mesh.into(),
            ),
        ]
    }

    /// Converts a row; `cluster_ids` come from the link table in [`Resource::load_links`].
    fn from_row(row: &AnyRow) -> Result<Director> {
        Ok(Director {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            service: row.try_get("service")?,
            cluster_ids: Vec::new(),
            mode: row.try_get::<i64, _>("mode")? as i32,
            router: row.try_get::<i64, _>("router")? as i32,
            route_expression: row.try_get("route_expression")?,
            active_active: Some(flag(row, "active_active")?),
            enabled: Some(flag(row, "enabled")?),
            probe_id: row
                .try_get::<Option<i64>, _>("probe_id")?
                .unwrap_or_default(),
            time_profile_id: row
                .try_get::<Option<i64>, _>("time_profile_id")?
                .unwrap_or_default(),
            protocol: row.try_get::<i64, _>("protocol")? as i32,
            hashing_policy: row.try_get::<i64, _>("hashing_policy")? as i32,
            remove_path: flag(row, "remove_path")?,
            r#virtual: flag(row, "is_virtual")?,
            service_mesh_label: row.try_get("service_mesh_label")?,
            service_tag: row.try_get("service_tag")?,
            reachable_via_service_mesh: flag(row, "reachable_via_service_mesh")?,
        })
    }

    fn conditions(filter: &ListDirectorsRequest) -> Vec<Condition> {
        let mut conditions = Vec::new();
        if filter.cluster_id != 0 {
            conditions.push(Condition::new(
                "id IN (SELECT director_id FROM director_clusters WHERE cluster_id = ?)",
                filter.cluster_id,
            ));
        }
        if !filter.name_prefix.is_empty() {
            conditions.push(Condition::starts_with("name", &filter.name_prefix));
        }
        if let Some(enabled) = filter.enabled {
            conditions.push(Condition::new("enabled = ?", enabled));
        }
        if filter.probe_id != 0 {
            conditions.push(Condition::new("probe_id = ?", filter.probe_id));
        }
        if filter.time_profile_id != 0 {
            conditions.push(Condition::new(
                "time_profile_id = ?",
                filter.time_profile_id,
            ));
        }
        conditions
    }

    async fn check(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unique(tx, self, "name", &self.name, "director.name").await?;
        for &cluster_id in &self.cluster_ids {
            ensure_reference::<Cluster>(tx, "director.cluster_ids", cluster_id).await?;
        }
        if self.probe_id != 0 {
            ensure_reference::<Probe>(tx, "director.probe_id", self.probe_id).await?;
        }
        if self.time_profile_id != 0 {
            ensure_reference::<TimeProfile>(tx, "director.time_profile_id", self.time_profile_id)
                .await?;
        }
        check_routes(self, tx).await
    }

    /// The clusters that served the director and those that serve it now.
    async fn affected(
        _: &mut Tx<'_>,
        before: Option<&Director>,
        after: Option<&Director>,
    ) -> Result<BTreeSet<i64>> {
        Ok(before
            .into_iter()
            .chain(after)
            .flat_map(|director| director.cluster_ids.iter().copied())
            .collect())
    }

    async fn save_links(&self, tx: &mut Tx<'_>, id: i64, _: Change<'_>) -> Result<()> {
        CLUSTERS.save(tx, id, &self.cluster_ids).await
    }

    async fn load_links(tx: &mut Tx<'_>, directors: &mut [Director]) -> Result<()> {
        CLUSTERS
            .fill(tx, directors, |item| item.id, |item| &mut item.cluster_ids)
            .await
    }

    async fn before_delete(&self, tx: &mut Tx<'_>) -> Result<()> {
        ensure_unused::<Director, Backend>(tx, self, "director_id").await?;
        ensure_unused::<Director, Route>(tx, self, "director_id").await
    }
}

/// Keeps the director what its routes need: routable (not virtual), and serving every cluster a
/// route to it lists.
async fn check_routes(director: &Director, tx: &mut Tx<'_>) -> Result<()> {
    let routes: Vec<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT r.id, rc.cluster_id FROM routes r \
         LEFT JOIN route_clusters rc ON rc.route_id = r.id \
         WHERE r.director_id = $1 ORDER BY r.id, rc.cluster_id",
    )
    .bind(director.id)
    .fetch_all(&mut **tx)
    .await?;
    if let Some((route_id, _)) = routes.first().filter(|_| director.r#virtual) {
        return Err(Error::Invalid {
            field: "director.virtual".to_owned(),
            reason: format!(
                "cannot be set: route {route_id} chooses this director, and routes never \
                 choose virtual directors"
            ),
        });
    }
    let kept: BTreeSet<i64> = director.cluster_ids.iter().copied().collect();
    for (route_id, cluster_id) in routes {
        if let Some(cluster_id) = cluster_id.filter(|id| !kept.contains(id)) {
            return Err(Error::Invalid {
                field: "director.cluster_ids".to_owned(),
                reason: format!(
                    "must keep cluster {cluster_id}: route {route_id} sends its requests \
                     there to this director"
                ),
            });
        }
    }
    Ok(())
}

/// Stores an unset reference (0) as NULL, so the foreign key holds.
fn optional_reference(id: i64) -> Value {
    Value::OptionalInt((id != 0).then_some(id))
}
