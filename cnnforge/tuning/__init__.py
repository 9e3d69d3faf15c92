"""Stage 3, search: a ``SearchConfig`` (+ the loaded ``Dataset``) → a ``SearchResult`` and a run
directory (``config.json``, ``tuner/``, ``trials.csv``, ``search.json``, ``best.keras``).

KerasTuner oracles and tuner, per-trial records, candidate cost before training, the time
budget, and the final training of the winner on train+validation."""
