//! corral's schema, as append-only sea-orm migrations that the server runs at
//! start. The same migrations serve SQLite and PostgreSQL; never edit one that
//! has landed, add a new one.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_initial;
mod m20261203_000001_enrollment_secrets;
mod m20261203_000002_backups;
mod m20261203_000003_backup_schedule;
mod m20261203_000004_metrics;
mod m20261203_000005_backup_s3;
mod m20261205_000001_log_lines;
mod m20261205_000002_host_agents;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_initial::Migration),
            Box::new(m20261203_000001_enrollment_secrets::Migration),
            Box::new(m20261203_000002_backups::Migration),
            Box::new(m20261203_000003_backup_schedule::Migration),
            Box::new(m20261203_000004_metrics::Migration),
            Box::new(m20261203_000005_backup_s3::Migration),
            Box::new(m20261205_000001_log_lines::Migration),
            Box::new(m20261205_000002_host_agents::Migration),
        ]
    }
}
