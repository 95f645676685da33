//! `backups`: the base backups of the PostgreSQL cluster that db agents
//! took and shipped to adm1's store: who took it, when, where its WAL
//! starts and ends, its files with their SHA-256, and how it went.

// The trait signature (async-trait) elides the lifetime of SchemaManager;
// naming it here would not match the trait.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Backups {
    Table,
    Id,
    Node,
    Status,
    Trigger,
    StartedAt,
    FinishedAt,
    SizeBytes,
    Files,
    WalStartLsn,
    WalEndLsn,
    Timeline,
    Error,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Backups::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Backups::Id))
                    .col(string_len(Backups::Node, 63))
                    .col(string_len(Backups::Status, 16))
                    .col(string_len(Backups::Trigger, 80))
                    .col(timestamp_with_time_zone(Backups::StartedAt))
                    .col(timestamp_with_time_zone_null(Backups::FinishedAt))
                    .col(big_integer(Backups::SizeBytes).default(0))
                    .col(text(Backups::Files))
                    .col(string_len_null(Backups::WalStartLsn, 32))
                    .col(string_len_null(Backups::WalEndLsn, 32))
                    .col(integer_null(Backups::Timeline))
                    .col(text_null(Backups::Error))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Backups::Table).to_owned())
            .await
    }
}
