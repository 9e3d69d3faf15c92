"""Stage 7, evaluation: an ONNX file + a dataset → an ``Evaluation`` (accuracy, per-class
precision and recall, confusion matrix), all by onnxruntime on the full test split."""
