"""Engine: add_request / abort_request / step, where a step is schedule → execute → update.

Also owns what turns sampled tokens into user-facing outputs: incremental detokenization and
stop strings (which may end a sequence after the scheduler's token-level checks).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from loraplex.config import (
    ConfigError,
    EngineConfig,
    ModelConfig,
    cdiv,
    kv_block_bytes,
    num_blocks_for_budget,
    resolve_dtype,
)
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.runner import ModelRunner
from loraplex.engine.scheduler import Scheduler
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.manager import LoRAConfig, LoRAManager
from loraplex.model.loader import load_model, resolve_model_path
from loraplex.model.sampler import Sampler
from loraplex.request import CompletionOutput, RequestOutput, Sequence
from loraplex.sampling_params import SamplingParams
from loraplex.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses (bad prompt, too long, ...). `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class PreparedRequest:
    """A validated, tokenized request, ready to enter the engine (built off the step thread)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: str | None = None  # adapter name; None = base model
    arrival_time: float = field(default_factory=time.monotonic)
    tenant: str | None = None  # fair-share account (None = the default tenant)
    tenant_weight: float = 1.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A consistent snapshot of the engine's load, taken on the step thread for readers on other
    threads (metrics, admission control)."""

    num_requests: int  # requests in the engine (running or waiting)
    num_running: int  # sequences running
    num_waiting: int  # sequences waiting for admission
    kv_cache_usage: float  # fraction of KV blocks in use
    num_running_requests: int = 0  # requests with a running sequence
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int = 0
    lora_counters: dict[str, int] = field(default_factory=dict)
    num_cpu_adapters: int = 0
    num_pinned: int = 0
    num_registered_adapters: int = 0


@dataclass(slots=True)
class _RequestState:
    prepared: PreparedRequest
    seqs: list[Sequence]


def resolve_cpu_gemm(choice: str, device: torch.device, dtype: torch.dtype,
                     use_kernels: bool) -> str:
    """The GEMM backend an engine uses; an "amx" that cannot run here is a ConfigError that
    says why (it is not silently swapped for another backend)."""
    if choice != "amx":
        return choice
    why = None
    if dtype != torch.bfloat16:
        why = "it runs bf16 models only"
    elif device.type != "cpu":
        why = "it runs on the CPU only"
    elif not use_kernels:
        why = "the C++ kernels are off"
    else:
        from loraplex.kernels import amx_gemm_supported

        if not amx_gemm_supported():
            why = "this CPU (or the kernel build, or the OS) has no AMX-BF16"
    if why:
        raise ConfigError(f"cpu_gemm amx cannot run here: {why}; use onednn or mkl")
    return "amx"


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        t0 = time.perf_counter()
        self.model_path = resolve_model_path(cfg.model)
        self.model_config = ModelConfig.from_folder(self.model_path)
        self.sched_config = cfg.with_model_len(self.model_config.max_position_embeddings)
        self.cpu_gemm = resolve_cpu_gemm(cfg.cpu_gemm, self.device, self.dtype, cfg.use_kernels)
        amx_op = None
        if self.cpu_gemm == "amx":
            from loraplex.kernels import amx_linear_op

            amx_op = amx_linear_op()
        self.model = load_model(self.model_path, self.device, self.dtype,
                                self.sched_config.max_model_len,
                                pack=self.cpu_gemm in ("onednn", "amx"),
                                batch_hint=min(self.sched_config.max_num_seqs, 64),
                                amx_op=amx_op)
        self.tokenizer = Tokenizer(cfg.tokenizer or self.model_path)
        self.eos_token_ids = tuple(sorted(set(self.model_config.eos_token_ids)
                                          | set(self.tokenizer.eos_token_ids)))
        self.served_model_name = cfg.served_model_name or (
            "SmolLM2-135M-Instruct" if cfg.model is None else self.model_path.name)

        m, c = self.model_config, cfg.cache
        self.num_blocks = num_blocks_for_budget(m, c, self.dtype)
        need = cdiv(self.sched_config.max_model_len, c.block_size)
        if need > self.num_blocks:
            raise ConfigError(
                f"the KV cache ({self.num_blocks} blocks of {c.block_size} tokens, "
                f"{kv_block_bytes(m, c.block_size, self.dtype) * self.num_blocks / 2**30:.2f} GiB) "
                f"cannot hold one sequence of max_model_len={self.sched_config.max_model_len}; "
                f"raise kv_cache_memory_gb or lower max_model_len")
        self.lora: LoRAManager | None = None
        self.lora_dtype: torch.dtype | None = None  # adapters' dtype when LoRA is enabled
        if cfg.enable_lora:
            from loraplex.kernels import lora_kernel_for, lora_pairs_supported

            self.lora_dtype = (self.dtype if cfg.lora_dtype == "auto"
                               else resolve_dtype(cfg.lora_dtype, self.device))
            packed = lora_kernel_for(self.device, self.dtype, self.lora_dtype,
                                     cfg.use_kernels) is not None
            # bf16 model and adapters on an AVX512-BF16 CPU: the kernel's pair layout
            pairs = (packed and self.dtype == self.lora_dtype == torch.bfloat16
                     and lora_pairs_supported())
            lora_cfg = LoRAConfig(cfg.max_loras, cfg.max_lora_rank, cfg.allow_pickle_adapters,
                                  cfg.max_cpu_loras)
            self.lora = LoRAManager(self.model, m, lora_cfg, self.device, self.lora_dtype,
                                    packed=packed, pairs=pairs)
        self.block_manager = BlockManager(self.num_blocks, c.block_size)
        self.scheduler = Scheduler(self.sched_config, self.block_manager, self.eos_token_ids,
                                   self.lora)
        self.sampler = Sampler(self.device, self.eos_token_ids, cfg.seed)
        self.runner = ModelRunner(self.model, m, self.num_blocks, c.block_size, self.device,
                                  self.dtype, self.sampler, cfg.use_kernels,
                                  lora_dtype=self.lora.dtype if self.lora else None)
        self._requests: dict[str, _RequestState] = {}
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()
        log.info("engine ready in %.1fs: %s (%s, %s, GEMMs %s), %d KV blocks x %d tokens",
                 time.perf_counter() - t0, self.model_path, self.dtype, self.device,
                 self.cpu_gemm if self.device.type == "cpu" else "torch", self.num_blocks,
                 c.block_size)

    # ---- adapters ---------------------------------------------------------------------------
    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise ConfigError("LoRA is not enabled (EngineConfig(enable_lora=True))")
        return self.lora

    def add_lora(self, name: str, path: str) -> LoRAAdapter:
        """Load (and validate) an adapter; re-adding a name makes its new weights the version
        new requests get, while in-flight requests finish on the old one."""
        return self._lora_manager().add_lora(name, path)

    def remove_lora(self, name: str) -> bool:
        return self._lora_manager().remove_lora(name)

    def list_loras(self) -> list[LoRAAdapter]:
        return [] if self.lora is None else self.lora.list_loras()

    # ---- requests ---------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                lora: str | None = None, tenant: str | None = None,
                tenant_weight: float = 1.0) -> PreparedRequest:
        """Validate and tokenize. Pure: safe to call from any thread."""
        params = params or SamplingParams()
        if lora is not None and (self.lora is None or self.lora.get(lora) is None):
            raise RequestError(f"The model `{lora}` does not exist.", "model")
        if isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string or a list of token ids", "prompt")
            prompt_token_ids = self.tokenizer.encode(prompt)
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        max_len = self.sched_config.max_model_len
        n_prompt = len(prompt_token_ids)
        if n_prompt >= max_len:
            raise RequestError(
                f"This model's maximum context length is {max_len} tokens. However, your prompt "
                f"has {n_prompt} tokens; at least one token must be left for the completion.",
                "prompt")
        if params.max_tokens is not None and n_prompt + params.max_tokens > max_len:
            raise RequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the prompt, "
                f"{params.max_tokens} in the completion).", "max_tokens")
        rid = request_id if request_id is not None else f"req-{next(self._req_ids)}"
        return PreparedRequest(rid, prompt, list(prompt_token_ids), params, lora,
                               tenant=tenant, tenant_weight=tenant_weight)

    def add_prepared(self, req: PreparedRequest) -> None:
        if req.request_id in self._requests:
            raise RequestError(f"request id {req.request_id!r} is already in flight")
        p = req.params
        if req.lora is not None and (self.lora is None or self.lora.get(req.lora) is None):
            raise RequestError(f"The model `{req.lora}` does not exist.", "model")
        seqs = []
        for i in range(p.n):
            seed = None if p.seed is None else p.seed + i
            seq = Sequence(next(self._seq_ids), req.request_id, i, req.prompt_token_ids, p, seed,
                           req.arrival_time)
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                               p.skip_special_tokens)
            seq.tenant, seq.tenant_weight = req.tenant, req.tenant_weight
            seqs.append(seq)
        for seq in seqs:
            if req.lora is not None:
                seq.adapter = self._lora_manager().pin(req.lora)  # unpinned when it finishes
            self.scheduler.add(seq)
        self._requests[req.request_id] = _RequestState(req, seqs)

    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                    lora: str | None = None, tenant: str | None = None,
                    tenant_weight: float = 1.0) -> str:
        req = self.prepare(prompt, params, request_id, prompt_token_ids, lora, tenant,
                           tenant_weight)
        self.add_prepared(req)
        return req.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        st = self._requests.pop(request_id, None)
        if st is None:
            return None
        for seq in st.seqs:
            self.scheduler.finish(seq, "abort")
        return self._output(st)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> EngineStats:
        sch, lm = self.scheduler, self.lora
        running_reqs = len({s.request_id for s in sch.running})
        if lm is None:
            return EngineStats(len(self._requests), len(sch.running), len(sch.waiting),
                               self.block_manager.usage, running_reqs)
        return EngineStats(
            len(self._requests), len(sch.running), len(sch.waiting), self.block_manager.usage,
            running_reqs,
            running_adapters=tuple(sorted({s.adapter[0] for s in sch.running if s.adapter})),
            waiting_adapters=tuple(sorted({s.adapter[0] for s in sch.waiting if s.adapter})),
            max_loras=lm.cfg.max_loras, lora_counters=dict(lm.stats),
            num_cpu_adapters=lm.num_cpu_copies, num_pinned=lm.num_pinned,
            num_registered_adapters=len(lm.list_loras()))

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        sampled = self.runner.execute(batch)
        touched = self.scheduler.update(batch, sampled)
        return self._process(touched)

    def _process(self, touched: list[Sequence]) -> list[RequestOutput]:
        now = time.monotonic()
        changed: dict[str, _RequestState] = {}
        for seq in touched:
            if seq.first_token_time is None:
                seq.first_token_time = now
            assert seq.detok is not None
            delta = seq.detok.add([seq.token_ids[-1]])
            if seq.is_finished:
                delta += seq.detok.flush()
            seq.text += delta
            if delta and seq.params.stop:
                self._check_stop_strings(seq, len(delta))
            st = self._requests.get(seq.request_id)
            if st is not None:
                changed[seq.request_id] = st
        outs = []
        for rid, st in changed.items():
            out = self._output(st)
            if out.finished:
                del self._requests[rid]
            outs.append(out)
        return outs

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> None:
        stops = seq.params.stop
        longest = max(len(s) for s in stops)
        # A stop string may straddle tokens: search the tail that could contain a new match.
        start = max(0, len(seq.text) - delta_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in stops:
            i = seq.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return
        i, s = best
        seq.text = seq.text[:i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
        self.scheduler.finish(seq, "stop", s)

    def _output(self, st: _RequestState) -> RequestOutput:
        outs = []
        for seq in st.seqs:
            text = seq.text
            if not seq.is_finished and seq.params.stop:
                # Hold back a tail that may turn out to be the start of a stop string.
                hold = max(len(s) for s in seq.params.stop) - 1
                text = text[:max(0, len(text) - hold)]
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=seq.logprobs, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason))
        finished = all(s.is_finished for s in st.seqs)
        first = [s.first_token_time for s in st.seqs if s.first_token_time is not None]
        metrics = {"arrival_time": st.prepared.arrival_time,
                   "first_token_time": min(first) if first else None}
        return RequestOutput(st.prepared.request_id, st.prepared.prompt,
                             st.prepared.prompt_token_ids, outs, finished, metrics)
