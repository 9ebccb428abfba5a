"""Secrets out of what we print: URLs name their servers in logs, status tables and manifests, never their passwords.

The one place every room redacts a URL (``redis://user:secret@host:6379/0`` becomes
``redis://user:***@host:6379/0``); a comma-separated list of URLs (a sharded replica spec) is
redacted URL by URL. A leaf of the foundation: imports nothing of ours.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """``url`` with its password (and only its password) replaced by ``***``; a list ``a,b`` URL by URL."""
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    try:
        parsed = urlsplit(url)
    except ValueError:  # not a URL at all: say nothing of it rather than echo a possible secret
        return MASK
    if parsed.password is None:
        return url
    userinfo, _, hostport = parsed.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parsed._replace(netloc=f"{user}:{MASK}@{hostport}"))


def redact_urls(urls: list[str]) -> list[str]:
    """``redact_url`` of each."""
    return [redact_url(url) for url in urls]
