"""Data: sinusoid tasks, Omniglot (bundled copy, npz, official PNG layout), MiniImageNet, episodes."""
from __future__ import annotations

import io
import math
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from maml_fast.data import (
    EpisodeSampler,
    MiniImageNet,
    Omniglot,
    SinusoidTasks,
    images_as_float,
    load_omniglot_characters,
    read_omniglot_pngs,
)
from maml_fast.data.omniglot import BUNDLED_PATH
from maml_fast.task_batch import TaskBatch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OMNIGLOT28 = SHARED / "omniglot" / "omniglot28.npz"
OMNIGLOT105 = SHARED / "omniglot" / "omniglot105.npz"
MINI_SAMPLE = SHARED / "miniimagenet-sample"

needs_omniglot28 = pytest.mark.skipif(not OMNIGLOT28.is_file(), reason=f"shared Omniglot file {OMNIGLOT28} is absent")
needs_omniglot105 = pytest.mark.skipif(not OMNIGLOT105.is_file(), reason=f"shared Omniglot file {OMNIGLOT105} is absent")
needs_mini_sample = pytest.mark.skipif(
    not (MINI_SAMPLE / "train.csv").is_file(), reason=f"MiniImageNet sample {MINI_SAMPLE} is absent"
)


def labelled_dataset(num_classes: int, examples_per_class: int) -> SimpleNamespace:
    """A dataset whose example (c, e) is the vector [c, e], so tests can read back what was drawn."""
    classes = torch.arange(num_classes, dtype=torch.float64).view(-1, 1).expand(-1, examples_per_class)
    examples = torch.arange(examples_per_class, dtype=torch.float64).expand(num_classes, -1)
    return SimpleNamespace(images=torch.stack([classes, examples], dim=-1), num_classes=num_classes)


FIELDS = ("support_x", "support_y", "query_x", "query_y")


def assert_same_batch(a: TaskBatch, b: TaskBatch) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --- sinusoid ---------------------------------------------------------------------------------------


def test_sinusoid_shapes_and_ranges():
    tasks = SinusoidTasks(num_shots=5, num_query=20, seed=0)
    batch = tasks.sample(64)
    assert batch.support_x.shape == batch.support_y.shape == (64, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (64, 20, 1)
    assert batch.support_y.dtype == torch.float32 and not batch.is_classification
    x = torch.cat([batch.support_x, batch.query_x], dim=1).double()
    y = torch.cat([batch.support_y, batch.query_y], dim=1).double()
    assert x.min() >= -5 and x.max() <= 5
    # Each task is exactly one sinusoid A sin(x - p) = (A cos p) sin x - (A sin p) cos x: fit it.
    design = torch.cat([torch.sin(x), -torch.cos(x)], dim=2)
    coefficients = torch.linalg.lstsq(design, y).solution  # [T, 2, 1]: (A cos p, A sin p)
    assert torch.allclose(design @ coefficients, y, atol=1e-4)
    amplitude = coefficients.norm(dim=1).squeeze(-1)
    phase = torch.atan2(coefficients[:, 1], coefficients[:, 0]).squeeze(-1)
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5.0 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    assert amplitude.max() - amplitude.min() > 3 and phase.max() - phase.min() > 2  # spread over the ranges


def test_sinusoid_seeding_resume_and_fixed_episodes():
    first, second = SinusoidTasks(3, 4, seed=7), SinusoidTasks(3, 4, seed=7)
    assert_same_batch(first.sample(8), second.sample(8))
    state = first.state_dict()
    expected = first.sample(8)
    second.load_state_dict(state)
    assert_same_batch(second.sample(8), expected)
    assert not torch.equal(SinusoidTasks(3, 4, seed=8).sample(8).support_x, SinusoidTasks(3, 4, seed=7).sample(8).support_x)
    episodes = list(first.fixed_episodes(10, seed=1, meta_batch_size=4))
    assert [batch.num_tasks for batch in episodes] == [4, 4, 2]
    for a, b in zip(episodes, first.fixed_episodes(10, seed=1, meta_batch_size=4)):
        assert_same_batch(a, b)


def test_sinusoid_bad_arguments():
    with pytest.raises(ValueError, match="num_shots"):
        SinusoidTasks(0, 5)
    with pytest.raises(ValueError, match="num_query"):
        SinusoidTasks(5, -1)
    with pytest.raises(ValueError, match="meta_batch_size"):
        SinusoidTasks(5, 5).sample()
    with pytest.raises(ValueError, match="meta_batch_size"):
        SinusoidTasks(5, 5).sample(0)


# --- Omniglot ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_characters():
    return load_omniglot_characters()


def test_bundled_copy_is_small_and_present():
    assert BUNDLED_PATH.is_file()
    assert BUNDLED_PATH.stat().st_size < 8_000_000
    assert (BUNDLED_PATH.parent / "OMNIGLOT_LICENSE.txt").read_text().count("Copyright (c) 2015 Brenden Lake") == 1


@needs_omniglot28
@pytest.mark.parametrize("pixels, key", [("grayscale", "images"), ("binary", "images_nearest")])
def test_bundled_copy_equals_shared_npz(pixels, key):
    bundled = load_omniglot_characters(pixels=pixels)
    with np.load(OMNIGLOT28) as full:
        np.testing.assert_array_equal(bundled.images.reshape(-1, 28, 28), full[key])
        np.testing.assert_array_equal(bundled.char_id.repeat(20), full["char_id"])
        np.testing.assert_array_equal(bundled.vinyals_split.repeat(20), full["vinyals_split"])
        np.testing.assert_array_equal(bundled.official_split.repeat(20), full["split"])
    from_file = load_omniglot_characters(OMNIGLOT28, pixels=pixels)
    np.testing.assert_array_equal(from_file.images, bundled.images)
    np.testing.assert_array_equal(from_file.vinyals_split, bundled.vinyals_split)


def test_omniglot_polarity_and_layout():
    dataset = Omniglot(split="test")
    assert dataset.images.shape == (423, 20, 1, 28, 28) and dataset.images.dtype == torch.uint8
    assert dataset.num_classes == 423 and dataset.examples_per_class == 20
    pixels = images_as_float(dataset.images)
    assert pixels.dtype == torch.float32 and pixels.min() == 0 and pixels.max() == 1
    assert pixels.mean() < 0.2  # ink-high: ink = 1 on a paper = 0 background
    assert (pixels[..., 0, :] == 0).float().mean() > 0.9  # the top rows are blank paper


def test_omniglot_split_sizes(bundled_characters):
    from maml_fast.data import split_characters

    def sizes(protocol, splits, **options):
        chosen = {s: split_characters(bundled_characters, protocol, s, **options) for s in splits}
        union = np.concatenate(list(chosen.values()))
        assert np.array_equal(np.sort(union), np.arange(1623))  # disjoint and complete
        return {s: len(c) for s, c in chosen.items()}

    assert sizes("paper", ("train", "test")) == {"train": 1200, "test": 423}
    assert sizes("paper", ("train", "val", "test"), paper_val_characters=100) == {"train": 1100, "val": 100, "test": 423}
    assert sizes("vinyals", ("train", "val", "test")) == {"train": 1028, "val": 172, "test": 423}
    assert sizes("official", ("train", "test")) == {"train": 964, "test": 659}
    # The paper split is a fixed shuffle: the same characters every time, the val ones out of train.
    train = split_characters(bundled_characters, "paper", "train")
    assert np.array_equal(train, split_characters(bundled_characters, "paper", "train"))
    val = split_characters(bundled_characters, "paper", "val", paper_val_characters=100)
    assert set(val) <= set(train) and not set(val) & set(split_characters(bundled_characters, "paper", "train", 100))
    assert Omniglot(split="train", protocol="vinyals").num_classes == 1028
    with pytest.raises(ValueError, match="paper_val_characters"):
        Omniglot(split="val")
    with pytest.raises(ValueError, match="protocol"):
        Omniglot(protocol="lake")
    with pytest.raises(ValueError, match="split"):
        Omniglot(split="validation")


def test_omniglot_rotations_only_on_train():
    plain = Omniglot(split="train")
    rotated = Omniglot(split="train", rotations=True)
    assert rotated.num_classes == 4 * plain.num_classes == 4800
    n = plain.num_classes
    for k in range(4):
        block = slice(k * n, (k + 1) * n)
        assert torch.equal(rotated.images[block], torch.rot90(plain.images, k, dims=(-2, -1)))
        assert torch.equal(rotated.char_ids[block], plain.char_ids)
        assert (rotated.rotation_degrees[block] == 90 * k).all()
    for split in ("val", "test"):
        with pytest.raises(ValueError, match="rotations"):
            Omniglot(split=split, protocol="vinyals", rotations=True)


def write_official_pngs(root: Path, picks: dict[str, list[tuple[int, int]]], zipped: set[str]) -> None:
    """Write the 105x105 originals of (char_id, drawer) picks as mode-1 PNGs in the official layout."""
    from PIL import Image

    with np.load(OMNIGLOT105) as data:
        images, alphabets, characters = data["images"], data["alphabet"], data["character"]
    for set_name, slots in picks.items():
        files = {}
        for char_id, drawer in slots:
            j = (char_id - 1) * 20 + drawer - 1
            buffer = io.BytesIO()
            Image.fromarray(images[j] == 255).save(buffer, format="PNG")  # bool -> mode "1", as the originals
            name = f"{set_name}/{alphabets[j]}/character{characters[j]:02d}/{char_id:04d}_{drawer:02d}.png"
            files[name] = buffer.getvalue()
        for name, png in files.items():
            if set_name not in zipped:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(png)
        if set_name in zipped:
            with zipfile.ZipFile(root / f"{set_name}.zip", "w") as archive:
                for name, png in files.items():
                    archive.writestr(name, png)


@needs_omniglot105
@needs_omniglot28
def test_official_png_layout_loads_like_the_npz(tmp_path):
    picks = {"images_background": [(1, 1), (1, 20), (700, 5)], "images_evaluation": [(965, 3), (1623, 20)]}
    write_official_pngs(tmp_path, picks, zipped={"images_evaluation"})
    with np.load(OMNIGLOT28) as full:
        nearest, gray = full["images_nearest"], full["images"]
    for pixels in ("binary", "grayscale"):
        loaded = read_omniglot_pngs(tmp_path, pixels)
        slots = list(zip(loaded["char_id"], loaded["drawer"]))
        assert sorted(slots) == sorted(s for set_slots in picks.values() for s in set_slots)
        expected_split = ["background" if char_id <= 964 else "evaluation" for char_id in loaded["char_id"]]
        assert list(loaded["official_split"]) == expected_split
        for image, (char_id, drawer) in zip(loaded["images"], slots):
            j = (char_id - 1) * 20 + drawer - 1
            if pixels == "binary":  # the cbfinn/maml resize: exact
                np.testing.assert_array_equal(image, nearest[j])
            else:  # LANCZOS: exact with the Pillow that made the npz, within 1 level otherwise
                assert np.abs(image.astype(int) - gray[j]).max() <= 1
    # The class needs every image: a partial layout is refused with the counts.
    with pytest.raises(ValueError, match="32455 missing"):
        Omniglot(root=tmp_path, split="train")


def test_omniglot_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background.zip"):
        Omniglot(root=tmp_path)
    (tmp_path / "images_background").mkdir()
    with pytest.raises(FileNotFoundError, match="only images_background"):
        Omniglot(root=tmp_path)


def test_omniglot_download_offline_fails_clearly(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as error:
        Omniglot(root=tmp_path / "omniglot", download=True)
    message = str(error.value)
    assert "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip" in message
    assert "network is unreachable" in message
    assert str(tmp_path / "omniglot" / "images_evaluation.zip") in message
    assert not list((tmp_path / "omniglot").iterdir())  # no partial download left behind
    with pytest.raises(ValueError, match="download"):
        Omniglot(download=True)


# --- MiniImageNet -----------------------------------------------------------------------------------


@needs_mini_sample
def test_miniimagenet_sample_loads():
    from PIL import Image

    dataset = MiniImageNet(MINI_SAMPLE, "val")
    assert dataset.class_names == ["n01855672", "n02091244", "n02114548", "n02138441", "n02174001"]
    assert dataset.images.shape == (5, 20, 3, 84, 84) and dataset.images.dtype == torch.uint8
    assert dataset.num_classes == 5 and dataset.examples_per_class == 20
    pixels = images_as_float(dataset.images)
    assert pixels.dtype == torch.float32 and 0 <= pixels.min() and pixels.max() <= 1
    rows = (MINI_SAMPLE / "val.csv").read_text().splitlines()[1:]
    first_of_class_2 = next(row.split(",")[0] for row in rows if row.endswith(dataset.class_names[2]))
    expected = np.array(Image.open(MINI_SAMPLE / "images" / first_of_class_2).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(dataset.images[2, 0], torch.from_numpy(expected))
    assert MiniImageNet(MINI_SAMPLE, "test").class_names[0] == "n01930112"


def test_miniimagenet_resizes_and_checks_layout(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    rows = ["filename,label"]
    for label in ("n1", "n2"):
        for index in range(3):
            name = f"{label}_{index}.png"
            Image.new("RGB", (100, 90), (255, 0, 0) if label == "n1" else (0, 0, 255)).save(tmp_path / "images" / name)
            rows.append(f"{name},{label}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    dataset = MiniImageNet(tmp_path, "train")
    assert dataset.images.shape == (2, 3, 3, 84, 84)
    assert (dataset.images[0, :, 0] == 255).all() and (dataset.images[1, :, 2] == 255).all()
    with pytest.raises(FileNotFoundError, match="val.csv"):
        MiniImageNet(tmp_path, "val")
    with pytest.raises(ValueError, match="split"):
        MiniImageNet(tmp_path, "training")
    (tmp_path / "test.csv").write_text("file,class\nn1_0.png,n1\n")
    with pytest.raises(ValueError, match="header"):
        MiniImageNet(tmp_path, "test")
    (tmp_path / "val.csv").write_text("filename,label\nn1_0.png,n1\nn1_1.png,n1\nn2_0.png,n2\n")
    with pytest.raises(ValueError, match="same number"):
        MiniImageNet(tmp_path, "val")


# --- episodes ---------------------------------------------------------------------------------------


def test_sampler_shapes_and_labels_on_omniglot():
    sampler = EpisodeSampler(Omniglot(split="test"), ways=5, shots=1, queries=15, meta_batch_size=8, seed=0)
    batch = sampler.sample()
    assert batch.support_x.shape == (8, 5, 1, 28, 28) and batch.query_x.shape == (8, 75, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert torch.equal(batch.support_y, torch.arange(5).expand(8, 5))
    assert torch.equal(batch.query_y, torch.arange(5).repeat_interleave(15).expand(8, 75))
    assert batch.support_x.max() == 1 and batch.support_x.min() == 0


@needs_mini_sample
def test_sampler_on_miniimagenet_sample():
    sampler = EpisodeSampler(MiniImageNet(MINI_SAMPLE, "train"), 5, 5, 15, 2, seed=1, dtype=torch.float64)
    batch = sampler.sample()
    assert batch.support_x.shape == (2, 25, 3, 84, 84) and batch.query_x.shape == (2, 75, 3, 84, 84)
    assert batch.query_x.dtype == torch.float64


@pytest.mark.parametrize("in_place", [False, True], ids=["fresh", "in_place"])
def test_sampler_tasks_are_balanced_disjoint_and_consistent(in_place):
    ways, shots, queries, tasks = 4, 3, 5, 64
    sampler = EpisodeSampler(labelled_dataset(10, 9), ways, shots, queries, tasks, seed=3)
    batch = sampler.sample(out=sampler.empty_batch()) if in_place else sampler.sample()
    support, query = batch.support_x.long(), batch.query_x.long()  # [T, n, 2]: (class, example)
    for labels, count in ((batch.support_y, shots), (batch.query_y, queries)):
        assert (torch.stack([(labels == c).sum(1) for c in range(ways)], 1) == count).all()
    for t in range(tasks):
        support_class = {int(y): set() for y in batch.support_y[t]}
        for (cls, _), y in zip(support.tolist()[t], batch.support_y[t].tolist()):
            support_class[y].add(cls)
        assert all(len(classes) == 1 for classes in support_class.values())  # one class per label
        assert len({next(iter(c)) for c in support_class.values()}) == ways  # distinct classes
        for (cls, _), y in zip(query.tolist()[t], batch.query_y[t].tolist()):
            assert support_class[y] == {cls}  # query labels name the same classes as support
        support_items = {tuple(item) for item in support.tolist()[t]}
        query_items = {tuple(item) for item in query.tolist()[t]}
        assert len(support_items) == ways * shots and len(query_items) == ways * queries
        assert not support_items & query_items
    # The class-to-label assignment is random: label 0 is not always the same class.
    assert len(set(support[:, 0, 0].tolist())) > 3


def test_sampler_seeding_resume_and_fixed_episodes():
    dataset = labelled_dataset(12, 6)
    make = lambda seed: EpisodeSampler(dataset, ways=3, shots=2, queries=2, meta_batch_size=5, seed=seed)  # noqa: E731
    first, second = make(0), make(0)
    assert_same_batch(first.sample(), second.sample())
    assert not torch.equal(make(1).sample().support_x, make(0).sample().support_x)
    state = first.state_dict()
    expected = [first.sample() for _ in range(2)]
    resumed = make(99)
    resumed.load_state_dict(state)
    for batch in expected:
        assert_same_batch(resumed.sample(), batch)
    # Fixed episodes: the same on every call, independent of the training stream and of batch size.
    before = first.state_dict()["generator"]
    episodes = list(first.fixed_episodes(12, seed=5))
    assert [b.num_tasks for b in episodes] == [5, 5, 2]
    assert torch.equal(first.state_dict()["generator"], before)
    first.sample()
    for a, b in zip(episodes, first.fixed_episodes(12, seed=5)):
        assert_same_batch(a, b)
    whole = next(first.fixed_episodes(12, seed=5, meta_batch_size=12))
    assert torch.equal(whole.support_x[:5], episodes[0].support_x)
    assert not torch.equal(next(first.fixed_episodes(12, seed=6)).support_x, episodes[0].support_x)
    with pytest.raises(ValueError, match="state"):
        resumed.load_state_dict({"seed": 0})


def test_sampler_draws_in_place_without_host_reads():
    """``sample(out=)`` (the graphed trainer's static inputs): the same episodes as ``sample()`` for the
    same seed, written into the same tensors every time, with no host read or tensor made from host
    data (`find_host_syncs` in its CPU mode); likewise for sinusoid tasks."""
    from maml_fast.cuda_graph import find_host_syncs

    uint8_images = SimpleNamespace(images=torch.randint(0, 256, (9, 5, 1, 4, 4), dtype=torch.uint8))
    for make in (lambda: EpisodeSampler(labelled_dataset(12, 6), ways=3, shots=2, queries=2, meta_batch_size=5, seed=4),
                 lambda: EpisodeSampler(uint8_images, ways=4, shots=1, queries=3, meta_batch_size=3, seed=1,
                                        dtype=torch.float64),
                 lambda: SinusoidTasks(4, 6, seed=2, meta_batch_size=3)):
        in_place, fresh = make(), make()
        out = in_place.empty_batch()
        pointers = [getattr(out, name).data_ptr() for name in FIELDS]
        for _ in range(3):
            assert find_host_syncs(in_place.sample, out=out, device_type="cpu") == []
            assert [getattr(out, name).data_ptr() for name in FIELDS] == pointers
            assert_same_batch(out, fresh.sample())
        assert in_place.sample(out=out) is out
        fresh.sample()
        assert torch.equal(in_place.state_dict()["generator"], fresh.state_dict()["generator"])  # one stream


def test_sampler_out_must_match_what_it_draws():
    sampler = EpisodeSampler(labelled_dataset(6, 5), ways=3, shots=1, queries=2, meta_batch_size=4)
    out = sampler.empty_batch()
    assert out.num_tasks == 4 and sampler.empty_batch(2).num_tasks == 2
    with pytest.raises(TypeError, match="out must be a maml_fast.TaskBatch"):
        sampler.sample(out=out.support_x)
    with pytest.raises(ValueError, match="meta_batch_size=2 but out holds 4 tasks"):
        sampler.sample(2, out=out)
    wrong = [TaskBatch(out.support_x.double(), out.support_y, out.query_x.double(), out.query_y, check_values=False),
             TaskBatch(out.support_x, out.support_y, out.query_x[:, :5], out.query_y[:, :5], check_values=False),
             TaskBatch(torch.empty(4, 3, 4)[..., ::2], out.support_y, out.query_x, out.query_y,
                       check_values=False)]
    for batch, name in zip(wrong, ("support_x", "query_x", "support_x")):
        with pytest.raises(ValueError, match=f"out.{name} must be a contiguous"):
            sampler.sample(out=batch)
    with pytest.raises(ValueError, match="meta_batch_size"):
        SinusoidTasks(2, 2).empty_batch()


def test_sampler_bad_arguments():
    dataset = labelled_dataset(5, 4)
    with pytest.raises(ValueError, match="ways"):
        EpisodeSampler(dataset, ways=6, shots=1, queries=1, meta_batch_size=2)
    with pytest.raises(ValueError, match="ways"):
        EpisodeSampler(dataset, ways=0, shots=1, queries=1, meta_batch_size=2)
    with pytest.raises(ValueError, match="shots \\+ queries"):
        EpisodeSampler(dataset, ways=2, shots=2, queries=3, meta_batch_size=2)
    with pytest.raises(ValueError, match="shots"):
        EpisodeSampler(dataset, ways=2, shots=0, queries=3, meta_batch_size=2)
    with pytest.raises(ValueError, match="queries"):
        EpisodeSampler(dataset, ways=2, shots=1, queries=0, meta_batch_size=2)
    with pytest.raises(ValueError, match="meta_batch_size"):
        EpisodeSampler(dataset, ways=2, shots=1, queries=1, meta_batch_size=0)
    with pytest.raises(ValueError, match="ways"):
        EpisodeSampler(dataset, ways=2.0, shots=1, queries=1, meta_batch_size=2)
    with pytest.raises(TypeError, match="dataset.images"):
        EpisodeSampler(SimpleNamespace(images=np.zeros((5, 4, 2))), ways=2, shots=1, queries=1, meta_batch_size=2)
    with pytest.raises(ValueError, match="num_episodes"):
        next(EpisodeSampler(dataset, 2, 1, 1, 2).fixed_episodes(0))
