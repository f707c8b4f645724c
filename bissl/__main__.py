"""``python -m bissl`` == the ``bissl`` console script."""

from __future__ import annotations

import sys

from bissl.cli import main

if __name__ == "__main__":
    sys.exit(main())
