//! `nodes`: one row per cluster node. `observed` holds the agent's last
//! reported state as JSON; `token_hash` the SHA-256 of its bearer token;
//! `enroll_hash` that of its single-use enrollment secret until it is used.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "nodes")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    #[sea_orm(unique)]
    pub name: String,
    pub role: Role,
    #[sea_orm(unique)]
    pub address: String,
    pub provider: Provider,
    pub state: State,
    pub token_hash: Option<String>,
    /// SHA-256 of the node's outstanding enrollment secret, if any.
    pub enroll_hash: Option<String>,
    pub enroll_expires_at: Option<DateTimeUtc>,
    pub last_seq: i64,
    pub last_heartbeat: Option<DateTimeUtc>,
    #[sea_orm(column_type = "Text", nullable)]
    pub observed: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

/// [`corral_proto::Role`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum Role {
    #[sea_orm(string_value = "web")]
    Web,
    #[sea_orm(string_value = "db")]
    Db,
    #[sea_orm(string_value = "adm")]
    Adm,
    #[sea_orm(string_value = "restore")]
    Restore,
}

/// [`corral_proto::Provider`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum Provider {
    #[sea_orm(string_value = "local")]
    Local,
    #[sea_orm(string_value = "lxc")]
    Lxc,
    #[sea_orm(string_value = "virtualbox")]
    Virtualbox,
    #[sea_orm(string_value = "manual")]
    Manual,
}

/// [`corral_proto::NodeState`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum State {
    #[sea_orm(string_value = "provisioning")]
    Provisioning,
    #[sea_orm(string_value = "active")]
    Active,
    #[sea_orm(string_value = "draining")]
    Draining,
}

same_variants!(Role, corral_proto::Role, [Web, Db, Adm, Restore]);
same_variants!(
    Provider,
    corral_proto::Provider,
    [Local, Lxc, Virtualbox, Manual]
);
same_variants!(
    State,
    corral_proto::NodeState,
    [Provisioning, Active, Draining]
);

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

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ActiveEnum, Iterable};

    /// The stored strings must stay the API's names: rows written before
    /// these enums existed hold them, and no migration changed them.
    #[test]
    fn stored_strings_are_the_api_names() {
        for role in Role::iter() {
            assert_eq!(role.to_value(), corral_proto::Role::from(role).as_str());
        }
        for provider in Provider::iter() {
            assert_eq!(
                provider.to_value(),
                corral_proto::Provider::from(provider).as_str()
            );
        }
        for state in State::iter() {
            assert_eq!(
                state.to_value(),
                corral_proto::NodeState::from(state).as_str()
            );
        }
    }
}
