"""Child-process entry that runs ``ansible-playbook`` in-process through ansible's own CLI.

The installer never needs an ``ansible-playbook`` executable: it starts its own interpreter
with ``-c CHILD_CODE`` (which imports only ansible, not the installer package) or, when frozen
by PyInstaller, its own executable with the hidden first argument ``__ansible-playbook``.
A fresh process per run matters because ansible reads its configuration (ANSIBLE_* variables)
once, at import, and keeps global state.
"""

from __future__ import annotations

import os
import sys

FROZEN_SUBCOMMAND = "__ansible-playbook"
# The installer starts ansible-playbook as the leader of a new session (process group). If the
# installer dies without stopping it (SIGKILL, the OOM killer), this thread sees the parent change
# and kills the whole group, ansible's forked workers included, so nothing goes on writing into a
# release after the installer is gone. Standard library only: it runs before ansible is imported.
DIE_WITH_PARENT = """
import os as _os, threading as _threading, time as _time
def _watch(parent=_os.getppid()):
    while _os.getppid() == parent:
        _time.sleep(0.2)
    if _os.getpgid(0) == _os.getpid():
        _os.killpg(0, 9)
    _os._exit(137)
_threading.Thread(target=_watch, name="die-with-parent", daemon=True).start()
"""
CHILD_CODE = (
    DIE_WITH_PARENT
    + "import sys; from ansible.cli.playbook import PlaybookCLI; "
    "PlaybookCLI.cli_executor(['ansible-playbook', *sys.argv[1:]])"
)


def main(argv: list[str] | None = None) -> None:
    """Run ansible-playbook with ``argv`` (without the program name); exits with its code."""
    args = sys.argv[1:] if argv is None else argv
    if not any(os.environ.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        os.environ["LC_ALL"] = "C.UTF-8"  # ansible refuses a non-UTF-8 locale; it reads this at import
    exec(DIE_WITH_PARENT, {})  # a constant of this module
    from ansible.cli.playbook import PlaybookCLI  # imported late: ANSIBLE_* must be set first

    PlaybookCLI.cli_executor(["ansible-playbook", *args])


if __name__ == "__main__":
    main()
