"""The serving engine: continuous batching over a paged latent KV cache.

One scheduler thread owns the device state. Between decode steps it
- drops cancelled requests and returns their pages to the free list;
- admits waiting requests (first come, first served) into free batch slots when the free list holds the pages
  their prompt plus `max_tokens` can use (reserved up front, so a running request never waits for a page and
  nothing is ever preempted);
- prefills one chunk of one admitted prompt (long prompts take several steps, interleaved with decoding);
- runs one decode step for every slot that is generating, then streams each new token to its request.

Device programs (all compiled once): a decode step over all `max_batch` slots and a prefill chunk of one
sequence (the first chunk of a prompt runs the naive attention of `generate`'s prefill, later chunks attend
over the pages already written). The cache is donated to each, so pages are updated in place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import queue
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kimi_jax.cache import init_paged_cache
from kimi_jax.generate import sample_rows
from kimi_jax.model import KimiForCausalLM
from kimi_jax.views import split_layer_views

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8          # sequences decoded together (batch slots)
    page_size: int = 16         # latent rows per page
    max_context: int = 2048     # prompt + generated tokens of one request
    num_pages: int | None = None  # default: enough for every slot at max_context
    prefill_chunk: int = 256    # prompt tokens forwarded per prefill call
    max_queue: int = 256        # waiting requests before submit() refuses (QueueFull)
    batch_buckets: tuple[int, ...] | None = None  # decode batch sizes compiled; default 1, 2, 4, ..., max_batch

    def __post_init__(self):
        for name in ("max_batch", "page_size", "max_context", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context % self.page_size:
            raise ValueError(f"EngineConfig.max_context ({self.max_context}) must be a multiple of page_size "
                             f"({self.page_size})")
        if self.num_pages is not None and self.num_pages < self.pages_per_sequence:
            raise ValueError(f"EngineConfig.num_pages ({self.num_pages}) cannot hold one sequence of max_context "
                             f"{self.max_context} ({self.pages_per_sequence} pages)")

    @property
    def decode_batches(self) -> tuple[int, ...]:
        if self.batch_buckets is not None:
            return tuple(sorted({min(b, self.max_batch) for b in self.batch_buckets} | {self.max_batch}))
        return tuple(sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)}))

    @property
    def pages_per_sequence(self) -> int:
        return self.max_context // self.page_size

    @property
    def total_pages(self) -> int:
        return self.num_pages if self.num_pages is not None else self.max_batch * self.pages_per_sequence


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_tokens: int | None = None      # None: up to the context limit
    temperature: float = 0.0           # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None            # None: drawn by the engine
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs the engine's tokenizer


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; the caller should retry later (HTTP 429)."""


class RequestError(ValueError):
    """A request the engine can never serve as given (HTTP 400); the message names the field."""


@dataclasses.dataclass
class Event:
    """What one scheduler step produced for a request: new token ids and the text they complete (text that
    could still turn into a stop string is held back), and the finish reason on the last event."""
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None   # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    error: str | None = None


class RequestHandle:
    """A submitted request: iterate its events (blocking), `await` them (`async for ... in handle.stream()`),
    wait for the whole `result()`, or `cancel()` it."""

    def __init__(self, request_id: int, request: Request, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self.request = request
        self._loop = loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._finished = threading.Event()
        self.cancelled = False

    def _push(self, event: Event) -> None:  # scheduler thread
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening
                pass
        else:
            self._events.put(event)
        if event.finish_reason is not None:
            self._finished.set()

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this handle was submitted with an event loop: use `async for e in handle.stream()`")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def stream(self):
        if self._loop is None:
            raise TypeError("this handle was submitted without an event loop: iterate it directly")
        while True:
            event = await self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> Completion:
        ids, text, finish, error = [], [], None, None
        for event in self:
            ids += event.token_ids
            text.append(event.text)
            finish, error = event.finish_reason, event.error
        return Completion(ids, "".join(text), finish, len(self.request.prompt), error)


@dataclasses.dataclass
class _Sequence:
    handle: RequestHandle
    slot: int
    pages: list[int]
    seed: int
    prefilled: int = 0              # prompt tokens already in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    text: str = ""                  # decoded so far (when the engine has a tokenizer)
    sent_chars: int = 0             # of `text`, already streamed
    decoder: object = None

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt)


class Engine:
    """Serves many requests from one model. `submit()` from any thread; the scheduler runs in a background
    thread after `start()` (or call `step()` yourself). On a mesh, pass the model placed there
    (`kimi_jax.load(..., mesh=mesh)`) and the mesh; the page pool is replicated, parameters stay as placed."""

    def __init__(self, model: KimiForCausalLM, tokenizer=None, config: EngineConfig = EngineConfig(), *,
                 mesh=None, seed: int = 0):
        self.model, self.tokenizer, self.config, self.mesh = model, tokenizer, config, mesh
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self._graphdef, self._state = split_layer_views(model)
        self._prefill_fns, self._decode_fn = _programs(self._graphdef)
        self._decode_batches = config.decode_batches
        cache = init_paged_cache(cfg, config.total_pages, config.page_size, model.dtype)
        if mesh is not None:
            cache = jax.device_put(cache, NamedSharding(mesh, PartitionSpec()))
        self._cache = cache
        self._unused_page = config.total_pages  # one past the last page: writes there are dropped
        self._page_table = np.full((config.max_batch, config.pages_per_sequence), self._unused_page, np.int32)
        self.free_pages: list[int] = list(range(config.total_pages))[::-1]
        self._slots: list[_Sequence | None] = [None] * config.max_batch
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # ---------------------------------------------------------------------------------------------- requests

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queues a request; raises RequestError (never servable as given) or QueueFull. With `loop`, events
        are delivered into that asyncio loop (`handle.stream()`)."""
        self._validate(request)
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.config.max_queue})")
            handle = RequestHandle(next(self._ids), request, loop)
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def _validate(self, r: Request) -> None:
        n, limit = len(r.prompt), self.config.max_context
        if n == 0:
            raise RequestError("prompt: needs at least one token")
        if n >= limit:
            raise RequestError(f"prompt: {n} tokens leave no room to generate within the context limit of "
                               f"{limit} tokens")
        if any(not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size for t in r.prompt):
            raise RequestError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
        if r.max_tokens is not None and r.max_tokens < 1:
            raise RequestError(f"max_tokens: must be >= 1, got {r.max_tokens}")
        if not (math.isfinite(r.temperature) and r.temperature >= 0):
            raise RequestError(f"temperature: must be a finite number >= 0, got {r.temperature}")
        if not 0 <= r.top_k < 2**31:
            raise RequestError(f"top_k: must lie in [0, 2**31), got {r.top_k}")
        if r.seed is not None and not 0 <= r.seed < 2**32:
            raise RequestError(f"seed: must lie in [0, 2**32), got {r.seed}")
        if not 0 < r.top_p <= 1:
            raise RequestError(f"top_p: must lie in (0, 1], got {r.top_p}")
        if r.stop_strings and self.tokenizer is None:
            raise RequestError("stop: stop strings need an engine with a tokenizer")
        if self._pages_needed(r) > self.config.total_pages:
            raise RequestError(f"max_tokens: prompt + max_tokens need {self._pages_needed(r)} pages, the pool has "
                               f"{self.config.total_pages}")

    def _pages_needed(self, r: Request) -> int:
        limit = self.config.max_context
        tokens = limit if r.max_tokens is None else min(len(r.prompt) + r.max_tokens, limit)
        return -(-tokens // self.config.page_size)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Submits every request at once and waits for all (runs the scheduler here unless started)."""
        handles = [self.submit(r) for r in requests]
        if self._thread is None:
            while not all(h.done for h in handles):
                self.step()
        return [h.result() for h in handles]

    # --------------------------------------------------------------------------------------------- scheduler

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kimi-jax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stopping = False  # start() may run it again

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # a failed device step fails the requests in flight, not the server
                log.exception("engine step failed")
                for seq in [s for s in self._slots if s is not None]:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
        for seq in [s for s in self._slots if s is not None]:
            self._finish(seq, "cancelled")
        while self._waiting:
            self._waiting.popleft()._push(Event([], finish_reason="cancelled"))

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def step(self) -> None:
        """One scheduler iteration: retire cancelled, admit, prefill one chunk, decode one token per slot."""
        for seq in [s for s in self._slots if s is not None and s.handle.cancelled]:
            self._finish(seq, "cancelled")
        self._admit()
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            prefilling = [s for s in self._slots if s is not None and not s.decoding]
            if prefilling:
                self._prefill_chunk(min(prefilling, key=lambda s: s.handle.id))
            if any(s is not None and s.decoding for s in self._slots):
                self._decode()
        self.steps += 1

    def _admit(self) -> None:
        with self._lock:
            for handle in [h for h in self._waiting if h.cancelled]:  # cancelled while waiting: gone at once
                self._waiting.remove(handle)
                handle._push(Event([], finish_reason="cancelled"))
            while self._waiting and None in self._slots:
                handle = self._waiting[0]
                need = self._pages_needed(handle.request)
                if need > len(self.free_pages):
                    break  # first come, first served: later requests wait behind this one
                self._waiting.popleft()
                slot = self._slots.index(None)
                pages = [self.free_pages.pop() for _ in range(need)]
                seed = handle.request.seed if handle.request.seed is not None else int(self._seeds.integers(2**31))
                decoder = self.tokenizer.incremental_decoder(skip_special=True) if self.tokenizer else None
                self._slots[slot] = _Sequence(handle, slot, pages, seed, decoder=decoder)
                self._page_table[slot, :need] = pages

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        # Pages first, the slot last: `active` reaching 0 means every page is back (wait_idle relies on it).
        self.free_pages.extend(seq.pages)
        self._page_table[seq.slot] = self._unused_page
        self._slots[seq.slot] = None
        seq.handle._push(Event([], "", reason, error))

    # --------------------------------------------------------------------------------------- device programs

    def _sampling_args(self, seqs: list[_Sequence | None]):
        def column(get, dtype, idle):  # numpy: jit takes it as is (a jnp array would cost a dispatch each)
            return np.array([idle if s is None else get(s) for s in seqs], dtype)
        return (column(lambda s: s.request.temperature, np.float32, 0.0),
                column(lambda s: s.request.top_k, np.int32, 0),
                column(lambda s: s.request.top_p, np.float32, 1.0),
                column(lambda s: s.seed, np.uint32, 0),
                column(lambda s: len(s.generated), np.int32, 0))

    def _prefill_chunk(self, seq: _Sequence) -> None:
        C, prompt = self.config.prefill_chunk, seq.request.prompt
        start = seq.prefilled
        chunk = prompt[start:start + C]
        ids_1C = np.full((1, C), self.pad_id, np.int32)
        ids_1C[0, :len(chunk)] = chunk
        attend_cache = start > 0  # the first chunk attends among its own tokens, like generate's prefill
        token_1, self._cache = self._prefill_fns[attend_cache](
            self._state, self._cache, self._page_table[seq.slot:seq.slot + 1], ids_1C, np.int32(start),
            np.int32(len(chunk)), *self._sampling_args([seq]))
        seq.prefilled += len(chunk)
        if seq.decoding:
            self._emit(seq, int(token_1[0]))

    def _decode(self) -> None:
        decoding = [s if s is not None and s.decoding else None for s in self._slots]
        # Run the smallest compiled batch that holds the last generating slot: idle rows cost a full row each.
        last = max(i for i, s in enumerate(decoding) if s is not None)
        decoding = decoding[:min(b for b in self._decode_batches if b > last)]
        tokens_B = np.array([self.pad_id if s is None else s.generated[-1] for s in decoding], np.int32)
        positions_B = np.array([0 if s is None else len(s.request.prompt) + len(s.generated) - 1 for s in decoding],
                               np.int32)
        # Slots still prefilling own pages too: hide them so this step's idle rows write nothing there.
        page_table = np.where(np.array([s is not None for s in decoding])[:, None],
                              self._page_table[:len(decoding)], self._unused_page)
        next_B, self._cache = self._decode_fn(self._state, self._cache, page_table, tokens_B, positions_B,
                                              *self._sampling_args(decoding))
        next_B = np.asarray(next_B)
        for seq in decoding:
            if seq is not None:
                self._emit(seq, int(next_B[seq.slot]))

    # ------------------------------------------------------------------------------------------------ output

    def _emit(self, seq: _Sequence, token: int) -> None:
        r = seq.request
        seq.generated.append(token)
        if token in r.stop_ids:
            self._send(seq, [token], final=True)
            return self._finish(seq, "stop")
        if seq.decoder is not None:
            seq.text += seq.decoder.feed(token)
            for stop in r.stop_strings:
                at = seq.text.find(stop, max(seq.sent_chars - len(stop) + 1, 0))
                if at >= 0:
                    seq.text = seq.text[:at]
                    self._send(seq, [token], final=True)
                    return self._finish(seq, "stop")
        if len(seq.generated) == (r.max_tokens or math.inf) or len(r.prompt) + len(seq.generated) >= \
                self.config.max_context:
            if seq.decoder is not None:
                seq.text += seq.decoder.flush()
            self._send(seq, [token], final=True)
            return self._finish(seq, "length")
        self._send(seq, [token], final=False)

    def _send(self, seq: _Sequence, token_ids: list[int], final: bool) -> None:
        """Streams the token and the text that can no longer change: all of it at the end, otherwise all but
        the last len(longest stop string) - 1 characters, which a stop string may still claim."""
        hold = 0 if final else max((len(s) - 1 for s in seq.request.stop_strings), default=0)
        upto = max(len(seq.text) - hold, seq.sent_chars)
        text, seq.sent_chars = seq.text[seq.sent_chars:upto], upto
        seq.handle._push(Event(token_ids, text))  # when final, _finish follows with the reason


def _keys(seeds_B, counters_B):
    """One key per row from the request's seed and its token count: a request samples the same tokens whatever
    batch it shares."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_B, counters_B)


def _prefill_step(graphdef, attend_cache, state, cache, page_table_1P, ids_1C, start, length,
                  temperature_1, top_k_1, top_p_1, seeds_1, counters_1):
    model = nnx.merge(graphdef, state)
    positions_1C = start + jnp.arange(ids_1C.shape[1], dtype=jnp.int32)[None]
    out = model.forward(ids_1C, positions_1C, cache, attend_cache=attend_cache, logits_index_B=(length - 1)[None],
                        page_table_BP=page_table_1P)
    token_1 = sample_rows(out.logits_BTV[:, 0], _keys(seeds_1, counters_1), temperature_1, top_k_1, top_p_1)
    return token_1, out.cache


def _decode_step(graphdef, state, cache, page_table_BP, tokens_B, positions_B, temperature_B, top_k_B, top_p_B,
                 seeds_B, counters_B):
    model = nnx.merge(graphdef, state)
    out = model.forward(tokens_B[:, None], positions_B[:, None], cache, attend_cache=True,
                        page_table_BP=page_table_BP)
    next_B = sample_rows(out.logits_BTV[:, 0], _keys(seeds_B, counters_B), temperature_B, top_k_B, top_p_B)
    return next_B, out.cache


_PROGRAMS: dict = {}


def _programs(graphdef):
    """The jitted prefill (first chunk, later chunks) and decode step for one model structure, shared by
    engines of that structure. The graph definition is bound here, not passed as a static argument, so a step
    does not hash it."""
    if graphdef not in _PROGRAMS:
        _PROGRAMS.clear()  # one model structure at a time keeps compiled programs from piling up
        prefill = {a: jax.jit(functools.partial(_prefill_step, graphdef, a), donate_argnums=(1,))
                   for a in (False, True)}
        _PROGRAMS[graphdef] = prefill, jax.jit(functools.partial(_decode_step, graphdef), donate_argnums=(1,))
    return _PROGRAMS[graphdef]


def wait_idle(engine: Engine, timeout: float = 60.0) -> None:
    """Blocks until the engine has nothing running or waiting (tests, shutdown)."""
    deadline = time.monotonic() + timeout
    while engine.active or engine.waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine still has {engine.active} running and {engine.waiting} waiting requests")
        time.sleep(0.01)
