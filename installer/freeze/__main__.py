"""``python -m installer.freeze [--out dist/sovereign-installer] [--force]``: build the one-file
executable with PyInstaller (cached by a hash of its sources)."""

from __future__ import annotations

import argparse
from pathlib import Path

from installer.freeze.build import REPO, build
from installer.freeze.contents import heavy_modules_loaded


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m installer.freeze", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "sovereign-installer")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build matches")
    args = parser.parse_args()
    heavy = heavy_modules_loaded()
    if heavy:
        raise SystemExit(f"installer imports modules the executable leaves out: {heavy}")
    print(build(args.out, force=args.force))


if __name__ == "__main__":
    main()
