#!/usr/bin/env bash
# Run every test: unit tests of each crate, then the end-to-end suites that start real
# `rkube server` processes and drive them with the real kubectl and kube-rs.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in kubectl curl; do
  command -v "$tool" >/dev/null || { echo "the tests need $tool (see .ci/run for the packages)" >&2; exit 1; }
done
cargo test --workspace --locked
