"""How ``adfq-vit`` and ``adfq-vit-export`` report the library's own errors on the command line: one message with
its fix, the traceback only when ``ADFQ_DEBUG=1`` is set (as pip and Lightning keep theirs for debugging). Called
from Python with explicit arguments, the tools raise the exceptions themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

DEBUG_ENV = "ADFQ_DEBUG"
_PACKAGE = Path(__file__).resolve().parents[1]
#: what the library raises for a mistake in what it was given (a bug elsewhere keeps its traceback)
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)

T = TypeVar("T")


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raised_here(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def library_error(err: BaseException) -> Optional[BaseException]:
    """The error the library raised with a message for the user, in ``err`` or the errors it came from (a parser
    that wraps the library's ``ValueError`` in its own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, _USER_ERRORS) and _raised_here(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def run_reporting_errors(prog: str, main: Callable[[], T], command_line: bool = True) -> T:
    """Run a command line tool's ``main``; on the ``command_line`` the library's own errors exit with one line on
    stderr (status 1)."""
    if not command_line:
        return main()
    try:
        return main()
    except Exception as err:
        ours = None if debugging() else library_error(err)
        if ours is None:
            raise
        sys.stderr.write(f"{prog}: error: {ours}\n(set {DEBUG_ENV}=1 to see the traceback)\n")
        raise SystemExit(1) from None
