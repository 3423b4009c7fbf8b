"""AsyncEngine: incremental outputs, concurrency, abort frees resources, seeded determinism."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from loraplex import AsyncEngine, EngineConfig, SamplingParams
from loraplex.engine.engine import RequestError


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    eng = AsyncEngine.from_config(EngineConfig(model=str(tiny_model_factory("llama")),
                                               max_model_len=256, block_size=8))
    yield eng
    eng.shutdown()


async def _collect(eng, prompt, params, rid=None):
    outs = [o async for o in eng.generate(prompt, params, request_id=rid)]
    return outs


def test_streams_incremental_outputs(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = asyncio.run(_collect(engine, "Hello", params))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    lens = [len(o.outputs[0].token_ids) for o in outs]
    assert lens == sorted(lens) and lens[-1] == 12 and len(outs) == 12
    texts = [o.outputs[0].text for o in outs]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))


def test_concurrent_requests_match_sequential(engine):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=42, ignore_eos=True)

    async def many():
        return await asyncio.gather(*[_collect(engine, f"prompt {i}", params) for i in range(8)])

    together = asyncio.run(many())
    for i in range(8):
        alone = asyncio.run(_collect(engine, f"prompt {i}", params))
        assert alone[-1].outputs[0].token_ids == together[i][-1].outputs[0].token_ids


def test_abort_by_closing_the_stream_frees_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        gen = engine.generate("abort me", params)
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        for _ in range(200):  # the step thread applies the abort between steps
            if engine.engine.num_requests == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    bm = engine.engine.block_manager
    assert engine.engine.num_requests == 0
    assert bm.num_free == bm.num_blocks
    bm.assert_consistent()


def test_cancelled_task_aborts(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        task = asyncio.create_task(_collect(engine, "cancel me", params))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.engine.num_requests == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert engine.engine.num_requests == 0
    assert engine.engine.block_manager.num_free == engine.engine.block_manager.num_blocks


def test_invalid_request_raises_before_streaming(engine):
    async def run():
        with pytest.raises(RequestError):
            async for _ in engine.generate("x" * 300, SamplingParams(max_tokens=10)):
                pass

    asyncio.run(run())
    assert engine.num_in_flight == 0


def test_n_completions_and_stop_reason(engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    final = asyncio.run(_collect(engine, "abc", params))[-1]
    assert [c.index for c in final.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1


def test_acceptance_comes_before_outputs_and_refusals_come_there(tiny_model_factory,
                                                                   tmp_path):
    """`accepted()` settles once the step thread has taken the request: it raises when the
    adapter was removed between the request's submission and its admission (the server then
    answers 404 instead of a 200 stream holding an error), and returns when it got in."""
    from lora_helpers import make_peft_adapter

    base = tiny_model_factory("llama")
    eng = AsyncEngine.from_config(EngineConfig(model=str(base), max_model_len=128,
                                               enable_lora=True))
    eng.engine.add_lora("a", str(make_peft_adapter(base, tmp_path / "a", seed=5, r=4,
                                                   lora_alpha=8, target_modules=["q_proj"])))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def go():
        ok = eng.submit(None, params, prompt_token_ids=[5, 6, 7], lora="a")
        await ok.accepted()
        assert len([o async for o in ok]) == 3
        # Hold the step thread off until the removal and the request are both queued: in its
        # next round it runs the removal first, then meets the request for a missing adapter.
        with eng._cv:
            removed = asyncio.get_running_loop().create_future()
            eng._calls.append((lambda e: e.remove_lora("a"), removed))
            late = eng.submit(None, params, prompt_token_ids=[5, 6, 7], lora="a")
        with pytest.raises(RequestError, match="does not exist"):
            await late.accepted()
        assert await removed is True
        assert eng.num_in_flight == 0 and eng.engine.lora.num_pinned == 0

    try:
        asyncio.run(go())
    finally:
        eng.shutdown()


def test_engine_is_built_on_its_step_thread_and_build_errors_reach_the_caller(
        tiny_model_factory):
    """An engine loaded on one thread and stepped on another decodes ~1.5x slower on CPU (the
    loading thread's OpenMP team throttles the stepping one's: engine/side_thread.py), so a
    factory runs on the step thread; what it raises is raised by the constructor."""
    import threading

    from loraplex.engine.engine import Engine

    built_on = []

    def make():
        built_on.append(threading.get_ident())
        return Engine(EngineConfig(model=str(tiny_model_factory("llama")), max_model_len=64))

    eng = AsyncEngine(make)
    try:
        stepped_on = asyncio.run(eng.call(lambda e: threading.get_ident()))
        assert built_on == [stepped_on] != [threading.get_ident()]
    finally:
        eng.shutdown()

    def broken():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(broken)


def test_adapter_loads_run_on_a_thread_without_an_openmp_team(tiny_model_factory, tmp_path):
    """A thread that runs a parallel torch op gets its own OpenMP team, and while it lives the
    step thread's team is throttled: one stream went from 18 to 26-32 ms per token after the
    server's first adapter load (engine/side_thread.py). Loads run on a side thread whose torch
    ops stay on that thread, and the step thread keeps all its threads."""
    import torch
    from lora_helpers import make_peft_adapter

    from loraplex.engine.side_thread import _openmp_runtime

    base = tiny_model_factory("llama")
    path = make_peft_adapter(base, tmp_path / "a", seed=3, r=4, lora_alpha=8,
                             target_modules=["q_proj"])
    eng = AsyncEngine.from_config(EngineConfig(model=str(base), max_model_len=64,
                                               enable_lora=True))

    async def go():
        await eng.add_lora("a", str(path))  # read and checked on the loader thread
        loader = await eng._off_step(torch.get_num_threads)
        stepper = await eng.call(lambda e: torch.get_num_threads())
        return loader, stepper

    try:
        assert _openmp_runtime() is not None, "no OpenMP runtime found in this process"
        loader, stepper = asyncio.run(go())
        assert loader == 1
        assert stepper == torch.get_num_threads()  # the step thread's own count, untouched
        assert torch.get_num_threads() > 1 or (os.cpu_count() or 1) == 1
        assert [a.name for a in eng.list_loras()] == ["a"]
    finally:
        eng.shutdown()


def test_adapter_reads_never_run_on_the_step_thread(tiny_model_factory, tmp_path):
    """Adding an adapter, and re-reading one whose CPU copy the LRU tier dropped, read disk
    on the loader thread: the step thread only registers the result. The reloaded adapter
    serves the same tokens as before its copy was dropped."""
    import threading

    from lora_helpers import make_peft_adapter

    base = tiny_model_factory("llama")
    paths = {n: make_peft_adapter(base, tmp_path / n, seed=s, r=4, lora_alpha=8,
                                  target_modules=["q_proj", "v_proj"])
             for n, s in (("a", 5), ("b", 6))}
    eng = AsyncEngine.from_config(EngineConfig(model=str(base), max_model_len=64,
                                               enable_lora=True, max_loras=1, max_cpu_loras=1))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    readers: list[str] = []

    async def go():
        async def run(lora):
            outs = [o async for o in eng.generate(None, params, prompt_token_ids=[5, 9, 14],
                                                  lora=lora)]
            return outs[-1].outputs[0].token_ids

        await eng.add_lora("a", str(paths["a"]))
        first = await run("a")
        lm = eng.engine.lora
        load = lm._load

        def recorded(*args):
            readers.append(threading.current_thread().name)
            return load(*args)

        lm._load = recorded
        await eng.add_lora("b", str(paths["b"]))  # the tier holds 1 copy: a's is dropped
        assert await eng.call(lambda e: e.lora.needs_reload("a")) is not None
        misses = lm.stats["cpu_misses"]
        again = await run("a")  # read back before admission
        return first, again, lm.stats["cpu_misses"] - misses

    try:
        first, again, new_misses = asyncio.run(go())
        assert again == first
        assert new_misses == 1
        assert len(readers) == 2  # b's add and a's re-read
        assert all(name.startswith("loraplex-loader") for name in readers), readers
    finally:
        eng.shutdown()


def test_loads_that_must_not_replace_check_at_registration(tiny_model_factory, tmp_path):
    """Two loads of one new name without load_inplace: exactly one adds it, the other gets
    AdapterExistsError (the server's 400 "already loaded"), never both told they added it
    while one silently replaced the other. A --lora-dir first-use load started after an
    explicit load of the same name keeps the explicit one. (Both orders below are fixed: the
    reads run in submission order on the one loader thread, and each registration follows its
    read, so the second registration always finds the name taken.)"""
    from lora_helpers import make_peft_adapter

    from loraplex.lora.adapter import AdapterExistsError
    from loraplex.server.adapters import AdapterResolver

    base = tiny_model_factory("llama")
    p1 = make_peft_adapter(base, tmp_path / "w1", seed=1, r=4, lora_alpha=8,
                           target_modules=["q_proj"])
    p2 = make_peft_adapter(base, tmp_path / "w2", seed=2, r=4, lora_alpha=8,
                           target_modules=["q_proj"])
    lora_dir = tmp_path / "dir"
    lora_dir.mkdir()
    shutil.copytree(p1, lora_dir / "y")
    eng = AsyncEngine.from_config(EngineConfig(model=str(base), max_model_len=64,
                                               enable_lora=True))
    resolver = AdapterResolver(eng, ["base"], str(lora_dir))

    def current(name):
        return eng.engine.lora.get(name).version

    async def go():
        got = await asyncio.gather(eng.add_lora("x", str(p1), replace=False),
                                   eng.add_lora("x", str(p2), replace=False),
                                   return_exceptions=True)
        added = [g for g in got if not isinstance(g, BaseException)]
        assert len(added) == 1 and isinstance(got[1], AdapterExistsError)
        assert current("x") == added[0].version
        # the explicit load is read first, the first-use load of DIR/y queued behind it
        explicit, resolved = await asyncio.gather(eng.add_lora("y", str(p2), replace=False),
                                                  resolver.resolve("y"))
        assert resolved == "y" and current("y") == explicit.version
        # load_inplace replaces
        again = await eng.add_lora("y", str(p1), replace=True)
        assert current("y") == again.version != explicit.version

    try:
        asyncio.run(go())
    finally:
        eng.shutdown()


def test_a_prefetched_copy_counts_as_one_miss_not_a_miss_and_a_hit(tiny_model_factory, tmp_path):
    """A request for an adapter whose CPU copy was dropped: the server reads it back off the
    step path (prefetch) and then pins it. One lookup, one CPU-tier miss, no hit."""
    from lora_helpers import make_peft_adapter

    base = tiny_model_factory("llama")
    paths = [make_peft_adapter(base, tmp_path / f"a{i}", seed=i + 1, r=4, lora_alpha=8,
                               target_modules=["q_proj"]) for i in range(2)]
    eng = AsyncEngine.from_config(EngineConfig(model=str(base), max_model_len=64,
                                               enable_lora=True, max_loras=1, max_cpu_loras=1))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def go():
        await eng.add_lora("a0", str(paths[0]))
        await eng.add_lora("a1", str(paths[1]))  # drops a0's copy (one CPU copy allowed)
        lm = eng.engine.lora
        assert lm.needs_reload("a0") is not None
        before = dict(lm.stats)
        [o async for o in eng.generate("hi", params, lora="a0")]
        return {k: lm.stats[k] - before.get(k, 0) for k in ("cpu_misses", "cpu_hits")}

    try:
        assert asyncio.run(go()) == {"cpu_misses": 1, "cpu_hits": 0}
    finally:
        eng.shutdown()
