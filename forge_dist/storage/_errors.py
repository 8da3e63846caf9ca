"""Turn backend exceptions (OSError, botocore, aiohttp, gcsfs, azure ...) into StorageError."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from forge_dist._urls import redact_text
from forge_dist.errors import ForgeDistError, StorageError

_BACKEND_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "s3fs",
    "gcsfs",
    "google",
    "adlfs",
    "azure",
    "fsspec",
)

_HINTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EXDEV: "rename crossed filesystems (EXDEV): staging must be on the same filesystem "
    "as the checkpoint root",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
}


def describe(exc: BaseException) -> str:
    """One line for ``exc``, with URLs and secrets redacted."""
    if isinstance(exc, OSError) and exc.errno in _HINTS:
        detail = _HINTS[exc.errno]
        extra = exc.strerror or ""
        text = f"{detail}" + (f" ({extra})" if extra and extra.lower() not in detail else "")
    else:
        text = str(exc) or type(exc).__name__
        if type(exc).__module__.split(".")[0] in _BACKEND_MODULES:
            text = f"{type(exc).__name__}: {text}"
    return redact_text(" ".join(text.split()))


def _raised_in_backend(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc`` belongs to a storage library, e.g. a
    ``ValueError("Invalid endpoint")`` from botocore."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module.split(".")[0] in _BACKEND_MODULES


def is_backend_error(exc: BaseException) -> bool:
    if isinstance(exc, ForgeDistError):
        return False
    if isinstance(exc, OSError):
        return True
    if type(exc).__module__.split(".")[0] in _BACKEND_MODULES:
        return True
    return isinstance(exc, (ValueError, TypeError, KeyError)) and _raised_in_backend(exc)


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Re-raise I/O and backend errors as ``StorageError("<what>: <reason>")``."""
    try:
        yield
    except ForgeDistError:
        raise
    except Exception as e:
        if not is_backend_error(e):
            raise
        err = StorageError(f"{what}: {describe(e)}")
        if isinstance(e, OSError):
            err.errno = e.errno
        raise err from e
