"""The running appliance anchors its log off the box: with ``audit.publish_dir`` set, the checkpoints
the writer signs while the runtime runs -- and the final one at its clean stop -- land in that
directory as C2SP notes that verify with the audit key, and a second start continues the same trees."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from appliance.audit.checkpoint import GLOBAL_TREE, log_verifier
from appliance.audit.note import SignedNote
from appliance.runtime import Runtime
from tests.appliance.runtime_root import lay_out_root

pytestmark = pytest.mark.slow


def test_the_runtime_publishes_its_checkpoints(tmp_path: Path, model_dir: Path) -> None:
    root = lay_out_root(tmp_path / "root", model_dir)
    anchor = tmp_path / "usb"
    anchor.mkdir()  # the appliance never creates it (an unmounted disk must not fill the local one)
    config = root / "current" / "appliance.yaml"
    doc = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**doc, "audit": {"publish_dir": str(anchor)}}))

    sizes = []
    for _ in range(2):
        runtime = Runtime.open(root)
        asyncio.run(runtime.start())
        asyncio.run(runtime.stop())
        latest = SignedNote.parse((anchor / GLOBAL_TREE / "latest").read_text())
        sizes.append(latest.checkpoint().size)
        assert latest.signed_by(log_verifier(runtime.audit.keys.public_key))
        report = runtime.audit.verify(unsigned_grace_s=0)
        assert report.ok, report.first_failure
        head = next(s for s in report.streams if s.stream == GLOBAL_TREE).records
        assert sizes[-1] == head  # the clean stop's checkpoint was published: nothing unsigned left
    assert sizes[1] > sizes[0]
    published = sorted(int(p.stem) for p in (anchor / "_admin").glob("*.checkpoint"))
    assert published and published[-1] == SignedNote.parse((anchor / "_admin" / "latest").read_text()).checkpoint().size
