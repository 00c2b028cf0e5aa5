//! The generic resource layer: one trait that a configuration resource implements once, and the
//! create / get / list / update / delete that every resource shares.
//!
//! A resource names its table and its writable columns (with their values) in one list, converts
//! a row back into its message, checks references and uniqueness, and says which clusters a change
//! touches from the item before and after it. Everything else — the write transaction with its
//! store timestamp, the reload tasks and outbox rows, paging, not-found errors — lives here, so
//! no resource can forget the clusters an update leaves or bind its columns in the wrong order.

use std::collections::BTreeSet;
use std::future::Future;

use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row, Transaction};

use crate::write::{Write, WriteOutcome};
use crate::{Error, Result, Store, audit};

/// The most bytes of items one page of a listing holds (at least one item): below gRPC's usual
/// 4 MiB message limit, so that every client can read every page.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// The open transaction a write runs in.
pub type Tx<'c> = Transaction<'c, Any>;

/// A page of a listing: the items and the token of the next page (empty on the last page).
pub type Page<T> = (Vec<T>, String);

/// The value of one column, bound to a statement.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An integer (also booleans, as 0/1, enums and durations in microseconds).
    Int(i64),
    /// A text.
    Text(String),
    /// An integer that may be NULL.
    OptionalInt(Option<i64>),
}

impl From<i64> for Value {
    fn from(value: i64) -> Value {
        Value::Int(value)
    }
}

impl From<i32> for Value {
    fn from(value: i32) -> Value {
        Value::Int(i64::from(value))
    }
}

impl From<u32> for Value {
    fn from(value: u32) -> Value {
        Value::Int(i64::from(value))
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Value {
        Value::Int(i64::from(value))
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Value {
        Value::Text(value.to_owned())
    }
}

impl From<&String> for Value {
    fn from(value: &String) -> Value {
        Value::Text(value.clone())
    }
}

impl From<Option<i64>> for Value {
    fn from(value: Option<i64>) -> Value {
        Value::OptionalInt(value)
    }
}

/// What a write knows about itself: when it happens and who makes it.
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    /// The store timestamp of the write.
    pub timestamp: i64,
    /// Who makes it, as the audit history records it.
    pub actor: &'a str,
}

/// One condition of a listing: SQL with a single `?` for the bound value.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    sql: String,
    value: Value,
}

impl Condition {
    /// Creates a condition; `value` is bound at every `?` of `sql`.
    pub fn new(sql: impl Into<String>, value: impl Into<Value>) -> Condition {
        Condition {
            sql: sql.into(),
            value: value.into(),
        }
    }

    /// Matches rows whose `column` starts with `prefix`, ignoring ASCII case (the same on both
    /// stores: PostgreSQL's LIKE minds case, SQLite's does not).
    pub fn starts_with(column: &str, prefix: &str) -> Condition {
        let pattern = format!("{}%", escape_like(&prefix.to_ascii_lowercase()));
        Condition::new(
            format!("LOWER({column}) LIKE ? ESCAPE '\\'"),
            Value::Text(pattern),
        )
    }

    /// Matches rows whose list column (values joined by newlines) holds `item`.
    pub fn list_contains(column: &str, item: &str) -> Condition {
        let pattern = format!("%\n{}\n%", escape_like(item));
        Condition::new(
            format!("('\n' || {column} || '\n') LIKE ? ESCAPE '\\'"),
            Value::Text(pattern),
        )
    }
}

/// Returns the conditions of a listing that filters only by a name prefix (none when empty).
pub(crate) fn name_prefix(prefix: &str) -> Vec<Condition> {
    if prefix.is_empty() {
        return Vec::new();
    }
    vec![Condition::starts_with("name", prefix)]
}

/// Escapes LIKE's wildcards so that `text` matches only itself.
fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A configuration resource stored one row per item in its own table.
///
/// Implement it once per resource (one file under `resources/`); the generic operations on
/// [`Store`] do the rest.
pub trait Resource: prost::Message + Default + Clone + Unpin + 'static {
    /// The table.
    const TABLE: &'static str;
    /// The collection in resource names such as "backends/7".
    const COLLECTION: &'static str;
    /// The full name of the protobuf message, for example "vaas.v1.Backend".
    const MESSAGE: &'static str;
    /// The resource's name in errors and task descriptions, for example "varnish server".
    const KIND: &'static str;
    /// The request field that holds the resource, for example "varnish_server".
    const FIELD: &'static str;
    /// Whether a change of the resource can change where requests are routed (which director a
    /// URL reaches): such writes run the store's routing check before they commit.
    const CHANGES_ROUTING: bool = false;
    /// What a listing can be filtered by (the list request).
    type Filter: Send + Sync;

    /// Returns the identifier (0 before the item is created).
    fn id(&self) -> i64;

    /// Sets the identifier (a bulk replace gives a wanted item the id of the stored one).
    fn set_id(&mut self, id: i64);

    /// Returns the writable columns with their values: the one column list of the resource.
    fn columns(&self) -> Vec<(&'static str, Value)>;

    /// Converts a row of `SELECT *` from the table.
    fn from_row(row: &AnyRow) -> Result<Self>;

    /// Returns the conditions a listing applies for `filter`.
    fn conditions(filter: &Self::Filter) -> Vec<Condition>;

    /// Checks references and uniqueness before the item is written; errors name request fields.
    fn check(&self, tx: &mut Tx<'_>) -> impl Future<Output = Result<()>> + Send;

    /// Returns the clusters whose VCL may change when `before` becomes `after` (`None` for the
    /// side of a create or a delete that has no item).
    fn affected(
        tx: &mut Tx<'_>,
        before: Option<&Self>,
        after: Option<&Self>,
    ) -> impl Future<Output = Result<BTreeSet<i64>>> + Send;

    /// Writes what lives outside the row (link tables, revisions) once the row with `id` is
    /// written by `change`.
    fn save_links(
        &self,
        tx: &mut Tx<'_>,
        id: i64,
        change: Change<'_>,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (tx, id, change);
        async { Ok(()) }
    }

    /// Fills in what lives outside the rows of `items`.
    fn load_links(tx: &mut Tx<'_>, items: &mut [Self]) -> impl Future<Output = Result<()>> + Send {
        let _ = (tx, items);
        async { Ok(()) }
    }

    /// Refuses to delete the item while others use it, and removes what only it used.
    fn before_delete(&self, tx: &mut Tx<'_>) -> impl Future<Output = Result<()>> + Send {
        let _ = tx;
        async { Ok(()) }
    }
}

impl Store {
    /// Creates `item`, whose id must be 0 (the API's validation clears it), with a reload task
    /// for every affected cluster.
    pub async fn create<R: Resource>(&self, item: &R) -> Result<WriteOutcome<R>> {
        let store = self.clone();
        let item = item.clone();
        self.write(move |write| {
            Box::pin(async move {
                let mut affected = BTreeSet::new();
                let created = store.create_in(write, &item, &mut affected).await?;
                let description = format!("create {} {}", R::KIND, created.id());
                store
                    .finish_write(write, created, affected, description)
                    .await
            })
        })
        .await
    }

    /// Returns the item with `id`.
    pub async fn get<R: Resource>(&self, id: i64) -> Result<R> {
        let mut transaction = self.pool.begin().await?;
        let item = fetch_in::<R>(&mut transaction, id).await?;
        transaction.commit().await?;
        Ok(item)
    }

    /// Lists a page of items matching `filter`, in id order.
    pub async fn list<R: Resource>(
        &self,
        filter: &R::Filter,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<R>> {
        let limit = page_limit(page_size);
        let after = parse_page_token(page_token)?;
        let (conditions, values) = where_clause(R::conditions(filter), 2);
        let sql = format!(
            "SELECT * FROM {} WHERE id > $1{conditions} ORDER BY id LIMIT ${}",
            R::TABLE,
            values.len() + 2
        );
        let mut transaction = self.pool.begin().await?;
        let rows = bind_values(sqlx::query(&sql).bind(after), values)
            .bind(limit + 1)
            .fetch_all(&mut *transaction)
            .await?;
        let (rows, mut next) = cut_page(rows, limit, |row| row.try_get::<i64, _>("id"));
        let mut items = rows.iter().map(R::from_row).collect::<Result<Vec<_>>>()?;
        // A page also ends before it outgrows what any gRPC client accepts by default (five
        // 1 MiB templates would otherwise make one answer too big to read).
        let mut bytes = 0;
        if let Some(fits) = items.iter().position(|item| {
            bytes += item.encoded_len();
            bytes > MAX_PAGE_BYTES
        }) {
            let keep = fits.max(1);
            if keep < items.len() {
                items.truncate(keep);
                next = items
                    .last()
                    .map(|item| item.id().to_string())
                    .unwrap_or_default();
            }
        }
        R::load_links(&mut transaction, &mut items).await?;
        transaction.commit().await?;
        Ok((items, next))
    }

    /// Replaces the writable fields of the item `item.id()`; reloads the clusters it touched
    /// before and touches now.
    pub async fn update<R: Resource>(&self, item: &R) -> Result<WriteOutcome<R>> {
        let item = item.clone();
        self.update_with(item.id(), move |_| Ok::<R, Error>(item))
            .await
    }

    /// Changes the item with `id` to what `change` makes of it as stored, inside the write
    /// transaction, so that no concurrent write slips in between the read and the write (partial
    /// updates merge into the stored item this way). Reloads the clusters the item touched
    /// before and touches now.
    pub async fn update_with<R, E>(
        &self,
        id: i64,
        change: impl FnOnce(&R) -> std::result::Result<R, E> + Send + 'static,
    ) -> std::result::Result<WriteOutcome<R>, E>
    where
        R: Resource,
        E: From<Error> + Send + 'static,
    {
        let store = self.clone();
        self.write(move |write| {
            Box::pin(async move {
                let mut affected = BTreeSet::new();
                let before = fetch_in::<R>(&mut write.transaction, id).await?;
                let item = change(&before)?;
                let after = store.update_in(write, before, &item, &mut affected).await?;
                let description = format!("update {} {id}", R::KIND);
                Ok(store
                    .finish_write(write, after, affected, description)
                    .await?)
            })
        })
        .await
    }

    /// Applies `change` to every item of `ids` in one write, with one reload task per affected
    /// cluster (not one per item). Nothing is saved when any item is refused.
    pub async fn update_many_with<R, E>(
        &self,
        ids: &[i64],
        change: impl Fn(&R) -> std::result::Result<R, E> + Send + 'static,
    ) -> std::result::Result<WriteOutcome<Vec<R>>, E>
    where
        R: Resource,
        E: From<Error> + Send + 'static,
    {
        let store = self.clone();
        let unique: BTreeSet<i64> = ids.iter().copied().collect();
        self.write(move |write| {
            Box::pin(async move {
                let mut affected = BTreeSet::new();
                let mut updated = Vec::with_capacity(unique.len());
                for &id in &unique {
                    let before = fetch_in::<R>(&mut write.transaction, id).await?;
                    let item = change(&before)?;
                    updated.push(store.update_in(write, before, &item, &mut affected).await?);
                }
                let description = format!("update {} {}s", unique.len(), R::KIND);
                Ok(store
                    .finish_write(write, updated, affected, description)
                    .await?)
            })
        })
        .await
    }

    /// Makes the items matching `scope` exactly `wanted`, in one write: an item with the same
    /// `key` as a stored one updates it (keeping its id), a new key creates an item, and stored
    /// items whose key is not wanted are deleted. One reload task per affected cluster.
    pub async fn replace_all<R, K>(
        &self,
        scope: &R::Filter,
        wanted: &[R],
        key: impl Fn(&R) -> K + Send + 'static,
        description: String,
    ) -> Result<WriteOutcome<Vec<R>>>
    where
        R: Resource,
        K: Ord + Send + 'static,
    {
        let store = self.clone();
        let wanted = wanted.to_vec();
        let (conditions, values) = where_clause(R::conditions(scope), 1);
        let sql = format!(
            "SELECT * FROM {} WHERE 1 = 1{conditions} ORDER BY id",
            R::TABLE
        );
        self.write(move |write| {
            Box::pin(async move {
                let mut affected = BTreeSet::new();
                let rows = bind_values(sqlx::query(&sql), values)
                    .fetch_all(&mut *write.transaction)
                    .await?;
                let mut stored: std::collections::BTreeMap<K, R> =
                    std::collections::BTreeMap::new();
                for row in &rows {
                    let item = R::from_row(row)?;
                    stored.insert(key(&item), item);
                }
                let mut result = Vec::with_capacity(wanted.len());
                for item in &wanted {
                    let saved = match stored.remove(&key(item)) {
                        Some(before) => {
                            let mut fields = item.clone();
                            fields.set_id(before.id());
                            let mut before = vec![before];
                            R::load_links(&mut write.transaction, &mut before).await?;
                            let before = before.remove(0);
                            store
                                .update_in(write, before, &fields, &mut affected)
                                .await?
                        }
                        None => store.create_in(write, item, &mut affected).await?,
                    };
                    result.push(saved);
                }
                for (_, unwanted) in stored {
                    store
                        .delete_in::<R>(write, unwanted.id(), &mut affected)
                        .await?;
                }
                store
                    .finish_write(write, result, affected, description)
                    .await
            })
        })
        .await
    }

    /// Deletes the item with `id`, unless others still use it.
    pub async fn delete<R: Resource>(&self, id: i64) -> Result<WriteOutcome<()>> {
        let store = self.clone();
        self.write(move |write| {
            Box::pin(async move {
                let mut affected = BTreeSet::new();
                store.delete_in::<R>(write, id, &mut affected).await?;
                let description = format!("delete {} {id}", R::KIND);
                store.finish_write(write, (), affected, description).await
            })
        })
        .await
    }

    /// Inserts `item` inside `write`; adds the clusters it touches to `affected`.
    async fn create_in<R: Resource>(
        &self,
        write: &mut Write<'_>,
        item: &R,
        affected: &mut BTreeSet<i64>,
    ) -> Result<R> {
        if R::CHANGES_ROUTING {
            write.routing_changed.get_or_insert(R::FIELD);
        }
        let tx = &mut write.transaction;
        item.check(tx).await?;
        let columns = item.columns();
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let placeholders: Vec<String> = (1..=columns.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({}) RETURNING id",
            R::TABLE,
            names.join(", "),
            placeholders.join(", ")
        );
        let row = bind_values(sqlx::query(&sql), columns)
            .fetch_one(&mut **tx)
            .await?;
        let id: i64 = row.try_get("id")?;
        let change = Change {
            timestamp: write.timestamp,
            actor: &self.actor,
        };
        item.save_links(tx, id, change).await?;
        let created = fetch_in::<R>(tx, id).await?;
        audit::record(tx, write.timestamp, &self.actor, None, Some(&created)).await?;
        affected.extend(R::affected(tx, None, Some(&created)).await?);
        Ok(created)
    }

    /// Writes `item` over `before` inside `write`; adds the clusters it touched before and
    /// touches now to `affected`.
    async fn update_in<R: Resource>(
        &self,
        write: &mut Write<'_>,
        before: R,
        item: &R,
        affected: &mut BTreeSet<i64>,
    ) -> Result<R> {
        if R::CHANGES_ROUTING {
            write.routing_changed.get_or_insert(R::FIELD);
        }
        let tx = &mut write.transaction;
        let id = before.id();
        item.check(tx).await?;
        let columns = item.columns();
        let assignments: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(index, (name, _))| format!("{name} = ${}", index + 1))
            .collect();
        let sql = format!(
            "UPDATE {} SET {} WHERE id = ${}",
            R::TABLE,
            assignments.join(", "),
            columns.len() + 1
        );
        bind_values(sqlx::query(&sql), columns)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let change = Change {
            timestamp: write.timestamp,
            actor: &self.actor,
        };
        item.save_links(tx, id, change).await?;
        let after = fetch_in::<R>(tx, id).await?;
        audit::record(
            tx,
            write.timestamp,
            &self.actor,
            Some(&before),
            Some(&after),
        )
        .await?;
        affected.extend(R::affected(tx, Some(&before), Some(&after)).await?);
        Ok(after)
    }

    /// Deletes the item with `id` inside `write`; adds the clusters it touched to `affected`.
    async fn delete_in<R: Resource>(
        &self,
        write: &mut Write<'_>,
        id: i64,
        affected: &mut BTreeSet<i64>,
    ) -> Result<()> {
        if R::CHANGES_ROUTING {
            write.routing_changed.get_or_insert(R::FIELD);
        }
        let tx = &mut write.transaction;
        let before = fetch_in::<R>(tx, id).await?;
        before.before_delete(tx).await?;
        audit::record(tx, write.timestamp, &self.actor, Some(&before), None::<&R>).await?;
        affected.extend(R::affected(tx, Some(&before), None).await?);
        sqlx::query(&format!("DELETE FROM {} WHERE id = $1", R::TABLE))
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// Returns ` AND …` for `conditions`, numbering their placeholders from `first`, and the values
/// to bind in that order.
fn where_clause(conditions: Vec<Condition>, first: usize) -> (String, Vec<(&'static str, Value)>) {
    let mut sql = String::new();
    let mut values = Vec::with_capacity(conditions.len());
    for (index, condition) in conditions.into_iter().enumerate() {
        sql.push_str(" AND ");
        sql.push_str(&condition.sql.replace('?', &format!("${}", index + first)));
        values.push(("", condition.value));
    }
    (sql, values)
}

/// Binds `values` in order; their column names are the caller's business.
pub(crate) fn bind_values<'q>(
    mut query: Query<'q, Any, AnyArguments<'q>>,
    values: impl IntoIterator<Item = (&'static str, Value)>,
) -> Query<'q, Any, AnyArguments<'q>> {
    for (_, value) in values {
        query = match value {
            Value::Int(value) => query.bind(value),
            Value::Text(value) => query.bind(value),
            Value::OptionalInt(value) => query.bind(value),
        };
    }
    query
}

/// Reads the item with `id` inside `tx`, with its links.
pub(crate) async fn fetch_in<R: Resource>(tx: &mut Tx<'_>, id: i64) -> Result<R> {
    let mut items = select::<R>(tx, "id = $1", id).await?;
    if items.is_empty() {
        return Err(Error::NotFound {
            resource: R::KIND,
            id,
        });
    }
    Ok(items.remove(0))
}

/// Reads the items matching `condition` (SQL with `$1` bound to `value`) in id order, with their
/// links.
pub(crate) async fn select<R: Resource>(
    tx: &mut Tx<'_>,
    condition: &str,
    value: i64,
) -> Result<Vec<R>> {
    let rows = sqlx::query(&format!(
        "SELECT * FROM {} WHERE {condition} ORDER BY id",
        R::TABLE
    ))
    .bind(value)
    .fetch_all(&mut **tx)
    .await?;
    let mut items = rows.iter().map(R::from_row).collect::<Result<Vec<_>>>()?;
    R::load_links(tx, &mut items).await?;
    Ok(items)
}

/// Fails with a reference error naming `field` unless an `R` with `id` exists.
pub(crate) async fn ensure_reference<R: Resource>(
    tx: &mut Tx<'_>,
    field: &'static str,
    id: i64,
) -> Result<()> {
    let found: Option<i64> =
        sqlx::query_scalar(&format!("SELECT id FROM {} WHERE id = $1", R::TABLE))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    match found {
        Some(_) => Ok(()),
        None => Err(Error::MissingReference {
            field,
            resource: R::KIND,
            id,
        }),
    }
}

/// Fails with an already-exists error naming `field` when another item than `item` has `value`
/// in `column`, ignoring ASCII case: names end up in VCL symbols, which are case-insensitive.
pub(crate) async fn ensure_unique<R: Resource>(
    tx: &mut Tx<'_>,
    item: &R,
    column: &str,
    value: &str,
    field: &'static str,
) -> Result<()> {
    let taken: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE LOWER({column}) = LOWER($1) AND id <> $2",
        R::TABLE
    ))
    .bind(value)
    .bind(item.id())
    .fetch_optional(&mut **tx)
    .await?;
    match taken {
        Some(_) => Err(Error::AlreadyExists {
            field,
            value: value.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Fails with an in-use error while rows of `U` refer to `item` through `column`.
pub(crate) async fn ensure_unused<R: Resource, U: Resource>(
    tx: &mut Tx<'_>,
    item: &R,
    column: &str,
) -> Result<()> {
    let count: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM {} WHERE {column} = $1",
        U::TABLE
    ))
    .bind(item.id())
    .fetch_one(&mut **tx)
    .await?;
    if count > 0 {
        return Err(Error::InUse {
            resource: R::KIND,
            id: item.id(),
            users: format!("{count} {}s", U::KIND),
        });
    }
    Ok(())
}

/// Returns the ids that `sql` selects with `$1` bound to each of `keys`, together.
pub(crate) async fn ids_for_each(
    tx: &mut Tx<'_>,
    sql: &str,
    keys: impl IntoIterator<Item = i64>,
) -> Result<BTreeSet<i64>> {
    let keys: BTreeSet<i64> = keys.into_iter().collect();
    let mut found = BTreeSet::new();
    for key in keys {
        found.extend(ids(tx, sql, key).await?);
    }
    Ok(found)
}

/// Returns the clusters that serve the directors whose `column` is `id` (their probe, their time
/// profile …).
pub(crate) async fn clusters_of_directors_with(
    tx: &mut Tx<'_>,
    column: &str,
    id: i64,
) -> Result<BTreeSet<i64>> {
    let sql = format!(
        "SELECT dcl.cluster_id FROM director_clusters dcl \
         JOIN directors d ON d.id = dcl.director_id WHERE d.{column} = $1"
    );
    ids(tx, &sql, id).await
}

/// The link table of a resource served by clusters (`director_clusters`, `route_clusters`,
/// `domain_mapping_clusters`): its name and the column of the resource's id.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClusterLinks {
    pub(crate) table: &'static str,
    pub(crate) owner_column: &'static str,
}

impl ClusterLinks {
    /// Makes the clusters of item `id` exactly `cluster_ids` (duplicates written once).
    pub(crate) async fn save(self, tx: &mut Tx<'_>, id: i64, cluster_ids: &[i64]) -> Result<()> {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE {} = $1",
            self.table, self.owner_column
        ))
        .bind(id)
        .execute(&mut **tx)
        .await?;
        let insert = format!(
            "INSERT INTO {} ({}, cluster_id) VALUES ($1, $2)",
            self.table, self.owner_column
        );
        let unique: BTreeSet<i64> = cluster_ids.iter().copied().collect();
        for cluster_id in unique {
            sqlx::query(&insert)
                .bind(id)
                .bind(cluster_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Fills in the clusters of every item (in cluster id order) with one query over the items'
    /// id range, instead of one per item: a snapshot of 500 directors, read inside a write that
    /// holds the store clock, is one round trip.
    pub(crate) async fn fill<T>(
        self,
        tx: &mut Tx<'_>,
        items: &mut [T],
        id: impl Fn(&T) -> i64,
        cluster_ids: impl Fn(&mut T) -> &mut Vec<i64>,
    ) -> Result<()> {
        let (Some(low), Some(high)) = (items.iter().map(&id).min(), items.iter().map(&id).max())
        else {
            return Ok(());
        };
        let links: Vec<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT {owner}, cluster_id FROM {table} WHERE {owner} BETWEEN $1 AND $2 \
             ORDER BY {owner}, cluster_id",
            owner = self.owner_column,
            table = self.table
        ))
        .bind(low)
        .bind(high)
        .fetch_all(&mut **tx)
        .await?;
        let mut by_owner: std::collections::HashMap<i64, Vec<i64>> =
            std::collections::HashMap::new();
        for (owner, cluster_id) in links {
            by_owner.entry(owner).or_default().push(cluster_id);
        }
        for item in items {
            *cluster_ids(item) = by_owner.remove(&id(item)).unwrap_or_default();
        }
        Ok(())
    }
}

/// Returns the item after an update; `None` for a create or a delete (the side that only
/// changes what refers to the item, which nothing can while it is new or being deleted).
pub(crate) fn updated<'a, R>(before: Option<&R>, after: Option<&'a R>) -> Option<&'a R> {
    before.and(after)
}

/// Fails with an already-exists error naming `field` when another item with the same
/// `scope_column` (a parent such as the cluster) has `value` in `column`.
pub(crate) async fn ensure_unique_within<R: Resource>(
    tx: &mut Tx<'_>,
    item: &R,
    (scope_column, scope_id): (&str, i64),
    (column, value): (&str, &str),
    field: &'static str,
) -> Result<()> {
    let taken: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE {scope_column} = $1 AND {column} = $2 AND id <> $3",
        R::TABLE
    ))
    .bind(scope_id)
    .bind(value)
    .bind(item.id())
    .fetch_optional(&mut **tx)
    .await?;
    match taken {
        Some(_) => Err(Error::AlreadyExists {
            field,
            value: value.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Returns the ids that `sql` (with `$1` bound to `id`) selects.
pub(crate) async fn ids(tx: &mut Tx<'_>, sql: &str, id: i64) -> Result<BTreeSet<i64>> {
    let ids: Vec<i64> = sqlx::query_scalar(sql)
        .bind(id)
        .fetch_all(&mut **tx)
        .await?;
    Ok(ids.into_iter().collect())
}

/// Returns the number of items a page holds: 100 by default, at most 1000.
pub(crate) fn page_limit(page_size: i32) -> i64 {
    match page_size {
        size if size <= 0 => 100,
        size => i64::from(size.min(1000)),
    }
}

/// Parses a page token handed out by this store: the last key of the previous page.
pub(crate) fn parse_page_token(token: &str) -> Result<i64> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse().map_err(|_| Error::InvalidPageToken)
}

/// Keeps `limit` rows and, when there were more, returns the last kept key as the next token.
pub(crate) fn cut_page(
    mut rows: Vec<AnyRow>,
    limit: i64,
    key: impl Fn(&AnyRow) -> std::result::Result<i64, sqlx::Error>,
) -> (Vec<AnyRow>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() <= limit {
        return (rows, String::new());
    }
    rows.truncate(limit);
    let next = rows
        .last()
        .and_then(|row| key(row).ok())
        .map(|key| key.to_string())
        .unwrap_or_default();
    (rows, next)
}
