"""Run a stage's main(): a UserError, or a full disk, prints one clear line and exits 2, no traceback.

Other OSErrors are bugs or environment problems worth a traceback: only ENOSPC/EDQUOT are caught.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from vdm.core.errors import UserError


def run(main: Callable[[], object], doc: str | None = None) -> None:
    """With `doc` (the stage's docstring), the command line is parsed first: `--help` prints the doc
    and exits, any other argument is refused (exit 2) before any work starts. Stages take no
    arguments: params.yaml drives them."""
    if doc is not None:
        module = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = f"python -m {module.name}" if module is not None else None
        argparse.ArgumentParser(
            prog=prog,
            description=doc,
            epilog="Every setting comes from params.yaml (see README); run through `dvc repro` to track outputs.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ).parse_args()
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        print(
            f"error: no space left on device{where}: free space and rerun. Every output is written atomically, "
            "so the previous outputs are kept as they were",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
