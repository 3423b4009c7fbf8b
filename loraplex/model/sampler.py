"""Batched sampling with per-row parameters and per-sequence seeded generators.

Order of processing (as vLLM): penalties → min_tokens/EOS suppression → greedy or
temperature → top-k → top-p → min-p → draw. A draw is `argmax(p / E)` with E ~ Exp(1) per token
(the exponential race, equivalent to sampling from p), so a seeded sequence consumes exactly
one noise vector from its own generator per token: same seed, same output, whatever the batch.
Returned logprobs are the model's raw log-softmax (before penalties and temperature).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraplex.engine.batch import SampledToken, ScheduledRow


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        self.default_gen = torch.Generator(device=device)
        self.default_gen.manual_seed(seed)
        self._gens: dict[int, torch.Generator] = {}
        # [R, V] float32 -> [R] int64, torch.argmax's result; the runner installs the C++ one.
        self.argmax: Callable[[torch.Tensor], torch.Tensor] = _torch_argmax

    def drop(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            self._gens.pop(s, None)

    def _gen(self, row: ScheduledRow) -> torch.Generator:
        g = self._gens.get(row.seq_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(row.seed % (2**64))
            self._gens[row.seq_id] = g
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[ScheduledRow]) -> list[SampledToken]:
        """logits: [R, V] float32, one row per sampled ScheduledRow (same order)."""
        params = [r.params for r in rows]
        vocab = logits.shape[1]
        want_lp = [p.logprobs is not None for p in params]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

        pen = [i for i, p in enumerate(params) if p.needs_penalties]
        if pen:
            logits = logits.clone()
            self._apply_penalties(logits, rows, pen)
        suppress = [i for i, r in enumerate(rows)
                    if len(r.output_token_ids) < r.params.min_tokens]
        if suppress:
            logits = logits.clone() if not pen else logits
            for i in suppress:
                ids = set(rows[i].params.stop_token_ids)
                if not rows[i].params.ignore_eos:
                    ids.update(self.eos_token_ids)
                ids = [t for t in ids if 0 <= t < vocab]
                if ids:
                    logits[i, ids] = float("-inf")

        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = self.argmax(logits)
        else:
            tokens = self._sample(logits, rows, greedy)
        return self._outputs(tokens, rows, raw_lp, want_lp)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[ScheduledRow], idx: list[int]
                         ) -> None:
        vocab = logits.shape[1]
        for i in idx:
            p = rows[i].params
            out_ids = torch.tensor(rows[i].output_token_ids, dtype=torch.long, device=self.device)
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
                seen[torch.tensor(rows[i].prompt_token_ids, dtype=torch.long,
                                  device=self.device)] = True
                if out_ids.numel():
                    seen[out_ids] = True
                rp = p.repetition_penalty
                row.copy_(torch.where(seen, torch.where(row > 0, row / rp, row * rp), row))
            if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
                counts = torch.zeros(vocab, dtype=logits.dtype, device=self.device)
                counts.index_add_(0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(
                    logits.dtype)

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledRow], greedy: list[bool]
                ) -> torch.Tensor:
        params = [r.params for r in rows]
        dev = self.device
        greedy_t = torch.tensor(greedy, device=dev)
        argmax = self.argmax(logits)
        temps = torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                             device=dev, dtype=logits.dtype)
        logits = logits / temps.unsqueeze(1)
        vocab = logits.shape[1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(tp < 1.0 for tp in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            k_t = torch.tensor(top_k, device=dev).unsqueeze(1)
            ranks = torch.arange(vocab, device=dev).unsqueeze(0)
            drop = ranks >= k_t
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            before = probs.cumsum(dim=-1) - probs
            p_t = torch.tensor(top_p, device=dev, dtype=probs.dtype).unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(before >= p_t, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            m_t = torch.tensor(min_p, device=dev, dtype=probs.dtype).unsqueeze(1)
            probs = probs.masked_fill(probs < m_t * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.ones_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.seed is None and not greedy[i]]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), vocab, device=dev).exponential_(
                generator=self.default_gen)
        for i, r in enumerate(rows):
            if r.seed is not None and not greedy[i]:
                noise[i].exponential_(generator=self._gen(r))
        sampled = self.argmax(probs / noise)
        return torch.where(greedy_t, argmax, sampled)

    def _outputs(self, tokens: torch.Tensor, rows: list[ScheduledRow],
                 raw_lp: torch.Tensor | None, want_lp: list[bool]) -> list[SampledToken]:
        tok_list = tokens.tolist()
        if raw_lp is None:
            return [SampledToken(r.seq_id, t) for r, t in zip(rows, tok_list)]
        chosen = raw_lp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        k_max = max((r.params.logprobs or 0) for r in rows)
        top_v = top_i = None
        if k_max > 0:
            tv, ti = raw_lp.topk(k_max, dim=-1)
            top_v, top_i = tv.tolist(), ti.tolist()
        out = []
        for j, (r, t) in enumerate(zip(rows, tok_list)):
            if not want_lp[j]:
                out.append(SampledToken(r.seq_id, t))
                continue
            k = r.params.logprobs or 0
            top = ({top_i[j][m]: top_v[j][m] for m in range(k)} if k and top_i is not None
                   else None)
            out.append(SampledToken(r.seq_id, t, chosen[j], top))
        return out
