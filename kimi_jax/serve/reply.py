"""The assistant's reply read out of generated ids, whole (`read_reply`) or streamed (`ReplyStream`), as the
parts an OpenAI chat response has: `reasoning_content`, `content` and `tool_calls`.

Both readers see the reply behind the generation prompt's last tokens (`<think>` when thinking is on,
`<think></think>` when it is off), so a reply cut off before `</think>` is reasoning, and both end where the
engine's text ends: a stop string cuts the reply there even when the token that completed it ran on.
`ReplyStream` mirrors `kimi_jax.chat_parse.parse_output` one token at a time, so concatenating its deltas
gives what `read_reply` gives. Malformed tool-call markup is not an error for the client: the section that
does not parse is sent as raw text in the content (the calls before it in that section stay calls).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

from kimi_jax.chat_parse import (
    CALL_END, SECTION_BEGIN, SECTION_END, THINK_CLOSE, THINK_OPEN, ChatFormatError, parse_output,
)
from kimi_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Reply:
    reasoning: str | None
    content: str
    tool_calls: list[dict[str, Any]]     # OpenAI form: {"id", "type": "function", "function": {"name", "arguments"}}
    parse_error: str | None = None      # why parse_output refused the reply (malformed section sent as text)


def reply_prefix(prompt: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """The end of the generation prompt that the reply continues: [<think>], [<think>, </think>] or []."""
    open_id, close_id = tokenizer.special_ids.get(THINK_OPEN), tokenizer.special_ids.get(THINK_CLOSE)
    tail = list(prompt[-2:])
    if open_id is not None and tail[-1:] == [open_id]:
        return [open_id]
    if open_id is not None and tail == [open_id, close_id]:
        return [open_id, close_id]
    return []


def read_reply(prompt: Sequence[int], ids: Sequence[int], text: str, tokenizer: Tokenizer,
               stop_ids: Sequence[int] = ()) -> Reply:
    """The whole reply: `ids` as generated (a final stop id included), `text` the engine's text of them.
    Read by `parse_output`; if the tool-call markup is malformed, what the stream would have sent instead
    (reasoning and content as far as they parse, the malformed section as raw text in the content)."""
    cut = _cut_to_text(ids, text, tokenizer)
    if cut and cut[-1] in stop_ids:
        cut = cut[:-1]
    try:
        parsed = parse_output(reply_prefix(prompt, tokenizer) + cut, tokenizer)
    except ChatFormatError as e:
        stream = ReplyStream(prompt, tokenizer, stop_ids)
        deltas = stream.feed(ids, text) + stream.finish()
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        calls = [{k: v for k, v in d["tool_calls"][0].items() if k != "index"} for d in deltas if "tool_calls" in d]
        return Reply(reasoning or None, "".join(d.get("content", "") for d in deltas), calls, parse_error=str(e))
    return Reply(parsed.reasoning or None, parsed.content, parsed.to_message().get("tool_calls", []))


def _cut_to_text(ids: Sequence[int], text: str, tokenizer: Tokenizer) -> list[int]:
    """Ids whose text (specials skipped) is `text`: the longest prefix of `ids` that fits within it, plus the
    rest of `text` encoded again (a stop string can end inside the token that completed it)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars, fit, fit_chars = 0, 0, 0
    for j, token_id in enumerate(ids, 1):
        if not tokenizer.is_special(token_id):
            chars += len(utf8.decode(tokenizer.token_bytes(token_id)))
        if chars > len(text):
            break
        if not utf8.getstate()[0]:  # no character left half decoded
            fit, fit_chars = j, chars
    return [int(t) for t in ids[:fit]] + tokenizer.encode(text[fit_chars:])


class ReplyStream:
    """Reads a reply as it streams. `feed(event.token_ids, event.text)` returns the deltas that are now
    certain (OpenAI chunk `delta` dicts); `finish()` returns the rest. The engine's text is the budget:
    a delta is released only once the engine has released the characters it covers, so text a stop string
    may still claim is held back here too."""

    def __init__(self, prompt: Sequence[int], tokenizer: Tokenizer, stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._stops = set(stop_ids) | set(tokenizer.stop_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._mode = "content"            # "reasoning", "content", "section" (tool calls) or "raw" (malformed)
        self._think_closed = False
        self._section: list[tuple[int, str, int]] = []  # (id, text or special name, characters of engine text)
        self._section_sent = 0            # entries of `_section` already queued (as calls)
        self._sent_calls = 0              # tool calls of the current section already queued
        self._pending: collections.deque = collections.deque()  # [kind, value, characters of engine text]
        self._budget = 0                  # engine characters released but not yet spent on deltas
        self._done = False
        self.tool_calls = 0
        for token_id in reply_prefix(prompt, tokenizer):
            self._feed(token_id)

    def feed(self, token_ids: Sequence[int], text: str) -> list[dict[str, Any]]:
        for token_id in token_ids:
            self._feed(int(token_id))
        self._budget += len(text)
        return self._release()

    def finish(self) -> list[dict[str, Any]]:
        if not self._done:
            tail = self._utf8.decode(b"", final=True)
            if tail:
                self._text(tail)
        if self._mode == "section":  # never closed: parse_output would refuse the whole reply
            self._break_section()
        self._done = True
        return self._release()

    # ----------------------------------------------------------------------------------------- reading

    def _feed(self, token_id: int) -> None:
        if self._done:
            return
        name = self.tokenizer.special_names.get(token_id)
        if name is None:
            self._text(self._utf8.decode(self.tokenizer.token_bytes(token_id)), token_id)
        elif token_id in self._stops:
            self._done = True
        elif self._mode == "section":
            self._section.append((token_id, name, 0))
            if name in (CALL_END, SECTION_END):
                self._read_section(closed=name == SECTION_END)
        elif self._mode == "reasoning":
            if name == THINK_CLOSE:
                self._mode, self._think_closed = "content", True
            else:
                self._queue("reasoning", name, 0)
        elif name == THINK_OPEN and not self._think_closed and self._mode == "content":
            self._mode = "reasoning"
        elif name == THINK_CLOSE and not self._think_closed and self._mode == "content":
            self._think_closed = True
        elif name == SECTION_BEGIN and self._mode == "content":
            self._mode, self._section, self._section_sent, self._sent_calls = "section", [(token_id, name, 0)], 0, 0
        else:
            self._queue("content", name, 0)

    def _text(self, text: str, token_id: int = -1) -> None:
        if self._mode == "section":
            self._section.append((token_id, text, len(text)))
        else:
            self._queue("reasoning" if self._mode == "reasoning" else "content", text, len(text))

    def _read_section(self, closed: bool) -> None:
        """At each <|tool_call_end|> (and the section's end), queue the calls completed since the last one."""
        ids = [t for t, _, _ in self._section] + ([] if closed else [self.tokenizer.special_ids[SECTION_END]])
        try:
            calls = parse_output(ids, self.tokenizer).to_message().get("tool_calls", [])
        except ChatFormatError:
            return self._break_section()
        cost = sum(c for _, _, c in self._section[self._section_sent:])
        self._section_sent = len(self._section)
        for call in calls[self._sent_calls:]:
            self._queue("tool_call", call, cost)
            cost = 0
        self._queue("skip", None, cost)
        self._sent_calls = len(calls)
        if closed:
            self._mode = "content"

    def _break_section(self) -> None:
        """Malformed tool-call markup: the part of the section not yet sent as calls goes out as raw text."""
        for _, text, cost in self._section[self._section_sent:]:
            self._queue("content", text, cost)
        self._mode = "raw"

    # ---------------------------------------------------------------------------------------- releasing

    def _queue(self, kind: str, value, cost: int) -> None:
        if not value and not cost:
            return
        self._pending.append([kind, value, cost])

    def _release(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []

        def text(kind: str, value: str) -> None:
            key = "reasoning_content" if kind == "reasoning" else "content"
            if deltas and list(deltas[-1]) == [key]:
                deltas[-1][key] += value
            else:
                deltas.append({key: value})

        while self._pending:
            kind, value, cost = self._pending[0]
            if cost > self._budget:
                if kind in ("reasoning", "content") and self._budget:  # text costs one per character
                    text(kind, value[:self._budget])
                    self._pending[0] = [kind, value[self._budget:], cost - self._budget]
                    self._budget = 0
                break
            self._pending.popleft()
            self._budget -= cost
            if kind == "tool_call":
                deltas.append({"tool_calls": [{"index": self.tool_calls, **value}]})
                self.tool_calls += 1
            elif kind != "skip":
                text(kind, value)
        return deltas

