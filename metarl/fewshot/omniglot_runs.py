"""The 20 official within-alphabet 20-way one-shot runs of the Omniglot challenge (Lake et al. 2015),
runs built the same way from a split's characters, and the challenge's scoring protocol.

``all_runs.zip`` holds ``runNN/training/classKK.png`` (one drawing per class),
``runNN/test/itemMM.png`` and ``runNN/class_labels.txt`` pairing each test drawing with its
training drawing; images are preprocessed like :func:`metarl.fewshot.omniglot.load_omniglot`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from metarl.fewshot.omniglot import (
    DATA_HINT,
    IMAGE_SIZE,
    MEMORY_CACHE,
    OmniglotDataError,
    OmniglotDataset,
    cache_key,
    decode_png,
    open_archive,
    resolve_data_dir,
)

RUNS_ARCHIVE = "all_runs.zip"


class OfficialRun(NamedTuple):
    """One official 20-way one-shot run of the Omniglot challenge.

    Attributes:
        name: ``"run01"`` .. ``"run20"``.
        train_x: ``[20, 1, S, S]`` float32, one drawing per class (``training/classNN.png``, in order).
        test_x: ``[20, 1, S, S]`` float32 (``test/itemNN.png``, in order).
        test_targets: ``[20]`` int64, index into ``train_x`` of each test image's class.
    """

    name: str
    train_x: torch.Tensor
    test_x: torch.Tensor
    test_targets: torch.Tensor


def parse_class_labels(text: str) -> list[tuple[str, str]]:
    """``class_labels.txt`` lines ``"runNN/test/itemMM.png runNN/training/classKK.png"`` as pairs."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise OmniglotDataError(
                f"class_labels.txt line {number} is {line!r}; expected '<test png> <training png>'."
            )
        pairs.append((fields[0], fields[1]))
    return pairs


def _read_run(archive: zipfile.ZipFile, path: Path, run: str, image_size: int) -> OfficialRun:
    names = archive.namelist()
    train_members = sorted(
        n for n in names if n.startswith(f"{run}/training/") and n.endswith(".png")
    )
    test_members = sorted(n for n in names if n.startswith(f"{run}/test/") and n.endswith(".png"))
    try:
        labels = dict(parse_class_labels(archive.read(f"{run}/class_labels.txt").decode()))
    except KeyError as err:
        raise OmniglotDataError(
            f"{run}/class_labels.txt is missing from {path.name} in {path.parent}; replace the archive ({DATA_HINT})."
        ) from err
    index = {member: i for i, member in enumerate(train_members)}
    missing = [m for m in test_members if labels.get(m) not in index]
    if missing or not test_members:
        raise OmniglotDataError(
            f"{run} in {path.name} (in {path.parent}): test images {missing[:3]} have no training image "
            f"in class_labels.txt, or the run is empty; replace the archive ({DATA_HINT})."
        )

    def decode(members: list[str]) -> torch.Tensor:
        ink = np.stack([decode_png(archive, m, path, image_size) for m in members])
        return torch.from_numpy(ink.astype(np.float32) / np.float32(255.0)).unsqueeze(1)

    targets = torch.tensor([index[labels[m]] for m in test_members], dtype=torch.int64)
    return OfficialRun(run, decode(train_members), decode(test_members), targets)


def load_official_runs(
    data_dir: str | Path | None = None, image_size: int = IMAGE_SIZE
) -> list[OfficialRun]:
    """The 20 official one-shot runs from ``all_runs.zip``, preprocessed like :func:`load_omniglot`.

    Returns:
        One :class:`OfficialRun` per ``runNN/`` folder, in order.
    """
    path = resolve_data_dir(data_dir) / RUNS_ARCHIVE
    key = ("runs", image_size, cache_key([path], "runs", image_size) if path.is_file() else None)
    if key in MEMORY_CACHE:
        return list(MEMORY_CACHE[key])  # type: ignore[call-overload]
    with open_archive(path) as archive:
        runs = sorted(
            {n.split("/")[0] for n in archive.namelist() if n.endswith("class_labels.txt")}
        )
        if not runs:
            raise OmniglotDataError(
                f"{path.name} in {path.parent} holds no runNN/class_labels.txt; replace it ({DATA_HINT})."
            )
        loaded = [_read_run(archive, path, run, image_size) for run in runs]
    MEMORY_CACHE[key] = tuple(loaded)
    return loaded


def within_alphabet_runs(
    dataset: OmniglotDataset,
    characters: Sequence[int] | np.ndarray,
    num_runs: int = 100,
    num_ways: int = 20,
    seed: int = 0,
) -> list[OfficialRun]:
    """Runs built like the official ones from a split's characters: each run takes ``num_ways``
    characters of one alphabet (an alphabet drawn at random among those with enough characters),
    one drawing of each as its training image and another as its test image, test images in a
    random order; no rotations. Scored by :func:`score_official_runs`, they estimate the official
    error on alphabets the model may be chosen on (the validation split) or with more runs than the
    20 official ones (the test split). Run ``i`` depends only on ``(seed, i)``.
    """
    characters = np.asarray(characters, dtype=np.int64)
    by_alphabet = {
        a: characters[dataset.alphabet_index[characters] == a]
        for a in np.unique(dataset.alphabet_index[characters])
    }
    usable = sorted(a for a, chars in by_alphabet.items() if len(chars) >= num_ways)
    if not usable:
        sizes = {dataset.alphabets[a]: len(c) for a, c in by_alphabet.items()}
        raise ValueError(
            f"no alphabet of these characters has {num_ways} characters (sizes {sizes}); "
            "lower num_ways or pass another split."
        )
    if dataset.num_drawings < 2:
        raise ValueError("within-alphabet runs need at least 2 drawings per character.")
    runs = []
    for i in range(num_runs):
        rng = np.random.default_rng([seed, i])
        alphabet = usable[int(rng.integers(len(usable)))]
        chosen = rng.choice(by_alphabet[alphabet], size=num_ways, replace=False)
        drawings = np.stack([rng.choice(dataset.num_drawings, 2, replace=False) for _ in chosen])
        order = rng.permutation(num_ways)
        train = dataset.images[chosen, drawings[:, 0]]
        test = dataset.images[chosen[order], drawings[order, 1]]
        runs.append(
            OfficialRun(
                name=f"{dataset.alphabets[alphabet]}-{i:03d}",
                train_x=torch.from_numpy(np.ascontiguousarray(train, np.float32)).unsqueeze(1),
                test_x=torch.from_numpy(np.ascontiguousarray(test, np.float32)).unsqueeze(1),
                test_targets=torch.from_numpy(order.astype(np.int64)),
            )
        )
    return runs


def score_official_runs(
    classify_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | np.ndarray | Sequence[int]],
    runs: Sequence[OfficialRun],
) -> dict[str, float | list[float]]:
    """Score a one-shot classifier with the challenge's protocol (Lake et al. 2015).

    Each test image of a run is assigned to one of the run's 20 training images; a run's error
    is the percentage of its test images assigned wrongly, and the score is the mean over runs.

    Args:
        classify_fn: ``(train_x [20, 1, S, S], test_x [T, 1, S, S]) -> [T]`` predicted training
            index of each test image.
        runs: from :func:`load_official_runs`.

    Returns:
        ``{"error_per_run": [%, one per run], "mean_error": %, "num_runs": R}``.
    """
    if not runs:
        raise ValueError(
            "score_official_runs got no runs; pass the list from load_official_runs()."
        )
    errors = []
    for run in runs:
        raw = classify_fn(run.train_x, run.test_x)
        if isinstance(raw, torch.Tensor):
            predicted = raw.detach().cpu().reshape(-1)
        else:
            predicted = torch.as_tensor(np.asarray(raw)).reshape(-1)
        if predicted.shape != run.test_targets.shape:
            raise ValueError(
                f"classify_fn returned {tuple(predicted.shape)} predictions for {run.name}; expected "
                f"{tuple(run.test_targets.shape)}, one training index per test image."
            )
        wrong = (predicted.to(torch.int64) != run.test_targets).to(torch.float64).mean()
        errors.append(100.0 * float(wrong))
    return {"error_per_run": errors, "mean_error": float(np.mean(errors)), "num_runs": len(runs)}
