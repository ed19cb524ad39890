"""Omniglot: character images read straight from the official zips, splits and episodes.

Archives (Lake, Salakhutdinov and Tenenbaum, github.com/brendenlake/omniglot, folder ``python/``):

- minimal background sets ``images_background_small1.zip`` and ``images_background_small2.zip``
  (Greek and Latin are in both: merged, 242 characters from 8 alphabets);
- full sets ``images_background.zip`` (964 characters) and ``images_evaluation.zip``
  (659 characters), 1,623 characters in all, used when both are in the data directory;
- ``all_runs.zip``, the 20 official within-alphabet 20-way one-shot runs (read by
  :mod:`metarl.fewshot.omniglot_runs`).

Each 105x105 drawing is resized to 28x28 with a Lanczos (antialiasing) filter and inverted
so that ink is 1.0 and background 0.0 (float32). Decoded sets are kept in memory per process,
and optionally in an ``.npz`` file under a cache directory of the caller's choice.

Splits (:func:`split_characters`, fixed by ``split_seed``, default 0):

- minimal sets, by alphabet: the 8 alphabets in name order are permuted with
  ``numpy.random.default_rng(split_seed)``; the first is ``val``, the next two ``test``
  (held-out characters of unseen alphabets), the other five ``train``. With seed 0:
  val = Greek (24 characters), test = Korean + Japanese_(katakana) (87),
  train = Sanskrit, Latin, Balinese, Early_Aramaic, Tagalog (131). The challenge's own test
  is the official runs, drawn from the evaluation alphabets, which none of these contain.
- full sets, by character as in MAML and ProtoNets: the 1,623 characters (sorted by name) are
  permuted with the same generator; the first 1,200 are ``trainval`` (``train`` 1,028 and
  ``val`` 172, ProtoNets' sizes) and the other 423 ``test``. The sizes, not the exact
  character lists, of the published splits are reproduced.

Rotations by 0/90/180/270 degrees as extra classes are an option of the episode sampler,
so a character and its rotations always fall in the same split.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from metarl.fewshot.episodes import EpisodeSampler

MINIMAL_ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")
FULL_ARCHIVES = ("images_background.zip", "images_evaluation.zip")
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"
IMAGE_SIZE = 28
FULL_NUM_CHARACTERS, FULL_NUM_TRAINVAL, FULL_NUM_TRAIN = 1623, 1200, 1028
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_HINT = (
    "download it from github.com/brendenlake/omniglot (folder python/) into that directory, "
    "or pass data_dir= pointing at the directory that holds it"
)
MEMORY_CACHE: dict[tuple, object] = {}


class OmniglotDataError(RuntimeError):
    """An Omniglot archive or cache file exists but cannot be read as expected."""


@dataclass(frozen=True)
class OmniglotDataset:
    """All characters of one subset, decoded.

    Attributes:
        images: ``[C, D, S, S]`` float32 in [0, 1], ink 1: ``C`` characters, ``D`` drawings
            each (20 in Omniglot), ``S`` the image size (28). Read-only: it is shared by the cache.
        character_names: ``C`` names ``"<alphabet>/<character>"``, sorted.
        alphabets: the distinct alphabets, sorted.
        alphabet_index: ``[C]`` int64 index into ``alphabets`` of each character.
        subset: ``"minimal"`` or ``"full"``.
    """

    images: np.ndarray
    character_names: tuple[str, ...]
    alphabets: tuple[str, ...]
    alphabet_index: np.ndarray
    subset: str

    @property
    def num_characters(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_drawings(self) -> int:
        return int(self.images.shape[1])


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The directory holding the Omniglot zips.

    ``None`` means ``../shared/data``, looked up beside the project root first, then relative to
    the current directory. A directory with an ``omniglot/`` subfolder stands for that subfolder.
    """
    if data_dir is None:
        candidates = [_PROJECT_ROOT / DEFAULT_DATA_DIR, Path.cwd() / DEFAULT_DATA_DIR]
    else:
        candidates = [Path(data_dir)]
    for base in candidates:
        if (base / "omniglot").is_dir():
            return (base / "omniglot").resolve()
        if base.is_dir():
            return base.resolve()
    return (candidates[0] / "omniglot").resolve()


def open_archive(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(
            f"Omniglot archive {path.name} not found in {path.parent}; {DATA_HINT}."
        )
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise OmniglotDataError(
            f"{path.name} in {path.parent} is not a readable zip archive ({err}); the file is corrupt "
            f"or truncated: replace it with a fresh copy ({DATA_HINT})."
        ) from err


def decode_png(archive: zipfile.ZipFile, member: str, path: Path, image_size: int) -> np.ndarray:
    """One drawing as ``[S, S]`` uint8 with ink 255 (the files have ink 0 on white)."""
    try:
        with Image.open(io.BytesIO(archive.read(member))) as image:
            gray = image.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # CRC, inflate and PIL decoding errors all mean the archive's bytes are bad.
        raise OmniglotDataError(
            f"cannot decode {member} in {path.name} (in {path.parent}): {err!r}; the archive is "
            f"corrupt: replace it with a fresh copy ({DATA_HINT})."
        ) from err
    return 255 - np.asarray(gray, dtype=np.uint8)


def _list_characters(archive: zipfile.ZipFile) -> dict[str, list[str]]:
    """``"<alphabet>/<character>"`` -> sorted PNG members, for ``<root>/<alphabet>/<character>/<x>.png``."""
    characters: dict[str, list[str]] = {}
    for member in archive.namelist():
        parts = member.split("/")
        if not member.lower().endswith(".png") or len(parts) < 3 or "__MACOSX" in parts:
            continue
        characters.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(member)
    return {name: sorted(members) for name, members in characters.items()}


def _read_characters(paths: Sequence[Path], image_size: int) -> tuple[list[str], list[np.ndarray]]:
    """Decode every character of the archives; a character found in two archives is kept once."""
    found: dict[str, tuple[Path, list[str], np.ndarray]] = {}
    for path in paths:
        with open_archive(path) as archive:
            listing = _list_characters(archive)
            if not listing:
                raise OmniglotDataError(
                    f"{path.name} in {path.parent} holds no <alphabet>/<character>/<drawing>.png "
                    f"files; it is not an Omniglot image archive: replace it ({DATA_HINT})."
                )
            for name, members in listing.items():
                drawings = [m.rsplit("/", 1)[1] for m in members]
                if name in found:
                    if [m.rsplit("/", 1)[1] for m in found[name][1]] != drawings:
                        raise OmniglotDataError(
                            f"character {name} differs between {found[name][0].name} and {path.name} "
                            f"(in {path.parent}); expected the same drawings in both: replace them."
                        )
                    continue
                stack = np.stack([decode_png(archive, m, path, image_size) for m in members])
                found[name] = (path, members, stack)
    names = sorted(found)
    return names, [found[name][2] for name in names]


def _build_dataset(paths: Sequence[Path], image_size: int) -> tuple[list[str], np.ndarray]:
    names, stacks = _read_characters(paths, image_size)
    counts = {len(stack) for stack in stacks}
    if len(counts) != 1:
        odd = [
            f"{n} ({len(s)})"
            for n, s in zip(names, stacks, strict=True)
            if len(s) != len(stacks[0])
        ][:3]
        raise OmniglotDataError(
            f"characters have unequal numbers of drawings {sorted(counts)}, e.g. {odd}, in "
            f"{[p.name for p in paths]}; expected the same count for all: replace the archives."
        )
    return names, np.stack(stacks)


def cache_key(paths: Sequence[Path], subset: str, image_size: int) -> tuple:
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return (subset, image_size, stats)


def _load_npz(file: Path) -> tuple[list[str], np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return [str(n) for n in npz["character_names"]], npz["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise OmniglotDataError(
            f"cache file {file} cannot be read ({err!r}); delete it to rebuild it from the archives."
        ) from err


def _save_npz(file: Path, names: list[str], images: np.ndarray) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, images=images, character_names=np.array(names))
    os.replace(tmp, file)  # atomic: a reader never sees half a file


def _choose_subset(folder: Path, subset: str) -> str:
    if subset == "auto":
        return "full" if all((folder / name).is_file() for name in FULL_ARCHIVES) else "minimal"
    if subset not in ("minimal", "full"):
        raise ValueError(f"subset={subset!r}; expected 'auto', 'minimal' or 'full'.")
    return subset


def load_omniglot(
    data_dir: str | Path | None = None,
    subset: str = "auto",
    image_size: int = IMAGE_SIZE,
    cache_dir: str | Path | None = None,
) -> OmniglotDataset:
    """Load and decode an Omniglot subset from its zips (nothing is unpacked to disk).

    Args:
        data_dir: directory with the zips (see :func:`resolve_data_dir`); default ``../shared/data``.
        subset: ``"minimal"`` (the two small background sets, 242 characters), ``"full"``
            (background + evaluation, 1,623 characters) or ``"auto"`` (full when both full
            archives are present, else minimal).
        image_size: side ``S`` of the square output images.
        cache_dir: if given, the decoded set is also stored there as ``.npz`` and read back
            on later calls (keyed by the archives' paths, sizes and modification times).

    Returns:
        An :class:`OmniglotDataset` with ``images [C, D, S, S]`` float32, ink 1.

    Raises:
        FileNotFoundError: an archive is missing (the message names it and the directory).
        OmniglotDataError: an archive or the cache file is corrupt.
    """
    folder = resolve_data_dir(data_dir)
    subset = _choose_subset(folder, subset)
    paths = [folder / name for name in (FULL_ARCHIVES if subset == "full" else MINIMAL_ARCHIVES)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Omniglot archive {path.name} not found in {folder}; {DATA_HINT}.")
    key = cache_key(paths, subset, image_size)
    if key in MEMORY_CACHE:
        return MEMORY_CACHE[key]  # type: ignore[return-value]
    npz = None
    if cache_dir is not None:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        npz = Path(cache_dir) / f"omniglot_{subset}_{image_size}px_{digest}.npz"
    if npz is not None and npz.is_file():
        names, ink = _load_npz(npz)
    else:
        names, ink = _build_dataset(paths, image_size)
        if npz is not None:
            _save_npz(npz, names, ink)
    dataset = _make_dataset(names, ink, subset)
    MEMORY_CACHE[key] = dataset
    return dataset


def _make_dataset(names: list[str], ink: np.ndarray, subset: str) -> OmniglotDataset:
    images = ink.astype(np.float32) / np.float32(255.0)
    images.flags.writeable = False
    alphabet_of = [name.split("/")[0] for name in names]
    alphabets = tuple(sorted(set(alphabet_of)))
    return OmniglotDataset(
        images=images,
        character_names=tuple(names),
        alphabets=alphabets,
        alphabet_index=np.array([alphabets.index(a) for a in alphabet_of], dtype=np.int64),
        subset=subset,
    )


def split_characters(dataset: OmniglotDataset, split_seed: int = 0) -> dict[str, np.ndarray]:
    """Character indices of each split: ``train``, ``val``, ``trainval`` and ``test``.

    The rule is in this module's docstring: by alphabet for the minimal sets (1 val, 2 test,
    the rest train), by character for the full sets (1,028 / 172 / 423 of 1,623; other sizes
    scale in proportion). Indices are sorted and the splits disjoint.
    """
    rng = np.random.default_rng(split_seed)
    if dataset.subset == "minimal":
        if len(dataset.alphabets) < 4:
            raise ValueError(
                f"the minimal split needs at least 4 alphabets, got {len(dataset.alphabets)} "
                f"({list(dataset.alphabets)}); check the archives in the data directory."
            )
        order = rng.permutation(len(dataset.alphabets))
        groups = {"val": order[:1], "test": order[1:3], "train": order[3:]}
        split = {k: np.flatnonzero(np.isin(dataset.alphabet_index, v)) for k, v in groups.items()}
    else:
        order = rng.permutation(dataset.num_characters)
        num_trainval = round(dataset.num_characters * FULL_NUM_TRAINVAL / FULL_NUM_CHARACTERS)
        num_train = round(num_trainval * FULL_NUM_TRAIN / FULL_NUM_TRAINVAL)
        split = {
            "train": order[:num_train],
            "val": order[num_train:num_trainval],
            "test": order[num_trainval:],
        }
    split["trainval"] = np.concatenate([split["train"], split["val"]])
    return {name: np.sort(indices) for name, indices in split.items()}


def omniglot_sampler(
    dataset: OmniglotDataset,
    split: str = "train",
    split_seed: int = 0,
    num_ways: int = 5,
    num_shots: int = 1,
    num_queries: int = 15,
    rotations: bool = False,
    max_shift: int = 0,
    seed: int = 0,
    max_rotation: float = 0.0,
    max_scale: float = 0.0,
) -> EpisodeSampler:
    """An :class:`EpisodeSampler` over one split of ``dataset`` (see :func:`split_characters`).

    The standard full-set protocol is ``rotations=True`` (each rotation a class).
    """
    splits = split_characters(dataset, split_seed)
    if split not in splits:
        raise ValueError(f"split={split!r}; expected one of {sorted(splits)}.")
    return EpisodeSampler(
        dataset.images,
        splits[split],
        num_ways=num_ways,
        num_shots=num_shots,
        num_queries=num_queries,
        rotations=rotations,
        max_shift=max_shift,
        seed=seed,
        max_rotation=max_rotation,
        max_scale=max_scale,
    )
