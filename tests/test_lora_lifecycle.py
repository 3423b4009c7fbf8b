"""Adapters at run time: version swap under load, removal while in use, pinning, fairness."""

from __future__ import annotations

import random

import pytest
import torch
from lora_helpers import make_peft_adapter

from loraplex import LLM, SamplingParams
from loraplex.engine.engine import RequestError
from loraplex.lora.buffers import BufferPool

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    tmp = tmp_path_factory.mktemp("adapters")
    paths = {f"a{i}": make_peft_adapter(base, tmp / f"a{i}", seed=10 + i, r=8, lora_alpha=16,
                                        target_modules="all-linear") for i in range(6)}
    return base, paths


def _prompts(k, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(4, 20))] for _ in range(k)]


def _reference(base, path, prompts):
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8)
    llm.add_lora("x", str(path))
    return [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, lora="x")]


def _run(eng, rids):
    done = {}
    while eng.has_unfinished_requests:
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return [done[r] for r in rids]


def test_version_swap_under_load(setup):
    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=2, max_lora_rank=8)
    eng = llm.engine
    v1 = llm.add_lora("t", str(paths["a0"])).version
    old_prompts, new_prompts = _prompts(4, 1), _prompts(4, 2)
    old = [eng.add_request(None, GREEDY, prompt_token_ids=p, lora="t") for p in old_prompts]
    for _ in range(3):
        eng.step()
    v2 = llm.add_lora("t", str(paths["a1"])).version  # same name, new weights
    assert v1 != v2
    new = [eng.add_request(None, GREEDY, prompt_token_ids=p, lora="t") for p in new_prompts]
    got = _run(eng, old + new)
    want_old = _reference(base, paths["a0"], old_prompts)
    want_new = _reference(base, paths["a1"], new_prompts)
    # the two versions give different tokens on both prompt sets, so a mix-up would show
    assert want_old != _reference(base, paths["a1"], old_prompts)
    assert want_new != _reference(base, paths["a0"], new_prompts)
    assert got[:4] == want_old  # in-flight: old version
    assert got[4:] == want_new  # new requests: new version
    assert [a.version for a in llm.list_loras()] == [v2]
    assert ("t", v1) not in eng.lora._versions  # old version dropped once unused
    assert eng.lora.num_pinned == 0


def test_remove_while_in_use_lets_requests_finish(setup):
    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8)
    eng = llm.engine
    llm.add_lora("gone", str(paths["a2"]))
    prompts = _prompts(3, 3)
    rids = [eng.add_request(None, GREEDY, prompt_token_ids=p, lora="gone") for p in prompts]
    eng.step()
    assert llm.remove_lora("gone")
    with pytest.raises(RequestError, match="does not exist"):
        eng.add_request(None, GREEDY, prompt_token_ids=[5, 6], lora="gone")
    assert _run(eng, rids) == _reference(base, paths["a2"], prompts)
    assert eng.lora.num_pinned == 0 and not eng.lora._versions
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


def test_running_adapters_are_never_evicted_and_slots_bound_distinct(setup):
    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=2, max_lora_rank=8)
    eng = llm.engine
    for n, p in paths.items():
        llm.add_lora(n, str(p))
    names = [f"a{i % 6}" for i in range(18)]
    prompts = _prompts(18, 4)
    rids = [eng.add_request(None, GREEDY, prompt_token_ids=p, lora=n)
            for p, n in zip(prompts, names)]
    slot_owner_seen: dict[int, tuple] = {}
    schedule = eng.scheduler.schedule

    def checked_schedule():
        batch = schedule()
        slots = {r.adapter_slot for r in batch.rows}
        assert len(slots - {-1}) <= 2, "more distinct adapters in a step than max_loras"
        for seq in eng.scheduler.running:  # a running sequence's slot still holds its adapter
            assert eng.lora._slot_of[seq.adapter] == seq.adapter_slot
            slot_owner_seen.setdefault(seq.seq_id, seq.adapter)
        return batch

    eng.scheduler.schedule = checked_schedule
    got = _run(eng, rids)
    assert eng.lora.stats["evictions"] > 0
    for n in set(names):  # every request got its own adapter's output
        idx = [i for i, m in enumerate(names) if m == n]
        assert [got[i] for i in idx] == _reference(base, paths[n], [prompts[i] for i in idx])
    assert eng.lora.num_pinned == 0 and eng.lora.num_running == 0


@pytest.mark.parametrize("max_bypass,bounded", [(8, True), (10**9, False)])
def test_fairness_with_more_adapters_than_slots(setup, max_bypass, bounded):
    """A request for a non-resident adapter behind a stream of requests for the 2 resident ones:
    the bypass bound admits it within max_bypass + max_tokens steps; without it, it starves
    until the stream stops."""
    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=2, max_lora_rank=8)
    eng = llm.engine
    eng.scheduler.max_bypass = max_bypass
    for n in ("a0", "a1", "a2"):
        llm.add_lora(n, str(paths[n]))
    short = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    rng = random.Random(9)
    eng.add_request(None, short, prompt_token_ids=[7, 8, 9], lora="a0")
    eng.add_request(None, short, prompt_token_ids=[7, 8, 10], lora="a1")
    eng.step()
    starving = eng.add_request(None, short, prompt_token_ids=[11, 12], lora="a2")
    seq = eng._requests[starving].seqs[0]
    admitted_at = None
    for step in range(120):
        for name in ("a0", "a1"):  # keep both slots busy
            eng.add_request(None, short, prompt_token_ids=[rng.randrange(3, 259)], lora=name)
        eng.step()
        if admitted_at is None and seq.status.value != "waiting":
            admitted_at = step
    if bounded:
        assert admitted_at is not None and admitted_at <= max_bypass + 2 * short.max_tokens
    else:
        assert admitted_at is None
    while eng.has_unfinished_requests:
        eng.step()
    assert eng.lora.num_pinned == 0


def test_cpu_tier_keeps_at_most_max_cpu_loras_and_reloads(setup):
    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=2, max_cpu_loras=3,
              max_lora_rank=8)
    eng = llm.engine
    for n, p in paths.items():  # 6 adapters registered, 3 CPU copies allowed
        llm.add_lora(n, str(p))
    assert len(llm.list_loras()) == 6 and eng.lora.num_cpu_copies == 3
    assert eng.lora.stats["cpu_evictions"] == 3
    names = [f"a{i % 6}" for i in range(12)]
    prompts = _prompts(12, 6)
    rids = [eng.add_request(None, GREEDY, prompt_token_ids=p, lora=n)
            for p, n in zip(prompts, names)]
    # a0-a2 come back from disk, each pushing out an idle copy (a3-a5), which then come back
    # too; the second round finds all six pinned, and pinned copies are never dropped
    assert eng.lora.stats["cpu_misses"] == 6 and eng.lora.stats["cpu_hits"] == 6
    assert eng.lora.num_cpu_copies == 6
    # reloads read into the file buffers of dropped copies (checked against the reference below)
    assert eng.lora.buffers.reused >= 3
    got = _run(eng, rids)
    for n in set(names):
        idx = [i for i, m in enumerate(names) if m == n]
        assert [got[i] for i in idx] == _reference(base, paths[n], [prompts[i] for i in idx])
    # as the requests finish and release their pins, the tier shrinks back to the limit
    assert eng.lora.num_cpu_copies == 3 and eng.lora.num_pinned == 0
    eng.add_request(None, GREEDY, prompt_token_ids=[5, 6, 7], lora="a0")
    _run(eng, [])
    assert eng.lora.num_cpu_copies == 3 and eng.lora.num_pinned == 0


def test_buffer_pool_never_recycles_a_buffer_still_viewed():
    pool = BufferPool(max_buffers=2)
    buf = pool.take(1 << 20)
    # as the adapter reader does: tensors through one memoryview, which they keep alive
    view = torch.frombuffer(memoryview(buf), dtype=torch.float32)[4:8].view(2, 2)
    assert not pool.give(buf)  # a tensor still reads it
    del view
    assert pool.give(buf) and pool.take(1_000_000) is buf  # best fit, a little larger is fine
    pool.give(buf)
    assert pool.take(100_000) is not buf  # ten times the size asked: not handed out


def test_dropped_copy_held_by_a_caller_is_not_overwritten(setup):
    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=1, max_cpu_loras=1,
              max_lora_rank=8)
    ad = llm.add_lora("a0", str(paths["a0"]))
    held = next(iter(ad.modules.values())).a  # a view of a0's file buffer
    before = held.clone()
    for n in ("a1", "a2", "a3"):  # each load drops the previous copy
        llm.add_lora(n, str(paths[n]))
    assert ad.modules is None and torch.equal(held, before)
    assert llm.engine.lora.buffers.reused >= 1  # the buffers nobody holds are reused


def test_converted_copies_recycle_their_buffers(setup):
    """Adapters converted on load (fp32 files, bf16 copies) convert into the buffer of a
    dropped copy, and give the file's buffer back at once: a server at its CPU-tier limit
    touches no fresh memory per load. The recycled buffer held another adapter's weights:
    the copy must equal a load into fresh memory, bit for bit."""
    from loraplex.lora.adapter import load_adapter

    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=1, max_cpu_loras=1,
              max_lora_rank=8, lora_dtype="bfloat16")
    pool = llm.engine.lora.buffers
    sizes = []
    for n in ("a0", "a1", "a2", "a3"):  # each load drops the previous copy
        ad = llm.add_lora(n, str(paths[n]))
        assert ad.modules.flat.dtype == torch.bfloat16 and ad.raw is not None
        sizes.append(len(ad.raw))
    # a1-a3 read their files into the buffer a0's load gave back; a2 and a3 also convert into
    # the dropped copies' buffers (the fp32 file buffer is twice too large for a bf16 copy)
    assert pool.allocated == 3 and pool.reused == 5
    assert sizes[0] == sizes[2] and ad.raw is not None
    fresh = load_adapter("a3", paths["a3"], llm.engine.model_config, 8, dtype=torch.bfloat16)
    assert torch.equal(ad.modules.flat, fresh.modules.flat)
    gen = llm.generate([{"prompt_token_ids": p} for p in _prompts(3, 7)], GREEDY, lora="a3")
    assert all(len(o.outputs[0].token_ids) > 0 for o in gen)


def test_max_cpu_loras_below_max_loras_is_refused(setup):
    from loraplex.config import ConfigError

    base, _ = setup
    with pytest.raises(ConfigError, match="max_cpu_loras"):
        LLM(str(base), max_model_len=128, enable_lora=True, max_loras=4, max_cpu_loras=2)


def test_a_cpu_copy_is_a_handful_of_gc_objects(setup):
    """A CPU copy is one flat tensor and a table of plain numbers, not a tensor per A and B:
    the cyclic GC scans every tracked object on a full collection, holding the GIL, and with
    a tensor per weight 128 SmolLM2 adapters made that a 29 ms stall of loads and steps."""
    import gc

    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=2, max_lora_rank=8)
    llm.add_lora("warm", str(paths["a0"]))
    gc.collect()
    before = len(gc.get_objects())
    ads = [llm.add_lora(f"c{i}", str(paths[f"a{i}"])) for i in range(6)]
    gc.collect()
    per_adapter = (len(gc.get_objects()) - before) / len(ads)
    modules = len(ads[0].modules)
    assert modules == 21  # 3 layers x 7 projections: ~100 tracked objects as tensors
    assert per_adapter <= 12, f"{per_adapter:.1f} tracked objects per adapter"
    m = ads[0].modules[(0, "q_proj")]  # views made on access, of the right shapes
    assert m.a.shape == (8, 64) and m.b.shape[1] == 8 and m.scale == 2.0


def test_kernel_slots_live_in_the_huge_page_arena(setup):
    """With the C++ kernel (CPU), every projection's slot weights are views of the manager's
    one huge-page block, sized exactly for them; loading an adapter writes there."""
    base, paths = setup
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_loras=3, max_lora_rank=8)
    mgr = llm.engine.lora
    if llm.engine.runner.lora_kernel is None:
        pytest.skip("no C++ LoRA kernel here")
    assert mgr.arena is not None
    tensors = [t for s in mgr.slots.values() for t in (s.ap, s.bp)]
    assert all(mgr.arena.contains(t) for t in tensors)
    assert mgr.arena.used == sum(-(-t.numel() * t.element_size() // 4096) * 4096
                                 for t in tensors)
    llm.add_lora("a0", str(paths["a0"]))
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, lora="a0")
    assert len(out[0].outputs[0].token_ids) == 12
    assert any(bool(s.ap.any()) for s in mgr.slots.values())  # the adapter went into a slot
