"""Structured output: `SamplingParams.guided` specs enforced with token masks (llguidance).

`GuidedDecoding` (one per engine) validates a spec at request time (`GuidedSpecError`, a
RequestError, naming what was wrong), compiles it once (bounded LRU by spec) and hands out the
matcher the sampler keeps for each sequence; the sampler masks a step's guided rows with one
batched bitmask fill and one masked_fill. docs/benchmarks.md "Structured output" says why llguidance.
"""

from engine.guided.compiler import GuidedCompiler, GuidedSpecError, grammar_for_spec
from engine.guided.matcher import GuidedDecoding

__all__ = ["GuidedCompiler", "GuidedDecoding", "GuidedSpecError", "grammar_for_spec"]
