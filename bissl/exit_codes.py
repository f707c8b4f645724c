"""Exit statuses of the ``bissl`` commands (one place, for every subcommand's module)."""

from __future__ import annotations

#: Bad usage or config (argparse's convention), a failed run, an interruption (Ctrl-C's 128 + 2).
EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
