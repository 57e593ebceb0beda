"""Language model with llama.cpp (llama-cpp-python): chat messages in, tokens out.

- Tokens stream to the client one by one as they are sampled.
- Cancel is checked before every token, so generation stops within one token.
- Each model instance keeps its KV cache between requests, and llama.cpp
  re-evaluates only the tokens after the longest common prefix with the last
  prompt; the system prompt is evaluated once at load, so every request starts
  from its cached state. ``stats.prompt_tokens_reused`` shows it.
- A conversation that does not fit the context (prompt + answer budget) loses
  its oldest turns, then the start of its last message; it never fails. The
  instance that served such a prompt is replaced by a fresh one when the job
  ends (:meth:`LlmEngine._renewed`): filling the context touches the pages
  llama.cpp allocated for it (KV cache, compute buffers), which it keeps for
  the instance's life otherwise: +130 MB for two instances at ``n_ctx``
  2048 (2-vCPU AMD EPYC), for good, after one oversized message.
- ``capacity`` instances are loaded (the weights are memory-mapped and shared),
  so jobs really run in parallel instead of queueing on one context.
- A ``prefill`` request only evaluates its messages into the cache of the
  instance that holds most of them already: the gateway sends one after
  trimming a conversation's history, so the next question does not wait for
  the trimmed history to be evaluated again.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import Llama

from stream.config import LlmSettings
from stream.protocol import ErrorCode, ProtocolError, WorkerKind
from stream.protocol.jobs import ChatMessage, LlmParams, LlmResult

from .engine import Engine
from .job import Job
from .model_files import ModelFile

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Used when a GGUF carries no chat template of its own."""

log = logging.getLogger("edgestream.worker")

_DONE = object()
PREFILL_CHUNK = 64
"""Tokens evaluated between checks for cancel while prefilling."""
PREFILL_WORTH_WAITING = 4
"""Tokens beyond what the best free instance holds that make a prefill worth waiting for."""


@dataclass
class _Filling:
    """A prefill in progress: the tokens its instance will hold, and how many it holds now."""

    tokens: list[int]
    evaluated: int
    """Advanced by the prefill's thread after each chunk (an int store: atomic under the GIL)."""

    def worth_waiting(self, prompt: list[int], have: int) -> bool:
        """Whether a request for ``prompt`` is answered sooner by waiting for this prefill than
        on an instance that holds ``have`` of its tokens: the prefill holds more of them, and
        has no more left to evaluate than the other instance would. (A tie waits: two
        evaluations at once on a small box each run at half speed.)"""
        gain = common_prefix(self.tokens, prompt) - have
        return gain >= PREFILL_WORTH_WAITING and len(self.tokens) - self.evaluated <= gain


def _to_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Hand ``callback`` to the event loop from a model thread; if the loop has closed
    (the worker is gone), nobody is waiting for it."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class ChatPrompt:
    """Renders chat messages to tokens with the model's own chat template.

    Only the template's own text may become control tokens: what a message
    says (the person's words, the camera's OCR text) is tokenized as plain
    text, so ``<|im_start|>system`` typed or shown to the camera is just
    characters, never a new turn of another role. The template is rendered
    with a placeholder per message, and the parts are tokenized apart.
    """

    def __init__(self, llm: Llama) -> None:
        self._llm = llm
        template = llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        self._bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        self._eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        self._warned = False

    def tokens(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        placeholders = [f"\x00{i}\x00" for i in range(len(messages))]  # contents are never rendered: no collision
        text = self._render([{"role": m.role, "content": p} for m, p in zip(messages, placeholders, strict=True)], add_generation_prompt)
        parts = re.split("\x00([0-9]+)\x00", text)
        if parts[1::2] != [str(i) for i in range(len(messages))]:
            # A template that transforms or drops content (``| trim``, ``| tojson``): render
            # the real text, and its control-token strings are read as control tokens.
            if not self._warned:
                log.warning("the chat template alters message content: messages are tokenized with the template")
                self._warned = True
            return self._text(self._render([m.model_dump() for m in messages], add_generation_prompt), special=True)
        tokens: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # a message's content
                tokens += self._text(messages[int(part)].content, special=False)
            elif part:  # the template's own text: its control tokens are real
                tokens += self._text(part, special=True)
        return tokens

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self._bos, eos_token=self._eos)

    def _text(self, text: str, special: bool) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)


class LlmEngine(Engine):
    kind = WorkerKind.LLM
    rate_unit = "tokens"

    def __init__(self, model: ModelFile, settings: LlmSettings) -> None:
        super().__init__(model)
        self.settings = settings
        self.system = ChatMessage(role="system", content=settings.system_prompt)
        # Tokenizing has an instance of its own (the vocabulary alone, ~0.1 s and a few MB),
        # so that a generating instance can be replaced while prompts are being tokenized.
        self._vocab = Llama(model_path=str(model.path), vocab_only=True, verbose=False)
        self._prompt = ChatPrompt(self._vocab)
        self._system_tokens = self._prompt.tokens([self.system], add_generation_prompt=False)
        self._instances: list[Llama] = [self._new_instance() for _ in range(settings.capacity)]
        self.n_ctx = self._instances[0].n_ctx()
        self._free: list[Llama] = list(self._instances)
        self._freed: asyncio.Event | None = None
        self._threads: set[threading.Thread] = set()
        self._filling: dict[int, _Filling] = {}
        """Prefills in progress, by job: their instances will hold these tokens soon."""

    def _new_instance(self) -> Llama:
        """A model instance with the system prompt evaluated: every request then starts from it."""
        llm = Llama(model_path=str(self.model.path), n_ctx=self.settings.n_ctx, n_threads=self.settings.threads, verbose=False)
        llm.eval(self._system_tokens)
        return llm

    def _renewed(self, llm: Llama) -> Llama:
        """A fresh instance in place of ``llm``, which is closed (in the model thread that used it).

        For an instance whose prompt filled the context: its KV cache and
        compute buffers are then resident for good, and a new context gives
        them back (the weights stay mapped). Measured on a 2-vCPU AMD EPYC:
        0.2 s, and the worker's RSS back within 2% of its start. What is lost
        is the cache of a prompt that had to be cut to fit, whose next
        version is cut differently anyway. If the new instance cannot be
        made, the old one stays.
        """
        started = time.perf_counter()
        try:
            fresh = self._new_instance()
        except Exception:
            log.exception("could not renew an LLM instance after a prompt that filled its context: it stays")
            return llm
        llm.close()
        log.info("LLM instance renewed after a prompt that filled its context (%.2f s)", time.perf_counter() - started)
        return fresh

    def _hand_back(self, used: Llama, instance: Llama) -> None:
        """``instance`` (``used``, or its renewal) is free again."""
        if instance is not used:
            self._instances[self._instances.index(used)] = instance
        self._release(instance)

    @property
    def idle_instances(self) -> int:
        """Model instances not generating right now (a cancelled job's thread returns its own)."""
        return len(self._free)

    async def _acquire(self, prompt: list[int]) -> Llama:
        """The free instance whose cache shares the longest prefix with ``prompt``.

        A conversation's next prompt extends its last one, so the instance that
        answered the last turn re-evaluates only the new tokens. An instance
        still prefilling this prompt's beginning (the question while it was
        spoken, a trimmed history) is waited for when that is quicker than
        evaluating the prompt elsewhere: when what it has left to evaluate is
        no more than what it would save.
        """
        if self._freed is None:
            self._freed = asyncio.Event()
        while True:
            best = max(self._free, key=lambda llm: cached_prefix(llm, prompt), default=None)
            have = cached_prefix(best, prompt) if best is not None else 0
            if best is not None and not any(f.worth_waiting(prompt, have) for f in self._filling.values()):
                self._free.remove(best)
                return best
            # Either nothing is free, or a prefill will be done sooner than this prompt
            # could be evaluated elsewhere (and waiting only makes it more so): wait for an
            # instance to come back.
            self._freed.clear()
            await self._freed.wait()

    def _release(self, llm: Llama) -> None:
        self._free.append(llm)
        if self._freed is not None:
            self._freed.set()

    def fit_to_context(self, messages: list[ChatMessage], max_tokens: int) -> tuple[list[int], int, int, int]:
        """Tokens of the prompt, the answer budget, how many messages were dropped, and how
        many tokens were cut from the start of the last one.

        Oldest turns go first (the system message and the last message stay);
        if the last message alone is still too long, its beginning is cut.
        Dropping is monotone, so the number to drop is found by bisection: a
        few renders, not one per turn.
        """
        system, *rest = self._with_system(messages)
        budget = min(max_tokens, self.n_ctx // 2)
        limit = self.n_ctx - budget

        def render(dropped: int) -> list[int]:
            return self._prompt.tokens([system, *rest[dropped:]])

        tokens = render(0)
        if len(tokens) <= limit:
            return tokens, min(max_tokens, self.n_ctx - len(tokens)), 0, 0
        low, high = 1, len(rest) - 1  # the last message always stays
        while low < high:
            middle = (low + high) // 2
            if len(render(middle)) <= limit:
                high = middle
            else:
                low = middle + 1
        dropped = min(low, len(rest) - 1) if rest else 0
        tokens = render(dropped)
        cut = 0
        if len(tokens) > limit:
            # One message alone is too long: keep its end, which holds the question.
            last = rest[-1]
            overhead = len(self._prompt.tokens([system, ChatMessage(role=last.role, content="")]))
            content = self._llm_tokenize(last.content)
            keep = max(limit - overhead - 8, 1)
            text = self._vocab.detokenize(content[-keep:]).decode("utf-8", errors="ignore")
            tokens = self._prompt.tokens([system, ChatMessage(role=last.role, content=text)])[-limit:]
            cut = max(0, len(content) - keep)
        return tokens, min(max_tokens, self.n_ctx - len(tokens)), dropped, cut

    def _with_system(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """``messages`` with this worker's system prompt first if they bring none."""
        return list(messages) if messages and messages[0].role == "system" else [self.system, *messages]

    def _llm_tokenize(self, text: str) -> list[int]:
        return self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    async def run(self, job: Job) -> None:
        params: LlmParams = job.params
        if params.prefill:
            await self._prefill(job, params)
            return
        loop = asyncio.get_running_loop()
        prompt, budget, dropped, cut = await loop.run_in_executor(None, self.fit_to_context, params.messages, params.max_tokens)
        if cut:
            job.stats["message_cut_tokens"] = cut  # said in the job's complete message; the gateway logs it
        if params.answer_prefix:
            # Continue an answer another worker began: its text follows the generation prompt.
            prompt = prompt + self._llm_tokenize(params.answer_prefix)
            budget = min(budget, self.n_ctx - len(prompt))
            if budget < 1:
                raise ProtocolError(ErrorCode.LIMIT, "the answer so far fills the context", job.job_id)
        llm = await self._acquire(prompt)
        job.stats.update(prompt_tokens=len(prompt), prompt_tokens_reused=cached_prefix(llm, prompt), dropped_messages=dropped)
        pieces: asyncio.Queue[Any] = asyncio.Queue()  # bounded by max_tokens (<= 4096)

        def put(item: Any) -> None:
            _to_loop(loop, pieces.put_nowait, item)

        def release(instance: Llama) -> None:
            _to_loop(loop, self._hand_back, llm, instance)

        renew = bool(dropped or cut)  # the prompt filled the context
        args = (llm, prompt, budget, params, job, put, release, renew)
        thread = threading.Thread(target=self._generate, args=args, name=f"llm-job-{job.job_id}", daemon=True)
        started = time.perf_counter()
        self._start_thread(thread, llm)
        tokens = 0
        while (item := await pieces.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            if tokens == 0:
                job.stats["ttft_s"] = round(time.perf_counter() - started, 4)
            tokens += 1
            await job.emit(LlmResult(text=item).model_dump())
        job.stats["tokens"] = tokens
        job.count(tokens, time.perf_counter() - started)

    def _generate(
        self,
        llm: Llama,
        prompt: list[int],
        budget: int,
        params: LlmParams,
        job: Job,
        put: Callable[[Any], None],
        release: Callable[[Llama], None],
        renew: bool,
    ) -> None:
        """Sample tokens in this thread until the end, the budget or a cancel; then hand the
        instance back (renewed first if ``renew``: :meth:`_renewed`)."""
        try:
            if params.seed is not None:
                llm.set_seed(params.seed)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            produced = 0
            for token in llm.generate(prompt, temp=params.temperature, top_p=params.top_p, top_k=40, repeat_penalty=1.1, reset=True):
                if job.cancel_event.is_set() or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    break
                put(decoder.decode(llm.detokenize([token], special=False)))
                produced += 1
                job.stats["generated"] = produced
                if produced >= budget:
                    job.stats["truncated"] = 1.0  # the answer did not end by itself
                    break
            tail = decoder.decode(b"", final=True)
            if tail:
                put(tail)
            put(_DONE)
        except BaseException as exc:  # handed to the event loop, which fails the job
            put(exc)
        finally:
            release(self._renewed(llm) if renew else llm)

    async def _prefill(self, job: Job, params: LlmParams) -> None:
        """Evaluate ``params.messages`` into the cache of the instance that holds most of them already.

        The request that extends them next (the conversation's next question)
        finds them cached there and starts at once. Evaluated in chunks of
        ``PREFILL_CHUNK`` tokens, with cancel checked in between.
        """
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(None, lambda: self._prompt.tokens(self._with_system(params.messages), add_generation_prompt=False))
        if len(tokens) > self.n_ctx // 2:
            job.stats["prefilled"] = 0
            return  # too long to be worth keeping: the next request will trim it anyway
        llm = await self._acquire(tokens)
        reused = cached_prefix(llm, tokens)
        done = loop.create_future()
        filling = self._filling[job.job_id] = _Filling(tokens, reused)

        def evaluate() -> None:
            try:
                llm.n_tokens = reused  # eval() drops the cache beyond this
                for start in range(reused, len(tokens), PREFILL_CHUNK):
                    if job.cancel_event.is_set():
                        break
                    llm.eval(tokens[start : start + PREFILL_CHUNK])
                    filling.evaluated = min(start + PREFILL_CHUNK, len(tokens))
                _to_loop(loop, _settle, done, None)
            except BaseException as exc:  # handed to the event loop, which fails the job
                _to_loop(loop, _settle, done, exc)
            finally:
                _to_loop(loop, self._release, llm)

        started = time.perf_counter()
        try:
            self._start_thread(threading.Thread(target=evaluate, name=f"llm-prefill-{job.job_id}", daemon=True), llm)
            await done
        finally:
            self._filling.pop(job.job_id, None)
        job.count(0, time.perf_counter() - started)
        job.stats.update(prompt_tokens=len(tokens), prompt_tokens_reused=reused, prefilled=len(tokens) - reused)

    def _start_thread(self, thread: threading.Thread, llm: Llama) -> None:
        """Start a thread that uses ``llm`` and hands it back; :meth:`close` waits for it (freeing a
        model under it crashes). If the thread cannot start, ``llm`` is handed back here."""
        self._threads = {t for t in self._threads if t.is_alive()}
        try:
            thread.start()
        except BaseException:
            self._release(llm)
            raise
        self._threads.add(thread)

    def close(self) -> None:
        # A cancelled job's thread stops at its next token or chunk: wait for it before freeing the model.
        for thread in list(self._threads):
            thread.join(timeout=10)
        for llm in self._instances:
            llm.close()
        self._vocab.close()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    same = np.asarray(a[:n]) == np.asarray(b[:n])
    return n if same.all() else int(np.argmin(same))


def cached_prefix(llm: Llama, prompt: list[int]) -> int:
    """How many leading tokens of ``prompt`` are already in ``llm``'s KV cache.

    llama.cpp always re-evaluates the last prompt token (it needs its logits),
    hence the ``- 1``, as in ``Llama.generate``.
    """
    cached = llm._input_ids[: llm.n_tokens]
    n = min(len(cached), len(prompt) - 1)
    if n <= 0:
        return 0
    same = cached[:n] == np.asarray(prompt[:n])
    return n if same.all() else int(np.argmin(same))
