"""Retry-After parsing shared by the LLM expert and the OpenAI-compatible backend."""
from __future__ import annotations

import email.utils
import time

import pytest

from refinex.httputil import retry_after_seconds


@pytest.mark.parametrize(("header", "expected"), [(None, None), ("", None), ("3", 3.0), (" 1.5 ", 1.5),
                                                  ("-4", 0.0), ("soon", None)])
def test_delta_seconds_and_garbage(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header) == expected


def test_http_dates_count_down_from_now_and_never_go_negative() -> None:
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < retry_after_seconds(later) <= 120
    assert retry_after_seconds(email.utils.formatdate(time.time() - 120, usegmt=True)) == 0.0
