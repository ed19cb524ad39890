# Over 400 lines: the loader, splits, episodes and official runs read one set of synthetic archives built at the top; the table's tests are in tests/study/.
"""Omniglot loader, splits, episodes and official one-shot runs.

Loader behaviour is checked on small archives built here with PIL in the real layouts; the
real archives are checked against facts from the data README and against the raw PNGs and
``class_labels.txt`` read independently with ``zipfile``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metarl.fewshot import omniglot
from metarl.fewshot.episodes import EpisodeSampler, affine_images, shift_images
from metarl.fewshot.omniglot import (
    OmniglotDataError,
    OmniglotDataset,
    load_omniglot,
    omniglot_sampler,
    split_characters,
)
from metarl.fewshot.omniglot_runs import load_official_runs, score_official_runs

NUM_FAKE_DRAWINGS = 4


ALPHABET_IDS = {"Alpha": 0, "Beta": 1, "Gamma": 2, "Delta": 3, "Greek": 4, "Latin": 5}


def _png(alphabet: str, character: int, drawing: int) -> bytes:
    """A 105x105 1-bit drawing on white: a black box in the top-left quarter and two marks
    whose places encode (alphabet, character) and the drawing, so every drawing differs."""
    image = Image.new("1", (105, 105), 1)
    pen = ImageDraw.Draw(image)
    pen.rectangle([0, 0, 52, 52], fill=0)
    row, col = 60 + 6 * ALPHABET_IDS[alphabet], 60 + 6 * character
    pen.rectangle([col, row, col + 4, row + 4], fill=0)
    pen.rectangle([60 + 8 * drawing, 98, 64 + 8 * drawing, 102], fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_zip(path: Path, root: str, alphabets: dict[str, int]) -> None:
    """``<root>/<alphabet>/characterNN/<id>_MM.png`` with a directory entry per folder."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{root}/", b"")
        for alphabet, num_characters in alphabets.items():
            archive.writestr(f"{root}/{alphabet}/", b"")
            for c in range(1, num_characters + 1):
                folder = f"{root}/{alphabet}/character{c:02d}"
                archive.writestr(f"{folder}/", b"")
                for d in range(1, NUM_FAKE_DRAWINGS + 1):
                    archive.writestr(f"{folder}/{c:04d}_{d:02d}.png", _png(alphabet, c, d))


def _minimal_dir(tmp_path: Path) -> Path:
    _write_zip(
        tmp_path / "images_background_small1.zip",
        "images_background_small1",
        {"Alpha": 3, "Greek": 2, "Latin": 2, "Beta": 3},
    )
    _write_zip(
        tmp_path / "images_background_small2.zip",
        "images_background_small2",
        {"Greek": 2, "Latin": 2, "Gamma": 4, "Delta": 2},
    )
    return tmp_path


def _full_dir(tmp_path: Path) -> Path:
    _write_zip(tmp_path / "images_background.zip", "images_background", {"Alpha": 3, "Beta": 2})
    _write_zip(tmp_path / "images_evaluation.zip", "images_evaluation", {"Gamma": 3})
    return tmp_path


# ---------------------------------------------------------------- loader on archives built here


def test_minimal_archives_merge_greek_and_latin(tmp_path):
    data = load_omniglot(_minimal_dir(tmp_path))
    # 3 + 2 + 2 + 3 in the first, 4 + 2 new in the second; Greek and Latin counted once.
    assert data.subset == "minimal"
    assert data.num_characters == 16
    assert data.alphabets == ("Alpha", "Beta", "Delta", "Gamma", "Greek", "Latin")
    assert sum(name.startswith("Greek/") for name in data.character_names) == 2
    assert data.images.shape == (16, NUM_FAKE_DRAWINGS, 28, 28)
    assert data.images.dtype == np.float32


def test_pixels_are_inverted_resized_and_in_unit_range(tmp_path):
    data = load_omniglot(_minimal_dir(tmp_path))
    image = data.images[0, 0]
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image[:10, :10].min() > 0.99  # the black box is ink: 1
    assert image[18:, :10].max() < 0.01  # white background: 0 (beyond the filter's reach)
    # Ink: the 53x53 box and two 5x5 marks of 105x105 pixels; resizing keeps the fraction close.
    assert abs(image.mean() - (53 * 53 + 2 * 25) / 105**2) < 0.02


def test_full_archives_are_preferred_and_split_by_character(tmp_path):
    data = load_omniglot(_full_dir(tmp_path))
    assert data.subset == "full"
    assert data.num_characters == 8
    splits = split_characters(data)
    assert sorted(np.concatenate([splits["trainval"], splits["test"]]).tolist()) == list(range(8))
    assert set(splits["train"]).isdisjoint(splits["val"])
    assert set(splits["trainval"]) == set(splits["train"]) | set(splits["val"])


def test_full_split_sizes_are_the_published_ones():
    names = tuple(f"A{i // 30}/character{i % 30:02d}" for i in range(1623))
    alphabets = tuple(sorted({n.split("/")[0] for n in names}))
    fake = OmniglotDataset(
        images=np.zeros((1623, 1, 2, 2), np.float32),
        character_names=names,
        alphabets=alphabets,
        alphabet_index=np.array([alphabets.index(n.split("/")[0]) for n in names]),
        subset="full",
    )
    sizes = {name: len(v) for name, v in split_characters(fake).items()}
    assert sizes == {"train": 1028, "val": 172, "trainval": 1200, "test": 423}


def test_rotation_classes_are_the_four_rotations_of_each_character(tmp_path):
    data = load_omniglot(_full_dir(tmp_path))
    characters = [0, 3, 5]
    sampler = EpisodeSampler(
        data.images, characters, num_ways=12, num_shots=1, num_queries=0, rotations=True
    )
    assert sampler.num_classes == 12
    episode = sampler.episode(0)
    found = set()
    for image in episode.support_x[:, 0].numpy():
        matches = {
            (c, k)
            for c in characters
            for k in range(4)
            for d in range(NUM_FAKE_DRAWINGS)
            if np.array_equal(np.rot90(data.images[c, d], k), image)
        }
        assert len(matches) == 1
        found |= matches
    assert found == {(c, k) for c in characters for k in range(4)}
    with pytest.raises(ValueError, match="rotations=True"):
        EpisodeSampler(data.images, characters, num_ways=4, rotations=False)


def test_missing_archive_names_file_directory_and_remedy(tmp_path):
    _minimal_dir(tmp_path)
    (tmp_path / "images_background_small2.zip").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot(tmp_path, subset="minimal")
    message = str(info.value)
    assert "images_background_small2.zip" in message and str(tmp_path.resolve()) in message
    assert "data_dir" in message


def test_corrupt_zip_names_file_and_directory(tmp_path):
    _minimal_dir(tmp_path)
    (tmp_path / "images_background_small1.zip").write_bytes(b"not a zip at all" * 10)
    with pytest.raises(OmniglotDataError) as info:
        load_omniglot(tmp_path)
    message = str(info.value)
    assert "images_background_small1.zip" in message and str(tmp_path.resolve()) in message


def test_corrupt_png_inside_zip_is_reported(tmp_path):
    _minimal_dir(tmp_path)
    with zipfile.ZipFile(tmp_path / "images_background_small2.zip", "a") as archive:
        archive.writestr("images_background_small2/Zeta/character01/0001_01.png", b"garbage")
    with pytest.raises(OmniglotDataError, match="Zeta/character01/0001_01.png"):
        load_omniglot(tmp_path)


def test_npz_cache_round_trip(tmp_path, monkeypatch):
    (tmp_path / "archives").mkdir()
    data_dir, cache_dir = _minimal_dir(tmp_path / "archives"), tmp_path / "cache"
    first = load_omniglot(data_dir, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 1
    monkeypatch.setattr(omniglot, "MEMORY_CACHE", {})  # force a read of the .npz file
    second = load_omniglot(data_dir, cache_dir=cache_dir)
    assert second is not first
    np.testing.assert_array_equal(first.images, second.images)
    assert first.character_names == second.character_names


# ---------------------------------------------------------------- the real minimal sets


@pytest.fixture
def dataset(shared_data_dir) -> OmniglotDataset:
    return load_omniglot(shared_data_dir)  # decoded once per process, then from memory


def test_real_minimal_sets(dataset):
    assert dataset.subset == "minimal"
    assert dataset.num_characters == 242
    assert dataset.alphabets == (
        "Balinese",
        "Early_Aramaic",
        "Greek",
        "Japanese_(katakana)",
        "Korean",
        "Latin",
        "Sanskrit",
        "Tagalog",
    )
    assert dataset.images.shape == (242, 20, 28, 28)
    assert dataset.images.min() >= 0.0 and dataset.images.max() <= 1.0
    assert np.bincount(dataset.alphabet_index).tolist() == [24, 22, 24, 47, 40, 26, 42, 17]


def test_real_ink_matches_raw_png(dataset, shared_data_dir):
    with zipfile.ZipFile(shared_data_dir / "omniglot" / "images_background_small1.zip") as archive:
        folder = "images_background_small1/Korean/character05/"
        member = sorted(
            n for n in archive.namelist() if n.startswith(folder) and n.endswith(".png")
        )[0]
        raw = np.asarray(Image.open(io.BytesIO(archive.read(member))).convert("L")) < 128
    image = dataset.images[dataset.character_names.index("Korean/character05"), 0]
    assert abs(float(image.mean()) - float(raw.mean())) < 0.01


def test_minimal_split_is_by_alphabet_and_disjoint(dataset):
    splits = split_characters(dataset)
    alphabets = {
        k: {dataset.alphabets[dataset.alphabet_index[i]] for i in v} for k, v in splits.items()
    }
    assert alphabets["val"] == {"Greek"}
    assert alphabets["test"] == {"Korean", "Japanese_(katakana)"}
    assert len(alphabets["train"]) == 5
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not alphabets[a] & alphabets[b]
    assert sum(len(splits[k]) for k in ("train", "val", "test")) == 242


def _identify(lookup: dict[bytes, tuple[int, int]], images: torch.Tensor) -> list[tuple[int, int]]:
    """(character, drawing) of each image, by exact pixel equality."""
    return [lookup[image[0].numpy().tobytes()] for image in images]


def test_episode_is_well_formed_and_stays_in_its_split(dataset):
    splits = split_characters(dataset)
    lookup = {dataset.images[c, d].tobytes(): (c, d) for c in range(242) for d in range(20)}
    assert len(lookup) == 242 * 20  # every drawing is unique, so equality identifies it
    for split in ("train", "test"):
        sampler = omniglot_sampler(dataset, split, num_ways=5, num_shots=2, num_queries=3, seed=1)
        for _ in range(3):
            episode = sampler.sample()
            assert episode.support_x.shape == (10, 1, 28, 28)
            assert episode.query_x.shape == (15, 1, 28, 28)
            assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
            assert sorted(episode.query_y.tolist()) == sorted(list(range(5)) * 3)
            support = _identify(lookup, episode.support_x)
            query = _identify(lookup, episode.query_x)
            assert not set(support) & set(query)
            label_to_char = {
                int(y): c for y, (c, _) in zip(episode.support_y, support, strict=True)
            }
            assert len(set(label_to_char.values())) == 5
            assert all(
                label_to_char[int(y)] == c for y, (c, _) in zip(episode.query_y, query, strict=True)
            )
            assert {c for c, _ in support + query} <= set(splits[split].tolist())


def test_same_seed_same_episodes_other_seed_different(dataset):
    def draw(seed):
        sampler = omniglot_sampler(
            dataset, num_ways=5, num_shots=1, num_queries=5, rotations=True, max_shift=2, seed=seed
        )
        return [sampler.sample() for _ in range(3)]

    first, again, other = draw(7), draw(7), draw(8)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(a.support_x, b.support_x) for a, b in zip(first, other, strict=True))


def test_batch_stacks_the_episode_sequence(dataset):
    batch = omniglot_sampler(dataset, num_ways=3, num_queries=2, seed=3).sample_batch(4)
    single = omniglot_sampler(dataset, num_ways=3, num_queries=2, seed=3)
    assert batch.support_x.shape == (4, 3, 1, 28, 28) and batch.query_y.shape == (4, 6)
    for b in range(4):
        episode = single.sample()
        assert torch.equal(batch.query_x[b], episode.query_x)
        assert torch.equal(batch.support_y[b], episode.support_y)


def test_shift_moves_pixels_and_fills_background():
    images = np.zeros((2, 5, 5), np.float32)
    images[:, 2, 2] = 1.0
    images[1, 0, 4] = 1.0
    shifted = shift_images(images, np.array([[1, -2], [-1, 1]]))
    assert shifted[0, 3, 0] == 1.0 and shifted[0].sum() == 1.0
    assert shifted[1, 1, 3] == 1.0 and shifted[1].sum() == 1.0  # the corner pixel left the image


def test_affine_turns_and_scales_about_the_centre_by_hand_arithmetic():
    images = np.zeros((1, 5, 5), np.float32)
    images[0, 2, 4] = 1.0  # two pixels right of the centre (2, 2)
    one = np.ones(1)
    assert np.array_equal(affine_images(images, np.zeros(1), one), images)
    for k in (1, 2, 3):  # counter-clockwise as displayed, like np.rot90
        turned = affine_images(images, np.array([90.0 * k]), one)
        np.testing.assert_allclose(turned, np.rot90(images, k=k, axes=(1, 2)), atol=1e-6)
    # 45 degrees: the dot moves to (-sqrt 2, +sqrt 2) from the centre; output pixel (-1, +1) reads
    # the input at (0, sqrt 2), between columns 1 (ink 0) and 2 (ink 1): sqrt(2) - 1.
    turned = affine_images(images, np.array([45.0]), one)
    assert turned[0, 1, 3] == pytest.approx(np.sqrt(2) - 1, abs=1e-6)
    assert turned[0, 2, 4] == 0.0
    # Scaling by 2 about the centre: output (r, c) reads input (2 + (r-2)/2, 2 + (c-2)/2), so the
    # dot at (2, 3) lands on (2, 4) with weight 1, and half-way reads give it 0.5 per axis.
    images[0, 2, 3] = 1.0
    images[0, 2, 4] = 0.0
    grown = affine_images(images, np.zeros(1), np.array([2.0]))
    expected = np.zeros((5, 5))
    expected[1:4, 3:5] = np.outer([0.5, 1.0, 0.5], [0.5, 1.0])
    np.testing.assert_allclose(grown[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="scales"):
        affine_images(images, np.zeros(1), np.zeros(1))


def test_affine_augmentation_distorts_training_images_only(dataset, shared_data_dir):
    from metarl.fewshot.omniglot_tasks import OmniglotDistribution

    def sampler(**augment):
        return omniglot_sampler(dataset, num_ways=5, num_queries=2, rotations=True, seed=4, **augment)

    plain, affine = sampler(), sampler(max_rotation=10.0, max_scale=0.2)
    a, b = plain.episode(3), affine.episode(3)
    assert torch.equal(a.support_y, b.support_y) and not torch.equal(a.support_x, b.support_x)
    # a small distortion of the same drawings: most pixels barely move
    assert (a.support_x - b.support_x).abs().mean() < 0.2
    assert torch.equal(affine.episode(3).query_x, b.query_x)  # a pure function of (seed, index)
    with pytest.raises(ValueError, match="max_rotation"):
        sampler(max_scale=1.5)
    tasks = OmniglotDistribution(
        data_dir=shared_data_dir, subset="minimal", max_shift=2, max_rotation=10.0, max_scale=0.2
    )
    train = tasks._sampler("train", 5, 1, 1)
    assert (train.max_rotation, train.max_scale, train.max_shift) == (10.0, 0.2, 2)
    test = tasks._sampler("test", 5, 1, 1)
    assert (test.max_rotation, test.max_scale, test.max_shift) == (0.0, 0.0, 0)


def test_sampler_rejects_impossible_settings(dataset):
    with pytest.raises(ValueError, match="num_ways=30"):
        omniglot_sampler(dataset, "val", num_ways=30)
    with pytest.raises(ValueError, match="drawings"):
        omniglot_sampler(dataset, num_shots=5, num_queries=16)


# ---------------------------------------------------------------- official one-shot runs


@pytest.fixture
def runs(shared_data_dir):
    return load_official_runs(shared_data_dir)


def test_runs_match_class_labels_text(runs, shared_data_dir):
    with zipfile.ZipFile(shared_data_dir / "omniglot" / "all_runs.zip") as archive:
        for number, run in enumerate(runs, start=1):
            assert run.name == f"run{number:02d}"
            assert run.train_x.shape == (20, 1, 28, 28) and run.test_x.shape == (20, 1, 28, 28)
            text = archive.read(f"run{number:02d}/class_labels.txt").decode()
            expected = [0] * 20
            for line in text.split("\n"):
                if line:
                    test_png, train_png = line.split(" ")
                    expected[int(test_png[-6:-4]) - 1] = int(train_png[-6:-4]) - 1
            assert run.test_targets.tolist() == expected
            assert sorted(expected) == list(range(20))
    assert len(runs) == 20


def _nearest(train_x: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(test_x.flatten(1), train_x.flatten(1)).argmin(1)


def test_scorer_perfect_on_copied_training_images(runs):
    copied = [run._replace(test_x=run.train_x[run.test_targets]) for run in runs]
    score = score_official_runs(_nearest, copied)
    assert score["error_per_run"] == [0.0] * 20 and score["mean_error"] == 0.0


def test_scorer_constant_guess_is_95_percent(runs):
    # Each run has exactly one test image per training image, so always answering 0 gets 1 of 20.
    score = score_official_runs(
        lambda train_x, test_x: torch.zeros(len(test_x), dtype=torch.long), runs
    )
    assert score["error_per_run"] == pytest.approx([95.0] * 20)


def test_scorer_random_guesses_near_chance(runs):
    generator = torch.Generator().manual_seed(0)
    score = score_official_runs(
        lambda train_x, test_x: torch.randint(20, (len(test_x),), generator=generator), runs
    )
    assert score["num_runs"] == 20
    assert abs(score["mean_error"] - 95.0) < 5.0  # binomial sd over 400 guesses is about 1.1 points
    shuffled = [
        run._replace(test_targets=run.test_targets[torch.randperm(20, generator=generator)])
        for run in runs
    ]
    assert abs(score_official_runs(_nearest, shuffled)["mean_error"] - 95.0) < 5.0


def test_scorer_rejects_wrong_prediction_shape(runs):
    with pytest.raises(ValueError, match="expected"):
        score_official_runs(lambda train_x, test_x: torch.zeros(3), runs)


def test_within_alphabet_runs_pair_two_drawings_of_characters_of_one_alphabet(dataset):
    from metarl.fewshot.omniglot_runs import within_alphabet_runs

    val = split_characters(dataset, 0)["val"]
    runs = within_alphabet_runs(dataset, val, num_runs=5, seed=3)
    assert len(runs) == 5 and runs[0].train_x.shape == (20, 1, 28, 28)
    flat = dataset.images.reshape(dataset.num_characters * dataset.num_drawings, -1)

    def whereabouts(image: torch.Tensor) -> tuple[int, int]:  # (character, drawing) of an image
        hits = np.flatnonzero((flat == image.reshape(1, -1).numpy()).all(1))
        assert len(hits) >= 1
        return divmod(int(hits[0]), dataset.num_drawings)

    for run in runs:
        train = [whereabouts(x) for x in run.train_x]
        test = [whereabouts(x) for x in run.test_x]
        assert len({c for c, _ in train}) == 20 and {c for c, _ in train} <= set(val.tolist())
        assert len({int(dataset.alphabet_index[c]) for c, _ in train}) == 1
        assert sorted(run.test_targets.tolist()) == list(range(20))
        for (c, d), target in zip(test, run.test_targets.tolist(), strict=True):
            assert c == train[target][0] and d != train[target][1]
    again = within_alphabet_runs(dataset, val, num_runs=5, seed=3)
    assert all(torch.equal(a.test_x, b.test_x) for a, b in zip(runs, again, strict=True))
    with pytest.raises(ValueError, match="20 characters"):
        within_alphabet_runs(dataset, val[:10])


def test_count_at_least_parses_whole_numbers_and_refuses_smaller_ones():
    """The argparse type behind --workers/--threads: int(text) when >= minimum, else an error."""
    import argparse

    from metarl.config import count_at_least

    assert count_at_least(1)("3") == 3
    assert count_at_least(0)("0") == 0
    for minimum, text in ((1, "0"), (0, "-1"), (1, "1.5"), (1, "")):
        with pytest.raises(argparse.ArgumentTypeError):
            count_at_least(minimum)(text)
