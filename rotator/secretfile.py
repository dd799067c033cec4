"""Files that hold a secret (a token, a secret id): refused when others can read them.

A file readable by every user on the host gives the secret away. One readable by its
group is accepted only when that group is the rotator's own (Kubernetes mounts a
Secret as root:fsGroup, mode 0440, and systemd credentials are 0400 or 0440); any other
group, and any "other" permission bit, is refused with what to run instead."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rotator.errors import BadInput


def exposure(path: Path) -> str | None:
    """Why `path` is readable by others than the rotator, or None. Raises OSError when
    the file cannot be looked at."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return f"{path} is open to every user (mode {mode:04o}): run chmod o-rwx {path}"
    if mode & 0o070 and st.st_gid != os.getegid() and st.st_gid not in os.getgroups():
        return (
            f"{path} is readable by group {st.st_gid}, which is not the rotator's "
            f"(mode {mode:04o}): run chmod g-rwx {path}"
        )
    return None


def read_secret_file(path: Path) -> str:
    """The stripped text of a secret file. Raises BadInput when others can read it,
    OSError or UnicodeDecodeError when it cannot be read."""
    problem = exposure(path)
    if problem is not None:
        raise BadInput(problem)
    return path.read_text(encoding="utf-8").strip()
