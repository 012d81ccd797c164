"""Subcommands of the ``peftbench`` CLI, one module each (see peftbench.cli)."""
