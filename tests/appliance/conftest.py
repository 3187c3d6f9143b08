from __future__ import annotations

from pathlib import Path

import pytest

from tests.appliance.support import VendorBundle, build_demo_bundle


@pytest.fixture(scope="session")
def vendor_bundle(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> VendorBundle:
    """A real signed bundle of the real model and the default policies, built once per run."""
    return build_demo_bundle(tmp_path_factory.mktemp("vendor"), model_dir)
