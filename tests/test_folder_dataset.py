"""The image-folder dataset (data.name=folder): layouts, exact pixels, errors, cache, CLI end to end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lipmargin.data import DatasetError, folder_classes, load_dataset
from lipmargin.data import folder as folder_module
from lipmargin.data import images as images_module

Image = pytest.importorskip("PIL.Image")

CLASSES = ("square", "circle", "stripe")  # deliberately unsorted: labels follow the sorted names
CACHE = ".lipmargin-folder-cache.npz"


def pattern(label: int, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """(size, size, 3) uint8: dark noise plus a bright pattern that tells the class."""
    a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    if label == 0:
        a[:, : size // 2] += 150
    elif label == 1:
        a[: size // 2] += 150
    else:
        a[::2, ::2] += 150
    return a


def write_folder(base: Path, n: int = 6, classes: tuple[str, ...] = CLASSES, seed: int = 0) -> dict[Path, np.ndarray]:
    """``base/<class>/<i>.png`` for each class; returns every file's pixels (H, W, 3)."""
    rng = np.random.default_rng(seed)
    written: dict[Path, np.ndarray] = {}
    for name in classes:
        (base / name).mkdir(parents=True)
        for i in range(n):
            pixels = pattern(sorted(classes).index(name) % 3, rng)
            path = base / name / f"img{i}.png"
            Image.fromarray(pixels).save(path)
            written[path] = pixels
    return written


def expected_test_names(names: list[str]) -> set[str]:
    """The documented rule: the floor(n / 5) names with the smallest SHA-256 digests."""
    ranked = sorted(names, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return set(ranked[: len(names) // 5])


def as_chw(pixels: np.ndarray) -> np.ndarray:
    return pixels.transpose(2, 0, 1)


def test_flat_layout_labels_pixels_and_split(tmp_path: Path) -> None:
    written = write_folder(tmp_path, n=11)
    train = load_dataset("folder", root=tmp_path, split="train")
    test = load_dataset("folder", root=tmp_path, split="test")
    assert folder_classes(tmp_path) == ["circle", "square", "stripe"]
    assert train.num_classes == test.num_classes == 3 and train.name == "folder"
    assert train.inputs.dtype == torch.uint8 and train.input_shape == test.input_shape == (3, 8, 8)
    assert len(train) + len(test) == 33 and len(test) == 3 * (11 // 5)
    # rebuild both splits from the files and the documented rule, in dataset order (class, file name)
    want = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(sorted(CLASSES)):
        files = sorted((p for p in written if p.parent.name == name), key=lambda p: p.name)
        test_names = expected_test_names([p.name for p in files])
        for p in files:
            part = want["test" if p.name in test_names else "train"]
            part[0].append(as_chw(written[p]))
            part[1].append(label)
    for ds, key in ((train, "train"), (test, "test")):
        assert np.array_equal(ds.inputs.numpy(), np.stack(want[key][0]))
        assert ds.labels.tolist() == want[key][1]
    assert sorted(set(test.labels.tolist())) == [0, 1, 2]  # every class is in the test split


def test_split_layout_prefers_test_then_val(tmp_path: Path) -> None:
    train_px = write_folder(tmp_path / "train", n=2, seed=1)
    val_px = write_folder(tmp_path / "val", n=1, seed=2)
    (tmp_path / "README.txt").write_text("plain files beside the class folders are ignored")
    train = load_dataset("folder", root=tmp_path, split="train")
    test = load_dataset("folder", root=tmp_path, split="test")
    assert len(train) == 6 and len(test) == 3
    assert test.labels.tolist() == [0, 1, 2]
    val_files = [tmp_path / "val" / name / "img0.png" for name in sorted(CLASSES)]
    assert np.array_equal(test.inputs.numpy(), np.stack([as_chw(val_px[p]) for p in val_files]))
    assert np.array_equal(train.inputs[0].numpy(), as_chw(train_px[tmp_path / "train" / "circle" / "img0.png"]))
    # a test/ folder wins over val/
    write_folder(tmp_path / "test", n=4, seed=3)
    assert len(load_dataset("folder", root=tmp_path, split="test")) == 12


def test_grayscale_gives_one_channel_unless_an_image_has_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    gray: dict[Path, np.ndarray] = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(5):
            path = tmp_path / name / f"{i}.png"
            gray[path] = rng.integers(0, 256, (6, 7), dtype=np.uint8)
            Image.fromarray(gray[path], mode="L").save(path)
    ds = load_dataset("folder", root=tmp_path, split="train")
    assert ds.input_shape == (1, 6, 7)  # (C, H, W) of 7-wide, 6-high images
    files = [p for p in sorted(gray) if p.name not in expected_test_names([f"{i}.png" for i in range(5)])]
    assert np.array_equal(ds.inputs.numpy(), np.stack([gray[p][None] for p in files]))
    colour = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "b" / "9.png")
    rgb = load_dataset("folder", root=tmp_path, split="train")
    assert rgb.input_shape == (3, 6, 7)
    first = rgb.inputs[0].numpy()
    assert np.array_equal(first, np.repeat(gray[files[0]][None], 3, axis=0))  # gray repeated, like L -> RGB
    both = torch.cat([rgb.inputs, load_dataset("folder", root=tmp_path, split="test").inputs])
    assert any(np.array_equal(x.numpy(), as_chw(colour)) for x in both)


def test_jpeg_and_hidden_files(tmp_path: Path) -> None:
    write_folder(tmp_path, n=5)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "circle" / "extra.JPG")
    (tmp_path / "circle" / ".DS_Store").write_bytes(b"\0junk")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("ignored")
    train = load_dataset("folder", root=tmp_path, split="train")
    test = load_dataset("folder", root=tmp_path, split="test")
    assert len(train) + len(test) == 16 and train.num_classes == 3


def test_errors_are_one_line_and_name_the_culprit(tmp_path: Path) -> None:
    def fails(match: str, root: Path | None = tmp_path, split: str = "train") -> None:
        with pytest.raises(DatasetError, match=match) as err:
            load_dataset("folder", root=root, split=split)
        assert "\n" not in str(err.value)

    fails("no root given; pass root=DIR", root=None)
    fails(f"root {re.escape(str(tmp_path / 'missing'))} does not exist", root=tmp_path / "missing")
    fails(f"no class folders in {re.escape(str(tmp_path))}")
    written = write_folder(tmp_path, n=5)
    (tmp_path / "empty").mkdir()
    fails(f"the class folder {re.escape(str(tmp_path / 'empty'))} holds no images")
    (tmp_path / "empty").rmdir()
    (tmp_path / "circle" / "notes.txt").write_text("x")
    fails(r"notes.txt is not a PNG or JPEG file \(suffixes .png, .jpg, .jpeg\); remove it")
    (tmp_path / "circle" / "notes.txt").unlink()
    (tmp_path / "circle" / "sub").mkdir()
    fails("sub is a folder inside the class folder")
    (tmp_path / "circle" / "sub").rmdir()
    corrupt = tmp_path / "square" / "img2.png"
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated PNG
    fails(f"cannot decode {re.escape(str(corrupt))} .*replace the file")
    Image.fromarray(written[corrupt]).save(corrupt)
    big = tmp_path / "stripe" / "img4.png"
    Image.fromarray(np.zeros((9, 10, 3), np.uint8)).save(big)
    first = re.escape(str(tmp_path / "circle" / "img0.png"))
    fails(rf"images differ in size: {first} is 8x8 but {re.escape(str(big))} is 10x9; resize them")
    Image.fromarray(written[big]).save(big)
    deep = tmp_path / "stripe" / "img3.png"
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(deep)
    fails(rf"{re.escape(str(deep))} has I\S* pixels \(16-bit or floating point\); save it as 8-bit")
    Image.fromarray(written[deep]).save(deep)
    assert len(load_dataset("folder", root=tmp_path)) == 12  # repaired


def test_too_few_images_and_split_layout_errors(tmp_path: Path) -> None:
    write_folder(tmp_path / "flat", n=4)
    with pytest.raises(DatasetError, match="no test images: every class folder .* has fewer than 5 images"):
        load_dataset("folder", root=tmp_path / "flat")
    write_folder(tmp_path / "split" / "train", n=2)
    with pytest.raises(DatasetError, match="train exists but neither .*test nor .*val"):
        load_dataset("folder", root=tmp_path / "split")
    write_folder(tmp_path / "split" / "test", n=1, classes=("circle", "square", "zebra"))
    with pytest.raises(DatasetError, match=r"same class folders; .*test lacks \['stripe'\] and has extra \['zebra'\]"):
        load_dataset("folder", root=tmp_path / "split", split="test")


def test_cache_reused_and_invalidated_by_the_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_folder(tmp_path, n=5)
    first = load_dataset("folder", root=tmp_path)
    assert (tmp_path / CACHE).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [CACHE]  # no temporary files left
    decoded: list[Path] = []
    real = images_module.decode_image

    def counting(path: Path, name: str, rgb: bool) -> np.ndarray:
        decoded.append(path)
        return real(path, name, rgb)

    monkeypatch.setattr(images_module, "decode_image", counting)
    again = load_dataset("folder", root=tmp_path)
    assert decoded == [] and torch.equal(again.inputs, first.inputs) and torch.equal(again.labels, first.labels)
    assert len(load_dataset("folder", root=tmp_path, split="test")) == 3 and decoded == []

    # a new mtime invalidates (same name, same size)
    path = next(iter(written))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_dataset("folder", root=tmp_path)
    assert len(decoded) == 15
    # new content of another size invalidates, and is what the next load returns
    decoded.clear()
    new = np.full((8, 8, 3), 7, np.uint8)
    Image.fromarray(new).save(path)
    reloaded = torch.cat([load_dataset("folder", root=tmp_path).inputs, load_dataset("folder", root=tmp_path, split="test").inputs])
    assert len(decoded) == 15 and any(np.array_equal(x.numpy(), as_chw(new)) for x in reloaded)
    # a new file invalidates
    decoded.clear()
    Image.fromarray(new).save(tmp_path / "circle" / "img9.png")
    assert len(load_dataset("folder", root=tmp_path)) + len(load_dataset("folder", root=tmp_path, split="test")) == 16
    assert len(decoded) == 16


def test_cache_hit_needs_no_pillow_and_a_broken_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path, n=5)
    first = load_dataset("folder", root=tmp_path)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "PIL", None)
        m.setitem(sys.modules, "PIL.Image", None)
        assert torch.equal(load_dataset("folder", root=tmp_path).inputs, first.inputs)
        (tmp_path / CACHE).unlink()
        with pytest.raises(DatasetError, match="needs Pillow, which is not installed: pip install pillow"):
            load_dataset("folder", root=tmp_path)
    (tmp_path / CACHE).write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        rebuilt = load_dataset("folder", root=tmp_path)
    assert torch.equal(rebuilt.inputs, first.inputs)
    with np.load(tmp_path / CACHE) as npz:  # rewritten: every image of both splits
        assert npz["images"].shape == (15, 3, 8, 8)


def test_read_only_root_writes_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path, n=5)
    real_access = os.access

    def no_write(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        if Path(str(path)) == tmp_path and mode & os.W_OK:
            return False  # as for a read-only folder (the tests may run as root, who may write anywhere)
        return real_access(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(folder_module.os, "access", no_write)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("folder", root=tmp_path)
    assert len(ds) == 12 and not (tmp_path / CACHE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CLASSES)


def test_loading_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    write_folder(tmp_path, n=5)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    load_dataset("folder", root=tmp_path)
    load_dataset("folder", root=tmp_path, split="test")
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))


def test_cli_train_then_certify_on_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lipmargin.cli import main

    data = tmp_path / "images"
    write_folder(data / "train", n=4)
    write_folder(data / "test", n=2, seed=5)
    run = tmp_path / "run"
    argv = ["train", "--set", "data.name=folder", "--set", f"data.root={data}", "--set", "model.name=mlp",
            "--set", "model.widths=[16]", "--set", "train.epochs=2", "--set", "train.batch_size=4",
            "--out", str(run), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["certify", str(run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["num_samples"] == 6 and payload["split"] == "test" and payload["sound"] is True
    clean = payload["clean_accuracy"]
    assert 0.0 <= clean <= 1.0 and all(v <= clean for v in payload["certified_accuracy"].values())
    # a missing root is a one-line error with exit code 2
    bad = ["train", "--set", "data.name=folder", "--set", f"data.root={tmp_path / 'nope'}", "--out", str(tmp_path / "r2")]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err and "Traceback" not in err
