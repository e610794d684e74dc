#!/usr/bin/env bash
# Run every test: unit tests of each crate, then the end-to-end suites that start real
# `rkube server` processes and drive them with the real kubectl, kube-rs and the Python client.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in kubectl curl python3 etcd containerd runc ctr skopeo docker-registry iptables nft script; do
  command -v "$tool" >/dev/null || { echo "the tests need $tool (see .ci/run for the packages)" >&2; exit 1; }
done
# The Python client, pinned, in a venv kept with the build artefacts.
venv="${CARGO_TARGET_DIR:-target}/pyvenv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import kubernetes' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes==37.0.2'
fi
export RKUBE_TEST_PYTHON="$PWD/$venv/bin/python"
case "$venv" in /*) export RKUBE_TEST_PYTHON="$venv/bin/python" ;; esac
cargo test --workspace --locked
