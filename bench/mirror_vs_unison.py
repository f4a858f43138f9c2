#!/usr/bin/env python3
"""Benchmark `shoal mirror A B --json` against Unison (local to local).

Both tools run on the same seeded data, on this machine, in the same run,
one after the other (their order alternates from rep to rep so that slow
drift of a shared machine does not always hit the same tool).

Workloads (each sample starts from a fresh pair of folders, B empty):
  W1   10,000 x 4 KiB files in 100 directories, initial sync A -> B
  W5   no-op run right after W1 (10k tree)
  W2   one 512 MiB file, initial sync
  W1L  50,000 x 4 KiB files, initial sync (setup for W3L/W5L, recorded)
  W3L  3 files rewritten + 1 new file in A, then one run
  W5L  no-op run right after W3L (50k tree)

Data generation, GNU-time peak RSS, the contention probe and tree hashing
come from the team's peer harness (shared/bench), imported at run time.
After every sample both trees are hashed (ignoring .shoal); a sample is
FAILED unless the tool exited 0 and A and B both equal the expected tree.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOLS = ("shoal", "unison")
SETS = ("w1", "w2", "w3l", "w5")
SMALL_N, LARGE_N = 10_000, 50_000

# table rows: workload id -> label
ROWS = {
    "W1": "W1 initial, 10k × 4 KiB",
    "W2": "W2 initial, 1 × 512 MiB",
    "W1L": "W1L initial, 50k × 4 KiB (setup for W3L)",
    "W3L": "W3L 3 changed + 1 new in 50k",
    "W5": "W5 no-op, 10k tree",
    "W5L": "W5 no-op, 50k tree",
}

C = W = R = None  # shared modules, imported in main() from --shared


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shoal", default=str(REPO / "target/release/shoal"),
                    help="shoal binary (default %(default)s)")
    ap.add_argument("--work", default="/tmp/shoal-bench",
                    help="scratch dir for data, replicas and logs (default %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="samples per workload and tool")
    ap.add_argument("--sets", default=",".join(SETS),
                    help="comma list of w1,w2,w3l,w5 (default all)")
    ap.add_argument("--shared",
                    default=os.environ.get("SHOAL_BENCH_SHARED",
                                           str(REPO.parent / "shared" / "bench")),
                    help="folder with pb_common.py/pb_workloads.py (default %(default)s)")
    ap.add_argument("--out", default=None,
                    help="results JSON lines file (default WORK/results-STAMP.jsonl)")
    ap.add_argument("--timeout", type=float, default=900,
                    help="bound for every subprocess, seconds (default %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep generated data afterwards")
    a = ap.parse_args()
    a.sets = {s.strip().lower() for s in a.sets.split(",") if s.strip()}
    bad = a.sets - set(SETS)
    if bad or not a.sets:
        ap.error(f"--sets: unknown {sorted(bad)}; choose from {','.join(SETS)}")
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    return a


def import_shared(path: str) -> None:
    global C, W, R
    C, W, R = bench_common.import_shared(path)


# --------------------------------------------------------------------------
# machine and version facts

sh = bench_common.sh


def first_line(s: str) -> str:
    return s.splitlines()[0] if s else ""


def git_rev() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 else "no commit yet"


def facts(shoal: str, work: Path) -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    os_name = ""
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        shoal_sha = hashlib.sha256(Path(shoal).read_bytes()).hexdigest()[:16]
        shoal_mtime = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                    time.gmtime(Path(shoal).stat().st_mtime))
    except OSError:
        shoal_sha = shoal_mtime = "missing"
    return {
        "nproc": sh(["nproc"]),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": os_name,
        "work_fs": sh(["stat", "-f", "-c", "%T", str(work)]),
        "python": platform.python_version(),
        "shoal": first_line(sh([shoal, "--version"])),
        "shoal_path": shoal,
        "shoal_sha256_16": shoal_sha,
        "shoal_built": shoal_mtime,
        "repo_rev": git_rev(),
        "unison": first_line(sh(["unison", "-version"])),
        "unison_deb": sh(["dpkg-query", "-W", "-f=${Version}", "unison-2.52"]),
        "gnu_time": first_line(sh(["/usr/bin/time", "--version"])),
    }


# --------------------------------------------------------------------------
# one pair of replicas for one tool

class Session:
    def __init__(self, base: Path, tool: str, shoal: str, timeout: float):
        self.base, self.tool, self.shoal, self.timeout = base, tool, shoal, timeout
        self.a, self.b = base / "A", base / "B"
        self.home, self.logs = base / "home", base / "logs"

    def prepare(self, src: Path) -> None:
        if self.base.exists():
            shutil.rmtree(self.base)
        for d in (self.b, self.home / "unison", self.logs):
            d.mkdir(parents=True)
        # own copy instead of pb_workloads.copy_tree: that one has no timeout
        self.a.mkdir(parents=True)
        subprocess.run(["cp", "-a", "--", f"{src}/.", str(self.a)], check=True,
                       timeout=self.timeout)
        os.sync()  # the copy's write-back must not land in the timed window

    def cmd(self) -> list[str]:
        if self.tool == "shoal":
            return [self.shoal, "mirror", str(self.a), str(self.b), "--json"]
        import pb_unison  # its option list, so both harnesses run unison alike
        return ["unison", str(self.a), str(self.b), *pb_unison.UNISON_OPTS]

    def env(self) -> dict:
        # private HOME (and unison archive dir) so nothing outside WORK is read
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.home),
                "UNISON": str(self.home / "unison"), "LANG": "C.UTF-8"}


def diff_trees(a: Path, b: Path, limit: int = 20) -> list[str]:
    """First differing paths between two trees (only run on a failure)."""
    def listing(root: Path) -> dict[str, tuple[int, str]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            parts = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
            if W._ignored(parts):
                dirnames[:] = []
                continue
            for fn in filenames:
                if not W._ignored(parts + (fn,)):
                    p = Path(dirpath) / fn
                    out["/".join(parts + (fn,))] = (p.stat().st_size, W.file_sha(p))
        return out
    la, lb = listing(a), listing(b)
    diffs = []
    for rel in sorted(set(la) | set(lb)):
        if rel not in lb:
            diffs.append(f"only in A: {rel}")
        elif rel not in la:
            diffs.append(f"only in B: {rel}")
        elif la[rel] != lb[rel]:
            diffs.append(f"differs: {rel} (A {la[rel][0]} B, B {lb[rel][0]} B)")
        if len(diffs) >= limit:
            diffs.append("...")
            break
    return diffs


def measure(s: Session, workload: str, rep: int, expect: str | None,
            sink, check_changed: dict | None = None) -> dict:
    """One timed run of the tool, then the (untimed) verification."""
    os.sync()
    host = C.HostCPU()
    r = C.run_measured(s.cmd(), s.timeout, env=s.env(), logdir=s.logs,
                       tag=f"{workload}-r{rep}")
    hostinfo = host.stop(r.cpu_s)
    da, db = W.tree_digest(s.a), W.tree_digest(s.b)
    problems = []
    if r.timed_out:
        problems.append(f"timed out after {s.timeout:.0f} s")
    if r.rc != 0:
        problems.append(f"exit code {r.rc}")
    if da["digest"] != db["digest"]:
        problems.append(f"A and B differ (A {da['files']} files/{da['bytes']} B, "
                        f"B {db['files']} files/{db['bytes']} B)")
    elif expect and da["digest"] != expect:
        problems.append("A == B but not the expected tree")
    if check_changed and not (W.changed_files_ok(s.a, check_changed)
                              and W.changed_files_ok(s.b, check_changed)):
        problems.append("changed/new files do not have the new content on both sides")
    diffs = diff_trees(s.a, s.b) if da["digest"] != db["digest"] else []

    warnings, tool_json = [], None
    if s.tool == "shoal":
        # contract: exactly one JSON object on stdout
        try:
            tool_json = json.loads(r.stdout)
            if not isinstance(tool_json, dict):
                warnings.append("stdout JSON is not an object")
        except ValueError:
            warnings.append("stdout is not one JSON object")
    ok = not problems
    row = {
        "kind": "sample", "tool": s.tool, "workload": workload, "rep": rep,
        "status": "ok" if ok else "FAILED", "verified": ok,
        "seconds": round(r.wall, 4), "rc": r.rc, "timed_out": r.timed_out,
        "peak_rss_kib": r.maxrss_kib, "cpu_s": round(r.cpu_s, 3),
        "problems": problems, "warnings": warnings, "diffs": diffs,
        "digest_a": da["digest"], "digest_b": db["digest"], "expect": expect,
        "files": da["files"], "bytes": da["bytes"],
        "tool_json": tool_json,
        "stdout_tail": r.stdout[-2000:] if tool_json is None else "",
        "stderr_tail": r.stderr[-2000:],
        "cmd": s.cmd(), "extra": hostinfo,  # "extra" so pb_report.contended() reads it
    }
    sink(row)
    return row


# --------------------------------------------------------------------------
# sessions: one fresh pair of folders per (kind, rep, tool)

def run_small(s: Session, src: Path, expect0: str, rep: int, sets: set, sink) -> None:
    s.prepare(src)
    row = measure(s, "W1", rep, expect0, sink)
    if "w5" in sets:
        measure(s, "W5", rep, row["digest_a"] if row["verified"] else expect0, sink)


def run_big(s: Session, src: Path, expect0: str, rep: int, sets: set, sink) -> None:
    s.prepare(src)
    measure(s, "W2", rep, expect0, sink)


def run_large(s: Session, src: Path, expect0: str, rep: int, sets: set, sink) -> None:
    s.prepare(src)
    row = measure(s, "W1L", rep, expect0, sink)
    expect = row["digest_a"] if row["verified"] else expect0
    if "w3l" in sets:
        # same seed and tag for both tools: they must reach the same tree
        changes = W.prepare_w3(LARGE_N, seed=1000 + rep * 10, tag=f"mv_{rep}")
        W.apply_w3(s.a, changes)
        expect = W.tree_digest(s.a)["digest"]
        row = measure(s, "W3L", rep, expect, sink, check_changed=W.w3_expect(changes))
    if "w5" in sets:
        measure(s, "W5L", rep, expect, sink)


# --------------------------------------------------------------------------
# report

def fmt_s(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def cell(rows: list[dict], key: str) -> tuple[str, float | None]:
    """Median over verified samples; failures are always shown."""
    if not rows:
        return "–", None
    good = [r for r in rows if r["verified"]]
    nfail = len(rows) - len(good)
    if not good:
        return f"**FAILED** {nfail}/{len(rows)}", None
    vals = [r[key] for r in good]
    med = statistics.median(vals)
    if key == "seconds":
        txt = f"{fmt_s(med)} s"
        if len(vals) > 1:
            txt += f" ({fmt_s(min(vals))}–{fmt_s(max(vals))})"
    else:
        txt = f"{med / 1024:.1f} MiB"
        if len(vals) > 1 and max(vals) - min(vals) >= 1024:
            txt += f" ({min(vals) / 1024:.0f}–{max(vals) / 1024:.0f})"
    if nfail:
        txt += f" **{nfail}/{len(rows)} FAILED**"
    return txt, med


def ratio(x: float | None, y: float | None) -> str:
    if x is None or y is None or y <= 0:
        return "–"
    return f"{x / y:.2f}×"


def render(rows: list[dict], meta: dict) -> str:
    f = meta["facts"]
    out = [
        f"## shoal mirror vs Unison (local), {meta['stamp']}",
        "",
        f"- machine: {f['nproc']} CPUs, {f['cpu']}, {f['mem_gib']} GiB RAM, "
        f"kernel {f['kernel']}, {f['os']}; work dir on {f['work_fs']}",
        f"- shoal: `{f['shoal']}` ({f['shoal_path']}, sha256 {f['shoal_sha256_16']}…, "
        f"built {f['shoal_built']}, repo {f['repo_rev']})",
        f"- unison: {f['unison']} (Debian {f['unison_deb']}); {f['gnu_time']}; "
        f"Python {f['python']}",
        f"- reps: {meta['reps']}, each sample on fresh folders; cells are the median "
        "(min–max) of verified samples; FAILED samples are counted, never dropped",
        "",
        "| workload | shoal time | shoal RSS | unison time | unison RSS "
        "| time ratio shoal/unison | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for wl, label in ROWS.items():
        by = {t: [r for r in rows if r["workload"] == wl and r["tool"] == t] for t in TOOLS}
        if not any(by.values()):
            continue
        st, stv = cell(by["shoal"], "seconds")
        sr, srv = cell(by["shoal"], "peak_rss_kib")
        ut, utv = cell(by["unison"], "seconds")
        ur, urv = cell(by["unison"], "peak_rss_kib")
        out.append(f"| {label} | {st} | {sr} | {ut} | {ur} | {ratio(stv, utv)} "
                   f"| {ratio(srv, urv)} |")
    contended = [r for r in rows if R.contended(r)]
    failed = [r for r in rows if not r["verified"]]
    warned = [r for r in rows if r["warnings"]]
    out.append("")
    out.append(f"- samples: {len(rows)}, FAILED: {len(failed)}, contended "
               f"(other load > 25% of a core): {len(contended)}"
               + (" — " + ", ".join(f"{r['tool']} {r['workload']} r{r['rep']}"
                                   for r in contended) if contended else ""))
    for r in failed:
        out.append(f"- **FAILED** {r['tool']} {r['workload']} rep {r['rep']}: "
                   + "; ".join(r["problems"])
                   + (f"; first diffs: {r['diffs'][:5]}" if r["diffs"] else "")
                   + (f"; stderr: `{r['stderr_tail'][-300:].strip()}`"
                      if r["stderr_tail"].strip() else ""))
    for r in warned:
        out.append(f"- warning {r['tool']} {r['workload']} rep {r['rep']}: "
                   + "; ".join(r["warnings"]))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------

def main() -> int:
    a = parse_args()
    import_shared(a.shared)
    # a TERM from the wrapper's overall timeout still runs the cleanup below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not C.HAVE_GNU_TIME:
        sys.exit("GNU time (/usr/bin/time) is needed for peak RSS: apt-get install time")
    if shutil.which("unison") is None:
        sys.exit("unison not found: apt-get install unison")
    shoal = str(Path(a.shoal).resolve())
    if not os.access(shoal, os.X_OK):
        sys.exit(f"shoal binary not executable: {shoal} "
                 "(cargo build --release -p shoal-cli, or pass --shoal)")

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = Path(a.out).resolve() if a.out else work / f"results-{stamp}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "meta", "stamp": stamp, "reps": a.reps, "sets": sorted(a.sets),
            "timeout": a.timeout, "facts": facts(shoal, work)}
    with open(out, "a") as f:
        f.write(json.dumps(meta) + "\n")
    print("machine and versions:")
    for k, v in meta["facts"].items():
        print(f"  {k}: {v}")
    sys.stdout.flush()

    rows: list[dict] = []

    def sink(row: dict) -> None:
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        extra = (" " + "; ".join(row["problems"])) if row["problems"] else ""
        C.log(f"{row['tool']:6} {row['workload']:4} rep {row['rep']}: "
              f"{row['seconds']:.3f} s, {row['peak_rss_kib'] / 1024:.1f} MiB, "
              f"{row['status']}{extra}")

    kinds = []  # (source name, runner)
    if {"w1", "w5"} & a.sets:
        kinds.append(("w1", run_small))
    if "w2" in a.sets:
        kinds.append(("w2", run_big))
    if {"w3l", "w5"} & a.sets:
        kinds.append(("w1l", run_large))

    runs = work / "runs"
    rc = 0
    try:
        t0 = time.monotonic()
        sources = W.ensure_sources(work / "src", {k for k, _ in kinds})
        C.log(f"sources ready in {time.monotonic() - t0:.1f} s: {sorted(sources)}")
        for name, runner in kinds:
            expect0 = (work / "src" / f"{name}.done").read_text().strip()
            for rep in range(1, a.reps + 1):
                order = TOOLS if rep % 2 else TOOLS[::-1]
                for tool in order:
                    s = Session(runs / f"{tool}-{name}-r{rep}", tool, shoal, a.timeout)
                    before = len(rows)
                    try:
                        runner(s, sources[name], expect0, rep, a.sets, sink)
                    except Exception as e:  # noqa: BLE001 - report, go on with the rest
                        C.log(f"{tool} {name} rep {rep}: harness error {e!r}")
                        rc = 1
                    finally:
                        if any(not r["verified"] for r in rows[before:]):
                            # keep the logs of failed samples for the bug report
                            dst = work / "failed-logs" / s.base.name
                            shutil.rmtree(dst, ignore_errors=True)
                            if s.logs.exists():
                                shutil.copytree(s.logs, dst)
                        if not a.keep:
                            shutil.rmtree(s.base, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(work / "src", ignore_errors=True)
            shutil.rmtree(runs, ignore_errors=True)
        if rows:
            md = render(rows, meta)
            md_path = out.with_suffix(".md")
            md_path.write_text(md)
            print()
            print(md)
            C.log(f"raw results: {out}; table: {md_path}")
    if any(not r["verified"] for r in rows):
        rc = rc or 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
