//! The backup schedule in the topology: the time of day (`HH:MM`, UTC) of
//! the daily base backup and how many finished backups are kept; both
//! null when no backup is scheduled.

// The trait signature (async-trait) elides the lifetime of SchemaManager;
// naming it here would not match the trait.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Topology {
    Table,
    BackupSchedule,
    BackupKeep,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Topology::Table)
                    .add_column(string_len_null(Topology::BackupSchedule, 16))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Topology::Table)
                    .add_column(integer_null(Topology::BackupKeep))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Topology::BackupKeep, Topology::BackupSchedule] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Topology::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
