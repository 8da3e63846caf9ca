"""``forge-dist inspect URL [--step N] [--json]``: one checkpoint's manifest, readably."""

from __future__ import annotations

import argparse
import json
from typing import Any

from forge_dist.cli.common import EXIT_INTEGRITY, EXIT_OK, resolve_step
from forge_dist.cli.output import fmt_metric, human_bytes, print_json, stdout_console


def position(state: dict[str, Any]) -> str:
    """Where in training the step was taken, counted as Keras counts (from 1)."""
    epoch = state.get("epoch")
    if epoch is None:
        return "-"
    if state.get("epoch_done", True) or state.get("batch") is None:
        return f"epoch {epoch + 1} end"
    where = f"epoch {epoch + 1}, batch {state['batch'] + 1}"
    if state.get("samples") is not None:  # fit_resumed(shard=True): valid at any rank count
        where += f" (sample {state['samples']} of the epoch)"
    return where


def run_label(run: Any) -> str:
    if not isinstance(run, dict) or not run.get("id"):
        return "-"
    return run["id"] + (f" ({run['name']})" if run.get("name") else "")


def cmd_inspect(args: argparse.Namespace) -> int:
    store, info = resolve_step(args.url, args.storage_options, args.step)
    m = info.manifest
    code = EXIT_OK if m is not None else EXIT_INTEGRITY
    if args.json:
        print_json(
            "inspect",
            store.display,
            code,
            name=info.name,
            step=info.step,
            ok=m is not None,
            error=info.error,
            manifest=m.to_dict() if m is not None else None,
        )
        return code
    con = stdout_console()
    if m is None:
        con.print(f"[red]corrupt[/] {info.name} in {store.display}: {info.error}")
        return code
    state = dict(m.state)
    run = dict(m.run)
    writer = ", ".join(f"{k}={v}" for k, v in m.writer.items())
    lines = [
        f"[bold]{info.name}[/] in {store.display}",
        f"  created     {m.created}",
        f"  position    {position(state)}  (step {m.step})",
        f"  run         {run_label(run)}"
        + (f", SLURM job {run['slurm_job_id']}" if run.get("slurm_job_id") else ""),
        f"  model       {run.get('model_fingerprint', '-')}",
        f"  writer      {writer or '-'}",
        f"  files       {len(m.files)}, {human_bytes(m.total_bytes)}",
    ]
    lines += [f"    {e.path}  {human_bytes(e.size)}  sha256 {e.sha256[:16]}…" for e in m.files]
    if m.metrics:
        metrics = ", ".join(f"{k}={fmt_metric(v)}" for k, v in sorted(m.metrics.items()))
        lines.append(f"  metrics     {metrics}")
    if state.get("meta"):  # forge-dist put --meta KEY=TEXT
        meta = ", ".join(f"{k}={v}" for k, v in sorted(state["meta"].items()))
        lines.append(f"  meta        {meta}")
    if state.get("learning_rate") is not None:
        lines.append(f"  lr          {state['learning_rate']:.6g}")
    for name, cb_state in sorted((state.get("callbacks") or {}).items()):
        lines.append(f"  {name:<11} {json.dumps(cb_state, sort_keys=True)}")
    for line in lines:
        con.print(line, markup=line.startswith("[bold]"), highlight=False)
    return code


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    ins = sub.add_parser("inspect", parents=[common], help="show one checkpoint's manifest")
    ins.add_argument("url", help="a checkpoint root, or one checkpoint folder")
    ins.add_argument("--step", type=int, help="this step of the root (default: the newest)")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)
