"""`loraplex generate | serve | bench`: command line → EngineConfig. Flag names follow vLLM."""

from __future__ import annotations

import argparse
import sys
import time


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = fp32 on CPUs without native bf16, bf16 on CUDA")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--seed", type=int, default=0, help="seed of the engine's default generator")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's max_position_embeddings)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="max sequences per step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget per step (longer prompts are prefilled in chunks)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--kv-cache-memory", dest="kv_cache_memory_gb", type=float, default=1.0,
                   help="KV cache budget in GiB")
    g.add_argument("--cpu-gemm", default="onednn", choices=["onednn", "mkl"],
                   help="CPU fp32 GEMM backend: onednn (fast, default) or mkl (more accurate)")


def engine_config(args: argparse.Namespace):
    from loraplex.config import EngineConfig

    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        seed=args.seed, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory_gb, cpu_gemm=args.cpu_gemm)


def cmd_generate(args: argparse.Namespace) -> int:
    from loraplex.llm import LLM
    from loraplex.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM.from_config(engine_config(args))
    print(f"[loaded {llm.engine.model_path.name} in {time.perf_counter() - t0:.1f}s, "
          f"{llm.engine.dtype}]", file=sys.stderr)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompts = args.prompt or ["What is the capital of France?"]
    t1 = time.perf_counter()
    if args.raw:
        outs = llm.generate(prompts, params)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    dt = time.perf_counter() - t1
    n_tok = 0
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        n_tok += len(c.token_ids)
        print(f"### {p}\n{c.text}\n")
    print(f"[{n_tok} tokens in {dt:.2f}s, {n_tok / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate completions for prompts (offline)")
    add_engine_args(g)
    g.add_argument("prompt", nargs="*", help="prompts (default: a demo question)")
    g.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    args = parser.parse_args(argv)
    from loraplex.config import ConfigError

    try:
        if args.cmd == "generate":
            return cmd_generate(args)
    except ConfigError as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
