"""Generators for synthesis: an OpenAI-compatible HTTP endpoint, and retries with backoff for any generator.

``OpenAIEndpoint`` implements the ``TextGenerator`` seam (``inference.api``) over ``/v1/completions``
(text prompts) or ``/v1/chat/completions`` (``chat=True``: each prompt sent as one user message), with
the standard library's HTTP client: vLLM, SGLang, TGI and hosted services all speak it. It has no
tokenizer, so completions carry text and empty token tuples.

``Retrying`` wraps any generator: a call that fails with a connection error, a timeout or a server
error (HTTP 5xx, 429) is retried after ``backoff_s``, doubling each time, ``retries`` times; then
``GeneratorUnavailable`` says what failed and what to check. Errors that retrying cannot fix (HTTP 4xx,
a malformed answer) are raised at once.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Callable, List, Optional, Sequence

from instella_plugin.inference.api import Completion, Prompt, SamplingParams

TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, urllib.error.URLError)


class GeneratorUnavailable(RuntimeError):
    """The generator did not answer after every retry."""


class TransientHTTPError(ConnectionError):
    """A server error worth retrying (HTTP 5xx or 429)."""


class OpenAIEndpoint:
    """``generate`` through an OpenAI-compatible server at ``base_url`` (e.g. ``http://host:8000/v1``)."""

    tokenizer = None

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, chat: bool = False,
                 timeout_s: float = 120.0):
        self.base_url, self.model, self.api_key, self.chat, self.timeout_s = base_url.rstrip("/"), model, api_key, chat, timeout_s

    @classmethod
    def from_flags(cls, base_url: str, model: str, *, api_key_env: Optional[str], chat: bool,
                   timeout_s: float) -> "OpenAIEndpoint":
        """The endpoint the synthesis commands' flags name; the API key read from ``api_key_env``."""
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            raise ValueError(f"--api-key-env {api_key_env}: that environment variable is not set")
        return cls(base_url, model, api_key=key, chat=chat, timeout_s=timeout_s)

    def describe(self) -> str:
        return f"openai-endpoint {self.base_url} model {self.model}"

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code >= 500 or exc.code == 429:
                raise TransientHTTPError(f"HTTP {exc.code} from {self.base_url + path}: {detail}") from exc
            raise ValueError(f"HTTP {exc.code} from {self.base_url + path}: {detail}") from exc

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> List[Completion]:
        out = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError("the endpoint generator takes text prompts")
            body = {"model": self.model, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, "seed": params.seed}
            if params.stop:
                body["stop"] = list(params.stop)
            if self.chat:
                body["messages"] = [{"role": "user", "content": prompt}]
                answer = self._post("/chat/completions", body)
            else:
                body["prompt"] = prompt
                answer = self._post("/completions", body)
            try:
                choice = answer["choices"][0]
                text = choice["message"]["content"] if self.chat else choice["text"]
            except (KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"{self.base_url}: not an OpenAI-compatible answer: {str(answer)[:300]}") from exc
            finish = {"stop": "stop", "length": "length"}.get(choice.get("finish_reason"), "stop")
            out.append(Completion(prompt_tokens=(), tokens=(), text=text or "", finish_reason=finish))
        return out


def check_one_process(command: str) -> None:
    """Generating from a Megatron checkpoint inside a synthesis command runs in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError(f"{command} with --load runs in one process; serve a larger model behind an "
                         "OpenAI-compatible endpoint and use --endpoint")


class Retrying:
    """Any generator, with retries and exponential backoff on transient failures."""

    def __init__(self, generator, retries: int = 4, backoff_s: float = 2.0, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] = print):
        self.generator, self.retries, self.backoff_s, self.sleep, self.log = generator, retries, backoff_s, sleep, log
        self.tokenizer = getattr(generator, "tokenizer", None)

    def describe(self) -> str:
        describe = getattr(self.generator, "describe", None)
        return describe() if describe else type(self.generator).__name__

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> List[Completion]:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return self.generator.generate(prompts, params)
            except TRANSIENT as exc:
                last = exc
                if attempt == self.retries:
                    break
                self.log(f"generator: {type(exc).__name__}: {exc}; retry {attempt + 1}/{self.retries} in {delay:.1f}s")
                self.sleep(delay)
                delay *= 2
        raise GeneratorUnavailable(
            f"{self.describe()} did not answer after {self.retries + 1} tries (last error: {type(last).__name__}: "
            f"{last}); check that it is up and reachable, or raise --retries/--timeout") from last
