"""Stage 2, model: a plugin + ``DataSpec`` + KerasTuner ``hp`` → a compiled Keras model that
honours the export contract (raw pixels in as ``images``, softmax out as ``probabilities``); the
training recipe and its ``tf.data`` pipelines; transfer learning around a backbone; Keras I/O."""

from cnnforge.modeling.threads import size_tensorflow_threads

size_tensorflow_threads()
