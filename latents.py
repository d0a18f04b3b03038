r"""
Latent diffusion: encode a dataset once into VAE latents, and decode sampled latents to images.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022, and DiT
(Peebles & Xie 2023, sec. 4), whose ImageNet 256 runs (and the DTR and ANT headline numbers) train
on the latents of the Stable Diffusion VAE `stabilityai/sd-vae-ft-ema`: a 256x256x3 image becomes a
32x32x4 latent, multiplied by 0.18215 so that it has roughly unit variance.

    torchrun --nproc_per_node=8 latents.py encode --data imagenet/train --out latents/in256 \
        --vae stabilityai/sd-vae-ft-ema --image-size 256
    torchrun --nproc_per_node=8 train.py --data latents/in256 --image-size 256 --model DiT-B/2
    python latents.py decode --latents latents/in256 --out recon --num 64   # check the encoding by eye

The quantities, and the function for each:
    f = 2 ** (len(block_out_channels) - 1)      the VAE's downsampling factor        `vae_factor`
    z = s * (mu(x) + sigma(x) * eps - shift)    encoder posterior draw, scaled       `encode_batch`
    x = D(z / s + shift)                        decoding back to pixels in [-1, 1]   `Decoder`
with s = `scaling_factor` and shift = `shift_factor` (0 for the SD VAEs) read from the VAE's config.

The folder written by `encode` (read by data.LatentFolder, which train.py uses for `--data DIR`):
    latents.npy    (rows, C, h, w) float16, already scaled; written in place, memory-mapped when read
    labels.npy     (rows,) int64
    manifest.json  the VAE, sizes, scale, flip, posterior, counts and classes; "complete" once done
Row F*i + f holds image i of the source (load_dataset's sorted order) with f = 1 for its left-right
mirror image. With `--flip both` (F = 2) every image is stored in both orientations, each encoded from
its own pixels (the VAE is not exactly flip-equivariant, so flipping a latent is not the same). A
training "epoch" then has 2N rows, and sampling rows uniformly is DiT's random flip in expectation.

Where we depart from the official code, and why:
- DiT's train.py encodes every batch on the fly, `vae.encode(x).latent_dist.sample().mul_(0.18215)`,
  so each epoch sees a new flip and a new posterior draw. Encoding once (as fast-DiT's
  extract_features does) is many times cheaper, but freezes one draw per stored row. We keep the
  draw (`--posterior sample`, the default) because the VAE decoder was trained on posterior samples
  and DiT trains on them; `--posterior mean` stores the posterior mean instead. The SD VAE was trained
  with a tiny KL weight (1e-6 in LDM's configs), so its posterior should be narrow and the choice
  small, but we have not measured it. The choice is recorded in the manifest. Each row's noise comes from a generator seeded with (seed, row), so the stored
  latents do not depend on the number of processes, the batch size or where a crash happened.
- fast-DiT applies one random flip per image at extraction time, which loses the flip augmentation;
  `--flip both` stores both orientations instead (twice the disk: 16 KiB per image at 32x32x4).
- The scale is read from the VAE's config (0.18215 for the SD VAEs), not hard-coded, and so is the
  downsampling factor (8 for the SD VAEs), so a small or different VAE works unchanged; a config's
  per-channel latents_mean/latents_std (not the SD VAEs') are not applied.

Resuming: the arrays are preallocated; each batch is written with pwrite at its fixed rows (byte
ranges, safe on shared file systems), synced, and only then its image indices are appended to
`progress/rank{r}.idx`. A rerun of the same command reads those logs and encodes only the images not
yet recorded, split over however many processes it has, so no row is written twice and no finished
batch is encoded again. `diffusers` is needed only here (imported when a VAE is loaded).
"""

import argparse
import datetime
import json
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist

import data as datasets
from fid import atomic_write, lock_folder

INSTALL = "pip install diffusers"


class LatentError(datasets.DataError):
    """A missing package, an unloadable VAE or a mismatched latent folder: the message says what to do."""


# ----------------------------------------------------------------------------------------------
#                                   The VAE
# ----------------------------------------------------------------------------------------------

def require_diffusers():
    """diffusers' AutoencoderKL class, or a LatentError saying how to install it."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise LatentError(f"the VAE needs the optional `diffusers` package: {INSTALL}") from None
    return AutoencoderKL


def load_vae(name_or_path, device="cpu"):
    """The AutoencoderKL in a local folder (save_pretrained layout) or under a Hugging Face hub name,
    frozen, in eval mode, float32 on `device`."""
    AutoencoderKL = require_diffusers()
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - missing folder, no network, bad files: say which and how to fix
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__
        if os.path.isdir(name_or_path):
            hint = "the folder should hold config.json and the weights written by AutoencoderKL.save_pretrained"
        else:
            hint = ("it is not a local folder, and a hub name needs internet access on first use; on an offline machine "
                    "download it elsewhere (e.g. `hf download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema`) and pass the folder")
        raise LatentError(f"cannot load the VAE {name_or_path!r} ({reason}); {hint}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_factor(vae):
    """Spatial downsampling factor f of an AutoencoderKL: one 2x downsample between consecutive
    encoder blocks, so f = 2 ** (len(block_out_channels) - 1) (8 for the SD VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_scale_shift(vae):
    """(s, shift) of z = s * (latent - shift): the config's scaling_factor (0.18215 for the SD VAEs)
    and shift_factor (None, i.e. 0, for them)."""
    return float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)


@torch.no_grad()
def encode_batch(vae, x, rows, posterior="sample", seed=0):
    """Images (n, 3, H, W) in [-1, 1] -> scaled latents s * (z - shift), float32 (n, C, H/f, W/f).

    posterior "sample": z = mu + sigma * eps, eps from numpy's generator seeded with the
    SeedSequence (seed, row) for each of the n global row numbers `rows` (DiT / fast-DiT's
    latent_dist.sample(), made reproducible). torch's CPU generator keeps only 32 bits of its
    seed, too few for a distinct stream per (seed, row) over ImageNet's 2.6M rows, so encodes with
    two seeds would share draws. "mean": z = mu (the posterior mode)."""
    q = vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist  # the posterior q(z | x), diagonal Gaussian
    z = q.mean  # (n, C, h, w)
    if posterior == "sample":
        eps = np.stack([np.random.default_rng([seed, int(r)]).standard_normal(tuple(z.shape[1:]), dtype=np.float32)
                        for r in rows])  # (n, C, h, w)
        z = z + q.std * torch.from_numpy(eps).to(z.device, z.dtype)
    elif posterior != "mean":
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    scale, shift = vae_scale_shift(vae)
    return ((z - shift) * scale).float()


class Decoder:
    """Scaled latents (N, C, h, w) -> images (N, 3, f*h, f*w), nominally in [-1, 1] but not clamped:
    x = D(z / s + shift).

    `factor` is f, so callers know the image size without decoding. Decodes in chunks of
    `batch_size`: the decoder's activations at full resolution are large."""

    def __init__(self, vae, scale, shift=0.0, batch_size=32):
        self.vae, self.scale, self.shift, self.batch_size = vae, scale, shift, batch_size
        self.factor = vae_factor(vae)

    @torch.no_grad()
    def __call__(self, z):
        p = next(self.vae.parameters())
        x = [self.vae.decode(c.to(p.device, p.dtype) / self.scale + self.shift).sample.float()
             for c in z.split(self.batch_size)]  # each (b, 3, f*h, f*w)
        return torch.cat(x).to(z.device)


def load_decoder(latent, device="cpu", vae=None):
    """The Decoder for a run's latent settings (train.py's args.latent, or a manifest), with the
    VAE named there or `vae`; refuses a VAE whose channels or factor do not fit the latents."""
    name = vae or latent["vae"]
    model = load_vae(name, device)
    channels, factor = model.config.latent_channels, vae_factor(model)
    if (channels, factor) != (latent["channels"], latent["factor"]):
        raise LatentError(f"the VAE {name!r} makes {channels}-channel latents at 1/{factor} scale, but these latents are "
                          f"{latent['channels']}-channel at 1/{latent['factor']} (encoded with {latent['vae']!r}); pass that VAE")
    return Decoder(model, latent["scale"], latent["shift"])


# ----------------------------------------------------------------------------------------------
#                                   Encoding a dataset
# ----------------------------------------------------------------------------------------------

def write_json(obj, path):
    """Write JSON atomically (atomic_write): readers never see half a manifest."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def done_images(out, num_images):
    """(num_images,) bool: images whose latents are on disk, from every rank's progress log.
    A torn last record (a crash mid-append) is cut at the last whole int64."""
    done = np.zeros(num_images, dtype=bool)
    folder = os.path.join(out, "progress")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not re.fullmatch(r"rank\d+\.idx", name):  # e.g. a .DS_Store: its bytes would mark images as done
            continue
        with open(os.path.join(folder, name), "rb") as f:
            raw = f.read()
        done[np.frombuffer(raw[: len(raw) // 8 * 8], dtype=np.int64)] = True
    return done


def pwrite_all(fd, data, offset):
    """os.pwrite until every byte is written: a full disk (or a signal) can make one call write only
    part of `data` without an error; the next call then raises (ENOSPC) instead of the batch being
    logged as done with rows that were never written."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote nothing at byte {offset}")
        view, offset = view[written:], offset + written


def pwrite_rows(fd, offset, row_bytes, rows, values):
    """Write values (n, ...) at sorted global rows through pwrite, one call per run of consecutive rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run, vals in zip(np.split(rows, breaks), np.split(values, breaks)):
        pwrite_all(fd, np.ascontiguousarray(vals).tobytes(), offset + int(run[0]) * row_bytes)


def refuse_other_files(out):
    """LatentError if `out` has no manifest but holds files an encode did not make: e.g. the image folder itself, which
    the manifest would turn into a latent folder for train.py. Hidden files (.DS_Store) do not count."""
    if not os.path.isdir(out) or os.path.isfile(os.path.join(out, datasets.MANIFEST)):
        return
    own = ("progress", "latents.npy", "labels.npy")  # what an encode stopped before its manifest leaves
    other = sorted(n for n in os.listdir(out) if n not in own and not n.startswith((datasets.MANIFEST + ".tmp", ".")))
    if other:
        raise LatentError(f"--out {out} already holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) "
                          f"and no {datasets.MANIFEST}; pass a new or empty folder")


def prepare_folder(args, dataset, vae, out, log):
    """Rank 0, in a folder that encode() has locked and checked (refuse_other_files): the manifest of this encode,
    creating the preallocated arrays on first run and checking that a rerun has the same settings. Returns the
    manifest."""
    f = vae_factor(vae)
    scale, shift = vae_scale_shift(vae)
    F = 2 if args.flip == "both" else 1
    manifest = {
        "format": "latents.py encode v1", "complete": False,
        "source": os.path.abspath(args.data) if args.data not in (None, "shapes") else "shapes",
        "vae": os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae,
        "image_size": args.image_size, "factor": f, "latent_size": args.image_size // f,
        "channels": vae.config.latent_channels, "scale": scale, "shift": shift,
        "flip": args.flip, "posterior": args.posterior, "seed": args.seed,
        "num_images": len(dataset), "count": F * len(dataset), "dtype": "float16",
        "rows": "row F*i + f holds source image i, f = 1 for its left-right flip (F = 2 with --flip both, else 1)",
        "num_classes": dataset.num_classes, "classes": list(getattr(dataset, "classes", [])),
    }
    path = os.path.join(out, datasets.MANIFEST)
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        differ = [k for k in manifest if k != "complete" and old.get(k) != manifest[k]]
        if differ:
            raise LatentError(f"{out} holds an encode with other settings ({', '.join(f'{k}={old.get(k)!r}, now {manifest[k]!r}' for k in differ)}); "
                              f"rerun with the same flags to resume it, or pick another --out")
        return old
    os.makedirs(os.path.join(out, "progress"), exist_ok=True)
    shape = (manifest["count"], manifest["channels"], manifest["latent_size"], manifest["latent_size"])
    for name, dtype, shp in (("latents.npy", np.float16, shape), ("labels.npy", np.int64, shape[:1])):
        np.lib.format.open_memmap(os.path.join(out, name), mode="w+", dtype=dtype, shape=shp).flush()  # sparse, zeros
    write_json(manifest, path)  # last: its presence means the arrays exist
    log(f"encode: created {out}: {shape[0]} rows of {shape[1]}x{shape[2]}x{shape[3]} float16 latents")
    return manifest


def encode_share(vae, dataset, mine, args, device, rank, world):
    """Encode source images `mine` (ascending indices) into their fixed rows of the folder args.out,
    logging each batch to progress/rank{r}.idx only after its rows are synced to disk."""
    out, F = args.out, 2 if args.flip == "both" else 1
    lat_file, lab_file = (np.load(os.path.join(out, n), mmap_mode="r") for n in ("latents.npy", "labels.npy"))
    lat_offset, lab_offset, row_bytes = lat_file.offset, lab_file.offset, lat_file[0].nbytes
    del lat_file, lab_file
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine.tolist()), batch_size=args.batch_size,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    from tqdm.auto import tqdm
    bar = tqdm(total=len(mine), disable=rank != 0, desc=f"encode (rank 0 of {world})", dynamic_ncols=True, file=sys.stdout)
    lat_fd = os.open(os.path.join(out, "latents.npy"), os.O_WRONLY)
    lab_fd = os.open(os.path.join(out, "labels.npy"), os.O_WRONLY)
    try:
        log_path = os.path.join(out, "progress", f"rank{rank}.idx")
        if os.path.exists(log_path):  # cut a torn last record (a crash mid-append) before appending after it
            os.truncate(log_path, os.path.getsize(log_path) // 8 * 8)
        with open(log_path, "ab") as progress:
            for b, (images, labels) in enumerate(loader):
                idx = mine[b * args.batch_size: b * args.batch_size + len(images)]  # (n,) source indices, ascending
                x = datasets.to_model_input(images.to(device), flip=False)  # (n, 3, H, W) in [-1, 1]
                if F == 2:
                    x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # (2n, 3, H, W): image, mirror, image, ...
                rows = (idx[:, None] * F + np.arange(F)).ravel()  # (F n,)
                z = encode_batch(vae, x, rows, args.posterior, args.seed)  # (F n, C, h, w)
                pwrite_rows(lat_fd, lat_offset, row_bytes, rows, z.cpu().numpy().astype(np.float16))
                pwrite_rows(lab_fd, lab_offset, 8, rows, np.repeat(labels.numpy().astype(np.int64), F))
                os.fsync(lat_fd), os.fsync(lab_fd)  # the rows are on disk before the log says so
                progress.write(idx.astype(np.int64).tobytes())
                progress.flush()
                os.fsync(progress.fileno())
                bar.update(len(idx))
    finally:
        os.close(lat_fd), os.close(lab_fd)
        bar.close()


def check_out(out, wanted):
    """Refuse an --out that cannot be a folder: empty (the working folder) or a file. `wanted` says what to give."""
    if not out:
        raise LatentError(f"--out is empty; give {wanted}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise LatentError(f"--out {out} is a file; give {wanted}")


def encode(args):
    """`latents.py encode`: rank 0 prepares (or checks) the folder, every rank encodes its share of
    the images not yet done, and rank 0 marks the folder complete."""
    from sample import resolve_device  # here, not at the top: sample.py imports this module
    distributed = "RANK" in os.environ
    try:
        device = resolve_device(args.device)  # a bare "cuda" gets this process's index, which set_device needs
    except ValueError as e:
        raise LatentError(str(e)) from None
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))  # the last barrier waits for the slowest rank
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    def barrier():
        if distributed:
            dist.barrier()

    def on_rank0(fn):
        """fn() on rank 0 alone; its error is raised on every rank, so every rank stops with the one-line message. A rank
        left at a barrier by one that stopped ended in a traceback (gloo: the peer closed the connection)."""
        result, error = None, None
        if rank == 0:
            try:
                result = fn()
            except (datasets.DataError, OSError) as e:  # what main() reports in one line; LatentError included
                error = str(e)
            except Exception as e:  # a bug, not bad input: rank 0 shows the traceback, and the others stop with it
                if distributed:
                    dist.broadcast_object_list([f"rank 0 stopped ({type(e).__name__}: {e})"], src=0)
                raise
        if distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise LatentError(error)
        return result

    if args.seed < 0:
        raise LatentError(f"--seed {args.seed}: use a seed >= 0")
    check_out(args.out, "the latent folder to write (or resume)")  # '' wrote into the working folder, past its check
    for flag, value, least in (("--image-size", args.image_size, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-workers", args.num_workers, 0)):
        if value < least:  # checked before the VAE loads and the folder is made, not by the DataLoader after
            raise LatentError(f"{flag} {value}: must be {least} or more")
    if datasets.is_latent_folder(str(args.data)):
        raise LatentError(f"{args.data} is already a latent folder; --data takes images (a folder, .zip, .npz or .npy)")
    dataset = datasets.load_dataset(args.data, args.image_size, skip_bad=args.skip_bad_images)
    vae = on_rank0(lambda: load_vae(args.vae, device))  # rank 0 first: a hub download happens once, into the cache
    if rank != 0:
        vae = load_vae(args.vae, device)
    if args.image_size % vae_factor(vae):
        raise LatentError(f"--image-size {args.image_size} is not divisible by the VAE's downsampling factor {vae_factor(vae)}; "
                         f"use a multiple of {vae_factor(vae)}")

    def lock():  # before anything in the folder changes (a refused one gets no lock file); held until this encode ends
        refuse_other_files(args.out)
        os.makedirs(args.out, exist_ok=True)
        try:
            return lock_folder(args.out, ".encode.lock", log)  # hidden: not one of the "other files" a rerun refuses
        except ValueError as e:  # two encodes into one folder would write the same rows and progress logs
            raise LatentError(f"a latents.py encode is going on: {e}") from None

    folder_lock = on_rank0(lock)
    manifest = on_rank0(lambda: prepare_folder(args, dataset, vae, args.out, log))
    if manifest is None:
        with open(os.path.join(args.out, datasets.MANIFEST)) as fh:
            manifest = json.load(fh)

    if manifest["complete"]:
        log(f"encode: {args.out} is already complete ({manifest['count']} rows); nothing to do")
    else:
        done = done_images(args.out, len(dataset))
        mine = np.array_split(np.flatnonzero(~done), world)[rank]  # a contiguous block of the remaining images per rank
        log(f"encode: {len(dataset)} images ({done.sum()} already done), {args.image_size}px -> "
            f"{manifest['channels']}x{manifest['latent_size']}x{manifest['latent_size']}, flip {args.flip}, "
            f"posterior {args.posterior}, {world} process(es)")
        barrier()  # every rank has read the logs before any appends: a later read would split a shorter list
        encode_share(vae, dataset, mine, args, device, rank, world)
        barrier()

        def finish():
            missing = int((~done_images(args.out, len(dataset))).sum())
            if missing:
                raise LatentError(f"{missing} images are still not encoded; rerun the same command to finish")
            manifest["complete"] = True
            write_json(manifest, os.path.join(args.out, datasets.MANIFEST))
            progress = os.path.join(args.out, "progress")
            for name in os.listdir(progress):
                os.remove(os.path.join(progress, name))
            os.rmdir(progress)
            log(f"encode: wrote {manifest['count']} rows to {args.out}")
        on_rank0(finish)
    if distributed:
        dist.barrier()  # nobody tears down the process group while a peer still uses it
        dist.destroy_process_group()
    if folder_lock is not None:
        folder_lock.close()
    return manifest


# ----------------------------------------------------------------------------------------------
#                                   Decoding
# ----------------------------------------------------------------------------------------------

def decode(args):
    """`latents.py decode`: latents from an .npz (arr_0 (N, C, h, w) scaled latents, optional arr_1
    labels) or the first rows of a latent folder -> OUT/images.npz (ADM format: arr_0 (N, H, W, 3)
    uint8, arr_1 labels) and OUT/grid.png."""
    from sample import resolve_device, save_grid, to_uint8
    if args.num is not None and args.num < 1:
        raise LatentError(f"--num {args.num}: give a positive count, or leave it out to decode all")
    if args.batch_size < 1:
        raise LatentError(f"--batch-size {args.batch_size}: must be a positive number")
    check_out(args.out, "the folder for images.npz and grid.png")
    if os.path.exists(os.path.join(args.out, "images.npz")):  # as sample.py's samples.npz: never overwritten
        raise LatentError(f"{os.path.join(args.out, 'images.npz')} exists; decoded images are not overwritten: "
                          f"pass another --out or delete the file")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise LatentError(str(e)) from None
    if os.path.isdir(args.latents):
        if not datasets.is_latent_folder(args.latents):
            raise LatentError(f"{args.latents} is not a latent folder (no {datasets.MANIFEST} from latents.py encode); "
                              f"give one, or an .npz of latents")
        folder = datasets.LatentFolder(args.latents)
        n = min(args.num or len(folder), len(folder))
        z = torch.from_numpy(np.asarray(folder.array()[:n], dtype=np.float32))  # (n, C, h, w)
        y = np.asarray(folder.labels[:n])
        decoder = load_decoder(folder.manifest, device, args.vae)
    else:
        try:
            with np.load(args.latents) as f:
                z, y = f["arr_0"], (f["arr_1"] if "arr_1" in f.files else np.zeros(len(f["arr_0"]), dtype=np.int64))
        except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: an .npy (an array, not an archive)
            raise LatentError(f"cannot read latents from {args.latents} ({e}); expected an .npz with arr_0 (N, C, h, w)") from None
        if z.ndim != 4 or not np.issubdtype(z.dtype, np.floating) or not len(z):  # none: a reshape error in the VAE
            raise LatentError(f"{args.latents}: arr_0 must be float latents (N, C, h, w) with N >= 1, got {z.shape} {z.dtype}")
        if y.shape != (len(z),):  # images.npz would pair the images with other labels, or lack some
            raise LatentError(f"{args.latents}: arr_1 must hold one label per latent, ({len(z)},), got shape {y.shape}")
        if not args.vae:
            raise LatentError("decoding an .npz needs --vae (the VAE the latents were made with)")
        n = min(args.num or len(z), len(z))
        z, y = torch.from_numpy(z[:n].astype(np.float32)), y[:n]
        vae = load_vae(args.vae, device)
        if z.shape[1] != vae.config.latent_channels:
            raise LatentError(f"{args.latents} holds {z.shape[1]}-channel latents but {args.vae!r} makes {vae.config.latent_channels}")
        decoder = Decoder(vae, *vae_scale_shift(vae))
    bad = int((~torch.isfinite(z).flatten(1).all(1)).sum())
    if bad:  # they would decode to NaN images, saved as black ones
        raise LatentError(f"{args.latents}: {bad} of the {n} latents hold NaN or inf, which decode to blank images; "
                          f"sample them again from a checkpoint whose weights are finite")
    decoder.batch_size = args.batch_size
    os.makedirs(args.out, exist_ok=True)  # before the decoding, not after it: an --out under a file fails now
    images = torch.cat([to_uint8(decoder(c.to(device))) for c in z.split(args.batch_size)]).numpy()  # (n, H, W, 3)
    # Atomically, as sample.py's samples.npz: a write cut short leaves no half images.npz that refuses the rerun
    atomic_write(os.path.join(args.out, "images.npz"), lambda f: np.savez(f, arr_0=images, arr_1=np.asarray(y, dtype=np.int64)))
    save_grid(images[:64], os.path.join(args.out, "grid.png"))
    print(f"decoded {n} latents to {os.path.join(args.out, 'images.npz')} ({images.shape[1]}x{images.shape[2]})")
    return images


# ----------------------------------------------------------------------------------------------
#                                   Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", help="encode an image dataset into a latent folder (torchrun for several processes)")
    e.add_argument("--data", required=True, help="image folder, .zip, .npz or .npy (as train.py reads them; 'shapes' for the built-in set)")
    e.add_argument("--out", required=True, help="the latent folder to write (or resume)")
    e.add_argument("--vae", required=True, help="local AutoencoderKL folder, or a hub name such as stabilityai/sd-vae-ft-ema (needs internet)")
    e.add_argument("--image-size", type=int, default=256, help="pixel size: ADM centre crop + resize, then encode (DiT: 256)")
    e.add_argument("--flip", default="both", choices=("both", "none"), help="'both': also store each image's mirror (keeps random flips); 'none'")
    e.add_argument("--posterior", default="sample", choices=("sample", "mean"), help="'sample': one posterior draw per row (DiT, fast-DiT); 'mean'")
    e.add_argument("--batch-size", type=int, default=64, help="images per process per batch (each also flipped with --flip both)")
    e.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    e.add_argument("--seed", type=int, default=0, help="seed of the posterior draws")
    e.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images instead of stopping")
    e.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    d = sub.add_parser("decode", help="decode latents (.npz or a latent folder) into an ADM-format .npz of images")
    d.add_argument("--latents", required=True, help=".npz with arr_0 (N, C, h, w) scaled latents [arr_1 labels], or a latent folder")
    d.add_argument("--out", required=True, help="folder for images.npz and grid.png")
    d.add_argument("--vae", default=None, help="the VAE (default for a latent folder: the one in its manifest)")
    d.add_argument("--num", type=int, default=None, help="decode only the first N")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--device", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return encode(args) if args.command == "encode" else decode(args)
    except (datasets.DataError, OSError) as e:  # LatentError included; OSError: e.g. an --out under a file
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            # Leave without the interpreter's teardown: with the process group still up (a peer may not have reached
            # this point, so there is no barrier to wait at) it aborted about 1 exit in 5 with "terminate called
            # without an active exception" after the message. Every file this process writes is already closed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)


if __name__ == "__main__":
    main()
