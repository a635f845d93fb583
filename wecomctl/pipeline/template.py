"""Personalise the welcome text from a lead's fields, and check it before any API call."""

from __future__ import annotations

import string
from typing import Any

MAX_TEXT_BYTES = 4000  # WeCom counts UTF-8 bytes


class InvalidMessage(ValueError):
    """The welcome cannot be sent for this lead; dead-letter it without calling WeCom."""


def variables(lead: dict[str, Any]) -> dict[str, str]:
    out = {k: ("" if v is None else str(v)) for k, v in (lead.get("fields") or {}).items()}
    for key in ("name", "phone", "owner", "campaign"):
        out[key] = "" if lead.get(key) is None else str(lead[key])
    return out


def render(template: str, lead: dict[str, Any]) -> str:
    values = variables(lead)
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field not in values:
            raise InvalidMessage(f"template variable {{{field}}} is missing from the lead (columns: {', '.join(sorted(values))})")
    try:
        text = template.format_map(values)
    except (ValueError, IndexError, KeyError) as exc:
        raise InvalidMessage(f"welcome template is malformed: {exc}") from None
    if not text.strip():
        raise InvalidMessage("welcome text is empty")
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise InvalidMessage(f"welcome text is {size} UTF-8 bytes; WeCom allows {MAX_TEXT_BYTES}")
    return text
