"""Put tuners on a diffusers UNet and take them off again, without editing diffusers' classes.

Two mechanisms serve every tuner (DESIGN.md, "Mechanisms"):
- attention tuners go through `TunedAttnProcessor`, which wraps the processor the model had (SDPA, xformers or the
  plain one), computes Q/K/V once and lets tuners extend K/V (bound prefix/prompt) or add a parallel branch
  (Res-Prefix/Res-Prompt, Eq. x' = OP(x) + ResTuner(x));
- op/block tuners are forward hooks that return `output + tuner(input)` (Res-Adapter, LoRA, sequential adapter).
Tuner parameters live in the handle's own module tree (`handle.module`), so the UNet's module tree and state-dict
keys stay untouched and `detach()` is exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restune_diffusion import fusion
from restune_diffusion.kernel import additive_mask, attention, backend_of, split_heads
from restune_diffusion.placement import (
    attached_sets,
    call_input,
    cast_call,
    select_blocks,
    transformer_blocks,
    tuner_sets,
)
from restune_diffusion.tuners import REGISTRY, parse_tuner_configs

# attached_sets, select_blocks and transformer_blocks live in placement.py; importable from here as before
__all__ = ["TunedAttnProcessor", "TunerHandle", "attach", "attached_sets", "select_blocks", "transformer_blocks",
           "tuned_processor"]
log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# the attention processor


class TunedAttnProcessor:
    """The model's attention, with K/V extensions and parallel branches from every enabled tuner set.

    One per attention module, shared by every tuner set on it (`tuned_processor`), and owner of the module's one
    guard: a pre-hook that re-wraps whatever kernel replaced it (`set_attn_processor`, `enable_xformers_...`), so
    no set is dropped silently whichever sets come and go (PITFALLS: diffusers #2459); a kernel we cannot wrap
    raises. Not an nn.Module on purpose: the tuners' parameters belong to their handles, not to the UNet's state dict.
    """

    def __init__(self, attn: nn.Module):
        self.base = attn.processor
        self.backend = backend_of(self.base)
        self.entries: list[tuple[Any, nn.Module]] = []  # (handle, tuner)
        self.guard = attn.register_forward_pre_hook(self._keep)
        attn.set_processor(self)

    def _keep(self, attn, _args) -> None:
        if attn.processor is not self:
            self.adopt(attn)

    def adopt(self, attn: nn.Module) -> None:
        """Wrap the kernel that now sits on `attn` in place of this processor, and put this processor back."""
        self.backend = backend_of(attn.processor)  # raises for a kernel we cannot wrap: tuners are never dropped
        self.base = attn.processor
        attn.set_processor(self)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        active = [(h, t) for h, t in self.entries if h.enabled]
        if not active:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, n, _ = hidden_states.shape  # (B, N, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, M, D)
        if attention_mask is not None:  # padded to the KEY length, as diffusers' processors do
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # (B, H, N|1, M)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)

        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # (B, N|M, C)
        if attention_mask is not None:  # bool (True = attend) as additive, so padding and exact λ treat both alike
            attention_mask = additive_mask(attention_mask, q.dtype)
        for h, tuner in active:
            if hasattr(tuner, "extend_kv"):  # bound prefix / prompt: tokens joined to the keys and values
                k_extra, v_extra = tuner.extend_kv(attn, batch)  # (B, L, C)
                keys = k.shape[1]
                k, v = torch.cat([k, k_extra.to(k.dtype)], 1), torch.cat([v, v_extra.to(v.dtype)], 1)
                if not h.scale_is_one:  # weight s: the tokens' share of the softmax × s (log s on their logits)
                    if attention_mask is None:
                        attention_mask = q.new_zeros(1, 1, 1, keys)
                    bias = torch.log(h.scale_tensor).to(q.dtype).expand(*attention_mask.shape[:-1], k_extra.shape[1])
                    attention_mask = torch.cat([attention_mask, bias], -1)
                elif attention_mask is not None:
                    attention_mask = F.pad(attention_mask, (0, k_extra.shape[1]))  # 0: the new keys are seen
        q, k, v = (split_heads(x, attn.heads) for x in (q, k, v))  # (B, H, N, d)
        out = attention(q, k, v, attention_mask, self.backend, attn.scale)
        deltas = [h.scale_tensor * t.branch(attn, q, k, out, attention_mask, self.backend)
                  for h, t in active if hasattr(t, "branch")]
        for delta in deltas:  # parallel branches read the base output, then add (x' = OP(x) + Σ ResTuner(x))
            out = out + delta
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------------------------------
# the handle


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` under `root`, making empty containers on the way (keys mirror the UNet's)."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if part not in dict(node.named_children()):
            node.add_module(part, nn.Module())
        node = node.get_submodule(part)
    if leaf in dict(node.named_children()):
        raise ValueError(f"two tuners at {path}: each tuner type may sit once on an op")
    node.add_module(leaf, module)


class TunerHandle:
    """One named tuner set on a UNet: its parameters, hooks and processors, and how to take them off.

    `scale` is the set's weight when several are mixed (diffusers' `set_adapters(names, adapter_weights)`): every
    tuner adds scale × its contribution (a bound prefix/prompt: its share of the attention × scale; a bypass and a
    full fine-tuning set: base + scale × (tuned − base)). It lives in a 0-dim tensor (`scale_tensor`) changed in
    place, so a compiled UNet reads the new value without recompiling.
    """

    def __init__(self, unet, name: str, configs: list):
        self.unet, self.name, self.configs = unet, name, configs
        self.module = nn.Module()  # tuner parameters, keys = UNet op path + tuner type
        param = next(unet.parameters())
        # a buffer of the tuner module: moves with handle.to(), never saved (non-persistent)
        self.module.register_buffer("scale", torch.ones((), device=param.device), persistent=False)
        self._enabled, self._scale = True, 1.0
        self.scale_is_one = True  # a Python flag for the one path that must branch on it (bound prefix/prompt)
        self.full_unet = False  # full fine-tuning: the UNet's own weights are the trainables
        self.fused = False
        self._hooks: list = []
        self._attn: list[tuple[nn.Module, TunedAttnProcessor, nn.Module]] = []
        self._residuals: list[tuple[nn.Module, nn.Module]] = []  # (op, tuner) of add_residual: what fuse() reads
        self._requires_grad = {n: p.requires_grad for n, p in unet.named_parameters()}
        self._base_weights: dict[str, torch.Tensor] | None = None  # keep_base_weights(): restored by detach
        self._tuned_weights: dict[str, torch.Tensor] | None = None  # a full set's own weights, once blended

    # -- installing (used by the tuner files) --------------------------------------------------------------------
    def add_module(self, path: str, module: nn.Module) -> nn.Module:
        param = next(self.unet.parameters())
        module.to(device=param.device, dtype=torch.float32)  # trainables stay fp32 (PITFALLS: unscale FP16 grads)
        _place(self.module, path, module)
        return module

    def add_hook(self, op: nn.Module, fn: Callable) -> None:
        """fn(args, kwargs, output) -> new output; runs only while this set is enabled."""

        def hook(_module, args, kwargs, output):
            return fn(args, kwargs, output) if self._enabled else output

        self._hooks.append(op.register_forward_hook(hook, with_kwargs=True))

    def add_residual(self, op: nn.Module, tuner: nn.Module, on_output: bool = False) -> None:
        """x' = OP(x) + s·tuner(x) (unbound), or OP(x) + tuner(OP(x)) (sequential, on_output=True)."""

        def fn(args, kwargs, output):
            if getattr(tuner, "fused", False):  # folded into op's weight (fuse()): nothing to add
                if torch.is_grad_enabled() and any(p.requires_grad for p in tuner.parameters()):
                    raise RuntimeError(f"tuner set '{self.name}' is fused into the UNet's weights: its tensors get "
                                       "no gradient; call unfuse() before training")
                return output
            x = output if on_output else call_input(args, kwargs)
            return output + self.scale_tensor * cast_call(tuner, x)

        self.add_hook(op, fn)
        self._residuals.append((op, tuner))

    def add_attention_tuner(self, attn: nn.Module, tuner: nn.Module) -> None:
        """Put `tuner` (extend_kv and/or branch) into the attention module's shared TunedAttnProcessor."""
        processor = tuned_processor(attn)
        processor.entries.append((self, tuner))
        self._attn.append((attn, processor, tuner))

    def keep(self, removable) -> None:
        """Remember a hook handle (anything with `remove()`) that `detach()` must remove."""
        self._hooks.append(removable)

    # -- using ---------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.full_unet:
            params += [p for p in self.unet.parameters() if p.requires_grad]
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The set's tensors as saved: a full set's are its own weights, whatever its weight in a mix and whatever
        other sets have fused into the UNet."""
        state = self._live_state()
        if self.full_unet:
            unet = self._tuned_weights or fusion.without_fused(self.unet)
            state.update({f"unet.{k}": v for k, v in unet.items()})
        return state

    def _live_state(self) -> dict[str, torch.Tensor]:
        """What load_state_dict writes into: the tuner tensors and, for a full set, the UNet's own."""
        state = dict(self.module.state_dict())
        if self.full_unet:
            state.update({f"unet.{k}": v for k, v in self.unet.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, source: str = "state dict") -> int:
        """Copy tensors in; strict: same keys and shapes, else an error naming each offender. Returns the count."""
        own = self._live_state()
        problems = [f"{k}: shape {tuple(state[k].shape)} in {source} vs {tuple(v.shape)} in model"
                    for k, v in own.items() if k in state and state[k].shape != v.shape]
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            problems += [f"{k}: missing from {source}" for k in missing[:5]]
            problems += [f"{k}: in {source} but not in the model" for k in unexpected[:5]]
        if problems:
            raise ValueError(f"{source} does not fit tuner set '{self.name}':\n  " + "\n  ".join(problems))
        # a full set writes the UNet's weights: under the fused sets' deltas, which are added back after
        with fusion.rebased(self.unet) if self.full_unet else contextlib.nullcontext(), torch.no_grad():
            for key in set(own) & set(state):
                own[key].copy_(state[key].to(own[key].dtype))
        self._tuned_weights = None  # a full set's own weights are the ones just loaded
        self._changed()  # fused weights, cached K/V and a full set's blend follow the new tensors
        return len(set(own) & set(state))

    def to(self, *args, **kwargs) -> TunerHandle:
        self.module.to(*args, **kwargs)
        return self

    # -- weight (mixing) and enabled -----------------------------------------------------------------------------
    @property
    def scale_tensor(self) -> torch.Tensor:
        """The weight as a 0-dim tensor (on the tuners' device): what forward passes read."""
        return self.module.scale

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"tuner set '{self.name}': scale (weight) must be a finite number, got {value!r}")
        if value < 0 and any(c.type in ("prefix", "prompt") for c in self.configs):
            raise ValueError(f"tuner set '{self.name}': the weight of a bound prefix/prompt multiplies its tokens' "
                             f"share of the attention, so it must be >= 0, got {value}")
        self._scale = float(value)
        with torch.no_grad():
            self.scale_tensor.fill_(self._scale)  # in place: a compiled graph reads the new value, no recompile
        self.scale_is_one = self._scale == 1.0
        self._changed()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if bool(value) != self._enabled:
            self._enabled = bool(value)
            self._changed()

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base UNet inside the block (peft's disable_adapter())."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def _changed(self) -> None:
        """The scale, enabled flag or tensors changed: caches re-read, fused weights and a full blend rewritten."""
        fusion.bump()
        for op, tuner in self._residuals:
            if getattr(tuner, "fused", False):
                fusion.rewrite(op)
        self._blend_full()

    def _blend_full(self) -> None:
        """A full set's weights in the UNet: base + s·(tuned − base) by torch.lerp (exact at s = 0 and 1), s = the
        scale, or 0 while disabled. Needs the base (keep_base_weights; load_tuners keeps it) and keeps a CPU copy of
        the set's own weights the first time s leaves 1. Without a base, disabling leaves the weights as they are."""
        if not self.full_unet or (self._tuned_weights is None and self._enabled and self.scale_is_one):
            return
        s = self.scale if self._enabled else 0.0
        if self._base_weights is None:
            if s == 1.0 or not self._enabled:
                return
            raise ValueError(f"tuner set '{self.name}' (full fine-tuning): a weight other than 1 blends the base and "
                             "the tuned weights, but the base was not kept; call handle.keep_base_weights() before "
                             "changing the UNet (load_tuners does)")
        with fusion.rebased(self.unet), torch.no_grad():  # the weights without other sets' fused deltas
            if self._tuned_weights is None:
                self._tuned_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.unet.state_dict().items()}
            for key, value in self.unet.state_dict().items():
                base, tuned = self._base_weights[key], self._tuned_weights[key]
                if value.is_floating_point():
                    value.copy_(torch.lerp(base.to(value.device, torch.float32), tuned.to(value.device, torch.float32),
                                           s))
                else:
                    value.copy_(tuned)
            if s == 1.0:  # the UNet holds the set's own weights again, exactly: they may train from here
                self._tuned_weights = None

    def keep_base_weights(self) -> None:
        """Full fine-tuning sets write into the UNet's own weights: keep a CPU copy so `detach` puts the base back
        (load_tuners does this before loading a full file, so the next set evaluated on the UNet sits on the base)."""
        if self.full_unet and self._base_weights is None:
            with fusion.rebased(self.unet):
                self._base_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.unet.state_dict().items()}

    # -- fusing (inference) --------------------------------------------------------------------------------------
    def _tuners_by_type(self) -> dict[str, list[nn.Module]]:
        found: dict[str, list[nn.Module]] = {}
        for path, module in self.module.named_modules():
            kind = path.rpartition(".")[2]
            if kind in REGISTRY:  # tuner modules sit at "<UNet op path>.<tuner type>"
                found.setdefault(kind, []).append(module)
        return found

    def fusable(self) -> dict[str, str]:
        """{tuner type: what fuse() does to it, or "not fused: <why>"} for this set."""
        plan = {"full": "in the UNet's weights already"} if self.full_unet else {}
        for kind, modules in self._tuners_by_type().items():
            first = modules[0]
            if getattr(first, "cannot_fuse", None):
                plan[kind] = f"not fused: {first.cannot_fuse}"
            elif hasattr(first, "delta_weight"):
                plan[kind] = f"folded into {len(modules)} projection weights"
            elif hasattr(first, "compute_kv"):
                plan[kind] = f"K/V of {len(modules)} attentions computed once, not at every step"
        return plan

    def fuse(self) -> dict[str, str]:
        """Fold what is exact into the UNet for inference: LoRA into its projection weights (the originals are kept:
        unfuse() restores them bit for bit), prompt/prefix K/V computed once (recomputed when a weight, scale or
        set changes); a full set is in the weights already. Scale and enabled changes keep applying. Returns
        fusable(); a ValueError with the reason when no tuner of the set can be fused (Res-Adapter, bypass)."""
        plan = self.fusable()
        if all(v.startswith("not fused") for v in plan.values()):
            raise ValueError(f"tuner set '{self.name}' cannot be fused: "
                             + "; ".join(f"{k} is {v[len('not fused: '):]}" for k, v in plan.items()))
        if self.fused:
            return plan
        for op, tuner in self._residuals:
            if hasattr(tuner, "delta_weight"):
                tuner.fused = True
                fusion.fuse_linear(op, tuner, lambda t=tuner: self._fused_delta(t))
        for attn, _, tuner in self._attn:
            if hasattr(tuner, "compute_kv"):
                tuner.kv_cache = fusion.KVCache(lambda a=attn, t=tuner: t.compute_kv(a),
                                                lambda a=attn, t=tuner: self._kv_sources(a, t))
        self.fused = True
        fusion.bump()
        for kind, what in plan.items():
            if what.startswith("not fused"):
                log.info("tuner set '%s': %s %s", self.name, kind, what)
        return plan

    def unfuse(self) -> None:
        """Undo fuse(): the original weights back bit for bit, the K/V computed at every step again."""
        if not self.fused:
            return
        for op, tuner in self._residuals:
            if getattr(tuner, "fused", False):
                tuner.fused = False
                fusion.unfuse_linear(op, tuner)
        for _, _, tuner in self._attn:
            if getattr(tuner, "kv_cache", None) is not None:
                tuner.kv_cache = None
        self.fused = False
        fusion.bump()

    def _fused_delta(self, tuner: nn.Module) -> torch.Tensor | None:
        return self.scale_tensor.float() * tuner.delta_weight() if self._enabled else None

    def _kv_sources(self, attn: nn.Module, tuner: nn.Module) -> list[torch.Tensor]:
        """What a tuner's K/V are computed from: its tensors, the frozen W_k/W_v, and any tuner hooked on them."""
        projections = (attn.to_k, attn.to_v)
        found = [*tuner.parameters(), *tuner.buffers(), *attn.to_k.parameters(), *attn.to_v.parameters()]
        for other in tuner_sets(self.unet).values():
            found += [p for op, t in other._residuals if any(op is x for x in projections) for p in t.parameters()]
        return found

    # -- taking it off -------------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook and processor of this set and restore requires_grad (and, after keep_base_weights, the
        UNet's weights): the UNet is as before attach."""
        self.unfuse()
        if self._base_weights is not None:
            with fusion.rebased(self.unet), torch.no_grad():
                for key, value in self.unet.state_dict().items():
                    value.copy_(self._base_weights[key])
            self._base_weights = self._tuned_weights = None
        for handle in self._hooks:
            handle.remove()
        for attn, processor, tuner in self._attn:
            processor.entries = [(h, t) for h, t in processor.entries if t is not tuner]
            if not processor.entries:
                _release(attn, processor)
        self._hooks, self._attn, self._residuals = [], [], []
        for name, p in self.unet.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        if tuner_sets(self.unet).get(self.name) is self:
            tuner_sets(self.unet).pop(self.name)
        fusion.bump()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


# one TunedAttnProcessor per attention module, whichever sets use it (weak: a UNet that goes away takes its entries)
_TUNED: weakref.WeakKeyDictionary[nn.Module, TunedAttnProcessor] = weakref.WeakKeyDictionary()


def tuned_processor(attn: nn.Module) -> TunedAttnProcessor:
    """The attention module's TunedAttnProcessor, made on first use; a kernel swapped in since is wrapped now, so a
    second set never wraps the first set's processor."""
    processor = _TUNED.get(attn)
    if processor is None:
        processor = _TUNED[attn] = TunedAttnProcessor(attn)
    elif attn.processor is not processor:
        processor.adopt(attn)
    return processor


def _release(attn: nn.Module, processor: TunedAttnProcessor) -> None:
    """The last tuner left `attn`: remove the guard and give back the kernel (unless one was swapped in since)."""
    if _TUNED.get(attn) is not processor:
        return
    del _TUNED[attn]
    processor.guard.remove()
    if attn.processor is processor:
        attn.set_processor(processor.base)


# ---------------------------------------------------------------------------------------------------------------------


def attach(unet, config, name: str = "default") -> TunerHandle:
    """Freeze the backbone and install the tuners of `config` (a tuner config, a list of them, a dict or a YAML path)
    as the named set `name`. Returns the handle."""
    configs = parse_tuner_configs(config)
    sets = tuner_sets(unet)
    if name in sets:
        raise ValueError(f"a tuner set named {name!r} is already attached; detach it or pick another name")
    handle = TunerHandle(unet, name, configs)
    others = [p for h in sets.values() for p in h.module.parameters() if p.requires_grad]  # peft-built ones are in
    unet.requires_grad_(False)  # the UNet's tree: they stay trainable
    for p in others:
        p.requires_grad_(True)
    try:
        for cfg in configs:
            REGISTRY[cfg.type].install(unet, cfg, handle)
    except Exception:
        handle.detach()
        raise
    sets[name] = handle
    fusion.bump()  # a new hook on W_k/W_v changes what cached K/V are made of
    return handle
