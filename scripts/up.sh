#!/usr/bin/env bash
# Set up and start a working rkube cluster on this machine: install what is missing, build the
# release binary, and run `rkube server` in the foreground (Ctrl-C stops it cleanly).
# Environment: RKUBE_DATA_DIR (default /var/lib/rkube), RKUBE_PORT (default 6443); extra
# arguments go to `rkube server` (e.g. --datastore-endpoint http://HOST:2379).
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v curl >/dev/null || need+=(curl)
command -v protoc >/dev/null || need+=(protobuf-compiler libprotobuf-dev)
# The node's container runtime: containerd + runc + CNI plugins, iptables for pod masquerading,
# busybox-static for the pause and busybox images rkube builds itself.
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
# nftables: the service proxy programs Services through netlink; `nft list ruleset` shows them.
command -v nft >/dev/null || need+=(nftables)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  sudo_ apt-get update
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "rkube needs a Rust toolchain (cargo); install one with rustup first." >&2
  exit 1
fi
command -v kubectl >/dev/null || echo "note: kubectl is not installed; the cluster still starts, drive it with any Kubernetes client" >&2
cargo build --release
data_dir="${RKUBE_DATA_DIR:-/var/lib/rkube}"
# A busybox image for first steps (`kubectl run t --image=busybox --image-pull-policy=IfNotPresent`),
# imported when the node starts.
mkdir -p "$data_dir/agent/images"
[ -f "$data_dir/agent/images/busybox.tar" ] || {
  ./target/release/rkube images --out "$data_dir/agent/images" >/dev/null
  rm -f "$data_dir/agent/images/pause.tar"
}
echo "starting rkube server (data dir $data_dir); then: export KUBECONFIG=$data_dir/kubeconfig.yaml" >&2
exec ./target/release/rkube server --data-dir "$data_dir" --port "${RKUBE_PORT:-6443}" "$@"
