"""Reading the files of a checkpoint or an export without running code from them.

A .pt file is a pickle, and a pickle can call any function while it loads. Every .pt file of a
checkpoint (ours and DeepSpeed's) is read with torch's weights_only unpickler, which builds only
tensors, containers and primitives, plus the few types in ALLOWED_GLOBALS; a file naming anything
else is refused before any of it is unpickled. Exports are safetensors + JSON and need none of this.
"""

from __future__ import annotations

import importlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, incomplete or does not match this run."""


def read_json(path: Path, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """A JSON object from a file we wrote; a malformed one raises `error` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}; the file is corrupt")
    return value


ALLOWED_GLOBALS = {
    # np.random.get_state() in extra_rank*.pt (numpy 2 and 1.x spell the module differently)
    "numpy._core.multiarray._reconstruct": "numpy RNG state",
    "numpy.core.multiarray._reconstruct": "numpy RNG state",
    "numpy.ndarray": "numpy RNG state",
    "numpy.dtype": "numpy RNG state",
    # DeepSpeed's ZeRO-1/2 optimizer files (zero_pp_rank_*_optim_states.pt), fp32 and bf16
    "deepspeed.runtime.zero.config.ZeroStageEnum": "ZeRO optimizer state",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "ZeRO optimizer state",
    "deepspeed.utils.tensor_fragment.fragment_address": "ZeRO optimizer state",
}


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file would need to run code (or build a type no checkpoint holds) to load."""


def _allowed_objects(names: list[str]) -> list[Any]:
    """The objects safe_globals needs for these allowed names (DeepSpeed is imported only for its files)."""
    objs = [getattr(importlib.import_module(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
    if "numpy.dtype" in names:  # np.dtype(...) builds an instance of a dtype class (the RNG key: uint32)
        objs += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return objs


def globals_needed(path: Path) -> list[str]:
    """The globals path's pickle names beyond torch's own safe set, read from its opcodes without
    running any; UntrustedCheckpointError if one is not in ALLOWED_GLOBALS."""
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint, or a damaged one: the weights_only unpickler decides
        return []
    refused = sorted(needed - ALLOWED_GLOBALS.keys())
    if refused:
        raise UntrustedCheckpointError(
            f"refusing to read {path}: loading it would call {', '.join(refused)}, which no checkpoint "
            "holds (a pickle that runs code?); nothing in it was run. Only open checkpoints you trust."
        )
    return sorted(needed)


def torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load that never runs code from the file: the pickle's globals are listed from its
    opcodes first (nothing executes) and must all be in ALLOWED_GLOBALS; the weights_only unpickler
    then builds the objects with exactly those allowed."""
    path = Path(path)
    needed = globals_needed(path)
    try:
        with torch.serialization.safe_globals(_allowed_objects(needed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # the unpickler refused what the opcode listing did not show
        reason = str(e).split("\n\n")[1].strip() if "\n\n" in str(e) else str(e)
        raise UntrustedCheckpointError(
            f"refusing to read {path}: {reason}; nothing in it was run. Only open checkpoints you trust."
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({e})") from e
