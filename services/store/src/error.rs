//! The store's error type.

/// A result of a store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resource addressed by id does not exist.
    #[error("{resource} {id} not found")]
    NotFound {
        /// Kind of resource, for example "backend".
        resource: &'static str,
        /// The id that was asked for.
        id: i64,
    },
    /// The template has no revision with this number.
    #[error("vcl template {template_id} has no revision {revision}")]
    RevisionNotFound {
        /// The template.
        template_id: i64,
        /// The revision asked for.
        revision: i64,
    },
    /// A field refers to a resource that does not exist.
    #[error("{field} refers to {resource} {id}, which does not exist")]
    MissingReference {
        /// The request field, for example "varnish_server.cluster_id".
        field: &'static str,
        /// Kind of the missing resource.
        resource: &'static str,
        /// The id that was given.
        id: i64,
    },
    /// A unique field already has this value.
    #[error("{field} {value:?} is already taken")]
    AlreadyExists {
        /// The request field, for example "dc.symbol".
        field: &'static str,
        /// The value that is taken.
        value: String,
    },
    /// The resource cannot be deleted while others refer to it.
    #[error("{resource} {id} is still used by {users}")]
    InUse {
        /// Kind of resource.
        resource: &'static str,
        /// Its id.
        id: i64,
        /// What refers to it, for people, for example "3 varnish servers".
        users: String,
    },
    /// The change is well-formed but refused as a whole: it would contradict the rest of the
    /// configuration (a route to a director its clusters do not serve, a positive URL that would
    /// reach another director). Nothing was saved.
    #[error("{field} {reason}")]
    Invalid {
        /// The request field the refusal is about, for example "route.director_id".
        field: String,
        /// Why, for people.
        reason: String,
    },
    /// A resource name that is neither "collection" nor "collection/id".
    #[error(
        "resource must be a collection such as \"backends\" or a name such as \"backends/7\", not {name:?}"
    )]
    InvalidResourceName {
        /// The name that was given.
        name: String,
    },
    /// A page token that this store did not hand out.
    #[error("page_token is not valid")]
    InvalidPageToken,
    /// The database URL names no supported database.
    #[error("database url must start with postgres://, postgresql:// or sqlite:")]
    UnsupportedUrl,
    /// The schema could not be brought up to date.
    #[error("cannot migrate the store schema")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A task write of a scheduler term that no longer holds the leader lease.
    #[error("scheduler term {term} no longer leads (term {current} holds the lease)")]
    Fenced {
        /// The term of the refused write.
        term: i64,
        /// The term holding the lease.
        current: i64,
    },
    /// The operating system could not provide random bytes for a secret.
    #[error("cannot generate a secret: {0}")]
    Random(String),
    /// The database failed or could not be reached.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The batch the write was committed in failed to commit (the error is shared by every
    /// write of the batch).
    #[error("database error: the write's batch did not commit")]
    Commit(std::sync::Arc<sqlx::Error>),
    /// The store's writer stopped, or the write's body panicked, before the write committed.
    #[error("the write was lost before it committed: nothing was saved; try again")]
    WriteLost,
}
