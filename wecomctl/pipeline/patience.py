"""Riding out a store or shared state that is down for a while (Redis restarting).

`Patient(target)` forwards every method call; when one raises `Unavailable` it waits with
backoff and calls again, until it works or the run is stopping. So a worker holding an
item does not lose the outcome of a call it made: the recording waits for Redis to come
back. It says once per outage that it is waiting, and when the service is back.

Calls are repeated whole, which is safe for the store: an outcome recorded twice finds
the item final and changes nothing; a lease taken twice leaves one lease to expire and
be delivered again, which leases exist for.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from wecomctl.errors import Unavailable

log = logging.getLogger("wecomctl.patience")

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 10.0


class Patient:
    def __init__(self, target: Any, stop: threading.Event | None, what: str,
                 notice: Callable[[str], None] | None = None):
        self._notice = notice  # also tell a person (the terminal), when logs go to a file
        self._target = target
        self._stop = stop or threading.Event()
        self._what = what
        self._down = False
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            wait = FIRST_WAIT_S
            while True:
                try:
                    result = attr(*args, **kwargs)
                except Unavailable as exc:
                    if self._stop.is_set():
                        raise
                    with self._lock:
                        first, self._down = not self._down, True
                    if first:
                        text = (f"{self._what} is unreachable: {exc}; waiting for it (items in hand are kept, "
                                "nothing is lost)")
                        log.warning("%s", text)
                        if self._notice:
                            self._notice(text)
                    self._stop.wait(wait)
                    wait = min(wait * 2, MAX_WAIT_S)
                    continue
                if self._down:
                    with self._lock:
                        back, self._down = self._down, False
                    if back:
                        log.warning("%s is back; carrying on", self._what)
                        if self._notice:
                            self._notice(f"{self._what} is back; carrying on")
                return result

        return call
