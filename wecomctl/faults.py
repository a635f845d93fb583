"""Fault injection for tests: die by SIGKILL at a named point, once per data dir.

Set WECOMCTL_CRASH_AT=POINT (e.g. welcome.after_call). The first process of any run on
that data dir to reach POINT kills itself with SIGKILL, exactly as the OOM killer would;
a marker file in the data dir makes it happen once, so the restarted worker or the next
command goes on. Points:

  import.after_batch     a batch of leads is committed, the import goes on
  add.after_intent       the intent is recorded, the add request not yet sent
  add.after_call         the gateway added the customer, the outcome not yet recorded
  welcome.after_intent   the intent is recorded, the welcome not yet sent
  welcome.after_call     the welcome was sent, the outcome not yet recorded
  retry_dlq.after_move   one dead letter moved back to ready, the rest not yet
  run.parent             the run's parent, once its workers have added someone

Unset (always, outside tests), it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "WECOMCTL_CRASH_AT"


def crash_point(name: str, data_dir: str) -> None:
    if os.environ.get(ENV) != name:
        return
    os.makedirs(data_dir, exist_ok=True)
    marker = os.path.join(data_dir, f".crashed-{name}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # it already happened once on this data dir
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
