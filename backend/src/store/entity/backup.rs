//! `backups`: base backups taken by db agents and kept in adm1's store.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "backups")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub node: String,
    pub status: Status,
    pub trigger: String,
    pub started_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
    pub size_bytes: i64,
    /// `[corral_proto::BackupFile]` as JSON.
    #[sea_orm(column_type = "Text")]
    pub files: String,
    pub wal_start_lsn: Option<String>,
    pub wal_end_lsn: Option<String>,
    pub timeline: Option<i32>,
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
    /// When every file was copied to the offsite S3 bucket.
    pub s3_copied_at: Option<DateTimeUtc>,
}

/// [`corral_proto::BackupStatus`] as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
pub enum Status {
    #[sea_orm(string_value = "running")]
    Running,
    #[sea_orm(string_value = "done")]
    Done,
    #[sea_orm(string_value = "failed")]
    Failed,
}

same_variants!(Status, corral_proto::BackupStatus, [Running, Done, Failed]);

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
