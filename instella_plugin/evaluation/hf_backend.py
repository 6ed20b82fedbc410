"""A Hugging Face model directory as an evaluation backend (transformers, for comparison and checks).

Loads the directory with ``AutoModelForCausalLM`` (the Instella classes are registered by
``instella_plugin.hf``) and its tokenizer. Log-likelihoods come from one right-padded forward per
batch (causal attention: padding after a row never reaches its scores); generation uses
``model.generate``, greedy in left-padded batches, sampled prompt by prompt after seeding torch
with ``SamplingParams.seed`` (+ the prompt's position), so a sample does not depend on its batch or rank.
Data-parallel ranks are those of the default process group, when one is initialised.
"""
import os
from typing import List, Sequence, Tuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import instella_plugin.hf  # noqa: F401  (registers the Instella classes with the Auto factories)
from instella_plugin.evaluation.backend import model_inputs, score_pairs, torch_dp_group
from instella_plugin.inference.api import Completion, Prompt, SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFBackend:
    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 8, device: str = None,
                 max_length: int = None):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"--hf {path}: no config.json there; give a Hugging Face model directory "
                                    "(`instella convert` writes one from a Megatron checkpoint)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        rows = AutoConfig.from_pretrained(path).vocab_size
        if len(self.tokenizer) > rows:
            raise ValueError(f"--hf {path}: the tokenizer has {len(self.tokenizer)} ids but the model only {rows} "
                             "embedding rows; the directory's tokenizer files do not belong to its weights")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(self.device).eval()
        self.max_length = int(max_length or getattr(self.model.config, "max_position_embeddings", 2048))
        self.batch_size = batch_size
        self.dp_rank, self.dp_size, self.gather = torch_dp_group()
        self.description = {"backend": "hf", "path": os.path.abspath(path), "dtype": dtype,
                            "dp": self.dp_size}

    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        inputs, conts = model_inputs(pairs, self.max_length)
        width = max(len(x) for x in inputs)
        pad = self.tokenizer.pad_token_id or 0
        batch = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=self.device)
        logits = self.model(input_ids=batch, use_cache=False).logits
        return score_pairs(logits, inputs, conts)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> List[Completion]:
        ids = [list(p) if not isinstance(p, str) else self.tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts]
        if params.greedy:
            return self._generate(ids, params, None)
        return [c for k, one in enumerate(ids) for c in self._generate([one], params, params.seed + k)]

    def _generate(self, ids, params: SamplingParams, seed=None) -> List[Completion]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(x) for x in ids)
        batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad,
                      eos_token_id=self.tokenizer.eos_token_id if params.stop_at_eos else None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                          top_p=params.top_p)
            torch.manual_seed(seed)  # transformers samples from the global generator
        out = self.model.generate(input_ids=batch, attention_mask=mask, **kwargs)
        completions = []
        for row, prompt in zip(out[:, width:].tolist(), ids):
            tokens, reason = [], "length"
            for t in row:
                if params.stop_at_eos and t == self.tokenizer.eos_token_id:
                    reason = "eos"
                    break
                tokens.append(t)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if reason == "length" and any(s in text for s in params.stop):
                reason = "stop"
            completions.append(Completion(tuple(prompt), tuple(tokens), text, reason))
        return completions
