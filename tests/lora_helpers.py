"""Build real PEFT adapters (written by PEFT itself) with random non-zero B matrices."""

from __future__ import annotations

from pathlib import Path

import torch


def make_peft_adapter(base_dir: Path, out: Path, seed: int, std: float = 0.1,
                      bf16_exact: bool = False, **lora_kwargs) -> Path:
    """A PEFT-written adapter with random non-zero B. bf16_exact: every A and B entry is a
    bfloat16 value (stored as fp32), so casting the adapter to bf16 loses nothing."""
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
            if bf16_exact and "lora_" in name:
                p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(str(out))
    return out


class PeftOracle:
    """transformers + PEFT with every adapter loaded; logits per row with its adapter active."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path]) -> None:
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
        self.model.eval()

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
