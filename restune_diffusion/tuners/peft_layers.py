"""The baselines kohya and diffusers users compare with, built by peft rather than by hand (issue 27): DoRA, LoHa,
LoKr and OFT (dora.py, loha.py, lokr.py, oft.py give each its config and peft's config for it).

peft replaces each target `nn.Linear` with its own layer (the Linear stays inside as `base_layer`); unlike our hooks
this changes the UNet's module tree while the set is attached. What keeps them citizens of a tuner set:
- the adapter tensors also sit in the handle's module tree, under `<module path>.<type>.<peft's name>`
  (`...attn1.to_q.dora.lora_A.weight`), so `trainable_parameters()`, `state_dict()`, the tuner file, the report,
  DDP (through train.TunedUNet) and the EMA see them as they see ours; they are the same Parameter objects peft uses;
- a forward pre-hook on each peft layer applies the set's switch and scale before the layer runs: `handle.disabled()`
  sets peft's per-layer off switch (not `enable_adapters`, which also flips requires_grad) and `handle.scale`
  multiplies peft's `scaling` (what diffusers' `set_adapters(weights)` does); OFT has no scaling, so a scale other
  than 1 is an error there;
- `detach()` puts every base Linear back where peft's layer was (peft's unload without merging), so the UNet's keys
  and tensors are as before, bit for bit.
Attention processors are untouched: ours call `attn.to_q(x)`, which is now peft's layer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from restune_diffusion.placement import iter_ops

ADAPTER = "default"  # peft's adapter name inside each layer: one peft-based set per module (checked)


def peft_targets(unet, cfg) -> list[str]:
    """Full module paths of the config's projections (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
    which peft's target_modules match exactly."""
    return [f"{path}.{name}" for path, _ in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type) for name in cfg.modules]


class _Unload:
    """detach(): the base Linear back in place of peft's layer (what peft's `unload()` does, without merging)."""

    def __init__(self, unet, path: str, layer: nn.Module):
        self.unet, self.path, self.layer = unet, path, layer

    def remove(self) -> None:
        parent, _, leaf = self.path.rpartition(".")
        owner = self.unet.get_submodule(parent)
        if owner._modules.get(leaf) is self.layer:
            owner._modules[leaf] = self.layer.get_base_layer()


class PeftTensors(nn.Module):
    """A peft layer's adapter modules and parameters (the same objects) under peft's names, in the handle's tree."""

    cannot_fuse = ("built by peft, whose layer runs the adapter at every call (peft's merge_adapter would fold it in, "
                   "but its unmerge subtracts it again, with round-off, where unfuse() restores weights bit for bit)")


def _adapter_tensors(layer) -> PeftTensors:
    holder = PeftTensors()
    for name in dict.fromkeys(layer.adapter_layer_names):  # LoRA lists lora_magnitude_vector twice
        container = getattr(layer, name, None)
        if container is None or ADAPTER not in container:
            continue
        entry = container[ADAPTER]
        if isinstance(entry, nn.Module):
            holder.add_module(name, entry)
        else:
            holder.register_parameter(name, entry)
    return holder


def _switch(handle, layer, field: str) -> Callable:
    scaling = getattr(layer, "scaling", None)
    base = dict(scaling) if isinstance(scaling, dict) else None
    # peft's LoRA layer (DoRA) only multiplies by its scaling, so it can be a 0-dim tensor: the handle's weight then
    # reaches a compiled graph as a value, and changing it does not recompile. LoHa and LoKr pass theirs through
    # torch.tensor(float) at every call: a Python float there (a weight change recompiles once).
    as_tensor = hasattr(layer, "lora_A")

    def before(_module, _args) -> None:
        layer._disable_adapters = not handle.enabled  # peft's own switch, read in the layer's forward
        if base is None:
            if handle.scale != 1.0:
                raise ValueError(f"{field}: has no strength to scale (scale {handle.scale}); use scale 1")
        elif as_tensor:
            scaling[ADAPTER] = base[ADAPTER] * handle.scale_tensor
        else:
            scaling[ADAPTER] = base[ADAPTER] * handle.scale

    return before


def install_peft(unet, cfg, handle, peft_config) -> None:
    """Inject `peft_config` (a peft config whose target_modules are `peft_targets(unet, cfg)`) and make the layers
    part of `handle` (see the module doc)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    paths = peft_targets(unet, cfg)  # in forward order: peft keeps target_modules as a set, whose order changes
    # with the process's hash seed, and the handle's parameter order is the optimizer's (a resume must match it)
    taken = [p for p in paths if isinstance(unet.get_submodule(p), BaseTunerLayer)]
    if taken:
        raise ValueError(f"{cfg.type}: {taken[0]} already carries a peft-built tuner of another set; one such set per "
                         "module: detach the other first")
    grads = {id(p): p.requires_grad for p in unet.parameters()}  # peft freezes everything else it finds
    had, previous = "peft_config" in unet.__dict__, unet.__dict__.get("peft_config")
    inject_adapter_in_model(peft_config, unet, adapter_name=ADAPTER)
    if had:  # peft writes its config dict onto the model; the UNet's own (diffusers' adapters) stays as it was
        unet.peft_config = previous
    else:
        unet.__dict__.pop("peft_config", None)
    for p in unet.parameters():
        if id(p) in grads:
            p.requires_grad_(grads[id(p)])
    for path in paths:
        layer = unet.get_submodule(path)
        layer.train(unet.training)  # peft makes its layers in train mode; an eval UNet (generation) keeps them eval
        handle.keep(_Unload(unet, path, layer))
        handle.keep(layer.register_forward_pre_hook(_switch(handle, layer, f"{cfg.type} at {path}")))
        holder = handle.add_module(f"{path}.{cfg.type}", _adapter_tensors(layer))
        if not any(True for _ in holder.parameters()):
            raise RuntimeError(f"{cfg.type}: peft made no adapter tensors at {path}")
        holder.requires_grad_(True)


def peft_layers(handle, kind: str) -> list[tuple[str, nn.Module]]:
    """(UNet module path, peft's layer there) for every tuner of type `kind` in the set."""
    suffix = f".{kind}"
    paths = [name[: -len(suffix)] for name, _ in handle.module.named_modules() if name.endswith(suffix)]
    return [(path, handle.unet.get_submodule(path)) for path in paths]
