"""What the settings need to know about the upstream, without loading its HTTP stack.

`numbersvc.config` declares every setting's default and parser at import time, and every CLI
command imports it; keeping these two names apart from `client.py` and `transport.py` keeps
httpx and aiohttp (about 0.5 s) out of commands that never reach Plivo.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["DEFAULT_BASE_URL", "HttpStack"]

DEFAULT_BASE_URL: Final = "https://api.plivo.com"
"""Plivo's production API."""


class HttpStack(enum.StrEnum):
    """Which HTTP implementation carries httpx's requests to Plivo."""

    AIOHTTP = "aiohttp"
    HTTPCORE = "httpcore"
