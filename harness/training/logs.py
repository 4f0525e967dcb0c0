"""CSV logs (always), TensorBoard (when the ``tensorboard`` package is installed), progress bars."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from tqdm.auto import tqdm


class CSVLog:
    """Append rows of dicts to a CSV; the columns grow as new keys appear (the file is rewritten then).

    ``truncate_after(step)`` drops rows past ``step`` when a run resumes from a checkpoint,
    so the log of a resumed run reads like an uninterrupted one.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.fields: list[str] = []
        self.rows: list[dict] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = list(reader)

    def truncate_after(self, step: int) -> None:
        self.rows = [r for r in self.rows if int(float(r.get("step", 0) or 0)) <= step]
        self._rewrite()

    def write(self, row: dict) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        new = [k for k in row if k not in self.fields]
        self.rows.append(row)
        if new or not self.path.is_file():
            self.fields += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields).writerow(row)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(self.rows)


class TensorBoardLog:
    """Scalars to TensorBoard; a no-op without the ``tensorboard`` package."""

    def __init__(self, folder, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return
        self.writer = SummaryWriter(str(folder))

    def write(self, prefix: str, row: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, initial: int = 0, desc: str = "", file=None, leave: bool | None = None) -> tqdm:
    """A tqdm bar that redraws at most every 0.5 s on a terminal and every 30 s elsewhere
    (a log file gets a line per 30 s, not one per step). Update the postfix with
    ``refresh=False``: tqdm's default redraws at once, bypassing the throttle.
    ``leave`` (default: only when not a terminal) keeps the last state after ``close()``."""
    stream = sys.stderr if file is None else file
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=(not tty) if leave is None else leave,
                file=stream, mininterval=0.5 if tty else 30.0, maxinterval=60.0 if tty else 300.0)
