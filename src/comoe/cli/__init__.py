"""The command line (`comoe train | eval | tasks | analyze | compare | bench`): argparse lives here only."""

from comoe.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
