#!/usr/bin/env bash
# The project benchmark of issue #6: every workload, shoal in each mode (agents
# peer-to-peer, agents through the hub only, `shoal mirror`) and the peers
# (Syncthing, rsync, Unison, run by ../shared/bench) in the same session, then
# one table with the ratios and every target marked MET or MISSED.
#
#   bash bench/run-all.sh [options]
#
#   --work DIR             scratch directory (default /tmp/shoal-allbench)
#   --sets LIST            small,big,large (default all)
#   --modes LIST           p2p,hub,mirror (default all)
#   --reps N               samples per workload and tool (default 3)
#   --timeout S            bound on every wait and command (default 900)
#   --peers-tools LIST     peers to run (default syncthing,rsync,unison)
#   --peers-results PATH   use an earlier peers run (a results-*.jsonl file or a
#                          results directory) instead of running the peers;
#                          may be given more than once
#   --no-peers-run         do not run the peers (the table then has only
#                          what --peers-results gives, or no peer columns)
#
# Installs syncthing, unison, rsync and GNU time from Debian if missing, then
# builds shoal-cli and shoal-bench in release mode (a failed build is retried
# up to 5 times, 60 s apart, for when someone is mid-edit) and runs copies of
# both binaries from WORK/bin, so a rebuild during the run cannot swap them.
#   SHOAL_BENCH_REV=REV    build shoal from commit REV (a clean `git archive`
#                          export, into $CARGO_TARGET_DIR or target/bench-export)
#                          instead of the working tree
#   SHOAL_BENCH_NO_BUILD=1 skip the build and use target/release/{shoal,shoal-bench}
#                          (set SHOAL_BENCH_BUILD_COMMIT/_DIRTY to name them)
#   SHOAL_BENCH_LIMIT      bound on the whole run after the build, seconds
#                          (default 10800); the table is printed even when it
#                          cuts the run short
#   SHOAL_BENCH_SHARED     where the peer harness is (default ../shared/bench)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
SHARED="${SHOAL_BENCH_SHARED:-$(cd "$REPO/.." && pwd)/shared/bench}"

work=/tmp/shoal-allbench
sets=small,big,large
modes=p2p,hub,mirror
reps=3
timeout_s=900
peers_tools=syncthing,rsync,unison
peers_results=()
peers_run=1
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    --sets) sets="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --peers-tools) peers_tools="$2"; shift 2 ;;
    --peers-results) peers_results+=("$2"); peers_run=0; shift 2 ;;
    --no-peers-run) peers_run=0; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "run-all.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$work"
work="$(cd "$work" && pwd)"
stamp="$(date -u +%Y%m%dT%H%M%S)"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# --- tools
need=()
command -v syncthing >/dev/null 2>&1 || need+=(syncthing)
command -v unison >/dev/null 2>&1 || need+=(unison)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
/usr/bin/time --version 2>&1 | grep -q GNU || need+=(time)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi

# --- build
shoal_bin="$REPO/target/release/shoal"
bench_bin="$REPO/target/release/shoal-bench"
if [ "${SHOAL_BENCH_NO_BUILD:-0}" != 1 ]; then
  # shoal-bench depends on no shoal crate: the working tree's is built as is.
  . "$HERE/build-shoal.sh"
  build_shoal shoal-bench
  shoal_bin="$SHOAL_BIN"
fi
mkdir -p "$work/bin"
cp "$shoal_bin" "$work/bin/shoal"
cp "$bench_bin" "$work/bin/shoal-bench"

deadline=$(( $(date +%s) + ${SHOAL_BENCH_LIMIT:-10800} ))
left() { echo $(( deadline - $(date +%s) )); }

# --- peers (in their own network namespace, see ../shared/bench/README.md)
if [ "$peers_run" = 1 ]; then
  mkdir -p "$work/peers"
  marker="$work/peers/.started-$stamp"
  touch "$marker"
  plog="$work/peers/peers-$stamp.log"
  log "peers: $SHARED/run.sh $work/peers --tools $peers_tools --sets $sets --reps $reps (log $plog)"
  rc=0
  (cd "$SHARED" && PEERS_BENCH_LIMIT="$(( $(left) > 60 ? $(left) - 60 : 1 ))" \
     ./run.sh "$work/peers" --tools "$peers_tools" --sets "$sets" --reps "$reps" \
     --timeout "$timeout_s") >"$plog" 2>&1 || rc=$?
  log "peers: exit $rc"
  while IFS= read -r f; do
    peers_results+=("$f")
  done < <(find "$work/peers/results" -name 'results-*.jsonl' -newer "$marker" 2>/dev/null | sort)
  rm -f "$marker"
  [ "${#peers_results[@]}" -gt 0 ] || log "peers: no results (see $plog)"
fi

# --- shoal
out="$work/shoal-$stamp.jsonl"
shoal_rc=0
if [ "$(left)" -gt 60 ]; then
  log "shoal: shoal-bench run --sets $sets --modes $modes --reps $reps"
  # --foreground: Ctrl-C reaches shoal-bench; its hub and agents get SIGTERM from the
  # kernel when it dies (parent-death signal), so nothing is left running either way
  timeout --foreground --kill-after=30 "$(left)" \
    "$work/bin/shoal-bench" run --shoal "$work/bin/shoal" --work "$work" \
    --sets "$sets" --modes "$modes" --reps "$reps" --timeout "$timeout_s" --out "$out" \
    || shoal_rc=$?
  log "shoal: exit $shoal_rc"
else
  log "no time left for shoal (SHOAL_BENCH_LIMIT)"
fi

# --- the table
args=(--shoal "$out" --out "$work/table.md" --repo "$REPO")
for p in "${peers_results[@]}"; do
  args+=(--peers "$p")
done
if [ -f "$out" ]; then
  python3 "$HERE/all_table.py" "${args[@]}"
else
  log "no shoal results at $out"
fi
exit "$shoal_rc"
