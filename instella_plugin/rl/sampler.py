"""A plain sampler over the live megatron-core policy: the rollout generator GRPO uses until the
inference engine's live-model generator replaces it (both satisfy ``inference.api.TextGenerator``).

It reads the policy's weights in place at the training layout (no copy): each new token is one forward
pass over the whole sequence so far (no KV cache; fine for tests and dry runs, slow for long responses),
the last position's vocab-parallel logits are gathered over the tensor-parallel group, and every TP rank
samples the same token from the same seeded generator. Sequences are right-padded (attention is causal,
so padding after a sequence's end never reaches its logits). Ids beyond the tokenizer's vocabulary (the
padded rows of the output layer) are never sampled. Pipeline parallelism is not supported here.
"""
from typing import List, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from instella_plugin.inference.api import Completion, Prompt, SamplingParams


class LiveModelSampler:
    """``generate(prompts, params)`` from the live model chunks (see the module docstring)."""

    def __init__(self, model_chunks, tokenizer, vocab_size: int, device, pad_id: int = 1, batch_tokens: int = 32768):
        if len(model_chunks) != 1:
            raise ValueError("the live-model sampler runs one model chunk (no pipeline or virtual stages)")
        self.model, self.tokenizer = model_chunks[0], tokenizer
        self.vocab_size, self.device, self.pad_id = int(vocab_size), device, int(pad_id)
        self.batch_tokens = int(batch_tokens)

    def _ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return [int(t) for t in prompt]

    @torch.no_grad()
    def _next_logits(self, seqs: List[List[int]]) -> torch.Tensor:
        """Full-vocabulary logits [b, V] of each sequence's next token."""
        lengths = [len(s) for s in seqs]
        width = max(lengths)
        tokens = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s)
        tokens = tokens.to(self.device)
        positions = torch.arange(width, device=self.device)[None].expand(len(seqs), -1)
        logits = self.model(tokens, positions, None)  # [b, s, V / tp]
        last = logits[torch.arange(len(seqs), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        if ps.get_tensor_model_parallel_world_size() > 1:
            last = gather_from_tensor_model_parallel_region(last)
        return last.float()

    @staticmethod
    def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = torch.softmax(ordered, -1).cumsum(-1)
            drop = cumulative - torch.softmax(ordered, -1) >= params.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return logits

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> List[Completion]:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, params)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts, params):
        generator = torch.Generator().manual_seed(int(params.seed))
        eos = self.tokenizer.eos_token_id
        prompt_ids = [self._ids(p) for p in prompts]
        outs: List[List[int]] = [[] for _ in prompts]
        logps: List[List[float]] = [[] for _ in prompts]
        finish = [None] * len(prompts)
        for _ in range(params.max_new_tokens):
            active = [i for i, f in enumerate(finish) if f is None]
            if not active:
                break
            width = max(len(prompt_ids[i]) + len(outs[i]) for i in active)
            per_batch = max(1, self.batch_tokens // width)
            for start in range(0, len(active), per_batch):
                rows = active[start:start + per_batch]
                logits = self._next_logits([prompt_ids[i] + outs[i] for i in rows])[:, :self.vocab_size].cpu()
                if params.greedy:
                    picked = logits.argmax(-1)
                    logp = torch.log_softmax(logits, -1).gather(-1, picked[:, None])[:, 0]
                else:
                    scaled = self._filter(logits / params.temperature, params)
                    logprobs = torch.log_softmax(scaled, -1)
                    picked = torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]
                    logp = logprobs.gather(-1, picked[:, None])[:, 0]
                for row, tok, lp in zip(rows, picked.tolist(), logp.tolist()):
                    outs[row].append(tok)
                    logps[row].append(lp)
                    if params.stop_at_eos and tok == eos:
                        finish[row] = "eos"
                    elif params.stop and any(s in self.tokenizer.decode(outs[row]) for s in params.stop):
                        finish[row] = "stop"
        return [Completion(prompt_tokens=tuple(prompt_ids[i]), tokens=tuple(outs[i]),
                           text=self.tokenizer.decode(outs[i], skip_special_tokens=True),
                           finish_reason=finish[i] or "length", logprobs=tuple(logps[i]))
                for i in range(len(prompts))]
