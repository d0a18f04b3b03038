r"""
Sample from a trained checkpoint (EMA weights by default), on one process or many.

    torchrun --nproc_per_node=N sample.py --ckpt results/RUN/checkpoints/0010000.pt \
        --num-samples 50000 --steps 250 --cfg-scale 1.5 --out samples

Samples are split exactly across ranks (rank r makes samples r, r + W, r + 2W, ... of a global
numbering, so N samples total and no duplicates whatever W is). Writes `OUT/samples.npz` with
arr_0 (N, H, W, 3) uint8 and arr_1 (N,) labels in the ADM evaluator's format, a PNG grid of the
first 64, and the individual PNGs in OUT/png with --save-png. Each batch is saved in OUT/parts as
it is made, so a stopped run resumes when the same command is run again, on any number of ranks.
The network (and its router, for DTR) and the diffusion are rebuilt from the arguments saved in
the checkpoint. A DiT trained on VAE latents (train.py on a latents.py folder) samples latents
without clipping and decodes them through the VAE saved in the checkpoint (or --vae), so the .npz
holds images either way.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist

import diffusion as gd
import latents
from dit import DiT_models


# ----------------------------------------------------------------------------------------------
#                 Building the network and diffusion from saved arguments
# ----------------------------------------------------------------------------------------------

def method_parts(method):
    """'dtr+ant-uw' -> ('dtr', 'ant-uw')."""
    return tuple(method.split("+"))


def build_router(args, hidden_size, depth):
    """The DTR / R-TR router named by args["method"], for `depth` blocks, or None."""
    parts = method_parts(args["method"])
    if "dtr" not in parts and "rtr" not in parts:
        return None
    from dtr import TaskRouter
    kind = "dtr" if "dtr" in parts else "random"
    if kind == "random" and not args.get("rtr_per_block"):  # set by train.py since R-TR draws a table per block
        raise ValueError("this R-TR checkpoint was trained with one random mask table shared by every block, which "
                         "this version no longer builds (each block draws its own, as in the official code); sample "
                         "or resume it with the code of commit 3b13113, or train R-TR again")
    seed = {"seed": args["rtr_seed"]} if kind == "random" else {}  # a DTR checkpoint may predate --rtr-seed
    return TaskRouter(hidden_size, num_timesteps=args["num_timesteps"], alpha=args["dtr_alpha"], beta=args["dtr_beta"],
                      kind=kind, num_blocks=depth, **seed)


def build_model(args):
    """The DiT described by a training-argument dict (train.py's vars(args)). Its input is the image,
    or for a latent run (args["latent"]) the latent: 32x32 for 256 px images and the SD VAE."""
    if args["model"] not in DiT_models:
        raise ValueError(f"unknown model {args['model']!r}; choose one of {', '.join(DiT_models)}")
    input_size = args["latent"]["size"] if args.get("latent") else args["image_size"]
    kwargs = dict(input_size=input_size, in_channels=args["in_channels"], num_classes=args["num_classes"],
                  class_dropout_prob=args["class_dropout_prob"], learn_sigma=args["learn_sigma"])
    for key in ("depth", "hidden_size", "num_heads"):  # optional overrides of the named config (small test models)
        if args.get(key):
            kwargs[key] = args[key]
    config = DiT_models[args["model"]]
    router = build_router(args, kwargs.get("hidden_size", config.hidden_size), kwargs.get("depth", config.depth))
    return config(**kwargs, router=router)  # DiT checks the router


def build_diffusion(args):
    """The training diffusion described by a training-argument dict."""
    return gd.Diffusion(args["num_timesteps"], args["schedule"], learn_sigma=args["learn_sigma"], weighting=args["weighting"],
                        min_snr_gamma=args["min_snr_gamma"], p2_gamma=args["p2_gamma"], p2_k=args["p2_k"])


def load_checkpoint(path):
    """torch.load of a train.py checkpoint onto the CPU with weights_only=True: tensors and plain Python values only,
    which is all train.py writes, so that a checkpoint from elsewhere cannot run code as it loads. A file that holds
    other objects is a pickle.UnpicklingError that names the first (torch's own message is a page long)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        what = f"{found.group(1)}, an object" if found else "objects"
        raise pickle.UnpicklingError(f"it holds {what} other than the tensors and plain values that train.py writes, "
                                     f"and loading it could run code") from None


def load_model(ckpt_path, device="cpu", use_ema=True):
    """(model in eval mode, diffusion, args) from a train.py checkpoint: its EMA weights, or its raw ones with
    use_ema=False. Weights that hold NaN or inf (a run that diverged) are a ValueError."""
    if os.path.isdir(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path} is a folder; pass a checkpoint file, e.g. RUN/checkpoints/0400000.pt")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a torch file
        raise ValueError(f"{ckpt_path} cannot be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                         f"pass a complete train.py checkpoint") from None
    if not isinstance(ckpt, dict) or "args" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a train.py checkpoint (no saved arguments)")
    args, weights = ckpt["args"], "ema" if use_ema else "model"
    if weights not in ckpt:
        raise ValueError(f"{ckpt_path} holds no {weights!r} weights (it has {sorted(ckpt)}); pass a complete train.py checkpoint")
    try:
        model, diffusion = build_model(args), build_diffusion(args)
    except KeyError as e:  # a setting added after this checkpoint was written
        raise ValueError(f"{ckpt_path} predates the {e.args[0]} setting, which this version of the code needs to rebuild "
                         f"the model; sample it with the code that trained it") from None
    try:
        model.load_state_dict(ckpt[weights], strict=True)
    except RuntimeError as e:  # missing, extra or reshaped tensors: torch's message lists every one, a line a kind
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ValueError(f"{ckpt_path}: its {weights!r} weights do not fit the model its arguments describe "
                         f"({first[0].strip()[:300]}); pass a complete train.py checkpoint") from None
    bad = [k for k, v in ckpt[weights].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # NaN weights sample NaN images, which to_uint8 would save as black ones and FID would score
        raise ValueError(f"{ckpt_path}: {len(bad)} of the {weights!r} tensors hold NaN or inf (first: {bad[0]}); the run "
                         f"diverged before this checkpoint: pass an earlier one")
    return model.to(device).eval(), diffusion, args


# ----------------------------------------------------------------------------------------------
#                                   Sampling
# ----------------------------------------------------------------------------------------------

def resolve_device(name=None):
    """torch.device for a --device flag: None picks this process's GPU (cuda:LOCAL_RANK under torchrun)
    or the CPU; a bare "cuda" also gets the LOCAL_RANK index, which torch.cuda.set_device needs. A CUDA
    device this process cannot see is a ValueError that says so."""
    if name is None and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        device = torch.device(name or "cuda")
    except RuntimeError:  # torch's message lists 20 device types
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # e.g. mps: untested here, and bench.py's timings would not wait for it
        raise ValueError(f"--device {name}: this code runs on cpu or cuda (cuda:N), not on {device.type}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda" and device.index >= torch.cuda.device_count():  # 0 without a GPU or a CUDA build of torch
        asked = f"--device {name}" if name else f"LOCAL_RANK {device.index}"  # no flag given: torchrun's process index
        raise ValueError(f"{asked}: this process sees {torch.cuda.device_count()} CUDA GPU(s), so there is no {device}; "
                         f"use --device cpu without a GPU, and under torchrun at most one process per GPU")
    return device


def bf16_warning(device, precision):
    """A warning for --precision bf16 on a GPU older than Ampere (compute capability below 8.0, e.g. V100 and T4),
    else None: those GPUs have no bf16 arithmetic, so bf16 autocast runs there by emulation and can be slower than
    fp32, which is what the flag is for."""
    if device.type != "cuda" or precision != "bf16":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"warning: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 arithmetic "
            f"(Ampere, 8.0, brought it): bf16 autocast is emulated there and can run slower than fp32; pass --precision fp32")


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")  # torch.compile's modes
CUDA_GRAPH_MODES = ("max-autotune", "reduce-overhead")  # the modes that add CUDA graphs


def compile_for_sampling(model, mode="default"):
    """Compile the network in place (nn.Module.compile) for the samplers, with static shapes; returns it.

    In place, not torch.compile(model)'s wrapper: guidance calls model.forward_with_cfg, which the
    wrapper would leave uncompiled, and the state dict keeps its keys. Static shapes: a sampling
    call site uses one batch size (sample_indices pads its last batch), so it compiles once, on its
    first batch, and reuses that graph for every later batch and evaluation (train.py's FID batches:
    one graph; its 16-sample grids run eager). The default (dynamic=None) would
    recompile at the second shape into one graph with a symbolic batch size, which Inductor cannot
    specialise to the batch. Only the network is compiled: the sampler's own work per step is a few
    elementwise passes over (N, C, H, W)."""
    model.compile(mode=mode, dynamic=False)
    return model


def to_device(x, device):
    """A CPU tensor x on `device`, without making the host wait for the GPU. A plain host-to-device copy from
    pageable memory first waits for all the work queued on the stream (PyTorch's copy_ calls cudaStreamSynchronize
    unless non_blocking), a stall per call in a training or sampling loop; a non-blocking copy from pinned memory
    is queued like a kernel. The pinned buffer may be dropped at once: the caching host allocator keeps it until
    the copy has run."""
    device = torch.device(device)
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


@torch.no_grad()
def generate(model, diffusion, labels, noise, steps="250", cfg_scale=1.0, clip_denoised=True, guided_channels=None,
             progress=False, noise_fn=None, precision="bf16"):
    """Samples (N, C, H, W) for the given labels (N,) and starting noise (N, C, H, W): images in
    [-1, 1], or a latent model's latents (clip_denoised=False). guided_channels: guide only the
    first N epsilon channels (3: the official DiT code), None all. noise_fn draws the DDPM steps'
    noise (diffusion.Diffusion.ddpm_sample; default: global RNG).
    On CUDA the network runs under bf16 autocast, or in fp32 (TF32 matmuls, as the official DiT
    sampler) with precision="fp32"; the sampler's own arithmetic is fp32 either way."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    model_fn = gd.guided_model_fn(model, labels, cfg_scale, model.num_classes, guided_channels)
    use_bf16 = noise.device.type == "cuda" and precision == "bf16"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        return diffusion.sample(model_fn, noise, steps=steps, clip_denoised=clip_denoised, progress=progress,
                                noise_fn=noise_fn)


SEED_STRIDE = 1_000_003  # sample i of seed s draws from the generator seeded s * SEED_STRIDE + i


def check_seed(seed, num_samples):
    """Refuse a seed whose per-sample generator seeds s * SEED_STRIDE + i would pass 2^32: torch's
    CPU generator keeps only the low 32 bits of its seed, so they would wrap onto another seed's
    samples (seed 4295's sample 0 would be seed 0's sample 45589). Seeds 0..4293 are safe for up
    to a million samples; beyond SEED_STRIDE samples, seed s overlaps seed s + 1."""
    if not (seed >= 0 and seed * SEED_STRIDE + num_samples <= 2**32):
        raise ValueError(f"seed {seed} with {num_samples} samples: the per-sample generators are seeded "
                         f"seed * {SEED_STRIDE} + i, which must stay below 2^32; use a seed in 0..{max_seed(num_samples)}")


def max_seed(num_samples):
    """The largest seed check_seed accepts for num_samples samples (negative when none is)."""
    return (2**32 - num_samples) // SEED_STRIDE


def sample_batches(model, diffusion, indices, device, seed=0, batch_size=64, steps="250", cfg_scale=1.0,
                   clip_denoised=True, guided_channels=None, class_labels=None, progress=False, decode=None,
                   precision="bf16"):
    """Samples number `indices` of a global numbering, batch by batch: yields (idx, uint8 (n, H, W, 3), labels (n,))
    on the CPU, idx the batch's list of indices.

    Sample i draws its starting noise, its (uniform random, or class_labels[i % len]) label and
    then the DDPM steps' noise from a generator seeded with (seed, i), so the result does not
    depend on how indices are split across ranks or batches, and the global RNG is not touched.
    Every batch has min(batch_size, len(indices)) rows, so that a compiled network sees one shape
    (compile_for_sampling): the last is padded with rows of zero noise and label 0, dropped at the
    end. The DiT treats rows independently (no batch statistics), so the padding changes no real
    sample. For a latent model, `decode` (a latents.Decoder) turns the samples into images;
    `precision` as in generate. See check_seed for the seeds allowed."""
    if len(indices) == 0:
        return
    check_seed(seed, max(indices) + 1)
    batch_size = min(batch_size, len(indices))
    shape = (model.in_channels, model.input_size, model.input_size)
    for start in range(0, len(indices), batch_size):
        idx = indices[start: start + batch_size]
        pad = batch_size - len(idx)  # padding rows (the last batch only)
        gens = [torch.Generator().manual_seed(seed * SEED_STRIDE + i) for i in idx]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens] + [torch.zeros(shape)] * pad)  # (B, C, H, W)
        if class_labels:
            y = torch.tensor([class_labels[i % len(class_labels)] for i in idx])
        else:
            y = torch.cat([torch.randint(model.num_classes, (1,), generator=g) for g in gens])

        def step_noise(x, gens=gens, pad=pad):  # (B, C, H, W), row j from sample idx[j]'s own generator, then zeros
            z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens] + [torch.zeros(x.shape[1:])] * pad)
            return to_device(z, x.device)  # no host sync per step

        x = generate(model, diffusion, torch.cat([y, y.new_zeros(pad)]).to(device), noise.to(device), steps, cfg_scale,
                     clip_denoised=clip_denoised, guided_channels=guided_channels, progress=progress,
                     noise_fn=step_noise, precision=precision)[: len(idx)]  # (n, C, H, W)
        yield idx, to_uint8(x if decode is None else decode(x)), y  # (n, H, W, 3), (n,)


def sample_indices(model, diffusion, indices, device, decode=None, **kwargs):
    """sample_batches' samples in one pair (uint8 (n, H, W, 3), labels (n,)) on the CPU, in the order of `indices`;
    kwargs as sample_batches. With no indices (a rank with nothing to make), empty arrays of the image size."""
    if len(indices) == 0:
        side = model.input_size * (1 if decode is None else decode.factor)
        return torch.zeros(0, side, side, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    # Filled batch by batch: a list of batches and then their concatenation would hold every image twice
    # (19.7 GB of host RAM for 50K samples of 256 px in one process).
    images, labels, start = None, torch.empty(len(indices), dtype=torch.long), 0  # images: (n, H, W, 3), made at the first batch
    for idx, x, y in sample_batches(model, diffusion, indices, device, decode=decode, **kwargs):
        if images is None:
            images = torch.empty((len(indices), *x.shape[1:]), dtype=torch.uint8)
        images[start: start + len(idx)] = x
        labels[start: start + len(idx)] = y
        start += len(idx)
    return images, labels


def to_uint8(x):
    """[-1, 1] float (N, 3, H, W) -> uint8 (N, H, W, 3) on the CPU."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images, path, nrow=None):
    """Save uint8 (N, H, W, 3) images as one PNG grid with 2-pixel gaps. Atomically: a resumed train.py takes a grid
    file that exists for one made, so a write cut short (a kill, a full disk) must leave none."""
    from PIL import Image
    images = np.asarray(images)
    n, h, w, _ = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    latents.atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def hash_state_dict(digest, state_dict):
    """Feed a state dict into a hashlib digest (each entry's name, dtype, shape and bytes); returns the digest."""
    for name, tensor in state_dict.items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest


def weights_digest(model):
    """The first 16 hex digits of a SHA-256 over a network's state dict (names, dtypes, shapes and bytes)."""
    return hash_state_dict(hashlib.sha256(), model.state_dict()).hexdigest()[:16]


def sampling_settings(args, class_labels, weights):
    """What sample i depends on, besides i: the sampled network's weights (weights_digest: a copy of the checkpoint
    elsewhere is the same, another step's is not) and the sampling flags, with --class-labels parsed. Not
    --num-samples, --batch-size or the number of ranks, which only choose which samples are made, and where."""
    return {"weights": weights, "use_model": args.use_model, "steps": args.steps, "cfg_scale": args.cfg_scale,
            "guided_channels": args.guided_channels, "class_labels": class_labels, "seed": args.seed,
            "precision": args.precision, "vae": args.vae}


def check_parts(parts, settings):
    """The indices already sampled into the folder `parts` (OUT/parts: one PART.npz of idx, images, labels per
    batch, and settings.json), as a set; ValueError when they were sampled with other settings or cannot be told."""
    saved_path = os.path.join(parts, "settings.json")
    paths = glob.glob(os.path.join(parts, "*.npz"))
    if not os.path.isfile(saved_path):  # written before any part: batches without it were not made by this script's run
        if paths:
            raise ValueError(f"{parts} holds sampled batches but no settings.json, so how they were sampled is unknown "
                             f"and they cannot be resumed; pass another --out, or delete {parts}")
        return set()
    with open(saved_path) as f:
        saved = json.load(f)
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if changed and paths:  # without batches (a run stopped before its first) there is nothing to keep
        raise ValueError(f"{parts} holds the samples of an unfinished run with other settings ({'; '.join(changed)}); "
                         f"rerun with its flags and checkpoint to finish it, or pass another --out, or delete {parts}")
    done = set()
    for path in paths:
        done.update(read_part(path, "idx")[0].tolist())  # the idx member only
    return done


def read_part(path, *keys):
    """The arrays `keys` of one part (idx, images, labels) as a tuple; ValueError naming the part when they cannot
    be read (damaged: the rerun then makes its batch again once it is deleted)."""
    try:
        with np.load(path) as part:
            return tuple(part[k] for k in keys)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it, and the rerun samples its "
                         f"batch again") from None


def merge_parts(parts, num_samples):
    """(images (N, H, W, 3) uint8, labels (N,)) in global sample order from the batches in `parts` (check_parts),
    placed one part at a time: host memory holds the result and one batch. Parts of samples N and above (an
    unfinished run that asked for more) are left out."""
    images = labels = None
    seen = np.zeros(num_samples, dtype=bool)
    for path in sorted(glob.glob(os.path.join(parts, "*.npz"))):
        # check_parts read only idx: damaged images or labels show only here, after the sampling
        idx, batch, batch_labels = read_part(path, "idx", "images", "labels")  # (n,), (n, H, W, 3), (n,)
        if images is None:
            images = np.empty((num_samples, *batch.shape[1:]), dtype=np.uint8)
            labels = np.empty(num_samples, dtype=batch_labels.dtype)
        keep = idx < num_samples
        images[idx[keep]], labels[idx[keep]], seen[idx[keep]] = batch[keep], batch_labels[keep], True
    if not seen.all():  # a part deleted while the run went on
        missing = np.flatnonzero(~seen)
        raise ValueError(f"{parts} lacks {len(missing)} samples (the first: {missing[:5].tolist()}); rerun the same "
                         f"command to make them")
    return images, labels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--num-samples", type=int, default=64, help="total over all ranks (50000 for FID-50K)")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--steps", default="250", help="'250' (DDPM, respaced as in DiT) or 'ddim50'")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance; the papers use 1.5")
    p.add_argument("--guided-channels", type=int, default=None,
                   help="guide only the first N channels (3 reproduces the official DiT code); default all")
    p.add_argument("--class-labels", default=None, help="comma-separated labels cycled over the samples; default uniform random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-model", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--save-png", action="store_true", help="also write every sample as a PNG, in OUT/png (which must be empty)")
    p.add_argument("--fid-ref", default=None, help="score the samples against this reference (folder, zip, npz or stats)")
    p.add_argument("--inception", default=None, help="path to pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--vae", default=None, help="latent models: the VAE to decode with (default: the one saved in the checkpoint)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="CUDA: bf16 autocast (fast, as train.py), or fp32 with TF32 matmuls as the official DiT sampler")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (compile_for_sampling): one compile before the first batch, then faster steps")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode with --compile (as train.py)")
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            sys.exit(f"error: {flag} {value}: must be a positive number")
    if args.num_samples > 2**32:  # no --seed fits (check_seed)
        sys.exit(f"error: --num-samples {args.num_samples}: at most 2^32, as sample i draws from a generator seeded "
                 f"seed * {SEED_STRIDE} + i, which must stay below 2^32")
    if args.compile_mode != "default" and not args.compile:
        sys.exit(f"error: --compile-mode {args.compile_mode} has no effect without --compile; add --compile")
    if args.inception is not None and args.fid_ref is None:  # as train.py's --inception without --fid-every
        sys.exit("error: --inception has no effect without --fid-ref; add --fid-ref (images or statistics) to score the samples")
    if args.fid_ref is not None and args.num_samples < 2:
        sys.exit(f"error: --fid-ref needs at least 2 samples for a covariance, got --num-samples {args.num_samples}")
    if os.path.exists(os.path.join(args.out, "samples.npz")):  # hours of sampling for a 50K FID: never overwritten
        kept = os.path.join(args.out, "parts")
        left = f" ({kept} can go too, unless it was kept for samples beyond that run's --num-samples)" \
            if os.path.isdir(kept) else ""
        sys.exit(f"error: {os.path.join(args.out, 'samples.npz')} holds an earlier run's samples; pass another --out, "
                 f"or delete it to sample again{left}")
    png_dir = os.path.join(args.out, "png")
    if args.save_png and os.path.isdir(png_dir) and os.listdir(png_dir):
        sys.exit(f"error: {png_dir} already holds PNGs of an earlier run, which a run with fewer samples would leave "
                 f"mixed in; pass another --out or delete that folder")
    if args.fid_ref is not None and not os.path.exists(args.fid_ref):
        sys.exit(f"error: --fid-ref {args.fid_ref} does not exist")
    if args.fid_ref is not None:  # a reference of the wrong kind was refused only after the sampling
        import fid
        try:
            fid.check_source(args.fid_ref)
        except ValueError as e:
            sys.exit(f"error: --fid-ref: {e}")
    if not math.isfinite(args.cfg_scale):  # NaN or inf guidance gives NaN samples, saved as blank images
        sys.exit(f"error: --cfg-scale {args.cfg_scale}: must be a finite guidance scale (1 = no guidance; the papers use 1.5)")
    distributed = "RANK" in os.environ
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    warning = bf16_warning(device, args.precision)
    if warning and rank == 0:
        print(warning, file=sys.stderr, flush=True)
    try:
        model, diffusion, targs = load_model(args.ckpt, device, use_ema=not args.use_model)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        diffusion.respace(args.steps)
    except ValueError as e:
        sys.exit(f"error: --steps {args.steps}: {e}")
    if args.cfg_scale != 1.0 and model.y_embedder.dropout_prob == 0:
        sys.exit("error: this model was trained without label dropout, so it has no null class for guidance; use --cfg-scale 1")
    try:
        check_seed(args.seed, args.num_samples)
    except ValueError as e:
        sys.exit(f"error: --seed: {e}")
    if args.guided_channels is not None and not 1 <= args.guided_channels <= model.in_channels:
        sys.exit(f"error: --guided-channels {args.guided_channels}: this model has {model.in_channels} epsilon channels; "
                 f"pass 1..{model.in_channels} (3 is the official DiT's choice for latents)")
    try:
        choices = None if args.class_labels is None else [int(c) for c in args.class_labels.split(",")]
    except ValueError:
        sys.exit(f"error: --class-labels {args.class_labels!r}: give comma-separated integers, e.g. 0,1,2")
    if choices is not None and not all(0 <= c < model.num_classes for c in choices):
        sys.exit(f"error: --class-labels {args.class_labels}: this model has classes 0..{model.num_classes - 1}")

    decode = None
    if targs.get("latent"):  # a latent DiT: samples go through the VAE decoder to images
        try:
            decode = latents.load_decoder(targs["latent"], device, args.vae)
        except latents.LatentError as e:
            sys.exit(f"error: {e}")
    elif args.vae:
        sys.exit(f"error: --vae is for models trained on VAE latents; {args.ckpt} was trained on pixels, so drop --vae")

    net = None
    if args.fid_ref and rank == 0:  # the Inception weights load before hours of sampling, not after
        import fid
        try:
            net = fid.load_inception(args.inception, device)
        except (OSError, ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")

    try:  # now, not after hours of sampling
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot create the output folder --out {args.out}: {e}")
    if args.compile:
        compile_for_sampling(model, args.compile_mode)
    # Each batch is saved as it is made (OUT/parts), so a run stopped by a job's time limit or a crash resumes where it
    # was: sample i depends only on i and the settings, so the same command, on any number of ranks, makes the rest.
    parts = os.path.join(args.out, "parts")
    settings = sampling_settings(args, choices, weights_digest(model))
    try:
        done = check_parts(parts, settings)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if rank == 0:
        try:
            os.makedirs(parts, exist_ok=True)
            latents.atomic_write(os.path.join(parts, "settings.json"), lambda f: json.dump(settings, f, indent=1), mode="w")
        except OSError as e:
            sys.exit(f"error: cannot write the sampling settings into {parts} ({e}); free space there or pass another --out")
        if done:
            print(f"resuming: {len(done & set(range(args.num_samples)))} of {args.num_samples} samples are in {parts}")
    if distributed:
        dist.barrier()  # settings.json is written before any part
    mine = [i for i in range(rank, args.num_samples, world) if i not in done]  # global sample i is made by rank i % W
    batches = sample_batches(model, diffusion, mine, device, args.seed, args.batch_size, args.steps, args.cfg_scale,
                             clip_denoised=targs.get("latent") is None, guided_channels=args.guided_channels,
                             class_labels=choices, progress=rank == 0, decode=decode, precision=args.precision)
    for idx, images, labels in batches:  # a part is named by its first sample, which no other part of any run holds
        part = dict(idx=np.array(idx, dtype=np.int64), images=images.numpy(), labels=labels.numpy())
        latents.atomic_write(os.path.join(parts, f"{idx[0]:010d}.npz"), lambda f: np.savez(f, **part))
    if distributed:
        dist.barrier()
    if rank == 0:
        try:
            all_images, all_labels = merge_parts(parts, args.num_samples)
        except ValueError as e:
            sys.exit(f"error: {e}")
        # Atomically: a write cut short (disk full, a job's time limit) leaves no half samples.npz for the check
        # above to take for an earlier run's samples, refusing the rerun; the parts go once it is there.
        latents.atomic_write(os.path.join(args.out, "samples.npz"), lambda f: np.savez(f, arr_0=all_images, arr_1=all_labels))
        beyond = sum(i >= args.num_samples for i in done)  # made by an earlier run that asked for more: not lost
        if beyond:
            print(f"kept {parts}: it also holds samples numbered {args.num_samples} and above ({beyond}), made by an "
                  f"earlier run that asked for more; to finish that run, move {os.path.join(args.out, 'samples.npz')} "
                  f"away and rerun its command, or else delete {parts}", flush=True)
        else:
            try:
                shutil.rmtree(parts)
            except OSError as e:  # e.g. a file held open on NFS: the samples are complete, so go on
                print(f"warning: cannot remove {parts} ({e}); its batches are all in samples.npz, so delete it by hand",
                      file=sys.stderr, flush=True)
        save_grid(all_images[:64], os.path.join(args.out, "grid.png"))
        if args.save_png:  # in their own folder, so that scoring it (fid.py OUT/png REF) does not count grid.png
            from PIL import Image
            os.makedirs(png_dir, exist_ok=True)
            for i, img in enumerate(all_images):
                Image.fromarray(img).save(os.path.join(png_dir, f"{i:06d}.png"))
        print(f"wrote {len(all_images)} samples to {os.path.join(args.out, 'samples.npz')}")
        if args.fid_ref:
            try:
                scores = fid.evaluate(all_images, args.fid_ref, net, metrics=("fid",))
            except (ValueError, OSError) as e:
                sys.exit(f"error: FID against {args.fid_ref}: {e} (the samples are saved)")
            print(f"FID against {args.fid_ref}: {scores['fid']:.4f} ({scores['n_samples']} samples)")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
