"""Tokenizer wrapper: encoding, chat templates (jinja2, as HF renders them), and streaming
detokenization that never emits a broken UTF-8 sequence."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stream_run.loaders import TokenizerData


class ChatTemplateError(ValueError):
    """The chat template failed to render (or raised via raise_exception)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(self, data: TokenizerData) -> None:
        self.data = data
        self.tok = data.tokenizer
        self.eos_token_ids = list(data.eos_token_ids)
        self._template = None
        if data.chat_template:
            env = ImmutableSandboxedEnvironment(
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
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render messages with the model's chat template.

        Raises:
            ChatTemplateError: no template, or the template failed to render.
        """
        if self._template is None:
            raise ChatTemplateError("the model has no chat template")
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.data.bos_token or "", eos_token=self.data.eos_token or "",
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
