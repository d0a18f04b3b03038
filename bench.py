r"""
Speed of the training methods, the samplers and the FID feature extractor, in one process and one run.

    python bench.py --model DiT-S/2 --image-size 32 --batch-size 32 --device cpu \
        --methods vanilla,dtr,rtr,ant-uw,ant-pcgrad,ant-nash,curriculum --warmup 2 --steps 5 --rounds 3 \
        --sample --fid --json bench.json

What it measures, per method (any '+'-joined train.py method; vanilla is always the baseline):
- training step time, images/s and peak memory of `train.train_step` on a run built by
  `train.build_run`, so precision (bf16 autocast on CUDA), --compile, the optimiser, gradient
  clipping and the EMA are exactly those of train.py. Every run stays alive and the methods are
  timed round-robin (a block of --steps steps of each method per round, the order rotated every
  round), so a drifting machine moves all methods alike; each round gives a ratio to vanilla and
  the table shows the median over rounds (and the range, to read the noise against);
- forward-and-backward passes of the model per step: 1, except ANT-PCGrad (K, every step) and
  ANT-Nash (K on its update steps, every --nash-every = 25 steps, 1 otherwise), each on one
  cluster's slice of the batch, so that every method has the same model FLOPs. Nash's update steps
  are timed on their own each round and folded into an amortised step time
  ((every - 1) * plain + update) / every;
- model FLOPs per image counted from the architecture (`dit_forward_flops`), and on CUDA the
  model-FLOPs utilisation (MFU) against the GPU's bf16 dense peak (`peak_tflops`, or --peak-tflops).
Optional sections: --sample (images/s of sample.generate on the EMA model, DDIM-50 and DDPM-250
with guidance 1.5 by default, once per distinct network among the methods: the plain DiT, and a
DTR- or R-TR-routed DiT for each router kind benchmarked; with --compile the EMA is compiled as in
train.py, by sample.compile_for_sampling, during the untimed warm-up) and --fid (images/s of
fid.FIDInceptionV3 with random weights on images of the generated size, i.e. 8x the latent size
with --in-channels 4, resized to 299 inside the network as in a real evaluation).

With --profile N, N more plain steps of each method run under torch.profiler, and a table says
where a step's time goes: on CUDA the GPU kernels by their own time, grouped into matmul/conv,
attention, Inductor's fused elementwise kernels, the multi-tensor kernels (AdamW, EMA, clipping) and
the rest, with the share of the wall time the GPU was busy; on the CPU the aten ops by self time.

Data are synthetic, so the data loader is not what is timed: random uint8 images on the device ->
data.to_model_input (--in-channels 3, pixel space), or N(0, 1) latents (--in-channels 4: the DiT
papers' 32x32x4 inputs of 256 px images, with --image-size 32). On a CPU shared with other jobs,
set OMP_NUM_THREADS=1: with more threads than free cores every step waits on the slowest thread
and the timings swing by tens of percent. Any other train.py flag (--depth, --hidden-size,
--num-heads, --ant-clusters, --nash-every, --learn-sigma, --compile-mode, ...) is passed through
to train.parse_args, except --method and --global-batch-size: --methods and --batch-size set them.
"""

import argparse
import collections
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import data as datasets
import diffusion as gd
import train
from sample import CUDA_GRAPH_MODES, bf16_warning, generate, resolve_device

# Kernel families of --profile, first match on the lower-cased kernel (CUDA) or op (CPU) name wins. A
# heuristic over the usual names: cuBLAS (gemm, xmma, nvjet), cuDNN, flash / memory-efficient / cuDNN
# attention, Triton templates and kernels from Inductor, aten ops on the CPU (where Inductor's C++
# kernels run inside its "## Call CompiledFxGraph ##" ranges).
KERNEL_FAMILIES = (  # Inductor's own kernels first: their names list the aten ops they fuse ("..._convolution_backward")
    ("fused elementwise/norm (Inductor)", ("triton_poi", "triton_red", "triton_per", "cpp_fused", "compiledfxgraph")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul/conv", ("gemm", "xmma", "nvjet", "cutlass", "triton_tem", "cudnn", "conv", "aten::mm", "aten::addmm",
                     "aten::bmm")),
    ("multi-tensor (AdamW, EMA, clip)", ("multi_tensor", "adam", "foreach", "lerp")),
)

# bf16 dense peaks (no sparsity) from the vendors' data sheets, TFLOP/s; first match on the name wins.
PEAK_TFLOPS = (("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
               ("A100", 312.0))  # the NVL cards: 1,671 with sparsity


# ----------------------------------------------------------------------------------------------
#                                   Model FLOPs
# ----------------------------------------------------------------------------------------------

def dit_forward_flops(input_size, patch_size, in_channels, hidden_size, depth, mlp_hidden, out_channels,
                      frequency_embedding_size=256):
    """FLOPs of one image's DiT forward pass, by part, counting 2 FLOPs per multiply-add.

    Only the matrix products are counted: the patch convolution, the timestep MLP (the label is a
    table lookup), per block the adaLN Linear, attention (QKV, scores Q K^T, A V, output
    projection) and MLP, and the final layer (its adaLN Linear and output Linear). Norms,
    activations, modulation, residuals and DTR's masks (O(L D) per block) and the softmax
    (O(H L^2)) are left out, as in the DiT paper's count (which reports multiply-adds: its 118.6
    "Gflops" for DiT-XL/2 at 256 px are half the "total" here). A training step costs forward +
    backward = 3x forward.
    """
    L, D, p = (input_size // patch_size) ** 2, hidden_size, patch_size
    parts = {
        "patch_embed": 2 * L * (in_channels * p * p) * D,
        "t_embed": 2 * (frequency_embedding_size * D + D * D),
        "adaln": depth * 2 * D * (6 * D),
        "attention": depth * (2 * L * D * (3 * D) + 2 * L * L * D + 2 * L * L * D + 2 * L * D * D),
        "mlp": depth * 2 * (2 * L * D * mlp_hidden),
        "final": 2 * D * (2 * D) + 2 * L * D * (p * p * out_channels),
    }
    parts["total"] = sum(parts.values())
    return parts


def model_flops(model):
    """dit_forward_flops for a built dit.DiT (so --depth / --hidden-size overrides count)."""
    return dit_forward_flops(model.input_size, model.patch_size, model.in_channels, model.hidden_size,
                             len(model.blocks), model.blocks[0].mlp.fc1.out_features, model.out_channels,
                             model.t_embedder.frequency_embedding_size)


def peak_tflops(device_name, override=None):
    """bf16 dense peak in TFLOP/s for a torch.cuda.get_device_name() string, `override` if given,
    None when unknown or a MIG slice, which has a fraction of the card's SMs (then no MFU is reported)."""
    if override is not None:
        return float(override)
    if " mig " in f" {device_name.lower()} ":  # e.g. "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
        return None
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# ----------------------------------------------------------------------------------------------
#                                   Machine and timing helpers
# ----------------------------------------------------------------------------------------------

def machine(device):
    """Device name, torch version and threads, for the table header and the JSON."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        name = f"{name}, {os.cpu_count()} cores"
    return {"device": device.type, "name": name, "torch": torch.__version__, "threads": torch.get_num_threads()}


def sync(device):
    """Wait for the device's queued work (CUDA); the CPU runs synchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prime_cublas(device):
    """Make cuBLAS allocate its workspaces (per handle and stream, through the caching allocator, never freed) before
    any run is built: otherwise the first run's matrix products do, and its peak memory was charged for them
    (vanilla's read about 60 MiB above every other method's on the H200)."""
    if device.type != "cuda":
        return
    a = torch.randn(64, 64, device=device, requires_grad=True)  # (64, 64)
    for autocast in (True, False):  # cuBLAS and cuBLASLt (a bias epilogue), bf16 and fp32, forward and backward
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            F.linear(a, a, a[0]).sum().backward()
    sync(device)


def allocated(device):
    """Bytes held by tensors on a CUDA device; 0 on the CPU (no allocator statistics)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def timed(fn, device):
    """Seconds taken by fn(), with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def parse_methods(spec):
    """'vanilla,dtr,ant-uw+dtr' -> canonical method names, vanilla first (added if missing)."""
    methods = []
    for item in spec.split(","):
        name = train.parse_method(item.strip())
        if name in methods:
            raise ValueError(f"--methods lists {name!r} twice")
        methods.append(name)
    return ["vanilla"] + [m for m in methods if m != "vanilla"]


# ----------------------------------------------------------------------------------------------
#                                   Training steps
# ----------------------------------------------------------------------------------------------

class MethodBench:
    """One method's live run, its step counter and what was measured."""

    def __init__(self, name, train_argv, num_classes, in_channels, batch_size, device, out_dir):
        args = train.parse_args(train_argv + ["--method", name, "--global-batch-size", str(batch_size)])
        args.method = train.parse_method(args.method)
        try:  # train.py's refusals: --depth 0 would bench the config's depth, a negative norm no clipping
            train.check_flags(args)
        except train.ConfigError as e:  # bench's --batch-size is the run's --global-batch-size
            raise train.ConfigError(str(e).replace("--global-batch-size", "--batch-size")) from None
        args.num_classes, args.in_channels, args.out = num_classes, in_channels, out_dir
        torch.manual_seed(0)  # every method starts from the same weights
        before = allocated(device)
        self.name = name
        self.run = train.build_run(args, device, distributed=False, log=lambda msg: print(msg, file=sys.stderr))
        self.static_bytes = allocated(device) - before  # weights and EMA; the first step adds AdamW's state
        self.device, self.step = device, 0
        # CUDA graphs replay from a private memory pool the allocator statistics do not follow: no peak for them
        self.cuda_graphs = args.compile and args.compile_mode in CUDA_GRAPH_MODES
        m = self.run.method
        self.K = len(m.intervals) if m.intervals is not None else 1
        self.every = m.nash.every if m.nash is not None else None
        self.nash_period = self.every if self.every is not None and self.every > 1 else None
        self.plain_ms, self.update_ms, self.peak_bytes = [], [], None
        self.host_syncs = self.other_warnings = None  # count_host_syncs, after the timings

    def is_update(self, step):
        """A Nash-MTL update step (K passes, one per cluster, and the solver) of a run that has plain steps too."""
        return self.nash_period is not None and self.run.method.nash.should_update(step)

    def passes(self):
        """Forward-and-backward passes of the model (per plain step, per update step or None, amortised over a Nash
        period). PCGrad and Nash's update steps make one per cluster, on its slice of the batch: K passes that
        together cover the batch once, so every method has the model FLOPs of one training pass over the batch."""
        if self.run.method.ant == "ant-pcgrad" or self.every == 1:
            return self.K, None, float(self.K)
        if self.every is not None:
            return 1, self.K, ((self.every - 1) + self.K) / self.every
        return 1, None, 1.0

    def one_step(self, images, labels, step):
        """train.py's loop body without its logging bookkeeping: the curriculum reads the loss at
        once (a host sync, as train.py does to pace it); other methods' lagged read is free."""
        x = datasets.to_model_input(images) if images.dtype == torch.uint8 else images  # latents go in as they are
        terms, _, _, _ = train.train_step(self.run, x, labels, step)
        if self.run.method.curriculum is not None:
            self.run.method.after_step(step, float(terms["loss"].detach().mean()))

    def steps(self, n, images, labels, update):
        """Run n steps: plain ones (skipping Nash update steps) or, with update=True, update steps."""
        for _ in range(n):
            while self.is_update(self.step) != update:
                self.step += 1
            self.one_step(images, labels, self.step)
            self.step += 1

    def warm_up(self, n, images, labels):
        """n untimed steps with the run's natural counter (Nash's step 0 is an update, so Nash warms at least
        2: its plain step's first call (a compile) once landed in the first timed round); on CUDA adds the memory
        they leave resident (AdamW's moments, on the first step) to static_bytes."""
        before = allocated(self.device)
        if self.nash_period is not None and n > 0:
            n = max(n, 2)
        for _ in range(n):
            self.one_step(images, labels, self.step)
            self.step += 1
        sync(self.device)
        self.static_bytes += allocated(self.device) - before

    def timed_block(self, n, images, labels, update=False):
        """Mean ms per step over a block of n steps; on CUDA also the block's peak memory, once the
        block holds a step after the run's first (whose optimizer step allocates AdamW's moments)."""
        cuda = self.device.type == "cuda"
        measured = cuda and not self.cuda_graphs and (self.step > 0 or n > 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        seconds = timed(lambda: self.steps(n, images, labels, update), self.device)
        if measured:  # this block's peak above the live runs, plus this run's own resident memory
            peak = torch.cuda.max_memory_allocated(self.device) - base + self.static_bytes
            self.peak_bytes = max(self.peak_bytes or 0, peak)
        if cuda:  # what the block left resident is this run's too (AdamW's moments when --warmup 0)
            self.static_bytes += torch.cuda.memory_allocated(self.device) - base
        return 1000.0 * seconds / n

    def round_ms(self, r):
        """Amortised ms per step in round r (Nash: (every - 1) plain steps and one update step)."""
        if not self.update_ms:
            return self.plain_ms[r]
        return ((self.nash_period - 1) * self.plain_ms[r] + self.update_ms[r]) / self.nash_period


def family(name):
    """The KERNEL_FAMILIES group of a kernel or op name ("other" if none matches)."""
    low = name.lower()
    return next((fam for fam, keys in KERNEL_FAMILIES if any(k in low for k in keys)), "other")


def profile_method(b, n, images, labels):
    """Where n plain steps of one method spend their time, from torch.profiler: on CUDA the GPU
    kernels by their own time (and the share of the wall time the GPU was busy), on the CPU the
    aten ops by self CPU time. Returns wall and busy ms per step, the time per KERNEL_FAMILIES
    group and the top 12 kernels or ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = b.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = timed(lambda: b.steps(n, images, labels, update=False), b.device)
    # record_function ranges (the optimizer's, compiled regions') would count their contents again
    events = [e for e in prof.key_averages() if not getattr(e, "is_user_annotation", False)]
    if cuda:  # kernels only: an aten op's device time is its kernels' again
        rows = [(e.key, e.self_device_time_total, e.count) for e in events if e.device_type == DeviceType.CUDA]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    busy_us = sum(us for _, us, _ in rows)
    families = {}
    for name, us, _ in rows:
        fam = family(name)
        families[fam] = families.get(fam, 0.0) + us / 1000.0 / n
    return {
        "steps": n, "wall_ms_per_step": 1000.0 * wall / n, "busy_ms_per_step": busy_us / 1000.0 / n,
        "families_ms_per_step": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "top": [{"name": name, "ms_per_step": us / 1000.0 / n, "share": us / busy_us, "calls_per_step": count / n}
                for name, us, count in rows[:12]],
    }


def check_memory(num_params, methods, num_clusters, device):
    """Refuse on CUDA when the runs alone would not fit: each run's weights, EMA and AdamW's two
    moments, and one step's grads and PCGrad/Nash's (K, P) gradient matrix (one run steps at a
    time; set_to_none frees its grads). Called once the first run is built: its weights and EMA
    are already allocated, its moments not yet."""
    if device.type != "cuda":
        return
    matrix = max((num_clusters for m in methods if "pcgrad" in m or "nash" in m), default=0)
    copies = 4 * len(methods) - 2 + 1 + matrix  # fp32 copies of the weights: 4 a run, less the 2 held, 1 + K a step
    need = num_params * 4 * copies
    free = torch.cuda.mem_get_info(device)[0]
    if need > free:
        raise ValueError(f"the {len(methods)} runs need about {need / 2**30:.1f} GiB before activations, "
                         f"but {free / 2**30:.1f} GiB are free; benchmark fewer --methods per call")


def bench_training(benches, images, labels, warmup, steps, rounds, log):
    """Warm every run up, then time them round-robin; fills each MethodBench's measurements."""
    for b in benches:
        b.warm_up(warmup, images, labels)
    for r in range(rounds):
        order = benches[r % len(benches):] + benches[:r % len(benches)]  # rotate the starting method
        for b in order:
            b.plain_ms.append(b.timed_block(steps, images, labels))
            if b.nash_period:  # Nash with plain steps in between: time one update step too
                b.update_ms.append(b.timed_block(1, images, labels, update=True))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{b.name} {b.plain_ms[-1]:.1f}" for b in benches) + " ms/step")


HERE = os.path.dirname(os.path.abspath(__file__))
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync)


def call_site(frames):
    """'train.py:140 backward > torch/autograd/graph.py:841 _engine_run_backward' for a traceback.extract_stack()
    list: its innermost frame in this repository, then its innermost frame when that lies outside (torch's)."""
    # frames of the warnings machinery and of torch's no-dynamo wrappers (around __torch_dispatch__, optimizer
    # steps) say nothing about the caller
    skip = ("/warnings.py", "/_py_warnings.py", "/torch/_compile.py", "/torch/_dynamo/eval_frame.py")
    frames = [f for f in frames if not f.filename.replace(os.sep, "/").endswith(skip)]
    ours = [f for f in frames if os.path.dirname(os.path.abspath(f.filename)) == HERE]
    sites = ours[-1:] + [f for f in frames[-1:] if not ours or f is not ours[-1]]
    return " > ".join(f"{os.path.basename(f.filename) if f in ours else f.filename.split('site-packages/')[-1]}:"
                      f"{f.lineno} {f.name}" for f in sites)


class HostSyncLog(TorchDispatchMode):
    """Logs the ops that make the host wait for a CUDA device: reading a value back (item(), bool(),
    float(), or a 0-d tensor passed where an op takes a number) and ops whose output size depends on
    the data. They run as usual; on the CPU the log is what would stall a GPU. Blind to tolist(),
    numpy() and blocking host-to-device copies, which torch.cuda.set_sync_debug_mode sees on CUDA.
    `syncs` holds the ops, `sites` where each was called (call_site)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
               "aten.bincount", "aten.repeat_interleave.Tensor", "aten.equal", "aten.is_nonzero")
    # x[mask] and x[mask] = v: a boolean index becomes nonzero() inside the op, below this mode
    BOOL_INDEXED = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)

    def __init__(self):
        super().__init__()
        self.syncs, self.sites = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func in self.BOOL_INDEXED and any(i is not None and i.dtype == torch.bool for i in args[1])
        if str(func).startswith(self.SYNCING) or bool_index:
            self.syncs.append(str(func))
            self.sites.append(call_site(traceback.extract_stack()[:-1]))  # [:-1]: not this method
        return func(*args, **(kwargs or {}))


def count_host_syncs(b, images, labels):
    """The times the host waits for the device in one more plain step of b, as (syncs, other warnings), each a
    list of {"message", "site"} (site: call_site of the Python line that made the call). On CUDA the syncs are
    torch.cuda.set_sync_debug_mode's warnings, matched on their exact text, and the other warnings raised during
    the step are kept apart (set_sync_debug_mode's own once-per-process prototype notice says "synchronizing"
    too); on the CPU the syncs are the ops HostSyncLog sees (those that would wait on a GPU)."""
    if b.device.type != "cuda":
        with HostSyncLog() as log:
            b.steps(1, images, labels, update=False)
        return [{"message": op, "site": site} for op, site in zip(log.syncs, log.sites)], []
    seen = []

    def record(message, category, filename, lineno, file=None, line=None):  # warnings.showwarning, called in place
        frames = traceback.extract_stack()[:-1]
        # up to the frame the warning names: torch's C++ warnings name the Python line that called into C++
        at = max((i for i, f in enumerate(frames) if (f.filename, f.lineno) == (filename, lineno)),
                 default=len(frames) - 1)
        seen.append({"message": str(message), "site": call_site(frames[:at + 1])})

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            b.steps(1, images, labels, update=False)
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return [w for w in seen if SYNC_WARNING in w["message"]], [w for w in seen if SYNC_WARNING not in w["message"]]


# ----------------------------------------------------------------------------------------------
#                                   Sampling and FID throughput
# ----------------------------------------------------------------------------------------------

def bench_sampling(benches, samplers, cfg_scale, batch_size, device, fwd_flops):
    """images/s of sample.generate on each distinct network's EMA model (plain DiT, routed DiT)."""
    networks = {}  # router kind (None: plain DiT) -> the first method with that network
    for b in benches:
        router = b.run.model.router
        networks.setdefault(None if router is None else router.kind, b)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for kind, b in networks.items():
        label = "DiT" if kind is None else f"DiT + {kind} router ({b.name})"
        ema, diffusion = b.run.ema, b.run.diffusion
        noise = torch.randn(batch_size, ema.in_channels, ema.input_size, ema.input_size, generator=gen).to(device)
        y = torch.randint(ema.num_classes, (batch_size,), generator=gen).to(device)
        sample = lambda steps: generate(ema, diffusion, y, noise, steps=steps, cfg_scale=cfg_scale,
                                        clip_denoised=ema.in_channels == 3, precision=b.run.args.precision)
        sample("ddim2")  # warm-up; with --compile also the compile, for this batch size (the same in every sampler)
        for steps in samplers:
            n_steps = len(gd.space_timesteps(diffusion.num_timesteps, steps))
            seconds = timed(lambda: sample(steps), device)
            evals = n_steps * (2 if cfg_scale != 1.0 else 1)  # guidance runs the model on a doubled batch
            rows.append({"network": label, "sampler": steps, "steps": n_steps, "cfg_scale": cfg_scale,
                         "batch": batch_size, "seconds": seconds, "images_per_s": batch_size / seconds,
                         "ms_per_step": 1000.0 * seconds / n_steps,
                         "gflops_per_image": evals * fwd_flops / 1e9})
    return rows


def bench_fid(batch_size, image_size, rounds, device):
    """images/s of FID feature extraction (FIDInceptionV3, random weights) on uint8 images of the
    generated size; the network resizes them to 299 as in a real evaluation."""
    import fid
    net = fid.FIDInceptionV3().requires_grad_(False).eval().to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)  # as fid.load_inception does on the CPU
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=gen, dtype=torch.uint8).to(device)
    extract = lambda: fid.extract_features(images, net, batch_size=batch_size, progress=False)
    extract()  # warm-up
    seconds = statistics.median(timed(extract, device) for _ in range(max(1, rounds)))
    return {"batch": batch_size, "image_size": image_size, "seconds": seconds, "images_per_s": batch_size / seconds}


# ----------------------------------------------------------------------------------------------
#                                   Report
# ----------------------------------------------------------------------------------------------

def summarise(benches, batch_size, fwd_flops, peak):
    """Per-method numbers: medians over rounds of step time and of the ratio to vanilla."""
    base = benches[0]
    out = {}
    for b in benches:
        rounds_ms = [b.round_ms(r) for r in range(len(b.plain_ms))]
        ratios = [ms / base.round_ms(r) for r, ms in enumerate(rounds_ms)]
        ms = statistics.median(rounds_ms)
        plain, update, passes = b.passes()
        flops_per_image = 3 * fwd_flops  # a forward and a backward of about 2 forwards, over the batch once for every method
        images_per_s = batch_size / (ms / 1000.0)
        out[b.name] = {
            "ms_per_step": ms, "images_per_s": images_per_s,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ms_per_round": rounds_ms, "ratio_per_round": ratios,
            "passes": passes, "passes_plain": plain, "passes_update": update, "train_flops_per_image": flops_per_image,
            "peak_memory_mib": None if b.peak_bytes is None else b.peak_bytes / 2**20,
            "host_syncs_per_step": len(b.host_syncs), "host_syncs": b.host_syncs, "other_warnings": b.other_warnings,
            "mfu": None if peak is None else flops_per_image * images_per_s / (peak * 1e12),
        }
        if b.update_ms:
            out[b.name].update(plain_ms=statistics.median(b.plain_ms), update_ms=statistics.median(b.update_ms),
                               update_every=b.every)
    return out


def _num(x):
    """A throughput for the table: one decimal from 10 up, three significant digits below."""
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def print_profile(profiles, device_type):
    """The --profile tables on stdout."""
    what = "GPU kernels (own time)" if device_type == "cuda" else "aten ops (self CPU time)"
    for name, p in profiles.items():
        busy = (f", GPU busy {100 * p['busy_ms_per_step'] / p['wall_ms_per_step']:.1f}% of it" if device_type == "cuda"
                else "")
        print(f"\nprofile of {name}, {p['steps']} steps: {p['wall_ms_per_step']:.1f} ms/step wall under the profiler, "
              f"{p['busy_ms_per_step']:.1f} ms/step in {what}{busy}")
        print("  " + " | ".join(f"{fam} {100 * ms / p['busy_ms_per_step']:.1f}%"
                                for fam, ms in p["families_ms_per_step"].items()))
        print(f"  {'ms/step':>8}{'share':>7}{'calls':>7}  name")
        for r in p["top"]:
            print(f"  {r['ms_per_step']:>8.2f}{100 * r['share']:>6.1f}%{r['calls_per_step']:>7.0f}  {r['name'][:100]}")


def print_report(result):
    """The readable table on stdout."""
    c, m = result["config"], result["machine"]
    print(f"machine: {m['device']} ({m['name']}), torch {m['torch']}, {m['threads']} threads")
    fl = result["flops"]
    print(f"model: {c['model']} at {c['image_size']}x{c['image_size']}x{c['in_channels']}, {c['num_params']:,} parameters, "
          f"batch {c['batch_size']}, {c['precision']}{', compiled (' + c['compile_mode'] + ')' if c['compile'] else ''}; "
          f"{fl['forward_per_image'] / 1e9:.4g} GFLOP/image forward, {3 * fl['forward_per_image'] / 1e9:.4g} per training image")
    print(f"timing: warm-up {c['warmup']} step(s) per method, then {c['rounds']} rounds x {c['steps']} steps, "
          f"methods interleaved (order rotated each round); median over rounds\n")
    head = (f"{'method':<22}{'ms/step':>9}{'img/s':>9}{'x vanilla':>11}{'range':>15}{'passes':>8}"
            f"{'syncs':>7}{'peak MiB':>9}{'MFU':>7}")
    print(head)
    print("-" * len(head))
    for name, r in result["methods"].items():
        mem = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{name:<22}{r['ms_per_step']:>9.1f}{r['images_per_s']:>9.1f}{r['ratio']:>11.3f}"
              f"{r['ratio_min']:>8.3f}-{r['ratio_max']:<6.3f}{r['passes']:>8.2f}"
              f"{r['host_syncs_per_step']:>7}{mem:>9}{mfu:>7}")
    for name, r in result["methods"].items():
        if "update_ms" in r:
            print(f"{name}: plain step {r['plain_ms']:.1f} ms (1 pass), update step {r['update_ms']:.1f} ms "
                  f"({r['passes_update']} passes and the solver) every {r['update_every']} steps; amortised above")
    for name, r in result["methods"].items():  # each method's syncs grouped by call site, then its other warnings
        for site, n in collections.Counter(w["site"] for w in r["host_syncs"]).items():
            print(f"{name}: {n} sync{'s' if n > 1 else ''} at {site}")
        for w in r["other_warnings"]:
            print(f"{name}: warning, not a sync: {w['message'][:80]!r} at {w['site']}")
    print("\nx vanilla: step time over vanilla's in the same round (median, and range over rounds). passes: forward "
          "and backward passes of the model per step; PCGrad and Nash's update steps make one per cluster, on its slice "
          "of the batch, so every method has the same model FLOPs. syncs: times the "
          "host waits for the device in one plain step (" + ("torch.cuda.set_sync_debug_mode" if m["device"] == "cuda" else
          "ops that would wait on a GPU: value reads, data-dependent shapes") + "), listed above by call site; the "
          "curriculum's pacing read is one.")
    print(f"Synthetic data ({'random uint8 images on the device -> data.to_model_input' if c['in_channels'] == 3 else 'N(0, 1) latents on the device'}): no data loader, no logging "
          "bookkeeping; the curriculum's per-step loss read (a host sync, as in train.py) is timed.")
    if m["device"] == "cuda":
        peak = c["peak_tflops"]
        print("Peak memory: max_memory_allocated during a method's steps above the other live runs, plus its own "
              "weights, EMA and AdamW state (n/a if its only timed step was its first, or with CUDA graphs). "
              "MFU: training FLOPs (3 x forward) x img/s over "
              + (f"{peak:g} TFLOP/s (bf16 dense peak)." if peak else "an unknown peak: pass --peak-tflops."))
    else:
        print(f"Peak memory: n/a per method on the CPU (no allocator statistics; all runs share one process). "
              f"Process max RSS with every run alive: {result['max_rss_mib']:.0f} MiB."
              + (f" MFU against the given {c['peak_tflops']:g} TFLOP/s." if c["peak_tflops"] else ""))
    if result.get("sample"):
        what = "sampling (EMA model" + (", compiled)" if c["compile"] else ")")
        print(f"\n{what:<44}{'sampler':>9}{'cfg':>6}{'img/s':>9}{'ms/step':>9}{'GFLOP/img':>11}{'MFU':>7}")
        for s in result["sample"]:
            mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "n/a"
            print(f"{s['network']:<44}{s['sampler']:>9}{s['cfg_scale']:>6g}{_num(s['images_per_s']):>9}"
                  f"{s['ms_per_step']:>9.1f}{s['gflops_per_image']:>11.4g}{mfu:>7}")
        print(f"(batch {result['sample'][0]['batch']} per call; guidance doubles the model batch)")
    if result.get("fid"):
        f = result["fid"]
        print(f"\nFID features (Inception-v3, random weights, {f['image_size']}px -> 299px, batch {f['batch']}): "
              f"{f['images_per_s']:.1f} images/s")
    if result.get("profile"):
        print_profile(result["profile"], m["device"])


# ----------------------------------------------------------------------------------------------
#                                   Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """bench.py's own flags; the rest goes to train.parse_args (returned as a list)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--model", default="DiT-S/2", help="a dit.DiT_models name")
    a("--image-size", type=int, default=32, help="the DiT's input resolution (pixels, or latent size with --in-channels 4)")
    a("--in-channels", type=int, default=3, choices=(3, 4), help="3: pixel images; 4: VAE latents (32x32x4 = 256 px images)")
    a("--batch-size", type=int, default=32, help="images per training step")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--methods", default=",".join(train.METHOD_PARTS), help="comma-separated train.py methods, e.g. vanilla,dtr,dtr+ant-uw")
    a("--num-classes", type=int, default=1000, help="label classes of the model (ImageNet: 1000)")
    a("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast on CUDA, as train.py (CPU: fp32)")
    a("--compile", action="store_true", help="torch.compile the model, as train.py")
    a("--warmup", type=int, default=2, help="untimed steps per method first")
    a("--steps", type=int, default=5, help="timed steps per method per round")
    a("--rounds", type=int, default=3, help="round-robin rounds over the methods")
    a("--peak-tflops", type=float, default=None, help="the accelerator's peak for MFU when its name is not known")
    a("--sample", action="store_true", help="also time sampling on the EMA model")
    a("--sample-batch-size", type=int, default=None, help="images per sampling / FID call (default: --batch-size)")
    a("--sample-steps", nargs="+", default=["ddim50", "250"], help="samplers to time (sample.generate's steps)")
    a("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale for --sample (papers: 1.5)")
    a("--fid", action="store_true", help="also time FID feature extraction")
    a("--profile", type=int, default=0, metavar="N", help="also profile N plain steps per method: where the time goes")
    a("--json", default=None, help="write every number to this file")
    args, rest = p.parse_known_args(argv)
    if args.sample_batch_size is None:  # not `or`: --sample-batch-size 0 is refused below, not taken as the default
        args.sample_batch_size = args.batch_size
    for name in ("batch_size", "sample_batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}")
    for name in ("warmup", "profile"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):  # NaN or <= 0: a meaningless MFU
        raise ValueError(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if not math.isfinite(args.cfg_scale):  # as sample.py: NaN guidance times a sampler that draws NaN images
        raise ValueError(f"--cfg-scale must be a finite guidance scale (1 = no guidance; the papers use 1.5), got {args.cfg_scale}")
    if args.json is not None:  # written at the end: an unwritable path failed only after every timing
        folder = os.path.dirname(os.path.abspath(args.json))
        if not args.json or os.path.isdir(args.json) or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise ValueError(f"--json {args.json!r}: cannot write a file there; pass a file path in a writable folder")
    # Each run gets --method and --global-batch-size from bench's own flags, which would replace these without a word.
    # Values no one passes go first: still there after `rest`, they say it set neither (abbreviations included).
    unset = train.parse_args(["--method", "", "--global-batch-size", "-1"] + rest)
    for flag, given, own in (("--method", unset.method != "", "--methods"),
                             ("--global-batch-size", unset.global_batch_size != -1, "--batch-size")):
        if given:
            raise ValueError(f"{flag} is set by bench.py for each run; use {own}")
    train_argv = ["--model", args.model, "--image-size", str(args.image_size), "--precision", args.precision] + rest
    if args.compile:
        train_argv.append("--compile")
    return args, train_argv


def bench(argv=None, log=lambda msg: print(msg, file=sys.stderr, flush=True)):
    """Run everything the flags ask for and return the result dict (also printed, and written to --json)."""
    args, train_argv = parse_args(argv)
    methods = parse_methods(args.methods)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    info = machine(device)
    log(f"bench: {', '.join(methods)} on {info['name']}")
    prime_cublas(device)
    with tempfile.TemporaryDirectory() as out_dir:
        benches = [MethodBench(methods[0], train_argv, args.num_classes, args.in_channels, args.batch_size, device, out_dir)]
        num_params = sum(p.numel() for p in benches[0].run.params)
        check_memory(num_params, methods, benches[0].run.args.ant_clusters, device)
        benches += [MethodBench(m, train_argv, args.num_classes, args.in_channels, args.batch_size, device, out_dir)
                    for m in methods[1:]]
    model = benches[0].run.model
    warning = bf16_warning(device, benches[0].run.args.precision)
    if warning:
        log(warning)
    if args.sample and args.cfg_scale != 1.0 and model.y_embedder.dropout_prob == 0:  # before the training timings
        raise ValueError(f"--cfg-scale {args.cfg_scale} needs the null class of label dropout, which "
                         f"--class-dropout-prob 0 removes; use --cfg-scale 1")
    for steps in args.sample_steps if args.sample else ():  # also before the training timings
        try:
            benches[0].run.diffusion.respace(steps)
        except ValueError as e:
            raise ValueError(f"--sample-steps {steps}: {e}") from None
    fwd = model_flops(model)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        if benches[0].run.args.precision == "bf16":
            peak = peak_tflops(info["name"])
        else:  # the known peaks are bf16's; fp32 runs its matrix products in TF32, at about half of it
            log("bench: no MFU with --precision fp32; pass --peak-tflops, e.g. the GPU's TF32 dense peak")

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, model.in_channels, args.image_size, args.image_size)
    if args.in_channels == 3:
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)  # (B, 3, H, W) pixels
    else:
        images = torch.randn(shape, generator=gen).to(device)  # (B, 4, H, W) latents, scaled to unit variance
    labels = torch.randint(args.num_classes, (args.batch_size,), generator=gen).to(device)  # (B,)
    bench_training(benches, images, labels, args.warmup, args.steps, args.rounds, log)
    for b in benches:
        b.host_syncs, b.other_warnings = count_host_syncs(b, images, labels)

    result = {
        "machine": info,
        "config": {"model": args.model, "image_size": args.image_size, "in_channels": model.in_channels,
                   "batch_size": args.batch_size, "num_params": num_params, "precision": args.precision if device.type == "cuda" else "fp32",
                   "compile": args.compile, "compile_mode": benches[0].run.args.compile_mode, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                   "peak_tflops": peak, "train_argv": train_argv},
        "flops": {"forward_per_image": fwd["total"], "forward_parts": fwd},
        "methods": summarise(benches, args.batch_size, fwd["total"], peak),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }
    if args.sample:
        log("bench: sampling")
        result["sample"] = bench_sampling(benches, args.sample_steps, args.cfg_scale, args.sample_batch_size, device,
                                          fwd["total"])
        if peak:
            for s in result["sample"]:
                s["mfu"] = s["gflops_per_image"] * 1e9 * s["images_per_s"] / (peak * 1e12)
    if args.profile:
        log("bench: profiling")
        result["profile"] = {b.name: profile_method(b, args.profile, images, labels) for b in benches}
    if args.fid:
        log("bench: FID features")
        pixels = args.image_size * (8 if args.in_channels == 4 else 1)  # latents decode to 8x (SD VAE)
        result["fid"] = bench_fid(args.sample_batch_size, pixels, args.rounds, device)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return result


def main(argv=None):
    try:
        bench(argv)
    except (ValueError, train.ConfigError, OSError) as e:  # OSError: e.g. a --json path that cannot be written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
