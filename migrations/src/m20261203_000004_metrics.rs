//! `metric_points`: what agents sample every 10 s, kept raw for a day and
//! as 5-minute aggregates (mean and max) for 30 days; `metric_dirty`: the
//! (node, 5-minute bucket) pairs that got raw points since their aggregate
//! was last computed, so the leader re-aggregates only those.

// The trait signature (async-trait) elides the lifetime of SchemaManager;
// naming it here would not match the trait.
#![allow(elided_lifetimes_in_paths)]

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum MetricPoints {
    Table,
    Node,
    Name,
    Step,
    At,
    Value,
    Max,
}

#[derive(DeriveIden)]
enum MetricDirty {
    Table,
    Node,
    Bucket,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut points = Table::create();
        points
            .table(MetricPoints::Table)
            .if_not_exists()
            .col(string_len(MetricPoints::Node, 63))
            .col(small_integer(MetricPoints::Name))
            .col(small_integer(MetricPoints::Step))
            .col(big_integer(MetricPoints::At))
            .col(double(MetricPoints::Value))
            .col(double(MetricPoints::Max))
            // One point per slot: a re-sent sample replaces itself,
            // so a node's rows per day are bounded by the slots.
            .primary_key(
                Index::create()
                    .col(MetricPoints::Node)
                    .col(MetricPoints::Name)
                    .col(MetricPoints::Step)
                    .col(MetricPoints::At),
            );
        // On SQLite the rows live in the primary key's B-tree itself rather
        // than in a rowid table beside it: 62 bytes a row instead of 82.
        if manager.get_database_backend() == sea_orm::DbBackend::Sqlite {
            points.extra("WITHOUT ROWID");
        }
        manager.create_table(points).await?;
        // Pruning deletes by (step, at) across every node.
        manager
            .create_index(
                Index::create()
                    .name("metric_points_step_at")
                    .table(MetricPoints::Table)
                    .col(MetricPoints::Step)
                    .col(MetricPoints::At)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(MetricDirty::Table)
                    .if_not_exists()
                    .col(string_len(MetricDirty::Node, 63))
                    .col(big_integer(MetricDirty::Bucket))
                    .primary_key(
                        Index::create()
                            .col(MetricDirty::Node)
                            .col(MetricDirty::Bucket),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(MetricDirty::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(MetricPoints::Table).to_owned())
            .await
    }
}
