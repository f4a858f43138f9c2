#!/usr/bin/env bash
# Benchmark `shoal mirror` against Unison on this machine.
#
#   bash bench/run-mirror-bench.sh [mirror_vs_unison.py options...]
#
# Installs unison and GNU time from Debian if missing, builds shoal in
# release mode, then runs the harness with its defaults (work dir
# /tmp/shoal-bench, 3 reps, all workloads). Set SHOAL_BENCH_NO_BUILD=1 to
# skip the build (e.g. with --shoal PATH); SHOAL_BENCH_LIMIT bounds the
# whole run in seconds (default 7200).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

need=()
command -v unison >/dev/null 2>&1 || need+=(unison)
/usr/bin/time --version 2>&1 | grep -q GNU || need+=(time)
if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi

if [ "${SHOAL_BENCH_NO_BUILD:-0}" != 1 ]; then
  (cd "$REPO" && timeout 1800 cargo build --release -p shoal-cli)
fi

exec timeout --kill-after=30 "${SHOAL_BENCH_LIMIT:-7200}" \
  python3 -u "$HERE/mirror_vs_unison.py" "$@"
