//! `log_lines`: the service log lines agents ship, kept in the database so
//! every server sharing it serves the same lines and they outlive a restart.
//! `id` is the line's `seq`; the server bounds what a node keeps (500 lines
//! a service, 1 MiB of text a node), so the table stays small.

// The trait signature (async-trait) elides the lifetime of SchemaManager;
// naming it here would not match the trait.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum LogLines {
    Table,
    Id,
    Node,
    Service,
    At,
    Line,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(LogLines::Table)
                    .if_not_exists()
                    .col(big_pk_auto(LogLines::Id))
                    .col(string_len(LogLines::Node, 63))
                    .col(string_len(LogLines::Service, 32))
                    .col(timestamp_with_time_zone(LogLines::At))
                    .col(text(LogLines::Line))
                    .to_owned(),
            )
            .await?;
        // Every read and every trim is of one node (and often one service),
        // newest or after a seq.
        manager
            .create_index(
                Index::create()
                    .name("log_lines_node_service_id")
                    .table(LogLines::Table)
                    .col(LogLines::Node)
                    .col(LogLines::Service)
                    .col(LogLines::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("log_lines_node_id")
                    .table(LogLines::Table)
                    .col(LogLines::Node)
                    .col(LogLines::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(LogLines::Table).to_owned())
            .await
    }
}
