"""User-facing errors: one clear line, a non-zero exit, no traceback.

Anything a user can get wrong (a config key, a value, a path, a CSV) raises `UserError`; entry points wrap
their `main` in `run_main`, which prints the message on one line and exits with status 2. A file-system error
that nothing turned into a `UserError` on the way (a file that cannot be read or written) is printed the same
way, with its path and reason. Programming errors keep their traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user. The message must name the key, path or value at fault."""


class ConfigError(UserError):
    pass


def _is_main_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    try:
        main(argv)
    except UserError as err:
        if _is_main_rank():  # under `accelerate launch` every rank fails the same way; say it once
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as err:  # the file system refused: the path and the reason are what the user needs
        if _is_main_rank():
            where = f"{err.filename}: " if err.filename else ""
            reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
            print(f"error: {where}{reason}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
