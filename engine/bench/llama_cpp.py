"""llama.cpp's `llama-server` as a bench peer (issue 19): started on a free loopback port, driven with
the workload's prompts as token ids through `/completion`, concurrently for batch throughput.

The binary and the GGUFs come from `make llama-cpp` (.cache/llama.cpp/bin, .cache/llama.cpp/gguf); when
they are absent, `find_llama_cpp` raises LlamaCppUnavailable saying how to build them, and the bench
skips the peer with that message.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.bench.workload import BenchRequest

DEFAULT_DIR = Path(__file__).resolve().parents[2] / ".cache" / "llama.cpp"
GGUF_NAMES = {"F32": "smollm2-f32.gguf", "Q4_1": "smollm2-q4_1.gguf"}


class LlamaCppUnavailable(RuntimeError):
    """llama-server or a GGUF is not built here; the message says what is missing and how to build it."""


@dataclass(frozen=True)
class LlamaCppBuild:
    server: Path
    ggufs: dict[str, Path]  # precision name ("F32", "Q4_1") -> GGUF file


def find_llama_cpp(root: Path = DEFAULT_DIR) -> LlamaCppBuild:
    server = root / "bin" / "llama-server"
    if not server.is_file():
        raise LlamaCppUnavailable(f"llama.cpp peer skipped: {server} is not built (run `make llama-cpp`, "
                                  "which builds llama-server and the F32/Q4_1 GGUFs; it is not part of make test)")
    ggufs = {name: root / "gguf" / fname for name, fname in GGUF_NAMES.items()}
    missing = [str(p) for p in ggufs.values() if not p.is_file()]
    if missing:
        raise LlamaCppUnavailable(f"llama.cpp peer skipped: GGUF(s) {', '.join(missing)} missing "
                                  "(run `make llama-cpp`)")
    return LlamaCppBuild(server, ggufs)


@dataclass(frozen=True)
class ServerFlags:
    threads: int
    parallel: int = 1  # -np: slots decoded together (continuous batching)
    batch: int = 2048  # -b: logical batch
    ubatch: int = 512  # -ub: physical batch
    kv_unified: bool = True  # -kvu: one KV cache shared by all slots
    ctx_per_slot: int = 512

    def args(self) -> list[str]:
        out = ["-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel),
               "-b", str(self.batch), "-ub", str(self.ubatch), "-c", str(self.parallel * self.ctx_per_slot)]
        return out + (["-kvu"] if self.kv_unified else [])

    def describe(self) -> str:
        return " ".join(self.args())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One llama-server process; a context manager that stops it (and keeps its log for errors)."""

    def __init__(self, binary: Path, gguf: Path, flags: ServerFlags, start_timeout_s: float = 120.0) -> None:
        self.flags = flags
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), *flags.args()]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not healthy after {timeout_s:.0f} s:\n{self._log_tail()}")

    def complete(self, prompt_ids: list[int], n_predict: int) -> dict[str, Any]:
        """Greedy, exactly n_predict tokens; returns the server's JSON (with `tokens` and `timings`)."""
        body = {"prompt": prompt_ids, "n_predict": n_predict, "ignore_eos": True, "temperature": 0.0,
                "top_k": 1, "cache_prompt": False, "return_tokens": True}
        req = urllib.request.Request(self.base + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out: dict[str, Any] = json.loads(r.read())
        if len(out.get("tokens", [])) != n_predict:
            raise RuntimeError(f"llama-server returned {len(out.get('tokens', []))} tokens, asked {n_predict}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class LlamaRun:
    seconds: float
    output_tokens: int
    token_ids: list[list[int]]


def run_workload(server: LlamaServer, requests: list[BenchRequest]) -> LlamaRun:
    """All requests at once (as many in flight as the server has slots: it queues the rest)."""
    server.complete(requests[0].prompt_ids[:8], 2)  # warm-up, untimed
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        outs = list(pool.map(lambda r: server.complete(r.prompt_ids, r.output_len), requests))
    seconds = time.perf_counter() - t0
    tokens = [list(o["tokens"]) for o in outs]
    return LlamaRun(seconds, sum(len(t) for t in tokens), tokens)


def single_stream(server: LlamaServer, prompt_ids: list[int], n_predict: int) -> dict[str, Any]:
    """One request alone; decode time from the server's own timings (prompt processing excluded)."""
    server.complete(prompt_ids[:8], 2)
    out = server.complete(prompt_ids, n_predict)
    t = out["timings"]
    return {"tokens": int(t["predicted_n"]), "ms_per_token": float(t["predicted_per_token_ms"]),
            "tokens_per_s": float(t["predicted_per_second"]), "token_ids": list(out["tokens"])}
