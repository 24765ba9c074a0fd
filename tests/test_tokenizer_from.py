"""``data.tokenizer_from``: a text run encoded with another run's tokenizer instead of one fitted on its own text
(what training further from a run's weights, such as an imported GPT-2's, needs)."""

import pytest

import kiln
from kiln.errors import KilnError

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = [{"type": "token_embedding", "width": 8}, {"type": "positional_encoding", "kind": "learned"},
          {"type": "transformer_decoder", "layers": 1, "heads": 2}, {"type": "lm_head"}]
TRAIN = {"steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "threads": 1}


def text_run(tmp_path, name, text, **data):
    (tmp_path / f"{name}.txt").write_text(text)
    cfg = {"data": {"dataset": "text", "path": str(tmp_path / f"{name}.txt"), "context": 8, **data},
           "model": {"blocks": BLOCKS}, "train": TRAIN}
    return kiln.train(cfg, out=tmp_path / name, live=False)


def test_a_run_encodes_its_text_with_the_named_runs_tokenizer(tmp_path):
    first = text_run(tmp_path, "first", "abcdefgh abcdefgh\n" * 20)
    second = text_run(tmp_path, "second", "cab bad fed\n" * 20, tokenizer_from=str(first.path))
    assert second.kind.tokenizer.chars == first.kind.tokenizer.chars == "\n abcdefgh"  # not the second text's own
    assert second.config.blocks[0].vocab == 10
    third = text_run(tmp_path, "third", "head\n" * 30, tokenizer_from=str(first.path / "tokenizer.json"))
    assert third.kind.tokenizer.encode("head") == first.kind.tokenizer.encode("head")
    assert kiln.Run.load(third.path).kind.tokenizer.chars == first.kind.tokenizer.chars  # saved with the run


def test_a_tokenizer_that_does_not_fit_is_refused(tmp_path):
    first = text_run(tmp_path, "first", "abcdefgh abcdefgh\n" * 20)
    with pytest.raises(KilnError, match=r"data.tokenizer_from .* holds a char tokenizer but data.tokenizer is byte"):
        text_run(tmp_path, "byte", "abc\n" * 20, tokenizer_from=str(first.path), tokenizer="byte")
    with pytest.raises(KilnError, match=r"data.tokenizer_from .*nowhere.*: no .*tokenizer.json"):
        text_run(tmp_path, "lost", "abc\n" * 20, tokenizer_from=str(tmp_path / "nowhere"))
    with pytest.raises(KilnError, match=r"is not in this character tokenizer's vocabulary"):
        text_run(tmp_path, "other", "xyz\n" * 20, tokenizer_from=str(first.path))
    (tmp_path / "pairs.tsv").write_text("abc\tcba\n" * 20)
    pairs = {"data": {"dataset": "text_pairs", "path": str(tmp_path / "pairs.tsv"), "tokenizer_from": str(first.path)},
             "model": {"blocks": BLOCKS[:1] + [{"type": "positional_encoding"},
                                               {"type": "encoder_decoder", "heads": 2, "layers": 1},
                                               {"type": "lm_head"}]}, "train": TRAIN}
    with pytest.raises(KilnError, match=r"its special tokens \[\] are not the \['<pad>', '<bos>', '<eos>'\]"):
        kiln.train(pairs, out=tmp_path / "pairs", live=False)
