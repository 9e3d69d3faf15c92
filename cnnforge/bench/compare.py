"""The regression gate: two bench JSON files, cell by cell, medians and their intervals.

The rule, for a threshold t (``--max-slowdown 10%`` is t = 0.10), per cell (runtime, model,
provider, threads, batch size) found in both files:

- ratio = new p50 / base p50; its interval [new low / base high, new high / base low] from the
  two 95 % intervals of the medians.
- **slower** (fails the gate) when the interval's low end is above 1 + t: even the kindest
  reading of both intervals is a slowdown beyond t. Both intervals hold their medians with
  ≥ 95 % each, so the verdict holds with ≥ 90 %.
- **slower?** when the ratio is above 1 + t but its interval reaches below 1 + t: possibly
  slower, not shown by this run's noise; reported, does not fail.
- **faster** when the whole interval is below 1; **same** otherwise.
- Results without intervals (files from before they were recorded) count as exact medians.
- A median that is not a positive number of milliseconds (0 from a hand-edited or broken file)
  is no measurement to divide by: one line naming the cell (and the file) says so.
- Cells in one file only are listed and do not fail the gate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnforge.core.errors import CnnforgeError

CellKey = tuple[str, str, str, str, int]


@dataclass
class CellComparison:
    key: CellKey  # runtime, model, provider, threads, batch size
    base_p50: float | None
    new_p50: float | None
    base_ci: tuple[float, float] | None
    new_ci: tuple[float, float] | None
    ratio: float | None
    ratio_interval: tuple[float, float] | None
    verdict: str  # slower, slower?, same, faster, only in base, only in new


@dataclass
class Comparison:
    max_slowdown: float
    cells: list[CellComparison]

    @property
    def slower(self) -> list[CellComparison]:
        return [c for c in self.cells if c.verdict == "slower"]

    @property
    def passed(self) -> bool:
        return not self.slower


def parse_slowdown(text: str) -> float:
    """``"10%"`` or ``"0.1"`` → 0.1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = -1.0
    if not raw.endswith("%") and value >= 1:
        value = -1.0
    if value < 0:
        raise CnnforgeError(
            f"max slowdown {text!r} is not a percentage like 10% or a fraction like 0.1"
        )
    return value


def load_results(path: Path | str) -> list[dict[str, Any]]:
    """The result rows of a bench JSON file; a wrong file is one line that says what it is."""
    path = Path(path)
    if not path.is_file():
        raise CnnforgeError(
            f"bench results {path} do not exist; write them with cnnforge bench --json"
        )
    try:
        rows = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CnnforgeError(
            f"{path} is not JSON ({exc}); give a file written by cnnforge bench"
        ) from None
    needed = {"runtime", "batch_size", "provider", "threads", "latency_ms"}
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, dict) and needed <= set(r) for r in rows)
    ):
        raise CnnforgeError(
            f"{path} is not a list of cnnforge bench results (each with "
            f"{', '.join(sorted(needed))}); give a file written by cnnforge bench"
        )
    for row in rows:
        _check_median(row, f"{path}: ")
    return rows


def describe_cell(key: CellKey) -> str:
    """``model fp32, onnxruntime cpu, threads 1, batch 8``: a cell as a person names it."""
    runtime, model, provider, threads, batch = key
    where = "keras" if runtime.startswith("keras") else f"{runtime} {provider}"
    return f"model {model or '?'}, {where}, threads {threads}, batch {batch}"


def _check_median(row: dict[str, Any], where: str = "") -> None:
    """A median must be a positive, finite number of ms: a ratio of medians divides by it."""
    latency = row.get("latency_ms")
    value = latency.get("p50") if isinstance(latency, dict) else None
    try:
        p50 = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        p50 = float("nan")
    if not 0 < p50 < float("inf"):
        raise CnnforgeError(
            f"{where}cell ({describe_cell(_key(row))}) has a median of {value!r} ms, not a "
            "positive time to compare with; measure that cell again with cnnforge bench"
        )


def _key(row: dict[str, Any]) -> CellKey:
    threads = "default" if row["threads"] is None else str(row["threads"])
    return (
        row["runtime"],
        str(row.get("model", "")),
        row["provider"],
        threads,
        int(row["batch_size"]),
    )


def _median_and_ci(row: dict[str, Any]) -> tuple[float, tuple[float, float]]:
    p50 = float(row["latency_ms"]["p50"])
    ci = row.get("p50_ci_ms")
    return p50, (float(ci[0]), float(ci[1])) if ci else (p50, p50)


def compare_cell(
    key: CellKey, base: dict[str, Any], new: dict[str, Any], max_slowdown: float
) -> CellComparison:
    _check_median(base, "base: ")
    _check_median(new, "new: ")
    base_p50, (base_lo, base_hi) = _median_and_ci(base)
    new_p50, (new_lo, new_hi) = _median_and_ci(new)
    ratio = new_p50 / base_p50
    interval = (new_lo / base_hi, new_hi / base_lo if base_lo > 0 else float("inf"))
    if interval[0] > 1 + max_slowdown:
        verdict = "slower"
    elif ratio > 1 + max_slowdown:
        verdict = "slower?"
    elif interval[1] < 1:
        verdict = "faster"
    else:
        verdict = "same"
    return CellComparison(
        key, base_p50, new_p50, (base_lo, base_hi), (new_lo, new_hi), ratio, interval, verdict
    )


def compare(
    base: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]], max_slowdown: float
) -> Comparison:
    """Every cell of ``base`` and ``new`` side by side, with its verdict (see the module doc)."""
    base_cells = {_key(r): r for r in base}
    new_cells = {_key(r): r for r in new}
    cells = []
    for key in [*base_cells, *(k for k in new_cells if k not in base_cells)]:
        if key in base_cells and key in new_cells:
            cells.append(compare_cell(key, base_cells[key], new_cells[key], max_slowdown))
            continue
        only = base_cells.get(key) or new_cells[key]
        p50, ci = _median_and_ci(only)
        in_base = key in base_cells
        cells.append(
            CellComparison(
                key,
                p50 if in_base else None,
                None if in_base else p50,
                ci if in_base else None,
                None if in_base else ci,
                None,
                None,
                "only in base" if in_base else "only in new",
            )
        )
    return Comparison(max_slowdown, cells)


COMPARE_HEADERS = [
    "model",
    "runtime",
    "threads",
    "batch",
    "base p50",
    "new p50",
    "ratio",
    "ratio CI",
    "verdict",
]


def comparison_rows(comparison: Comparison) -> list[list[str]]:
    """One line per cell, narrow enough for a terminal: medians in ms, new / base ratios."""
    from cnnforge.bench.output import number

    def runtime(key: CellKey) -> str:
        return "keras" if key[0].startswith("keras") else f"ort {key[2]}"

    return [
        [
            c.key[1],
            runtime(c.key),
            c.key[3],
            str(c.key[4]),
            number(c.base_p50),
            number(c.new_p50),
            f"{c.ratio:.3f}" if c.ratio else "",
            f"{c.ratio_interval[0]:.2f}–{c.ratio_interval[1]:.2f}" if c.ratio_interval else "",
            c.verdict,
        ]
        for c in comparison.cells
    ]
