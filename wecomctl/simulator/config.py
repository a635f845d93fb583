"""The simulator's knobs (`SimConfig`) and their YAML loader."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from wecomctl.errors import ConfigError

DEFAULT_STAFF = ("zhangsan", "lisi", "wangwu", "zhaoliu", "sunqi", "zhouba", "wujiu", "zhengshi")

# Never shown in stats, logs or reprs: they are the simulator's "credentials".
SECRET_FIELDS = ("corp_secret", "gateway_key", "robot_key")


@dataclass
class SimConfig:
    """Knobs of the local WeCom simulator. Mutable on purpose: the CLI overlays its flags."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    corp_id: str = "wwsim00000000000001"
    corp_secret: str = "sim-secret-not-for-production"
    gateway_key: str = "sim-gateway-key-not-for-production"
    robot_key: str = "sim-robot-key-not-for-production"  # the group robot's webhook key
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0  # uniform extra in [0, jitter]
    rate_limit: int = 0  # calls per window per API; 0 = unlimited
    rate_window_s: float = 1.0
    block_s: float | None = None  # None = a 45009 block lasts until the window ends
    rate_mode: str = "fixed"  # "fixed": windows aligned to the clock; "sliding": any window
    max_concurrency: int = 0  # calls in flight per API; 0 = unlimited
    busy_rate: float = 0.0  # share of calls answered -1
    token_ttl_s: float = 7200
    staff: tuple[str, ...] = DEFAULT_STAFF
    unknown_suffix: str = "44"  # mobiles whose digits end with it: 910001; "" disables
    welcome_code_ttl_s: float = 20.0
    seed: int | None = None
    call_log: bool = True  # keep arrival times for GET /_sim/calls
    # The business system's write-back receiver (POST /business/writeback): share of
    # deliveries answered 503 before storing, and share answered 500 AFTER storing (the
    # sender cannot tell them apart and must retry; the Idempotency-Key dedupes).
    writeback_fail_rate: float = 0.0
    writeback_lost_reply_rate: float = 0.0

    def __post_init__(self) -> None:
        self.staff = tuple(self.staff)

    def __repr__(self) -> str:  # a config is printable without leaking its secrets
        shown = ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items())
        return f"SimConfig({shown})"

    def public_dict(self) -> dict[str, Any]:
        """The knobs without secrets, JSON-ready (what /_sim/stats shows)."""
        d = asdict(self)
        for k in SECRET_FIELDS:
            d.pop(k)
        d["staff"] = list(self.staff)
        return d

    def validate(self) -> None:
        """Raise ValueError naming the first knob that is out of range."""
        checks = [
            ("port", 0 <= self.port <= 65535),
            ("latency_ms", self.latency_ms >= 0),
            ("latency_jitter_ms", self.latency_jitter_ms >= 0),
            ("rate_limit", self.rate_limit >= 0),
            ("rate_window_s", self.rate_window_s > 0 and math.isfinite(self.rate_window_s)),
            ("block_s", self.block_s is None or self.block_s >= 0),
            ("rate_mode", self.rate_mode in ("fixed", "sliding")),
            ("max_concurrency", self.max_concurrency >= 0),
            ("busy_rate", 0.0 <= self.busy_rate <= 1.0),
            ("writeback_fail_rate", 0.0 <= self.writeback_fail_rate <= 1.0),
            ("writeback_lost_reply_rate", 0.0 <= self.writeback_lost_reply_rate <= 1.0),
            ("token_ttl_s", self.token_ttl_s > 0),
            ("welcome_code_ttl_s", self.welcome_code_ttl_s > 0),
            ("staff", all(isinstance(s, str) and s for s in self.staff)),
            ("unknown_suffix", self.unknown_suffix == "" or str(self.unknown_suffix).isdigit()),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"simulator knob `{name}` out of range: {getattr(self, name)!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SimConfig":
        """Load knobs from YAML: top level, or a `simulator:` section. Unknown keys are ignored
        (the file may be a whole wecomctl config); bad values raise ConfigError naming key and file."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{p}: cannot read simulator config: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("simulator"), dict):
            data = data["simulator"]
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: simulator config must be a mapping of knobs")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                try:
                    kwargs[f.name] = _coerce(f.name, data[f.name])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{p}: `{f.name}`: {exc}") from exc
        cfg = cls(**kwargs)
        try:
            cfg.validate()
        except ValueError as exc:
            raise ConfigError(f"{p}: {exc}") from exc
        return cfg


_INT = {"port", "rate_limit", "max_concurrency"}
_FLOAT = {"latency_ms", "latency_jitter_ms", "rate_window_s", "busy_rate", "token_ttl_s", "welcome_code_ttl_s"}
_STR = {"host", "corp_id", "corp_secret", "gateway_key", "rate_mode"}


def _coerce(name: str, value: Any) -> Any:
    if name in _INT:
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if name in _FLOAT:
        return float(value)
    if name == "block_s":
        return None if value is None else float(value)
    if name == "seed":
        return None if value is None else int(value)
    if name == "call_log":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if name == "staff":
        if isinstance(value, str):
            value = value.split(",")
        return tuple(str(s).strip() for s in value if str(s).strip())
    if name == "unknown_suffix":
        # YAML reads 44 as an int; "" or null disables the rule.
        return "" if value is None else str(value)
    if name in _STR:
        return str(value)
    return value
