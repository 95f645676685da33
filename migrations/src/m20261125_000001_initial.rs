//! The first schema: nodes, their work orders, the topology spec and the
//! audit log.

// The trait signature (async-trait) elides the lifetime of SchemaManager;
// naming it here would not match the trait.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Nodes {
    Table,
    Id,
    Name,
    Role,
    Address,
    Provider,
    State,
    TokenHash,
    LastSeq,
    LastHeartbeat,
    Observed,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum WorkOrders {
    Table,
    Id,
    NodeId,
    Seq,
    Kind,
    Payload,
    Status,
    Result,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Topology {
    Table,
    Id,
    Web,
    Db,
    LbPolicy,
    Replication,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Id,
    At,
    Actor,
    Kind,
    Subject,
    Message,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Nodes::Table)
                    .if_not_exists()
                    .col(pk_auto(Nodes::Id))
                    .col(string_len_uniq(Nodes::Name, 63))
                    .col(string_len(Nodes::Role, 16))
                    .col(string_len_uniq(Nodes::Address, 64))
                    .col(string_len(Nodes::Provider, 16))
                    .col(string_len(Nodes::State, 16))
                    .col(string_len_null(Nodes::TokenHash, 64))
                    .col(big_integer(Nodes::LastSeq).default(0))
                    .col(timestamp_with_time_zone_null(Nodes::LastHeartbeat))
                    .col(text_null(Nodes::Observed))
                    .col(timestamp_with_time_zone(Nodes::CreatedAt))
                    .col(timestamp_with_time_zone(Nodes::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_nodes_token_hash")
                    .table(Nodes::Table)
                    .col(Nodes::TokenHash)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(WorkOrders::Table)
                    .if_not_exists()
                    .col(big_pk_auto(WorkOrders::Id))
                    .col(integer(WorkOrders::NodeId))
                    .col(big_integer(WorkOrders::Seq))
                    .col(string_len(WorkOrders::Kind, 32))
                    .col(text(WorkOrders::Payload))
                    .col(string_len(WorkOrders::Status, 16))
                    .col(text_null(WorkOrders::Result))
                    .col(timestamp_with_time_zone(WorkOrders::CreatedAt))
                    .col(timestamp_with_time_zone(WorkOrders::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_work_orders_node")
                            .from(WorkOrders::Table, WorkOrders::NodeId)
                            .to(Nodes::Table, Nodes::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_work_orders_node_seq")
                    .table(WorkOrders::Table)
                    .col(WorkOrders::NodeId)
                    .col(WorkOrders::Seq)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Topology::Table)
                    .if_not_exists()
                    .col(integer(Topology::Id).primary_key())
                    .col(integer(Topology::Web))
                    .col(integer(Topology::Db))
                    .col(string_len(Topology::LbPolicy, 16))
                    .col(string_len(Topology::Replication, 16))
                    .col(timestamp_with_time_zone(Topology::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Events::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Events::Id))
                    .col(timestamp_with_time_zone(Events::At))
                    .col(string_len(Events::Actor, 80))
                    .col(string_len(Events::Kind, 64))
                    .col(string_len(Events::Subject, 80))
                    .col(text(Events::Message))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Events::Table.into_iden(),
            Topology::Table.into_iden(),
            WorkOrders::Table.into_iden(),
            Nodes::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
