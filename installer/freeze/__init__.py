"""Freezing the installer into one executable with PyInstaller (``make installer``)."""
