"""The one seam between code that wants text and the things that produce it.

A generator is anything with ``generate(prompts, params) -> list[Completion]``: the megatron-core
engine on a checkpoint or on a live model, an OpenAI-compatible HTTP endpoint, or a scripted double
in tests. Prompts are text or token ids; completions carry both.
"""
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple, Union

Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. ``temperature == 0`` is greedy decoding."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0          # 0: no top-k filter
    top_p: float = 1.0      # 1.0: no nucleus filter
    seed: int = 1234
    stop: Tuple[str, ...] = ()   # generation ends after the first of these strings (kept in the text)
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a sequence of strings, got the string {self.stop!r} (use ({self.stop!r},))")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    """One continuation. ``tokens`` excludes the prompt; ``finish_reason`` is eos, stop or length."""
    prompt_tokens: Tuple[int, ...]
    tokens: Tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: Optional[Tuple[float, ...]] = None   # per generated token, when the generator has them


class TextGenerator(Protocol):
    """What every generator offers; ``tokenizer`` is the Hugging Face tokenizer its ids belong to."""
    tokenizer: object

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> List[Completion]:
        ...
