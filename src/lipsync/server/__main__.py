"""``python -m lipsync.server``: serve with the settings from the environment (``LIPSYNC_*``).

An invalid setting is refused before anything starts: one ``error:`` line naming the variable,
exit status 2. A failed start-up (unknown engine, checkpoints, default avatar) stops the server
with one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import sys

from ..errors import ConfigError, LipsyncError
from ..settings import load_settings
from . import serve


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    try:
        serve(settings)
    except LipsyncError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
