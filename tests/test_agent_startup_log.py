"""Parsed model parameters: llama-server's startup log lines and its /props and /v1/models answers.

Covers, on lines and JSON captured from the real llama-server built from llama-cpp-python 0.3.36's vendored
llama.cpp (tiny chat model) and on the seed's captures from newer upstream builds:
- default verbosity: slots and per-slot context from the `initializing, n_slots = …, n_ctx_slot = …` line;
- `-lv 4`: the `print_info:` metadata block (ints, floats, names with spaces) and `llama_context` batch sizes;
- newer upstream spellings (`initializing slots`, `new slot, n_ctx`, the `n_ctx_train (…)` warning), with a
  `print_info:` value winning over the warning's and the first value winning otherwise;
- colour codes stripped; unrelated lines ignored; the fake llama-server's lines;
- /props and /v1/models: the fields kept, odd or missing answers tolerated, merge order.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamesh_agent import introspect, startup_log

# llama-server -m chat.gguf -c 0 --fit off (default verbosity)
REAL_DEFAULT = """\
0.00.000.972 I srv  llama_server: initializing ...
0.00.002.247 I cmn  common_param: common_params_print_info: verbosity = 3 (adjust with the `-lv N` CLI arg)
0.00.004.217 I srv    load_model: loading model 'chat.gguf'
0.00.006.784 I cmn          init: llama threadpool init, n_threads = 2
0.00.007.641 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 2048, kv_unified = 'true'
0.00.009.381 I srv  llama_server: model loaded
0.00.009.385 I srv  llama_server: listening on http://127.0.0.1:18555
""".splitlines()

# llama-server -m chat.gguf -c 512 -np 2 --fit off
REAL_SMALL_CONTEXT = """\
0.00.003.645 I srv    load_model: loading model 'chat.gguf'
0.00.007.094 I srv    load_model: initializing, n_slots = 2, n_ctx_slot = 256, kv_unified = 'false'
0.00.008.707 I srv  llama_server: model loaded
""".splitlines()

# llama-server -m chat.gguf -c 0 --fit off -lv 4 (an excerpt)
REAL_VERBOSE = """\
0.00.004.256 I print_info: file format = GGUF V3 (latest)
0.00.004.257 I print_info: file type   = all F32
0.00.004.259 I print_info: file size   = 0.44 MiB (32.00 BPW) \n\
0.00.004.517 I print_info: arch                  = llama
0.00.004.518 I print_info: n_ctx_train           = 2048
0.00.004.518 I print_info: n_embd_inp            = 64
0.00.004.518 I print_info: n_embd                = 64
0.00.004.519 I print_info: n_layer               = 2
0.00.004.523 I print_info: n_head                = 4
0.00.004.524 I print_info: n_head_kv             = 4
0.00.004.534 I print_info: n_ff                  = 128
0.00.004.535 I print_info: rope type             = 0
0.00.004.536 I print_info: freq_base_train       = 10000.0
0.00.004.537 I print_info: n_ctx_orig_yarn       = 2048
0.00.004.537 I print_info: model type            = ?B
0.00.004.538 I print_info: model params          = 115.39 K
0.00.004.538 I print_info: general.name          = llamesh tiny chat
0.00.004.541 I print_info: vocab type            = SPM
0.00.004.542 I print_info: n_vocab               = 259
0.00.005.050 I llama_context: n_seq_max             = 4
0.00.005.050 I llama_context: n_ctx                 = 2048
0.00.005.051 I llama_context: n_batch               = 2048
0.00.005.051 I llama_context: n_ubatch              = 512
0.00.007.339 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 2048, kv_unified = 'true'
0.00.007.376 I slot   load_model: id  0 | task -1 | new slot, n_ctx = 2048
0.00.007.380 I slot   load_model: id  1 | task -1 | new slot, n_ctx = 2048
""".splitlines()

# Newer upstream builds (the seed's captures, build ~9425).
UPSTREAM = [
    "0.04.710.907 W llama_context: n_ctx_seq (4096) < n_ctx_train (131072) -- the full capacity of the model will "
    "not be utilized",
    "0.04.730.906 I srv    load_model: initializing slots, n_slots = 4",
    "0.04.789.423 I slot   load_model: id  0 | task -1 | new slot, n_ctx = 4096",
    "0.04.789.437 I slot   load_model: id  1 | task -1 | new slot, n_ctx = 4096",
]

# The real /props (trimmed) and /v1/models of the default run above.
REAL_PROPS = json.loads(
    '{"default_generation_settings":{"params":{"seed":4294967295,"n_predict":-1},"n_ctx":2048},"total_slots":4,'
    '"model_alias":"chat.gguf","model_path":"chat.gguf","build_info":"b1-0c1e570","is_sleeping":false}'
)
REAL_MODELS = json.loads(
    '{"models":[{"name":"chat.gguf","model":"chat.gguf"}],"object":"list","data":[{"id":"chat.gguf","aliases":'
    '["chat.gguf"],"object":"model","owned_by":"llamacpp","meta":{"vocab_type":1,"n_vocab":259,"n_ctx":2048,'
    '"n_ctx_train":2048,"n_embd":64,"n_params":115392,"size":461568,"ftype":"all F32"}}]}'
)


def test_default_verbosity_gives_slots_and_per_slot_context() -> None:
    assert startup_log.parse(REAL_DEFAULT) == {"n_slots": 4, "n_ctx": 2048}


def test_reduced_context_is_per_slot() -> None:
    assert startup_log.parse(REAL_SMALL_CONTEXT) == {"n_slots": 2, "n_ctx": 256}


def test_verbose_block() -> None:
    assert startup_log.parse(REAL_VERBOSE) == {
        "file_type": "all F32",
        "arch": "llama",
        "n_ctx_train": 2048,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_head_kv": 4,
        "n_ff": 128,
        "rope_type": "0",
        "freq_base_train": 10000.0,
        "n_ctx_orig_yarn": 2048,
        "model_type": "?B",
        "model_params": "115.39 K",
        "model_name": "llamesh tiny chat",
        "n_vocab": 259,
        "n_batch": 2048,
        "n_ubatch": 512,
        "n_slots": 4,
        "n_ctx": 2048,
    }


def test_newer_upstream_spellings() -> None:
    assert startup_log.parse(UPSTREAM) == {"n_ctx_train": 131072, "n_slots": 4, "n_ctx": 4096}


def test_print_info_wins_over_the_warning_in_either_order() -> None:
    lines = ["I print_info: n_ctx_train           = 8192", UPSTREAM[0]]
    assert startup_log.parse(lines)["n_ctx_train"] == 8192
    assert startup_log.parse(list(reversed(lines)))["n_ctx_train"] == 8192


def test_first_value_wins() -> None:
    lines = ["new slot, n_ctx = 100", "new slot, n_ctx = 200", "initializing slots, n_slots = 3"]
    lines.append("initializing slots, n_slots = 9")
    assert startup_log.parse(lines) == {"n_ctx": 100, "n_slots": 3}


def test_colour_codes_and_unrelated_lines() -> None:
    lines = ["\x1b[32m0.00.007 I srv load_model: initializing, n_slots = 1, n_ctx_slot = 512\x1b[0m", "junk = 5"]
    lines += ["print_info: n_head = [32, 32, 8]", "print_info: freq_base_train = n/a"]
    assert startup_log.parse(lines) == {"n_slots": 1, "n_ctx": 512}


def test_incremental_parser_reports_as_it_goes() -> None:
    parser = startup_log.LogParser()
    parser.feed(REAL_VERBOSE[4])
    assert parser.params == {"n_ctx_train": 2048}
    parser.feed(REAL_DEFAULT[4])
    assert parser.params == {"n_ctx_train": 2048, "n_slots": 4, "n_ctx": 2048}


def test_fake_llama_server_lines() -> None:
    fake = [
        "0.00.001.000 I print_info: n_ctx_train           = 4096",
        "0.00.001.100 I srv    load_model: initializing, n_slots = 2, n_ctx_slot = 1024, kv_unified = 'false'",
    ]
    assert startup_log.parse(fake) == {"n_ctx_train": 4096, "n_slots": 2, "n_ctx": 1024}


# --- /props and /v1/models -------------------------------------------------------------------------


def test_props_and_models_of_the_real_server() -> None:
    assert introspect.params_from_props(REAL_PROPS) == {"n_slots": 4, "n_ctx": 2048}
    assert introspect.build_info_from_props(REAL_PROPS) == "b1-0c1e570"
    assert introspect.params_from_models(REAL_MODELS) == {
        "n_ctx_train": 2048,
        "n_vocab": 259,
        "n_embd": 64,
        "n_params": 115392,
    }


@pytest.mark.parametrize(
    "document",
    [None, [], "ok", {"total_slots": "4"}, {"total_slots": True}, {"default_generation_settings": []}, {"data": {}}],
)
def test_odd_answers_give_nothing(document: Any) -> None:
    assert introspect.params_from_props(document) == {}
    assert introspect.params_from_models(document) == {}
    assert introspect.build_info_from_props(document) is None


def test_merge_later_sources_win() -> None:
    log_params = startup_log.parse(REAL_VERBOSE)
    merged = introspect.merge(log_params, {"n_ctx": 1024, "n_slots": 8})
    assert merged["n_ctx"] == 1024 and merged["n_slots"] == 8 and merged["arch"] == "llama"
