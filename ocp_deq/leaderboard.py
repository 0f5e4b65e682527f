"""OC20 leaderboard files (EvalAI S2EF / IS2RS / IS2RE submissions) and local evaluation.

fairchem's ``--mode predict`` writes one ``ocp_predictions.npz`` per test split (``ids``
"sid_fid", ``energy``, ``forces`` of the free atoms concatenated, ``chunk_idx`` = cumulative
free-atom counts with the last one dropped); ``--mode run-relaxations`` writes
``relaxed_positions.npz`` (``ids``, ``pos`` of all atoms, ``chunk_idx``; with
``task.write_pos``) and, only with ``task.relax_opt.traj_dir``, one ``<sid>.traj`` per system:
relaxed energies exist nowhere else, so IS2RE reads each trajectory's last frame, as
fairchem's ``make_submission_file.py --is2re-relaxations`` does. EvalAI wants one npz
holding ``{split}_{key}`` for the four test splits. Per-system forces are recovered
by position (``np.split(forces, chunk_idx)`` paired with ``ids``), so an inconsistent file
can be misread instead of rejected: we check everything before writing.

The EvalAI server no longer scores OC20, so :func:`evaluate_s2ef` computes the leaderboard
metrics locally on labelled LMDB frames (same numbers as fairchem's ``Evaluator``), and
:func:`evaluate_is2re` scores relaxed energies with fairchem's ``Evaluator(task="is2re")``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

import ase.io
import numpy as np
import torch
from fairchem.core.modules.evaluator import Evaluator

from ocp_deq.data import read_lmdb

SPLITS = ("id", "ood_ads", "ood_cat", "ood_both")
S2EF_FIELDS = ("ids", "energy", "forces", "chunk_idx")
IS2RS_FIELDS = ("ids", "pos", "chunk_idx")
IS2RE_FIELDS = ("ids", "energy")
# S2EF leaderboard thresholds for EFwT (eV, eV/Å).
ENERGY_THRESHOLD = 0.02
FORCE_THRESHOLD = 0.03

_S2EF_FLOATS = ("float16", "float32")
# Relaxed positions need better than float16 (spacing 0.016 Å at 16-32 Å, while ADwT's
# thresholds start at 0.01 Å); fairchem itself writes float64.
_IS2RS_FLOATS = ("float32", "float64")
# Relaxed energies: fairchem's hybrid IS2RE merging passes predict's float16 through, so it is
# accepted with a warning (spacing 0.004 eV at 4-8 eV, against EwT's 0.02 eV).
_IS2RE_FLOATS = ("float16", "float32", "float64")


class SubmissionError(ValueError):
    """A submission or prediction file that EvalAI would reject or misread."""


# ----------------------------------------------------------------------------- loading


def _load_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an npz, refusing pickled (object) arrays: EvalAI cannot read them."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: no such file")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001  (zip / format errors of every kind)
        raise SubmissionError(f"{path}: not a readable npz file ({exc})") from exc
    arrays = {}
    with npz:
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as exc:
                raise SubmissionError(
                    f"{path}: key '{key}' is an object (pickled) array; it must be a plain numeric/string array"
                ) from exc
    return arrays


def _as_arrays(source) -> dict[str, np.ndarray]:
    """A submission given as a path or as a mapping of arrays."""
    if not isinstance(source, Mapping):
        return _load_npz(source)
    arrays = {}
    for key, value in source.items():
        try:
            arrays[key] = np.asarray(value)
        except ValueError as exc:  # ragged lists
            raise SubmissionError(f"key '{key}' is ragged; it must be one stacked array") from exc
    return arrays


# ----------------------------------------------------------------------------- validation


def _check_group(arrays: dict, prefix: str, where: str, fields, floats) -> None:
    """Check one split's (or one predictions file's) ``fields``: ids, energy, per-atom rows
    (forces or pos) and their ``chunk_idx``, whichever the track has."""
    rows_field = next((f for f in ("forces", "pos") if f in fields), None)

    def fail(field, problem):
        raise SubmissionError(f"{where}, key '{prefix}{field}': {problem}")

    missing = [f"{prefix}{f}" for f in fields if f"{prefix}{f}" not in arrays]
    if missing:
        raise SubmissionError(f"{where}: missing key(s) {', '.join(missing)}")
    a = {f: arrays[f"{prefix}{f}"] for f in fields}
    for field, value in a.items():
        if value.dtype == object:
            fail(field, "is an object array; it must be one plain stacked array")

    ids = a["ids"]
    if ids.dtype.kind != "U":
        fail("ids", f"must be strings, got dtype {ids.dtype}")
    if ids.ndim != 1 or len(ids) == 0:
        fail("ids", f"must be a non-empty 1-D array, got shape {ids.shape}")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = unique[counts > 1]
        fail("ids", f"{len(dup)} duplicate id(s), e.g. '{dup[0]}'")
    n = len(ids)

    for field in [f for f in ("energy", rows_field) if f in a]:
        value = a[field]
        if value.dtype.name not in floats:
            fail(field, f"dtype {value.dtype} not allowed (use {' or '.join(floats)})")
        if not np.isfinite(value).all():
            kind = "NaN" if np.isnan(value).any() else "inf"
            overflow = value.dtype == np.float16 and kind == "inf"
            hint = " (beyond float16's range of ±65504: use float32)" if overflow else ""
            fail(field, f"contains {kind}{hint}")
    if "energy" in a and a["energy"].shape not in ((n,), (n, 1)):  # fairchem's merging writes [N, 1]
        fail("energy", f"must hold one value per id ({n}), flat or [N, 1], got shape {a['energy'].shape}")
    if rows_field is None:
        return
    rows = a[rows_field]
    if rows.ndim != 2 or rows.shape[1] != 3:
        fail(rows_field, f"must be a stacked [M, 3] array, got shape {rows.shape}")

    chunk = a["chunk_idx"]
    if chunk.dtype.kind not in "iu":
        fail("chunk_idx", f"must be integers, got dtype {chunk.dtype}")
    if chunk.shape != (n - 1,):
        fail("chunk_idx", f"must have len(ids) - 1 = {n - 1} entries (last cumulative count dropped), "
                          f"got shape {chunk.shape}")
    if n > 1:
        if chunk[0] < 0 or (np.diff(chunk) < 0).any():
            fail("chunk_idx", "must be non-negative and non-decreasing (cumulative atom counts)")
        if chunk[-1] > len(rows):
            fail("chunk_idx", f"last value {chunk[-1]} exceeds the {len(rows)} rows of '{prefix}{rows_field}'")


def _suspicious_splits(arrays: dict, compared: str) -> list[str]:
    """Warnings for splits that share ids or hold identical predictions (a copy-paste, or
    one split's results filed under another's name)."""
    warnings = []
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            shared = np.intersect1d(arrays[f"{first}_ids"], arrays[f"{second}_ids"])
            if len(shared):
                warnings.append(f"splits '{first}' and '{second}' share {len(shared)} id(s), e.g. '{shared[0]}': "
                                "ids must belong to one test split")
            a, b = arrays[f"{first}_{compared}"], arrays[f"{second}_{compared}"]
            if a.shape == b.shape and np.array_equal(a, b):
                warnings.append(f"splits '{first}' and '{second}' hold identical '{compared}' predictions")
    return warnings


def _validate(source, fields, compared: str, floats) -> list[str]:
    arrays = _as_arrays(source)
    expected = {f"{split}_{field}" for split in SPLITS for field in fields}
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise SubmissionError(f"unexpected key(s) {', '.join(unexpected)}; expected {{split}}_{{{','.join(fields)}}}")
    for split in SPLITS:
        if not any(key.startswith(f"{split}_") for key in arrays):
            raise SubmissionError(f"split '{split}' is missing (no '{split}_*' keys)")
        _check_group(arrays, f"{split}_", f"split '{split}'", fields, floats)
    return _suspicious_splits(arrays, compared)


def validate_s2ef_submission(path_or_dict) -> list[str]:
    """Raise :class:`SubmissionError` unless this is a well-formed EvalAI S2EF submission
    (energies flat or [N, 1], as fairchem's own merging writes them); returns warnings."""
    return _validate(path_or_dict, S2EF_FIELDS, "forces", _S2EF_FLOATS)


def validate_is2rs_submission(path_or_dict) -> list[str]:
    """Raise :class:`SubmissionError` unless this is a well-formed EvalAI IS2RS submission;
    returns warnings."""
    return _validate(path_or_dict, IS2RS_FIELDS, "pos", _IS2RS_FLOATS)


def validate_is2re_submission(path_or_dict) -> list[str]:
    """Raise :class:`SubmissionError` unless this is a well-formed EvalAI IS2RE submission
    (``{split}_ids`` = sids, ``{split}_energy``, as fairchem's ``--is2re-relaxations`` writes);
    returns warnings."""
    arrays = _as_arrays(path_or_dict)
    warnings = _validate(arrays, IS2RE_FIELDS, "energy", _IS2RE_FLOATS)
    coarse = [split for split in SPLITS if arrays[f"{split}_energy"].dtype == np.float16]
    if coarse:
        warnings.append(f"split(s) {', '.join(coarse)}: float16 energies are only good to ~0.004 eV "
                        "(EwT's threshold is 0.02 eV); write float32 or float64")
    return warnings


# ----------------------------------------------------------------------------- merging


def _resolve_splits(split_files: Mapping) -> dict[str, Path]:
    """Exactly the four splits, each from its own file or folder."""
    names = set(split_files)
    if names != set(SPLITS):
        raise SubmissionError(
            f"need exactly the splits {', '.join(SPLITS)}; "
            f"missing {sorted(set(SPLITS) - names)}, unknown {sorted(names - set(SPLITS))}"
        )
    resolved = {split: Path(split_files[split]).resolve() for split in SPLITS}
    if len(set(resolved.values())) < len(SPLITS):
        raise SubmissionError(f"the same file is given for several splits: {resolved}")
    return resolved


def _read_split_files(split_files: Mapping, fields) -> dict[str, dict[str, np.ndarray]]:
    resolved = _resolve_splits(split_files)
    per_split = {}
    for split in SPLITS:
        arrays = _load_npz(resolved[split])
        missing = [f for f in fields if f not in arrays]
        if missing:
            raise SubmissionError(f"split '{split}', file {resolved[split]}: missing key(s) {', '.join(missing)}")
        per_split[split] = {f: arrays[f] for f in fields}
    return per_split


def find_split_files(results_dir, filename: str = "ocp_predictions.npz") -> dict[str, Path]:
    """The four per-split result files under fairchem's ``<run-dir>/results`` folder.

    Convention: each split is predicted with ``--identifier <split>``, so fairchem writes
    ``results/<YYYY-mm-dd-HH-MM-SS>-<split>/<filename>``; a plain ``results/<split>/<filename>``
    is accepted too. ``filename`` may name a folder (IS2RE: the trajectories). Exactly one
    candidate per split, else an error lists them.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise SubmissionError(f"results dir {root}: no such folder")
    found = {}
    for split in SPLITS:
        pattern = re.compile(r"(\d{4}(-\d{2}){5}-)?" + re.escape(split))
        candidates = sorted(p / filename for p in root.iterdir()
                            if pattern.fullmatch(p.name) and (p / filename).exists())
        if len(candidates) != 1:
            listed = ", ".join(map(str, candidates)) or "none"
            raise SubmissionError(
                f"split '{split}': need exactly one {root}/[<timestamp>-]{split}/{filename}, found {listed}"
            )
        found[split] = candidates[0]
    return found


def _write_atomic(out_path, arrays: dict, validate) -> Path:
    """Write to a temporary file next to ``out_path``, validate it, then rename it into place."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        for warning in validate(tmp):  # what we wrote reads back as a valid submission
            logging.getLogger("ocp_deq").warning(f"{out}: {warning}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _cast(value: np.ndarray, dtype: str) -> np.ndarray:
    if value.dtype.kind != "f":
        return value  # left for the validator to name
    with np.errstate(over="ignore"):  # float16 overflow becomes inf, reported by validation
        return value.astype(dtype)


def merge_s2ef_predictions(split_files: Mapping, out_path, dtype: str = "float16") -> Path:
    """Merge the four per-split ``ocp_predictions.npz`` into one EvalAI S2EF submission."""
    if dtype not in _S2EF_FLOATS:
        raise ValueError(f"dtype must be one of {_S2EF_FLOATS}, got {dtype!r}")
    merged = {}
    for split, pred in _read_split_files(split_files, S2EF_FIELDS).items():
        energy = pred["energy"]
        if energy.ndim == 2 and energy.shape[1] == 1:  # [N, 1] from some heads
            energy = energy[:, 0]
        merged[f"{split}_ids"] = pred["ids"]
        merged[f"{split}_energy"] = _cast(energy, dtype)
        merged[f"{split}_forces"] = _cast(pred["forces"], dtype)
        merged[f"{split}_chunk_idx"] = pred["chunk_idx"]
    validate_s2ef_submission(merged)
    return _write_atomic(out_path, merged, validate_s2ef_submission)


def merge_is2rs_predictions(split_files: Mapping, out_path, dtype: str = "float32") -> Path:
    """Merge the four per-split ``relaxed_positions.npz`` into one EvalAI IS2RS submission."""
    if dtype not in _IS2RS_FLOATS:
        raise ValueError(f"dtype must be one of {_IS2RS_FLOATS}, got {dtype!r}")
    merged = {}
    for split, pred in _read_split_files(split_files, IS2RS_FIELDS).items():
        merged[f"{split}_ids"] = pred["ids"]
        merged[f"{split}_pos"] = _cast(pred["pos"], dtype)
        merged[f"{split}_chunk_idx"] = pred["chunk_idx"]
    validate_is2rs_submission(merged)
    return _write_atomic(out_path, merged, validate_is2rs_submission)


def read_relaxed_energies(traj_dir, where: str = "") -> dict[str, np.ndarray]:
    """``ids`` (the sid in each ``<sid>.traj`` file name) and ``energy`` (the last frame's) of
    a relaxation's trajectory folder, read as fairchem's ``--is2re-relaxations`` reads them,
    but naming the file that cannot be used (fairchem fails on it, or writes an empty split)."""
    where = where or f"trajectories {traj_dir}"
    folder = Path(traj_dir)
    files = sorted(folder.glob("*.traj")) if folder.is_dir() else []
    if not files:
        raise SubmissionError(f"{where}: no <sid>.traj files (relax with task.relax_opt.traj_dir=<this folder>)")
    ids, energies = [], []
    for path in files:
        try:
            frames = ase.io.read(path, ":")
            energy = frames[-1].get_potential_energy() if frames else None
        except Exception as exc:  # noqa: BLE001  (truncated files, frames without a calculator)
            raise SubmissionError(f"{where}, file {path}: unreadable last frame or energy ({exc})") from exc
        if energy is None:
            raise SubmissionError(f"{where}, file {path}: holds no frames (fairchem writes none for a system "
                                  "that meets fmax before its first step), so it has no relaxed energy")
        if not np.isfinite(energy):
            raise SubmissionError(f"{where}, file {path}: last frame's energy is {energy}")
        ids.append(path.stem)
        energies.append(energy)
    return {"ids": np.array(ids), "energy": np.array(energies, np.float64)}


def merge_is2re_relaxations(split_dirs: Mapping, out_path) -> Path:
    """Merge the four splits' relaxation trajectory folders into one EvalAI IS2RE submission."""
    merged = {}
    for split, folder in _resolve_splits(split_dirs).items():
        energies = read_relaxed_energies(folder, f"split '{split}', trajectories {folder}")
        merged[f"{split}_ids"], merged[f"{split}_energy"] = energies["ids"], energies["energy"]
    validate_is2re_submission(merged)
    return _write_atomic(out_path, merged, validate_is2re_submission)


# ----------------------------------------------------------------------------- evaluation


def s2ef_metrics(energy_pred, energy_true, forces_pred, forces_true, free_counts) -> dict:
    """OC20 S2EF metrics; forces are the free atoms' only, ``free_counts`` per system.

    A system without free atoms passes EFwT on its energy alone (fairchem's Evaluator
    raises on it instead).
    """
    e_err = np.abs(np.asarray(energy_pred, np.float64).ravel() - np.asarray(energy_true, np.float64).ravel())
    fp = np.asarray(forces_pred, np.float64).reshape(-1, 3)
    ft = np.asarray(forces_true, np.float64).reshape(-1, 3)
    counts = np.asarray(free_counts, np.int64)
    if not (len(e_err) == len(counts) and counts.sum() == len(fp) == len(ft)):
        raise ValueError("energies, forces and free-atom counts do not match in length")
    f_err = np.abs(fp - ft)
    eps = 1e-8  # as torch.cosine_similarity: each norm clamped from below
    cos = (fp * ft).sum(1) / (np.maximum(np.linalg.norm(fp, axis=1), eps) * np.maximum(np.linalg.norm(ft, axis=1), eps))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    worst = np.zeros(len(counts))
    has_free = counts > 0
    if has_free.any():
        worst[has_free] = np.maximum.reduceat(f_err.max(1), starts[has_free])
    within = (e_err < ENERGY_THRESHOLD) & (worst < FORCE_THRESHOLD)
    return {
        "energy_mae": float(e_err.mean()),
        "forces_mae": float(f_err.mean()) if len(f_err) else float("nan"),
        "forces_cos": float(cos.mean()) if len(cos) else float("nan"),
        "efwt": float(within.mean()),
        "n_systems": int(len(counts)),
        "n_free_atoms": int(counts.sum()),
    }


def _plain(value):
    """sid / fid as fairchem prints them into ids (tensors and numpy scalars unwrapped)."""
    return value.item() if hasattr(value, "item") else value


def _labelled_frames(lmdb_path, fields, frame_id) -> dict:
    """The LMDB's frames by id, each carrying every one of ``fields``."""
    frames = {}
    for index, frame in enumerate(read_lmdb(lmdb_path)):
        for field in fields:
            if getattr(frame, field, None) is None:
                raise SubmissionError(f"{lmdb_path}: frame {index} has no '{field}' (unlabelled data?)")
        key = frame_id(frame)
        if key in frames:
            raise SubmissionError(f"{lmdb_path}: id '{key}' appears twice (frames {frames[key][0]} and {index})")
        frames[key] = (index, frame)
    return frames


def _match_ids(ids, frames: dict, label: str, lmdb_path) -> None:
    """Predictions and labels must cover the same ids: a metric over part of a split misleads."""
    not_in_lmdb = [i for i in ids if i not in frames]
    not_predicted = sorted(set(frames) - set(ids))
    for missing, where in ((not_in_lmdb, f"in {label} but not in {lmdb_path}"),
                           (not_predicted, f"in {lmdb_path} but not in {label}")):
        if missing:
            raise SubmissionError(f"{len(missing)} id(s) {where}, e.g. {', '.join(missing[:5])}")


def _label(source, kind: str) -> str:
    return f"the {kind}" if isinstance(source, Mapping) else f"{kind} {source}"


def evaluate_s2ef(predictions_npz, lmdb_path) -> dict:
    """Score one split's predictions (fairchem's predict layout) on labelled S2EF LMDB frames."""
    pred = _as_arrays(predictions_npz)
    pred = {k: v[:, 0] if k == "energy" and v.ndim == 2 and v.shape[1] == 1 else v for k, v in pred.items()}
    label = _label(predictions_npz, "predictions")
    _check_group(pred, "", label, S2EF_FIELDS, ("float16", "float32", "float64"))
    frames = _labelled_frames(lmdb_path, ("energy", "forces", "fixed"),
                              lambda frame: f"{_plain(frame.sid)}_{_plain(frame.fid)}")
    ids = [str(i) for i in pred["ids"]]
    _match_ids(ids, frames, label, lmdb_path)

    bounds = np.concatenate([[0], pred["chunk_idx"], [len(pred["forces"])]]).astype(np.int64)
    energy_true, forces_true, counts = [], [], []
    for i, key in enumerate(ids):
        _, frame = frames[key]
        free = np.asarray(frame.fixed).reshape(-1) == 0
        target = np.asarray(frame.forces, np.float64).reshape(-1, 3)[free]
        if bounds[i + 1] - bounds[i] != len(target):
            raise SubmissionError(
                f"id '{key}': {bounds[i + 1] - bounds[i]} predicted force rows, "
                f"but the frame has {len(target)} free atoms"
            )
        energy_true.append(float(frame.energy))
        forces_true.append(target)
        counts.append(len(target))
    return s2ef_metrics(pred["energy"], energy_true, pred["forces"], np.concatenate(forces_true), counts)


def evaluate_is2re(predictions, lmdb_path) -> dict:
    """Energy MAE / MSE and EwT (|dE| < 0.02 eV) of relaxed energies, by fairchem's
    ``Evaluator(task="is2re")``, on a labelled relax LMDB (initial structures with
    ``y_relaxed``). ``predictions``: a relaxation's trajectory folder, or an npz / mapping
    with ``ids`` (sids) and ``energy``."""
    if not isinstance(predictions, Mapping) and Path(predictions).is_dir():
        label = _label(predictions, "trajectories")
        pred = read_relaxed_energies(predictions, label)
    else:
        label = _label(predictions, "predictions")
        pred = _as_arrays(predictions)
        _check_group(pred, "", label, IS2RE_FIELDS, ("float16", "float32", "float64"))
    frames = _labelled_frames(lmdb_path, ("y_relaxed",), lambda frame: str(_plain(frame.sid)))
    ids = [str(i) for i in pred["ids"]]
    _match_ids(ids, frames, label, lmdb_path)

    predicted = torch.as_tensor(np.asarray(pred["energy"], np.float64).reshape(-1))
    target = torch.tensor([float(frames[i][1].y_relaxed) for i in ids], dtype=torch.float64)
    metrics = Evaluator(task="is2re").eval({"energy": predicted}, {"energy": target})
    return {"energy_mae": metrics["energy_mae"]["metric"], "energy_mse": metrics["energy_mse"]["metric"],
            "ewt": metrics["energy_within_threshold"]["metric"], "n_systems": len(ids)}
