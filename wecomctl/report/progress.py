"""Progress of a run, drawn by the parent from the store's counters.

On a terminal: a rich live view, one bar per stage, per campaign when the run works on
more than one. Otherwise (cron, a file, a pipe): no control codes, one plain line every
`interval` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

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


def _left(row: dict[str, int]) -> int:
    return row["ready"] + row["delayed"] + row["leased"]


class Campaigns:
    """Which campaigns a run's progress shows: those with work left when it started or
    that moved since (a store keeps finished campaigns; they are not this run's news).
    groups() is [(campaign, its rows per stage)], or [("", its rows)] for a single one."""

    def __init__(self):
        self.first: dict[str, int] = {}  # finished items per campaign at the first sight
        self.shown: list[str] = []

    def groups(self, counts: dict) -> list[tuple[str, dict[str, dict[str, int]]]]:
        for camp, c in counts.items():
            done = sum(finished(row) for row in c["stages"].values())
            left = sum(_left(row) for row in c["stages"].values())
            self.first.setdefault(camp, -1 if left else done)
            if camp not in self.shown and (left or done != self.first[camp]):
                self.shown.append(camp)
        if not self.shown:
            return [("", totals(counts))]
        if len(self.shown) == 1:
            return [("", totals({self.shown[0]: counts[self.shown[0]]}))]
        return [(camp, totals({camp: counts[camp]})) for camp in self.shown if camp in counts]


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


WELCOME_APIS = {"msg_template": "add_msg_template", "gateway": "send_text", "welcome_code": "send_welcome_msg"}


def stage_limits(settings) -> dict[str, float]:
    """Calls/s each stage may make under the configured limits (its tightest window)."""
    if settings is None:
        return {}

    def per_second(api: str) -> float:
        limit = settings.limits.get(api)
        windows = limit.windows() if limit else []
        return min((count / seconds for count, seconds in windows), default=0.0)

    return {"add": per_second("add_by_phone"),
            "welcome": per_second(WELCOME_APIS.get(settings.welcome.provider, "add_msg_template")),
            "writeback": per_second("writeback")}


class Outlook:
    """What the parent adds to the counters: the rate limit of each stage, fleet pauses
    (read from the shared limiter at most once a second) and the time left."""

    def __init__(self, settings=None):
        self.settings = settings
        self.limits = stage_limits(settings)
        self._pauses: dict[str, float] = {}
        self._read_at = 0.0

    def pauses(self) -> dict[str, float]:
        if self.settings is None:
            return {}
        now = time.time()
        if now - self._read_at >= 1.0:
            self._read_at = now
            try:
                from wecomctl.report.health import throttles

                self._pauses = throttles(self.settings, now)[0]
            except Exception:  # noqa: BLE001 - a progress line must never stop a run
                self._pauses = {}
        return self._pauses

    @staticmethod
    def eta(row: dict[str, int], rate: float) -> str:
        left = _left(row)
        if not left:
            return "-"
        if rate <= 0:
            return "?"
        s = int(left / rate)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def line(stage: str, row: dict[str, int], rate: float, limit: float = 0.0, eta: str = "") -> str:
    of = f" (limit {limit:g}/s)" if limit else ""  # of the API, shared by every campaign
    return (f"{stage}: {finished(row)}/{row['entered']} done={row['done']} dead={row['dead']} "
            f"skipped={row['skipped']} retrying={row['delayed']} in_flight={row['leased']} "
            f"queued={row['ready']} rate={rate:.1f}/s{of}{f' eta={eta}' if eta else ''}")


def shown(stages, rows) -> list[str]:
    return [s for s in stages if s != "writeback" or rows[s]["entered"]]


class PlainProgress:
    def __init__(self, out: TextIO = sys.stdout, interval: float = 10.0, settings=None):
        self.outlook = Outlook(settings)
        self.out = out
        self.interval = interval
        self.last = 0.0
        self.meters: dict[tuple[str, str], RateMeter] = {}
        self.campaigns = Campaigns()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def tick(self, counts: dict, elapsed: float, final: bool = False) -> None:
        groups = self.campaigns.groups(counts)
        rates = {(c, s): self.meters.setdefault((c, s), RateMeter()).add(elapsed, finished(rows[s]))
                 for c, rows in groups for s in STAGES}
        if not final and elapsed - self.last < self.interval:
            return
        self.last = elapsed
        stamp = time.strftime("%H:%M:%S")
        o = self.outlook
        parts = " | ".join(line(f"{c} {s}" if c else s, rows[s], rates[c, s], o.limits.get(s, 0.0),
                                o.eta(rows[s], rates[c, s]))
                           for c, rows in groups for s in shown(STAGES, rows))
        paused = "".join(f" | PAUSED {api} {left:.0f}s (45009)" for api, left in o.pauses().items())
        print(f"[{stamp}] progress {elapsed:.0f}s {parts}{paused}", file=self.out, flush=True)


class LiveProgress:
    def __init__(self, console: Console, settings=None):
        self.outlook = Outlook(settings)
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<9}"), BarColumn(bar_width=12), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), console=console,
            refresh_per_second=4,
        )
        self.tasks: dict[tuple[str, str], int] = {}
        self.meters: dict[tuple[str, str], RateMeter] = {}
        self.campaigns = Campaigns()

    def __enter__(self):
        self.progress.__enter__()
        self.pause_task = self.progress.add_task("", total=None, stage="", detail="", visible=False)
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def tick(self, counts: dict, elapsed: float, final: bool = False) -> None:
        groups = self.campaigns.groups(counts)
        wanted = [(c, s) for c, _ in groups for s in STAGES]
        for key in [k for k in self.tasks if k not in wanted]:  # totals, once a second campaign shows up
            self.progress.remove_task(self.tasks.pop(key))
        if any(k not in self.tasks for k in wanted):
            self.progress.remove_task(self.pause_task)  # the pause line stays last
            for c, s in wanted:
                if (c, s) not in self.tasks:
                    label = f"{c[:14]} {s}" if c else s
                    self.tasks[c, s] = self.progress.add_task(label, total=None, stage=escape(label), detail="")
            self.pause_task = self.progress.add_task("", total=None, stage="", detail="", visible=False)
        for c, rows in groups:
            for s in STAGES:
                self._row(c, s, rows[s], elapsed)
        pauses = self.outlook.pauses()
        text = "  ".join(f"[bold red]PAUSED[/] {api} {left:.0f}s more (WeCom 45009; every worker waits)"
                         for api, left in pauses.items())
        self.progress.update(self.pause_task, detail=text, visible=bool(pauses))

    def _row(self, c: str, s: str, row: dict[str, int], elapsed: float) -> None:
        o = self.outlook
        rate = self.meters.setdefault((c, s), RateMeter()).add(elapsed, finished(row))
        limit = o.limits.get(s, 0.0)  # of the API, shared by every campaign
        # Short labels: the line must fit an 80-column terminal beside the bar.
        skipped = f"skip {row['skipped']} " if row["skipped"] else ""
        of = f"/{limit:g}" if limit else ""
        detail = (f"[green]ok {row['done']}[/] [red]dead {row['dead']}[/] {skipped}"
                  f"[yellow]retry {row['delayed']}[/] calls {row['leased']} {rate:.0f}{of}/s ETA {o.eta(row, rate)}")
        self.progress.update(self.tasks[c, s], total=max(row["entered"], 1), completed=finished(row),
                             detail=detail, visible=s != "writeback" or row["entered"] > 0)


def make_progress(console: Console, interval: float, settings=None):
    if console.is_terminal:
        return LiveProgress(console, settings)
    return PlainProgress(console.file, interval, settings)
