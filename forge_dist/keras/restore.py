"""``restore_latest``: every rank resumes from the newest checkpoint that verifies.

Only the chief reads storage (a corrupt newest step is reported and skipped); it loads
the weights and optimizer variables and broadcasts them with the callbacks' state, which
forge_dist's callbacks pick up in ``on_train_begin``. Pass the returned
``initial_epoch`` to ``model.fit``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from forge_dist._launch import fresh_start_allowed, restarts
from forge_dist._urls import redact_url
from forge_dist.comm import Communicator, agree, get_communicator
from forge_dist.errors import ConfigurationError, IntegrityError
from forge_dist.keras import _compat, _read_step
from forge_dist.keras._state import WEIGHTS_OF_EPOCH, Restored, registry, root_key, set_pending
from forge_dist.keras.callbacks.broadcast import assign_optimizer_variables
from forge_dist.keras.run import check_same_model

log = logging.getLogger("forge_dist.keras")


@dataclass
class RestoreResult:
    restored: bool
    step: int | None = None
    epoch: int | None = None  # last epoch (0-based) the checkpoint saw
    initial_epoch: int = 0  # what to pass to model.fit
    initial_batch: int = 0  # batches of initial_epoch already trained (fit_resumed skips them)
    state: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # corrupt steps passed over
    run: dict[str, Any] = field(default_factory=dict)  # the run it continues (id, name, ...)
    #: Mid-epoch, from a run that used ``fit_resumed(shard=True)``: global samples of
    #: ``initial_epoch`` already trained (a position valid at any number of ranks).
    initial_sample: int | None = None
    world_size: int | None = None  # ranks of the job that saved it (None: not recorded)
    #: Where the step was read: the root (credentials redacted), or the local folder
    #: followed by "(the local tier)" for a step read from ``local_directory``.
    read_from: str | None = None


def _weights_of_epoch(
    cands: list[tuple[Any, Any]], epoch: int, chosen: Any, weights: Any, fetch: Any, verify: str
) -> Any:
    """Weights at the end of ``epoch``: the restored step's own when it is that epoch's
    end, else those of an intact checkpoint taken at that epoch's end (on either tier),
    else None. ``cands`` are ``(store, info)``, newest first."""
    if epoch == chosen.state.get("epoch"):
        return weights
    for store, c in cands:
        if not (c.readable and c.state.get("epoch") == epoch and c.state.get("epoch_done")):
            continue
        if not store.is_intact(c, "fast" if verify == "full" else verify):
            continue
        try:
            return fetch(store, c)[0]  # every byte hashed as it is read
        except IntegrityError as e:
            log.warning("skipping corrupt %s in %s: %s", c.name, store.display, e)
    return None


def _candidates(store: Any, infos: list[Any], local: Any) -> list[tuple[Any, Any]]:
    """``(store, info)`` of both tiers, newest step first, the local copy of a step
    before the durable one. Local steps count only when they are the durable root's run
    (a node-local folder may hold what another job left there)."""
    pairs = [(c.step, 1, store, c) for c in infos]
    if local is not None and local.root_exists():
        runs = [c.manifest.run.get("id") for c in infos if c.manifest is not None]
        for c in local.list():
            if runs and (c.manifest is None or c.manifest.run.get("id") != runs[-1]):
                log.warning("%s in %s is another run's: not restored", c.name, local.display)
                continue
            pairs.append((c.step, 0, local, c))
    pairs.sort(key=lambda p: (-p[0], p[1]))
    return [(st, c) for _, _, st, c in pairs]


def _not_a_root(directory: str, storage_options: Any) -> None:
    """A step folder given where a root belongs is an error naming the root."""
    from forge_dist.storage import CheckpointStore
    from forge_dist.storage.manifest import parse_step_dirname

    root, _, base = directory.rstrip("/").rpartition("/")
    step = parse_step_dirname(base)
    if step is not None and root and CheckpointStore(root, storage_options).is_committed(base):
        raise ConfigurationError(
            f"{redact_url(directory)} is one checkpoint folder, not a checkpoint root: pass "
            f"{redact_url(root)} (with step={step} for that one)"
        )


def _whereabouts(directory: str, what: str) -> str:
    """Where the chief looked and what it found, for the error of a restarted job that
    finds nothing: the host, and for a local root whether its filesystem is node-local."""
    import socket

    from forge_dist._launch import NODE_LOCAL_FS, mount_of

    said = f"{redact_url(directory)} {what} on {socket.gethostname()} (the chief)"
    if "://" in directory and not directory.startswith("file://"):
        return f"{said}: is it the URL the first attempt wrote to?"
    mount = mount_of(directory.removeprefix("file://"))
    if mount is not None and mount[0] in NODE_LOCAL_FS:
        return (
            f"{said}. It is on {mount[0]} (mounted at {mount[1]}), local to this node: what "
            "the first attempt wrote there stayed on the node it ran on, and a requeued job "
            "may land on other nodes. Put the checkpoint root on a filesystem every node "
            "shares, or in a bucket"
        )
    return f"{said}: is it the directory the first attempt wrote, on storage every node sees?"


def _chief_restore(
    directory: str,
    storage_options: Any,
    verify: str,
    model: Any,
    custom_objects: Any,
    epoch_end_only: bool = False,
    step: int | None = None,
    read: Any = None,
    local_directory: str | None = None,
) -> Any:
    """Chief: ``(loaded or None, corrupt steps skipped, passed over)``: the newest intact
    step (with ``epoch_end_only``, the newest taken at an epoch's end; ``passed over``
    names the newer mid-epoch ones, and ``loaded`` is None with only those; with
    ``step``, that one, or an error), on either tier with ``local_directory``.
    ``read(store, info)`` reads the step chosen (by default :func:`._read_step.fetch`,
    here alone)."""
    from forge_dist.storage import CheckpointStore
    from forge_dist.storage.manifest import STEP_RE

    store = CheckpointStore(directory, storage_options)
    local = CheckpointStore(local_directory) if local_directory is not None else None
    local_steps = local is not None and local.root_exists() and bool(local.steps())
    if not store.root_exists() and not local_steps:
        if step is not None:
            raise ConfigurationError(
                f"no step {step} to restore: {redact_url(directory)} does not exist"
            )
        # A first run; only a restarted job's error says where the chief looked.
        said = _whereabouts(directory, "does not exist") if restarts() else ""
        return ("missing", said, "it does not exist yet"), [], []
    if STEP_RE.match(directory.rstrip("/").rsplit("/", 1)[-1]):
        _not_a_root(directory, storage_options)
    infos = store.list() if store.root_exists() else []
    if not infos and not local_steps and step is None and restarts() and store.lease() is None:
        # No step and no writer ever took this root: nothing of the first attempt is here.
        said = _whereabouts(directory, "holds no trace of a run")
        return ("missing", said, "it holds no step and no writer ever took it"), [], []
    cands = _candidates(store, infos, local)
    skipped: list[str] = []
    passed: list[Any] = []
    chosen = None
    # Reading a step for the restore hashes every byte of it (in place or downloaded):
    # "full" checks sizes first and leaves the hashes to that one read.
    first_check = "fast" if verify == "full" else verify
    have = ", ".join(sorted({str(c.step) for _, c in cands}, key=int)) or "none"
    damaged = (
        f"step {step} in {redact_url(directory)} is damaged (forge-dist verify "
        f"{redact_url(directory)} --step {step} says how); steps there: {have}"
    )
    if step is not None:
        cands = [(st, c) for st, c in cands if c.step == step]
        if not cands:
            raise ConfigurationError(
                f"no committed step {step} in {redact_url(directory)} (steps there: {have})"
            )
        if not any(st.is_intact(c, first_check) for st, c in cands):
            raise ConfigurationError(damaged)

    def fetch(st: Any, info: Any) -> tuple:
        return _read_step.fetch(st, info, model, custom_objects)

    def label(st: Any, info: Any) -> str:
        return info.name if st is store else f"{info.name} (in {st.display})"

    fetched = None
    for i, (st, info) in enumerate(cands):
        if not st.is_intact(info, first_check):
            skipped.append(label(st, info))
            continue
        if epoch_end_only and not info.state.get("epoch_done", True):
            passed.append(info)
            continue
        assert info.manifest is not None
        fingerprint = info.manifest.run.get("model_fingerprint")
        check_same_model(fingerprint, model, info.step, st.display)
        try:
            fetched = read(st, info) if read is not None else fetch(st, info)
        except IntegrityError as e:
            if step is not None and not any(c.step == step for _, c in cands[i + 1 :]):
                raise ConfigurationError(damaged) from e
            log.warning("skipping corrupt %s in %s: %s", info.name, st.display, e)
            skipped.append(label(st, info))
            continue
        chosen = (st, info)
        break
    if chosen is None or fetched is None:
        run = dict(passed[0].manifest.run) if passed and passed[0].manifest else None
        return (None if run is None else ("run", run)), skipped, _names(passed)
    st, info = chosen
    assert info.manifest is not None
    state = dict(info.state)
    weights, opt_values = fetched
    # A callback's state may ask for the weights of an earlier epoch (EarlyStopping's
    # best); a checkpoint kept for that epoch holds them (production_callbacks keeps the
    # best one).
    restored: dict[str, Restored] = {}
    for name, cb_state in (state.get("callbacks") or {}).items():
        epoch = cb_state.get(WEIGHTS_OF_EPOCH) if isinstance(cb_state, dict) else None
        extra = None
        if epoch is not None:
            extra = _weights_of_epoch(cands, epoch, info, weights, fetch, verify)
            if extra is None:
                log.warning(
                    "no intact checkpoint of epoch %s for %s: it will use what it sees after "
                    "resuming",
                    epoch,
                    name,
                )
        restored[name] = Restored(cb_state, extra)
    run = dict(info.manifest.run)
    where = redact_url(directory) if st is store else f"{st.display} (the local tier)"
    return (info.step, state, weights, opt_values, restored, run, where), skipped, _names(passed)


def _names(passed: list[Any]) -> list[str]:
    """Each step's name once (a step passed over may be on both tiers)."""
    return list(dict.fromkeys(p.name for p in passed))


def _decide(
    comm: Any,
    read_on: str,
    directory: str,
    storage_options: Any,
    verify: str,
    model: Any,
    custom_objects: Any,
    epoch_end_only: bool,
    step: int | None,
    local_directory: str | None = None,
) -> Any:
    """The chief's decision (:func:`_chief_restore`) on every rank, the step it chose read
    by every rank or by the chief alone (see :mod:`._rank_reads`)."""
    from forge_dist.keras import _rank_reads

    def decide(read: Any = None) -> Any:
        return _chief_restore(
            directory,
            storage_options,
            verify,
            model,
            custom_objects,
            epoch_end_only,
            step,
            read,
            local_directory,
        )

    if read_on == "chief" or comm.size == 1:
        return agree(comm, _rank_reads.NAME, decide)
    if comm.is_chief:
        fetch = _rank_reads.ChiefFetch(
            comm,
            lambda store, info: _read_step.fetch_in_place(store, info, model, direct=False),
            lambda store, info: _read_step.fetch(store, info, model, custom_objects),
        )
        return _rank_reads.lead(comm, decide, fetch)
    from forge_dist.storage import CheckpointStore

    stores: list[Any] = []

    def read(info: Any) -> tuple | None:
        if not stores:
            stores.append(CheckpointStore(directory, storage_options))
        return _read_step.fetch_in_place(stores[0], info, model, direct=False)

    return _rank_reads.follow(comm, read)


def _apply(model: Any, weights: Any, opt_values: Any, state: dict[str, Any]) -> None:
    """Put the restored weights, optimizer variables and learning rate into ``model``."""
    model.set_weights(weights)
    if model.optimizer is not None and opt_values is not None:
        _compat.ensure_optimizer_built(model)
        assign_optimizer_variables(model, opt_values)
    if model.optimizer is not None and state.get("learning_rate") is not None:
        _compat.set_lr(model.optimizer, float(state["learning_rate"]))


def _position(state: dict[str, Any]) -> tuple[int, int]:
    """``(initial_epoch, initial_batch)`` to continue from ``state``."""
    epoch = state.get("epoch")
    epoch_done = state.get("epoch_done", True)
    initial = 0 if epoch is None else int(epoch) + (1 if epoch_done else 0)
    batch = state.get("batch")
    return initial, 0 if epoch_done or batch is None else int(batch) + 1


def restore_latest(
    model: Any,
    directory: str,
    storage_options: dict[str, Any] | None = None,
    communicator: Communicator | None = None,
    verify: str = "full",
    custom_objects: dict[str, Any] | None = None,
    verbose: int = 1,
    step: int | None = None,
    epoch_end_only: bool = False,
    allow_fresh_start: bool = False,
    read_on: str = "chief",
    local_directory: str | None = None,
) -> RestoreResult:
    """Restore ``model`` (built and compiled) on every rank from the newest intact
    checkpoint under ``directory``; return what was restored and the ``initial_epoch``.

    The chief picks the step. With ``read_on="chief"`` (the default) it reads the step
    alone and sends it to every rank, so no other rank touches the root. With
    ``read_on="every_rank"`` every rank reads that step itself, hashing every byte
    against the manifest the chief read, and the chief sends its own verified arrays
    only to make up for a rank that could not (the root is local to the chief's node,
    its copy differs); faster where every rank sees the root (0.56–0.82× of the
    chief's read and broadcast at 2, 4 and 8 ranks in benchmarks/bench_resume_ranks.py).

    ``step=N`` restores that step (an error when it is missing or damaged);
    ``epoch_end_only=True`` the newest taken at an epoch's end (to continue on another
    number of ranks, say, where a mid-epoch position does not carry over). With no
    checkpoint yet, nothing changes and ``initial_epoch`` is 0, and the chief says so;
    a job that the scheduler restarted (``SLURM_RESTART_COUNT``) finding no trace of a
    run at ``directory`` (no folder, or no step and no writer lease) is an error on every
    rank naming the chief's host and, for a node-local filesystem, that cause: the first
    attempt wrote somewhere, and starting over would silently lose it.
    ``allow_fresh_start=True`` (or ``FORGE_DIST_ALLOW_FRESH_START=1``) starts over
    instead. A step folder given as ``directory`` is an error naming the root.
    ``verbose`` (default 1) has the chief say what it restored.

    Two tiers (``ChiefModelCheckpoint(local_directory=...)``): pass the same
    ``local_directory`` and the newest step that verifies on either tier is restored,
    the local copy first (a step not yet durable is found there on the node that wrote
    it; a job requeued onto another node resumes from ``directory``). Local steps of
    another run than ``directory``'s are passed over."""
    comm = communicator if communicator is not None else get_communicator("auto")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ConfigurationError(f"step must be a step number (an int >= 0), got {step!r}")
    return restore(
        model,
        directory,
        storage_options,
        comm,
        verify,
        custom_objects,
        verbose,
        epoch_end_only,
        step,
        allow_fresh_start,
        read_on,
        local_directory,
    )


def restore(
    model: Any,
    directory: str,
    storage_options: dict[str, Any] | None,
    comm: Any,
    verify: str = "full",
    custom_objects: dict[str, Any] | None = None,
    verbose: int = 1,
    epoch_end_only: bool = False,
    step: int | None = None,
    allow_fresh_start: bool = False,
    read_on: str = "chief",
    local_directory: str | None = None,
) -> RestoreResult:
    """:func:`restore_latest`; with ``epoch_end_only`` from the newest step taken at an
    epoch's end (what a plain ``model.fit`` can continue from)."""
    if comm.multi_worker:
        import tensorflow as tf

        if tf.distribute.in_cross_replica_context() and tf.distribute.has_strategy():
            raise ConfigurationError(
                "call restore_latest outside strategy.scope(): the chief loads the checkpoint "
                "alone, and a load inside a MultiWorkerMirroredStrategy scope would need "
                "every worker"
            )
    if verify not in ("fast", "full"):
        raise ConfigurationError(f"verify must be 'fast' or 'full', got {verify!r}")
    if local_directory is not None and (
        not isinstance(local_directory, str) or not local_directory
    ):
        raise ConfigurationError(
            f"local_directory must be a non-empty string, got {local_directory!r}"
        )
    if read_on not in ("every_rank", "chief"):
        raise ConfigurationError(f"read_on must be 'every_rank' or 'chief', got {read_on!r}")
    loaded, skipped, passed = _decide(
        comm,
        read_on,
        directory,
        storage_options,
        verify,
        model,
        custom_objects,
        epoch_end_only,
        step,
        local_directory,
    )
    where = redact_url(directory)
    if loaded is not None and loaded[0] == "missing":
        found, loaded_why = loaded[1], loaded[2]
        loaded = None
        if restarts() and not (allow_fresh_start or fresh_start_allowed()):
            raise ConfigurationError(
                f"this job was restarted (SLURM_RESTART_COUNT={restarts()}), so an earlier "
                f"attempt trained, but {found}. Starting over would silently lose its "
                "training; to start over anyway pass allow_fresh_start=True "
                "(or set FORGE_DIST_ALLOW_FRESH_START=1)"
            )
        if verbose:
            tell(comm, f"no checkpoint in {where} ({loaded_why}): training from the start")
    elif loaded is None and not skipped and verbose:
        tell(comm, f"no checkpoint in {where} yet: training from the start")
    if passed and verbose:
        tell(
            comm,
            f"{where}: passed over {len(passed)} step(s) taken mid-epoch ({', '.join(passed)}): "
            "a plain fit continues from an epoch's end (fit_resumed continues mid-epoch)",
        )
    if loaded is None or loaded[0] == "run":
        if loaded is not None:  # only mid-epoch steps: the same run goes on from the start
            registry(model).runs[root_key(directory)] = loaded[1]
        if skipped and verbose:
            tell(
                comm,
                f"no intact checkpoint in {where}: {len(skipped)} "
                f"corrupt step(s) skipped ({', '.join(skipped)})",
            )
        return RestoreResult(False, skipped=skipped)
    step, state, weights, opt_values, restored, run, read_from = loaded
    saved_by = state.get("world_size")
    if (
        not state.get("epoch_done", True)
        and state.get("samples") is None
        and (saved_by is not None and saved_by != comm.size)
    ):
        raise ConfigurationError(
            f"step {step} in {where} was saved mid-epoch by {saved_by} rank(s), each on its "
            f"own data, and this job has {comm.size}: a rank's position in its own data does "
            f"not carry over. Run on {saved_by} rank(s), or continue from the newest "
            "checkpoint taken at an epoch end: restore_latest(..., epoch_end_only=True) "
            "(scripts/train.py --resume-epoch-end). Nothing was restored"
        )
    _apply(model, weights, opt_values, state)
    registry(model).runs[root_key(directory)] = run
    set_pending(model, restored, state.get("epoch"), step, state.get("epoch_done", True))
    initial, initial_batch = _position(state)
    if verbose:
        epoch = state.get("epoch")
        at = "its end" if state.get("epoch_done", True) else f"batch {initial_batch}"
        if not state.get("epoch_done", True) and state.get("samples") is not None:
            at = f"sample {state['samples']}"
        note = f"; skipped corrupt: {', '.join(skipped)}" if skipped else ""
        tell(
            comm,
            f"resumed from step {step} in {read_from}: epoch {epoch + 1} at {at}"
            f" (weights, optimizer state, learning rate and callback state restored){note}",
        )
    mid_epoch = initial_batch > 0
    return RestoreResult(
        True,
        step,
        state.get("epoch"),
        initial,
        initial_batch,
        state,
        skipped,
        run,
        initial_sample=state.get("samples") if mid_epoch else None,
        world_size=state.get("world_size"),
        read_from=read_from,
    )


def tell(comm: Any, message: str) -> None:
    log.info(message)
    if comm is None or comm.is_chief:
        print(f"[forge_dist] {message}", flush=True)
