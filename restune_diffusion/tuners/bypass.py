"""Res-Tuning-Bypass (paper Sec. 3.3): a chain of Res-Tuners beside the frozen UNet, fed its detached features.

    state_0 = detach(root input)                                  mid_block's input      (B, C_0, h_0, w_0)
    state_i = s_i + H_i(s_i) + V_i(resize(P_i(state_{i-1})))      s_i = detach(stem_i output)  (B, C_i, h_i, w_i)
    target input := state_n                                       conv_norm_out's input

H_i (horizontal) and V_i (vertical) are group adapters whose last layer starts at zero; P_i is a channel projection
only where the width changes. At init state_n = s_n, the last stem's output, which in SD *is* conv_norm_out's input:
the tuned UNet equals the base bit for bit. The backbone up to the target runs under no_grad (no graph, no stored
activation); gradients flow through the bypass and the frozen conv_norm_out/conv_act/conv_out only, so backbone
gradient checkpointing buys nothing here. Defaults: the ms-swift SD recipe at the paper's size, 3,752,960 parameters
on SD v1.5 (paper: 3.76 M). Several bypasses may share one UNet; `restune_diffusion.multitask` routes batch slices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from restune_diffusion.config import check, check_choice, check_positive_int
from restune_diffusion.placement import call_input, replace_input
from restune_diffusion.tuners.res_adapter import ACTIVATIONS

log = logging.getLogger(__name__)
HORIZONTAL = ("group_adapter", "none")
VERTICAL = ("group_adapter",)  # no "none": the chain would drop every block but the last one
PROJECTIONS = {"1x1": 1, "3x3": 3, "none": 0}
RESIZE = ("nearest", "bilinear")


@dataclass
class BypassConfig:
    type: ClassVar[str] = "bypass"
    root: str = "mid_block"  # its input is the bypass's initial state
    stems: str | list = "auto"  # their outputs feed the horizontal tuners; "auto" = mid_block + every up block
    target: str = "conv_norm_out"  # the final state replaces this module's input
    horizontal: str = "group_adapter"  # group_adapter | none (ablation: vertical path only)
    vertical: str = "group_adapter"  # group_adapter (the chain needs it)
    groups: int = 4
    hidden_ratio: float = 0.5  # adapter hidden width = ratio × width (0.5 gives the paper's 3.76 M)
    act: str = "gelu"
    projection: str = "1x1"  # where the width changes: 1x1 | 3x3 conv | none (then widths must match)
    resize: str = "nearest"  # how the state reaches the next stem's resolution: nearest | bilinear

    def __post_init__(self):
        name = self.type
        for key in ("root", "target"):
            check(isinstance(getattr(self, key), str) and getattr(self, key), f"{name}.{key}", "a module name",
                  getattr(self, key))
        ok = self.stems == "auto" or (isinstance(self.stems, (list, tuple)) and len(self.stems) > 0
                                      and all(isinstance(s, str) and s for s in self.stems)
                                      and len(set(self.stems)) == len(self.stems))
        check(ok, f"{name}.stems", '"auto" or a non-empty list of distinct module names in forward order', self.stems)
        self.stems = self.stems if self.stems == "auto" else list(self.stems)
        check_choice(self.horizontal, HORIZONTAL, f"{name}.horizontal")
        check_choice(self.vertical, VERTICAL, f"{name}.vertical")
        check_positive_int(self.groups, f"{name}.groups")
        check(isinstance(self.hidden_ratio, (int, float)) and not isinstance(self.hidden_ratio, bool)
              and self.hidden_ratio > 0, f"{name}.hidden_ratio", "a positive number", self.hidden_ratio)
        check_choice(self.act, ACTIVATIONS, f"{name}.act")
        check_choice(self.projection, PROJECTIONS, f"{name}.projection")
        check_choice(self.resize, RESIZE, f"{name}.resize")


class GroupAdapter(nn.Module):
    """Grouped 1x1 conv C→hidden, act, grouped 1x1 conv hidden→C (zero-init). (B, C, H, W) → (B, C, H, W)."""

    def __init__(self, width: int, hidden: int, groups: int, act: str = "gelu"):
        super().__init__()
        self.down = nn.Conv2d(width, hidden, 1, groups=groups)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Conv2d(hidden, width, 1, groups=groups)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(self.act(self.down(x)))


class BypassBlock(nn.Module):
    """One link of the chain: s + H(s) + V(resize(P(state))), s a detached stem output."""

    cannot_fuse = ("a side network: it reads detached features of several blocks and replaces the target's input "
                   "through non-linear adapters, so no weight of the UNet can hold it")

    def __init__(self, width: int, state_width: int, cfg: BypassConfig, where: str):
        super().__init__()
        hidden = max(1, round(width * cfg.hidden_ratio))
        if width % cfg.groups or hidden % cfg.groups:
            raise ValueError(f"{cfg.type}.groups={cfg.groups} must divide the width {width} and the hidden width "
                             f"{hidden} (hidden_ratio={cfg.hidden_ratio}) at {where}")
        make = lambda kind: GroupAdapter(width, hidden, cfg.groups, cfg.act) if kind == "group_adapter" else None
        self.horizontal, self.vertical, self.proj = make(cfg.horizontal), make(cfg.vertical), None
        if state_width != width:
            if cfg.projection == "none":
                raise ValueError(f"{cfg.type}.projection='none' but the width changes {state_width}→{width} at "
                                 f"{where}; use '1x1' or '3x3'")
            k = PROJECTIONS[cfg.projection]
            self.proj = nn.Conv2d(state_width, width, k, padding=k // 2)
        self.resize = cfg.resize

    def forward(self, stem, state):
        out = stem
        if self.horizontal is not None:
            out = out + self.horizontal(stem)
        if self.proj is not None:  # project at the lower resolution, then resize (1x1: the two commute)
            state = self.proj(state)
        if state.shape[-2:] != stem.shape[-2:]:
            state = F.interpolate(state, size=stem.shape[-2:], mode=self.resize)
        return out + self.vertical(state)


# ---------------------------------------------------------------------------------------------------------------------
# running the backbone without a graph


class NoGradPrefix:
    """Runs a UNet forward under no_grad from its start until every active registration's resume module is reached.

    One per UNet, shared by the bypass (resume at its target) and SC-Tuner (resume at the first up block): grad comes
    back at the *latest* resume point of the active ones. A hook on the UNet that always runs restores the grad mode,
    exceptions included.
    """

    def __init__(self, unet):
        self.unet, self.regs, self.saved, self.pending, self.told = unet, [], None, set(), False
        self.hooks = [unet.register_forward_pre_hook(self._start, with_kwargs=True),
                      unet.register_forward_hook(self._end, always_call=True)]

    @staticmethod
    def of(unet) -> NoGradPrefix:
        return unet.__dict__.get("_restune_no_grad") or unet.__dict__.setdefault("_restune_no_grad", NoGradPrefix(unet))

    def register(self, resume: nn.Module, wants: Callable[[tuple, dict], bool]) -> _Removable:
        """wants(args, kwargs) of the UNet call: whether this registration asks for a graph-free prefix this call."""
        reg = _Removable(None)
        hook = resume.register_forward_pre_hook(lambda *_: self._reached(reg), prepend=True)
        reg.fn = lambda: self._unregister(reg, hook)
        reg.wants = wants
        self.regs.append(reg)
        return reg

    def _unregister(self, reg, hook) -> None:
        hook.remove()
        self.regs = [r for r in self.regs if r is not reg]
        if not self.regs:
            for h in self.hooks:
                h.remove()
            self.unet.__dict__.pop("_restune_no_grad", None)

    def _start(self, _unet, args, kwargs):
        if not torch.is_grad_enabled():
            return
        pending = {id(r) for r in self.regs if r.wants(args, kwargs)}  # may raise: nothing changed yet
        if pending:
            if getattr(self.unet, "is_gradient_checkpointing", False) and not self.told:
                log.info("gradient checkpointing is pointless before the bypass/SC-Tuner resume point: that part of "
                         "the backbone runs under no_grad and stores no activations")
                self.told = True
            self.saved, self.pending = True, pending
            torch.set_grad_enabled(False)

    def _reached(self, reg) -> None:
        if self.saved is not None and id(reg) in self.pending:
            self.pending.discard(id(reg))
            if not self.pending:
                torch.set_grad_enabled(self.saved)
                self.saved = None

    def _end(self, *_):
        if self.saved is not None:
            torch.set_grad_enabled(self.saved)
        self.saved, self.pending = None, set()


class _Removable:
    """Kept by the handle (`handle.keep`): `detach()` calls remove()."""

    def __init__(self, fn):
        self.fn = fn

    def remove(self) -> None:
        if self.fn is not None:
            self.fn()
            self.fn = None


# ---------------------------------------------------------------------------------------------------------------------
# one bypass per tuner set; one hub per UNet that replaces the target's input


class BypassRun:
    """One tuner set's bypass: its blocks and, during one forward only, the detached features it reads."""

    def __init__(self, handle, blocks: list[BypassBlock], root_width: int, names: list[str]):
        self.handle, self.blocks, self.root_width, self.names = handle, blocks, root_width, names
        self.feats: dict[Any, torch.Tensor] = {}

    def output(self, x: torch.Tensor, rows: slice, feats: dict | None = None) -> torch.Tensor:
        """The final state for `rows` of the batch, blended with the target input x by handle.scale. (b, C, H, W).
        `feats`: the detached features to read (default: those captured in this forward)."""
        feats = self.feats if feats is None else feats
        missing = [n for n, k in zip(self.names, ["root", *range(len(self.blocks))]) if k not in feats]
        if missing:
            raise RuntimeError(f"bypass '{self.handle.name}': no features from {missing} before the target; root and "
                               "stems must run before the target in the UNet forward")
        dtype = next(self.blocks[0].parameters()).dtype
        state = feats["root"][rows].to(dtype)
        if state.shape[1] != self.root_width:
            raise ValueError(f"bypass.root: {self.names[0]}'s input has {state.shape[1]} channels, the bypass "
                             f"was built for {self.root_width}")
        for i, block in enumerate(self.blocks):
            state = block(feats[i][rows].to(dtype), state)
        if state.shape != x.shape:
            raise ValueError(f"bypass '{self.handle.name}': the last stem ({self.names[-1]}) gives "
                             f"{tuple(state.shape)} but the target's input is {tuple(x.shape)}; the last stem must "
                             "feed the target")
        # weight s: base + s·(bypass − base); lerp is exact at s = 0 and 1, and reads s from a tensor, so changing the
        # weight does not recompile a compiled UNet
        state = torch.lerp(x.to(dtype), state, self.handle.scale_tensor.to(dtype))
        return state.to(x.dtype)


def _routed_output(run: BypassRun, x: torch.Tensor, rows: slice, recompute: bool) -> torch.Tensor:
    """One task's rows of a routed forward. recompute=True (K > 1 bypasses with a graph, joint training): the
    bypass's activations are not kept for the backward but recomputed there from its detached features, one bypass
    at a time, so K bypasses cost about one bypass's activation memory (plus K·B rows of the tail after the target)
    instead of K. The features (shared by all tasks under broadcast) stay referenced until the backward."""
    if not recompute:
        return run.output(x, rows)
    return checkpoint(run.output, x, rows, dict(run.feats), use_reentrant=False)


class BypassHub:
    """All bypasses on one UNet (they share the target). Without a route one enabled bypass replaces the target's
    input, or, with `mix` on, the enabled ones are summed as weighted deltas, x + Σ s_k·(bypass_k − x); with a route
    (multitask.py) batch slice k goes through bypass k (None: the base)."""

    def __init__(self, unet, target_name: str, target: nn.Module):
        self.unet, self.target_name, self.runs = unet, target_name, []
        self.route: list | None = None
        self.mix = False  # several enabled bypasses: summed (True) or an error (False: they are meant as tasks)
        self.broadcast = False  # route with one input for all: the target input is repeated K times
        self.hooks = [target.register_forward_pre_hook(self._at_target, with_kwargs=True),
                      unet.register_forward_hook(self._clear, always_call=True),
                      NoGradPrefix.of(unet).register(target, lambda *_: any(r is not None for r in self.active()))]

    @staticmethod
    def of(unet) -> BypassHub | None:
        return unet.__dict__.get("_restune_bypass")

    def run_of(self, handle) -> BypassRun:
        for run in self.runs:
            if run.handle is handle:
                return run
        raise ValueError(f"tuner set '{getattr(handle, 'name', handle)}' has no bypass on this UNet; multi-task "
                         "routing shares the backbone, so each task must be a bypass set")

    def active(self) -> list:
        if self.route is not None:
            return list(self.route)
        runs = [r for r in self.runs if r.handle.enabled]
        if len(runs) > 1 and not self.mix:
            names = ", ".join(r.handle.name for r in runs)
            raise RuntimeError(f"bypass sets {names} are all enabled: each would replace {self.target_name}'s input. "
                               "Disable all but one, give each its batch slice with restune_diffusion.multitask, or "
                               "sum them as weighted deltas with restune_diffusion.mixing.mix_bypasses(unet)")
        return runs

    def capture(self, run: BypassRun, key, x) -> None:
        if any(r is run for r in self.active()):
            run.feats[key] = x.detach()

    def _at_target(self, _module, args, kwargs):
        try:
            active = self.active()
            if not any(r is not None for r in active):
                return None
            x = call_input(args, kwargs)  # (N, C, H, W), computed without a graph
            if self.route is None:
                out = active[0].output(x, slice(None))
                for run in active[1:]:  # mixed: x + Σ_k s_k·(bypass_k − x)
                    out = out + (run.output(x, slice(None)) - x)
                return replace_input(args, kwargs, out)
            k, n = len(active), x.shape[0]
            if not self.broadcast and n % k:
                raise ValueError(f"multi-task batch of {n} rows does not split into {k} equal task slices")
            size = n if self.broadcast else n // k
            rows = [slice(None) if self.broadcast else slice(i * size, (i + 1) * size) for i in range(k)]
            recompute = torch.is_grad_enabled() and sum(run is not None for run in active) > 1
            parts = [x[r] if run is None else _routed_output(run, x[r], r, recompute) for run, r in zip(active, rows)]
            return replace_input(args, kwargs, torch.cat(parts))  # (K·size, C, H, W)
        finally:
            self._clear()

    def _clear(self, *_):
        for run in self.runs:
            run.feats.clear()  # no feature stays referenced after the forward

    def add(self, run: BypassRun) -> _Removable:
        self.runs.append(run)

        def remove():
            self.runs = [r for r in self.runs if r is not run]
            if not self.runs:
                for h in self.hooks:
                    h.remove()
                self.unet.__dict__.pop("_restune_bypass", None)

        return _Removable(remove)


# ---------------------------------------------------------------------------------------------------------------------


def _module(unet, name: str, field: str) -> nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError:
        top = [n for n, _ in unet.named_children()]
        raise ValueError(f"{field}: the UNet has no module {name!r}; top-level modules are {top}") from None


def _width(module: nn.Module, side: str) -> int | None:
    """Channels of a module's input (side="in") or output, read from the module itself."""
    if hasattr(module, "resnets"):
        return module.resnets[0].in_channels if side == "in" else module.resnets[-1].out_channels
    for attr in (f"{side}_channels", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return None


def stem_names(unet, cfg: BypassConfig) -> list[str]:
    if cfg.stems == "auto":
        return ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return list(cfg.stems)


def install(unet, cfg: BypassConfig, handle) -> None:
    hub = BypassHub.of(unet)
    if hub is not None and any(r.handle is handle for r in hub.runs):
        raise ValueError(f"tuner set '{handle.name}': one bypass per tuner set (attach another set for a second one)")
    root = _module(unet, cfg.root, f"{cfg.type}.root")
    target = _module(unet, cfg.target, f"{cfg.type}.target")
    if hub is not None and hub.target_name != cfg.target:
        raise ValueError(f"{cfg.type}.target={cfg.target!r}, but the bypasses already on this UNet replace "
                         f"{hub.target_name!r}; bypasses on one UNet share the target")
    names = stem_names(unet, cfg)
    stems = [_module(unet, n, f"{cfg.type}.stems") for n in names]
    width = _width(root, "in")
    if width is None:
        raise ValueError(f"{cfg.type}.root: cannot read the input width of {cfg.root} ({type(root).__name__})")
    root_width, blocks = width, []
    for name, stem in zip(names, stems):
        stem_width = _width(stem, "out")
        if stem_width is None:
            raise ValueError(f"{cfg.type}.stems: cannot read the output width of {name} ({type(stem).__name__})")
        blocks.append(handle.add_module(f"{name}.{cfg.type}", BypassBlock(stem_width, width, cfg, name)))
        width = stem_width
    target_width = _width(target, "in")
    if target_width is not None and target_width != width:
        raise ValueError(f"{cfg.type}.stems: the last stem {names[-1]} gives {width} channels but {cfg.target} takes "
                         f"{target_width}; the last stem must feed the target")

    hub = hub or unet.__dict__.setdefault("_restune_bypass", BypassHub(unet, cfg.target, target))
    run = BypassRun(handle, blocks, root_width, [cfg.root, *names])
    handle.keep(hub.add(run))
    handle.keep(root.register_forward_pre_hook(
        lambda _m, args, kwargs: hub.capture(run, "root", call_input(args, kwargs)), with_kwargs=True))
    for i, stem in enumerate(stems):
        handle.keep(stem.register_forward_hook(
            lambda _m, _args, out, i=i: hub.capture(run, i, out[0] if isinstance(out, tuple) else out)))
    if len(handle.configs) > 1:
        log.warning("tuner set '%s': tuners before %s get no gradient beside a bypass (it reads detached features)",
                    handle.name, cfg.target)

