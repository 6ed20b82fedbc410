"""A Hugging Face tokenizer seen through the interface megatron-core's inference controller calls.

The controller tokenizes (``tokenize``), detokenizes (``detokenize``, ``offsets``) and ends rows at
``eod``; its prompt path strips a leading ``bos``. Instella's ids: EOS = BOS = 0 (``<|endoftext|>``).
"""
from typing import List, Sequence


class MegatronTokenizerAdapter:
    """``tokenize``/``detokenize``/``offsets``/``eod``/``bos`` over a ``transformers`` tokenizer."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eod = hf_tokenizer.eos_token_id
        self.bos = hf_tokenizer.bos_token_id
        if self.eod is None:
            raise ValueError("the tokenizer has no EOS token; generation needs one to end a sequence")

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def tokenize(self, text: str) -> List[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def detokenize(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def offsets(self, tokens: Sequence[int], text: str) -> List[int]:
        """Start offset in ``text`` of each token (decoded prefix lengths)."""
        return [len(self.detokenize(tokens[:i])) for i in range(len(tokens))]
