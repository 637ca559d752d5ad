"""Entry point of the server process the end-to-end tests start: ``python -m tests.e2e.launch``.

Registers the test engine (``LIPSYNC_ENGINE=fake``) in the server process, then runs exactly
what ``python -m lipsync.server`` runs.
"""

from __future__ import annotations

import sys

from lipsync.engines.base import register_engine
from lipsync.server.__main__ import main

if __name__ == "__main__":
    register_engine("fake", "tests.e2e.fake_engine:FakeEngine")
    sys.exit(main())
