"""Structured output: constraints compiled to llguidance grammars off the engine thread (cached
by constraint), one matcher per running request, and the step's allowed-token masks.

llguidance was chosen by measurement (bench/results/grammar_engines.md): a grammar is ready in
about a millisecond (it builds its lexer lazily), and filling a mask costs tens of µs a row.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

from packserve.scheduler import ScheduledSequence, StructuredOutput

CACHE_SIZE = 512  # compiled constraints kept (LRU); a matcher is a cheap copy of one


class GrammarError(ValueError):
    """A constraint that does not compile: an invalid schema, regex, grammar or choice list."""


def _json_grammar(schema: str | dict) -> str:
    # No free whitespace: a random or weak model could otherwise pad forever.
    return llguidance.LLMatcher.grammar_from_json_schema(schema, {"whitespace_flexible": False})


def _grammar_text(constraint: StructuredOutput) -> str:
    """The llguidance grammar for a constraint; raises ValueError on malformed specs."""
    kind, spec = constraint.kind, constraint.spec
    if kind == "json_object":
        return _json_grammar('{"type": "object"}')
    if kind == "json_schema":
        schema = json.loads(spec)
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")
        return _json_grammar(schema)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "grammar":  # Lark, or GBNF (converted)
        return llguidance.grammar_from("grammar", spec)
    if kind == "choice":
        choices = json.loads(spec)
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise ValueError("choice must be a non-empty list of strings")
        # Lark string literals take JSON's escapes.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in choices)
        )
    raise ValueError(f"unknown constraint kind {kind!r}")


class GrammarCompiler:
    """Compiles constraints on one worker thread and keeps the results (LRU by constraint).

    Thread-safe: the server asks for a compile at admission (to refuse bad specs with a 400),
    the engine thread picks the finished grammar up when the request is added.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Collection[int]
    ) -> None:
        self.vocab_size = vocab_size  # the model's logits width: masks cover it
        # The worker's own copy: a Hugging Face tokenizer is not safe to share between threads.
        self._tokenizer = copy.deepcopy(tokenizer)
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~1 s)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="packserve-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutput, Future[llguidance.LLMatcher]] = OrderedDict()

    def compile(self, constraint: StructuredOutput) -> Future[llguidance.LLMatcher]:
        """A future of the constraint's matcher in its start state (copy it per request); it
        fails with GrammarError if the constraint is invalid."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is None:
                future = self._pool.submit(self._compile, constraint)
                self._cache[constraint] = future
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(constraint)
            return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer,  # type: ignore[arg-type]  # a fast tokenizer
                n_vocab=self.vocab_size,
                eos_token=self._eos_token_ids,
            )
        try:
            grammar = _grammar_text(constraint)
            matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        except Exception as exc:  # whatever the spec's parsers raise, it is the spec's fault
            raise GrammarError(f"{type(exc).__name__}: {exc}") from None
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


class GrammarState:
    """The matchers of the running constrained requests; owned by the engine thread.

    A matcher advances only by tokens the scheduler emits as new (`advance`): a preempted
    request that recomputes never re-emits its earlier tokens, so nothing is advanced twice.
    """

    def __init__(self, vocab_size: int, tokenizer_vocab_size: int) -> None:
        self.vocab_size = vocab_size
        # Ids from here to vocab_size are the model's padding: never allowed.
        self._num_real = min(vocab_size, tokenizer_vocab_size)
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._bits = torch.arange(32, dtype=torch.int32)  # [32]

    def add(self, request_id: str, start: llguidance.LLMatcher) -> None:
        self._matchers[request_id] = start.deep_copy()

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def masks(self, segments: Iterable[ScheduledSequence]) -> dict[str, torch.Tensor]:
        """Allowed tokens for each constrained segment that samples: request_id -> bool [V]."""
        ids = [s.request_id for s in segments if s.sample and s.request_id in self._matchers]
        if not ids:
            return {}
        bitmask = llguidance.torch.allocate_token_bitmask(len(ids), self.vocab_size)  # [N, W]
        for row, request_id in enumerate(ids):
            llguidance.torch.fill_next_token_bitmask(self._matchers[request_id], bitmask, row)
        allowed = (bitmask.unsqueeze(-1) >> self._bits) & 1  # [N, W, 32]
        allowed = allowed.reshape(len(ids), -1)[:, : self.vocab_size].bool()  # [N, V]
        allowed[:, self._num_real :] = False
        return dict(zip(ids, allowed, strict=True))

    def advance(self, request_id: str, token_ids: Iterable[int]) -> str | None:
        """Feed a request's new tokens; returns None while the grammar goes on, "stop" once it
        is complete (only EOS could follow), "error" if a token broke it (a bug)."""
        matcher = self._matchers[request_id]
        for token in token_ids:
            if not matcher.consume_token(token):
                return "error"
        if matcher.is_stopped():
            return "error" if matcher.is_error() else "stop"
        return None
