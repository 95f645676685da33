//! `host_agents`: when the leading server last saw a host agent of each
//! provider poll, so every server sharing the database knows whether one is
//! connected (a host agent polls only the leader, which files the orders).

// The trait signature (async-trait) elides the lifetime of SchemaManager;
// naming it here would not match the trait.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum HostAgents {
    Table,
    Provider,
    SeenAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(HostAgents::Table)
                    .if_not_exists()
                    .col(string_len(HostAgents::Provider, 16).primary_key())
                    .col(timestamp_with_time_zone(HostAgents::SeenAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(HostAgents::Table).to_owned())
            .await
    }
}
