"""Training logs of a run folder (written by rank 0).

- ``metrics.jsonl``: one line per step, ``{"step": k, "reward/mean": ..., "loss": ..., "time/rollout": ...}``;
  the same scalars go to tensorboard (``RUN/tensorboard``) when it is installed and to wandb when
  ``log.wandb_project`` is set (offline unless ``WANDB_MODE`` says otherwise: a run never needs a network).
- ``steps.jsonl``: the step-wise log, one line per trajectory and training step:
  ``{"step", "uid", "sample", "reward", "correct", "num_tool_calls", "steps": [{"k", "d", "w", "tokens",
  "span": [start, end]}]}``, spans in response-token coordinates; read back by ``sodkern plot``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe scalar: non-finite floats become strings ("nan", "inf") rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Per-step scalars to JSONL, tensorboard and wandb; the step-wise log to JSONL.

    Args:
        run_dir: the run folder.
        enabled: False on every rank but 0 (calls are then no-ops).
        tensorboard: also write tensorboard events (when ``tensorboard`` is installed).
        wandb_project: wandb project name; empty for none.
        config: the run config, stored with the wandb run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str = "",
        config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        self._steps = open(self.run_dir / STEPS_FILE, "a")  # noqa: SIM115
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb_project:
            if importlib.util.find_spec("wandb") is None:
                raise ImportError(f"log.wandb_project={wandb_project!r} needs wandb: pip install wandb")
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                dir=str(self.run_dir),
                config=config,
                mode=os.environ.get("WANDB_MODE", "offline"),
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One step's scalars."""
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_steps(self, records: list[dict]) -> None:
        """Step-wise records (see the module docstring), one JSON line each."""
        if not self.enabled or not records:
            return
        self._steps.writelines(json.dumps(r, default=_clean) + "\n" for r in records)
        self._steps.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._steps.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_after(path: str | Path, step: int) -> None:
    """Drop the lines of a JSONL log whose ``step`` is after ``step`` (on resume: those steps run again)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file (an unfinished last line, from a killed run, is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
