"""
FID, sFID, Inception Score and improved precision/recall of image samples, in plain PyTorch.

The network is the FID Inception-v3 of pytorch-fid (mseitzer/pytorch-fid): the 2015-12-05
TensorFlow Inception graph that Heusel et al. used, ported to torchvision's module layout, so its
`state_dict` is exactly pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (566 tensors). The
metrics follow the ADM evaluator (openai/guided-diffusion, evaluations/evaluator.py), which DiT,
DTR, ANT and the curriculum paper all report with.

Metrics and the function implementing each:
- FID (Heusel et al. 2017):
      d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})       -> frechet_distance
  with mu, S the mean and covariance of the 2048-d pool features      -> feature_statistics
- sFID (Nash et al. 2021): the same distance on "spatial" features, the first 7 channels of the
  17x17 map `mixed_6/conv` of the TF graph (= Mixed_6d.branch1x1 here, after its ReLU),
  flattened in TF's (H, W, C) order: 7 * 17 * 17 = 2023 dims        -> FIDInceptionV3.forward
- Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax of
  pool @ W (the 1008-way weights, no bias, as ADM does), averaged over consecutive splits of
  5000 samples                                                        -> inception_score
- Improved precision/recall (Kynkaanniemi et al. 2019): a point is "on" a manifold
  when it lies inside the k-NN ball (k = 3) of some point of the other set; precision = share
  of samples on the reference manifold, recall = share of references on the sample manifold
                                                                      -> precision_recall

Where we depart from the ADM evaluator, and why:
- ADM runs the TF graph, which resizes with TF's legacy bilinear mapping (no half-pixel centres)
  and normalises uint8 x as (x - 128) / 128. pytorch-fid (and we) resize with PyTorch's bilinear
  (align_corners=False) and map x / 255 to [-1, 1]. Features therefore differ slightly from
  ADM's, so statistics from ADM's reference batches and ours are close but not identical.
- Statistics are computed in float64 (ADM takes the mean in float32); k-NN distances for
  precision/recall in float64 (ADM: float16, float32 if that overflows). Points near a k-NN ball's
  edge can then fall the other way: on the pool features of 200 CIFAR-10 train and 200 test images,
  the same computation in float16 gave precision 0.735 instead of 0.730 (recall 0.730 in both).
- The trace term Tr (S_1 S_2)^{1/2} comes from eigenvalues, not scipy's sqrtm (which ADM and pytorch-fid
  use): the same value to rounding, 8 times faster, and no eps retry for singular covariances.
- Bad inputs (shape mismatches, missing keys) raise ValueError with a message, not assert.

CLI:  python fid.py SAMPLES REFERENCE [--metrics fid,sfid,is,pr] [--json]
      python fid.py SAMPLES --save-stats stats.npz
      python fid.py curves RUN [RUN ...] --out fid.png    (FID against step of train.py runs)
SAMPLES / REFERENCE: an image folder (recursive), a .zip of images, an .npz sample batch
(`arr_0`: N x H x W x 3 uint8) or a statistics .npz (`mu`, `sigma`, optional `mu_s`, `sigma_s`,
`pool`, `logits`; ADM reference batches hold both `arr_0` and the statistics).
"""

import argparse
import gc
import hashlib
import io
import json
import os
import struct
import sys
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# pytorch-fid's, and .gif: training (data.py) takes the same images (is_image_name)
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
IS_SPLIT_SIZE = 5000  # ADM evaluator: Inception Score averaged over consecutive splits of 5000
METRICS = ("fid", "sfid", "is", "pr")


# ----------------------------------------------------------------------------------------------
#                                 The FID Inception-v3 network
# ----------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU: torchvision's BasicConv2d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    """TF's 3x3 stride-1 'SAME' average pool: padded zeros are not counted in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1, concatenated in that order."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)  # (N, 64, H, W)
        b = self.branch5x5_2(self.branch5x5_1(x))  # (N, 64, H, W)
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, H, W)
        d = self.branch_pool(_avg_pool_3x3(x))  # (N, pool_features, H, W)
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)  # (N, 384, 17, 17)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (N, 96, 17, 17)
        c = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, C_in, 17, 17)
        return torch.cat([a, b, c], 1)


class InceptionC(nn.Module):
    """Mixed_6b-6e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1, 4 x 192 channels."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)  # (N, 192, 17, 17); Mixed_6d's is TF's mixed_6/conv (sFID)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (N, 192, 17, 17)
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)  # (N, 192, 17, 17) at the end
        d = self.branch_pool(_avg_pool_3x3(x))  # (N, 192, 17, 17)
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """Mixed_7a (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))  # (N, 320, 8, 8)
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))  # (N, 192, 8, 8)
        c = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, C_in, 8, 8)
        return torch.cat([a, b, c], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 -> 2048 channels.
    The pool is TF's average pool in Mixed_7b and a 3x3 max pool in Mixed_7c: a quirk of the 2015
    graph that pytorch-fid keeps (its FIDInceptionE_1 / FIDInceptionE_2)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)  # (N, 320, 8, 8)
        b = self.branch3x3_1(x)  # (N, 384, 8, 8)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)  # (N, 768, 8, 8)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))  # (N, 384, 8, 8)
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)  # (N, 768, 8, 8)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(pooled)  # (N, 192, 8, 8)
        return torch.cat([a, b, c, d], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (pytorch-fid's `fid_inception_v3`, 1008 classes, no aux head).

    forward(x) takes float images (N, 3, H, W) in [0, 1], resizes them to 299x299 (bilinear,
    align_corners=False, no antialias, as pytorch-fid), maps them to [-1, 1] and returns
      pool    (N, 2048) global average pool after Mixed_7c: the FID / precision-recall features;
      spatial (N, 2023) first 7 channels of Mixed_6d.branch1x1 (TF `mixed_6/conv`), (H, W, C)
              flattened as ADM does: the sFID features;
      logits  (N, 1008) pool @ fc.weight^T without the bias: ADM's Inception Score logits.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # TF's softmax/logits; only its weight is used (IS)

    def forward(self, x):
        n = x.shape[0]
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
        x = 2 * x - 1  # (N, 3, 299, 299) in [-1, 1]
        if self.fc.weight.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # faster oneDNN convolutions
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5b(x)  # (N, 256, 35, 35)
        x = self.Mixed_5c(x)  # (N, 288, 35, 35)
        x = self.Mixed_5d(x)  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6b(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(x)  # (N, 768, 17, 17)
        x = self.Mixed_6d(x)  # (N, 768, 17, 17); channels 0..191 are its branch1x1 (concat order)
        spatial = x[:, :7].permute(0, 2, 3, 1).reshape(n, 7 * 17 * 17)  # (N, 2023) TF (H, W, C) order
        x = self.Mixed_6e(x)  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7b(x)  # (N, 2048, 8, 8)
        x = self.Mixed_7c(x)  # (N, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
        logits = F.linear(pool, self.fc.weight)  # (N, 1008), no bias (ADM's softmax graph)
        return {"pool": pool, "spatial": spatial, "logits": logits}


def load_inception(path=None, device="cpu"):
    """The FID Inception-v3 with pytorch-fid's weights, in eval mode on `device`.

    path: a `pt_inception-2015-12-05-6726825d.pth` file (or a copy with the same 566 keys, loaded
    with strict=True). Without a path the file is downloaded once from pytorch-fid's GitHub
    release into the torch hub cache (sha256-prefix checked) and read from there afterwards.
    A path that is missing, unreadable, or holds other weights raises a ValueError that says so.
    """
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"Inception weights not found: {path} (expected {FID_WEIGHTS_FILE})")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:  # the file, not its contents: e.g. no permission to read it
            raise ValueError(f"cannot read the Inception weights {path}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - truncated (RuntimeError), not a torch file (UnpicklingError), ...
            raise ValueError(f"cannot read the Inception weights {path}: torch.load raised {type(e).__name__}, so it is "
                             f"not a whole PyTorch weights file; give pytorch-fid's {FID_WEIGHTS_FILE}") from None
    else:
        try:
            state_dict = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu",
                                                            progress=True, check_hash=True)
        except OSError as e:  # URLError, HTTPError, socket errors are all OSErrors
            cache = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
            raise RuntimeError(
                f"could not download the FID Inception weights ({e}). Fetch {FID_WEIGHTS_FILE} from "
                f"{FID_WEIGHTS_URL} on a machine with internet access and either pass it with "
                f"--inception PATH (load_inception(path=...)) or place it at {cache}.") from e
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG (a training run's resume) alone
        net = FIDInceptionV3()
    expected, keys = set(net.state_dict()), set(state_dict) if isinstance(state_dict, dict) else set()
    if keys != expected:  # (wrong shapes under the right names: load_state_dict's RuntimeError lists them)
        raise ValueError(f"{path or FID_WEIGHTS_FILE} does not hold the FID Inception-v3 weights ({len(expected - keys)} "
                         f"of its {len(expected)} keys missing, {len(keys - expected)} unknown); give pytorch-fid's "
                         f"{FID_WEIGHTS_FILE}")
    net.load_state_dict(state_dict, strict=True)
    net.requires_grad_(False).eval()
    net = net.to(device)
    if net.fc.weight.device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    return net


def has_classifier(net):
    """False when the 1008-way fc weight is all zeros (the shared `fid_inception_v3_nofc.pth`):
    pool/spatial features are exact but the Inception Score is meaningless."""
    return bool(net.fc.weight.detach().abs().sum() > 0)


# ----------------------------------------------------------------------------------------------
#                               Reading images in batches
# ----------------------------------------------------------------------------------------------

def to_rgb(img):
    """Any PIL mode (grey, palette, RGBA, CMYK, ...) -> RGB; alpha is dropped as pytorch-fid and ADM's
    convert("RGB") do. 16-bit grey (PNG/TIFF mode I;16) keeps its high byte: PIL's own conversion clips
    every value above 255 to white. data.py decodes training images with it too."""
    if img.mode.startswith("I;16"):  # Pillow >= 10.3 opens 16-bit grey PNG so (older ones: mode I)
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def is_image_name(name):
    """True for an image's path (zip member or path relative to the folder) by its extension, unless it lies inside
    a hidden file or folder (.ipynb_checkpoints/, macOS ._x.png) or a __MACOSX folder (the resource forks macOS's
    Archive Utility adds at the top of a zip, or deeper once such a zip is unzipped and zipped again). The one rule of
    ImageFiles here and data.ImageFiles, for folders and zips, so that training and FID read the same images; a
    zip's directory entry ("x.png/") ends in "/" and fails the extension test."""
    parts = name.replace(os.sep, "/").split("/")
    return name.lower().endswith(IMAGE_EXTENSIONS) and not any(is_hidden(part) for part in parts)


def is_hidden(part):
    """True for a file or folder name that is_image_name skips everything under: hidden (".x") or __MACOSX."""
    return part.startswith(".") or part == "__MACOSX"


def folder_images(path):
    """The images of a folder and its sub-folders, symbolic links followed, as sorted paths relative to it that
    is_image_name passes (it skips .ipynb_checkpoints/, macOS ._x.jpg and __MACOSX/): zip_members for a folder.
    A link back to a folder it lies in (a loop) is not descended: os.walk would repeat the images under it at
    every depth up to the OS's path limit (two such links made the walk effectively endless)."""
    path, names = os.fspath(path), []
    above = {path: {os.path.realpath(path)}}  # each folder still to walk -> the real paths of it and its parents
    for root, dirs, files in os.walk(path, followlinks=True):
        chain = above.pop(root)
        real = {d: os.path.realpath(os.path.join(root, d)) for d in dirs}  # one resolution per sub-folder
        dirs[:] = [d for d in dirs if real[d] not in chain]
        above.update((os.path.join(root, d), chain | {real[d]}) for d in dirs)
        names += (os.path.relpath(os.path.join(root, f), path) for f in files)
    return sorted(n for n in names if is_image_name(n))


# One record per zip member: where its local header sits, its compressed and uncompressed sizes, its CRC-32 and
# whether it is deflated (else stored). 29 bytes, against about 570 for a ZipInfo in zipfile.ZipFile's lists.
ZIP_MEMBER = np.dtype([("offset", "<i8"), ("csize", "<i8"), ("size", "<i8"), ("crc", "<u4"), ("deflated", "?")])


def zip_members(path):
    """The image members of a zip (is_image_name; sorted), a ZIP_MEMBER record for each, and the set of folders its
    entries name (the folder of every member, image or not, and every folder entry: "train/b/" gives "train/b"). A
    name stored twice (a zip appended to again) counts once, as its last entry: what ZipFile.read gives.

    The central directory is parsed once, by zipfile, and its ZipInfo objects dropped: one ZipFile per thread or
    DataLoader worker held 0.73 GB each for ImageNet's 1.28M members. Members are then read with read_zip_member."""
    if not hasattr(os, "pread"):  # Windows
        raise ValueError(f"{path}: reading a zip needs os.pread, which this OS lacks; unzip it and pass the folder")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable zip file ({e})") from None
    with zf:
        infos = sorted({i.filename: i for i in zf.infolist() if is_image_name(i.filename)}.values(),
                       key=lambda i: i.filename)
        folders = {n[:n.rfind("/")] for n in zf.namelist() if "/" in n}
    for i in infos:
        if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or i.flag_bits & 0x1:
            how = "encrypted" if i.flag_bits & 0x1 else f"compressed with method {i.compress_type}"
            raise ValueError(f"{path}:{i.filename} is {how}; re-zip the images stored or deflated "
                             f"(`zip -r -0` or plain `zip -r`, no password)")
    members = np.empty(len(infos), ZIP_MEMBER)
    for field, attr in (("offset", "header_offset"), ("csize", "compress_size"), ("size", "file_size"), ("crc", "CRC")):
        members[field] = np.fromiter((getattr(i, attr) for i in infos), members.dtype[field], len(infos))
    members["deflated"] = np.fromiter((i.compress_type == zipfile.ZIP_DEFLATED for i in infos), bool, len(infos))
    names = "\0".join(i.filename for i in infos)  # zipfile cuts a name at a NUL
    # The names are made anew once the ZipInfo objects are freed, and a full collection empties the free lists
    # (up to 2000 spare ZipInfo.date_time tuples): either, left among the freed objects, held on to most of the
    # parse's memory (for 100K members: 64 MB kept with the names as they were, 16 MB made anew after gc.collect).
    del zf, infos
    gc.collect()
    return names.split("\0") if names else [], members, folders


def zip_data_offset(fd, header_offset):
    """Where a zip member's data starts in the file open as `fd`: after its local file header, which sits
    at `header_offset` (ZipInfo.header_offset) and is 30 fixed bytes (the name and extra-field lengths at
    bytes 26-29) plus the name and an extra field that may differ from the central directory's. Read by
    position (os.pread), so threads and forked processes can share the descriptor."""
    header = os.pread(fd, 30, header_offset)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("Bad magic number for file header")  # zipfile's words
    name_len, extra_len = struct.unpack("<26xHH", header)
    return header_offset + 30 + name_len + extra_len


def read_zip_member(fd, member, name, limit=None):
    """The bytes of a zip member (a ZIP_MEMBER record) from the zip open as `fd`: whole and checked against its
    CRC-32, as ZipFile.read does, or its first `limit` bytes at most (checked only if that is all of it). Read by
    position (os.pread), so threads and forked DataLoader workers share one descriptor safely."""
    start = zip_data_offset(fd, int(member["offset"]))
    size, csize = int(member["size"]), int(member["csize"])
    # A prefix reads `limit` deflated bytes, which inflate to about as many for JPEG and PNG (they barely deflate)
    raw = os.pread(fd, csize if limit is None else min(csize, limit), start)
    if member["deflated"]:
        data = zlib.decompressobj(-15).decompress(raw, size if limit is None else min(size, limit))  # raw deflate
    else:
        data = raw
    if len(data) == size and zlib.crc32(data) != member["crc"]:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")  # zipfile's words
    if limit is None and len(data) != size:
        raise zipfile.BadZipFile(f"{name!r} is truncated: {len(data)} of {size} bytes")
    return data


class ImageFiles(torch.utils.data.Dataset):
    """Images of a folder (recursive) or a .zip, in sorted path order, as uint8 (H, W, 3) tensors; the names are
    those is_image_name passes, as in data.ImageFiles. Zip members are read by position (zip_members,
    read_zip_member) from one file, opened at the first read: a forked DataLoader worker may share its parent's,
    which pread allows, and a spawned one gets none (__getstate__) and opens its own."""

    def __init__(self, path):
        self.path = Path(path)
        self._members, self._file = None, None  # a zip's ZIP_MEMBER records, and this process's file object
        if self.path.is_dir():
            self.names = folder_images(self.path)
        elif zipfile.is_zipfile(self.path):
            self.names, self._members, _ = zip_members(self.path)
        else:
            raise ValueError(f"{path} is neither a folder nor a .zip file")
        if not self.names:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        try:
            if self._members is None:
                img = Image.open(self.path / self.names[i])
            else:
                if self._file is None:
                    self._file = open(self.path, "rb")
                img = Image.open(io.BytesIO(read_zip_member(self._file.fileno(), self._members[i], self.names[i])))
            with img:
                return torch.from_numpy(np.array(to_rgb(img), dtype=np.uint8))  # (H, W, 3)
        except (OSError, zipfile.BadZipFile, zlib.error) as e:  # PIL's UnidentifiedImageError, truncated files, bad CRC
            raise ValueError(f"cannot decode {self.path / self.names[i]}: {e}; remove or replace that file") from None

    def __getstate__(self):  # open files do not cross process boundaries
        return {**self.__dict__, "_file": None}

    def __del__(self):  # closes the zip, without a ResourceWarning
        if getattr(self, "_file", None) is not None:
            self._file.close()


def npz_member(path):
    """The ZipInfo of arr_0.npy in an .npz (None for a member named "arr_0" by hand), or a ValueError saying why the
    file holds no images to read; nothing is read but the zip's directory."""
    if not zipfile.is_zipfile(path):  # np.load would give an .npy's array, or refuse "pickled data"
        raise ValueError(f"{path} is not an .npz (a zip of .npy files, as np.savez writes); save the images with "
                         f"np.savez(path, arr_0=images)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if "arr_0.npy" not in names and "arr_0" not in names:
            raise ValueError(f"{path} has no arr_0 (N x H x W x 3 uint8 images) to read; it holds "
                             f"{[n[:-4] if n.endswith('.npy') else n for n in names]} (a statistics file needs mu and sigma)")
        return zf.NameToInfo.get("arr_0.npy")


def npz_array(path):
    """arr_0 of an .npz as an array, memory-mapped when np.savez stored it uncompressed in C order, so
    that 50k 256x256 samples (or a training set, data.ArrayDataset) are not read into memory at once;
    otherwise (np.savez_compressed, Fortran order, a member named "arr_0" by hand) read whole.

    numpy cannot memory-map a member of a zip, but a ZIP_STORED member is a verbatim .npy file, which
    starts where zip_data_offset says: a magic string, a header (shape, order, dtype), then the data,
    where the memmap starts."""
    info = npz_member(path)
    if info is not None and info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(zip_data_offset(f.fileno(), info.header_offset))
            version = np.lib.format.read_magic(f)
            if version in ((1, 0), (2, 0)):  # version 3: only structured dtypes with non-Latin-1 field names
                shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
                if not fortran and not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
    try:
        with np.load(path) as data:
            return data["arr_0"]
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad CRC-32, a torn member
        raise damaged(path, e) from None


def damaged(path, e):
    """The ValueError for an .npz whose member cannot be read (exception e): names the file, as a bad image does."""
    return ValueError(f"{path} is damaged ({type(e).__name__}: {e}); make or copy it again")


def _subset(n, limit):
    """Indices of `limit` images spread evenly over n (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    return np.arange(limit) * n // limit


def _as_image(item):
    """One dataset item -> uint8 (H, W, 3) / (3, H, W) or float (3, H, W) tensor. (x, y) tuples
    (e.g. data.py's datasets) give their first element; PIL images are converted to RGB."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, Image.Image):
        item = np.array(to_rgb(item), dtype=np.uint8)
    return torch.as_tensor(item)


def _collate(items):
    """Stack images of one size; images of different sizes are resized to 299x299 one by one
    (exactly what the network would do to each) so that they can share a batch."""
    xs = [_as_image(it) for it in items]
    if all(x.shape == xs[0].shape and x.dtype == xs[0].dtype for x in xs):
        return torch.stack(xs)
    resized = [F.interpolate(_to_float(x[None]), size=(299, 299), mode="bilinear", align_corners=False,
                             antialias=False).clamp_(0, 1) for x in xs]  # each (1, 3, 299, 299)
    return torch.cat(resized)  # clamped: bilinear weights can take a white pixel to 1 + 1e-7


def _to_float(batch):
    """A batch of images -> float32 (N, 3, H, W) in [0, 1], on the batch's device.
    uint8 batches are (N, H, W, 3) (numpy/ADM order; any batch whose last axis is 3) or
    (N, 3, H, W) (torch order), scaled by 1/255 as torchvision's ToTensor does; float batches
    must be (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(batch)
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)  # (N, 3, H, W)
        elif x.shape[1] != 3:
            raise ValueError(f"uint8 images must be RGB, (N, H, W, 3) or (N, 3, H, W); got {tuple(x.shape)}")
        return x.float().div(255)
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {x.dtype}")
    if x.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W), got {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"float images must lie in [0, 1] (got [{lo:.3g}, {hi:.3g}]); map [-1, 1] "
                         f"samples with (x + 1) / 2, or better pass the uint8 images you would save")
    return x.float()


def _batches(images, batch_size, num_workers, limit):
    """(iterable of image batches, number of batches or None, number of images or None)."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if not path.exists():
            raise ValueError(f"no such file or folder: {path}")
        images = npz_array(path) if path.suffix.lower() == ".npz" else ImageFiles(path)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 4:
            raise ValueError(f"an image array must be (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}")
        idx = _subset(len(images), limit)
        n = len(images) if idx is None else len(idx)
        if idx is None:
            gen = (images[i: i + batch_size] for i in range(0, n, batch_size))
        else:
            gen = (images[idx[i: i + batch_size]] for i in range(0, n, batch_size))
        return gen, -(-n // batch_size), n
    if isinstance(images, torch.utils.data.Dataset) and hasattr(images, "__len__"):
        idx = _subset(len(images), limit)
        dataset = images if idx is None else torch.utils.data.Subset(images, idx.tolist())
        if len(dataset) == 0:
            raise ValueError("the image dataset is empty")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                             num_workers=num_workers, collate_fn=_collate,
                                             generator=torch.Generator())  # its seed draw must not shift the global RNG
        return loader, len(loader), len(dataset)
    if limit is not None:
        raise ValueError("limit needs a path, an array or a sized Dataset, not a stream of batches")
    return images, None, None  # any iterable of batches, e.g. a generator of sampled images


@contextmanager
def _full_precision(device_type):
    """No TF32 and no autocast inside: train.py may enable TF32 globally, and a caller may score inside an
    autocast region (bf16 moved pool features by 0.2), but FID features should be plain fp32."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def extract_features(images, net, keys=("pool", "spatial", "logits"), batch_size=50, num_workers=0,
                     limit=None, progress=True):
    """Run the network over `images` batch by batch on the net's device; returns {key: float32
    array (N, D)} for the requested keys of FIDInceptionV3.forward (pool, spatial, logits).

    images: a path (image folder, .zip, .npz with arr_0), an array or tensor of images
    (uint8 (N, H, W, 3) or (N, 3, H, W); float (N, 3, H, W) in [0, 1]; on any device), a sized
    torch Dataset of such images (or of (image, label) pairs as data.py yields; PIL images
    allowed), or any iterable of image batches (e.g. a generator sampling from a model).
    limit: use only this many images, spread evenly over the input (sorted path order).
    """
    keys = tuple(dict.fromkeys(keys))  # drop repeats, keep order
    unknown = set(keys) - {"pool", "spatial", "logits"}
    if unknown or not keys:
        raise ValueError(f"unknown feature keys {sorted(unknown)}; choose from pool, spatial, logits")
    device = net.fc.weight.device
    batches, num_batches, _ = _batches(images, batch_size, num_workers, limit)
    out = {k: [] for k in keys}
    with torch.inference_mode(), _full_precision(device.type):
        for batch in tqdm(batches, total=num_batches, desc="inception", unit="batch", disable=not progress):
            if isinstance(batch, np.ndarray):
                batch = np.array(batch)  # a writable copy (memory-mapped arrays are read-only)
            x = _to_float(torch.as_tensor(batch).to(device, non_blocking=True))  # (B, 3, H, W)
            feats = net(x)
            for k in keys:
                out[k].append(feats[k].float().cpu().numpy())
    if not out[keys[0]]:
        raise ValueError("no images were given")
    return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
#                                          Metrics
# ----------------------------------------------------------------------------------------------

def feature_statistics(feats):
    """Mean (D,) and covariance (D, D) of features (N, D), both float64 (FID's mu and Sigma)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2 for a covariance, got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}), in float64.

    pytorch-fid and ADM take scipy.linalg.sqrtm(sigma1 @ sigma2) and keep the trace of its real part.
    Only the trace is needed, and Tr (sigma1 sigma2)^{1/2} = sum_i sqrt(lambda_i), where lambda_i are the
    eigenvalues of sigma1 sigma2, which equal those of the symmetric R sigma2 R with R = sigma1^{1/2}.
    Two symmetric eigendecompositions give them, and a third checks that sigma2 is a covariance: 2.0 s
    for 2048-d statistics on 2 cores, against 15.7 s for sqrtm. Both are as accurate as rounding allows:
    on 1000 CIFAR-10 training against 1000 test images, where the covariances are singular (fewer samples
    than dimensions), sqrtm's FID was 4.0e-5 and this one 2.6e-5 from the exact 46.42738 (an SVD of the
    centred features' cross product).
    For a singular product sqrtm returns a complex matrix, whose real part pytorch-fid keeps; it retries with
    1e-6 added to the diagonals only when sqrtm's result is not finite. Here the zero eigenvalues, rounded to
    about +-1e-16, count as 0 and no retry is needed.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape} "
                         f"(statistics of different feature layers?)")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must both be ({d}, {d}) to match the means, "
                         f"got {sigma1.shape} and {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("the statistics hold NaN or inf values (from NaN images or features?)")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if np.abs(s - s.T).max() > 1e-6 * np.abs(s).max():
            raise ValueError(f"{name} is not symmetric, so it is no covariance matrix (transposed or corrupted statistics?)")
    w, v = np.linalg.eigh(sigma1)  # (D,), (D, D)
    root = (v * np.sqrt(w.clip(0))) @ v.T  # (D, D) sigma1^{1/2}
    # Each covariance's own eigenvalues: those of R sigma2 R miss a negative direction of sigma2 in sigma1's null
    # space (diag(1, 0), diag(1, -1) gave FID -1), and are >= 0 up to rounding once both pass
    w2 = np.linalg.eigvalsh(sigma2)  # (D,)
    if w.min() < -1e-6 * np.abs(w).max() or w2.min() < -1e-6 * np.abs(w2).max():
        raise ValueError("the covariances are not positive semi-definite, so they are no covariance matrices "
                         "(corrupted statistics?)")
    lam = np.linalg.eigvalsh(root @ sigma2 @ root)  # (D,) the eigenvalues of sigma1 sigma2
    diff = mu1 - mu2  # (D,)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(lam.clip(0)).sum())


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) as the ADM evaluator
    computes it: p(y|x) = softmax(logits) with ADM's bias-free logits, p(y) the mean over a split,
    splits of `split_size` consecutive samples (ceil(N / split_size) splits, the last may be shorter),
    and the mean of the per-split scores. float64 with log-softmax, so no log(0)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must be (N, classes) with N >= 1, got shape {logits.shape}")
    log_p = scipy.special.log_softmax(logits, axis=1)  # (N, C) log p(y|x)
    scores = []
    for i in range(0, len(log_p), split_size):
        part = log_p[i: i + split_size]  # (n, C)
        log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))  # (C,) log p(y)
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Squared Euclidean distances (n, m) between rows of a (n, D) and b (m, D), clamped at 0."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def _knn_radii(feats, k, batch_size):
    """Squared distance of each row of feats (N, D) to its k-th nearest other row (N,): the
    k+1-th smallest distance counting the point itself, as ADM's ManifoldEstimator. The running
    top-(k+1) keeps memory at batch_size^2."""
    radii = torch.empty(len(feats), dtype=feats.dtype, device=feats.device)
    for i in range(0, len(feats), batch_size):
        rows, best = feats[i: i + batch_size], None
        for j in range(0, len(feats), batch_size):
            d = _sq_dists(rows, feats[j: j + batch_size])  # (b1, b2)
            d = d if best is None else torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values  # (b1, <= k+1), ascending
        radii[i: i + batch_size] = best[:, k]
    return radii


def precision_recall(real, fake, k=3, batch_size=5000, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on features
    real (N, D) and fake (M, D), as the ADM evaluator: each set's manifold is the union of balls
    around its points with radius = distance to the k-th nearest neighbour within the set;
    precision = share of fake points inside the real manifold, recall = share of real points
    inside the fake manifold. float64 distances in blocks of batch_size x batch_size."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} points in each set, got {len(real)} real and {len(fake)} fake")
    r_real, r_fake = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)  # (N,), (M,)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)  # real on the fake manifold
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)  # fake on the real manifold
    for i in range(0, len(real), batch_size):
        for j in range(0, len(fake), batch_size):
            d = _sq_dists(real[i: i + batch_size], fake[j: j + batch_size])  # (b1, b2)
            fake_in[j: j + batch_size] |= (d <= r_real[i: i + batch_size, None]).any(0)
            real_in[i: i + batch_size] |= (d <= r_fake[None, j: j + batch_size]).any(1)
    return fake_in.double().mean().item(), real_in.double().mean().item()


# ----------------------------------------------------------------------------------------------
#                         Statistics files, caching, and evaluation
# ----------------------------------------------------------------------------------------------

def compute_statistics(images, net, keep=(), batch_size=50, num_workers=0, limit=None, progress=True):
    """FID and sFID statistics of `images` (anything extract_features takes): a dict with
    mu (2048,), sigma (2048, 2048), mu_s (2023,), sigma_s (2023, 2023) in float64, n, and the raw
    float32 features named in `keep` ("pool" for precision/recall, "logits" for the IS)."""
    feats = extract_features(images, net, keys=("pool", "spatial", *keep), batch_size=batch_size,
                             num_workers=num_workers, limit=limit, progress=progress)
    mu, sigma = feature_statistics(feats["pool"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "n": len(feats["pool"]),
            **{k: feats[k] for k in keep}}


def is_statistics_file(path):
    """True for an .npz holding `mu` and `sigma` (ours, pytorch-fid's or an ADM reference batch)."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file() or not zipfile.is_zipfile(path):  # np.save's .npy, renamed
        return False
    with np.load(path) as data:
        return "mu" in data.files and "sigma" in data.files


def read_statistics(path):
    """A statistics .npz -> dict (mu, sigma and whichever of mu_s, sigma_s, pool, logits, n, source,
    source_version it holds). Image arrays (arr_0 of ADM reference batches) are not read."""
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path} is not a statistics file: it has no mu/sigma (keys: {data.files})")
        try:
            stats = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "pool", "logits") if k in data.files}
            if "n" in data.files:
                stats["n"] = int(data["n"])
            for k in ("source", "source_version"):
                if k in data.files:
                    stats[k] = str(data[k])
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise damaged(path, e) from None
    return stats


def lock_folder(folder, name, log):
    """Lock the file `name` in `folder` for this process, so that a second process that would write into the same
    folder (a job submitted twice, a requeue while the first still runs) can be refused: returns the open lock file,
    which the caller keeps open while it writes. A POSIX record lock (fcntl.lockf, which NFS supports): the OS drops
    it when the process ends, however it ends, and a second lock from the same process (a notebook, the tests)
    succeeds. ValueError if another process holds it; where the file system (or the OS) has no locks, a warning
    through log(message) and None."""
    path = os.path.join(folder, name)
    try:
        import fcntl  # here: not on Windows, where fid.py works without it
    except ImportError:
        log(f"warning: cannot lock {path} (this OS has no fcntl locks); nothing stops a second process from writing "
            f"into {folder} while this one does")
        return None
    f = open(path, "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
        f.close()
        raise ValueError(f"another process is writing into {folder} (it holds {path}); wait for it to end, or pass "
                         f"another --out. The lock goes with its process: a killed one leaves none") from None
    except OSError as e:  # e.g. ENOLCK: a file system without locks
        f.close()
        log(f"warning: cannot lock {path} ({e}); nothing stops a second process from writing into {folder} while "
            f"this one does")
        return None
    return f


def atomic_write(path, write, mode="wb"):
    """Call write(f) on a temporary file in path's folder, fsync, then rename it to path: a crash or a
    full disk mid-write leaves the previous file untouched and never half a file under the final name
    (checkpoints, manifests, samples.npz, FID statistics)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_statistics(path, stats):
    """Write a statistics dict (see compute_statistics) to an .npz readable by read_statistics,
    pytorch-fid (mu, sigma) and the ADM evaluator's read_statistics (mu, sigma, mu_s, sigma_s; its
    script also reads arr_0 images, which this file does not hold)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics files end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("mu", "sigma", "mu_s", "sigma_s", "pool", "logits", "n", "source", "source_version")
    # Through a temporary file renamed into place: a write cut short (disk full, a killed job) left half an .npz,
    # which the next run's cache read failed on (BadZipFile) and --save-stats refused to overwrite
    atomic_write(path, lambda f: np.savez(f, **{k: stats[k] for k in keys if k in stats}))  # a file: savez adds no .npz


def check_source(path):
    """Refuse a path that load_or_compute_stats would refuse only once it reached it: missing, or neither a statistics
    .npz, an .npz with arr_0, nor a folder or zip with images. Lists the folder or zip and reads no image, so that
    sample.py and fid.py can check a reference before hours of sampling or of the other input's features."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    if is_statistics_file(path):
        return
    if path.suffix.lower() == ".npz":
        npz_member(path)
    else:
        ImageFiles(path)


def source_version(source):
    """What load_or_compute_stats checks a cache of `source` against, besides its name: for a folder, its images'
    names and byte sizes; for a zip or .npz (images, or statistics), its members' names, sizes and CRC-32s, read from
    the zip's directory; for another file, its size; for an array or tensor, a digest of its bytes; None for anything
    else (a Dataset, whose images only its caller can name: pass key) and for a path that does not exist. No image is
    decoded. Not mtimes: a job that copies a reference to local disk at each start would recompute it every time. What
    it misses: a folder's image replaced by another of the same byte size, and a non-zip file changed in place."""
    digest = hashlib.sha256()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            names = folder_images(path)
            for name in names:
                digest.update(f"{name}\0{os.path.getsize(path / name)}\n".encode())
            return f"{len(names)} images, {digest.hexdigest()[:16]}"
        if not path.is_file():
            return None
        if not zipfile.is_zipfile(path):
            return f"{path.stat().st_size} bytes"
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
        for info in infos:
            digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
        return f"{len(infos)} members, {digest.hexdigest()[:16]}"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        digest.update(f"{source.dtype} {tuple(source.shape)}\n".encode())
        if isinstance(source, torch.Tensor):  # its bytes, whatever the dtype (numpy has no bfloat16)
            digest.update(source.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:  # a memory-mapped (read-only) array is read once here
            digest.update(np.ascontiguousarray(source).reshape(-1).view(np.uint8))
        return f"{len(source)} images, {digest.hexdigest()[:16]}"
    return None


def load_or_compute_stats(source, net, cache_path=None, keep=(), key=None, **kwargs):
    """Statistics of `source` for evaluate(): read from a statistics .npz, or computed from images
    (a folder, .zip, .npz sample batch, or an array/Dataset) and, when `cache_path` is given,
    saved there and reused on the next call (e.g. train.py's reference statistics, once per run).

    keep: raw features needed besides the statistics, "pool" for precision/recall, "logits" for the IS. A
    statistics file without them is read for the statistics and its arr_0 images (ADM reference
    batches) are run through the network for the features; without images it is an error.
    kwargs: batch_size, num_workers, limit, progress, passed to compute_statistics.
    The cache records the source (a path, or the type and length of an array or Dataset, plus `key`:
    e.g. train.py's data path, image size and source_version for its training set), the limit, and
    source_version(source), and is recomputed (with a warning) when they or the wanted features differ.
    A path that no longer exists keeps its cache. A Dataset is cached only with a key, which must change
    when its images do.
    """
    version = source_version(source)
    if isinstance(source, (str, Path)):
        tag = f"{Path(source).resolve()}|limit={kwargs.get('limit')}"
    else:
        if cache_path is not None and version is None and key is None:
            raise ValueError(f"the images of a {type(source).__name__} cannot be checked against the cache "
                             f"{cache_path}: pass key, naming its data (e.g. its path and version), or no cache_path")
        tag = f"<{type(source).__name__} of {len(source) if hasattr(source, '__len__') else '?'} images>|limit={kwargs.get('limit')}"
    if key is not None:
        tag += f"|{key}"
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cached = read_statistics(cache_path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. cut short by an older, non-atomic write
            warnings.warn(f"{cache_path} cannot be read ({type(e).__name__}: {e}); recomputing it")
        else:
            # A source that is gone (a reference on a cleaned scratch disk) keeps its cache; one that changed does not
            if cached.get("source") == tag and all(k in cached for k in keep) and \
                    version in (None, cached.get("source_version")):
                return cached
            made = cached.get("source_version", "no version: made before caches recorded one")
            warnings.warn(f"{cache_path} was made from {cached.get('source')!r} ({made}; "
                          f"features {sorted(cached)}), not {tag!r} ({version}) with {list(keep)}; recomputing it")
    if isinstance(source, (str, Path)) and is_statistics_file(source):
        stats = read_statistics(source)
        missing = [k for k in keep if k not in stats]
        if missing:
            with np.load(source) as data:
                has_images = "arr_0" in data.files
            if not has_images:
                raise ValueError(f"{source} holds statistics only, but {missing} features are needed "
                                 f"(precision/recall, Inception Score); pass the images instead")
            stats.update(extract_features(source, net, keys=missing, **kwargs))
    else:
        stats = compute_statistics(source, net, keep=keep, **kwargs)
    stats["source"] = tag
    if version is not None:
        stats["source_version"] = version
    if cache_path is not None:
        save_statistics(cache_path, stats)
    return stats


def check_is_possible(metrics, net):
    """Refuse "is" among `metrics` when net's classifier is zeroed: IS would be exactly 1 whatever the samples."""
    if "is" in metrics and not has_classifier(net):
        raise ValueError("the Inception fc weight is all zeros (fid_inception_v3_nofc.pth?), so these weights cannot "
                         "give an Inception Score; drop 'is' from the metrics, or use pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth")


def raw_features(metrics, samples=True):
    """The raw features a statistics dict must keep for `metrics`: the pool features for precision/recall, and for
    the samples (not the reference) the logits for IS."""
    return (("pool",) if "pr" in metrics else ()) + (("logits",) if samples and "is" in metrics else ())


def check_statistics(name, stats, keep, metrics):
    """Refuse the statistics of the samples or reference (`name`) if they lack the raw features `keep` or, for
    sFID among `metrics`, mu_s and sigma_s."""
    needed = list(keep) + (["mu_s", "sigma_s"] if "sfid" in metrics else [])
    missing = [k for k in needed if k not in stats]
    if missing:
        raise ValueError(f"the {name} lack {missing}: sFID needs mu_s/sigma_s, precision/recall the raw "
                         f"pool features and IS the logits, which a statistics file may not hold; "
                         f"pass images, or drop those metrics")


def evaluate(samples, reference, net, metrics=("fid",), batch_size=50, num_workers=0, limit=None,
             progress=True, pr_batch_size=5000):
    """Score `samples` against `reference` with the ADM evaluator's metrics; returns a dict with
    fid, sfid, is, precision, recall (those asked for) and n_samples, n_reference.

    samples, reference: a statistics dict (compute_statistics / load_or_compute_stats), a path
    (image folder, .zip, .npz sample batch, statistics .npz) or images as extract_features takes.
    metrics: any of "fid", "sfid", "is" (samples' Inception Score), "pr" (precision, recall).
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    check_is_possible(metrics, net)
    kwargs = dict(batch_size=batch_size, num_workers=num_workers, limit=limit, progress=progress)
    keep_samples, keep_reference = raw_features(metrics), raw_features(metrics, samples=False)
    s, r = (x if isinstance(x, dict) else load_or_compute_stats(x, net, keep=keep, **kwargs)
            for x, keep in ((samples, keep_samples), (reference, keep_reference)))
    check_statistics("samples", s, keep_samples, metrics)
    check_statistics("reference", r, keep_reference, metrics)
    result = {}
    if "fid" in metrics:
        result["fid"] = frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"])
    if "sfid" in metrics:
        result["sfid"] = frechet_distance(s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"])
    if "is" in metrics:
        if not np.any(s["logits"]):  # saved by weights whose fc is zeroed: IS would read exactly 1
            raise ValueError("the samples' logits are all zero, as Inception weights with a zeroed fc "
                             "(fid_inception_v3_nofc.pth) give, so they cannot give an Inception Score; compute "
                             "them again with pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or drop 'is'")
        result["is"] = inception_score(s["logits"])
    if "pr" in metrics:
        device = net.fc.weight.device
        result["precision"], result["recall"] = precision_recall(r["pool"], s["pool"], batch_size=pr_batch_size,
                                                                 device=device)
    result["n_samples"], result["n_reference"] = s.get("n"), r.get("n")
    return result


# ----------------------------------------------------------------------------------------------
#                          FID during training: a table and a plot over runs
# ----------------------------------------------------------------------------------------------

def read_fid_curve(run):
    """FID against training step of one train.py run: {step: (fid, n_samples)} from the
    {"step", "fid", "fid_samples"} records of RUN/metrics.jsonl (or of the given metrics.jsonl).
    A step scored twice (a run resumed from a checkpoint before its last evaluation) keeps the
    later value, which is the one the checkpoint lineage leads to."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl there; give a train.py run folder or its metrics.jsonl")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has a line that is not JSON ({e}); is it a train.py metrics.jsonl?") from None
    curve = {int(r["step"]): (float(r["fid"]), r.get("fid_samples"))  # later records overwrite earlier ones
             for r in records if isinstance(r, dict) and r.get("fid") is not None and "step" in r}
    if not curve:
        raise ValueError(f"{path} holds no FID records; train with --fid-every N to score the EMA model during training")
    return dict(sorted(curve.items()))


def fid_table(curves):
    """Markdown table of FID per evaluated step (rows) and run (columns) for {label: curve} as
    read_fid_curve returns; the lowest FID of each row in bold, '-' where a run has no value."""
    steps = sorted({s for curve in curves.values() for s in curve})
    lines = ["| step | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for s in steps:
        values = {label: curve[s][0] for label, curve in curves.items() if s in curve}
        best = min(values.values()) if len(values) > 1 else None
        cells = ["-" if label not in values else
                 (f"**{values[label]:.2f}**" if values[label] == best else f"{values[label]:.2f}") for label in curves]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    counts = sorted({n for curve in curves.values() for _, n in curve.values()}, key=lambda n: (n is None, n or 0))
    lines.append("")
    lines.append(f"FID of {' / '.join('an unrecorded number of' if n is None else str(n) for n in counts)} EMA samples per evaluation" + (
        " (the runs differ in sample count, and FID is biased upward for fewer samples: compare with care)"
        if len(counts) > 1 else "") + ".")
    return "\n".join(lines)


# Line colours of plot_fid_curves, distinguishable in colour and for the common colour blindnesses
# (Okabe and Ito's palette), cycled beyond eight runs.
CURVE_COLOURS = ((0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (213, 94, 0), (0, 114, 178),
                 (204, 121, 167), (240, 228, 66))


def _round_ticks(lo, hi, count=5):
    """About `count` tick values 1, 2 or 5 times a power of ten apart, inside [lo, hi]."""
    spacing = 10.0 ** np.floor(np.log10(max(hi - lo, 1e-12) / count))
    spacing *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (spacing * m) <= count)
    return [v for v in np.arange(np.ceil(lo / spacing), np.floor(hi / spacing) + 1) * spacing]


def plot_fid_curves(curves, out_path, title="FID of the EMA model during training", size=(900, 520)):
    """Draw FID against training step for {label: curve} (read_fid_curve), one coloured line with
    dots per run and a legend, and save a PNG at out_path (pillow only)."""
    from PIL import ImageDraw, ImageFont

    if not curves:
        raise ValueError("no runs to plot")
    width, height = size
    left, right, top, bottom = 70, 190, 40, 50  # the legend lives in the right margin
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    steps = [s for curve in curves.values() for s in curve]
    fids = [v for curve in curves.values() for v, _ in curve.values()]
    s_hi = max(steps) or 1  # only step-0 records: a zero-width axis would divide by zero
    f_lo, f_hi = min(fids), max(fids)
    pad = 0.05 * (f_hi - f_lo) or 0.05 * f_hi or 1.0
    f_lo, f_hi = max(0.0, f_lo - pad), f_hi + pad

    def xy(step, value):
        return x0 + (x1 - x0) * step / s_hi, y1 - (y1 - y0) * (value - f_lo) / (f_hi - f_lo)

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((x0, 12), title, fill="black", font=font)
    for v in _round_ticks(0, s_hi):
        x, _ = xy(v, f_lo)
        draw.line([x, y0, x, y1], fill=(230, 230, 230))
        draw.text((x - 12, y1 + 6), f"{v:g}", fill="black", font=font)
    for v in _round_ticks(f_lo, f_hi):
        _, y = xy(0, v)
        draw.line([x0, y, x1, y], fill=(230, 230, 230))
        draw.text((8, y - 6), f"{v:g}", fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x1 - 80, y1 + 26), "training step", fill="black", font=font)
    draw.text((8, y0 - 20), "FID", fill="black", font=font)
    for i, (label, curve) in enumerate(curves.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        points = [xy(s, v) for s, (v, _) in curve.items()]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = y0 + 8 + 18 * i
        draw.line([x1 + 14, ly + 6, x1 + 40, ly + 6], fill=colour, width=2)
        draw.text((x1 + 46, ly), label, fill="black", font=font)
    img.save(out_path)


def curves_main(argv=None):
    """CLI: python fid.py curves RUN [RUN ...] [--labels a,b,...] [--out fid_curves.png] prints the
    markdown table of FID per step and run and draws the plot."""
    parser = argparse.ArgumentParser(prog="fid.py curves",
                                     description="Table and plot of FID against training step for train.py runs "
                                                 "trained with --fid-every.")
    parser.add_argument("runs", nargs="+", help="run folders (or their metrics.jsonl)")
    parser.add_argument("--labels", default=None, help="comma-separated names for the runs (default: folder names)")
    parser.add_argument("--out", default="fid_curves.png", help="PNG to write")
    parser.add_argument("--title", default="FID of the EMA model during training", help="the plot's title")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(r).name if Path(r).is_dir() else Path(r).parent.name
                                                         for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels names {len(labels)} runs, but {len(args.runs)} were given")
    if len(set(labels)) != len(labels):
        parser.error(f"the runs need distinct labels, got {labels}; pass --labels")
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out {args.out}: the curves are drawn as a PNG; pass a path ending in .png")
    try:
        curves = {label: read_fid_curve(run) for label, run in zip(labels, args.runs)}
        plot_fid_curves(curves, args.out, title=args.title)
    except (ValueError, OSError) as e:
        parser.exit(2, f"fid.py curves: error: {e}\n")
    print(fid_table(curves))
    print(f"\nwrote {args.out}")
    return curves


# ----------------------------------------------------------------------------------------------
#                                            CLI
# ----------------------------------------------------------------------------------------------

LABELS = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "precision": "Precision", "recall": "Recall"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["curves"]:
        return curves_main(argv[1:])
    parser = argparse.ArgumentParser(
        description="FID / sFID / Inception Score / precision-recall of image samples (pytorch-fid "
                    "network, ADM evaluator metrics). Inputs: image folder, .zip, .npz sample batch "
                    "(arr_0), or statistics .npz (mu, sigma[, mu_s, sigma_s, pool, logits]). "
                    "'python fid.py curves RUN [RUN ...]' tabulates and plots the FID of train.py runs instead.")
    parser.add_argument("samples", help="the images to score (or to take statistics of with --save-stats)")
    parser.add_argument("reference", nargs="?", help="reference images or statistics .npz")
    parser.add_argument("--metrics", default="fid", help="comma-separated: fid,sfid,is,pr (ADM reports all four)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available); k-NN distances run there too")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="image-decoding processes for folders/zips (default: 0 on CPU, up to 8 on CUDA)")
    parser.add_argument("--inception", default=None,
                        help=f"path to {FID_WEIGHTS_FILE} (default: download once into the torch hub cache)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use N images of each image input, spread evenly over its sorted order "
                             "(quick checks, e.g. FID-10K of a 50K batch); a statistics file's mu/sigma are used whole, "
                             "its arr_0 images (read for missing pool features) are not")
    parser.add_argument("--save-stats", default=None, metavar="OUT.npz",
                        help="write the statistics of SAMPLES (with pool features when pr is among --metrics, "
                             "and the logits when is is among them)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of one line per metric")
    args = parser.parse_args(argv)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.reference is None and args.save_stats is None:
        parser.error("give a REFERENCE to compare with, or --save-stats OUT.npz to store the statistics of SAMPLES")
    if args.reference is not None and not metrics:  # the features would be computed and nothing printed
        parser.error(f"--metrics {args.metrics!r} names no metric; choose from {', '.join(METRICS)}")
    if args.save_stats is not None:
        if Path(args.save_stats).suffix != ".npz":  # save_statistics refuses it, but only after the features
            parser.error(f"--save-stats {args.save_stats}: statistics files end in .npz")
        inputs = [p for p in (args.samples, args.reference) if p is not None and Path(p).exists()]
        if any(Path(p).resolve() == Path(args.save_stats).resolve() for p in inputs):
            parser.error(f"--save-stats {args.save_stats} is one of the inputs; writing it would replace that file "
                         f"(and a reference overwritten with the samples' statistics scores FID 0); pass another path")
        if Path(args.save_stats).exists():  # an ImageNet reference is an hour of GPU time: never overwritten
            parser.error(f"--save-stats {args.save_stats} exists; statistics files are not overwritten: delete it "
                         f"or pass another path")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be a positive number")
    if args.num_workers is not None and args.num_workers < 0:  # the DataLoader's refusal names its num_workers=0
        parser.error(f"--num-workers {args.num_workers}: must be 0 or more (0 decodes in this process)")
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit {args.limit}: statistics need at least 2 images (a covariance); use thousands")
    try:
        device = torch.device(args.device)
    except RuntimeError:  # torch's message lists 20 device types
        parser.error(f"--device {args.device}: not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # 0 without a GPU or a CUDA build
        parser.error(f"--device {args.device}: this process sees {torch.cuda.device_count()} CUDA GPU(s); use --device cpu")
    if args.save_stats is not None:
        try:  # its folder now, not after the features
            Path(args.save_stats).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"--save-stats {args.save_stats}: cannot make its folder ({e})")
    for path in (args.samples, args.reference):  # a mistyped REFERENCE was found only after the samples' features
        if path is not None and (not path or not Path(path).exists()):  # '' is Path('.'), the working folder
            parser.error(f"no such file or folder: {path!r}")
    if args.reference is not None:  # and one of the wrong kind (a text file, an .npz without arr_0, an empty folder) too
        try:
            check_source(args.reference)
        except ValueError as e:
            parser.exit(2, f"fid.py: error: {e}\n")
    num_workers = args.num_workers
    if num_workers is None:  # decoding only pays off when the GPU is the fast part
        num_workers = min(8, os.cpu_count() or 1) if args.device.startswith("cuda") else 0
    try:
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
        net = load_inception(args.inception, device=args.device)
        # before the samples' features, which evaluate() would refuse afterwards; and for --save-stats alone, whose
        # logits are kept for a later IS, which they could not give
        check_is_possible(metrics, net)
        kwargs = dict(batch_size=args.batch_size, num_workers=num_workers, limit=args.limit)
        if args.reference is None:
            samples = load_or_compute_stats(args.samples, net, keep=raw_features(metrics), **kwargs)  # logits too: an IS scored later
            save_statistics(args.save_stats, samples)
            result = {"saved": str(args.save_stats), "n_samples": samples.get("n")}
        else:
            reference = args.reference
            if is_statistics_file(reference):  # read at once: one without mu_s (sFID) or pool (pr) is refused before the samples' features
                reference = load_or_compute_stats(reference, net, keep=raw_features(metrics, samples=False), **kwargs)
                check_statistics("reference", reference, (), metrics)
            samples = load_or_compute_stats(args.samples, net, keep=raw_features(metrics), **kwargs)
            if args.save_stats:
                save_statistics(args.save_stats, samples)
            result = evaluate(samples, reference, net, metrics, **kwargs)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: e.g. a --save-stats file that cannot be written
        parser.exit(2, f"fid.py: error: {e}\n")
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key in LABELS:
                print(f"{LABELS[key]}: {value:.4f}")
        if "n_reference" in result:  # FID depends on N (FID-10K > FID-50K): the counts go with the numbers
            print(f"images: {result['n_samples']} samples, {result['n_reference'] or '?'} reference")
        if "saved" in result:
            print(f"saved statistics of {result['n_samples'] or '?'} images to {result['saved']}")
    if args.limit is not None:  # a --limit above an input's count uses all of it: say so, not silently
        for name, n in (("SAMPLES", result.get("n_samples")), ("REFERENCE", result.get("n_reference"))):
            if n is not None and n < args.limit:
                print(f"fid.py: note: --limit {args.limit}: {name} has {n} images; all of them were used",
                      file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
