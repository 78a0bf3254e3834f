"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): 1623 handwritten characters x 20 drawers, 28x28.

Sources, all giving the same arrays (`load_omniglot_characters`):

* ``root=None``: the compact copy bundled in ``maml_fast/data/assets`` (no network, no files);
* a packed ``omniglot28.npz`` (a file path, or a folder holding one);
* the official layout in a folder: ``images_background/<Alphabet>/characterNN/NNNN_DD.png`` and
  ``images_evaluation/...``, extracted or as the official ``images_background.zip`` and
  ``images_evaluation.zip``; ``download=True`` fetches those zips (each verified against its SHA-256,
  `OFFICIAL_ZIP_SHA256` or ``download_sha256=``). Zip members that would land outside the data root,
  damaged files and a wrong layout are refused with an error naming the file.

Pixels (`pixels=`): ``"grayscale"`` (default) is the 105x105 image as 8-bit grayscale resized with
LANCZOS (anti-aliased); ``"binary"`` is what cbfinn/maml's ``resize_images.py`` produces, i.e.
``Image.open(png).resize((28, 28), LANCZOS)`` on the mode-1 PNG, which Pillow performs as NEAREST.
Character IDs are the official ``NNNN`` of the PNG names (1..1623, background 1..964 first).
"""
from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import stat
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from maml_fast.checks import check_choice
from maml_fast.data.episodes import ClassImageDataset

NUM_CHARACTERS = 1623
DRAWERS_PER_CHARACTER = 20
IMAGE_SIZE = 28
OFFICIAL_SETS = ("images_background", "images_evaluation")
OFFICIAL_SPLIT_NAMES = ("background", "evaluation")
VINYALS_SPLIT_NAMES = ("train", "val", "test")
OFFICIAL_ZIP_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{set_name}.zip"
PACKED_NPZ_NAME = "omniglot28.npz"
BUNDLED_PATH = Path(__file__).resolve().parent / "assets" / "omniglot28_compact.npz"
PIXELS = ("grayscale", "binary")
PROTOCOLS = ("paper", "vinyals", "official")
SPLITS = ("train", "val", "test")
# The MAML reference code shuffles the character folders with random.seed(1), then takes 1200 for
# meta-training (of which its code holds out the last 100 for validation) and the rest for testing.
PAPER_SPLIT_SEED = 1
PAPER_TRAIN_CHARACTERS = 1200

_PNG_NAME = re.compile(r"(\d{4})_(\d{2})\.png")
_DOWNLOAD_TIMEOUT_S = 60
# SHA-256 and size of the official zips (brendenlake/omniglot, python/*.zip), checked after every
# download: the sums TensorFlow Datasets publishes for these URLs (tensorflow_datasets/url_checksums/
# omniglot.txt). ``download_sha256=`` overrides them (e.g. for a mirror that repacked the files).
OFFICIAL_ZIP_SHA256 = {
    "images_background": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",  # 9,464,212 B
    "images_evaluation": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",  # 6,462,886 B
}
# Errors a damaged zip or npz raises on reading (zipfile, zlib, numpy's format checks, truncation).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)


@dataclass(frozen=True)
class OmniglotCharacters:
    """All 1623 characters, sorted by official character ID, in the files' polarity (255 = paper)."""

    images: np.ndarray  # [1623, 20, 28, 28] uint8, index [char_id - 1, drawer - 1]
    char_id: np.ndarray  # [1623] int64, 1..1623
    official_split: np.ndarray  # [1623] str: "background" or "evaluation"
    vinyals_split: np.ndarray  # [1623] str: "train", "val" or "test" (Vinyals et al. 2016)


def _slot_order(char_id: np.ndarray, drawer: np.ndarray, where: str) -> np.ndarray:
    """[1623, 20] indices into per-image arrays: entry [c - 1, d - 1] is the image of character c by
    drawer d. Raises if any of the 32,460 slots is missing or filled twice."""
    slot = (char_id.astype(np.int64) - 1) * DRAWERS_PER_CHARACTER + drawer.astype(np.int64) - 1
    expected = NUM_CHARACTERS * DRAWERS_PER_CHARACTER
    in_range = (slot >= 0) & (slot < expected)
    counts = np.bincount(slot[in_range], minlength=expected)
    if not in_range.all() or (counts != 1).any():
        raise ValueError(
            f"{where} holds {slot.size} Omniglot images but needs each of the {expected} "
            f"(1623 characters x 20 drawers) exactly once: {int((counts == 0).sum())} missing, "
            f"{int((counts > 1).sum())} duplicated, {int((~in_range).sum())} with IDs out of range"
            + _incomplete_characters(counts)
        )
    order = np.empty(expected, np.int64)
    order[slot] = np.arange(slot.size)
    return order.reshape(NUM_CHARACTERS, DRAWERS_PER_CHARACTER)


def _incomplete_characters(counts: np.ndarray, shown: int = 5) -> str:
    """"; character 12 has 19 of 20 drawings (drawer 7 missing), ..." for the first few characters
    (classes) whose drawings are not each there exactly once."""
    per_drawer = counts.reshape(NUM_CHARACTERS, DRAWERS_PER_CHARACTER)
    bad = np.flatnonzero((per_drawer != 1).any(axis=1))
    if bad.size == 0 or bad.size == NUM_CHARACTERS:  # none, or a partial layout: the counts say it all
        return ""
    parts = []
    for index in bad[:shown]:
        row = per_drawer[index]
        missing = (np.flatnonzero(row == 0) + 1).tolist()
        doubled = (np.flatnonzero(row > 1) + 1).tolist()
        detail = ", ".join(([f"drawers {missing} missing"] if missing else []) + ([f"drawers {doubled} twice"] if doubled else []))
        parts.append(f"character {index + 1} has {int(row.clip(max=1).sum())} of {DRAWERS_PER_CHARACTER} drawings ({detail})")
    more = f", and {bad.size - shown} more characters" if bad.size > shown else ""
    return "; " + "; ".join(parts) + more


def read_omniglot_npz(path: str | Path, pixels: str = "grayscale") -> OmniglotCharacters:
    """Read the bundled compact npz or a full ``omniglot28.npz`` (keys as in its README)."""
    check_choice("pixels", pixels, PIXELS)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Omniglot npz file {path} does not exist")
    try:
        data = np.load(path)
    except _ARCHIVE_ERRORS as error:
        raise ValueError(f"Omniglot npz file {path} is damaged or not an npz file ({type(error).__name__}: {error})") from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"Omniglot npz file {path} holds a single array, not an npz archive of named arrays")
    with data:
        try:
            return _read_npz_arrays(data, path, pixels)
        except _ARCHIVE_ERRORS as error:
            if isinstance(error, ValueError) and str(path) in str(error):
                raise  # our own message about this file
            raise ValueError(f"Omniglot npz file {path} is damaged: reading it failed with "
                             f"{type(error).__name__}: {error}") from error


def _read_npz_arrays(data: np.lib.npyio.NpzFile, path: Path, pixels: str) -> OmniglotCharacters:
    if "gray_ink_mask" in data.files:
        return _unpack_compact(data, pixels)
    image_key = "images" if pixels == "grayscale" else "images_nearest"
    needed = (image_key, "char_id", "drawer", "split", "vinyals_split")
    if any(key not in data.files for key in needed):
        raise ValueError(
            f"{path} is neither the bundled compact file nor an omniglot28.npz: pixels={pixels!r} "
            f"needs the keys {needed}, found {data.files}"
        )
    images = data[image_key]
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{path}[{image_key!r}] holds images of shape {images.shape[1:]}, expected 28x28")
    order = _slot_order(data["char_id"], data["drawer"], str(path))
    # Per-character labels: the file repeats them per image; take each character's first drawing.
    first_drawing = order[:, 0]
    return OmniglotCharacters(
        images=images[order],
        char_id=np.arange(1, NUM_CHARACTERS + 1),
        official_split=data["split"][first_drawing].astype(str),
        vinyals_split=data["vinyals_split"][first_drawing].astype(str),
    )


def _unpack_compact(data: np.lib.npyio.NpzFile, pixels: str) -> OmniglotCharacters:
    """Undo ``assets/make_compact_omniglot.py`` (its docstring describes the layout)."""
    shape = (NUM_CHARACTERS, DRAWERS_PER_CHARACTER, IMAGE_SIZE, IMAGE_SIZE)
    count = int(np.prod(shape))
    if pixels == "grayscale":
        ink = np.unpackbits(data["gray_ink_mask"], count=count).reshape(shape).astype(bool)
        column_major = np.full(shape, 255, np.uint8)
        column_major[ink] = data["gray_ink_values"]
        images = np.ascontiguousarray(column_major.transpose(0, 1, 3, 2))
    else:
        ink = np.unpackbits(data["binary_ink_bits"], count=count).reshape(shape)
        images = np.where(ink == 1, 0, 255).astype(np.uint8)
    return OmniglotCharacters(
        images=images,
        char_id=data["char_id"].astype(np.int64),
        official_split=data["official_split_names"][data["official_split"]],
        vinyals_split=data["vinyals_split_names"][data["vinyals_split"]],
    )


def _official_sources(root: Path) -> dict[str, Path]:
    """The official sets present under `root`: set name -> extracted folder (preferred) or zip."""
    sources = {}
    for set_name in OFFICIAL_SETS:
        if (root / set_name).is_dir():
            sources[set_name] = root / set_name
        elif (root / f"{set_name}.zip").is_file():
            sources[set_name] = root / f"{set_name}.zip"
    return sources


def _where_to_put(root: Path) -> str:
    return (
        f"Put one of these under {root}: the official zips images_background.zip and images_evaluation.zip "
        f"(from https://github.com/brendenlake/omniglot/tree/master/python) as {root / 'images_background.zip'} "
        f"and {root / 'images_evaluation.zip'}; or the extracted folders "
        f"{root / 'images_background'}/<Alphabet>/characterNN/NNNN_DD.png and {root / 'images_evaluation'}/...; "
        f"or a packed {root / PACKED_NPZ_NAME}. Or pass download=True (needs network), or root=None for "
        "the copy bundled with maml_fast."
    )


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_download(path: Path, url: str, expected_sha256: str) -> None:
    """Refuse (ValueError, naming the file, the URL and both sums) a download whose SHA-256 is not the
    expected one."""
    got = _file_digest(path, "sha256")
    if got != expected_sha256.lower():
        raise ValueError(f"{url} was downloaded to {path} but its SHA-256 is {got}, not the expected "
                         f"{expected_sha256}: a damaged or altered download, refused (a mirror that "
                         "repacked the files: check them, then pass download_sha256={set name: sum})")


def download_omniglot(root: str | Path, sha256: dict[str, str] | None = None) -> None:
    """Fetch the official images_background.zip and images_evaluation.zip into `root` (skipping sets
    already there). Raises RuntimeError, saying where to put the files by hand, when offline. Each
    download is verified against its SHA-256 (`sha256`: set name -> sum, else `OFFICIAL_ZIP_SHA256`)
    before it is kept; a wrong or unknown sum raises ValueError and leaves nothing behind."""
    root = Path(root)
    expected = {**OFFICIAL_ZIP_SHA256, **(sha256 or {})}
    unknown_sets = set(expected) - set(OFFICIAL_SETS)
    if unknown_sets:
        raise ValueError(f"sha256 has entries for {sorted(unknown_sets)}; the sets are {OFFICIAL_SETS}")
    root.mkdir(parents=True, exist_ok=True)
    for set_name in OFFICIAL_SETS:
        if set_name in _official_sources(root):
            continue
        url = OFFICIAL_ZIP_URL.format(set_name=set_name)
        target = root / f"{set_name}.zip"
        partial = root / f"{set_name}.zip.part"  # renamed only when complete, so a cut leaves no bad zip
        try:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as error:  # urllib.error.URLError, timeouts and socket errors are all OSError
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"download=True could not fetch {url} ({error}). {_where_to_put(root)}") from error
        try:
            verify_download(partial, url, expected[set_name])
        except ValueError:
            partial.unlink()
            raise
        if not zipfile.is_zipfile(partial):
            partial.unlink()
            raise RuntimeError(f"{url} did not return a zip file. {_where_to_put(root)}")
        partial.replace(target)


def _member_path(root: Path, source: Path, name: str, info: zipfile.ZipInfo | None = None) -> Path:
    """Where archive member `name` of `source` would land if extracted under `root`; refuses one that
    would land outside it (zip-slip: ``../`` parts, an absolute path, a drive) or that is a symlink."""
    if info is not None and stat.S_ISLNK(info.external_attr >> 16):
        raise ValueError(f"{source} holds {name!r}, a symbolic link: refused (an archive member may not point elsewhere)")
    normalized = name.replace("\\", "/")
    target = (root / normalized).resolve()
    base = root.resolve()
    if normalized.startswith("/") or re.match(r"[A-Za-z]:", normalized) or not target.is_relative_to(base):
        raise ValueError(f"{source} holds {name!r}, which would land outside the data root {root}: refused "
                         "(a damaged or malicious archive)")
    return target


def _check_layout(source: Path, set_name: str, parts: tuple[str, ...], shown_name: str) -> None:
    """A PNG of an official set sits at ``<set>/<Alphabet>/characterNN/NNNN_DD.png``."""
    if len(parts) != 4 or parts[0] != set_name or not re.fullmatch(r"character\d{2}", parts[2]):
        raise ValueError(
            f"{source} holds {shown_name}, not at {set_name}/<Alphabet>/characterNN/NNNN_DD.png as in the "
            f"official layout (extracted twice into a folder of the same name, or a different dataset?)"
        )


def _png_files(source: Path, set_name: str) -> Iterator[tuple[str, bytes]]:
    """(where, PNG bytes) of every NNNN_DD.png in an official set folder or zip; `where` names the file
    (the zip member as ``zip:member``). Damaged zips and a wrong folder layout raise ValueError naming
    the file."""
    if source.is_dir():
        for path in sorted(source.rglob("*.png")):
            relative = (set_name,) + path.relative_to(source).parts
            _check_layout(source.parent, set_name, relative, str(path))
            yield str(path), path.read_bytes()
        return
    try:
        archive = zipfile.ZipFile(source)
    except _ARCHIVE_ERRORS as error:
        raise ValueError(f"{source} is not a readable zip file ({type(error).__name__}: {error}): "
                         "delete it and download it again") from error
    with archive:
        infos = sorted(archive.infolist(), key=lambda info: info.filename)
        for info in infos:  # every member is checked before any is read
            _member_path(source.parent, source, info.filename, info)
        for info in infos:
            if not info.filename.endswith(".png"):
                continue
            where = f"{source}:{info.filename}"
            _check_layout(source, set_name, tuple(info.filename.split("/")), where)
            try:
                data = archive.read(info)
            except _ARCHIVE_ERRORS as error:
                raise ValueError(f"{where} is damaged ({type(error).__name__}: {error}): delete {source} "
                                 "and download it again") from error
            yield where, data


def _resize_png(png: bytes, pixels: str, where: str = "<png>") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only the PNG layout needs Pillow; the npz sources do not

    try:
        with Image.open(io.BytesIO(png)) as image:
            if pixels == "binary":
                # Pillow resizes mode-1 images with NEAREST whatever filter is asked for: cbfinn/maml asks
                # for LANCZOS and gets exactly this.
                resized = image.convert("1").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
            else:
                resized = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
            return np.asarray(resized.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error) as error:
        raise ValueError(f"{where} is not a readable image ({type(error).__name__}: {error})") from error


def read_omniglot_pngs(root: str | Path, pixels: str = "grayscale") -> dict[str, np.ndarray]:
    """Every PNG of the official sets present under `root` (folders or zips), resized to 28x28.

    Returns ``images`` [n, 28, 28] uint8 (255 = paper), ``char_id`` and ``drawer`` (from the
    ``NNNN_DD.png`` names) and ``official_split`` ("background"/"evaluation", from the set), each [n].
    Works on any subset of files; `Omniglot` then requires all 32,460.
    """
    check_choice("pixels", pixels, PIXELS)
    root = Path(root)
    sources = _official_sources(root)
    if not sources:
        raise FileNotFoundError(f"no official Omniglot sets under {root}. {_where_to_put(root)}")
    images, char_id, drawer, official_split = [], [], [], []
    for set_name, source in sources.items():
        for where, png in _png_files(source, set_name):
            file_name = where.replace(":", "/").rsplit("/", 1)[-1]
            match = _PNG_NAME.fullmatch(file_name)
            if match is None:
                raise ValueError(f"{source} holds {where}, not named NNNN_DD.png as in the official layout")
            images.append(_resize_png(png, pixels, where))
            char_id.append(int(match.group(1)))
            drawer.append(int(match.group(2)))
            official_split.append(OFFICIAL_SPLIT_NAMES[OFFICIAL_SETS.index(set_name)])
        if not any(OFFICIAL_SPLIT_NAMES[OFFICIAL_SETS.index(set_name)] == split for split in official_split):
            raise ValueError(f"{source} holds no PNG files: expected {set_name}/<Alphabet>/characterNN/NNNN_DD.png")
    return {
        "images": np.stack(images) if images else np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
        "char_id": np.array(char_id, np.int64),
        "drawer": np.array(drawer, np.int64),
        "official_split": np.array(official_split, dtype=str),
    }


def load_omniglot_characters(
    root: str | Path | None = None, pixels: str = "grayscale", download: bool = False,
    download_sha256: dict[str, str] | None = None,
) -> OmniglotCharacters:
    """All 1623 characters from the bundled copy (``root=None``), an npz, or the official layout."""
    check_choice("pixels", pixels, PIXELS)
    if root is None:
        if download:
            raise ValueError("download=True needs a root folder to download into (root=None is the bundled copy)")
        if not BUNDLED_PATH.is_file():
            raise FileNotFoundError(f"the bundled Omniglot copy {BUNDLED_PATH} is missing: reinstall maml_fast")
        return read_omniglot_npz(BUNDLED_PATH, pixels)
    root = Path(root)
    if root.suffix == ".npz":
        return read_omniglot_npz(root, pixels)
    if (root / PACKED_NPZ_NAME).is_file():
        return read_omniglot_npz(root / PACKED_NPZ_NAME, pixels)
    if len(_official_sources(root)) < len(OFFICIAL_SETS):
        if not download:
            present = sorted(_official_sources(root))
            raise FileNotFoundError(
                f"Omniglot not found under {root}"
                + (f" (only {', '.join(present)} is there; both sets are needed)" if present else "")
                + f". {_where_to_put(root)}"
            )
        download_omniglot(root, download_sha256)
    pngs = read_omniglot_pngs(root, pixels)
    order = _slot_order(pngs["char_id"], pngs["drawer"], str(root))
    # The PNG layout has no Vinyals split; it comes from the bundled copy (sorted by character ID).
    with np.load(BUNDLED_PATH) as bundled:
        vinyals_split = bundled["vinyals_split_names"][bundled["vinyals_split"]]
    return OmniglotCharacters(
        images=pngs["images"][order],
        char_id=np.arange(1, NUM_CHARACTERS + 1),
        official_split=pngs["official_split"][order[:, 0]],
        vinyals_split=vinyals_split,
    )


def split_characters(
    characters: OmniglotCharacters, protocol: str, split: str, paper_val_characters: int = 0
) -> np.ndarray:
    """Indices (into `characters`, ascending) of the characters in `split` under `protocol`.

    * ``"paper"``: the MAML reference procedure: the characters (in ID order) shuffled with Python's
      ``random.Random(1)``, the first 1200 for training, the other 423 for testing. The reference
      shuffles ``os.listdir`` order, which is not portable, so the exact assignment differs; the
      sizes and the procedure are the same. ``paper_val_characters=v`` moves the last v of the 1200
      into split ``"val"`` (the reference code uses 100: 1100 train, 100 val).
    * ``"vinyals"``: Vinyals et al. (2016): 1028 train, 172 val, 423 test characters.
    * ``"official"``: images_background (964) for ``"train"``, images_evaluation (659) for ``"test"``.
    """
    check_choice("protocol", protocol, PROTOCOLS)
    check_choice("split", split, SPLITS)
    if protocol == "vinyals":
        return np.flatnonzero(characters.vinyals_split == split)
    if protocol == "official":
        if split == "val":
            raise ValueError("protocol='official' has no 'val' split (only 'train' = background, 'test' = evaluation)")
        official_set = {"train": "background", "test": "evaluation"}[split]
        return np.flatnonzero(characters.official_split == official_set)
    if isinstance(paper_val_characters, bool) or not isinstance(paper_val_characters, int):
        raise TypeError(f"paper_val_characters must be an int, got {type(paper_val_characters).__name__}")
    if not 0 <= paper_val_characters < PAPER_TRAIN_CHARACTERS:
        raise ValueError(f"paper_val_characters must be in [0, {PAPER_TRAIN_CHARACTERS}), got {paper_val_characters}")
    if split == "val" and paper_val_characters == 0:
        raise ValueError(
            "protocol='paper' has no 'val' split unless paper_val_characters > 0 "
            "(the reference code holds out 100 of the 1200 training characters)"
        )
    order = list(range(len(characters.char_id)))
    random.Random(PAPER_SPLIT_SEED).shuffle(order)
    train_end = PAPER_TRAIN_CHARACTERS - paper_val_characters
    bounds = {"train": (0, train_end), "val": (train_end, PAPER_TRAIN_CHARACTERS), "test": (PAPER_TRAIN_CHARACTERS, None)}
    start, stop = bounds[split]
    return np.sort(np.array(order[start:stop], np.int64))


class Omniglot(ClassImageDataset):
    """The characters of one split as classes, ready for `EpisodeSampler`.

    ``images``: uint8 tensor ``[num_classes, 20, 1, 28, 28]``, ink-high: value / 255 is
    ``1 - pixel / 255`` of the files (ink = 1, paper = 0); `images_as_float` or the sampler give the
    float32 images. ``char_ids[c]`` is class c's official character ID and ``rotation_degrees[c]`` its
    rotation. With ``rotations=True`` (training split only, as in the MAML reference code) every
    character also appears rotated by 90, 180 and 270 degrees (counter-clockwise) as three more
    classes: classes ``[k * n, (k + 1) * n)`` are the n characters rotated by ``90 * k``.
    See `split_characters` for the protocols and `load_omniglot_characters` for `root`;
    ``download_sha256``: set name -> SHA-256 the downloaded zips must have (see `download_omniglot`).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        protocol: str = "paper",
        *,
        rotations: bool = False,
        pixels: str = "grayscale",
        paper_val_characters: int = 0,
        download: bool = False,
        download_sha256: dict[str, str] | None = None,
    ) -> None:
        check_choice("split", split, SPLITS)
        check_choice("protocol", protocol, PROTOCOLS)
        if rotations and split != "train":
            raise ValueError(f"rotations=True adds rotated classes to the training split only, got split={split!r}")
        characters = load_omniglot_characters(root, pixels, download, download_sha256)
        chosen = split_characters(characters, protocol, split, paper_val_characters)
        ink = torch.from_numpy(255 - characters.images[chosen]).unsqueeze(2)
        char_ids = torch.from_numpy(characters.char_id[chosen])
        turns = range(4) if rotations else range(1)
        self.images = torch.cat([torch.rot90(ink, k, dims=(-2, -1)) for k in turns])
        self.char_ids = char_ids.repeat(len(turns))
        self.rotation_degrees = torch.arange(len(turns)).repeat_interleave(len(chosen)) * 90
        self.split, self.protocol, self.pixels = split, protocol, pixels
