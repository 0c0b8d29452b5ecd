"""How every CLI fails: a named error is one line on stderr and exit status 2, never a traceback.

`RESTUNE_DEBUG=1` re-raises instead, for the full traceback. Errors that are bugs (anything not listed below) keep
Python's traceback, so they get reported rather than read as a usage mistake.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

EXIT_NAMED_ERROR = 2  # argparse's status for a usage error: a named error is the user's to fix, like a bad flag
DEBUG_ENV = "RESTUNE_DEBUG"
# what our code raises with a message naming the file/flag and what was expected (STYLE.md "Errors")
NAMED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError, ImportError)


def one_line(err: BaseException) -> str:
    """The message on one line (some errors join a reason and a detail with newlines)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def run_cli(main: Callable[[Sequence[str] | None], object], prog: str, argv: Sequence[str] | None = None,
            extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run `main(argv)`; 0 on success, 2 with `prog: error: ...` on stderr for a named error.

    Use as `raise SystemExit(run_cli(main, "generate.py"))`. `extra_errors`: a script's own named errors.
    """
    try:
        main(argv)
    except NAMED_ERRORS + tuple(extra_errors) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_NAMED_ERROR
    return 0
