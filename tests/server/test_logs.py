"""The JSON log formatter's redaction (the logs of a real server: tests/server/test_hostile.py
and test_metrics.py)."""

from __future__ import annotations

import pytest

from server.logs import redact_query


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        ('"GET /s?token=abc HTTP/1.1" 200', '"GET /s?token=[redacted] HTTP/1.1" 200'),
        ("/s?last_seq=3&%74oken=abc&x=1", "/s?last_seq=3&%74oken=[redacted]&x=1"),
        (
            "/s?TOKEN=abc&Api_Key=k&api%5Fkey=k",
            "/s?TOKEN=[redacted]&Api_Key=[redacted]&api%5Fkey=[redacted]",
        ),
        ("/s?+token=abc&access_token=t", "/s?+token=[redacted]&access_token=[redacted]"),
        ("/s?tokens=abc&token", "/s?tokens=abc&token"),  # another name; no value
        ("what? no query here", "what? no query here"),
    ],
)
def test_secrets_in_query_strings_are_redacted_by_their_decoded_name(line, redacted):
    assert redact_query(line) == redacted
