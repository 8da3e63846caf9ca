"""S3 (``s3://``, ``s3a://``, through s3fs): the manifest-last commit of
:class:`~.objects.ObjectBackend`, with S3's own calls where they do better than fsspec's
generic ones:

- a manifest or the lease in one GET (a generic read is a HEAD and a GET);
- a step's whole state at ``begin`` in one LIST of its prefix;
- payload uploads in concurrent parts, reads in ranges fetched ahead (:mod:`.s3wire`);
- the writer lease by conditional PUT (``If-Match`` its ETag, ``If-None-Match: *`` for
  the first), which AWS and moto honour: a writer that lost the lease cannot write it.
"""

from __future__ import annotations

from typing import Any

from forge_dist.errors import StorageError
from forge_dist.storage._errors import storage_errors
from forge_dist.storage.backends import s3wire
from forge_dist.storage.backends.base import LEASE_NAME, Sink
from forge_dist.storage.backends.objects import ObjectBackend
from forge_dist.storage.manifest import MANIFEST_NAME


class S3Backend(ObjectBackend):
    conditional_writes = True
    reader = s3wire.RangeReader

    @classmethod
    def prepare_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The store's S3 client validates no GET's checksum itself unless the options say
        so: every byte the store reads (verify, download, copy) is hashed against the
        manifest's sha256, and botocore's check of the same bytes (a CRC-32, or a second
        sha256 for objects uploaded with theirs) ran on the one event-loop thread every
        transfer shares (~30 % of it in a verify, profiled)."""
        try:
            from botocore.config import Config
        except ImportError:  # s3fs missing: make_backend says so
            return options
        config = dict(options.get("config_kwargs") or {})
        if "response_checksum_validation" in Config.OPTION_DEFAULTS:
            config.setdefault("response_checksum_validation", "when_required")
        return {**options, "config_kwargs": config}

    @classmethod
    def accepts(cls, fs: Any) -> bool:
        return callable(getattr(fs, "_call_s3", None))

    def __init__(self, fs: Any, root: str, display: str) -> None:
        super().__init__(fs, root, display)
        self._call = fs._call_s3  # s3fs's coroutine: one S3 API call, retried

    def _s3(self, method: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self._call, method, **kwargs)

    def _get_small(self, path: str, limit: int) -> tuple[bytes, Any] | None:
        """A small object and its ETag in one GET; None when it is missing."""
        from fsspec.asyn import sync

        bucket, key = path.split("/", 1)
        try:
            return sync(self.fs.loop, s3wire.get_small, self._call, bucket, key, limit)
        except FileNotFoundError:
            return None

    def _step_state(self, name: str) -> tuple[bool, bool]:
        """One LIST of the step's prefix (a page per 1000 keys) says all three things
        ``begin`` needs: the bucket is there, whether the step is committed, and
        leftovers."""
        bucket, prefix = self._p(name).split("/", 1)
        keys: list[str] = []
        token: dict[str, Any] = {}
        with storage_errors(f"cannot list {name} in {self.display}"):
            while True:
                try:
                    page = self._s3("list_objects_v2", Bucket=bucket, Prefix=prefix + "/", **token)
                except FileNotFoundError:
                    raise StorageError(
                        f"bucket {bucket!r} of {self.display} does not exist"
                    ) from None
                keys += [c["Key"][len(prefix) + 1 :] for c in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    break
                token = {"ContinuationToken": page["NextContinuationToken"]}
        return MANIFEST_NAME in keys, bool(keys)

    def open_write(self, staging: str, rel: str) -> Sink:
        with storage_errors(f"cannot create {rel} in {staging}"):
            return s3wire.PartsSink(self.fs, self._p(staging, rel))

    def write_lease(self, data: bytes, token: Any) -> bool:
        """A conditional PUT: False when another writer changed (or created) the lease
        since ``token`` (its ETag) was read."""
        path = f"{self.root}/{LEASE_NAME}"
        bucket, key = path.split("/", 1)
        match = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        with storage_errors(f"cannot write the writer lease of {self.display}"):
            try:
                self._s3("put_object", Bucket=bucket, Key=key, Body=data, **match)
            except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
                return False
            except Exception as e:
                if "PreconditionFailed" in str(e) or "pre-conditions" in str(e):
                    return False
                raise
            finally:
                self._fresh(path)
        return True
