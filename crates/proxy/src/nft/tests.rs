use super::*;

fn ctx() -> Context {
    Context {
        table: "t".into(),
        local_cidr: Some("10.42.0.0/24".parse().unwrap()),
    }
}

fn ep(ip: &str, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        local,
    }
}

fn sp(eps: Vec<Endpoint>) -> ServicePort {
    ServicePort::new(
        "ns/web/tcp/80".into(),
        "10.43.0.9".parse().unwrap(),
        "tcp",
        80,
        eps,
    )
}

fn rules(r: &Rendered, chain: &str) -> Vec<String> {
    r.chains[chain].iter().map(|r| r.to_string()).collect()
}

fn element<'a>(r: &'a Rendered, scope: Scope, set: &str, key: Key) -> &'a Value {
    &r.elements[&(scope, set.to_string(), key)]
}

fn svc_key() -> Key {
    Key::Service("10.43.0.9".parse().unwrap(), "tcp", 80)
}

fn goto(c: &str) -> Value {
    Value::Verdict(Verdict::Goto(c.into()))
}

#[test]
fn cidrs_parse_and_normalise() {
    let c: Cidr = "10.42.7.9/16".parse().unwrap();
    assert_eq!(c.to_string(), "10.42.0.0/16");
    assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().prefix, 32);
    assert!("10.1.2.3/33".parse::<Cidr>().is_err());
    assert!("fd00::/64".parse::<Cidr>().is_err());
}

#[test]
fn services_spread_over_shards_by_namespace_and_name() {
    assert_eq!(shard_of("ns/web/tcp/80"), shard_of("ns/web/udp/53"));
    assert_eq!(shard_of("ns/web/tcp/80"), shard_of("ns/web"));
    let used: BTreeSet<usize> = (0..200).map(|i| shard_of(&format!("ns/s{i}"))).collect();
    assert_eq!(used.len(), SHARDS, "200 Services use every shard");
}

#[test]
fn equal_probability_over_the_endpoints_through_a_map() {
    let r = render(
        &ctx(),
        &sp(vec![
            ep("10.42.0.2", true),
            ep("10.42.1.3", false),
            ep("10.42.2.4", false),
        ]),
    );
    assert_eq!(
        rules(&r, "svc-ns/web/tcp/80"),
        [
            "ip saddr != 10.42.0.0/24 meta mark set mark or 0x4000",
            "dnat ip to numgen random mod 3 map @eps-ns/web/tcp/80",
        ]
    );
    assert_eq!(r.sets["eps-ns/web/tcp/80"], SetKind::Endpoints);
    assert_eq!(
        element(&r, Scope::Shard, "eps-ns/web/tcp/80", Key::Index(2)),
        &Value::Endpoint("10.42.2.4".parse().unwrap(), 8080)
    );
    assert_eq!(
        element(&r, Scope::Shard, "service-ips", svc_key()),
        &goto("svc-ns/web/tcp/80")
    );
    assert_eq!(
        r.hairpin.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        ["10.42.0.2"]
    );
}

#[test]
fn no_endpoints_reject_and_local_policies_drop() {
    let mut s = sp(vec![]);
    s.node_port = Some(30080);
    let r = render(&ctx(), &s);
    assert!(r.chains.is_empty());
    assert_eq!(
        element(&r, Scope::Main, "no-endpoint-services", svc_key()),
        &goto("reject-chain")
    );
    assert_eq!(
        element(
            &r,
            Scope::Main,
            "no-endpoint-nodeports",
            Key::NodePort("tcp", 30080)
        ),
        &goto("reject-chain")
    );
    let mut s = sp(vec![ep("10.42.1.3", false)]);
    s.internal_local = true;
    s.external_local = true;
    s.node_port = Some(30080);
    let r = render(&ctx(), &s);
    assert_eq!(
        element(&r, Scope::Main, "no-endpoint-services", svc_key()),
        &Value::Verdict(Verdict::Drop)
    );
    assert_eq!(rules(&r, "ext-ns/web/tcp/80"), ["drop"]);
}

#[test]
fn node_ports_masquerade_unless_local() {
    let mut s = sp(vec![ep("10.42.0.2", true), ep("10.42.1.3", false)]);
    s.node_port = Some(30080);
    let r = render(&ctx(), &s);
    assert_eq!(
        rules(&r, "ext-ns/web/tcp/80"),
        ["meta mark set mark or 0x4000", "goto svc-ns/web/tcp/80"]
    );
    assert_eq!(
        element(
            &r,
            Scope::Shard,
            "service-nodeports",
            Key::NodePort("tcp", 30080)
        ),
        &goto("ext-ns/web/tcp/80")
    );
    s.external_local = true;
    let r = render(&ctx(), &s);
    assert_eq!(rules(&r, "ext-ns/web/tcp/80"), ["dnat to 10.42.0.2:8080"]);
}

#[test]
fn external_ips_go_the_outside_way() {
    let ext: Ipv4Addr = "198.51.100.7".parse().unwrap();
    let mut s = sp(vec![ep("10.42.0.2", true)]);
    s.external_ips = vec![ext];
    let r = render(&ctx(), &s);
    assert_eq!(
        element(
            &r,
            Scope::Shard,
            "service-ips",
            Key::Service(ext, "tcp", 80)
        ),
        &goto("ext-ns/web/tcp/80")
    );
    assert_eq!(
        rules(&r, "ext-ns/web/tcp/80"),
        ["meta mark set mark or 0x4000", "goto svc-ns/web/tcp/80"]
    );
    // Without endpoints, refused there too.
    s.endpoints.clear();
    let r = render(&ctx(), &s);
    assert_eq!(
        element(
            &r,
            Scope::Main,
            "no-endpoint-services",
            Key::Service(ext, "tcp", 80)
        ),
        &goto("reject-chain")
    );
}

#[test]
fn affinity_remembers_clients_per_endpoint() {
    let mut s = sp(vec![ep("10.42.0.2", true), ep("10.42.1.3", false)]);
    s.affinity_seconds = Some(60);
    let r = render(&ctx(), &s);
    let set = "aff-ns/web/tcp/80/10.42.0.2/8080";
    assert_eq!(r.sets[set], SetKind::Clients(60));
    assert!(!r.sets.contains_key("eps-ns/web/tcp/80"));
    let rules = rules(&r, "svc-ns/web/tcp/80");
    assert_eq!(rules[1], format!("ip saddr @{set} dnat to 10.42.0.2:8080"));
    assert_eq!(
        rules[3],
        format!("numgen random mod 2 0 update @{set} {{ ip saddr }} dnat to 10.42.0.2:8080")
    );
}

fn lines(ops: &[Op]) -> Vec<String> {
    ops.iter().map(|o| o.to_string()).collect()
}

#[test]
fn an_endpoint_change_rewrites_map_elements_only() {
    let c = ctx();
    let t = c.shard_table(shard_of("ns/web"));
    let old = render(&c, &sp(vec![ep("10.42.0.2", true), ep("10.42.1.3", false)]));
    // Unchanged: nothing to do.
    let mut txn = Txn::new(&c);
    txn.change(&old, &old.clone());
    assert!(txn.finish().is_empty());
    // One endpoint replaced: one element out, one in; no rule touched.
    let new = render(&c, &sp(vec![ep("10.42.0.2", true), ep("10.42.1.4", false)]));
    let mut txn = Txn::new(&c);
    txn.change(&old, &new);
    assert_eq!(
        lines(&txn.finish()),
        [
            format!("delete element ip {t} eps-ns/web/tcp/80 {{ 1 }}"),
            format!("add element ip {t} eps-ns/web/tcp/80 {{ 1 : 10.42.1.4 . 8080 }}"),
        ]
    );
}

#[test]
fn a_change_touches_only_what_changed_in_a_safe_order() {
    let c = ctx();
    let t = c.shard_table(shard_of("ns/web"));
    let mut s = sp(vec![ep("10.42.0.2", true)]);
    s.affinity_seconds = Some(60);
    let old = render(&c, &s);
    // An endpoint more: the chain is rewritten, a set added, no element touched.
    s.endpoints.push(ep("10.42.1.3", false));
    let new = render(&c, &s);
    let mut txn = Txn::new(&c);
    txn.change(&old, &new);
    let l = lines(&txn.finish());
    assert_eq!(l[0], format!("add set ip {t} aff-ns/web/tcp/80/10.42.1.3/8080 {{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }}"));
    assert_eq!(l[1], format!("flush chain ip {t} svc-ns/web/tcp/80"));
    assert!(!l.iter().any(|l| l.contains("element")), "{l:?}");
    // Gone: elements out first, then the chain emptied and deleted, then its sets.
    let mut txn = Txn::new(&c);
    txn.change(&new, &Rendered::default());
    let l = lines(&txn.finish());
    assert_eq!(
        l[0],
        format!("delete element ip {t} service-ips {{ 10.43.0.9 . tcp . 80 }}")
    );
    assert_eq!(l[1], format!("flush chain ip {t} svc-ns/web/tcp/80"));
    assert_eq!(l[2], format!("delete chain ip {t} svc-ns/web/tcp/80"));
    assert!(l[3].starts_with(&format!("delete set ip {t} aff-")));
    // Losing every endpoint: the map entry moves to the main table's reject map.
    let mut txn = Txn::new(&c);
    txn.change(&new, &render(&c, &sp(vec![])));
    let l = lines(&txn.finish());
    assert!(
        l.contains(
            &"add element ip t no-endpoint-services { 10.43.0.9 . tcp . 80 : goto reject-chain }"
                .to_string()
        ),
        "{l:?}"
    );
}

#[test]
fn a_full_sync_replaces_every_table_atomically() {
    let c = ctx();
    let r = render(&c, &sp(vec![ep("10.42.0.2", true)]));
    let ops = full(&c, &[&r]);
    let l = lines(&ops);
    assert_eq!(
        &l[..3],
        ["add table ip t", "delete table ip t", "add table ip t"]
    );
    assert_eq!(
        l.iter().filter(|l| l.starts_with("delete table")).count(),
        SHARDS + 1
    );
    assert!(l.contains(&"add element ip t hairpin { 10.42.0.2 . 10.42.0.2 }".to_string()));
    let t = c.shard_table(shard_of("ns/web"));
    assert!(l.contains(&format!("add chain ip {t} svc-ns/web/tcp/80")));
    assert!(l.contains(&format!(
        "add chain ip {t} nat-prerouting {{ type nat hook prerouting priority -100; policy accept; }}"
    )));
    // Chains exist before rules reference them; elements come after both.
    let pos = |p: &str| l.iter().position(|l| l.starts_with(p)).unwrap();
    assert!(pos(&format!("add chain ip {t} svc-")) < pos(&format!("add rule ip {t} svc-")));
    assert!(
        pos(&format!("add rule ip {t} svc-")) < pos(&format!("add element ip {t} service-ips"))
    );
    // Many elements of one set: one step (split into messages when encoded).
    let many: Vec<Rendered> = (0..600)
        .map(|i| {
            let mut s = sp(vec![]);
            s.id = format!("ns/web/tcp/{i}");
            s.port = i as u16;
            render(&c, &s)
        })
        .collect();
    let refs: Vec<&Rendered> = many.iter().collect();
    let ops = full(&c, &refs);
    let adds: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o, Op::AddElements { set, .. } if set == "no-endpoint-services"))
        .collect();
    assert_eq!(adds.len(), 1);
    let (b, origin) = batch(&ops);
    assert_eq!(b.len(), origin.len());
    assert_eq!(b.len(), ops.len() + 2, "600 elements: 3 messages");
}
