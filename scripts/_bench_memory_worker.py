"""One rank of `scripts/bench_memory.py`'s ZeRO part: started by `accelerate launch`, not by hand.

Builds the project's ViT image tower (models/vit.py) plus a linear classifier, prepares it
with the trainer's own `build_accelerator` (DDP or DeepSpeed ZeRO-1/2/3, as the launch says),
runs `--steps` AdamW steps on random images and, in the last step, counts the bytes of the
tensors this rank holds in each class at two points: late in backward (a backward pre-hook on
the patch embedding, the last module backward reaches) and after backward, before the optimizer
step (parameters, gradients and the Adam moments of the previous step all alive). Every tensor
is counted by its storage, once: a parameter that is a view into a flat buffer counts the
whole buffer, once; the first class that claims a storage keeps it.

Writes `<out>/rank<r>.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.vit import VisionConfig, VisionTransformer
from trainer.config import load_config
from trainer.distributed import build_accelerator, describe


class ViTClassifier(nn.Module):
    """The project's ViT (CLS pooling) and a linear head: one loss to train."""

    def __init__(self, cfg: VisionConfig, num_classes: int = 10) -> None:
        super().__init__()
        self.vit = VisionTransformer(cfg)
        self.fc = nn.Linear(cfg.embed_dim, num_classes)
        # accelerate fills the hidden-size based "auto" ZeRO-3 bucket sizes from model.config
        # (as for a Hugging Face model): reduce bucket hidden^2, persistence threshold 10 x hidden.
        self.config = SimpleNamespace(hidden_size=cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.vit(x))


class Ledger:
    """Bytes per class, each tensor storage counted once (first class that claims it wins)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, kind: str, tensor) -> None:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[kind] += storage.nbytes()

    def add_all(self, kind: str, tensors) -> None:
        """Tensors, or lists / tuples / dicts (values) of them, nested."""
        if isinstance(tensors, dict):
            tensors = tensors.values()
        elif isinstance(tensors, Tensor) or tensors is None:
            tensors = [tensors]
        for item in tensors:
            if isinstance(item, (list, tuple, dict)):
                self.add_all(kind, item)
            else:
                self.add(kind, item)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list:
    return [value for state in optimizer.state.values() for value in state.values()]


def count_ddp(ledger: Ledger, model: nn.Module, optimizer) -> None:
    params = list(model.parameters())
    ledger.add_all("params", params)
    ledger.add_all("grads", [p.grad for p in params])
    ledger.add_all("optim", _optimizer_state(optimizer.optimizer))
    # DDP's reducer keeps flat bucket buffers (C++ only) that param.grad is copied out of
    # (gradient_as_bucket_view=False, the default): a full second copy of the gradients.
    logging = model._get_ddp_logging_data()
    buckets = sum(int(b) for b in str(logging.get("bucket_sizes", "")).split(",") if b)
    ledger.bytes["comm_buffers"] += buckets


def count_zero12(ledger: Ledger, engine, zero) -> None:
    """DeepSpeedZeroOptimizer (stage_1_and_2.py)."""
    # First: with contiguous_gradients, param.grad is a view into these fixed-size reduce
    # buckets (2 x reduce_bucket_size with overlap_comm) while backward runs.
    for bucket in getattr(zero, "ipg_buckets", {}).values():
        ledger.add_all("comm_buffers", bucket.buffer)
    params = list(engine.module.parameters())
    ledger.add_all("params", params)  # views into the replicated bit16_groups_flat
    ledger.add_all("params", zero.bit16_groups_flat)
    ledger.add_all("grads", [p.grad for p in params])
    ledger.add_all("grads", [getattr(p, "grad_accum", None) for p in params])
    ledger.add_all("grads", zero.averaged_gradients)  # this rank's partition, per group
    ledger.add_all("grads", getattr(zero, "all_grad_tensors", {}))
    ledger.add("grads", getattr(zero, "grads_in_partition", None))  # stage 2 contiguous
    ledger.add_all("optim", zero.single_partition_of_fp32_groups)  # fp32 master partition
    ledger.add_all("optim", _optimizer_state(zero.optimizer))  # AdamW moments of it


def count_zero3(ledger: Ledger, engine, zero) -> None:
    """DeepSpeedZeroOptimizer_Stage3 (stage3.py): params live as ds_tensor partitions."""
    for bucket in getattr(zero, "ipg_buckets", {}).values():
        ledger.add("comm_buffers", bucket.buffer)
    params = list(engine.module.parameters())
    ledger.add_all("params", [p.ds_tensor for p in params])  # this rank's partition
    ledger.add_all("params", zero.fp16_partitioned_groups_flat)
    # Persistent params (numel <= stage3_param_persistence_threshold) stay whole on every
    # rank; the others are gathered into .data around their module's forward / backward and
    # released after (empty .data). Counted apart: not a partition, a full copy.
    ledger.add_all("params_gathered", [p.data for p in params])
    ledger.add("grads", zero.grad_partitions_flat_buffer)  # this rank's gradient partition
    ledger.add_all("grads", [p.grad for p in params])
    ledger.add_all("grads", zero.averaged_gradients)
    ledger.add_all("optim", zero.fp32_partitioned_groups_flat)
    ledger.add_all("optim", _optimizer_state(zero.optimizer))


def live_tensor_bytes() -> int:
    """All tensor storages reachable from Python objects (gc), each once."""
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance on deprecated module objects warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, Tensor)]
    for obj in objects:
        try:
            if obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
        except Exception:  # odd proxies and released storages
            continue
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    args = parser.parse_args()

    cfg = load_config(
        None,
        [
            f"train.mixed_precision='{args.precision}'",  # quoted: YAML reads no as false
            f"data.batch_size={args.batch}",
            "train.grad_accum=1",
            "train.grad_clip=1.0",
        ],
    )
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    vision = VisionConfig(
        spatial_dims=3,
        img_size=args.img,
        patch_size=args.patch,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.heads,
        mask_ratio=0.0,
    )
    model = ViTClassifier(vision)
    n_params = sum(p.numel() for p in model.parameters())
    if accelerator.state.deepspeed_plugin is not None and args.precision == "bf16":
        # DeepSpeed 0.19.8 casts parameters to bf16 but keeps fp32 buffers: the ViT's fp32
        # pos_embed would promote the tokens to fp32, and LayerNorm on CPU refuses fp32
        # inputs with bf16 weights. Buffers are not model state (never partitioned).
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    info = describe(accelerator)
    deepspeed = info.get("zero_stage") is not None
    engine = model if deepspeed else None
    dtype = next(p for p in model.parameters()).dtype  # bf16 under DeepSpeed bf16, else fp32

    unwrapped = accelerator.unwrap_model(model)

    def snapshot() -> dict:
        ledger = Ledger()
        if not deepspeed:
            count_ddp(ledger, model, optimizer)
        elif info["zero_stage"] == 3:
            count_zero3(ledger, engine, engine.optimizer)
        else:
            count_zero12(ledger, engine, engine.optimizer)
        rss, peak = rss_bytes()
        return {**ledger.bytes, "live_tensors": live_tensor_bytes(), "rss": rss, "peak_rss": peak}

    points: dict[str, dict] = {}

    def late_in_backward(module, grad_output) -> None:
        # The first module of the forward is the last of the backward: every other layer's
        # gradient has been produced (and, under ZeRO-2/3, reduced into partitions) by now.
        points["in_backward"] = snapshot()

    gen = torch.Generator().manual_seed(1 + accelerator.process_index)
    losses = []
    for step in range(args.steps):
        last = step == args.steps - 1
        hook = None
        if last:
            hook = unwrapped.vit.patch_embed.register_full_backward_pre_hook(late_in_backward)
        x = torch.randn(args.batch, 1, *(args.img,) * 3, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        # DDP: accelerate's prepare already wraps forward in bf16 autocast (fp32 weights);
        # DeepSpeed bf16: the weights are bf16 and the inputs must be cast to match.
        loss = F.cross_entropy(model(x.to(dtype)).float(), y)
        if deepspeed:
            engine.backward(loss)  # accelerator.backward would also step; count in between
        else:
            accelerator.backward(loss)
        if last:
            hook.remove()
            points["after_backward"] = snapshot()
        if deepspeed:
            engine.step()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    extra = {}
    if deepspeed:
        zero = engine.optimizer
        extra = {
            "optimizer_class": type(zero).__name__,
            "inner_optimizer": type(zero.optimizer).__name__,
            "bf16": bool(engine.bfloat16_enabled()),
            "grad_accum_dtype": str(getattr(zero, "gradient_accumulation_dtype", None)),
            "ds_config_zero": {
                k: v
                for k, v in accelerator.state.deepspeed_plugin.deepspeed_config[
                    "zero_optimization"
                ].items()
                if "bucket" in k or "persistence" in k or k == "stage"
            },
        }
    record = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "launch": info,
        "param_count": n_params,
        "param_dtype": str(dtype),
        "points": points,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        **extra,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
