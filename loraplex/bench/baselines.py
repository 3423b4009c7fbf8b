"""What a user would run instead of loraplex, measured on the same weights and adapters.

  peft_mixed_batch  transformers + PEFT, one batch whose rows use different adapters
                    (`generate(adapter_names=...)`), fp32
  merged_memory     one merged model per adapter (PEFT merge_and_unload): memory per adapter
  llama_cpp_single  llama-cpp-python on the GGUF, one stream, without and with a LoRA adapter
                    (converted from PEFT to llama.cpp's GGUF LoRA format here)

Each returns a dict; a baseline whose package is missing (or that cannot run on this model)
returns {"skipped": "<why>"} instead of failing the sweep.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from pathlib import Path

from loraplex.bench.loadgen import WORDS, Lengths
from loraplex.bench.roofline import rss_mb


def peft_mixed_batch(folder: Path, adapters: list[Path], n_requests: int, prompt_len: Lengths,
                     output_len: Lengths) -> dict:
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return {"skipped": f"transformers/peft not installed ({e.name})"}
    p_len, o_len = int(prompt_len.a), int(output_len.a)  # one batch: the fixed/low length
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (n_requests, p_len), generator=g)
    names = [f"a{i % len(adapters)}" for i in range(n_requests)]

    def gen(new: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 adapter_names=names, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == p_len + new
        return time.perf_counter() - t0

    gen(2)  # warm-up
    dt = gen(o_len)
    return {"requests": n_requests, "adapters": len(adapters), "prompt_len": p_len,
            "output_len": o_len, "seconds": dt, "tok_s": n_requests * o_len / dt}


def merged_memory(folder: Path, adapter: Path, copies: int = 2) -> dict:
    """RSS that each extra merged copy of the model costs: what serving N adapters as N merged
    models needs, N times over (vs one base + N small adapters)."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return {"skipped": f"transformers/peft not installed ({e.name})"}
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    gc.collect()
    before = rss_mb()
    held = []
    for _ in range(copies):
        m = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload()
        held.append(m)
        gc.collect()
    per_copy = (rss_mb() - before) / copies
    params = sum(p.numel() * p.element_size() for p in base.parameters())
    del held
    return {"merged_mb_per_adapter": per_copy, "model_param_mb": params / 1e6}


def _gguf_for(model: str | None) -> Path | None:
    if model is None:
        from loraplex.model.gguf_convert import embedded_gguf_path

        return embedded_gguf_path()
    p = Path(model)
    return p if p.suffix == ".gguf" and p.is_file() else None


def peft_to_gguf_lora(adapter: Path, out: Path, n_head: int, n_kv_head: int) -> Path:
    """A PEFT adapter as llama.cpp's GGUF LoRA: tensors `blk.N.<proj>.weight.lora_a/_b` in
    fp32, general.type=adapter, adapter.lora.alpha. llama.cpp stores q/k rows permuted for its
    RoPE layout, so B of q_proj/k_proj gets the same row permutation as the base weights."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora"):
        raise ValueError("rank/alpha patterns and rsLoRA have no GGUF LoRA equivalent here")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
             "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(cfg.get("lora_alpha", 8)))
    for key, arr in sorted(load_file(str(adapter / "adapter_model.safetensors")).items()):
        parts = key.split(".")
        layer, proj, ab = int(parts[parts.index("layers") + 1]), parts[-3], parts[-2]
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if ab == "lora_B" and proj in ("q_proj", "k_proj"):
            heads = n_head if proj == "q_proj" else n_kv_head
            rows = arr.shape[0]
            arr = (arr.reshape(heads, 2, rows // heads // 2, arr.shape[1])
                   .swapaxes(1, 2).reshape(arr.shape))
        suffix = "lora_a" if ab == "lora_A" else "lora_b"
        w.add_tensor(f"blk.{layer}.{names[proj]}.weight.{suffix}", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama_cpp_single(model: str | None, adapter: Path, output_len: Lengths,
                     prompt_len: Lengths, threads: int | None = None) -> dict:
    """Decode tokens/s of one llama-cpp-python stream on the GGUF (its own quantized weights),
    without and with a LoRA adapter."""
    gguf_path = _gguf_for(model)
    if gguf_path is None:
        return {"skipped": "llama-cpp-python needs a .gguf model (the embedded default is one)"}
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python; "
                           "it compiles llama.cpp, ~7 minutes on 2 cores)"}
    threads = threads or os.cpu_count() or 1
    new, p_len = int(output_len.a), int(prompt_len.a)

    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(p_len))

    def timed(llm, n: int) -> float:
        llm.reset()  # no prompt reuse between runs: each one prefills
        t0 = time.perf_counter()
        r = llm.create_completion(prompt, max_tokens=n, temperature=0.0,
                                  logit_bias={llm.token_eos(): -1e9})
        dt = time.perf_counter() - t0
        if r["usage"]["completion_tokens"] != n:
            raise RuntimeError(f"llama.cpp generated {r['usage']['completion_tokens']} of {n}")
        return dt

    def decode_rate(llm) -> float:
        """Decode tokens/s: (n - 1) extra tokens over the time they add to a 1-token run
        (streamed chunk times are not token times: llama-cpp-python holds text back)."""
        return (new - 1) / (timed(llm, new) - timed(llm, 1))

    out: dict = {"gguf": str(gguf_path), "threads": threads, "output_len": new}
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=1024,
                          verbose=False, seed=0)
    decode_rate(llm)  # warm-up
    out["tok_s"] = max(decode_rate(llm) for _ in range(2))
    del llm
    try:
        import json
        import tempfile

        from loraplex.model.gguf_convert import converted_folder

        mcfg = json.loads((converted_folder(gguf_path) / "config.json").read_text())
        lora = peft_to_gguf_lora(adapter, Path(tempfile.mkdtemp()) / "lora.gguf",
                                 mcfg["num_attention_heads"], mcfg["num_key_value_heads"])
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=1024,
                              verbose=False, seed=0, lora_path=str(lora))
        decode_rate(llm)
        out["lora_tok_s"] = max(decode_rate(llm) for _ in range(2))
        del llm
    except Exception as e:  # an adapter format this llama.cpp build refuses: say so
        out["lora_skipped"] = f"{type(e).__name__}: {e}"
    return out
