//! Desired state -> work orders. [`plan`] is a pure function of the topology
//! spec, the nodes as they are (with what their agents observed) and the last
//! order of each kind each node was given; it decides which nodes to create
//! or drain and which orders to file. It is idempotent: planning again over
//! the result of a plan files nothing.

pub mod addressing;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use corral_proto::{
    ConsulAcl, ConsulIpv6, ConsulSpec, FirewallSpec, LoadBalancerSpec, NGINX_SERVICE, NodeState,
    ObservedState, OrderKind, POSTGRES_SERVICE, PostgresSpec, Provider, ReplicationRole, Role,
    TopologyUpdate, WEBAPP_SERVICE, WebappSpec, WorkOrder, ports,
};

pub use addressing::{AddressPlan, AddressPlans, MAX_ADMIN_HOSTS};

/// A node as the reconciler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub role: Role,
    pub index: u32,
    pub address: Ipv4Addr,
    pub provider: Provider,
    pub state: NodeState,
    pub observed: Option<ObservedState>,
}

/// Cluster-wide settings that end up in orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Where each provider's nodes take their addresses from.
    pub addressing: AddressPlans,
    pub datacenter: String,
    /// Consul gossip encryption key.
    pub gossip_key: String,
    /// Password of the application's database role.
    pub db_password: String,
    /// Password of the replication roles (replicator, rewinder): the
    /// webapps never see it.
    pub replication_password: String,
    /// Consul's management token (a UUID). Every other Consul token is
    /// derived from it, see [`consul_id`].
    pub consul_management: String,
    /// SSH's port on adm1, open to anyone there; cluster-only elsewhere.
    pub ssh_port: u16,
    /// The control plane's port on adm1 (UI and API), open to anyone.
    pub control_plane_port: u16,
}

pub const DB_NAME: &str = "todomvc";
pub const DB_USER: &str = "todomvc";
/// Consul KV key the PostgreSQL primary holds its session lock on.
pub const LEADER_KEY: &str = "service/postgres/leader";

/// A node the plan creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNode {
    pub name: String,
    pub role: Role,
    pub index: u32,
    pub address: Ipv4Addr,
    pub provider: Provider,
}

/// What to change to make the desired state true.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub create: Vec<NewNode>,
    /// Names of nodes to put into `draining`.
    pub drain: Vec<String>,
    /// Orders to file, per node, in filing order.
    pub orders: Vec<(String, WorkOrder)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.drain.is_empty() && self.orders.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no free address left in {plan}, the network of {provider} nodes, for {name}")]
    AddressPoolExhausted {
        plan: String,
        provider: Provider,
        name: String,
    },
}

/// The last order of each kind filed for each node.
pub type LastOrders = HashMap<(String, OrderKind), WorkOrder>;

/// Plans the changes that make `nodes` match `spec`.
///
/// New nodes take the lowest free index of their role and its address in
/// the plan of `provider`, the provider they are created with; `adm1`, the
/// control plane's own host, is always `local`, in the default plan. Surplus
/// nodes are drained highest index first. Every live node then gets
/// the orders of its role, filed only where they differ from the last order
/// of that kind; a draining node gets one `Drain` order and nothing else.
pub fn plan(
    spec: &TopologyUpdate,
    nodes: &[NodeView],
    last: &LastOrders,
    settings: &ClusterSettings,
    provider: Provider,
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    let mut addresses = addressing::Allocator::new(nodes.iter().map(|n| n.address).collect());
    // Live (not draining) nodes of the outcome, by role and index.
    let mut live: BTreeMap<(Role, u32), (String, Ipv4Addr)> = nodes
        .iter()
        .filter(|n| n.state != NodeState::Draining)
        .map(|n| ((n.role, n.index), (n.name.clone(), n.address)))
        .collect();
    let taken_indexes: HashSet<(Role, u32)> = nodes.iter().map(|n| (n.role, n.index)).collect();
    // Where each node comes from: its provider may make it dual-stack.
    let mut providers: HashMap<String, Provider> =
        nodes.iter().map(|n| (n.name.clone(), n.provider)).collect();

    for (role, wanted) in [(Role::Adm, 1), (Role::Db, spec.db), (Role::Web, spec.web)] {
        let wanted = wanted as usize;
        let have: Vec<u32> = live
            .keys()
            .filter(|(r, _)| *r == role)
            .map(|(_, i)| *i)
            .collect();
        if have.len() > wanted {
            for index in have.iter().rev().take(have.len() - wanted) {
                if let Some((name, _)) = live.remove(&(role, *index)) {
                    plan.drain.push(name);
                }
            }
        }
        let mut index = 0;
        for _ in have.len()..wanted {
            index = (index + 1..)
                .find(|i| !taken_indexes.contains(&(role, *i)) && !live.contains_key(&(role, *i)))
                .unwrap_or(u32::MAX);
            let name = format!("{}{index}", role.name_prefix());
            let (provider, network) = match role {
                Role::Adm => (Provider::Local, settings.addressing.default_plan()),
                _ => (provider, settings.addressing.plan_for(provider)),
            };
            let address = addresses.allocate(network, role, index).ok_or_else(|| {
                PlanError::AddressPoolExhausted {
                    plan: network.to_string(),
                    provider,
                    name: name.clone(),
                }
            })?;
            live.insert((role, index), (name.clone(), address));
            providers.insert(name.clone(), provider);
            plan.create.push(NewNode {
                name,
                role,
                index,
                address,
                provider,
            });
        }
    }
    plan.drain.sort();

    // Cluster traffic (Consul, the webapps' upstreams, PostgreSQL) goes
    // over IPv6 when every live node has an IPv6 address (the LXC
    // provider's, adm1 on its bridge included); else all of it over IPv4.
    let address_v6 = |name: &str, address: Ipv4Addr| {
        providers
            .get(name)
            .and_then(|provider| settings.addressing.address_v6(*provider, address))
    };
    let cluster_v6 = !live.is_empty()
        && live
            .values()
            .all(|(name, address)| address_v6(name, *address).is_some());
    let internal_v6 = |name: &str, address: Ipv4Addr| {
        if cluster_v6 {
            address_v6(name, address)
        } else {
            None
        }
    };

    // Consul servers: the first live node of each role the topology
    // counts (a restore node is there for a while only: a client).
    let mut server_nodes: Vec<(Ipv4Addr, &str)> = [Role::Web, Role::Db, Role::Adm]
        .iter()
        .filter_map(|role| {
            live.range((*role, 0)..=(*role, u32::MAX))
                .next()
                .map(|(_, (name, addr))| (*addr, name.as_str()))
        })
        .collect();
    server_nodes.sort();
    let servers: Vec<Ipv4Addr> = server_nodes.iter().map(|(addr, _)| *addr).collect();
    let servers_v6: Vec<std::net::Ipv6Addr> = server_nodes
        .iter()
        .filter_map(|(addr, name)| internal_v6(name, *addr))
        .collect();
    let server_set: HashSet<Ipv4Addr> = servers.iter().copied().collect();

    // A new db node may bootstrap an empty cluster only if no db node has
    // ever been given PostgreSQL or been seen running it.
    let db_cluster_exists = nodes.iter().any(|n| {
        n.role == Role::Db
            && (last.contains_key(&(n.name.clone(), OrderKind::Postgres))
                || n.observed.as_ref().is_some_and(|o| {
                    o.replication.as_ref().is_some_and(|r| {
                        matches!(r.role, ReplicationRole::Primary | ReplicationRole::Replica)
                    })
                }))
    });
    let first_db = live
        .range((Role::Db, 0)..=(Role::Db, u32::MAX))
        .next()
        .map(|(_, (name, _))| name.clone());

    // Consul ACLs: a token per node, and the webapps' read-only one; the
    // control plane keeps them in Consul (`consul_acl`).
    let acl_token =
        |name: &str| consul_id(&settings.consul_management, &format!("secret:node:{name}"));
    let webapp_token = consul_id(&settings.consul_management, "secret:webapp");
    let dns_token = consul_id(&settings.consul_management, "secret:dns");

    let mut file = |name: &str, order: WorkOrder| {
        let key = (name.to_string(), order.kind());
        if last.get(&key) != Some(&order) {
            plan.orders.push((name.to_string(), order));
        }
    };

    let cluster_networks = settings.addressing.networks();
    for ((role, _), (name, address)) in &live {
        let v6 = internal_v6(name, *address);
        file(
            name,
            WorkOrder::Firewall(firewall(*role, cluster_networks.clone(), settings)),
        );
        file(
            name,
            WorkOrder::Consul(ConsulSpec {
                datacenter: settings.datacenter.clone(),
                bind: address.to_string(),
                server: server_set.contains(address),
                bootstrap_expect: servers.len() as u32,
                retry_join: servers.iter().map(ToString::to_string).collect(),
                ui: *role == Role::Adm,
                encrypt: settings.gossip_key.clone(),
                acl: Some(ConsulAcl {
                    token: acl_token(name),
                    management: server_set
                        .contains(address)
                        .then(|| settings.consul_management.clone()),
                    default: (*role == Role::Adm).then(|| dns_token.clone()),
                }),
                ipv6: v6.map(|bind| ConsulIpv6 {
                    bind,
                    retry_join: servers_v6.clone(),
                }),
            }),
        );
        match role {
            Role::Web => {
                file(
                    name,
                    WorkOrder::Webapp(WebappSpec {
                        port: ports::WEBAPP,
                        database: DB_NAME.into(),
                        user: DB_USER.into(),
                        password: settings.db_password.clone(),
                        consul_token: Some(webapp_token.clone()),
                        address_v6: v6,
                    }),
                );
                file(
                    name,
                    WorkOrder::LoadBalancer(LoadBalancerSpec {
                        port: ports::NGINX,
                        service: WEBAPP_SERVICE.into(),
                        policy: spec.lb_policy,
                        // nginx answers the public on both addresses,
                        // even where cluster traffic stays on IPv4.
                        address_v6: address_v6(name, *address),
                    }),
                );
            }
            Role::Db => {
                // Once given, the bootstrap flag never changes: it only says
                // who may initialise an empty cluster.
                let bootstrap = match last.get(&(name.clone(), OrderKind::Postgres)) {
                    Some(WorkOrder::Postgres(previous)) => previous.bootstrap,
                    _ => !db_cluster_exists && first_db.as_deref() == Some(name.as_str()),
                };
                file(
                    name,
                    WorkOrder::Postgres(PostgresSpec {
                        port: ports::POSTGRES,
                        replication: spec.replication,
                        bootstrap,
                        leader_key: LEADER_KEY.into(),
                        database: DB_NAME.into(),
                        user: DB_USER.into(),
                        password: settings.db_password.clone(),
                        replication_password: settings.replication_password.clone(),
                        address_v6: v6,
                    }),
                );
            }
            // adm1's services are the control plane's; a restore node's
            // database comes from its restore order, never from the plan.
            Role::Adm | Role::Restore => {}
        }
    }

    let draining = nodes
        .iter()
        .filter(|n| n.state == NodeState::Draining)
        .map(|n| n.name.clone())
        .chain(plan.drain.iter().cloned())
        .collect::<Vec<_>>();
    for name in draining {
        file(&name, WorkOrder::Drain);
    }
    Ok(plan)
}

/// The node a restore into a new node makes: `restoreN` with the lowest
/// index no node has, at a pool address of `provider`'s plan. The topology
/// does not count restore nodes: [`plan`] neither makes nor drains them,
/// and gives them the orders every node has (Consul as a client, the
/// firewall) and nothing of their own.
pub fn restore_node(
    nodes: &[NodeView],
    settings: &ClusterSettings,
    provider: Provider,
) -> Result<NewNode, PlanError> {
    let taken: HashSet<u32> = nodes
        .iter()
        .filter(|n| n.role == Role::Restore)
        .map(|n| n.index)
        .collect();
    let index = (1..).find(|i| !taken.contains(i)).unwrap_or(u32::MAX);
    let name = format!("{}{index}", Role::Restore.name_prefix());
    let network = settings.addressing.plan_for(provider);
    let mut addresses = addressing::Allocator::new(nodes.iter().map(|n| n.address).collect());
    let address = addresses
        .allocate(network, Role::Restore, index)
        .ok_or_else(|| PlanError::AddressPoolExhausted {
            plan: network.to_string(),
            provider,
            name: name.clone(),
        })?;
    Ok(NewNode {
        name,
        role: Role::Restore,
        index,
        address,
        provider,
    })
}

/// What may reach a node of `role`. Consul's ports are open to the
/// cluster's networks on every node; web nodes take HTTP from anyone and
/// the webapp's port from the cluster (the other nginx nodes); db nodes
/// take PostgreSQL from the cluster; adm1 takes SSH and the control
/// plane's UI/API from anyone, the other nodes SSH from the cluster only
/// (adm1 is the way in).
pub fn firewall(
    role: Role,
    cluster_networks: Vec<String>,
    settings: &ClusterSettings,
) -> FirewallSpec {
    let mut public_tcp = Vec::new();
    let mut cluster_tcp = vec![
        ports::CONSUL_SERVER,
        ports::CONSUL_SERF_LAN,
        ports::CONSUL_SERF_WAN,
        ports::CONSUL_HTTP,
        ports::CONSUL_DNS,
    ];
    match role {
        Role::Adm => {
            public_tcp.extend([settings.ssh_port, settings.control_plane_port]);
        }
        Role::Web => {
            public_tcp.push(ports::NGINX);
            cluster_tcp.extend([ports::WEBAPP, settings.ssh_port]);
        }
        Role::Db | Role::Restore => {
            cluster_tcp.extend([ports::POSTGRES, settings.ssh_port]);
        }
    }
    public_tcp.sort_unstable();
    public_tcp.dedup();
    cluster_tcp.sort_unstable();
    cluster_tcp.dedup();
    cluster_tcp.retain(|p| !public_tcp.contains(p));
    FirewallSpec {
        public_tcp,
        cluster_networks,
        cluster_tcp,
        cluster_udp: vec![
            ports::CONSUL_SERF_LAN,
            ports::CONSUL_SERF_WAN,
            ports::CONSUL_DNS,
        ],
    }
}

/// One Consul ACL token with a policy of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulToken {
    /// Names the token and its policy, e.g. `node-nginx1`.
    pub name: String,
    pub accessor: String,
    pub secret: String,
    /// The policy's rules (Consul's HCL).
    pub rules: String,
}

/// Every token the cluster's nodes (given as name and role) and webapps
/// use, sorted by name: what the control plane keeps in Consul.
pub fn consul_tokens<'a>(
    management: &str,
    nodes: impl IntoIterator<Item = (&'a str, Role)>,
) -> Vec<ConsulToken> {
    let mut tokens: Vec<ConsulToken> = nodes
        .into_iter()
        .map(|(name, role)| ConsulToken {
            name: format!("node-{name}"),
            accessor: consul_id(management, &format!("accessor:node:{name}")),
            secret: consul_id(management, &format!("secret:node:{name}")),
            rules: consul_node_rules(name, role),
        })
        .collect();
    tokens.push(ConsulToken {
        name: "webapp".into(),
        accessor: consul_id(management, "accessor:webapp"),
        secret: consul_id(management, "secret:webapp"),
        rules: CONSUL_READ_RULES.into(),
    });
    tokens.push(ConsulToken {
        name: "dns".into(),
        accessor: consul_id(management, "accessor:dns"),
        secret: consul_id(management, "secret:dns"),
        rules: CONSUL_DNS_RULES.into(),
    });
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    tokens
}

/// What Consul's DNS on adm1 may answer without a token: the load
/// balancers (and the nodes they run on), nothing else.
const CONSUL_DNS_RULES: &str =
    "node_prefix \"\" { policy = \"read\" }\nservice \"nginx\" { policy = \"read\" }\n";

/// What every token may read: the catalog, for service discovery.
const CONSUL_READ_RULES: &str =
    "node_prefix \"\" { policy = \"read\" }\nservice_prefix \"\" { policy = \"read\" }\n";

/// A node's policy: write its own node and agent and the services of its
/// role; db nodes also hold the PostgreSQL leader, member and switchover
/// keys and sessions on their own node. Nothing else writes those.
pub fn consul_node_rules(name: &str, role: Role) -> String {
    let mut rules = format!(
        "node \"{name}\" {{ policy = \"write\" }}\nagent \"{name}\" {{ policy = \"write\" }}\n{CONSUL_READ_RULES}"
    );
    match role {
        // A restore node writes no service and no key: its database can
        // never register as PostgreSQL nor take the leader lock.
        Role::Adm | Role::Restore => {}
        Role::Web => {
            rules += &format!(
                "service \"{WEBAPP_SERVICE}\" {{ policy = \"write\" }}\nservice \"{NGINX_SERVICE}\" {{ policy = \"write\" }}\n"
            );
        }
        Role::Db => {
            let prefix = LEADER_KEY.rsplit_once('/').map_or(LEADER_KEY, |(p, _)| p);
            rules += &format!(
                "service \"{POSTGRES_SERVICE}\" {{ policy = \"write\" }}\n\
                 key_prefix \"{prefix}/\" {{ policy = \"write\" }}\n\
                 session \"{name}\" {{ policy = \"write\" }}\n\
                 session_prefix \"\" {{ policy = \"read\" }}\n"
            );
        }
    }
    rules
}

/// A Consul token's secret or accessor id: a UUID-shaped digest of the
/// management token and `label`. Deterministic, so the control plane keeps
/// no table of tokens and planning stays pure; unguessable without the
/// management token.
pub fn consul_id(management: &str, label: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(management.as_bytes())
        .chain_update([0u8])
        .chain_update(label.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid_text(&bytes)
}

/// 16 bytes in the 8-4-4-4-12 hex form Consul takes token ids in.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::{LbPolicy, ReplicationMode, ReplicationStatus};

    fn settings() -> ClusterSettings {
        ClusterSettings {
            addressing: AddressPlans::default(),
            datacenter: "corral".into(),
            gossip_key: "a2V5".into(),
            db_password: "secret".into(),
            replication_password: "other".into(),
            consul_management: "00000000-0000-4000-8000-000000000000".into(),
            ssh_port: 2222,
            control_plane_port: 7000,
        }
    }

    fn spec(web: u32, db: u32) -> TopologyUpdate {
        TopologyUpdate {
            web,
            db,
            lb_policy: LbPolicy::RoundRobin,
            replication: ReplicationMode::Async,
            backup: None,
        }
    }

    /// Applies a plan to the inputs, as the store would.
    fn apply(nodes: &mut Vec<NodeView>, last: &mut LastOrders, plan: &Plan) {
        for new in &plan.create {
            nodes.push(NodeView {
                name: new.name.clone(),
                role: new.role,
                index: new.index,
                address: new.address,
                provider: new.provider,
                state: NodeState::Provisioning,
                observed: None,
            });
        }
        for name in &plan.drain {
            if let Some(n) = nodes.iter_mut().find(|n| &n.name == name) {
                n.state = NodeState::Draining;
            }
        }
        for (name, order) in &plan.orders {
            last.insert((name.clone(), order.kind()), order.clone());
        }
    }

    fn converge(spec: &TopologyUpdate) -> (Vec<NodeView>, LastOrders, Plan) {
        let mut nodes = Vec::new();
        let mut last = LastOrders::new();
        let first = plan(spec, &nodes, &last, &settings(), Provider::Local).expect("plan");
        apply(&mut nodes, &mut last, &first);
        (nodes, last, first)
    }

    fn orders_of<'a>(plan: &'a Plan, node: &str) -> Vec<&'a WorkOrder> {
        plan.orders
            .iter()
            .filter(|(n, _)| n == node)
            .map(|(_, o)| o)
            .collect()
    }

    #[test]
    fn seed_topology_creates_the_five_seed_nodes() {
        let (nodes, _, plan) = converge(&spec(2, 2));
        let mut names: Vec<_> = plan
            .create
            .iter()
            .map(|n| (n.name.as_str(), n.address.to_string()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("adm1", "127.0.11.5".to_string()),
                ("nginx1", "127.0.11.21".to_string()),
                ("nginx2", "127.0.11.22".to_string()),
                ("pg1", "127.0.11.11".to_string()),
                ("pg2", "127.0.11.12".to_string()),
            ]
        );
        assert_eq!(nodes.len(), 5);
        // Every node has a firewall; web nodes run consul, the webapp and
        // nginx; db nodes consul and postgres; adm1 consul only.
        assert_eq!(orders_of(&plan, "nginx1").len(), 4);
        assert_eq!(orders_of(&plan, "pg2").len(), 3);
        assert_eq!(orders_of(&plan, "adm1").len(), 2);
    }

    #[test]
    fn a_restore_node_is_a_consul_client_with_a_firewall_and_nothing_of_the_topology() {
        let (mut nodes, mut last, _) = converge(&spec(2, 2));
        let new = restore_node(&nodes, &settings(), Provider::Local).expect("restore node");
        assert_eq!((new.name.as_str(), new.role), ("restore1", Role::Restore));
        assert!(nodes.iter().all(|n| n.address != new.address));
        let made = Plan {
            create: vec![new.clone()],
            ..Plan::default()
        };
        apply(&mut nodes, &mut last, &made);
        let p = plan(&spec(2, 2), &nodes, &last, &settings(), Provider::Local).expect("plan");
        // Not counted: nothing made or drained for it.
        assert!(p.create.is_empty() && p.drain.is_empty(), "{p:?}");
        let orders = orders_of(&p, "restore1");
        assert_eq!(orders.len(), 2, "{orders:?}");
        let Some(WorkOrder::Consul(consul)) = orders.iter().find(|o| o.kind() == OrderKind::Consul)
        else {
            panic!("no consul order: {orders:?}");
        };
        assert!(!consul.server, "a restore node is a Consul client");
        assert!(!consul.retry_join.contains(&new.address.to_string()));
        let Some(WorkOrder::Firewall(fw)) = orders.iter().find(|o| o.kind() == OrderKind::Firewall)
        else {
            panic!("no firewall order: {orders:?}");
        };
        assert!(fw.cluster_tcp.contains(&ports::POSTGRES));
        assert!(fw.public_tcp.is_empty());
        // No other node's orders change because of it.
        assert!(p.orders.iter().all(|(n, _)| n == "restore1"), "{p:?}");
        // Its token writes no service and no key: it can never register
        // as PostgreSQL or take the leader lock.
        let rules = consul_node_rules("restore1", Role::Restore);
        assert!(!rules.contains("service \"postgres\""), "{rules}");
        assert!(!rules.contains("key_prefix"), "{rules}");
        apply(&mut nodes, &mut last, &p);
        let second = restore_node(&nodes, &settings(), Provider::Local).expect("another");
        assert_eq!(second.name, "restore2");
        assert_ne!(second.address, new.address);
        // Scaling the topology leaves it alone.
        let down = plan(&spec(1, 1), &nodes, &last, &settings(), Provider::Local).expect("plan");
        assert!(!down.drain.contains(&"restore1".to_string()), "{down:?}");
    }

    #[test]
    fn planning_twice_files_nothing_new() {
        let (nodes, last, _) = converge(&spec(3, 2));
        let again = plan(&spec(3, 2), &nodes, &last, &settings(), Provider::Local).expect("plan");
        assert!(again.is_empty(), "second run planned {again:?}");
    }

    #[test]
    fn first_node_of_each_role_is_a_consul_server() {
        let (_, last, _) = converge(&spec(3, 2));
        let consul = |name: &str| match last.get(&(name.to_string(), OrderKind::Consul)) {
            Some(WorkOrder::Consul(c)) => c.clone(),
            other => panic!("no consul order for {name}: {other:?}"),
        };
        for server in ["adm1", "nginx1", "pg1"] {
            assert!(consul(server).server, "{server} should be a server");
            assert_eq!(consul(server).bootstrap_expect, 3);
        }
        for client in ["nginx2", "nginx3", "pg2"] {
            assert!(!consul(client).server, "{client} should be a client");
        }
        assert_eq!(
            consul("nginx3").retry_join,
            vec!["127.0.11.5", "127.0.11.11", "127.0.11.21"]
        );
        assert!(consul("adm1").ui);
        assert!(!consul("nginx1").ui);
    }

    #[test]
    fn each_node_gets_its_own_consul_token_and_only_servers_the_management_one() {
        let (nodes, last, _) = converge(&spec(3, 2));
        let acl = |name: &str| match last.get(&(name.to_string(), OrderKind::Consul)) {
            Some(WorkOrder::Consul(c)) => c.acl.clone().expect("acl"),
            other => panic!("no consul order for {name}: {other:?}"),
        };
        let management = settings().consul_management;
        for server in ["adm1", "nginx1", "pg1"] {
            assert_eq!(acl(server).management.as_deref(), Some(management.as_str()));
        }
        for client in ["nginx2", "nginx3", "pg2"] {
            assert_eq!(acl(client).management, None, "{client}");
        }
        // The tokens the control plane keeps: every node's and the webapps'.
        let kept = consul_tokens(&management, nodes.iter().map(|n| (n.name.as_str(), n.role)));
        let names: Vec<_> = kept.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dns",
                "node-adm1",
                "node-nginx1",
                "node-nginx2",
                "node-nginx3",
                "node-pg1",
                "node-pg2",
                "webapp"
            ]
        );
        let secrets: HashSet<_> = kept.iter().map(|t| t.secret.as_str()).collect();
        assert_eq!(secrets.len(), kept.len(), "secrets are distinct");
        assert!(!secrets.contains(management.as_str()));
        let pg2 = kept.iter().find(|t| t.name == "node-pg2").expect("pg2");
        assert_eq!(pg2.secret, acl("pg2").token);
        assert!(pg2.rules.contains("key_prefix \"service/postgres/\""));
        let nginx2 = kept
            .iter()
            .find(|t| t.name == "node-nginx2")
            .expect("nginx2");
        assert_eq!(nginx2.secret, acl("nginx2").token);
        assert!(!nginx2.rules.contains("key_prefix"), "{}", nginx2.rules);
        assert!(!nginx2.rules.contains("postgres"), "{}", nginx2.rules);
        let webapp = kept.iter().find(|t| t.name == "webapp").expect("webapp");
        assert!(!webapp.rules.contains("write"), "{}", webapp.rules);
        // Consul's DNS on adm1 answers tokenless queries with the load
        // balancers only: adm1's default token reads nginx and nodes.
        let dns = kept.iter().find(|t| t.name == "dns").expect("dns");
        assert_eq!(acl("adm1").default.as_deref(), Some(dns.secret.as_str()));
        assert_eq!(acl("nginx1").default, None);
        assert!(!dns.rules.contains("write"), "{}", dns.rules);
        assert!(dns.rules.contains("service \"nginx\""), "{}", dns.rules);
        assert!(!dns.rules.contains("service_prefix"), "{}", dns.rules);
        assert!(
            nginx2
                .rules
                .contains("service \"nginx\" { policy = \"write\" }")
        );
        match last.get(&("nginx3".to_string(), OrderKind::Webapp)) {
            Some(WorkOrder::Webapp(w)) => {
                assert_eq!(w.consul_token.as_deref(), Some(webapp.secret.as_str()))
            }
            other => panic!("no webapp order: {other:?}"),
        }
    }

    #[test]
    fn consul_ids_are_uuids_that_depend_on_the_management_token() {
        let id = consul_id("m1", "secret:node:pg1");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_eq!(id, consul_id("m1", "secret:node:pg1"));
        assert_ne!(id, consul_id("m2", "secret:node:pg1"));
        assert_ne!(id, consul_id("m1", "secret:node:pg2"));
    }

    #[test]
    fn only_the_first_db_node_of_a_new_cluster_bootstraps() {
        let (mut nodes, mut last, _) = converge(&spec(0, 3));
        let bootstrap =
            |last: &LastOrders, name: &str| match last.get(&(name.into(), OrderKind::Postgres)) {
                Some(WorkOrder::Postgres(p)) => p.bootstrap,
                other => panic!("no postgres order for {name}: {other:?}"),
            };
        assert!(bootstrap(&last, "pg1"));
        assert!(!bootstrap(&last, "pg2"));
        assert!(!bootstrap(&last, "pg3"));
        // pg1 goes away; a new db node joins the existing cluster instead of
        // starting a second one.
        nodes.retain(|n| n.name != "pg1");
        last.retain(|(n, _), _| n != "pg1");
        let p = plan(&spec(0, 3), &nodes, &last, &settings(), Provider::Local).expect("plan");
        apply(&mut nodes, &mut last, &p);
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].name, "pg1");
        assert!(!bootstrap(&last, "pg1"));
    }

    #[test]
    fn observed_primary_prevents_a_bootstrap_even_without_orders() {
        let observed = ObservedState {
            replication: Some(ReplicationStatus {
                timeline: Some(2),
                ..ReplicationStatus::new(ReplicationRole::Primary)
            }),
            ..ObservedState::default()
        };
        let nodes = vec![NodeView {
            name: "pg5".into(),
            role: Role::Db,
            index: 5,
            address: "127.0.11.15".parse().expect("ip"),
            provider: Provider::Local,
            state: NodeState::Active,
            observed: Some(observed),
        }];
        let p = plan(
            &spec(0, 2),
            &nodes,
            &LastOrders::new(),
            &settings(),
            Provider::Local,
        )
        .expect("plan");
        let pg1 = p
            .orders
            .iter()
            .find_map(|(n, o)| match o {
                WorkOrder::Postgres(spec) if n == "pg1" => Some(spec.bootstrap),
                _ => None,
            })
            .expect("pg1 postgres order");
        assert!(!pg1);
    }

    #[test]
    fn policy_change_files_one_load_balancer_order_per_web_node() {
        let (nodes, last, _) = converge(&spec(4, 2));
        let mut changed = spec(4, 2);
        changed.lb_policy = LbPolicy::UriHash;
        let p = plan(&changed, &nodes, &last, &settings(), Provider::Local).expect("plan");
        assert!(p.create.is_empty() && p.drain.is_empty());
        assert_eq!(p.orders.len(), 4);
        assert!(p.orders.iter().all(|(n, o)| n.starts_with("nginx")
            && matches!(o, WorkOrder::LoadBalancer(lb) if lb.policy == LbPolicy::UriHash)));
    }

    #[test]
    fn replication_change_files_postgres_orders_only() {
        let (nodes, last, _) = converge(&spec(2, 2));
        let mut changed = spec(2, 2);
        changed.replication = ReplicationMode::Sync;
        let p = plan(&changed, &nodes, &last, &settings(), Provider::Local).expect("plan");
        let touched: Vec<_> = p
            .orders
            .iter()
            .map(|(n, o)| (n.as_str(), o.kind()))
            .collect();
        assert_eq!(
            touched,
            vec![("pg1", OrderKind::Postgres), ("pg2", OrderKind::Postgres)]
        );
    }

    #[test]
    fn strict_replication_reaches_the_postgres_orders_like_sync() {
        let (mut nodes, mut last, _) = converge(&spec(2, 2));
        for mode in [
            ReplicationMode::Sync,
            ReplicationMode::Strict,
            ReplicationMode::Async,
        ] {
            let mut changed = spec(2, 2);
            changed.replication = mode;
            let p = plan(&changed, &nodes, &last, &settings(), Provider::Local).expect("plan");
            let modes: Vec<_> = p
                .orders
                .iter()
                .map(|(n, o)| match o {
                    WorkOrder::Postgres(pg) => (n.as_str(), pg.replication),
                    other => panic!("{n} got {other:?} for a replication change"),
                })
                .collect();
            assert_eq!(modes, vec![("pg1", mode), ("pg2", mode)]);
            apply(&mut nodes, &mut last, &p);
        }
    }

    #[test]
    fn a_filed_switchover_is_neither_undone_nor_filed_again() {
        let (nodes, mut last, _) = converge(&spec(2, 2));
        last.insert(
            ("pg1".into(), OrderKind::Switchover),
            WorkOrder::Switchover(corral_proto::SwitchoverSpec {
                to: "pg2".into(),
                max_lag_bytes: 16 << 20,
            }),
        );
        let again = plan(&spec(2, 2), &nodes, &last, &settings(), Provider::Local).expect("plan");
        assert!(again.is_empty(), "planned after a switchover: {again:?}");
    }

    #[test]
    fn scaling_down_drains_the_highest_index_and_orders_it_to_drain() {
        let (mut nodes, mut last, _) = converge(&spec(3, 2));
        let p = plan(&spec(1, 2), &nodes, &last, &settings(), Provider::Local).expect("plan");
        assert_eq!(p.drain, vec!["nginx2".to_string(), "nginx3".to_string()]);
        assert!(p.create.is_empty());
        let drains: Vec<_> = p
            .orders
            .iter()
            .filter(|(_, o)| *o == WorkOrder::Drain)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(drains, vec!["nginx2", "nginx3"]);
        apply(&mut nodes, &mut last, &p);
        let again = plan(&spec(1, 2), &nodes, &last, &settings(), Provider::Local).expect("plan");
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_new_node_reuses_the_lowest_free_index_but_not_a_draining_one() {
        let (mut nodes, mut last, _) = converge(&spec(3, 0));
        // nginx2 is being removed by hand: it drains and the spec drops to 2.
        nodes
            .iter_mut()
            .filter(|n| n.name == "nginx2")
            .for_each(|n| n.state = NodeState::Draining);
        let p = plan(&spec(2, 0), &nodes, &last, &settings(), Provider::Local).expect("plan");
        apply(&mut nodes, &mut last, &p);
        assert!(p.create.is_empty());
        // Adding one now must not reuse nginx2 (still draining) but take nginx4.
        let p = plan(&spec(3, 0), &nodes, &last, &settings(), Provider::Local).expect("plan");
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].name, "nginx4");
        assert_eq!(p.create[0].address.to_string(), "127.0.11.24");
    }

    #[test]
    fn removing_the_first_web_node_promotes_the_next_to_consul_server() {
        let (mut nodes, mut last, _) = converge(&spec(2, 1));
        nodes.retain(|n| n.name != "nginx1");
        last.retain(|(n, _), _| n != "nginx1");
        let p = plan(&spec(1, 1), &nodes, &last, &settings(), Provider::Local).expect("plan");
        let nginx2 = p
            .orders
            .iter()
            .find_map(|(n, o)| match o {
                WorkOrder::Consul(c) if n == "nginx2" => Some(c.clone()),
                _ => None,
            })
            .expect("nginx2 consul order");
        assert!(nginx2.server);
    }

    /// Settings of a server whose default provider is lxc, with its own
    /// local plan on loopback.
    fn lxc_settings() -> ClusterSettings {
        let mut plans = AddressPlans::new("192.168.11.0/24".parse().expect("plan"));
        plans.set(Provider::Local, AddressPlan::default());
        ClusterSettings {
            addressing: plans,
            ..settings()
        }
    }

    #[test]
    fn lxc_clusters_talk_over_ipv6_and_nginx_listens_on_both() {
        let mut s = lxc_settings();
        let ula: addressing::Ula = "fd12:3456:789a::/64".parse().expect("ula");
        s.addressing.set_ipv6(Provider::Lxc, ula);
        let p = plan(&spec(2, 1), &[], &LastOrders::new(), &s, Provider::Lxc).expect("plan");
        let lb = |node: &str| {
            p.orders.iter().find_map(|(n, o)| match o {
                WorkOrder::LoadBalancer(lb) if n == node => Some(lb.clone()),
                _ => None,
            })
        };
        assert_eq!(
            lb("nginx2").and_then(|l| l.address_v6),
            Some("fd12:3456:789a::c0a8:b16".parse().expect("v6"))
        );
        // The cluster's IPv6 network is a cluster network on every node.
        for (_, order) in &p.orders {
            if let WorkOrder::Firewall(f) = order {
                assert!(
                    f.cluster_networks
                        .contains(&"fd12:3456:789a::/64".to_string())
                );
            }
        }
        // Every node is dual-stack (adm1 on the bridge too): Consul, the
        // webapps and PostgreSQL talk over IPv6.
        let v6 = |last: &str| -> std::net::Ipv6Addr {
            format!("fd12:3456:789a::c0a8:{last}").parse().expect("v6")
        };
        for (node, order) in &p.orders {
            match order {
                WorkOrder::Consul(c) => {
                    let ipv6 = c.ipv6.clone().unwrap_or_else(|| panic!("{node}: no IPv6"));
                    // Servers: adm1 (.5), pg1 (.11), nginx1 (.21).
                    assert_eq!(ipv6.retry_join, [v6("b05"), v6("b0b"), v6("b15")]);
                    assert_eq!(
                        c.retry_join,
                        ["192.168.11.5", "192.168.11.11", "192.168.11.21"]
                    );
                }
                WorkOrder::Webapp(w) => assert!(w.address_v6.is_some(), "{node}"),
                WorkOrder::Postgres(pg) => assert_eq!(pg.address_v6, Some(v6("b0b"))),
                _ => {}
            }
        }
        // Local nodes stay IPv4-only, and so does every cluster with one.
        let local = plan(&spec(1, 0), &[], &LastOrders::new(), &s, Provider::Local).expect("plan");
        assert!(local.orders.iter().all(|(_, o)| match o {
            WorkOrder::LoadBalancer(lb) => lb.address_v6.is_none(),
            WorkOrder::Consul(c) => c.ipv6.is_none(),
            WorkOrder::Webapp(w) => w.address_v6.is_none(),
            _ => true,
        }));
    }

    #[test]
    fn every_node_gets_the_firewall_of_its_role() {
        let s = lxc_settings();
        let p = plan(&spec(2, 2), &[], &LastOrders::new(), &s, Provider::Lxc).expect("plan");
        let fw = |node: &str| {
            p.orders
                .iter()
                .find_map(|(n, o)| match o {
                    WorkOrder::Firewall(f) if n == node => Some(f.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no firewall order for {node}"))
        };
        for node in ["adm1", "nginx1", "nginx2", "pg1", "pg2"] {
            let f = fw(node);
            // Both providers' networks, LXC's (the default here) first.
            assert_eq!(f.cluster_networks, ["192.168.11.0/24", "127.0.11.0/24"]);
            assert!(f.cluster_tcp.contains(&ports::CONSUL_SERF_LAN), "{node}");
            assert!(f.cluster_udp.contains(&ports::CONSUL_SERF_LAN), "{node}");
            assert!(!f.public_tcp.contains(&ports::CONSUL_HTTP), "{node}");
            assert!(!f.public_tcp.contains(&ports::POSTGRES), "{node}");
        }
        // HTTP from anyone only on web nodes; the webapp from the cluster.
        assert_eq!(fw("nginx1").public_tcp, [ports::NGINX]);
        assert!(fw("nginx1").cluster_tcp.contains(&ports::WEBAPP));
        assert!(fw("nginx1").cluster_tcp.contains(&2222));
        // PostgreSQL from the cluster only.
        assert_eq!(fw("pg1").public_tcp, Vec::<u16>::new());
        assert!(fw("pg1").cluster_tcp.contains(&ports::POSTGRES));
        assert!(!fw("nginx1").cluster_tcp.contains(&ports::POSTGRES));
        // adm1: SSH on its configured port and the UI/API, from anyone.
        assert_eq!(fw("adm1").public_tcp, [2222, 7000]);
        assert!(!fw("adm1").cluster_tcp.contains(&2222));
        // Filed once: the same plan again files no firewall order.
        let mut nodes = Vec::new();
        let mut last = LastOrders::new();
        apply(&mut nodes, &mut last, &p);
        let again = plan(&spec(2, 2), &nodes, &last, &s, Provider::Lxc).expect("plan");
        assert!(
            !again
                .orders
                .iter()
                .any(|(_, o)| matches!(o, WorkOrder::Firewall(_))),
            "{:?}",
            again.orders
        );
    }

    #[test]
    fn adm1_is_local_at_the_default_providers_seed_address() {
        let s = lxc_settings();
        let p = plan(&spec(1, 0), &[], &LastOrders::new(), &s, Provider::Lxc).expect("plan");
        let placed: Vec<_> = p
            .create
            .iter()
            .map(|n| (n.name.as_str(), n.provider, n.address.to_string()))
            .collect();
        assert_eq!(
            placed,
            vec![
                ("adm1", Provider::Local, "192.168.11.5".to_string()),
                ("nginx1", Provider::Lxc, "192.168.11.21".to_string()),
            ]
        );
    }

    #[test]
    fn a_new_node_takes_its_address_from_its_providers_plan() {
        let s = lxc_settings();
        let mut nodes = Vec::new();
        let mut last = LastOrders::new();
        let p = plan(&spec(1, 1), &nodes, &last, &s, Provider::Lxc).expect("plan");
        apply(&mut nodes, &mut last, &p);
        let p = plan(&spec(2, 1), &nodes, &last, &s, Provider::Local).expect("plan");
        let placed: Vec<_> = p
            .create
            .iter()
            .map(|n| (n.name.as_str(), n.provider, n.address.to_string()))
            .collect();
        assert_eq!(
            placed,
            vec![("nginx2", Provider::Local, "127.0.11.22".to_string())]
        );
    }

    #[test]
    fn providers_sharing_a_plan_never_share_an_address() {
        // lxc has no plan of its own: it shares the default (loopback) one.
        let s = settings();
        let mut nodes = Vec::new();
        let mut last = LastOrders::new();
        let p = plan(&spec(10, 0), &nodes, &last, &s, Provider::Local).expect("plan");
        apply(&mut nodes, &mut last, &p);
        let p = plan(&spec(12, 0), &nodes, &last, &s, Provider::Lxc).expect("plan");
        apply(&mut nodes, &mut last, &p);
        let addrs: HashSet<_> = nodes.iter().map(|n| n.address).collect();
        assert_eq!(addrs.len(), nodes.len(), "{nodes:?}");
        assert_eq!(
            p.create
                .iter()
                .map(|n| n.address.to_string())
                .collect::<Vec<_>>(),
            vec!["127.0.11.31", "127.0.11.32"]
        );
    }

    #[test]
    fn exhausted_address_pool_is_an_error_not_a_partial_plan() {
        let mut s = settings();
        s.addressing = AddressPlans::new("10.0.0.0/27".parse().expect("plan"));
        let err = plan(&spec(11, 0), &[], &LastOrders::new(), &s, Provider::Local).unwrap_err();
        assert!(
            matches!(err, PlanError::AddressPoolExhausted { .. }),
            "{err}"
        );
    }

    #[test]
    fn ten_thousand_web_nodes_plan_quickly_and_uniquely() {
        let mut s = settings();
        s.addressing = AddressPlans::new("127.0.11.0/16".parse().expect("plan"));
        let p = plan(
            &spec(10_000, 0),
            &[],
            &LastOrders::new(),
            &s,
            Provider::Local,
        )
        .expect("plan");
        assert_eq!(p.create.len(), 10_001);
        let addrs: HashSet<_> = p.create.iter().map(|n| n.address).collect();
        assert_eq!(addrs.len(), p.create.len());
    }
}
