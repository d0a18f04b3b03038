"""
Denoising-task-difficulty curriculum over diffusion timesteps.

Paper: Jin-Young Kim, Hyojun Go, Soonwoo Kwon, Hyun-Gyoon Kim, "Denoising Task Difficulty-based
Curriculum for Training Diffusion Models", ICLR 2025 (arXiv:2403.10348). No official code is
public, so everything below is written from the paper's text; what the text does not pin down
is marked "our choice".

The idea. Denoising at low t (little noise) converges more slowly and has larger relative
entropy between consecutive marginals, so low-t tasks are the hard ones. Split the T timesteps
into N clusters C_1 .. C_N ordered by t (C_1 holds t = 0 and is the hardest, C_N holds t = T-1
and is the easiest) and train easy-to-hard, accumulating clusters rather than swapping them
(paper, method section and Fig. 3):

    C_i     = [b_{i-1}, b_i),      b_i = floor(i T / N)              -> timestep_clusters
    stage n = C_N u C_{N-1} u ... u C_{N-n+1} = [b_{N-n}, T),  n = 1..N
              t ~ Uniform{b_{N-n}, ..., T-1}                        -> stage_interval,
                                                                       Curriculum.sample_timesteps
    pacing:   go to stage n+1 when the training loss has not
              improved for tau iterations ("maximum patience")       -> Curriculum.update
    after stage N: ordinary training on all of [0, T)                -> Curriculum.finished

The anti-curriculum ablation (reported worse in the paper) is order="hard-to-easy": stage n is
C_1 u ... u C_n = [0, b_n).

Clusters may also be any contiguous partition of [0, T) given as half-open (start, stop) pairs
in increasing t, e.g. ANT's SNR interval clustering; the easiest cluster is still the last one
(highest t).

From the paper / our choice:
- From the paper: N clusters of equal size over t (about 20 in the paper, as recorded in our
  notes); ordering by t with the highest-t cluster easiest; accumulating stages; ordinary
  training on every timestep after stage N; adaptive pacing by loss patience ("maximum
  patience" tau); the reverse order as an ablation.
- Our choice, pacing="fixed": a stage every `stage_steps` updates, offered as a baseline for the
  adaptive rule; it is not the paper's method.
- Our choice, T not divisible by N: boundaries b_i = floor(i T / N) in exact integer arithmetic,
  so cluster sizes differ by at most one. For T = 1000, N = 20 every cluster has 50 steps.
- Our choice, "has not improved": the per-step loss of a diffusion model is noisy (it depends on
  the t drawn), so we judge a smoothed loss. We keep an exponential moving average with decay
  `smoothing` (0.995, a time constant of 200 updates), bias-corrected like Adam's moments so it
  is the weighted mean of the losses seen in the stage so far. An update "improves" when the
  EMA drops below best - rel_tol * |best| (rel_tol = 1e-3); for positive losses this is the rule
  of PyTorch's ReduceLROnPlateau with threshold_mode="rel" (best * (1 - rel_tol)), applied to the
  EMA, and |best| keeps it a real improvement for negative ones too. After `patience` updates in a
  row without improvement the stage advances. On a noiseless loss the defaults keep the stage
  while the loss falls by more than 0.2% per 1000 updates (rel_tol per patience); noise in the
  EMA lets it advance earlier, e.g. with 15% per-step noise it advances while the loss still
  falls 2% per 1000 updates, and at 5% 3 of 8 seeds still advance within 15k updates (table in
  the README section).
- Our choice, reset and warm-up: the loss level changes with the timestep range (adding low-t
  clusters raises the epsilon-MSE), so the EMA, the best value and the counter restart at every
  stage change. Before update round(1 / (1 - smoothing)) of a stage (one EMA time constant)
  nothing is judged: the EMA is still a mean of a handful of losses, and a lucky low value taken
  as "best" that early would be hard to beat and would end the stage too soon. That update sets
  the first best, so a constant loss advances after exactly warm-up + patience updates.
- Our choice, "finished": stage N already covers [0, T), which is the paper's "train normally on
  all timesteps". So the curriculum is finished as soon as stage N starts; no later pacing
  decision could change anything.
- Our choice, defaults for small runs (thousands to ~100k steps): patience 500 and smoothing
  0.995 make a stage last at least 700 updates; on a flat noisy loss the 19 stage changes of
  N = 20 take about 19 * 0.7k..0.85k = 13k..16k steps (longer when each stage's loss first has
  to fall), and fixed pacing (stage_steps 1000) exactly 19k. Our notes do not record the
  paper's tau.
- Our choice, which loss to feed: the step's mean per-sample diffusion loss (as the loss
  weighting gives it). Pass neither a loss re-weighted by learnable weights (ANT-UW's total moves
  as its weights learn, and can be negative) nor a value accumulated over several steps. If that
  loss changes scale mid-run (another weighting on resume), call `reset_pacing`.

CLI: draw the stages of a run from its metrics.jsonl (lines with "step", "loss" and the keys of
Curriculum.log_dict(), and {"event": "curriculum_stage", "step", "stage", "t_min", "t_max"} at
each stage change; Pillow needed):
    python curriculum.py --plot RUN/metrics.jsonl --out stages.png
"""

import argparse
import json
import math
import operator
import sys
from pathlib import Path

import numpy as np
import torch

ORDERS = ("easy-to-hard", "hard-to-easy")
PACINGS = ("adaptive", "fixed")

# -----------------------------------------------------------------------------
# Timestep clusters and stages (paper: method section, Fig. 3)


def _int_or_none(value):
    """value as a Python int when it is an integer of any kind (int, numpy integer, 0-d integer
    tensor), else None. Floats are not ints here."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(name, value, unit=""):
    """value as a Python int >= 1 (see _int_or_none), or a ValueError that names it."""
    n = _int_or_none(value)
    if n is None or n < 1:
        raise ValueError(f"{name} must be a positive int{unit}, got {value!r}")
    return n


def timestep_clusters(num_timesteps, num_clusters):
    """N equal contiguous clusters of {0, .., T-1}, as half-open (start, stop) pairs in increasing t
    (paper: C_1 .. C_N, Fig. 3). Boundaries are floor(i T / N), so sizes differ by at most one when
    N does not divide T (our choice)."""
    T, N = _positive_int("num_timesteps", num_timesteps), _int_or_none(num_clusters)
    if N is None or not 1 <= N <= T:
        raise ValueError(f"num_clusters must be an int in [1, num_timesteps={T}], got {num_clusters!r}")
    bounds = [i * T // N for i in range(N + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(N)]


def check_clusters(clusters, num_timesteps):
    """Validate a contiguous partition of [0, T) given as half-open (start, stop) pairs in
    increasing t, e.g. the output of ANT's interval clustering; return it as a list of int tuples."""
    try:
        pairs = [tuple(c) for c in clusters]
    except TypeError:
        raise ValueError("clusters must be a list of (start, stop) pairs") from None
    if not pairs:
        raise ValueError("clusters must hold at least one (start, stop) pair")
    out = []
    for pair in pairs:
        try:
            start, stop = (operator.index(v) for v in pair)  # ints (numpy ints too), not floats
        except (TypeError, ValueError):
            raise ValueError(f"each cluster must be a pair of ints (start, stop), got {pair!r}") from None
        if start >= stop:
            raise ValueError(f"cluster {pair!r} is empty: need start < stop (half-open [start, stop))")
        if out and start != out[-1][1]:
            raise ValueError(f"clusters must be contiguous and in increasing t: {out[-1]!r} is "
                             f"followed by {pair!r}; the next start must equal the previous stop")
        out.append((start, stop))
    if out[0][0] != 0 or out[-1][1] != num_timesteps:
        raise ValueError(f"clusters must cover [0, {num_timesteps}) exactly, they cover "
                         f"[{out[0][0]}, {out[-1][1]}); set num_timesteps to the T of your noise schedule")
    return out


def stage_interval(clusters, stage, order="easy-to-hard"):
    """Timestep range of curriculum stage n (1-based) as a half-open (lo, hi): the union of the n
    easiest (highest-t) clusters, [start of C_{N-n+1}, T) (paper, Fig. 3), or for the
    anti-curriculum ablation the n hardest (lowest-t) clusters, [0, stop of C_n)."""
    if not 1 <= stage <= len(clusters):
        raise ValueError(f"stage must be in [1, {len(clusters)}], got {stage}")
    if order == "easy-to-hard":
        return clusters[-stage][0], clusters[-1][1]
    if order == "hard-to-easy":
        return clusters[0][0], clusters[stage - 1][1]
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")

# -----------------------------------------------------------------------------
# The curriculum: stage state, timestep sampling and pacing


class Curriculum:
    """Easy-to-hard timestep curriculum with adaptive (loss-patience) or fixed pacing
    (paper: method section, pacing function; our smoothing and warm-up are in the module docstring).

    Call `sample_timesteps` to draw t for a batch and `update(loss)` once per training step.
    `clusters` (half-open pairs covering [0, T) in increasing t) replaces the N equal clusters and
    then fixes N, so num_clusters is not used.
    """

    def __init__(self, num_timesteps=1000, num_clusters=20, patience=500, pacing="adaptive",
                 stage_steps=1000, order="easy-to-hard", clusters=None, smoothing=0.995,
                 rel_tol=1e-3):
        if pacing not in PACINGS:
            raise ValueError(f"pacing must be one of {PACINGS}, got {pacing!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        patience = _positive_int("patience", patience, " (updates)")  # Python ints: the state dict stays JSON
        stage_steps = _positive_int("stage_steps", stage_steps, " (updates)")
        num_timesteps = _positive_int("num_timesteps", num_timesteps)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing is an EMA decay and must be in [0, 1), got {smoothing!r}")
        if not rel_tol >= 0.0:
            raise ValueError(f"rel_tol must be >= 0, got {rel_tol!r}")
        if clusters is None:
            self.clusters = timestep_clusters(num_timesteps, num_clusters)
        else:
            self.clusters = check_clusters(clusters, num_timesteps)
        self.num_timesteps = num_timesteps
        self.pacing = pacing
        self.order = order
        self.patience = patience
        self.stage_steps = stage_steps
        self.smoothing = float(smoothing)
        self.rel_tol = float(rel_tol)
        self.warmup = max(1, round(1.0 / (1.0 - self.smoothing)))  # one EMA time constant
        self.stage = 1
        self._reset_tracker()

    def _reset_tracker(self):
        self.stage_updates = 0  # updates seen in the current stage
        self.ema_sum = 0.0      # un-normalised EMA of the loss in this stage
        self.best = None        # best bias-corrected EMA since the warm-up ended
        self.bad_updates = 0    # consecutive judged updates without improvement

    @property
    def num_stages(self):
        """N, the number of stages (one per cluster)."""
        return len(self.clusters)

    @property
    def finished(self):
        """True once the last stage, which covers every timestep, has started."""
        return self.stage == self.num_stages

    @property
    def active_range(self):
        """Half-open (lo, hi) of the timesteps trained in the current stage (Python ints)."""
        return stage_interval(self.clusters, self.stage, self.order)

    @property
    def smoothed_loss(self):
        """Bias-corrected EMA of the losses fed in this stage (None before the first update)."""
        if self.stage_updates == 0:
            return None
        return self.ema_sum / (1.0 - self.smoothing ** self.stage_updates)

    def sample_timesteps(self, n, generator=None, device=None):
        """t ~ Uniform{lo, .., hi-1} over the active range, shape (n,), int64, drawn on `device` with
        `generator` (paper: training on the union of the stage's clusters). The generator must live
        on the same device type as `device` (torch cannot draw CUDA numbers from a CPU generator).
        lo and hi are Python ints, so nothing here waits for the device. Meant to run outside the
        compiled model; without a generator it also traces under torch.compile(fullgraph=True),
        recompiling once per stage (lo is a guarded constant); torch.compile cannot trace an
        explicit generator and graph-breaks there."""
        if generator is not None and device is not None and \
                generator.device.type != torch.device(device).type:
            raise ValueError(f"generator is on {generator.device} but samples are requested on "
                             f"{device}; create the generator on the sampling device, e.g. "
                             f"torch.Generator(device={str(device)!r})")
        lo, hi = self.active_range
        return torch.randint(lo, hi, (n,), generator=generator, device=device)  # (n,)

    def update(self, loss):
        """Apply the pacing rule for one training step; return True when the stage changed.
        Adaptive: advance after `patience` updates without relative improvement of the smoothed
        loss (after a warm-up of one EMA time constant); fixed: advance every `stage_steps`
        updates (paper: pacing function; details in the module docstring). `loss` is one number, the
        step's mean diffusion loss (a float, or a 1-element tensor or array; a tensor is read on the host).
        Under DDP pass the mean over all ranks (all_reduce it), so that every rank changes stage at
        the same step; each rank's own loss differs, and so would its stage."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()  # float() of a tensor that requires grad warns
        if isinstance(loss, (torch.Tensor, np.ndarray)):
            if math.prod(loss.shape) != 1:
                kind = "a tensor" if isinstance(loss, torch.Tensor) else "an array"
                raise ValueError(f"loss must be one number, the step's mean loss, got {kind} of shape "
                                 f"{tuple(loss.shape)}; pass loss.mean()")
            loss = loss.reshape(())  # 0-d, which float() reads (numpy deprecates it for a (1,) array)
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"loss must be finite, got {loss}; the run has diverged")
        if self.finished:
            return False
        self.stage_updates += 1
        self.ema_sum = self.smoothing * self.ema_sum + (1.0 - self.smoothing) * loss
        if self.pacing == "fixed":
            return self._advance() if self.stage_updates >= self.stage_steps else False
        if self.stage_updates < self.warmup:
            return False
        ema = self.smoothed_loss
        if self.best is None or ema < self.best - self.rel_tol * abs(self.best):
            self.best = ema
            self.bad_updates = 0
            return False
        self.bad_updates += 1
        return self._advance() if self.bad_updates >= self.patience else False

    def reset_pacing(self):
        """Forget the current stage's loss measurements (its smoothed loss, best value and patience count) and
        stay in the stage. Call it when the loss fed to `update` changes scale, e.g. another loss weighting on
        resume: the saved smoothed loss would otherwise be judged against losses of the new scale. The stage's
        update count restarts too, so under fixed pacing the stage would last longer; call it for adaptive pacing."""
        self._reset_tracker()

    def _advance(self):
        self.stage += 1
        self._reset_tracker()
        return True

    def state_dict(self):
        """Everything needed for an exact resume, in plain Python types (JSON-serialisable)."""
        return {
            "num_timesteps": self.num_timesteps,
            "clusters": [list(c) for c in self.clusters],
            "order": self.order,
            "stage": self.stage,
            "stage_updates": self.stage_updates,
            "ema_sum": self.ema_sum,
            "best": self.best,
            "bad_updates": self.bad_updates,
        }

    def load_state_dict(self, state):
        """Restore from `state_dict()`. The timesteps, clusters and order must match this instance;
        pacing settings (patience, stage_steps, smoothing, rel_tol) come from the constructor."""
        missing = {"num_timesteps", "clusters", "order", "stage", "stage_updates", "ema_sum",
                   "best", "bad_updates"} - set(state)
        if missing:
            raise ValueError(f"curriculum state is missing {sorted(missing)}")
        clusters = [tuple(c) for c in state["clusters"]]
        if (state["num_timesteps"], clusters, state["order"]) != \
                (self.num_timesteps, self.clusters, self.order):
            raise ValueError("curriculum state was saved with different timesteps, clusters or "
                             "order; construct the Curriculum with the settings of the saved run")
        if not 1 <= state["stage"] <= self.num_stages:
            raise ValueError(f"saved stage {state['stage']} is outside [1, {self.num_stages}]")
        self.stage = int(state["stage"])
        self.stage_updates = int(state["stage_updates"])
        self.ema_sum = float(state["ema_sum"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_updates = int(state["bad_updates"])

    def log_dict(self):
        """The metrics.jsonl keys of the current stage: curriculum/stage, /t_min, /t_max (exclusive)."""
        lo, hi = self.active_range
        return {"curriculum/stage": self.stage, "curriculum/t_min": lo, "curriculum/t_max": hi}

    def describe(self):
        """One line for logs, e.g. 'curriculum stage 3/20: t in [900, 1000) (easy-to-hard, adaptive)'."""
        lo, hi = self.active_range
        state = "finished, " if self.finished else ""
        return (f"curriculum stage {self.stage}/{self.num_stages}: t in [{lo}, {hi}) "
                f"({state}{self.order}, {self.pacing})")

# -----------------------------------------------------------------------------
# Plot of the stages of a run (PIL only; python curriculum.py --plot RUN/metrics.jsonl --out x.png)


def read_curriculum_records(metrics_path):
    """Read metrics.jsonl; return (stages, losses, last_step). stages: sorted (step, stage, t_min,
    t_max) at which the active range took effect, from the "curriculum_stage" events (falling back on
    the curriculum/* keys of log records before the first event or when there are no events);
    losses: (step, loss) of the log records with a finite loss."""
    events, logged, losses, last_step = [], [], [], None
    with open(metrics_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics_path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            step = int(rec["step"])
            last_step = step if last_step is None else max(last_step, step)
            if rec.get("event") == "curriculum_stage":
                events.append((step, int(rec["stage"]), int(rec["t_min"]), int(rec["t_max"])))
            elif "event" not in rec:
                if "curriculum/t_min" in rec:
                    logged.append((step, int(rec["curriculum/stage"]), int(rec["curriculum/t_min"]),
                                   int(rec["curriculum/t_max"])))
                if rec.get("loss") is not None and math.isfinite(float(rec["loss"])):  # null (NaN before): all skipped
                    losses.append((step, float(rec["loss"])))
    if not events and not logged:
        raise ValueError(f"{metrics_path} has no curriculum records (neither 'curriculum_stage' "
                         f"events nor 'curriculum/t_min' keys); was the run trained with a "
                         f"curriculum method?")
    events.sort()
    logged.sort()
    points = events if events else logged
    if events and logged and logged[0][0] < events[0][0]:
        points = [logged[0]] + events
    stages = [p for i, p in enumerate(points) if i == 0 or p[1:] != points[i - 1][1:]]
    return stages, sorted(losses), last_step


def _nice_ticks(lo, hi, count=5):
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v, spacing=None):
    """Tick label; with the tick `spacing`, enough decimals that neighbouring ticks differ."""
    if abs(v) >= 1000:
        return f"{v / 1000:.4g}k"
    if spacing:
        return f"{v:.{max(0, -math.floor(math.log10(spacing)))}f}"
    return f"{v:.3g}"


def plot_stages(metrics_path, out_path, width=960):
    """Draw the active timestep band (t_min to t_max) against training step, one shade per stage,
    and below it the loss curve when the log records have one; save a PNG at out_path."""
    from PIL import Image, ImageDraw, ImageFont

    stages, losses, last_step = read_curriculum_records(metrics_path)
    first_step = min(stages[0][0], losses[0][0]) if losses else stages[0][0]
    end_step = max(last_step, stages[-1][0] + 1)
    num_t = max(s[3] for s in stages)
    panel_h, left, right, top, gap = 260, 70, 20, 36, 60
    height = top + panel_h + gap + (panel_h + gap if losses else 0)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1 = left, width - right

    def x_of(step):
        return x0 + (x1 - x0) * (step - first_step) / max(end_step - first_step, 1)

    def axes(y0, y1, y_lo, y_hi, y_map, label, y_fmt=_fmt):
        draw.rectangle([x0, y0, x1, y1], outline="black")
        for v in _nice_ticks(first_step, end_step):
            draw.line([x_of(v), y1, x_of(v), y1 + 4], fill="black")
            draw.text((x_of(v) - 10, y1 + 6), _fmt(v), fill="black", font=font)
        y_ticks = _nice_ticks(y_lo, y_hi)
        y_spacing = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else None
        for v in y_ticks:
            draw.line([x0 - 4, y_map(v), x0, y_map(v)], fill="black")
            draw.text((4, y_map(v) - 6), y_fmt(v, y_spacing), fill="black", font=font)
        draw.text((x0, y0 - 14), label, fill="black", font=font)
        draw.text((x1 - 60, y1 + 20), "training step", fill="black", font=font)
        for step, *_ in stages[1:]:  # stage changes
            draw.line([x_of(step), y0 + 1, x_of(step), y1 - 1], fill=(200, 200, 200))

    # Panel 1: active timestep range per stage.
    y0, y1 = top, top + panel_h

    def y_of_t(t):
        return y1 - (y1 - y0) * t / num_t

    axes(y0, y1, 0, num_t, y_of_t, f"active timesteps [t_min, t_max) vs step, {len(stages)} "
         f"stages shown (t = 0 is the cleanest)", y_fmt=lambda v, spacing: str(int(v)))
    for i, (step, stage, lo, hi) in enumerate(stages):
        stop = stages[i + 1][0] if i + 1 < len(stages) else end_step
        shade = 235 - int(150 * i / max(len(stages) - 1, 1))
        draw.rectangle([x_of(step), y_of_t(hi), x_of(stop), y_of_t(lo)], fill=(shade, shade, 255),
                       outline=(40, 40, 160))
        if x_of(stop) - x_of(step) > 18:
            draw.text((x_of(step) + 3, y_of_t(hi) - 12 if hi < num_t else y0 + 3), str(stage),
                      fill="black", font=font)

    # Panel 2: training loss (log scale when it spans more than a decade).
    if losses:
        y0, y1 = y1 + gap, y1 + gap + panel_h
        vals = [v for _, v in losses]
        log_scale = min(vals) > 0 and max(vals) / min(vals) > 10
        f = math.log10 if log_scale else (lambda v: v)
        lo, hi = f(min(vals)), f(max(vals))
        hi = hi if hi > lo else lo + 1.0

        def y_of_v(v):
            return y1 - (y1 - y0) * (v - lo) / (hi - lo)

        axes(y0, y1, lo, hi, y_of_v, "training loss" + (" (log10)" if log_scale else ""),
             y_fmt=(lambda v, spacing: f"{10 ** v:.2g}") if log_scale else _fmt)
        draw.line([(x_of(s), y_of_v(f(v))) for s, v in losses], fill=(200, 40, 40), width=1)
    img.save(out_path)


def main(argv=None):
    """CLI: python curriculum.py --plot RUN[/metrics.jsonl] --out stages.png"""
    parser = argparse.ArgumentParser(description="Plot the curriculum stages of a training run.")
    parser.add_argument("--plot", required=True, type=Path, help="a run folder or its metrics.jsonl")
    parser.add_argument("--out", default="stages.png", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out {args.out}: the stages are drawn as a PNG; pass a path ending in .png")
    metrics = args.plot / "metrics.jsonl" if args.plot.is_dir() else args.plot  # as fid.py curves takes runs
    try:
        plot_stages(metrics, args.out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"curriculum.py: error: {e}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
