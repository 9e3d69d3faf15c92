"""Stage 4, conversion: a ``.keras`` model or run directory → ``model.onnx`` (tf2onnx, with the
contract names and ``cnnforge.*`` metadata) and ``parity.json`` (Keras vs onnxruntime, checked
before anything is kept); precision and layout variants."""
