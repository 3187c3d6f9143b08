"""How the scheduler orders and protects requests: SLA scheduling (the default) or plain FCFS.

"sla" (default):
- order: effective priority (lower first), then preempted requests (they keep their place), then,
  among tenants of that class, the one with the smallest fair-share counter (VTC), then earliest
  deadline, then arrival;
- a waiting request of a better class may preempt running requests of a worse class when
  sequence slots (max_num_seqs) or KV blocks are short;
- aging: every full ``max_wait_s`` a request has waited since it arrived raises it one class, up
  to class 0 (no starvation of the lowest class);
- deadlines enforced: a request unfinished at its deadline ends with finish reason "deadline".

"fcfs": arrival order only; priority, deadline and tenant are ignored (deadlines are not
enforced) and preemption happens only when a running sequence cannot get a KV block. The
baseline the SLA benchmark compares against.

Why ``max_wait_s`` = 10 s: one aging step should be longer than the TTFT targets of the classes
above it (1 s interactive, 5 s standard in the default policy), so aging never takes a slot from
a request that could still meet its target, and short enough that the lowest class (batch, TTFT
target 60 s) reaches class 0 after two steps, 20 s, well within its own target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("sla", "fcfs")


@dataclass(frozen=True)
class SchedulingPolicy:
    mode: str = "sla"
    max_wait_s: float | None = 10.0  # None: no aging
    input_weight: float = 1.0  # VTC weight of a computed prompt token
    output_weight: float = 2.0  # VTC weight of a generated token (the paper's w_q = 2 w_p)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"scheduling mode must be one of {list(MODES)}; got {self.mode!r}")
        if self.max_wait_s is not None and not (math.isfinite(self.max_wait_s) and self.max_wait_s > 0):
            raise ValueError(f"max_wait_s must be None (no aging) or a finite number > 0; got {self.max_wait_s!r}")
        for name in ("input_weight", "output_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if self.input_weight == 0 and self.output_weight == 0:
            raise ValueError("input_weight and output_weight are both 0; at least one must be > 0")

    @property
    def sla(self) -> bool:
        return self.mode == "sla"
