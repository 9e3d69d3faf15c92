"""Keras → ONNX with the cnnforge contract, metadata, and a parity check before anything is kept.

The exported model has one input ``images`` (float32, NHWC or NCHW, raw pixels 0–255, dynamic
batch) and one output ``probabilities`` (batch × classes). It is converted with
``tf2onnx.convert.from_keras`` on a functional model: ``from_function`` turns the constants of a
``Normalization`` layer into graph inputs, and ``from_keras`` fails on Keras 3 ``Sequential``
models, which are therefore re-wrapped as functional models first. Every model, ours or a
user's ``.keras`` file, goes through the rewrites of ``rewrite.py`` (grouped convolutions as
depthwise ones) and the op handlers of ``handlers.py`` (``Erfc``).

Precision variants (``quantize.py``) are made from the float32 graph, then checked like it: parity
with the precision's tolerance, and accuracy on the test split next to the Keras model's (the
gate). The figures go into the variant's ``NAME.parity.json`` and its ``cnnforge.*`` metadata.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.conversion import calibrate as calibrating
from cnnforge.conversion import handlers as onnx_handlers
from cnnforge.conversion.parity import AccuracyCheck, ParityReport, check_parity, measure_accuracy
from cnnforge.conversion.rewrite import convertible
from cnnforge.core.atomic import atomic_paths, atomic_write_text
from cnnforge.core.calibration import DEFAULT_ACCEPTANCE
from cnnforge.core.contract import INPUT_NAME, LAYOUTS, META_PREFIX, OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.preprocessing import IMAGE_MODES, Preprocessing
from cnnforge.core.rundir import RunDir
from cnnforge.core.version import __version__
from cnnforge.data.dataset import Dataset, as_dataset
from cnnforge.deploy.quantize import calibration_sample, check_precision, convert, warn_if_slow
from cnnforge.deploy.runtime import provider_name, to_layout
from cnnforge.modeling.keras_io import ExportSource, as_functional, load_keras_model, resolve_source

DEFAULT_OPSET = 17
DEFAULT_MAX_ACCURACY_DROP = 1.0  # percentage points of test accuracy
# The graph's ood_score (a cosine) against NumPy's float64 one on the same features.
OOD_SCORE_ATOL = 1e-4
# The parity check's (atol, min top-1 agreement) per precision; parity.py says why these.
TOLERANCES: dict[str, tuple[float | None, float | None]] = {
    "fp32": (1e-4, 0.999),
    "fp16": (1e-2, 0.99),
    "int8": (None, 0.95),
}


@dataclass
class ExportResult:
    onnx_path: Path
    parity_path: Path
    parity: ParityReport
    opset: int
    seconds: float
    size_bytes: int
    precision: str = "fp32"
    layout: str = "NHWC"
    # ``probability_calibration`` and ``unknown_threshold`` as stamped, where calibrated.
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> AccuracyCheck | None:
        return self.parity.accuracy


def _rename_value(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output]:
        if value.name == old:
            value.name = new


def _name_batch_axis(graph: Any) -> None:
    for value in [*graph.input, *graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"


def to_onnx(
    model: Any,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
    inputs_as_nchw: bool = False,
) -> Any:
    """Convert ``model`` to an ONNX ModelProto with the cnnforge input/output contract.

    ``inputs_as_nchw``: the graph takes channels-first images (tf2onnx adds the transpose).
    """
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    model = convertible(as_functional(model))
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CnnforgeError("cnnforge exports models with one image input and one output")
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) != 4 or len(model.outputs[0].shape) != 2:
        raise CnnforgeError(
            f"model takes {input_shape} and returns {tuple(model.outputs[0].shape)}; cnnforge "
            "exports image classifiers: (batch, H, W, C) in, (batch, classes) out"
        )
    signature = (tf.TensorSpec((None, *input_shape[1:]), tf.float32, name=INPUT_NAME),)
    try:
        proto, _ = tf2onnx.convert.from_keras(
            model,
            input_signature=signature,
            opset=opset,
            inputs_as_nchw=[INPUT_NAME] if inputs_as_nchw else None,
            custom_op_handlers=onnx_handlers.custom_op_handlers(),
        )
    except Exception as exc:
        raise CnnforgeError(
            f"tf2onnx could not convert the model at opset {opset} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); try another --opset"
        ) from exc
    # tf2onnx's graph objects hold reference cycles: left to the collector, ConvNeXt-Tiny's
    # kept 3.6 GB resident through the parity check and the accuracy gate that follow
    gc.collect()
    _rename_value(proto.graph, proto.graph.input[0].name, INPUT_NAME)
    _rename_value(proto.graph, proto.graph.output[0].name, OUTPUT_NAME)
    _name_batch_axis(proto.graph)
    stamp(proto, metadata or {})
    return proto


def stamp(proto: Any, metadata: dict[str, Any]) -> None:
    """Set ``cnnforge.*`` metadata (strings as they are, anything else as JSON) and the producer.

    Keys already present are replaced; the converters of precision variants may drop or keep
    the metadata of their input, so every variant is stamped again at the end.
    """
    keys = {META_PREFIX + key for key in metadata}
    kept = [entry for entry in proto.metadata_props if entry.key not in keys]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "cnnforge"
    proto.producer_version = __version__


def _metadata(
    model: Any,
    source: ExportSource,
    class_names: tuple[str, ...],
    layout: str,
    preprocessing: Preprocessing | None,
) -> dict[str, Any]:
    import keras
    import tensorflow as tf
    import tf2onnx

    height, width, channels = model.inputs[0].shape[1:]
    return {
        "class_names": list(class_names),
        "input_layout": layout,
        "input_shape": [height, width, channels] if layout == "NHWC" else [channels, height, width],
        "pixel_range": [0, 255],
        **({"preprocessing": preprocessing.to_json()} if preprocessing else {}),
        "precision": "fp32",
        "source": source.keras_path.name,
        **({"run": source.run_dir.name} if source.run_dir else {}),
        "versions": {
            "cnnforge": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "tf2onnx": tf2onnx.__version__,
        },
    }


def _name_only(source: str) -> str:
    """A data source as the metadata records it: a path by its last part (``small.npz``,
    ``cifar10:cifar-10-python.tar.gz``), a registered name as it is. The model travels; the
    folders of the machine that made it must not travel with it."""
    plugin, sep, rest = source.partition(":")
    if sep and plugin.isidentifier() and rest:
        return f"{plugin}:{Path(rest).name}"
    return Path(source).name or source


def check_layout(layout: str) -> str:
    """``layout`` in canonical form (NHWC or NCHW), or a one-line error naming the choices."""
    if layout.upper() not in LAYOUTS:
        raise CnnforgeError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout.upper()


def default_output(source: ExportSource, precision: str, layout: str) -> Path:
    """``model.onnx`` beside the source; ``model-int8.onnx``, ``model-nchw.onnx``... for variants,
    so that exporting a variant never replaces the float32 model."""
    suffixes = [s for s in (precision, layout.lower()) if s not in ("fp32", "nhwc")]
    name = "-".join(["model", *suffixes]) + ".onnx"
    return (source.run_dir or source.keras_path.parent) / name


def reference_data(
    source: ExportSource, data: str | Dataset | None, model: Any
) -> tuple[Dataset | None, str]:
    """The dataset whose images the model takes (``data``: a source or one already loaded; by
    default its run's), or None and why not."""
    data = data or source.data
    if not data:
        return None, f"{source.keras_path} is not in a run directory; give --data"
    expected = tuple(model.inputs[0].shape[1:])
    dataset = as_dataset(data, preprocessing=image_preprocessing(source, expected))
    data = dataset.spec.name
    if dataset.x_test.shape[1:] != expected:
        return None, f"{data} has images of shape {dataset.x_test.shape[1:]}, the model {expected}"
    classes = int(model.outputs[0].shape[-1])
    if dataset.spec.num_classes != classes:
        return None, f"{data} has {dataset.spec.num_classes} classes, the model {classes}"
    return dataset, ""


def image_preprocessing(source: ExportSource, input_shape: tuple) -> Preprocessing | None:
    """How images become this model's input (:meth:`Preprocessing.of_model`): as its run read
    its data, else stretched (bilinear) to its input shape. None for a model whose input is not
    an image file's (say 6 channels): it still exports and is checked, with nothing to record."""
    if input_shape[-1] not in IMAGE_MODES:
        return None
    return Preprocessing.of_model(
        {"preprocessing": source.preprocessing},
        input_shape,
        model=f"the run of {source.keras_path} (its data.json)",
        remedy="the model is not that run's; export a copy of it from outside the run directory",
    )


def _parity_images(dataset: Any, input_shape: tuple, count: int = 256) -> tuple[np.ndarray, str]:
    """Real test images where the data is known; otherwise seeded random pixels."""
    if dataset is not None:
        images = dataset.x_test[:count].astype(np.float32)
        return images, f"test split of {_name_only(dataset.spec.name)}"
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (count, *input_shape)).astype(np.float32), "random pixels"


def _calibration_metadata(images: np.ndarray, data: str) -> dict[str, Any]:
    return {
        "images": len(images),
        "source": f"train split of {_name_only(data)}",
        "method": "MinMax",
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8",
        "weights": "int8",
    }


def export(
    source: Path | str,
    output: Path | str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    data: str | Dataset | None = None,
    precision: str = "fp32",
    layout: str = "NHWC",
    atol: float | None = None,
    min_top1_agreement: float | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    force: bool = False,
    calibration_images: int | None = None,
    provider: str = "cpu",
    calibrate: bool = False,
    acceptance: float = DEFAULT_ACCEPTANCE,
) -> ExportResult:
    """Export a run directory or ``.keras`` file to ONNX at ``precision`` and ``layout``.

    Parity with Keras is checked with the precision's tolerances (``TOLERANCES``; ``atol`` and
    ``min_top1_agreement`` override them), and, where the data is known, accuracy on the test
    split with Keras and with onnxruntime. A variant losing more than ``max_accuracy_drop``
    percentage points is refused unless ``force``. A kept model and its ``parity.json`` (the
    evidence) replace the old ones together; a refused one leaves both as they were, its
    evidence in ``parity.failed.json`` (``NAME.parity.failed.json``).

    ``calibrate``: fit a temperature on the variant's own predictions of held-out images
    (``calibrate.py`` says which) and put it in the graph, with the ``ood_score`` output and
    its threshold accepting ``acceptance`` of those images; parity is checked on the graph
    without them, then the argmax of the graph with them against the graph without, and the
    score against NumPy's.
    """
    precision, layout = check_precision(precision), check_layout(layout)
    provider_name(provider)
    resolved = resolve_source(source)
    output = Path(output) if output else default_output(resolved, precision, layout)
    if output.suffix != ".onnx":
        raise CnnforgeError(f"output {output} must end in .onnx")
    warn_if_slow(precision, provider)
    model = load_keras_model(resolved.keras_path)
    dataset, why_not = reference_data(resolved, data, model)
    if dataset is None and precision != "fp32":
        raise CnnforgeError(
            f"{precision} export needs the model's own data to calibrate and measure accuracy "
            f"on ({why_not})"
        )
    held = calibrating.heldout(resolved, dataset) if calibrate else None
    calibration = None
    if precision == "int8":  # drawn before converting: a bad count fails at once
        sample = calibration_sample(dataset.x_train, calibration_images, source=dataset.spec.name)
        calibration = to_layout(sample, layout)
    classes = int(model.outputs[0].shape[-1])
    class_names = (
        resolved.class_names
        or (dataset.spec.class_names if dataset is not None else None)
        or tuple(str(i) for i in range(classes))
    )
    preprocessing = (
        dataset.preprocessing
        if dataset is not None and dataset.preprocessing is not None
        else image_preprocessing(resolved, tuple(model.inputs[0].shape[1:]))
    )
    metadata = _metadata(model, resolved, class_names, layout, preprocessing)

    start = time.perf_counter()
    proto = to_onnx(model, opset=opset, metadata=metadata, inputs_as_nchw=layout == "NCHW")
    proto = convert(proto, precision, calibration)
    seconds = time.perf_counter() - start
    variant = proto.SerializeToString()

    report = _verify(
        model,
        variant,
        dataset,
        precision,
        layout,
        provider,
        atol,
        min_top1_agreement,
        max_accuracy_drop,
    )
    report.opset = opset
    fitted: dict[str, Any] = {}
    if held is not None:
        proto, fitted, score_check = calibrating.fit_in_graph(
            proto, held, layout, provider, acceptance, calibrating.label_smoothing_of(model)
        )
        images, _ = _parity_images(dataset, tuple(model.inputs[0].shape[1:]))
        calibrated = proto.SerializeToString()
        report.calibration = calibrating.check_argmax(variant, calibrated, images, layout, provider)
        report.calibration |= score_check
    if report.accuracy is not None:
        report.accuracy.forced = force and not report.accuracy.passed
    parity_path, failed_path = RunDir.parity_for(output), RunDir.failed_parity_for(output)
    evidence = json.dumps(asdict(report), indent=2)
    failures = _failures(report, resolved.keras_path, force)
    if failures:
        atomic_write_text(failed_path, evidence)
        raise CnnforgeError(f"{'; '.join(failures)} (evidence: {failed_path})")
    if report.accuracy is not None and report.accuracy.forced:
        warnings.warn(
            f"kept the {precision} variant although it fails the accuracy gate (--force): "
            f"{report.accuracy.summary()}",
            CnnforgeWarning,
            stacklevel=2,
        )
    measured = _measured(report, calibration, dataset)
    stamp(proto, {**metadata, "precision": precision, **measured, **fitted})
    onnx_bytes = proto.SerializeToString()
    with atomic_paths(output, parity_path) as (model_tmp, parity_tmp):
        model_tmp.write_bytes(onnx_bytes)
        parity_tmp.write_text(evidence)
    failed_path.unlink(missing_ok=True)  # an earlier attempt's: this model replaced it
    return ExportResult(
        output, parity_path, report, opset, seconds, len(onnx_bytes), precision, layout, fitted
    )


def _verify(
    model: Any,
    variant: bytes,
    dataset: Any,
    precision: str,
    layout: str,
    provider: str,
    atol: float | None,
    min_top1_agreement: float | None,
    max_accuracy_drop: float,
) -> ParityReport:
    """Parity with the precision's tolerances, then (data known) the test-split accuracy of both."""
    default_atol, default_agreement = TOLERANCES[precision]
    images, described = _parity_images(dataset, tuple(model.inputs[0].shape[1:]))
    report = check_parity(
        model,
        variant,
        images,
        inputs=described,
        atol=default_atol if atol is None else atol,
        min_top1_agreement=default_agreement if min_top1_agreement is None else min_top1_agreement,
        layout=layout,
        provider=provider,
    )
    report.precision = precision
    if dataset is not None:
        report.accuracy = measure_accuracy(
            model,
            variant,
            dataset.x_test,
            dataset.y_test,
            data=_name_only(dataset.spec.name),
            max_drop_points=max_accuracy_drop,
            layout=layout,
            provider=provider,
        )
    return report


def _failures(report: ParityReport, keras_path: Path, force: bool) -> list[str]:
    """Every reason to refuse the export, gathered: parity, then the accuracy gate."""
    failures = []
    if not report.passed:
        failures.append(f"export of {keras_path} failed parity: {report.summary()}")
    scaled = report.calibration
    if scaled and (
        scaled["argmax_unchanged"] < 1
        or scaled["max_abs_diff_from_numpy"] > 1e-4
        or scaled.get("ood_score_max_abs_diff", 0) > OOD_SCORE_ATOL
    ):
        failures.append(f"the calibrated graph of {keras_path} is wrong: {scaled}")
    if report.accuracy is not None and not report.accuracy.passed and not force:
        failures.append(
            f"{report.precision} variant refused: {report.accuracy.summary()}; raise "
            "--max-accuracy-drop, choose another --precision, or --force to keep it"
        )
    return failures


def _measured(report: ParityReport, calibration: np.ndarray | None, dataset: Any) -> dict:
    """The figures an exported model carries about itself: accuracy, calibration."""
    measured: dict[str, Any] = {}
    if report.accuracy is not None:
        measured["accuracy"] = asdict(report.accuracy)
    if calibration is not None:
        measured["calibration"] = _calibration_metadata(calibration, dataset.spec.name)
    return measured
