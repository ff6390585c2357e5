"""Session fixtures shared by the integration tests: a synthetic AD cohort written to shards
through the same writer a real dataset uses, and a tiny BERT whose tokenizer is trained on
those shards' texts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ad_shards(tmp_path_factory) -> Path:
    from shards.ad_writer import write_ad_shards
    from shards.synthetic.ad import generate_ad_cohort

    root = tmp_path_factory.mktemp("ad")
    sources = generate_ad_cohort(
        root / "raw", subjects_per_cohort=8, shape=(24, 28, 24), seed=0, template="phantom"
    )
    write_ad_shards(sources, root / "shards", size=16, samples_per_shard=5, seed=0)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, ad_shards) -> Path:
    from models.text import make_tiny_bert_checkpoint
    from shards.reader import read_texts

    out = tmp_path_factory.mktemp("tiny_bert")
    make_tiny_bert_checkpoint(
        str(out),
        read_texts(str(ad_shards / "train")),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        vocab_size=600,
    )
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, ad_shards) -> Path:
    """A 2-layer LLaMA (widths multiples of 64) with a SentencePiece tokenizer trained on the
    shards' texts."""
    from models.llama_text import make_tiny_llama_checkpoint
    from shards.reader import read_texts

    out = tmp_path_factory.mktemp("tiny_llama") / "llama"
    make_tiny_llama_checkpoint(
        str(out), read_texts(str(ad_shards / "train")), hidden_size=64, num_layers=2
    )
    return out


def llama_overrides(llama: Path, mode: str = "qlora") -> list[str]:
    """Switches `tiny_overrides` to the LLaMA text tower (ITC + grounded MAE, no MLM)."""
    return [
        "model.text_tower=llama",
        f"model.llama.checkpoint={llama}",
        f"model.llama.mode={mode}",
        "model.llama.max_length=48",
        "model.llama.lora_dropout=0.0",
        "model.mlm_weight=0",
    ]


# A ViT small enough for a few CPU steps in seconds (16^3 or 16^2 input, patch 4).
TINY_VISION = [
    "model.vision.img_size=16",
    "model.vision.patch_size=4",
    "model.vision.embed_dim=32",
    "model.vision.depth=2",
    "model.vision.num_heads=2",
    "model.vision.decoder_embed_dim=32",
    "model.vision.decoder_depth=1",
    "model.vision.decoder_num_heads=2",
]


def tiny_overrides(shards: Path, bert: Path, out: Path, task: str = "pretrain") -> list[str]:
    """A model small enough for a few CPU steps in seconds."""
    return [
        f"data.train={shards / 'train'}",
        f"data.val={shards / 'val'}",
        f"data.test={shards / 'test'}",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.shuffle_buffer=16",
        f"model.task={task}",
        *TINY_VISION,
        f"model.text.checkpoint={bert}",
        "model.text.mode=full",
        "model.text.max_length=48",
        "model.embed_dim=16",
        "model.cross_layers_image=1",
        "model.cross_layers_text=1",
        "model.fusion_hidden=32",
        "optim.lr=1e-3",
        "train.log_every=1",
        "train.progress=false",
        f"train.output_dir={out}",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cmd(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


def launch_cmd(*launch_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        *launch_args,
        str(REPO / "train.py"),
    ]


def shard_samples(split: Path) -> list[dict]:
    """Every sample of a shard split as written, in shard order: key, meta (its json: label,
    source_path, fields, ...) and text."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(Path(split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext in ("json", "txt"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    sample = samples.setdefault(key, {"key": key})
                    if ext == "json":
                        sample["meta"] = json.loads(data)
                    else:
                        sample["text"] = data.decode("utf-8")
    return list(samples.values())


# A 2D ViT for 32^2 chest X-rays (patch 8), small enough for a few CPU steps.
CXR_VISION = [
    "model.vision.spatial_dims=2",
    "model.vision.img_size=32",
    "model.vision.patch_size=8",
    "model.vision.embed_dim=32",
    "model.vision.depth=2",
    "model.vision.num_heads=2",
    "model.vision.decoder_embed_dim=32",
    "model.vision.decoder_depth=1",
    "model.vision.decoder_num_heads=2",
]


@pytest.fixture(scope="session")
def cxr_data(tmp_path_factory) -> dict[str, Path]:
    """A synthetic MIMIC-CXR-JPG tree written to 32^2 shards, and a tiny BERT whose tokenizer
    is trained on their reports."""
    from models.text import make_tiny_bert_checkpoint
    from shards.mimic_cxr import write_cxr_shards
    from shards.reader import read_texts
    from shards.synthetic.cxr import generate_mimic_cxr

    root = tmp_path_factory.mktemp("cxr_data")
    paths = generate_mimic_cxr(root / "raw", subjects=16, size=48, seed=1)
    shards = root / "shards"
    write_cxr_shards(paths["root"], paths["reports_root"], shards, size=32, samples_per_shard=8)
    bert = root / "bert"
    make_tiny_bert_checkpoint(
        str(bert), read_texts(str(shards / "train")), hidden_size=32, num_layers=2, num_heads=2
    )
    return {"shards": shards, "bert": bert}


def cxr_overrides(cxr: dict[str, Path], out: Path, task: str) -> list[str]:
    """A tiny chest X-ray run of `task` for 3 steps, scored on the test split."""
    return [
        *(f"data.{s}={cxr['shards'] / s}" for s in ("train", "val", "test")),
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.shuffle_buffer=8",
        *CXR_VISION,
        f"model.task={task}",
        f"model.text.checkpoint={cxr['bert']}",
        "model.text.max_length=64",
        "model.embed_dim=16",
        "optim.lr=1e-3",
        "train.max_steps=3",
        "train.bootstrap=0",
        "train.eval_splits=[test]",
        "train.log_every=1",
        "train.progress=false",
        f"train.output_dir={out}",
    ]


@pytest.fixture(scope="session")
def cxr_multilabel_run(cxr_data, tmp_path_factory) -> Path:
    """A finished 14-label chest X-ray run (its predictions_test.jsonl scored on the test split)."""
    out = tmp_path_factory.mktemp("cxr_multilabel")
    run_cmd(train_cmd(*cxr_overrides(cxr_data, out, "multilabel")))
    return out
