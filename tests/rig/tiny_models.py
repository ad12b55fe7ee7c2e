"""Tiny GGUF models with random weights that the real llama-server loads in seconds.

Three writers, one per kind of llama-server workload the project routes:
- `write_chat_model`: a 2-layer, 64-wide ``llama`` with a 259-token byte-fallback SPM vocabulary and a one-line
  chat template, for ``/v1/chat/completions`` and ``/v1/completions``;
- `write_embedding_model`: a 2-layer, 64-wide ``bert`` with a small WPM vocabulary and mean pooling, for
  ``/v1/embeddings`` under ``--embedding``;
- `write_reranker_model`: the same ``bert`` with rank pooling and a classification head, for ``/v1/rerank``
  under ``--reranking``.

The weights are seeded, so each writer produces the same bytes every time; a writer renders into a temporary
file beside the target and renames it, so a reader never sees half a file and writing twice is harmless.

The chat model's output projection is zero for every token except printable ASCII bytes, and scaled so that
those win by a wide margin: its text is readable noise, and it never samples ``</s>``, so a generation always
runs to ``max_tokens`` (finish_reason ``length``). Tests should always pass ``max_tokens``.

This module deliberately does not download, quantize or cache anything: the files are ~0.5 MB and take
milliseconds to write, so every test session writes its own into a temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import gguf
import numpy as np

CHAT_N_EMBD = 64
CHAT_N_LAYER = 2
CHAT_N_HEAD = 4
CHAT_N_FF = 128
CHAT_N_CTX_TRAIN = 2048
CHAT_N_VOCAB = 3 + 256  # <unk>, <s>, </s>, then one token per byte

BERT_N_EMBD = 64
BERT_N_LAYER = 2
BERT_N_HEAD = 4
BERT_N_FF = 128
BERT_N_CTX_TRAIN = 512

# One line, so that llama-server treats it as a generic jinja template and not as a known model's format.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_PAD, _BERT_UNK, _BERT_CLS, _BERT_SEP, _BERT_MASK = range(5)
# llama.cpp's WPM tokenizer marks the start of a word with U+2581, where Hugging Face marks continuations
# with "##" (see llm_tokenizer_wpm_session in src/llama-vocab.cpp): "##ing" is stored as "ing".
_WORD_START = "\u2581"
_BERT_WORDS = ["the", "what", "is", "of", "capital", "paris", "france", "cat", "dog", "hello", "world"]
_BERT_PIECES = ["ing", "ed", "er"]
_BERT_PUNCTUATION = [".", ",", "?", "!"]

Tensors = dict[str, np.ndarray]


def write_chat_model(path: Path) -> Path:
    """Write the llama-style chat model to `path` and return `path`."""
    rng = np.random.default_rng(20240601)
    n_embd, n_ff = CHAT_N_EMBD, CHAT_N_FF

    def weight(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, 1.0 / np.sqrt(cols), size=(rows, cols)).astype(np.float32)

    # Shapes are numpy's (rows, cols); GGUF stores them reversed, as llama.cpp's {ne0, ne1}.
    tensors: Tensors = {
        "token_embd.weight": rng.normal(0.0, 1.0, size=(CHAT_N_VOCAB, n_embd)).astype(np.float32),
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
        "output.weight": _printable_output_projection(rng, n_embd),
    }
    for layer in range(CHAT_N_LAYER):
        prefix = f"blk.{layer}"
        tensors |= {
            f"{prefix}.attn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"{prefix}.attn_q.weight": weight(n_embd, n_embd),
            f"{prefix}.attn_k.weight": weight(n_embd, n_embd),
            f"{prefix}.attn_v.weight": weight(n_embd, n_embd),
            f"{prefix}.attn_output.weight": weight(n_embd, n_embd),
            f"{prefix}.ffn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"{prefix}.ffn_gate.weight": weight(n_ff, n_embd),
            f"{prefix}.ffn_up.weight": weight(n_ff, n_embd),
            f"{prefix}.ffn_down.weight": weight(n_embd, n_ff),
        }

    def describe(writer: gguf.GGUFWriter) -> None:
        writer.add_name("llamesh tiny chat")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(CHAT_N_CTX_TRAIN)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(CHAT_N_LAYER)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(CHAT_N_HEAD)
        writer.add_head_count_kv(CHAT_N_HEAD)
        writer.add_rope_dimension_count(n_embd // CHAT_N_HEAD)
        writer.add_layer_norm_rms_eps(1e-5)

        tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
        token_types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        token_types += [gguf.TokenType.BYTE] * 256
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types(token_types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

    return _write(path, arch="llama", describe=describe, tensors=tensors)


def write_embedding_model(path: Path) -> Path:
    """Write the bert embedding model (mean pooling) to `path` and return `path`."""
    return _write_bert(path, pooling=gguf.PoolingType.MEAN, name="llamesh tiny embedding", seed=20240602)


def write_reranker_model(path: Path) -> Path:
    """Write the bert reranker (rank pooling, classification head) to `path` and return `path`."""
    return _write_bert(path, pooling=gguf.PoolingType.RANK, name="llamesh tiny reranker", seed=20240603)


def _printable_output_projection(rng: np.random.Generator, n_embd: int) -> np.ndarray:
    """Logits that only ever pick printable ASCII: see the module docstring for why."""
    projection = np.zeros((CHAT_N_VOCAB, n_embd), dtype=np.float32)
    printable = [3 + byte for byte in range(0x20, 0x7F)]
    projection[printable] = rng.normal(0.0, 2.0, size=(len(printable), n_embd))
    return projection


def _bert_vocabulary() -> list[str]:
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    return [
        *_BERT_SPECIALS,
        *(_WORD_START + letter for letter in letters),
        *letters,
        *(_WORD_START + word for word in _BERT_WORDS),
        *_BERT_PIECES,
        *(_WORD_START + mark for mark in _BERT_PUNCTUATION),
    ]


def _write_bert(path: Path, *, pooling: gguf.PoolingType, name: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    n_embd, n_ff = BERT_N_EMBD, BERT_N_FF
    vocabulary = _bert_vocabulary()

    def weight(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.5 / np.sqrt(shape[-1]), size=shape).astype(np.float32)

    def norm(prefix: str) -> Tensors:
        return {
            f"{prefix}.weight": np.ones(n_embd, dtype=np.float32),
            f"{prefix}.bias": np.zeros(n_embd, dtype=np.float32),
        }

    tensors: Tensors = {
        "token_embd.weight": weight(len(vocabulary), n_embd),
        "token_types.weight": weight(2, n_embd),
        "position_embd.weight": weight(BERT_N_CTX_TRAIN, n_embd),
        **norm("token_embd_norm"),
    }
    for layer in range(BERT_N_LAYER):
        prefix = f"blk.{layer}"
        for projection in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"{prefix}.{projection}.weight"] = weight(n_embd, n_embd)
            tensors[f"{prefix}.{projection}.bias"] = weight(n_embd)
        tensors |= {
            **norm(f"{prefix}.attn_output_norm"),
            f"{prefix}.ffn_up.weight": weight(n_ff, n_embd),
            f"{prefix}.ffn_up.bias": weight(n_ff),
            f"{prefix}.ffn_down.weight": weight(n_embd, n_ff),
            f"{prefix}.ffn_down.bias": weight(n_embd),
            **norm(f"{prefix}.layer_output_norm"),
        }
    if pooling == gguf.PoolingType.RANK:
        # llama.cpp's bert loader: cls {n_embd, n_embd}, cls.output {n_embd, n_cls_out}; n_cls_out is 1
        # unless the file lists classifier labels.
        tensors |= {
            "cls.weight": weight(n_embd, n_embd),
            "cls.bias": weight(n_embd),
            "cls.output.weight": rng.normal(0.0, 1.0, size=(1, n_embd)).astype(np.float32),
            "cls.output.bias": np.zeros(1, dtype=np.float32),
        }

    def describe(writer: gguf.GGUFWriter) -> None:
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(BERT_N_CTX_TRAIN)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(BERT_N_LAYER)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(BERT_N_HEAD)
        writer.add_layer_norm_eps(1e-12)
        writer.add_causal_attention(False)
        writer.add_pooling_type(pooling)

        writer.add_tokenizer_model("bert")
        writer.add_token_list(vocabulary)
        writer.add_token_scores([0.0] * len(vocabulary))
        token_types = [gguf.TokenType.CONTROL] * len(_BERT_SPECIALS)
        token_types += [gguf.TokenType.NORMAL] * (len(vocabulary) - len(_BERT_SPECIALS))
        writer.add_token_types(token_types)
        writer.add_token_type_count(2)
        # llama.cpp's bert defaults (bos 101, sep 102, ...) are Hugging Face's ids: ours must be given.
        writer.add_pad_token_id(_BERT_PAD)
        writer.add_unk_token_id(_BERT_UNK)
        writer.add_bos_token_id(_BERT_CLS)
        writer.add_eos_token_id(_BERT_SEP)
        writer.add_sep_token_id(_BERT_SEP)
        writer.add_mask_token_id(_BERT_MASK)
        writer.add_add_bos_token(True)
        writer.add_add_sep_token(True)
        writer.add_add_eos_token(False)

    return _write(path, arch="bert", describe=describe, tensors=tensors)


def _write(
    path: Path,
    *,
    arch: str,
    describe: Callable[[gguf.GGUFWriter], None],
    tensors: Mapping[str, np.ndarray],
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        describe(writer)
        for tensor_name, tensor in tensors.items():
            writer.add_tensor(tensor_name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path
