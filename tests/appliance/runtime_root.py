"""An installed-looking root for tests that open the runtime without the installer: a release
with the shipped policies and the real model, served by the in-process engine on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from policies import default_policy_dir

MODEL = "SmolLM2-135M-Instruct"


def lay_out_root(root: Path, model_dir: Path) -> Path:
    release = root / "releases" / "1.0.0"
    shutil.copytree(default_policy_dir(), release / "policies")
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "bundle_digest": "sha256:test",
        "model": {"name": MODEL, "path": str(model_dir)}, "policies_dir": str(release / "policies"),
        "node": {"name": "node-a", "labels": {"region": "eu-test", "site": "lab", "classification": "internal"}},
        "gateway": {"host": "127.0.0.1", "port": 8443},
        "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 8},
    }))
    (root / "current").symlink_to(release)
    return root
