"""``python -m mdm``: the ``mdm`` command."""

from mdm.cli.main import main

main()
