"""Text models: tokenizers, causal masking, the key/value cache, training, generation and seq2seq prediction."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

import kiln
from kiln.cli import main
from kiln.config import load_config
from kiln.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, load_tokenizer
from kiln.errors import ConfigError, DataError, KilnError, RunDirError
from kiln.nn.generate import Decoder, Sampling, generate_ids, translate_ids
from kiln.nn import build_model
from kiln.nn.base import BlockSpec
from kiln.registry import BLOCKS
from kiln.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from numbers_to_digits import pairs  # noqa: E402

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 20
UNSEEN = "naïve café ✓ 日本語 \x00\x7f 🙂 tab\tend"


pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(*specs: dict) -> list[BlockSpec]:
    return [BLOCKS.get(s["type"])(**s) for s in specs]


def gpt(position="learned", vocab=13, context=10, dropout=0.0):
    specs = [{"type": "token_embedding", "width": 16, "vocab": vocab}]
    if position != "rotary":
        specs.append({"type": "positional_encoding", "kind": position})
    specs += [{"type": "transformer_decoder", "layers": 2, "heads": 2, "dropout": dropout,
               "position": "rotary" if position == "rotary" else "none"},
              {"type": "lm_head", "vocab": vocab}]
    return build_model(blocks(*specs), (context,))


def rnn_lm(cell="lstm", vocab=13, context=10):
    return build_model(blocks({"type": "token_embedding", "width": 8, "vocab": vocab}, {"type": cell, "units": 12},
                              {"type": "dense", "units": 8}, {"type": "lm_head", "vocab": vocab, "tie": False}),
                       (context,))


MODELS = {"learned": lambda: gpt("learned"), "sinusoidal": lambda: gpt("sinusoidal"), "rotary": lambda: gpt("rotary"),
          "lstm": lambda: rnn_lm("lstm"), "gru": lambda: rnn_lm("gru")}


# ---- tokenizers ----------------------------------------------------------------------------------

def test_char_tokenizer_round_trip_and_unknown_character(tmp_path):
    tok = CharTokenizer.fit(CORPUS)
    assert tok.decode(tok.encode(CORPUS)) == CORPUS and tok.vocab_size == len(set(CORPUS))
    tok.save(tmp_path / "t.json")
    again, _ = load_tokenizer(tmp_path / "t.json")
    assert again.encode(CORPUS) == tok.encode(CORPUS)
    with pytest.raises(DataError, match="'✓' is not in"):
        tok.encode("✓")


@pytest.mark.parametrize("make", [lambda: ByteTokenizer(), lambda: BPETokenizer.fit(CORPUS, 300)], ids=["byte", "bpe"])
def test_byte_and_bpe_round_trip_text_outside_the_corpus(make, tmp_path):
    tok = make()
    for text in (CORPUS, UNSEEN, "", "  leading and trailing  \n"):
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "t.json")
    again, _ = load_tokenizer(tmp_path / "t.json")
    assert again.encode(UNSEEN) == tok.encode(UNSEEN) and again.decode(again.encode(UNSEEN)) == UNSEEN


def test_bpe_merges_frequent_pairs_and_specials_come_last():
    tok = BPETokenizer.fit(CORPUS, 300, specials=("<pad>", "<bos>", "<eos>"))
    assert len(tok.encode(CORPUS)) < len(CORPUS.encode()) / 2
    assert tok.special("<eos>") == tok.vocab_size - 1
    assert tok.decode([*tok.encode("speak"), tok.special("<eos>")]) == "speak"


def test_bpe_without_the_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(KilnError, match=r"pip install 'kiln\[text\]'"):
        BPETokenizer.fit(CORPUS, 300)


# ---- the model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_changing_a_future_token_never_changes_an_earlier_output(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randint(0, 13, (3, 10))
    with torch.no_grad():
        base = model(x)
        for j in (0, 4, 9):
            changed = x.clone()
            changed[:, j] = (changed[:, j] + 1) % 13
            out = model(changed)
            assert torch.equal(out[:, :j], base[:, :j]), f"output before step {j} depends on step {j}"
            assert not torch.allclose(out[:, j], base[:, j])


@pytest.mark.parametrize("name", MODELS)
def test_kv_cache_gives_the_logits_of_full_recomputation(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randint(0, 13, (2, 10))
    with torch.no_grad():
        full = model(x)
        decoder = Decoder(model)
        parts = [decoder(x[:, :4]), *(decoder(x[:, i:i + 1]) for i in range(4, 10))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sampling", [Sampling(25, temperature=0), Sampling(25, 0.9, top_k=5, seed=3),
                                      Sampling(25, 1.2, top_p=0.8, seed=4)], ids=["greedy", "top_k", "top_p"])
def test_cached_generation_equals_uncached_beyond_the_context(name, sampling):
    torch.manual_seed(0)
    model = MODELS[name]()
    prompt = torch.tensor([1, 2, 3])
    cached = list(generate_ids(model, prompt, sampling, cache=True))
    assert cached == list(generate_ids(model, prompt, sampling, cache=False))
    assert len(cached) == 25  # 3 + 25 tokens > the context of 10


def test_weight_tying_shares_one_matrix():
    model = gpt()
    head, embedding = model.blocks[-1].proj.weight, model.blocks[0].weight
    assert head is embedding
    assert sum(p.numel() for p in model.parameters()) < sum(v.numel() for v in model.state_dict().values())


def test_a_data_path_that_is_no_regular_file_is_refused_at_once(tmp_path, capsys):
    """/dev/zero as a corpus once grew to 3 GB before it was killed: only regular files and folders are read."""
    config = tmp_path / "zero.yaml"
    config.write_text(yaml.safe_dump(lm_config("/dev/zero")))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "/dev/zero is not a regular file or folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_non_causal_block_is_refused_for_a_language_model(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS)
    cfg = {"data": {"dataset": "text", "path": str(path), "context": 8},
           "model": {"blocks": [{"type": "token_embedding", "width": 8}, {"type": "transformer_encoder", "heads": 2,
                                                                         "ff": 8}, {"type": "lm_head"}]}}
    with pytest.raises(ConfigError, match=r"model.blocks.1 \(transformer_encoder\).*must not look ahead"):
        kiln.train(cfg, out=tmp_path / "run", live=False)
    assert not (tmp_path / "run").exists()


def test_encoder_decoder_cache_equals_recomputation():
    torch.manual_seed(0)
    model = build_model(blocks({"type": "token_embedding", "width": 16, "vocab": 9},
                               {"type": "positional_encoding", "kind": "learned"},
                               {"type": "encoder_decoder", "heads": 2, "layers": 1, "source_steps": 6},
                               {"type": "lm_head", "vocab": 9}), (6 + 5,))
    sources = torch.randint(3, 9, (4, 6))
    assert translate_ids(model, sources, 1, 2, 5, cache=True) == translate_ids(model, sources, 1, 2, 5, cache=False)
    x = torch.randint(0, 9, (2, 11))
    with torch.no_grad():
        full, decoder = model(x), Decoder(model)
        stepwise = torch.cat([decoder(x[:, :7]), *(decoder(x[:, i:i + 1]) for i in range(7, 11))], dim=1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


# ---- training, saving, generating ----------------------------------------------------------------

def lm_config(path, tokenizer="char", **train):
    return {"name": "tiny_lm", "seed": 0,
            "data": {"dataset": "text", "path": str(path), "context": 16, "tokenizer": tokenizer, "vocab_size": 280},
            "model": {"blocks": [{"type": "token_embedding", "width": 16},
                                 {"type": "positional_encoding", "kind": "learned"},
                                 {"type": "transformer_decoder", "layers": 1, "heads": 2, "bias": False},
                                 {"type": "lm_head"}]},
            "train": {"steps": 30, "batch_size": 8, "eval_every": 10, "eval_batches": 2, "log_every": 10,
                      "optimizer": {"name": "adamw", "lr": 0.01}, **train}}


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_train_reload_and_generate_identical_text(tmp_path, tokenizer, capsys):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    run = kiln.train(lm_config(tmp_path / "corpus.txt", tokenizer), out=tmp_path / "run", live=False)
    metrics = run.metrics
    assert metrics["val"]["loss"] < 3.5 and metrics["val"]["perplexity"] == pytest.approx(2.718281828 ** metrics["val"]["loss"])
    history = [r for r in run.dir.read_metrics() if r["kind"] == "eval"]
    assert [r["step"] for r in history] == [0, 10, 20, 30] and history[-1]["val_loss"] < history[0]["val_loss"]
    text = run.generate("First", 40, temperature=0.8, top_k=10, seed=7)
    again = kiln.Run.load(tmp_path / "run")
    assert again.generate("First", 40, temperature=0.8, top_k=10, seed=7) == text
    assert again.generate("First", 40, temperature=0.8, top_k=10, seed=7, cache=False) == text
    assert (tmp_path / "run" / "tokenizer.json").is_file()

    assert main(["generate", str(tmp_path / "run"), "--prompt", "First", "--max-new-tokens", "40", "--temperature",
                 "0.8", "--top-k", "10", "--seed", "7"]) == 0
    assert capsys.readouterr().out == "First" + text + "\n"
    assert main(["evaluate", str(tmp_path / "run"), "--split", "val"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_trains_a_language_model_without_held_out_text(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump(lm_config(tmp_path / "corpus.txt", steps=4, eval_every=2)))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--set", "data.val_fraction=0"]) == 0
    assert "no held-out data" in capsys.readouterr().out


def test_stop_sequences_end_the_text(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    run = kiln.train(lm_config(tmp_path / "corpus.txt", steps=20), out=tmp_path / "run", live=False)
    text = run.generate("F", 60, temperature=0)
    stop = text[5:7]
    assert run.generate("F", 60, temperature=0, stop=[stop]) == text[: text.find(stop)]


def test_generate_refuses_other_runs_and_bad_settings(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    kiln.train(lm_config(tmp_path / "corpus.txt", steps=2, eval_every=2), out=tmp_path / "run", live=False)
    assert main(["generate", str(tmp_path / "run"), "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "run"), "--prompt", "✓"]) == 2
    assert "not in this character tokenizer" in capsys.readouterr().err
    # A command the kind of run does not answer says which one does.
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "corpus.txt")]) == 2
    assert "is a language-model run; use `kiln generate RUN --prompt TEXT`" in capsys.readouterr().err
    with pytest.raises(KilnError, match="has no translate; use `kiln generate"):
        kiln.Run.load(tmp_path / "run").translate(["First"])


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    cfg = lm_config(tmp_path / "corpus.txt", steps=20, checkpoint_every=10, eval_every=10)
    straight = kiln.train(cfg, out=tmp_path / "a", live=False)
    step = Trainer.step

    def interrupted(self, idx):
        if self.state.global_step == 13:  # after the checkpoint at step 10
            raise KeyboardInterrupt
        return step(self, idx)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(RunDirError, match="interrupted"):
        kiln.train(cfg, out=tmp_path / "b", live=False)
    monkeypatch.undo()
    resumed = kiln.train(cfg, out=tmp_path / "b", resume=True, live=False)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r["step"] for r in resumed.dir.read_metrics() if r["kind"] == "eval"] == [0, 10, 20]


# ---- sequence to sequence ------------------------------------------------------------------------

def test_seq2seq_trains_predicts_and_reloads(tmp_path, capsys):
    data = tmp_path / "numbers.tsv"
    data.write_text("".join(f"{w}\t{d}\n" for w, d in pairs(400, limit=1000)))
    cfg = {"name": "numbers", "data": {"dataset": "text_pairs", "path": str(data), "test_fraction": 0.1},
           "model": {"blocks": [{"type": "token_embedding", "width": 32},
                                {"type": "positional_encoding", "kind": "learned"},
                                {"type": "encoder_decoder", "heads": 2, "layers": 1},
                                {"type": "lm_head"}]},
           "train": {"steps": 40, "batch_size": 32, "eval_every": 20, "eval_batches": 1,
                     "optimizer": {"name": "adamw", "lr": 0.005}}}
    run = kiln.train(cfg, out=tmp_path / "run", live=False)
    test = run.metrics["test"]
    assert set(test) >= {"loss", "perplexity", "token_accuracy", "exact_match"} and test["samples"] == 40
    assert test["token_accuracy"] > 0.3
    sources = ["seven hundred twelve", "three"]
    again = kiln.Run.load(tmp_path / "run")
    assert again.translate(sources) == run.translate(sources) == again.translate(sources, cache=False)
    (tmp_path / "src.txt").write_text("seven hundred twelve\nthree\t3\n")
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "src.txt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == sources
    with pytest.raises(KilnError, match="has no generate; use `kiln predict"):
        run.generate("three")


def test_numbers_example_builds_on_its_generated_data(tmp_path):
    from kiln.summary import model_of

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "numbers.tsv").write_text("".join(f"{w}\t{d}\n" for w, d in pairs(300)))
    cfg = load_config(Path(__file__).parent.parent / "examples" / "numbers_to_digits.yaml",
                      {"data.root": str(tmp_path)})
    model = model_of(cfg)
    assert model(torch.randint(0, 5, (2, *model.input_shape))).shape == (2, *model.output_shape)
    assert pairs(5) == pairs(5) and pairs(3)[0][0].replace("-", " ").replace(" ", "").isalpha()
