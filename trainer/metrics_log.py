"""Metrics to `metrics.jsonl` and TensorBoard, from the main process only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _drop_partial_line(path: Path) -> None:
    """A run killed while writing a line leaves it unfinished; a resumed run appends after
    the last whole line instead of gluing its first record onto the fragment."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


class MetricLogger:
    """Appends one JSON line per call and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; for a step logged twice (a resumed run) the last wins."""
    by_key: dict[tuple, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            kind = tuple(sorted(k for k in record if k != "step"))
            by_key[(record["step"], kind)] = record
    return sorted(by_key.values(), key=lambda r: r["step"])
