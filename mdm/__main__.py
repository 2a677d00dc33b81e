"""``python -m mdm``: the ``mdm`` command."""

from mdm.cli import main

main()
