//! `metric_points`: one metric of one node at one slot: a raw 10-second
//! sample (`step` 10) or a 5-minute aggregate (`step` 300).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "metric_points")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub node: String,
    /// [`corral_proto::MetricName::code`].
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: i16,
    #[sea_orm(primary_key, auto_increment = false)]
    pub step: i16,
    /// Start of the slot, seconds since the Unix epoch.
    #[sea_orm(primary_key, auto_increment = false)]
    pub at: i64,
    /// Mean over the slot.
    #[sea_orm(column_type = "Double")]
    pub value: f64,
    #[sea_orm(column_type = "Double")]
    pub max: f64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
