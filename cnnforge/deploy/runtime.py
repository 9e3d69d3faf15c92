"""onnxruntime sessions and the cnnforge metadata of an ONNX model, shared by every stage that
runs the exported model (parity, evaluate, bench). Imports no TensorFlow."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.contract import LAYOUTS, META_PREFIX, PROVIDERS
from cnnforge.core.cpus import quota_limited_cpus
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.onnxinfo import largest_tensor_bytes


def provider_name(provider: str) -> str:
    """The onnxruntime name of ``provider`` (cpu, cuda, tensorrt), if this install has it."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise CnnforgeError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise CnnforgeError(
            f"provider {provider!r} is not available in this onnxruntime "
            f"({', '.join(installed_onnxruntime()) or ort.__version__} installed, with "
            f"{', '.join(available)}); install onnxruntime-gpu for cuda/tensorrt"
        )
    return PROVIDERS[provider]


def installed_onnxruntime() -> list[str]:
    """The onnxruntime distributions installed, with versions (e.g. ``onnxruntime-gpu 1.20.1``)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def open_session(
    model: Path | str | bytes,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool | None = None,
) -> Any:
    """An InferenceSession on ``model`` (a path or serialized bytes); a bad file is one line.

    ``threads`` sets onnxruntime's intra-op pool (inter-op stays 1); when None, a CPU limit
    onnxruntime does not see (a cgroup quota, an affinity: ``quota_limited_cpus``) sizes it,
    else onnxruntime's default stands. ``spinning`` sets ``session.intra_op.allow_spinning``
    (None keeps onnxruntime's default, which spins).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    elif (limit := quota_limited_cpus()) is not None:
        options.intra_op_num_threads = limit
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise CnnforgeError(f"ONNX model {path} does not exist; check the path")
        check_external_data(path)
        model = str(path)
    try:
        providers = [provider_name(provider)]
        if provider == "tensorrt":  # what TensorRT cannot take runs on CUDA, not the CPU
            providers.append(PROVIDERS["cuda"])
        return ort.InferenceSession(model, options, providers=providers)
    except CnnforgeError:
        raise
    except Exception as exc:
        label = model if isinstance(model, str) else "the ONNX model"
        reason = str(exc).strip().splitlines()[0][:200]
        raise CnnforgeError(
            f"onnxruntime cannot load {label} ({reason}); is it a complete .onnx file?"
        ) from None


def check_external_data(path: Path) -> None:
    """Refuse a model whose external weights live outside its own folder (``../../etc/passwd``):
    a downloaded model must not make the runtime read arbitrary files. Every tensor is checked,
    wherever it sits (subgraphs, attributes, sparse tensors, functions)."""
    import onnx

    from cnnforge.deploy.onnxinfo import tensors

    folder = path.resolve().parent
    for tensor in tensors(path):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise CnnforgeError(
                f"ONNX model {path} points its weights at {location!r}, outside its folder; "
                "refusing to load it (keep external data files beside the model)"
            )


def metadata(session: Any) -> dict[str, Any]:
    """The cnnforge.* metadata of a session's model, JSON values decoded."""
    props = session.get_modelmeta().custom_metadata_map
    decoded = {}
    for key, value in props.items():
        if key.startswith(META_PREFIX):
            try:
                decoded[key[len(META_PREFIX) :]] = json.loads(value)
            except json.JSONDecodeError:
                decoded[key[len(META_PREFIX) :]] = value
    return decoded


PREDICT_BATCH = 256  # images per call where they are small: fewer calls, same answers
# What one batch may take while a whole split is predicted (export's accuracy gate, evaluate, the
# report): the batch shrinks where the graph's tensors are large (a backbone resizing 28×28 pixels
# to 224 inside), estimated as TENSORS_ALIVE of its largest tensor per image. Measured (AMD EPYC,
# 2 cores): MobileNetV2 at 224, a batch of 32 took 0.4 GB more in onnxruntime and 0.5 GB in a
# Keras graph (3-4 largest tensors); ConvNeXt-Tiny's onnxruntime session took ~12 per image.
BATCH_MEMORY_BYTES = 256 * 2**20
TENSORS_ALIVE = 4


def prediction_batch_size(model: Any, most: int = PREDICT_BATCH) -> int:
    """Images per call for ``model`` (path, bytes or ModelProto) within ``BATCH_MEMORY_BYTES``:
    ``most`` for small graphs, fewer where one image's largest tensor is large, at least 1."""
    per_image = largest_tensor_bytes(model) * TENSORS_ALIVE
    if not per_image:  # shapes unknown: the budget of a 224x224 image with 96 channels
        per_image = 224 * 224 * 96 * 4 * TENSORS_ALIVE
    return max(1, min(most, BATCH_MEMORY_BYTES // per_image))


def predict(session: Any, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Probabilities for ``images`` (raw pixels, the model's layout), in batches."""
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: images[i : i + batch_size].astype(np.float32)})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def predict_outputs(
    session: Any, images: np.ndarray, names: Sequence[str], batch_size: int | None = None
) -> list[np.ndarray]:
    """The graph's outputs ``names`` for ``images`` (raw pixels, the model's layout), in
    batches of ``batch_size`` (default ``PREDICT_BATCH``)."""
    name, size = session.get_inputs()[0].name, batch_size or PREDICT_BATCH
    parts = [
        session.run(list(names), {name: images[i : i + size].astype(np.float32)})
        for i in range(0, len(images), size)
    ]
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    """NHWC images (how datasets and Pillow hold them) in ``layout``, the order the model takes."""
    if layout == "NHWC":
        return images
    if layout == "NCHW":
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise CnnforgeError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
