#!/usr/bin/env python3
"""One table for the project benchmark (issue #6): shoal in each mode beside the peers.

Reads shoal's results (`shoal-bench run`, one JSON line per sample) and the peers'
(`../shared/bench`, results-*.jsonl), and prints one markdown table: rows are the
workloads, columns shoal p2p / hub / mirror, Syncthing, rsync, Unison; each cell is the
median (min-max) seconds over verified samples, with bytes on the wire and peak RSS where
known. Then shoal's ratios to each peer, then every target of the issue marked MET or
MISSED with its figures, judged against the peers' medians of the same run.

Python 3.11, standard library only.

    python3 bench/all_table.py --shoal WORK/shoal-STAMP.jsonl \
        --peers WORK/peers/results/results-STAMP.jsonl [--peers ...] [--out table.md]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (label, shoal workload, peers' workload)
ROWS = [
    ("W1 initial, 10,000 × 4 KiB", "W1", "W1"),
    ("W1L initial, 50,000 × 4 KiB", "W1L", "W1L"),
    ("W2 initial, one 512 MiB file", "W2", "W2"),
    ("W3 3 changed + 1 new among 10,000", "W3", "W3"),
    ("W3L 3 changed + 1 new among 50,000", "W3L", "W3L"),
    ("W4 1 MiB overwritten mid-file", "W4", "W4"),
    ("W5 no-op round, 10,000 files", "W5", "W5"),
    ("W5 no-op round, 50,000 files", "W5L", "W5L"),
    ("W5 no-op round, the 512 MiB file", "W5big", "W5big"),
    ("W6 folder rename (10,000 files)", "W6dir", None),
    ("W6 file rename (512 MiB)", "W6file", None),
]
NOOP = {"W5", "W5L", "W5big"}
# the peers' samples used: Syncthing with a REST scan right after the change (the
# both-sides rescan for W5), rsync pushing to its daemon, Unison local to local
PEER_VARIANT = {"syncthing": {"W5": "rest-scan-both", "W5L": "rest-scan-both",
                              "W5big": "rest-scan-both", "*": "rest-scan"},
                "rsync": {"*": "daemon-push"},
                "unison": {"*": "local"}}
PEERS = ("syncthing", "rsync", "unison")
PEER_NAME = {"syncthing": "Syncthing", "rsync": "rsync", "unison": "Unison"}
KIB, MIB = 1024, 1024 * 1024


# --------------------------------------------------------------------------
# loading

def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for ln in path.read_text().splitlines():
        ln = ln.strip()
        if ln:
            try:
                rows.append(json.loads(ln))
            except ValueError:
                pass
    return rows


def expand(spec: str, pattern: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        return sorted((Path(f) for f in glob.glob(str(p / pattern))), key=os.path.getmtime)
    return [p] if p.exists() else []


def load_peers(specs: list[str]) -> tuple[dict, list[str], dict]:
    """{tool: rows} taking, for each tool, the newest results file that has its rows (runs
    are not mixed); the files used; the newest meta found (versions)."""
    files = []
    for s in specs:
        files += expand(s, "results-*.jsonl")
    files.sort(key=os.path.getmtime, reverse=True)
    by_tool: dict[str, list[dict]] = {}
    used = []
    meta: dict = {}
    for f in files:
        rows = read_jsonl(f)
        took = False
        for tool in PEERS:
            if tool in by_tool:
                continue
            mine = [r for r in rows if r.get("tool") == tool]
            if mine:
                by_tool[tool] = mine
                took = True
        if took:
            used.append(str(f))
            m = f.parent / f.name.replace("results-", "meta-").replace(".jsonl", ".json")
            if m.exists() and not meta:
                try:
                    meta = json.loads(m.read_text())
                except ValueError:
                    pass
    return by_tool, used, meta


def load_shoal(specs: list[str]) -> tuple[list[dict], list[str], dict]:
    files = []
    for s in specs:
        files += expand(s, "shoal-*.jsonl")
    rows, meta = [], {}
    for f in files:
        rows += [r for r in read_jsonl(f) if r.get("tool") == "shoal" and "workload" in r]
        m = Path(str(f)[: -len(".jsonl")] + ".meta.json") if str(f).endswith(".jsonl") else None
        if m and m.exists():
            try:
                meta = json.loads(m.read_text())
            except ValueError:
                pass
    return rows, [str(f) for f in files], meta


# --------------------------------------------------------------------------
# statistics

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


class Stat:
    """Medians of one (tool or mode, workload) over its verified samples."""

    def __init__(self, rows: list[dict], ok_key: str, secs_key: str = "seconds"):
        self.all = rows
        self.good = [r for r in rows if r.get(ok_key) and r.get(secs_key) is not None]
        self.secs = [r[secs_key] for r in self.good]
        self.n, self.total = len(self.good), len(rows)
        self.t = med(self.secs)

    def median_of(self, f):
        return med([f(r) for r in self.good])


def peer_stat(by_tool: dict, tool: str, wl: str | None) -> Stat | None:
    if wl is None or tool not in by_tool:
        return None
    var = PEER_VARIANT[tool].get(wl, PEER_VARIANT[tool]["*"])
    rows = [r for r in by_tool[tool] if r.get("workload") == wl and r.get("variant") == var]
    return Stat(rows, "verified") if rows else None


def shoal_stat(rows: list[dict], mode: str, wl: str) -> Stat | None:
    if wl in NOOP and mode in ("p2p", "hub"):
        mode = "cli"  # one measurement for both: `shoal sync` of B, agents stopped
    rs = [r for r in rows if r.get("mode") == mode and r.get("workload") == wl]
    return Stat(rs, "ok") if rs else None


def shoal_wire(r: dict) -> int | None:
    if r.get("hub_bytes") is None and r.get("peer_bytes") is None:
        return None
    return (r.get("hub_bytes") or 0) + (r.get("peer_bytes") or 0)


def shoal_leg(r: dict) -> int | None:
    """Bytes of the busiest single link: the larger of the hub's bytes in (≈ A's upload) and
    out (≈ B's download), or the peer connection."""
    hub = (r.get("detail") or {}).get("hub") or {}
    vals = [hub.get("bytes_in", 0), hub.get("bytes_out", 0), r.get("peer_bytes") or 0]
    return max(vals) if r.get("hub_bytes") is not None else None


def dev_rss(r: dict) -> int | None:
    """shoal agents: the larger of A's and B's peak RSS."""
    rs = r.get("rss_kib") or {}
    vals = [v for v in (rs.get("a"), rs.get("b")) if v]
    return max(vals) if vals else None


def peer_dev_rss(r: dict) -> int | None:
    vals = [v for v in (r.get("peak_rss_kib") or {}).values() if v]
    return max(vals) if vals else None


# --------------------------------------------------------------------------
# formatting

def fsec(v):
    if v is None:
        return "–"
    return f"{v:.3f} s" if v < 10 else f"{v:.2f} s" if v < 100 else f"{v:.1f} s"


def fsec_short(v):
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def fbytes(n):
    if n is None:
        return "–"
    a = abs(n)
    if a >= MIB:
        return f"{n / MIB:.2f} MiB"
    if a >= KIB:
        return f"{n / KIB:.1f} KiB"
    return f"{n:.0f} B"


def fmib(kib):
    return "–" if not kib else f"{kib / 1024:.0f} MiB"


def timing(st: Stat) -> str:
    if st.n == 0:
        return f"**FAILED {st.total}/{st.total}**"
    rng = f" ({fsec_short(min(st.secs))}–{fsec_short(max(st.secs))})" if st.n > 1 else ""
    fail = f" **{st.total - st.n} FAILED**" if st.n < st.total else ""
    return f"{fsec(st.t)}{rng} n={st.n}{fail}"


def shoal_cell(st: Stat | None, mode: str, wl: str) -> str:
    if st is None:
        return "–"
    parts = [timing(st)]
    if st.n:
        if mode == "mirror":
            parts.append(f"RSS {fmib(st.median_of(lambda r: (r.get('rss_kib') or {}).get('a')))}")
        else:
            hub = st.median_of(lambda r: r.get("hub_bytes"))
            peer = st.median_of(lambda r: r.get("peer_bytes"))
            if wl in NOOP:
                parts.append(f"hub {fbytes(hub)}")
                parts.append(f"RSS B sync {fmib(st.median_of(lambda r: r['rss_kib'].get('b')))}")
            else:
                parts.append(f"wire {fbytes(st.median_of(shoal_wire))} (hub {fbytes(hub)}, "
                             f"peer {fbytes(peer)})")
                rs = [st.median_of(lambda r, k=k: (r.get("rss_kib") or {}).get(k))
                      for k in ("a", "b", "hub")]
                parts.append(f"RSS A/B/hub {'/'.join(fmib(v).replace(' MiB', '') for v in rs)}"
                             " MiB")
    return "; ".join(parts)


def peer_cell(st: Stat | None, tool: str) -> str:
    if st is None:
        return "–"
    parts = [timing(st)]
    if st.n:
        wire = st.median_of(lambda r: r.get("wire_bytes"))
        if wire is not None:
            parts.append(f"wire {fbytes(wire)}")
        keys = sorted({k for r in st.good for k in (r.get("peak_rss_kib") or {})})
        if keys:
            vals = [st.median_of(lambda r, k=k: (r.get("peak_rss_kib") or {}).get(k))
                    for k in keys]
            parts.append("RSS " + "/".join(keys) + " "
                         + "/".join(fmib(v).replace(" MiB", "") for v in vals) + " MiB")
    return "; ".join(parts)


def ratio(a, b):
    return a / b if a is not None and b else None


def fratio(r):
    return "–" if r is None else f"{r:.2f}×"


# --------------------------------------------------------------------------
# facts

def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine(repo: Path) -> list[str]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1])
    except OSError:
        pass
    head = sh(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    return [f"nproc {os.cpu_count()}", cpu or "CPU unknown", f"{mem / 2**20:.1f} GiB RAM",
            f"kernel {platform.release()}", f"repo HEAD {head or 'unknown'}"]


# --------------------------------------------------------------------------
# targets

class Targets:
    def __init__(self):
        self.lines: list[str] = []

    def judge(self, name: str, met: bool | None, figures: str) -> None:
        mark = "NOT MEASURED" if met is None else ("MET" if met else "MISSED")
        self.lines.append(f"- **{mark}** {name}: {figures}")


def render(shoal_rows, shoal_files, shoal_meta, peers, peer_files, peer_meta, repo) -> str:
    out = [f"## shoal against the peers, all workloads ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
           ""]
    out.append("- machine: " + ", ".join(machine(repo)))
    if shoal_meta:
        dirty = shoal_meta.get("dirty") or ""
        out.append(f"- shoal: commit {shoal_meta.get('commit') or '?'}"
                   + (f" plus uncommitted changes in {len(dirty.split())} files" if dirty.strip()
                      else "")
                   + f", `{shoal_meta.get('shoal_version', '')}`, built "
                   f"{shoal_meta.get('shoal_built', '?')}; run started "
                   f"{shoal_meta.get('started', '?')}, reps {shoal_meta.get('reps', '?')}")
    vers = (peer_meta or {}).get("versions") or {}
    if vers:
        out.append("- peers: " + "; ".join(f"{vers[k]}" for k in ("syncthing", "rsync", "unison")
                                          if vers.get(k)))
    out.append(f"- shoal results: {', '.join(shoal_files) or 'none'}")
    out.append(f"- peer results: {', '.join(peer_files) or 'none'}"
               + ("" if peers else " (no peer columns)"))
    out += [
        "- cells: median over verified samples (min–max), n = verified samples; **FAILED** "
        "counts the others. Wire = bytes on the wire in the window and until quiet: shoal "
        "hub = the hub's bytes in + out less one metrics read, peer = both agents' served "
        "bytes; Syncthing = BEP bytes on A's connection; rsync = `--stats` sent + received; "
        "Unison runs local to local (no wire).",
        "- RSS: shoal agents A/B and the hub = VmHWM at the end of the sample; shoal mirror = "
        "GNU time %M of the one process; W5 rows: %M of B's `shoal sync`; Syncthing A/B = "
        "VmHWM; rsync client/daemon and Unison client = GNU time %M.",
        "- W5 rows: the p2p and hub columns show the same measurement, one `shoal sync` of B "
        "with the agents stopped (mode `cli`).",
        "",
    ]
    cols = ["shoal p2p", "shoal hub", "shoal mirror"] + [PEER_NAME[t] for t in PEERS]
    out.append("| workload | " + " | ".join(cols) + " |")
    out.append("|---" * (len(cols) + 1) + "|")
    S = {}
    P = {}
    for label, wl, pwl in ROWS:
        for m in ("p2p", "hub", "mirror"):
            S[(m, wl)] = shoal_stat(shoal_rows, m, wl)
        for t in PEERS:
            P[(t, wl)] = peer_stat(peers, t, pwl)
        if all(S[(m, wl)] is None for m in ("p2p", "hub", "mirror")) and \
                all(P[(t, wl)] is None for t in PEERS):
            continue
        cells = [shoal_cell(S[(m, wl)], m, wl) for m in ("p2p", "hub", "mirror")]
        cells += [peer_cell(P[(t, wl)], t) for t in PEERS]
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    def t(st):
        return st.t if st is not None and st.n else None

    # ratios
    out += ["", "Time ratios (shoal median / peer median; below 1 means shoal is faster):", "",
            "| workload | p2p / Syncthing | p2p / rsync | hub / Syncthing | hub / rsync "
            "| mirror / Unison |", "|---|---|---|---|---|---|"]
    for label, wl, pwl in ROWS:
        if pwl is None:
            continue
        rs = [ratio(t(S[("p2p", wl)]), t(P[("syncthing", wl)])),
              ratio(t(S[("p2p", wl)]), t(P[("rsync", wl)])),
              ratio(t(S[("hub", wl)]), t(P[("syncthing", wl)])),
              ratio(t(S[("hub", wl)]), t(P[("rsync", wl)])),
              ratio(t(S[("mirror", wl)]), t(P[("unison", wl)]))]
        if any(r is not None for r in rs):
            out.append(f"| {label} | " + " | ".join(fratio(r) for r in rs) + " |")
    def memory(wl, m):
        """Peak RSS per device: shoal in mode m, and Syncthing, on workload wl."""
        st, s = P[("syncthing", wl)], S[(m, wl)]
        return (s.median_of(dev_rss) if s and s.n else None,
                st.median_of(peer_dev_rss) if st and st.n else None)

    mem_rows = []
    for wl in ("W1", "W1L", "W2"):
        for m in ("p2p", "hub"):
            sv, sy = memory(wl, m)
            if sv is not None or sy is not None:
                mem_rows.append(f"| {wl} {m} | {fmib(sv)} | {fmib(sy)} | {fratio(ratio(sv, sy))} |")
        mi, un = S[("mirror", wl)], P[("unison", wl)]
        mv = mi.median_of(lambda r: (r.get("rss_kib") or {}).get("a")) if mi and mi.n else None
        uv = un.median_of(peer_dev_rss) if un and un.n else None
        if mv is not None or uv is not None:
            mem_rows.append(f"| {wl} mirror vs Unison | {fmib(mv)} | {fmib(uv)} | "
                            f"{fratio(ratio(mv, uv))} |")
    if mem_rows:
        out += ["", "Peak RSS per device (shoal: the larger of agent A and B; Syncthing: the "
                "larger of A and B):", "", "| workload | shoal | peer | shoal / peer |",
                "|---|---|---|---|"] + mem_rows

    # targets
    T = Targets()

    def cmp_peer(name, wl, mode, tool, factor, what):
        s, p = t(S[(mode, wl)]), t(P[(tool, wl)])
        if s is None or p is None:
            T.judge(name, None, f"{mode} {fsec(s)}, {PEER_NAME[tool]} {fsec(p)}")
            return
        T.judge(name, s <= factor * p,
                f"{mode} {fsec(s)} vs {what} {fsec(factor * p)} ({PEER_NAME[tool]} {fsec(p)}; "
                f"ratio {s / p:.2f}×)")

    for wl in ("W1", "W1L"):
        cmp_peer(f"{wl}: p2p ≤ rsync", wl, "p2p", "rsync", 1.0, "rsync")
        cmp_peer(f"{wl}: p2p ≤ 1/5 Syncthing", wl, "p2p", "syncthing", 0.2, "1/5 Syncthing")
        cmp_peer(f"{wl}: hub ≤ 1/3 Syncthing", wl, "hub", "syncthing", 1 / 3, "1/3 Syncthing")
    cmp_peer("W2: p2p ≤ rsync", "W2", "p2p", "rsync", 1.0, "rsync")
    cmp_peer("W2: hub ≤ 2× rsync", "W2", "hub", "rsync", 2.0, "2× rsync")
    for wl in ("W3", "W3L"):
        for m in ("p2p", "hub"):
            s = t(S[(m, wl)])
            T.judge(f"{wl} ({m}, agents watching): visible on the other device < 1 s",
                    None if s is None else s < 1.0, fsec(s))
    s = t(S[("p2p", "W5L")])
    T.judge("a full rescan of 50,000 unchanged files < 0.3 s (the W5 50k round)",
            None if s is None else s < 0.3, f"{fsec(s)} (`shoal sync` of B, agents stopped)")
    for m in ("p2p", "hub"):
        st = S[(m, "W4")]
        if st is None or not st.n:
            T.judge(f"W4 ({m}): ≤ 1.5 MiB on the wire", None, "no verified sample")
            T.judge(f"W4 ({m}): faster than rsync", None, "no verified sample")
            continue
        leg, total = st.median_of(shoal_leg), st.median_of(shoal_wire)
        T.judge(f"W4 ({m}): ≤ 1.5 MiB on the wire", None if leg is None else leg <= 1.5 * MIB,
                f"busiest link {fbytes(leg)} (larger of hub in, hub out, peer); all links "
                f"{fbytes(total)}")
        cmp_peer(f"W4 ({m}): faster than rsync", "W4", m, "rsync", 1.0, "rsync")
    for wl, limit, label in (("W5", 0.1, "10k"), ("W5L", 0.3, "50k")):
        st = S[("p2p", wl)]
        ok = st is not None and st.n
        hb = st.median_of(lambda r: r.get("hub_bytes")) if ok else None
        T.judge(f"W5 {label}: < 1 KiB on the wire", None if hb is None else hb < KIB,
                fbytes(hb))
        T.judge(f"W5 {label}: round incl. rescan < {limit} s", None if not ok else st.t < limit,
                fsec(st.t if ok else None))
    for wl, label in (("W6dir", "folder of 10,000 files"), ("W6file", "512 MiB file")):
        for m in ("p2p", "hub"):
            st = S[(m, wl)]
            ok = st is not None and st.n
            w = st.median_of(shoal_wire) if ok else None
            T.judge(f"W6 {label} ({m}): no content on the wire (< 100 KiB)",
                    None if w is None else w < 100 * KIB, fbytes(w))
            T.judge(f"W6 {label} ({m}): visible on the other side < 1 s",
                    None if not ok else st.t < 1.0, fsec(st.t if ok else None))
    for wl in ("W1", "W1L", "W2"):
        for m in ("p2p", "hub"):
            sv, sy = memory(wl, m)
            T.judge(f"memory {wl} ({m}): peak RSS per device ≤ ½ Syncthing's",
                    None if sv is None or sy is None else sv <= 0.5 * sy,
                    f"shoal {fmib(sv)} vs ½ Syncthing = {fmib(sy / 2 if sy else None)} "
                    f"(Syncthing {fmib(sy)})")
    out += ["", "Targets (issue #6), judged against the peers' medians of this run; mirror is "
            "compared with Unison as a ratio only (above):", ""] + T.lines

    # failures and contention
    notes = []
    for r in shoal_rows:
        if not r.get("ok"):
            notes.append(f"shoal {r.get('mode')} {r.get('workload')} rep {r.get('rep')} "
                         f"FAILED: {(r.get('error') or '')[:400]}")
    for r in shoal_rows:
        d = r.get("detail") or {}
        if r.get("mode") in ("p2p", "hub") and r.get("workload") not in NOOP and \
                (d.get("quiet_before") is False):
            notes.append(f"shoal {r['mode']} {r['workload']} rep {r['rep']}: agents were not "
                         "quiet before the window")
    for r in shoal_rows:
        o, w = r.get("other_cpu_s"), r.get("seconds")
        if o is not None and w and o > 0.25 * w + 0.05:
            notes.append(f"shoal {r['mode']} {r['workload']} rep {r['rep']}: contended "
                         f"(other processes used {o:.2f} CPU-s in a {w:.2f} s window)")
    used_variants = {(t, wl): PEER_VARIANT[t].get(wl, PEER_VARIANT[t]["*"])
                     for t in PEERS for _, _, wl in ROWS if wl}
    for tool, rows in peers.items():
        for r in rows:
            if used_variants.get((tool, r.get("workload"))) != r.get("variant"):
                continue
            tag = f"{tool} {r.get('workload')}/{r.get('variant')} rep {r.get('rep')}"
            if not r.get("verified"):
                notes.append(f"{tag} FAILED: {(r.get('note') or '')[:300]}")
            e = r.get("extra") or {}
            o, w = e.get("other_cpu_s"), e.get("window_s")
            if o is not None and w and o > 0.25 * w + 0.05:
                notes.append(f"{tag}: contended (other processes used {o:.2f} CPU-s in a "
                             f"{w:.2f} s window)")
    out += ["", "Notes:", ""] + ([f"- {n}" for n in notes] or ["- no failed or contended samples"])
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shoal", action="append", default=[],
                    help="shoal-bench results (.jsonl, or a dir: its shoal-*.jsonl); repeatable")
    ap.add_argument("--peers", action="append", default=[],
                    help="peer results (results-*.jsonl, or a dir of them); repeatable; per "
                         "tool the newest file holding its rows is used")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--repo", default=str(HERE.parent), help="the repository (for its HEAD)")
    a = ap.parse_args()
    shoal_rows, shoal_files, shoal_meta = load_shoal(a.shoal)
    peers, peer_files, peer_meta = load_peers(a.peers)
    if not shoal_rows and not peers:
        ap.error("no results: pass --shoal and/or --peers")
    md = render(shoal_rows, shoal_files, shoal_meta, peers, peer_files, peer_meta, Path(a.repo))
    print(md)
    if a.out:
        Path(a.out).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
