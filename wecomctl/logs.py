"""Logging for every process of a run: level, text or JSON lines, stderr or a file.

Two guards sit on every handler, whatever a message holds: secrets (corpsecret, access
tokens, robot keys, passwords in URLs) are replaced by "***", and mobile numbers are
masked (138****8000) unless the operator asks for them. A log line is copied into tickets
and chats; a customer's number or a credential must not travel with it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# +86 138 0013 8000, 8613800138000, 13800138000: keep the first 3 and last 4 digits.
_MOBILE = re.compile(r"(?<!\d)(\+?86[ -]?)?(1[3-9]\d)[ -]?(\d{4})[ -]?(\d{4})(?!\d)")
_SECRET = re.compile(r"(?i)((?:corpsecret|secret|access_token|token|key|password)[\"']?\s*[=:]\s*[\"']?)[^&\s\"',}]+")
_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]+@")


def mask_phone(text: str) -> str:
    return _MOBILE.sub(lambda m: f"{m.group(1) or ''}{m.group(2)}****{m.group(4)}", text)


def redact(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", _SECRET.sub(r"\1***", text))


class Guard(logging.Filter):
    """Redacts secrets and (by default) masks phones in the final message and its extras."""

    def __init__(self, mask_phones: bool = True):
        super().__init__()
        self.mask_phones = mask_phones

    def _clean(self, text: str) -> str:
        text = redact(text)
        return mask_phone(text) if self.mask_phones else text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._clean(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp, level, logger, message and, when known, the
    campaign, stage, lead id and errcode of the item it is about."""

    FIELDS = ("campaign", "stage", "lead", "errcode", "api")

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
                  + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname, "logger": record.name, "pid": record.process,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_text:
            data["exception"] = record.exc_text
        return json.dumps(data, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup(level: str = "WARNING", fmt: str = "text", file: str | None = None, mask_phones: bool = True) -> None:
    """Configure the root logger of this process (the parent and each worker call it)."""
    handler: logging.Handler = logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(Guard(mask_phones))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs URLs, which hold tokens
    logging.getLogger("httpcore").setLevel(logging.WARNING)
