"""Per-system fixed-point cache: warm starts along relaxations, MD and ordered evaluation.

A graph's fixed point depends only on that graph (per-graph solving), so a system's last
fixed point is a valid start in any later batch. Entries are keyed by the system id and
checked against the atomic numbers: a changed system (other count or elements) starts cold.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ocp_deq.data.ordering import id_list
from ocp_deq.deq.settings import ReuseSettings, TrainStartSettings


@dataclass
class _Entry:
    numbers: torch.Tensor
    states: list  # last fixed points [natoms, ...], oldest first (two for ``extrapolate``)


class FixedPointCache:
    """Last fixed points of up to ``settings.max_systems`` systems (least recently used dropped).

    ``keys`` (a context) overrides the ids read from ``data.sid``, e.g. for an ASE calculator.
    ``last`` holds the solver statistics of the latest forward; ``history`` (when not None)
    collects them for every forward.
    """

    def __init__(self, settings: ReuseSettings | None = None, keep_history: bool = False):
        self.settings = settings or ReuseSettings()
        self._entries: OrderedDict = OrderedDict()
        self._keys: list | None = None
        self.last: dict | None = None
        self.history: list[dict] | None = [] if keep_history else None

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @contextlib.contextmanager
    def keys(self, keys: list):
        """Use ``keys`` as the system ids of the graphs of the forwards inside the context."""
        previous, self._keys = self._keys, list(keys)
        try:
            yield self
        finally:
            self._keys = previous

    def keys_for(self, data) -> list:
        """System ids of the graphs in ``data`` (explicit keys, else ``data.sid``)."""
        if self._keys is not None:
            keys = self._keys
        elif getattr(data, "sid", None) is not None:
            keys = id_list(data.sid)
        else:
            raise KeyError("fixed-point reuse needs a system id per graph: the batch has no 'sid' (pass keys)")
        if len(keys) != data.natoms.numel():
            raise ValueError(f"fixed-point reuse: {len(keys)} system ids for {data.natoms.numel()} graphs")
        if len(set(keys)) != len(keys):
            raise ValueError(f"fixed-point reuse: a system id appears twice in one batch ({keys})")
        return keys

    def start(self, key, numbers: torch.Tensor) -> torch.Tensor | None:
        """Warm start for system ``key`` with these atomic numbers, or None (cold start)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.numbers.shape != numbers.shape or not torch.equal(entry.numbers, numbers.to(entry.numbers.device)):
            del self._entries[key]  # same id, different system: never start from a stranger
            return None
        self._entries.move_to_end(key)
        if self.settings.start == "extrapolate" and len(entry.states) == 2:
            previous, last = entry.states
            return 2 * last - previous
        return entry.states[-1]

    def store(self, key, numbers: torch.Tensor, fixed_point: torch.Tensor) -> None:
        entry = self._entries.get(key)
        state = fixed_point.detach().clone()
        if entry is None or not torch.equal(entry.numbers, numbers):
            self._entries[key] = _Entry(numbers.detach().clone(), [state])
        else:
            # plain reuse needs only the last state (on the device: half the memory)
            entry.states = [*entry.states[-1:], state] if self.settings.start == "extrapolate" else [state]
        self._entries.move_to_end(key)
        while len(self._entries) > int(self.settings.max_systems):
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entry."""
        self._entries.popitem(last=False)

    def starts(self, keys: list, numbers: list, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start states [N, ...] for a batch (zeros where cold) and the warm graphs [B]."""
        starts = [self.start(key, n) for key, n in zip(keys, numbers)]
        warm = torch.tensor([s is not None for s in starts], device=like.device)
        z0 = torch.cat([like.new_zeros((len(n), *like.shape[1:])) if s is None else s.to(like)
                        for s, n in zip(starts, numbers)])
        return z0, warm

    def store_all(self, keys: list, numbers: list, fixed_point: torch.Tensor) -> None:
        for key, n, z in zip(keys, numbers, torch.split(fixed_point, [len(n) for n in numbers])):
            self.store(key, n, z)

    def record(self, stats: dict) -> None:
        self.last = stats
        if self.history is not None:
            self.history.append(stats)


class TrainingFrameMemory(FixedPointCache):
    """Warm starts for training solves (``model.deq.train_start``): the fixed point each
    training frame reached when last seen, keyed by ``(sid, fid)``, across epochs.

    The weights have moved since, so it is a start, not an answer: the solve still runs to
    the training tolerance. A frame never seen (or dropped) starts from the stored frame of
    the same trajectory (same ``sid``, same atoms) with the nearest ``fid`` when
    ``same_trajectory`` is on, else cold. States are kept on the CPU in ``dtype``; the
    least recently used frames are dropped beyond ``memory_mb``.
    """

    def __init__(self, settings: TrainStartSettings):
        super().__init__(ReuseSettings(max_systems=2**62))
        self.train_settings = settings
        self.dtype = getattr(torch, settings.dtype)
        self._frames_of: dict = {}  # sid -> set of stored fids
        self.bytes = 0

    def start(self, key, numbers: torch.Tensor) -> torch.Tensor | None:
        state = super().start(key, numbers.cpu())
        if state is None and self.train_settings.same_trajectory:
            sid, fid = key
            nearest = sorted(self._frames_of.get(sid, ()), key=lambda other: abs(other - fid))
            for other in nearest[:1]:
                state = super().start((sid, other), numbers.cpu())
        return state

    def store(self, key, numbers: torch.Tensor, fixed_point: torch.Tensor) -> None:
        old = self._entries.get(key)
        if old is not None:
            self.bytes -= sum(s.numel() * s.element_size() for s in old.states)
        state = fixed_point.detach().to("cpu", self.dtype)
        self._entries[key] = _Entry(numbers.detach().cpu().clone(), [state])
        self._entries.move_to_end(key)
        self._frames_of.setdefault(key[0], set()).add(key[1])
        self.bytes += state.numel() * state.element_size()
        while self.bytes > self.train_settings.memory_mb * 2**20 and len(self._entries) > 1:
            self._evict()

    def _evict(self) -> None:
        (sid, fid), entry = self._entries.popitem(last=False)
        self.bytes -= sum(s.numel() * s.element_size() for s in entry.states)
        self._frames_of[sid].discard(fid)
        if not self._frames_of[sid]:
            del self._frames_of[sid]

    def keys_for(self, data) -> list:
        for name in ("sid", "fid"):
            if getattr(data, name, None) is None:
                raise KeyError(f"model.deq.train_start needs '{name}' in every training frame (OC20 LMDB "
                               f"frames and ocp_deq's converters carry sid and fid); this batch has no '{name}'")
        keys = list(zip(id_list(data.sid), id_list(data.fid)))
        if len(keys) != data.natoms.numel():
            raise ValueError(f"model.deq.train_start: {len(keys)} frame ids for {data.natoms.numel()} graphs")
        return keys
