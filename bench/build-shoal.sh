# Sourced by the bench wrappers: builds shoal in release mode and names what was built.
#
#   build_shoal [PACKAGE...]
#
# Sets SHOAL_BIN to the built `shoal` binary and exports SHOAL_BENCH_BUILD_COMMIT and
# SHOAL_BENCH_BUILD_DIRTY for the harness's table. Extra packages (such as shoal-bench) are
# built from the working tree into its own target directory.
#   SHOAL_BENCH_REV=REV        build shoal from a clean `git archive` export of commit REV, into
#                              $CARGO_TARGET_DIR or <repo>/target/bench-export, so uncommitted
#                              edits stay out of the binary.
#   SHOAL_BENCH_BUILD_TRIES=N  a failed build (someone mid-edit) is retried, 60 s apart;
#                              default 5.
# Needs REPO (the repository root) set by the caller.
build_shoal() {
  local tries="${SHOAL_BENCH_BUILD_TRIES:-5}" extra=() i commit dirty src target
  for package in "$@"; do extra+=(-p "$package"); done
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
            cargo build --release -p shoal-cli) \
         && { [ "${#extra[@]}" -eq 0 ] \
              || (cd "$REPO" && timeout 1800 cargo build --release "${extra[@]}"); }; then
        SHOAL_BIN="$target/release/shoal"
        export SHOAL_BENCH_BUILD_COMMIT="$commit" SHOAL_BENCH_BUILD_DIRTY="$dirty"
        return 0
      fi
    else
      # What is being built, recorded now: commits may land during the build.
      commit="$(git -C "$REPO" rev-parse --short HEAD)"
      dirty="$(git -C "$REPO" status --porcelain --untracked-files=no | cut -c4-)"
      if (cd "$REPO" && timeout 1800 cargo build --release -p shoal-cli "${extra[@]}"); then
        if [ "$(git -C "$REPO" rev-parse --short HEAD)" != "$commit" ]; then
          echo "HEAD moved during the build; building again" >&2
          continue
        fi
        SHOAL_BIN="$REPO/target/release/shoal"
        export SHOAL_BENCH_BUILD_COMMIT="$commit" SHOAL_BENCH_BUILD_DIRTY="$dirty"
        return 0
      fi
    fi
    if [ "$i" -lt "$tries" ]; then
      echo "cargo build failed (try $i of $tries); retrying in 60 s" >&2
      sleep 60
    fi
  done
  echo "cargo build failed $tries times" >&2
  return 1
}
