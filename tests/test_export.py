"""`minidpo export --hf`: the folder transformers loads is the same network and the same
tokenizer, number for number (transformers and `tokenizers` are the hf extra)."""

import json
import struct
from pathlib import Path

import pytest
import torch

from minidpo.cli import main
from minidpo.config import TokenizerConfig, resolve
from minidpo.export import TRL_VERSION, bytes_to_unicode, export_hf, hf_state_dict, trl_rows
from minidpo.model import GPT, GPTConfig, position_ids
from minidpo.policy import load_policy
from minidpo.preferences import PreferencePair
from minidpo.reward_model import load_reward_model
from minidpo.tokenizer import EOT
from minidpo.tokenizer_stage import world_tokenizer
from minidpo.world import format_prompt, load_world

transformers = pytest.importorskip("transformers", reason="the hf extra (make test installs it)")

LOGITS_ATOL = 1e-5  # float32, the figure; measured: 0 for SDPA on CPU
# Texts outside the world: doubled and odd whitespace, accents, symbols, emoji, digits.
EDGE_TEXTS = [
    "Hello  world\n\n x",
    "naïve café ✓ 😀",
    "   \t\n",
    "a\r\nb",
    "1,000.5 m/s²",
    "'s 'll",
]


def _batch(tok, texts):
    """Right-padded ids and mask of `texts` (each ending with end-of-text)."""
    rows = [[*tok.encode(t), tok.eot_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.eot_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _texts():
    """The world's prompts (as typed) and its sentences, and the whole tokenizer corpus."""
    world = load_world()
    prompts = [p.text for s in ("train", "eval") for p in world.prompts(s)]
    return prompts, world.sentences(), world.corpus()


def _policy_logits_gap(ckpt, out, left_pad):
    """Largest |logit| difference between minidpo and transformers on world responses."""
    export_hf(ckpt, out)
    model, tok = load_policy(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompts, sentences, _ = _texts()
    texts = [
        format_prompt(p) + " ".join(sentences[i : i + 1 + i % 3]) for i, p in enumerate(prompts[:6])
    ]
    ids, mask = _batch(tok, texts)
    if left_pad:  # generation's layout: padding first, positions counted from the first real
        ids, mask = ids.flip(1), mask.flip(1)
    with torch.no_grad():
        mine = model(ids, mask if left_pad else None)
        theirs = hf(ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    real = mask.bool()
    return (mine[real] - theirs[real]).abs().max().item()


@pytest.mark.parametrize("left_pad", [False, True], ids=["right-padded", "left-padded"])
def test_policy_logits_equal_transformers(tiny_sft, tmp_path, left_pad):
    assert _policy_logits_gap(tiny_sft, tmp_path / "hf", left_pad) <= LOGITS_ATOL


def test_untied_biasless_model_with_dropout_maps_too(tiny_sft, tmp_path, save_model_checkpoint):
    """An untied head exports its own matrix; no biases export as zeros (the same function)."""
    _, tok = load_policy(tiny_sft)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16, bias=False,
                    tie_head=False, dropout=0.1)  # fmt: skip
    gpt = GPT(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gpt.lm_head.weight.add_(0.05)  # untied: the head differs from the embedding
    ckpt = save_model_checkpoint(tmp_path / "untied.pt", gpt, tok)
    state = hf_state_dict(gpt)
    assert "lm_head.weight" in state and "transformer.h.0.attn.c_attn.bias" in state
    assert _policy_logits_gap(ckpt, tmp_path / "hf", left_pad=False) <= LOGITS_ATOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["resid_pdrop"] == 0.1


def test_reward_model_logit_is_the_normalised_reward(tiny_reward_model, tmp_path):
    export_hf(tiny_reward_model, tmp_path / "rm")
    rm = load_reward_model(tiny_reward_model)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    prompts, sentences, _ = _texts()
    responses = [" ".join(sentences[i : i + 1 + i % 3]) for i in range(8)]  # unequal lengths
    mine = rm.score_texts(prompts[:8], responses, [True] * 8)
    enc = hf_tok([format_prompt(p) + r + EOT for p, r in zip(prompts[:8], responses, strict=True)],
                 padding=True, return_tensors="pt")  # fmt: skip
    assert (enc["input_ids"] == 0).any(), "the batch is padded (with id 0)"
    with torch.no_grad():
        theirs = hf(**enc).logits[:, 0]
    assert torch.allclose(mine, theirs, atol=LOGITS_ATOL, rtol=0), (mine, theirs)
    assert mine.std() > 0.01  # the rewards differ, so the check can fail


@pytest.fixture(scope="module")
def cpu_tokenizer():
    """The cpu preset's tokenizer (1,856 ids), trained on the world in a few seconds."""
    return world_tokenizer(resolve(TokenizerConfig, "tokenizer", "cpu", None), load_world())


@pytest.mark.parametrize("which", ["tiny", "cpu"])
def test_tokenizer_gives_the_same_ids(
    which, tiny_sft, cpu_tokenizer, tmp_path, save_model_checkpoint
):
    tok = load_policy(tiny_sft)[1] if which == "tiny" else cpu_tokenizer
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    export_hf(save_model_checkpoint(tmp_path / "p.pt", gpt, tok), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompts, _, corpus = _texts()
    texts = [format_prompt(p) for p in prompts] + corpus + EDGE_TEXTS
    mine = tok.encode_batch(texts)
    theirs = hf_tok(texts, add_special_tokens=True)["input_ids"]
    wrong = [t for t, a, b in zip(texts, mine, theirs, strict=True) if a != b]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, first {wrong[0]!r}"
    assert all(hf_tok.decode(ids) == t for ids, t in zip(mine, texts, strict=True))
    assert hf_tok.eos_token_id == tok.eot_id == hf_tok.pad_token_id
    # the one documented difference: transformers reads the literal marker as the token
    assert hf_tok("a" + EOT)["input_ids"] == [*tok.encode("a"), tok.eot_id]
    assert tok.eot_id not in tok.encode("a" + EOT)


def test_safetensors_file_reads_back_with_the_library(tiny_sft, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    export_hf(tiny_sft, tmp_path / "hf")
    raw = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8 : 8 + n])["__metadata__"]["format"] == "pt"
    loaded = safetensors.load_file(tmp_path / "hf" / "model.safetensors")
    expected = hf_state_dict(load_policy(tiny_sft)[0])
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_byte_table_is_gpt2s():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_trl_rows_write_the_marker_where_the_response_ended():
    pairs = [PreferencePair("Explain gravity.", "Gravity pulls.", "No.", 1.0, 0.0, True, False)]
    rows, unterminated = trl_rows(pairs, "x")
    assert rows == [{"prompt": "Explain gravity.\n", "chosen": "Gravity pulls." + EOT,
                     "rejected": "No.", "score_chosen": 1.0, "score_rejected": 0.0}]  # fmt: skip
    assert unterminated == 1


def test_export_cli_force_replaces_and_model_card_names_the_source(tiny_sft, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--hf", str(out), "--checkpoint", str(tiny_sft)]) == 0
    (out / "stale.txt").write_text("old")
    assert main(["export", "--hf", str(out), "--checkpoint", str(tiny_sft), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    assert "SHA-256" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp folder left"
    assert "export: policy of stage sft" in capsys.readouterr().out


def test_the_hf_extra_pins_what_requirements_hf_pins():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lines = (root / "requirements-hf.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert pins["trl"] == TRL_VERSION
    for req in extra["hf"]:
        name, version = req.split("==")
        assert pins[name] == version, (name, version, pins.get(name))
