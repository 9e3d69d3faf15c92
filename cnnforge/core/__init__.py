"""The ground every stage stands on: contract names (I/O names, metadata prefix, layouts,
providers, tuners, plugin kinds, precisions), errors, atomic writes, objectives and the Pareto
front, Markdown tables. Imports nothing heavy and no other stage."""
