"""Benchmarks MAE's visible-only encoder against a full-token encoder at mask ratio 0.75.

    python scripts/bench_mae.py [--quick]                 # CPU: ViT-S by default
    python scripts/bench_mae.py --device cuda             # GPU: ViT-B, bf16 autocast, MFU

Both sides use the project's `VisionTransformer` and `MAEDecoder` with the same weights, on
2D images (224^2, patch 16: 196 tokens) and 3D volumes (128^3, patch 16: 512 tokens):
- visible-only (the project's MAE path): `embed` drops 75% of the patch tokens and the
  encoder runs on the CLS token + the 25% kept (50 tokens in 2D, 129 in 3D);
- full-token (SimMIM / BEiT style): every patch embedding is kept, the masked ones replaced by
  a learned mask token, and the encoder runs on all 1 + N tokens (197 in 2D, 513 in 3D).
Rows, side by side in one run, timed interleaved after warm-up, medians of repeats:
- encoder fwd+bwd: encoder forward (patch embedding, blocks, norm), the mean square of its
  output, backward. Target (the issue's): full / visible >= 3.5x.
- train step: the whole pretraining step, encoder + MAE decoder (over all 1 + N tokens on both
  sides; on the full-token side it gets every token and no mask token is inserted) + the
  norm-pix MSE on the masked patches + backward + AdamW step. Reported, no target.
Samples/s is batch / step time. "FLOP ratio" is full / visible model FLOPs (below): the
speedup a device would reach at the same efficiency on both sides. The small visible-only
pass at CPU batch sizes runs less efficiently, so it falls short of that there.

Model FLOPs are counted analytically per sample, for the tokens each side actually runs:
forward = 2 x (weights of every matmul) x (tokens it is applied to) + 4 x T^2 x D per
attention layer (Q K^T and the product with V; T tokens of width D), summed over the patch
embedding (all N patches), the encoder blocks (T = 1 + kept tokens, or 1 + N), the decoder
embedding, blocks (T = 1 + N) and prediction head; fwd+bwd = 3 x forward. Embedding adds,
norms, softmax and the loss are left out. MFU = model FLOPs / step time / 989e12 (the H100's
dense bf16 peak): shown on CUDA only, where it means something.

ViT-B (768 wide, 12 blocks, 12 heads; decoder 512 / 8 blocks / 16 heads, as MAE) is the real
size and the default on CUDA. On this 2-core CPU the default is ViT-S (384 / 12 / 6; decoder
256 / 4 / 8) so the full run takes a few minutes; --size picks, --depth overrides the encoder
depth (--quick: ViT-S with 2 encoder blocks and 1 decoder block, fewer repeats, < 60 s).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from bench_attention import (  # sibling script: scripts/ is on sys.path
    VIT_LAYOUTS,
    VIT_SIZES,
    add_vit_args,
    median_times,
    print_table,
    resolve_vit_args,
    run_header,
)
from torch import Tensor, nn

from models.mae import MAEDecoder, mae_loss, patchify
from models.vit import VisionConfig, VisionTransformer, random_masking

TARGET_ENCODER_SPEEDUP = 3.5
H100_BF16_DENSE_FLOPS = 989e12
MASK_RATIO = 0.75


def full_token_features(
    vit: VisionTransformer, mask_token: Tensor, imgs: Tensor, mask_ratio: float
) -> tuple[Tensor, Tensor]:
    """SimMIM-style encoder: imgs (B, C, *spatial) -> tokens (B, 1 + N, D), mask (B, N).

    The same random mask as MAE's (1 = masked); masked patch embeddings become mask_token
    (1, 1, D) before the positions are added, and all tokens go through every block.
    """
    x = vit.patch_embed(imgs.to(vit.patch_embed.proj.weight.dtype))  # (B, N, D)
    pos = vit.pos_embed.to(x.dtype)  # as `vit.embed`: the tokens keep their dtype
    _, mask, _ = random_masking(x, mask_ratio)
    x = torch.where(mask.bool()[..., None], mask_token.to(x.dtype), x) + pos[:, 1:]
    cls = (vit.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    return vit.norm(vit.forward_blocks(torch.cat([cls, x], dim=1))), mask


def forward_flops(vit: VisionTransformer, decoder: MAEDecoder | None, enc_tokens: int) -> int:
    """Model FLOPs of one forward for one sample (formula in the module docstring)."""

    def blocks_flops(blocks: nn.ModuleList, tokens: int, dim: int) -> int:
        weights = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))
        return 2 * weights * tokens + 4 * tokens**2 * dim * len(blocks)

    cfg = vit.cfg
    n = cfg.num_patches
    flops = 2 * vit.patch_embed.proj.weight.numel() * n
    flops += blocks_flops(vit.blocks, enc_tokens, cfg.embed_dim)
    if decoder is not None:
        flops += 2 * decoder.decoder_embed.weight.numel() * enc_tokens
        flops += blocks_flops(decoder.blocks, n + 1, cfg.decoder_embed_dim)
        flops += 2 * decoder.pred.weight.numel() * (n + 1)
    return flops


def bench_layout(
    layout: str, args: argparse.Namespace, device: torch.device
) -> tuple[list[list[str]], float]:
    """Table rows of one layout (2D or 3D), and its encoder speedup."""
    overrides = {"depth": args.depth, "decoder_depth": args.decoder_depth}
    model = {**VIT_SIZES[args.size], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = VisionConfig(**model, **VIT_LAYOUTS[layout], mask_ratio=MASK_RATIO)
    torch.manual_seed(0)
    vit, decoder = VisionTransformer(cfg).to(device), MAEDecoder(cfg).to(device)
    mask_token = nn.Parameter(torch.randn(1, 1, cfg.embed_dim, device=device) * 0.02)
    params = [*vit.parameters(), *decoder.parameters(), mask_token]
    # One optimizer for both sides: each step updates the parameters that got a gradient.
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    shape = (args.batch, cfg.in_chans) + (cfg.img_size,) * cfg.spatial_dims
    imgs = torch.randn(shape, device=device)
    n = cfg.num_patches
    identity = torch.arange(n, device=device).expand(args.batch, n)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    )

    def encoder_visible() -> None:
        with amp:
            out = vit.forward_features(imgs, MASK_RATIO)
        out.float().square().mean().backward()  # a dense gradient, as a real loss gives
        opt.zero_grad(set_to_none=True)

    def encoder_full() -> None:
        with amp:
            out, _ = full_token_features(vit, mask_token, imgs, MASK_RATIO)
        out.float().square().mean().backward()  # a dense gradient, as a real loss gives
        opt.zero_grad(set_to_none=True)

    def step_visible() -> None:
        with amp:
            emb = vit.embed(imgs, MASK_RATIO)
            pred = decoder(vit.norm(vit.forward_blocks(emb.tokens)), emb.ids_restore)
            loss = mae_loss(pred, patchify(imgs, cfg.patch_size), emb.mask, cfg.norm_pix_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_full() -> None:
        with amp:
            tokens, mask = full_token_features(vit, mask_token, imgs, MASK_RATIO)
            pred = decoder(tokens, identity)  # every token present: no mask token inserted
            loss = mae_loss(pred, patchify(imgs, cfg.patch_size), mask, cfg.norm_pix_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    visible_tokens = 1 + round(n * (1 - MASK_RATIO))
    rows, encoder_speedup = [], 0.0
    cases: list[tuple[str, Callable[[], None], Callable[[], None], MAEDecoder | None]] = [
        ("encoder fwd+bwd", encoder_visible, encoder_full, None),
        ("train step", step_visible, step_full, decoder),
    ]
    for name, visible, full, dec in cases:
        t = median_times(
            {"visible": visible, "full": full}, device, args.warmup, args.repeats, args.min_time
        )
        speedup = t["full"] / t["visible"]
        ideal = forward_flops(vit, dec, n + 1) / forward_flops(vit, dec, visible_tokens)
        cell = {}
        for side, tokens in (("visible", visible_tokens), ("full", n + 1)):
            flops = 3 * forward_flops(vit, dec, tokens) * args.batch
            achieved = flops / t[side]
            mfu = f"{achieved / H100_BF16_DENSE_FLOPS:.1%}" if device.type == "cuda" else "-"
            cell[side] = (f"{t[side] * 1e3:.1f}", f"{args.batch / t[side]:.1f}", mfu)
        if name.startswith("encoder"):
            encoder_speedup = speedup
            target = f">={TARGET_ENCODER_SPEEDUP}x"
            result = "PASS" if speedup >= TARGET_ENCODER_SPEEDUP else "MISS"
        else:
            target, result = "report", "-"
        rows.append(
            [
                layout,
                f"{visible_tokens}/{n + 1}",
                name,
                cell["visible"][0],
                cell["full"][0],
                f"{speedup:.2f}x",
                f"{ideal:.2f}x",
                target,
                result,
                cell["visible"][1],
                cell["full"][1],
                cell["visible"][2],
                cell["full"][2],
            ]
        )
    return rows, encoder_speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_vit_args(parser, "small model, few repeats (< 60 s)")
    parser.add_argument("--decoder-depth", type=int, help="decoder depth, overriding the size's")
    args = parser.parse_args()
    device = resolve_vit_args(args)
    if args.quick and args.decoder_depth is None:
        args.decoder_depth = 1
    size = VIT_SIZES[args.size]
    depth = args.depth or size["depth"]
    dec_depth = size["decoder_depth"] if args.decoder_depth is None else args.decoder_depth
    print(run_header(args, device))
    print(
        f"model: {args.size} width {size['embed_dim']}, depth {depth}, heads "
        f"{size['num_heads']}; decoder {size['decoder_embed_dim']} x {dec_depth} blocks; "
        f"mask ratio {MASK_RATIO}; 2D 224^2 / 3D 128^3, patch 16"
    )
    rows, speedups = [], []
    for layout in args.layouts:
        layout_rows, speedup = bench_layout(layout, args, device)
        rows += layout_rows
        speedups.append(speedup)
    headers = ["layout", "tokens vis/full", "case", "visible ms", "full ms", "speedup"]
    headers += ["FLOP ratio", "target"]
    headers += ["result", "vis samples/s", "full samples/s", "vis MFU", "full MFU"]
    print()
    print_table(headers, rows)
    met = all(s >= TARGET_ENCODER_SPEEDUP for s in speedups)
    print(
        f"\ntarget: encoder fwd+bwd speedup >= {TARGET_ENCODER_SPEEDUP}x "
        f"({', '.join(args.layouts)}): {'PASS' if met else 'MISS'}"
    )
    print("model FLOPs: fwd = 2 * matmul weights * tokens + 4 * T^2 * D per attention layer;")
    print("fwd+bwd = 3 * fwd; MFU = model FLOPs / step time / 989e12 (H100 dense bf16)")


if __name__ == "__main__":
    main()
