"""Measuring helpers shared by the benchmarks: each measured step runs as its own child process, so its
peak RSS (ru_maxrss from wait4) belongs to that step alone, and wall time includes interpreter start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Measure:
    name: str
    seconds: float
    peak_rss_mb: float
    bytes: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def run(name: str, argv: list[str], nbytes: int, env: dict[str, str] | None = None) -> Measure:
    """Run ``argv`` as a child; wall time and peak RSS of the child and its descendants' maximum."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{name}: {argv} exited {proc.returncode}")
    return Measure(name, seconds, usage.ru_maxrss / 1024, nbytes)


def median_runs(steps: list[tuple[str, list[str], int]], repeat: int, before: object = None) -> list[Measure]:
    """Run every step ``repeat`` times, interleaved (a, b, c, a, b, c, ...) so drift in the machine's
    speed hits all steps alike; report each step's median time and its largest peak RSS."""
    runs: dict[str, list[Measure]] = {name: [] for name, _, _ in steps}
    for _ in range(repeat):
        for name, argv, nbytes in steps:
            if callable(before):
                before()
            runs[name].append(run(name, argv, nbytes))
    out = []
    for name, ms in runs.items():
        times = sorted(m.seconds for m in ms)
        out.append(Measure(name, times[len(times) // 2], max(m.peak_rss_mb for m in ms), ms[0].bytes))
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


def table(rows: list[Measure], ref: dict[str, str]) -> str:
    """A markdown table; ``ref`` maps a row to the row its time is compared with."""
    by = {m.name: m for m in rows}
    out = ["| step | seconds | GB/s | peak RSS MB | vs |", "| --- | ---: | ---: | ---: | --- |"]
    for m in rows:
        cmp = ""
        if m.name in ref:
            r = by[ref[m.name]]
            cmp = f"{m.seconds / r.seconds:.2f}x {r.name}"
        out.append(f"| {m.name} | {m.seconds:.2f} | {m.gbps:.2f} | {m.peak_rss_mb:.0f} | {cmp} |")
    return "\n".join(out)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)) + "\n")
