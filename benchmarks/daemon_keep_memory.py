"""`rotator` with the daemon's `give_back` replaced by a no-op: the baseline of
benchmarks/memory.py, which shows what giving memory back after each scan buys.

    python benchmarks/daemon_keep_memory.py --config rotator.yaml daemon

The patch lives in this process only: rotator/ has no switch for it. Without
`give_back` a scan ends with no explicit `gc.collect()` and no `malloc_trim(0)`; the
interpreter's own cyclic collector still runs as it always does.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rotator.daemon
from rotator.cli import main


def keep() -> None:
    """Give nothing back."""


rotator.daemon.give_back = keep

if __name__ == "__main__":
    main()
