"""Stage 6, benchmark: ONNX files (+ an optional Keras baseline) → a ``BenchReport`` of latency
statistics per model × provider × threads × batch size, with the machine's measured peak;
its output formats and the regression gate (``compare``). Reads results, never searches."""
