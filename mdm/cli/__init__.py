"""The ``mdm`` command: one module per command group; ``main`` holds the entry point."""
