"""``python -m lipsync.server``: serve with the settings from the environment (``LIPSYNC_*``).

An invalid setting is refused before anything starts: one ``error:`` line naming the variable,
exit status 2. A configuration found wrong during start-up (unknown engine, missing checkpoints
directory) is the same kind of error: exit status 2. Any other failed start-up (e.g. a default
avatar without a face) stops the server with one ``error:`` line and exit status 1.
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
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
