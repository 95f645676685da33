//! sea-orm entities, one per table of the initial migration. Columns that
//! hold one of a few names are enums of their own, converted to and from
//! the API's enums of `corral-proto` (which compiles to wasm and knows
//! nothing of sea-orm); the stored strings are the API's names.

/// Both ways between a stored enum and the API's, variant for variant.
macro_rules! same_variants {
    ($stored:ty, $api:ty, [$($variant:ident),+]) => {
        impl From<$stored> for $api {
            fn from(v: $stored) -> Self {
                match v {
                    $(<$stored>::$variant => <$api>::$variant,)+
                }
            }
        }

        impl From<$api> for $stored {
            fn from(v: $api) -> Self {
                match v {
                    $(<$api>::$variant => <$stored>::$variant,)+
                }
            }
        }
    };
}

pub mod backup;
pub mod event;
pub mod log_line;
pub mod metric_point;
pub mod node;
pub mod topology;
pub mod work_order;
