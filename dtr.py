"""
Denoising Task Routing (DTR) for DiT.

Paper: Park, Woo, Go, Kim, Kim, "Denoising Task Routing for Diffusion Models", ICLR 2024
(arXiv 2310.07138). Official code: github.com/byeongjun-park/DTR (models/taskrouting.py).

Each diffusion timestep t is a task. Task t gets a fixed binary channel mask m_t in {0,1}^C and
every DiT block only *reads* the channels that m_t lets through; the other channels are hidden from
the block's input and carried on by the residual (the block still writes to every channel).

Paper equations -> functions here:
- Task routing ("Task routing for diffusion models"):
      z^{l+1} = z^l + Block(m_t * z^l)                   -> TaskRouter.route
  with the mask row chosen by the original timestep t    -> TaskRouter.forward
- DTR mask ("Mask creation"): a window of C_b = int(beta * C) active channels that slides with t,
      s_t = round((t / (T - 1))**alpha * (C - C_b)),  m_t[c] = 1  iff  s_t <= c < s_t + C_b
                                                         -> routing_masks
  alpha > 1 moves the window slowly for small t and fast for large t, so the noisy (high-t)
  tasks get more channels of their own (the paper's "task weights"); neighbouring t overlap
  almost fully (the paper's "task affinity").
- R-TR baseline: C_b channels chosen at random per task, and
  per block (each block draws its own table)                -> random_masks
- Shared / task-specific channel counts, for the CLI      -> mask_stats

The paper prints the window with 1-indexed t and c and bounds taken at t-1 and t; we follow the
official code (0-indexed, window exactly C_b wide, start from np.linspace(0, 1, T)), which is what
the reported numbers were produced with.

Where we depart from the official code, and why:
- R-TR masks come from a CPU torch.Generator seeded with `seed`. The official random masks use the
  unseeded global numpy RNG (a bug): every process and every run draws different masks, which
  only agree across ranks because DDP happens to broadcast rank 0's buffers, and which can only be
  recovered from the checkpoint. Any model built without that broadcast or that checkpoint (a
  separately constructed EMA or sampler, another run) gets different masks. Seeded masks are the
  same in every process, copy and run, which is also what lets us stop persisting them:
- Masks live in a non-persistent buffer. Officially they are persistent buffers, so an official
  DiT checkpoint does not load strictly into a DTR model (and vice versa) and every block adds
  T * C floats to every checkpoint. The masks are a pure function of (T, C, alpha, beta[, seed]),
  so a DTR DiT's state dict here has exactly the keys of a plain DiT.
- One router serves every block, and the mask rows are looked up once per model forward (the
  official code builds a router per block and sets an "active task" on each block through a
  module-global variable before every forward). Like the official code, each block has its own
  table: for DTR these are the same formula, so the router holds it once; for R-TR each block
  draws its own random table (a (num_blocks, T, C) buffer), so that a channel hidden from one
  block is seen by others.

CLI: draw the (T, C) mask (for R-TR, the first block's) and print the channel counts.
    python dtr.py --channels 384 --alpha 4 --beta 0.8 --out masks.png
"""

import argparse
import math

import numpy as np
import torch
import torch.nn as nn

#################################################################################
#                              Mask construction                                #
#################################################################################


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _active_channels(channels, beta):
    """C_b = int(beta * C), exactly as the official code (truncation, not rounding)."""
    channels = _check_int("channels", channels, 1)
    beta = float(beta)
    if not (0.0 < beta <= 1.0):
        raise ValueError(f"beta (fraction of active channels per task) must be in (0, 1], got {beta}")
    num_active = int(beta * channels)
    if num_active < 1:
        raise ValueError(
            f"int(beta * channels) = int({beta} * {channels}) = 0 active channels; "
            "raise beta or use more channels"
        )
    return channels, num_active


def routing_masks(num_timesteps, channels, alpha=4.0, beta=0.8):
    """
    DTR routing masks (paper: "Mask creation"; official `create_mask_tasks(..., "DTR")`).

    Row t is 1 on the window [s_t, s_t + C_b) with C_b = int(beta * C) and
    s_t = round((t / (T - 1))**alpha * (C - C_b)), t = 0..T-1 (t = 0 is the cleanest step).
    Returns a float32 tensor (T, C) of 0/1. beta = 1 gives all ones (the vanilla model).
    """
    num_timesteps = _check_int("num_timesteps", num_timesteps, 2)
    channels, num_active = _active_channels(channels, beta)
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0.0):
        raise ValueError(f"alpha (window speed exponent) must be a finite number > 0, got {alpha}")
    # float64 throughout; t / (T - 1) comes from np.linspace(0, 1, T) and np.round is
    # round-half-to-even, both as in the official code. linspace can differ from the plain division
    # in the last bit (T = 11: 0.30000000000000004 at t = 3), which moves a start that sits on a
    # .5 tie (T = 11, C = 100, alpha = 2, beta = 0.5: 5, where round(4.5) would give 4); we keep the
    # official masks bit for bit. Exact ties do occur, e.g. T = 3, alpha = 1, C - C_b = 1 at t = 1.
    frac = np.linspace(0.0, 1.0, num_timesteps, dtype=np.float64)  # (T,) t / (T - 1)
    starts = np.round(frac**alpha * (channels - num_active)).astype(np.int64)  # (T,)
    c = np.arange(channels, dtype=np.int64)  # (C,)
    masks = (c[None, :] >= starts[:, None]) & (c[None, :] < starts[:, None] + num_active)  # (T, C)
    return torch.from_numpy(masks.astype(np.float32))


def random_masks(num_timesteps, channels, beta, seed, num_blocks=1):
    """
    R-TR baseline masks (paper: random task routing; official `create_mask_tasks(..., "random")`,
    called once per block, so every block draws its own table).

    Row t of each block's table activates C_b = int(beta * C) channels drawn uniformly at random
    without replacement, independently per row and per block. The tables are drawn in block order
    from one CPU torch.Generator seeded with `seed`, so every rank, the EMA copy, the sampler and a
    rerun all build the same masks (the official draw is unseeded: a bug; see the module
    docstring), and block 0's table does not depend on num_blocks.
    Returns a float32 tensor (num_blocks, T, C) of 0/1.
    """
    num_timesteps = _check_int("num_timesteps", num_timesteps, 2)
    channels, num_active = _active_channels(channels, beta)
    seed = _check_int("seed", seed, 0)
    num_blocks = _check_int("num_blocks", num_blocks, 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    masks = torch.zeros(num_blocks, num_timesteps, channels, dtype=torch.float32)  # (B, T, C)
    for table in masks:
        order = torch.rand(num_timesteps, channels, generator=gen, dtype=torch.float64).argsort(dim=1)  # (T, C)
        table.scatter_(1, order[:, :num_active], 1.0)
    return masks


def mask_stats(masks):
    """
    Channel counts of a (T, C) 0/1 mask table (the numbers behind the paper's task-affinity /
    task-weight argument). Returns a dict of ints:
      active        channels each task uses (C_b; must be the same for every task)
      shared        channels used by every task
      task_specific channels each task uses that some other task does not (active - shared)
      unused        channels no task uses
      low_t_only    channels used only by tasks t < T // 2 (the cleaner half)
      high_t_only   channels used only by tasks t >= T // 2 (the noisier half)
    With alpha > 1, DTR gives high_t_only > low_t_only.
    """
    if masks.ndim != 2 or masks.shape[0] < 2:
        raise ValueError(f"masks must have shape (T, C) with T >= 2, got {tuple(masks.shape)}")
    m = masks.detach().cpu().to(torch.float64)  # (T, C)
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError("masks must contain only 0 and 1")
    per_task = m.sum(dim=1)  # (T,)
    if not torch.all(per_task == per_task[0]):
        raise ValueError("masks must activate the same number of channels in every task")
    active = int(per_task[0])
    half = m.shape[0] // 2
    used_low = m[:half].amax(dim=0) > 0  # (C,)
    used_high = m[half:].amax(dim=0) > 0  # (C,)
    shared = int((m.amin(dim=0) > 0).sum())
    return {
        "active": active,
        "shared": shared,
        "task_specific": active - shared,
        "unused": int((~used_low & ~used_high).sum()),
        "low_t_only": int((used_low & ~used_high).sum()),
        "high_t_only": int((used_high & ~used_low).sum()),
    }


#################################################################################
#                                 The router                                    #
#################################################################################


class TaskRouter(nn.Module):
    """
    Task routing for DiT blocks (paper: z^{l+1} = z^l + Block(m_t * z^l)).

    Holds the masks in a non-persistent buffer `masks` (tables, T, C), so it has no parameters and
    an empty state dict: a DiT with a TaskRouter saves and loads exactly the keys of a plain DiT.
    kind="dtr" uses `routing_masks` (alpha, beta), one table that every block shares; kind="random"
    is the R-TR baseline (`random_masks` with beta and seed; alpha is unused), one table per block
    as in the official code (num_blocks x T x C floats: 129 MB for DiT-XL/2).

    The model calls `routes = router(t)` once per forward and `router.route(block, x, c, routes[i])`
    for block i; the final layer is not routed.

    channels: the block width C (the last dim of the (N, L, C) tokens). num_timesteps: T of YOUR
    noise schedule; it must match, since t in 0..T-1 picks row t (a default T = 1000 router fed a
    T = 100 schedule's t would give every task nearly the same window). num_blocks: the number of
    routed blocks (a DiT's depth). Keep it as a submodule of the model: `.to(device)` then moves
    the masks and `copy.deepcopy` (an EMA) copies them.
    """

    def __init__(self, channels, num_timesteps=1000, alpha=4.0, beta=0.8, kind="dtr", seed=0, num_blocks=1):
        super().__init__()
        self.num_blocks = _check_int("num_blocks", num_blocks, 1)
        if kind == "dtr":
            masks = routing_masks(num_timesteps, channels, alpha=alpha, beta=beta)[None]  # (1, T, C)
        elif kind == "random":
            masks = random_masks(num_timesteps, channels, beta=beta, seed=seed, num_blocks=num_blocks)  # (B, T, C)
        else:
            raise ValueError(f"kind must be 'dtr' (DTR) or 'random' (R-TR baseline), got {kind!r}")
        self.kind = kind
        self.channels = int(channels)
        self.num_timesteps = int(num_timesteps)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.seed = int(seed)
        self.stats = mask_stats(masks[0])  # block 0's: R-TR's other tables differ only in which channels they draw
        self.register_buffer("masks", masks, persistent=False)  # (1 or B, T, C)

    def forward(self, t):
        """
        Mask rows for a batch of ORIGINAL timesteps t (N,) in 0..T-1 (any integer dtype, or float
        holding integral values, e.g. from a respaced sampler's index map; rounded, so 998.9999 is
        999). Call it on the raw t, before the model's timestep embedding. Returns (num_blocks, N, C),
        block i's rows at [i] (for DTR, views of one table), in the dtype of the mask buffer (float32
        unless the model was cast), on its device.
        The range is not checked, since that would wait for the device: t >= T raises an IndexError
        on the CPU and a device-side assert on a GPU, a negative t silently wraps to row T + t, and a
        continuous t in [0, 1] silently picks row 0 or 1 for every sample (map it to
        round(t * (T - 1)) first). No host sync, so it traces under torch.compile.
        """
        if t.ndim != 1:
            raise ValueError(f"t must be a 1-D tensor of timesteps (N,), got shape {tuple(t.shape)}; call the "
                             f"router on the raw timesteps, before the timestep embedding")
        rows = self.masks[:, (t.round() if t.is_floating_point() else t).long()]  # (1 or B, N, C)
        return rows.expand(self.num_blocks, -1, -1)  # (B, N, C)

    def route(self, block, x, c, m):
        """
        One routed DiT block: block(m * x, c) + (1 - m) * x, with m (N, C) broadcast to (N, 1, C)
        and cast to x.dtype (so bf16 activations stay bf16).

        This is the official DTR block. Write the DiT block as block(r, c) = r + D(r, c), where
        D(r, c) = g_msa * attn(mod(norm1(r))) + g_mlp * mlp(mod(norm2(r + g_msa * attn(...)))) is
        the sum of its two residual branches. The official code starts from r = m * x, adds the
        two branches to r in turn (that is, computes block(m * x, c)), then returns
        r + (1 - m) * x. Hence out = m*x + D(m*x, c) + (1 - m)*x = x + D(m*x, c), the paper's
        z^{l+1} = z^l + Block(m_t * z^l): masked-out channels are hidden from the block's input
        but still pass through the residual unchanged, and the block may write to every channel.
        With an all-ones mask (beta = 1) this is block(x, c) exactly.

        x: (N, L, C) tokens, c: (N, C) conditioning, m: (N, C), this block's rows of forward(t).

        Outside DiT, `block` is any callable block(r, c) -> (N, L, C) that includes its own residual
        connection (returns r + its branches, as a pre-norm transformer block does); a block that
        returns its branches alone would lose the masked-in channels of x. c is handed to block as
        it is (None is fine), so wrap another signature: route(lambda r, c: blk(r, mask), x, None, m).
        """
        if x.ndim != 3 or m.shape != (x.shape[0], x.shape[2]):
            raise ValueError(
                f"expected x (N, L, C) and m (N, C) with matching N and C, got x {tuple(x.shape)} and "
                f"m {tuple(m.shape)}; give the router channels = the block width, and tokens channels-last "
                f"(a (N, C, H, W) map as x.flatten(2).transpose(1, 2))"
            )
        m = m.to(x.dtype)[:, None, :]  # (N, 1, C)
        return block(m * x, c) + (1 - m) * x  # (N, L, C)

    def extra_repr(self):
        s = self.stats
        knobs = f"alpha={self.alpha}, beta={self.beta}" if self.kind == "dtr" else f"beta={self.beta}, seed={self.seed}"
        return (
            f"kind={self.kind}, channels={self.channels}, num_timesteps={self.num_timesteps}, {knobs}, "
            f"num_blocks={self.num_blocks}, active={s['active']}, shared={s['shared']}, task_specific={s['task_specific']}"
        )


#################################################################################
#                              CLI: draw the masks                              #
#################################################################################


def draw_masks(masks, title, path, max_rows=500, min_rows=200, min_cols=512):
    """
    Save a (T, C) mask table as a PNG: rows = timesteps with t = 0 (cleanest) at the top, columns
    = channels. Active channels shared by every task are grey, other active channels dark blue,
    inactive white. Rows are subsampled (nearest) to at most `max_rows`; rows and columns are
    repeated by integer factors until the picture is at least `min_rows` tall, `min_cols` wide.
    """
    from PIL import Image, ImageDraw, ImageFont  # lazy: only the CLI draws

    m = masks.detach().cpu().numpy() > 0.5  # (T, C)
    T, C = m.shape
    shared = m.all(axis=0)  # (C,)
    rgb = np.full((T, C, 3), 255, dtype=np.uint8)  # (T, C, 3) white = inactive
    rgb[m] = (31, 60, 140)
    rgb[m & shared[None, :]] = (150, 150, 150)
    rows = np.round(np.linspace(0, T - 1, min(T, max_rows))).astype(np.int64)  # (H,)
    rgb = np.repeat(rgb[rows], max(1, math.ceil(min_rows / len(rows))), axis=0)  # (H, C, 3)
    rgb = np.repeat(rgb, max(1, math.ceil(min_cols / C)), axis=1)  # (H, W, 3)
    H, W = rgb.shape[:2]

    font = ImageFont.load_default()
    left, top, bottom, right = 60, 30, 36, 12
    canvas = Image.new("RGB", (left + W + right, top + H + bottom), "white")
    canvas.paste(Image.fromarray(rgb), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([left - 1, top - 1, left + W, top + H], outline="black")
    draw.text((left, 8), title, fill="black", font=font)
    draw.text((4, top), "t = 0", fill="black", font=font)
    draw.text((4, top + H - 12), f"t = {T - 1}", fill="black", font=font)
    draw.text((4, top + H // 2 - 6), "timestep", fill="black", font=font)
    draw.text((left, top + H + 6), "channel 0", fill="black", font=font)
    draw.text((left + W // 2 - 120, top + H + 6), "grey: shared by all t   blue: task-specific",
              fill="black", font=font)
    draw.text((left + W - 70, top + H + 6), f"channel {C - 1}", fill="black", font=font)
    canvas.save(path)
    return canvas.size


def main(argv=None):
    """Render the routing masks of one configuration and print the channel counts."""
    p = argparse.ArgumentParser(description="Draw DTR / R-TR routing masks (rows = timesteps, cols = channels).")
    p.add_argument("--channels", type=int, required=True, help="block width C (DiT-S 384, B 768, L 1024, XL 1152)")
    p.add_argument("--alpha", type=float, help="DTR: window speed exponent; paper default 4")
    p.add_argument("--beta", type=float, default=0.8, help="fraction of active channels per task; paper default 0.8")
    p.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
    p.add_argument("--kind", choices=["dtr", "random"], default="dtr",
                   help="dtr = DTR, random = R-TR baseline (its first block's table)")
    p.add_argument("--seed", type=int, help="R-TR (--kind random): seed of the masks; default 0")
    p.add_argument("--out", required=True, help="output PNG path")
    args = p.parse_args(argv)

    if not args.out.lower().endswith(".png"):
        p.error(f"--out {args.out}: the masks are drawn as a PNG; pass a path ending in .png")
    if args.kind == "random" and args.alpha is not None:  # R-TR masks have no window, hence no alpha
        p.error("--alpha moves the DTR window and has no effect with --kind random; drop it")
    if args.kind == "dtr" and args.seed is not None:  # DTR masks are deterministic
        p.error("--seed draws the R-TR masks and has no effect with --kind dtr; drop it or add --kind random")
    knobs = {k: v for k, v in (("alpha", args.alpha), ("seed", args.seed)) if v is not None}  # else TaskRouter's defaults
    try:  # bad values and unwritable paths end in one line with the usage, not a traceback
        router = TaskRouter(args.channels, args.timesteps, beta=args.beta, kind=args.kind, **knobs)
        s = router.stats
        if args.kind == "dtr":
            title = f"DTR masks  T={args.timesteps} C={args.channels} alpha={router.alpha:g} beta={args.beta:g}"
        else:
            title = f"R-TR masks  T={args.timesteps} C={args.channels} beta={args.beta:g} seed={router.seed}"
        size = draw_masks(router.masks[0], title, args.out)  # for R-TR, the first block's table
    except (ValueError, OSError, MemoryError) as e:  # MemoryError: a T x C mask table too large (--timesteps 10**8)
        p.error(str(e))
    print(router)
    print(f"active channels per task : {s['active']} of {args.channels}")
    print(f"shared by all tasks      : {s['shared']}")
    print(f"task-specific per task   : {s['task_specific']}")
    print(f"used only by t <  T/2    : {s['low_t_only']}")
    print(f"used only by t >= T/2    : {s['high_t_only']}")
    print(f"unused by every task     : {s['unused']}")
    print(f"wrote {args.out} ({size[0]}x{size[1]})")


if __name__ == "__main__":
    main()
