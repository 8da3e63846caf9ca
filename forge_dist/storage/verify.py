"""Checking a committed step against its manifest (docs/DESIGN.md, "Verification and reading").

Readers and ``verify`` share :func:`load_manifest`: a step is committed when its folder
holds a manifest, and intact when that manifest parses, names the folder's step, and
every listed file is present, regular, of the listed size and (``full``) hash.
Only paths the validator accepts are ever opened, and links are never followed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from forge_dist.errors import ManifestError, StorageError
from forge_dist.storage.backends import Backend, FileStat
from forge_dist.storage.hashing import Progress, default_workers, hash_stream
from forge_dist.storage.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    parse_manifest,
    parse_step_dirname,
)
from forge_dist.storage.types import CheckpointReport, Problem


def load_manifest(backend: Backend, name: str) -> Manifest | None:
    """The manifest of folder ``name``; None if it has none (not committed). A manifest
    that is unreadable, invalid or names another step raises :class:`ManifestError`."""
    data = backend.read_manifest(name)
    if data is None:
        return None
    manifest = parse_manifest(data)
    step = parse_step_dirname(name)
    if step is not None and manifest.step != step:
        raise ManifestError(f"manifest says step {manifest.step} but the folder is {name}")
    return manifest


def content_problem(entry: FileEntry, size: int, digest: str) -> Problem | None:
    """What is wrong with a file read back as ``size`` bytes hashing to ``digest``."""
    if size != entry.size:
        return Problem(
            "size_mismatch",
            entry.path,
            f"size mismatch: expected {entry.size} bytes, read {size}",
            expected=entry.size,
            actual=size,
        )
    if digest != entry.sha256:
        return Problem(
            "hash_mismatch",
            entry.path,
            "content differs from the manifest (sha256 mismatch)",
            expected=entry.sha256,
            actual=digest,
        )
    return None


def stat_problem(entry: FileEntry, st: FileStat | None) -> Problem | None:
    """What is wrong with a listed file as found on storage (presence, kind, size)."""
    if st is None:
        return Problem("missing", entry.path, "file is missing", expected=entry.size)
    if st.symlink:
        return Problem(
            "unsafe_path",
            entry.path,
            "is (or lies under) a symbolic link; links are never followed",
        )
    if not st.regular:
        return Problem("not_a_file", entry.path, "is not a regular file")
    if st.size != entry.size:
        return Problem(
            "size_mismatch",
            entry.path,
            f"size mismatch: expected {entry.size} bytes, found {st.size}",
            expected=entry.size,
            actual=st.size,
        )
    return None


def verify_checkpoint(
    backend: Backend,
    name: str,
    *,
    full: bool = True,
    strict: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> CheckpointReport:
    """Check folder ``name``: ``full=False`` checks presence and sizes, ``full=True``
    also hashes every byte (files in parallel). Unlisted files are problems, fatal only
    when ``strict``."""
    report = CheckpointReport(name, parse_step_dirname(name), "full" if full else "fast")
    try:
        manifest = load_manifest(backend, name)
    except ManifestError as e:
        report.problems.append(Problem("bad_manifest", MANIFEST_NAME, str(e)))
        return report
    if manifest is None:
        report.problems.append(
            Problem("uncommitted", MANIFEST_NAME, f"{name} has no {MANIFEST_NAME}: not committed")
        )
        return report
    report.step, report.manifest = manifest.step, manifest
    to_hash: list[FileEntry] = []
    # One listing gives every file's size (on an object store one LIST instead of a
    # HEAD per file); what it does not show (say, a file under a linked folder) is
    # looked at alone.
    listing = backend.walk(name)
    for entry in manifest.files:
        st = listing.get(entry.path)
        problem = stat_problem(entry, st if st is not None else backend.stat(name, entry.path))
        if problem is not None:
            report.problems.append(problem)
            continue
        report.files_checked += 1
        if full:
            to_hash.append(entry)
        else:
            report.bytes_checked += entry.size
    listed = {e.path for e in manifest.files}
    for rel, st in sorted(listing.items()):
        if rel not in listed:
            what = "symbolic link" if st.symlink else "file"
            report.problems.append(
                Problem("unlisted", rel, f"unlisted {what} (not in the manifest)", fatal=strict)
            )
    if to_hash:
        _hash_entries(backend, name, to_hash, report, progress, workers)
    return report


def _hash_entries(
    backend: Backend,
    name: str,
    entries: list[FileEntry],
    report: CheckpointReport,
    progress: Progress | None,
    workers: int | None,
) -> None:
    def one(entry: FileEntry) -> Problem | None:
        try:
            with backend.open_read(name, entry.path) as f:
                size, digest = hash_stream(f, progress)
        except StorageError as e:
            return Problem("io_error", entry.path, str(e))
        return content_problem(entry, size, digest)

    n = workers or default_workers(len(entries), backend.parallel_files)
    ordered = sorted(entries, key=lambda e: -e.size)  # largest first keeps the pool busy
    if n <= 1:
        results = [one(e) for e in ordered]
    else:
        with ThreadPoolExecutor(n, thread_name_prefix="forge-dist-hash") as pool:
            results = list(pool.map(one, ordered))
    for entry, problem in zip(ordered, results, strict=True):
        if problem is None:
            report.bytes_checked += entry.size
        else:
            report.problems.append(problem)
            report.files_checked -= 1
    report.problems.sort(key=lambda p: (p.path or "", p.kind))
