"""Episodic N-way K-shot sampling over an array of classes of equally many images.

The sampler knows nothing about where the images came from: it takes an array
``[num_characters, num_drawings, H, W]`` and the characters it may draw from
(one split), so a split's classes can never reach another split's episodes.
Every episode is a pure function of ``(seed, index)``: the same seed yields the
same episodes in the same order, and episode ``i`` can be rebuilt alone (for
evaluation on a fixed set of test episodes, or after a resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

NUM_ROTATIONS = 4


class Episode(NamedTuple):
    """One N-way K-shot classification task.

    Labels are ``0..N-1`` assigned to the episode's classes in a random order,
    laid out class-major: ``support_y = [0]*K + [1]*K + ...``, likewise the query.

    Attributes:
        support_x: ``[N*K, 1, H, W]`` float32 support images.
        support_y: ``[N*K]`` int64 labels in ``0..N-1``.
        query_x: ``[N*Q, 1, H, W]`` float32 query images.
        query_y: ``[N*Q]`` int64 labels in ``0..N-1``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


class EpisodeBatch(NamedTuple):
    """A meta-batch of episodes stacked on a leading task axis, ready for ``vmap``.

    Attributes:
        support_x: ``[B, N*K, 1, H, W]``.
        support_y: ``[B, N*K]``.
        query_x: ``[B, N*Q, 1, H, W]``.
        query_y: ``[B, N*Q]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def stack_episodes(episodes: Sequence[Episode]) -> EpisodeBatch:
    """Stack episodes of equal shapes on a new leading task axis ``[B, ...]``."""
    if not episodes:
        raise ValueError("stack_episodes got no episodes; pass at least one Episode.")
    return EpisodeBatch(*(torch.stack(field) for field in zip(*episodes, strict=True)))


def shift_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Translate each image by whole pixels, filling the uncovered border with 0 (background).

    Args:
        images: ``[M, H, W]``.
        shifts: ``[M, 2]`` integer (row, column) offsets; positive moves the content down/right.

    Returns:
        ``[M, H, W]`` shifted images, same dtype.
    """
    num_images, height, width = images.shape
    pad = int(np.abs(shifts).max(initial=0))
    if pad == 0:
        return images.copy()
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    rows = np.arange(height)[None, :] + pad - shifts[:, 0:1]
    cols = np.arange(width)[None, :] + pad - shifts[:, 1:2]
    index = np.arange(num_images)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def affine_images(images: np.ndarray, angles: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Rotate and scale each image about its centre, bilinear, filling the outside with 0.

    Output pixel ``p`` (centred coordinates) takes the input's value at ``R(-angle) p / scale``, so
    content turns counter-clockwise as displayed by ``angles`` degrees (90 gives ``np.rot90``)
    and grows by ``scales`` (2 doubles its size).

    Args:
        images: ``[M, H, W]``.
        angles: ``[M]`` degrees, counter-clockwise.
        scales: ``[M]`` positive factors.

    Returns:
        ``[M, H, W]`` float32 images.
    """
    num_images, height, width = images.shape
    if np.any(np.asarray(scales) <= 0):
        raise ValueError(f"scales must be > 0, got min {np.min(scales)}")
    theta = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None, None]
    scale = np.asarray(scales, dtype=np.float64)[:, None, None]
    r = np.arange(height, dtype=np.float64)[None, :, None] - (height - 1) / 2
    c = np.arange(width, dtype=np.float64)[None, None, :] - (width - 1) / 2
    cos, sin = np.cos(theta), np.sin(theta)
    src_r = (r * cos + c * sin) / scale + (height - 1) / 2
    src_c = (c * cos - r * sin) / scale + (width - 1) / 2
    r0, c0 = np.floor(src_r).astype(np.int64), np.floor(src_c).astype(np.int64)
    dr, dc = src_r - r0, src_c - c0
    index = np.arange(num_images)[:, None, None]
    out = np.zeros((num_images, height, width), dtype=np.float64)
    for ir, wr in ((r0, 1 - dr), (r0 + 1, dr)):
        for ic, wc in ((c0, 1 - dc), (c0 + 1, dc)):
            inside = (ir >= 0) & (ir < height) & (ic >= 0) & (ic < width)
            value = images[index, np.clip(ir, 0, height - 1), np.clip(ic, 0, width - 1)]
            out += np.where(inside, value * wr * wc, 0.0)
    return out.astype(np.float32)


class EpisodeSampler:
    """Draws N-way K-shot episodes from one split's characters.

    A class is a character, or with ``rotations=True`` a (character, rotation by
    0/90/180/270 degrees) pair, so each split offers four times as many classes.
    Within an episode the support and query drawings of a class are distinct.

    Args:
        images: ``[num_characters, num_drawings, H, W]`` float32 images (ink 1, background 0).
        characters: indices (into ``images``) of the characters this split may use.
        num_ways: N, classes per episode.
        num_shots: K, support drawings per class.
        num_queries: Q, query drawings per class.
        rotations: whether each rotation of a character is its own class.
        max_shift: augmentation: each image is shifted by up to this many pixels
            along each axis (uniform integers); 0 turns it off.
        max_rotation: augmentation: each image is turned by a uniform angle in
            ``[-max_rotation, max_rotation]`` degrees (before the shift); 0 turns it off.
        max_scale: augmentation: each image is scaled by a uniform factor in
            ``[1 - max_scale, 1 + max_scale]`` (with the rotation); 0 turns it off.
        seed: episode ``i`` depends only on ``(seed, i)``.
    """

    def __init__(
        self,
        images: np.ndarray,
        characters: Sequence[int] | np.ndarray,
        num_ways: int = 5,
        num_shots: int = 1,
        num_queries: int = 15,
        rotations: bool = False,
        max_shift: int = 0,
        seed: int = 0,
        max_rotation: float = 0.0,
        max_scale: float = 0.0,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(
                f"images has shape {tuple(images.shape)}; expected [num_characters, num_drawings, H, W]."
            )
        self.images = images
        self.characters = np.asarray(characters, dtype=np.int64)
        self.num_ways, self.num_shots, self.num_queries = num_ways, num_shots, num_queries
        self.rotations, self.max_shift, self.seed = rotations, max_shift, seed
        self.max_rotation, self.max_scale = float(max_rotation), float(max_scale)
        self.num_episodes_drawn = 0
        self._check_settings()

    @property
    def num_classes(self) -> int:
        """Classes available to this sampler (characters, times 4 with rotations)."""
        return len(self.characters) * (NUM_ROTATIONS if self.rotations else 1)

    def _check_settings(self) -> None:
        num_characters, num_drawings = self.images.shape[:2]
        if self.num_ways < 1 or self.num_shots < 1 or self.num_queries < 0 or self.max_shift < 0:
            raise ValueError(
                f"num_ways={self.num_ways}, num_shots={self.num_shots}, num_queries={self.num_queries}, "
                f"max_shift={self.max_shift}; expected num_ways >= 1, num_shots >= 1, "
                "num_queries >= 0, max_shift >= 0."
            )
        if not (0 <= self.max_rotation <= 180 and 0 <= self.max_scale < 1):
            raise ValueError(
                f"max_rotation={self.max_rotation}, max_scale={self.max_scale}; expected "
                "0 <= max_rotation <= 180 (degrees) and 0 <= max_scale < 1 (a fraction)."
            )
        bad = self.characters[(self.characters < 0) | (self.characters >= num_characters)]
        if bad.size:
            raise ValueError(
                f"character indices {bad[:5].tolist()} are out of range for {num_characters} characters."
            )
        if self.num_ways > self.num_classes:
            raise ValueError(
                f"num_ways={self.num_ways} but the split has only {self.num_classes} classes "
                f"(rotations={self.rotations}); lower num_ways, use another split or set rotations=True."
            )
        if self.rotations and self.images.shape[2] != self.images.shape[3]:
            raise ValueError(
                f"rotations=True needs square images, got {tuple(self.images.shape[2:])}; "
                "set rotations=False or resize the images."
            )
        if self.num_shots + self.num_queries > num_drawings:
            raise ValueError(
                f"num_shots + num_queries = {self.num_shots + self.num_queries} but each class has only "
                f"{num_drawings} drawings; lower num_shots or num_queries."
            )

    def episode(self, index: int) -> Episode:
        """Episode number ``index`` of this seed (does not advance the sampler).

        Returns:
            An :class:`Episode` with ``support_x [N*K, 1, H, W]``, ``support_y [N*K]``,
            ``query_x [N*Q, 1, H, W]``, ``query_y [N*Q]``.
        """
        rng = np.random.default_rng([self.seed, index])
        num_per_class = self.num_shots + self.num_queries
        classes = rng.choice(self.num_classes, size=self.num_ways, replace=False)
        characters = self.characters[classes % len(self.characters)]
        turns = classes // len(self.characters)
        num_drawings = self.images.shape[1]
        drawings = np.stack(
            [rng.choice(num_drawings, size=num_per_class, replace=False) for _ in classes]
        )
        x = self.images[characters[:, None], drawings]  # [N, K+Q, H, W]
        for k in range(1, NUM_ROTATIONS):
            x[turns == k] = np.rot90(x[turns == k], k=k, axes=(-2, -1))
        if self.max_shift > 0 or self.max_rotation > 0 or self.max_scale > 0:
            x = self._augment(x.reshape(-1, *x.shape[2:]), rng).reshape(x.shape)
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(2)
        labels = torch.arange(self.num_ways)
        return Episode(
            support_x=batch[:, : self.num_shots].reshape(-1, *batch.shape[2:]),
            support_y=labels.repeat_interleave(self.num_shots),
            query_x=batch[:, self.num_shots :].reshape(-1, *batch.shape[2:]),
            query_y=labels.repeat_interleave(self.num_queries),
        )

    def _augment(self, flat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Random turn and scale (where set), then random whole-pixel shift, of ``[M, H, W]`` images."""
        shifts = None
        if self.max_shift > 0:  # drawn first: shift-only episodes are those of older versions
            shifts = rng.integers(-self.max_shift, self.max_shift + 1, size=(flat.shape[0], 2))
        if self.max_rotation > 0 or self.max_scale > 0:
            angles = rng.uniform(-self.max_rotation, self.max_rotation, size=flat.shape[0])
            scales = rng.uniform(1 - self.max_scale, 1 + self.max_scale, size=flat.shape[0])
            flat = affine_images(flat, np.asarray(angles), np.asarray(scales))
        return flat if shifts is None else shift_images(flat, shifts)

    def sample(self) -> Episode:
        """The next episode of this seed's sequence."""
        episode = self.episode(self.num_episodes_drawn)
        self.num_episodes_drawn += 1
        return episode

    def sample_batch(self, meta_batch_size: int) -> EpisodeBatch:
        """The next ``meta_batch_size`` episodes stacked as ``[B, ...]`` (see :class:`EpisodeBatch`)."""
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size={meta_batch_size}; expected at least 1.")
        return stack_episodes([self.sample() for _ in range(meta_batch_size)])

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()
