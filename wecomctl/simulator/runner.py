"""Starting the simulator in the background: in a thread (tests) or a spawned process (demo, bench)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from typing import Any, Callable

import httpx

from wecomctl.simulator.config import SimConfig
from wecomctl.simulator.server import run_until, serve

READY_TIMEOUT_S = 30.0


class SimHandle:
    """A running simulator: `.url`, `.port`, `.stats()`, `.stop()`; a context manager."""

    def __init__(self, url: str, stopper: Callable[[], None], pid: int | None = None):
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.pid = pid  # of the child process, for start_process
        self._stopper = stopper
        self._stopped = False

    def _get(self, path: str, **params: Any) -> Any:
        # trust_env=False: a proxy from the environment must never see loopback calls.
        r = httpx.get(self.url + path, params=params or None, timeout=30, trust_env=False)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict:
        return self._get("/_sim/stats")

    def calls(self, api: str | None = None) -> dict:
        """GET /_sim/calls: arrival times (monotonic s) and errcodes of recent calls."""
        return self._get("/_sim/calls", **({"api": api} if api else {}))

    def reset(self) -> None:
        httpx.post(self.url + "/_sim/reset", timeout=30, trust_env=False).raise_for_status()

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._stopper()

    def __enter__(self) -> "SimHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimHandle({self.url!r})"


def start_in_thread(cfg: SimConfig | None = None) -> SimHandle:
    """Serve on a daemon thread with its own event loop; returns once the port is bound."""
    cfg = cfg or SimConfig()
    cfg.validate()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()

        def on_ready(url: str) -> None:
            box["url"] = url
            ready.set()

        await run_until(cfg, box["stop"], on_ready)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the caller if it happens before ready
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="wecom-simulator", daemon=True)
    thread.start()
    if not ready.wait(READY_TIMEOUT_S):
        raise RuntimeError("simulator thread did not bind its port in time")
    if "error" in box:
        raise box["error"]  # e.g. OSError: address already in use

    def stopper() -> None:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)

    return SimHandle(box["url"], stopper)


def _child(cfg: SimConfig, conn: Any) -> None:
    """Entry point of the spawned process: serve, and send the URL (or the failure) back."""
    try:
        serve(cfg, on_ready=lambda url: conn.send(("ok", url)))
    except BaseException as exc:
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        raise SystemExit(1)


def start_process(cfg: SimConfig | None = None) -> SimHandle:
    """Serve from a 'spawn' child process, so the simulator never shares the caller's GIL."""
    cfg = cfg or SimConfig()
    cfg.validate()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cfg, child), name="wecom-simulator", daemon=True)
    proc.start()
    child.close()

    def stopper() -> None:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: serve() shuts down cleanly
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()

    try:
        if not parent.poll(READY_TIMEOUT_S):
            raise RuntimeError("simulator process did not report its port in time")
        kind, value = parent.recv()
    except EOFError:
        stopper()
        raise RuntimeError(f"simulator process exited early (exit code {proc.exitcode})") from None
    except BaseException:
        stopper()
        raise
    if kind != "ok":
        stopper()
        raise RuntimeError(f"simulator process failed: {value}")
    return SimHandle(value, stopper, pid=proc.pid)
