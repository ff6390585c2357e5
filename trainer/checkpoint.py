"""Checkpoints: full training state for exact resume, and weights for use elsewhere.

`checkpoints/step_XXXXXXX/` holds `accelerator.save_state` (model, optimizer, RNG states of
every rank; DeepSpeed's partitioned files under ZeRO) plus `trainer_state.json` with the step
and the number of batches each rank consumed, so the reader can skip exactly those. A folder
counts only once `trainer_state.json` is written, which happens last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(output_dir: str) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def best_dir(output_dir: str) -> Path:
    """Where early stopping keeps the best validation state (not a resume candidate)."""
    return Path(output_dir) / "checkpoints" / "best"


def _save_state(accelerator: Accelerator, path: Path, state: dict) -> None:
    if accelerator.is_main_process and (path / STATE_FILE).is_file():
        (path / STATE_FILE).unlink()  # incomplete until the new state file is written
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))  # collective under DeepSpeed: every rank calls it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps(state))


def save_best(accelerator: Accelerator, output_dir: str, step: int, batches_consumed: int) -> Path:
    """The full state at the best validation so far, replacing the previous best."""
    path = best_dir(output_dir)
    _save_state(accelerator, path, {"step": step, "batches_consumed": batches_consumed})
    accelerator.wait_for_everyone()
    return path


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, batches_consumed: int, keep_last: int
) -> Path:
    path = checkpoint_dir(output_dir, step)
    _save_state(accelerator, path, {"step": step, "batches_consumed": batches_consumed})
    if accelerator.is_main_process:
        old = sorted(p for p in path.parent.glob("step_*") if p != path)
        for stale in old[: max(0, len(old) - max(keep_last - 1, 0))]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """`--resume` alone: the latest complete checkpoint of this run; `--resume PATH`: that one."""
    if resume is None:
        return None
    path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if path is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {output_dir}/checkpoints")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 state dict on the main process ({} elsewhere); a collective.

    Under ZeRO-3 each parameter is gathered in turn (whatever the JSON's
    stage3_gather_16bit_weights_on_model_save says), so peak memory is one parameter, not the model.
    """
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is None or ds.zero_stage != 3:
        state = accelerator.get_state_dict(model, unwrap=True)
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    import deepspeed

    module = accelerator.unwrap_model(model)
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, torch.nn.Parameter):
            with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                if accelerator.is_main_process:
                    state[name] = value.detach().to("cpu", torch.float32).clone()
        elif accelerator.is_main_process:
            state[name] = value.detach().to("cpu").clone()
    return state


def export_weights(
    accelerator: Accelerator, model: torch.nn.Module, output_dir: str
) -> Path | None:
    """Full (unsharded) weights as `model.safetensors`, loadable without DeepSpeed."""
    state = full_state_dict(accelerator, model)
    path = Path(output_dir) / "model.safetensors"
    if accelerator.is_main_process:
        save_file(state, str(path), metadata={"format": "pt"})
    accelerator.wait_for_everyone()
    return path if accelerator.is_main_process else None


def load_init_weights(model: torch.nn.Module, source: str) -> dict[str, list[str]]:
    """Loads weights saved by `export_weights` (a run folder or the file) before preparing.

    Keys present in both with the same shape are loaded; the rest are reported, not hidden.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from={source}: no model.safetensors there")
    incoming = load_file(str(path))
    own = model.state_dict()
    loadable = {k: v for k, v in incoming.items() if k in own and own[k].shape == v.shape}
    if not loadable:
        raise ValueError(f"train.init_from={source}: no weight matches this model's keys")
    model.load_state_dict(loadable, strict=False)
    return {
        "loaded": sorted(loadable),
        "missing": sorted(set(own) - set(loadable)),
        "unexpected": sorted(set(incoming) - set(loadable)),
    }
