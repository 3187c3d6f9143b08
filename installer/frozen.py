"""What changes when the installer runs as a PyInstaller one-file executable.

- ``sys.executable`` is the executable itself, not a python: node interpreters are always named
  (``ansible_python_interpreter``), and ansible runs in a child of the executable started with
  the hidden ``__ansible-playbook`` argument.
- The bootloader prepends its unpack directory to ``LD_LIBRARY_PATH`` (saving the original in
  ``LD_LIBRARY_PATH_ORIG``). Programs we start (python3 on the node, ssh, the appliance) must
  see the admin's original value, or they load our bundled libssl/libz instead of their own.
- multiprocessing needs ``freeze_support()`` (ansible itself forks workers; it does not spawn).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

LOADER_VAR = "LD_LIBRARY_PATH"
LOADER_ORIG_VAR = "LD_LIBRARY_PATH_ORIG"


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def restore_loader_path(env: MutableMapping[str, str], bundle_dir: str | None = None) -> None:
    """Give ``env`` the library search path the admin had before the bootloader changed it."""
    bundle_dir = bundle_dir if bundle_dir is not None else getattr(sys, "_MEIPASS", None)
    if LOADER_ORIG_VAR in env:
        env[LOADER_VAR] = env.pop(LOADER_ORIG_VAR)
        return
    if bundle_dir is None or LOADER_VAR not in env:
        return
    kept = [p for p in env[LOADER_VAR].split(os.pathsep)
            if p and os.path.normpath(p) != os.path.normpath(bundle_dir)]
    if kept:
        env[LOADER_VAR] = os.pathsep.join(kept)
    else:
        del env[LOADER_VAR]


def prepare_process() -> None:
    """Called first by the console entry point: freeze support, and (frozen only) the original
    loader path for everything this process starts."""
    import multiprocessing

    multiprocessing.freeze_support()
    if is_frozen():
        restore_loader_path(os.environ)
