"""The parent of a run: starts worker processes, shows progress, handles signals.

Progress reaches the parent through the store's counters, never by sharing objects with
the workers. First SIGINT/SIGTERM: workers are told to stop (finish the call in hand,
record it, exit). Second: workers are killed at once; the next run reclaims their leases
and delivers the items again.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from wecomctl.config import Settings
from wecomctl.errors import EXIT_DEAD, EXIT_FATAL, EXIT_OK, ApiError, NetworkError, WecomctlError
from wecomctl.faults import crash_point
from wecomctl.pipeline.patience import Patient
from wecomctl.pipeline.worker import build_context, open_store, worker_main
from wecomctl.report.notify import check_and_notify

POLL_S = 0.25
ALERT_EVERY_S = 15.0
# A running run says so this often (store copy refuses a store a run is working on, even
# when every item it holds is waiting to retry and none is leased).
HEARTBEAT_EVERY_S = 2.0
HEARTBEAT_FRESH_S = 10.0
MAX_RESTARTS = 10  # per worker slot and run: a worker that keeps dying is a bug to look at


@dataclass
class RunResult:
    exit_code: int
    elapsed: float
    counts: dict
    fatal: dict | None = None
    interrupted: int | None = None  # the signal number, if stopped by one
    worker_errors: list[str] = field(default_factory=list)
    this_run: dict = field(default_factory=dict)  # added, welcomed, dead by this run
    forced: bool = False  # a second signal killed the workers


class Unreachable(WecomctlError):
    exit_code = EXIT_FATAL


def preflight(ctx) -> None:
    """Fetch the shared token (checks URL, corp ID and secret) and reach the gateway.

    A network outage here stops the run with items still queued, instead of burning
    every item's attempts and dead-lettering the whole campaign.
    """
    try:
        for provider in ctx.welcome.values():
            client = getattr(provider, "client", None)
            if client is not None:
                client.tokens.get()
                break
        ctx.add.gateway.check_reachable()
    except NetworkError as exc:
        raise Unreachable(f"cannot reach {exc.api}: {exc.errmsg}; check the base_url in the config and the network. Nothing was changed.") from None
    except ApiError as exc:
        if exc.kind == "fatal":
            raise Unreachable(f"{exc}. Nothing was changed; fix the config or the app's permissions and run again.") from None
        raise Unreachable(f"the first call failed: {exc}") from None


def run(settings: Settings, workers: int, until_empty: bool = True,
        on_tick: Callable[[dict, float], None] | None = None, log_spec: dict | None = None) -> RunResult:
    stopping = threading.Event()  # set by a signal: stop waiting for an unreachable store
    notice = None
    if log_spec and log_spec.get("file"):
        # Logs go to a file: the person at the terminal must still see why progress stopped.
        def notice(text: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
    store = Patient(open_store(settings, create=False), stopping, "the store", notice)
    # Build the clients once here so a missing secret or URL, a bad secret or an API that
    # cannot be reached fails before any process starts and before any item is touched.
    try:
        preflight(build_context(settings, store, threading.Event()))
    except Unreachable as exc:
        # Told like a fatal stop mid-run: a cron job with a wrong secret must not fail
        # quietly every ten minutes.
        store.set_flag("fatal", {"api": "preflight", "errcode": None, "error": str(exc), "todo": "", "at": time.time()})
        check_and_notify(store, settings)
        store.close()
        raise
    store.set_flag("fatal", None)  # a new run: the operator has fixed what stopped the last one
    # Leases of workers that no longer exist (a run that was killed) go back at once.
    store.reclaim(time.time())
    ctx = mp.get_context("spawn")
    # This run's own outcomes, counted by its workers (another run on the same data dir
    # moves the store's totals too).
    tally = ctx.Array("q", 3)

    def spawn(i: int):
        p = ctx.Process(target=worker_main, args=(settings, until_empty, log_spec, os.getpid(), tally),
                        name=f"wecomctl-worker-{i}")
        p.start()
        return p

    procs: list = []
    signals: list[int] = []
    restarts: list[str] = []

    def on_signal(signum, _frame):
        signals.append(signum)
        stopping.set()
        for p in procs:
            if p.pid is None or not p.is_alive():
                continue
            try:
                os.kill(p.pid, signal.SIGKILL if len(signals) > 1 else signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.time()
    alerted = beat = 0.0
    try:
        procs.extend(spawn(i) for i in range(workers))
        while any(p.is_alive() for p in procs):
            if on_tick:
                on_tick(store.counts(), time.time() - start)
            if time.time() - beat >= HEARTBEAT_EVERY_S:
                beat = time.time()
                store.set_flag("heartbeat", {"at": beat, "by": f"{socket.gethostname()}-{os.getpid()}"})
            if time.time() - alerted >= ALERT_EVERY_S:
                alerted = time.time()
                check_and_notify(store, settings)
            if tally[0]:
                crash_point("run.parent", settings.data_dir)  # fault injection (tests only)
            for p in procs:
                p.join(timeout=POLL_S / max(1, len(procs)))
            if len(signals) > 1:
                break
            if not signals and not store.get_flag("fatal"):
                # A worker killed from outside (OOM killer, kill -9) is replaced and its
                # leases are reclaimed at once.
                for i, p in enumerate(procs):
                    if p.exitcode is not None and p.exitcode < 0 and len(restarts) < MAX_RESTARTS * workers:
                        restarts.append(f"{p.name} was killed by signal {-p.exitcode}; restarted")
                        store.reclaim(time.time(), {p.pid})  # its items go back now, not at lease expiry
                        procs[i] = spawn(i)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    counts = store.counts()
    if on_tick:
        on_tick(counts, time.time() - start)
    fatal = store.get_flag("fatal")
    check_and_notify(store, settings)  # a fatal stop is told at once
    store.close()
    errors = [f"{p.name} exited with code {p.exitcode}" for p in procs
              if p.exitcode not in (0, EXIT_FATAL, None, -signal.SIGTERM, -signal.SIGKILL)]

    this_run = dict(zip(("added", "welcomed", "dead"), tally[:]))
    left = sum(st[k] for c in counts.values() for st in c["stages"].values() for k in ("ready", "delayed", "leased"))
    if until_empty and left and not signals and not fatal:
        errors.append(f"the workers stopped with {left} items still queued (see the errors above); run again to continue")
    if signals:
        code = 128 + signals[0]
    elif fatal:
        code = EXIT_FATAL
    elif this_run["dead"] > 0 or errors:
        # Only this run's dead letters: old ones must not fail every later cron run.
        code = EXIT_DEAD
    else:
        code = EXIT_OK
    return RunResult(code, time.time() - start, counts, fatal, signals[0] if signals else None,
                     restarts + errors, this_run, forced=len(signals) > 1)


