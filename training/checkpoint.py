"""Checkpoints: safetensors weights + card.json, and a resumable trainer state, written atomically.

A checkpoint directory is written beside the old one and swapped in with renames, so a crash at
any moment leaves either the previous or the new checkpoint whole, never a mixture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medcl.card import Card

WEIGHTS_FILENAME = "model.safetensors"
OPTIMIZER_FILENAME = "optimizer.pt"
STATE_FILENAME = "trainer_state.json"


def save_weights(model: torch.nn.Module, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / WEIGHTS_FILENAME
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(target))
    return target


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    path = Path(directory) / WEIGHTS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    model.load_state_dict(load_file(str(path)), strict=True)


def save_training_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             card: Card, state: dict) -> Path:
    final = run_dir / "checkpoint"
    staging = run_dir / "checkpoint.new"
    previous = run_dir / "checkpoint.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_weights(model, staging)
    torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILENAME)
    card.save(staging)
    (staging / STATE_FILENAME).write_text(json.dumps(state))
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def find_training_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint: ``checkpoint/``, or ``checkpoint.old/`` if a swap was interrupted."""
    for name in ("checkpoint", "checkpoint.old"):
        d = run_dir / name
        if (d / STATE_FILENAME).is_file() and (d / WEIGHTS_FILENAME).is_file():
            return d
    return None


def load_training_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    load_weights(model, directory)
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILENAME, map_location="cpu", weights_only=True))
    return json.loads((directory / STATE_FILENAME).read_text())
