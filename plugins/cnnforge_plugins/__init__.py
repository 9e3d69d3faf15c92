"""cnnforge's built-in plugins, registered through the same entry points and public API as
anybody else's."""

# Keras' default (0.99) leaves the moving statistics far from the batches' after the few hundred
# steps of a short trial on a subset, and validation collapses; 0.9 settles in ~50 steps.
BN_MOMENTUM = 0.9
