//! `topology`: the single row (id 1) holding the desired spec.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "topology")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i32,
    pub web: i32,
    pub db: i32,
    pub lb_policy: LbPolicy,
    pub replication: Replication,
    /// `HH:MM` (UTC) of the daily backup; none when unscheduled.
    pub backup_schedule: Option<String>,
    /// Finished backups kept.
    pub backup_keep: Option<i32>,
    pub updated_at: DateTimeUtc,
}

/// [`corral_proto::LbPolicy`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum LbPolicy {
    #[sea_orm(string_value = "round_robin")]
    RoundRobin,
    #[sea_orm(string_value = "least_conn")]
    LeastConn,
    #[sea_orm(string_value = "uri_hash")]
    UriHash,
}

/// [`corral_proto::ReplicationMode`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum Replication {
    #[sea_orm(string_value = "async")]
    Async,
    #[sea_orm(string_value = "sync")]
    Sync,
    #[sea_orm(string_value = "strict")]
    Strict,
}

same_variants!(
    LbPolicy,
    corral_proto::LbPolicy,
    [RoundRobin, LeastConn, UriHash]
);
same_variants!(
    Replication,
    corral_proto::ReplicationMode,
    [Async, Sync, Strict]
);

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ActiveEnum, Iterable};

    /// Rows written before these enums existed hold the API's names.
    #[test]
    fn stored_strings_are_the_api_names() {
        for policy in LbPolicy::iter() {
            assert_eq!(
                policy.to_value(),
                corral_proto::LbPolicy::from(policy).as_str()
            );
        }
        for mode in Replication::iter() {
            assert_eq!(
                mode.to_value(),
                corral_proto::ReplicationMode::from(mode).as_str()
            );
        }
    }
}
