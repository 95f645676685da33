//! `work_orders`: every order filed for a node, `seq` increasing per node.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "work_orders")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub node_id: i32,
    pub seq: i64,
    pub kind: Kind,
    #[sea_orm(column_type = "Text")]
    pub payload: String,
    pub status: Status,
    #[sea_orm(column_type = "Text", nullable)]
    pub result: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

/// [`corral_proto::OrderKind`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(32))")]
pub enum Kind {
    #[sea_orm(string_value = "consul")]
    Consul,
    #[sea_orm(string_value = "postgres")]
    Postgres,
    #[sea_orm(string_value = "webapp")]
    Webapp,
    #[sea_orm(string_value = "load_balancer")]
    LoadBalancer,
    #[sea_orm(string_value = "drain")]
    Drain,
    #[sea_orm(string_value = "switchover")]
    Switchover,
    #[sea_orm(string_value = "backup")]
    Backup,
    #[sea_orm(string_value = "restore")]
    Restore,
    #[sea_orm(string_value = "firewall")]
    Firewall,
}

/// [`corral_proto::OrderStatus`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum Status {
    #[sea_orm(string_value = "pending")]
    Pending,
    #[sea_orm(string_value = "delivered")]
    Delivered,
    #[sea_orm(string_value = "applied")]
    Applied,
    #[sea_orm(string_value = "failed")]
    Failed,
}

same_variants!(
    Kind,
    corral_proto::OrderKind,
    [
        Consul,
        Postgres,
        Webapp,
        LoadBalancer,
        Drain,
        Switchover,
        Backup,
        Restore,
        Firewall
    ]
);
same_variants!(
    Status,
    corral_proto::OrderStatus,
    [Pending, Delivered, Applied, Failed]
);

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::node::Entity",
        from = "Column::NodeId",
        to = "super::node::Column::Id",
        on_delete = "Cascade"
    )]
    Node,
}

impl Related<super::node::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Node.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ActiveEnum, Iterable};

    /// Rows written before these enums existed hold the API's names.
    #[test]
    fn stored_strings_are_the_api_names() {
        for kind in Kind::iter() {
            assert_eq!(
                kind.to_value(),
                corral_proto::OrderKind::from(kind).as_str()
            );
        }
        for status in Status::iter() {
            assert_eq!(
                status.to_value(),
                corral_proto::OrderStatus::from(status).as_str()
            );
        }
    }
}
