"""Model parameters read from llama-server's startup log: context size, trained context, slots, metadata.

What a given llama.cpp build prints depends on its age and on `-lv`. At the default verbosity the build the
project tests against (llama.cpp vendored in llama-cpp-python 0.3.36) says only

    0.00.007.641 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 2048, kv_unified = 'true'

while newer upstream builds say `initializing slots, n_slots = 4` and `new slot, n_ctx = 2048`, and print the
trained context only inside the warning `n_ctx_seq (4096) < n_ctx_train (131072)`. With `-lv 4` (or on older
builds) the model-metadata block `print_info: <key> = <value>` appears too. Every spelling is accepted;
a `print_info:` value wins over a warning's, and the first value seen wins otherwise.

`n_ctx` is the context window one request gets (per slot), as the seed reports it. This module is pure:
lines in, a dict out. Reading the process's output and asking `/props` live elsewhere; callers merge.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PRINT_INFO = re.compile(r"print_info:\s+(\S(?:.*?\S)?)\s+=\s+(.*?)\s*$")
_LLAMA_CONTEXT = re.compile(r"llama_context:\s+(n_batch|n_ubatch)\s+=\s+(\d+)")
# "initializing, n_slots = 4, n_ctx_slot = 2048" (this build) and "initializing slots, n_slots = 4" (newer).
_INIT_SLOTS = re.compile(r"initializing(?: slots)?, n_slots = (\d+)(?:, n_ctx_slot = (\d+))?")
_NEW_SLOT = re.compile(r"new slot, n_ctx = (\d+)")
_CTX_TRAIN_WARNING = re.compile(r"n_ctx_train \((\d+)\)")

# print_info keys kept, and the name each gets in parsed_model_params (the seed's ParsedModelParams).
_INT_KEYS = {
    "n_ctx_train": "n_ctx_train",
    "n_layer": "n_layer",
    "n_embd": "n_embd",
    "n_head": "n_head",
    "n_head_kv": "n_head_kv",
    "n_vocab": "n_vocab",
    "n_ff": "n_ff",
    "n_ctx_orig_yarn": "n_ctx_orig_yarn",
}
_FLOAT_KEYS = {"freq_base_train": "freq_base_train"}
_TEXT_KEYS = {
    "arch": "arch",
    "general.name": "model_name",
    "model type": "model_type",
    "model params": "model_params",
    "file type": "file_type",
    "rope type": "rope_type",
}


class LogParser:
    """Fed one line at a time while llama-server starts; `params` is what was found so far."""

    def __init__(self) -> None:
        self._found: dict[str, Any] = {}
        self._from_warning: set[str] = set()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._found)

    def feed(self, line: str) -> None:
        line = _ANSI.sub("", line)
        if "print_info:" in line:
            self._print_info(line)
        if (match := _LLAMA_CONTEXT.search(line)) is not None:
            self._first(match[1], int(match[2]))
        if (match := _INIT_SLOTS.search(line)) is not None:
            self._first("n_slots", int(match[1]))
            if match[2] is not None:
                self._first("n_ctx", int(match[2]))
        if (match := _NEW_SLOT.search(line)) is not None:
            self._first("n_ctx", int(match[1]))
        if (match := _CTX_TRAIN_WARNING.search(line)) is not None and "n_ctx_train" not in self._found:
            self._found["n_ctx_train"] = int(match[1])
            self._from_warning.add("n_ctx_train")

    def _print_info(self, line: str) -> None:
        match = _PRINT_INFO.search(line)
        if match is None:
            return
        key, value = match[1], match[2]
        if key in _INT_KEYS:
            if value.isdigit():
                self._authoritative(_INT_KEYS[key], int(value))
        elif key in _FLOAT_KEYS:
            with contextlib.suppress(ValueError):
                self._authoritative(_FLOAT_KEYS[key], float(value))
        elif key in _TEXT_KEYS and value:
            self._authoritative(_TEXT_KEYS[key], value)

    def _first(self, name: str, value: Any) -> None:
        self._found.setdefault(name, value)

    def _authoritative(self, name: str, value: Any) -> None:
        if name not in self._found or name in self._from_warning:
            self._found[name] = value
            self._from_warning.discard(name)


def parse(lines: Iterable[str]) -> dict[str, Any]:
    """The parameters found in a whole startup log."""
    parser = LogParser()
    for line in lines:
        parser.feed(line)
    return parser.params
