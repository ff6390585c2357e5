"""`python tests/fault_inject.py FAULT -- TRAIN_ARGS...`: train.py with one fault injected in
process, for tests/test_faults.py. Faults (the trainer has no hook for them; they are patched
in from outside, as a crash or a bad batch would arrive):

  kill_in_save:STEP   SIGKILL this process after the step-STEP checkpoint's files are written
                      by accelerate and before the trainer commits them
  nan_at:STEP[,STEP]  the loss of the given optimizer steps becomes NaN (first micro-batch)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    fault, rest = sys.argv[1], sys.argv[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    kind, _, arg = fault.partition(":")
    steps = {int(s) for s in arg.split(",") if s}
    if kind == "kill_in_save":
        from accelerate import Accelerator

        original = Accelerator.save_state

        def save_state(self, output_dir=None, **kwargs):
            out = original(self, output_dir, **kwargs)
            if any(Path(output_dir).name.endswith(f"step_{s:07d}") for s in steps):
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        Accelerator.save_state = save_state
    elif kind == "nan_at":
        from trainer.tasks import Task

        original_losses = Task.losses
        calls = {"n": 0}

        def losses(self, model, batch):
            out, extras = original_losses(self, model, batch)
            calls["n"] += 1  # one call per micro-batch; grad_accum=1 in the tests
            if calls["n"] in steps:
                first = next(iter(out))
                out[first] = out[first] * float("nan")
            return out, extras

        Task.losses = losses
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    import train

    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
