"""ITC across 2 processes (gloo) equals ITC on the concatenated batch in one process:
the loss, and the parameter gradients once averaged across ranks (what DDP / ZeRO do)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from models.losses import ClipLoss

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
