"""Sampler on synthetic logits: greedy, filters, seeds, penalties, min_tokens, logprobs."""

from __future__ import annotations

import torch

from engine.core.sequence import Sequence
from engine.sampling_params import SamplingParams
from engine.worker.sampler import Sampler
from tests.engine.helpers import make_seq

EOS = 0


def _seq(**params: object) -> Sequence:
    seq = make_seq("r", [5, 6], params=SamplingParams(**params))  # type: ignore[arg-type]
    if seq.params.seed is not None:
        seq.generator = torch.Generator().manual_seed(seq.params.seed)
    return seq


def _draws(seq: Sequence, logits: torch.Tensor, n: int) -> list[int]:
    sampler = Sampler((EOS,))
    return [sampler(logits[None], [seq])[0].token_id for _ in range(n)]


LOGITS = torch.tensor([0.0, 3.0, 2.5, 2.0, 1.0, -1.0])


def test_greedy_is_argmax() -> None:
    assert _draws(_seq(temperature=0), LOGITS, 3) == [1, 1, 1]


def test_top_k_and_top_p_and_min_p_restrict_support() -> None:
    assert set(_draws(_seq(top_k=2, seed=1), LOGITS, 60)) <= {1, 2}
    probs = LOGITS.softmax(-1)
    assert probs[1] < 0.5 < probs[1] + probs[2]
    assert set(_draws(_seq(top_p=0.5, seed=2), LOGITS, 60)) <= {1, 2}
    ratio = float(probs[3] / probs[1]) + 1e-3  # keeps tokens 1, 2, 3
    assert set(_draws(_seq(min_p=ratio, seed=3), LOGITS, 60)) <= {1, 2, 3}


def test_seed_reproducible_and_batch_independent() -> None:
    a = _draws(_seq(seed=123), LOGITS, 30)
    b = _draws(_seq(seed=123), LOGITS, 30)
    assert a == b
    assert len(set(a)) > 1
    # the same seeded request, now batched with an unseeded neighbour
    seeded, other = _seq(seed=123), _seq()
    sampler = Sampler((EOS,))
    batched = [sampler(torch.stack([LOGITS, LOGITS]), [other, seeded])[1].token_id for _ in range(30)]
    assert batched == a


def test_min_tokens_blocks_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([10.0, 9.0, 1.0, 0.0])
    seq = _seq(temperature=0, min_tokens=2, stop_token_ids=[1])
    assert _draws(seq, logits, 1) == [2]
    seq.output_token_ids.extend([2, 2])
    assert _draws(seq, logits, 1) == [0]


def test_bans_and_penalties_leave_the_callers_logits_alone_unless_they_are_scratch() -> None:
    logits = torch.tensor([[10.0, 9.0, 1.0, 0.0]])
    seq = _seq(temperature=0, min_tokens=2, stop_token_ids=[1], presence_penalty=2.0)
    seq.output_token_ids.append(2)
    sampler = Sampler((EOS,))
    assert sampler(logits, [seq])[0].token_id == 3
    assert torch.equal(logits, torch.tensor([[10.0, 9.0, 1.0, 0.0]]))  # a copy was constrained
    assert sampler(logits, [seq], scratch=True)[0].token_id == 3
    assert torch.equal(logits, torch.tensor([[float("-inf"), float("-inf"), -1.0, 0.0]]))  # in place


def test_penalties_push_away_repeats() -> None:
    logits = torch.tensor([0.0, 2.0, 1.9, 0.5])
    seq = _seq(temperature=0, presence_penalty=0.5)
    seq.output_token_ids.append(1)
    assert _draws(seq, logits, 1) == [2]
    seq = _seq(temperature=0, repetition_penalty=1.2)
    seq.prompt_token_ids = [1]
    assert _draws(seq, logits, 1) == [2]


def test_logprobs_include_sampled_and_top_n() -> None:
    seq = _seq(temperature=0, logprobs=2)
    res = Sampler((EOS,))(LOGITS[None], [seq])[0]
    assert res.logprobs is not None and set(res.logprobs) == {1, 2}
    torch.testing.assert_close(torch.tensor(res.logprobs[1]), LOGITS.log_softmax(-1)[1])
