"""report.html: the run report as one self-contained page (figures embedded as data URIs, no
network, opens from disk). It says what report.md says, through the same sections of
``cnnforge.report.markdown``, and adds the figures and a sortable trials table.

Figure data comes from ``cnnforge.report.figures`` and ``cnnforge.report.explain``, drawings from
``cnnforge.report.plots``; this module only lays them out. A part the run cannot provide yet (search
unfinished, no export, data gone) is replaced by a note saying what is missing.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnforge.core import calibration
from cnnforge.core.atomic import atomic_write_text
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.objectives import as_number, best_first, run_order
from cnnforge.core.preprocessing import Preprocessing
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset, load_dataset
from cnnforge.report import figures, plots
from cnnforge.report.markdown import report_sections

MISCLASSIFIED_SHOWN = 12
EXPLAINED_TEST_IMAGE = 0

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: left; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir=asc]::after { content: " ▲"; }
table.sortable th[data-dir=desc]::after { content: " ▼"; }
tr.best td { background: #fff4e5; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em 1em; }
.scroll { overflow-x: auto; }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      function key(row) {
        var text = row.cells[column].dataset.sort || row.cells[column].textContent.trim();
        var number = Number(text);
        return text === "" ? [2, ""] : isNaN(number) ? [1, text] : [0, number];
      }
      var rows = Array.prototype.slice.call(table.tBodies[0].rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x[0] !== y[0]) return x[0] - y[0];  // numbers, then text, then blanks
        var order = x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
        return dir === "asc" ? order : -order;
      });
      rows.forEach(function (row) { table.tBodies[0].appendChild(row); });
    });
  });
});
"""


# --- Markdown of report.py → HTML (the subset it writes) ---------------------------------------


def _inline(text: str) -> str:
    """`code`, **bold** and _emphasis_ of one line, everything else escaped."""
    parts = re.split(r"`([^`]*)`", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        part = html.escape(part)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        out.append(re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"<em>\1</em>", part))
    return "".join(out)


def _table(lines: list[str]) -> str:
    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    head = "".join(f"<th>{_inline(c)}</th>" for c in cells(lines[0]))
    body = "".join(
        "<tr>" + "".join(f"<td{_num_class(c)}>{_inline(c)}</td>" for c in cells(line)) + "</tr>"
        for line in lines[2:]
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _num_class(text: str) -> str:
    return ' class="num"' if re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?%?", text) else ""


def markdown_to_html(lines: list[str]) -> str:
    """Paragraphs, ``- `` lists and pipe tables, the Markdown that report.py writes."""
    blocks: list[tuple[str, list[str]]] = []
    for line in "\n".join(lines).splitlines():  # a table arrives as one multi-line string
        kind = "table" if line.startswith("|") else "list" if line.startswith("- ") else "p"
        if not line.strip():
            blocks.append(("gap", []))
        elif blocks and blocks[-1][0] == kind and kind != "p":
            blocks[-1][1].append(line)
        else:
            blocks.append((kind, [line]))
    out = []
    for kind, block in blocks:
        if kind == "table":
            out.append(_table(block))
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i[2:])}</li>" for i in block) + "</ul>")
        elif kind == "p":
            out.append(f"<p>{_inline(block[0])}</p>")
    return "\n".join(out)


# --- parts of the page -------------------------------------------------------------------------


def _figure(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode()
    caption = f"<figcaption>{_inline(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">{caption}</figure>'


def _note(text: str) -> str:
    return f'<p class="note">{_inline(text)}</p>'


def _missing_part(missing: list[figures.Missing]) -> str:
    if not missing:
        return ""
    items = "".join(
        f"<li><code>{m.file}</code>: {_inline(m.consequence)}; to make it: {_inline(m.remedy)}</li>"
        for m in missing
    )
    return f'<div class="note"><strong>Missing from this run</strong><ul>{items}</ul></div>'


TRIAL_HEADERS = {"trial_id": "trial", "duration_s": "seconds", "pareto": "pareto (with size)"}


def trials_table(trials: list[dict[str, str]], objective: str, best_id: str | None) -> str:
    """Every trials.csv column that holds something, best trial first; click a header to sort."""
    columns = [c for c in trials[0] if any(t[c] not in ("", None) for t in trials)]
    if objective in columns:  # the score is that metric's column already
        columns.remove("score")
    in_run_order = sorted(trials, key=lambda row: run_order(row["trial_id"]))

    def header(column: str) -> str:
        name = objective if column == "score" else TRIAL_HEADERS.get(column, column)
        return f"<th>{html.escape(name.removeprefix('hp_'))}</th>"

    def cell(value: str) -> str:
        number = as_number(value)
        if number is None:
            return f"<td>{html.escape(value or '')}</td>"
        shown = f"{number:.4g}" if "." in value or "e" in value else value
        return f'<td class="num" data-sort="{number!r}">{shown}</td>'

    rows = "".join(
        f"<tr{' class=best' if row['trial_id'] == best_id else ''}>"
        + "".join(cell(row[c]) for c in columns)
        + "</tr>"
        for row in best_first(in_run_order, objective)
    )
    heads = "".join(header(c) for c in columns)
    return (
        '<div class="scroll"><table class="sortable"><thead><tr>'
        f"{heads}</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _search_part(run: dict[str, Any], best_id: str | None) -> str:
    trials = run["trials"]
    if not trials:
        return _note("No trials recorded yet.")
    objective = run["config"]["search"]["objective"]
    points = figures.trial_points(trials)
    parts = [
        _figure(
            plots.render_trial_scores(points, objective, best_id),
            f"{objective} of each trial",
            "The winner in red; failed trials are marked.",
        )
    ]
    column = figures.latency_column(trials)
    if column and any(p.latency is not None for p in points):
        fronts = figures.pareto_fronts(points, objective)
        parts.append(
            _figure(
                plots.render_score_latency(points, fronts, objective, column, best_id),
                f"{objective} against {column}",
                _front_caption(fronts, objective),
            )
        )
    parts.append(
        "<p>Every trial, best first; click a column header to sort. <em>pareto (with size)</em>: "
        f"on the Pareto front of {html.escape(objective)}, latency and ONNX size.</p>"
        + trials_table(trials, objective, best_id)
    )
    return "\n".join(parts)


def _front_caption(fronts: figures.ParetoFronts, objective: str) -> str:
    """Which front the plot draws, and which trials the table's size-aware front adds."""
    caption = (
        "Green line: the Pareto front, trials that no other trial beats on both "
        f"{objective} and latency ({', '.join(p.trial_id for p in fronts.latency)})."
    )
    if fronts.smaller:
        caption += (
            " Hollow green: on the front once ONNX size counts too "
            f"({', '.join(p.trial_id for p in fronts.smaller)}), as in the table's pareto "
            "column: smaller than every trial that beats them."
        )
    return caption


def _training_part(run_dir: Path, best_id: str | None, finished: bool) -> str:
    if best_id is None:
        return _note("No trial has completed yet, so there is no winner to show.")
    history = figures.training_history(run_dir, best_id)
    if not history:
        return _note(
            f"Trial {best_id} has no per-epoch history (runs made before cnnforge recorded it, "
            "or the trial's files are gone)."
        )
    which = "winner" if finished else "best trial so far (the search has not finished)"
    return _figure(
        plots.render_training_curves(history, f"Trial {best_id}, the {which}"),
        f"training and validation curves of trial {best_id}",
        f"Trial {best_id}, the {which}. Solid: training split; dashed: validation split. "
        "A widening gap between them is overfitting.",
    )


DataLoader = Callable[[str], Dataset]


def _data_loader(dataset: Dataset | None, preprocessing: Preprocessing | None) -> DataLoader:
    """The page's data by source, each source loaded once (two parts read the test split):
    ``dataset`` when the caller has it, else loaded on first use, read by ``preprocessing``
    (what the run recorded, :meth:`RunDir.read_preprocessing`) so the images are the model's."""
    loaded = {dataset.spec.name: dataset} if dataset is not None else {}

    def data(source: str) -> Dataset:
        if source not in loaded:
            loaded[source] = load_dataset(source, preprocessing=preprocessing)
        return loaded[source]

    return data


def _test_split_part(
    run_dir: Path, run: dict[str, Any], class_names: tuple[str, ...], data: DataLoader
) -> str:
    model = RunDir(run_dir).onnx
    evaluation = run.get("evaluation")
    source = evaluation["data"] if evaluation else run["config"]["search"]["data"]
    parts = []
    if model.is_file():
        try:
            predictions = figures.predict_test_split(model, data(source))
        except CnnforgeError as exc:
            predictions = None
            parts.append(_note(f"Test images unavailable: {exc}"))
    else:
        predictions = None
    table = evaluation
    if table is None and predictions is not None:
        table = figures.class_table(predictions, class_names)
        parts.append(
            _note(
                "No `evaluation.json`: the figures below were computed from "
                "`model.onnx` for this report."
            )
        )
    if table:
        class_names = tuple(c["name"] for c in table["per_class"])
        parts.append(
            _figure(
                plots.render_confusion(table["confusion"], class_names),
                "confusion matrix on the test split",
                "Rows: the true class; columns: what the model said. Counts; "
                "colour: share of the row.",
            )
        )
        parts.append(
            _figure(
                plots.render_class_scores(table["per_class"]),
                "precision and recall per class",
                "Precision: of the images predicted as the class, the share that "
                "are; recall: of the images of the class, the share found.",
            )
        )
    if predictions is not None and predictions.probabilities is not None:
        parts += _calibration_figures(predictions)
    if predictions is not None:
        wrong = figures.misclassified(predictions, MISCLASSIFIED_SHOWN)
        if wrong:
            parts.append(
                _figure(
                    plots.render_misclassified(
                        predictions.images[wrong],
                        [class_names[predictions.labels[i]] for i in wrong],
                        [class_names[predictions.predicted[i]] for i in wrong],
                        [float(predictions.confidence[i]) for i in wrong],
                    ),
                    "misclassified test images",
                )
            )
        else:
            parts.append(_note("The model classified every test image correctly."))
    return "\n".join(parts)


def _calibration_figures(predictions: figures.Predictions) -> list[str]:
    """The reliability diagram and the accuracy-coverage curve, before and after calibration."""
    views = figures.calibration_views(
        predictions.probabilities, predictions.temperature, predictions.label_smoothing
    )
    labels = predictions.labels
    return [
        _figure(
            plots.render_reliability(
                {name: calibration.reliability(p, labels) for name, p in views.items()},
                {name: calibration.ece(p, labels) for name, p in views.items()},
            ),
            "reliability diagram on the test split",
            "Test images in 15 bins of the model's top probability: the share right against "
            "the mean top probability. On the diagonal, 0.9 means right nine times in ten.",
        ),
        _figure(
            plots.render_coverage(
                {name: figures.coverage_curve(p, labels) for name, p in views.items()}
            ),
            "accuracy against coverage on the test split",
            "Answering only the images the model is surest of: the accuracy on that share.",
        ),
    ]


def _learned_part(
    run_dir: Path, run: dict[str, Any], class_names: tuple[str, ...], data: DataLoader
) -> str:
    from cnnforge.modeling.keras_io import load_keras_model
    from cnnforge.report.explain import explain_array

    best_model = RunDir(run_dir).best_model
    if not best_model.is_file():
        return _note("No `best.keras` yet: the feature maps need the trained model.")
    try:
        dataset = data(run["config"]["search"]["data"])
    except CnnforgeError as exc:
        return _note(f"Test images unavailable: {exc}")
    index = EXPLAINED_TEST_IMAGE
    image, label = dataset.x_test[index], class_names[dataset.y_test[index]]
    explanation = explain_array(load_keras_model(best_model), image, class_names=class_names)
    return _figure(
        plots.render_explanation(explanation, f"test image {index} (a {label})"),
        f"filters and feature maps for test image {index}",
        "Top: the first conv layer's learned filters. Below: what each conv layer outputs for "
        "this image; deeper layers trade resolution for more, more abstract maps. "
        f"`cnnforge explain {best_model} IMAGE` draws this for any image.",
    )


def _section(title: str, body: str) -> str:
    anchor = re.sub(r"\W+", "-", title.lower()).strip("-")
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _guarded(part: Callable[[], str]) -> str:
    """A part of the page, or a note saying why it is not there: one figure that cannot be made
    (data gone, a plugin's layer that will not run alone) must not cost the whole report."""
    try:
        return part()
    except CnnforgeError as exc:
        return _note(str(exc))
    except Exception as exc:
        return _note(f"This part could not be made ({type(exc).__name__}: {exc}).")


def render_html(run_dir: Path, dataset: Dataset | None = None) -> str:
    """The whole page for a run directory, from its files (``dataset``: the run's data, when
    the caller has it loaded already)."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir).read()
    data = _data_loader(dataset, RunDir(run_dir).read_preprocessing())
    markdown = {title: lines for title, lines in report_sections(run)}
    class_names = tuple(run["config"]["data_spec"]["class_names"])
    best_id, finished = figures.best_trial(run)

    def measured(title: str) -> str:
        lines = markdown[title]
        return markdown_to_html(lines) if lines else _note(f"Not measured yet ({title.lower()}).")

    sections = [
        ("Summary", measured("Summary") + _missing_part(figures.missing_artifacts(run_dir, run))),
        ("Trials", _search_part(run, best_id)),
        ("Training of the winner", _guarded(lambda: _training_part(run_dir, best_id, finished))),
        ("Export parity", measured("Export parity")),
        ("Latency", measured("Latency")),
        (
            "Test split",
            measured("Test split")
            + _guarded(lambda: _test_split_part(run_dir, run, class_names, data)),
        ),
        (
            "What the model learned",
            _guarded(lambda: _learned_part(run_dir, run, class_names, data)),
        ),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in run["config"].get("versions", {}).items())
    title = f"cnnforge run {run_dir.name}"
    body = "\n".join(_section(name, part) for name, part in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n"
        f"<footer><p>Versions: {html.escape(versions)}</p></footer>\n"
        f"<script>{SORT_SCRIPT}</script></body></html>\n"
    )


def write_html_report(run_dir: Path, dataset: Dataset | None = None) -> Path:
    path = RunDir(run_dir).report_html
    atomic_write_text(path, render_html(run_dir, dataset))
    return path
