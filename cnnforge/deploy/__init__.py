"""Stage 5, deployment: an ONNX file → onnxruntime sessions, decoded metadata, model facts
(``inspect``), quantized variants, predictions on image files, and call timing.

TensorFlow-free: everything here runs with onnxruntime, onnx, numpy and Pillow only."""
