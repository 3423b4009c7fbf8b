"""Build real PEFT adapters (written by PEFT itself) with random non-zero B matrices."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def make_peft_adapter(base_dir: Path, out: Path, seed: int, std: float = 0.1,
                      exact_in: torch.dtype | None = None, **lora_kwargs) -> Path:
    """A PEFT-written adapter with random non-zero B. exact_in (bfloat16 or float16): every A
    and B entry is a value of that dtype (stored as fp32), so casting the adapter to it loses
    nothing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    torch.manual_seed(seed)  # PEFT's own init of A (Kaiming uniform), reproducible
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initializes B to zero (a no-op adapter): randomize it
                p.copy_(torch.randn(p.shape, generator=g) * std)
            if exact_in is not None and "lora_" in name:
                p.copy_(p.to(exact_in).float())
    model.save_pretrained(str(out))
    return out


class PeftOracle:
    """transformers + PEFT with every adapter loaded; logits per row with its adapter active.
    dtype=torch.float64 evaluates the same fp32 weights (widened exactly) in fp64: the exact
    logits, against which fp32 engines (PEFT's own fp32 run included) show their rounding."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path],
                 dtype: torch.dtype = torch.float32) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                    attn_implementation="eager")
        base.generation_config.eos_token_id = None
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]),
                                               adapter_name=names[0])
        for n in names[1:]:
            self.model.load_adapter(str(adapters[n]), adapter_name=n)
        self.model.to(dtype).eval()

    def logits(self, adapter: str | None, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens])
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    return self.model(ids).logits[0].float()
            self.model.set_adapter(adapter)
            return self.model(ids).logits[0].float()

    def greedy(self, adapter: str | None, prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                  do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=ids, **kw)
            else:
                self.model.set_adapter(adapter)
                out = self.model.generate(input_ids=ids, **kw)
        return out[0, len(prompt):].tolist()


KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def _edit_config(d, **kv):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(kv)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    sd = load_file(str(d / "adapter_model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "adapter_model.safetensors"))


def _wrong_shape(sd):
    sd[f"{KEY}.lora_A.weight"] = torch.zeros(8, 100)


def _unknown_key(sd):
    sd[f"{KEY}.lora_magnitude_vector"] = torch.ones(64)


def _only_a(sd):
    del sd[f"{KEY}.lora_B.weight"]


def _far_layer(sd):
    sd["base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)


def _nan(sd):
    sd[f"{KEY}.lora_B.weight"][0, 0] = float("nan")


def _empty(sd):
    sd.clear()


def _stray(sd):
    sd["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight.unused"] = torch.zeros(1)


def _lm_head_weights(sd):
    """An lm_head LoRA pair beside the q/v ones (the config still names only q and v)."""
    sd["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    sd["base_model.model.lm_head.lora_B.weight"] = torch.zeros(256, 8)


def _huge_declared(d):
    """A header that declares a 40 GB tensor over a few bytes of data."""
    key = f"{KEY}.lora_A.weight"
    header = json.dumps({key: {"dtype": "F32", "shape": [100_000, 100_000],
                               "data_offsets": [0, 40_000_000_000]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                                  + b"\0" * 64)


# Adapters the engine must refuse: name -> (mutation of a copy of a good r=8 q/v adapter folder
# on the tiny llama, a phrase the error must contain).
BAD_ADAPTERS = {
    "dora": (lambda d: _edit_config(d, use_dora=True), "DoRA"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "lora_bias": (lambda d: _edit_config(d, lora_bias=True), "LoRA bias"),
    "bias_all": (lambda d: _edit_config(d, bias="all"), "bias='all'"),
    "embed_target": (lambda d: _edit_config(d, target_modules=["q_proj", "embed_tokens"]),
                     "embed_tokens"),
    "lm_head_target": (lambda d: _edit_config(d, target_modules=["q_proj", "v_proj", "lm_head"]),
                       "lm_head LoRA"),
    "lm_head_weights": (lambda d: _edit_tensors(d, _lm_head_weights),
                        "lm_head.lora_A.weight (embedding / lm_head LoRA is not supported)"),
    "fan_in_fan_out": (lambda d: _edit_config(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "alora": (lambda d: _edit_config(d, alora_invocation_tokens=[40, 41]), "Activated LoRA"),
    "qalora": (lambda d: _edit_config(d, use_qalora=True), "QA-LoRA"),
    "trainable_tokens": (lambda d: _edit_config(d, trainable_token_indices=[5, 6]),
                         "trainable tokens"),
    "target_parameters": (lambda d: _edit_config(d, target_parameters=["mlp.experts.down_proj"]),
                          "LoRA on parameters"),
    "bad_regex": (lambda d: _edit_config(d, target_modules="(q_proj"), "not a valid regex"),
    # PEFT reruns these initializations on load and rewrites the base weights they adapt
    "pissa": (lambda d: _edit_config(d, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "pissa_niter": (lambda d: _edit_config(d, init_lora_weights="pissa_niter_4"),
                    "init_lora_weights='pissa_niter_4'"),
    "olora": (lambda d: _edit_config(d, init_lora_weights="olora"), "init_lora_weights='olora'"),
    "corda": (lambda d: _edit_config(d, init_lora_weights="corda"), "init_lora_weights='corda'"),
    "loftq": (lambda d: _edit_config(d, init_lora_weights="loftq"), "init_lora_weights='loftq'"),
    # an initialization loraplex does not know might rewrite the base weights too
    "unknown_init": (lambda d: _edit_config(d, init_lora_weights="shiny_new_init"),
                     "init_lora_weights='shiny_new_init'"),
    # PEFT turns even an empty sub-config into an active variant (its defaults)
    "kasa_empty": (lambda d: _edit_config(d, kasa_config={}), "KaSA"),
    "bdlora_empty": (lambda d: _edit_config(d, use_bdlora={}), "block-diagonal LoRA"),
    "arrow_empty": (lambda d: _edit_config(d, arrow_config={}), "Arrow routing"),
    "monteclora_empty": (lambda d: _edit_config(d, monteclora_config={}), "MonteCLoRA"),
    # values of the wrong type or form: a LoRAError naming the field, not a TypeError
    "rank_pattern_bad_regex": (lambda d: _edit_config(d, rank_pattern={"(q_proj": 8}),
                               "rank_pattern key '(q_proj' is not a valid regex"),
    "alpha_pattern_bad_regex": (lambda d: _edit_config(d, alpha_pattern={"v_proj[": 8}),
                                "alpha_pattern key 'v_proj[' is not a valid regex"),
    "rank_pattern_list": (lambda d: _edit_config(d, rank_pattern=["q_proj"]),
                          "rank_pattern must be an object of positive integer ranks"),
    "rank_pattern_zero": (lambda d: _edit_config(d, rank_pattern={"q_proj": 0}),
                          "rank_pattern must be an object of positive integer ranks"),
    "alpha_null": (lambda d: _edit_config(d, lora_alpha=None),
                   "lora_alpha must be a finite number, got None"),
    "alpha_string": (lambda d: _edit_config(d, lora_alpha="16"), "lora_alpha must be a finite"),
    "rslora_string": (lambda d: _edit_config(d, use_rslora="yes"), "use_rslora must be true"),
    "layers_string": (lambda d: _edit_config(d, layers_to_transform="0"),
                      "layers_to_transform must be null, a layer index or a list"),
    "alpha_huge": (lambda d: _edit_config(d, lora_alpha=10 ** 400),
                   "lora_alpha must be a finite number"),
    "targets_not_names": (lambda d: _edit_config(d, target_modules=["q_proj", 1]),
                          "target_modules must be a list of module names or a regex string"),
    "pattern_without_layers": (lambda d: _edit_config(d, layers_pattern="layers"),
                               "layers_pattern='layers' needs layers_to_transform"),
    "regex_with_layers_pattern": (lambda d: _edit_config(d, target_modules=r".*\.(q|v)_proj",
                                                         layers_pattern="layers"),
                                  "cannot be combined with target_modules as a string"),
    "regex_with_layers": (lambda d: _edit_config(d, target_modules=r".*\.(q|v)_proj",
                                                 layers_to_transform=[0]),
                          "cannot be combined with target_modules as a string"),
    "exclude_number": (lambda d: _edit_config(d, exclude_modules=3),
                       "exclude_modules must be null, a string or a list of strings"),
    # the weights adapt q and v in every layer; PEFT would build (and serve) only what the
    # config selects, ignoring the other weights
    "config_targets_fewer": (lambda d: _edit_config(d, target_modules=["q_proj"]),
                             "v_proj, which adapter_config.json does not select"),
    "config_layers_fewer": (lambda d: _edit_config(d, layers_to_transform=[0]),
                            "layers.1.self_attn.q_proj, which adapter_config.json does not"),
    "config_excludes": (lambda d: _edit_config(d, exclude_modules=["v_proj"]),
                        "v_proj, which adapter_config.json does not select"),
    "rank_mismatch": (lambda d: _edit_config(d, r=4), "rank 8 in its weights but 4"),
    "wrong_shape": (lambda d: _edit_tensors(d, _wrong_shape), "q_proj lora_A (8, 100)"),
    "unknown_key": (lambda d: _edit_tensors(d, _unknown_key), "DoRA magnitude"),
    "missing_pair": (lambda d: _edit_tensors(d, _only_a), "but not its pair"),
    "far_layer": (lambda d: _edit_tensors(d, _far_layer), "layer 99"),
    "nan": (lambda d: _edit_tensors(d, _nan), "NaN"),
    "no_match": (lambda d: _edit_tensors(d, _empty), "matches no module"),
    "stray_key": (lambda d: _edit_tensors(d, _stray), "unexpected tensor"),
    "no_config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bad_json": (lambda d: (d / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    "no_weights": (lambda d: (d / "adapter_model.safetensors").unlink(),
                   "no adapter_model.safetensors"),
    "huge_declared": (_huge_declared, "declares bytes 0..40000000000"),
    "truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:300]), "not a valid safetensors"),
}
