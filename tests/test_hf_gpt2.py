"""Hugging Face GPT-2 checkpoints in and out of kiln (kiln.hf), against ``transformers`` itself.

Nothing is downloaded: each test builds a small random GPT2LMHeadModel and a byte-level BPE tokenizer trained
on a few lines here, saves them as ``save_pretrained`` does, and compares kiln's import (logits, greedy text,
token ids) and export (what transformers loads back) with the original."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install 'kiln[hf]') is not installed")
tk = pytest.importorskip("tokenizers")

from kiln.cli import main  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.hf import export_gpt2, import_gpt2  # noqa: E402
from kiln.nn.generate import Sampling, generate_ids  # noqa: E402
from kiln.run import Run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = """First Citizen:
Before we proceed any further, hear me speak.
All: Speak, speak.
You are all resolved rather to die than to famish?
Resolved. resolved. — café, naïve, 東京 and emoji 🙂 too.
We know't, we know't. Let us kill him, and we'll have corn at our own price.
""" * 3
ENDOFTEXT = "<|endoftext|>"
STRINGS = ["Speak, speak.", " leading space and  double  spaces", "line one\nline two\n\n", "café 東京 🙂",
           "unseen words: zyxwvut quokka", f"one{ENDOFTEXT}two", "   "]
POSITIONS = 40
# The GPT-2 settings each variant tests: GPT-2 itself (gelu_new, tied head), and an untied model with others.
VARIANTS = {
    "gpt2": {},
    "untied": {"tie_word_embeddings": False, "activation_function": "relu", "n_inner": 48,
               "layer_norm_epsilon": 1e-6, "embd_pdrop": 0.0, "n_layer": 3},
}


def bpe_tokenizer():
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    hf.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    trainer = tk.trainers.BpeTrainer(vocab_size=330, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     special_tokens=[ENDOFTEXT], show_progress=False)
    hf.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return hf


def save_gpt2(folder, variant: str = "gpt2", tokenizer_files: str = "tokenizer.json"):
    """A random GPT-2 (every weight perturbed, so that norms and biases matter) saved with its tokenizer."""
    hf = bpe_tokenizer()
    eos = hf.token_to_id(ENDOFTEXT)
    settings = {"vocab_size": hf.get_vocab_size(), "n_positions": POSITIONS, "n_embd": 32, "n_layer": 2,
                "n_head": 4, "bos_token_id": eos, "eos_token_id": eos, **VARIANTS[variant]}
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    if tokenizer_files == "tokenizer.json":
        hf.save(str(folder / "tokenizer.json"))
    else:
        hf.model.save(str(folder))  # vocab.json + merges.txt, GPT-2's original files
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory):
    """(transformers' model, its folder, the kiln run imported from it)."""
    root = tmp_path_factory.mktemp(request.param)
    model = save_gpt2(root / "hf", request.param)
    import_gpt2(root / "hf", root / "run")
    return model, root / "hf", Run.load(root / "run")


def tokens(vocab: int, rows: int = 3):
    return torch.randint(0, vocab, (rows, POSITIONS), generator=torch.Generator().manual_seed(1))


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def test_imported_logits_match_transformers(imported):
    model, _, run = imported
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        assert max_diff(run.model(x), model(x).logits) <= 1e-4


def test_greedy_generation_is_identical_with_the_kv_cache(imported):
    model, folder, run = imported
    prompt = run.kind.tokenizer.encode("Speak, speak.")
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=POSITIONS - len(prompt),
                                pad_token_id=model.config.eos_token_id)[0, len(prompt):].tolist()
    ours = list(generate_ids(run.model, torch.tensor(prompt), Sampling(len(theirs), temperature=0.0), cache=True))
    assert ours == theirs and len(ours) == POSITIONS - len(prompt)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert run.generate("Speak, speak.", len(theirs), temperature=0.0) == fast.decode(theirs,
                                                                                     skip_special_tokens=True)


def test_export_round_trip_gives_the_same_model_and_tokenizer(imported, tmp_path):
    model, _, run = imported
    result = export_gpt2(run.path, tmp_path / "out")
    assert result["tokenizer"] and result["notes"] == []
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert back.config.activation_function == model.config.activation_function
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        assert max_diff(back(x).logits, model(x).logits) <= 1e-5
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in STRINGS:
        assert theirs(text)["input_ids"] == run.kind.tokenizer.encode(text), text


def test_tokenizer_ids_equal_transformers_from_either_file_set(tmp_path):
    save_gpt2(tmp_path / "json")
    save_gpt2(tmp_path / "pair", tokenizer_files="vocab+merges")
    assert not (tmp_path / "pair" / "tokenizer.json").exists()
    from_json = Run.load(import_gpt2(tmp_path / "json", tmp_path / "run_json")["run"]).kind.tokenizer
    result = import_gpt2(tmp_path / "pair", tmp_path / "run_pair")
    assert result["tokenizer"] == "vocab.json + merges.txt"
    from_pair = Run.load(result["run"]).kind.tokenizer
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "json" / "tokenizer.json"))
    pair = transformers.GPT2Tokenizer.from_pretrained(tmp_path / "pair")  # reads vocab.json + merges.txt
    for text in STRINGS:
        ids = fast(text)["input_ids"]
        assert from_json.encode(text) == ids, text
        assert from_pair.encode(text) == pair(text)["input_ids"] == ids, text
        assert from_pair.decode(ids) == fast.decode(ids, skip_special_tokens=True)


def test_a_kiln_trained_run_exports_to_transformers(tmp_path):
    """A character GPT as kiln trains it (no biases, exact GELU, tied head) loads in transformers with the same
    logits: its missing biases are written as zeros. A char tokenizer has no GPT-2 equivalent (said in notes)."""
    import kiln

    (tmp_path / "text.txt").write_text(CORPUS)
    cfg = {"name": "char", "data": {"dataset": "text", "path": str(tmp_path / "text.txt"), "context": 16},
           "model": {"blocks": [{"type": "token_embedding", "width": 16}, {"type": "positional_encoding",
                                                                            "kind": "learned"},
                                {"type": "transformer_decoder", "layers": 1, "heads": 2, "bias": False},
                                {"type": "lm_head"}]},
           "train": {"steps": 3, "batch_size": 4, "eval_every": 3, "eval_batches": 1, "threads": 1}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    result = export_gpt2(run.path)
    assert result["path"] == str(run.path / "hf") and not result["tokenizer"]
    assert any("zeros" in n for n in result["notes"]) and any("char tokenizer" in n for n in result["notes"])
    back = transformers.GPT2LMHeadModel.from_pretrained(result["path"]).eval()
    assert back.config.activation_function == "gelu"
    x = torch.randint(0, run.kind.tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(back(x).logits, run.model(x)) <= 1e-4


def test_a_new_run_reuses_the_imported_tokenizer(tmp_path):
    """What fine-tuning needs besides the weights: the text encoded with the imported run's token ids."""
    import kiln

    save_gpt2(tmp_path / "hf")
    imported = Run.load(import_gpt2(tmp_path / "hf", tmp_path / "gpt2")["run"])
    (tmp_path / "text.txt").write_text(CORPUS * 4)
    overrides = {"data.path": str(tmp_path / "text.txt"), "train.steps": 2, "train.batch_size": 2,
                 "train.eval_batches": 1, "train.threads": 1}
    run = kiln.train(imported.path / "config.yaml", overrides, out=tmp_path / "tuned", live=False)
    assert run.kind.tokenizer.vocab_size == imported.kind.tokenizer.vocab_size
    assert all(run.kind.tokenizer.encode(t) == imported.kind.tokenizer.encode(t) for t in STRINGS)
    with pytest.raises(KilnError, match="holds a bpe tokenizer but data.tokenizer is char"):
        kiln.train(imported.path / "config.yaml", {**overrides, "data.tokenizer": "char"}, out=tmp_path / "x",
                   live=False)


def test_imported_weights_fine_tune_through_init_from(tmp_path):
    """GPT-2 weights on disk, fine-tuned by kiln: train.init_from loads every tensor of the imported run (none new),
    so with a learning rate too small to move them the trained model still answers as transformers' does."""
    import kiln

    model = save_gpt2(tmp_path / "hf")
    imported = import_gpt2(tmp_path / "hf", tmp_path / "gpt2")["run"]
    (tmp_path / "text.txt").write_text(CORPUS * 4)
    overrides = {"data.path": str(tmp_path / "text.txt"), "train.steps": 2, "train.batch_size": 2,
                 "train.eval_batches": 1, "train.threads": 1, "train.init_from": str(imported),
                 "train.optimizer.lr": 1e-12}
    run = kiln.train(tmp_path / "gpt2" / "config.yaml", overrides, out=tmp_path / "tuned", live=False)
    report = json.loads((run.path / "transfer.json").read_text())
    assert report["loaded"] and not report["new"], report["new"]
    ids = tokens(model.config.vocab_size)
    with torch.no_grad():
        assert max_diff(run.model(ids), model(ids).logits) <= 1e-4


def test_the_cli_imports_and_exports(tmp_path, capsys):
    save_gpt2(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(CORPUS * 4)
    assert main(["import", "hf-gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "run"),
                 "--data", str(tmp_path / "text.txt")]) == 0
    assert "GPT-2 with" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "run"), "--split", "val", "--json"]) == 0  # on the text's last 10%
    measured = json.loads(capsys.readouterr().out)
    held_out = Run.load(tmp_path / "run").kind.load().val_x
    assert measured["tokens"] == len(held_out) - 1 and measured["loss"] > 0
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "gpt2"
    assert main(["import", "hf-gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "already holds a kiln run" in capsys.readouterr().err


# ---- bad input: each error names the file, the field or the tensor ------------------------------------------


@pytest.fixture
def folder(tmp_path):
    save_gpt2(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def refused(folder, tmp_path, match):
    with pytest.raises(KilnError, match=match):
        import_gpt2(folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing is written before everything is checked


def test_missing_files_are_named(folder, tmp_path):
    (folder / "tokenizer.json").unlink()
    refused(folder, tmp_path, r"no tokenizer.json and no vocab.json and no merges.txt")
    save_gpt2(folder)
    (folder / "model.safetensors").unlink()
    refused(folder, tmp_path, r"has no model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    refused(folder, tmp_path, r"pytorch_model.bin, a pickle .*safetensors only")
    save_gpt2(folder)
    with pytest.raises(KilnError, match=r"data.path 'missing.txt': not found"):
        import_gpt2(folder, tmp_path / "run", data="missing.txt")
    (folder / "config.json").unlink()
    refused(folder, tmp_path, r"has no config.json")
    refused(tmp_path / "nowhere", tmp_path, r"is not a directory")


def test_a_model_that_is_not_gpt2_is_refused(folder, tmp_path):
    edit_config(folder, model_type="llama", architectures=["LlamaForCausalLM"])
    refused(folder, tmp_path, r"model_type 'llama' \(LlamaForCausalLM\) is not GPT-2")


@pytest.mark.parametrize("changes, match", [
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx true .* not supported"),
    ({"scale_attn_weights": False}, "scale_attn_weights false"),
    ({"add_cross_attention": True}, "add_cross_attention true"),
    ({"activation_function": "quick_gelu"}, "activation_function 'quick_gelu' is not supported"),
    ({"n_head": 5}, "n_embd 32 does not divide by n_head 5"),
    ({"n_layer": "two"}, "n_layer must be a positive integer"),
])
def test_unsupported_settings_are_refused(folder, tmp_path, changes, match):
    edit_config(folder, **changes)
    refused(folder, tmp_path, match)


def test_mismatched_shapes_and_tensors_are_named(folder, tmp_path):
    edit_config(folder, n_embd=64)
    refused(folder, tmp_path, r"transformer.wte.weight has shape \(330, 32\), .* need \(330, 64\)")
    edit_config(folder, n_embd=32, n_layer=3)
    refused(folder, tmp_path, r"no tensor transformer.h.2.ln_1.weight")
    edit_config(folder, n_layer=1)
    refused(folder, tmp_path, r"tensors transformer.h.1.* do not belong")
    edit_config(folder, n_layer=2, vocab_size=100)
    refused(folder, tmp_path, r"the tokenizer has 330 tokens but config.json's vocab_size is 100")


def test_a_classifier_head_is_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file({**tensors, "score.weight": torch.zeros(2, 32)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    refused(folder, tmp_path, r"score.weight are not GPT2LMHeadModel's")


def test_exporting_what_gpt2_cannot_hold_is_refused(tmp_path):
    import kiln

    (tmp_path / "text.txt").write_text(CORPUS)
    cfg = {"data": {"dataset": "text", "path": str(tmp_path / "text.txt"), "context": 8},
           "model": {"blocks": [{"type": "token_embedding", "width": 8},
                                {"type": "transformer_decoder", "layers": 1, "heads": 2, "position": "rotary"},
                                {"type": "lm_head"}]},
           "train": {"steps": 1, "batch_size": 2, "eval_batches": 1, "threads": 1}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    with pytest.raises(KilnError, match="this run's blocks are token_embedding, transformer_decoder, lm_head"):
        export_gpt2(run.path)


def test_a_kiln_bpe_run_exports_with_its_tokenizer(tmp_path):
    """kiln's other settings GPT-2 can hold (fixed sinusoidal positions, an untied head, SiLU, another ff width)
    and a BPE tokenizer fitted on the corpus, which has no <|endoftext|>: transformers loads both unchanged."""
    import kiln

    (tmp_path / "text.txt").write_text(CORPUS)
    cfg = {"data": {"dataset": "text", "path": str(tmp_path / "text.txt"), "context": 16, "tokenizer": "bpe",
                    "vocab_size": 300},
           "model": {"blocks": [{"type": "token_embedding", "width": 16}, {"type": "positional_encoding"},
                                {"type": "transformer_decoder", "layers": 1, "heads": 2, "activation": "silu",
                                 "ff": 24},
                                {"type": "lm_head", "tie": False}]},
           "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "threads": 1}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    result = export_gpt2(run.path)
    assert result["tokenizer"] and any("sinusoidal" in n for n in result["notes"])
    back = transformers.GPT2LMHeadModel.from_pretrained(result["path"]).eval()
    x = torch.randint(0, run.kind.tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_diff(back(x).logits, run.model(x)) <= 1e-5
    theirs = transformers.AutoTokenizer.from_pretrained(result["path"])
    for text in STRINGS:
        ids = run.kind.tokenizer.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == run.kind.tokenizer.decode(ids)


def test_corrupt_files_are_named(folder, tmp_path):
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)  # read last: the others are still good
    refused(folder, tmp_path, r"model.safetensors is not a readable safetensors file")
    (folder / "tokenizer.json").write_text("{not json")
    refused(folder, tmp_path, r"tokenizer.json is not a tokenizer file")
    (folder / "config.json").write_text("[1, 2")
    refused(folder, tmp_path, r"config.json is not valid JSON")


@pytest.mark.slow
def test_gpt2_small_at_full_size(tmp_path):
    """GPT-2 small's sizes (124M parameters: 12 layers, width 768, 1024 positions, 50,257 tokens), random weights:
    the import matches transformers and generates the same greedy tokens from a 1024-token context. The tokenizer
    here is the small one of these tests, so the vocabulary is wider than it (said in the notes)."""
    hf = bpe_tokenizer()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 small's defaults
    model.save_pretrained(tmp_path / "hf")
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    result = import_gpt2(tmp_path / "hf", tmp_path / "run")
    assert result["parameters"] == sum(p.numel() for p in model.parameters()) == 124_439_808
    assert any("padded" in n for n in result["notes"])
    run = Run.load(tmp_path / "run")
    assert run.kind.input_shape == (1024,)
    x = torch.randint(0, 50257, (1, 1024), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_diff(run.model(x), model(x).logits) <= 1e-4
        theirs = model.generate(x[:, :1016], do_sample=False, max_new_tokens=8, pad_token_id=0)[0, 1016:].tolist()
    assert list(generate_ids(run.model, x[0, :1016], Sampling(8, temperature=0.0))) == theirs


def test_half_precision_weights_are_read_as_float32(tmp_path):
    model = save_gpt2(tmp_path / "fp32")
    model.half().save_pretrained(tmp_path / "hf")
    shutil.copy(tmp_path / "fp32" / "tokenizer.json", tmp_path / "hf")
    result = import_gpt2(tmp_path / "hf", tmp_path / "run")
    assert "weights stored as float16 were converted to float32" in result["notes"]
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        assert max_diff(Run.load(tmp_path / "run").model(x), model.float()(x).logits) <= 1e-4
