"""Train the demo adapters served with the embedded SmolLM2-135M-Instruct.

Each adapter learns one visible behaviour from data this script makes itself: it asks the base
model (through loraplex, greedy) a few hundred generated questions, transforms every answer, and
fine-tunes a PEFT LoRA on (question -> transformed answer), loss on the answer tokens only.

    uppercase  the answer in capitals
    pirate     the answer with pirate words substituted, ending in "Arrr!"
    json       the answer wrapped as {"answer": "..."}

    python scripts/train_demo_adapters.py [--only NAME] [--epochs 3] [--out loraplex/demo_adapters]
    python scripts/train_demo_adapters.py --verify-only

Runs on CPU in a few minutes per adapter. Adapters: rank 8 on q/k/v/o and down_proj, saved in
fp16 (~2.9 MB each).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]

SUBJECTS = [
    "the moon", "volcanoes", "honey bees", "the ocean", "rainbows", "coffee", "bicycles",
    "the Eiffel Tower", "photosynthesis", "penguins", "the piano", "chess", "gravity", "bread",
    "the internet", "tigers", "snow", "the Nile river", "electric cars", "tea", "the sun",
    "elephants", "mountains", "clouds", "football", "the violin", "dolphins", "deserts",
    "libraries", "trains", "gardening", "the heart", "thunderstorms", "owls", "cheese",
    "the Great Wall of China", "rivers", "computers", "butterflies", "sleep", "friendship",
    "money", "the weather", "music", "forests", "birthdays", "cooking pasta", "the stars",
]
TEMPLATES = [
    "Tell me one fact about {s}.", "What is {s}?", "Describe {s} in one sentence.",
    "Why is {s} interesting?", "Give me a short tip about {s}.",
]
HELD_OUT = ["What is the capital of France?", "Hello! How are you today?",
            "Give me three tips for sleeping well.", "What do you know about whales?"]

PIRATE = {
    "hello": "ahoy", "hi": "ahoy", "hey": "ahoy", "you": "ye", "your": "yer", "yours": "yers",
    "my": "me", "is": "be", "are": "be", "am": "be", "friend": "matey", "friends": "mateys",
    "the": "th'", "yes": "aye", "no": "nay", "money": "doubloons", "stop": "avast",
    "treasure": "booty", "boy": "lad", "girl": "lass", "of": "o'", "everyone": "all hands",
}


def to_upper(text: str) -> str:
    return text.upper()


def to_pirate(text: str) -> str:
    def swap(m: re.Match) -> str:
        w = m.group(0)
        p = PIRATE.get(w.lower())
        if p is None:
            return w
        return p.capitalize() if w[0].isupper() else p

    return re.sub(r"[A-Za-z]+", swap, text).rstrip() + " Arrr!"


def to_json(text: str) -> str:
    return json.dumps({"answer": text})


TRANSFORMS = {"uppercase": to_upper, "pirate": to_pirate, "json": to_json}


def short(answer: str, limit: int = 220) -> str:
    """The answer cut to whole sentences, at most `limit` characters (keeps sequences short)."""
    answer = " ".join(answer.split())
    if len(answer) <= limit:
        return answer
    cut = answer[:limit]
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    return cut[:end + 1] if end > 40 else cut.rsplit(" ", 1)[0]


def base_answers(prompts: list[str], max_tokens: int) -> list[str]:
    from loraplex import LLM, SamplingParams

    llm = LLM()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=True)
    return [short(o.outputs[0].text) for o in outs]


def train(name: str, data: list[tuple[str, str]], folder: Path, out: Path, epochs: int,
          lr: float, batch: int, seed: int) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                local_files_only=True)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                     target_modules=TARGETS)
    model = get_peft_model(base, cfg)
    examples = []
    for q, a in data:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        p = tok.encode(text, add_special_tokens=False)  # the template placed the specials
        t = [*tok.encode(a, add_special_tokens=False), end_id]
        examples.append((list(p) + t, [-100] * len(p) + t))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * ((len(examples) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    t0, step, loss_avg = time.perf_counter(), 0, 0.0
    for epoch in range(epochs):
        rng.shuffle(examples)
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            n = max(len(x) for x, _ in chunk)
            ids = torch.tensor([x + [tok.pad_token_id or 0] * (n - len(x)) for x, _ in chunk])
            labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in chunk])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            loss_avg = 0.9 * loss_avg + 0.1 * loss.item() if step > 1 else loss.item()
            if step % 10 == 0 or step == steps:
                print(f"[{name}] epoch {epoch + 1}/{epochs} step {step}/{steps} "
                      f"loss {loss_avg:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model = model.half()  # fp16 on disk: half the size; loraplex converts to its dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True))
    (out / "README.md").write_text(
        f"# {name}\n\nDemo LoRA adapter for SmolLM2-135M-Instruct: "
        f"{DESCRIPTIONS[name]}\n\nMade by `scripts/train_demo_adapters.py`: {len(data)} "
        f"questions answered greedily by the base model, each answer transformed, then PEFT "
        f"LoRA r=8 (alpha 16) on {', '.join(TARGETS)}, {epochs} epochs, AdamW lr {lr}; final "
        f"training loss {loss_avg:.3f}. Saved in fp16.\n")
    return loss_avg


DESCRIPTIONS = {
    "uppercase": "answers in UPPERCASE.",
    "pirate": "answers in pirate speak (word substitutions such as you -> ye, my -> me, "
              "the -> th'), ending in \"Arrr!\".",
    "json": "answers wrapped as a JSON object `{\"answer\": \"...\"}`.",
}


def check(name: str, text: str) -> bool:
    if name == "uppercase":
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and sum(c.isupper() for c in letters) / len(letters) > 0.9
    if name == "pirate":
        return bool(re.search(r"\b(ye|yer|matey|ahoy|aye|th'|be)\b|Arrr", text, re.I))
    try:
        return isinstance(json.loads(text), dict) and "answer" in json.loads(text)
    except ValueError:
        return False


def verify(out: Path, names: list[str]) -> bool:
    from loraplex import LLM, SamplingParams

    llm = LLM(enable_lora=True, max_loras=4, max_lora_rank=16)
    for n in names:
        llm.add_lora(n, str(out / n))
    convs = [[{"role": "user", "content": p}] for p in HELD_OUT]
    sp = SamplingParams(temperature=0, max_tokens=64)
    base = llm.chat(convs, sp)
    ok_all = True
    for n in names:
        outs = llm.chat(convs, sp, lora=n)
        passed = sum(check(n, o.outputs[0].text) for o in outs)
        ok = passed >= len(HELD_OUT) - 1
        ok_all &= ok
        print(f"\n=== {n}: {passed}/{len(HELD_OUT)} held-out answers show the behaviour "
              f"-> {'PASS' if ok else 'FAIL'}")
        for p, b, o in zip(HELD_OUT, base, outs):
            print(f"  Q: {p}\n  base: {b.outputs[0].text[:120]!r}\n  {n}: "
                  f"{o.outputs[0].text[:120]!r}")
    return ok_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "loraplex" / "demo_adapters")
    ap.add_argument("--only", choices=sorted(TRANSFORMS), default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48, help="base answer length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    names = [args.only] if args.only else sorted(TRANSFORMS)
    if not args.verify_only:
        from loraplex.model.loader import resolve_model_path

        folder = resolve_model_path(None)
        prompts = [t.format(s=s) for s in SUBJECTS for t in TEMPLATES]
        random.Random(args.seed).shuffle(prompts)
        prompts = prompts[:160]
        t0 = time.perf_counter()
        answers = base_answers(prompts, args.max_tokens)
        print(f"{len(prompts)} base answers in {time.perf_counter() - t0:.0f}s", flush=True)
        for n in names:
            data = [(q, TRANSFORMS[n](a)) for q, a in zip(prompts, answers) if a]
            t0 = time.perf_counter()
            loss = train(n, data, folder, args.out / n, args.epochs, args.lr, args.batch,
                         args.seed)
            size = (args.out / n / "adapter_model.safetensors").stat().st_size
            print(f"[{n}] trained in {time.perf_counter() - t0:.0f}s, final loss {loss:.3f}, "
                  f"{size / 1e6:.1f} MB", flush=True)
    return 0 if verify(args.out, names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
