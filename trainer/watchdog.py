"""A job never hangs silently: heartbeats name a stalled rank, and workers outlive no launcher.

- Every rank records its step and phase as it goes, and a thread writes them to
  `RUN_DIR/heartbeat/rank_R.json` (with time, host, pid) every 2 s, so a rank waiting in a collective stays
  fresh while a stopped or hung one falls silent. When a collective times out
  (`train.collective_timeout_s`), the rank that waited reads the others' heartbeats and the
  error names the rank heard from longest ago, with its last step and phase; the process
  then exits non-zero and the launcher ends the job. (The folder must be on storage every
  node sees, like the checkpoints.)
- A rank started by a launcher (`accelerate launch`, torchrun) watches its parent process:
  when the launcher dies (kill -9 included) the rank exits within about a second instead of
  training on as an orphan.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("medalign")

HEARTBEAT_DIR = "heartbeat"


class Heartbeat:
    """This rank's last known position. `beat` only records it; a background thread writes the
    file every `interval_s`, so a rank that is only waiting in a collective stays fresh while
    a stopped or hung process (every thread of it) falls silent: the rank heard from longest
    ago is the one to blame."""

    def __init__(
        self, output_dir: str, rank: int, world_size: int, interval_s: float = 2.0
    ) -> None:
        self.folder = Path(output_dir) / HEARTBEAT_DIR
        self.rank, self.world_size = rank, world_size
        self.enabled = world_size > 1
        self.step, self.phase = 0, "start"
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write()
            threading.Thread(
                target=self._keep_beating,
                args=(interval_s,),
                name="medalign-heartbeat",
                daemon=True,
            ).start()

    def _keep_beating(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            self._write()

    def beat(self, step: int, phase: str) -> None:
        """Where this rank is now; the thread writes it (the step loop does no I/O for it)."""
        self.step, self.phase = step, phase

    def _write(self) -> None:
        if not self.enabled:
            return
        record = {
            "rank": self.rank,
            "step": self.step,
            "phase": self.phase,
            "time": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        path = self.folder / f"rank_{self.rank}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:  # only the thread writes once it runs
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:  # a heartbeat is a diagnostic: it never stops training
            pass

    def others(self) -> list[dict]:
        records = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                records.append(json.loads((self.folder / f"rank_{rank}.json").read_text()))
            except (OSError, ValueError):
                records.append({"rank": rank, "step": None, "phase": "never heard from"})
        return records

    def stall_report(self) -> str:
        """Which rank to blame: the one heard from longest ago (never: first), then the one
        furthest behind."""
        now = time.time()
        others = self.others()

        def behind(r: dict) -> tuple:
            step = r.get("step")
            return (r.get("time", 0), -1 if step is None else step)

        lines = []
        for r in sorted(others, key=behind):
            ago = f"{now - r['time']:.0f} s ago" if "time" in r else "no heartbeat"
            where = f" on {r['host']} (pid {r['pid']})" if "host" in r else ""
            lines.append(f"rank {r['rank']}: step {r.get('step')}, {r.get('phase')}, {ago}{where}")
        suspect = sorted(others, key=behind)[0] if others else None
        head = (
            f"rank {suspect['rank']} stopped answering (last heard at step {suspect.get('step')}, "
            f"{suspect.get('phase')})"
            if suspect is not None
            else "no other rank"
        )
        return f"{head}; this rank {self.rank} waited at step {self.step} ({self.phase}). " + (
            "Last heartbeats: " + "; ".join(lines)
        )


def is_collective_timeout(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(
        s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset")
    )


def watch_parent(interval_s: float = 1.0) -> threading.Thread | None:
    """Exits this process when the launcher that started it is gone (launched ranks only)."""
    if "LOCAL_RANK" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                log.error(
                    "the launcher (pid %d) is gone; rank %s exits instead of training on alone",
                    parent,
                    os.environ.get("RANK", "?"),
                )
                logging.shutdown()
                os._exit(1)

    thread = threading.Thread(target=watch, name="medalign-parent-watch", daemon=True)
    thread.start()
    return thread
