"""Stable Diffusion v1.5 components: load them from a local folder, or build the tiny look-alike for tests and demos.

Both paths return the same `SDComponents`, so the tiny model exercises exactly the code that real weights do.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from restune_diffusion.hub import check_variant, is_repo_id, resolve_repo
from restune_diffusion.samplers import make_scheduler

TINY = "tiny"  # the shipped pretrained tiny base of the tiny world (restune_diffusion/world.py)
TINY_RANDOM = "tiny-random"  # the same family's seeded random components (build_tiny_sd): tests that need no training
TINY_NAMES = (TINY, TINY_RANDOM)
TINY_ASSETS = Path(__file__).parent / "assets" / "tiny_sd"
TINY_PRETRAIN_COMMAND = "python tools/pretrain_tiny.py"
SD15_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # the training (DDPM) scheduler, built from the model's scheduler config
    name: str = TINY_RANDOM


def sd15_unet_config() -> dict:
    """The UNet2DConditionModel config of Stable Diffusion v1.5 (859.5 M parameters)."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        act_fn="silu",
        center_input_sample=False,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    )


def tiny_unet_config() -> dict:
    """SD v1.5's pattern at toy size: cross-attention down/up blocks, a plain outer block, a mid block, two widths."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def build_unet(config: dict | str = "sd15", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A UNet with random weights from a config dict or "sd15"/"tiny"; device="meta" allocates nothing."""
    from diffusers import UNet2DConditionModel

    if isinstance(config, str):
        config = {"sd15": sd15_unet_config, TINY: tiny_unet_config, TINY_RANDOM: tiny_unet_config}[config]()
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype) if str(device) != "meta" and dtype != torch.float32 else unet


# ---------------------------------------------------------------------------------------------------------------------
# tiny tokenizer: CLIP BPE over a small vocabulary the package writes itself
TINY_WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "painting", "drawing",
    "type", "kind", "small", "big", "large", "tiny", "red", "green", "blue", "yellow", "orange", "purple",
    "pink", "white", "black", "gray", "grey", "brown", "cyan", "magenta", "circle", "square", "triangle",
    "star", "shape", "ring", "cross", "dot", "stripe", "background", "cat", "dog", "bird", "flower", "car",
    "plane", "food", "person", "man", "woman", "child", "tree", "house", "sky", "sea", "water", "street",
    "city", "room", "sitting", "standing", "flying", "running", "near", "next", "to", "under", "over", "at",
    "top", "bottom", "left", "right", "two", "three", "one", "is", "are", "this", "that", "there", "it", "its",
    "very", "colorful", "bright", "dark", "light",
]


def _write_bpe(directory: Path, merges: list[str]) -> None:
    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = [chr(c) for c in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + specials
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tiny_tokenizer(words: Sequence[str] = TINY_WORDS):
    """A CLIP BPE tokenizer whose vocabulary makes each of `words` one token (others fall back to letters)."""
    from transformers import CLIPTokenizer

    merges: list[str] = []
    for word in dict.fromkeys(words):  # a left-to-right chain of merges per word
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for i in range(1, len(pieces)):
            merges.append(f"{''.join(pieces[:i])} {pieces[i]}")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(8):  # one word's merges can pre-empt another's chain: append repairs until each word is whole
            _write_bpe(Path(tmp), list(dict.fromkeys(merges)))
            # from_pretrained reads vocab.json/merges.txt the same way in transformers 4.x and 5.x
            tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, local_files_only=True)
            broken = [pieces for pieces in map(tokenizer.tokenize, dict.fromkeys(words)) if len(pieces) > 1]
            if not broken:
                break
            for pieces in broken:
                for i in range(1, len(pieces)):
                    merges.append(f"{''.join(pieces[:i])} {pieces[i]}")
    return tokenizer


def build_tiny_sd(seed: int = 0) -> SDComponents:
    """SD v1.5-shaped components at toy size with seeded random weights (well under a second)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = build_unet(TINY)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, name=TINY_RANDOM)


def load_tiny(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SDComponents:
    """The shipped pretrained tiny base (fp16 files, loaded in `dtype`); a named error when the files are missing."""
    missing = [s for s in SD15_SUBFOLDERS if not (TINY_ASSETS / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{TINY_ASSETS}: the pretrained tiny base is missing ({', '.join(m + '/' for m in missing)}). Make it with "
            f"`{TINY_PRETRAIN_COMMAND}` (about an hour on a CPU core), or use '{TINY_RANDOM}' for random weights.")
    sd = load_sd15(TINY_ASSETS, dtype=dtype, device=device)
    sd.name = TINY
    return sd


# ---------------------------------------------------------------------------------------------------------------------
def check_sd15_folder(path: str | os.PathLike) -> Path:
    """The folder exists with every diffusers sub-folder SD v1.5 needs; else an error listing what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: not a folder. Expected a local diffusers-format Stable Diffusion v1.5 folder "
            f"(with {', '.join(s + '/' for s in SD15_SUBFOLDERS)}), or '{TINY}' for the built-in pretrained tiny model "
            f"('{TINY_RANDOM}': random weights)."
        )
    missing = [s + "/" for s in SD15_SUBFOLDERS if not (root / s).is_dir()]
    missing += [f"{s}/config.json" for s in ("unet", "vae", "text_encoder") if (root / s).is_dir()
                and not (root / s / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: incomplete Stable Diffusion folder, missing {', '.join(missing)}. "
            f"Expected the diffusers layout of stable-diffusion-v1-5 ({', '.join(s + '/' for s in SD15_SUBFOLDERS)})."
        )
    return root


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of `--pretrained_model_name_or_path`: the folder itself, or a hub id's snapshot in the local
    Hugging Face cache at `revision` (hub.py; offline, nothing downloaded), checked for SD v1.5's sub-folders."""
    path = Path(name_or_path)
    if path.exists() or not is_repo_id(str(name_or_path)):
        if revision is not None:
            raise ValueError(f"--revision {revision}: picks a revision of a hub id in the Hugging Face cache; "
                             f"{name_or_path} is a local path, used as it is. Drop --revision")
        return check_sd15_folder(path)
    return check_sd15_folder(resolve_repo(str(name_or_path), revision))


def load_sd15(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              variant: str | None = None):
    """Load UNet, VAE, text encoder, tokenizer and scheduler from a local folder; never touches the network.
    `variant`: the weight files' variant (diffusers' `--variant fp16`: `diffusion_pytorch_model.fp16.safetensors`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = check_sd15_folder(path)
    check_variant(root, ("unet", "vae", "text_encoder"), variant)
    kw = dict(local_files_only=True)
    weights = dict(torch_dtype=dtype, variant=variant, **kw)
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **weights)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{root}: could not load the Stable Diffusion components: {err}") from err
    for module in (unet, vae, text_encoder):
        module.to(device).eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, name=str(root))


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, revision: str | None = None, variant: str | None = None) -> SDComponents:
    """`--pretrained_model_name_or_path`: "tiny" (the pretrained tiny base), "tiny-random" (seeded random tiny
    components, `seed`), a local SD v1.5 folder, or a hub id in the local Hugging Face cache (`revision`: a branch,
    tag or commit; `variant`: e.g. "fp16" weight files)."""
    if name_or_path in TINY_NAMES and (revision or variant):
        raise ValueError(f"--revision/--variant: apply to a hub id or a model folder, not to the built-in "
                         f"'{name_or_path}'; drop them")
    if name_or_path == TINY:
        return load_tiny(dtype=dtype, device=device)
    if name_or_path == TINY_RANDOM:
        sd = build_tiny_sd(seed)
        for module in (sd.unet, sd.vae, sd.text_encoder):
            module.to(device)
            if dtype != torch.float32:  # diffusers warns on any .to(dtype), even a no-op one
                module.to(dtype)
        return sd
    sd = load_sd15(resolve_model(name_or_path, revision), dtype=dtype, device=device, variant=variant)
    if not Path(name_or_path).exists():
        sd.name = str(name_or_path)  # the hub id, not its snapshot folder
    return sd


def save_components(sd: SDComponents, path: str | os.PathLike) -> None:
    """Write the components in the diffusers folder layout (what `load_sd15` reads)."""
    root = Path(path)
    sd.unet.save_pretrained(root / "unet")
    sd.vae.save_pretrained(root / "vae")
    sd.text_encoder.save_pretrained(root / "text_encoder")
    sd.tokenizer.save_pretrained(root / "tokenizer")
    sd.noise_scheduler.save_pretrained(root / "scheduler")


def build_pipeline(sd: SDComponents, scheduler: str = "ddim"):
    """A plain diffusers StableDiffusionPipeline over the components already in memory (no second copy); `scheduler`:
    a sampler name (samplers.py)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        scheduler=make_scheduler(scheduler, sd.noise_scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_resolution(pipe) -> int:
    """The size the model was made for: the VAE's sample_size, else the UNet's latent size x the VAE factor.

    SD v1.5: 512 both ways. The tiny model: its VAE says 32 (what the demo trains at) where its UNet config says 8
    latents (16 px), so the VAE, which sets the pixel scale, wins when the two disagree upward.
    """
    from_unet = pipe.unet.config.sample_size * pipe.vae_scale_factor
    from_vae = getattr(pipe.vae.config, "sample_size", None)
    return max(from_unet, from_vae) if isinstance(from_vae, int) else from_unet
