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
CHILD_CODE = (
    "import sys; from ansible.cli.playbook import PlaybookCLI; "
    "PlaybookCLI.cli_executor(['ansible-playbook', *sys.argv[1:]])"
)


def main(argv: list[str] | None = None) -> None:
    """Run ansible-playbook with ``argv`` (without the program name); exits with its code."""
    args = sys.argv[1:] if argv is None else argv
    if not any(os.environ.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        os.environ["LC_ALL"] = "C.UTF-8"  # ansible refuses a non-UTF-8 locale; it reads this at import
    from ansible.cli.playbook import PlaybookCLI  # imported late: ANSIBLE_* must be set first

    PlaybookCLI.cli_executor(["ansible-playbook", *args])


if __name__ == "__main__":
    main()
