"""Into the Hugging Face ecosystem: a minidpo GPT as transformers' GPT-2, its tokenizer as a
`tokenizers` byte-level BPE, and preference pairs TRL's DPOTrainer tokenises to minidpo's ids.

The GPT is GPT-2 in all but name (`minidpo.model`), so the mapping is exact:

- the policy becomes ``GPT2LMHeadModel``: the same parameter names, the four projection
  matrices of each block transposed (GPT-2 stores them as ``Conv1D``, (in, out)), exact
  GELU (``activation_function="gelu"``), LayerNorm eps 1e-5, the head tied or not as
  trained; a model trained without biases gets zero biases, which is the same function;
- the reward model becomes ``GPT2ForSequenceClassification`` with one label, read at the
  last non-padding token, as minidpo's ``pooling="last"`` reads it at the end-of-text.
  Its score head has no bias, so the constant of r = gain (w.h + b) + c is folded into
  ln_f's bias (beta' = beta + k w'/|w'|^2 with w' = gain w, k = gain b + c): the
  exported logit is minidpo's normalised reward. Its padding id is 0 (byte 0x00, which
  no text here contains), because end-of-text, minidpo's padding, is the token read.
  ``pooling="sum"`` does not map and is refused;
- the tokenizer becomes a ``tokenizer.json``: the GPT-2 split pattern, byte-level
  pre-tokenisation (GPT-2's byte -> character table), and BPE merges listed, for every
  token in rank order, as each split of its bytes into two tokens (the conversion
  transformers applies to tiktoken vocabularies), with ``ignore_merges`` so a pretoken
  that is a whole token is that token, as in tiktoken. ``<|endoftext|>`` is the special
  token, EOS and padding; unlike `minidpo.tokenizer`, transformers reads the literal
  ``<|endoftext|>`` in text as that token;
- pairs become TRL's text form: the prompt as the model saw it (``format_prompt``: the
  prompt and a newline) and each response with ``<|endoftext|>`` written out when it
  terminated. TRL (1.16) appends EOS to every response that does not end in it, so an
  unterminated response cannot be reproduced in its text form: `trl_rows` counts them.

Nothing here imports transformers, `tokenizers` or `safetensors`: the three file formats
(config.json, model.safetensors, tokenizer.json) are written as documented, so
``minidpo export`` runs on the core install; the tests load every file with transformers
and train through TRL (the ``hf`` extra).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minidpo.checkpoints import file_sha256, load_checkpoint
from minidpo.errors import MinidpoError
from minidpo.model import GPT, ScalarHeadModel
from minidpo.policy import build_policy
from minidpo.preferences import PreferencePair
from minidpo.reward_model import build_reward_model
from minidpo.tokenizer import EOT, Tokenizer
from minidpo.world import format_prompt

# GPT-2 keeps these four projections as Conv1D, weight (in, out): nn.Linear's transposed.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
RM_PAD_ID = 0  # the reward model's padding: byte 0x00, in no text of the world
TRL_VERSION = "1.16.0"  # the TRL whose DPOTrainer the tests check the exports against


# ---------------------------------------------------------------- the model


def hf_config(gpt: GPT, eot_id: int, architecture: str = "GPT2LMHeadModel") -> dict[str, Any]:
    """transformers' GPT2Config (config.json) of the same network."""
    c = gpt.config
    return {
        "architectures": [architecture],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": 4 * c.n_embd,
        "activation_function": "gelu",  # exact (erf) GELU, as nn.GELU(); not GPT-2's gelu_new
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # softmax(q k^T / sqrt(head size))
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c.tie_head,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
    }


def hf_state_dict(gpt: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors of `gpt`: same names, Conv1D weights transposed, zero biases
    where the model has none, and ``lm_head.weight`` only when the head is untied."""
    out: dict[str, torch.Tensor] = {}
    for name, t in gpt.state_dict().items():
        if name == "lm_head.weight" and gpt.config.tie_head:
            continue  # tied: transformers takes it from transformer.wte.weight
        out[name] = t.t() if name.endswith(CONV1D) else t
    if not gpt.config.bias:  # GPT-2 always has biases; zeros are the same function
        for name, t in list(out.items()):
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                out[name[: -len("weight")] + "bias"] = torch.zeros_like(t)
            elif name.endswith(CONV1D):
                out[name[: -len("weight")] + "bias"] = torch.zeros(t.shape[1], dtype=t.dtype)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def reward_state_dict(
    model: ScalarHeadModel, gain: float, bias: float, where: str
) -> dict[str, torch.Tensor]:
    """GPT2ForSequenceClassification's tensors whose logit is r = gain * head(h) + bias.

    The score head is w' = gain * w with no bias; the constant k = gain * b_head + bias
    moves into ln_f's bias: w' . (g * n + beta + k w'/|w'|^2) = w' . (g * n + beta) + k.
    """
    body = hf_state_dict(model.body)
    body.pop("lm_head.weight", None)  # an untied body's unused head
    w = gain * model.head.weight.detach().double()  # (1, C)
    k = gain * float(model.head.bias.detach()) + bias
    norm2 = float((w * w).sum())
    if not norm2 > 0:
        raise MinidpoError(f"{where}: the reward head's weight is zero; the model does not map")
    beta = body["transformer.ln_f.bias"].double() + k * w[0] / norm2
    body["transformer.ln_f.bias"] = beta.float()
    body["score.weight"] = w.float()
    return body


# ---------------------------------------------------------------- safetensors

_DTYPES = {
    torch.float32: ("F32", "<f4"),
    torch.float64: ("F64", "<f8"),
    torch.int64: ("I64", "<i8"),
}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format: an 8-byte little-endian header length, a JSON header naming
    each tensor's dtype, shape and byte range, padded with spaces to 8 bytes, then the
    tensors' little-endian bytes in the header's order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        code, np_dtype = _DTYPES[t.dtype]
        blob = t.numpy().astype(np_dtype, copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}  # fmt: skip
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


# ---------------------------------------------------------------- the tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table (openai/gpt-2 src/encoder.py): printable bytes stand
    for themselves, the other 68 are shifted to 256 + n, so every token is visible text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def hf_merges(tok: Tokenizer) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's byte-rank rule: for each token in rank order,
    every split of its bytes into two tokens, the split with the lower-ranked parts first."""
    merges = []
    for token in sorted(tok.ranks, key=tok.ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in tok.ranks and b in tok.ranks]
        merges.extend(sorted(splits, key=lambda ab: (tok.ranks[ab[0]], tok.ranks[ab[1]])))
    return merges


def hf_tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The `tokenizers` library's tokenizer.json of `tok`: same split, same ids."""
    u = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(u[x] for x in b)

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}  # fmt: skip
    split = {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated",
             "invert": False}  # fmt: skip
    eot = {"id": tok.eot_id, "content": EOT, "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}  # fmt: skip
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
           "ignore_merges": True,  # a pretoken that is a whole token is that token (tiktoken)
           "vocab": {text(b): i for b, i in tok.ranks.items()},
           "merges": [[text(a), text(b)] for a, b in hf_merges(tok)]}  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [eot],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": None,  # no BOS: minidpo's sequences start with the prompt
        "decoder": {**byte_level, "use_regex": True},
        "model": bpe,
    }


def hf_tokenizer_config(block_size: int, pad: str) -> dict[str, Any]:
    """tokenizer_config.json: the class that reads tokenizer.json as it is, EOS, padding."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOT,
        "pad_token": pad,
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }


# ---------------------------------------------------------------- the folder


def model_card(kind: str, stage: str, source: Path, sha: str, gpt: GPT, eot_id: int) -> str:
    c = gpt.config
    arch = "GPT2LMHeadModel" if kind == "policy" else "GPT2ForSequenceClassification"
    load = "AutoModelForCausalLM" if kind == "policy" else "AutoModelForSequenceClassification"
    return f"""# minidpo {stage} {kind}

A tiny GPT trained from scratch by minidpo on its toy world, exported as transformers'
`{arch}`. It knows nothing outside that world.

- Source: `{source.name}` (stage `{stage}`), SHA-256 `{sha}`.
- Shape: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size},
  vocabulary {c.vocab_size} (byte-level BPE; `<|endoftext|>` = {eot_id}), head
  {"tied to" if c.tie_head else "untied from"} the token embedding.
- Prompt format: the prompt and one newline, e.g. `"Explain gravity.\\n"`; a response ends
  with `<|endoftext|>`.
{"- The logit is minidpo's normalised reward r(x, y), read at the response's end-of-text; pad with id 0, not end-of-text." if kind == "reward_model" else ""}

```python
from transformers import AutoTokenizer, {load}
tok = AutoTokenizer.from_pretrained("<this folder>")
model = {load}.from_pretrained("<this folder>")
```
"""


def _write_folder(out: Path, files: dict[str, bytes], force: bool) -> Path:
    """Write `files` into folder `out` all at once: into a hidden sibling first, then one
    rename, so a failure leaves no half-written export (and, with `force`, the old one)."""
    if out.exists() and not out.is_dir():
        raise MinidpoError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MinidpoError(f"{out}: folder is not empty (--force replaces it)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)  # the previous export stays where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def export_hf(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """A transformers folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, README.md) of a policy or reward-model checkpoint."""
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = load_checkpoint(checkpoint)
    kind = ckpt.get("kind")
    if kind == "policy":
        gpt, tok = build_policy(ckpt, checkpoint)
        tensors, pad = hf_state_dict(gpt), EOT
        config = hf_config(gpt, tok.eot_id)
    elif kind == "reward_model":
        model, tok = build_reward_model(ckpt, checkpoint)
        norm, pooling = ckpt.get("normalization"), ckpt.get("pooling", "last")
        if not norm:
            raise MinidpoError(f"{checkpoint}: reward model is not normalised yet (unfinished)")
        if pooling != "last":
            raise MinidpoError(f"{checkpoint}: a reward model with pooling {pooling!r} does not "
                               "map (GPT2ForSequenceClassification reads one token)")  # fmt: skip
        gpt = model.body
        tensors = reward_state_dict(
            model, float(norm["gain"]), float(norm["bias"]), str(checkpoint)
        )
        pad = bytes_to_unicode()[RM_PAD_ID]
        config = {**hf_config(gpt, tok.eot_id, "GPT2ForSequenceClassification"),
                  "num_labels": 1, "pad_token_id": RM_PAD_ID,
                  "id2label": {"0": "reward"}, "label2id": {"reward": 0}}  # fmt: skip
    else:
        raise MinidpoError(f"{checkpoint}: holds a {kind!r} checkpoint; export takes a policy "
                           "or a reward model")  # fmt: skip
    sha = file_sha256(checkpoint)
    stage = str(ckpt.get("stage", "?"))
    files = {
        "config.json": _json(config),
        "model.safetensors": safetensors_bytes(tensors, {"format": "pt", "minidpo_sha256": sha}),
        "tokenizer.json": _json(hf_tokenizer_json(tok)),
        "tokenizer_config.json": _json(hf_tokenizer_config(gpt.config.block_size, pad)),
        "README.md": model_card(kind, stage, checkpoint, sha, gpt, tok.eot_id).encode(),
    }
    _write_folder(out, files, force)
    return {"kind": kind, "stage": stage, "out": str(out), "tensors": len(tensors)}


# ---------------------------------------------------------------- pairs


def trl_rows(pairs: Sequence[PreferencePair], where: str) -> tuple[list[dict[str, Any]], int]:
    """Pairs in TRL's text form, and the number of responses that never terminated.

    Every row's ``prompt`` is ``format_prompt(prompt)`` and a terminated response ends with
    ``<|endoftext|>``; so TRL's tokenisation (prompt, prompt + response, split where they
    part) gives minidpo's ids. A literal ``<|endoftext|>`` inside a response is refused:
    transformers would read it as the special token, minidpo reads it as text.
    """
    rows, unterminated = [], 0
    for n, p in enumerate(pairs, 1):
        if any(EOT in text for text in (p.prompt, p.chosen, p.rejected)):
            raise MinidpoError(f"{where}: pair {n} holds the text {EOT!r}, which "
                               "transformers reads as the special token")  # fmt: skip
        row: dict[str, Any] = {"prompt": format_prompt(p.prompt)}
        for key, done in (("chosen", p.chosen_terminated), ("rejected", p.rejected_terminated)):
            row[key] = getattr(p, key) + EOT if done else getattr(p, key)
            unterminated += not done
        for key in ("score_chosen", "score_rejected"):
            if getattr(p, key) is not None:
                row[key] = getattr(p, key)
        rows.append(row)
    return rows, unterminated
