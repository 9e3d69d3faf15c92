"""What each of rung 0's candidates costs to train, planned before any of them has trained.

The probe times one candidate; the others are wider or narrower (on Fashion-MNIST the wider
prior trained at about a third of the first one's pace). Each candidate's pace is planned from
its forward FLOPs, counted on its Keras model: the probe's seconds per example, plus (or minus)
its FLOPs beyond the probe's at the rate the probe trained at. A probe too small to measure a
rate (its steps bound by dispatch, not arithmetic) lends the nominal rate instead; and no
candidate is planned faster than half the probe's pace (the faster prior, at a quarter of the
first one's FLOPs, trained at 1.5x its pace: dispatch has a floor).
"""

from __future__ import annotations

import math
import time
from typing import Any

import keras

from cnnforge.tuning.plan import NOMINAL_TRAIN_GFLOPS, Probe

MIN_COST_RATIO = 0.5
COST_SHARE = 0.02  # of the budget, the most spent building candidates to count their FLOPs
_CONVOLUTIONS = ("Conv1D", "Conv2D", "Conv3D")


def forward_flops(model: keras.Model) -> int:
    """Forward FLOPs per example of ``model``'s convolutions and dense layers (2 x their
    multiply-adds), what a CNN's training time follows; channels-last layers."""
    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        total += _layer_macs(layer)
    return 2 * total


def _layer_macs(layer: Any) -> int:
    kind = type(layer).__name__
    if kind not in ("Dense", "DepthwiseConv2D", "SeparableConv2D", *_CONVOLUTIONS):
        return 0
    try:
        inputs, outputs = layer.input.shape, layer.output.shape
    except (AttributeError, ValueError):  # a layer called more than once, or never
        return 0
    positions = math.prod(outputs[1:-1])
    if kind == "Dense":
        return positions * inputs[-1] * outputs[-1]
    window = math.prod(layer.kernel_size)
    if kind == "DepthwiseConv2D":
        return positions * outputs[-1] * window
    if kind == "SeparableConv2D":
        return positions * inputs[-1] * (window + outputs[-1])
    return positions * outputs[-1] * window * inputs[-1] // layer.groups


def pace_ratio(flops: int, probe_flops: int, probe: Probe) -> float:
    """A candidate's seconds per example over the probe's, from the FLOPs of both."""
    if not flops or not probe_flops:
        return 1.0
    measured = 3 * probe_flops / probe.per_example  # a training step: ~3 forward passes
    rate = max(measured, NOMINAL_TRAIN_GFLOPS * 1e9)
    per_example = probe.per_example + 3 * (flops - probe_flops) / rate
    return max(MIN_COST_RATIO, per_example / probe.per_example)


def cost_ratios(
    hypermodel: Any,
    hps: Any,
    candidates: list[dict[str, Any]],
    probe: Probe,
    seconds: float | None,
) -> list[float]:
    """Each candidate's pace over the probe's (the first candidate's), counted by building
    them in turn for at most ``seconds`` (None: all of them, as a --deterministic plan must:
    the same counts on any machine); those not reached are left out."""
    give_up = None if seconds is None else time.perf_counter() + seconds
    flops: list[int] = []
    for values in candidates:
        if give_up is not None and flops and time.perf_counter() > give_up:
            break
        hp = hps.copy()
        hp.values = dict(values)
        keras.backend.clear_session()
        try:
            flops.append(forward_flops(hypermodel.build(hp)))
        except Exception:  # its trial will say why; planned at the probe's pace meanwhile
            flops.append(0)
    keras.backend.clear_session()
    first = flops[0] if flops else 0
    return [pace_ratio(f, first, probe) for f in flops]
