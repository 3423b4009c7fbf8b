"""Every adapter the engine cannot serve is refused by name, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lora_helpers import BAD_ADAPTERS, KEY, _edit_config, _edit_tensors, make_peft_adapter
from safetensors.torch import load_file

from loraplex import LLM, SamplingParams
from loraplex.config import ConfigError
from loraplex.engine.engine import RequestError
from loraplex.lora.adapter import LoRAError, load_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def env(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    tmp = tmp_path_factory.mktemp("bad")
    good = make_peft_adapter(base, tmp / "good", seed=1, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"])
    llm = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8)
    llm.add_lora("good", str(good))
    ref = llm.generate("hello", GREEDY, lora="good")[0].outputs[0].token_ids
    return base, tmp, good, llm, ref


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_engine_keeps_serving(env, case):
    _, tmp, good, llm, ref = env
    d = tmp / case
    shutil.copytree(good, d)
    mutate, message = BAD_ADAPTERS[case]
    mutate(d)
    with pytest.raises(LoRAError) as e:
        llm.add_lora(case, str(d))
    assert message in str(e.value)
    assert case not in [a.name for a in llm.list_loras()]
    with pytest.raises(RequestError):
        llm.generate("hello", GREEDY, lora=case)
    assert llm.generate("hello", GREEDY, lora="good")[0].outputs[0].token_ids == ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_in_every_adapter_dtype(env, dtype, value):
    """The finiteness check sums the converted weights (in bf16 in its own dtype, which has
    float32's range): NaN and both infinities must come through it in every dtype."""
    _, tmp, good, llm, _ = env
    cfg = llm.engine.model_config
    assert load_adapter("good", good, cfg, 8, dtype=dtype).nbytes > 0
    d = tmp / f"nonfinite-{str(dtype)[6:]}-{value}"
    shutil.copytree(good, d)

    def poison(sd):
        sd[f"{KEY}.lora_A.weight"][3, 5] = value

    _edit_tensors(d, poison)
    with pytest.raises(LoRAError, match="NaN or infinite"):
        load_adapter("bad", d, cfg, 8, dtype=dtype)


def test_weights_beyond_float16_range_are_refused_with_lora_dtype_float16(env):
    """A finite fp32 weight above 65504 becomes inf in a float16 copy: refused, naming the
    range and the dtypes that hold it; the same file loads in bf16 and fp32."""
    _, tmp, good, llm, _ = env
    cfg = llm.engine.model_config
    d = tmp / "beyond-fp16"
    shutil.copytree(good, d)

    def big(sd):
        sd[f"{KEY}.lora_B.weight"][2, 1] = 1e5

    _edit_tensors(d, big)
    with pytest.raises(LoRAError, match="beyond float16's range"):
        load_adapter("big", d, cfg, 8, dtype=torch.float16)
    for dt in (torch.bfloat16, torch.float32):
        assert load_adapter("big", d, cfg, 8, dtype=dt).nbytes > 0


def test_converted_b_holds_b_times_scale_rounded_once(env):
    """An fp32 file loaded as float16 or bfloat16 with a scale that is no power of two (12/8):
    each B holds fl16(B x scale) from the file's fp32 values, its scale 1, so the slots'
    product is rounded once (B rounded, then the product, differs in ~1/4 of the elements)."""
    base, tmp, _, llm, _ = env
    path = make_peft_adapter(base, tmp / "scale1.5", seed=5, r=8, lora_alpha=12,
                             target_modules=["q_proj", "v_proj"])
    sd = load_file(str(path / "adapter_model.safetensors"))
    cfg = llm.engine.model_config
    assert load_adapter("f32", path, cfg, 8).modules[(0, "q_proj")].scale == 1.5
    for dt in (torch.float16, torch.bfloat16):
        ad = load_adapter("half", path, cfg, 8, dtype=dt)
        m = ad.modules[(0, "q_proj")]
        b32 = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        assert m.scale == 1.0 and m.b.dtype == dt
        assert torch.equal(m.b, (b32 * 1.5).to(dt))
        assert not torch.equal(m.b, b32.to(dt) * 1.5)  # what rounding twice gives


def test_float16_b_times_scale_beyond_range_is_refused(env):
    """B in range but B x scale (what the device slot holds) beyond 65504: refused naming the
    module and the product; at exactly 65504 it loads and serves finite logits."""
    base, tmp, good, llm, _ = env
    cfg = llm.engine.model_config
    ad = load_adapter("good", good, cfg, 8, dtype=torch.float32)  # the file's: scale kept
    key = next(k for k in ad.modules if ad.modules[k].scale > 1)
    scale = ad.modules[key].scale
    assert key[1] in ("q_proj", "v_proj")  # the env adapter's targets
    name = f"base_model.model.model.layers.{key[0]}.self_attn.{key[1]}"
    seen: list[torch.Tensor] = []
    for value, ok in ((65504 / scale * 1.01, False), (65504 / scale, True)):
        d = tmp / f"scaled-{ok}"
        shutil.copytree(good, d)

        def put(sd, v=value):
            sd[f"{name}.lora_B.weight"][0, 0] = v

        _edit_tensors(d, put)
        if ok:
            llm16 = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8,
                        lora_dtype="float16")
            llm16.add_lora("edge", str(d))
            llm16.engine.runner.logits_hook = lambda rows, logits: seen.append(logits.clone())
            llm16.generate("hello", GREEDY, lora="edge")
            assert seen and all(bool(torch.isfinite(lg).all()) for lg in seen)
        else:
            with pytest.raises(LoRAError, match=f"layer {key[0]} {key[1]}.*float16's range"):
                load_adapter("over", d, cfg, 8, dtype=torch.float16)
            # the same B in a float16 file (no conversion, the scale kept apart): refused too
            h = tmp / "scaled-f16-file"
            shutil.copytree(d, h)
            _edit_tensors(h, lambda sd: sd.update({k: v.half() for k, v in sd.items()}))
            with pytest.raises(LoRAError, match=f"layer {key[0]} {key[1]}: B x scale"):
                load_adapter("over16", h, cfg, 8, dtype=torch.float16)


@pytest.mark.parametrize("edit", [
    {"target_modules": "all-linear"},  # literal, as hand-written configs hold it
    {"target_modules": "ALL-LINEAR"},
    {"target_modules": r"^(?!.*lm_head).*\.(q|v)_proj$"},  # names lm_head only to exclude it
    {"target_modules": ["self_attn.q_proj", "model.layers.0.self_attn.v_proj", "v_proj"]},
    {"exclude_modules": ["o_proj", "embed_tokens"]},
    {"layers_to_transform": [0, 1, 2], "layers_pattern": "layers"},
    # values of the types PEFT writes, and initializations that leave the base as it is
    {"lora_alpha": 16.0, "alpha_pattern": {"q_proj": 32.0, "v_proj": 8}},
    {"exclude_modules": r".*\.embed_tokens",
     "rank_pattern": {"^model.layers.0.self_attn.q_proj": 8}},
    *({"init_lora_weights": v} for v in (True, False, "gaussian", "eva", "orthogonal", "mica",
                                         "lora_ga")),
], ids=["all-linear", "ALL-LINEAR", "regex-excluding-lm_head", "dotted-and-full", "exclude",
        "layers-pattern", "float-alphas", "regex-exclude-and-rank-key", "init-true",
        "init-false", "init-gaussian", "init-eva", "init-orthogonal", "init-mica",
        "init-lora_ga"])
def test_configs_selecting_the_weights_modules_load(env, edit, tmp_path):
    """Configs under which PEFT adapts every module the weights hold (and nothing they lack
    matters): accepted, with the same modules as the unedited adapter."""
    _, _, good, llm, _ = env
    cfg = llm.engine.model_config
    d = tmp_path / "edited"
    shutil.copytree(good, d)
    _edit_config(d, **edit)
    want = sorted(load_adapter("good", good, cfg, 8).modules)
    assert sorted(load_adapter("edited", d, cfg, 8).modules) == want


@pytest.mark.parametrize("how", ["null", "absent"])
def test_config_without_target_modules_gets_peft_defaults(env, how, tmp_path):
    """PEFT gives a config without target_modules its default targets for the architecture
    (q_proj and v_proj for every architecture loraplex serves) and ignores weights for any
    other module. An adapter whose weights are for q and v only loads as if it named them (its
    output against PEFT's: test_lora_oracle.py); one with weights beyond them is refused,
    naming PEFT's default, instead of being served with weights PEFT would drop."""
    base, _, good, llm, _ = env
    cfg = llm.engine.model_config

    def drop_targets(d):
        if how == "null":
            _edit_config(d, target_modules=None)
        else:
            c = json.loads((d / "adapter_config.json").read_text())
            del c["target_modules"]
            (d / "adapter_config.json").write_text(json.dumps(c))

    qv = tmp_path / "qv"
    shutil.copytree(good, qv)
    drop_targets(qv)
    assert sorted(load_adapter("qv", qv, cfg, 8).modules) == sorted(
        load_adapter("good", good, cfg, 8).modules)
    more = make_peft_adapter(base, tmp_path / "more", seed=3, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    drop_targets(more)
    with pytest.raises(LoRAError, match=r"down_proj, which adapter_config.json does not select "
                                        r"\(no target_modules, so PEFT's default"):
        load_adapter("more", more, cfg, 8)


def test_layers_to_transform_as_one_index_loads(env, tmp_path):
    base, _, _, llm, _ = env
    d = make_peft_adapter(base, tmp_path / "one-layer", seed=4, r=8, lora_alpha=16,
                          target_modules=["q_proj"], layers_to_transform=1)
    assert json.loads((d / "adapter_config.json").read_text())["layers_to_transform"] == 1
    mods = load_adapter("one-layer", d, llm.engine.model_config, 8).modules
    assert sorted(mods) == [(1, "q_proj")]


def test_rank_above_max_is_refused(env):
    base, tmp, _, llm, ref = env
    big = make_peft_adapter(base, tmp / "big", seed=2, r=16, lora_alpha=16,
                            target_modules=["o_proj"])
    with pytest.raises(LoRAError, match=r"o_proj has rank 16 > max_lora_rank=8"):
        llm.add_lora("big", str(big))
    assert llm.generate("hello", GREEDY, lora="good")[0].outputs[0].token_ids == ref


def test_pickle_needs_opt_in(env):
    base, tmp, good, llm, ref = env
    d = tmp / "pickled"
    shutil.copytree(good, d)
    torch.save(load_file(str(d / "adapter_model.safetensors")), str(d / "adapter_model.bin"))
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRAError, match="pickle"):
        llm.add_lora("pickled", str(d))
    opt_in = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8,
                 allow_pickle_adapters=True)
    opt_in.add_lora("pickled", str(d))
    assert opt_in.generate("hello", GREEDY, lora="pickled")[0].outputs[0].token_ids == ref


class _RunsCode:
    """Unpickling this calls os.system: what a malicious adapter_model.bin would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pickle_opt_in_still_refuses_code(env, tmp_path):
    """With pickles allowed, adapter_model.bin is read with weights_only=True: a pickle that
    would run code is refused with a clear error and runs nothing; the engine keeps serving."""
    base, _, good, _, ref = env
    d = tmp_path / "evil"
    shutil.copytree(good, d)
    marker = tmp_path / "code-ran"
    sd = load_file(str(d / "adapter_model.safetensors"))
    torch.save({**sd, "payload": _RunsCode(marker)}, str(d / "adapter_model.bin"))
    (d / "adapter_model.safetensors").unlink()
    opt_in = LLM(str(base), max_model_len=128, enable_lora=True, max_lora_rank=8,
                 allow_pickle_adapters=True)
    opt_in.add_lora("good", str(good))
    with pytest.raises(LoRAError, match="cannot be read with weights_only=True"):
        opt_in.add_lora("evil", str(d))
    assert not marker.exists()
    assert "evil" not in [a.name for a in opt_in.list_loras()]
    assert opt_in.generate("hello", GREEDY, lora="good")[0].outputs[0].token_ids == ref


def test_lora_disabled_and_unknown_names(env, tiny_model_factory):
    _, _, good, llm, _ = env
    assert llm.remove_lora("never-added") is False
    plain = LLM(str(tiny_model_factory("llama")), max_model_len=128)
    with pytest.raises(ConfigError, match="enable_lora"):
        plain.add_lora("x", str(good))
