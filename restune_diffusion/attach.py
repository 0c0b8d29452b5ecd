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
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------------
# attention kernel


def attention(q, k, v, mask=None, backend: str = "sdpa", scale: float | None = None):
    """Softmax attention on (B, H, N, d) tensors with the backbone's kernel: "sdpa", "xformers" or "math"."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if backend == "xformers":
        import xformers.ops

        bias = None if mask is None else mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            attn_bias=bias, scale=scale,
        )
        return out.transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, H, N, M)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


def log_partition(q, k, mask=None, scale: float | None = None):
    """log Σ_j exp(q·k_j·scale) per query: (B, H, N). Materialises the (B, H, N, M) scores."""
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    return scores.logsumexp(-1)


def split_heads(x, heads: int):
    """(B, N, H·d) -> (B, H, N, d)"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _backend_of(processor) -> str:
    from diffusers.models import attention_processor as ap

    if isinstance(processor, ap.AttnProcessor2_0):
        return "sdpa"
    if isinstance(processor, ap.XFormersAttnProcessor):
        return "xformers"
    if isinstance(processor, ap.AttnProcessor):
        return "math"
    raise ValueError(
        f"attention processor {type(processor).__name__} is not supported under tuners; expected diffusers' "
        "AttnProcessor2_0 (SDPA), XFormersAttnProcessor or AttnProcessor. Attach tuners to a UNet with one of those."
    )


class TunedAttnProcessor:
    """The model's attention, with K/V extensions and parallel branches from every enabled tuner set.

    Not an nn.Module on purpose: the tuners' parameters belong to their handle, not to the UNet's state dict.
    """

    def __init__(self, base):
        self.base = base
        self.backend = _backend_of(base)
        self.entries: list[tuple[Any, nn.Module]] = []  # (handle, tuner)

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
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)

        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # (B, N|M, C)
        for _, tuner in active:
            if hasattr(tuner, "extend_kv"):  # bound prefix / prompt: tokens joined to the keys and values
                k_extra, v_extra = tuner.extend_kv(attn, batch)  # (B, L, C)
                k, v = torch.cat([k, k_extra.to(k.dtype)], 1), torch.cat([v, v_extra.to(v.dtype)], 1)
                if attention_mask is not None:
                    attention_mask = F.pad(attention_mask, (0, k_extra.shape[1]))
        q, k, v = (split_heads(x, attn.heads) for x in (q, k, v))  # (B, H, N, d)
        out = attention(q, k, v, attention_mask, self.backend, attn.scale)
        deltas = [h.scale * t.branch(attn, q, k, out, attention_mask, self.backend)
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
# where tuners go


def transformer_blocks(unet) -> list[tuple[str, nn.Module]]:
    """The UNet's BasicTransformerBlocks in forward order (down, mid, up), as (name, module)."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [(n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(blocks, key=lambda nm: stage.get(nm[0].split(".")[0], 3))  # sort is stable: keeps in-stage order


def select_blocks(unet, blocks, field: str = "blocks") -> list[tuple[str, nn.Module]]:
    """`blocks`: "all" | "down" | "mid" | "up" | a regex on the block name | a list of positions (forward order)."""
    every = transformer_blocks(unet)
    if blocks == "all":
        chosen = every
    elif blocks in ("down", "mid", "up"):
        prefix = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}[blocks]
        chosen = [nm for nm in every if nm[0].startswith(prefix)]
    elif isinstance(blocks, str):
        chosen = [nm for nm in every if re.search(blocks, nm[0])]
    else:
        bad = [i for i in blocks if not isinstance(i, int) or not -len(every) <= i < len(every)]
        if bad:
            raise ValueError(f"{field}: positions must be ints in [0, {len(every)}), got {bad}")
        chosen = [every[i] for i in blocks]
    if not chosen:
        names = ", ".join(n for n, _ in every[:4])
        raise ValueError(f"{field}={blocks!r} matches no transformer block; blocks are named like {names}, ...")
    return chosen


def op_of(block: nn.Module, target: str) -> nn.Module:
    """The op of a transformer block a tuner sits on: attn1, attn2, ff, or the whole block."""
    return block if target == "block" else getattr(block, target)


# ---------------------------------------------------------------------------------------------------------------------
# the handle


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` under `root`, making empty containers on the way (keys mirror the UNet's)."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    if leaf in node._modules:
        raise ValueError(f"two tuners at {path}: each tuner type may sit once on an op")
    node.add_module(leaf, module)


def _call_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def cast_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a tuner in its own dtype and hand the result back in the backbone's (fp32 tuners on an fp16 UNet)."""
    dtype = next(module.parameters()).dtype
    return module(x.to(dtype)).to(x.dtype)


class TunerHandle:
    """One named tuner set on a UNet: its parameters, hooks and processors, and how to take them off."""

    def __init__(self, unet, name: str, configs: list):
        self.unet, self.name, self.configs = unet, name, configs
        self.module = nn.Module()  # tuner parameters, keys = UNet op path + tuner type
        self.enabled = True
        self.scale = 1.0
        self.full_unet = False  # full fine-tuning: the UNet's own weights are the trainables
        self._hooks: list = []
        self._attn: list[tuple[nn.Module, TunedAttnProcessor, nn.Module]] = []
        self._requires_grad = {n: p.requires_grad for n, p in unet.named_parameters()}

    # -- installing (used by the tuner files) --------------------------------------------------------------------
    def add_module(self, path: str, module: nn.Module) -> nn.Module:
        param = next(self.unet.parameters())
        module.to(device=param.device, dtype=torch.float32)  # trainables stay fp32 (PITFALLS: unscale FP16 grads)
        _place(self.module, path, module)
        return module

    def add_hook(self, op: nn.Module, fn: Callable) -> None:
        """fn(args, kwargs, output) -> new output; runs only while this set is enabled."""

        def hook(_module, args, kwargs, output):
            return fn(args, kwargs, output) if self.enabled else output

        self._hooks.append(op.register_forward_hook(hook, with_kwargs=True))

    def add_residual(self, op: nn.Module, tuner: nn.Module, on_output: bool = False) -> None:
        """x' = OP(x) + s·tuner(x) (unbound), or OP(x) + tuner(OP(x)) (sequential, on_output=True)."""

        def fn(args, kwargs, output):
            x = output if on_output else _call_input(args, kwargs)
            return output + self.scale * cast_call(tuner, x)

        self.add_hook(op, fn)

    def add_attention_tuner(self, attn: nn.Module, tuner: nn.Module) -> None:
        processor = attn.processor
        if not isinstance(processor, TunedAttnProcessor):
            processor = TunedAttnProcessor(processor)
            attn.set_processor(processor)
            self._hooks.append(attn.register_forward_pre_hook(_keep_tuned(processor)))
        processor.entries.append((self, tuner))
        self._attn.append((attn, processor, tuner))

    # -- using ---------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.full_unet:
            params += [p for p in self.unet.parameters() if p.requires_grad]
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.module.state_dict())
        if self.full_unet:
            state.update({f"unet.{k}": v for k, v in self.unet.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, source: str = "state dict") -> int:
        """Copy tensors in; strict: same keys and shapes, else an error naming each offender. Returns the count."""
        own = self.state_dict()
        problems = [f"{k}: shape {tuple(state[k].shape)} in {source} vs {tuple(v.shape)} in model"
                    for k, v in own.items() if k in state and state[k].shape != v.shape]
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            problems += [f"{k}: missing from {source}" for k in missing[:5]]
            problems += [f"{k}: in {source} but not in the model" for k in unexpected[:5]]
        if problems:
            raise ValueError(f"{source} does not fit tuner set '{self.name}':\n  " + "\n  ".join(problems))
        with torch.no_grad():
            for key in set(own) & set(state):
                own[key].copy_(state[key].to(own[key].dtype))
        return len(set(own) & set(state))

    def to(self, *args, **kwargs) -> TunerHandle:
        self.module.to(*args, **kwargs)
        return self

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

    def detach(self) -> None:
        """Remove every hook and processor of this set and restore requires_grad: the UNet is as before attach."""
        for handle in self._hooks:
            handle.remove()
        for attn, processor, tuner in self._attn:
            processor.entries = [(h, t) for h, t in processor.entries if t is not tuner]
            if not processor.entries and attn.processor is processor:
                attn.set_processor(processor.base)
        self._hooks, self._attn = [], []
        for name, p in self.unet.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        sets = getattr(self.unet, "_restune_sets", {})
        sets.pop(self.name, None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def report(self) -> str:
        from restune_diffusion.report import format_report

        return format_report(self)


def _keep_tuned(processor: TunedAttnProcessor):
    """Pre-hook: if someone replaced our processor (enable_xformers..., set_attn_processor), re-wrap the new kernel so
    the tuners stay (PITFALLS: diffusers #2459); a kernel we cannot wrap raises instead of dropping tuners silently."""

    def pre_hook(attn, _args):
        if attn.processor is not processor and processor.entries:
            processor.backend = _backend_of(attn.processor)
            processor.base = attn.processor
            attn.set_processor(processor)

    return pre_hook


# ---------------------------------------------------------------------------------------------------------------------


def attach(unet, config, name: str = "default") -> TunerHandle:
    """Freeze the backbone and install the tuners of `config` (a tuner config, a list of them, a dict or a YAML path)
    as the named set `name`. Returns the handle."""
    from restune_diffusion.config import parse_tuner_configs
    from restune_diffusion.tuners import REGISTRY

    configs = parse_tuner_configs(config)
    sets = unet.__dict__.setdefault("_restune_sets", {})
    if name in sets:
        raise ValueError(f"a tuner set named {name!r} is already attached; detach it or pick another name")
    handle = TunerHandle(unet, name, configs)
    unet.requires_grad_(False)
    try:
        for cfg in configs:
            REGISTRY[cfg.type].install(unet, cfg, handle)
    except Exception:
        handle.detach()
        raise
    sets[name] = handle
    return handle


def attached_sets(unet) -> dict[str, TunerHandle]:
    return dict(getattr(unet, "_restune_sets", {}))


def iter_ops(unet, blocks, targets: Iterable[str], field: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, op) for each selected block × target, e.g. ("up_blocks.1.attentions.0.transformer_blocks.0.ff", ff)."""
    for block_name, block in select_blocks(unet, blocks, field=f"{field}.blocks"):
        for target in targets:
            op = op_of(block, target)
            if op is None:
                raise ValueError(f"{field}.targets: block {block_name} has no {target}")
            yield (block_name if target == "block" else f"{block_name}.{target}"), op
