"""CLI subcommands (see sparseinfer/cli.py)."""
