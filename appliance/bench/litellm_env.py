"""LiteLLM, the gateway our users know, in its OWN virtual environment (never the project's venv), at a
pinned release, and its proxy configured to run offline against the fake OpenAI upstream.

The environment is built at benchmark time when missing, from the package registry with pip, and
cached under ``.cache/litellm-<version>``; tests never build it. LiteLLM 1.82.7 and 1.82.8 on PyPI
were compromised (March 2026) and are refused by name. Newer releases than the pin (1.101 on) need a
``litellm-proxy`` package for their proxy extra that the registry here does not carry.

Offline: the model-cost map is read from the package (``LITELLM_LOCAL_MODEL_COST_MAP``), telemetry
is off, no database (so no Prisma engine download), master-key authentication only.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

LITELLM_VERSION = "1.100.5"
COMPROMISED = frozenset({"1.82.7", "1.82.8"})
MASTER_KEY = "sk-bench-litellm-master"  # a throwaway key of this benchmark's own proxy, on loopback
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "DISABLE_TELEMETRY": "True",
    "LITELLM_LOG": "ERROR", "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "*", "no_proxy": "*", "PYTHONUNBUFFERED": "1",
}


class LiteLLMUnavailable(RuntimeError):
    """LiteLLM's environment could not be built or found; the message says why."""


@dataclass(frozen=True)
class LiteLLMEnv:
    venv: Path
    version: str

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "litellm"


def env_dir(cache: Path, version: str = LITELLM_VERSION) -> Path:
    return cache / f"litellm-{version}"


def find_env(cache: Path, version: str = LITELLM_VERSION) -> LiteLLMEnv | None:
    """The cached environment if it is complete (its marker file is written last), else None."""
    venv = env_dir(cache, version)
    if (venv / ".complete").is_file() and (venv / "bin" / "litellm").is_file():
        return LiteLLMEnv(venv, version)
    return None


def build_env(cache: Path, version: str = LITELLM_VERSION, log: Path | None = None) -> LiteLLMEnv:
    """Create ``.cache/litellm-<version>`` with ``litellm[proxy]==<version>`` from the registry."""
    if version in COMPROMISED:
        raise LiteLLMUnavailable(f"litellm {version} is a known-compromised release (March 2026); "
                                 f"expected another pin, e.g. {LITELLM_VERSION}")
    found = find_env(cache, version)
    if found is not None:
        return found
    venv = env_dir(cache, version)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--quiet", f"litellm[proxy]=={version}"]]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
        if log is not None:
            with log.open("a") as fh:
                fh.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            raise LiteLLMUnavailable(f"building LiteLLM's environment failed at `{' '.join(argv[:3])} ...` "
                                     f"(exit {done.returncode}): {done.stderr.strip()[-800:]}")
    (venv / ".complete").write_text(version + "\n")
    return LiteLLMEnv(venv, version)


def write_config(path: Path, model: str, upstream_port: int) -> Path:
    """The proxy's config: one model routed to the fake upstream, master-key auth, nothing external."""
    path.write_text(yaml.safe_dump({
        "model_list": [{"model_name": model, "litellm_params": {
            "model": f"openai/{model}", "api_base": f"http://127.0.0.1:{upstream_port}/v1", "api_key": "fake"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True, "set_verbose": False},
        "general_settings": {"master_key": MASTER_KEY},
    }))
    return path


def proxy_command(env: LiteLLMEnv, config: Path, port: int, workers: int,
                  tls: tuple[Path, Path] | None = None) -> list[str]:
    """The proxy on loopback with ``workers`` uvicorn workers; ``tls``: (certificate, key) it serves
    HTTPS with, so that clients pay for TLS as they do with our gateway."""
    argv = [str(env.executable), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", str(workers), "--telemetry", "False"]
    if tls is not None:
        argv += ["--ssl_certfile_path", str(tls[0]), "--ssl_keyfile_path", str(tls[1])]
    return argv
