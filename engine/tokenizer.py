"""Tokenizer wrapper: encoding, chat templates (jinja2, as HF renders them), and streaming
detokenization that never emits a broken UTF-8 sequence."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from stream_run.loaders import TokenizerData


class ChatTemplateError(ValueError):
    """The chat template failed to render (or raised via raise_exception)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


MAX_RENDER_ITEMS = 1_000_000  # range items and repeated characters/elements per render
MAX_EXPONENT = 4096


class _TemplateEnv(ImmutableSandboxedEnvironment):
    """HF's sandbox plus a bound on what one render may build: a model's template such as
    'x' * 10**8, range loops nested in range loops, or 10 ** 10 ** 10 held a server thread
    for minutes or took its memory. Renders run in worker threads: the budget is per thread."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._left = threading.local()
        self.globals["range"] = self._range

    def start_render(self) -> None:
        self._left.items = MAX_RENDER_ITEMS

    def _spend(self, n: int) -> None:
        left = getattr(self._left, "items", MAX_RENDER_ITEMS) - n
        if left < 0:
            raise SecurityError(f"the chat template builds more than {MAX_RENDER_ITEMS} "
                                "items in one render")
        self._left.items = left

    def _range(self, *args: int) -> range:
        r = safe_range(*args)
        self._spend(len(r))
        return r

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT \
                and isinstance(left, (int, float)) and abs(left) not in (0, 1):
            raise SecurityError(f"the chat template raises to the power {right}")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._spend(len(seq) * max(n, 0))
        return super().call_binop(context, operator, left, right)


class Tokenizer:
    def __init__(self, data: TokenizerData) -> None:
        self.data = data
        self.tok = data.tokenizer
        self.eos_token_ids = list(data.eos_token_ids)
        self._template = None
        if data.chat_template:
            env = self._env = _TemplateEnv(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None: json.dumps(
                x, ensure_ascii=False, indent=indent
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(data.chat_template)
            except jinja2.TemplateError as exc:
                raise ChatTemplateError(f"chat template does not parse: {exc}") from None
            except RecursionError:  # jinja's parser recurses per nesting level
                raise ChatTemplateError("chat template does not parse: nested too "
                                        "deeply") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encode text; special tokens written in the text (e.g. <|im_start|>) are honoured."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.data.add_bos_token
        bos = self.bos_token_id
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    @property
    def bos_token_id(self) -> int | None:
        return None if self.data.bos_token is None else self.tok.token_to_id(self.data.bos_token)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages with the model's chat template; tools (when given) are the
        template's `tools` variable.

        Raises:
            ChatTemplateError: no template, or the template failed to render.
        """
        if self._template is None:
            raise ChatTemplateError("the model has no chat template")
        self._env.start_render()
        try:
            extra = {} if tools is None else {"tools": list(tools)}
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.data.bos_token or "", eos_token=self.data.eos_token or "",
                **extra,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from None
        except Exception as exc:  # the template's own Python errors: 1/0, 'a' + 1, recursion
            raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: "
                                    f"{exc}") from None

    def detokenizer(self, skip_special: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special)


class StreamingDetokenizer:
    """Turns a growing id sequence into text deltas, holding back incomplete UTF-8.

    Decodes a short window of ids (from the last emitted boundary) so the cost per token stays
    constant, and emits text only when it does not end in U+FFFD (a partial multi-byte char).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tok = tokenizer.tok
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str:
        """Append one id; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]
