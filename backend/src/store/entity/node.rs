//! `nodes`: one row per cluster node. `observed` holds the agent's last
//! reported state as JSON; `token_hash` the SHA-256 of its bearer token.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "nodes")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    #[sea_orm(unique)]
    pub name: String,
    pub role: String,
    #[sea_orm(unique)]
    pub address: String,
    pub provider: String,
    pub state: String,
    pub token_hash: Option<String>,
    pub last_seq: i64,
    pub last_heartbeat: Option<DateTimeUtc>,
    #[sea_orm(column_type = "Text", nullable)]
    pub observed: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::work_order::Entity")]
    WorkOrder,
}

impl Related<super::work_order::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::WorkOrder.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
