"""Google Cloud Storage (``gs://``, ``gcs://``, through gcsfs): the manifest-last commit of
:class:`~.objects.ObjectBackend`, with the JSON API's own calls where they do better than
fsspec's generic ones:

- a manifest or the lease in one GET (``alt=media``) whose ``X-Goog-Generation`` header
  names the generation of the very bytes returned (a generic read is a metadata GET and a
  media GET);
- the writer lease by a multipart upload with ``ifGenerationMatch`` (its generation, or
  ``0`` for the first), which GCS honours on every upload type and fake-gcs-server on
  multipart uploads: a writer that lost the lease cannot write it;
- reads in ranged media GETs whose bodies are kept as the chunks the connection
  delivered (:class:`MediaRangeReader`);
- a file below :data:`~.objects.WHOLE_BYTES` in one multipart upload whose body is
  joined once, on the writer's thread (:class:`MultipartSink`).

Credentials come from gcsfs' usual sources (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's,
the metadata server, or the ``token`` storage option); ``STORAGE_EMULATOR_HOST`` names an
emulator.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from forge_dist.errors import ManifestError, StorageError
from forge_dist.storage._errors import storage_errors
from forge_dist.storage.backends.base import LEASE_NAME, Sink
from forge_dist.storage.backends.objects import AheadReader, ObjectBackend, _FsspecSink


class MediaRangeReader(AheadReader):
    """An object read in ranged media GETs, each body kept as the chunks the connection
    delivered. gcsfs' ``_cat_file`` has aiohttp join them into one ``bytes``, a copy of
    every byte on the one event-loop thread a verify waits for. The requests are signed
    and retried as gcsfs' own are (its ``retry_request``: 5xx, 429, a connection or body
    that breaks off)."""

    async def _fetch(self, start: int, end: int) -> list[bytes]:
        try:
            from gcsfs.retry import retry_request
        except ImportError:  # pragma: no cover - a gcsfs without it: its own read
            return await super()._fetch(start, end)
        fetch = retry_request(retries=getattr(self.fs, "retries", 6))(_media_chunks)
        return await fetch(self.fs, self.path, start, end)


async def _media_chunks(fs: Any, path: str, start: int, end: int) -> list[bytes]:
    """Bytes ``[start, end)`` of an object as the chunks that arrived, asked as gcsfs asks
    (its URL, headers and query parameters: ``userProject`` for a requester-pays
    bucket). An error status is gcsfs' error for it and a body cut short aiohttp's (both
    retried); an answer that is not the range asked for is an error, not retried."""
    import aiohttp
    from gcsfs.retry import validate_response

    await fs._set_session()
    async with fs.session.get(
        fs.url(path),
        params=fs._get_params({}),
        headers=fs._get_headers({"Range": f"bytes={start}-{end - 1}"}),
        timeout=fs.requests_timeout,
    ) as r:
        if r.status >= 300:
            validate_response(r.status, await r.read(), path)
        if r.status != 206 and r.content_length != end - start:  # the range ignored
            raise OSError(
                f"{path}: bytes {start}-{end - 1} asked, {r.status} with "
                f"{r.content_length} bytes answered"
            )
        chunks = [chunk async for chunk in r.content.iter_any()]
    got = sum(map(len, chunks))
    if got != end - start:
        raise aiohttp.ClientPayloadError(f"{path}: {got} bytes of {end - start} arrived")
    return chunks


def _multipart(key: str, parts: list[bytes], boundary: str) -> bytes:
    """The body of a multipart upload of ``parts`` as object ``key``, in one join."""
    head = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
        f"{json.dumps({'name': key})}\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    return b"".join([head.encode(), *parts, f"\r\n--{boundary}--".encode()])


def _upload(fs: Any, path: str, parts: list[bytes], **params: str) -> None:
    """``parts`` as the object ``path`` in one multipart upload (gcsfs' ``_call``: its
    credentials, retries and error translation; ``params`` such as ``ifGenerationMatch``).
    The boundary is random, so no file's bytes can end its part early."""
    import uuid

    from fsspec.asyn import sync

    bucket, key = path.split("/", 1)
    boundary = f"forge-dist-{uuid.uuid4().hex}"
    sync(
        fs.loop,
        fs._call,
        "POST",
        f"{fs._location}/upload/storage/v1/b/{bucket}/o",
        uploadType="multipart",
        headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
        data=_multipart(key, parts, boundary),
        **params,
    )


class MultipartSink(_FsspecSink):
    """A held file (below :data:`~.objects.WHOLE_BYTES`) sent in one multipart upload.
    gcsfs' ``pipe_file`` builds that body with two concatenations on its event loop (a
    copy of every byte each, while every other file's upload waits) and sends a file
    from 50 MiB on in a resumable upload of several requests; here the body is joined
    once on the thread that closes the sink. A larger file streams as before."""

    def close(self, sha256: str | None = None) -> None:
        if self._closed or self.f is not None:
            return super().close(sha256)
        self._closed = True
        held, self._held = self._held, []
        try:
            _upload(self.fs, self.path, held)
        finally:
            self.fs.invalidate_cache(self.path)  # as gcsfs' own writes do


class GCSBackend(ObjectBackend):
    conditional_writes = True
    consistent_listing = True
    reader = MediaRangeReader

    @classmethod
    def accepts(cls, fs: Any) -> bool:
        return callable(getattr(fs, "_call", None)) and hasattr(fs, "_location")

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key = path.split("/", 1)
        return bucket, key

    def _get_small(self, path: str, limit: int) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        bucket, key = self._split(path)
        try:
            headers, body = sync(
                self.fs.loop, self.fs._call, "GET", "b/{}/o/{}", bucket, key, alt="media"
            )
        except FileNotFoundError:
            return None
        if len(body) > limit:
            raise ManifestError(f"{key.rsplit('/', 1)[-1]} is larger than {limit} bytes")
        generation = headers.get("X-Goog-Generation") or headers.get("x-goog-generation")
        if not generation:  # a conditional write could never replace it
            raise StorageError(f"{self.display}: {key} came without its generation")
        return bytes(body), generation

    def open_write(self, staging: str, rel: str) -> Sink:
        with storage_errors(f"cannot write {staging}/{rel} in {self.display}"):
            if self._gcsfs_writes:
                return super().open_write(staging, rel)
            return MultipartSink(self.fs, self._p(staging, rel))

    @functools.cached_property
    def _gcsfs_writes(self) -> bool:
        """Whether payload must go through gcsfs' own writes: a ``consistency`` check
        asked of it (md5, crc32c), or a zonal bucket, which gcsfs writes through gRPC."""
        from fsspec.asyn import sync

        if getattr(self.fs, "consistency", None) not in (None, "none"):
            return True
        zonal = getattr(self.fs, "_is_zonal_bucket", None)
        bucket = self.root.split("/", 1)[0]
        return zonal is not None and bool(sync(self.fs.loop, zonal, bucket))

    def write_lease(self, data: bytes, token: Any) -> bool:
        """A conditional upload: False when another writer changed (or created) the lease
        since ``token`` (its generation) was read."""
        path = f"{self.root}/{LEASE_NAME}"
        with storage_errors(f"cannot write the writer lease of {self.display}"):
            try:
                _upload(self.fs, path, [data], ifGenerationMatch=str(token or 0))
            except FileExistsError:  # gcsfs' translation of 412 Precondition Failed
                return False
            finally:
                self._fresh(path)
        return True
