"""Structured logs: one JSON object per line, with the session id where there is one."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from urllib.parse import unquote_plus

from huggingface_hub.utils import disable_progress_bars
from transformers.utils import logging as transformers_logging

# LogRecord attributes that are not extra fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# uvicorn logs request lines with the raw query string: never write a secret to a log, and
# tag the line with the session its path names. The server decodes parameter names
# (`?%74oken=` is `token`), so the redaction reads them decoded too.
SECRET_PARAMS = frozenset({"token", "access_token", "api_key", "apikey", "key", "x-api-key"})
_QUERY = re.compile(r"\?([^\s\"#]*)")
_SESSION_PATH = re.compile(r"/v1/sessions/([\w.-]+)")


def redact_query(text: str) -> str:
    """`text` with the value of every query parameter whose decoded name is a secret's
    (any case) replaced by `[redacted]`."""

    def redact(m: re.Match) -> str:
        params = []
        for param in m.group(1).split("&"):
            name, eq, _ = param.partition("=")
            if eq and unquote_plus(name).strip().lower() in SECRET_PARAMS:
                param = f"{name}=[redacted]"
            params.append(param)
        return "?" + "&".join(params)

    return _QUERY.sub(redact, text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact_query(record.getMessage()),
        }
        if "session_id" not in vars(record) and (m := _SESSION_PATH.search(out["event"])):
            out["session_id"] = m.group(1)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    """Route our loggers and uvicorn's through the JSON formatter on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    lvl = getattr(logging, level.upper(), logging.INFO)
    # asyncio's own errors too (e.g. accept() out of file descriptors under a flood)
    for name in ("shotstream", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        # uvicorn hands its logger to the websockets library, whose debug lines carry
        # handshake headers (tokens, API keys) and frame contents (prompts): never below info
        logger.setLevel(lvl if name == "shotstream" else max(lvl, logging.INFO))
        logger.propagate = False
    _no_progress_bars()


def _no_progress_bars() -> None:
    """Progress bars (transformers' "Loading weights", the hub's downloads) would write
    lines of their own to stderr, where every line is a JSON object."""
    disable_progress_bars()
    transformers_logging.disable_progress_bar()
