"""Run a stage's main(): a UserError prints one clear line and exits 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from vdm.errors import UserError


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
