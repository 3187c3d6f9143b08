"""``python -m installer`` and the PyInstaller entry script of the one-file executable."""

from installer.cli import main

if __name__ == "__main__":
    main()
