"""Where a campaign stands: one snapshot for `status`, its Prometheus file and alerts.

The snapshot is built from the store (counters, per-minute outcomes, the DLQ by code, the
front of each ready queue) and the shared limiter state (pauses, concurrency caps). The
alert rules are a pure function of the snapshot, so `run`, `status --check` and tests
judge alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wecomctl.config import APIS, Settings
from wecomctl.report.files import atomic_text
from wecomctl.report.progress import totals
from wecomctl.store.base import STAGES

ERROR_WINDOW_MIN = 5


def throttles(settings: Settings, now: float) -> tuple[dict[str, float], dict[str, int]]:
    """Active fleet-wide pauses (seconds left) and lowered concurrency caps, per API."""
    from wecomctl.pipeline.worker import make_limiter

    lim = make_limiter(settings)
    pauses = {}
    for api in APIS:
        until = lim.paused_until(api)
        if until > now:
            pauses[api] = round(until - now, 1)
    caps = {}
    for api in APIS:
        cap = lim.cap(api)
        configured = settings.limits[api].max_concurrency if api in settings.limits else 0
        if cap and cap != configured:
            caps[api] = cap
    return pauses, caps


def _paused_for(store, pauses: dict[str, float], now: float) -> dict[str, float]:
    """How long each paused API has been paused, as seen by the checks (a run checks every
    15 s; `status` from cron at each invocation). WeCom blocks for about a minute after a
    45009 and each new 45009 renews it, so what an operator needs to hear about is a
    pause that keeps being renewed: the shared limiter holds only its end, so its start is
    kept in the store, from the first check that saw it until one sees it over."""
    out = {}
    for api in APIS:
        since = store.get_flag(f"pause_since:{api}")
        if api not in pauses:
            if since is not None:
                store.set_flag(f"pause_since:{api}", None)
            continue
        if since is None:
            since = now
            store.set_flag(f"pause_since:{api}", since)
        out[api] = round(now - since, 1)
    return out


def _rate(failed: int, done: int) -> float | None:
    calls = failed + done
    return round(failed / calls, 4) if calls else None


def snapshot(store, settings: Settings, now: float, campaign: str | None = None,
             with_throttles: bool = True) -> dict[str, Any]:
    counts = store.counts()
    picked = {c: v for c, v in counts.items() if campaign is None or c == campaign}
    recent = store.recent(now, ERROR_WINDOW_MIN)
    growth = store.recent(now, settings.alerts.dlq_window_min)
    dead = store.dead_by_code()
    oldest = store.oldest_ready(now)
    camps: dict[str, Any] = {}
    for camp, c in picked.items():
        per_stage = {}
        for stage in STAGES:
            r = recent.get(camp, {}).get(stage, {"done": 0, "dead": 0, "failed": 0})
            per_stage[stage] = {
                **c["stages"][stage],
                "done_5m": r["done"], "failed_5m": r["failed"],
                "error_rate_5m": _rate(r["failed"], r["done"]),
                "per_minute": round(r["done"] / ERROR_WINDOW_MIN, 1),
                "oldest_ready_s": oldest.get(camp, {}).get(stage),
                "dead_by_code": dead.get(camp, {}).get(stage, {}),
                "new_dead": growth.get(camp, {}).get(stage, {}).get("dead", 0),
            }
        camps[camp] = {"imported": c["imported"], "skipped": c["skipped"], "stages": per_stage}
    failed = sum(s["failed_5m"] for c in camps.values() for s in c["stages"].values())
    done = sum(s["done_5m"] for c in camps.values() for s in c["stages"].values())
    ages = [s["oldest_ready_s"] for c in camps.values() for s in c["stages"].values() if s["oldest_ready_s"] is not None]
    by_code: dict[str, int] = {}
    for c in camps.values():
        for s in c["stages"].values():
            for code, n in s["dead_by_code"].items():
                by_code[code] = by_code.get(code, 0) + n
    data = {
        "at": round(now, 3),
        "imported": sum(c["imported"] for c in picked.values()),
        "skipped": sum(c["skipped"] for c in picked.values()),
        "stages": totals(picked),
        "error_rate_5m": _rate(failed, done),
        "calls_5m": failed + done,
        "per_minute": {stage: round(sum(c["stages"][stage]["done_5m"] for c in camps.values()) / ERROR_WINDOW_MIN, 1)
                       for stage in STAGES},
        "oldest_ready_s": max(ages) if ages else None,
        "dead_by_code": by_code,
        "new_dead": sum(s["new_dead"] for c in camps.values() for s in c["stages"].values()),
        "campaigns": camps,
        "fatal": store.get_flag("fatal"),
        "pauses": {}, "caps": {},
    }
    if with_throttles:
        data["pauses"], data["caps"] = throttles(settings, now)
        data["paused_for"] = _paused_for(store, data["pauses"], now)
    data["alerts"] = [a.as_json() for a in evaluate(data, settings)]
    return data


@dataclass
class Alert:
    key: str  # what it is about; the same key is not sent twice within repeat_min
    text: str  # one line of markdown

    def as_json(self) -> dict[str, str]:
        return {"key": self.key, "text": self.text}


def evaluate(snap: dict[str, Any], settings: Settings) -> list[Alert]:
    a = settings.alerts
    out: list[Alert] = []
    if a.fatal and snap.get("fatal"):
        f = snap["fatal"]
        todo = f" — {f['todo'].rstrip('. ')}" if f.get("todo") else "; fix it and run again"
        out.append(Alert("fatal", f"**stopped**: {f['error'].rstrip('. ')}{todo}. The items are still queued."))
    for camp, c in snap["campaigns"].items():
        for stage, s in c["stages"].items():
            if a.dlq_growth and s["new_dead"] >= a.dlq_growth:
                top = ", ".join(f"{code}×{n}" for code, n in sorted(s["dead_by_code"].items(), key=lambda kv: -kv[1])[:3])
                out.append(Alert(f"dlq:{camp}:{stage}",
                                 f"**{camp} {stage}**: {s['new_dead']} new dead letters in {a.dlq_window_min} min "
                                 f"(in the DLQ: {top}); see `wecomctl dlq list --campaign {camp}`"))
            calls = s["done_5m"] + s["failed_5m"]
            rate = s["error_rate_5m"]
            if a.error_rate and rate is not None and calls >= a.error_min_calls and rate >= a.error_rate:
                out.append(Alert(f"errors:{camp}:{stage}",
                                 f"**{camp} {stage}**: {rate:.0%} of {calls} calls failed in the last "
                                 f"{ERROR_WINDOW_MIN} min"))
            age = s["oldest_ready_s"]
            if a.oldest_ready_min and age is not None and age >= a.oldest_ready_min * 60:
                out.append(Alert(f"stale:{camp}:{stage}",
                                 f"**{camp} {stage}**: {s['ready']} items waiting, the oldest for {age / 60:.0f} min; "
                                 "is `wecomctl run` running?"))
    for api, left in snap.get("pauses", {}).items():
        paused = snap.get("paused_for", {}).get(api, 0)
        if a.pause_min and paused >= a.pause_min * 60:
            out.append(Alert(f"pause:{api}", f"**{api} paused** for {paused / 60:.0f} min, {left:.0f} s more, by "
                                             "WeCom's 45009 (frequency limit) again and again; every worker waits: "
                                             "lower `limits` for it in the config"))
    return out


# --- Prometheus textfile -------------------------------------------------------------------
def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(snap: dict[str, Any]) -> str:
    """The snapshot in the Prometheus text format (for node_exporter's textfile collector)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            shown = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")

    camps = snap["campaigns"]
    metric("wecomctl_imported", "gauge", "Leads imported, per campaign.",
           [({"campaign": c}, v["imported"]) for c, v in camps.items()])
    metric("wecomctl_items", "gauge", "Items per campaign, stage and state.",
           [({"campaign": c, "stage": st, "state": state}, s[state])
            for c, v in camps.items() for st, s in v["stages"].items()
            for state in ("ready", "delayed", "leased", "done", "dead", "skipped")])
    metric("wecomctl_dead_letters", "gauge", "Dead letters now in the DLQ, per errcode (or kind).",
           [({"campaign": c, "stage": st, "errcode": code}, n)
            for c, v in camps.items() for st, s in v["stages"].items() for code, n in s["dead_by_code"].items()])
    metric("wecomctl_error_rate_5m", "gauge", "Share of calls that failed over the last 5 minutes.",
           [({"campaign": c, "stage": st}, s["error_rate_5m"])
            for c, v in camps.items() for st, s in v["stages"].items() if s["error_rate_5m"] is not None])
    metric("wecomctl_done_per_minute", "gauge", "Items done per minute over the last 5 minutes.",
           [({"campaign": c, "stage": st}, s["per_minute"]) for c, v in camps.items() for st, s in v["stages"].items()])
    metric("wecomctl_oldest_ready_seconds", "gauge", "How long the oldest ready item has waited.",
           [({"campaign": c, "stage": st}, s["oldest_ready_s"])
            for c, v in camps.items() for st, s in v["stages"].items() if s["oldest_ready_s"] is not None])
    metric("wecomctl_api_paused_seconds", "gauge", "Seconds left of a fleet-wide pause after 45009.",
           [({"api": api}, left) for api, left in snap.get("pauses", {}).items()])
    metric("wecomctl_fatal", "gauge", "1 when the last run stopped on a fatal errcode.",
           [({}, 1 if snap.get("fatal") else 0)])
    metric("wecomctl_alerts", "gauge", "Alerts in force (see alerts: in the config).",
           [({"alert": a["key"]}, 1) for a in snap.get("alerts", [])])
    metric("wecomctl_snapshot_timestamp_seconds", "gauge", "When this file was written.", [({}, snap["at"])])
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Write beside the target and rename: a scraper never reads half a file."""
    with atomic_text(path) as fh:
        fh.write(text)
