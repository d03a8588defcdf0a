"""The one exception type for user mistakes, and the CLI boundary that turns it into one line."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """Something the user can fix (a path, a flag, a value): shown as one line, exit code 2."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call a CLI's main; a UserError becomes `error: ...` on stderr and exit code 2, with no traceback."""
    try:
        return main(argv) or 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per process
            print(f"error: {e}", file=sys.stderr)
        return 2
