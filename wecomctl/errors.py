"""The project's one exception tree.

Third-party and HTTP errors are translated into these at the boundary (the HTTP client,
the store, the readers), so the rest of the code and the CLI only ever see these. Each
carries the process exit code the CLI uses when it ends a command.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_DEAD = 1  # finished, but with dead letters or rejects
EXIT_USAGE = 2  # bad usage, config or input file
EXIT_FATAL = 3  # stopped by a fatal API condition
EXIT_INTERRUPTED = 130


class WecomctlError(Exception):
    """Base of every error wecomctl raises on purpose."""

    exit_code = EXIT_USAGE


class UsageError(WecomctlError):
    """Bad flags, a missing file, a file that cannot be imported."""


class ConfigError(UsageError):
    """The config file is missing, unreadable or has a bad value (names key and file)."""


class InputError(UsageError):
    """An input file is refused as a whole (no phone column, unreadable, mojibake)."""


class StoreError(WecomctlError):
    """The data dir cannot be opened or written (names the path and what to do)."""


class Unavailable(StoreError):
    """The store or the shared state cannot be reached right now (Redis restarting, a
    network cut, a long script running): waiting and trying again may be all it takes."""


class SharedStateError(StoreError):
    """The state shared by the fleet (rate limits, the access token on Redis) cannot be
    used: Redis unreachable, refused the login, or the client is not installed. The
    message says what to do and never carries the password."""


class SharedStateUnavailable(SharedStateError, Unavailable):
    """The shared state's Redis cannot be reached right now."""


class ApiError(WecomctlError):
    """A call to WeCom or the gateway failed. `kind` is the errcode class.

    kinds: retry, throttle, token, fatal, dead, done, window, network.
    """

    exit_code = EXIT_FATAL

    def __init__(self, api: str, errcode: int | None, errmsg: str, kind: str, meaning: str = ""):
        self.api = api
        self.errcode = errcode
        self.errmsg = errmsg
        self.kind = kind
        self.meaning = meaning
        code = "no errcode" if errcode is None else f"errcode {errcode}"
        super().__init__(f"{api}: {code} ({meaning or kind}): {errmsg}")


class NetworkError(ApiError):
    """No answer: connection refused, timeout, broken response. Transient."""

    def __init__(self, api: str, message: str, maybe_sent: bool = False):
        super().__init__(api, None, message, "network", "network error")
        # True when the request may have reached the server (read timeout, connection
        # dropped mid-answer): a non-idempotent call may have taken effect.
        self.maybe_sent = maybe_sent
