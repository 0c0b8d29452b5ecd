"""The FID Inception-v3 (the TF graph of TTUR / pytorch-fid's pt_inception-2015-12-05 weights) and its input path.

Images reach it as the TF FID did: uint8, one bicubic PIL resize to 299x299 for real and fake alike, then
`(x - 128) / 128` inside the network (PITFALLS "FID"). The weights are a local file; its SHA-256 is compared with
the standard file's, and a different file gives a loud warning recorded in the results.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data import load_rgb

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
# the released file (95,628,359 bytes); torch-fidelity pins the same hash for its copy of it
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "RESTUNE_FID_INCEPTION"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048


# ---------------------------------------------------------------------------------------------------------------------
# The FID Inception-v3: torchvision's Inception3 layout (aux_logits=False, 1008-way fc) with the TF graph's pooling.
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon, not torch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TF's average pool does not count padded zeros; torch's default does
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b-5d
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: grid reduction 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e: factorised 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: grid reduction 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (pool="avg", FIDInceptionE_1) and Mixed_7c (pool="max", FIDInceptionE_2)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool: expected 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        # the TF graph's last block max-pools here (pytorch-fid's FIDInceptionE_2); the one before average-pools
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The TF FID Inception-v3 (TTUR / pytorch-fid weights layout): uint8-valued (B, 3, H, W) -> pool3 (B, 2048).

    Input of any dtype holding 0..255 values; not 299x299 -> bilinear resize (align_corners=False, as pytorch-fid).
    The protocol resizes with PIL bicubic beforehand, so this resize does not run there.
    """

    num_features = NUM_FEATURES  # read by torchmetrics instead of probing with a dummy image

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # in the weights file; FID does not use the logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3: expected images (B, 3, H, W) with values 0..255, got {tuple(x.shape)}")
        dtype = self.fc.weight.dtype
        x = x.to(dtype)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0  # the TF graph's Sub/Mul on uint8 (PITFALLS "FID"), not pytorch-fid's 2x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (B, 2048, 8, 8)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048) pool3
        return x.float() if dtype != torch.float64 else x


# ---------------------------------------------------------------------------------------------------------------------
def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file from the argument, else $RESTUNE_FID_INCEPTION; a named error saying where to get it."""
    given = path if path is not None else os.environ.get(WEIGHTS_ENV)
    if given and Path(given).is_file():
        return Path(given)
    where = (f"{given}: no such file. " if given
             else f"No FID Inception weights given (--inception_weights, ${WEIGHTS_ENV}). ")
    raise FileNotFoundError(
        f"{where}FID needs {WEIGHTS_FILE}, the TF FID Inception-v3 ported by pytorch-fid (GitHub release of "
        f"pytorch-fid v0.1.0, tag fid_weights): download {WEIGHTS_URL} on a machine with network access, then pass "
        f"--inception_weights PATH or set {WEIGHTS_ENV}=PATH. Nothing is downloaded here."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # SafetensorError on a truncated or foreign file
            raise ValueError(f"{path}: could not read as safetensors ({err}); the file may be truncated. "
                             f"Expected {WEIGHTS_FILE} or a .safetensors copy of it.") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with objects, a truncated file, ...
            raise ValueError(f"{path}: could not read as a weights-only torch state dict ({err}). "
                             f"Expected {WEIGHTS_FILE} or a .safetensors copy of it.") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor) in the FID Inception layout, "
                         f"got {type(state).__name__}")
    return state


def load_fid_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> FIDInceptionV3:
    """Build FIDInceptionV3 and load pt_inception-2015-12-05 weights (.pth weights-only, or .safetensors), strictly."""
    path = resolve_inception_weights(path)
    state = _read_state_dict(path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    # files with and without BatchNorm's num_batches_tracked both exist; nothing else may be missing
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path}: not the FID Inception-v3 key layout of {WEIGHTS_FILE}: {len(missing)} keys missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {key}: shape {tuple(tensor.shape)} in file vs {tuple(expected[key].shape)} "
                             f"in FIDInceptionV3. Expected {WEIGHTS_FILE}.")
    model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def weights_hash_warning(sha256: str, path: str | os.PathLike) -> str | None:
    """A loud warning (returned, for the results) when the weights are not the standard file: the numbers are then
    not comparable with published FIDs. A .safetensors conversion of the right file warns too: say so in a paper."""
    if sha256 == WEIGHTS_SHA256:
        return None
    message = (f"{path}: SHA-256 {sha256[:16]}... is not that of the standard {WEIGHTS_FILE} ({WEIGHTS_SHA256[:16]}...)"
               f": FID/KID computed with these weights are NOT comparable with published numbers (fine for tests, or "
               f"for a converted copy of the standard file; say which in anything you report).")
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


# Images: one resize path for real and fake.
def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Center crop to a square, then bicubic PIL resize to size x size (uint8 in, uint8 out)."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        image = image.crop((left, top, left + s, top + s))
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def inception_image(path: str | os.PathLike, resolution: int | None = None) -> Image.Image:
    """A file as the extractor sees it: [crop + bicubic to `resolution` (real COCO images)], then crop + bicubic 299."""
    image = load_rgb(path)
    if resolution is not None:
        image = square_resize(image, resolution)
    return square_resize(image, INCEPTION_SIZE)


