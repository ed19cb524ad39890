"""Omniglot loader, splits, episodes and official one-shot runs.

Loader behaviour is checked on small archives built here with PIL in the real layouts; the
real archives are checked against facts from the data README and against the raw PNGs and
``class_labels.txt`` read independently with ``zipfile``.
"""

from __future__ import annotations

import io
import json
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


def test_runs_error_of_an_ensemble_averages_log_probabilities(runs):
    from experiments.tables.omniglot_eval import runs_error

    class Fixed:  # the same class logits for every run
        def __init__(self, logits):
            self.logits = torch.tensor(logits)

        def class_scores(self, train_x, train_y, test_x, shift=0, affine=((0.0, 1.0),)):
            return self.logits.expand(len(test_x), -1)

    # logits over 20 classes; member a: class 0 by a margin of log 3, b: class 1 by log 9.
    a = [np.log(3.0)] + [0.0] * 19
    b = [0.0, np.log(9.0)] + [0.0] * 18
    # mean log-probabilities differ only in log p0 + log p0' vs log p1 + log p1':
    # (log 3 - log 22 + 0 - log 28) vs (0 - log 22 + log 9 - log 28): class 1 wins.
    two = runs[:2]
    result = runs_error([Fixed(a), Fixed(b)], two, shift=0)
    targets = torch.cat([r.test_targets for r in two])
    assert result["mean_error"] == pytest.approx(100 * float((targets != 1).double().mean()))
    alone = runs_error([Fixed(a)], two, shift=0)
    assert alone["mean_error"] == pytest.approx(100 * float((targets != 0).double().mean()))
    assert alone["views"] == 1 and np.isfinite(alone["ci95"])
    with pytest.raises(ValueError, match="class_scores"):
        runs_error([object()], two, shift=0)


def test_omniglot_eval_scores_trained_runs_alone_and_together(tmp_path, shared_data_dir):
    import json

    from experiments.tables import omniglot_eval
    from metarl.experiment import Experiment

    dirs = []
    for seed in (0, 1):
        run_dir = tmp_path / f"proto-s{seed}"
        overrides = [
            f"run.seed={seed}", "run.num_iterations=2", "run.checkpoint_every=2",
            "tasks.channels=4", "tasks.num_test_tasks=2", "tasks.train_ways=5",
        ]
        experiment = Experiment.create("experiments/omniglot_protonet.toml", overrides, run_dir)
        experiment.run(progress=False)
        experiment.close()
        dirs.append(str(run_dir))
    out = tmp_path / "eval"
    args = ["--runs", "val", "--num-runs", "3", "--shift", "0", "1", "--ensemble", "--out", str(out)]
    assert omniglot_eval.main(dirs + args) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert [(len(r["models"]), r["views"]) for r in document["results"]] == [
        (1, 1), (1, 1), (2, 1), (1, 9), (1, 9), (2, 9)
    ]
    learner, tasks = omniglot_eval.load_learner(dirs[1])
    runs = omniglot_eval.make_runs("val", tasks, 3, 0)
    again = omniglot_eval.runs_error([learner], runs, shift=1)
    assert document["results"][4]["error_per_run"] == again["error_per_run"]
    assert document["results"][4]["models"] == [dirs[1]]
    both = [omniglot_eval.load_learner(d)[0] for d in dirs]
    together = omniglot_eval.runs_error(both, runs, shift=1)
    assert document["results"][5]["error_per_run"] == together["error_per_run"]
    assert omniglot_eval.main(dirs + ["--runs", "val", "--num-runs", "2", "--ensemble", "1,0"]) == 0
    with pytest.raises(SystemExit):
        omniglot_eval.main(dirs + ["--ensemble", "0,5"])
    turned = tmp_path / "turned"
    sets = ["--affine-sets", "a=0 s=1", "a=-90,0 s=1,0.5", "--out", str(turned)]
    assert omniglot_eval.main(dirs[:1] + ["--runs", "val", "--num-runs", "3"] + sets) == 0
    rows = json.loads(turned.with_suffix(".json").read_text())["results"]
    assert [(r["views"], r["affine"]) for r in rows] == [
        (1, [[0.0, 1.0]]), (4, [[-90.0, 1.0], [-90.0, 0.5], [0.0, 1.0], [0.0, 0.5]])
    ]
    assert rows[0]["error_per_run"] == document["results"][0]["error_per_run"]
    views = omniglot_eval.parse_affine_set("a=-90,0 s=1,0.5")
    assert rows[1]["error_per_run"] == omniglot_eval.runs_error(
        [omniglot_eval.load_learner(dirs[0])[0]], runs, 0, views
    )["error_per_run"]
    assert "| 4 | 0 | -90, 0 | 0.5, 1 |" in turned.with_suffix(".md").read_text()
    assert "--affine-sets 'a=0 s=1' 'a=-90,0 s=1,0.5'" in turned.with_suffix(".md").read_text()
    for bad in (["--affine-sets", "a=x s=1"], ["--affine-sets", "0/1"], ["--scales", "0"]):
        with pytest.raises(SystemExit):
            omniglot_eval.main(dirs[:1] + bad)
    table = out.with_suffix(".md").read_text()
    assert table.count("| val alphabets (3) |") == 6 and "python -m experiments.tables.omniglot_eval" in table
    with pytest.raises(ValueError, match="no checkpoint"):
        empty = tmp_path / "empty"
        Experiment.create("experiments/omniglot_protonet.toml", ["tasks.channels=4"], empty)
        omniglot_eval.load_learner(empty)


def test_omniglot_table_builds_from_committed_cells_without_mixing_budgets(tmp_path):
    import json

    from experiments.tables.omniglot import main
    from experiments.tables.omniglot_cells import cell_name

    def cell(seed: int, iterations: int, scores: list[float]) -> dict:
        return {"method": "maml", "ways": 5, "shots": 1, "seed": seed, "iterations": iterations,
                "command": f"metarl run experiments/omniglot_maml.toml --set run.seed={seed}",
                "train_s": 1.0, "machine": "m", "accuracy": {"5": {"step": 3, "per_task": scores}}}

    cells = tmp_path / "cells"
    cells.mkdir()
    # seeds 0 and 1 trained for 200 iterations, seed 2 only for 100: the row keeps the 200s.
    for c in (cell(0, 200, [90.0, 100.0]), cell(1, 200, [80.0, 90.0]), cell(2, 100, [10.0, 10.0])):
        (cells / cell_name(c)).write_text(json.dumps(c))
    assert main(["--from-cells", "--cells", str(cells), "--out", str(tmp_path / "omniglot")]) == 0
    (row,) = json.loads((tmp_path / "omniglot.json").read_text())["rows"]
    assert row["seeds"] == [0, 1] and row["iterations"] == 200
    assert row["accuracy"]["mean"] == pytest.approx(90.0) and row["accuracy"]["num"] == 4
    assert "run.seed={0,1}" in (tmp_path / "omniglot.md").read_text()
    assert "](omniglot.png)" in (tmp_path / "omniglot.md").read_text()
    assert (tmp_path / "omniglot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_omniglot_plot_groups_rows_by_setting_in_table_order():
    from experiments.tables.omniglot_plot import accuracy_panels

    def row(method, ways, shots, mean, seeds):
        return {"method": method, "ways": ways, "shots": shots, "seeds": list(range(seeds)),
                "accuracy": {"mean": mean, "ci95": 0.5}, "published": 99.0}

    rows = [row("maml", 20, 1, 80.0, 3), row("maml", 5, 1, 93.0, 3), row("reptile", 5, 1, 84.0, 1)]
    panels = accuracy_panels(rows)
    assert list(panels) == [(5, 1), (20, 1)]
    assert [(b["method"], b["mean"], b["seeds"]) for b in panels[(5, 1)]] == [
        ("maml", 93.0, 3), ("reptile", 84.0, 1)]
    assert panels[(20, 1)][0]["published"] == 99.0


def test_omniglot_table_reuses_a_committed_cell_only_for_the_same_command(tmp_path, monkeypatch):
    import json

    from experiments.tables import omniglot_cells as table

    overrides = table.cell_overrides("protonet", 5, 1, 0, 7) + ["agent.device=cuda"]
    saved = {"method": "protonet", "ways": 5, "shots": 1, "seed": 0, "iterations": 7,
             "command": table.cell_command("protonet", overrides), "accuracy": {}, "train_s": 1.0}
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / table.cell_name(saved)).write_text(json.dumps(saved))
    trained = []

    class NoTraining:  # stands in for the runner: records any attempt to train
        @staticmethod
        def create(*args, **kwargs):
            trained.append(args)
            raise RuntimeError("would train")

    monkeypatch.setattr("metarl.experiment.Experiment", NoTraining)
    same = table.run_cell("protonet", 5, 1, (5, 20), 0, 7, str(tmp_path / "runs"),
                          ["agent.device=cuda"], str(cells))
    assert same == saved and not trained
    # the same experiment on another device is the same cell: a GPU seed counts for a CPU sweep
    on_cpu = table.run_cell("protonet", 5, 1, (5, 20), 0, 7, str(tmp_path / "runs"), [], str(cells))
    assert on_cpu == saved and not trained
    with pytest.raises(RuntimeError, match="would train"):  # another command: not reused
        table.run_cell("protonet", 5, 1, (5, 20), 0, 7, str(tmp_path / "runs"),
                       ["agent.outer_lr=0.01"], str(cells))
    assert len(trained) == 1


def test_omniglot_cell_refuses_to_resume_a_run_of_another_length(tmp_path):
    """A run directory started for 3 iterations is not silently continued as a 5-iteration cell."""
    from experiments.tables import omniglot_cells as table
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2"]
    run_dir = tmp_path / "runs" / "protonet-5w1s-s0"
    Experiment.create("experiments/omniglot_protonet.toml",
                      table.cell_overrides("protonet", 5, 1, 0, 3) + tiny, run_dir).close()
    with pytest.raises(ValueError, match="holds a run of 3 iterations, not 5"):
        table.run_cell("protonet", 5, 1, (5,), 0, 5, str(tmp_path / "runs"), tiny)


def _run_until_signal(experiment, iteration):
    """Runs ``experiment`` with a SIGINT sent during its iteration number ``iteration`` (1-based),
    so it stops with a checkpoint there (TrainingStopped), and closes it."""
    import os
    import signal

    from metarl.stopping import TrainingStopped

    step = experiment.agent.step

    def step_then_signal(batch):
        metrics = step(batch)
        if experiment.iteration == iteration - 1:  # Experiment.run counts it after step
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    experiment.agent.step = step_then_signal
    with pytest.raises(TrainingStopped):
        experiment.run(progress=False)
    experiment.close()


def test_omniglot_cell_stopped_midway_resumes_and_counts_only_the_iterations_it_trained(tmp_path):
    """A cell stopped by a signal after 3 of 5 iterations is continued, not restarted, by the next
    call; its training time is labelled with the 2 iterations that call trained."""

    from experiments.tables import omniglot_cells as table
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2", "run.log_every=1", "run.checkpoint_every=1"]
    run_dir = tmp_path / "runs" / "protonet-5w1s-s0"
    experiment = Experiment.create("experiments/omniglot_protonet.toml",
                                   table.cell_overrides("protonet", 5, 1, 0, 5) + tiny, run_dir)
    _run_until_signal(experiment, 3)
    cell = table.run_cell("protonet", 5, 1, (5,), 0, 5, str(tmp_path / "runs"), tiny)
    assert cell["iterations"] == 5 and cell["train_s_iterations"] == 2
    logged = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]


def _tiny_gradient_cell(tmp_path, name, method="fomaml", tasks=5):
    from experiments.tables import omniglot_cells as table
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", f"tasks.num_test_tasks={tasks}", "agent.eval_adapt_steps=[0,1,3]"]
    return Experiment.create(f"experiments/omniglot_{method}.toml",
                             table.cell_overrides(method, 5, 1, 0, 2) + tiny, tmp_path / name), tiny


def test_held_out_scores_saved_in_chunks_equal_one_call_and_resume_after_a_stop(tmp_path):
    """Scoring 5 tasks 2 at a time, stopped after the first chunk and resumed, gives exactly the
    losses and accuracies of one evaluate call on all 5, and the resumed call scores only the
    3 tasks not saved. Saved scores of another model (iteration) are not reused."""
    import numpy as np

    from experiments.tables import omniglot_cells as table
    from metarl.stopping import ScoringStopped

    experiment, _ = _tiny_gradient_cell(tmp_path, "fomaml-5w1s-s0")
    experiment.run(progress=False)
    agent, tasks = experiment.agent, experiment.distribution.test_tasks(num_ways=5)
    reference = table._evaluate(agent, tasks, 7)
    scored = []
    evaluate = agent.evaluate
    agent.evaluate = lambda ts, rng: scored.append(len(ts)) or evaluate(ts, rng)
    partial = tmp_path / "scores.json"
    with pytest.raises(ScoringStopped, match="2 of 5 held-out episodes are scored and saved"):
        table.score_held_out(agent, tasks, 7, partial, 2, chunk=2, stop_requested=lambda: "SIGTERM")
    assert scored == [2] and list(json.loads(partial.read_text())["parts"]) == ["0"]
    resumed = table.score_held_out(agent, tasks, 7, partial, 2, chunk=2)
    assert scored == [2, 2, 1]
    assert resumed["adaptation_steps"] == reference["adaptation_steps"] == [0, 1, 3]
    assert np.array_equal(resumed["loss"], reference["loss"])
    assert np.array_equal(resumed["accuracy"], reference["accuracy"])
    assert table.score_held_out(agent, tasks, 7, partial, 2, chunk=2)["loss"].shape == (5, 3)
    assert scored == [2, 2, 1]  # all 5 saved: nothing scored again
    table.score_held_out(agent, tasks, 7, partial, 3, chunk=2)  # another model: scored anew
    assert scored == [2, 2, 1, 2, 2, 1]
    experiment.close()


def test_scoring_of_a_learner_that_is_not_per_task_is_one_call_with_nothing_saved(tmp_path):
    from experiments.tables import omniglot_cells as table

    class OneCall:  # a learner whose scores may depend on the other tasks (no attribute)
        calls = []

        def evaluate(self, tasks, rng):
            self.calls.append(len(tasks))
            return {"adaptation_steps": [0], "loss": [[1.0]] * len(tasks), "accuracy": None}

    out = table.score_held_out(OneCall(), list(range(5)), 0, tmp_path / "scores.json", chunk=2)
    assert OneCall.calls == [5] and len(out["loss"]) == 5
    assert not (tmp_path / "scores.json").exists()


def test_omniglot_cell_stopped_while_scoring_resumes_the_scoring_with_the_same_scores(tmp_path, monkeypatch):
    """A signal while a cell is scored stops it at the next save of scores (ScoringStopped, which
    a pool reports and which survives pickling); the same call again trains nothing, scores the
    rest, and gives the per-episode accuracy of a cell scored without a stop."""
    import os
    import pickle
    import signal

    from experiments.tables import omniglot_cells as table
    from metarl.stopping import ScoringStopped

    monkeypatch.setattr(table, "SCORE_CHUNK", 2)
    _, tiny = _tiny_gradient_cell(tmp_path, "unused")
    whole = table.run_cell("fomaml", 5, 1, (5,), 0, 2, str(tmp_path / "whole"), tiny)
    from metarl.fewshot.maml import GradientLearner

    evaluate = GradientLearner.evaluate
    chunks = []

    def evaluate_then_signal(self, tasks, rng):
        chunks.append(len(tasks))
        if len(chunks) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, tasks, rng)

    monkeypatch.setattr(GradientLearner, "evaluate", evaluate_then_signal)
    with pytest.raises(ScoringStopped) as stopped:
        table.run_cell("fomaml", 5, 1, (5,), 0, 2, str(tmp_path / "runs"), tiny)
    assert (stopped.value.scored, stopped.value.total, stopped.value.iteration) == (2, 5, 2)
    assert table.cell_state("fomaml", 5, 1, 0, 2, str(tmp_path / "runs"), tiny).endswith(
        "; 2 of 5 held-out 5-way episodes scored)")
    assert stopped.value.where() == "while scoring (2 of 5 held-out episodes saved)"
    copy = pickle.loads(pickle.dumps(stopped.value))
    assert (type(copy), str(copy), copy.exit_code) == (ScoringStopped, str(stopped.value), 143)
    again = table.run_cell("fomaml", 5, 1, (5,), 0, 2, str(tmp_path / "runs"), tiny)
    assert chunks == [2, 2, 1] and again["train_s_iterations"] == 0
    assert again["accuracy"] == whole["accuracy"]


def test_a_parked_unfinished_run_resumes_in_a_clone_without_it_and_matches_an_unbroken_run(tmp_path, capsys):
    """--park copies a run checkpointed at iteration 2 of 4 (not a finished one, nor TensorBoard
    events) beside the cells; from a root without that run, --plan says it resumes there and
    run_cell trains only iterations 3-4, to the same held-out scores as a run never stopped, and
    then drops the parked copy."""

    from experiments.tables import omniglot as table
    from experiments.tables import omniglot_cells as cells_mod
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=3", "run.checkpoint_every=1"]
    cells, old_root, new_root = tmp_path / "cells", tmp_path / "old", tmp_path / "new"
    overrides = cells_mod.cell_overrides("protonet", 5, 1, 0, 4) + tiny
    half = Experiment.create("experiments/omniglot_protonet.toml", overrides, old_root / "protonet-5w1s-s0")
    _run_until_signal(half, 2)
    done = old_root / "protonet-5w1s-s1"
    Experiment.create("experiments/omniglot_protonet.toml", overrides, done).checkpoint()
    (done / "table.json").write_text("{}")  # a finished run: its cell is committed, not parked
    (old_root / "notes").mkdir()  # not a run
    assert table.main(["--park", "--root", str(old_root), "--cells", str(cells)]) == 0
    out = capsys.readouterr().out
    assert "protonet-5w1s-s0: parked at iteration 2" in out and "1 unfinished runs" in out
    parked = cells / "unfinished" / "protonet-5w1s-s0"
    assert sorted(p.name for p in (cells / "unfinished").iterdir()) == ["protonet-5w1s-s0"]
    assert (parked / "checkpoint.pt").is_file() and not (parked / "tb").exists()
    assert "resumes at iteration 2 of 4" in cells_mod.cell_state(
        "protonet", 5, 1, 0, 4, str(new_root), tiny, str(cells))
    resumed = cells_mod.run_cell("protonet", 5, 1, (5,), 0, 4, str(new_root), tiny, str(cells))
    assert resumed["train_s_iterations"] == 2 and not parked.exists()
    assert (cells / cells_mod.cell_name(resumed)).is_file()
    unbroken = cells_mod.run_cell("protonet", 5, 1, (5,), 0, 4, str(tmp_path / "unbroken"), tiny)
    assert unbroken["train_s_iterations"] == 4
    assert resumed["accuracy"] == unbroken["accuracy"]


def test_omniglot_table_plan_tells_committed_partial_and_untrained_cells_apart(tmp_path, capsys):
    """--plan trains nothing and names each cell's state: seed 0 committed, seed 1 checkpointed at
    iteration 2 of 4, seed 2 not started."""
    from experiments.tables import omniglot as table
    from experiments.tables import omniglot_cells as cells_mod
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2", "run.checkpoint_every=1"]
    cells, root = tmp_path / "cells", tmp_path / "runs"
    cells.mkdir()
    saved = {"method": "protonet", "ways": 5, "shots": 1, "seed": 0, "iterations": 4,
             "command": cells_mod.cell_command("protonet", cells_mod.cell_overrides("protonet", 5, 1, 0, 4) + tiny)}
    (cells / cells_mod.cell_name(saved)).write_text(json.dumps(saved))
    partial = Experiment.create("experiments/omniglot_protonet.toml",
                                cells_mod.cell_overrides("protonet", 5, 1, 1, 4) + tiny, root / "protonet-5w1s-s1")
    partial.iteration = 2
    partial.checkpoint()
    partial.close()
    args = ["--plan", "--methods", "protonet", "--settings", "5w1s", "--iterations", "4", "--cells", str(cells),
            "--root", str(root), "--out", str(tmp_path / "table")]
    for item in tiny:
        args += ["--set", item]
    assert table.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "seed=0" in lines[0] and "done (committed)" in lines[0]
    assert "seed=1" in lines[1] and "resumes at iteration 2 of 4" in lines[1]
    assert "seed=2" in lines[2] and lines[2].endswith("to train")
    assert lines[-1] == "1 of 3 cells done; 2 to train or resume"
    assert not (tmp_path / "table.md").exists() and not (root / "protonet-5w1s-s2").exists()


def test_seed_command_names_the_device_of_each_seed():
    from experiments.tables.omniglot_cells import seed_command

    base = "metarl run experiments/omniglot_maml.toml --set run.seed={}"
    gpu = base + " --set agent.device=cuda --set run.checkpoint_every=100"
    cpu = base + " --set run.checkpoint_every=100"
    same = seed_command([gpu.format(0), gpu.format(1)], [0, 1])
    assert same == gpu.replace("{}", "{0,1}")
    mixed = seed_command([gpu.format(0), cpu.format(1), cpu.format(2)], [0, 1, 2])
    assert mixed == (cpu.replace("{}", "{0,1,2}")
                     + "  # seed 0 with --set agent.device=cuda; seeds 1,2 with no agent.device (CPU)")


def test_seed_command_names_the_checkpoint_interval_of_each_seed():
    from experiments.tables.omniglot_cells import seed_command

    base = "metarl run experiments/omniglot_maml.toml --set run.seed={} --set tasks.num_ways=20"
    every = " --set run.checkpoint_every={}"
    gpu = base + " --set agent.device=cuda"
    commands = [(gpu + every).format(0, 100), (base + every).format(1, 20),
                (base + every).format(2, 20)]
    assert seed_command(commands, [0, 1, 2]) == (
        "metarl run experiments/omniglot_maml.toml --set run.seed={0,1,2} --set tasks.num_ways=20"
        "  # seed 0 with --set agent.device=cuda; seeds 1,2 with no agent.device (CPU)"
        "; seed 0 with --set run.checkpoint_every=100; seeds 1,2 with --set run.checkpoint_every=20")
    # one seed without the override, the others with it
    mixed = seed_command([base.format(3), (base + every).format(4, 20)], [3, 4])
    assert mixed == (base.replace("{}", "{3,4}") + "  # seed 3 with no run.checkpoint_every; "
                     "seed 4 with --set run.checkpoint_every=20")
    # the same interval everywhere stays in the command
    same = seed_command([(base + every).format(0, 20), (base + every).format(1, 20)], [0, 1])
    assert same == (base + every).format("{0,1}", 20)


def test_omniglot_table_settings_pick_the_models_to_train(tmp_path, monkeypatch):
    from experiments.tables import omniglot as table

    submitted = []

    class Pool:  # records the jobs instead of training them
        def __init__(self, workers):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *job):
            submitted.append(job[:5])
            return Untrained()

        @staticmethod
        def result(future, label):
            return future.result()

        @staticmethod
        def stop_report(finished):
            return None

    class Untrained:
        @staticmethod
        def result():
            raise RuntimeError("not trained")

    monkeypatch.setattr(table, "StoppablePool", Pool)
    code = table.main(["--methods", "protonet", "maml", "--settings", "5w1s", "--seeds", "2",
                       "--cells", str(tmp_path / "none"), "--out", str(tmp_path / "t")])
    assert code == 2  # every cell "failed": nothing was trained
    assert submitted == [("protonet", 5, 1, (5, 20), 0), ("maml", 5, 1, (5,), 0),
                         ("protonet", 5, 1, (5, 20), 1), ("maml", 5, 1, (5,), 1)]
    submitted.clear()  # --seed: only the seeds named, in the order given
    table.main(["--methods", "maml", "--settings", "20w1s", "--seed", "2", "0",
                "--cells", str(tmp_path / "none"), "--out", str(tmp_path / "t")])
    assert submitted == [("maml", 20, 1, (20,), 2), ("maml", 20, 1, (20,), 0)]
    with pytest.raises(SystemExit, match="2"):  # argparse error
        table.main(["--settings", "five-way", "--out", str(tmp_path / "t")])


def test_shift_augmented_protonets_train_one_1_shot_model_tested_like_protonets():
    from experiments.tables import omniglot_cells as table
    from metarl.config import load_toml

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    assert table.trained_runs("protonet_aug") == [(5, 1, (5, 20))]
    overrides = table.cell_overrides("protonet_aug", 20, 1, 2, 2000)
    assert overrides == ["run.seed=2", "run.num_iterations=2000", "agent.num_shots=1"]
    config = load_toml(experiments / "omniglot_protonet_aug.toml")
    assert config["tasks"]["max_shift"] > 0 and config["agent"]["official_run_shift"] > 0
    plain = load_toml(experiments / "omniglot_protonet.toml")
    assert {k: v for k, v in config["tasks"].items() if k != "max_shift"} == plain["tasks"]
    # protonet_affine: protonet_aug plus random turns and scalings, the same single model
    assert table.trained_runs("protonet_affine") == [(5, 1, (5, 20))]
    affine = load_toml(experiments / "omniglot_protonet_affine.toml")
    assert affine["tasks"]["max_rotation"] > 0 and affine["tasks"]["max_scale"] > 0
    assert {k: v for k, v in affine["tasks"].items() if k not in ("max_rotation", "max_scale")} == (
        config["tasks"]
    )
    assert affine["agent"] == config["agent"] and affine["run"] == config["run"]


def test_omniglot_eval_rejects_bad_ensembles_before_loading_any_model(tmp_path, capsys):
    from experiments.tables import omniglot_eval

    missing = str(tmp_path / "not-trained")  # never opened: the arguments fail first
    for bad, says in ((["--ensemble", "0,5"], "outside 0..0"), (["--ensemble", "a,b"], "positions such as")):
        with pytest.raises(SystemExit):
            omniglot_eval.main([missing, *bad])
        assert says in capsys.readouterr().err


def test_omniglot_table_threads_reach_each_cell_and_bad_counts_are_refused(tmp_path, monkeypatch, capsys):
    """``--threads`` is the torch thread count each cell trains and scores with (1 by default);
    a count below 1 is refused before anything trains."""
    import torch

    from experiments.tables import omniglot as table
    from experiments.tables import omniglot_cells as cells

    args = table.build_parser().parse_args(["--methods", "protonet", "--settings", "5w1s"])
    assert [job[-1] for job in table._jobs(args, {(5, 1)})] == [1, 1, 1]
    args = table.build_parser().parse_args(["--threads", "2", "--seed", "0"])
    assert {job[-1] for job in table._jobs(args, None)} == {2}

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2"]
    cells.run_cell("protonet", 5, 1, (5,), 0, 2, str(tmp_path / "runs"), tiny, threads=2)
    assert calls == [2]
    for bad in (["--threads", "0"], ["--workers", "0"], ["--threads", "two"]):
        with pytest.raises(SystemExit):
            table.main(bad + ["--plan", "--root", str(tmp_path / "none")])
        err = capsys.readouterr().err
        assert bad[0] in err and ("below 1" in err or "not a whole number" in err)
    assert not (tmp_path / "none").exists()


def test_count_at_least_parses_whole_numbers_and_refuses_smaller_ones():
    """The argparse type behind --workers/--threads: int(text) when >= minimum, else an error."""
    import argparse

    from metarl.config import count_at_least

    assert count_at_least(1)("3") == 3
    assert count_at_least(0)("0") == 0
    for minimum, text in ((1, "0"), (0, "-1"), (1, "1.5"), (1, "")):
        with pytest.raises(argparse.ArgumentTypeError):
            count_at_least(minimum)(text)
