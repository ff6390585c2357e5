"""ITC across 2 processes (gloo) equals ITC on the concatenated batch in one process:
the loss, and the parameter gradients once averaged across ranks (what DDP / ZeRO do)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from models.losses import ClipLoss, MarginLoss, PairwiseClipLoss
from models.pooling import AttentionPool

WORLD = 2
PER_RANK = 3
SETTINGS = [(False, True), (True, True), (False, False), (True, False)]  # (local, with_grad)


class Towers(nn.Module):
    """Two linear 'towers' and a learned log temperature: features for ITC."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.log_scale = nn.Parameter(torch.tensor([2.0]))

    def loss(self, images, texts, clip: ClipLoss) -> torch.Tensor:
        image = F.normalize(self.image(images), dim=-1)
        text = F.normalize(self.text(texts), dim=-1)
        return clip(image, text, self.log_scale.exp())


def _data():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(WORLD * PER_RANK, 6, generator=gen, dtype=torch.float64)
    texts = torch.randn(WORLD * PER_RANK, 5, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    state = Towers().double().state_dict()
    return images, texts, state


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    images, texts, state = _data()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for local_loss, with_grad in SETTINGS:
        towers = Towers().double()
        towers.load_state_dict(state)
        loss = towers.loss(images[mine], texts[mine], ClipLoss(local_loss, with_grad))
        loss.backward()
        grads = {}
        for name, param in towers.named_parameters():
            dist.all_reduce(param.grad)
            grads[name] = param.grad / WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[(local_loss, with_grad)] = {
            "loss": loss.detach(),
            "mean": mean_loss / WORLD,
            **grads,
        }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_itc_two_processes_match_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    images, texts, state = _data()  # one process, the concatenated batch
    towers = Towers().double()
    towers.load_state_dict(state)
    loss = towers.loss(images, texts, ClipLoss())
    loss.backward()
    full = {name: param.grad for name, param in towers.named_parameters()}

    for local_loss, with_grad in SETTINGS:
        got = [r[(local_loss, with_grad)] for r in ranks]
        # The forward is the same in every setting: the mean of the rank losses is the loss.
        torch.testing.assert_close(got[0]["mean"], loss.detach())
        if not local_loss:  # every rank computes the whole (B, B) loss
            for r in range(WORLD):
                torch.testing.assert_close(got[r]["loss"], loss.detach())
        else:  # each rank has its share only
            assert not torch.allclose(got[0]["loss"], got[1]["loss"])
        for name, grad in full.items():
            if with_grad:
                torch.testing.assert_close(got[0][name], grad, msg=f"{name} {local_loss=}")
            elif not local_loss:  # open_clip's gather without grad: towers get 1 / world
                scale = 1 if name == "log_scale" else WORLD  # the temperature is not gathered
                torch.testing.assert_close(got[0][name], grad / scale, msg=name)
        assert full["log_scale"].abs().item() > 0


class PooledTowers(nn.Module):
    """Token 'towers' and an attention pool: each (image, text) pair is scored jointly."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(6, 8)
        self.text = nn.Linear(5, 8)
        self.text_proj = nn.Linear(8, 4)
        self.pool = AttentionPool(text_dim=8, image_dim=8, out_dim=4, num_heads=2)
        self.log_scale = nn.Parameter(torch.tensor([2.0]))

    def score(self, image: dict, text: dict) -> torch.Tensor:
        bi, bt = image["tokens"].shape[0], text["emb"].shape[0]
        pooled = self.pool(
            text["tokens"].unsqueeze(0).expand(bi, -1, -1, -1).flatten(0, 1),
            text["mask"].unsqueeze(0).expand(bi, -1, -1).flatten(0, 1),
            image["tokens"].unsqueeze(1).expand(-1, bt, -1, -1).flatten(0, 1),
        )
        pooled = F.normalize(pooled, dim=-1).view(bi, bt, -1)
        return self.log_scale.exp() * (pooled * text["emb"].unsqueeze(0)).sum(-1)

    def loss(self, images, texts, mask, clip: PairwiseClipLoss) -> torch.Tensor:
        text_tokens = self.text(texts)
        keep = mask.unsqueeze(-1).to(text_tokens.dtype)
        emb = F.normalize(self.text_proj((text_tokens * keep).sum(1) / keep.sum(1)), dim=-1)
        image = {"tokens": self.image(images)}
        text = {"tokens": text_tokens, "mask": mask, "emb": emb}
        return clip(self.score, image, text)


def _pooled_data():
    gen = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    images = torch.randn(n, 7, 6, generator=gen, dtype=torch.float64)  # 7 image tokens
    texts = torch.randn(n, 5, 5, generator=gen, dtype=torch.float64)  # 5 text tokens
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[0, 3:] = 0  # padding: must not change anything but the sample it belongs to
    mask[4, 2:] = 0
    torch.manual_seed(0)
    state = PooledTowers().double().state_dict()
    return images, texts, mask, state


def _pooled_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    images, texts, mask, state = _pooled_data()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    towers = PooledTowers().double()
    towers.load_state_dict(state)
    loss = towers.loss(images[mine], texts[mine], mask[mine], PairwiseClipLoss())
    loss.backward()
    result = {"loss": loss.detach().clone()}
    dist.all_reduce(result["loss"])
    for name, param in towers.named_parameters():
        dist.all_reduce(param.grad)
        result[name] = param.grad / WORLD
    result["loss"] /= WORLD
    torch.save(result, Path(out_dir) / f"pooled{rank}.pt")
    dist.destroy_process_group()


def test_pairwise_itc_two_processes_match_one(tmp_path: Path) -> None:
    mp.spawn(_pooled_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "pooled0.pt")
    images, texts, mask, state = _pooled_data()
    towers = PooledTowers().double()
    towers.load_state_dict(state)
    loss = towers.loss(images, texts, mask, PairwiseClipLoss())
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach())
    for name, param in towers.named_parameters():
        assert param.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], param.grad, msg=name)


def _margin_loss(towers: Towers, images, texts, clip: ClipLoss) -> torch.Tensor:
    image = F.normalize(towers.image(images), dim=-1)
    text = F.normalize(towers.text(texts), dim=-1)
    return clip(image, text, torch.ones(1, dtype=image.dtype))  # cosine similarities


def _margin_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    images, texts, state = _data()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    towers = Towers().double()
    towers.load_state_dict(state)
    clip = ClipLoss(local_loss=True, criterion=MarginLoss(0.8))
    loss = _margin_loss(towers, images[mine], texts[mine], clip)
    loss.backward()
    result = {"loss": loss.detach().clone()}
    dist.all_reduce(result["loss"])
    result["loss"] /= WORLD
    for name in ("image.weight", "text.weight"):
        grad = dict(towers.named_parameters())[name].grad
        dist.all_reduce(grad)
        result[name] = grad / WORLD
    torch.save(result, Path(out_dir) / f"margin{rank}.pt")
    dist.destroy_process_group()


def test_margin_loss_two_processes_match_one(tmp_path: Path) -> None:
    mp.spawn(_margin_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "margin0.pt")
    images, texts, state = _data()
    towers = Towers().double()
    towers.load_state_dict(state)
    loss = _margin_loss(towers, images, texts, ClipLoss(criterion=MarginLoss(0.8)))
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach())
    for name in ("image.weight", "text.weight"):
        grad = dict(towers.named_parameters())[name].grad
        assert grad.abs().sum() > 0
        torch.testing.assert_close(got[name], grad, msg=name)
