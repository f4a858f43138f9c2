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
  tries="${SHOAL_BENCH_BUILD_TRIES:-5}"
  for i in $(seq 1 "$tries"); do
    if [ -n "${SHOAL_BENCH_REV:-}" ]; then
      commit="$(git -C "$REPO" rev-parse --short "$SHOAL_BENCH_REV")"
      dirty=""
      src="${TMPDIR:-/tmp}/shoal-bench-export-$commit"
      if [ ! -f "$src/Cargo.toml" ]; then
        rm -rf "$src.part" && mkdir -p "$src.part"
        git -C "$REPO" archive "$commit" | tar -x -C "$src.part"
        mv "$src.part" "$src"
      fi
      target="${CARGO_TARGET_DIR:-$REPO/target/bench-export}"
      if (cd "$src" && CARGO_TARGET_DIR="$target" timeout 1800 \
            cargo build --release -p shoal-cli); then
        shoal=(--shoal "$target/release/shoal")
        export SHOAL_BENCH_BUILD_COMMIT="$commit" SHOAL_BENCH_BUILD_DIRTY="$dirty"
        break
      fi
    else
      # what is being built: recorded now, since commits may land during the run
      commit="$(git -C "$REPO" rev-parse --short HEAD)"
      dirty="$(git -C "$REPO" status --porcelain --untracked-files=no | cut -c4-)"
      if (cd "$REPO" && timeout 1800 cargo build --release -p shoal-cli); then
        if [ "$(git -C "$REPO" rev-parse --short HEAD)" != "$commit" ]; then
          echo "HEAD moved during the build; building again" >&2
          continue
        fi
        export SHOAL_BENCH_BUILD_COMMIT="$commit" SHOAL_BENCH_BUILD_DIRTY="$dirty"
        break
      fi
    fi
    if [ "$i" -eq "$tries" ]; then
      echo "cargo build failed $tries times" >&2
      exit 1
    fi
    echo "cargo build failed (try $i of $tries); retrying in 60 s" >&2
    sleep 60
  done
fi

exec timeout --kill-after=30 "${SHOAL_BENCH_LIMIT:-1800}" \
  python3 -u "$HERE/hub_bench.py" --no-syncthing --parts prop,noop \
  --work /tmp/p2pbench "${shoal[@]}" "$@"
