//! The data plane against the real kernel: what the netlink encoding installs, read back
//! with `nft list` (nft's own decoder), and refusals reported with the step refused.
//! Needs root (CAP_NET_ADMIN) and the `nft` program, as the proxy itself does.

use std::process::Command;

use proxy::model::{Endpoint, ServicePort};
use proxy::nft::{self, Context, Op};
use proxy::{Backend, Dataplane, Netlink};

fn list(table: &str) -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "ip", table])
        .output()
        .expect("running nft");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// Every one of `wants` is in `listing`.
fn has_all(listing: &str, wants: &[&str]) {
    for want in wants {
        assert!(listing.contains(want), "{want:?} in\n{listing}");
    }
}

fn ep(ip: &str, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        local,
    }
}

fn port(name: &str, ip: &str, eps: Vec<Endpoint>) -> ServicePort {
    ServicePort::new(
        format!("ns/{name}/tcp/80"),
        ip.parse().unwrap(),
        "tcp",
        80,
        eps,
    )
}

/// Deletes the tables however the test ends.
struct Tables(Context);

impl Drop for Tables {
    fn drop(&mut self) {
        let _ = Netlink::default().apply(&nft::remove(&self.0));
    }
}

#[test]
fn what_is_programmed_reads_back_as_written() {
    let ctx = Context {
        table: format!("rkube-ktest-{}", std::process::id()),
        local_cidr: Some("10.42.0.0/24".parse().unwrap()),
    };
    let _tables = Tables(ctx.clone());
    let mut web = port(
        "web",
        "10.43.0.9",
        vec![
            ep("10.42.0.2", true),
            ep("10.42.1.3", false),
            ep("10.42.2.4", false),
        ],
    );
    web.node_port = Some(30080);
    web.external_ips = vec!["198.51.100.7".parse().unwrap()];
    let mut sticky = port("sticky", "10.43.0.10", vec![ep("10.42.0.5", true)]);
    sticky.affinity_seconds = Some(60);
    let mut local = port("local", "10.43.0.11", vec![ep("10.42.1.6", false)]);
    local.node_port = Some(30081);
    local.external_local = true;
    let nobody = port("nobody", "10.43.0.12", vec![]);
    let mut plane = Dataplane::new(ctx.clone(), Netlink::default());
    plane
        .sync_full(&[web.clone(), sticky.clone(), local.clone(), nobody.clone()])
        .expect("full sync");
    for t in ctx.tables() {
        assert!(list(&t).is_some(), "{t} exists");
    }

    let main = list(&ctx.table).unwrap();
    has_all(
        &main,
        &[
            "10.43.0.12 . tcp . 80 : goto reject-chain",
            "10.42.0.2 . 10.42.0.2",
            "10.42.0.5 . 10.42.0.5",
            "type nat hook postrouting priority srcnat; policy accept;",
            "ct status dnat ip saddr . ip daddr @hairpin masquerade",
            "meta mark & 0x00004000 == 0x00000000 return",
            "meta mark set meta mark ^ 0x00004000",
            "masquerade fully-random",
            "type filter hook input priority -110; policy accept;",
            "ct state new jump nodeport-endpoints-check",
            "fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports",
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
            "reject",
        ],
    );

    let shard = list(&ctx.shard_table(nft::shard_of("ns/web"))).unwrap();
    has_all(
        &shard,
        &[
            "type ipv4_addr . inet_proto . inet_service : verdict",
            "10.43.0.9 . tcp . 80 : goto svc-ns/web/tcp/80",
            "tcp . 30080 : goto ext-ns/web/tcp/80",
            "198.51.100.7 . tcp . 80 : goto ext-ns/web/tcp/80",
            "type nat hook prerouting priority dstnat; policy accept;",
            "jump services",
            "ip saddr != 10.42.0.0/24 meta mark set meta mark | 0x00004000",
            "dnat ip to numgen random mod 3 map @eps-ns/web/tcp/80",
            "type mark : ipv4_addr . inet_service",
            "10.42.2.4 . 8080",
            "goto svc-ns/web/tcp/80",
        ],
    );
    let shard = list(&ctx.shard_table(nft::shard_of("ns/sticky"))).unwrap();
    has_all(
        &shard,
        &[
            "set aff-ns/sticky/tcp/80/10.42.0.5/8080",
            "flags dynamic,timeout",
            "timeout 1m",
            "ip saddr @aff-ns/sticky/tcp/80/10.42.0.5/8080 dnat to 10.42.0.5:8080",
            "update @aff-ns/sticky/tcp/80/10.42.0.5/8080 { ip saddr } dnat to 10.42.0.5:8080",
        ],
    );
    let shard = list(&ctx.shard_table(nft::shard_of("ns/local"))).unwrap();
    assert!(shard.contains("drop"), "{shard}");

    // An endpoint replaced: the map's element changes.
    let mut web2 = web.clone();
    web2.endpoints[2] = ep("10.42.2.9", false);
    plane
        .update(&[("ns/web".into(), vec![web2])])
        .expect("endpoint change");
    let shard = list(&ctx.shard_table(nft::shard_of("ns/web"))).unwrap();
    assert!(shard.contains("10.42.2.9 . 8080"), "{shard}");
    assert!(!shard.contains("10.42.2.4 . 8080"), "{shard}");
    // A Service gone: its chain and map go, other Services stay.
    plane.update(&[("ns/web".into(), vec![])]).expect("delete");
    let shard = list(&ctx.shard_table(nft::shard_of("ns/web"))).unwrap();
    assert!(!shard.contains("svc-ns/web/"), "{shard}");
    assert!(!shard.contains("eps-ns/web/"), "{shard}");

    // A table deleted behind the data plane's back is noticed.
    assert!(!plane.check());
    let deleted = Command::new("nft")
        .args(["delete", "table", "ip", &ctx.shard_table(3)])
        .status()
        .unwrap();
    assert!(deleted.success());
    assert!(plane.check());
    plane.sync_full(&[sticky]).expect("rebuilt");
    assert!(list(&ctx.shard_table(3)).is_some());

    plane.cleanup().expect("cleanup");
    for t in ctx.tables() {
        assert!(list(&t).is_none(), "{t} removed");
    }
}

#[test]
fn a_refused_transaction_names_its_step_and_changes_nothing() {
    let ctx = Context {
        table: format!("rkube-krefuse-{}", std::process::id()),
        local_cidr: None,
    };
    let _tables = Tables(ctx.clone());
    let mut nl = Netlink::default();
    let t = ctx.table.clone();
    let err = nl
        .apply(&[
            Op::AddTable(t.clone()),
            Op::FlushChain {
                table: t.clone(),
                chain: "no-such-chain".into(),
            },
        ])
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("flush chain ip"), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert!(list(&t).is_none(), "all or nothing: the table was not made");
    assert!(!nl.has_table(&t));
    nl.apply(&[Op::AddTable(t.clone())]).unwrap();
    assert!(nl.has_table(&t));
}

#[test]
fn a_udp_flow_moves_when_its_endpoint_goes() {
    use std::net::UdpSocket;
    use std::time::Duration;
    let ctx = Context {
        table: format!("rkube-kudp-{}", std::process::id()),
        local_cidr: None,
    };
    let _tables = Tables(ctx.clone());
    let bind = || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    };
    let (a, b) = (bind(), bind());
    let endpoint = |s: &UdpSocket| Endpoint {
        ip: "127.0.0.1".parse().unwrap(),
        port: s.local_addr().unwrap().port(),
        local: true,
    };
    let svc = |e: Endpoint| {
        ServicePort::new(
            "ns/dns/udp/53".into(),
            "10.255.77.1".parse().unwrap(),
            "udp",
            53,
            vec![e],
        )
    };
    let mut plane = Dataplane::new(ctx.clone(), Netlink::default());
    plane.sync_full(&[svc(endpoint(&a))]).expect("full sync");
    // One client socket: every datagram below is the same flow (same 5-tuple).
    let client = UdpSocket::bind("0.0.0.0:0").unwrap();
    let mut buf = [0u8; 16];
    client.send_to(b"one", "10.255.77.1:53").unwrap();
    let (n, _) = a
        .recv_from(&mut buf)
        .expect("the first endpoint gets the flow");
    assert_eq!(&buf[..n], b"one");
    // The endpoint is replaced: the flow's conntrack entry goes with the old one, so the
    // next datagram is balanced anew (to the only endpoint left) instead of following the
    // entry to the old one.
    plane
        .update(&[("ns/dns".into(), vec![svc(endpoint(&b))])])
        .expect("endpoint change");
    client.send_to(b"two", "10.255.77.1:53").unwrap();
    let (n, _) = b
        .recv_from(&mut buf)
        .expect("the new endpoint gets the flow");
    assert_eq!(&buf[..n], b"two");
    a.set_nonblocking(true).unwrap();
    assert!(
        a.recv_from(&mut buf).is_err(),
        "nothing more for the old one"
    );
}
