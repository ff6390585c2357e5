"""Accelerator set-up: topology comes from `accelerate launch`, ZeRO settings from the DeepSpeed
JSON, and every value the trainer config owns is written into the JSON's "auto" slots here.

CPU needs care (see docs/TRAINING.md): DeepSpeed needs a gloo process group, plain DDP needs
`Accelerator(cpu=True)`, and `cpu=True` under `--use_deepspeed` would silently give DDP. The
checks at the end turn those silent failure modes into errors.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from trainer.config import Config


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"  # bf16 on CPU ran slower than fp32 here


def build_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for this launch; raises if the launch asked for a mode that did not start."""
    use_deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    on_cpu = not torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    if on_cpu and precision == "fp16":
        raise ValueError("train.mixed_precision='fp16' needs a GPU; use 'no' or 'bf16' on CPU")
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed on CPU needs gloo; naming a backend in a single process would make
        # accelerate look for a process group that no launcher created.
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    accelerator = Accelerator(
        cpu=on_cpu and not use_deepspeed,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_auto(accelerator, cfg)
    check_launch(accelerator, use_deepspeed)
    check_model_placement(accelerator, cfg)
    return accelerator


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this launch, None without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def check_model_placement(accelerator: Accelerator, cfg: Config) -> None:
    """Refuses combinations that run but train wrongly: a 4-bit LLaMA tower under ZeRO-3.

    ZeRO-3 partitions and re-gathers parameters by flattening them; bitsandbytes' packed
    4-bit weights and their quantization state do not survive that on this stack (outputs
    drift even at learning rate 0), and ZeRO-3 refuses the device map 4-bit loading uses.
    """
    m = cfg.model
    uses_4bit = m.task != "multilabel" and m.text_tower == "llama" and m.llama.load_in_4bit
    if uses_4bit and zero_stage(accelerator) == 3:
        raise ValueError(
            f"model.llama.mode={m.llama.mode} (4-bit weights) under DeepSpeed ZeRO-3 trains "
            "wrongly; use ZeRO-1 or ZeRO-2 (configs/deepspeed/zero1.json, zero2.json), DDP "
            "(--multi_gpu) or one process, or model.llama.mode=lora / frozen with ZeRO-3"
        )


def model_device(accelerator: Accelerator) -> torch.device | None:
    """Where a 4-bit tower is quantized at load: this rank's device, except under ZeRO-3
    (which places parameters itself and refuses a device map)."""
    return None if zero_stage(accelerator) == 3 else accelerator.device


def fill_deepspeed_auto(accelerator: Accelerator, cfg: Config) -> None:
    """Writes the trainer-owned values into the DeepSpeed config's "auto" (or missing) slots.

    A value the JSON fixes to something else than the trainer config is an error: one
    setting, one place.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    world = accelerator.num_processes
    owned = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in owned.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif current != value:
            raise ValueError(
                f"DeepSpeed config sets {key}={current!r} but the trainer config gives {value!r}; "
                f'write "auto" in the JSON so the trainer config owns it'
            )
    if (
        ds.get("bf16", {}).get("enabled") in (True, "auto")
        and accelerator.mixed_precision == "bf16"
    ):
        # DeepSpeed skips a bf16 step with NaN / inf gradients only when asked to; the trainer
        # counts such skips (train.nonfinite), so it asks.
        ds["bf16"].setdefault("check_grad_overflow", True)
    if ds.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise ValueError(
            "DeepSpeed config sets zero_optimization.compute_grad_norm=false: the trainer reads "
            "the gradient norm to keep NaN / inf gradients out of the weights; remove the key"
        )
    for key in ("optimizer", "scheduler"):
        if key not in ds:
            continue
        fixed = {k: v for k, v in ds[key].get("params", {}).items() if v != "auto"}
        if fixed:
            raise ValueError(
                f"DeepSpeed config's '{key}' section sets {fixed}; the trainer owns the "
                f'optimizer and schedule (optim.*): remove the section or write "auto"'
            )
        # A stock JSON whose optimizer / scheduler values are all "auto": the trainer's
        # AdamW and warmup + cosine schedule (optim.*) are what those slots stand for.
        del ds[key]
    if optimizer_offloaded(accelerator) and not torch.cuda.is_available():
        # No GPU: the offloaded fp32 states live where torch's AdamW runs anyway.
        ds["zero_force_ds_cpu_optimizer"] = False


# DeepSpeed's size-dependent "auto" values, from the model's hidden size H as the Hugging
# Face integration sets them (accelerate can only read H from a `model.config`, which the
# composed models do not have).
_HIDDEN_AUTO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def fill_deepspeed_hidden_auto(accelerator: Accelerator, hidden_size: int) -> None:
    """Fills the ZeRO bucket-size "auto" slots from the model's widest hidden size."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    for key, rule in _HIDDEN_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = rule(hidden_size)


def model_hidden_size(model: torch.nn.Module) -> int:
    """The widest token width of the model's towers (what bucket sizes scale with)."""
    widths = [0]
    for module in model.modules():
        for name in ("hidden_size", "embed_dim"):
            value = getattr(module, name, None)
            if isinstance(value, int):
                widths.append(value)
    cfg = getattr(model, "cfg", None)
    for part in ("vision", "fusion"):
        sub = getattr(cfg, part, None)
        widths.append(getattr(sub, "embed_dim", 0) or getattr(sub, "dim", 0) or 0)
    return max(widths) or 1024


def optimizer_offloaded(accelerator: Accelerator) -> bool:
    """True when the DeepSpeed JSON offloads optimizer states to the CPU."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device == "cpu"


def check_launch(accelerator: Accelerator, use_deepspeed: bool) -> None:
    """Fails loudly where a launch would otherwise train in a different mode than asked."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1 and accelerator.num_processes != world_env:
        raise RuntimeError(
            f"launched {world_env} processes but the accelerator sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); the ranks would "
            f"train independently. On CPU use `accelerate launch --multi_gpu` or `--use_deepspeed`."
        )
    if use_deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"--use_deepspeed was given but the run is {accelerator.distributed_type}, not DEEPSPEED"
        )


def sum_over_ranks(accelerator: Accelerator, value: int | list[int]) -> int | list[int]:
    """The sum of an integer (or of each of a list of integers) over every rank (a collective)."""
    values = value if isinstance(value, list) else [value]
    tensor = torch.tensor(values, device=accelerator.device, dtype=torch.long)
    summed = [int(v) for v in accelerator.reduce(tensor, reduction="sum").tolist()]
    return summed if isinstance(value, list) else summed[0]


def all_ranks_ok(accelerator: Accelerator, ok: bool) -> bool:
    """True when `ok` holds on every rank (a collective)."""
    return sum_over_ranks(accelerator, 0 if ok else 1) == 0


def describe(accelerator: Accelerator) -> dict:
    """What actually ran, for the run folder and the logs."""
    info = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
    }
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        info["zero_stage"] = zero_stage(accelerator)
    return info
