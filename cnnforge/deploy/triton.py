"""An exported model as a Triton Inference Server model repository:

    DIR/NAME/config.pbtxt    platform onnxruntime_onnx, input/output names, types and dims,
                             max_batch_size and dynamic batching (when the batch axis is open)
    DIR/NAME/1/model.onnx    the model, version 1
    DIR/NAME/labels.txt      class names, one a line (Triton's classification extension)

Everything comes from the model itself (its graph and cnnforge metadata). The config is written
as text here, without Triton's packages; the tests parse it with Triton's own model-config
protobuf schema. The folder ``DIR/NAME`` is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from cnnforge.core.atomic import replace_folder, temporary_sibling
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.runtime import metadata, open_session

DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE_DELAY_US = 2000
LABELS_FILE = "labels.txt"
# onnxruntime's element types → Triton's data types
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(bool)": "TYPE_BOOL",
}


def triton_config(
    model: Path | str,
    name: str,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> tuple[str, list[str]]:
    """``config.pbtxt`` text for ``model`` and its class names (empty when it has none).

    An open batch axis (tf2onnx's ``unk__``/``n``) gives ``max_batch_size: max_batch`` with
    dynamic batching, and per-image dims; a fixed one gives ``max_batch_size: 0`` and the full
    shape, as Triton requires."""
    session = open_session(model)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    batched = all(t.shape and not isinstance(t.shape[0], int) for t in [*inputs, *outputs])
    names = [str(n) for n in metadata(session).get("class_names") or []]
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch if batched else 0}",
    ]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for index, tensor in enumerate(tensors):
            lines.append(f"{kind} [")
            lines.append("  {")
            lines.append(f'    name: "{tensor.name}"')
            lines.append(f"    data_type: {_triton_type(tensor.type, tensor.name)}")
            dims = _dims(tensor.shape, batched, tensor.name)
            lines.append(f"    dims: [ {', '.join(dims or ['1'])} ]")
            if not dims:  # one value per image (ood_score): Triton's form for it
                lines.append("    reshape: { shape: [ ] }")
            if kind == "output" and index == 0 and names:
                lines.append(f'    label_filename: "{LABELS_FILE}"')
            lines.append("  }")
            lines.append("]")
    if batched:
        lines.append("dynamic_batching {")
        lines.append(f"  max_queue_delay_microseconds: {queue_delay_us}")
        lines.append("}")
    return "\n".join(lines) + "\n", names


def _triton_type(onnx_type: str, tensor: str) -> str:
    if onnx_type not in TRITON_TYPES:
        raise CnnforgeError(f"tensor {tensor!r} is {onnx_type}, which has no Triton data type")
    return TRITON_TYPES[onnx_type]


def _dims(shape: list, batched: bool, tensor: str) -> list[str]:
    """The dims Triton is told (the batch axis left out where batched); none for a tensor of
    one value per image, which must be batched."""
    dims = shape[1:] if batched else shape
    if not dims and not batched:
        raise CnnforgeError(f"tensor {tensor!r} has no dims; Triton needs some")
    return [str(d) if isinstance(d, int) else "-1" for d in dims]


def write_triton_repository(
    model: Path | str,
    directory: Path | str,
    *,
    name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> Path:
    """Write ``directory/NAME`` (NAME: ``name`` or the model file's stem) for Triton; an existing
    one is replaced whole. Returns the model's folder."""
    model, directory = Path(model), Path(directory)
    name = name or model.stem
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise CnnforgeError(f"Triton model name {name!r} must be letters, digits, _ . or -")
    if max_batch < 1:
        raise CnnforgeError(f"max_batch must be at least 1, got {max_batch}")
    config, labels = triton_config(model, name, max_batch=max_batch, queue_delay_us=queue_delay_us)
    target = directory / name
    staging = temporary_sibling(target)
    try:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "1").mkdir(parents=True)
        shutil.copyfile(model, staging / "1" / "model.onnx")
        (staging / "config.pbtxt").write_text(config)
        if labels:
            (staging / LABELS_FILE).write_text("\n".join(labels) + "\n")
        replace_folder(staging, target)
    except OSError as exc:
        raise CnnforgeError(
            f"cannot write Triton repository {target} ({exc.strerror}); check space and permissions"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
