"""Fair sharing between tenants in the scheduler (virtual token counters): a tenant flooding the
queue does not push a light tenant's requests behind its whole backlog."""

from __future__ import annotations

import pytest

from loraplex import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _admission_order(llm: LLM, flood_tenant: str | None, light_tenant: str | None,
                     weight: float = 1.0) -> list[str]:
    """12 flood requests, one step later 2 light ones; the order in which requests start."""
    eng = llm.engine
    for i in range(12):
        eng.add_request([5 + i, 6, 7], PARAMS, request_id=f"flood-{i}", tenant=flood_tenant)
    eng.step()
    for i in range(2):
        eng.add_request([9, 8 + i, 7], PARAMS, request_id=f"light-{i}", tenant=light_tenant,
                        tenant_weight=weight)
    started: list[str] = []
    while eng.has_unfinished_requests:
        for seq in eng.scheduler.running:
            if seq.request_id not in started:
                started.append(seq.request_id)
        eng.step()
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
    return started


@pytest.fixture()
def llm(tiny_model_factory):
    return LLM(str(tiny_model_factory("llama")), max_model_len=64, max_num_seqs=2)


def test_light_tenant_is_not_queued_behind_a_flood(llm):
    order = _admission_order(llm, "flood", "light")
    # The flood's first two run at once; the light tenant takes the next free slots.
    assert order.index("light-0") <= 3 and order.index("light-1") <= 4, order


def test_one_tenant_is_fcfs(llm):
    """Control: the same arrivals from a single tenant queue in arrival order (the fair queue
    above is what moved the light requests forward)."""
    order = _admission_order(llm, None, None)
    assert order == [f"flood-{i}" for i in range(12)] + ["light-0", "light-1"]


def test_no_banked_credit_and_weights(llm):
    eng, sch = llm.engine, llm.engine.scheduler
    eng.add_request([3, 4, 5], PARAMS, request_id="f", tenant="flood")
    eng.step()
    eng.step()
    assert sch.vtc["flood"] > 0
    # A tenant that was idle joins at the busy tenants' lowest counter, not at zero, so it
    # cannot then monopolize the engine with credit banked while away.
    eng.add_request([3, 4, 6], PARAMS, request_id="late", tenant="late")
    assert sch.vtc["late"] == sch.vtc["flood"]
    while eng.has_unfinished_requests:
        eng.step()
    # Weighted: with weight 2 a tenant's tokens count half.
    before = sch.vtc.get("heavy", 0.0)
    eng.add_request([1, 2, 3], PARAMS, request_id="w", tenant="heavy", tenant_weight=2.0)
    while eng.has_unfinished_requests:
        eng.step()
    # 3 prompt + 5 decode inputs computed (x1) and 6 tokens generated (x2) = 20, / weight 2
    assert sch.vtc["heavy"] - before == pytest.approx(10.0)
