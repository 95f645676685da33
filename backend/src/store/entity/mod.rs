//! sea-orm entities, one per table of the initial migration.

pub mod event;
pub mod node;
pub mod topology;
pub mod work_order;
