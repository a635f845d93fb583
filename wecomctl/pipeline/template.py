"""Personalise the welcome text from a lead's fields, and check it before any API call."""

from __future__ import annotations

import string
from typing import Any

MAX_TEXT_BYTES = 4000  # WeCom counts UTF-8 bytes
MAX_ATTACHMENTS = 9
MSGTYPES = ("image", "link", "miniprogram", "video", "file")
# (msgtype, field) -> most UTF-8 bytes WeCom accepts
FIELD_BYTES = {("link", "title"): 128, ("link", "desc"): 512, ("miniprogram", "title"): 64}


class InvalidMessage(ValueError):
    """The welcome cannot be sent for this lead; dead-letter it without calling WeCom."""


def variables(lead: dict[str, Any]) -> dict[str, str]:
    out = {k: ("" if v is None else str(v)) for k, v in (lead.get("fields") or {}).items()}
    for key in ("name", "phone", "owner", "campaign"):
        out[key] = "" if lead.get(key) is None else str(lead[key])
    return out


def missing_fields(template: str, known) -> list[str]:
    """The {variables} a template uses that are not in `known`."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None and f not in known]


def _fill(template: str, values: dict[str, str]) -> str:
    for field in missing_fields(template, values)[:1]:
        raise InvalidMessage(f"template variable {{{field}}} is missing from the lead (columns: {', '.join(sorted(values))})")
    try:
        return template.format_map(values)
    except (ValueError, IndexError, KeyError) as exc:
        raise InvalidMessage(f"welcome template is malformed: {exc}") from None


def render_attachments(attachments: list[dict[str, Any]], lead: dict[str, Any]) -> list[dict[str, Any]]:
    """Fill the attachments' text fields for this lead and check them against WeCom's rules."""
    if len(attachments) > MAX_ATTACHMENTS:
        raise InvalidMessage(f"{len(attachments)} attachments; WeCom allows at most {MAX_ATTACHMENTS}")
    values = variables(lead)
    out = []
    for i, att in enumerate(attachments, 1):
        kind = att.get("msgtype")
        if kind not in MSGTYPES or not isinstance(att.get(kind), dict):
            raise InvalidMessage(f"attachment {i}: msgtype must be one of {', '.join(MSGTYPES)} with a {kind or 'msgtype'} object")
        body = {k: _fill(v, values) if isinstance(v, str) else v for k, v in att[kind].items()}
        for (mt, field), most in FIELD_BYTES.items():
            if mt == kind and len(str(body.get(field, "")).encode("utf-8")) > most:
                raise InvalidMessage(f"attachment {i}: {kind}.{field} is over {most} UTF-8 bytes")
        out.append({"msgtype": kind, kind: body})
    return out


def render(template: str, lead: dict[str, Any]) -> str:
    text = _fill(template, variables(lead))
    if not text.strip():
        raise InvalidMessage("welcome text is empty")
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise InvalidMessage(f"welcome text is {size} UTF-8 bytes; WeCom allows {MAX_TEXT_BYTES}")
    return text
