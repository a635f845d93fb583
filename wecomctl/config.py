"""Settings: built-in defaults, overlaid by a YAML file, with secrets from the environment.

Errors name the key and the file. Secrets are held in `Secret` objects whose repr and str
never show the value, so a settings object can be logged or printed safely.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from wecomctl.errors import ConfigError

DEFAULT_CONFIG_FILE = "wecomctl.yaml"
DEFAULT_DATA_DIR = ".wecomctl"

# The APIs wecomctl calls, by the names used in `limits:` and in errors.
APIS = ("gettoken", "add_by_phone", "add_msg_template", "send_welcome_msg", "send_text",
        "get_groupmsg_list_v2", "get_groupmsg_send_result", "writeback")


SECRET_KEYS = {"corp_secret", "key", "robot_key", "token"}  # never echoed in an error


class Secret:
    """A secret value that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass
class WecomSettings:
    base_url: str = "https://qyapi.weixin.qq.com"
    corp_id: str = ""
    # The secret is read from this environment variable; `corp_secret` in the file is
    # accepted only for throwaway secrets such as the simulator's.
    corp_secret_env: str = "WECOM_CORP_SECRET"
    corp_secret: str = ""
    timeout_s: float = 10.0
    # Refresh the shared token this many seconds before WeCom says it expires.
    token_refresh_margin_s: float = 300.0


@dataclass
class GatewaySettings:
    base_url: str = ""
    key_env: str = "WECOMCTL_GATEWAY_KEY"
    key: str = ""
    timeout_s: float = 10.0


@dataclass
class WelcomeSettings:
    # msg_template: official 企业群发 (sender = the lead's owner);
    # gateway: the gateway's send_text; welcome_code: official send_welcome_msg with the
    # code the gateway relays from the add event (valid 20 s, once).
    provider: str = "msg_template"
    text: str = "您好{name}，我是您的专属顾问，很高兴为您服务。"
    # WeCom attachments, as WeCom spells them ({msgtype: link, link: {title, url, ...}});
    # their text fields take the same {variables}. At most 9; not with the gateway provider.
    attachments: list = field(default_factory=list)


@dataclass
class Limit:
    per_second: int = 0
    per_minute: int = 0
    per_hour: int = 0
    # Calls are spaced so that at most the limit falls into any window stretched by this
    # guard, which absorbs the scheduling jitter between taking a slot and the request
    # reaching WeCom.
    guard_ms: float = 20.0
    # How long WeCom blocks the API after a 45009: the rest of the window (60 s for a
    # minute limit). The whole fleet pauses that API this long; no attempt is used.
    block_s: float = 60.0
    # Calls in flight at once for this API across all processes (0 = no cap). WeCom does
    # not publish its cap: on 45033 the fleet halves its cap and adds one back every 5 s.
    max_concurrency: int = 0

    def windows(self) -> list[tuple[int, float]]:
        out = []
        for count, seconds in ((self.per_second, 1.0), (self.per_minute, 60.0), (self.per_hour, 3600.0)):
            if count:
                out.append((count, seconds))
        return out


def _default_limits() -> dict[str, Limit]:
    # WeCom's published corp limits (10,000/min, 150,000/hour per API); the gateway's
    # pacing is its own and much lower.
    return {
        "gettoken": Limit(per_minute=100),
        "add_by_phone": Limit(per_minute=600),
        "add_msg_template": Limit(per_minute=10000, per_hour=150000),
        "send_welcome_msg": Limit(per_minute=10000, per_hour=150000),
        "send_text": Limit(per_minute=600),
        # Lookups, only made to settle whether an interrupted 企业群发 happened.
        "get_groupmsg_list_v2": Limit(per_minute=1000),
        "get_groupmsg_send_result": Limit(per_minute=1000),
        # Our own calls to the business system's write-back URL.
        "writeback": Limit(per_second=20),
    }


@dataclass
class AlertSettings:
    """When to tell people, through a WeCom group robot (群机器人), that a run needs them."""

    robot_url: str = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"
    robot_key_env: str = "WECOMCTL_ROBOT_KEY"  # the robot's key; no key = no messages
    robot_key: str = ""  # inline: only for throwaway keys such as the simulator's
    dlq_growth: int = 50  # this many new dead letters within dlq_window_min (0 = off)
    dlq_window_min: int = 10
    error_rate: float = 0.5  # share of failed calls over the last 5 minutes (0 = off)
    error_min_calls: int = 20  # ...judged only once the window holds this many calls
    oldest_ready_min: float = 30.0  # an item ready but not taken for this long (0 = off)
    pause_min: float = 10.0  # a fleet-wide 45009 pause longer than this (0 = off)
    fatal: bool = True  # a run stopped by a fatal errcode (bad secret, no permission)
    repeat_min: float = 60.0  # an alert that lasts is sent again after this long
    min_interval_s: float = 60.0  # at most one robot message this often; alerts wait and go together


@dataclass
class WritebackSettings:
    """状态回传: POST every final outcome to the business system. No url = no write-back."""

    url: str = ""
    token_env: str = "WECOMCTL_WRITEBACK_TOKEN"  # sent as "Authorization: Bearer ..." when set
    token: str = ""
    timeout_s: float = 10.0


@dataclass
class RetrySettings:
    max_attempts: int = 6  # attempts per item and stage for transient errors
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0


@dataclass
class RunSettings:
    workers: int = 0  # worker processes; 0 = CPU count
    concurrency: int = 8  # calls in flight per worker process
    lease_s: float = 120.0  # visibility timeout of a leased item
    max_deliveries: int = 5  # leases without an outcome before an item is poison
    progress_interval_s: float = 10.0  # plain progress lines when stdout is not a terminal
    # Rate-limit state and the access token, shared by every run on this machine that
    # talks to the same corp or gateway (whatever its data dir). "" = $WECOMCTL_SHARED_DIR,
    # else ~/.cache/wecomctl.
    shared_dir: str = ""
    # Where the queue lives: "" = the embedded store in the data dir; a redis://host:port/db
    # URL (optionally ?namespace=name) = one Redis shared by every machine, which then also
    # holds the rate-limit state and the access token. --store or $WECOMCTL_STORE override.
    store: str = ""

    def shared_path(self) -> str:
        if self.shared_dir:
            return os.path.expanduser(self.shared_dir)
        if os.environ.get("WECOMCTL_SHARED_DIR"):
            return os.environ["WECOMCTL_SHARED_DIR"]
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "wecomctl")


@dataclass
class Settings:
    wecom: WecomSettings = field(default_factory=WecomSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    welcome: WelcomeSettings = field(default_factory=WelcomeSettings)
    staff: list[str] = field(default_factory=list)  # round-robin owners when a lead has none
    limits: dict[str, Limit] = field(default_factory=_default_limits)
    retry: RetrySettings = field(default_factory=RetrySettings)
    run: RunSettings = field(default_factory=RunSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    writeback: WritebackSettings = field(default_factory=WritebackSettings)
    campaigns: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-campaign welcome overrides
    data_dir: str = DEFAULT_DATA_DIR
    source: str = "built-in defaults"

    def corp_secret(self) -> Secret:
        return _secret(self.wecom.corp_secret, self.wecom.corp_secret_env)

    def gateway_key(self) -> Secret:
        return _secret(self.gateway.key, self.gateway.key_env)

    def robot_key(self) -> Secret:
        return _secret(self.alerts.robot_key, self.alerts.robot_key_env)

    def writeback_token(self) -> Secret:
        return _secret(self.writeback.token, self.writeback.token_env)

    def staff_for(self, campaign: str) -> list[str]:
        """The staff userids leads of this campaign may be assigned to."""
        over = self.campaigns.get(campaign, {}).get("staff")
        if isinstance(over, str):
            over = [v.strip() for v in over.split(",") if v.strip()]
        return [str(v) for v in over] if over else list(self.staff)

    def welcome_for(self, campaign: str) -> WelcomeSettings:
        over = self.campaigns.get(campaign, {}).get("welcome") or {}
        base = self.welcome
        return WelcomeSettings(
            provider=over.get("provider", base.provider), text=over.get("text", base.text),
            attachments=over.get("attachments", base.attachments),
        )


def _secret(inline: str, env_name: str) -> Secret:
    value = os.environ.get(env_name, "") if env_name else ""
    return Secret(value or inline)


def _merge(obj: Any, data: Any, where: str, source: str) -> Any:
    """Overlay a YAML mapping onto a dataclass, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `{where or 'top level'}` must be a mapping")
    known = {f.name: f for f in fields(obj)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known or key == "source":
            raise ConfigError(f"{source}: unknown key `{path}` (known: {', '.join(k for k in known if k != 'source')})")
        current = getattr(obj, key)
        if key == "limits":
            setattr(obj, key, _merge_limits(current, value, path, source))
        elif is_dataclass(current):
            _merge(current, value, path, source)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: `{path}` must be true or false, not {value!r}")
            setattr(obj, key, value)
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: `{path}` must be a number, not {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{source}: `{path}` must be a finite number, not {value!r}")
            if value < 0:
                raise ConfigError(f"{source}: `{path}` must not be negative")
            if isinstance(current, int) and value != int(value):
                raise ConfigError(f"{source}: `{path}` must be a whole number, not {value!r}")
            if isinstance(current, int):
                value = int(value)
            setattr(obj, key, type(current)(value) if isinstance(current, float) else value)
        elif isinstance(current, str):
            if not isinstance(value, str):
                shown = "a value" if key in SECRET_KEYS else repr(value)
                raise ConfigError(f"{source}: `{path}` must be text (quote it), not {shown}")
            setattr(obj, key, value)
        elif key == "attachments":
            if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
                raise ConfigError(f"{source}: `{path}` must be a list of attachments like {{msgtype: link, link: {{...}}}}")
            setattr(obj, key, value)
        elif isinstance(current, list):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ConfigError(f"{source}: `{path}` must be a list")
            setattr(obj, key, [str(v) for v in value])
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: `{path}` must be a mapping")
            setattr(obj, key, value)
    return obj


def _merge_limits(current: dict[str, Limit], data: Any, where: str, source: str) -> dict[str, Limit]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `{where}` must be a mapping of API name to limits")
    out = dict(current)
    for api, value in data.items():
        if api not in APIS:
            raise ConfigError(f"{source}: unknown API `{where}.{api}` (known: {', '.join(APIS)})")
        out[api] = _merge(Limit(), value or {}, f"{where}.{api}", source)
    return out


def load(path: str | None = None, data_dir: str | None = None, store: str | None = None) -> Settings:
    """Load settings. `path` None: ./wecomctl.yaml when present, else built-in defaults."""
    settings = Settings()
    chosen = path
    if chosen is None and Path(DEFAULT_CONFIG_FILE).is_file():
        chosen = DEFAULT_CONFIG_FILE
    if chosen is not None:
        file = Path(chosen)
        if not file.is_file():
            raise ConfigError(f"config file not found: {chosen} (copy config.example.yaml, or leave out --config to use the defaults)")
        try:
            text = file.read_text(encoding="utf-8")
            data = yaml.safe_load(text) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {chosen}: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {chosen} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
        _merge(settings, data, "", chosen)
        settings.source = chosen
    if data_dir is not None:
        settings.data_dir = data_dir
    if store:
        settings.run.store = store
    _validate(settings)
    return settings


def _valid_url(url: str) -> bool:
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _validate(s: Settings) -> None:
    valid = ("msg_template", "gateway", "welcome_code")
    for name, welcome in [("welcome", s.welcome)] + [
        (f"campaigns.{c}.welcome", s.welcome_for(c)) for c in s.campaigns
    ]:
        if welcome.provider not in valid:
            raise ConfigError(f"{s.source}: `{name}.provider` must be one of {', '.join(valid)}, not {welcome.provider!r}")
        if len(welcome.attachments) > 9:
            raise ConfigError(f"{s.source}: `{name}.attachments` has {len(welcome.attachments)}; WeCom allows at most 9")
        if welcome.attachments and welcome.provider == "gateway":
            raise ConfigError(f"{s.source}: `{name}.attachments` need the msg_template or welcome_code provider; "
                              "the gateway sends text only")
    if s.run.store and not s.run.store.lower().startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{s.source}: `run.store` must be empty (the data dir) or a redis://host:port/db URL")
    if s.run.concurrency < 1:
        raise ConfigError(f"{s.source}: `run.concurrency` must be at least 1")
    if s.run.lease_s < 1:
        raise ConfigError(f"{s.source}: `run.lease_s` must be at least 1 second")
    if s.run.max_deliveries < 1 or s.retry.max_attempts < 1:
        raise ConfigError(f"{s.source}: `run.max_deliveries` and `retry.max_attempts` must be at least 1")
    if s.run.progress_interval_s <= 0:
        raise ConfigError(f"{s.source}: `run.progress_interval_s` must be more than 0")
    if not 0 <= s.alerts.error_rate <= 1:
        raise ConfigError(f"{s.source}: `alerts.error_rate` is a share of calls, between 0 and 1")
    for name, url in (("writeback.url", s.writeback.url), ("alerts.robot_url", s.alerts.robot_url),
                      ("wecom.base_url", s.wecom.base_url), ("gateway.base_url", s.gateway.base_url)):
        if url and not _valid_url(url):
            raise ConfigError(f"{s.source}: `{name}` must be an http:// or https:// URL with a host, not {url!r}")
    for name, value in (("wecom.timeout_s", s.wecom.timeout_s), ("gateway.timeout_s", s.gateway.timeout_s),
                        ("writeback.timeout_s", s.writeback.timeout_s)):
        if not (0 < value < 3600):  # also refuses .nan
            raise ConfigError(f"{s.source}: `{name}` must be between 0 and 3600 seconds")
    for camp, over in s.campaigns.items():
        if not isinstance(over, dict) or not isinstance(over.get("welcome", {}), dict):
            raise ConfigError(f"{s.source}: `campaigns.{camp}` must be a mapping like {{welcome: {{text: ..., provider: ...}}}}")
        unknown = set(over) - {"welcome", "staff"} | set(over.get("welcome") or {}) - {"text", "provider", "attachments"}
        if unknown:
            raise ConfigError(f"{s.source}: unknown key under `campaigns.{camp}`: {', '.join(sorted(map(str, unknown)))} "
                              "(known: staff, welcome.text, welcome.provider, welcome.attachments)")
        if not isinstance(over.get("staff", []), (list, str)):
            raise ConfigError(f"{s.source}: `campaigns.{camp}.staff` must be a list of staff userids")


def simulator_config(url: str, sim, writeback: bool = False) -> str:
    """A complete config for the simulator at `url`, with limits at or under its own (and,
    with `writeback`, write-back to the simulator's business-system receiver)."""
    per_second = sim.rate_limit or 0
    concurrency = 8
    lines = [
        "# wecomctl config for the local simulator (written by `wecomctl simulate --write-config`).",
        "# The secret and key below are the simulator's throwaway ones; for real WeCom, leave them",
        "# out and export WECOM_CORP_SECRET / WECOMCTL_GATEWAY_KEY instead.",
        "wecom:",
        f"  base_url: {url}",
        f"  corp_id: {sim.corp_id}",
        f"  corp_secret: {sim.corp_secret}",
        "  corp_secret_env: ''",
        "  token_refresh_margin_s: 1",
        "gateway:",
        f"  base_url: {url}",
        f"  key: {sim.gateway_key}",
        "  key_env: ''",
        "welcome:",
        "  provider: msg_template",
        "  text: '您好{name}，我是您的专属顾问，很高兴为您服务。'",
        f"staff: [{', '.join(sim.staff)}]",
        "run:",
        "  workers: 2",
        f"  concurrency: {concurrency}",
        "retry:",
        "  base_delay_s: 0.5",
        "  max_delay_s: 10",
        "alerts:  # the simulator's group robot (GET /_sim/robot shows what it received)",
        f"  robot_url: {url}/cgi-bin/webhook/send",
        f"  robot_key: {sim.robot_key}",
        "  robot_key_env: ''",
    ]
    if writeback:
        lines += ["writeback:  # the simulator's stand-in for your business system (GET /_sim/writeback)",
                  f"  url: {url}/business/writeback", "  token_env: ''"]
    lines.append("limits:  # per API; the simulator's own limit" if per_second else
                 "limits:  # the simulator has no rate limit, so neither does this config")
    window = {1.0: "per_second", 60.0: "per_minute", 3600.0: "per_hour"}.get(float(sim.rate_window_s))
    count = per_second
    if per_second and window is None:  # an odd window: the per-second rate at or under it
        window, count = "per_second", max(1, int(per_second / sim.rate_window_s))
    for api in APIS:
        if per_second:
            # A per-second window is short next to scheduling jitter on a busy machine:
            # a wider guard keeps the simulator from ever seeing limit+1.
            guard = 50 if window == "per_second" else 20
            lines += [f"  {api}:", f"    {window}: {count}", f"    guard_ms: {guard}",
                      f"    block_s: {sim.block_s if sim.block_s is not None else sim.rate_window_s}"]
        else:
            lines += [f"  {api}:", "    per_second: 0"]
        if sim.max_concurrency:
            lines += [f"    max_concurrency: {sim.max_concurrency}"]
    return "\n".join(lines) + "\n"
