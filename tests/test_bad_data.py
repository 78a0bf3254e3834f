"""Bad data (issue 14, item 4): damaged images, npz files, zips and CSVs, classes with too few examples
and wrong folder layouts give an error naming the file or class; downloads are verified against their
SHA-256; an archive member that would land outside the data root is refused. Tiny fake datasets only."""
from __future__ import annotations

import hashlib
import io
import stat
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from maml_fast.data import EpisodeSampler, MiniImageNet, Omniglot, download_omniglot, read_omniglot_npz, read_omniglot_pngs
from maml_fast.data import omniglot as omniglot_module

Image = pytest.importorskip("PIL.Image")


def png_bytes(seed: int = 0, size: int = 105) -> bytes:
    ink = np.random.default_rng(seed).random((size, size)) < 0.9
    buffer = io.BytesIO()
    Image.fromarray(ink).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (84, 84), color).save(buffer, format="JPEG")
    return buffer.getvalue()


MEMBER = "images_background/Alpha/character01/0001_{:02d}.png"


# --- Omniglot: PNG layout ---------------------------------------------------------------------------


def write_folder(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_damaged_png_in_a_folder_is_named(tmp_path):
    write_folder(tmp_path, {MEMBER.format(1): png_bytes(), MEMBER.format(2): b"\x89PNG\r\n\x1a\n not really"})
    with pytest.raises(ValueError, match=r"0001_02\.png is not a readable image"):
        read_omniglot_pngs(tmp_path)
    truncated = png_bytes()[:200]
    (tmp_path / MEMBER.format(2)).write_bytes(truncated)
    with pytest.raises(ValueError, match=r"character01/0001_02\.png is not a readable image"):
        read_omniglot_pngs(tmp_path, "binary")


def test_damaged_zip_and_member_are_named(tmp_path):
    zip_path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:  # stored: the member's bytes sit as they are in the file
        archive.writestr(MEMBER.format(1), png_bytes())
        archive.writestr(MEMBER.format(2), b"garbage, not a png")
    with pytest.raises(ValueError, match=r"images_background\.zip:images_background/Alpha/character01/0001_02\.png "
                                          r"is not a readable image"):
        read_omniglot_pngs(tmp_path)
    # A flipped byte inside a member: its CRC check fails, named with the member.
    data = bytearray(zip_path.read_bytes())
    offset = data.index(b"garbage")
    data[offset] ^= 0xFF
    zip_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"images_background\.zip:images_background/Alpha/character01/0001_02\.png "
                                          r"is damaged \(BadZipFile"):
        read_omniglot_pngs(tmp_path)
    # A truncated zip (a cut download): the archive itself is named.
    zip_path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"images_background\.zip is not a readable zip file"):
        read_omniglot_pngs(tmp_path)


def test_wrong_folder_layout_is_named(tmp_path):
    # Extracted into a folder of the same name: one level too deep.
    write_folder(tmp_path, {"images_background/" + MEMBER.format(1): png_bytes()})
    with pytest.raises(ValueError, match=r"images_background/images_background/Alpha/character01/0001_01\.png, "
                                          r"not at images_background/<Alphabet>/characterNN/NNNN_DD\.png"):
        read_omniglot_pngs(tmp_path)
    # PNGs straight in the set folder (no alphabet / character folders).
    other = tmp_path / "flat"
    write_folder(other, {"images_background/0001_01.png": png_bytes()})
    with pytest.raises(ValueError, match=r"flat/images_background/0001_01\.png, not at"):
        read_omniglot_pngs(other)
    # A set folder with no PNGs at all.
    empty = tmp_path / "empty"
    (empty / "images_background" / "Alpha").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty/images_background holds no PNG files"):
        read_omniglot_pngs(empty)


@pytest.mark.parametrize("member", ["../../escaped.png", "/tmp/absolute.png", "images_background/../../up.png"])
def test_zip_member_outside_the_data_root_is_refused(tmp_path, member):
    root = tmp_path / "data"
    root.mkdir()
    with zipfile.ZipFile(root / "images_background.zip", "w") as archive:
        archive.writestr(MEMBER.format(1), png_bytes())
        archive.writestr(member, png_bytes(1))
    with pytest.raises(ValueError, match=r"images_background\.zip holds '" + member.replace(".", r"\.")
                                         + r"', which would land outside the data root"):
        read_omniglot_pngs(root)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["images_background.zip"]


def test_zip_symlink_member_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as archive:
        link = zipfile.ZipInfo(MEMBER.format(1))
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match=r"0001_01\.png', a symbolic link: refused"):
        read_omniglot_pngs(tmp_path)


# --- Omniglot: npz ----------------------------------------------------------------------------------


def small_omniglot28(drop: int | None = None, duplicate: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an omniglot28.npz (blank images), optionally without / with twice one image slot."""
    slots = np.arange(1623 * 20)
    if drop is not None:
        slots = np.delete(slots, drop)
    if duplicate is not None:
        slots = np.append(slots, duplicate)
    n = slots.size
    return {"images": np.zeros((n, 28, 28), np.uint8), "char_id": (slots // 20 + 1).astype(np.uint16),
            "drawer": (slots % 20 + 1).astype(np.uint8), "split": np.full(n, "background"),
            "vinyals_split": np.full(n, "train")}


def test_character_with_a_missing_drawing_is_named(tmp_path):
    path = tmp_path / "omniglot28.npz"
    np.savez(path, **small_omniglot28(drop=11 * 20 + 6))  # character 12, drawer 7
    with pytest.raises(ValueError, match=r"1 missing.*character 12 has 19 of 20 drawings \(drawers \[7\] missing\)"):
        read_omniglot_npz(path)
    np.savez(path, **small_omniglot28(drop=11 * 20 + 6, duplicate=11 * 20 + 5))
    with pytest.raises(ValueError, match=r"character 12 has 19 of 20 drawings \(drawers \[7\] missing, drawers \[6\] twice\)"):
        Omniglot(root=tmp_path)


def test_damaged_npz_is_named(tmp_path):
    path = tmp_path / "omniglot28.npz"
    path.write_bytes(b"this is not an npz file at all")
    with pytest.raises(ValueError, match=r"omniglot28\.npz is damaged or not an npz file"):
        Omniglot(root=tmp_path)
    np.savez_compressed(path, **small_omniglot28())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: the zip directory at the end is gone
    with pytest.raises(ValueError, match=r"omniglot28\.npz is damaged"):
        read_omniglot_npz(path)
    # An array that needs pickle to load (refused by numpy): named, not a raw numpy error.
    arrays = small_omniglot28()
    arrays["char_id"] = arrays["char_id"].astype(object)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"omniglot28\.npz is damaged: reading it failed with ValueError"):
        read_omniglot_npz(path)
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(ValueError, match=r"single\.npz holds a single array"):
        read_omniglot_npz(tmp_path / "single.npz")


# --- Omniglot: download verification -----------------------------------------------------------------


def fake_urlopen(payloads: dict[str, bytes]):
    def urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[-1].removesuffix(".zip")
        return io.BytesIO(payloads[name])
    return urlopen


def zip_bytes(set_name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{set_name}/Alpha/character01/0001_01.png", png_bytes())
    return buffer.getvalue()


def test_download_is_verified_against_sha256(tmp_path, monkeypatch):
    payloads = {name: zip_bytes(name) for name in omniglot_module.OFFICIAL_SETS}
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()}
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(payloads))
    root = tmp_path / "omniglot"
    # By default the official sums: these payloads are not the official zips, so they are refused, with
    # the sum they got and how to accept a repacked mirror; nothing left behind.
    with pytest.raises(ValueError, match="its SHA-256 is " + sums["images_background"]) as error:
        download_omniglot(root)
    assert omniglot_module.OFFICIAL_ZIP_SHA256["images_background"] in str(error.value)
    assert "download_sha256=" in str(error.value)
    assert not list(root.iterdir())
    # A wrong sum (an altered download): refused, naming the file, the URL and both sums.
    wrong = {**sums, "images_evaluation": "0" * 64}
    with pytest.raises(ValueError, match=r"images_evaluation\.zip\.part but its SHA-256 is " + sums["images_evaluation"]):
        Omniglot(root=root, download=True, download_sha256=wrong)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip"]  # the good one is kept
    # The right sums: both kept.
    download_omniglot(root, sums)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    with pytest.raises(ValueError, match="sha256 has entries for"):
        download_omniglot(root, {"images_background.zip": sums["images_background"]})


# --- MiniImageNet -----------------------------------------------------------------------------------


def write_mini(root: Path, classes=("n01", "n02"), per_class=3) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["filename,label"]
    for label in classes:
        for index in range(per_class):
            name = f"{label}{index:08d}.jpg"
            (root / "images" / name).write_bytes(jpeg_bytes())
            rows.append(f"{name},{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")


def test_miniimagenet_damaged_image_names_file_and_class(tmp_path):
    write_mini(tmp_path)
    assert MiniImageNet(tmp_path).images.shape == (2, 3, 3, 84, 84)
    (tmp_path / "images" / "n0200000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"images/n0200000001\.jpg is not a readable image .*"
                                          r"listed in .*train\.csv for class n02"):
        MiniImageNet(tmp_path)
    (tmp_path / "images" / "n0200000001.jpg").write_bytes(jpeg_bytes()[:300])  # truncated download
    with pytest.raises(ValueError, match=r"n0200000001\.jpg is not a readable image \(OSError"):
        MiniImageNet(tmp_path)


def test_miniimagenet_damaged_csv_is_named(tmp_path):
    write_mini(tmp_path)
    (tmp_path / "train.csv").write_bytes(b"filename,label\n\xff\xfe\x00garbage\x9c,n01\n")
    with pytest.raises(ValueError, match=r"train\.csv is not a readable 'filename,label' CSV \(UnicodeDecodeError"):
        MiniImageNet(tmp_path)
    (tmp_path / "train.csv").write_text("filename,label\nn0100000000.jpg,n01\n,n01\n")
    with pytest.raises(ValueError, match=r"train\.csv line 3: expected 'filename,label'"):
        MiniImageNet(tmp_path)
    (tmp_path / "train.csv").write_text("filename,label\n../../secret.jpg,n01\n")
    with pytest.raises(ValueError, match=r"train\.csv line 2: '\.\./\.\./secret\.jpg' is not a plain file name"):
        MiniImageNet(tmp_path)


def test_class_with_too_few_examples_is_named(tmp_path):
    write_mini(tmp_path, classes=("n01", "n02", "n03"), per_class=4)
    rows = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(row for row in rows if not row.startswith("n0200000003")) + "\n")
    with pytest.raises(ValueError, match=r"2 classes have 4 but class n02 has 3"):
        MiniImageNet(tmp_path)
    write_mini(tmp_path, classes=("n01", "n02", "n03"), per_class=4)
    dataset = MiniImageNet(tmp_path)
    with pytest.raises(ValueError, match=r"shots \+ queries = 2 \+ 3 = 5 is more than the 4 examples class 'n01' "
                                          r"\(and each of the other 2\) has"):
        EpisodeSampler(dataset, ways=2, shots=2, queries=3, meta_batch_size=1)
    plain = SimpleNamespace(images=torch.zeros(5, 4, 1, 2, 2), num_classes=5)
    with pytest.raises(ValueError, match="more than the 4 examples each of the dataset's 5 classes has"):
        EpisodeSampler(plain, ways=2, shots=1, queries=4, meta_batch_size=1)
