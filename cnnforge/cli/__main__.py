"""``python -m cnnforge.cli``: the same as the ``cnnforge`` command."""

from cnnforge.cli import main

main()
