//! Where nodes live on the network. The seed scheme puts `adm1` at base+5,
//! `pg1..pg9` at base+11.., `nginx1..nginx9` at base+21..; further nodes take
//! the lowest free address from base+30 to the end of the block. Each
//! provider may have a plan of its own ([`AddressPlans`]): local nodes live on
//! loopback, LXC containers on their bridge's network.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use corral_proto::{Provider, Role};

/// The first address of the overflow pool, relative to the base.
const POOL_START: u32 = 30;
/// The most admin hosts (control-plane servers) a plan has addresses for.
pub const MAX_ADMIN_HOSTS: u32 = 6;

/// An address base and the block it lives in, e.g. `127.0.11.0/24` (the
/// default, loopback) or `192.168.11.0/24` (the seed's VirtualBox network).
/// The base need not be the block's first address: `127.0.11.0/16` keeps the
/// seed addresses and lets the pool run on to 127.0.255.254.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressPlan {
    base: u32,
    last: u32,
}

impl AddressPlan {
    pub fn new(base: Ipv4Addr, prefix_len: u8) -> Result<Self, String> {
        if prefix_len > 32 {
            return Err(format!("prefix length /{prefix_len} is longer than 32"));
        }
        let base = u32::from(base);
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len)
        };
        let broadcast = (base & mask) | !mask;
        let last = broadcast.saturating_sub(1);
        if base
            .checked_add(POOL_START)
            .is_none_or(|start| start > last)
        {
            return Err(format!(
                "{}/{prefix_len} leaves no room for the seed addresses (base+5 .. base+{POOL_START})",
                Ipv4Addr::from(base)
            ));
        }
        Ok(Self { base, last })
    }

    /// The seed-scheme address of a node, if it has one.
    pub fn seed_address(&self, role: Role, index: u32) -> Option<Ipv4Addr> {
        let offset = match (role, index) {
            (Role::Adm, 1) => 5,
            (Role::Db, 1..=9) => 10 + index,
            (Role::Web, 1..=9) => 20 + index,
            _ => return None,
        };
        Some(Ipv4Addr::from(self.base + offset))
    }

    /// The address for a new node: its seed address when free, else the
    /// lowest free pool address; `None` when the block is full.
    pub fn allocate(&self, role: Role, index: u32, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        Allocator::new(used.clone()).allocate(self, role, index)
    }

    /// The address of admin host `index` (1-based): adm1 at base+5, as in
    /// the seed, and the other control-plane servers of `corral up
    /// --servers N` right after it (adm2 base+6, up to adm6 base+10), where
    /// no node is ever placed (db nodes start at base+11).
    pub fn admin_address(&self, index: u32) -> Option<Ipv4Addr> {
        (1..=MAX_ADMIN_HOSTS)
            .contains(&index)
            .then(|| Ipv4Addr::from(self.base + 4 + index))
    }

    /// adm1's seed address (base+5): on the LXC bridge, the host's own.
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 5)
    }

    /// The block's prefix length (24 for `192.168.11.0/24`).
    pub fn prefix_len(&self) -> u8 {
        let span = (self.last + 1) ^ self.base;
        span.leading_zeros() as u8
    }

    /// How many nodes the plan can ever hold.
    pub fn capacity(&self) -> u32 {
        // adm1, 9 db, 9 web seed addresses plus the pool.
        19 + (self.last - (self.base + POOL_START) + 1)
    }
}

/// The address plan of each provider. The default plan is that of the
/// server's default provider: `adm1` (the control plane's own host) takes
/// its seed address, and every provider without a plan of its own uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPlans {
    default: AddressPlan,
    own: Vec<(Provider, AddressPlan)>,
    /// Providers whose nodes are dual-stack, and the cluster's IPv6 prefix.
    ipv6: Vec<(Provider, Ula)>,
}

impl AddressPlans {
    pub fn new(default_plan: AddressPlan) -> Self {
        Self {
            default: default_plan,
            own: Vec::new(),
            ipv6: Vec::new(),
        }
    }

    /// Makes `provider`'s nodes dual-stack: each also gets the address of
    /// its IPv4 one in `ula` (see [`Ula::address`]).
    pub fn set_ipv6(&mut self, provider: Provider, ula: Ula) {
        self.ipv6.retain(|(p, _)| *p != provider);
        self.ipv6.push((provider, ula));
    }

    /// The IPv6 address of a `provider` node at `v4`, if its nodes are
    /// dual-stack; also of the host on a dual-stack provider's network
    /// (adm1 on the LXC bridge, which carries the host's IPv6 address too).
    pub fn address_v6(&self, provider: Provider, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        self.ipv6
            .iter()
            .find(|(p, _)| *p == provider || self.plan_for(*p).host_address() == v4)
            .map(|(_, ula)| ula.address(v4))
    }

    /// Gives `provider` a plan of its own.
    pub fn set(&mut self, provider: Provider, plan: AddressPlan) {
        self.own.retain(|(p, _)| *p != provider);
        self.own.push((provider, plan));
    }

    /// The plan `provider`'s nodes take their addresses from.
    pub fn plan_for(&self, provider: Provider) -> &AddressPlan {
        self.own
            .iter()
            .find(|(p, _)| *p == provider)
            .map_or(&self.default, |(_, plan)| plan)
    }

    /// The default provider's plan, where `adm1` lives.
    pub fn default_plan(&self) -> &AddressPlan {
        &self.default
    }

    /// Every plan's network (CIDR), the default's first, each once.
    pub fn networks(&self) -> Vec<String> {
        let mut list = vec![self.default.to_string()];
        for (_, plan) in &self.own {
            let network = plan.to_string();
            if !list.contains(&network) {
                list.push(network);
            }
        }
        for (_, ula) in &self.ipv6 {
            let network = ula.to_string();
            if !list.contains(&network) {
                list.push(network);
            }
        }
        list
    }
}

/// A cluster's unique local IPv6 prefix (RFC 4193): `fd`, 40 random bits,
/// subnet 0, as one /64 (the upper 64 bits of its addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ula(u64);

impl Ula {
    /// The prefix with `global_id` (40 random bits: RFC 4193 asks for them
    /// to be random, so two clusters' prefixes almost surely differ).
    pub fn new(global_id: [u8; 5]) -> Self {
        let id = global_id
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        Ula((0xfd << 56) | (id << 16))
    }

    /// A node's IPv6 address: its IPv4 address as the low 32 bits, so the
    /// two name the same node at a glance (`fd..::c0a8:b15` is
    /// 192.168.11.21) and never collide.
    pub fn address(&self, v4: Ipv4Addr) -> Ipv6Addr {
        Ipv6Addr::from((u128::from(self.0) << 64) | u128::from(u32::from(v4)))
    }
}

impl fmt::Display for Ula {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", Ipv6Addr::from(u128::from(self.0) << 64))
    }
}

impl FromStr for Ula {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a unique local /64 prefix, e.g. fd12:3456:789a::/64");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
        let bits = u128::from(addr);
        if prefix != "64" || bits as u64 != 0 || (bits >> 120) != 0xfd {
            return Err(bad());
        }
        Ok(Ula((bits >> 64) as u64))
    }
}

impl Default for AddressPlans {
    fn default() -> Self {
        Self::new(AddressPlan::default())
    }
}

/// Hands out addresses one after another, from whichever plan each node
/// belongs to, never one already in use in any plan (plans may overlap). The
/// pool cursor of each plan only moves forward, so allocating n addresses
/// costs O(n), not O(n²).
#[derive(Debug, Clone)]
pub struct Allocator {
    used: HashSet<Ipv4Addr>,
    cursors: HashMap<AddressPlan, u32>,
}

impl Allocator {
    /// An allocator given the addresses in use.
    pub fn new(used: HashSet<Ipv4Addr>) -> Self {
        Self {
            used,
            cursors: HashMap::new(),
        }
    }

    pub fn allocate(&mut self, plan: &AddressPlan, role: Role, index: u32) -> Option<Ipv4Addr> {
        if let Some(addr) = plan.seed_address(role, index)
            && self.used.insert(addr)
        {
            return Some(addr);
        }
        let cursor = self.cursors.entry(*plan).or_insert(plan.base + POOL_START);
        while *cursor <= plan.last {
            let addr = Ipv4Addr::from(*cursor);
            *cursor += 1;
            if self.used.insert(addr) {
                return Some(addr);
            }
        }
        None
    }
}

impl Default for AddressPlan {
    fn default() -> Self {
        Self::new(Ipv4Addr::new(127, 0, 11, 0), 24).expect("the default plan is valid")
    }
}

impl FromStr for AddressPlan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not of the form ADDRESS/PREFIX, e.g. 127.0.11.0/24")
        })?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        Self::new(addr, prefix)
    }
}

impl fmt::Display for AddressPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let span = (self.last + 1) ^ self.base;
        let prefix = 32 - (32 - span.leading_zeros());
        write!(f, "{}/{}", Ipv4Addr::from(self.base), prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_dual_stack_nodes_ipv6_address_carries_its_ipv4_one() {
        let ula = Ula::new([0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(ula.to_string(), "fd12:3456:789a::/64");
        assert_eq!(ula.to_string().parse::<Ula>(), Ok(ula));
        assert_eq!(
            ula.address(ip("192.168.11.21")).to_string(),
            "fd12:3456:789a::c0a8:b15"
        );
        for bad in [
            "fd12::/48",
            "fe80::/64",
            "fd12:3456:789a::1/64",
            "x",
            "fd12::",
        ] {
            assert!(bad.parse::<Ula>().is_err(), "{bad}");
        }
        let mut plans = AddressPlans::new(AddressPlan::default());
        plans.set(Provider::Lxc, "192.168.11.0/24".parse().expect("plan"));
        plans.set_ipv6(Provider::Lxc, ula);
        assert_eq!(plans.address_v6(Provider::Local, ip("127.0.11.21")), None);
        assert_eq!(
            plans.address_v6(Provider::Lxc, ip("192.168.11.22")),
            Some("fd12:3456:789a::c0a8:b16".parse().expect("v6"))
        );
        assert_eq!(
            plans.networks(),
            ["127.0.11.0/24", "192.168.11.0/24", "fd12:3456:789a::/64"]
        );
        // The host on the LXC bridge (adm1 there) is dual-stack too; a
        // local node elsewhere in that network is not.
        assert_eq!(
            plans.address_v6(Provider::Local, ip("192.168.11.5")),
            Some("fd12:3456:789a::c0a8:b05".parse().expect("v6"))
        );
        assert_eq!(plans.address_v6(Provider::Local, ip("192.168.11.30")), None);
    }

    #[test]
    fn seed_nodes_get_seed_addresses() {
        let plan = AddressPlan::default();
        let used = HashSet::new();
        assert_eq!(plan.allocate(Role::Adm, 1, &used), Some(ip("127.0.11.5")));
        assert_eq!(plan.allocate(Role::Db, 1, &used), Some(ip("127.0.11.11")));
        assert_eq!(plan.allocate(Role::Db, 2, &used), Some(ip("127.0.11.12")));
        assert_eq!(plan.allocate(Role::Web, 1, &used), Some(ip("127.0.11.21")));
        assert_eq!(plan.allocate(Role::Web, 9, &used), Some(ip("127.0.11.29")));
    }

    #[test]
    fn admin_hosts_sit_between_adm1_and_the_db_nodes() {
        let plan = AddressPlan::default();
        assert_eq!(plan.admin_address(1), plan.seed_address(Role::Adm, 1));
        assert_eq!(plan.admin_address(2), Some(ip("127.0.11.6")));
        assert_eq!(plan.admin_address(MAX_ADMIN_HOSTS), Some(ip("127.0.11.10")));
        assert_eq!(plan.admin_address(0), None);
        assert_eq!(plan.admin_address(MAX_ADMIN_HOSTS + 1), None);
        // No node, seed or pool, is ever given an admin host's address.
        let mut used = HashSet::new();
        let mut allocator = Allocator::new(HashSet::new());
        for index in 1..=20 {
            for role in [Role::Db, Role::Web] {
                if let Some(address) = allocator.allocate(&plan, role, index) {
                    used.insert(address);
                }
            }
        }
        for index in 2..=MAX_ADMIN_HOSTS {
            let admin = plan.admin_address(index).expect("address");
            assert!(!used.contains(&admin), "{admin} was given to a node");
        }
    }

    #[test]
    fn virtualbox_base_gives_the_seed_network() {
        let plan: AddressPlan = "192.168.11.0/24".parse().expect("plan");
        assert_eq!(plan.seed_address(Role::Web, 2), Some(ip("192.168.11.22")));
    }

    #[test]
    fn tenth_node_of_a_role_goes_to_the_pool() {
        let plan = AddressPlan::default();
        let mut used = HashSet::new();
        assert_eq!(plan.allocate(Role::Web, 10, &used), Some(ip("127.0.11.30")));
        used.insert(ip("127.0.11.30"));
        assert_eq!(plan.allocate(Role::Db, 10, &used), Some(ip("127.0.11.31")));
    }

    #[test]
    fn a_full_block_allocates_nothing() {
        let plan: AddressPlan = "10.0.0.0/27".parse().expect("plan");
        let used: HashSet<_> = (30..=30)
            .map(|i| Ipv4Addr::from(u32::from(ip("10.0.0.0")) + i))
            .collect();
        assert_eq!(plan.allocate(Role::Web, 10, &used), None);
        assert_eq!(plan.capacity(), 20);
    }

    #[test]
    fn base_inside_a_larger_block_extends_the_pool_across_octets() {
        let plan: AddressPlan = "127.0.11.0/16".parse().expect("plan");
        let used: HashSet<_> = (30..=254).map(|i| Ipv4Addr::new(127, 0, 11, i)).collect();
        assert_eq!(
            plan.allocate(Role::Web, 500, &used),
            Some(ip("127.0.11.255"))
        );
        assert_eq!(plan.to_string(), "127.0.11.0/16");
        assert_eq!(AddressPlan::default().to_string(), "127.0.11.0/24");
    }

    #[test]
    fn a_provider_without_a_plan_of_its_own_uses_the_default() {
        let mut plans = AddressPlans::new("192.168.11.0/24".parse().expect("plan"));
        plans.set(Provider::Local, AddressPlan::default());
        assert_eq!(plans.plan_for(Provider::Local), &AddressPlan::default());
        assert_eq!(plans.plan_for(Provider::Lxc).to_string(), "192.168.11.0/24");
        assert_eq!(plans.default_plan().to_string(), "192.168.11.0/24");
        plans.set(Provider::Local, "127.0.12.0/24".parse().expect("plan"));
        assert_eq!(plans.plan_for(Provider::Local).to_string(), "127.0.12.0/24");
    }

    #[test]
    fn overlapping_plans_never_give_an_address_twice() {
        let narrow = AddressPlan::default();
        let wide: AddressPlan = "127.0.11.0/16".parse().expect("plan");
        let mut alloc = Allocator::new(HashSet::new());
        assert_eq!(
            alloc.allocate(&narrow, Role::Web, 10),
            Some(ip("127.0.11.30"))
        );
        // The wide plan's pool starts at the same address: it takes the next.
        assert_eq!(
            alloc.allocate(&wide, Role::Web, 11),
            Some(ip("127.0.11.31"))
        );
        assert_eq!(alloc.allocate(&wide, Role::Web, 1), Some(ip("127.0.11.21")));
        // Taken through the other plan: the seed address is not given again.
        assert_eq!(
            alloc.allocate(&narrow, Role::Web, 1),
            Some(ip("127.0.11.32"))
        );
    }

    #[test]
    fn malformed_plans_are_refused() {
        for bad in [
            "127.0.11.0",
            "127.0.11.0/33",
            "x/24",
            "127.0.11.240/24",
            "10.0.0.0/28",
        ] {
            assert!(bad.parse::<AddressPlan>().is_err(), "{bad} accepted");
        }
    }
}
