"""URL helpers shared by the store and the CLI (no heavy imports)."""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def redact_url(url: str) -> str:
    """Return ``url`` with user info (credentials) and query/fragment removed.

    ``s3://AKIA:secret@bucket/run?X-Amz-Signature=abc`` becomes
    ``s3://***@bucket/run?***``. Local paths are returned unchanged.
    """
    text = str(url)
    m = _SCHEME.match(text)
    if not m:
        return text
    scheme = m.group(1)
    rest = text[m.end() :]
    query = ""
    for sep in ("?", "#"):
        if sep in rest:
            rest = rest.split(sep, 1)[0]
            query = "?***"
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{slash}{path}{query}"


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Redact every URL found in ``text`` and each given secret string."""
    out = re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+", lambda m: redact_url(m.group(0)), text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    return out
