"""The `images` kind: class folders and CSVs of your own images, the content-keyed pixel cache, normalisation saved
with the run, photo augmentation, the residual and global-pool blocks, predict and serving of image files, and
every kind of bad input (empty class folder, unreadable or truncated image, labels outside the classes)."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kiln
from kiln.cli import main
from kiln.config import load_config
from kiln.data.folders import ImageFolders, channel_stats
from kiln.data.kind import open_kind
from kiln.data.pixels import cutout, fit_photo, photo_augment
from kiln.errors import ConfigError, DataError
from kiln.nn import build_model
from kiln.nn.fuse import fuse

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
FORMATS = [("png", "PNG", "RGB"), ("jpg", "JPEG", "RGB"), ("bmp", "BMP", "RGB"), ("webp", "WEBP", "RGB"),
           ("png", "PNG", "RGBA"), ("png", "PNG", "L"), ("png", "PNG", "P")]


def photo(colour, size, seed, mode="RGB") -> Image.Image:
    """A noisy image dominated by one colour, of any size and mode."""
    rng = np.random.default_rng(seed)
    h, w = size
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("P")
    return img


def write_folder(root: Path, per_class: int = 12, split_folders: bool = False) -> Path:
    """Class folders of colour images in every format, mode and a few sizes."""
    splits = [("train", per_class), ("test", 4)] if split_folders else [("", per_class)]
    n = 0
    for split, count in splits:
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                ext, fmt, mode = FORMATS[n % len(FORMATS)]
                size = [(16, 16), (24, 40), (50, 30)][n % 3]
                photo(colour, size, n, mode).save(folder / f"{i:03d}.{ext}", format=fmt)
                n += 1
    return root


def data_cfg(path, **extra) -> dict:
    return {"dataset": "images", "path": str(path), "image_size": 16, **extra}


def config(path, epochs=4, blocks=None, **extra) -> dict:
    return {"name": "colours", "seed": 0, "data": data_cfg(path, **extra),
            "model": {"blocks": blocks or [
                {"type": "conv2d", "filters": 8, "kernel": 3, "activation": "relu"},
                {"type": "maxpool2d", "size": 2},
                {"type": "residual", "filters": 8},
                {"type": "global_pool"},
                {"type": "classifier"}]},
            "train": {"epochs": epochs, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}, "threads": 1}}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("KILN_CACHE", str(path))
    return path


def kind_of(cfg_data: dict, seed: int = 0) -> ImageFolders:
    return open_kind(load_config({"data": cfg_data, "model": {"blocks": [{"type": "classifier"}]}}).data, seed)


# ---- reading, splitting, caching ---------------------------------------------------------------------------


def test_folder_of_any_format_and_mode_is_read_split_and_normalised(tmp_path, cache):
    folder = write_folder(tmp_path / "photos")
    kind = kind_of(data_cfg(folder, val_fraction=0.25, test_fraction=0.25))
    assert kind.class_names == ["blue", "green", "red"] and kind.input_shape == (3, 16, 16)
    s = kind.load()
    assert len(s.train_x) + len(s.val_x) + len(s.test_x) == 36
    for y in (s.train_y, s.val_y, s.test_y):  # stratified: every class in every split
        assert torch.bincount(y, minlength=3).min() >= 2
    assert s.train_x.dtype == torch.uint8 and tuple(s.train_x.shape[1:]) == (3, 16, 16)
    # Each colour is recognisable whatever the file's format, mode or size (the grey ones are grey).
    red = s.train_x[s.train_y == 2].float().mean(dim=(0, 2, 3))
    assert red[0] > red[1] + 20 and red[0] > red[2] + 20
    mean, std = channel_stats(s.train_x)
    assert kind.mean == mean and kind.std == std  # fitted on the training split only
    x = kind.to_input(s.train_x)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)


def test_train_and_test_folders_are_the_splits(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=8, split_folders=True)
    s = kind_of(data_cfg(folder, val_fraction=0.25)).load()
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (18, 6, 12)


def test_second_load_decodes_nothing_and_a_changed_file_is_decoded_again(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=30)  # 90 images: decoded by worker processes
    first = kind_of(data_cfg(folder, workers=2))
    a = first.load()
    assert first.counts["decoded"] == 90 and first.counts["workers"] == 2
    second = kind_of(data_cfg(folder))
    b = second.load()
    assert second.counts["decoded"] == 0 and second.counts["cached"] == 90
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    # The cache follows content: a renamed file is not decoded again, a changed one is.
    os.rename(folder / "red" / "000.png", folder / "red" / "zzz.png")
    photo(COLOURS["red"], (16, 16), 999).save(folder / "red" / "001.jpg", format="JPEG")
    third = kind_of(data_cfg(folder))
    third.load()
    assert third.counts["decoded"] == 1
    assert list(cache.glob("images/*/pixels.u8"))  # the pixels live in the cache, memory-mapped when read


def test_a_damaged_cache_is_decoded_again_not_trusted(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=4)
    a = kind_of(data_cfg(folder)).load()
    (pixels,) = cache.glob("images/*/pixels.u8")
    pixels.write_bytes(pixels.read_bytes()[:100])  # shorter than its index says
    kind = kind_of(data_cfg(folder))
    b = kind.load()
    assert kind.counts["decoded"] == 12 and torch.equal(a.train_x, b.train_x)
    assert kind_of(data_cfg(folder)).load() is not None and pixels.stat().st_size == 12 * 3 * 16 * 16


def test_decoding_in_workers_equals_decoding_here(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "photos", per_class=30)
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "c1"))
    a = kind_of(data_cfg(folder, workers=2)).load()
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "c2"))
    b = kind_of(data_cfg(folder, workers=1)).load()
    assert torch.equal(a.train_x, b.train_x)


def test_csv_of_path_label_with_a_split_column(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=6)
    rows = ["file,kind,split"]
    for i, p in enumerate(sorted(folder.rglob("*.*"))):
        rows.append(f"{p.relative_to(folder)},{p.parent.name},{'test' if i % 3 == 0 else 'train'}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    kind = kind_of(data_cfg(folder / "labels.csv", path_column="file", label_column="kind", val_fraction=0.0))
    s = kind.load()
    assert kind.class_names == ["blue", "green", "red"] and (len(s.train_x), len(s.test_x)) == (12, 6)


@pytest.mark.parametrize("policy", ["crop", "stretch", "pad"])
def test_resize_policies(policy):
    img = Image.new("RGB", (40, 20), (255, 0, 0))  # wide red
    img.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left
    out = fit_photo(img, 3, (10, 10), policy)
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    left = out[:, 5, 0]
    if policy == "crop":  # the centre is kept: the blue band is cut off
        assert left[0] > 200 and left[2] < 50
    elif policy == "stretch":  # everything is kept, squeezed
        assert left[2] > 200
    else:  # pad: black above and below
        assert out[:, 0, 5].max() == 0 and left[2] > 200


def test_grey_models_and_16_bit_and_exif_orientation():
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert fit_photo(grey16, 1, (4, 4), "stretch").min() == 255
    img = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 10 wide and 20 high
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    upright = fit_photo(Image.open(io.BytesIO(buf.getvalue())), 3, (20, 10), "pad")
    assert upright[1].min() > 200  # fills the 20x10 (h x w) frame: no black padding


# ---- training, saving, predicting, serving -----------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A small model trained on colour photos of every format (its cache in its own folder)."""
    tmp = tmp_path_factory.mktemp("colours")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE", str(tmp / "cache"))
        folder = write_folder(tmp / "photos", per_class=16)
        run = kiln.train(config(folder, augment={"flip": True, "brightness": 0.1}), out=str(tmp / "run"))
        yield run


def test_training_learns_colours_and_the_run_reopens_alone(colour_run):
    run = colour_run
    assert run.metrics["test"]["accuracy"] >= 0.9
    saved = json.loads((run.path / "images.json").read_text())
    assert saved["classes"] == ["blue", "green", "red"] and saved["shape"] == [3, 16, 16]
    assert saved["mean"] == run.kind.mean and saved["std"] == run.kind.std
    # The run reopens from its directory alone: the same outputs, the same test metrics, its own normalisation.
    reloaded = kiln.Run.load(run.path)
    x = run.kind.load().test_x
    assert torch.allclose(reloaded.predict(x), run.predict(x), atol=1e-6)
    assert reloaded.kind.mean == run.kind.mean
    assert reloaded.evaluate()["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"])


def test_predict_and_serving_take_photos_of_any_size_and_format(colour_run, tmp_path):
    run = kiln.Run.load(colour_run.path)
    big = tmp_path / "big_red.webp"
    photo(COLOURS["red"], (300, 200), 7).save(big, format="WEBP")
    assert run.predict_files([big])[0]["class"] == "red"
    # A server's reader converts uploads and base64 JSON the same way.
    adapter = run.kind.inputs()
    data = big.read_bytes()
    from_files = adapter.from_files([("big_red.webp", data)])
    from pydantic import TypeAdapter

    inst = TypeAdapter(adapter.instance_model()).validate_python({"image_base64": base64.b64encode(data).decode()})
    assert from_files.shape == (1, 3, 16, 16) and np.array_equal(from_files, adapter.from_instances([inst]))
    expected = run.predict(from_files)
    assert int(expected.argmax()) == run.class_names.index("red")
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'kiln[serve]'")
    from fastapi.testclient import TestClient

    from kiln.serve import create_app

    jpeg = io.BytesIO()
    photo(COLOURS["green"], (120, 90), 5).save(jpeg, format="JPEG")
    with TestClient(create_app(run.path)) as client:
        multipart = client.post("/v1/predict", files=[("files", ("big_red.webp", data, "image/webp")),
                                                      ("files", ("g.jpg", jpeg.getvalue(), "image/jpeg"))])
        assert multipart.status_code == 200, multipart.text
        answers = multipart.json()["predictions"]
        assert [a["label"] for a in answers] == ["red", "green"]
        assert answers[0]["probabilities"]["red"] == pytest.approx(float(expected[0, 2]), abs=1e-5)
        as_json = client.post("/v1/predict", json={"instances": [{"image_base64": base64.b64encode(data).decode()}]})
        assert as_json.status_code == 200 and as_json.json()["predictions"][0]["label"] == "red"
        broken = client.post("/v1/predict", files=[("files", ("t.jpg", jpeg.getvalue()[:200], "image/jpeg"))])
        assert broken.status_code == 422 and "files.0" in broken.text


def test_kiln_predict_command_on_a_photo(colour_run, tmp_path, capsys):
    pic = tmp_path / "blue.jpg"
    photo(COLOURS["blue"], (64, 48), 3).save(pic, format="JPEG")
    assert main(["predict", str(colour_run.path), str(pic)]) == 0
    assert f"{pic}: blue" in capsys.readouterr().out


@pytest.mark.slow
def test_cifar_small_subset_learns(tmp_path, cache):
    root = Path(os.environ.get("KILN_DATA", "")) / "cifar10_small"
    if not os.environ.get("KILN_DATA") or not root.is_dir():
        pytest.skip("cifar10_small unavailable: set KILN_DATA to ../shared/data")
    cfg = load_config(Path(__file__).parent.parent / "examples" / "cifar10_small.yaml",
                      {"data.limit_train": 1500, "data.limit_test": 500, "train.epochs": 4, "train.threads": 1})
    run = kiln.train(cfg, out=str(tmp_path / "cifar"))
    assert run.metrics["test"]["accuracy"] > 0.3  # chance is 0.1; 41% here
    assert run.manifest["execution"]["fuse"]  # the first conv2d + maxpool2d runs fused


# ---- augmentation and blocks -------------------------------------------------------------------------------


class Aug:
    shift = rotate = scale = 0.0
    crop_scale, crop_ratio, flip = 1.0, (0.75, 4 / 3), False
    brightness = contrast = saturation = 0.0


def aug(**kw):
    a = Aug()
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_flip_mirrors_and_crop_and_jitter_stay_in_range():
    x = torch.rand(64, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    flipped = photo_augment(x, aug(flip=True), gen)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < int(mirrored.sum()) < 54
    out = photo_augment(x, aug(crop_scale=0.3, flip=True, brightness=0.4, contrast=0.4, saturation=0.4, rotate=10),
                        torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    again = photo_augment(x, aug(crop_scale=0.3, flip=True, brightness=0.4, contrast=0.4, saturation=0.4, rotate=10),
                          torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the run's seed decides it
    holes = cutout(torch.ones(16, 3, 8, 8), 0.5, torch.Generator().manual_seed(0))
    zeros = (holes == 0).all(1).flatten(1).sum(1)  # per image, pixels zeroed in every channel
    assert (zeros > 0).all() and (zeros <= 16).all()


def test_residual_and_global_pool_blocks():
    model = build_model(load_config({"model": {"blocks": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same"},
        {"type": "residual", "filters": 8}, {"type": "residual", "filters": 16, "stride": 2},
        {"type": "global_pool", "mode": "max"}, {"type": "classifier", "classes": 4}]}}).blocks, (3, 15, 15))
    assert [layer.out_shape for layer in model.layers] == [(8, 15, 15), (8, 15, 15), (16, 8, 8), (16,), (4,)]
    out = model(torch.randn(2, 3, 15, 15))
    assert out.shape == (2, 4)
    with pytest.raises(ConfigError, match="global_pool needs image"):
        build_model(load_config({"model": {"blocks": [{"type": "flatten"}, {"type": "global_pool"}]}}).blocks,
                    (3, 4, 4))


def test_fused_first_layer_on_colour_images_computes_the_same():
    cfg = load_config({"model": {"blocks": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "activation": "relu"}, {"type": "maxpool2d", "size": 2},
        {"type": "residual", "filters": 8}, {"type": "global_pool"}, {"type": "classifier", "classes": 3}]}})
    torch.manual_seed(0)
    plain = build_model(cfg.blocks, (3, 16, 16)).eval()
    fused = build_model(cfg.blocks, (3, 16, 16)).eval()
    fused.load_state_dict(plain.state_dict())
    assert fuse(fused)
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(plain(x), fused(x), atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_empty_class_folder_is_named(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=4)
    (folder / "yellow").mkdir()
    with pytest.raises(DataError, match=r"class folder .*yellow holds no images"):
        kind_of(data_cfg(folder))


def truncated_copy(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])


def test_truncated_or_unreadable_image_is_refused_or_skipped_with_names(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=8)
    truncated_copy(folder / "red" / "001.jpg", folder / "red" / "cut.jpg")
    (folder / "green" / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"2 image\(s\) cannot be read: .*(cut\.jpg|notes\.png).*bad_images: skip"):
        kind_of(data_cfg(folder)).load()
    kind = kind_of(data_cfg(folder, bad_images="skip"))
    s = kind.load()
    assert len(s.train_x) + len(s.val_x) + len(s.test_x) == 24
    assert sorted(Path(p).name for p in kind.skipped) == ["cut.jpg", "notes.png"]
    assert any("skipped 2 unreadable" in line and "cut.jpg" in line for line in kind.report())


def test_csv_labels_outside_the_classes_and_missing_files_are_named(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=4)
    red, blue, green = (sorted((folder / c).iterdir())[0].relative_to(folder) for c in ("red", "blue", "green"))
    csv_path = folder / "labels.csv"
    csv_path.write_text(f"path,label\n{red},red\n{blue},blue\n{green},grene\n")
    with pytest.raises(DataError, match=r"line 4: label 'grene' is not one of data.classes .*did you mean 'green'"):
        kind_of(data_cfg(csv_path, classes=["red", "green", "blue"]))
    csv_path.write_text(f"path,label,split\n{red},red,train\n{blue},blue,train\n{green},green,test\n")
    with pytest.raises(DataError, match=r"line 4: test label 'green' is not a class of the training images"):
        kind_of(data_cfg(csv_path))
    csv_path.write_text(f"path,label\n{red},red\nblue/nothere.png,blue\n")
    with pytest.raises(DataError, match=r"line 3: image 'blue/nothere.png' not found"):
        kind_of(data_cfg(csv_path))
    csv_path.write_text(f"file,label\n{red},red\n")
    with pytest.raises(DataError, match=r"data.path_column: .* no column 'path'"):
        kind_of(data_cfg(csv_path))


def test_test_folder_class_not_in_train_is_named(tmp_path, cache):
    folder = write_folder(tmp_path / "photos", per_class=4, split_folders=True)
    (folder / "test" / "purple").mkdir()
    photo((120, 0, 120), (16, 16), 0).save(folder / "test" / "purple" / "a.png")
    with pytest.raises(DataError, match="test label 'purple' is not a class of the training images"):
        kind_of(data_cfg(folder))


def test_bad_input_on_the_command_line_is_an_error_not_a_traceback(tmp_path, cache, capsys):
    folder = write_folder(tmp_path / "photos", per_class=4)
    truncated_copy(folder / "red" / "001.jpg", folder / "red" / "cut.jpg")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(config(folder, epochs=1)))
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "cut.jpg" in err and "Traceback" not in err
    assert main(["train", str(cfg), "--out", str(tmp_path / "r2"), "--set", "data.channels=2"]) == 2
    assert "data.channels" in capsys.readouterr().err
