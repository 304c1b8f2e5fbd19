"""The `unisteer` console script's entry point, outside the `unisteer` package on purpose.

Importing `unisteer` loads torch and transformers, which takes seconds; a Ctrl-C during that import would end
in a KeyboardInterrupt traceback, because no code of the command has run yet to catch it. This module imports
nothing heavy, so it can catch the interrupt around the import (exit 130, like an interrupt of a running
command: see `unisteer.cli`). Nothing else belongs here.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # unisteer.cli.EXIT_INTERRUPTED, not imported: importing it is what may be interrupted


def main() -> int:
    try:
        from unisteer.cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run()
