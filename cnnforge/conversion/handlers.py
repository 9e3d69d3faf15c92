"""tf2onnx conversions for TensorFlow ops that tf2onnx 1.17 lacks, with the same maths.

``to_onnx`` passes ``CUSTOM_OP_HANDLERS`` to ``tf2onnx.convert.from_keras``. Each entry is
tf2onnx's documented custom-op form ``{tf_op: (handler, [onnx_op])}``: tf2onnx first renames
the node to ``onnx_op``, then calls ``handler(ctx, node, name, args)`` to finish the rewrite.
"""

from __future__ import annotations

from typing import Any


def erfc_as_one_minus_erf(ctx: Any, node: Any, name: str, args: list) -> None:
    """``Erfc(x) = 1 - Erf(x)``: the node is already ``Erf``; subtract its output from one.

    Keras' exact GELU (ConvNeXt) is ``0.5 * x * erfc(-x / sqrt(2))`` on TensorFlow. Computing
    ``1 - erf`` loses relative precision only where ``erfc`` is tiny, and there GELU multiplies
    it by a large negative ``x`` whose product is ~0 either way.
    """
    import numpy as np
    from tf2onnx import utils

    erf_output = node.output[0]
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(erf_output))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    subtract = ctx.insert_new_node_on_output(
        "Sub", erf_output, name=utils.make_name(f"{name}_erfc")
    )
    ctx.replace_inputs(subtract, [one.output[0], erf_output])


CUSTOM_OP_HANDLERS: dict[str, tuple[Any, list[str]]] = {
    "Erfc": (erfc_as_one_minus_erf, ["Erf"]),
}


def custom_op_handlers() -> dict[str, tuple[Any, list[str]]]:
    """A fresh copy: tf2onnx adds its own entries to the dict it is given."""
    return dict(CUSTOM_OP_HANDLERS)
