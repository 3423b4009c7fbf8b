"""Unit tests of the block manager, the scheduler (driven by a fake runner) and the sampler."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.config import SchedulerConfig
from loraplex.engine.batch import SampledToken, ScheduledRow
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.scheduler import Scheduler
from loraplex.model.sampler import Sampler
from loraplex.request import SeqStatus, Sequence
from loraplex.sampling_params import SamplingParams

EOS = 1


def _seq(i, n_prompt, **kw):
    return Sequence(i, f"r{i}", 0, list(range(10, 10 + n_prompt)),
                    SamplingParams(**({"max_tokens": 4} | kw)), None)


# ---- block manager ----------------------------------------------------------------------------
@pytest.mark.parametrize("block_size,tokens,blocks", [(4, 1, 1), (4, 4, 1), (4, 5, 2), (16, 33, 3)])
def test_allocate_covers_tokens(block_size, tokens, blocks):
    bm = BlockManager(8, block_size)
    s = _seq(0, 1)
    assert bm.allocate(s, tokens)
    assert len(s.block_table) == blocks and bm.num_free == 8 - blocks
    bm.free(s)
    assert bm.num_free == 8 and s.block_table == []
    bm.free(s)  # idempotent
    bm.assert_consistent()


def test_allocate_is_all_or_nothing():
    bm = BlockManager(3, 4)
    a, b = _seq(0, 1), _seq(1, 1)
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 8)  # needs 2, 1 free
    assert b.block_table == [] and bm.num_free == 1
    assert bm.allocate(b, 4)
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.assert_consistent()


# ---- scheduler with a fake runner -------------------------------------------------------------
def _fake_runner(batch, token=50):
    return [SampledToken(r.seq_id, token) for r in batch.rows if r.sample]


def _drive(sched, steps=10_000, token=50, check=None):
    n = 0
    while sched.has_unfinished and n < steps:
        batch = sched.schedule()
        if check:
            check(batch)
        sched.update(batch, _fake_runner(batch, token))
        n += 1
    return n


def test_budget_chunking_and_mixed_steps():
    bm = BlockManager(64, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10, max_model_len=64),
                  bm, (EOS,))
    long, short = _seq(0, 25, max_tokens=3), _seq(1, 3, max_tokens=3)
    s.add(short)
    s.add(long)
    seen = []

    def check(batch):
        assert batch.num_tokens <= 10
        seen.append([(r.seq_id, r.start_pos, len(r.token_ids), r.sample) for r in batch.rows])

    _drive(s, check=check)
    # step 1: short prompt (3) + first chunk of the long one (7), only the short one samples
    assert seen[0] == [(1, 0, 3, True), (0, 0, 7, False)]
    # step 2: short decodes (1 token) beside the long prompt's next chunk
    assert seen[1] == [(1, 3, 1, True), (0, 7, 9, False)]
    assert long.num_output_tokens == 3 and short.num_output_tokens == 3
    assert bm.num_free == bm.num_blocks
    bm.assert_consistent()


def test_max_num_seqs_and_fcfs():
    bm = BlockManager(64, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, max_model_len=64),
                  bm, (EOS,))
    seqs = [_seq(i, 2, max_tokens=2) for i in range(5)]
    for q in seqs:
        s.add(q)
    first = s.schedule()
    assert [r.seq_id for r in first.rows] == [0, 1]
    s.update(first, _fake_runner(first))
    _drive(s)
    assert all(q.finish_reason == "length" for q in seqs)


def test_preemption_recomputes_and_finishes_everything():
    bm = BlockManager(6, 2)  # 12 token slots for 3 sequences that each need 8
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32),
                  bm, (EOS,))
    seqs = [_seq(i, 4, max_tokens=4) for i in range(3)]
    for q in seqs:
        s.add(q)
    _drive(s)
    assert s.num_preemptions > 0
    assert all(q.num_output_tokens == 4 and q.finish_reason == "length" for q in seqs)
    assert bm.num_free == bm.num_blocks
    bm.assert_consistent()


@pytest.mark.parametrize("kw,token,reason,n_out", [
    ({}, EOS, "stop", 1),
    ({"ignore_eos": True, "max_tokens": 3}, EOS, "length", 3),
    ({"min_tokens": 2, "max_tokens": 5}, EOS, "stop", 2),
    ({"stop_token_ids": [50]}, 50, "stop", 1),
    ({"max_tokens": 2}, 50, "length", 2),
])
def test_finish_reasons(kw, token, reason, n_out):
    bm = BlockManager(16, 4)
    s = Scheduler(SchedulerConfig(max_model_len=64), bm, (EOS,))
    q = _seq(0, 3, **kw)
    s.add(q)
    _drive(s, token=token)
    assert q.finish_reason == reason and q.num_output_tokens == n_out


def test_max_model_len_ends_sequence():
    bm = BlockManager(16, 4)
    s = Scheduler(SchedulerConfig(max_model_len=8), bm, (EOS,))
    q = _seq(0, 5, max_tokens=None)
    s.add(q)
    _drive(s)
    assert q.finish_reason == "length" and q.num_tokens == 8


def test_random_workload_with_aborts_leaks_nothing():
    rng = random.Random(0)
    bm = BlockManager(24, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=32, max_model_len=64),
                  bm, (EOS,))
    seqs = [_seq(i, rng.randrange(1, 30), max_tokens=rng.randrange(1, 20)) for i in range(60)]
    for q in seqs:
        s.add(q)
    aborted = set()
    while s.has_unfinished:
        batch = s.schedule()
        s.update(batch, _fake_runner(batch))
        live = list(s.seqs.values())
        if live and rng.random() < 0.1:
            victim = rng.choice(live)
            s.abort(victim.seq_id)
            aborted.add(victim.seq_id)
        bm.assert_consistent()
    for q in seqs:
        assert q.status is SeqStatus.FINISHED
        if q.seq_id not in aborted:
            assert q.num_output_tokens == q.params.max_tokens
    assert bm.num_free == bm.num_blocks


# ---- runner: the forward's row layout ---------------------------------------------------------
def test_forward_order_puts_decode_rows_first_and_groups_adapters():
    """build_context takes one-token rows first; with LoRA the runner also lays out one
    adapter's rows next to each other (stable, base rows first). The oracle tests check that
    the permuted rows are sampled and returned as scheduled."""
    from types import SimpleNamespace

    from loraplex.engine.runner import ModelRunner

    def row(i, n_tokens, slot):
        return ScheduledRow(i, [0] * n_tokens, 0, [0], True, SamplingParams(), None, [3],
                            [], adapter_slot=slot)

    rows = [row(0, 1, 2), row(1, 1, -1), row(2, 1, 0), row(3, 5, 1), row(4, 1, 2), row(5, 3, 0),
            row(6, 1, 0), row(7, 5, -1), row(8, 1, -1)]
    order = ModelRunner._forward_order(SimpleNamespace(lora_enabled=True), rows)
    assert order == [1, 8, 2, 6, 0, 4, 7, 5, 3]
    laid = [(len(rows[i].token_ids) == 1, rows[i].adapter_slot) for i in order]
    assert laid == sorted(laid, key=lambda t: (not t[0], t[1]))
    # without LoRA the scheduler's order stands
    assert ModelRunner._forward_order(SimpleNamespace(lora_enabled=False), rows) == \
        list(range(len(rows)))


# ---- sampler ----------------------------------------------------------------------------------
def _row(i, seed=None, out=(), **kw):
    return ScheduledRow(i, [0], 0, [0], True, SamplingParams(**kw), seed, [3, 4], list(out))


def test_greedy_and_seeded_determinism_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    draws = []
    for order in ([0, 1, 2], [2, 0, 1]):
        sampler = Sampler(torch.device("cpu"), (EOS,), seed=123)
        rows = [_row(0, temperature=0), _row(1, seed=7, temperature=1.0),
                _row(2, temperature=1.0)]
        toks = {}
        for _ in range(5):
            out = sampler(logits[order], [rows[i] for i in order])
            for o in out:
                toks.setdefault(o.seq_id, []).append(o.token_id)
        draws.append(toks)
        assert toks[0] == [int(logits[0].argmax())] * 5
    assert draws[0][1] == draws[1][1]  # seeded row: same tokens whatever the batch order


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    for kw, allowed in [({"top_k": 2}, {0, 1}), ({"top_p": 0.7}, {0, 1}),
                        ({"min_p": 0.3}, {0, 1})]:
        sampler = Sampler(torch.device("cpu"), (EOS,), seed=1)
        rows = [_row(i, temperature=1.0, **kw) for i in range(400)]
        got = {o.token_id for o in sampler(logits, rows)}
        assert got == allowed, (kw, got)


def test_top_p_distribution_is_renormalized():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    sampler = Sampler(torch.device("cpu"), (EOS,), seed=2)
    toks = [o.token_id for o in sampler(logits, [_row(i, temperature=1.0, top_p=0.8)
                                                 for i in range(4000)])]
    frac0 = toks.count(0) / len(toks)
    assert set(toks) == {0, 1} and abs(frac0 - 0.5 / 0.8) < 0.03


def test_penalties_and_min_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0]])
    sampler = Sampler(torch.device("cpu"), (EOS,))
    # token 0 appeared twice: frequency 0.1*2 + presence 0.5 = 0.7 off -> token 1 wins
    out = sampler(logits, [_row(0, out=[0, 0], temperature=0, presence_penalty=0.5,
                                frequency_penalty=0.1)])
    assert out[0].token_id == 1
    # repetition penalty divides positive logits of seen tokens (prompt ids 3, 4 and outputs)
    out = sampler(torch.tensor([[0.0, 1.0, 0.5, 0.0, 3.0]]),
                  [_row(0, temperature=0, repetition_penalty=10.0)])
    assert out[0].token_id == 1
    # min_tokens suppresses EOS
    out = sampler(torch.tensor([[0.0, 9.0, 1.0]]), [_row(0, temperature=0, min_tokens=1)])
    assert out[0].token_id == 2


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(1, 50)
    sampler = Sampler(torch.device("cpu"), (EOS,))
    out = sampler(logits, [_row(0, temperature=0.5, logprobs=3, seed=3)])[0]
    lp = torch.log_softmax(logits[0], -1)
    assert abs(out.logprob - lp[out.token_id].item()) < 1e-6
    top = lp.topk(3)
    assert list(out.top_logprobs) == top.indices.tolist()
    assert torch.allclose(torch.tensor(list(out.top_logprobs.values())), top.values)
