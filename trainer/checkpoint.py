"""Checkpoints: full training state for exact resume, and weights for use elsewhere.

`checkpoints/step_XXXXXXX/` holds `accelerator.save_state` (model, optimizer, RNG states of
every rank; DeepSpeed's partitioned files under ZeRO) plus `trainer_state.json`: the step,
batches consumed, early-stopping and counter state, the data fingerprint a resume is checked
against (trainer.run_state) and the list of files with their sizes.

A checkpoint is committed the way a database commits: every rank writes into
`checkpoints/.tmp-step_XXXXXXX/`, the main process writes `trainer_state.json` last, fsyncs
every file and the folder, renames the folder into place and fsyncs its parent; only then,
after all ranks have passed a barrier, is `checkpoints/latest` (the committed folder's name)
replaced atomically. A crash at any point leaves either the previous checkpoint as the latest
or the new one complete. A checkpoint is never written with non-finite weights.

Resuming with `--resume` (no path) tries the folder `latest` names, then every other
committed folder from the newest down: one whose state file is missing, garbled or lists a
file that is absent or of another size, or whose load fails, is passed over with a warning
and renamed `.damaged-step_XXXXXXX` (kept to look at, never tried again).
An explicit `--resume PATH` loads that folder or fails.

Loading never runs code from a pickle: accelerate's own files load with `weights_only=True`,
and DeepSpeed's (which it loads with `weights_only=False`) are loaded here with
`weights_only=True` and the few DeepSpeed and Python types its files hold allowed. A
checkpoint that needs more fails with the type's name; `--trust-checkpoint` lifts the rule for
a checkpoint the user trusts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from trainer.distributed import all_ranks_ok, sum_over_ranks

log = logging.getLogger("medalign")

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_TMP = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and reason."""


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:07d}"


def best_dir(output_dir: str) -> Path:
    """Where early stopping keeps the best validation state (not a resume candidate)."""
    return checkpoint_root(output_dir) / "best"


# --- writing -----------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(f"{_TMP}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(write_failure(path, err)) from err


def write_failure(path: Path, err: BaseException) -> str:
    """'could not write PATH: REASON (N MB free on its file system)'."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    where = path if path.exists() else path.parent
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:.0f} MB free on its file system"
    except OSError:
        free = "free space unknown"
    return f"could not write {path}: {reason} ({free})"


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }


def nonfinite_weights(accelerator: Accelerator, model: torch.nn.Module) -> list[str]:
    """Names of parameters with a NaN or inf anywhere on any rank (a collective).

    Under ZeRO-3 each rank checks its own partition (`ds_tensor`)."""
    bad = []
    for name, param in model.named_parameters():
        data = getattr(param, "ds_tensor", None)
        data = param.data if data is None else data
        if data.numel() and not bool(torch.isfinite(data).all()):
            bad.append(name)
    total = sum_over_ranks(accelerator, len(bad))
    return bad if bad or not total else ["(on another rank)"] * total


def _commit(
    accelerator: Accelerator, final: Path, state: dict[str, Any], model: torch.nn.Module
) -> None:
    """Writes the full state to `final` through a temporary folder (see the module docstring)."""
    bad = nonfinite_weights(accelerator, model)
    if bad:
        raise FloatingPointError(
            f"not saving {final}: {len(bad)} parameter tensors hold NaN or inf "
            f"(first: {', '.join(bad[:5])}); the previous checkpoint stays the latest"
        )
    tmp = final.with_name(_TMP + final.name)
    if accelerator.is_main_process:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(write_failure(final.parent, err)) from err
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # collective under DeepSpeed: every rank calls it
    except (OSError, RuntimeError) as err:
        raise CheckpointError(write_failure(tmp, err)) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            state = {**state, "files": _files(tmp)}
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(state, indent=1))
            _fsync_tree(tmp)
            old = final.with_name(_TMP + "old-" + final.name)
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():  # a folder of this name (an earlier attempt, the last best)
                os.rename(final, old)  # aside until the new one is in place
            os.rename(tmp, final)
            _fsync_path(final.parent)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            raise CheckpointError(write_failure(tmp / STATE_FILE, err)) from err
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    output_dir: str,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Commits the state of step `state["step"]`, points `latest` at it, prunes to `keep_last`."""
    path = checkpoint_dir(output_dir, int(state["step"]))
    _commit(accelerator, path, state, model)
    if accelerator.is_main_process:
        write_atomic(path.parent / LATEST, path.name)
        old = [p for p in committed(output_dir) if p != path]
        for stale in old[: max(0, len(old) - max(keep_last - 1, 0))]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def save_best(
    accelerator: Accelerator, model: torch.nn.Module, output_dir: str, state: dict[str, Any]
) -> Path:
    """The full state at the best validation so far, replacing the previous best."""
    path = best_dir(output_dir)
    _commit(accelerator, path, state, model)
    return path


# --- reading -----------------------------------------------------------------------------


def read_state(path: Path) -> dict[str, Any]:
    """A committed checkpoint's state; CheckpointError saying what is wrong otherwise."""
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_path}: unreadable ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_path}: expected a JSON object with an integer 'step'")
    for name, size in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{path}: {name} has {file.stat().st_size} bytes, {size} were written"
            )
    return state


def committed(output_dir: str) -> list[Path]:
    """The step folders with a state file, oldest first (not validated)."""
    root = checkpoint_root(output_dir)
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def resume_candidates(output_dir: str) -> list[Path]:
    """The folder `latest` names, then the other step folders from the newest down."""
    root = checkpoint_root(output_dir)
    order = [p for p in reversed(sorted(root.glob("step_*"))) if p.is_dir()]
    try:
        named = root / (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named is not None and named in order:
        order.remove(named)
        order.insert(0, named)
    return order


# Types DeepSpeed's checkpoint files hold besides tensors and plain containers.
def _deepspeed_safe_globals() -> list[Any]:
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        argparse.Namespace,
        ZeroStageEnum,
        LossScaler,
        DynamicLossScaler,
        fragment_address,
        set,
    ]


@contextlib.contextmanager
def _weights_only_loads(accelerator: Accelerator, trust: bool) -> Iterator[None]:
    """Within: torch.load ignores `weights_only=False` and allows DeepSpeed's few types."""
    if trust or accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield  # accelerate's own loads already use weights_only=True
        return
    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except Exception as err:
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                raise CheckpointError(
                    f"refusing to unpickle {args[0] if args else kwargs.get('f')}: it holds a "
                    f"type a checkpoint this trainer writes does not ({err}). Pass "
                    "--trust-checkpoint only for a checkpoint from a source you trust."
                ) from None
            raise

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def load_checkpoint(accelerator: Accelerator, path: Path, trust: bool = False) -> dict[str, Any]:
    """Restores model, optimizer and RNG states from `path`; returns its trainer state."""
    state = read_state(path)
    with _weights_only_loads(accelerator, trust):
        accelerator.load_state(str(path))
    return state


def _set_aside(accelerator: Accelerator, damaged: list[Path]) -> None:
    """Renames checkpoints passed over on resume to `.damaged-<name>` (kept for a look, never
    a resume candidate again, and not counted by keep_last, which would otherwise prune the
    good ones before them)."""
    if accelerator.is_main_process:
        for path in damaged:
            target = path.with_name(".damaged-" + path.name)
            shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(path, target)
            except OSError as err:
                log.warning("could not set %s aside: %s", path, err)
    accelerator.wait_for_everyone()


def resume(
    accelerator: Accelerator, resume_arg: str | None, output_dir: str, trust: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """Loads the checkpoint `--resume` asks for: `latest` (fall back over broken ones) or a path."""
    if resume_arg is None:
        return None
    if resume_arg != "latest":
        path = Path(resume_arg)
        return path, load_checkpoint(accelerator, path, trust)
    reasons, passed = [], []
    for path in resume_candidates(output_dir):
        error = None
        try:
            state = load_checkpoint(accelerator, path, trust)
        except (CheckpointError, OSError, RuntimeError, ValueError, KeyError) as err:
            error = err
        if all_ranks_ok(accelerator, error is None):
            if reasons:
                log.warning("resuming from %s; passed over: %s", path, "; ".join(reasons))
                _set_aside(accelerator, passed)
            return path, state
        reason = str(error) if error is not None else "another rank could not load it"
        log.warning("checkpoint %s passed over: %s", path, reason)
        reasons.append(f"{path.name}: {reason}")
        passed.append(path)
    raise CheckpointError(
        f"--resume: no loadable checkpoint under {checkpoint_root(output_dir)}"
        + (f" ({'; '.join(reasons)})" if reasons else "")
    )


# --- weights for use elsewhere -----------------------------------------------------------


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
        tmp = path.with_name(_TMP + path.name)
        try:
            save_file(state, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(write_failure(path, err)) from err
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
