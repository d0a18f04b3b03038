"""
Train a DiT, plain or with the papers' multi-task methods, on one CPU, one GPU or many.

    python train.py                                               # built-in shapes, one process
    torchrun --nproc_per_node=8 train.py --model DiT-B/2 --data imagenet.zip --method dtr+ant-uw
    torchrun --nproc_per_node=8 train.py --model DiT-L/2 --data latents/in256 --image-size 256   # VAE latents (latents.py)

`--method` joins parts with '+':
    vanilla                         the DiT recipe
    dtr | rtr                       Denoising Task Routing (dtr.py) / its random-mask baseline
    ant-uw | ant-pcgrad | ant-nash  ANT clustering + a multi-task optimiser (negative_transfer.py)
    curriculum                      easy-to-hard timestep curriculum (curriculum.py)

A method touches training at four points: how timesteps are drawn, what the model does with t (a
router in the DiT, built by sample.build_model), how per-sample losses become gradients, and a
per-step hook whose state is saved in checkpoints; all but the router live in `Method` below.
Everything else is the DiT recipe: AdamW (lr 1e-4, no weight decay), EMA 0.9999 every step; plus
bf16 autocast on CUDA, which DiT does not use (--precision fp32 for DiT's).

One read of three numbers per step (lagging one step behind so the GPU stays fed, except under the
curriculum, whose pacing needs this step's loss) tells every rank whether the loss was finite,
whether a rank was asked to stop (SIGTERM/SIGINT) and the all-rank mean loss that the curriculum
paces on. A non-finite step never updates the weights: fused AdamW skips it on the device
(`found_inf`), and the run then stops, or skips up to --skip-nonfinite such steps.
"""

import argparse
import copy
import datetime
import functools
import glob
import hashlib
import io
import json
import multiprocessing
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext, suppress
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as datasets
import fid
import latents
from diffusion import WEIGHTINGS
from dit import DiT_models
from sample import (COMPILE_MODES, CUDA_GRAPH_MODES, SEED_STRIDE, bf16_warning, build_diffusion, build_model,
                    check_seed, compile_for_sampling, generate, hash_state_dict, load_checkpoint, max_seed,
                    method_parts, resolve_device, sample_indices, save_grid, to_device, to_uint8)

METHOD_PARTS = ("vanilla", "dtr", "rtr", "ant-uw", "ant-pcgrad", "ant-nash", "curriculum")
ANT_PARTS = ("ant-uw", "ant-pcgrad", "ant-nash")
# Settings that must match between a checkpoint and the flags of a resumed run.
MODEL_SETTINGS = ("model", "depth", "hidden_size", "num_heads", "image_size", "in_channels", "num_classes",
                  "learn_sigma", "class_dropout_prob", "method", "num_timesteps", "schedule", "dtr_alpha", "dtr_beta",
                  "rtr_seed", "rtr_per_block", "ant_clusters", "ant_objective", "curriculum_clusters", "curriculum_order",
                  "curriculum_pacing", "curriculum_smoothing")  # smoothing: the saved loss EMA is only valid under its decay


class ConfigError(ValueError):
    """Bad flags or files: the message says what to change."""


def parse_method(spec):
    """Validate a '+'-joined method and return its canonical spelling."""
    parts = spec.split("+")
    unknown = [p for p in parts if p not in METHOD_PARTS]
    if unknown:
        raise ConfigError(f"unknown method part {unknown[0]!r}; parts are {', '.join(METHOD_PARTS)}, joined with '+'")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"method {spec!r} repeats a part")
    if "vanilla" in parts and len(parts) > 1:
        raise ConfigError("'vanilla' cannot be combined; drop it (e.g. --method dtr+ant-uw)")
    if "dtr" in parts and "rtr" in parts:
        raise ConfigError("dtr and rtr are two mask choices for the same router; pick one")
    ant = [p for p in parts if p in ANT_PARTS]
    if len(ant) > 1:
        raise ConfigError(f"{' and '.join(ant)} are alternative multi-task optimisers; pick one")
    if "curriculum" in parts and ant and ant[0] != "ant-uw":
        raise ConfigError(f"curriculum combines with ant-uw only: {ant[0]} needs every cluster in every batch, "
                          "which the curriculum's early stages do not have")
    return "+".join(p for p in METHOD_PARTS if p in parts)


# ----------------------------------------------------------------------------------------------
#                                   The method seam
# ----------------------------------------------------------------------------------------------

class Method:
    """Where a paper plugs into the loop: `timesteps`, the router (built in sample.build_model),
    `backward` and `after_step`, with `state_dict` saved in checkpoints."""

    def __init__(self, args, diffusion, device, log=print):
        self.log = log
        self.parts = method_parts(args.method)
        self.T, self.device = diffusion.num_timesteps, device
        self.intervals = self.uw = self.nash = self.curriculum = None
        self.ant = next((p for p in self.parts if p in ANT_PARTS), None)
        if self.ant:
            import negative_transfer as nt
            self.nt = nt
            tas = nt.load_tas(args.ant_tas) if args.ant_objective == "gradient" else None
            self.intervals, _ = nt.cluster_timesteps(args.ant_clusters, args.ant_objective,
                                                     alphas_cumprod=diffusion.alphas_cumprod, tas=tas,
                                                     num_timesteps=self.T)
            if self.ant == "ant-uw":
                self.uw = nt.UncertaintyWeighting(args.ant_clusters).to(device)
            elif self.ant == "ant-nash":
                self.nash = nt.NashMTL(args.ant_clusters, every=args.nash_every, max_norm=args.nash_max_norm)
                if args.max_grad_norm > 0:
                    log(f"note: ant-nash clips the gradient norm to --nash-max-norm {args.nash_max_norm} (official); "
                        f"--max-grad-norm {args.max_grad_norm} is not used")
            # PCGrad's random order: one generator, seeded alike on every rank.
            self.order_gen = torch.Generator().manual_seed(args.global_seed)
            self.cluster_starts = torch.tensor([a for a, _ in self.intervals], device=device)
        if "curriculum" in self.parts:
            from curriculum import Curriculum
            clusters = self.intervals if args.curriculum_clusters == 0 else None
            self.curriculum = Curriculum(self.T, num_clusters=args.curriculum_clusters or len(clusters),
                                         patience=args.curriculum_patience, pacing=args.curriculum_pacing,
                                         stage_steps=args.curriculum_stage_steps, order=args.curriculum_order,
                                         clusters=clusters, smoothing=args.curriculum_smoothing)

    def timesteps(self, n):
        """(t (n,), cluster (n,) or None): seam 1, how timesteps are drawn."""
        if self.curriculum is not None and self.ant is not None and not self.curriculum.finished:
            # During the curriculum it decides t (uniform on its active range); ANT only labels each t with
            # its cluster. Clusters outside the range get no samples, so their s_k get no gradient: one that has
            # not entered yet stays at 0; one that the range barely reaches, drawn in some batches only, is moved
            # by AdamW's momentum in the others, as Adam moves any parameter. Once the last stage starts,
            # training is plain ANT-UW again: stratified sampling below.
            t = self.curriculum.sample_timesteps(n, device=self.device)
            return t, torch.bucketize(t, self.cluster_starts, right=True) - 1
        if self.curriculum is not None and self.ant is None:
            return self.curriculum.sample_timesteps(n, device=self.device), None
        if self.ant is not None:
            return self.nt.stratified_timesteps(n, self.intervals, device=self.device)
        return torch.randint(0, self.T, (n,), device=self.device), None

    def backward(self, loss_vec, cluster, step):
        """Seam 3: per-sample losses (B,) -> gradients in .grad for the (0-based) step about to be
        taken, through one backward. Returns the scalar objective (detached) and a dict of per-step
        tensors to log. Steps that need per-cluster gradients go to cluster_backward instead."""
        if self.uses_own_gradients(step):
            raise ValueError(f"step {step} of {self.ant} needs per-cluster gradients: call cluster_backward")
        if self.ant is None:
            loss = loss_vec.mean()
            loss.backward()
            return loss.detach(), {}
        K = len(self.intervals)
        if self.nash is not None:
            self.nash.step()  # its saved counter follows the run; the decisions below use `step` itself
        counts = None  # stratified sampling gives every rank the same counts: per-rank means average to the all-rank one
        if self.curriculum is not None and not self.curriculum.finished:
            # The curriculum's uniform t gives each rank its own counts, and a rank may draw none of a cluster that
            # another drew. L_k divides by the all-rank mean count, so that DDP's average of the ranks' gradients (and
            # UW's of its s_k) is that of one big batch. A no-op on one process.
            counts = self.nt.all_reduce_mean(self.nt.cluster_counts(cluster, K))  # (K,)
        L = self.nt.cluster_losses(loss_vec, cluster, K, counts)  # (K,)
        if self.uw is not None:
            # (K,) all True unless a curriculum hides clusters (on every rank)
            present = counts > 0 if counts is not None else torch.ones(K, dtype=torch.bool, device=cluster.device)
            loss = self.uw(L, present)
            loss.backward()
            return loss.detach(), {"L": L.detach(), "w": self.uw.weights().detach(), "present": present.float()}
        loss = self.nash.loss(L)  # Nash-MTL between its updates: the kept alpha
        loss.backward()
        return loss.detach(), {"L": L.detach(), "w": self.nash.alpha_tensor(L)}

    def cluster_backward(self, losses, batch_size, params, step):
        """Seam 3 for PCGrad, and for Nash-MTL on its update steps: exact per-cluster gradients, combined into .grad.
        The batch holds the clusters in consecutive slices (stratified sampling; PCGrad and Nash never run under the
        curriculum), and losses(rows) gives the training_losses terms of the samples in slice `rows`, through the
        model: each cluster's gradient comes from one forward and backward of its slice (nt.sliced_task_gradients),
        about the cost of one step in all. Returns (the batch's terms, detached; the objective; the tensors to log)."""
        K = len(self.intervals)
        if self.nash is not None:
            self.nash.step()
        parts, L = [], []  # each cluster's terms and L_k, detached

        def cluster_loss(k, rows):
            terms = losses(rows)
            parts.append({key: v.detach() for key, v in terms.items()})
            L_k = terms["loss"].mean()  # training_losses gives float32 (float64 for a float64 batch)
            L.append(L_k.detach())
            # The official code differentiates L_k / K for PCGrad, but L_k for Nash-MTL, whose alpha takes
            # its scale from the gradients' (alpha_k (G G^T alpha)_k = 1).
            return L_k if self.nash is not None else L_k / K

        G = self.nt.sliced_task_gradients(cluster_loss, self.nt.stratified_counts(batch_size, K), params)  # (K, P)
        G = self.nt.all_reduce_mean(G)  # every rank decides alike from the all-rank gradients
        terms = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}  # (B,) each, in batch order
        L = torch.stack(L)  # (K,)
        if self.nash is not None:
            info = self.nash.update(G)
            if dist.is_initialized():  # rank 0's alpha and counters: a solver on another CPU may round differently
                state = [self.nash.state_dict()]
                dist.broadcast_object_list(state, src=0)
                self.nash.load_state_dict(state[0])
            # step + 1: the log, metrics and checkpoints number a step by the count of steps done once it is taken
            if not info["success"]:
                self.log(f"step {step + 1}: Nash-MTL solver failed ({info['message']}); keeping alpha = {self.nash.alpha.round(4).tolist()}")
            elif info["newton"]:
                self.log(f"step {step + 1}: Nash-MTL {info['message']}")
            flat = self.nt.weighted_sum(G, self.nash.alpha_tensor(L) / K)  # (P,) = grad of sum_k alpha_k L_k / K
        else:
            flat = self.nt.pcgrad(G, self.order_gen)  # (P,)
        del G  # K x 4P bytes (13.5 GB for DiT-XL/2, K = 5), not needed while .grad is written and AdamW steps
        self.nt.write_flat_grad(params, flat)
        if self.nash is None:
            return terms, L.mean(), {"L": L}
        return terms, self.nash.loss(L), {"L": L, "w": self.nash.alpha_tensor(L)}

    def uses_own_gradients(self, step):
        """PCGrad and Nash update steps compute per-cluster gradients (cluster_backward), outside DDP's reducer."""
        return self.ant == "ant-pcgrad" or (self.nash is not None and self.nash.should_update(step))

    def after_step(self, step, mean_loss):
        """Seam 4, once per finite step (skipped with a non-finite one) on every rank with the all-rank
        mean loss: returns an event or None."""
        if self.curriculum is not None and self.curriculum.update(mean_loss):
            lo, hi = self.curriculum.active_range
            return {"event": "curriculum_stage", "step": step, "stage": self.curriculum.stage, "t_min": lo, "t_max": hi}
        return None

    def log_fields(self):
        """The curriculum's stage and t range for the log record ({} without a curriculum)."""
        return {} if self.curriculum is None else self.curriculum.log_dict()

    def state_dict(self):
        """The method's state for a checkpoint: ANT's clusters and PCGrad generator, UW, Nash-MTL, curriculum."""
        state = {"order_gen": self.order_gen.get_state(), "intervals": [list(iv) for iv in self.intervals]} if self.ant else {}
        if self.uw is not None:
            state["uw"] = self.uw.state_dict()
        if self.nash is not None:
            state["nash"] = self.nash.state_dict()
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum.state_dict()
        return state

    def load_state_dict(self, state):
        """Restore state_dict's output; a ConfigError if the checkpoint's ANT clusters differ from these flags'."""
        if self.ant:
            saved = state.get("intervals")  # None in checkpoints written before the intervals were saved
            if saved is not None and [tuple(iv) for iv in saved] != [tuple(iv) for iv in self.intervals]:
                raise ConfigError(f"the checkpoint trained with ANT clusters {[tuple(iv) for iv in saved]}, but these flags "
                                  f"give {self.intervals} (a different --ant-tas?); its UW/Nash state belongs to the old "
                                  f"clusters: pass the same --ant-tas, or start a new --out folder")
            self.order_gen.set_state(state["order_gen"])
        if self.uw is not None:
            self.uw.load_state_dict(state["uw"])
        if self.nash is not None:
            self.nash.load_state_dict(state["nash"])
        if self.curriculum is not None:
            self.curriculum.load_state_dict(state["curriculum"])


# ----------------------------------------------------------------------------------------------
#                                   Data order
# ----------------------------------------------------------------------------------------------

class StreamSampler:
    """Batches of dataset indices for this rank, as a pure function of the step.

    The index stream is the concatenation of seeded permutations (one per epoch); global batch s
    is stream[s*G : (s+1)*G] and rank r takes its r-th slice of B = G/W. So resuming at step s
    needs no state, every image is seen once per epoch whatever W is, and a dataset smaller than
    the global batch still works. This is DistributedSampler with set_epoch, made resumable."""

    def __init__(self, n, batch_size, rank, world, seed, start_step=0):
        self.n, self.B, self.rank, self.world, self.seed, self.step = n, batch_size, rank, world, seed, start_step
        self._epoch, self._perm = None, None

    def _permutation(self, epoch):
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self._perm

    def __iter__(self):
        while True:
            start = (self.step * self.world + self.rank) * self.B
            idx = [int(self._permutation(i // self.n)[i % self.n]) for i in range(start, start + self.B)]
            self.step += 1
            yield idx


def leave_stop_signals_to_the_trainer(worker_id, trainer):
    """worker_init_fn of the training DataLoader. A job-wide stop reaches every process: Slurm sends SIGTERM to all
    processes of a job at its time limit, Ctrl-C sends SIGINT to the terminal's process group. A worker it killed made
    the next step fail ("DataLoader worker is killed by signal") with no checkpoint written; train() finishes the step,
    writes one and shuts its workers down itself. A SIGTERM from the training process `trainer` (its shutdown of a
    stuck worker, and multiprocessing's at exit) still ends the worker, as in torch's own handler; not the worker's
    parent, which is a forkserver under that start method (Python 3.14's default).
    A signal blocked in one thread still reaches any other thread that leaves it unblocked, so no thread may leave
    SIGTERM unblocked: the waiter below inherits the block and takes it with sigwaitinfo. batches() starts its workers
    with SIGTERM already blocked (start_workers), so every thread they make inherits the block under each start method:
    under spawn and forkserver the worker imports numpy and torch, whose thread pools are running before this function
    is called."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only a stop sends it: the trainer ends its workers with SIGTERM
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: a SIGTERM's sender cannot be told, so it still ends the worker
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # already so in a worker that start_workers started

    def wait():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
            pass
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


def worker_context():
    """The start method of the workers that batches() starts (training, and --data-on-device's decode): the default
    one (fork on Linux before Python 3.14), but spawn in place of forkserver (the default since). The forkserver is one
    process for every DataLoader, started by the first: the FID reference's may have started it without the mask of
    start_workers, and its workers inherit it."""
    method = multiprocessing.get_start_method()
    return multiprocessing.get_context("spawn" if method == "forkserver" else method)


def start_workers(loader):
    """iter(loader), with SIGTERM and SIGINT blocked in this thread while the workers start. A worker keeps the signal
    mask of the thread that started it, through fork and through spawn's exec, and so do the threads it makes: the
    job-wide stop of leave_stop_signals_to_the_trainer cannot end a worker through any of its threads. The mask is
    restored before returning; a stop signal that came meanwhile is then handled here as usual."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: no waiter in the workers would ever take a blocked SIGTERM
        return iter(loader)
    if loader.num_workers > 0 and loader.multiprocessing_context.get_start_method() != "fork":
        # spawn's first process starts multiprocessing's resource tracker, whose launch unblocks both signals here
        multiprocessing.resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def batches(dataset, sampler, args, device):
    """Infinite iterator of (uint8 images (B, 3, H, W) or float16 latents, labels (B,)) on the device."""
    workers = dict(worker_init_fn=functools.partial(leave_stop_signals_to_the_trainer, trainer=os.getpid()),
                   multiprocessing_context=worker_context() if args.num_workers > 0 else None)
    if args.data_on_device:  # decoded once, inside the loop's first step: a job-wide stop may reach these workers too
        images, labels = datasets.dataset_to_tensor(dataset, args.num_workers, device, start_workers=start_workers, **workers)
        for idx in sampler:
            idx = to_device(torch.tensor(idx), device)  # (B,) pinned, non-blocking: no sync per step
            yield images[idx], labels[idx]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
                                         generator=torch.Generator(), **workers)  # its own seed draw must not shift the global RNG
    for x, y in start_workers(loader):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
#                                   Checkpoints
# ----------------------------------------------------------------------------------------------

def atomic_save(obj, path):
    """torch.save through latents.atomic_write: a crash mid-write leaves the previous checkpoint untouched and
    never a half-written one under the final name. A write that fails (a full disk) raises its OSError."""
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's writer reports a failed f.write as "enforce fail ... unexpected pos"
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    latents.atomic_write(path, write)


def checkpoint_step(path):
    """The step of a checkpoint train() wrote (checkpoints/<step>.pt), or None for any other file."""
    name = os.path.basename(path)[:-len(".pt")]
    return int(name) if path.endswith(".pt") and name.isascii() and name.isdigit() else None


def checkpoint_paths(run_dir):
    """Checkpoints of a run, newest step first. Other .pt files in the folder are left alone:
    --keep-last never prunes them and --resume auto never picks them."""
    paths = [p for p in glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")) if checkpoint_step(p) is not None]
    return sorted(paths, key=checkpoint_step, reverse=True)


def claim_checkpoint_folder(run_dir, start_step, resume_path, auto, log, master):
    """The checkpoint folder holds one line of history, so that --keep-last and --resume auto can
    go by step. Refuse a start that would overwrite or prune checkpoints of another run or branch
    (a fresh run into a used --out, or an earlier checkpoint resumed into its own folder). With
    --resume auto the later ones are those it skipped as unreadable: rank 0 renames them *.unreadable."""
    if auto and not master:
        return  # rank 0 renames them; looking at them here would race with its renames
    later = [p for p in checkpoint_paths(run_dir) if checkpoint_step(p) >= start_step
             and not (resume_path and os.path.samefile(p, resume_path))]
    if not later:
        return
    folder = os.path.dirname(later[0])
    if auto:
        for path in later:
            target, n = path + ".unreadable", 1
            while os.path.exists(target):  # an earlier renamed copy stays: never overwrite one
                target, n = f"{path}.unreadable{n}", n + 1
            os.replace(path, target)
            log(f"resume: renamed {path}, which cannot be resumed, to {target}")
    elif resume_path is None:
        raise ConfigError(f"{folder} already holds checkpoints (newest {os.path.basename(later[0])}) that a new run would "
                          f"overwrite; continue that run with --resume auto, or pass another --out")
    else:
        raise ConfigError(f"{folder} holds {len(later)} checkpoint(s) of step {start_step} or later "
                          f"({', '.join(os.path.basename(p) for p in later[:3])}{', ...' if len(later) > 3 else ''}) that a run "
                          f"resumed from {resume_path} at step {start_step} would overwrite or prune; to branch from it, pass "
                          f"another --out; to continue the newest, use --resume auto")


CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "args", "method", "rng")  # what a checkpoint to resume must hold


def missing_keys(ckpt):
    """The CHECKPOINT_KEYS a loaded object lacks (all of them when it is not a dict, e.g. bare weights)."""
    return [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]


def find_resume(resume, run_dir, log):
    """(path, checkpoint) to resume from: a path, not loaded yet (None), or with 'auto' the newest complete one,
    already loaded to check it, so that it is read once ((None, None) if none loads)."""
    if resume != "auto":
        if not os.path.isfile(resume):
            raise ConfigError(f"--resume {resume}: no such file")
        return resume, None
    for path in checkpoint_paths(run_dir):
        try:
            ckpt = load_checkpoint(path)
            if not missing_keys(ckpt):
                return path, ckpt
            log(f"resume: skipping {path}: incomplete (missing {missing_keys(ckpt)})")
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: say so and try the previous one
            log(f"resume: skipping {path}: cannot be loaded ({type(e).__name__}: {e})")
    return None, None


LATENT_SETTINGS = ("scale", "shift", "factor", "size", "channels")  # of args.latent: the space the model denoises in


# The MODEL_SETTINGS that only some methods read, and the method parts that read them (curriculum_clusters 0 takes
# the ANT clusters, which curriculum+ant-* already reads through its ANT part).
METHOD_SETTINGS = {"dtr_alpha": ("dtr",), "dtr_beta": ("dtr", "rtr"), "rtr_seed": ("rtr",), "rtr_per_block": ("rtr",),
                   "ant_clusters": ANT_PARTS, "ant_objective": ANT_PARTS,
                   **{key: ("curriculum",) for key in MODEL_SETTINGS if key.startswith("curriculum_")}}


def loss_weighting(args):
    """What sets the scale of the loss that adaptive curriculum pacing judges: --weighting and its own parameters
    (args: a dict of flags, a checkpoint's or vars(parse_args()); a checkpoint older than --weighting had none)."""
    weighting = args.get("weighting", "constant")
    return (weighting, args.get("min_snr_gamma") if weighting == "min-snr" else None,
            (args.get("p2_gamma"), args.get("p2_k")) if weighting == "p2" else None)


def check_compatible(saved, args):
    """Refuse a checkpoint whose model, data shape, latent space or method differ from the flags. A setting
    the method does not read (--dtr-alpha of a vanilla run) may differ, or be missing from an older checkpoint."""
    parts = method_parts(args.method)
    for key in MODEL_SETTINGS:
        if key in METHOD_SETTINGS and not set(parts) & set(METHOD_SETTINGS[key]):
            continue
        if saved.get(key) != getattr(args, key):
            if key not in saved:  # a checkpoint older than the setting: what it was trained with is unknown
                raise ConfigError(f"checkpoint predates the {key} setting, so its value there is unknown (the flags say "
                                  f"{getattr(args, key)!r}); start a new --out folder")
            if key in ("num_classes", "in_channels"):  # no flag: they follow from the data
                fix = f"train on the checkpoint's data (--data {saved.get('data')})"
            elif key == "learn_sigma":
                fix = f"pass --learn-sigma {int(bool(saved.get(key)))}"
            elif key in ("depth", "hidden_size", "num_heads") and saved.get(key) is None:  # the --model config's value
                fix = f"leave out --{key.replace('_', '-')}"
            else:
                fix = f"pass --{key.replace('_', '-')} {saved.get(key)}"
            raise ConfigError(f"checkpoint was trained with {key}={saved.get(key)!r} but the flags say {getattr(args, key)!r}; "
                              f"{fix} or start a new --out folder")
    old, new = saved.get("latent"), args.latent
    if (old is None) != (new is None) or (old is not None and any(old.get(k) != new.get(k) for k in LATENT_SETTINGS)):
        raise ConfigError(f"checkpoint was trained on {'pixels' if old is None else 'latents ' + repr(old)} but --data "
                          f"{args.data} holds {'pixels' if new is None else 'latents ' + repr(new)}; train on the "
                          f"checkpoint's data (--data {saved.get('data')}) or start a new --out folder")


# ----------------------------------------------------------------------------------------------
#                                   Training
# ----------------------------------------------------------------------------------------------

def init_distributed(backend):
    """init_process_group from torchrun's environment, with the store keys of each elastic restart
    under their own prefix: otherwise a restarted worker can read the dead round's addresses
    from torchrun's store and the new process group never connects."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          wait_for_workers=False) if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else None
    if store is None:
        dist.init_process_group(backend)
    else:
        prefix = f"train/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world)


def check_flags(args, world=1):
    """Refuse the flag values that would train silently wrong or crash later, with one line saying what to
    pass. Needs only the flags and the number of processes `world`, no data and no process group: train()
    and bench.py (which builds runs directly) call it."""
    for flag, value in (("--global-batch-size", args.global_batch_size), ("--log-every", args.log_every),
                        ("--ckpt-every", args.ckpt_every), ("--nash-every", args.nash_every),
                        ("--max-steps", args.max_steps), ("--image-size", args.image_size),
                        ("--depth", args.depth), ("--hidden-size", args.hidden_size), ("--num-heads", args.num_heads),
                        ("--curriculum-patience", args.curriculum_patience),
                        ("--curriculum-stage-steps", args.curriculum_stage_steps)):
        if value is not None and value < 1:  # None: a model override left to the --model config
            raise ConfigError(f"{flag} {value}: must be a positive number")
    if args.model not in DiT_models:
        raise ConfigError(f"unknown --model {args.model!r}; choose one of {', '.join(DiT_models)}")
    patch = int(args.model.split("/")[1])
    if args.image_size % patch:
        raise ConfigError(f"--image-size {args.image_size} is not divisible by the patch size {patch} of {args.model}")
    for flag, value in (("--sample-every", args.sample_every), ("--fid-every", args.fid_every),
                        ("--keep-last", args.keep_last), ("--skip-nonfinite", args.skip_nonfinite),
                        ("--num-workers", args.num_workers), ("--max-grad-norm", args.max_grad_norm),
                        ("--nash-max-norm", args.nash_max_norm)):
        if not value >= 0:
            raise ConfigError(f"{flag} {value}: must be 0 or more (0 turns it off)")
    for flag, value in (("--out", args.out), ("--resume", args.resume), ("--fid-ref", args.fid_ref),
                        ("--inception", args.inception), ("--ant-tas", args.ant_tas), ("--vae", args.vae)):
        if value == "":  # e.g. --resume "$CKPT" with CKPT unset: a fresh run, or the default --out, --fid-ref or VAE
            raise ConfigError(f"{flag} is empty; give a path, or leave the flag out")
    for flag, value in (("--fid-ref", args.fid_ref), ("--fid-ref-limit", args.fid_ref_limit),
                        ("--inception", args.inception)):
        if value is not None and not args.fid_every:  # the run would end without a single FID
            raise ConfigError(f"{flag} has no effect without --fid-every; add --fid-every N (steps between FID evaluations)")
    if not 0 <= args.uw_lr < float("inf"):
        raise ConfigError(f"--uw-lr {args.uw_lr}: must be a finite number, 0 or more (official: 0.025)")
    for flag, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay), ("--uw-weight-decay", args.uw_weight_decay)):
        if not 0 <= value < float("inf"):  # AdamW refuses NaN and negative values without naming the flag, and takes inf
            raise ConfigError(f"{flag} {value}: must be a finite number, 0 or more")
    for flag, value in (("--sample-cfg", args.sample_cfg), ("--fid-cfg", args.fid_cfg)):
        if not np.isfinite(value):  # NaN or inf guidance gives NaN samples: a blank grid, and an FID of blank images
            raise ConfigError(f"{flag} {value}: must be a finite guidance scale (1 = no guidance; the papers use 1.5)")
    if args.global_seed < 0:
        raise ConfigError(f"--global-seed {args.global_seed}: must be 0 or more")
    # the paper modules and Diffusion check these too, naming their parameters; here the flags are named. The bound
    # T holds only for a method that uses the flag: the defaults (5, 20) exceed a small --num-timesteps of vanilla.
    if args.ant_clusters < 1 or ("ant" in args.method and args.ant_clusters > args.num_timesteps):
        raise ConfigError(f"--ant-clusters {args.ant_clusters}: must be in 1..{args.num_timesteps} (paper: 5)")
    if args.curriculum_clusters < 0 or ("curriculum" in args.method and args.curriculum_clusters > args.num_timesteps):
        raise ConfigError(f"--curriculum-clusters {args.curriculum_clusters}: must be in 0..{args.num_timesteps} "
                          f"(paper: about 20; 0 = the ANT clusters)")
    if not 0 <= args.curriculum_smoothing < 1:
        raise ConfigError(f"--curriculum-smoothing {args.curriculum_smoothing}: an EMA decay, must be in [0, 1) (default 0.995)")
    if args.weighting == "min-snr" and not 0 < args.min_snr_gamma < float("inf"):  # inf: the constant weighting
        raise ConfigError(f"--min-snr-gamma {args.min_snr_gamma}: must be a finite number > 0 (Hang et al.: 5)")
    if args.weighting == "p2" and not (0 <= args.p2_gamma < float("inf") and 0 <= args.p2_k < float("inf")):  # inf: no MSE
        raise ConfigError(f"--p2-gamma {args.p2_gamma} --p2-k {args.p2_k}: must be finite and >= 0 (Choi et al.: 1 and 1)")
    if not 0 <= args.ema_decay < 1:
        raise ConfigError(f"--ema-decay {args.ema_decay}: must be in [0, 1) (0.9999 in the papers)")
    if not 0 <= args.class_dropout_prob <= 1:  # 1: every label is the null class (unconditional)
        raise ConfigError(f"--class-dropout-prob {args.class_dropout_prob}: must be in [0, 1] (0.1 in the papers)")
    if args.curriculum_clusters == 0 and "curriculum" in args.method and "ant" not in args.method:
        raise ConfigError("--curriculum-clusters 0 means 'the ANT clusters', which needs an ANT method (e.g. curriculum+ant-uw)")
    if args.ant_objective == "gradient" and "ant" in args.method and not args.ant_tas:
        raise ConfigError("--ant-objective gradient needs --ant-tas (make one with: python negative_transfer.py affinity ...)")
    if args.ant_tas and not (args.ant_objective == "gradient" and "ant" in args.method):
        raise ConfigError(f"--ant-tas is read only by an ANT method (ant-uw, ant-pcgrad, ant-nash) with --ant-objective "
                          f"gradient, but the flags say --method {args.method} --ant-objective {args.ant_objective}; "
                          f"change those, or drop --ant-tas")
    if args.compile_mode != "default" and not args.compile:
        raise ConfigError(f"--compile-mode {args.compile_mode} has no effect without --compile; add --compile")
    if args.compile_mode in CUDA_GRAPH_MODES and any(m in args.method for m in ("ant-pcgrad", "ant-nash")):
        # CUDA graphs reuse their output buffers on the next replay, while PCGrad/Nash run the model once per
        # cluster in a step and read every cluster's losses afterwards; this pairing is untested, so it is refused.
        raise ConfigError(f"--compile-mode {args.compile_mode} (CUDA graphs) is not supported with {args.method}; "
                          f"use --compile-mode max-autotune-no-cudagraphs or default")
    if args.global_batch_size % world:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")
    if (args.global_seed + 1) * world > 2**32:  # train()'s np.random.seed(global_seed * world + rank) takes 32 bits
        raise ConfigError(f"--global-seed {args.global_seed}: must be below {2**32 // world} with {world} process(es)")
    if args.fid_every:
        if args.fid_batch_size < 1:
            raise ConfigError(f"--fid-batch-size {args.fid_batch_size}: must be a positive number")
        if args.fid_samples < max(2, world):
            raise ConfigError(f"--fid-samples {args.fid_samples}: FID needs at least 2 samples (a covariance) and one per "
                              f"process ({world}); use thousands for a meaningful value")
        try:  # FID samples are drawn with seed global_seed + 1
            check_seed(args.global_seed + 1, args.fid_samples)
        except ValueError:
            if max_seed(args.fid_samples) < 1:  # no --global-seed fits: the count is the mistake
                raise ConfigError(f"--fid-samples {args.fid_samples}: at most {2**32 - SEED_STRIDE}, as FID sample i draws from "
                                  f"a generator seeded (global seed + 1) * {SEED_STRIDE} + i, which must stay below 2^32") from None
            raise ConfigError(f"--global-seed {args.global_seed}: the FID samples are drawn with seed {args.global_seed + 1}, "
                              f"whose per-sample generators (seed * {SEED_STRIDE} + i) would pass 2^32 with --fid-samples "
                              f"{args.fid_samples}; use --global-seed 0..{max_seed(args.fid_samples) - 1}") from None
    batch = args.global_batch_size // world
    if "ant" in args.method and batch < args.ant_clusters:  # stratified sampling (also after a curriculum) needs one per cluster
        raise ConfigError(f"{args.method} draws every one of the {args.ant_clusters} ANT clusters in each process's batch, "
                          f"but a process gets {batch} images (--global-batch-size {args.global_batch_size} over {world}); "
                          f"use --global-batch-size {args.ant_clusters * world} or more, or lower --ant-clusters")


def unread_flags(args):
    """The flags set to other than their default that this run never reads, each with what would read it:
    [("--uw-lr 0.1", "ant-uw"), ...]. train() warns about them: a flag meant for another method (or for FID
    without --fid-every) most often means a mistyped --method. The path flags that nothing would read (--fid-ref,
    --ant-tas, ...) are refused by check_flags instead."""
    parts = set(method_parts(args.method))
    curriculum = "curriculum" in parts
    owners = {**METHOD_SETTINGS, "uw_lr": ("ant-uw",), "uw_weight_decay": ("ant-uw",), "nash_every": ("ant-nash",),
              "nash_max_norm": ("ant-nash",), "curriculum_patience": ("curriculum",), "curriculum_stage_steps": ("curriculum",)}
    readers = {key: (bool(parts & set(names)), " or ".join(names)) for key, names in owners.items()}  # flag: (read, by what)
    readers.update({
        **{key: (curriculum and args.curriculum_pacing == "adaptive", "a curriculum with adaptive pacing")
           for key in ("curriculum_patience", "curriculum_smoothing")},
        "curriculum_stage_steps": (curriculum and args.curriculum_pacing == "fixed", "a curriculum with fixed pacing"),
        "min_snr_gamma": (args.weighting == "min-snr", "--weighting min-snr"),
        **{key: (args.weighting == "p2", "--weighting p2") for key in ("p2_gamma", "p2_k")},
        **{key: (args.fid_every > 0, "FID (--fid-every N)") for key in ("fid_samples", "fid_steps", "fid_cfg", "fid_batch_size")},
    })
    defaults = vars(parse_args([]))
    return [(f"--{key.replace('_', '-')} {getattr(args, key)}", reader) for key, (read, reader) in readers.items()
            if not read and getattr(args, key) != defaults[key]]


def build_run(args, device, distributed, log=print):
    """Model, EMA, diffusion, method and optimiser for `args` (already through check_flags): what train() and
    bench.py step."""
    model = build_model(vars(args)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if args.compile:  # FID samples from the EMA: one compile per sampling batch size, on first use (grids run eager)
        compile_for_sampling(ema, args.compile_mode)
    diffusion = build_diffusion(vars(args))
    method = Method(args, diffusion, device, log)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params}]
    if method.uw is not None:
        groups.append({"params": list(method.uw.parameters()), "lr": args.uw_lr, "weight_decay": args.uw_weight_decay})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    # Compiled inside DDP (PyTorch's advice). The compile happens in DDP's first forward, where Dynamo's DDPOptimizer
    # splits the graph at DDP's bucket boundaries (6 pieces for DiT-S/2 at the default 25 MB), so each bucket
    # all-reduces while the rest of backward runs. torch.compile(DDP(model)) gives the same pieces and weights, plus 3
    # graph breaks in DDP's own forward (checked on torch 2.11 and 2.13). Static shapes: PCGrad and Nash-MTL's update
    # steps run the model on each cluster's slice of the batch, and get one graph per slice length (B // K and
    # B // K + 1) instead of a recompile with a symbolic batch size at the second length.
    fwd_model = torch.compile(model, mode=args.compile_mode, dynamic=False) if args.compile else model
    # DDP broadcasts buffers before each forward: for DTR that is the mask table (T x C floats, 3 MB for B/2), the same
    # on every rank. broadcast_buffers=False would skip it, but torch 2.13 deprecates that flag with a warning per rank
    # and its replacement (forward_sync_buffers) does not exist in older versions; the copy is small next to a step.
    # gradient_as_bucket_view: each .grad is a view into DDP's all-reduce bucket instead of a second copy of every
    # gradient (4 bytes per parameter less: 2.7 GB for DiT-XL/2), and the copy between them each step goes away
    ddp_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True) if distributed else fwd_model
    ema_pairs = (list(ema.parameters()), list(model.parameters()))
    with torch.no_grad():  # DDP has broadcast rank 0's weights into the model: the EMA starts from them too (official DiT)
        torch._foreach_copy_(*ema_pairs)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and args.precision == "bf16" else nullcontext
    return SimpleNamespace(args=args, model=model, ema=ema, diffusion=diffusion, method=method, opt=opt, params=params,
                           ddp_model=ddp_model, autocast=autocast, distributed=distributed, ema_pairs=ema_pairs)


def train_step(run, x, y, step):
    """One optimisation step on a batch x (B, C, H, W) (images in [-1, 1] or latents), labels y (B,), for the 0-based
    step `step`. Returns (per-sample loss terms, t, per-step method tensors, bad) where `bad` is a
    device bool: the loss or gradient was not finite and the update (and EMA) was skipped."""
    args, method = run.args, run.method
    t, cluster = method.timesteps(x.shape[0])
    noise = torch.randn_like(x)  # (B, C, H, W) the draw training_losses would make, here so that a slice keeps its rows

    def losses(rows=slice(None)):
        """The per-sample loss terms of the samples in slice `rows` of the batch."""
        with run.autocast():
            return run.diffusion.training_losses(run.ddp_model, x[rows], t[rows], dict(y=y[rows]), noise=noise[rows])

    if method.uses_own_gradients(step):  # PCGrad, Nash-MTL's update steps: a forward and backward per cluster
        with run.ddp_model.no_sync() if run.distributed else nullcontext():
            terms, loss, extra = method.cluster_backward(losses, x.shape[0], run.params, step)
    else:
        terms = losses()
        loss, extra = method.backward(terms["loss"], cluster, step)
    if run.distributed and method.uw is not None:
        for p in method.uw.parameters():  # SUM then divide inside: gloo (CPU runs) has no AVG before torch 2.7
            method.nt.all_reduce_mean(p.grad)
    max_norm = method.nash.max_norm if method.nash is not None else args.max_grad_norm  # Nash-MTL clips (official; --nash-max-norm)
    if max_norm > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, max_norm, foreach=True)
    else:
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None], foreach=True)
    bad = ~torch.isfinite(gnorm) | ~torch.isfinite(loss)
    run.opt.found_inf = bad.float()  # fused AdamW skips the whole update on the device when set
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    w = (1 - args.ema_decay) * (1 - bad.float())  # () 0 on a skipped step, which keeps the EMA
    # One 0-d device weight per tensor. A lone tensor weight would be converted to a Python number (the Scalar
    # overload): a host sync every step, which left the GPU idle while the next step was queued. This overload runs
    # one lerp kernel per tensor on CUDA (its fused path needs weights shaped like the tensors): the same memory
    # traffic as the fused kernel, and launches the host queues while the GPU is still busy with the backward.
    torch._foreach_lerp_(*run.ema_pairs, [w] * len(run.ema_pairs[0]))
    # Detached: the caller keeps these until the next step returns, and with their grad_fn they would keep this
    # step's autograd graph alive through the next step's forward and backward.
    return {k: v.detach() for k, v in terms.items()}, t, extra, bad


def copy_to_host(x):
    """Queue a copy of the device tensor x to host memory without waiting for it: (host tensor, event). Read the
    host tensor after event.synchronize(), which waits only for the work queued before this call; x.tolist() would
    wait for everything queued on the stream by then, a step queued after x included. On the CPU: (x, None)."""
    if x.device.type != "cuda":
        return x, None
    host = x.to("cpu", non_blocking=True)  # torch pins the destination of a non-blocking device-to-host copy
    done = torch.cuda.Event()
    done.record()
    return host, done


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data and model
    a("--data", default="shapes", help="image folder, .zip, .npz (arr_0, arr_1) or .npy, 'shapes' (built-in, offline), "
                                       "or a latent folder from latents.py encode")
    a("--image-size", type=int, default=32, help="training resolution in pixels (centre crop + resize like ADM); for a "
                                                 "latent folder, the pixel size it was encoded at (the DiT sees image_size / 8 for the SD VAE)")
    a("--vae", default=None, help="latent folders: the VAE that decodes grids and FID samples (default: the one in its manifest)")
    a("--model", default="DiT-S/2", help=f"one of {', '.join(DiT_models)}")
    a("--depth", type=int, default=None, help="override the config's depth (small models for CPU runs and tests)")
    a("--hidden-size", type=int, default=None, help="override the config's width")
    a("--num-heads", type=int, default=None, help="override the config's number of heads")
    a("--learn-sigma", type=int, default=1, choices=(0, 1), help="1: learned-range variance + hybrid loss (DiT); 0: fixed variance, MSE only")
    a("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance (DiT: 0.1)")
    a("--num-timesteps", type=int, default=1000, help="T (all three papers: 1000)")
    a("--schedule", default="linear", choices=("linear", "cosine"), help="linear (DiT) or cosine (ADM, used by ANT)")
    a("--weighting", default="constant", choices=WEIGHTINGS, help="per-sample weight of the MSE term")
    a("--min-snr-gamma", type=float, default=5.0, help="Min-SNR-gamma (Hang et al. 2023)")
    a("--p2-gamma", type=float, default=1.0, help="P2 weighting gamma (Choi et al. 2022)")
    a("--p2-k", type=float, default=1.0, help="P2 weighting k")
    # methods
    a("--method", default="vanilla", help="'+'-joined parts: " + ", ".join(METHOD_PARTS))
    a("--dtr-alpha", type=float, default=4.0, help="DTR: window speed exponent (paper: 4)")
    a("--dtr-beta", type=float, default=0.8, help="DTR: fraction of active channels (paper: 0.8)")
    a("--rtr-seed", type=int, default=0, help="R-TR: seed of the random masks (same on every rank)")
    a("--ant-clusters", type=int, default=5, help="ANT: number of timestep clusters K (paper: 5)")
    a("--ant-objective", default="timestep", choices=("timestep", "snr", "log-snr", "gradient"), help="ANT: clustering cost")
    a("--ant-tas", default=None, help="ANT: task-affinity matrix (negative_transfer.py affinity) for --ant-objective gradient")
    a("--uw-lr", type=float, default=0.025, help="ANT-UW: learning rate of the log variances (official: 0.025)")
    a("--uw-weight-decay", type=float, default=0.0, help="ANT-UW: weight decay of the log variances")
    a("--nash-every", type=int, default=25, help="ANT-Nash: solve for the weights every N steps (official: 25)")
    a("--nash-max-norm", type=float, default=1.0, help="ANT-Nash: gradient-norm clip (official: 1)")
    a("--curriculum-clusters", type=int, default=20, help="curriculum: N equal clusters (paper: about 20); 0 = the ANT clusters")
    a("--curriculum-patience", type=int, default=500, help="curriculum: steps without improvement before the next stage (ours)")
    a("--curriculum-smoothing", type=float, default=0.995,
      help="curriculum: EMA decay of the loss the patience rule judges (ours; a stage lasts at least 1/(1-s) + patience steps)")
    a("--curriculum-pacing", default="adaptive", choices=("adaptive", "fixed"), help="curriculum: plateau rule or fixed steps")
    a("--curriculum-stage-steps", type=int, default=1000, help="curriculum: steps per stage with fixed pacing (ours)")
    a("--curriculum-order", default="easy-to-hard", choices=("easy-to-hard", "hard-to-easy"), help="hard-to-easy: the ablation")
    # optimisation
    a("--global-batch-size", type=int, default=256, help="over all ranks (DiT: 256)")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (DiT: 1e-4)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (DiT: 0)")
    a("--ema-decay", type=float, default=0.9999, help="EMA decay per step (DiT: 0.9999; short runs want ~0.999)")
    a("--max-grad-norm", type=float, default=0.0, help="clip the gradient norm; 0 = off (DiT: off)")
    a("--max-steps", type=int, default=400_000, help="stop after this many steps (papers: 400K)")
    a("--global-seed", type=int, default=0)
    a("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on CUDA (CPU always runs fp32)")
    a("--compile", action="store_true", help="torch.compile the model, and the EMA for the FID samples")
    a("--compile-mode", default="default", choices=COMPILE_MODES,
      help="torch.compile mode with --compile: max-autotune-no-cudagraphs lets Inductor pick Triton matmul templates "
           "and fuse the elementwise epilogues into them (minutes of compile time); the two others add CUDA graphs")
    a("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers per rank")
    a("--data-on-device", action="store_true", help="decode the dataset once and keep it on the device (small sets)")
    a("--skip-bad-images", action="store_true", help="skip unreadable images (counted at start) instead of stopping")
    a("--skip-nonfinite", type=int, default=0, help="tolerate this many non-finite steps (skipped) before stopping")
    # bookkeeping
    a("--out", default=None, help="run folder (default results/<model>-<method>)")
    a("--resume", default=None, help="a checkpoint path, or 'auto' for the newest complete one in --out")
    a("--log-every", type=int, default=100)
    a("--ckpt-every", type=int, default=10_000)
    a("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0 = keep all)")
    a("--sample-every", type=int, default=10_000, help="EMA sample grid every N steps (0 = only at the end)")
    a("--sample-steps", default="ddim50", help="sampler for the grid: 'ddim50' or '250'")
    a("--sample-cfg", type=float, default=1.0, help="guidance scale for the grid")
    a("--fid-every", type=int, default=0, help="FID of the EMA model every N steps (0 = off)")
    a("--fid-samples", type=int, default=5000, help="samples per FID evaluation, split over ranks")
    a("--fid-ref", default=None, help="reference for FID (folder, zip, npz or statistics npz); default: the training data")
    a("--fid-ref-limit", type=int, default=None, help="use only this many reference images (spread evenly)")
    a("--fid-steps", default="ddim50", help="sampler for the FID samples")
    a("--fid-cfg", type=float, default=1.0, help="guidance scale for the FID samples")
    a("--fid-batch-size", type=int, default=250, help="sampling batch per rank for FID")
    a("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth (downloaded once if omitted and online)")
    a("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    args = p.parse_args(argv)
    args.in_channels = 3
    args.learn_sigma = bool(args.learn_sigma)
    args.latent = None
    args.rtr_per_block = True  # not a flag: R-TR draws a mask table per block (sample.build_router); saved with the args
    return args


def fid_steps(metrics_path):
    """The steps that metrics.jsonl holds an FID record for (a failed evaluation's too); a torn line is skipped."""
    steps = set()
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "fid" in record and "step" in record:
                    steps.add(record["step"])
    return steps


def train(args):
    """Train with the flags of parse_args (one process, or one rank under torchrun); returns the last step."""
    # ---------------------------------------------------------------- processes and devices
    distributed = "RANK" in os.environ
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if distributed and int(os.environ["WORLD_SIZE"]) > 1 and args.device and torch.device(args.device).index is not None:
        raise ConfigError(f"--device {args.device} would put all {os.environ['WORLD_SIZE']} processes on one device; "
                          f"pass --device {device.type}, and each process takes its own (cuda:LOCAL_RANK)")
    if distributed:
        init_distributed("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    args.method = parse_method(args.method)  # canonical order first: dtr+curriculum and curriculum+dtr share a default --out
    if args.out is None:  # an empty --out is refused by check_flags, not replaced by the default
        args.out = os.path.join("results", f"{args.model.replace('/', '-')}-{args.method.replace('+', '_')}")

    def log(msg):
        if master:
            print(msg, flush=True)
            if os.path.isdir(args.out):
                try:
                    with open(os.path.join(args.out, "log.txt"), "a") as f:
                        f.write(msg + "\n")
                except OSError as e:  # disk full: the message is on stdout; say why log.txt lacks it
                    print(f"warning: cannot append to {os.path.join(args.out, 'log.txt')} ({e})", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- flags
    check_flags(args, world)
    batch = args.global_batch_size // world  # per process
    ckpt_dir = os.path.join(args.out, "checkpoints")
    run_lock = None
    if master:
        try:  # fail now, not after hours of training, if the results folder cannot be written
            os.makedirs(ckpt_dir, exist_ok=True)
            probe = os.path.join(args.out, ".write-probe")
            try:
                with open(probe, "wb") as f:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:  # e.g. the disk is full: the probe, written in part, must not stay and take space
                with suppress(OSError):
                    os.remove(probe)
                raise
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"cannot write to the results folder {args.out}: {e}") from None
        # Held until the run ends, taken before anything here is changed: two runs into one --out would overwrite each
        # other's checkpoints (claim_checkpoint_folder sees only those already written) and mix their metrics, and a
        # second start would remove the first's checkpoint being written as a stale one
        try:
            run_lock = fid.lock_folder(args.out, "train.lock", log)
        except ValueError as e:
            raise ConfigError(f"a train.py run is going on: {e}") from None
        for stale in glob.glob(os.path.join(ckpt_dir, "*.pt.tmp*")):  # a write cut short by SIGKILL (atomic_save)
            try:
                os.remove(stale)
                log(f"removed {stale}, a checkpoint write that never finished")
            except OSError as e:
                log(f"warning: cannot remove {stale}, a checkpoint write that never finished: {e}")

    # ---------------------------------------------------------------- data
    with warnings.catch_warnings(record=True) as caught:  # data.py's warnings (e.g. an array read whole) go to log.txt, once
        warnings.simplefilter("always")
        dataset = datasets.load_dataset(args.data, args.image_size, skip_bad=args.skip_bad_images, seed=args.global_seed)
    # Each text once: PIL repeats a warning per image (e.g. DecompressionBombWarning for every large image of one
    # size), which "always" would turn into a line per image. Deprecations stay hidden, as the default filters keep them.
    for message in dict.fromkeys(str(w.message) for w in caught
                                 if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))):
        log(f"warning: {message}")
    args.num_classes = dataset.num_classes
    args.data_size = len(dataset)  # recorded in checkpoints: a resume on a set that changed since is told so
    if args.num_classes == 1:
        args.class_dropout_prob = 0.0  # unconditional: no null class, no guidance
    if isinstance(dataset, datasets.LatentFolder):
        # DiT on VAE latents: the model's input is the latent (32x32x4 for 256 px and the SD VAE). The
        # latents are stored scaled (and with --flip both, in both orientations), so batches skip to_model_input below.
        m = dataset.manifest
        if args.image_size != m["image_size"]:
            raise ConfigError(f"{args.data} holds latents of {m['image_size']}px images ({m['latent_size']}x{m['latent_size']}x{m['channels']}); "
                              f"pass --image-size {m['image_size']}")
        patch = int(args.model.split("/")[1])
        if m["latent_size"] % patch:
            raise ConfigError(f"the latent size {m['latent_size']} of {args.data} is not divisible by the patch size {patch} of {args.model}")
        args.in_channels = m["channels"]
        args.latent = {"vae": args.vae or m["vae"], "scale": m["scale"], "shift": m["shift"], "factor": m["factor"],
                       "size": m["latent_size"], "channels": m["channels"], "flip": m["flip"], "posterior": m["posterior"]}
        if args.fid_every and not args.fid_ref:
            raise ConfigError("FID on a latent folder needs --fid-ref (images, or statistics such as ADM's VIRTUAL_imagenet256_labeled.npz)")
        latents.require_diffusers()  # the grids and FID decode through the VAE: fail now (the VAE itself loads before step 1)
        log(f"data: {args.data} ({len(dataset)} latents {m['channels']}x{m['latent_size']}x{m['latent_size']} of {args.image_size}px "
            f"images, flip {m['flip']}, {dataset.num_classes} classes; VAE {args.latent['vae']}, scale {m['scale']})")
    elif args.vae:
        raise ConfigError(f"--vae is for latent folders (latents.py encode); {args.data} holds images")
    else:
        log(f"data: {args.data} ({len(dataset)} images, {dataset.num_classes} classes, {args.image_size}px)")
    if getattr(dataset, "skipped", None):
        log(f"data: skipped {len(dataset.skipped)} unreadable images, e.g. {dataset.skipped[0]}")
    if getattr(dataset, "num_upsized", 0):
        log(f"warning: {dataset.num_upsized} images are smaller than {args.image_size}px and will be resized up")

    # ---------------------------------------------------------------- resume target
    resume_path, ckpt = find_resume(args.resume, args.out, log) if args.resume else (None, None)
    if args.resume == "auto" and resume_path is None:
        unloadable = checkpoint_paths(args.out)
        if unloadable:  # never restart a long run from step 0 because its checkpoints cannot be read right now
            raise ConfigError(f"--resume auto: none of the {len(unloadable)} checkpoint(s) in {ckpt_dir} loads (see the reasons "
                              f"above); fix the cause, pass --resume PATH, or move them away to start afresh")
        log(f"resume: no checkpoint in {ckpt_dir} yet; starting from step 0")
    try:
        if resume_path is not None and ckpt is None:
            ckpt = load_checkpoint(resume_path)
    except Exception as e:  # noqa: BLE001 - truncated or not a checkpoint: say which file and what to do
        raise ConfigError(f"--resume {resume_path} cannot be loaded ({type(e).__name__}: {e}); pass another "
                          f"checkpoint, or --resume auto to take the newest one in {ckpt_dir} that loads") from None
    if ckpt is not None and missing_keys(ckpt):  # e.g. bare weights
        raise ConfigError(f"--resume {resume_path} is not a train.py checkpoint (it lacks {missing_keys(ckpt)}); pass a "
                          f"RUN/checkpoints/NNNNNNN.pt, or --resume auto")
    claim_checkpoint_folder(args.out, ckpt["step"] if ckpt is not None else 0, resume_path, args.resume == "auto", log, master)
    if ckpt is not None:
        check_compatible(ckpt["args"], args)
        if ckpt["args"].get("global_batch_size") != args.global_batch_size:
            log(f"warning: the checkpoint trained with --global-batch-size {ckpt['args'].get('global_batch_size')}, now "
                f"{args.global_batch_size}; the data stream continues at step x batch, so some images are skipped or repeated")
        if ckpt["args"].get("data_size") not in (None, args.data_size):  # None: a checkpoint from before it was recorded
            log(f"warning: --data {args.data} holds {args.data_size} training examples, the checkpoint's run had "
                f"{ckpt['args']['data_size']}; the data order from step {ckpt['step']} on is that of the new set, so "
                f"this epoch may skip or repeat some examples")
        changed = [f"--{k.replace('_', '-')} {v} (was {ckpt['args'].get(k)})" for k, v in vars(args).items()
                   if k not in ("resume", "max_steps", "global_batch_size", "data_size", "rtr_per_block")
                   and ckpt["args"].get(k) != v]
        if changed:  # e.g. a lower --lr after a divergence, or another --weighting: say so, the record shows only the new value
            log(f"resume: flags that differ from the checkpoint's run, in effect from step {ckpt['step']}: {', '.join(changed)}")

    # ---------------------------------------------------------------- model, diffusion, method
    torch.manual_seed(args.global_seed * world + rank)
    np.random.seed(args.global_seed * world + rank)
    try:
        run = build_run(args, device, distributed, log)
    except ValueError as e:  # a paper module refused its settings; its message says which
        raise ConfigError(str(e)) from None
    model, ema, diffusion, method, opt = run.model, run.ema, run.diffusion, run.method, run.opt
    # Grids and FID come long after the start: check their settings now, not at the first evaluation.
    for flag, cfg in (("--sample-cfg", args.sample_cfg), ("--fid-cfg", args.fid_cfg if args.fid_every else 1.0)):
        if cfg != 1.0 and args.class_dropout_prob == 0:
            why = "the data have one class" if args.num_classes == 1 else "of --class-dropout-prob 0"
            raise ConfigError(f"{flag} {cfg} needs the null class of label dropout, which this model lacks because {why}; "
                              f"use {flag} 1")
    for flag, steps in (("--sample-steps", args.sample_steps), ("--fid-steps", args.fid_steps)):
        try:
            diffusion.respace(steps)
        except ValueError as e:
            raise ConfigError(f"{flag} {steps}: {e}") from None
    step = nonfinite = 0  # nonfinite: steps skipped as non-finite so far, against --skip-nonfinite
    cur = method.curriculum  # None without one
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        for group, lr, wd in zip(opt.param_groups, (args.lr, args.uw_lr), (args.weight_decay, args.uw_weight_decay)):
            group["lr"], group["weight_decay"] = lr, wd  # load_state_dict restored the saved ones: the flags win (logged above)
        method.load_state_dict(ckpt["method"])
        if cur is not None and cur.pacing == "adaptive" and not cur.finished and \
                loss_weighting(ckpt["args"]) != loss_weighting(vars(args)):
            cur.reset_pacing()
            log(f"resume: the loss weighting changed, so the curriculum forgets stage {cur.stage}'s smoothed loss, "
                f"which was measured under the old one, and measures the stage afresh")
        step = ckpt["step"]
        nonfinite = ckpt.get("nonfinite", 0)  # a resume does not grant --skip-nonfinite afresh (0: older checkpoints)
        rng = ckpt["rng"]
        fresh_seed = (args.global_seed * 1_000_003 + step) * world + rank  # a stream that does not replay step 0's
        if len(rng) == world:
            torch.set_rng_state(rng[rank]["cpu"])
            if device.type == "cuda" and rng[rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng[rank]["cuda"], device)
            elif device.type == "cuda":  # a CPU checkpoint continued on a GPU: a fresh device stream
                torch.cuda.manual_seed(fresh_seed)
        else:  # new per-rank streams, seeded with the step too, so they do not replay the run's first draws
            torch.manual_seed(fresh_seed)
            log(f"resume: the checkpoint was written by {len(rng)} processes, now {world}; new random streams from step {step}")
        log(f"resumed from {resume_path} at step {step}")
        if step >= args.max_steps:
            log(f"warning: the checkpoint is at step {step} and --max-steps is {args.max_steps}: nothing to train; "
                f"raise --max-steps to continue")
    # Loaded: holding the checkpoint would keep 16 bytes per parameter of host RAM on every rank for the whole run
    # (model, EMA and AdamW's two moments: 10.8 GB per rank for DiT-XL/2, 86 GB on an 8-GPU node).
    ckpt = None
    warning = bf16_warning(device, args.precision)
    if warning:
        log(warning)
    for flag, reader in unread_flags(args):
        log(f"warning: {flag} has no effect on this run: only {reader} reads it")  # the next line names the method
    log(f"model: {args.model}, {sum(p.numel() for p in run.params):,} parameters; method: {args.method}; "
        f"{world} process(es) on {device.type}, batch {batch} per process")
    if cur is not None:
        log(cur.describe())
        if cur.pacing == "fixed" and not cur.finished:  # its last stage is known now (later if steps are skipped)
            last = step + (cur.num_stages - cur.stage) * cur.stage_steps - cur.stage_updates
            if last >= args.max_steps:  # reached at the final step: no step trains on it
                log(f"warning: fixed pacing reaches the curriculum's last stage at step {last}, not before --max-steps "
                    f"{args.max_steps}: the run will never train on every timestep; lower --curriculum-stage-steps "
                    f"or raise --max-steps")

    sampler = StreamSampler(len(dataset), batch, rank, world, args.global_seed, start_step=step)
    data_iter = batches(dataset, sampler, args, device)
    metrics_path = os.path.join(args.out, "metrics.jsonl")

    def write_metrics(record):
        if master:
            try:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record, default=str) + "\n")
            except OSError as e:  # disk full: keep training; the next checkpoint write stops the run cleanly if it fails too
                print(f"warning: cannot append to {metrics_path} ({e}); record lost: {json.dumps(record, default=str)[:200]}",
                      file=sys.stderr, flush=True)

    # Each start (fresh or resumed) records the full settings, so a metrics.jsonl documents its own run.
    write_metrics({"event": "start", "step": step, "args": vars(args), "world_size": world, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})

    # Fixed noise and labels for the sample grids.
    grid_gen = torch.Generator().manual_seed(args.global_seed)
    side = args.image_size if args.latent is None else args.latent["size"]
    grid_noise = torch.randn(16, args.in_channels, side, side, generator=grid_gen).to(device)
    step_noise_state = grid_gen.get_state()  # a DDPM grid's step noise goes on from here (not x_T's draws again)
    grid_labels = (torch.arange(16) % args.num_classes).to(device)

    def save_checkpoint():
        if world > 1:  # replicas and method state must agree bit for bit across ranks
            digest = hash_state_dict(hash_state_dict(hashlib.sha256(), model.state_dict()), ema.state_dict())
            buffer = io.BytesIO()
            torch.save(method.state_dict(), buffer)
            digest.update(buffer.getvalue())
            digests = [None] * world
            dist.all_gather_object(digests, digest.hexdigest())
            if len(set(digests)) > 1:
                raise RuntimeError(f"model, EMA or method state differs across ranks at step {step}: {digests}")
            log(f"step {step}: model replicas, EMA and method state identical on {world} ranks ({digests[0][:12]})")
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        error = [None]
        if master:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                     "args": vars(args), "method": method.state_dict(), "rng": rngs, "nonfinite": nonfinite}
            path = os.path.join(ckpt_dir, f"{step:07d}.pt")
            try:
                atomic_save(state, path)
                log(f"saved checkpoint {path}")
            except OSError as e:  # disk full, folder gone, permissions: stop, keep what is on disk
                previous = checkpoint_paths(args.out)
                error[0] = (f"cannot write checkpoint {path}: {e}. Stopping at step {step}; the previous checkpoint "
                            f"{previous[0] if previous else '(none)'} is intact. Free space and resume with --resume auto")
            if args.keep_last > 0 and error[0] is None:  # prune only now that the new one is safely on disk
                for old in checkpoint_paths(args.out)[args.keep_last:]:
                    try:
                        os.remove(old)
                    except OSError as e:  # the new checkpoint is written: train on, and say what is left behind
                        log(f"warning: --keep-last {args.keep_last}: cannot remove {old} ({e})")
        if distributed:
            dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise ConfigError(error[0])

    fid_net = ref_stats = None
    if args.fid_every:
        try:
            fid_net = fid.load_inception(args.inception, device)
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        # Reference statistics once per run, on rank 0, cached next to it. The other ranks wait on a gloo
        # group: an ImageNet-sized first pass outlasts NCCL's 10-minute timeout, which the first gradient
        # all-reduce would hit. Rank 0's outcome is broadcast, so a failure stops every rank at once.
        wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6)) if distributed else None
        error = [None]
        if master:
            try:
                if args.fid_ref and args.fid_ref_limit is not None and fid.is_statistics_file(args.fid_ref):
                    raise ValueError("--fid-ref-limit takes part of a reference's images, but these statistics are used "
                                     "whole; leave --fid-ref-limit out, or give images")
                key = None if args.fid_ref else f"{os.path.abspath(args.data)}|{args.image_size}px"  # the training set
                if key is not None and isinstance(dataset, datasets.ShapesDataset):  # its images follow the seed
                    key += f"|seed {dataset.seed}"
                elif key is not None:  # a folder or file whose images change under the same name: not the cached ones
                    key += f"|{fid.source_version(args.data)}"
                ref_stats = fid.load_or_compute_stats(args.fid_ref or dataset, fid_net, key=key,
                                                      cache_path=os.path.join(args.out, "fid_ref_stats.npz"),
                                                      limit=args.fid_ref_limit, batch_size=args.fid_batch_size,
                                                      num_workers=args.num_workers)
                dim = fid_net.fc.in_features  # the pool features' width (2048): a statistics file of another network fails every FID
                if np.shape(ref_stats["mu"]) != (dim,) or np.shape(ref_stats["sigma"]) != (dim, dim):
                    raise ValueError(f"its statistics have mu {np.shape(ref_stats['mu'])} and sigma {np.shape(ref_stats['sigma'])}, "
                                     f"but these Inception features need ({dim},) and ({dim}, {dim}); give images, or "
                                     f"statistics from fid.py --save-stats")
                log(f"FID reference: {args.fid_ref or args.data} ({ref_stats.get('n', '?')} images)")
            except (ValueError, OSError) as e:
                error[0] = f"FID reference {args.fid_ref or args.data}: {e}"
        if distributed:
            dist.broadcast_object_list(error, src=0, group=wait_group)
        if error[0]:
            raise ConfigError(error[0])

    # Latent runs: the VAE decoder of the grids and FID (None for pixel runs), loaded before the first step, so that a
    # VAE folder missing on this machine stops the run now, not at its first grid with the steps since a checkpoint lost
    decoder = None
    if args.latent is not None:
        with torch.random.fork_rng(devices=[]):  # a diffusers version whose loading draws would move the resumed RNG
            decoder = latents.load_decoder(args.latent, device)

    def evaluate_fid():
        """FID of fixed-seed EMA samples: each rank samples and featurises its share, rank 0 scores."""
        t_start = time.time()
        mine = list(range(rank, args.fid_samples, world))
        images, _ = sample_indices(ema, diffusion, mine, device, seed=args.global_seed + 1, batch_size=args.fid_batch_size,
                                   steps=args.fid_steps, cfg_scale=args.fid_cfg, clip_denoised=args.latent is None,
                                   decode=decoder, precision=args.precision)
        t_sampled = time.time()
        feats = fid.extract_features(images, fid_net, keys=("pool",), batch_size=args.fid_batch_size, progress=False)["pool"]
        t_featurised = time.time()
        gathered = [feats]
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, feats)
        if master:
            mu, sigma = fid.feature_statistics(np.concatenate(gathered))
            try:
                value = fid.frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
            except ValueError as e:  # NaN statistics, or no covariances (not symmetric or PSD): record it, never end the run
                log(f"step {step}: no FID ({e})")
                write_metrics({"step": step, "fid": None, "fid_samples": args.fid_samples, "fid_error": str(e)})
                return
            t_end = time.time()
            log(f"step {step}: FID {value:.3f} ({args.fid_samples} EMA samples, {args.fid_steps}, cfg {args.fid_cfg}; "
                f"{t_end - t_start:.0f} s: sampling {t_sampled - t_start:.0f}, Inception {t_featurised - t_sampled:.0f}, "
                f"statistics and distance {t_end - t_featurised:.0f})")
            write_metrics({"step": step, "fid": value, "fid_samples": args.fid_samples})

    def save_samples():
        if master:  # DDPM step noise from its own generator: the grid leaves the training RNG (and resume) alone
            gen = torch.Generator()
            gen.set_state(step_noise_state)
            # Eager even with --compile: compiling the EMA for 16 images costs more than it saves, and rank 0 would
            # compile alone while the other ranks wait in a collective (NCCL's timeout is 10 min; max-autotune can take longer)
            with torch.compiler.set_stance("force_eager"):
                x = generate(ema, diffusion, grid_labels, grid_noise, steps=args.sample_steps, cfg_scale=args.sample_cfg,
                             clip_denoised=args.latent is None, precision=args.precision,
                             noise_fn=lambda z: to_device(torch.randn(z.shape, generator=gen), z.device))  # no sync per step
            if decoder is not None:
                x = decoder(x)  # latents -> images in [-1, 1]
            path = os.path.join(args.out, f"samples_{step:07d}.png")
            # A grid that cannot be written (a full disk) is not worth a traceback that loses the steps since the
            # last checkpoint and leaves the other ranks hanging in their next collective
            try:
                save_grid(to_uint8(x), path, nrow=4)
                log(f"saved sample grid {path}")
            except OSError as e:
                log(f"warning: cannot write the sample grid {path} ({e}); training goes on")

    # ---------------------------------------------------------------- signals
    stop_requested = [False]  # set by the handler; shared with the other ranks through the step flags
    stop_flag = torch.zeros((), device=device)

    def on_signal(signum, frame):
        if not stop_requested[0]:
            print(f"rank {rank}: got signal {signum}; finishing the step and writing a checkpoint", file=sys.stderr, flush=True)
        stop_requested[0] = True

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    # The steps that make a grid and score an FID: the loop's rule, which a resume also checks against what is on disk
    def grid_due(s):
        return bool(args.sample_every) and s % args.sample_every == 0

    def fid_due(s):
        return bool(args.fid_every) and (s % args.fid_every == 0 or s == args.max_steps)

    # A job killed between a checkpoint and that step's grid or FID (a hard kill after a time limit's SIGTERM) resumes at
    # that step: make them now, from the checkpoint's EMA, so that the FID curve and the grids have no gap.
    if step > 0:
        missing = [grid_due(step) and not os.path.exists(os.path.join(args.out, f"samples_{step:07d}.png")),
                   fid_due(step) and step not in fid_steps(metrics_path)]
        if distributed:  # rank 0's reading: FID is a collective
            dist.broadcast_object_list(missing, src=0)
        if any(missing):
            log(f"resume: making step {step}'s {' and '.join(n for n, m in zip(('grid', 'FID'), missing) if m)}, "
                f"which the run stopped before")
        if missing[0]:
            save_samples()
        if missing[1]:
            evaluate_fid()

    # ---------------------------------------------------------------- the loop
    model.train()
    nb = 10  # loss split into 10 timestep buckets
    bucket_sum = torch.zeros(nb, device=device)
    bucket_cnt = torch.zeros(nb, device=device)
    kept_steps = torch.zeros(1, device=device)  # steps not skipped as non-finite, on this rank
    extra_sum, n_logged = {}, 0
    pending = None  # (step, (flags, event)) of the previous step, read one step late
    t0 = time.time()
    from tqdm.auto import tqdm
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True, desc="train", file=sys.stdout,
               mininterval=1.0)

    def resolve(pending):
        """Read a step's flags: the previous step's, or this one's under the curriculum (the loop's one host
        sync per step). Returns False to stop."""
        nonlocal nonfinite
        s, (flags, done) = pending
        if done is not None:
            done.synchronize()  # the end of step s, while the GPU runs the step queued after it
        mean_loss, bad, stop = flags.tolist()
        event = None
        if bad > 0:
            nonfinite += 1
            log(f"step {s}: non-finite loss or gradient on {int(bad)} process(es); the update was skipped")
            if nonfinite > args.skip_nonfinite:
                last = checkpoint_paths(args.out)
                raise ConfigError(f"non-finite loss at step {s}; stopping. The last good checkpoint is "
                                  f"{last[0] if last else '(none yet)'}; lower --lr, set --max-grad-norm, or pass --skip-nonfinite N")
        else:
            event = method.after_step(s, mean_loss / world)
        if event is not None:
            log(f"step {s}: curriculum stage {event['stage']}, t in [{event['t_min']}, {event['t_max']})")
            write_metrics(event)
        if stop > 0:
            return False
        return True

    if cur is not None and step == 0:
        lo, hi = cur.active_range
        write_metrics({"event": "curriculum_stage", "step": 0, "stage": cur.stage, "t_min": lo, "t_max": hi})
    keep_going = True
    trained_in = method.log_fields()  # the curriculum stage the latest step trained in ({} without one)
    while step < args.max_steps and keep_going:
        x, y = next(data_iter)
        x = datasets.to_model_input(x) if args.latent is None else x.float()  # latents: scaled, flips stored
        terms, t, extra, bad = train_step(run, x, y, step)
        step += 1

        # Bookkeeping on the device; read back only at log steps (and the lagged flags below).
        with torch.no_grad():
            kept = ~bad  # () a skipped non-finite step's samples and method tensors count neither as values nor as zeros
            lv = terms["loss"].detach().float()  # (B,)
            finite = torch.isfinite(lv) & kept  # (B,)
            lv = torch.where(finite, lv, 0.0)
            b = (diffusion.original_timesteps(t) * nb // diffusion.num_timesteps).long()
            bucket_sum.index_add_(0, b, lv)
            bucket_cnt.index_add_(0, b, finite.float())
            for k, v in extra.items():  # a skipped step's L_k can be NaN or inf
                extra_sum[k] = extra_sum.get(k, 0) + torch.where(kept, v.float(), 0.0)
            kept_steps += kept.float()
            n_logged += 1
            flags = torch.stack([lv.mean(), bad.float(), stop_flag.fill_(float(stop_requested[0]))])
            if distributed:
                dist.all_reduce(flags)
            copied = copy_to_host(flags)  # (host flags, event)
        if cur is not None:  # the pacing decision must land at the same step on every run
            trained_in = method.log_fields()  # before the decision: the log record names the stage the losses came from
            keep_going = resolve((step, copied))
        else:  # read one step late, so the host never waits for the step it just queued
            if pending is not None:
                keep_going = resolve(pending)
            pending = (step, copied)
        bar.update(1)

        due_log = step % args.log_every == 0 or step == args.max_steps
        due_ckpt = step % args.ckpt_every == 0 or step == args.max_steps
        if pending is not None and (due_log or due_ckpt):  # both read the device anyway: no extra wait
            keep_going = resolve(pending) and keep_going
            pending = None
        if due_log or not keep_going:  # a stop logs the steps since the last record, before its checkpoint
            stats = torch.cat([bucket_sum, bucket_cnt, kept_steps] + [v.view(-1) for v in extra_sum.values()])
            if distributed:
                dist.all_reduce(stats)
            stats = stats.tolist()
            elapsed = time.time() - t0
            n_finite = sum(stats[nb: 2 * nb])  # finite per-sample losses of the kept steps, all ranks
            n_kept = stats[2 * nb]  # kept (step, rank) pairs
            loss = sum(stats[:nb]) / n_finite if n_finite else None  # None (JSON null): every step skipped as non-finite
            record = {"step": step, "loss": loss,
                      "steps_per_s": n_logged / elapsed, "images_per_s": n_logged * args.global_batch_size / elapsed}
            for i in range(nb):
                if stats[nb + i] > 0:
                    record[f"loss_t{i}"] = stats[i] / stats[nb + i]
            pos, sums = 2 * nb + 1, {}
            for k, v in extra_sum.items():
                sums[k], pos = stats[pos: pos + v.numel()], pos + v.numel()
            present = sums.pop("present", None)  # UW: in how many (step, rank) pairs each cluster had samples
            for k, vals in sums.items():
                for i, val in enumerate(vals):
                    n = present[i] if k == "L" and present is not None else n_kept
                    if n > 0:  # L_k is 0 where cluster k had no sample (a curriculum hides it): not a loss to average
                        record[f"ant/{k}{i}"] = val / n
            record.update(trained_in)
            write_metrics(record)
            shown = "n/a" if loss is None else f"{loss:.4f}"
            bar.set_postfix(loss=shown, img_s=f"{record['images_per_s']:.0f}")
            if master:
                tqdm.write(f"step {step:7d}  loss {shown}  {record['steps_per_s']:.2f} steps/s  "
                           f"{record['images_per_s']:.1f} img/s")
            bucket_sum.zero_(), bucket_cnt.zero_(), kept_steps.zero_()
            extra_sum, n_logged, t0 = {}, 0, time.time()

        t_pause = time.time()  # checkpoints, grids and FID do not count against the training throughput
        if due_ckpt or not keep_going:
            save_checkpoint()
        if grid_due(step):
            save_samples()
        if fid_due(step):
            evaluate_fid()
        t0 += time.time() - t_pause

    bar.close()
    for s, handler in previous_handlers.items():
        signal.signal(s, handler)
    if cur is not None and not cur.finished and step >= args.max_steps:
        lo, hi = cur.active_range
        log(f"warning: the run ended in {cur.describe()}; the model never trained on timesteps "
            f"outside [{lo}, {hi}), which sampling and FID use; raise --max-steps and resume, or pace faster")
    if not keep_going:
        log(f"stopped by a signal at step {step}; resume with the same flags plus --resume auto")
    elif not grid_due(step):
        save_samples()
    if distributed:
        dist.barrier()  # nobody tears down the process group while a peer still uses it
        dist.destroy_process_group()
    if run_lock is not None:
        run_lock.close()
    return step


def main(argv=None):
    args = parse_args(argv)
    # train() puts these back when its loop ends; after an error (a non-finite stop, a failed checkpoint write) a caller
    # in this process (the tests, a notebook) would keep its stop handler, and Ctrl-C would no longer interrupt it
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(args)
    except Exception as e:
        # A DataLoader worker's DataError comes back as a DataError (torch re-raises the worker's exception type)
        # whose message is the worker's traceback: show just the data error, its last line.
        lines = str(e).strip().splitlines()
        worker = "Original Traceback" in str(e) and lines and lines[-1].startswith(("DataError", "data.DataError"))
        if not (worker or isinstance(e, (ConfigError, datasets.DataError))):
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {lines[-1].split(': ', 1)[1] if worker else e}", file=sys.stderr)
        sys.exit(2)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
