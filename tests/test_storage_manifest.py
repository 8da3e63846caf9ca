"""The manifest parser and path validator: every malformed input is one ManifestError."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge_dist.errors import ForgeDistError, ManifestError, UnsafePathError
from forge_dist.storage.manifest import (
    FORMAT,
    MAX_FILE_SIZE,
    FileEntry,
    Manifest,
    parse_manifest,
    validate_relpath,
)

H = "ab" * 32


def doc(**over):
    base = {
        "format": FORMAT,
        "step": 12,
        "created": "2026-11-27T10:00:00+00:00",
        "writer": {"host": "h", "rank": 0, "world_size": 2, "backend": "mpi"},
        "files": [{"path": "model.keras", "size": 10, "sha256": H}],
        "metrics": {"val_loss": 0.41},
        "state": {"early_stopping": {"wait": 1}},
        "versions": {"forge_dist": "0.1.0"},
    }
    base.update(over)
    return json.dumps(base).encode()


def test_round_trip_keeps_every_field_and_non_finite_metrics():
    m = Manifest(
        step=3,
        files=(FileEntry("a/b.bin", 5, H),),
        writer={"rank": 0},
        metrics={"loss": float("nan"), "best": float("inf"), "acc": 0.5},
        state={"x": [1, 2]},
    )
    back = parse_manifest(m.to_bytes())
    assert back.step == 3 and back.files == m.files and back.state == {"x": [1, 2]}
    assert back.metrics["acc"] == 0.5 and back.metrics["best"] == float("inf")
    assert back.metrics["loss"] != back.metrics["loss"]  # NaN survives as NaN
    assert json.loads(m.to_bytes())["format"] == FORMAT


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (doc()[:-20], "not valid JSON"),  # truncated
        (b"[1, 2]", "JSON object"),
        (doc(format="forge-dist/2"), "unsupported manifest format"),
        (doc(format=None), "unsupported manifest format"),
        (json.dumps({"format": FORMAT, "step": 1, "created": "2026-01-01"}).encode(), "'files'"),
        (json.dumps({"format": FORMAT, "files": [], "created": "2026-01-01"}).encode(), "'step'"),
        (doc(step=-1), "non-negative"),
        (doc(step=True), "non-negative"),
        (doc(step="12"), "non-negative"),
        (doc(created="yesterday"), "ISO-8601"),
        (doc(files={"a": 1}), "must be a list"),
        (doc(files=[{"path": "a", "size": -1, "sha256": H}]), "negative"),
        (doc(files=[{"path": "a", "size": MAX_FILE_SIZE + 1, "sha256": H}]), "implausibly"),
        (doc(files=[{"path": "a", "size": 1.5, "sha256": H}]), "integer"),
        (doc(files=[{"path": "a", "size": True, "sha256": H}]), "integer"),
        (doc(files=[{"path": "a", "size": 1, "sha256": "AB" * 32}]), "sha256"),
        (doc(files=[{"path": "a", "size": 1}]), "missing 'sha256'"),
        (doc(files=[{"path": "a", "size": 1, "sha256": H}] * 2), "duplicate"),
        (
            doc(
                files=[
                    {"path": "a", "size": 1, "sha256": H},
                    {"path": "a/b", "size": 1, "sha256": H},
                ]
            ),
            "under another",
        ),
        (doc(metrics={"loss": "high"}), "must be a number"),
        (doc(metrics=[1]), "'metrics' must be an object"),
        (doc(state=[1]), "'state' must be an object"),
        (doc(versions={"x": 1}), "versions"),
        (doc(writer="me"), "'writer'"),
        (b'{"format": "forge-dist/1", "format": "forge-dist/1"}', "repeats the key"),
        (doc().replace(b"0.41", b"NaN"), "non-JSON constant"),
    ],
)
def test_malformed_manifests_are_refused_with_a_clear_message(data, message):
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        parse_manifest(data)


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../outside",
        "a/../../b",
        "a/./b",
        "a//b",
        "a/",
        "",
        "a\\b",
        "..\\windows",
        "a\x00b",
        "C:/Windows/x",
        "c:evil",
        "line\nbreak",
        "manifest.json",
        "x" * 5000,
    ],
)
def test_unsafe_paths_are_refused(path):
    with pytest.raises(UnsafePathError):
        validate_relpath(path)
    with pytest.raises(UnsafePathError):
        parse_manifest(doc(files=[{"path": path, "size": 1, "sha256": H}]))


@pytest.mark.parametrize("path", ["model.keras", "a/b/c.h5", "sub/manifest.json", "..a", "a..b"])
def test_safe_paths_are_accepted(path):
    assert validate_relpath(path) == path


def test_non_string_path_is_refused():
    with pytest.raises(UnsafePathError):
        parse_manifest(doc(files=[{"path": 3, "size": 1, "sha256": H}]))


# ----------------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "path": st.one_of(
            st.text(max_size=20), st.integers(), st.sampled_from(["../x", "/a", "a"])
        ),
        "size": st.one_of(st.integers(min_value=-5, max_value=2**60), st.floats(), st.booleans()),
        "sha256": st.one_of(st.text(max_size=70), st.just(H)),
    },
)
manifests = st.fixed_dictionaries(
    {},
    optional={
        "format": st.one_of(st.just(FORMAT), st.text(max_size=12)),
        "step": st.one_of(st.integers(min_value=-3, max_value=2**40), st.text(max_size=3)),
        "created": st.one_of(st.just("2026-01-01T00:00:00"), st.text(max_size=25)),
        "files": st.one_of(st.lists(entry, max_size=4), json_values),
        "writer": json_values,
        "metrics": st.one_of(st.dictionaries(st.text(max_size=5), json_values), json_values),
        "state": json_values,
        "versions": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(manifests)
def test_fuzz_structured_manifests_only_raise_forge_errors(raw):
    data = json.dumps(raw).encode()
    try:
        m = parse_manifest(data)
    except ForgeDistError:
        return
    # Whatever is accepted is safe and round-trips.
    for e in m.files:
        assert validate_relpath(e.path) == e.path
        assert 0 <= e.size <= MAX_FILE_SIZE
    assert parse_manifest(m.to_bytes()).files == m.files


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_raw_bytes_only_raise_forge_errors(data):
    with contextlib.suppress(ForgeDistError):
        parse_manifest(data)


@settings(max_examples=600, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_path_validator(path):
    try:
        ok = validate_relpath(path)
    except ForgeDistError:
        return
    parts = ok.split("/")
    assert not ok.startswith("/") and "\\" not in ok and "\x00" not in ok
    assert all(p not in ("", ".", "..") for p in parts)
