"""The gateway overhead benchmark (``python -m appliance.bench gateway``) in a tiny configuration.

Real processes throughout: the fake node (real node server code, mutual TLS), the fake OpenAI
upstream, our gateway (``appliance serve``). No timed assertions: the run must produce the table
and the JSON with every target measured, no failed request, and quantiles that are consistent.
LiteLLM's part runs only where its own environment was already built (``.cache/litellm-<version>``,
made by a full benchmark run); tests never build it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.bench import litellm_env

REPO = Path(__file__).resolve().parents[2]
TINY = ["--concurrency", "4", "--streams", "6", "--seconds", "1", "--warmup", "0.5", "--rounds", "2",
        "--workers", "1", "--stores", "sqlite"]


def _bench(model_dir: Path, out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.bench", "gateway", "--model-dir", str(model_dir),
                           "--out", str(out), *TINY, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _check_row(row: dict[str, Any]) -> None:
    plain, stream = row["plain"], row["stream"]
    assert plain["errors"] == {} and stream["errors"] == {}, row
    assert plain["requests"] > 0 and stream["requests"] > 0, row
    assert plain["requests_per_s"] > 0, row
    assert 0 < stream["ttft_p50_ms"] <= stream["ttft_p99_ms"], row
    assert stream["ttft_p50_ms"] <= stream["total_p50_ms"] <= stream["total_p99_ms"], row
    assert plain["client_cpu_ms_per_request"] > 0 and stream["client_cpu_ms_per_request"] > 0, row
    assert plain["server_cpu_ms_per_request"] > 0 and stream["server_cpu_ms_per_request"] > 0, row


def test_benchmark_measures_our_gateway_against_the_node_directly(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = _bench(model_dir, out, "--no-litellm")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["targets"]}
    assert set(rows) == {"node direct", "upstream direct", "our gateway (sqlite, 1w)"}, rows.keys()
    for row in rows.values():
        _check_row(row)
    ours = rows["our gateway (sqlite, 1w)"]
    assert ours["baseline"] == "node direct" and ours["store"] == "sqlite" and ours["workers"] == 1
    # added = gateway minus its own baseline, quantile by quantile
    direct = rows["node direct"]["stream"]
    assert ours["added"]["ttft_p50_ms"] == pytest.approx(ours["stream"]["ttft_p50_ms"] - direct["ttft_p50_ms"],
                                                         abs=0.01)
    machine = result["machine"]
    assert machine["nproc"] >= 1 and len(machine["load_average_before"]) == 3 and machine["commit"]
    assert result["settings"]["streams"] == 6 and result["settings"]["tokens"] == 16
    assert any("LiteLLM not measured" in note for note in result["notes"])
    assert any("fake on purpose" in note for note in result["notes"])
    table = out.with_suffix(".md").read_text()
    assert "| our gateway (sqlite, 1w) | 1 | sqlite |" in table and "FAKE on purpose" in table
    assert table.strip() in done.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--workers", "0"], "workers: expected counts >= 1"),
    (["--stores", "mysql"], "expected sqlite, postgres or sqlite,postgres"),
    (["--streams", "0"], "streams: expected an integer >= 1"),
])
def test_bad_settings_are_refused_with_what_was_expected(model_dir: Path, tmp_path: Path, args: list[str],
                                                         expected: str) -> None:
    done = subprocess.run([sys.executable, "-m", "appliance.bench", "gateway", "--model-dir", str(model_dir),
                           "--no-litellm", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_a_model_dir_without_tokenizer_is_refused(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "appliance.bench", "gateway", "--model-dir", str(tmp_path),
                           "--no-litellm"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expected a model directory with tokenizer.json" in done.stderr, done.stderr


@pytest.mark.parametrize("version", sorted(litellm_env.COMPROMISED))
def test_compromised_litellm_releases_are_refused(tmp_path: Path, version: str) -> None:
    with pytest.raises(litellm_env.LiteLLMUnavailable, match="known-compromised"):
        litellm_env.build_env(tmp_path, version)
    assert not any(tmp_path.iterdir()), "nothing may be installed for a compromised release"


def test_litellm_is_measured_against_its_own_upstream(model_dir: Path, tmp_path: Path) -> None:
    cache = REPO / ".cache"
    if litellm_env.find_env(cache) is None:
        pytest.skip(f"LiteLLM {litellm_env.LITELLM_VERSION}'s own environment is not built "
                    f"({litellm_env.env_dir(cache)}); a full `python -m appliance.bench gateway` run builds it")
    out = tmp_path / "bench.json"
    done = _bench(model_dir, out, "--cache-dir", str(cache), timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not any("tried to reach the network" in note for note in result["notes"]), result["notes"]
    rows = {row["name"]: row for row in result["targets"]}
    name = f"LiteLLM {litellm_env.LITELLM_VERSION} (1w)"
    assert name in rows, rows.keys()
    _check_row(rows[name])
    assert rows[name]["baseline"] == "upstream direct"
