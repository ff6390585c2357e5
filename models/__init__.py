"""Model code: plain single-device PyTorch, one concern per module.

- `models.attention`: `Attention` (SDPA, self and cross), `Block`, `CrossBlock`.
- `models.vit`: `VisionConfig`, `PatchEmbed`, sin-cos positions, `random_masking`,
  `VisionTransformer` (2D and 3D).
- `models.mae`: `patchify` / `unpatchify`, `MAEDecoder`, `mae_loss`.
- `models.text`: `TextConfig`, `TextTower`, `build_text_tower`, `make_tiny_bert_checkpoint`.
- `models.losses`: `ClipLoss` (gathered across ranks), `mlm_loss`.
- `models.alifuse`: `AlifuseConfig`, `AlifuseModel`, `build_model`.

Nothing is imported here, so `import models.losses` (e.g. in a spawned test worker) does
not pay for transformers and peft.
"""
