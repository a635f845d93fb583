"""Progress of a run, drawn by the parent from the store's counters.

On a terminal: a rich live view, one bar per stage. Otherwise (cron, a file, a pipe): no
control codes, one plain line every `interval` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wecomctl.store.base import STAGES


def totals(counts: dict) -> dict[str, dict[str, int]]:
    """Sum the per-campaign counters into one row per stage."""
    out = {stage: {"ready": 0, "delayed": 0, "leased": 0, "done": 0, "dead": 0, "skipped": 0, "entered": 0}
           for stage in STAGES}
    for camp in counts.values():
        for stage, row in camp["stages"].items():
            for k, v in row.items():
                out[stage][k] += v
    return out


def finished(row: dict[str, int]) -> int:
    return row["done"] + row["dead"] + row["skipped"]


class RateMeter:
    """Outcomes per second over the last ~10 s."""

    def __init__(self, span: float = 10.0):
        self.span = span
        self.points: list[tuple[float, int]] = []

    def add(self, t: float, n: int) -> float:
        self.points.append((t, n))
        while len(self.points) > 2 and t - self.points[0][0] > self.span:
            self.points.pop(0)
        t0, n0 = self.points[0]
        return (n - n0) / (t - t0) if t > t0 else 0.0


def line(stage: str, row: dict[str, int], rate: float) -> str:
    return (f"{stage}: {finished(row)}/{row['entered']} done={row['done']} dead={row['dead']} "
            f"skipped={row['skipped']} retrying={row['delayed']} in_flight={row['leased']} "
            f"queued={row['ready']} rate={rate:.1f}/s")


class PlainProgress:
    def __init__(self, out: TextIO = sys.stdout, interval: float = 10.0):
        self.out = out
        self.interval = interval
        self.last = 0.0
        self.meters = {s: RateMeter() for s in STAGES}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def tick(self, counts: dict, elapsed: float, final: bool = False) -> None:
        rows = totals(counts)
        rates = {s: self.meters[s].add(elapsed, finished(rows[s])) for s in STAGES}
        if not final and elapsed - self.last < self.interval:
            return
        self.last = elapsed
        stamp = time.strftime("%H:%M:%S")
        parts = " | ".join(line(s, rows[s], rates[s]) for s in STAGES if s != "writeback" or rows[s]["entered"])
        print(f"[{stamp}] progress {elapsed:.0f}s {parts}", file=self.out, flush=True)


class LiveProgress:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<8}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
            refresh_per_second=4,
        )
        self.tasks = {}
        self.meters = {s: RateMeter() for s in STAGES}

    def __enter__(self):
        self.progress.__enter__()
        for s in STAGES:
            self.tasks[s] = self.progress.add_task(s, total=None, stage=s, detail="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def tick(self, counts: dict, elapsed: float, final: bool = False) -> None:
        rows = totals(counts)
        for s in STAGES:
            row = rows[s]
            rate = self.meters[s].add(elapsed, finished(row))
            detail = (f"[green]done {row['done']}[/] [red]dead {row['dead']}[/] skipped {row['skipped']} "
                      f"[yellow]retrying {row['delayed']}[/] in flight {row['leased']}  {rate:.1f}/s")
            self.progress.update(self.tasks[s], total=max(row["entered"], 1), completed=finished(row), detail=detail)


def make_progress(console: Console, interval: float):
    if console.is_terminal:
        return LiveProgress(console)
    return PlainProgress(console.file, interval)
