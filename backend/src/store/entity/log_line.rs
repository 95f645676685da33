//! `log_lines`: one line a node's agent shipped; `id` is its `seq`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "log_lines")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub node: String,
    pub service: String,
    pub at: DateTimeUtc,
    #[sea_orm(column_type = "Text")]
    pub line: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
