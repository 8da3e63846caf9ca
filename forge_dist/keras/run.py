"""Run identity: which run wrote a checkpoint, and which model it holds.

Every checkpoint records a run id (made at a fresh start, inherited on resume and
requeue), the user's run name, the SLURM job id and a fingerprint of the model's
structure. A fresh run into a root that holds another run's steps is refused before the
first step, and resuming a different model is refused with the two fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from typing import Any

from forge_dist.errors import ConfigurationError

OVERWRITE = (None, "archive", "delete")


class RunConflictError(ConfigurationError):
    """A fresh run was pointed at a root that holds another run's checkpoints."""


def model_fingerprint(model: Any) -> str:
    """A short hash of the model's variables' shapes and dtypes, in order (names are
    left out: Keras numbers layers per process)."""
    spec = [
        [list(map(int, w.shape)), str(getattr(w.dtype, "name", w.dtype))] for w in model.weights
    ]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def describe_model(model: Any) -> str:
    n = sum(math.prod(int(d) for d in w.shape) for w in model.weights)
    return f"{len(model.weights)} variables, {n} parameters"


def new_run(name: str | None) -> dict[str, Any]:
    return {"id": secrets.token_hex(6), "name": name}


def current(run: dict[str, Any], model: Any, name: str | None) -> dict[str, Any]:
    """``run`` as this attempt records it: its id, the name (a new one if given), this
    job's SLURM id, this model's fingerprint."""
    out = {**run, "model_fingerprint": model_fingerprint(model)}
    if name is not None:
        out["name"] = name
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        out["slurm_job_id"] = job
    return out


def describe_run(run: Any) -> str:
    if not isinstance(run, dict) or not run.get("id"):
        return "an unnamed run (written before run ids, or by hand)"
    name = f" ({run['name']})" if run.get("name") else ""
    job = f", SLURM job {run['slurm_job_id']}" if run.get("slurm_job_id") else ""
    return f"run {run['id']}{name}{job}"


#: What the run-conflict error tells the user to pass, where they built the checkpoint.
OVERWRITE_REMEDY = (
    "pass overwrite='archive' (local roots: the old steps move to an archive-* folder) or "
    "overwrite='delete' to ChiefModelCheckpoint"
)


def foreign_steps_error(
    display: str, infos: list[Any], remedy: str = OVERWRITE_REMEDY
) -> RunConflictError:
    newest = infos[-1]
    found = describe_run(newest.manifest.run if newest.manifest else None)
    corrupt = sum(1 for c in infos if c.manifest is None)
    note = f" ({corrupt} of them corrupt)" if corrupt else ""
    return RunConflictError(
        f"{display} already holds {len(infos)} committed step(s){note} of {found}, newest "
        f"step {newest.step}, and this run did not resume from it. Resume it (restore_latest "
        f"before fit; scripts/train.py --resume), write to another directory, or {remedy}"
    )


def check_same_model(recorded: Any, model: Any, step: int, display: str) -> None:
    """Resuming a checkpoint of another model is one clear error, not Keras' own."""
    mine = model_fingerprint(model)
    if isinstance(recorded, str) and recorded and recorded != mine:
        raise ConfigurationError(
            f"step {step} in {display} holds a different model (fingerprint {recorded}) from "
            f"the one being resumed (fingerprint {mine}: {describe_model(model)}); build the "
            "same model, or start a new run in another directory"
        )
