"""A trained ``models.vae`` run, restored from its checkpoint, for the benchmark scripts."""

from __future__ import annotations

import sys
from pathlib import Path

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from models.datasets import load_dataset  # noqa: E402
from models.vae import build, parse_args, train  # noqa: E402


def split_argv(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """The script's own arguments and, after ``--``, the run's command line."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    return argv[:split], argv[split + 1 :]


def restore_run(run: Path, run_argv: list[str]):
    """``(args, data, model, guide, history)`` of the run in ``run``, trained no further.

    ``run_argv`` is the run's own command line; its checkpoint must exist, else the
    restore would silently train the run from scratch.
    """
    checkpoint = run / "checkpoint.pt"
    if not checkpoint.exists():
        raise SystemExit(f"no checkpoint at {checkpoint}: train the run first")
    args = parse_args([*run_argv, "--out", str(run), "--no-progress"])
    pyro.enable_validation(False)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_dataset(args.dataset, root=args.root)
    model, guide, loss = build(args, data.train)
    history = train(args, model, guide, loss, data, checkpoint)  # restores, trains no more
    return args, data, model, guide, history
