"""`loraplex generate | serve | bench`: command line → EngineConfig. Flag names follow vLLM."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


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
    g.add_argument("--cpu-gemm", default="onednn", choices=["onednn", "mkl", "amx"],
                   help="CPU GEMM backend: onednn (fast, default), mkl (more accurate fp32) or "
                        "amx (bf16 on AMX CPUs: faster decode, slower long prefill)")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (vLLM flag names)")
    g.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="serve LoRA adapters (default on; --no-enable-lora serves the base only)")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="adapters to load at start: name=path, or vLLM's JSON form "
                        '\'{"name": ..., "path": ...}\'')
    g.add_argument("--max-loras", type=int, default=4,
                   help="distinct adapters in one batch (device slots)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted")
    g.add_argument("--lora-dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="adapter weights' dtype (auto = the model's); bfloat16 and float16 "
                        "halve adapter memory and LoRA's per-step reads (float16: finer "
                        "rounding, range 65504 for B x scale)")
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapter copies kept in CPU memory (LRU; default: all registered)")
    g.add_argument("--lora-dir", default=None,
                   help="folder of adapter folders: a request naming an unregistered adapter "
                        "loads <lora-dir>/<name> on first use")
    g.add_argument("--allow-pickle-adapters", action="store_true",
                   help="also read adapter_model.bin (torch.load with weights_only=True)")


def engine_config(args: argparse.Namespace):
    from loraplex.config import EngineConfig

    lora = getattr(args, "enable_lora", False)
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
        seed=args.seed, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory_gb, cpu_gemm=args.cpu_gemm,
        enable_lora=lora, max_loras=getattr(args, "max_loras", 4),
        max_lora_rank=getattr(args, "max_lora_rank", 16),
        lora_dtype=getattr(args, "lora_dtype", "auto"),
        max_cpu_loras=getattr(args, "max_cpu_loras", None),
        allow_pickle_adapters=getattr(args, "allow_pickle_adapters", False),
        served_model_name=(args.served_model_name or [None])[0]
        if hasattr(args, "served_model_name") else None)


def parse_lora_module(spec: Any) -> tuple[str, str, str | None]:
    """`name=path`, vLLM's JSON `{"name": ..., "path": ..., "base_model_name": ...}` (the last
    optional: the served model name listed as the adapter's parent), or (from YAML) a mapping.
    Returns (name, path, base_model_name or None)."""
    from loraplex.config import ConfigError

    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ConfigError(f"--lora-modules {spec!r}: invalid JSON ({e})") from None
    parent = None
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "path", "base_model_name"}
        if unknown:  # as vLLM's LoRAModulePath(**spec) refuses them
            raise ConfigError(f"--lora-modules {spec!r}: unknown key(s) "
                              f"{', '.join(sorted(map(str, unknown)))} (name, path and "
                              f"base_model_name are the keys)")
        name, path, parent = spec.get("name"), spec.get("path"), spec.get("base_model_name")
        if parent is not None and (not isinstance(parent, str) or not parent):
            raise ConfigError(f"--lora-modules {spec!r}: base_model_name must be a name")
    elif isinstance(spec, str) and "=" in spec:
        name, path = spec.split("=", 1)
    else:
        raise ConfigError(f"--lora-modules {spec!r}: expected name=path or "
                          '{"name": ..., "path": ...}')
    if not name or not path or not isinstance(name, str) or not isinstance(path, str):
        raise ConfigError(f"--lora-modules {spec!r}: both a name and a path are needed")
    return name, path, parent


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """`--config file.yaml`: keys are flag names (dashes or underscores); the command line
    overrides the file."""
    from loraplex.config import ConfigError

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    import yaml

    try:
        data = yaml.safe_load(Path(known.config).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {known.config}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {known.config}: expected a mapping of flag: value")
    dests = {a.dest: a for a in parser._actions}
    values = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in dests or dest in ("help", "config"):
            raise ConfigError(f"--config {known.config}: unknown setting {key!r}")
        action = dests[dest]
        if action.nargs in ("+", "*") and not isinstance(value, list):
            value = [value]
        values[dest] = _checked(action, value, f"--config {known.config}: {key}")
    parser.set_defaults(**values)


def _checked(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value as the flag would take it: argparse converts and checks only what it parses
    from the command line, and a default set from the file would bypass both (2.5 for an int
    flag failing deep in the engine, the string 'false' turning a switch on)."""
    from loraplex.config import ConfigError

    if value is None:
        raise ConfigError(f"{where}: null is not a value (leave the key out for the default)")
    if action.nargs == 0:  # a switch: store_true or --x/--no-x
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, list):
        return [_checked_one(action, v, where) for v in value]
    return _checked_one(action, value, where)


def _checked_one(action: argparse.Action, value: Any, where: str) -> Any:
    from loraplex.config import ConfigError

    if action.type is not None and not isinstance(value, dict):
        try:
            value = action.type(value if isinstance(value, str) else
                                # YAML numbers as the command line would spell them, so that
                                # int rejects 2.5 (int(2.5) would truncate)
                                str(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: invalid {getattr(action.type, '__name__', 'value')} "
                              f"value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {sorted(action.choices)}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from loraplex.server.launch import ServerConfig, serve

    modules = [parse_lora_module(s) for s in args.lora_modules]
    cfg = ServerConfig(
        engine=engine_config(args), served_model_names=list(args.served_model_name or []),
        lora_modules=[(n, p) for n, p, _ in modules],
        lora_parents={n: b for n, _, b in modules if b is not None},
        lora_dir=args.lora_dir,
        api_key=args.api_key or os.environ.get("LORAPLEX_API_KEY")
        or os.environ.get("VLLM_API_KEY") or None,
        enable_runtime_lora=args.enable_runtime_lora, tenants_file=args.tenants,
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        host=args.host, port=args.port,
        demo_adapters=False if args.no_demo_adapters else None,
        drain_timeout=args.drain_timeout, log_level=args.log_level)
    return serve(cfg)


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
    sub.add_parser("bench", help="serving benchmarks: `bench serve` (load generator), "
                                 "`bench sweep` (adapters x concurrency, baselines, plots)",
                   add_help=False)
    s = sub.add_parser("serve", help="OpenAI-compatible multi-LoRA server")
    s.add_argument("--config", default=None,
                   help="YAML file of flag: value (command-line flags override it)")
    add_engine_args(s)
    add_lora_args(s)
    g = s.add_argument_group("server")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the base model (default: the model's)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(also read from LORAPLEX_API_KEY or VLLM_API_KEY)")
    g.add_argument("--tenants", default=None, metavar="FILE",
                   help="tenants YAML: API keys -> tenant, the adapters (names or globs) each "
                        "may use, per-tenant limits; --api-key then acts as an admin key")
    g.add_argument("--enable-runtime-lora", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (also "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting beyond the running batch before 429")
    g.add_argument("--max-queued-tokens", type=int, default=1 << 21,
                   help="tokens of accepted work (prompt + max_tokens, per sequence) beyond what "
                        "the KV cache holds at once, before 429")
    g.add_argument("--no-demo-adapters", action="store_true",
                   help="with the embedded model, do not load the bundled demo adapters")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    from loraplex.config import ConfigError

    try:
        if argv is None:
            argv = sys.argv[1:]
        if argv and argv[0] == "bench":
            from loraplex.bench.cli import main as bench_main

            return bench_main(argv[1:])
        if argv and argv[0] == "serve":
            apply_config_file(s, argv[1:])
        args = parser.parse_args(argv)
        if args.cmd == "generate":
            return cmd_generate(args)
        if args.cmd == "serve":
            return cmd_serve(args)
    except ConfigError as e:
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
