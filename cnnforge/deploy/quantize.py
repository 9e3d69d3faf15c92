"""Reduced-precision variants of an exported float32 model, with onnxruntime's own tools.

- ``int8``: static quantization in QDQ format, int8 weights per channel, uint8 activations
  calibrated on real training images (MinMax ranges), after onnxruntime's pre-processing step (symbolic shape inference and
  graph optimisation, which needs ``sympy``). Static, not dynamic: dynamic quantization of
  convolutions ran 5–6× slower than float32 on the project's CPUs, static QDQ about 2.8× faster.
- ``fp16``: weights and arithmetic in half precision, the graph's input and output kept float32
  (``keep_io_types``), so callers feed and read the same arrays as with the float32 model.

Imports no TensorFlow: a model can be re-quantized where only onnxruntime is installed.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.contract import EXPORT_PRECISIONS
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning

PRECISIONS = EXPORT_PRECISIONS
DEFAULT_CALIBRATION_IMAGES = 256
MIN_CALIBRATION_IMAGES = 16
CALIBRATION_BATCH = 32

# What each execution provider does with a precision it has no fast kernels for: it still runs
# (onnxruntime converts around the missing kernels), but the variant only saves file size.
_SLOW_PATHS = {
    ("fp16", "cpu"): (
        "the CPU provider has few float16 kernels: onnxruntime casts most of the graph back to "
        "float32, so expect half the file size, not a speed-up (fp16 pays off on cuda/tensorrt)"
    ),
    ("int8", "cuda"): (
        "the CUDA provider runs QDQ int8 convolutions by dequantizing to float32, so expect a "
        "quarter of the file size, not a speed-up (int8 pays off on cpu/tensorrt)"
    ),
}


def check_precision(precision: str) -> str:
    """``precision`` in canonical form, or a one-line error naming the choices."""
    canonical = precision.lower()
    if canonical not in PRECISIONS:
        raise CnnforgeError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    return canonical


def provider_note(precision: str, provider: str) -> str | None:
    """Why ``precision`` will not be faster on ``provider``, or None where it has fast kernels."""
    return _SLOW_PATHS.get((precision, provider))


def warn_if_slow(precision: str, provider: str) -> None:
    note = provider_note(precision, provider)
    if note:
        warnings.warn(f"{precision} on {provider}: {note}", CnnforgeWarning, stacklevel=3)


def check_calibration_count(count: int) -> None:
    if count < MIN_CALIBRATION_IMAGES:
        raise CnnforgeError(
            f"too few calibration images ({count}); int8 needs at least "
            f"{MIN_CALIBRATION_IMAGES} real training images to estimate activation ranges"
        )


def calibration_sample(images: np.ndarray, count: int | None, *, source: str, seed: int = 0):
    """``count`` training images drawn without replacement (seeded); all of them, up to the
    default, when ``count`` is None. Too few images cannot estimate activation ranges."""
    available = len(images)
    if count is not None and count > available:
        raise CnnforgeError(
            f"asked for {count} calibration images but {source} has only {available} training "
            f"images; pass --calibration-images {available} or fewer"
        )
    count = count if count is not None else min(DEFAULT_CALIBRATION_IMAGES, available)
    check_calibration_count(count)
    chosen = np.random.default_rng(seed).choice(available, count, replace=False)
    return images[np.sort(chosen)].astype(np.float32)


def to_fp16(model: Any) -> Any:
    """A float16 copy of ``model`` (a ModelProto) whose input and output stay float32.

    onnxruntime's converter, through its ``OnnxModel`` wrapper, which also removes redundant
    casts; the nodes are then sorted again (the converter appends the input casts at the end,
    and ONNX shape inference and the checker need topological order).
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(copy.deepcopy(model))
    with warnings.catch_warnings(), _converter_errors("fp16"):
        warnings.simplefilter("ignore")  # it warns for each weight clamped to the fp16 range
        wrapped.convert_float_to_float16(keep_io_types=True)
        wrapped.topological_sort()
    return wrapped.model


@contextlib.contextmanager
def _converter_errors(precision: str) -> Iterator[None]:
    """onnxruntime's converters fail with anything from ImportError to KeyError: one line."""
    try:
        yield
    except CnnforgeError:
        raise
    except ImportError as exc:
        raise CnnforgeError(
            f"{precision} conversion needs {exc.name or 'a missing package'} (onnxruntime's "
            "tools use sympy); pip install sympy"
        ) from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CnnforgeError(
            f"onnxruntime could not make the {precision} variant ({type(exc).__name__}: "
            f"{reason}); export another --precision"
        ) from exc


class _ImageBatches:
    """onnxruntime's CalibrationDataReader protocol over an array of images."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: images[i : i + CALIBRATION_BATCH]}
            for i in range(0, len(images), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def to_int8(model: Any, calibration: np.ndarray, *, per_channel: bool = True) -> Any:
    """Static QDQ int8 copy of ``model``, calibrated on ``calibration`` (images in the model's
    own layout and pixel range): int8 weights per channel, uint8 activations (U8S8).

    onnxruntime documents S8S8 as its first choice, but on this project's x86 CPUs (AVX2, no
    VNNI) it left a convolution and the pixel scaling unfused (float32 between Q/DQ pairs) and
    ran 1.3× slower than U8S8, which fuses every one into QLinearConv / QLinearMul. U8S8 can
    saturate on such CPUs; the accuracy gate is what guards against that.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Every operator onnxruntime can quantize, but the final Softmax: quantizing it would round
    # the output probabilities to multiples of 1/255 (ties in the top-k) and save nothing.
    op_types = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - {"Softmax"})
    check_calibration_count(len(calibration))
    input_name = model.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="cnnforge-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        with _converter_errors("int8"):
            quant_pre_process(model, prepared)
            quantize_static(
                prepared,
                quantized,
                _ImageBatches(input_name, calibration.astype(np.float32)),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=op_types,
            )
        return onnx.load(str(quantized))


def convert(model: Any, precision: str, calibration: np.ndarray | None = None) -> Any:
    """``model`` (float32 ModelProto) at ``precision``; int8 needs ``calibration`` images."""
    precision = check_precision(precision)
    if precision == "fp16":
        return to_fp16(model)
    if precision == "int8":
        if calibration is None:
            raise CnnforgeError("int8 needs calibration images; give a data source (--data)")
        return to_int8(model, calibration)
    return model
