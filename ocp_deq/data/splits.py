"""Train / val / test index sets over the frames ``0 .. n-1`` of one trajectory, or over
the systems of a multi-system set (:func:`split_groups`: no system in two splits).

Three modes (``n_test=None`` means "every frame not used by train and val"):

``random`` (MD17 convention, e.g. 950 / 50 / rest)
    ``perm = numpy.random.default_rng(seed).permutation(n)``; train = ``perm[:n_train]``,
    val = ``perm[n_train:n_train + n_val]``, test = the next ``n_test`` (or all the rest).
``ordered`` (consecutive blocks, no shuffling)
    train = ``[0, n_train)``, val = ``[n_train, n_train + n_val)``, test = the next
    ``n_test`` frames (or all the rest).
``overlapping`` (train and val interleaved in time, test a separate contiguous block)
    test = the last ``n_test`` frames ``[n - n_test, n)`` (default ``n - n_train - n_val``);
    train and val are drawn like ``random`` (same seed rule) from the region
    ``[0, n - n_test)``: ``perm = default_rng(seed).permutation(n - n_test)``.
    Region frames drawn by neither stay unused.

Each split is returned sorted ascending (the LMDB then keeps trajectory order; ``fid`` is
the frame index either way). The splits are disjoint.
"""

from __future__ import annotations

import numpy as np

SPLIT_MODES = ("random", "ordered", "overlapping")
SPLIT_BY = ("frame", "system")


def split_indices(n: int, mode: str = "random", n_train: int = 950, n_val: int = 50,
                  n_test: int | None = None, seed: int = 0, items: str = "frames") -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` -> sorted int64 frame indices, as documented above
    (``items`` names what is counted in errors)."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode '{mode}' (known: {', '.join(SPLIT_MODES)})")
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for name, size in sizes.items():
        if size is not None and (int(size) != size or size < 0):
            raise ValueError(f"{name} must be a non-negative integer (got {size})")
    n_test = n - n_train - n_val if n_test is None else n_test
    if n_test < 0 or n_train + n_val + n_test > n:
        raise ValueError(
            f"split sizes train {n_train} + val {n_val} + test {max(n_test, 0)} need more than the "
            f"{n} {items} available"
        )
    if mode == "random":
        perm = np.random.default_rng(seed).permutation(n)
        parts = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:n_train + n_val + n_test]
    elif mode == "ordered":
        idx = np.arange(n)
        parts = idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:n_train + n_val + n_test]
    else:
        perm = np.random.default_rng(seed).permutation(n - n_test)
        parts = perm[:n_train], perm[n_train:n_train + n_val], np.arange(n - n_test, n)
    return {name: np.sort(part).astype(np.int64) for name, part in zip(("train", "val", "test"), parts)}


def split_groups(groups, mode: str = "random", n_train: int = 950, n_val: int = 50,
                 n_test: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`split_indices` over the distinct ``groups`` (one label per frame, e.g. its sid),
    numbered in order of first appearance: the sizes count groups, and every frame goes to
    its group's split, so frames of one system never land in two splits. Returns sorted frame
    indices."""
    number: dict = {}
    codes = np.array([number.setdefault(group, len(number)) for group in groups], dtype=np.int64)
    chosen = split_indices(len(number), mode, n_train, n_val, n_test, seed, items="systems (splitting by system)")
    return {name: np.flatnonzero(np.isin(codes, part)).astype(np.int64) for name, part in chosen.items()}
