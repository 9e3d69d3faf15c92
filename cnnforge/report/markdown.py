"""report.md from what a run directory holds. Measurement never formats; this only reads and formats.

Every section comes from a file of the run directory (config.json, trials.csv, search.json,
parity.json, bench.json, evaluation.json), so ``cnnforge report RUN`` can rebuild the report at
any time, and a section whose file is missing says so instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnforge.core.atomic import atomic_write_text
from cnnforge.core.markdown import markdown_table
from cnnforge.core.objectives import sorted_trials
from cnnforge.core.rundir import RunDir
from cnnforge.tuning.plan import COUNT_DEFAULTS, SearchPlan


def _model(search: dict[str, Any]) -> str:
    if not search.get("backbone"):
        return f"architecture: `{search['arch']}`"
    default = "trained" if search["backbone"].startswith("run:") else "imagenet"
    return f"backbone: `{search['backbone']}` (weights: {search.get('weights') or default})"


def _asked(run: dict[str, Any]) -> str:
    """What the search was asked to run: its plan (auto), or its counts."""
    search = run["config"]["search"]
    if "plan" in run:
        return f"planned: {SearchPlan.from_json(run['plan']).summary()}"
    trials = search["max_trials"] or COUNT_DEFAULTS["max_trials"]
    epochs = search["epochs"] or COUNT_DEFAULTS["epochs"]
    asked = "" if search["tuner"] == "hyperband" else f"asked for {trials}, "
    return f"{asked}up to {epochs} epochs, batch size {search['batch_size']}"


def _summary(run: dict[str, Any]) -> list[str]:
    search = run["config"]["search"]
    lines = [
        f"- data: `{search['data']}`, {_model(search)}, tuner: `{search['tuner']}`, "
        f"seed {search['seed']}",
        f"- trials: {len(run['trials'])} ({_asked(run)})",
    ]
    if "search" in run:
        best = run["search"]
        lines.append(
            f"- best trial: {best['trial_id']}, {search['objective']} {best['score']:.4f}, "
            f"{best['params']} parameters"
        )
        final = best.get("final_training")
        if final:
            found = final["epochs_found"]
            cut = f" (the search found {found})" if final["epochs"] < found else ""
            lines.append(
                f"- final training: the best trial again on train+validation "
                f"({final['examples']} images), {final['epochs']} epochs{cut}, "
                f"{final['seconds']:.0f} s{_pace(final)}"
            )
    if search.get("time_budget"):
        lines.append(f"- time budget: {search['time_budget']:.0f} s for the whole run")
    if "evaluation" in run:
        ev = run["evaluation"]
        lines.append(
            f"- **test accuracy of the exported ONNX model (onnxruntime): {ev['accuracy']:.2%}** "
            f"on {ev['images']} images"
        )
    return lines


def _pace(final: dict[str, Any]) -> str:
    if not final.get("train_gflops"):
        return ""
    busy = f", {final['cores_busy']:.2f} cores busy" if final.get("cores_busy") else ""
    return f" at {final['train_gflops']:.0f} GFLOP/s{busy}"


def _trials_section(trials: list[dict[str, str]], objective: str) -> list[str]:
    if not trials:
        return ["_No trials recorded yet._"]
    ranked = sorted_trials(trials, objective)
    hp_columns = [c for c in trials[0] if c.startswith("hp_")]
    rows = [
        [
            t["trial_id"],
            t["status"],
            float(t["score"]) if t["score"] else None,
            t["params"],
            t["duration_s"],
            ", ".join(f"{c[3:]}={t[c]}" for c in hp_columns if t[c] != ""),
        ]
        for t in ranked
    ]
    return [
        markdown_table(["trial", "status", objective, "params", "seconds", "hyperparameters"], rows)
    ]


def _parity_section(parity: dict[str, Any]) -> list[str]:
    rows = [
        [
            c["batch_size"],
            c["images"],
            c["max_abs_diff"],
            c["max_rel_diff"],
            f"{c['top1_agreement']:.2%}",
        ]
        for c in parity["cases"]
    ]
    verdict = "passed" if parity["passed"] else "FAILED: " + "; ".join(parity["mismatches"])
    scaled = parity.get("calibration")
    calibrated = (
        [
            "",
            f"Temperature {scaled['temperature']:.4f} in the graph: the argmax unchanged on "
            f"{round(scaled['argmax_unchanged'] * scaled['images'])} of {scaled['images']} images "
            "(checked against the graph without it, which is the one compared above).",
            *_score_check(scaled),
        ]
        if scaled
        else []
    )
    return [
        f"Keras vs onnxruntime on {parity['inputs']}, opset {parity['opset']}, atol {parity['atol']}: "
        f"{verdict}; batch axis dynamic: {parity['batch_axis_dynamic']}.",
        *calibrated,
        "",
        markdown_table(
            ["batch", "images", "max abs diff", "max rel diff", "top-1 agreement"], rows
        ),
    ]


def _score_check(scaled: dict[str, Any]) -> list[str]:
    """The line on the graph's ``ood_score`` against NumPy's, where the export checked one."""
    if "ood_score_max_abs_diff" not in scaled:
        return []
    return [
        f"`ood_score` in the graph: within {scaled['ood_score_max_abs_diff']:.1e} of NumPy's on "
        f"{scaled['ood_score_images']} held-out images."
    ]


def bench_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per bench result: runtime, batch, p50 (and its interval)/p90/p99/p99.9 in ms,
    images/s, speed-up. Reads files from before p99.9 and the interval were recorded too."""
    rows = []
    for r in results:
        lat, ci = r["latency_ms"], r.get("p50_ci_ms")
        rows.append(
            [
                r["runtime"],
                r["batch_size"],
                r["threads"] or "default",
                lat["p50"],
                f"{ci[0]:.4g}–{ci[1]:.4g}" if ci else None,
                lat["p90"],
                lat["p99"],
                lat.get("p99.9"),
                lat["mean"],
                round(r["throughput"]),
                r.get("speedup_vs_keras"),
            ]
        )
    return rows


BENCH_HEADERS = [
    "runtime",
    "batch",
    "threads",
    "p50 ms",
    "p50 95% CI",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "mean ms",
    "images/s",
    "× Keras",
]


def _bench_section(results: list[dict[str, Any]]) -> list[str]:
    env, first = results[0]["environment"], results[0]
    provider = env.get("provider", first.get("provider"))
    timed = (
        f"at least {first['sweep']['min_iterations']} timed runs and "
        f"{first['sweep']['min_duration_s']:g} s"
        if "sweep" in first
        else f"{first['iterations']} timed runs"
    )
    return [
        f"{env['cpu']}, {env['cores']} cores, onnxruntime {env['onnxruntime']}, provider "
        f"{provider}; {timed} after {first['warmup']} warm-up runs per row. Keras is timed as a "
        "`tf.function` call in the same process; × Keras is the ratio of medians.",
        "",
        markdown_table(BENCH_HEADERS, bench_rows(results)),
    ]


def _evaluation_section(ev: dict[str, Any]) -> list[str]:
    rows = [[c["name"], c["precision"], c["recall"], c["support"]] for c in ev["per_class"]]
    lines = [f"Accuracy {ev['accuracy']:.2%} on {ev['images']} test images of `{ev['data']}`."]
    if "ece" in ev:  # an evaluation.json written before these figures has none
        selective = ", ".join(f"{a:.2%} at {c}" for c, a in ev["selective_accuracy"].items())
        lines.append(
            f"Calibration: ECE {ev['ece']:.2%} (15 bins), NLL {ev['nll']:.4f}, Brier "
            f"{ev['brier']:.4f}; accuracy by coverage: {selective}."
        )
    return [*lines, "", markdown_table(["class", "precision", "recall", "images"], rows)]


def report_sections(run: dict[str, Any]) -> list[tuple[str, list[str] | None]]:
    """(title, Markdown lines) per section; None where the run has not measured it yet."""
    objective = run["config"]["search"]["objective"]
    return [
        ("Summary", _summary(run)),
        ("Trials", _trials_section(run["trials"], objective)),
        ("Export parity", _parity_section(run["parity"]) if "parity" in run else None),
        ("Latency", _bench_section(run["bench"]) if run.get("bench") else None),
        ("Test split", _evaluation_section(run["evaluation"]) if "evaluation" in run else None),
    ]


def render_markdown(run_dir: Path) -> str:
    run = RunDir(run_dir).read()
    out = [f"# cnnforge run `{Path(run_dir).name}`", ""]
    for title, lines in report_sections(run):
        out += [f"## {title}", "", *(lines or [f"_Not measured yet ({title.lower()})._"]), ""]
    versions = run["config"].get("versions", {})
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(out) + "\n"


def write_report(run_dir: Path) -> Path:
    path = RunDir(run_dir).report_md
    atomic_write_text(path, render_markdown(run_dir))
    return path
