"""Measuring helpers shared by the benchmarks: each measured step runs as its own child process, so its
peak RSS and I/O belong to that step alone, and wall time includes interpreter start.

Peak RSS is the larger of two views: wait4's ru_maxrss (the largest single process, exact but blind to
processes running side by side; it starts from the *parent's* peak, as exec records the old address
space's high-water mark, so a driver must stay small: no heavy work in the measuring process) and the
largest sum of RSS over the whole process tree seen by polling /proc every 50 ms (catches a tree, misses
spikes shorter than a poll). I/O counters come from
/proc/<pid>/io of the finished child read before it is reaped: the kernel folds every reaped
descendant's counters into its parent's, so that one reading covers the whole tree (summing the last
per-pid readings would count a reaped child twice); processes that left the tree unreaped (daemons)
are added from their last poll.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
IO_FIELDS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")


@dataclass
class Measure:
    name: str
    seconds: float
    peak_rss_mb: float
    bytes: int  # the bytes the GB/s figure is about (the step's output)
    maxrss_mb: float = 0.0  # wait4's ru_maxrss alone
    tree_rss_mb: float = 0.0  # the polled whole-tree sum alone
    io: dict[str, int] = field(default_factory=dict)  # IO_FIELDS of the whole tree
    runs: list[float] = field(default_factory=list)  # every run's seconds

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class Step:
    """One measured command; ``before``/``after`` run outside the timing (``after`` gets the run's index
    and may return the step's output bytes, e.g. measured from the files it wrote)."""

    name: str
    argv: list[str]
    nbytes: int = 0
    cwd: Path | None = None
    env: dict[str, str] | None = None
    before: Callable[[], None] | None = None
    after: Callable[[int], int | None] | None = None


# ------------------------------------------------------------------------------------------ /proc


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process (the kernel here has no /proc/<pid>/task/*/children)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        out[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _io(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    pairs = (line.split(":") for line in text.splitlines() if ":" in line)
    return {k: int(v) for k, v in pairs if k in IO_FIELDS}


def run(
    name: str,
    argv: Sequence[str],
    nbytes: int,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    poll: float = 0.05,
) -> Measure:
    """Run ``argv`` as a child; wall time, peak RSS of its process tree, and the tree's I/O."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, cwd=cwd)
    peak_tree, last_io = 0, {}
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        pids = _tree(proc.pid)
        peak_tree = max(peak_tree, sum(_rss(p) for p in pids))
        for p in pids:
            io = _io(p)
            if io is not None:
                last_io[p] = io
        time.sleep(poll)
    seconds = time.perf_counter() - start
    ppids = _ppids()
    # the zombie's counters include every descendant its tree reaped; add the ones that escaped
    io = _io(proc.pid) or last_io.get(proc.pid, {})
    escaped = [p for p in last_io if p != proc.pid and p in ppids and ppids[p] not in last_io]
    total = {k: io.get(k, 0) + sum(last_io[p].get(k, 0) for p in escaped) for k in IO_FIELDS}
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{name}: {list(argv)} exited {proc.returncode}")
    maxrss, tree = usage.ru_maxrss / 1024, peak_tree / 2**20
    return Measure(name, seconds, max(maxrss, tree), nbytes, maxrss, tree, total, [seconds])


# ------------------------------------------------------------------------------------------ repeats


def median_runs(
    steps: Sequence[Step | tuple[str, list[str], int]], repeat: int, before: object = None
) -> list[Measure]:
    """Run every step ``repeat`` times, interleaved (a, b, c, a, b, c, ...) so drift in the machine's
    speed hits all steps alike; report each step's median run (its time and I/O) and its largest peak
    RSS. ``before`` (e.g. drop_caches) runs before every run, after the step's own ``before``."""
    plan = [s if isinstance(s, Step) else Step(*s) for s in steps]
    runs: dict[str, list[Measure]] = {s.name: [] for s in plan}
    for rep in range(repeat):
        for s in plan:
            if s.before:
                s.before()
            if callable(before):
                before()
            m = run(s.name, s.argv, s.nbytes, s.env, s.cwd)
            if s.after:
                got = s.after(rep)
                if got is not None:
                    s.nbytes = got
            runs[s.name].append(m)
    out = []
    for s in plan:
        ms = runs[s.name]
        mid = sorted(ms, key=lambda m: m.seconds)[len(ms) // 2]
        out.append(
            Measure(
                s.name,
                mid.seconds,
                max(m.peak_rss_mb for m in ms),
                s.nbytes,
                max(m.maxrss_mb for m in ms),
                max(m.tree_rss_mb for m in ms),
                mid.io,
                [m.seconds for m in ms],
            )
        )
    return out


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def drop_caches() -> bool:
    """Drop the page cache when allowed (root, not in a read-only /proc); True if it happened."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ reporting


def table(rows: list[Measure], ref: dict[str, str | list[str]], io: bool = False) -> str:
    """A markdown table; ``ref`` maps a row to the row(s) its time is compared with. With ``io``, the
    tree's disk and syscall I/O (MB) too."""
    by = {m.name: m for m in rows}
    head = "| step | seconds | GB/s | peak RSS MB |"
    rule = "| --- | ---: | ---: | ---: |"
    if io:
        head += " disk read MB | disk write MB | rchar MB | wchar MB |"
        rule += " ---: | ---: | ---: | ---: |"
    out = [head + " vs |", rule + " --- |"]
    for m in rows:
        others = ref.get(m.name, [])
        cmp = ", ".join(
            f"{m.seconds / by[r].seconds:.2f}x {r}" for r in ([others] if isinstance(others, str) else others)
        )
        line = f"| {m.name} | {m.seconds:.2f} | {m.gbps:.2f} | {m.peak_rss_mb:.0f} |"
        if io:
            line += "".join(
                f" {m.io.get(k, 0) / 1e6:.0f} |" for k in ("read_bytes", "write_bytes", "rchar", "wchar")
            )
        out.append(f"{line} {cmp} |")
    return "\n".join(out)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)) + "\n")


def fs_type(path: Path) -> str:
    """Filesystem type of ``path`` (tmpfs vs a disk changes what the numbers mean)."""
    path = path.resolve()
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, fstype, *_ = line.split()
        if str(path).startswith(mnt) and len(mnt) > len(best[0]):
            best = (mnt, fstype)
    return best[1]
