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


def url_secrets(url: str) -> list[str]:
    """The parts of ``url`` that must never be printed: user info and query string."""
    m = _SCHEME.match(str(url))
    if not m:
        return []
    rest = str(url)[m.end() :]
    out = []
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        userinfo = authority.rsplit("@", 1)[0]
        out += [userinfo, *userinfo.split(":")]
    for sep in ("?", "#"):
        if sep in rest:
            out.append(rest.split(sep, 1)[1])
    return [s for s in out if s]


# Secrets that travel outside URLs: the keys of an Azure connection string (account key,
# SAS token, SAS signature as a query parameter outside a URL) and a PEM private key (a
# GCS service-account key's).
_KEYED = re.compile(
    r"((?:AccountKey|SharedAccessSignature|SharedAccessKey|sig|client_secret)\s*=\s*)"
    r"[^;&\s'\"#:,)]+",
    re.IGNORECASE,
)
_PEM = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S
)


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Redact every URL found in ``text``, any ``user:password@``, the keys of a
    connection string, a private key, and each given secret."""
    text = _PEM.sub("***", _KEYED.sub(r"\1***", text))
    out = re.sub(
        r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]*[^\s'\".,:;)]",
        lambda m: redact_url(m.group(0)),
        text,
    )
    out = re.sub(r"[^\s/'\"@:]+:[^\s/'\"@]+@", "***@", out)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    return out
