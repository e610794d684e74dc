//! The nftables data plane as values: what each Service port installs, the transactions that
//! get from one state to the next, and how each piece is encoded for the kernel ([`nfnl`]).
//! Every object also prints as the `nft` line that would make it (tests, logs, errors).
//!
//! Layout (after upstream kube-proxy's nftables mode), in `ip` tables of rkube's own:
//! - Services are spread over [`SHARDS`] tables `<table>-<n>` by a hash of namespace/name, so
//!   that the kernel's per-table work at each commit (validating chains reachable from the
//!   base chains, looking sets up by name) stays small however many Services there are.
//!   Each shard has its own NAT hooks (`nat-prerouting`, `nat-output` → `services`): `ip
//!   daddr . l4proto . dport` in `service-ips` goes to the port's `svc-<ns>/<name>/<proto>/<port>`
//!   chain, node-local `l4proto . dport` in `service-nodeports` to its `ext-...` chain, and so
//!   do the port's external IPs (externalIPs, load-balancer ingress) in `service-ips`.
//! - A `svc-` chain marks traffic from outside the node's pod range for masquerading, then
//!   DNATs to one endpoint chosen with equal probability: `numgen random mod k` looked up in
//!   the port's `eps-...` map (index → address . port). Two rules per port, whatever its
//!   endpoint count; an endpoint change rewrites map elements only. Named maps, not anonymous
//!   ones: the kernel binds anonymous sets in time linear in the transaction.
//! - sessionAffinity ClientIP: one timeout set per endpoint (`aff-...`) remembers the clients
//!   it served; a client found in one goes back to that endpoint; others pick statistic-style
//!   (`numgen random mod left == 0` per endpoint).
//! - The main table `<table>` has what is shared: `no-endpoint-services`/`no-endpoint-nodeports`
//!   send new connections to a `reject` (internalTrafficPolicy Local without a local endpoint:
//!   `drop`, as upstream) from filter hooks, and `masquerading` (postrouting) masquerades
//!   marked packets and hairpin traffic (a pod that reached itself through its Service:
//!   `ip saddr . ip daddr` in `hairpin`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use crate::model::{Endpoint, ServicePort};
use crate::nfnl::{self, attr, msg, Attrs, Batch};

/// The packet mark bit that asks `masquerading` to masquerade (upstream's 0x4000).
pub const MASQ_MARK: u32 = 0x4000;

/// How many tables Services are spread over.
pub const SHARDS: usize = 32;

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{s:?}: not an IPv4 CIDR"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & Cidr::mask_of(prefix)),
            prefix,
        })
    }
}

impl Cidr {
    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Where the data plane is and what counts as local traffic.
#[derive(Debug, Clone)]
pub struct Context {
    /// The main `ip` table rkube owns; Services go in `<table>-0` .. `<table>-15`.
    pub table: String,
    /// The node's (or cluster's) pod range: traffic from elsewhere to a ClusterIP is
    /// masqueraded so that replies come back through this node. None: masquerade all of it.
    pub local_cidr: Option<Cidr>,
}

impl Context {
    pub fn shard_table(&self, shard: usize) -> String {
        format!("{}-{shard}", self.table)
    }

    /// Every table the data plane owns: the main one first.
    pub fn tables(&self) -> Vec<String> {
        std::iter::once(self.table.clone())
            .chain((0..SHARDS).map(|s| self.shard_table(s)))
            .collect()
    }

    fn table_of(&self, scope: Scope, shard: usize) -> String {
        match scope {
            Scope::Main => self.table.clone(),
            Scope::Shard => self.shard_table(shard),
        }
    }
}

/// The shard of a Service (`namespace/name`, or a port id starting with it): FNV-1a.
pub fn shard_of(id: &str) -> usize {
    let key = id.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h as usize) % SHARDS
}

fn proto_number(p: &str) -> u8 {
    match p {
        "udp" => 17,
        "sctp" => 132,
        _ => 6,
    }
}

/// Where a rule goes when it is done with a packet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Drop => write!(f, "drop"),
            Verdict::Return => write!(f, "return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// One statement of a rule (each is a few kernel expressions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `ip saddr != CIDR`
    SaddrNotIn(Cidr),
    /// `ip saddr @SET`
    SaddrIn(String),
    /// `meta mark set mark or BITS`
    MarkSet(u32),
    /// `meta mark and BITS == 0`
    MarkUnset(u32),
    /// `meta mark set mark xor BITS`
    MarkFlip(u32),
    /// `numgen random mod N 0`: true one time in N.
    OneIn(u32),
    /// `update @SET { ip saddr }`
    Remember(String),
    /// `dnat to IP:PORT`
    Dnat(Ipv4Addr, u16),
    /// `dnat ip to numgen random mod N map @MAP`
    DnatPick(u32, String),
    /// `ct state new`
    CtNew,
    /// `ct status dnat`
    CtDnat,
    /// `ip saddr . ip daddr @SET`
    Pair(String),
    /// `masquerade` (`fully-random`)
    Masquerade {
        fully_random: bool,
    },
    /// `reject`
    Reject,
    /// `ip daddr . meta l4proto . th dport vmap @MAP`
    ServiceVmap(String),
    /// `fib daddr type local meta l4proto . th dport vmap @MAP`
    NodePortVmap(String),
    Verdict(Verdict),
}

impl fmt::Display for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stmt::SaddrNotIn(c) => write!(f, "ip saddr != {c}"),
            Stmt::SaddrIn(s) => write!(f, "ip saddr @{s}"),
            Stmt::MarkSet(b) => write!(f, "meta mark set mark or {b:#x}"),
            Stmt::MarkUnset(b) => write!(f, "meta mark and {b:#x} == 0"),
            Stmt::MarkFlip(b) => write!(f, "meta mark set mark xor {b:#x}"),
            Stmt::OneIn(n) => write!(f, "numgen random mod {n} 0"),
            Stmt::Remember(s) => write!(f, "update @{s} {{ ip saddr }}"),
            Stmt::Dnat(ip, port) => write!(f, "dnat to {ip}:{port}"),
            Stmt::DnatPick(n, m) => write!(f, "dnat ip to numgen random mod {n} map @{m}"),
            Stmt::CtNew => write!(f, "ct state new"),
            Stmt::CtDnat => write!(f, "ct status dnat"),
            Stmt::Pair(s) => write!(f, "ip saddr . ip daddr @{s}"),
            Stmt::Masquerade { fully_random } => {
                write!(
                    f,
                    "masquerade{}",
                    if *fully_random { " fully-random" } else { "" }
                )
            }
            Stmt::Reject => write!(f, "reject"),
            Stmt::ServiceVmap(m) => write!(f, "ip daddr . meta l4proto . th dport vmap @{m}"),
            Stmt::NodePortVmap(m) => {
                write!(f, "fib daddr type local meta l4proto . th dport vmap @{m}")
            }
            Stmt::Verdict(v) => v.fmt(f),
        }
    }
}

/// A rule: statements in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Stmt>);

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            s.fmt(f)?;
        }
        Ok(())
    }
}

/// The kinds of sets and maps the data plane uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// `ipv4_addr . inet_proto . inet_service : verdict`
    Services,
    /// `inet_proto . inet_service : verdict`
    NodePorts,
    /// `mark : ipv4_addr . inet_service` (a pick, host-endian → an endpoint)
    Endpoints,
    /// `ipv4_addr . ipv4_addr`
    Pairs,
    /// `ipv4_addr`, filled by the data path, entries expiring after the timeout (seconds).
    Clients(u32),
}

// nft's data type numbers (a concatenation: each type shifted by 6 bits per later field).
/// A host-endian 32-bit integer, as numgen writes (printed by nft as `mark`).
const TYPE_MARK: u32 = 19;
const TYPE_IPADDR: u32 = 7;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

impl SetKind {
    fn is_map(self) -> bool {
        matches!(
            self,
            SetKind::Services | SetKind::NodePorts | SetKind::Endpoints
        )
    }

    /// (key type, key length, flags, data type and length)
    fn layout(self) -> (u32, u32, u32, Option<(u32, u32)>) {
        let verdict = Some((NFT_DATA_VERDICT, 0));
        match self {
            SetKind::Services => (
                (TYPE_IPADDR << 12) | (TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE,
                12,
                nfnl::NFT_SET_MAP,
                verdict,
            ),
            SetKind::NodePorts => (
                (TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE,
                8,
                nfnl::NFT_SET_MAP,
                verdict,
            ),
            SetKind::Endpoints => (
                TYPE_MARK,
                4,
                nfnl::NFT_SET_MAP,
                Some(((TYPE_IPADDR << 6) | TYPE_INET_SERVICE, 8)),
            ),
            SetKind::Pairs => ((TYPE_IPADDR << 6) | TYPE_IPADDR, 8, 0, None),
            SetKind::Clients(_) => (
                TYPE_IPADDR,
                4,
                nfnl::NFT_SET_TIMEOUT | nfnl::NFT_SET_EVAL,
                None,
            ),
        }
    }
}

impl fmt::Display for SetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetKind::Services => write!(
                f,
                "{{ type ipv4_addr . inet_proto . inet_service : verdict; }}"
            ),
            SetKind::NodePorts => write!(f, "{{ type inet_proto . inet_service : verdict; }}"),
            SetKind::Endpoints => write!(f, "{{ type mark : ipv4_addr . inet_service; }}"),
            SetKind::Pairs => write!(f, "{{ type ipv4_addr . ipv4_addr; }}"),
            SetKind::Clients(secs) => write!(
                f,
                "{{ type ipv4_addr; flags dynamic,timeout; timeout {secs}s; }}"
            ),
        }
    }
}

/// A set or map element's key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// ClusterIP . protocol . port
    Service(Ipv4Addr, &'static str, u16),
    /// protocol . node port
    NodePort(&'static str, u16),
    /// A pick (0 ..).
    Index(u32),
    /// Two addresses.
    Pair(Ipv4Addr, Ipv4Addr),
}

impl Key {
    /// As the kernel keeps it: each field in a 4-byte register slot.
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12);
        match self {
            Key::Service(ip, proto, port) => {
                v.extend_from_slice(&ip.octets());
                v.extend_from_slice(&[proto_number(proto), 0, 0, 0]);
                v.extend_from_slice(&port.to_be_bytes());
                v.extend_from_slice(&[0, 0]);
            }
            Key::NodePort(proto, port) => {
                v.extend_from_slice(&[proto_number(proto), 0, 0, 0]);
                v.extend_from_slice(&port.to_be_bytes());
                v.extend_from_slice(&[0, 0]);
            }
            Key::Index(i) => v.extend_from_slice(&i.to_ne_bytes()),
            Key::Pair(a, b) => {
                v.extend_from_slice(&a.octets());
                v.extend_from_slice(&b.octets());
            }
        }
        v
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Service(ip, proto, port) => write!(f, "{ip} . {proto} . {port}"),
            Key::NodePort(proto, port) => write!(f, "{proto} . {port}"),
            Key::Index(i) => write!(f, "{i}"),
            Key::Pair(a, b) => write!(f, "{a} . {b}"),
        }
    }
}

/// What a map element maps to (sets: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    None,
    Verdict(Verdict),
    Endpoint(Ipv4Addr, u16),
}

/// Which table an element's set is in: the main one or the Service's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Main,
    Shard,
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `nat` or `filter`.
    pub kind: &'static str,
    /// `prerouting`, `input`, `forward`, `output` or `postrouting`.
    pub hook: &'static str,
    pub priority: i32,
}

impl Hook {
    fn number(&self) -> u32 {
        match self.hook {
            "prerouting" => 0,
            "input" => 1,
            "forward" => 2,
            "output" => 3,
            _ => 4,
        }
    }
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddTable(String),
    DelTable(String),
    AddChain {
        table: String,
        chain: String,
        hook: Option<Hook>,
    },
    FlushChain {
        table: String,
        chain: String,
    },
    DelChain {
        table: String,
        chain: String,
    },
    AddRule {
        table: String,
        chain: String,
        rule: Rule,
    },
    AddSet {
        table: String,
        set: String,
        kind: SetKind,
    },
    DelSet {
        table: String,
        set: String,
    },
    AddElements {
        table: String,
        set: String,
        elements: Vec<(Key, Value)>,
    },
    DelElements {
        table: String,
        set: String,
        keys: Vec<Key>,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddTable(t) => write!(f, "add table ip {t}"),
            Op::DelTable(t) => write!(f, "delete table ip {t}"),
            Op::AddChain { table, chain, hook } => {
                write!(f, "add chain ip {table} {chain}")?;
                if let Some(h) = hook {
                    write!(
                        f,
                        " {{ type {} hook {} priority {}; policy accept; }}",
                        h.kind, h.hook, h.priority
                    )?;
                }
                Ok(())
            }
            Op::FlushChain { table, chain } => write!(f, "flush chain ip {table} {chain}"),
            Op::DelChain { table, chain } => write!(f, "delete chain ip {table} {chain}"),
            Op::AddRule { table, chain, rule } => write!(f, "add rule ip {table} {chain} {rule}"),
            Op::AddSet { table, set, kind } => {
                let what = if kind.is_map() { "map" } else { "set" };
                write!(f, "add {what} ip {table} {set} {kind}")
            }
            Op::DelSet { table, set } => write!(f, "delete set ip {table} {set}"),
            Op::AddElements {
                table,
                set,
                elements,
            } => {
                write!(f, "add element ip {table} {set} {{ ")?;
                for (i, (k, v)) in elements.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match v {
                        Value::None => write!(f, "{k}")?,
                        Value::Verdict(v) => write!(f, "{k} : {v}")?,
                        Value::Endpoint(ip, port) => write!(f, "{k} : {ip} . {port}")?,
                    }
                }
                write!(f, " }}")
            }
            Op::DelElements { table, set, keys } => {
                write!(f, "delete element ip {table} {set} {{ ")?;
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}")?;
                }
                write!(f, " }}")
            }
        }
    }
}

/// What one Service port installs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// The table (shard) its chains and sets are in.
    shard: usize,
    /// Chain name → its rules.
    chains: BTreeMap<String, Vec<Rule>>,
    /// Set name → its kind.
    sets: BTreeMap<String, SetKind>,
    /// (table, set, key) → value.
    elements: BTreeMap<(Scope, String, Key), Value>,
    /// This node's endpoint IPs (for hairpin masquerading).
    hairpin: BTreeSet<Ipv4Addr>,
}

fn rule(stmts: impl Into<Vec<Stmt>>) -> Rule {
    Rule(stmts.into())
}

fn affinity_set(sp: &ServicePort, e: &Endpoint) -> String {
    format!("aff-{}/{}/{}", sp.id, e.ip, e.port)
}

/// Rules that pick one of `eps` one by one (statistic-style) and DNAT to it: used with
/// session affinity (each endpoint remembers its clients) and for node-local subsets.
fn statistic_rules(sp: &ServicePort, eps: &[&Endpoint], out: &mut Vec<Rule>) {
    if sp.affinity_seconds.is_some() {
        for e in eps {
            out.push(rule([
                Stmt::SaddrIn(affinity_set(sp, e)),
                Stmt::Dnat(e.ip, e.port),
            ]));
        }
    }
    let n = eps.len();
    for (i, e) in eps.iter().enumerate() {
        let left = n - i;
        let mut stmts = Vec::new();
        if left > 1 {
            stmts.push(Stmt::OneIn(left as u32));
        }
        if sp.affinity_seconds.is_some() {
            stmts.push(Stmt::Remember(affinity_set(sp, e)));
        }
        stmts.push(Stmt::Dnat(e.ip, e.port));
        out.push(Rule(stmts));
    }
}

/// Render one Service port.
pub fn render(ctx: &Context, sp: &ServicePort) -> Rendered {
    let mut r = Rendered {
        shard: shard_of(&sp.id),
        ..Default::default()
    };
    let ip_key = Key::Service(sp.cluster_ip, sp.protocol, sp.port);
    let np_key = sp.node_port.map(|n| Key::NodePort(sp.protocol, n));
    let reject = Value::Verdict(Verdict::Goto("reject-chain".into()));
    let external_keys: Vec<Key> = sp
        .external_ips
        .iter()
        .map(|ip| Key::Service(*ip, sp.protocol, sp.port))
        .collect();
    if sp.endpoints.is_empty() {
        for k in external_keys {
            r.elements.insert(
                (Scope::Main, "no-endpoint-services".into(), k),
                reject.clone(),
            );
        }
        r.elements.insert(
            (Scope::Main, "no-endpoint-services".into(), ip_key),
            reject.clone(),
        );
        if let Some(k) = np_key {
            r.elements
                .insert((Scope::Main, "no-endpoint-nodeports".into(), k), reject);
        }
        return r;
    }
    if let Some(secs) = sp.affinity_seconds {
        for e in &sp.endpoints {
            r.sets.insert(affinity_set(sp, e), SetKind::Clients(secs));
        }
    }
    r.hairpin = sp
        .endpoints
        .iter()
        .filter(|e| e.local)
        .map(|e| e.ip)
        .collect();
    let mark = match ctx.local_cidr {
        Some(cidr) => rule([Stmt::SaddrNotIn(cidr), Stmt::MarkSet(MASQ_MARK)]),
        None => rule([Stmt::MarkSet(MASQ_MARK)]),
    };
    let internal = sp.internal();
    let svc_chain = format!("svc-{}", sp.id);
    if internal.is_empty() {
        // internalTrafficPolicy Local and no endpoint here.
        r.elements.insert(
            (Scope::Main, "no-endpoint-services".into(), ip_key),
            Value::Verdict(Verdict::Drop),
        );
    } else {
        let mut rules = vec![mark];
        if sp.affinity_seconds.is_some() {
            statistic_rules(sp, &internal, &mut rules);
        } else {
            let map = format!("eps-{}", sp.id);
            rules.push(rule([Stmt::DnatPick(internal.len() as u32, map.clone())]));
            r.sets.insert(map.clone(), SetKind::Endpoints);
            for (i, e) in internal.iter().enumerate() {
                r.elements.insert(
                    (Scope::Shard, map.clone(), Key::Index(i as u32)),
                    Value::Endpoint(e.ip, e.port),
                );
            }
        }
        r.chains.insert(svc_chain.clone(), rules);
        r.elements.insert(
            (Scope::Shard, "service-ips".into(), ip_key),
            Value::Verdict(Verdict::Goto(svc_chain.clone())),
        );
    }
    // Traffic from outside: node ports and external IPs (externalIPs, load-balancer IPs).
    if np_key.is_some() || !external_keys.is_empty() {
        let ext_chain = format!("ext-{}", sp.id);
        let external = sp.external();
        let mut rules = Vec::new();
        if sp.external_local {
            // The client's address is kept: only this node's endpoints, no masquerading.
            if external.is_empty() {
                rules.push(rule([Stmt::Verdict(Verdict::Drop)]));
            } else {
                statistic_rules(sp, &external, &mut rules);
            }
        } else {
            rules.push(rule([Stmt::MarkSet(MASQ_MARK)]));
            if external.len() == internal.len() {
                rules.push(rule([Stmt::Verdict(Verdict::Goto(svc_chain))]));
            } else {
                statistic_rules(sp, &external, &mut rules);
            }
        }
        r.chains.insert(ext_chain.clone(), rules);
        let to_ext = Value::Verdict(Verdict::Goto(ext_chain));
        if let Some(k) = np_key {
            r.elements.insert(
                (Scope::Shard, "service-nodeports".into(), k),
                to_ext.clone(),
            );
        }
        for k in external_keys {
            r.elements
                .insert((Scope::Shard, "service-ips".into(), k), to_ext.clone());
        }
    }
    r
}

fn chain(table: &str, name: &str, hook: Option<Hook>) -> Op {
    Op::AddChain {
        table: table.into(),
        chain: name.into(),
        hook,
    }
}

fn add_rule(table: &str, chain: &str, stmts: impl Into<Vec<Stmt>>) -> Op {
    Op::AddRule {
        table: table.into(),
        chain: chain.into(),
        rule: rule(stmts),
    }
}

fn set(table: &str, name: &str, kind: SetKind) -> Op {
    Op::AddSet {
        table: table.into(),
        set: name.into(),
        kind,
    }
}

fn hook(kind: &'static str, hook: &'static str, priority: i32) -> Option<Hook> {
    Some(Hook {
        kind,
        hook,
        priority,
    })
}

fn jump(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(c.into()))
}

/// The fixed part of the main table: what Services share.
fn main_skeleton(t: &str, out: &mut Vec<Op>) {
    out.extend([
        set(t, "no-endpoint-services", SetKind::Services),
        set(t, "no-endpoint-nodeports", SetKind::NodePorts),
        set(t, "hairpin", SetKind::Pairs),
        chain(t, "masquerading", None),
        add_rule(
            t,
            "masquerading",
            [
                Stmt::CtDnat,
                Stmt::Pair("hairpin".into()),
                Stmt::Masquerade {
                    fully_random: false,
                },
            ],
        ),
        add_rule(
            t,
            "masquerading",
            [Stmt::MarkUnset(MASQ_MARK), Stmt::Verdict(Verdict::Return)],
        ),
        add_rule(t, "masquerading", [Stmt::MarkFlip(MASQ_MARK)]),
        add_rule(t, "masquerading", [Stmt::Masquerade { fully_random: true }]),
        chain(t, "reject-chain", None),
        add_rule(t, "reject-chain", [Stmt::Reject]),
        chain(t, "service-endpoints-check", None),
        add_rule(
            t,
            "service-endpoints-check",
            [Stmt::ServiceVmap("no-endpoint-services".into())],
        ),
        chain(t, "nodeport-endpoints-check", None),
        add_rule(
            t,
            "nodeport-endpoints-check",
            [Stmt::NodePortVmap("no-endpoint-nodeports".into())],
        ),
        chain(t, "nat-postrouting", hook("nat", "postrouting", 100)),
        add_rule(t, "nat-postrouting", [jump("masquerading")]),
        chain(t, "filter-input", hook("filter", "input", -110)),
        add_rule(
            t,
            "filter-input",
            [Stmt::CtNew, jump("nodeport-endpoints-check")],
        ),
        add_rule(
            t,
            "filter-input",
            [Stmt::CtNew, jump("service-endpoints-check")],
        ),
        chain(t, "filter-forward", hook("filter", "forward", -110)),
        add_rule(
            t,
            "filter-forward",
            [Stmt::CtNew, jump("service-endpoints-check")],
        ),
        chain(t, "filter-output", hook("filter", "output", -110)),
        add_rule(
            t,
            "filter-output",
            [Stmt::CtNew, jump("service-endpoints-check")],
        ),
    ]);
}

/// The fixed part of a shard: its maps and NAT hooks.
fn shard_skeleton(t: &str, out: &mut Vec<Op>) {
    out.extend([
        set(t, "service-ips", SetKind::Services),
        set(t, "service-nodeports", SetKind::NodePorts),
        chain(t, "services", None),
        add_rule(t, "services", [Stmt::ServiceVmap("service-ips".into())]),
        add_rule(
            t,
            "services",
            [Stmt::NodePortVmap("service-nodeports".into())],
        ),
        chain(t, "nat-prerouting", hook("nat", "prerouting", -100)),
        add_rule(t, "nat-prerouting", [jump("services")]),
        chain(t, "nat-output", hook("nat", "output", -100)),
        add_rule(t, "nat-output", [jump("services")]),
    ]);
}

/// Every table made anew (or made at all), in one transaction's opening steps.
fn recreate_tables(ctx: &Context, out: &mut Vec<Op>) {
    for t in ctx.tables() {
        out.push(Op::AddTable(t.clone()));
        out.push(Op::DelTable(t.clone()));
        out.push(Op::AddTable(t));
    }
}

/// A transaction that builds every table from nothing (replacing what is there).
pub fn full(ctx: &Context, rendered: &[&Rendered]) -> Vec<Op> {
    let mut out = Vec::new();
    recreate_tables(ctx, &mut out);
    main_skeleton(&ctx.table, &mut out);
    for s in 0..SHARDS {
        shard_skeleton(&ctx.shard_table(s), &mut out);
    }
    let mut txn = Txn::new(ctx);
    let empty = Rendered::default();
    for r in rendered {
        txn.change(&empty, r);
    }
    let hairpin: BTreeSet<Ipv4Addr> = rendered.iter().flat_map(|r| r.hairpin.clone()).collect();
    txn.hairpin(&BTreeSet::new(), &hairpin);
    out.extend(txn.finish());
    out
}

/// A transaction that removes every table (those there are).
pub fn remove(ctx: &Context) -> Vec<Op> {
    let mut out = Vec::new();
    for t in ctx.tables() {
        out.push(Op::AddTable(t.clone()));
        out.push(Op::DelTable(t));
    }
    out
}

type Elements = BTreeMap<(String, String), Vec<(Key, Value)>>;
type Keys = BTreeMap<(String, String), Vec<Key>>;

/// A transaction built in phases, so that nothing is referenced before it exists or deleted
/// while still referenced.
pub struct Txn<'a> {
    ctx: &'a Context,
    add_objects: Vec<Op>,
    fill: Vec<Op>,
    del_elements: Keys,
    add_elements: Elements,
    flush_dead: Vec<Op>,
    del_dead: Vec<Op>,
}

impl<'a> Txn<'a> {
    pub fn new(ctx: &'a Context) -> Self {
        Txn {
            ctx,
            add_objects: Vec::new(),
            fill: Vec::new(),
            del_elements: BTreeMap::new(),
            add_elements: BTreeMap::new(),
            flush_dead: Vec::new(),
            del_dead: Vec::new(),
        }
    }

    /// What turns `old` into `new` (both of one Service port, so of one shard).
    pub fn change(&mut self, old: &Rendered, new: &Rendered) {
        let shard = if new == &Rendered::default() {
            old.shard
        } else {
            new.shard
        };
        let t = self.ctx.shard_table(shard);
        for (name, kind) in &new.sets {
            if !old.sets.contains_key(name) {
                self.add_objects.push(set(&t, name, *kind));
            }
        }
        for (name, rules) in &new.chains {
            match old.chains.get(name) {
                Some(old_rules) if old_rules == rules => continue,
                Some(_) => self.fill.push(Op::FlushChain {
                    table: t.clone(),
                    chain: name.clone(),
                }),
                None => self.add_objects.push(chain(&t, name, None)),
            }
            for r in rules {
                self.fill.push(Op::AddRule {
                    table: t.clone(),
                    chain: name.clone(),
                    rule: r.clone(),
                });
            }
        }
        for ((scope, set, key), value) in &old.elements {
            let k = (*scope, set.clone(), key.clone());
            if new.elements.get(&k) != Some(value) {
                let table = self.ctx.table_of(*scope, shard);
                self.del_elements
                    .entry((table, set.clone()))
                    .or_default()
                    .push(key.clone());
            }
        }
        for ((scope, set, key), value) in &new.elements {
            let k = (*scope, set.clone(), key.clone());
            if old.elements.get(&k) != Some(value) {
                let table = self.ctx.table_of(*scope, shard);
                self.add_elements
                    .entry((table, set.clone()))
                    .or_default()
                    .push((key.clone(), value.clone()));
            }
        }
        for name in old.chains.keys() {
            if !new.chains.contains_key(name) {
                self.flush_dead.push(Op::FlushChain {
                    table: t.clone(),
                    chain: name.clone(),
                });
                self.del_dead.push(Op::DelChain {
                    table: t.clone(),
                    chain: name.clone(),
                });
            }
        }
        for name in old.sets.keys() {
            if !new.sets.contains_key(name) {
                self.del_dead.push(Op::DelSet {
                    table: t.clone(),
                    set: name.clone(),
                });
            }
        }
    }

    /// Hairpin elements: from the IPs in `old` to those in `new`.
    pub fn hairpin(&mut self, old: &BTreeSet<Ipv4Addr>, new: &BTreeSet<Ipv4Addr>) {
        let k = (self.ctx.table.clone(), "hairpin".to_string());
        for ip in old.difference(new) {
            self.del_elements
                .entry(k.clone())
                .or_default()
                .push(Key::Pair(*ip, *ip));
        }
        for ip in new.difference(old) {
            self.add_elements
                .entry(k.clone())
                .or_default()
                .push((Key::Pair(*ip, *ip), Value::None));
        }
    }

    pub fn finish(self) -> Vec<Op> {
        let mut out = self.add_objects;
        out.extend(self.fill);
        for ((table, set), keys) in self.del_elements {
            out.push(Op::DelElements { table, set, keys });
        }
        for ((table, set), elements) in self.add_elements {
            out.push(Op::AddElements {
                table,
                set,
                elements,
            });
        }
        out.extend(self.flush_dead);
        out.extend(self.del_dead);
        out
    }
}

/// The hairpin IPs across everything rendered.
pub fn hairpin_of<'a>(rendered: impl Iterator<Item = &'a Rendered>) -> BTreeSet<Ipv4Addr> {
    rendered.flat_map(|r| r.hairpin.iter().copied()).collect()
}

// ---- Encoding for the kernel ----

/// Data registers: the first 4-byte ones.
const R0: u32 = nfnl::REG32_00;
const R1: u32 = nfnl::REG32_00 + 1;

mod expr {
    //! Attribute numbers of the expressions used.
    pub const PAYLOAD_DREG: u16 = 1;
    pub const PAYLOAD_BASE: u16 = 2;
    pub const PAYLOAD_OFFSET: u16 = 3;
    pub const PAYLOAD_LEN: u16 = 4;
    pub const META_DREG: u16 = 1;
    pub const META_KEY: u16 = 2;
    pub const META_SREG: u16 = 3;
    pub const CMP_SREG: u16 = 1;
    pub const CMP_OP: u16 = 2;
    pub const CMP_DATA: u16 = 3;
    pub const BITWISE_SREG: u16 = 1;
    pub const BITWISE_DREG: u16 = 2;
    pub const BITWISE_LEN: u16 = 3;
    pub const BITWISE_MASK: u16 = 4;
    pub const BITWISE_XOR: u16 = 5;
    pub const LOOKUP_SET: u16 = 1;
    pub const LOOKUP_SREG: u16 = 2;
    pub const LOOKUP_DREG: u16 = 3;
    pub const IMMEDIATE_DREG: u16 = 1;
    pub const IMMEDIATE_DATA: u16 = 2;
    pub const NG_DREG: u16 = 1;
    pub const NG_MODULUS: u16 = 2;
    pub const NG_TYPE: u16 = 3;
    pub const NAT_TYPE: u16 = 1;
    pub const NAT_FAMILY: u16 = 2;
    pub const NAT_REG_ADDR_MIN: u16 = 3;
    pub const NAT_REG_PROTO_MIN: u16 = 5;
    pub const NAT_FLAGS: u16 = 7;
    pub const MASQ_FLAGS: u16 = 1;
    pub const REJECT_TYPE: u16 = 1;
    pub const REJECT_ICMP_CODE: u16 = 2;
    pub const FIB_DREG: u16 = 1;
    pub const FIB_RESULT: u16 = 2;
    pub const FIB_FLAGS: u16 = 3;
    pub const CT_DREG: u16 = 1;
    pub const CT_KEY: u16 = 2;
    pub const DYNSET_SET_NAME: u16 = 1;
    pub const DYNSET_OP: u16 = 3;
    pub const DYNSET_SREG_KEY: u16 = 4;

    pub const NETWORK_HEADER: u32 = 1;
    pub const TRANSPORT_HEADER: u32 = 2;
    pub const META_MARK: u32 = 3;
    pub const META_L4PROTO: u32 = 16;
    pub const CMP_EQ: u32 = 0;
    pub const CMP_NEQ: u32 = 1;
    pub const CT_STATE: u32 = 0;
    pub const CT_STATUS: u32 = 2;
    pub const NG_RANDOM: u32 = 1;
    pub const NAT_DNAT: u32 = 1;
    pub const NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
    pub const NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
    pub const FIB_RESULT_ADDRTYPE: u32 = 3;
    pub const FIB_F_DADDR: u32 = 2;
    pub const DYNSET_OP_UPDATE: u32 = 1;
    /// ct state new, ct status dnat (bits), RTN_LOCAL.
    pub const CT_STATE_NEW: u32 = 8;
    pub const IPS_DST_NAT: u32 = 0x20;
    pub const RTN_LOCAL: u32 = 2;
}

fn payload(a: &mut Attrs, base: u32, offset: u32, len: u32, dreg: u32) {
    a.expr("payload", |e| {
        e.be32(expr::PAYLOAD_DREG, dreg)
            .be32(expr::PAYLOAD_BASE, base)
            .be32(expr::PAYLOAD_OFFSET, offset)
            .be32(expr::PAYLOAD_LEN, len);
    });
}

fn saddr(a: &mut Attrs, dreg: u32) {
    payload(a, expr::NETWORK_HEADER, 12, 4, dreg);
}

fn daddr(a: &mut Attrs, dreg: u32) {
    payload(a, expr::NETWORK_HEADER, 16, 4, dreg);
}

fn meta_load(a: &mut Attrs, key: u32, dreg: u32) {
    a.expr("meta", |e| {
        e.be32(expr::META_KEY, key).be32(expr::META_DREG, dreg);
    });
}

fn cmp(a: &mut Attrs, op: u32, sreg: u32, data: &[u8]) {
    a.expr("cmp", |e| {
        e.be32(expr::CMP_SREG, sreg)
            .be32(expr::CMP_OP, op)
            .value(expr::CMP_DATA, data);
    });
}

/// reg = (reg & mask) ^ xor
fn bitwise(a: &mut Attrs, reg: u32, mask: &[u8], xor: &[u8]) {
    a.expr("bitwise", |e| {
        e.be32(expr::BITWISE_SREG, reg)
            .be32(expr::BITWISE_DREG, reg)
            .be32(expr::BITWISE_LEN, mask.len() as u32)
            .value(expr::BITWISE_MASK, mask)
            .value(expr::BITWISE_XOR, xor);
    });
}

fn lookup(a: &mut Attrs, set: &str, sreg: u32, dreg: Option<u32>) {
    a.expr("lookup", |e| {
        e.str(expr::LOOKUP_SET, set).be32(expr::LOOKUP_SREG, sreg);
        if let Some(d) = dreg {
            e.be32(expr::LOOKUP_DREG, d);
        }
    });
}

fn immediate(a: &mut Attrs, dreg: u32, data: &[u8]) {
    a.expr("immediate", |e| {
        e.be32(expr::IMMEDIATE_DREG, dreg)
            .value(expr::IMMEDIATE_DATA, data);
    });
}

fn numgen(a: &mut Attrs, modulus: u32, dreg: u32) {
    a.expr("numgen", |e| {
        e.be32(expr::NG_DREG, dreg)
            .be32(expr::NG_MODULUS, modulus)
            .be32(expr::NG_TYPE, expr::NG_RANDOM);
    });
}

fn dnat(a: &mut Attrs, addr: u32, proto: u32) {
    a.expr("nat", |e| {
        e.be32(expr::NAT_TYPE, expr::NAT_DNAT)
            .be32(expr::NAT_FAMILY, u32::from(nfnl::NFPROTO_IPV4))
            .be32(expr::NAT_REG_ADDR_MIN, addr)
            .be32(expr::NAT_REG_PROTO_MIN, proto)
            .be32(expr::NAT_FLAGS, expr::NAT_RANGE_PROTO_SPECIFIED);
    });
}

/// `ct KEY & bits != 0`
fn ct_bits(a: &mut Attrs, key: u32, bits: u32) {
    a.expr("ct", |e| {
        e.be32(expr::CT_DREG, R0).be32(expr::CT_KEY, key);
    });
    bitwise(a, R0, &bits.to_ne_bytes(), &0u32.to_ne_bytes());
    cmp(a, expr::CMP_NEQ, R0, &0u32.to_ne_bytes());
}

fn mark_rewrite(a: &mut Attrs, mask: u32, xor: u32) {
    meta_load(a, expr::META_MARK, R0);
    bitwise(a, R0, &mask.to_ne_bytes(), &xor.to_ne_bytes());
    a.expr("meta", |e| {
        e.be32(expr::META_KEY, expr::META_MARK)
            .be32(expr::META_SREG, R0);
    });
}

/// `meta l4proto . th dport` into R(at), R(at+1).
fn proto_port(a: &mut Attrs, at: u32) {
    meta_load(a, expr::META_L4PROTO, at);
    payload(a, expr::TRANSPORT_HEADER, 2, 2, at + 1);
}

fn verdict_code(v: &Verdict) -> (i32, Option<&str>) {
    match v {
        Verdict::Drop => (nfnl::NF_DROP, None),
        Verdict::Return => (nfnl::NFT_RETURN, None),
        Verdict::Jump(c) => (nfnl::NFT_JUMP, Some(c)),
        Verdict::Goto(c) => (nfnl::NFT_GOTO, Some(c)),
    }
}

fn encode_stmt(s: &Stmt, a: &mut Attrs) {
    match s {
        Stmt::SaddrNotIn(c) => {
            let mask = Cidr::mask_of(c.prefix);
            saddr(a, R0);
            bitwise(a, R0, &mask.to_be_bytes(), &[0; 4]);
            cmp(a, expr::CMP_NEQ, R0, &c.addr.octets());
        }
        Stmt::SaddrIn(set) => {
            saddr(a, R0);
            lookup(a, set, R0, None);
        }
        Stmt::MarkSet(bits) => mark_rewrite(a, !bits, *bits),
        Stmt::MarkFlip(bits) => mark_rewrite(a, u32::MAX, *bits),
        Stmt::MarkUnset(bits) => {
            meta_load(a, expr::META_MARK, R0);
            bitwise(a, R0, &bits.to_ne_bytes(), &0u32.to_ne_bytes());
            cmp(a, expr::CMP_EQ, R0, &0u32.to_ne_bytes());
        }
        Stmt::OneIn(n) => {
            numgen(a, *n, R0);
            cmp(a, expr::CMP_EQ, R0, &0u32.to_ne_bytes());
        }
        Stmt::Remember(set) => {
            saddr(a, R0);
            a.expr("dynset", |e| {
                e.str(expr::DYNSET_SET_NAME, set)
                    .be32(expr::DYNSET_OP, expr::DYNSET_OP_UPDATE)
                    .be32(expr::DYNSET_SREG_KEY, R0);
            });
        }
        Stmt::Dnat(ip, port) => {
            immediate(a, R0, &ip.octets());
            immediate(a, R1, &port.to_be_bytes());
            dnat(a, R0, R1);
        }
        Stmt::DnatPick(n, map) => {
            numgen(a, *n, R0);
            lookup(a, map, R0, Some(R0));
            dnat(a, R0, R1);
        }
        Stmt::CtNew => ct_bits(a, expr::CT_STATE, expr::CT_STATE_NEW),
        Stmt::CtDnat => ct_bits(a, expr::CT_STATUS, expr::IPS_DST_NAT),
        Stmt::Pair(set) => {
            saddr(a, R0);
            daddr(a, R1);
            lookup(a, set, R0, None);
        }
        Stmt::Masquerade { fully_random } => {
            a.expr("masq", |e| {
                if *fully_random {
                    e.be32(expr::MASQ_FLAGS, expr::NAT_RANGE_PROTO_RANDOM_FULLY);
                }
            });
        }
        Stmt::Reject => {
            a.expr("reject", |e| {
                // ICMP port unreachable.
                e.be32(expr::REJECT_TYPE, 0).u8(expr::REJECT_ICMP_CODE, 3);
            });
        }
        Stmt::ServiceVmap(map) => {
            daddr(a, R0);
            proto_port(a, R1);
            lookup(a, map, R0, Some(nfnl::REG_VERDICT));
        }
        Stmt::NodePortVmap(map) => {
            a.expr("fib", |e| {
                e.be32(expr::FIB_DREG, R0)
                    .be32(expr::FIB_RESULT, expr::FIB_RESULT_ADDRTYPE)
                    .be32(expr::FIB_FLAGS, expr::FIB_F_DADDR);
            });
            cmp(a, expr::CMP_EQ, R0, &expr::RTN_LOCAL.to_ne_bytes());
            proto_port(a, R0);
            lookup(a, map, R0, Some(nfnl::REG_VERDICT));
        }
        Stmt::Verdict(v) => {
            let (code, chain) = verdict_code(v);
            a.expr("immediate", |e| {
                e.be32(expr::IMMEDIATE_DREG, nfnl::REG_VERDICT).verdict(
                    expr::IMMEDIATE_DATA,
                    code,
                    chain,
                );
            });
        }
    }
}

/// Elements per message: a netlink attribute holds at most 64 KiB.
const ELEMENTS_PER_MESSAGE: usize = 256;

impl Op {
    /// Append this step's message(s) to `batch`.
    pub fn encode(&self, batch: &mut Batch) {
        use nfnl::{NLM_F_APPEND, NLM_F_CREATE};
        match self {
            Op::AddTable(t) => batch.push(msg::NEWTABLE, NLM_F_CREATE, |a| {
                a.str(attr::TABLE_NAME, t);
            }),
            Op::DelTable(t) => batch.push(msg::DELTABLE, 0, |a| {
                a.str(attr::TABLE_NAME, t);
            }),
            Op::AddChain { table, chain, hook } => batch.push(msg::NEWCHAIN, NLM_F_CREATE, |a| {
                a.str(attr::CHAIN_TABLE, table).str(attr::CHAIN_NAME, chain);
                if let Some(h) = hook {
                    a.nest(attr::CHAIN_HOOK, |n| {
                        n.be32(attr::HOOK_HOOKNUM, h.number())
                            .be32(attr::HOOK_PRIORITY, h.priority as u32);
                    })
                    .be32(attr::CHAIN_POLICY, nfnl::NF_ACCEPT as u32)
                    .str(attr::CHAIN_TYPE, h.kind);
                }
            }),
            Op::FlushChain { table, chain } => batch.push(msg::DELRULE, 0, |a| {
                a.str(attr::RULE_TABLE, table).str(attr::RULE_CHAIN, chain);
            }),
            Op::DelChain { table, chain } => batch.push(msg::DELCHAIN, 0, |a| {
                a.str(attr::CHAIN_TABLE, table).str(attr::CHAIN_NAME, chain);
            }),
            Op::AddRule { table, chain, rule } => {
                batch.push(msg::NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |a| {
                    a.str(attr::RULE_TABLE, table)
                        .str(attr::RULE_CHAIN, chain)
                        .nest(attr::RULE_EXPRESSIONS, |l| {
                            for s in &rule.0 {
                                encode_stmt(s, l);
                            }
                        });
                })
            }
            Op::AddSet { table, set, kind } => {
                let id = batch.next_id();
                batch.push(msg::NEWSET, NLM_F_CREATE, |a| {
                    let (key_type, key_len, flags, data) = kind.layout();
                    a.str(attr::SET_TABLE, table)
                        .str(attr::SET_NAME, set)
                        .be32(attr::SET_FLAGS, flags)
                        .be32(attr::SET_KEY_TYPE, key_type)
                        .be32(attr::SET_KEY_LEN, key_len);
                    if let Some((ty, len)) = data {
                        a.be32(attr::SET_DATA_TYPE, ty)
                            .be32(attr::SET_DATA_LEN, len);
                    }
                    if let SetKind::Clients(secs) = kind {
                        a.be64(attr::SET_TIMEOUT, u64::from(*secs) * 1000);
                    }
                    a.be32(attr::SET_ID, id);
                })
            }
            Op::DelSet { table, set } => batch.push(msg::DELSET, 0, |a| {
                a.str(attr::SET_TABLE, table).str(attr::SET_NAME, set);
            }),
            Op::AddElements {
                table,
                set,
                elements,
            } => {
                for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
                    batch.push(msg::NEWSETELEM, NLM_F_CREATE, |a| {
                        a.str(attr::SET_ELEM_LIST_TABLE, table)
                            .str(attr::SET_ELEM_LIST_SET, set)
                            .nest(attr::SET_ELEM_LIST_ELEMENTS, |l| {
                                for (k, v) in chunk {
                                    l.nest(attr::LIST_ELEM, |e| {
                                        e.value(attr::SET_ELEM_KEY, &k.bytes());
                                        match v {
                                            Value::None => {}
                                            Value::Verdict(v) => {
                                                let (code, chain) = verdict_code(v);
                                                e.verdict(attr::SET_ELEM_DATA, code, chain);
                                            }
                                            Value::Endpoint(ip, port) => {
                                                let mut d = ip.octets().to_vec();
                                                d.extend_from_slice(&port.to_be_bytes());
                                                d.extend_from_slice(&[0, 0]);
                                                e.value(attr::SET_ELEM_DATA, &d);
                                            }
                                        }
                                    });
                                }
                            });
                    })
                }
            }
            Op::DelElements { table, set, keys } => {
                for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
                    batch.push(msg::DELSETELEM, 0, |a| {
                        a.str(attr::SET_ELEM_LIST_TABLE, table)
                            .str(attr::SET_ELEM_LIST_SET, set)
                            .nest(attr::SET_ELEM_LIST_ELEMENTS, |l| {
                                for k in chunk {
                                    l.nest(attr::LIST_ELEM, |e| {
                                        e.value(attr::SET_ELEM_KEY, &k.bytes());
                                    });
                                }
                            });
                    })
                }
            }
        }
    }
}

/// Encode `ops` as one batch; also which op each message came from (index by seq - 1).
pub fn batch(ops: &[Op]) -> (Batch, Vec<usize>) {
    let mut b = Batch::new();
    let mut origin = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let before = b.len();
        op.encode(&mut b);
        origin.extend(std::iter::repeat_n(i, b.len() - before));
    }
    (b, origin)
}

/// The ops as `nft` lines (tests, logs).
pub fn script(ops: &[Op]) -> String {
    ops.iter().map(|o| format!("{o}\n")).collect()
}

#[cfg(test)]
mod tests;
