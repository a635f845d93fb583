"""When to try again: exponential backoff with full jitter (tenacity's strategy)."""

from __future__ import annotations

from types import SimpleNamespace

import tenacity

from wecomctl.config import RetrySettings


class Backoff:
    def __init__(self, settings: RetrySettings):
        self._wait = tenacity.wait_random_exponential(multiplier=settings.base_delay_s, max=settings.max_delay_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (counting from 1):
        uniform in [0, min(max, base * 2**attempt)]."""
        # tenacity's wait strategies read only attempt_number from the retry state.
        return self._wait(SimpleNamespace(attempt_number=attempt))
