"""A key/value memory store (working or long-term memory).

Layout is memory-major: keys (N, C_k), shrinkage (N,), selection (N, C_k), and per object group
values (N_g, n_g, C_v), so appending is a cat on dim 0 and a readout is one (sparse) matmul.
Groups: objects first given on the same frame share a group; a later group only has values for
the last N_g keys (those written since it appeared).

Tensors are never modified in place: every update builds new ones, so a shallow ``clone()`` is a
complete, independent snapshot (copy-on-write).
"""
from __future__ import annotations

import torch


def _cut(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Keep t[:start] and t[end:] (end <= 0 counts from the end; 0 means up to the end)."""
    return t[:start] if end == 0 else torch.cat([t[:start], t[end:]], 0)


def _span(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return t[start:] if end == 0 else t[start:end]


class KVStore:
    def __init__(self, count_usage: bool) -> None:
        self.count_usage = count_usage
        self.k: torch.Tensor | None = None
        self.s: torch.Tensor | None = None
        self.e: torch.Tensor | None = None
        self.use: torch.Tensor | None = None
        self.life: torch.Tensor | None = None
        self.v: list[torch.Tensor] = []
        self.groups: list[list[int]] = []  # object indices (0-based, internal order) per group

    def clone(self) -> KVStore:
        c = KVStore.__new__(KVStore)
        c.__dict__.update(self.__dict__)
        c.v = list(self.v)
        c.groups = [list(g) for g in self.groups]
        return c

    @property
    def size(self) -> int:
        return 0 if self.k is None else self.k.shape[0]

    @property
    def num_groups(self) -> int:
        return len(self.v)

    def v_size(self, gi: int) -> int:
        return self.v[gi].shape[0]

    def objects(self) -> list[int]:
        return [o for g in self.groups for o in g]

    def _add_keys(self, k: torch.Tensor, s: torch.Tensor | None, e: torch.Tensor | None) -> None:
        n = k.shape[0]
        if self.k is None:
            self.k, self.s, self.e = k, s, e
        else:
            self.k = torch.cat([self.k, k], 0)
            if s is not None:
                self.s = torch.cat([self.s, s], 0)
            if e is not None:
                self.e = torch.cat([self.e, e], 0)
        if self.count_usage:
            new_use = torch.zeros(n, device=k.device, dtype=torch.float32)
            new_life = torch.full((n,), 1e-7, device=k.device, dtype=torch.float32)
            self.use = new_use if self.use is None else torch.cat([self.use, new_use], 0)
            self.life = new_life if self.life is None else torch.cat([self.life, new_life], 0)

    def add_frame(self, k: torch.Tensor, s: torch.Tensor, e: torch.Tensor | None, value: torch.Tensor,
                  objects: list[int]) -> None:
        """Working memory: one frame; value (HW, n_objects, C_v) for ``objects`` (internal order).

        Objects already in a group extend it; the others form a new group.
        """
        self._add_keys(k, s, e)
        pos = {o: i for i, o in enumerate(objects)}
        for gi, group in enumerate(self.groups):
            self.v[gi] = torch.cat([self.v[gi], value[:, [pos[o] for o in group]]], 0)
        known = set(self.objects())
        new = [o for o in objects if o not in known]
        if new:
            self.v.append(value[:, [pos[o] for o in new]])
            self.groups.append(new)

    def add_prototypes(self, k: torch.Tensor, s: torch.Tensor, values: list[torch.Tensor | None],
                       groups: list[list[int]]) -> None:
        """Long-term memory: consolidated prototypes; values per working-memory group (None: none)."""
        self._add_keys(k, s, None)
        for gi, gv in enumerate(values):
            if gv is None:
                continue
            if gi < self.num_groups:
                self.v[gi] = torch.cat([self.v[gi], gv], 0)
            else:
                self.v.append(gv)
                self.groups.append(list(groups[gi]))

    def record_usage(self, usage: torch.Tensor) -> None:
        """usage (N,): affinity mass each element received from one query frame."""
        if self.count_usage:
            self.use = self.use + usage
            self.life = self.life + 1

    def usage(self) -> torch.Tensor:
        if not self.count_usage:
            raise RuntimeError("this store does not count usage")
        return self.use / self.life

    def sliced(self, start: int, end: int):
        """(keys, shrinkage, selection, usage) of elements start..end (end <= 0 from the end)."""
        return (_span(self.k, start, end), None if self.s is None else _span(self.s, start, end),
                None if self.e is None else _span(self.e, start, end), _span(self.usage(), start, end))

    def sieve(self, start: int, end: int, min_size: int) -> None:
        """Drop elements start..end. Group values are cut with the same (group-relative) bounds,
        but only groups of at least ``min_size`` (smaller ones were not consolidated)."""
        self.k = _cut(self.k, start, end)
        for name in ("s", "e", "use", "life"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, _cut(t, start, end))
        self.v = [_cut(gv, start, end) if gv.shape[0] >= min_size else gv for gv in self.v]

    def remove_least_used(self, max_size: int) -> None:
        """Drop the least-used elements so that at most ``max_size`` stay (ties at the cut go too)."""
        n_drop = self.size - max_size
        if n_drop <= 0:
            return
        if self.count_usage:
            usage = self.usage()
            threshold = torch.topk(usage, k=n_drop, largest=False, sorted=True).values[-1]
            keep = usage > threshold
        else:  # no usage counted (short video expected): drop the oldest
            keep = torch.arange(self.size, device=self.k.device) >= n_drop
        n_old = keep.shape[0]
        self.k = self.k[keep]
        for name in ("s", "e", "use", "life"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[keep])
        # A group's values belong to the last v_size keys (see the module doc). The official
        # code raises here with several groups; we apply the same mask to each group's span.
        self.v = [gv[keep[n_old - gv.shape[0]:]] for gv in self.v]
