"""Working, long-term and sensory memory; top-k readout; consolidation into prototypes."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .kv_store import KVStore


@dataclass(frozen=True)
class MemoryConfig:
    top_k: int = 30
    long_term: bool = True
    count_usage: bool = True  # long-term usage counting (decided per video, see XMemConfig)
    min_mid_term_frames: int = 5
    max_mid_term_frames: int = 10
    num_prototypes: int = 128
    max_long_term_elements: int = 10000


def similarity(mem_k: torch.Tensor, mem_s: torch.Tensor | None, q_k: torch.Tensor, q_e: torch.Tensor | None) -> torch.Tensor:
    """Query-major similarity (Q, N): -s_n * sum_c e_qc (m_nc - q_qc)^2 / sqrt(C_k),
    in the expanded three-term form the model was trained with (so rounding matches)."""
    if q_e is not None:
        a_sq = q_e @ mem_k.pow(2).t()
        two_ab = 2 * ((q_k * q_e) @ mem_k.t())
        b_sq = (q_e * q_k.pow(2)).sum(1, keepdim=True)
        sim = -a_sq + two_ab - b_sq
    else:
        sim = -mem_k.pow(2).sum(1)[None] + 2 * (q_k @ mem_k.t())
    if mem_s is not None:
        sim = sim * mem_s[None]
    return sim / math.sqrt(mem_k.shape[1])


def top_k_affinity(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row: the top-k elements and their weights, exp WITHOUT max subtraction (as the
    official code; the similarities are bounded by the shrinkage), normalised. Returns
    (weights (Q, k), indices (Q, k)): a sparse affinity."""
    values, indices = torch.topk(sim, k=min(k, sim.shape[1]), dim=1, sorted=False)
    w = values.exp_()
    return w / w.sum(1, keepdim=True), indices


def sparse_readout(w: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_j w[q, j] * values[idx[q, j]] for values (N, D) -> (Q, D): top-k needs no dense matmul."""
    q, k = w.shape
    dtype = values.dtype  # sparse kernels are fp32 everywhere; AMP's fp16 goes through fp32 here
    with warnings.catch_warnings():  # torch flags the (stable, exact) CSR API as beta
        warnings.simplefilter("ignore", UserWarning)
        a = torch.sparse_csr_tensor(torch.arange(0, q * k + 1, k, device=w.device), idx.reshape(-1),
                                    w.reshape(-1).float(), size=(q, values.shape[0]))
    return (a @ values.float()).to(dtype)


def usage_of(w: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, device=w.device, dtype=torch.float32).index_add_(0, idx.reshape(-1), w.reshape(-1).float())


class MemoryManager:
    def __init__(self, cfg: MemoryConfig, hidden_dim: int) -> None:
        self.cfg = cfg
        self.hidden_dim = hidden_dim
        self.work = KVStore(count_usage=cfg.long_term)
        self.long = KVStore(count_usage=cfg.long_term and cfg.count_usage)
        self.hidden: torch.Tensor | None = None  # (n_objects, C_h, h, w)
        self.hw: int | None = None  # elements per frame, fixed by the first write

    def clone(self) -> MemoryManager:
        c = MemoryManager.__new__(MemoryManager)
        c.__dict__.update(self.__dict__)
        c.work, c.long = self.work.clone(), self.long.clone()
        return c

    @property
    def objects(self) -> list[int]:
        return self.work.objects()

    @property
    def num_elements(self) -> int:
        return self.work.size + self.long.size

    # ------------------------------------------------------------------ readout
    def read(self, key: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
        """key, selection (C_k, h, w) -> readout (n_objects, C_v, h, w), objects in group order.

        Records usage (it is part of the memory's state, as in the official code)."""
        ck, h, w = key.shape
        qk = key.reshape(ck, -1).t()
        qe = None if selection is None else selection.reshape(ck, -1).t()
        k, work, long = self.cfg.top_k, self.work, self.long
        use_long = self.cfg.long_term and long.size > 0
        n_long = long.size if use_long else 0
        if use_long:
            sim = similarity(torch.cat([long.k, work.k], 0), torch.cat([long.s, work.s], 0), qk, qe)
        else:
            sim = similarity(work.k, work.s, qk, qe)
        n_all = sim.shape[1]
        outs = []
        for gi, gv in enumerate(work.v):
            lv = long.v_size(gi) if use_long and gi < long.num_groups else 0
            wv = gv.shape[0]
            if gi == 0 and lv == n_long:
                s, values = sim, (torch.cat([long.v[0], gv], 0) if lv else gv)
            else:
                s = torch.cat([sim[:, n_long - lv:n_long], sim[:, n_all - wv:]], 1) if lv else sim[:, n_all - wv:]
                values = torch.cat([long.v[gi], gv], 0) if lv else gv
            wt, idx = top_k_affinity(s, k)
            if gi == 0 and self.cfg.long_term:
                # Usage comes from the first group, which holds every key.
                usage = usage_of(wt, idx, n_all)
                work.record_usage(usage[n_long:])
                if use_long:
                    long.record_usage(usage[:n_long])
            n_g = values.shape[1]
            r = sparse_readout(wt, idx, values.reshape(values.shape[0], -1))  # (HW, n_g * C_v)
            outs.append(r.t().reshape(n_g, -1, h, w))
        return torch.cat(outs, 0)

    # ------------------------------------------------------------------ writing
    def write(self, key: torch.Tensor, shrinkage: torch.Tensor, selection: torch.Tensor | None,
              value: torch.Tensor, objects: list[int]) -> None:
        """key (C_k, h, w), shrinkage (1, h, w), selection (C_k, h, w), value (n, C_v, h, w)."""
        ck = key.shape[0]
        self.hw = self.hw or key.shape[1] * key.shape[2]
        e = selection.reshape(ck, -1).t() if (selection is not None and self.cfg.long_term) else None
        v = value.reshape(value.shape[0], value.shape[1], -1).permute(2, 0, 1).contiguous()
        self.work.add_frame(key.reshape(ck, -1).t().contiguous(), shrinkage.reshape(-1),
                            None if e is None else e.contiguous(), v, objects)
        cfg = self.cfg
        if cfg.long_term and self.work.size >= cfg.max_mid_term_frames * self.hw:
            if self.long.size >= cfg.max_long_term_elements - cfg.num_prototypes:
                self.long.remove_least_used(cfg.max_long_term_elements - cfg.num_prototypes)
            self._consolidate()

    def _consolidate(self) -> None:
        """Working frames except the first and the newest (min - 1) become prototypes in long-term memory."""
        hw, work = self.hw, self.work
        min_work = self.cfg.min_mid_term_frames * hw
        start, end = hw, hw - min_work  # end <= 0: counted from the end, as the official slices
        cand_values: list[torch.Tensor | None] = []
        for gv in work.v:
            n = gv.shape[0]
            if n == work.size or n > min_work + hw:
                cand_values.append(gv[start:] if end == 0 else gv[start:end])
            else:
                cand_values.append(None)  # this group is too young to be consolidated
        keys, shrink, sel, usage = work.sliced(start, end)
        p_key, p_values, p_shrink = self._prototypes(keys, shrink, sel, usage, cand_values)
        work.sieve(start, end, min_size=min_work + hw)
        self.long.add_prototypes(p_key, p_shrink, p_values, work.groups)

    def _prototypes(self, keys, shrink, sel, usage, cand_values):
        n = keys.shape[0]
        # Fewer candidates than prototypes (tiny frames): all of them (the official code fails here).
        top = torch.topk(usage, k=min(self.cfg.num_prototypes, usage.shape[-1]), dim=-1, sorted=True).indices
        p_key = keys[top]
        p_sel = None if sel is None else sel[top]
        sim = similarity(keys, shrink, p_key, p_sel)  # (P, N): prototypes are the queries
        affinities = []
        for gv in cand_values:
            if gv is None:
                affinities.append(None)
                continue
            valid = top >= n - gv.shape[0]  # prototypes inside this group's span
            a = torch.softmax(sim[valid][:, n - gv.shape[0]:], dim=1) if bool(valid.any()) else None
            affinities.append(a)
        p_values = [None if a is None else (a @ gv.reshape(gv.shape[0], -1)).reshape(a.shape[0], *gv.shape[1:])
                    for a, gv in zip(affinities, cand_values)]
        p_shrink = affinities[0] @ shrink
        return p_key, p_values, p_shrink

    # ------------------------------------------------------------------ sensory memory
    def add_hidden(self, n_objects: int, like: torch.Tensor) -> None:
        """Zero sensory state for objects that have none yet (like: a (C, h, w) feature)."""
        if self.hidden_dim <= 0:
            return
        have = 0 if self.hidden is None else self.hidden.shape[0]
        if n_objects > have:
            zeros = torch.zeros(n_objects - have, self.hidden_dim, *like.shape[-2:], device=like.device, dtype=torch.float32)
            self.hidden = zeros if self.hidden is None else torch.cat([self.hidden, zeros], 0)
