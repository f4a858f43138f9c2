#!/usr/bin/env bash
# Benchmark shoal peer-to-peer beside the hub (issue #4), on this machine,
# loopback only: propagation with agents serving peers (p2p) against agents
# with --no-peers (hub), and the bytes of a round with nothing new (10,000 and
# 50,000 files; idle agents). It is hub_bench.py with --parts prop,noop.
#
#   bash bench/run-p2p-bench.sh [hub_bench.py options...]
#
# Needs GNU time (installed from Debian if missing), not Syncthing. Builds
# shoal in release mode first, retrying a failed build (someone may be
# mid-edit), then runs the harness in WORK=/tmp/p2pbench unless --work is
# given.
#   SHOAL_BENCH_REV=REV   build commit REV from a clean `git archive` export
#                         instead of the working tree (uncommitted edits then
#                         stay out of the binary); the build goes to
#                         $CARGO_TARGET_DIR or <repo>/target/bench-export.
#   SHOAL_BENCH_NO_BUILD=1  skip the build (pass --shoal PATH; set
#                         SHOAL_BENCH_BUILD_COMMIT/_DIRTY to name the binary).
#   SHOAL_BENCH_LIMIT     bounds the whole run in seconds (default 1800).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

if ! /usr/bin/time --version 2>&1 | grep -q GNU; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y time
fi

shoal=()
if [ "${SHOAL_BENCH_NO_BUILD:-0}" != 1 ]; then
  . "$HERE/build-shoal.sh"
  build_shoal
  shoal=(--shoal "$SHOAL_BIN")
fi

exec timeout --kill-after=30 "${SHOAL_BENCH_LIMIT:-1800}" \
  python3 -u "$HERE/hub_bench.py" --no-syncthing --parts prop,noop \
  --work /tmp/p2pbench "${shoal[@]}" "$@"
