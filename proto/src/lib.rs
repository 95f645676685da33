//! The vocabulary corral's server, agent, CLI and web UI share: request and
//! response bodies of the REST API, the work orders an agent applies, and the
//! enums that name roles, states and policies. It compiles for wasm32 too, so
//! the UI speaks exactly the types the server does.

pub mod agent;
pub mod backup;
pub mod error;
pub mod event;
pub mod logs;
pub mod machine;
pub mod metrics;
pub mod node;
pub mod order;
pub mod topology;

pub use agent::{
    EnrollRequest, EnrollResponse, EnrollSecret, Heartbeat, MetricsSample, ObservedState,
    ReplicationRole, ReplicationStatus, ServiceState, ServiceStatus,
};
pub use backup::{
    Backup, BackupFile, BackupReport, BackupSpec, BackupStatus, BackupsStatus, OffsiteStatus,
    RESTORE_PORT, RestoreAccepted, RestoreReport, RestoreRequest, RestoreSpec,
};
pub use error::ErrorBody;
pub use event::Event;
pub use logs::{
    KEPT_LOG_BYTES_PER_NODE, KEPT_LOG_LINES, LogBatch, LogLine, MAX_LOG_BATCH_LINES,
    MAX_LOG_GREP_CHARS, MAX_LOG_LINE_CHARS, validate_service_name,
};
pub use machine::{
    HostMachine, HostOrders, HostPoll, MachineOrder, MachineResult, MachineSpec, MachineStatus,
};
pub use metrics::{
    MetricName, MetricPoint, MetricReading, MetricSeries, MetricsAccepted, MetricsBatch, NodeSeries,
};
pub use node::{
    CreateNode, Node, NodeHealth, NodeState, Provider, Role, ScalableRole, validate_node_name,
};
pub use order::{
    ConsulAcl, ConsulIpv6, ConsulSpec, FirewallSpec, LoadBalancerSpec, Order, OrderKind,
    OrderOutcome, OrderResult, OrderStatus, PollResponse, PostgresSpec, SwitchoverAccepted,
    SwitchoverRequest, SwitchoverSpec, WebappSpec, WorkOrder,
};
pub use topology::{
    BackupSchedule, LbPolicy, MAX_NODES_PER_ROLE, ReplicationMode, Servers, Topology,
    TopologyChange, TopologyUpdate,
};

/// The version every corral binary reports (`/version`, `--version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The service name todomvc registers in Consul.
pub const WEBAPP_SERVICE: &str = "todomvc";
/// The Consul service of the load balancers: Consul's DNS on adm1 answers
/// `nginx.service.consul` with the web nodes whose nginx passes its check
/// (the DNS load balancer in front of nginx).
pub const NGINX_SERVICE: &str = "nginx";
/// The service name PostgreSQL nodes register in Consul.
pub const POSTGRES_SERVICE: &str = "postgres";

/// Well-known ports on every node address, as in the seed cluster.
pub mod ports {
    pub const NGINX: u16 = 80;
    pub const WEBAPP: u16 = 8080;
    pub const POSTGRES: u16 = 5432;
    pub const CONSUL_HTTP: u16 = 8500;
    pub const CONSUL_DNS: u16 = 8600;
    pub const CONSUL_SERVER: u16 = 8300;
    pub const CONSUL_SERF_LAN: u16 = 8301;
    pub const CONSUL_SERF_WAN: u16 = 8302;
    pub const CONTROL_PLANE: u16 = 7000;
    pub const SSH: u16 = 22;
    /// nginx's stub_status, on the node address only, answering the node
    /// itself (the agent samples it).
    pub const NGINX_STATUS: u16 = 8081;
}
