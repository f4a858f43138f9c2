#!/usr/bin/env bash
# Benchmark shoal through its hub (propagation with agents, W1/W2 initial
# sync, hub memory with 100 agents), beside Syncthing from the team's peer
# harness, on this machine, loopback only.
#
#   bash bench/run-hub-bench.sh [hub_bench.py options...]
#
# Installs syncthing and GNU time from Debian if missing, builds shoal in
# release mode (retrying a failed build, e.g. while someone is mid-edit),
# then runs the harness. SHOAL_BENCH_NO_BUILD=1 skips the build (e.g. with
# --shoal PATH); SHOAL_BENCH_LIMIT bounds the whole run in seconds (default
# 7200); SHOAL_BENCH_BUILD_TRIES (default 5) and a 60 s pause between tries;
# SHOAL_BENCH_REV=REV builds that commit from a clean export (build-shoal.sh).
# The commit and the uncommitted files at build time go to the harness in
# SHOAL_BENCH_BUILD_COMMIT / SHOAL_BENCH_BUILD_DIRTY (set them yourself with
# SHOAL_BENCH_NO_BUILD=1 if you know what the binary is).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

need=()
command -v syncthing >/dev/null 2>&1 || need+=(syncthing)
/usr/bin/time --version 2>&1 | grep -q GNU || need+=(time)
if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi

shoal=()
if [ "${SHOAL_BENCH_NO_BUILD:-0}" != 1 ]; then
  . "$HERE/build-shoal.sh"
  build_shoal
  shoal=(--shoal "$SHOAL_BIN")
fi

exec timeout --kill-after=30 "${SHOAL_BENCH_LIMIT:-7200}" \
  python3 -u "$HERE/hub_bench.py" "${shoal[@]}" "$@"
