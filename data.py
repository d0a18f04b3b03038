"""
Datasets for train.py: image folders, zip files, .npz/.npy arrays (memory-mapped where stored
uncompressed) and a built-in procedural set.

Every dataset yields (image, label) with image a uint8 tensor (3, H, W), already centre-cropped
and resized like ADM/DiT (`center_crop_arr`), and label an int64 class index (0 for every image of
an unconditional set). Random flips and the scaling to [-1, 1] happen on the device in train.py
(`to_model_input`), so the same code path serves a DataLoader and a dataset held on the GPU.

The exception is a latent folder written by `latents.py encode` (`LatentFolder`): it yields float16
VAE latents (C, h, w), already scaled (and with --flip both stored in both orientations), which
train.py uses as they are.
"""

import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

import fid

MANIFEST = "manifest.json"  # marks a latent folder (latents.py)
SHAPES = ("circle", "square", "triangle", "cross")


class DataError(ValueError):
    """Bad data given by the user: the message says which file and what to do."""


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with a box filter while the short side is >= 2x the target, resize
    the short side to image_size (bicubic), then crop the centre. Returns (H, W, 3) uint8."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def to_model_input(images, flip=True, generator=None):
    """uint8 (N, 3, H, W) on any device -> float32 in [-1, 1], each image flipped left-right with
    probability 1/2 when `flip`. Runs on the images' device without a host sync."""
    x = images.float().div_(127.5).sub_(1.0)  # (N, 3, H, W)
    if flip:
        coin = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator) < 0.5  # (N, 1, 1, 1)
        x = torch.where(coin, x.flip(-1), x)
    return x


# ----------------------------------------------------------------------------------------------
#                                   Built-in procedural data
# ----------------------------------------------------------------------------------------------

class ShapesDataset(torch.utils.data.Dataset):
    """Coloured shapes on dark backgrounds, one class per shape (circle, square, triangle, cross).

    Image i is a pure function of (seed, i), so every rank and every run sees the same data and the
    quickstart needs no download. Drawn at 4x and downsampled for smooth edges."""

    num_classes = len(SHAPES)

    def __init__(self, image_size=32, num_images=10000, seed=0):
        self.image_size, self.num_images, self.seed = image_size, num_images, seed

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        label = i % len(SHAPES)
        S = 4 * self.image_size
        background = tuple(int(v) for v in rng.integers(0, 70, 3))
        colour = tuple(int(v) for v in rng.integers(120, 256, 3))
        img = Image.new("RGB", (S, S), background)
        draw = ImageDraw.Draw(img)
        r = S * rng.uniform(0.26, 0.36)  # large and near the centre: the outline is what tells classes apart
        cx, cy = (S * rng.uniform(0.42, 0.58) for _ in range(2))
        if SHAPES[label] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif SHAPES[label] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif SHAPES[label] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
        else:
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        img = img.resize((self.image_size, self.image_size), resample=Image.LANCZOS)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label


# ----------------------------------------------------------------------------------------------
#                                   Files: folders and zips
# ----------------------------------------------------------------------------------------------

ZIP_HEADER_BYTES = 16 * 1024  # what the start-up check reads of a member: more than a JPEG or PNG header needs


def _image_size(data):
    """The (width, height) PIL finds in the first bytes of an image file, or None if it needs more than `data`."""
    stream = io.BytesIO(data)
    try:
        with Image.open(stream) as img:
            return img.size if stream.tell() < len(data) else None  # at the end: it may have wanted more
    except Exception:  # noqa: BLE001 - a header longer than `data`, or a bad file: the caller reads it whole
        return None


def _labels_from_paths(paths, subfolders=None):
    """Class labels from the first folder level under the common root, if there is one per image.

    Single top-level folders are descended (a zip of "train/<class>/x.jpg" has classes). If any
    image sits directly in the root, or there is only one folder, the set is unconditional.
    subfolders(root), optional, lists the folder names in `root` (a path relative to the data, "" for its top): a
    visible folder beside the classes that holds no image is a DataError, since leaving it out would give every
    class sorted after it another label than torchvision's ImageFolder (DiT's loader, which refuses it too)."""
    parts = [p.replace("\\", "/").split("/") for p in paths]
    root = []
    while all(len(p) > 1 for p in parts) and any(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        root.append(parts[0][0])
        parts = [p[1:] for p in parts]
    if any(len(p) == 1 for p in parts):
        folders = {p[0] for p in parts if len(p) > 1}
        if len(folders) > 1:  # torchvision's ImageFolder (DiT) ignores the loose files and keeps the classes
            loose = [p[0] for p in parts if len(p) == 1]
            lie = "1 image lies" if len(loose) == 1 else f"{len(loose)} images lie"
            warnings.warn(f"{lie} beside the {len(folders)} class folders (e.g. {loose[0]}), so the whole set is read "
                          f"as unconditional; move them into a class folder, or out, to keep the labels")
        return [0] * len(paths), []
    classes = sorted({p[0] for p in parts})
    # Copies, made while `parts` is alive, so that they sit together: the originals, left among the freed parts, held
    # on to most of their memory (a dataset of 100K images in 1000 classes kept 610 instead of 260 bytes per image).
    # surrogatepass: a folder name that is not UTF-8 comes from os.walk with lone surrogates ("caf\udce9")
    classes = [c.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass") for c in classes]
    if len(classes) < 2:
        return [0] * len(paths), []
    if subfolders is not None:
        visible = {d for d in subfolders("/".join(root)) if not fid.is_hidden(d)}
        empty = sorted(visible - set(classes))
        if empty:
            where = "/".join(root + [empty[0]])
            raise DataError(f"class folder {where!r} holds no images ({len(empty)} such folder(s) beside the {len(classes)} "
                            f"classes), and leaving it out would shift the labels of the classes after it; put its "
                            f"images in, or move it out")
    index = {c: i for i, c in enumerate(classes)}
    return [index[p[0]] for p in parts], classes


class ImageFiles(torch.utils.data.Dataset):
    """Images from a folder (recursively) or a .zip; labels from class sub-folders if present."""

    def __init__(self, path, image_size, skip_bad=False, num_threads=16):
        self.path, self.image_size = str(path), image_size
        self.is_zip = self.path.lower().endswith(".zip") and not os.path.isdir(self.path)
        self._members, self._file = None, None  # a zip's fid.ZIP_MEMBER records, and this process's file object
        if self.is_zip:
            try:
                names, self._members, folders = fid.zip_members(self.path)
            except ValueError as e:  # fid's errors are ValueErrors; train.py prints a DataError as one line
                raise DataError(str(e)) from None
            self._file = open(self.path, "rb")
        else:
            names = fid.folder_images(self.path)
        if not names:
            raise DataError(f"no images ({', '.join(fid.IMAGE_EXTENSIONS)}) found in {self.path}")
        # One pass over the headers (or, with skip_bad, a full decode) before training starts, in contiguous
        # chunks, one per thread. Zip members are read by position (fid.read_zip_member) through one descriptor;
        # a ZipFile shared by threads raced on the file position (Python >= 3.12 then reported "Overlapped
        # entries" or a bad CRC for intact files), and one ZipFile per thread held 0.73 GB each for ImageNet.
        size = -(-len(names) // num_threads)
        chunks = [range(i, min(i + size, len(names))) for i in range(0, len(names), size)]
        with ThreadPoolExecutor(num_threads) as pool:
            checks = [c for chunk in pool.map(lambda ch: [self._check(i, names[i], skip_bad) for i in ch], chunks)
                      for c in chunk]
        bad = [(n, err) for n, (err, _) in zip(names, checks) if err]
        if bad and not skip_bad:
            name, err = bad[0]
            raise DataError(f"cannot read image {self._where(name)}: {err}. Remove it, or pass --skip-bad-images")
        self.skipped = [self._where(n) for n, _ in bad]
        good = [(n, small) for n, (err, small) in zip(names, checks) if not err]
        if not good:
            raise DataError(f"none of the {len(names)} images in {self.path} could be read")
        if bad and self.is_zip:
            self._members = self._members[[not err for err, _ in checks]]
        self.names = [n for n, _ in good]
        self.num_upsized = sum(small for _, small in good)
        if bad:  # a class all of whose images were skipped: leaving it out would shift the labels after it
            with warnings.catch_warnings():  # any warning about these paths comes below
                warnings.simplefilter("ignore")
                labels, classes = _labels_from_paths(names)
            kept = {label for label, (err, _) in zip(labels, checks) if not err}
            lost = [c for i, c in enumerate(classes) if i not in kept]
            if lost:
                raise DataError(f"every image of class {lost[0]!r} is unreadable and was skipped ({len(lost)} such "
                                f"class(es)), which would give the classes after it other labels; fix or remove them")
        def subfolders(root):  # for the check that every class folder holds an image
            if self.is_zip:  # as its entries name them: a folder's own ("train/b/", which `zip -r` stores for an
                prefix = f"{root}/" if root else ""  # empty folder) or its files'; an unlisted empty one is not seen
                return {f[len(prefix):].split("/")[0] for f in folders if f.startswith(prefix) and len(f) > len(prefix)}
            return [e.name for e in os.scandir(os.path.join(self.path, root)) if e.is_dir()]
        self.labels, self.classes = _labels_from_paths(self.names, subfolders)
        self.num_classes = max(1, len(self.classes))

    def _where(self, name):
        return f"{self.path}:{name}" if self.is_zip else os.path.join(self.path, name)

    def _read(self, i, name, limit=None):
        """Zip member i (`name`), whole or its first `limit` bytes (fid.read_zip_member)."""
        if self._file is None:  # dropped by __getstate__: a spawned worker opens the zip once. A forked one keeps
            self._file = open(self.path, "rb")  # the parent's descriptor, which pread shares safely
        return fid.read_zip_member(self._file.fileno(), self._members[i], name, limit)

    def _open(self, i, name):
        """Image i (`name`), read whole."""
        if self.is_zip:
            return Image.open(io.BytesIO(self._read(i, name)))
        return Image.open(os.path.join(self.path, name))

    def _check(self, i, name, full):
        """(error message or None, whether the image is smaller than the target size) of image i (`name`). Without
        `full` only the header is read: the first ZIP_HEADER_BYTES of a zip member, or the whole member if PIL needs
        more. Streaming a member through ZipFile read 25 KB of each 70-110 KB JPEG on a local ext4 disk (128 KB
        readahead): about 32 GB of an ImageNet zip (extrapolated) instead of all 140 GB. A member's CRC is then
        checked at start-up only if it is no longer than that prefix, else when it is loaded, so a corrupt member
        stops the run at its first use, as a truncated image file does; --skip-bad-images reads each member whole."""
        try:
            if self.is_zip and not full:
                data = self._read(i, name, ZIP_HEADER_BYTES)
                if len(data) < self._members[i]["size"]:  # a prefix: enough if PIL finds the size in it
                    wh = _image_size(data)
                    if wh is not None:
                        return None, min(wh) < self.image_size
                    data = self._read(i, name)
                img = Image.open(io.BytesIO(data))
            else:
                img = self._open(i, name)
            with img:
                if full:
                    img.load()
                return None, min(img.size) < self.image_size
        except Exception as e:  # noqa: BLE001 - any decoder error means "bad file"
            return f"{type(e).__name__}: {e}", False

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        try:
            with self._open(i, name) as img:
                arr = center_crop_arr(fid.to_rgb(img), self.image_size)  # (H, W, 3)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {self._where(name)}: {type(e).__name__}: {e}. "
                            f"Remove it, or pass --skip-bad-images") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.labels[i]

    def __getstate__(self):  # open files do not cross process boundaries
        return {**self.__dict__, "_file": None}

    def __del__(self):  # closes the zip as a ZipFile did, without a ResourceWarning
        if getattr(self, "_file", None) is not None:
            self._file.close()


def file_stamp(path):
    """(device, inode, size, mtime) of a file: changes when it is rewritten in place or renamed over."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def open_array(path):
    """The array of an .npy, or arr_0 of an .npz: a read-only np.memmap when the file holds it
    uncompressed (np.save; np.savez in C order, see fid.npz_array), else read into memory
    (np.savez_compressed, Fortran order in an .npz)."""
    return np.load(path, mmap_mode="r") if path.lower().endswith(".npy") else fid.npz_array(path)


class ArrayDataset(torch.utils.data.Dataset):
    """arr_0 (N, H, W, C) uint8 images and optional arr_1 (N,) integer labels of an .npz (the ADM/DiT
    format), or (N, H, W, C) images of an .npy (unconditional). Memory-mapped where the file allows
    (np.savez, np.save), so that every rank and DataLoader worker reads the one copy in the OS page
    cache instead of holding its own; each process maps the file itself (see __getstate__)."""

    def __init__(self, path, image_size):
        self.path, self.image_size = str(path), image_size
        try:
            self.stamp = file_stamp(self.path)  # what a spawned worker checks before it maps the file again
            if self.path.lower().endswith(".npy"):
                keys, labels = ["arr_0"], None
            else:
                with np.load(self.path) as data:
                    keys = list(data.keys())
                    labels = data["arr_1"] if "arr_1" in keys else None
            images = open_array(self.path) if "arr_0" in keys else None
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read {path}: {e}") from None
        if images is None:
            raise DataError(f"{path} has no 'arr_0' array (expected N x H x W x C uint8 images); it has {keys}")
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
            raise DataError(f"{path}: arr_0 must be N x H x W x C uint8 with C in 1, 3, 4; got {images.shape} {images.dtype}")
        if len(images) == 0:
            raise DataError(f"{path}: arr_0 holds no images")
        if not isinstance(images, np.memmap):
            warnings.warn(f"{path}: arr_0 cannot be memory-mapped (np.savez_compressed or Fortran order), so each process "
                          f"reads all {images.nbytes / 1e6:,.1f} MB of it into memory; save it with "
                          f"np.savez(path, arr_0=np.ascontiguousarray(images), arr_1=labels) to memory-map it")
        self.images = images
        if labels is None:
            labels = np.zeros(len(images), dtype=np.int64)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iuf":
            raise DataError(f"{path}: arr_1 must hold {len(images)} labels, one number per image, got shape "
                            f"{labels.shape} {labels.dtype}")
        wrong = ~np.isfinite(labels) | (labels < 0) | (labels != np.round(labels))  # (N,) astype made 0.9 class 0
        if wrong.any():
            raise DataError(f"{path}: arr_1 must hold class indices 0, 1, 2, ..., got {labels[wrong][0].item()!r} "
                            f"(image {np.flatnonzero(wrong)[0]}, and {wrong.sum() - 1} more)")
        self.labels = labels.astype(np.int64)  # (N,)
        self.num_classes = int(self.labels.max()) + 1
        unused = self.num_classes - len(np.unique(self.labels))
        if unused:  # e.g. labels 1..K: class 0 gets an embedding row, and the sample grids and FID draw it
            warnings.warn(f"{path}: arr_1 has labels 0..{self.num_classes - 1}, but {unused} of them have no image, "
                          f"classes which the model still conditions on and the sample grids and FID still draw; number the "
                          f"classes 0..K-1 if they are not meant to exist")
        self.num_upsized = int(min(images.shape[1:3]) < image_size) * len(images)
        self.skipped = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.images is None:  # a spawned worker's copy (see __getstate__): map the file on first use
            if file_stamp(self.path) != self.stamp:
                raise DataError(f"{self.path} was rewritten or replaced after this run opened it; restart the run, "
                                f"and write new data under another name while a run reads the old")
            self.images = open_array(self.path)
        img = self.images[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        if img.size != (self.image_size, self.image_size):
            arr = center_crop_arr(fid.to_rgb(img), self.image_size)
        else:
            arr = np.asarray(fid.to_rgb(img))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), int(self.labels[i])

    # A pickled np.memmap carries all its bytes: a spawned DataLoader worker maps the file again instead (in
    # __getitem__, so that a DataError reaches train.py as one line), if it is still the file the parent mapped:
    # rewritten or renamed over since, it holds other images, or fewer than the labels index. A forked worker reads
    # the parent's map, which is safe: it is read-only and has no file position.
    def __getstate__(self):
        return {**self.__dict__, "images": None if isinstance(self.images, np.memmap) else self.images}


class LatentFolder(torch.utils.data.Dataset):
    """A folder written by `latents.py encode`: latents.npy (rows, C, h, w) float16 VAE latents,
    already scaled, labels.npy (rows,) and manifest.json (see latents.py). Yields (float16 (C, h, w),
    label); the latents are memory-mapped, opened on first use in each process."""

    def __init__(self, path):
        self.path = str(path)
        try:
            with open(os.path.join(self.path, MANIFEST)) as f:
                self.manifest = json.load(f)
            if not isinstance(self.manifest, dict):  # an image folder's own list, next to a latents.npy (is_latent_folder)
                raise ValueError(f"its {MANIFEST} holds a {type(self.manifest).__name__}, not latents.py's settings")
            self.labels = np.load(os.path.join(self.path, "labels.npy"))
            shape = np.load(os.path.join(self.path, "latents.npy"), mmap_mode="r").shape
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path} is not a readable latent folder ({e}); write it with latents.py encode") from None
        m = self.manifest
        if not m.get("complete"):
            raise DataError(f"{self.path}: the latents.py encode that writes it has not finished; "
                            "rerun the same `latents.py encode` command to resume it")
        if shape != (m["count"], m["channels"], m["latent_size"], m["latent_size"]) or self.labels.shape != shape[:1]:
            raise DataError(f"{self.path}: latents {shape} and labels {self.labels.shape} do not match the manifest; re-encode it")
        self.num_classes, self.skipped, self.num_upsized = m["num_classes"], [], 0
        self._latents = None

    def array(self):
        """The (rows, C, h, w) float16 memory map."""
        if self._latents is None:
            self._latents = np.load(os.path.join(self.path, "latents.npy"), mmap_mode="r")
        return self._latents

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.array()[i])), int(self.labels[i])

    def __getstate__(self):  # DataLoader workers open their own map instead of receiving a copy
        state = self.__dict__.copy()
        state["_latents"] = None
        return state


def is_latent_folder(path):
    """True for a folder whose manifest.json was written by latents.py encode, or whose manifest
    cannot be read next to a latents.npy (so that LatentFolder says what is wrong). An image folder
    may hold a manifest.json of its own, in any format (a dict, a list, JSON lines)."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return False
    try:
        with open(manifest) as f:
            m = json.load(f)
    except (OSError, ValueError):
        m = None
    if isinstance(m, dict) and str(m.get("format", "")).startswith("latents.py encode"):
        return True
    return os.path.isfile(os.path.join(path, "latents.npy"))


def load_dataset(path, image_size, skip_bad=False, shapes_size=10000, seed=0):
    """The dataset behind --data: None or "shapes" (built-in), a folder, a .zip, an .npz or .npy, or a
    latent folder (see is_latent_folder). Hidden files and folders are skipped."""
    if path in (None, "shapes"):
        return ShapesDataset(image_size, shapes_size, seed)
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"data path {path} does not exist; give a folder, .zip, .npz or .npy, or omit --data for the built-in shapes")
    if os.path.isdir(path):  # by what it is, then by name: a folder may be called x.zip
        return LatentFolder(path) if is_latent_folder(path) else ImageFiles(path, image_size, skip_bad=skip_bad)
    if path.lower().endswith((".npz", ".npy")):
        return ArrayDataset(path, image_size)
    if path.lower().endswith(".zip"):
        return ImageFiles(path, image_size, skip_bad=skip_bad)
    raise DataError(f"cannot use {path} as data: expected a folder, a .zip, an .npz or an .npy")


def dataset_to_tensor(dataset, num_workers=0, device="cpu", start_workers=iter, **loader_args):
    """Decode a whole dataset once: (uint8 (N, 3, H, W) or float16 latents, int64 (N,)) on `device`.
    For sets held on the GPU. Each batch is copied into tensors allocated up front, so host memory
    holds one batch, not the whole set twice (a list of batches, then their concatenation).
    `start_workers` makes the loader's iterator and `loader_args` go to the DataLoader: train.py's
    --data-on-device passes those of its training loader (train.start_workers), so that a job-wide stop
    during the decode ends none of its workers."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers,
                                         generator=torch.Generator(), **loader_args)  # leaves the global RNG (and resume) alone
    images = labels = None
    start = 0
    for x, y in start_workers(loader):  # x: (B, 3, H, W) uint8 or (B, C, h, w) float16
        if images is None:
            images = torch.empty((len(dataset), *x.shape[1:]), dtype=x.dtype, device=device)  # (N, 3, H, W) or (N, C, h, w)
            labels = torch.empty(len(dataset), dtype=torch.int64, device=device)  # (N,)
        images[start: start + len(x)] = x
        labels[start: start + len(x)] = torch.as_tensor(y)
        start += len(x)
    return images, labels
