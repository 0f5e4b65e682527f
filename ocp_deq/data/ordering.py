"""Trajectory-ordered batches for evaluation with fixed-point reuse.

Batch t of a group holds frame t of each of the group's trajectories (sid), frames sorted
by fid, so every frame can start from its predecessor's fixed point (a frame cannot reuse
a fixed point solved in the same batch).
"""

from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm


class OrderingError(ValueError):
    """A dataset frame without the ids trajectory order needs."""


def frame_ids(dataset, where: str = "dataset") -> list[tuple]:
    """(sid, fid) of every frame, read from the frames themselves."""
    ids = []
    for index in tqdm(range(len(dataset)), desc=f"reading sid/fid of {where}", leave=False):
        frame = dataset[index]
        sid, fid = getattr(frame, "sid", None), getattr(frame, "fid", None)
        if sid is None or fid is None:
            raise OrderingError(
                f"{where}: frame {index} has no {'sid' if sid is None else 'fid'}; ordered evaluation "
                f"needs a trajectory id (sid) and a frame index (fid) per frame"
            )
        ids.append((plain_id(sid), plain_id(fid)))
    return ids


def plain_id(value):
    """A sid or fid as a plain Python value (tensors hold them as 0-d tensors)."""
    return value.item() if hasattr(value, "item") else value


def id_list(values) -> list:
    """A batch's sids or fids as a list: a tensor of integers, or a list of names."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def trajectory_batches(ids: list[tuple], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Dataset indices in batches that walk up to ``batch_size`` trajectories in step.

    Trajectories are dealt to ranks round-robin in sid order, then grouped ``batch_size``
    at a time on each rank. Every frame appears exactly once over all ranks.
    """
    trajectories = defaultdict(list)
    for index, (sid, fid) in enumerate(ids):
        trajectories[sid].append((fid, index))
    ordered = [[index for _, index in sorted(trajectories[sid])] for sid in sorted(trajectories)]
    mine = ordered[rank::world_size]
    batches = []
    for group in (mine[k : k + batch_size] for k in range(0, len(mine), batch_size)):
        for step in range(max(len(t) for t in group)):
            batches.append([t[step] for t in group if step < len(t)])
    return batches
