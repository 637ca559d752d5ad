"""``python -m lipsync.server``: serve with the settings from the environment (``LIPSYNC_*``)."""

from __future__ import annotations

import sys

from ..errors import LipsyncError
from ..settings import Settings
from . import serve


def main() -> int:
    try:
        serve(Settings())
    except LipsyncError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
