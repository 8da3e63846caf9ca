"""Azure Blob Storage (``az://``, ``abfs://``, through adlfs): the manifest-last commit of
:class:`~.objects.ObjectBackend`, with the Blob service's own calls where they do better
than fsspec's generic ones:

- a manifest or the lease in one GET that also returns its ETag (a generic read is a
  HEAD and a GET, and the ETag of the HEAD may belong to another version than the bytes);
- the writer lease by conditional Put Blob (``If-Match`` its ETag, ``If-None-Match: *``
  for the first), which the Blob service and Azurite honour: a writer that lost the lease
  cannot write it.

Credentials come from adlfs' usual sources (``AZURE_STORAGE_CONNECTION_STRING``,
``AZURE_STORAGE_ACCOUNT_NAME`` with ``AZURE_STORAGE_ACCOUNT_KEY`` or
``AZURE_STORAGE_SAS_TOKEN``, or the storage options of the same names).
"""

from __future__ import annotations

from typing import Any

from forge_dist.errors import ManifestError
from forge_dist.storage._errors import storage_errors
from forge_dist.storage.backends.base import LEASE_NAME
from forge_dist.storage.backends.objects import ObjectBackend

#: The 409 that If-None-Match: * gets from an existing blob (other 409s, an Azure blob
#: lease or an immutability policy, are errors, not a lost race).
_EXISTS = "BlobAlreadyExists"  # (the SDK's StorageErrorCode is a str enum)


class AzureBackend(ObjectBackend):
    conditional_writes = True

    @classmethod
    def accepts(cls, fs: Any) -> bool:
        return hasattr(fs, "service_client") and callable(getattr(fs, "split_path", None))

    def _run(self, func: Any, *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, func, *args)

    def _get_small(self, path: str, limit: int) -> tuple[bytes, str] | None:
        return self._run(self._aget_small, path, limit)

    async def _aget_small(self, path: str, limit: int) -> tuple[bytes, str] | None:
        from azure.core.exceptions import ResourceNotFoundError

        container, blob, _ = self.fs.split_path(path)
        async with self.fs.service_client.get_blob_client(container, blob) as bc:
            try:
                stream = await bc.download_blob()
            except ResourceNotFoundError:
                return None
            if (stream.size or 0) > limit:
                raise ManifestError(f"{path.rsplit('/', 1)[-1]} is larger than {limit} bytes")
            return await stream.readall(), stream.properties.etag

    async def _put_if(self, path: str, data: bytes, etag: str | None) -> bool:
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )

        container, blob, _ = self.fs.split_path(path)
        if etag:
            cond: dict[str, Any] = {
                "overwrite": True,
                "etag": etag,
                "match_condition": MatchConditions.IfNotModified,
            }
        else:
            cond = {"overwrite": False}  # If-None-Match: *
        async with self.fs.service_client.get_blob_client(container, blob) as bc:
            try:
                await bc.upload_blob(data, **cond)
            except ResourceModifiedError:  # 412: If-Match named another version
                return False
            except ResourceExistsError as e:  # 409: If-None-Match: *, or something else
                if getattr(e, "error_code", None) == _EXISTS:
                    return False
                raise
            except ResourceNotFoundError:
                if etag:  # If-Match on a lease removed since it was read
                    return False
                raise
        return True

    def write_lease(self, data: bytes, token: Any) -> bool:
        """A conditional Put Blob: False when another writer changed (or created) the
        lease since ``token`` (its ETag) was read."""
        path = f"{self.root}/{LEASE_NAME}"
        with storage_errors(f"cannot write the writer lease of {self.display}"):
            try:
                return self._run(self._put_if, path, data, token)
            finally:
                self._fresh(path)
