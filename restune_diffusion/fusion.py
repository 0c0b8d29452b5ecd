"""Exact inference shortcuts for tuner sets (issue 26): weights folded into the linear layers they adapt, and K/V tokens
that do not depend on the input computed once instead of at every denoising step.

- **Fused weights.** Each nn.Linear that carries fused sets keeps one record: its original weight (a copy on the CPU,
  never recomputed) and the delta of each fused set, as a function (so a changed scale, enabled flag or tuner tensor
  is re-read). The weight is always `original + Σ delta` in fp32, in the order the sets were fused, written in place
  (the Parameter object stays: a compiled graph keeps reading it, no recompile); the last unfuse copies the original
  back, bit for bit. diffusers' `unfuse_lora` subtracts the delta again, which leaves round-off in the weights.
- **Cached K/V.** Prompt/prefix tokens reach the attention as K/V that depend only on weights. A `KVCache` keeps them
  while every tensor they come from (the tokens, the frozen W_k/W_v, a LoRA hooked on W_k/W_v) has the same storage
  and version counter, and no set anywhere changed its scale, enabled flag, fusion or attachment since (`bump()`).
  Used in eager inference only: with gradients on, or inside torch.compile (where a version check would recompile),
  the K/V are computed as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

_EPOCH = [0]  # bumped by any change of a set's scale, enabled flag, fusion or attachment: caches re-read their sources
RECORD = "_restune_fused"  # key in a fused nn.Linear's __dict__


def bump() -> None:
    """Something every cache may depend on changed (a scale, an enabled flag, a fusion, a set attached or detached)."""
    _EPOCH[0] += 1


# ---------------------------------------------------------------------------------------------------------------------
# fused weights


def fuse_linear(linear: nn.Linear, owner: object, delta: Callable[[], torch.Tensor | None]) -> None:
    """Add `delta()` ((out, in), or None: nothing now) to `linear.weight`, keeping the original for unfuse_linear."""
    record = linear.__dict__.get(RECORD)
    if record is None:
        record = linear.__dict__[RECORD] = {"original": linear.weight.detach().to("cpu", copy=True), "deltas": {}}
    record["deltas"][owner] = delta
    rewrite(linear)


def unfuse_linear(linear: nn.Linear, owner: object) -> None:
    """Take `owner`'s delta out; the last one out puts the original weight back exactly."""
    record = linear.__dict__.get(RECORD)
    if record is None or record["deltas"].pop(owner, None) is None:
        return
    if record["deltas"]:
        rewrite(linear)
        return
    with torch.no_grad():
        linear.weight.copy_(record["original"])
    del linear.__dict__[RECORD]


def rewrite(linear: nn.Linear) -> None:
    """weight = original + Σ delta (fp32, then the weight's dtype), in place."""
    record = linear.__dict__[RECORD]
    weight = linear.weight
    with torch.no_grad():
        total = record["original"].to(weight.device, torch.float32)
        for delta in record["deltas"].values():
            d = delta()
            if d is not None:
                total = total + d.to(total.dtype)
        weight.copy_(total)


def without_fused(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() with each fused linear's weight as it is without the fused deltas (its kept original)."""
    state = module.state_dict()
    for name, m in module.named_modules():
        if RECORD in m.__dict__:
            state[f"{name}.weight" if name else "weight"] = m.__dict__[RECORD]["original"]
    return state


@contextlib.contextmanager
def rebased(module: nn.Module) -> Iterator[None]:
    """Inside: every fused linear under `module` holds its original weight, so the block may rewrite the base weights
    (a full fine-tuning set changing its scale); after: the originals are read again and the deltas added back."""
    fused = [m for m in module.modules() if RECORD in m.__dict__]
    with torch.no_grad():
        for m in fused:
            m.weight.copy_(m.__dict__[RECORD]["original"])
    try:
        yield
    finally:
        for m in fused:
            m.__dict__[RECORD]["original"] = m.weight.detach().to("cpu", copy=True)
            rewrite(m)


# ---------------------------------------------------------------------------------------------------------------------
# cached K/V


class KVCache:
    """compute() -> (K, V) tokens, recomputed only when a tensor from sources() changed (storage or version counter)
    or `bump()` was called. sources() is re-read after every bump (sets come and go)."""

    def __init__(self, compute: Callable[[], tuple], sources: Callable[[], list[torch.Tensor]]):
        self.compute, self.sources = compute, sources
        self.epoch, self.deps, self.key, self.value = None, [], None, None

    def get(self) -> tuple:
        if self.epoch != _EPOCH[0]:
            self.deps, self.epoch, self.key = list(self.sources()), _EPOCH[0], None
        key = tuple((t.data_ptr(), t._version) for t in self.deps)
        if key != self.key:
            with torch.no_grad():
                self.value = self.compute()
            self.key = key
        return self.value


def cached_kv(tuner: nn.Module, attn: nn.Module) -> tuple:
    """The tuner's `compute_kv(attn)`, from its cache when it has one (fused) and may use it: eager, no gradient."""
    cache = tuner.kv_cache
    if cache is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return tuner.compute_kv(attn)
    return cache.get()
