"""Constrained sampling: a JSON-object recognizer that the sampler asks which token may come next
(response_format {"type": "json_object"}).

The recognizer is a byte-level pushdown automaton for RFC 8259 JSON whose top level is an
object. A token is allowed when its bytes keep the text a prefix of such a document; special
tokens never are; the end-of-sequence token is forced once the object closes. Whitespace
between tokens is bounded (MAX_WS bytes in a row) so a model cannot pad for ever.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_WS = 16
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")

# modes
_START, _VALUE, _KEY_OR_END, _KEY, _COLON, _AFTER, _VALUE_OR_END = range(7)
_STR, _ESC, _UNI, _NUM, _LIT, _DONE = range(7, 13)
# number sub-states: where in -?int(.frac)?([eE][+-]?exp)? the last byte left us
_N_SIGN, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(8)
_N_ENDS = (_N_ZERO, _N_INT, _N_FRAC, _N_EXP)  # a number may end here

State = tuple  # (mode, stack: str of "{" / "[", aux, key: bool, ws: int)


def _step(state: State, b: int) -> State | None:
    """The state after byte b, or None when b cannot come next."""
    mode, stack, aux, key, ws = state
    if mode == _STR:
        if b == 0x22:  # closing quote
            return (_COLON, stack, 0, False, 0) if key else (_AFTER, stack, 0, False, 0)
        if b == 0x5C:
            return (_ESC, stack, 0, key, 0)
        return None if b < 0x20 else state
    if mode == _ESC:
        if b == ord("u"):
            return (_UNI, stack, 4, key, 0)
        return (_STR, stack, 0, key, 0) if b in b'"\\/bfnrt' else None
    if mode == _UNI:
        if b not in _HEX:
            return None
        return (_STR, stack, 0, key, 0) if aux == 1 else (_UNI, stack, aux - 1, key, 0)
    if mode == _LIT:  # aux: the bytes of the literal still to come
        if b != aux[0]:
            return None
        return (_LIT, stack, aux[1:], False, 0) if len(aux) > 1 else (_AFTER, stack, 0, False, 0)
    if mode == _NUM:
        nxt = _number(aux, b)
        if nxt is not None:
            return (_NUM, stack, nxt, False, 0)
        if aux not in _N_ENDS:
            return None
        mode = _AFTER  # the number ended: b is what follows it
    if b in _WS:
        if mode == _STR or ws >= MAX_WS:
            return None
        return (mode, stack, aux, key, ws + 1)
    if mode == _START:
        return (_KEY_OR_END, "{", 0, False, 0) if b == ord("{") else None
    if mode == _DONE:
        return None
    if mode in (_KEY_OR_END, _KEY):
        if b == 0x22:
            return (_STR, stack, 0, True, 0)
        if b == ord("}") and mode == _KEY_OR_END:
            return _close(stack)
        return None
    if mode == _COLON:
        return (_VALUE, stack, 0, False, 0) if b == ord(":") else None
    if mode == _AFTER:
        if b == ord(","):
            return (_KEY, stack, 0, False, 0) if stack[-1] == "{" else (_VALUE, stack, 0,
                                                                         False, 0)
        if b == ord("}" if stack[-1] == "{" else "]"):
            return _close(stack)
        return None
    if mode == _VALUE_OR_END and b == ord("]"):
        return _close(stack)
    return _value(stack, b)  # _VALUE, _VALUE_OR_END


def _close(stack: str) -> State:
    stack = stack[:-1]
    return (_AFTER, stack, 0, False, 0) if stack else (_DONE, "", 0, False, 0)


def _value(stack: str, b: int) -> State | None:
    if b == ord("{"):
        return (_KEY_OR_END, stack + "{", 0, False, 0)
    if b == ord("["):
        return (_VALUE_OR_END, stack + "[", 0, False, 0)
    if b == 0x22:
        return (_STR, stack, 0, False, 0)
    for lit in (b"true", b"false", b"null"):
        if b == lit[0]:
            return (_LIT, stack, lit[1:], False, 0)
    if b == ord("-"):
        return (_NUM, stack, _N_SIGN, False, 0)
    if b in _DIGITS:
        return (_NUM, stack, _N_ZERO if b == ord("0") else _N_INT, False, 0)
    return None


def _number(sub: int, b: int) -> int | None:
    """The number sub-state after b, or None when b does not continue the number."""
    digit = b in _DIGITS
    if sub == _N_SIGN:
        return (_N_ZERO if b == ord("0") else _N_INT) if digit else None
    if sub in (_N_ZERO, _N_INT):
        if digit:
            return _N_INT if sub == _N_INT else None
        if b == ord("."):
            return _N_DOT
        return _N_E if b in b"eE" else None
    if sub in (_N_DOT, _N_FRAC):
        if digit:
            return _N_FRAC
        return _N_E if sub == _N_FRAC and b in b"eE" else None
    if sub in (_N_E, _N_ESIGN):
        if digit:
            return _N_EXP
        return _N_ESIGN if sub == _N_E and b in b"+-" else None
    return _N_EXP if digit else None  # _N_EXP


class JsonObjectConstraint:
    """Per request: which token may come next so the answer stays a JSON object.

    Args:
        token_bytes: each token id's bytes; None for a token that is never allowed (special
            tokens, whose text is not what the model means).
        eos_ids: the ids that end the answer (forced once the object is complete).
    """

    def __init__(self, token_bytes: Sequence[bytes | None], eos_ids: Sequence[int]) -> None:
        self.token_bytes = token_bytes
        self.eos_id = eos_ids[0] if eos_ids else None
        self.state: State = (_START, "", 0, False, 0)

    @property
    def complete(self) -> bool:
        return self.state[0] == _DONE

    def forced(self) -> int | None:
        """The token to emit regardless of the logits (EOS once the object has closed)."""
        return self.eos_id if self.complete else None

    def _run(self, token: int) -> State | None:
        raw = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
        if not raw:
            return None
        state: State | None = self.state
        for b in raw:
            state = _step(state, b)
            if state is None:
                return None
        return state

    def allows(self, token: int) -> bool:
        return self._run(token) is not None

    def advance(self, token: int) -> None:
        """Take a sampled token (one that allows() accepted, or the forced one)."""
        state = self._run(token)
        if state is not None:
            self.state = state
