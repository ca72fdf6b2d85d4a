"""The results: rows printed as they come and ``OUT/gpu_check.json`` rewritten after each; at the end
``OUT/gpu_check.md``, the skips and the table of every result on stdout."""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from benchmarks.gpu_check import START
from lightning_vrn.atomic import write_text


def plain(value: Any) -> Any:
    """JSON- and pickle-friendly copy: mappings -> dict, tuples -> list, tensors and numpy -> numbers."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class Recorder:
    """Results as rows ``(phase, name, value, unit, note, extra)``; prints each and rewrites the JSON each time."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "phases": {}, "rows": [], "skipped": []}

    def add(self, phase: str, name: str, value: float, unit: str, note: str = "", **extra: Any) -> float:
        value = float(value)
        self.data["rows"].append({"phase": phase, "name": name, "value": value, "unit": unit, "note": note,
                                  "extra": plain(extra)})
        print(f"[{phase}] {name}: {value:.4g} {unit}" + (f" ({note})" if note else ""), flush=True)
        self.save()
        return value

    def skip(self, phase: str, name: str, reason: str) -> None:
        self.data["skipped"].append({"phase": phase, "name": name, "reason": reason})
        print(f"[{phase}] {name}: skipped: {reason}", flush=True)
        self.save()

    @contextlib.contextmanager
    def attempt(self, phase: str, name: str):
        """Run one measurement; an Exception is recorded as a skip and the phase goes on."""
        try:
            yield
        except Exception as error:  # noqa: BLE001: one failed measurement must not end the session
            print("".join(traceback.format_exception(type(error), error, error.__traceback__)[-4:]), end="")
            self.skip(phase, name, f"{type(error).__name__}: {str(error)[:300]}")

    def rows(self, phase: str | None = None) -> list[dict]:
        return [row for row in self.data["rows"] if phase is None or row["phase"] == phase]

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - START, 2)
        write_text(self.out / "gpu_check.json", json.dumps(self.data, indent=1, allow_nan=True) + "\n")

    def table(self) -> str:
        lines = ["| phase | measurement | value | unit | notes |", "|---|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['name']} | {r['value']:.4g} | {r['unit']} | {r['note']} |" for r in self.rows()]
        return "\n".join(lines)

    def finish(self, budget_s: float) -> None:
        """Mark the run finished, write ``gpu_check.json`` and ``gpu_check.md``; print the skips, the total
        time and, last, the table of every result."""
        self.data["meta"]["finished"] = True
        self.save()
        table = self.table()
        write_text(self.out / "gpu_check.md", table + "\n")
        for item in self.data["skipped"]:
            print(f"skipped [{item['phase']}] {item['name']}: {item['reason']}")
        print(f"\ntotal {time.perf_counter() - START:.0f} s of {budget_s:.0f}; results in {self.out}\n", flush=True)
        print(table, flush=True)
