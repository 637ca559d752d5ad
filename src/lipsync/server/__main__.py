"""``python -m lipsync.server``: serve with the settings from the environment (``LIPSYNC_*``).

An invalid setting is refused before anything starts: one ``error:`` line naming the variable,
exit status 2. A start-up failure (engine, checkpoints, default avatar) exits with status 1.
"""

from __future__ import annotations

import sys

from ..errors import ConfigError, LipsyncError
from ..settings import load_settings
from . import serve


def main() -> int:
    try:
        serve(load_settings())
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except LipsyncError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
