"""What a resumed run depends on besides the weights: counters, early stopping, and the data
fingerprint a resume is checked against.

The fingerprint holds every setting that decides which samples step N+1 sees: the training
split's manifest (its sha256, which covers every shard's sha256 and sample count), batch size,
loader workers, world size, gradient accumulation, seed, shuffle buffer, resampling, label
policy, label fraction, clinical-text rendering, the prompt template, the text length and length
bucketing (recorded when on). A resume whose fingerprint
differs from the checkpoint's is refused, naming each key with its old and new value; with
`--allow-resume-changes` it goes on and logs what changes (the sample stream is then not the
one the checkpoint left: samples may repeat or be skipped). The data *path* is not part of it:
shards moved to another folder resume; shards rewritten do not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from trainer.schema import to_dict


class ResumeMismatch(ValueError):
    """The checkpoint was written by a run whose data stream differs from this one's."""


def manifest_sha256(split_dir: str) -> str:
    from shards.reader import manifest_bytes  # local or remote

    return hashlib.sha256(manifest_bytes(split_dir)).hexdigest()


def data_fingerprint(cfg: Any, world_size: int) -> dict[str, Any]:
    d = cfg.data
    bucketing = {"bucket_batches": d.bucket_batches} if d.bucket_batches else {}
    return {
        **bucketing,
        "train_manifest_sha256": manifest_sha256(d.train),
        "batch_size": d.batch_size,
        "num_workers": d.num_workers,
        "world_size": world_size,
        "grad_accum": cfg.train.grad_accum,
        "seed": cfg.train.seed,
        "shuffle_buffer": d.shuffle_buffer,
        "resampled": d.resampled,
        "label_mode": d.label_mode,
        "labels": to_dict(d.labels),
        "clinical": to_dict(d.clinical),
        "label_fraction": d.label_fraction,
        "label_fraction_seed": d.label_fraction_seed,
        "text_max_length": cfg.model.text_max_length,
        "prompt_template": d.prompt_template,
    }


def fingerprint_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """'key: checkpoint X, now Y' for every key that differs (a checkpoint without one: all)."""
    if saved is None:
        return ["fingerprint: the checkpoint records none (written by an older trainer)"]
    keys = sorted(set(saved) | set(now))
    return [
        f"{k}: checkpoint {saved.get(k, '(absent)')!r}, now {now.get(k, '(absent)')!r}"
        for k in keys
        if saved.get(k) != now.get(k)
    ]


def check_resume(saved: dict[str, Any] | None, now: dict[str, Any], allow: bool) -> list[str]:
    """Raises ResumeMismatch on any change unless `allow`; returns the changes."""
    changes = fingerprint_changes(saved, now)
    if changes and not allow:
        raise ResumeMismatch(
            "--resume: this run would not see the samples the checkpoint's run would have seen "
            "next:\n  "
            + "\n  ".join(changes)
            + "\nrestore those settings, or pass --allow-resume-changes to go on anyway "
            "(samples may then repeat or be skipped)"
        )
    return changes


@dataclass
class EarlyStopping:
    """Watches one validation metric: records the best value and step, counts evals without
    improvement, and says when `patience` of them have passed. Saved in every checkpoint."""

    metric: str
    mode: str
    patience: int
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, step: int, result: dict[str, Any]) -> bool:
        """Takes a validation result; True when it is the best so far."""
        value = result.get(self.metric)
        if not isinstance(value, (int, float)):
            scalars = sorted(k for k, v in result.items() if isinstance(v, (int, float)))
            raise KeyError(
                f"train.early_stop_metric={self.metric!r}: the validation result has no such "
                f"number (it has: {', '.join(scalars)})"
            )
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if better:
            self.best, self.best_step, self.bad_evals = float(value), step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))

    def summary(self, stopped_at: int) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "stopped_at": stopped_at,
        }


@dataclass
class RunState:
    """The loop's counters, saved in `trainer_state.json` with the fingerprint."""

    step: int = 0
    batches_consumed: int = 0
    # This rank's loader streams (the worker id a batch reports): (raw samples read, samples
    # lost or rejected, batches of a length-bucketing pool consumed) as its last consumed batch
    # reported them; a resumed stream goes on from there (shards.reader.TrainStream.set_start).
    # The checkpoint holds every rank's (`to_json(..., all_streams)`).
    streams: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    nonfinite_skipped: int = 0  # optimizer steps skipped for non-finite gradients, in all
    nonfinite_in_row: int = 0

    @property
    def skipped(self) -> int:
        return sum(counts[1] for counts in self.streams.values())

    def to_json(
        self,
        fingerprint: dict[str, Any],
        stopper: EarlyStopping | None,
        all_streams: list[dict[int, tuple[int, int, int]]],
    ) -> dict:
        """`all_streams`: every rank's `streams`, in rank order (gathered by the caller)."""
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "streams": {
                str(rank): {str(k): list(v) for k, v in streams.items()}
                for rank, streams in enumerate(all_streams)
            },
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_in_row": self.nonfinite_in_row,
            "early_stopping": stopper.state_dict() if stopper is not None else None,
            "fingerprint": fingerprint,
        }

    @classmethod
    def from_json(cls, state: dict[str, Any], rank: int) -> RunState:
        """The state of `rank` (its own loader streams)."""
        mine = state.get("streams", {}).get(str(rank), {})
        return cls(
            step=int(state["step"]),
            batches_consumed=int(state["batches_consumed"]),
            # (read, lost) from checkpoints written before length bucketing: no pool to re-enter
            streams={
                int(k): (int(v[0]), int(v[1]), int(v[2]) if len(v) > 2 else 0)
                for k, v in mine.items()
            },
            nonfinite_skipped=int(state.get("nonfinite_skipped", 0)),
            nonfinite_in_row=int(state.get("nonfinite_in_row", 0)),
        )
