//! Schema migrations: SQL files under `migrations/postgres` and `migrations/sqlite`, embedded in
//! the binary and applied by sqlx's migrator (which records them in `_sqlx_migrations`, checks
//! that an applied file was never edited, and on PostgreSQL holds an advisory lock so that
//! replicas starting together do not race).
//!
//! A migration once released is never edited, only followed by another with the next number in
//! both folders.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

use crate::{Dialect, Result, Store};

/// One migration, written once per dialect.
struct Step {
    version: i64,
    description: &'static str,
    postgres: &'static str,
    sqlite: &'static str,
}

/// The migrations in order.
const STEPS: &[Step] = &[
    Step {
        version: 1,
        description: "initial",
        postgres: include_str!("../migrations/postgres/0001_initial.sql"),
        sqlite: include_str!("../migrations/sqlite/0001_initial.sql"),
    },
    Step {
        version: 2,
        description: "probes time profiles director fields",
        postgres: include_str!(
            "../migrations/postgres/0002_probes_time_profiles_director_fields.sql"
        ),
        sqlite: include_str!("../migrations/sqlite/0002_probes_time_profiles_director_fields.sql"),
    },
    Step {
        version: 3,
        description: "audit entries",
        postgres: include_str!("../migrations/postgres/0003_audit_entries.sql"),
        sqlite: include_str!("../migrations/sqlite/0003_audit_entries.sql"),
    },
    Step {
        version: 4,
        description: "vcl variables template blocks revisions",
        postgres: include_str!(
            "../migrations/postgres/0004_vcl_variables_template_blocks_revisions.sql"
        ),
        sqlite: include_str!(
            "../migrations/sqlite/0004_vcl_variables_template_blocks_revisions.sql"
        ),
    },
    Step {
        version: 5,
        description: "unsafe settings",
        postgres: include_str!("../migrations/postgres/0005_unsafe_settings.sql"),
        sqlite: include_str!("../migrations/sqlite/0005_unsafe_settings.sql"),
    },
    Step {
        version: 6,
        description: "access tokens",
        postgres: include_str!("../migrations/postgres/0006_access_tokens.sql"),
        sqlite: include_str!("../migrations/sqlite/0006_access_tokens.sql"),
    },
    Step {
        version: 7,
        description: "leader lease",
        postgres: include_str!("../migrations/postgres/0007_leader_lease.sql"),
        sqlite: include_str!("../migrations/sqlite/0007_leader_lease.sql"),
    },
    Step {
        version: 8,
        description: "server sync",
        postgres: include_str!("../migrations/postgres/0008_server_sync.sql"),
        sqlite: include_str!("../migrations/sqlite/0008_server_sync.sql"),
    },
    Step {
        version: 9,
        description: "reload progress",
        postgres: include_str!("../migrations/postgres/0009_reload_progress.sql"),
        sqlite: include_str!("../migrations/sqlite/0009_reload_progress.sql"),
    },
    Step {
        version: 10,
        description: "routes",
        postgres: include_str!("../migrations/postgres/0010_routes.sql"),
        sqlite: include_str!("../migrations/sqlite/0010_routes.sql"),
    },
    Step {
        version: 11,
        description: "domain mappings and redirects",
        postgres: include_str!("../migrations/postgres/0011_domain_mappings_redirects.sql"),
        sqlite: include_str!("../migrations/sqlite/0011_domain_mappings_redirects.sql"),
    },
    Step {
        version: 12,
        description: "cc_command",
        postgres: include_str!("../migrations/postgres/0012_cc_command.sql"),
        sqlite: include_str!("../migrations/sqlite/0012_cc_command.sql"),
    },
];

/// Returns sqlx's migrator for `dialect`. It is built here rather than with `sqlx::migrate!`,
/// which would compile every database driver a second time into a proc-macro (minutes of build
/// time on two cores); the fields it fills are the ones that macro fills.
fn migrator(dialect: Dialect) -> Migrator {
    let migrations = STEPS
        .iter()
        .map(|step| {
            let sql = match dialect {
                Dialect::Postgres => step.postgres,
                Dialect::Sqlite => step.sqlite,
            };
            Migration::new(
                step.version,
                Cow::Borrowed(step.description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

/// Brings the schema up to date.
pub(crate) async fn apply(store: &Store) -> Result<()> {
    migrator(store.dialect).run(&store.pool).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_has_sql_for_both_dialects_and_versions_increase() {
        let mut last = 0;
        for step in STEPS {
            assert!(step.version > last, "versions must increase");
            last = step.version;
            assert!(!step.postgres.trim().is_empty() && !step.sqlite.trim().is_empty());
        }
        assert_eq!(migrator(Dialect::Sqlite).iter().count(), STEPS.len());
    }
}
