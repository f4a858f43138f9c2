#!/usr/bin/env python3
"""Benchmark shoal through its hub and peer to peer: propagation, initial
sync, hub memory, bytes of a round with nothing new.

Everything runs on this machine and talks to 127.0.0.1 only. Four parts:

  prop   Two devices, each running `shoal agent`. A small new file is written
         on device A (written outside the folder, then renamed into it), and
         the clock runs until it is on device B with the right content
         (polled every 5 ms). Both agents and the hub are idle before every
         sample. Default 20 samples (+1 warm-up, not counted) per mode
         (--prop-modes): `p2p`, agents as by default (serving peers on
         127.0.0.1); `hub`, both agents with `--no-peers`. B's agent.json
         counters (peer pulls, hub sessions) show which path carried them.
  noop   Bytes on the wire for a round with nothing new. One workspace grown
         to each of --noop-sizes files (default 10,000 then 50,000), synced by
         A and B; then the hub's bytes_in+bytes_out (GET /v1/metrics) across
         `shoal sync --json` of B, less the cost of one metrics read; then
         both agents running idle for --idle-seconds (60): hub bytes, agents'
         peer bytes and sessions; then B's no-op `shoal sync` again with the
         agents running (it asks the peer first, then the hub).
  w1,w2  Initial sync through the hub of W1 (10,000 x 4 KiB in 100 dirs) and
         W2 (one 512 MiB file), seeded data from pb_workloads (same bytes as
         the peer benchmark). The data is put in A's folder (not yet synced),
         then `shoal sync --json` on A (upload), then on B (download). A fresh
         hub per sample. Legs, total, and peak RSS of A, B (GNU time) and the
         hub (VmHWM).
  fleet  One hub, one user, N device homes (default 100) spread over a few
         workspaces with tiny folders, N `shoal agent` processes. When all are
         connected and quiet for 10 s, the hub's VmRSS/VmHWM and the agents'
         RSS are read from /proc.

Syncthing is measured beside it by the team's peer harness (shared/bench,
`run.sh --tools syncthing --sets small,big`), run first in the same session
unless --no-peers; its W1/W2 medians and RSS give the ratios in the table.

Data generation, GNU-time peak RSS, the contention probe and tree hashing come
from the team's peer harness (shared/bench), imported at run time.
"""
from __future__ import annotations

import argparse
import atexit
import glob
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("prop", "w1", "w2", "fleet", "noop")
PROP_MODES = ("p2p", "hub")
USER = "alice"
PASSWORD = "hub-bench-pw"  # the hub wants at least 4 characters
READY = "shoal hub listening on"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

C = W = R = None  # shared modules, imported in main() from --shared
LIVE: list = []   # every long-running process we started (C.Daemon), stopped by pid


# --------------------------------------------------------------------------
# command line

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shoal", default=str(REPO / "target/release/shoal"),
                    help="shoal binary (default %(default)s)")
    ap.add_argument("--work", default="/tmp/hubbench",
                    help="scratch dir for data, homes, hubs and logs (default %(default)s)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma list of prop,w1,w2,fleet,noop (default all)")
    ap.add_argument("--reps", type=int, default=3, help="samples of W1 and of W2 (default 3)")
    ap.add_argument("--prop-samples", type=int, default=20,
                    help="propagation samples (default 20)")
    ap.add_argument("--prop-warmup", type=int, default=1,
                    help="propagation warm-up samples, not counted (default 1)")
    ap.add_argument("--prop-modes", default=",".join(PROP_MODES),
                    help="prop: p2p (agents serve peers, the default agent) and/or hub "
                         "(agents with --no-peers); default %(default)s")
    ap.add_argument("--noop-sizes", default="10000,50000",
                    help="noop: workspace sizes in files, ascending (default %(default)s)")
    ap.add_argument("--noop-file-bytes", type=int, default=4096,
                    help="noop: size of each file (default %(default)s)")
    ap.add_argument("--noop-reps", type=int, default=5,
                    help="noop: no-op syncs measured per size (default %(default)s)")
    ap.add_argument("--idle-seconds", type=float, default=60.0,
                    help="noop: idle window with both agents running (default %(default)s)")
    ap.add_argument("--idle-hold", type=float, default=1.0,
                    help="prop: agents and hub count as idle after this many seconds "
                         "with no CPU tick and no log line (default %(default)s)")
    ap.add_argument("--agents", type=int, default=100, help="fleet: agents (default 100)")
    ap.add_argument("--fleet-workspaces", type=int, default=5,
                    help="fleet: workspaces; device i joins workspace i mod K (default 5)")
    ap.add_argument("--fleet-quiet", type=float, default=10.0,
                    help="fleet: seconds of quiet after the last sync before reading "
                         "memory (default 10)")
    ap.add_argument("--shared",
                    default=os.environ.get("SHOAL_BENCH_SHARED",
                                           str(REPO.parent / "shared" / "bench")),
                    help="folder with the shared harness (default %(default)s)")
    ap.add_argument("--peers-work", default="/tmp/hubbench-peers",
                    help="work dir of the Syncthing run (default %(default)s)")
    ap.add_argument("--peers-reps", type=int, default=None,
                    help="Syncthing reps (default: --reps)")
    ap.add_argument("--no-peers", "--no-syncthing", dest="no_peers", action="store_true",
                    help="do not run the Syncthing harness (the team's peer benchmark; "
                         "nothing to do with the agent's --no-peers); use "
                         "--syncthing-results or leave the Syncthing columns empty")
    ap.add_argument("--syncthing-results", default=None,
                    help="peer results (.jsonl file, or a dir: its newest results-*.jsonl "
                         "with Syncthing rows). Default: those of the run made here")
    ap.add_argument("--out", default=None,
                    help="results JSON lines (default WORK/results-STAMP.jsonl); the "
                         "markdown goes beside it as .md")
    ap.add_argument("--timeout", type=float, default=900,
                    help="bound for every subprocess and wait, seconds (default 900)")
    ap.add_argument("--keep", action="store_true", help="keep generated data afterwards")
    ap.add_argument("--report", default=None, metavar="RESULTS.jsonl",
                    help="only print the table of an earlier run's results (with "
                         "--syncthing-results for the Syncthing columns)")
    a = ap.parse_args()
    a.parts = {s.strip().lower() for s in a.parts.split(",") if s.strip()}
    bad = a.parts - set(PARTS)
    if bad or not a.parts:
        ap.error(f"--parts: unknown {sorted(bad)}; choose from {','.join(PARTS)}")
    if a.reps < 1 or a.prop_samples < 1 or a.agents < 2 or a.fleet_workspaces < 1:
        ap.error("--reps, --prop-samples >= 1, --agents >= 2, --fleet-workspaces >= 1")
    a.peers_reps = a.peers_reps or a.reps
    a.prop_modes = [m.strip().lower() for m in a.prop_modes.split(",") if m.strip()]
    if not a.prop_modes or set(a.prop_modes) - set(PROP_MODES):
        ap.error(f"--prop-modes: choose from {','.join(PROP_MODES)}")
    try:
        a.noop_sizes = [int(x) for x in a.noop_sizes.split(",") if x.strip()]
    except ValueError:
        ap.error("--noop-sizes: comma list of file counts")
    if not a.noop_sizes or a.noop_sizes != sorted(a.noop_sizes) or a.noop_sizes[0] < 1:
        ap.error("--noop-sizes: ascending file counts >= 1 (one workspace grows)")
    return a


def import_shared(path: str) -> None:
    global C, W, R
    C, W, R = bench_common.import_shared(path)


# --------------------------------------------------------------------------
# facts

sh = bench_common.sh


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
        built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(Path(shoal).stat().st_mtime))
    except OSError:
        built = "missing"
    try:
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    dirty_files = [ln[3:] for ln in dirty.splitlines() if len(ln) > 3]
    # the wrapper records what it built; a later commit must not be named instead
    commit = os.environ.get("SHOAL_BENCH_BUILD_COMMIT") or sh(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if "SHOAL_BENCH_BUILD_DIRTY" in os.environ:
        dirty_files = [f for f in os.environ["SHOAL_BENCH_BUILD_DIRTY"].split("\n") if f]
    try:
        sha = hashlib.sha256(Path(shoal).read_bytes()).hexdigest()[:16]
    except OSError:
        sha = "missing"
    return {
        "nproc": sh(["nproc"]),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": os_name,
        "work_fs": sh(["stat", "-f", "-c", "%T", str(work)]),
        "python": platform.python_version(),
        "shoal": sh([shoal, "--version"]).splitlines()[0] if Path(shoal).exists() else "missing",
        "shoal_path": shoal,
        "shoal_built": built,
        "commit": commit,
        "commit_from": "wrapper, at build" if os.environ.get("SHOAL_BENCH_BUILD_COMMIT")
        else "git, at the start of the run",
        "tree_dirty": bool(dirty_files),
        "dirty_files": dirty_files,
        "shoal_sha256_16": sha,
        "syncthing": sh(["syncthing", "--version"]).splitlines()[0]
        if shutil.which("syncthing") else "not installed",
    }


# --------------------------------------------------------------------------
# small helpers

def log(msg: str) -> None:
    C.log(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return -1


def mem(pid: int) -> dict:
    st = C.proc_status(pid)

    def kib(k: str) -> int:
        return int(st.get(k, "0 kB").split()[0])
    return {"rss_kib": kib("VmRSS"), "hwm_kib": kib("VmHWM"),
            "threads": int(st.get("Threads", "0") or 0)}


def file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def log_counts(logfile: Path) -> dict:
    """What an agent logged so far: hub syncs, peer pulls, failed hub syncs, and
    pulls that fell back to the hub."""
    try:
        text = ANSI.sub("", logfile.read_text(errors="replace"))
    except OSError:
        text = ""
    return {"hub": text.count("synced with the hub"),
            "peer": text.count("pulled from a peer"),
            "failed": text.count("sync with the hub failed"),
            "fallback": text.count("cannot pull from a peer; using the hub")}


def count_synced(logfile: Path) -> tuple[int, int]:
    """(successful syncs, hub or peer; failed hub syncs) logged by an agent so far."""
    c = log_counts(logfile)
    return c["hub"] + c["peer"], c["failed"]


def du_bytes(root: Path) -> int:
    n = 0
    for dp, _, fns in os.walk(root):
        for fn in fns:
            try:
                n += os.lstat(os.path.join(dp, fn)).st_size
            except OSError:
                pass
    return n


def wait_quiet(pids: list[int], logs: list[Path], hold: float, timeout: float,
               poll: float = 0.1) -> dict:
    """Wait until none of pids used a CPU tick and none of logs grew for `hold` s.
    Returns {ok, waited_s, last_change (monotonic)}."""
    t0 = C.now()
    last_snap, since = None, t0
    while True:
        snap = (tuple(cpu_ticks(p) for p in pids), tuple(file_size(f) for f in logs))
        t = C.now()
        if snap != last_snap:
            last_snap, since = snap, t
        elif t - since >= hold:
            return {"ok": True, "waited_s": round(t - t0, 3), "last_change": since}
        if t - t0 > timeout:
            return {"ok": False, "waited_s": round(t - t0, 3), "last_change": since}
        time.sleep(poll)


def hub_connections(port: int) -> dict[int, int]:
    """inode -> 1 for every ESTABLISHED client socket to 127.0.0.1:port."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if len(f) < 10 or f[3] != "01":  # 01 = ESTABLISHED
                continue
            if int(f[2].rsplit(":", 1)[1], 16) == port:  # remote port = hub: client side
                out[int(f[9])] = 1
    return out


def socket_inodes(pid: int) -> set[int]:
    got = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                got.add(int(link[8:-1]))
    except OSError:
        pass
    return got


def nearest_rank(vals: list[float], q: float) -> float:
    s = sorted(vals)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def contended(extra: dict) -> bool:
    return R.contended({"extra": extra})


def stop_all(daemons: list) -> None:
    """TERM every process first, then reap each (escalating to KILL), by pid."""
    for d in daemons:
        if d.rusage is None and d.p.poll() is None:
            try:
                os.kill(d.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for d in daemons:
        d.stop()
        if d in LIVE:
            LIVE.remove(d)


def cleanup_live() -> None:
    if LIVE:
        stop_all(list(LIVE))


# --------------------------------------------------------------------------
# hub and devices

class Bench:
    """Things every part needs: binary, timeouts, env."""

    def __init__(self, shoal: str, timeout: float):
        self.shoal, self.timeout = shoal, timeout

    def env(self, base: Path, agent: bool = False) -> dict:
        e = {"PATH": "/usr/bin:/bin", "HOME": str(base / "userhome"), "LANG": "C.UTF-8",
             "SHOAL_PASSWORD": PASSWORD, "NO_COLOR": "1"}
        if agent:
            e["SHOAL_LOG"] = "info"
        (base / "userhome").mkdir(parents=True, exist_ok=True)
        return e

    def run(self, base: Path, args: list[str], tag: str, logdir: Path,
            check: bool = True):
        r = C.run_measured([self.shoal, *args], self.timeout, env=self.env(base),
                           logdir=logdir, tag=tag)
        if check and (r.rc != 0 or r.timed_out):
            raise RuntimeError(f"`shoal {' '.join(args)}` failed (rc {r.rc}, timed out "
                               f"{r.timed_out}): {r.stderr.strip()[-400:]}")
        return r


class Hub:
    def __init__(self, b: Bench, base: Path):
        self.b, self.base = b, base
        self.data, self.logs = base / "hubdata", base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.d = None
        self.port = 0

    def add_user(self) -> None:
        self.b.run(self.base, ["hub", "user", "add", USER, "--data", str(self.data)],
                   "user-add", self.logs)

    def start(self) -> None:
        for attempt in range(3):
            self.port = free_port()
            logf = self.logs / f"hub-{self.port}.log"
            self.d = C.Daemon([self.b.shoal, "hub", "--data", str(self.data),
                               "--listen", f"127.0.0.1:{self.port}"],
                              logf, env=self.b.env(self.base))
            LIVE.append(self.d)
            deadline = C.now() + 30
            while C.now() < deadline and self.d.alive():
                if READY in logf.read_text(errors="replace"):
                    self.logf = logf
                    return
                time.sleep(0.02)
            stop_all([self.d])
            log(f"hub did not start (attempt {attempt + 1}): "
                f"{logf.read_text(errors='replace')[-300:]}")
        raise RuntimeError("the hub did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self, token: str) -> dict:
        """GET /v1/metrics: `name value` lines -> {name: int}. The request and the
        response themselves count in bytes_in/bytes_out (see metrics_cost)."""
        req = urllib.request.Request(f"{self.url}/v1/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        out = {}
        for ln in text.splitlines():
            k, _, v = ln.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out

    @property
    def pid(self) -> int:
        return self.d.pid

    def mem(self) -> dict:
        return mem(self.pid)

    def cpu_s(self) -> float:
        return C.proc_cpu_s(self.pid)

    def stop(self) -> None:
        if self.d:
            stop_all([self.d])


class Device:
    def __init__(self, b: Bench, base: Path, name: str):
        self.b, self.base, self.name = b, base, name
        self.home = base / f"home-{name}"
        self.folder = base / f"folder-{name}"
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.agent = None

    def login(self, hub: Hub) -> None:
        self.b.run(self.base, ["--home", str(self.home), "login", hub.url, USER,
                               "--device-name", self.name], f"login-{self.name}", self.logs)

    def create(self, ws: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.b.run(self.base, ["--home", str(self.home), "workspace", "create", ws,
                               "--path", str(self.folder)], f"create-{self.name}", self.logs)

    def join(self, ws: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.b.run(self.base, ["--home", str(self.home), "workspace", "join", ws,
                               "--path", str(self.folder)], f"join-{self.name}", self.logs)

    def sync(self, tag: str):
        return self.b.run(self.base, ["--home", str(self.home), "sync", "--json"],
                          tag, self.logs, check=False)

    def start_agent(self, peers: bool = True) -> None:
        """`shoal agent`: serving peers on a free loopback port, or `--no-peers`."""
        self.agent_log = self.logs / f"agent-{self.name}.log"
        for f in ("agent.json", "peers.json"):  # written afresh by this agent
            (self.home / f).unlink(missing_ok=True)
        extra = ["--listen", "127.0.0.1:0"] if peers else ["--no-peers"]
        self.agent = C.Daemon([self.b.shoal, "--home", str(self.home), "agent", *extra],
                              self.agent_log, env=self.b.env(self.base, agent=True))
        LIVE.append(self.agent)

    def token(self) -> str:
        return json.loads((self.home / "device.json").read_text())["token"]

    def agent_state(self) -> dict | None:
        """The running agent's agent.json (listen, key, counters), or None."""
        try:
            return json.loads((self.home / "agent.json").read_text())
        except (OSError, ValueError):
            return None

    def counters(self) -> dict:
        return dict((self.agent_state() or {}).get("counters") or {})

    def knows_peer(self, other: str) -> bool:
        """peers.json lists device `other`, online, with a key and an address."""
        try:
            peers = json.loads((self.home / "peers.json").read_text())
        except (OSError, ValueError):
            return False
        return any(p.get("device_name") == other and p.get("addresses") and p.get("key")
                   and p.get("status") != "offline" for p in peers)


def wait_agents_ready(hub: Hub, devs: list, peers: bool, timeout: float = 60) -> float:
    """Until every agent published agent.json, the hub has a presence stream per
    agent (how agents hear of changes) and, with peers, each lists the others in
    peers.json with an address. An agent whose knowledge equals the hub's logs
    no sync at start, so the log cannot tell. Returns the seconds waited."""
    t0 = C.now()
    token = devs[0].token()

    def ready() -> bool:
        if not all(d.agent_state() for d in devs):
            return False
        if hub.metrics(token).get("presence_streams", 0) < len(devs):
            return False
        return not peers or all(d.knows_peer(o.name) for d in devs for o in devs if o is not d)
    C.wait_for(ready, timeout, interval=0.1,
               what="agents ready (agent.json, presence streams"
                    + (", peers.json)" if peers else ")"))
    return round(C.now() - t0, 3)


def counter_delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def settle_state(devs: list) -> None:
    """agent.json is rewritten within ~1 s of a change: give it time."""
    time.sleep(1.5)


# --------------------------------------------------------------------------
# part 1: propagation with agents running

def part_prop(b: Bench, work: Path, a, sink, mode: str = "p2p") -> None:
    """Propagation A -> B with both agents running. mode p2p: agents as by default
    (serving peers on loopback); mode hub: both with --no-peers."""
    peers = mode == "p2p"
    base = work / "runs" / f"prop-{mode}"
    shutil.rmtree(base, ignore_errors=True)
    stage = base / "stage"  # outside the folder, same file system: rename is atomic
    stage.mkdir(parents=True)
    hub = Hub(b, base)
    hub.add_user()
    hub.start()
    da, db = Device(b, base, "A"), Device(b, base, "B")
    try:
        da.login(hub)
        db.login(hub)
        da.create("prop")
        db.join("prop")
        da.start_agent(peers)
        db.start_agent(peers)
        ready_s = wait_agents_ready(hub, [da, db], peers)
        pids = [hub.pid, da.agent.pid, db.agent.pid]
        logs = [da.agent_log, db.agent_log, hub.logf]
        token = da.token()
        total = a.prop_warmup + a.prop_samples
        start = None  # counters when the counted samples begin (after the warm-up)
        for i in range(total):
            warm = i < a.prop_warmup
            n = i - a.prop_warmup + 1
            name = f"prop_{i:03d}.txt"
            data = random.Random(7000 + i).randbytes(200).hex().encode() + b"\n"
            tmp = stage / name
            tmp.write_bytes(data)
            q = wait_quiet(pids, logs, a.idle_hold, 120)
            if i == a.prop_warmup:
                settle_state([da, db])
                start = {"A": da.counters(), "B": db.counters(), "hub": hub.metrics(token),
                         "logA": log_counts(da.agent_log), "logB": log_counts(db.agent_log)}
                q = wait_quiet(pids, logs, a.idle_hold, 120)
            la0, lb0 = log_counts(da.agent_log), log_counts(db.agent_log)
            target = db.folder / name
            cpu0 = sum(C.proc_cpu_s(p) for p in pids)
            host = C.HostCPU()
            t0m = C.now()
            t0 = time.perf_counter()
            os.rename(tmp, da.folder / name)
            first_seen = None
            ok = False
            deadline = t0 + min(a.timeout, 120)
            while True:
                try:
                    got = target.read_bytes()
                    if first_seen is None:
                        first_seen = time.perf_counter() - t0
                    if got == data:
                        ok = True
                        break
                except FileNotFoundError:
                    pass
                if time.perf_counter() > deadline:
                    break
                time.sleep(0.005)
            t1 = time.perf_counter() - t0
            hostinfo = host.stop(sum(C.proc_cpu_s(p) for p in pids) - cpu0)
            q2 = wait_quiet(pids, logs, a.idle_hold, 120)
            settle = q2["last_change"] - t0m  # last CPU tick / log line after the rename
            la1, lb1 = log_counts(da.agent_log), log_counts(db.agent_log)
            problems = []
            if not q["ok"]:
                problems.append(f"not idle before the sample ({q['waited_s']} s)")
            if not ok:
                problems.append("did not arrive with the right content within "
                                f"{deadline - t0:.0f} s"
                                + (f" (first seen at {first_seen:.3f} s)" if first_seen else ""))
            if la1["failed"] > la0["failed"] or lb1["failed"] > lb0["failed"]:
                problems.append("an agent logged 'sync with the hub failed'")
            row = {"kind": "sample", "part": "prop", "mode": mode, "rep": n if not warm else 0,
                   "warmup": warm, "verified": ok and not problems,
                   "status": "ok" if ok and not problems else "FAILED",
                   "seconds": round(t1, 4),
                   "first_seen_s": round(first_seen, 4) if first_seen is not None else None,
                   "settle_s": round(settle, 3),
                   "syncs_a": sum(la1[k] - la0[k] for k in ("hub", "peer")),
                   "syncs_b": sum(lb1[k] - lb0[k] for k in ("hub", "peer")),
                   "log_a": counter_delta(la1, la0), "log_b": counter_delta(lb1, lb0),
                   "idle_wait_s": q["waited_s"], "problems": problems, "extra": hostinfo}
            sink(row)
        # which path carried the counted samples: agent.json counters and hub metrics
        settle_state([da, db])
        paths = {}
        if start is not None:
            paths = {"A": counter_delta(da.counters(), start["A"]),
                     "B": counter_delta(db.counters(), start["B"]),
                     "hub": counter_delta(hub.metrics(token), start["hub"]),
                     "logA": counter_delta(log_counts(da.agent_log), start["logA"]),
                     "logB": counter_delta(log_counts(db.agent_log), start["logB"])}
        # whole-tree check at the end: both sides equal, no strays, no conflicts
        ta, tb = W.tree_digest(da.folder), W.tree_digest(db.folder)
        mems = {"hub": hub.mem(), "agent_A": mem(da.agent.pid), "agent_B": mem(db.agent.pid)}
        sink({"kind": "prop_end", "part": "prop", "mode": mode,
              "trees_equal": ta["digest"] == tb["digest"],
              "files_a": ta["files"], "files_b": tb["files"],
              "expected_files": total, "mem": mems, "ready_s": ready_s,
              "samples": a.prop_samples, "paths": paths})
    finally:
        stop_all([d.agent for d in (da, db) if d.agent] + ([hub.d] if hub.d else []))


# --------------------------------------------------------------------------
# part 2: initial sync through the hub, W1 and W2

def part_initial(b: Bench, work: Path, wl: str, src: Path, expect: str, rep: int,
                 a, sink) -> None:
    base = work / "runs" / f"{wl.lower()}-r{rep}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    hub = Hub(b, base)
    da, db = Device(b, base, "A"), Device(b, base, "B")
    row = {"kind": "sample", "part": wl, "rep": rep, "verified": False, "status": "FAILED",
           "problems": []}
    try:
        hub.add_user()
        hub.start()
        da.login(hub)
        db.login(hub)
        da.create("bench")  # empty folders: A has not synced the data
        db.join("bench")
        subprocess.run(["cp", "-a", "--", f"{src}/.", str(da.folder)], check=True,
                       timeout=b.timeout)
        os.sync()  # the copy's write-back must not land in the timed window
        hub_before = hub.mem()
        legs = {}
        t_start = time.perf_counter()
        for who, dev in (("A", da), ("B", db)):
            hub_cpu0 = hub.cpu_s()
            host = C.HostCPU()
            r = dev.sync(f"{wl}-r{rep}-sync-{who}")
            hub_cpu = hub.cpu_s() - hub_cpu0
            hostinfo = host.stop(r.cpu_s + hub_cpu)
            try:
                js = json.loads(r.stdout)
            except ValueError:
                js = None
            legs[who] = {"seconds": round(r.wall, 4), "rc": r.rc, "timed_out": r.timed_out,
                         "peak_rss_kib": r.maxrss_kib, "cpu_s": round(r.cpu_s, 3),
                         "hub_cpu_s": round(hub_cpu, 3), "json": js,
                         "stderr_tail": r.stderr[-1500:], "extra": hostinfo}
            if r.rc != 0 or r.timed_out:
                row["problems"].append(f"sync on {who}: exit {r.rc}"
                                       + (" (timed out)" if r.timed_out else ""))
                break
        total = time.perf_counter() - t_start
        hub_after = hub.mem()
        hub_data = du_bytes(hub.data)
        hub.stop()
        ta, tb = W.tree_digest(da.folder), W.tree_digest(db.folder)
        if ta["digest"] != expect:
            row["problems"].append("A changed: not the seeded tree")
        if tb["digest"] != expect:
            row["problems"].append(f"B is not the seeded tree (B {tb['files']} files, "
                                   f"{tb['bytes']} B; expected {ta['files']} files)")
        for who in ("A", "B"):
            js = (legs.get(who) or {}).get("json")
            if who in legs and not (isinstance(js, list) and js and "error" not in js[0]):
                row["problems"].append(f"sync on {who}: stdout is not a JSON summary "
                                       "without error")
        # contention over the whole window: worst of the two legs
        ext = [legs[w]["extra"] for w in legs]
        extra = {"other_cpu_s": round(sum(e["other_cpu_s"] for e in ext), 3),
                 "window_s": round(sum(e["window_s"] for e in ext), 3)}
        row.update({
            "verified": not row["problems"], "status": "ok" if not row["problems"] else "FAILED",
            "seconds": round(total, 4), "legs": legs,
            "seconds_a": legs.get("A", {}).get("seconds"),
            "seconds_b": legs.get("B", {}).get("seconds"),
            "rss_a_kib": legs.get("A", {}).get("peak_rss_kib"),
            "rss_b_kib": legs.get("B", {}).get("peak_rss_kib"),
            "rss_hub_kib": hub_after["hwm_kib"], "hub_rss_end_kib": hub_after["rss_kib"],
            "hub_hwm_before_kib": hub_before["hwm_kib"], "hub_data_bytes": hub_data,
            "shoal_state_a_bytes": du_bytes(da.folder / ".shoal"),
            "shoal_state_b_bytes": du_bytes(db.folder / ".shoal"),
            "files": tb["files"], "bytes": tb["bytes"], "extra": extra,
            "contended_legs": [w for w in legs if contended(legs[w]["extra"])],
        })
    except Exception as e:  # noqa: BLE001 - a failed sample is recorded, the run goes on
        row["problems"].append(f"harness error: {e!r}")
    finally:
        hub.stop()
        if not row["verified"]:
            dst = work / "failed-logs" / base.name
            shutil.rmtree(dst, ignore_errors=True)
            for d in (hub.logs,):
                if d.exists():
                    shutil.copytree(d, dst)
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    sink(row)


# --------------------------------------------------------------------------
# part 3: hub memory with N agents

def part_fleet(b: Bench, work: Path, a, sink) -> None:
    base = work / "runs" / "fleet"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    hub = Hub(b, base)
    devs = [Device(b, base, f"d{i:03d}") for i in range(a.agents)]
    k = min(a.fleet_workspaces, a.agents)
    row = {"kind": "fleet", "part": "fleet", "agents": a.agents, "workspaces": k,
           "problems": [], "verified": False}
    try:
        hub.add_user()
        hub.start()
        hub_idle0 = hub.mem()
        t0 = C.now()
        for d in devs:
            d.login(hub)
        row["login_s"] = round(C.now() - t0, 2)
        for i, d in enumerate(devs):
            ws = f"ws{i % k}"
            if i < k:
                d.create(ws)
                (d.folder / f"hello-{ws}.txt").write_text(f"hello from {ws}\n")
            else:
                d.join(ws)
        row["setup_s"] = round(C.now() - t0, 2)
        hub_before = hub.mem()  # after the logins (argon2id) and joins, before agents
        t1 = C.now()
        for d in devs:
            d.start_agent()
        pids = [d.agent.pid for d in devs]

        def all_synced() -> bool:
            return all(count_synced(d.agent_log)[0] >= 1 for d in devs)
        C.wait_for(all_synced, min(a.timeout, 300), interval=0.5, what="every agent synced")
        row["all_synced_s"] = round(C.now() - t1, 2)

        def all_files() -> bool:
            return all((d.folder / f"hello-ws{i % k}.txt").is_file()
                       for i, d in enumerate(devs))
        try:
            C.wait_for(all_files, min(a.timeout, 300), interval=0.5,
                       what="every folder has its workspace's file")
        except TimeoutError as e:
            row["problems"].append(str(e))
        row["all_files_s"] = round(C.now() - t1, 2)
        cpu0 = {p: C.proc_cpu_s(p) for p in pids + [hub.pid]}
        host = C.HostCPU()
        q = wait_quiet(pids + [hub.pid], [d.agent_log for d in devs] + [hub.logf],
                       a.fleet_quiet, min(a.timeout, 600), poll=0.25)
        quiet_cpu = sum(C.proc_cpu_s(p) - cpu0[p] for p in cpu0)
        hostinfo = host.stop(quiet_cpu)
        if not q["ok"]:
            row["problems"].append(f"never quiet for {a.fleet_quiet} s within "
                                   f"{q['waited_s']} s")
        row["quiet_after_s"] = round(C.now() - t1, 2)
        # who is connected: ESTABLISHED sockets to the hub port owned by each agent
        conns = hub_connections(hub.port)
        per_agent = [len(socket_inodes(p) & set(conns)) for p in pids]
        dead = [d.name for d in devs if not d.agent.alive()]
        hub_m = hub.mem()
        agent_m = [mem(p) for p in pids]
        fails = sum(count_synced(d.agent_log)[1] for d in devs)
        syncs = sum(count_synced(d.agent_log)[0] for d in devs)
        # idle cost: CPU of hub + agents over a further quiet window
        c0 = {p: C.proc_cpu_s(p) for p in pids + [hub.pid]}
        time.sleep(5)
        idle_cpu = sum(C.proc_cpu_s(p) - c0[p] for p in c0)
        if dead:
            row["problems"].append(f"agents exited: {dead[:10]}")
        if fails:
            row["problems"].append(f"{fails} 'sync failed' lines in agent logs")
        unconnected = [devs[i].name for i, n in enumerate(per_agent) if n < 1]
        if unconnected:
            row["problems"].append(f"{len(unconnected)} agents without a connection to "
                                   f"the hub: {unconnected[:10]}")
        rss = [m["rss_kib"] for m in agent_m]
        hwm = [m["hwm_kib"] for m in agent_m]
        row.update({
            "verified": not row["problems"],
            "hub_rss_kib": hub_m["rss_kib"], "hub_hwm_kib": hub_m["hwm_kib"],
            "hub_threads": hub_m["threads"],
            "hub_rss_fresh_kib": hub_idle0["rss_kib"],
            "hub_rss_before_agents_kib": hub_before["rss_kib"],
            "hub_hwm_before_agents_kib": hub_before["hwm_kib"],
            "agent_rss_avg_kib": round(statistics.mean(rss)),
            "agent_rss_max_kib": max(rss), "agent_rss_min_kib": min(rss),
            "agent_hwm_avg_kib": round(statistics.mean(hwm)), "agent_hwm_max_kib": max(hwm),
            "agent_threads_avg": round(statistics.mean(m["threads"] for m in agent_m), 1),
            "hub_connections": len(conns),
            "agents_connected": sum(1 for n in per_agent if n >= 1),
            "syncs_logged": syncs, "idle_cpu_s_per_5s": round(idle_cpu, 3),
            "quiet_window_cpu_s": round(quiet_cpu, 3), "extra": hostinfo,
        })
    except Exception as e:  # noqa: BLE001
        row["problems"].append(f"harness error: {e!r}")
    finally:
        stop_all([d.agent for d in devs if d.agent] + ([hub.d] if hub.d else []))
        if row["problems"]:
            dst = work / "failed-logs" / "fleet"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(base / "logs", dst, ignore_dangling_symlinks=True)
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    row["status"] = "ok" if row["verified"] else "FAILED"
    sink(row)


# --------------------------------------------------------------------------
# part 4: bytes on the wire for a round with nothing new

def grow_folder(folder: Path, upto: int, size: int) -> int:
    """Adds files f000000.bin … to `folder` (100 subfolders, seeded random bytes)
    until it holds `upto`; returns how many were written."""
    have = len(glob.glob(str(folder / "d*" / "f*.bin")))
    rnd = random.Random(4242 + have)
    for i in range(have, upto):
        d = folder / f"d{i % 100:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:06d}.bin").write_bytes(rnd.randbytes(size))
    return max(0, upto - have)


def bytes_of(m: dict) -> int:
    return m.get("bytes_in", 0) + m.get("bytes_out", 0)


def metrics_cost(hub: Hub, token: str, reads: int = 6) -> dict:
    """What one GET /v1/metrics adds to bytes_in+bytes_out: the deltas between
    back-to-back reads (each delta holds one request and one response)."""
    ms_ = [hub.metrics(token) for _ in range(reads)]
    d = [bytes_of(y) - bytes_of(x) for x, y in zip(ms_, ms_[1:])]
    return {"median": statistics.median(d), "all": d}


def part_noop(b: Bench, work: Path, a, sink) -> None:
    base = work / "runs" / "noop"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    hub = Hub(b, base)
    da, db = Device(b, base, "A"), Device(b, base, "B")
    try:
        hub.add_user()
        hub.start()
        da.login(hub)
        db.login(hub)
        da.create("noop")
        db.join("noop")
        token = da.token()
        for size in a.noop_sizes:
            row = {"kind": "noop", "part": "noop", "files": size,
                   "file_bytes": a.noop_file_bytes, "problems": []}
            try:
                part_noop_size(b, hub, da, db, token, size, a, row)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row["problems"].append(f"harness error: {e!r}")
            finally:
                stop_all([d.agent for d in (da, db) if d.agent])
                da.agent = db.agent = None
            row["verified"] = not row["problems"]
            row["status"] = "ok" if row["verified"] else "FAILED"
            sink(row)
            if row["problems"]:
                dst = work / "failed-logs" / f"noop-{size}"
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(base / "logs", dst, ignore_dangling_symlinks=True)
                break
    finally:
        stop_all([d.agent for d in (da, db) if d.agent] + ([hub.d] if hub.d else []))
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


def part_noop_size(b: Bench, hub: Hub, da, db, token: str, size: int, a, row: dict) -> None:
    t0 = C.now()
    added = grow_folder(da.folder, size, a.noop_file_bytes)
    os.sync()
    row["gen_s"] = round(C.now() - t0, 2)
    # A uploads, B downloads; one more round each so both are settled
    setup = []
    for who, dev in (("A", da), ("B", db), ("A", da), ("B", db)):
        r = dev.sync(f"noop-{size}-setup-{who}")
        setup.append({"who": who, "seconds": round(r.wall, 3), "rc": r.rc})
        if r.rc != 0 or r.timed_out:
            raise RuntimeError(f"setup sync on {who}: exit {r.rc}: {r.stderr[-300:]}")
    row["setup"] = setup
    row["added"] = added
    ta, tb = W.tree_digest(da.folder), W.tree_digest(db.folder)
    if ta["digest"] != tb["digest"] or tb["files"] != size:
        row["problems"].append(f"not synced: A {ta['files']} files, B {tb['files']}, "
                               f"expected {size}")
        return
    row["hub_data_bytes"] = du_bytes(hub.data)

    def measure_sync(tag: str, devs_counting: list) -> dict:
        """B's `shoal sync --json` with nothing new: hub bytes (less one metrics
        read) and, from the running agents' servers, peer bytes."""
        c0 = [d.counters() for d in devs_counting]
        m0 = hub.metrics(token)
        r = db.sync(tag)
        m1 = hub.metrics(token)
        if devs_counting:
            settle_state(devs_counting)
        c1 = [d.counters() for d in devs_counting]
        try:
            js = json.loads(r.stdout)
        except ValueError:
            js = None
        dm = counter_delta(m1, m0)
        peer = sum(counter_delta(y, x).get(k, 0) for x, y in zip(c0, c1)
                   for k in ("peer_bytes_in", "peer_bytes_out"))
        moved = [e for e in (js or []) if isinstance(e, dict)
                 and (e.get("uploaded") or e.get("downloaded"))]
        return {"rc": r.rc, "seconds": round(r.wall, 4), "json": js,
                "hub_bytes_raw": bytes_of(m1) - bytes_of(m0), "hub": dm,
                "peer_bytes": peer, "moved": bool(moved), "stderr_tail": r.stderr[-300:]}

    # 1. no agents running: the hub alone
    cost = metrics_cost(hub, token)
    row["metrics_cost"] = cost
    syncs = [measure_sync(f"noop-{size}-sync-{i}", []) for i in range(a.noop_reps)]
    for s_ in syncs:
        s_["hub_bytes"] = s_["hub_bytes_raw"] - cost["median"]
    row["syncs"] = syncs
    for s_ in syncs:
        if s_["rc"] != 0:
            row["problems"].append(f"no-op sync exit {s_['rc']}: {s_['stderr_tail']}")
        if s_["moved"]:
            row["problems"].append(f"no-op sync moved something: {s_['json']}")

    # 2. both agents running (peers on), idle
    t1 = C.now()
    da.start_agent(True)
    db.start_agent(True)
    row["agents_ready_s"] = wait_agents_ready(hub, [da, db], True, timeout=min(a.timeout, 300))
    pids = [hub.pid, da.agent.pid, db.agent.pid]
    logs = [da.agent_log, db.agent_log, hub.logf]
    q = wait_quiet(pids, logs, max(a.idle_hold, 3.0), min(a.timeout, 300))
    if not q["ok"]:
        row["problems"].append(f"agents never quiet before the idle window ({q['waited_s']} s)")
    settle_state([da, db])
    row["agents_quiet_s"] = round(C.now() - t1, 2)
    cost2 = metrics_cost(hub, token)
    row["metrics_cost_agents"] = cost2
    c0 = {"A": da.counters(), "B": db.counters()}
    l0 = {"A": log_counts(da.agent_log), "B": log_counts(db.agent_log)}
    cpu0 = sum(C.proc_cpu_s(p) for p in pids)
    m0 = hub.metrics(token)
    time.sleep(a.idle_seconds)
    m1 = hub.metrics(token)
    cpu1 = sum(C.proc_cpu_s(p) for p in pids)
    settle_state([da, db])
    c1 = {"A": da.counters(), "B": db.counters()}
    l1 = {"A": log_counts(da.agent_log), "B": log_counts(db.agent_log)}
    idle = {"seconds": a.idle_seconds,
            "hub_bytes": bytes_of(m1) - bytes_of(m0) - cost2["median"],
            "hub": counter_delta(m1, m0),
            "agents": {w: counter_delta(c1[w], c0[w]) for w in c0},
            "logs": {w: counter_delta(l1[w], l0[w]) for w in l0},
            "cpu_s": round(cpu1 - cpu0, 3)}
    idle["peer_bytes"] = sum(idle["agents"][w].get(k, 0) for w in idle["agents"]
                             for k in ("peer_bytes_in", "peer_bytes_out"))
    idle["sessions"] = sum(idle["agents"][w].get(k, 0) for w in idle["agents"]
                           for k in ("hub_sessions", "peer_pulls", "peer_served"))
    row["idle"] = idle

    # 3. B's no-op `shoal sync` with the agents running: it asks A's agent first
    wait_quiet(pids, logs, a.idle_hold, min(a.timeout, 120))
    with_agents = [measure_sync(f"noop-{size}-sync-agents-{i}", [da, db])
                   for i in range(max(1, min(3, a.noop_reps)))]
    for s_ in with_agents:
        s_["hub_bytes"] = s_["hub_bytes_raw"] - cost2["median"]
        if s_["rc"] != 0:
            row["problems"].append(f"no-op sync with agents: exit {s_['rc']}: "
                                   f"{s_['stderr_tail']}")
        if s_["moved"]:
            row["problems"].append(f"no-op sync with agents moved something: {s_['json']}")
    row["syncs_with_agents"] = with_agents
    if any(l1[w]["failed"] for w in l1):
        row["problems"].append("an agent logged 'sync with the hub failed'")


# --------------------------------------------------------------------------
# Syncthing: the team's peer harness

def run_peers(a, shared: Path) -> Path | None:
    if shutil.which("syncthing") is None:
        log("syncthing is not installed: run `apt-get install -y syncthing` "
            "(or shared/bench/install.sh); Syncthing columns stay empty")
        return None
    cmd = [str(shared / "run.sh"), a.peers_work, "--tools", "syncthing",
           "--sets", "small,big", "--reps", str(a.peers_reps), "--timeout", str(a.timeout)]
    log("peers: " + " ".join(cmd))
    Path(a.peers_work).mkdir(parents=True, exist_ok=True)
    logf = Path(a.peers_work) / f"peers-{time.strftime('%Y%m%dT%H%M%S')}.log"
    limit = int(os.environ.get("PEERS_BENCH_LIMIT", "5400"))
    with open(logf, "wb") as f:
        try:
            r = subprocess.run(cmd, cwd=shared, stdout=f, stderr=subprocess.STDOUT,
                               timeout=limit + 60,
                               env={**os.environ, "PEERS_BENCH_LIMIT": str(limit)})
            log(f"peers: exit {r.returncode}; log {logf}")
        except subprocess.TimeoutExpired:
            log(f"peers: timed out after {limit + 60} s; log {logf}")
    return Path(a.peers_work) / "results"


def load_syncthing(spec: str | Path | None, since: float | None) -> tuple[list[dict], str]:
    if not spec:
        return [], ""
    p = Path(spec)
    files = [p] if p.is_file() else sorted(glob.glob(str(p / "results-*.jsonl")),
                                           key=os.path.getmtime, reverse=True)
    for f in files:
        f = Path(f)
        if since is not None and f.stat().st_mtime < since:
            continue
        rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
        rows = [r for r in rows if r.get("tool") == "syncthing"]
        if any(r.get("workload") in ("W1", "W2") for r in rows):
            return rows, str(f)
    return [], ""


# --------------------------------------------------------------------------
# report

def ms(v: float) -> str:
    return f"{v * 1000:.0f} ms"


def sec(v: float) -> str:
    return f"{v:.3f} s" if v < 10 else f"{v:.2f} s" if v < 100 else f"{v:.1f} s"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def rng_txt(vals, f) -> str:
    return f" ({f(min(vals))}–{f(max(vals))})" if len(vals) > 1 else ""


def ratio(x, y) -> str:
    return f"{x / y:.2f}×" if x is not None and y else "–"


def render(rows: list[dict], meta: dict, st_rows: list[dict], st_file: str) -> str:
    f = meta["facts"]
    out = [
        f"## shoal through the hub, {meta['stamp']}",
        "",
        f"- machine: nproc {f['nproc']}, {f['cpu']}, {f['mem_gib']} GiB RAM, kernel "
        f"{f['kernel']}, {f['os']}; work dir on {f['work_fs']}",
        f"- shoal: commit {f['commit']} (from {f.get('commit_from', 'git')})"
        + (f" plus uncommitted changes in {len(f['dirty_files'])} files "
           f"({', '.join(f['dirty_files'][:8])})" if f["tree_dirty"] else "")
        + f", `{f['shoal']}`, binary built {f['shoal_built']}, sha256 {f['shoal_sha256_16']}…",
        f"- Syncthing: {f['syncthing']}; results: {st_file or 'none'}",
        "- cells: median (min–max) of verified samples unless said; RSS is GNU time %M for "
        "`shoal sync`, VmHWM for the hub and Syncthing",
        "",
        "| measurement | shoal | Syncthing | shoal / Syncthing |",
        "|---|---|---|---|",
    ]
    notes: list[str] = []

    # 1. propagation, per mode (rows of old runs have no mode: the agents then
    #    had no peer-to-peer)
    medians = {}
    for mode in dict.fromkeys(r.get("mode", "hub") for r in rows if r.get("part") == "prop"):
        prop = [r for r in rows if r.get("part") == "prop" and r["kind"] == "sample"
                and not r.get("warmup") and r.get("mode", "hub") == mode]
        tag = f"propagation ({mode})"
        if not prop:
            continue
        good = [r["seconds"] for r in prop if r["verified"]]
        nf = len(prop) - len(good)
        if good:
            medians[mode] = statistics.median(good)
            out.append(f"| {tag} A→B, agents idle, n={len(good)}: median | "
                       f"{ms(statistics.median(good))} | – | – |")
            out.append(f"| {tag}: p90 (nearest rank) / min / max | "
                       f"{ms(nearest_rank(good, 0.9))} / {ms(min(good))} / {ms(max(good))} "
                       "| – | – |")
            sa = [r["syncs_a"] for r in prop if r["verified"]]
            sb = [r["syncs_b"] for r in prop if r["verified"]]
            stl = [r["settle_s"] for r in prop if r["verified"]]
            out.append(f"| {tag}: syncs (hub or peer) logged per change A / B (median); "
                       f"until both idle | {statistics.median(sa):g} / "
                       f"{statistics.median(sb):g}; {ms(statistics.median(stl))} | – | – |")
            gaps = [r for r in prop if r["verified"] and r["first_seen_s"] is not None
                    and r["seconds"] - r["first_seen_s"] > 0.006]
            if gaps:
                notes.append(f"{tag}: {len(gaps)} samples saw the file on B before "
                             "its content was right (partial file visible)")
        if nf:
            out.append(f"| {tag} FAILED samples | **{nf}/{len(prop)}** | | |")
        end = next((r for r in rows if r["kind"] == "prop_end"
                    and r.get("mode", "hub") == mode), None)
        if end:
            m = end["mem"]
            out.append(f"| {tag}: peak RSS hub / agent A / agent B (VmHWM) | "
                       f"{mib(m['hub']['hwm_kib'])} / {mib(m['agent_A']['hwm_kib'])} / "
                       f"{mib(m['agent_B']['hwm_kib'])} | – | – |")
            pa = end.get("paths") or {}
            if pa:
                A, B, H = pa["A"], pa["B"], pa["hub"]
                out.append(
                    f"| {tag}: path over the {end.get('samples', len(prop))} samples: B peer "
                    f"pulls / B hub sessions / A hub sessions; A negotiations sent; hub "
                    f"download sessions / upload commits | {B.get('peer_pulls', 0)} / "
                    f"{B.get('hub_sessions', 0)} / {A.get('hub_sessions', 0)}; "
                    f"{A.get('negotiations_sent', 0)}; {H.get('download_sessions', 0)} / "
                    f"{H.get('upload_commits', 0)} | – | – |")
                k = end.get("samples", len(prop)) or 1
                peer_b = sum(pa[w].get(c, 0) for w in ("A", "B")
                             for c in ("peer_bytes_in", "peer_bytes_out"))
                out.append(f"| {tag}: bytes per change on hub connections / between the "
                           f"agents (mean over the samples) | "
                           f"{(H.get('bytes_in', 0) + H.get('bytes_out', 0)) / k:.0f} B / "
                           f"{peer_b / k:.0f} B | – | – |")
                fb = pa.get("logB", {}).get("fallback", 0) + pa.get("logA", {}).get("fallback", 0)
                if fb:
                    notes.append(f"{tag}: {fb} 'cannot pull from a peer; using the hub' lines")
            if not end["trees_equal"] or end["files_a"] != end["expected_files"]:
                notes.append(f"**{tag} end check FAILED**: trees equal "
                             f"{end['trees_equal']}, A {end['files_a']} files, B "
                             f"{end['files_b']}, expected {end['expected_files']}")
        warm = [r for r in rows if r.get("part") == "prop" and r.get("warmup")
                and r.get("mode", "hub") == mode]
        if warm:
            notes.append(f"{tag} warm-up (not counted): "
                         + ", ".join(f"{ms(r['seconds'])} {r['status']}" for r in warm))
        cont = [r["rep"] for r in prop if contended(r["extra"])]
        if cont:
            notes.append(f"{tag}: contended samples {len(cont)}/{len(prop)}: {cont}")
        for r in prop:
            if r["problems"]:
                notes.append(f"**FAILED** {tag} sample {r['rep']}: "
                             + "; ".join(r["problems"]))
    if "p2p" in medians and "hub" in medians:
        out.append(f"| propagation median, hub-only / peer-to-peer | "
                   f"{medians['hub'] / medians['p2p']:.2f}× | – | – |")

    # 2. initial sync
    def st_stats(wl):
        rs = [r for r in st_rows if r.get("workload") == wl and r.get("variant") == "rest-scan"]
        good = [r for r in rs if r.get("verified") and r.get("seconds") is not None]
        if not good:
            return None
        return {"n": len(good), "all": len(rs),
                "t": statistics.median(r["seconds"] for r in good),
                "ts": [r["seconds"] for r in good],
                "A": statistics.median(r["peak_rss_kib"].get("A", 0) for r in good),
                "B": statistics.median(r["peak_rss_kib"].get("B", 0) for r in good),
                "contended": sum(1 for r in good if R.contended(r))}

    for wl, label in (("W1", "W1 initial, 10k × 4 KiB"), ("W2", "W2 initial, 1 × 512 MiB")):
        rs = [r for r in rows if r.get("part") == wl]
        if not rs:
            continue
        good = [r for r in rs if r["verified"]]
        st = st_stats(wl)
        if st:
            notes.append(f"Syncthing {wl}: {st['n']}/{st['all']} verified samples, "
                         f"{st['contended']} contended, times "
                         + ", ".join(sec(t) for t in st["ts"]))
        if not good:
            out.append(f"| {label}: total | **FAILED {len(rs)}/{len(rs)}** | "
                       f"{sec(st['t']) if st else '–'} | – |")
        else:
            def med(k):
                return statistics.median(r[k] for r in good)
            tot = [r["seconds"] for r in good]
            fail = f" **{len(rs) - len(good)}/{len(rs)} FAILED**" if len(good) < len(rs) else ""
            out.append(f"| {label}: total A upload + B download, n={len(good)} | "
                       f"{sec(med('seconds'))}{rng_txt(tot, sec)}{fail} | "
                       f"{sec(st['t']) + rng_txt(st['ts'], sec) if st else '–'} | "
                       f"{ratio(med('seconds'), st['t'] if st else None)} |")
            for k, what in (("seconds_a", "leg A `shoal sync` (upload)"),
                            ("seconds_b", "leg B `shoal sync` (download)")):
                v = [r[k] for r in good]
                out.append(f"| {label}: {what} | {sec(med(k))}{rng_txt(v, sec)} | – | – |")
            ra, rb, rh = med("rss_a_kib"), med("rss_b_kib"), med("rss_hub_kib")
            out.append(f"| {label}: peak RSS device A (sync) | {mib(ra)} | "
                       f"{mib(st['A']) if st else '–'} | {ratio(ra, st['A'] if st else None)} |")
            out.append(f"| {label}: peak RSS device B (sync) | {mib(rb)} | "
                       f"{mib(st['B']) if st else '–'} | {ratio(rb, st['B'] if st else None)} |")
            out.append(f"| {label}: peak RSS hub (VmHWM, fresh hub) | {mib(rh)} | – | – |")
            tot_sh = ra + rb + rh
            tot_st = (st["A"] + st["B"]) if st else None
            out.append(f"| {label}: peak RSS sum (shoal A+B+hub vs Syncthing A+B) | "
                       f"{mib(tot_sh)} | {mib(tot_st) if tot_st else '–'} | "
                       f"{ratio(tot_sh, tot_st)} |")
            hd = statistics.median(r["hub_data_bytes"] for r in good)
            out.append(f"| {label}: hub data dir after the run | {hd / 2**20:.1f} MiB | – | – |")
        for r in rs:
            if not r["verified"]:
                tails = "; ".join(f"{w}: `{(leg.get('stderr_tail') or '').strip()[-200:]}`"
                                  for w, leg in (r.get("legs") or {}).items()
                                  if (leg.get("stderr_tail") or "").strip())
                notes.append(f"**FAILED** {wl} rep {r['rep']}: " + "; ".join(r["problems"])
                             + (f"; stderr {tails}" if tails else ""))
            elif r.get("contended_legs"):
                notes.append(f"{wl} rep {r['rep']}: contended legs {r['contended_legs']} "
                             f"(other CPU {r['extra']['other_cpu_s']} s over "
                             f"{r['extra']['window_s']} s)")

    # 3. fleet
    fl = next((r for r in rows if r.get("part") == "fleet"), None)
    if fl:
        n = fl["agents"]
        if "hub_rss_kib" in fl:
            per = (fl["hub_rss_kib"] - fl["hub_rss_before_agents_kib"]) / n
            out += [
                f"| hub with {n} agents ({fl['workspaces']} workspaces), connected and idle: "
                f"VmRSS / VmHWM | {mib(fl['hub_rss_kib'])} / {mib(fl['hub_hwm_kib'])} | – | – |",
                f"| hub before the agents started (after {n} logins): VmRSS / VmHWM; "
                f"fresh hub VmRSS | {mib(fl['hub_rss_before_agents_kib'])} / "
                f"{mib(fl['hub_hwm_before_agents_kib'])}; {mib(fl['hub_rss_fresh_kib'])} "
                "| – | – |",
                f"| hub VmRSS per connected agent | {per:.0f} KiB | – | – |",
                f"| agents: VmRSS avg (min–max); VmHWM avg | {mib(fl['agent_rss_avg_kib'])} "
                f"({mib(fl['agent_rss_min_kib'])}–{mib(fl['agent_rss_max_kib'])}); "
                f"{mib(fl['agent_hwm_avg_kib'])} | – | – |",
                f"| fleet: agents connected / hub threads / all synced after | "
                f"{fl['agents_connected']}/{n} / {fl['hub_threads']} / "
                f"{fl['all_synced_s']} s | – | – |",
                f"| fleet idle CPU, hub + {n} agents, over 5 s | "
                f"{fl['idle_cpu_s_per_5s']:.2f} s | – | – |",
            ]
        if fl["problems"]:
            notes.append("**fleet problems**: " + "; ".join(fl["problems"]))
        if fl.get("extra") and contended(fl["extra"]):
            notes.append(f"fleet quiet window contended (other CPU "
                         f"{fl['extra']['other_cpu_s']} s over {fl['extra']['window_s']} s)")
    # 4. bytes of a round with nothing new
    for r in [r for r in rows if r.get("part") == "noop"]:
        n = f"{r['files']:,} files × {r['file_bytes']} B"
        sy = r.get("syncs") or []
        if sy:
            hb = [s_["hub_bytes"] for s_ in sy]
            out.append(f"| no-op `shoal sync --json` of B, {n}, no agent running: hub "
                       f"bytes in+out (median, range, n={len(hb)}) | "
                       f"{statistics.median(hb):.0f} B ({min(hb)}–{max(hb)}) | – | – |")
            out.append(f"| … its wall time; hub requests / download sessions / upload "
                       f"batches per sync (less the metrics read) | "
                       f"{sec(statistics.median(s_['seconds'] for s_ in sy))}; "
                       f"{statistics.median(s_['hub'].get('requests', 0) - 1 for s_ in sy):g} / "
                       f"{sum(s_['hub'].get('download_sessions', 0) for s_ in sy)} / "
                       f"{sum(s_['hub'].get('upload_batches', 0) for s_ in sy)} | – | – |")
            out.append(f"| … one metrics read (subtracted) | "
                       f"{r['metrics_cost']['median']:.0f} B | – | – |")
        idle = r.get("idle")
        if idle:
            ag = idle["agents"]
            out.append(
                f"| both agents idle {idle['seconds']:g} s, {n}: hub bytes / peer bytes / "
                f"sessions (hub + peer pulls + served) / hub requests | "
                f"{idle['hub_bytes']} B / {idle['peer_bytes']} B / {idle['sessions']} / "
                f"{idle['hub'].get('requests', 0) - 1} | – | – |")
        wa = r.get("syncs_with_agents") or []
        if wa:
            hb = [s_["hub_bytes"] for s_ in wa]
            pb = [s_["peer_bytes"] for s_ in wa]
            out.append(f"| no-op `shoal sync --json` of B with both agents running, {n}: "
                       f"hub bytes / peer bytes (median, n={len(wa)}) | "
                       f"{statistics.median(hb):.0f} B / {statistics.median(pb):.0f} B | – | – |")
        if r.get("problems"):
            notes.append(f"**noop {r['files']} FAILED**: " + "; ".join(r["problems"]))

    out.append("")
    out += [f"- {n}" for n in notes] or ["- no failed or contended samples"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------

def main() -> int:
    a = parse_args()
    import_shared(a.shared)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(cleanup_live)
    if a.report:
        lines = [json.loads(ln) for ln in Path(a.report).read_text().splitlines() if ln.strip()]
        meta = next(r for r in lines if r["kind"] == "meta")
        used = next((r["file"] for r in lines if r["kind"] == "syncthing_source"), None)
        st_rows, st_file = load_syncthing(a.syncthing_results or used, None)
        print(render([r for r in lines if r["kind"] not in ("meta", "syncthing_source")],
                     meta, st_rows, st_file))
        return 0
    if not C.HAVE_GNU_TIME:
        sys.exit("GNU time (/usr/bin/time) is needed for peak RSS: apt-get install time")
    built = str(Path(a.shoal).resolve())
    if not os.access(built, os.X_OK):
        sys.exit(f"shoal binary not executable: {built} "
                 "(cargo build --release -p shoal-cli, or pass --shoal)")
    shared = Path(a.shared).resolve()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # run a private copy: a rebuild in the repo during the run must not swap the binary
    (work / "bin").mkdir(exist_ok=True)
    shoal = str(work / "bin" / "shoal")
    shutil.copy2(built, shoal)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = Path(a.out).resolve() if a.out else work / f"results-{stamp}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)

    meta = {"kind": "meta", "stamp": stamp, "args": {k: (sorted(v) if isinstance(v, set)
                                                         else v) for k, v in vars(a).items()},
            "facts": facts(shoal, work)}
    meta["facts"]["shoal_path"] = built

    st_spec, since = a.syncthing_results, None
    if not a.no_peers and not st_spec:
        since = time.time() - 5
        st_spec = run_peers(a, shared)
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
        if row["kind"] == "prop_end":
            log(f"prop end ({row['mode']}): trees equal {row['trees_equal']}, files A "
                f"{row['files_a']} B {row['files_b']}; hub VmHWM "
                f"{row['mem']['hub']['hwm_kib'] / 1024:.1f} MiB; paths {row['paths']}")
            return
        if row["kind"] == "noop":
            log(f"noop {row['files']} files: {row['status']} {row['problems']}; hub bytes "
                f"{[s_['hub_bytes'] for s_ in row.get('syncs', [])]}; idle "
                f"{ {k: v for k, v in row.get('idle', {}).items() if k != 'hub'} }; with "
                f"agents {[(s_['hub_bytes'], s_['peer_bytes']) for s_ in row.get('syncs_with_agents', [])]}")
            return
        bits = [row["part"], str(row.get("rep", ""))]
        if "seconds" in row:
            bits.append(f"{row['seconds']:.3f} s")
        if row.get("part") in ("W1", "W2") and row.get("seconds_a") is not None:
            bits.append(f"(A {row['seconds_a']:.3f} s, B {row.get('seconds_b') or 0:.3f} s; "
                        f"RSS A {row['rss_a_kib'] / 1024:.0f} B "
                        f"{(row.get('rss_b_kib') or 0) / 1024:.0f} hub "
                        f"{row['rss_hub_kib'] / 1024:.0f} MiB)")
        if "status" in row:
            bits.append(row["status"])
        if row.get("problems"):
            bits.append("; ".join(row["problems"]))
        log(" ".join(bits))

    b = Bench(shoal, a.timeout)
    rc = 0
    try:
        if "prop" in a.parts:
            log("=== propagation with agents ===")
            for mode in a.prop_modes:
                log(f"--- propagation, mode {mode} ---")
                try:
                    part_prop(b, work, a, sink, mode)
                except Exception as e:  # noqa: BLE001
                    log(f"propagation ({mode}): harness error {e!r}")
                    rc = 1
        want = {p for p in ("w1", "w2") if p in a.parts}
        if want:
            t0 = time.monotonic()
            sources = W.ensure_sources(work / "src", want)
            log(f"sources ready in {time.monotonic() - t0:.1f} s: {sorted(sources)}")
            for name in ("w1", "w2"):
                if name not in want:
                    continue
                expect = (work / "src" / f"{name}.done").read_text().strip()
                for rep in range(1, a.reps + 1):
                    log(f"=== {name.upper()} rep {rep} ===")
                    part_initial(b, work, name.upper(), sources[name], expect, rep, a, sink)
        if "fleet" in a.parts:
            log(f"=== fleet of {a.agents} agents ===")
            part_fleet(b, work, a, sink)
        if "noop" in a.parts:
            log(f"=== bytes of a no-op round, {a.noop_sizes} files ===")
            part_noop(b, work, a, sink)
    finally:
        cleanup_live()
        if not a.keep:
            shutil.rmtree(work / "src", ignore_errors=True)
            shutil.rmtree(work / "runs", ignore_errors=True)
            shutil.rmtree(work / "bin", ignore_errors=True)
        st_rows, st_file = load_syncthing(st_spec, since)
        with open(out, "a") as f:
            f.write(json.dumps({"kind": "syncthing_source", "file": st_file}) + "\n")
        if rows:
            md = render(rows, meta, st_rows, st_file)
            md_path = out.with_suffix(".md")
            md_path.write_text(md)
            print()
            print(md)
            log(f"raw results: {out}; table: {md_path}")
    if any(not r.get("verified", True) for r in rows
           if r["kind"] in ("sample", "fleet", "noop")):
        rc = rc or 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
