"""MiniImageNet (Vinyals et al. 2016) in the standard layout of Ravi & Larochelle (2017).

    root/images/<filename>              (flat folder of JPEGs)
    root/train.csv, val.csv, test.csv   (header "filename,label"; label = ImageNet wnid)

The full dataset has 64/16/20 classes of 600 images; the CSV class split is Ravi & Larochelle's.
The images are ImageNet's: non-commercial research and education use only.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from maml_fast.checks import check_choice
from maml_fast.data.episodes import ClassImageDataset

IMAGE_SIZE = 84
SPLITS = ("train", "val", "test")
CSV_HEADER = ["filename", "label"]


def _read_split_csv(csv_path: Path) -> dict[str, list[str]]:
    """label -> file names, in CSV order. A damaged or malformed CSV raises ValueError naming it."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{csv_path} is not a readable 'filename,label' CSV ({type(error).__name__}: {error})") from error
    if not rows or rows[0] != CSV_HEADER:
        raise ValueError(f"{csv_path} must start with the header 'filename,label', got {rows[:1]}")
    files_by_label: dict[str, list[str]] = {}
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0] or not row[1]:
            raise ValueError(f"{csv_path} line {line_number}: expected 'filename,label', got {row}")
        if Path(row[0]).name != row[0] or row[0] in (".", ".."):
            raise ValueError(f"{csv_path} line {line_number}: {row[0]!r} is not a plain file name (the images "
                             "sit in one flat images/ folder; a path could point outside it)")
        files_by_label.setdefault(row[1], []).append(row[0])
    if not files_by_label:
        raise ValueError(f"{csv_path} lists no images")
    return files_by_label


def _read_image(path: Path) -> np.ndarray:
    """[84, 84, 3] uint8 RGB, resized with LANCZOS (as cbfinn/maml's proc_images.py) if needed.
    A damaged or truncated image raises ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError  # imported here so the rest of maml_fast.data works without Pillow

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # decodes the whole file: truncation shows here
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path} is not a readable image ({type(error).__name__}: {error})") from error
    return np.asarray(rgb)


class MiniImageNet(ClassImageDataset):
    """One split's classes, ready for `EpisodeSampler`.

    ``images``: uint8 tensor ``[num_classes, examples_per_class, 3, 84, 84]`` (RGB; value / 255 is the
    [0, 1] intensity, which `images_as_float` or the sampler give as float32). Classes are the split's
    wnids in sorted order (``class_names``); examples keep the CSV order. Every class must have the
    same number of images (600 in the full dataset).
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        check_choice("split", split, SPLITS)
        root = Path(root)
        csv_path, image_dir = root / f"{split}.csv", root / "images"
        if not csv_path.is_file() or not image_dir.is_dir():
            raise FileNotFoundError(
                f"MiniImageNet not found under {root}: expected {csv_path} (header 'filename,label') and "
                f"the JPEGs it names in {image_dir}/ (the Ravi & Larochelle layout)"
            )
        files_by_label = _read_split_csv(csv_path)
        self.class_names = sorted(files_by_label)
        counts = {label: len(files) for label, files in files_by_label.items()}
        if len(set(counts.values())) != 1:
            usual = max(set(counts.values()), key=list(counts.values()).count)
            odd = {label: count for label, count in counts.items() if count != usual}
            shown = ", ".join(f"class {label} has {count}" for label, count in list(odd.items())[:10])
            raise ValueError(
                f"{csv_path}: every class needs the same number of images; {len(counts) - len(odd)} classes have "
                f"{usual} but {shown}" + (f" and {len(odd) - 10} more classes differ" if len(odd) > 10 else "")
            )
        examples_per_class = next(iter(counts.values()))
        images = np.empty((len(self.class_names), examples_per_class, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for class_index, label in enumerate(self.class_names):
            for example_index, file_name in enumerate(files_by_label[label]):
                path = image_dir / file_name
                if not path.is_file():
                    raise FileNotFoundError(f"{csv_path} names {file_name}, but {path} does not exist")
                try:
                    images[class_index, example_index] = _read_image(path).transpose(2, 0, 1)
                except ValueError as error:
                    raise ValueError(f"{error} (listed in {csv_path} for class {label})") from error
        self.images = torch.from_numpy(images)
        self.split = split
