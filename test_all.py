"""The whole test suite: `pytest -q test_all.py`. CPU only, a few minutes on 2 cores."""

import contextlib
import copy
import functools
import gc
import io
import itertools
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import tracemalloc
import types
import warnings
import weakref
import zipfile
from fractions import Fraction
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
import scipy.linalg
import scipy.optimize
from scipy.stats import norm
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import bench
import data as datasets
import diffusion as gd
import fid
import latents
import negative_transfer as nt
import sample
import train
from curriculum import Curriculum, check_clusters, main as curriculum_main, stage_interval, timestep_clusters
from dit import DiT, DiT_models, LabelEmbedder, TimestepEmbedder, get_2d_sincos_pos_embed
from dtr import TaskRouter, main as dtr_main, mask_stats, random_masks, routing_masks
from sample import load_model

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared" / "data"
# A small model for training tests: the DiT-S/4 layout shrunk to 2 blocks of width 64.
TINY = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--image-size", "16",
        "--num-workers", "0", "--sample-every", "0", "--log-every", "1"]


def run_train(tmp_path, *extra, name="run"):
    """train.main in this process; returns the run folder."""
    out = tmp_path / name
    train.main(TINY + ["--out", str(out), *extra])
    return out


def last_checkpoint(out):
    return torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], map_location="cpu", weights_only=True)


def poison_losses(monkeypatch, bad_calls, factor=float("inf")):
    """Make the calls of Diffusion.training_losses numbered in bad_calls (from 1: one per step of a one-process run
    without FID) return loss * factor; returns the list of every call's per-sample loss, as it came out."""
    real, losses = gd.Diffusion.training_losses, []

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if len(losses) + 1 in bad_calls:
            out = {**out, "loss": out["loss"] * factor}
        losses.append(out["loss"].detach().clone())
        return out

    monkeypatch.setattr(gd.Diffusion, "training_losses", poisoned)
    return losses


def traced_peak(fn):
    """(fn(), the peak bytes Python and numpy allocated while it ran): numpy reports its allocations to tracemalloc."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def deep_equal(a, b, path="state"):
    """Exact recursive comparison of method state dicts: tensors with torch.equal (dtype and shape too),
    arrays with array_equal, floats with == (no rounding, unlike repr of a tensor, which elides
    the middle of the 5056-byte generator state). Returns a list of the paths that differ."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if set(a) != set(b):
            return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in deep_equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return [f"{path}: {a!r} vs {b!r}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in deep_equal(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
              and a.shape == b.shape and torch.equal(a, b))
        return [] if ok else [f"{path}: tensors differ"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        ok = np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
        return [] if ok else [f"{path}: arrays differ"]
    if type(a) is not type(b) or a != b:
        return [f"{path}: {a!r} vs {b!r}"]
    return []


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


RANK_ABORT = "terminate called without an active exception"  # std::terminate in a rank's C++ layer


class RankAbort(AssertionError):
    """A torchrun rank died with RANK_ABORT: see retry_rank_abort."""


def torchrun(*args, nproc=2, timeout=300, env=None):
    """torchrun args (its own options, such as --max-restarts=1, may lead) on nproc processes; RankAbort on RANK_ABORT."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if r.returncode != 0 and RANK_ABORT in r.stderr:
        raise RankAbort(r.stderr[-3000:])
    return r


def file_store_ranks(script, *args, timeout=120):
    """Run `python script RANK *args` as ranks 0 and 1 (the script joins a gloo group through a file store: no port to
    race for) and require both to exit 0. RankAbort on RANK_ABORT, so that retry_rank_abort reruns the test."""
    procs = [subprocess.Popen([sys.executable, str(script), str(r), *map(str, args[r])], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    if codes != [0, 0] and any(RANK_ABORT in err for _, err in outs):
        raise RankAbort(str(outs)[-3000:])
    assert codes == [0, 0], str(outs)[-3000:]


def retry_rank_abort(test):
    """Run a torchrun test once more, in a fresh folder, when a rank aborted with RANK_ABORT (SIGABRT). About 1 in
    100 two-process launches on the 2-core CPU machine ends so, in the different tests alike; we have not found the
    cause, and it did not recur in about 140 further launches. A real failure fails the rerun too."""
    @functools.wraps(test)
    def wrapper(**kwargs):
        try:
            return test(**kwargs)
        except RankAbort:
            retry = kwargs["tmp_path"] / "retry"
            retry.mkdir()
            return test(**{**kwargs, "tmp_path": retry})
    return wrapper


# ==============================================================================================
#                                   dit.py
# ==============================================================================================

OFFICIAL_COUNTS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_parameter_counts_match_official(name):
    with torch.device("meta"):
        model = DiT_models[name]()  # 32x32x4 input, 1000 classes, learn_sigma: the official defaults
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[name]


def test_twelve_configs():
    assert sorted(DiT_models) == sorted(f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))


def test_state_dict_has_official_keys_and_shapes():
    with torch.device("meta"):
        sd = DiT_models["DiT-XL/2"]().state_dict()
    D, depth = 1152, 28
    expected = {"pos_embed": (1, 256, D), "x_embedder.proj.weight": (D, 4, 2, 2), "x_embedder.proj.bias": (D,),
                "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,), "t_embedder.mlp.2.weight": (D, D),
                "t_embedder.mlp.2.bias": (D,), "y_embedder.embedding_table.weight": (1001, D),
                "final_layer.linear.weight": (2 * 2 * 8, D), "final_layer.linear.bias": (32,),
                "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        expected.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D),
                         b + "attn.proj.bias": (D,), b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                         b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
                         b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_output_is_zero_at_init():
    model = DiT_models["DiT-S/4"](input_size=16, depth=2)
    out = model(torch.randn(3, 4, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 1000]))
    assert out.shape == (3, 8, 16, 16) and torch.count_nonzero(out) == 0


def _reference_attention_block(block, x, c):
    """The official block with timm's explicit softmax attention instead of SDPA."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    h = block.norm1(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    N, L, D = h.shape
    H = block.attn.num_heads
    q, k, v = block.attn.qkv(h).reshape(N, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * (D // H) ** -0.5).softmax(-1) @ v
    x = x + gate_msa[:, None] * block.attn.proj(a.transpose(1, 2).reshape(N, L, D))
    h = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return x + gate_mlp[:, None] * block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(h), approximate="tanh"))


def test_block_matches_explicit_attention_reference():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=16, depth=1, hidden_size=64, num_heads=4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    torch.testing.assert_close(model.blocks[0](x, c), _reference_attention_block(model.blocks[0], x, c), atol=1e-5, rtol=1e-5)


def test_cfg_guides_all_channels_by_default_and_three_officially():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=16, depth=1, hidden_size=64, num_heads=4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x = torch.randn(2, 4, 16, 16).repeat(2, 1, 1, 1)
    t, y = torch.tensor([10, 10, 10, 10]), torch.tensor([1, 2, 1000, 1000])
    cond, uncond = model(x, t, y).chunk(2)
    for k in (None, 3):
        out = model.forward_with_cfg(x, t, y, 4.0, guided_channels=k)[:2]
        k = 4 if k is None else k
        torch.testing.assert_close(out[:, :k], uncond[:, :k] + 4.0 * (cond[:, :k] - uncond[:, :k]))
        torch.testing.assert_close(out[:, k:], cond[:, k:])
    with pytest.raises(ValueError, match="epsilon channels"):  # 5..8 are the learned-variance channels
        model.forward_with_cfg(x, t, y, 4.0, guided_channels=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the network runs in bf16, the guidance arithmetic in fp32
        cond, uncond = model(x, t, y).float().chunk(2)
        out = model.forward_with_cfg(x, t, y, 4.0)[:2]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-6, atol=1e-6)


def test_unconditional_model_has_one_label_row():
    model = DiT(input_size=16, patch_size=4, depth=1, hidden_size=64, num_heads=2, num_classes=1, class_dropout_prob=0)
    assert model.y_embedder.embedding_table.weight.shape == (1, 64)
    model.train()
    assert model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 0])).shape == (2, 8, 16, 16)


def test_image_size_must_divide_by_patch():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DiT_models["DiT-S/8"](input_size=20)


def test_hidden_size_not_a_multiple_of_four_is_refused_in_one_line():
    # the 2-D sin-cos position embedding splits the width into four quarters: 9 crashed with a RuntimeError in
    # pos_embed.copy_ (8 columns for 9), 10 with "positional embedding width 5 must be even", naming no setting
    for hidden, heads in ((9, 3), (10, 2)):
        with pytest.raises(ValueError, match=f"hidden size {hidden} is not a multiple of 4.*e.g. {4 * heads}"):
            DiT(input_size=8, patch_size=2, hidden_size=hidden, depth=1, num_heads=heads, num_classes=2)


# Hand-computed values of the official layout's helpers.

def test_timestep_embedding_hand_values():
    # half = 2, freqs = exp(-ln(10000) [0, 1] / 2) = [1, 0.01]; official DiT order is [cos, sin]
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 1.0]), 4).double()
    ref = torch.tensor([[1, 1, 0, 0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]], dtype=torch.float64)
    torch.testing.assert_close(emb, ref, rtol=1e-6, atol=1e-7)
    assert TimestepEmbedder.timestep_embedding(torch.tensor([2.0]), 5).shape == (1, 5)  # odd dim: zero-padded
    assert TimestepEmbedder.timestep_embedding(torch.tensor([2.0]), 5)[0, -1] == 0


def test_2d_pos_embed_hand_values():
    # MAE: meshgrid(w, h) puts the width coordinate first; with D/2 = 2 a coordinate p gives [sin p, cos p]
    pe = get_2d_sincos_pos_embed(4, 2)  # positions row-major: (h, w) = (0,0), (0,1), (1,0), (1,1)
    s, c = math.sin(1), math.cos(1)
    np.testing.assert_allclose(pe, [[0, 1, 0, 1], [s, c, 0, 1], [0, 1, s, c], [s, c, s, c]], atol=1e-15)
    # D = 8: omega = [1, 0.01] per half
    pe8 = get_2d_sincos_pos_embed(8, 3)
    np.testing.assert_allclose(pe8[3 * 2 + 1], [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
                                               math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)], atol=1e-15)


def test_unpatchify_hand_values():
    # official DiT: reshape (N, h, w, p, p, c), einsum nhwpqc->nchpwq; token l = (row l // w, col l % w), k = (p, q, c)
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=1, num_classes=2,
                learn_sigma=False)
    tokens = (10 * torch.arange(4)[:, None] + torch.arange(4)[None]).float()[None]  # (1, 4, 4): token[l, k] = 10 l + k
    img = model.unpatchify(tokens)
    assert img.shape == (1, 1, 4, 4)
    assert img[0, 0].tolist() == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]
    # C = 2 (learn_sigma): the channel is the fastest index within a token
    model2 = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=1, num_classes=2)
    tokens2 = (10 * torch.arange(4)[:, None] + torch.arange(8)[None]).float()[None]  # (1, 4, 8)
    img2 = model2.unpatchify(tokens2)
    assert img2[0, 0, 0].tolist() == [0, 2, 10, 12] and img2[0, 1, 0].tolist() == [1, 3, 11, 13]


def test_label_dropout_rate_train_only():
    emb = LabelEmbedder(10, 1, 0.1)
    with torch.no_grad():
        emb.embedding_table.weight.copy_(torch.arange(11.0)[:, None])  # row i holds i: the output is the label used
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    used = emb(labels, train=True)[:, 0].long()
    dropped = used == 10
    assert 0.085 < dropped.float().mean().item() < 0.115
    assert torch.equal(used[~dropped], labels[~dropped])
    assert torch.equal(emb(labels, train=False)[:, 0].long(), labels)
    force = (torch.arange(20000) % 2)
    assert torch.equal(emb(labels, train=False, force_drop_ids=force)[:, 0].long(), torch.where(force == 1, 10, labels))


def test_label_dropout_one_samples_from_the_null_class_it_trained():
    # --class-dropout-prob 1 trains only the null row; the class rows stay at their random init, so an eval forward
    # (grids, FID, sample.py) must condition on the null row too, not on an untrained class row.
    emb = LabelEmbedder(4, 1, 1.0)
    with torch.no_grad():
        emb.embedding_table.weight.copy_(torch.arange(5.0)[:, None])
    labels = torch.arange(4)
    assert emb(labels, train=True)[:, 0].tolist() == [4.0] * 4
    assert emb(labels, train=False)[:, 0].tolist() == [4.0] * 4


def test_timestep_embedder_feeds_cos_then_sin_features_to_its_mlp():
    # The forward, not just the static helper: mlp([cos(t f), sin(t f)]) with f_j = 10000^(-j/half), in float64 by hand
    torch.manual_seed(0)
    emb = TimestepEmbedder(16, frequency_embedding_size=8)
    for p in emb.parameters():
        torch.nn.init.normal_(p, std=0.3)
    t = torch.tensor([0.0, 3.0, 50.0])
    f = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float64) / 4)
    args = t.double()[:, None] * f[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (3, 8)
    w1, b1, w2, b2 = (p.detach().double() for p in (emb.mlp[0].weight, emb.mlp[0].bias, emb.mlp[2].weight, emb.mlp[2].bias))
    ref = F.silu(feats @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(emb(t).double(), ref, rtol=1e-5, atol=1e-5)


def test_final_layer_is_layernorm_modulated_by_shift_then_scale_then_linear():
    # official FinalLayer: shift, scale = adaLN(c).chunk(2); linear(LN(x) * (1 + scale) + shift), LN without affine, eps 1e-6
    torch.manual_seed(0)
    D = 8
    layer = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=D, depth=1, num_heads=2, num_classes=2).final_layer
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, c = torch.randn(2, 3, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    wa, ba, wl, bl = (p.detach().double() for p in (layer.adaLN_modulation[1].weight, layer.adaLN_modulation[1].bias,
                                                    layer.linear.weight, layer.linear.bias))
    ada = F.silu(c) @ wa.T + ba  # (2, 2D)
    shift, scale = ada[:, :D, None].transpose(1, 2), ada[:, D:, None].transpose(1, 2)  # (2, 1, D) each
    ln = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    ref = (ln * (1 + scale) + shift) @ wl.T + bl  # (2, 3, p*p*C_out)
    torch.testing.assert_close(layer(x.float(), c.float()).double(), ref, rtol=1e-5, atol=1e-5)


def test_official_init_is_adaln_zero_with_the_official_scales():
    # official initialize_weights: every block's and the final layer's adaLN Linear is zero (each block is the
    # identity at init, not only the network output zero); label table and both timestep-MLP weights N(0, 0.02);
    # the patch conv xavier-uniform as a (D, C p p) Linear; pos_embed a fixed (untrained) sin-cos table
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=16, depth=2)
    x, c = torch.randn(2, 64, 384), torch.randn(2, 384)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    assert torch.count_nonzero(model.final_layer.adaLN_modulation(c)) == 0
    for w in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert abs(w.std().item() - 0.02) < 0.002
    bound = math.sqrt(6 / (4 * 2 * 2 + 384))  # xavier: sqrt(6 / (fan_in + fan_out)); torch's conv default is 1/sqrt(16)
    assert 0.95 * bound < model.x_embedder.proj.weight.abs().max().item() <= bound
    assert not model.pos_embed.requires_grad
    assert all(m.eps == 1e-6 and not m.elementwise_affine for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_forward_with_cfg_runs_the_first_half_twice_whatever_the_second_half_holds():
    # official DiT forward_with_cfg: half = x[:N/2], the network sees cat([half, half]); the second half is a placeholder
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=8, in_channels=3, num_classes=4, depth=1, hidden_size=32, num_heads=2).eval()
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 700, 10, 700]), torch.tensor([1, 3, 4, 4])
    with torch.no_grad():
        ref = model.forward_with_cfg(torch.cat([h, h]), t, y, 3.0)
        other = model.forward_with_cfg(torch.cat([h, torch.randn_like(h)]), t, y, 3.0)
    torch.testing.assert_close(other, ref, rtol=0, atol=0)


def test_forward_refuses_an_input_of_another_shape_and_cfg_keeps_a_float64_models_precision():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=8, in_channels=3, num_classes=4, depth=1, hidden_size=32, num_heads=2).eval()
    t, y = torch.tensor([10, 10]), torch.tensor([1, 4])
    for shape in ((2, 3, 4, 16), (2, 3, 4, 4), (2, 4, 8, 8)):  # 4x16 has the patches of 8x8: a silently wrong output
        with pytest.raises(ValueError, match=re.escape(f"x must be (N, 3, 8, 8) for this DiT, got {shape}")):
            model(torch.randn(shape), t, y)
    model = model.double()  # guidance rounded a float64 model's output to float32
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out, plain = model.forward_with_cfg(x, t, y, 1.0), model(x, t, y)
    assert out.dtype == torch.float64 and torch.equal(out, plain)


# ==============================================================================================
#                                   diffusion.py
# ==============================================================================================

def test_linear_schedule_is_float64_and_matches_dit():
    betas = gd.get_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-15
    d = gd.Diffusion()
    np.testing.assert_allclose(d.snr, d.alphas_cumprod / (1 - d.alphas_cumprod))
    assert d.snr.dtype == np.float64 and np.all(np.diff(d.snr) < 0)


def test_schedules_that_reach_beta_one_are_refused():
    # linear betas end at 0.02 * 1000 / T: T = 20 gives beta = 1, alpha_bar = 0 and NaN losses and samples
    for T in (10, 20):
        with pytest.raises(ValueError, match="at least 21 timesteps"):
            gd.Diffusion(T, "linear")
    with pytest.raises(ValueError, match="no signal"):
        gd.Diffusion(betas=np.linspace(0.1, 1.0, 5))
    d = gd.Diffusion(21, "linear", weighting="min-snr")
    assert np.isfinite(d.loss_weight).all() and np.isfinite(d.sqrt_recip_alphas_cumprod).all()
    assert gd.Diffusion(20, "cosine").betas.max() == 0.999


def test_weightings_refuse_parameters_that_zero_or_negate_the_loss_weight():
    # Diffusion itself refuses them (sample.py, bench.py and direct users build it too, not only train.py's flags):
    # min(SNR, 0) / SNR weighs every sample 0; (k + SNR)^-gamma with k < 0 is negative or NaN wherever SNR < -k
    abar = np.cumprod(1 - _betas("linear"))
    snr = abar / (1 - abar)
    for kw, says in ((dict(weighting="min-snr", min_snr_gamma=0.0), r"min_snr_gamma must be > 0 .*got 0.0"),
                     (dict(weighting="p2", p2_k=-0.5), r"p2_gamma and p2_k must be >= 0 .*got 1.0 and -0.5"),
                     (dict(weighting="p2", p2_gamma=-1.0), r"p2_gamma and p2_k must be >= 0 .*got -1.0 and 1.0")):
        with pytest.raises(ValueError, match=says):
            gd.Diffusion(learn_sigma=False, **kw)
    np.testing.assert_allclose(gd.Diffusion(learn_sigma=False, weighting="p2", p2_k=0.0).loss_weight, 1 / snr, rtol=1e-10)


def test_cosine_schedule_is_clipped():
    betas = gd.get_beta_schedule("cosine", 1000)
    assert betas.max() <= 0.999 and np.all(betas > 0)


def test_respacing_keeps_original_timesteps():
    d = gd.Diffusion()
    ddim = d.respace("ddim50")
    assert list(ddim.timestep_map) == list(range(0, 1000, 20))
    r = d.respace("250")
    assert len(r.timestep_map) == 250 and r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
    # The respaced chain has the same marginals at the kept timesteps.
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map], rtol=1e-12)
    t = torch.tensor([0, 1, 249])
    assert r.original_timesteps(t).tolist() == [int(r.timestep_map[i]) for i in (0, 1, 249)]


def test_sample_respaces_once_per_step_setting(monkeypatch):
    # FID during training samples batch after batch: the respaced chain and its device tables are made once.
    d, calls, respace = gd.Diffusion(40, learn_sigma=False), [], gd.Diffusion.respace
    monkeypatch.setattr(gd.Diffusion, "respace", lambda self, steps: calls.append(steps) or respace(self, steps))
    noise = torch.randn(2, 3, 4, 4)
    fn = lambda x, t: 0.1 * x
    first, again = d.sample(fn, noise, "ddim5"), d.sample(fn, noise, "ddim5")
    d.sample(fn, noise, "5")
    assert calls == ["ddim5", "5"] and torch.equal(first, again)

def test_space_timesteps_sections():
    assert gd.space_timesteps(100, "10,5") == sorted(set([round(i * 49 / 9) for i in range(10)] +
                                                         [50 + round(i * 49 / 4) for i in range(5)]))
    with pytest.raises(ValueError, match="cannot make exactly 45 evenly strided steps out of 100"):
        gd.space_timesteps(100, "ddim45")
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        gd.Diffusion().respace("1")
    # the official running float sum: step 10 of "21" is 499.49999..., where round(10 * 999 / 20) gives 500
    assert 499 in gd.space_timesteps(1000, "21") and 500 not in gd.space_timesteps(1000, "21")


def test_sampler_model_sees_original_timesteps():
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    d = gd.Diffusion()
    d.sample(model_fn, torch.randn(2, 3, 4, 4), steps="ddim10")
    assert [int(s[0]) for s in seen] == list(range(900, -1, -100))
    seen.clear()
    d.sample(model_fn, torch.randn(2, 3, 4, 4), steps="5")
    assert [int(s[0]) for s in seen] == sorted(d.respace("5").timestep_map.tolist(), reverse=True)


@pytest.mark.parametrize("weighting", ["constant", "min-snr", "p2"])
def test_loss_weighting_per_sample(weighting):
    d = gd.Diffusion(learn_sigma=False, weighting=weighting, min_snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0)
    t = torch.tensor([0, 10, 500, 999])
    x0 = torch.randn(4, 3, 4, 4)
    noise = torch.randn_like(x0)
    model = lambda x, t, y: torch.zeros_like(x)  # eps prediction 0: mse = mean(noise**2)
    out = d.training_losses(model, x0, t, dict(y=None), noise=noise)
    snr = d.alphas_cumprod[t.numpy()] / (1 - d.alphas_cumprod[t.numpy()])
    w = {"constant": np.ones(4), "min-snr": np.minimum(snr, 5.0) / snr, "p2": 1.0 / (1.0 + snr)}[weighting]
    mse = noise.pow(2).mean(dim=(1, 2, 3)).double().numpy()
    np.testing.assert_allclose(out["weight"].double().numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(out["loss"].double().numpy(), w * mse, rtol=1e-5)
    assert out["loss"].shape == (4,)


def test_hybrid_loss_vb_trains_only_variance():
    d = gd.Diffusion(learn_sigma=True)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    eps = torch.zeros(3, 3, 4, 4, requires_grad=True)
    v = torch.zeros(3, 3, 4, 4, requires_grad=True)
    out = d.training_losses(lambda x, t, y: torch.cat([eps, v], 1), x0, torch.tensor([0, 5, 900]), dict(y=None))
    out["vb"].sum().backward()
    assert eps.grad is None or torch.count_nonzero(eps.grad) == 0
    assert torch.count_nonzero(v.grad) > 0
    assert torch.all(out["vb"] > 0)


def test_ddim_step_coefficients_are_computed_in_float64():
    # 1 - alpha-bar_prev in float32 kept about 4 digits next to t = 0 (alpha-bar_0 = 0.9999): a float32 chain was 2e-5
    # (eta 0) and 1.4e-4 (eta 1) off the float64 one; with the float64 coefficients only the float32 arithmetic is left
    d = gd.Diffusion(learn_sigma=False, betas=np.array([1e-4, 2e-2]))
    g = torch.Generator().manual_seed(0)
    x_T, eps = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for eta in (0.0, 1.0):
        run = lambda x: d.ddim_sample(lambda z, t: eps.to(z.dtype), x, clip_denoised=False, eta=eta, noise_fn=torch.ones_like)
        exact, single = run(x_T), run(x_T.float())
        assert single.dtype == torch.float32
        assert ((single.double() - exact).abs() / exact.abs()).max() < 5e-6, eta


def test_ddim_matches_eq_12_computed_by_hand_in_float64():
    # The test above compares the sampler with itself in float64, which a float32 table, or a sigma that ignores eta,
    # also passes. Here DDIM eq. 12 is computed by hand from alpha-bar, with sigma_t = eta sqrt((1 - abar_prev) /
    # (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16): a float32 run stays within float32 arithmetic of it.
    betas = np.array([1e-4, 2e-2])
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    d = gd.Diffusion(learn_sigma=False, betas=betas)
    g = torch.Generator().manual_seed(0)
    x_T, eps = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for eta in (0.0, 1.0):
        x = x_T
        for t in (1, 0):
            x0 = (x - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
            sigma = eta * math.sqrt((1 - abar_prev[t]) / (1 - abar[t])) * math.sqrt(1 - abar[t] / abar_prev[t])
            x = x0 * math.sqrt(abar_prev[t]) + math.sqrt(1 - abar_prev[t] - sigma ** 2) * eps + (sigma if t else 0.0)
        single = d.ddim_sample(lambda z, t: eps.to(z.dtype), x_T.float(), clip_denoised=False, eta=eta,
                               noise_fn=torch.ones_like)
        assert ((single.double() - x).abs() / x.abs()).max() < 5e-6, eta


def test_diffusion_refuses_a_model_output_of_the_other_learn_sigma():
    # a fixed-variance diffusion fed a learn_sigma model's 2C channels silently dropped the variance channels in
    # training, and for C = 1 broadcast them in sampling into a (N, 2, H, W) "image"
    x = torch.randn(2, 1, 4, 4)
    two = lambda x, t, y=None: torch.zeros(x.shape[0], 2, *x.shape[2:])
    fixed = gd.Diffusion(40, learn_sigma=False)
    with pytest.raises(ValueError, match="needs a model output of 1 channels, got 2; build the model and the diffusion"):
        fixed.training_losses(two, x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="needs a model output of 1 channels, got 2"):
        fixed.sample(two, x, steps="5")
    with pytest.raises(ValueError, match="learn_sigma diffusion needs a model output of 2 channels, got 1"):
        gd.Diffusion(40).training_losses(lambda x, t, y=None: torch.zeros_like(x), x, torch.tensor([0, 5]))


def test_kl_is_zero_when_model_matches_posterior():
    d = gd.Diffusion(learn_sigma=True)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    t = torch.tensor([3, 700])
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    # The true epsilon and v = -1 (posterior variance) make p equal to q(x_{t-1} | x_t, x_0).
    out = torch.cat([noise, -torch.ones_like(x0)], 1)
    vb = d._vb_bits_per_dim(out, x0, xt, t)
    assert vb.abs().max() < 1e-3


def test_ddpm_and_ddim_samplers_run_with_guidance():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=16, in_channels=3, num_classes=4, depth=1, hidden_size=64, num_heads=2)
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    d = gd.Diffusion()
    fn = gd.guided_model_fn(model.eval(), torch.tensor([0, 3]), 1.5, 4)
    for steps in ("ddim5", "5"):
        x = d.sample(fn, torch.randn(2, 3, 16, 16), steps=steps)
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1.0 + 1e-6


# Against independent references: Bayes' rule from the betas, torch.distributions, scipy's normal
# CDF, the closed-form cosine schedule.

T_CHECK = [1, 10, 500, 999]


def _betas(schedule, T=1000):
    # the schedules written out here, not taken from diffusion.py
    if schedule == "linear":
        return np.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T)
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_equals_bayes_from_betas(schedule):
    # reference: the product of the Gaussians q(x_t | x_{t-1}) q(x_{t-1} | x_0), completed square, float64
    d = gd.Diffusion(schedule=schedule, learn_sigma=True)
    betas = _betas(schedule)
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    mean, log_var = d.q_posterior(x0.float(), xt.float(), torch.tensor(T_CHECK))
    mean64, log_var64 = d.q_posterior(x0, xt, torch.tensor(T_CHECK))  # float64 inputs get float64 coefficients
    assert mean.dtype == log_var.dtype == torch.float32 and mean64.dtype == log_var64.dtype == torch.float64
    for i, t in enumerate(T_CHECK):
        beta, alpha, abar_prev = betas[t], 1 - betas[t], abar[t - 1]
        var = 1 / (1 / (1 - abar_prev) + alpha / beta)
        ref = var * (math.sqrt(abar_prev) * x0[i].numpy() / (1 - abar_prev) + math.sqrt(alpha) * xt[i].numpy() / beta)
        np.testing.assert_allclose(mean[i].double().numpy(), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(log_var[i].double().numpy().ravel(), math.log(var), rtol=1e-6)
        np.testing.assert_allclose(mean64[i].numpy(), ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(log_var64[i].numpy().ravel(), math.log(var), rtol=1e-12)
    # t = 0 has variance 0; its clipped log variance is t = 1's
    _, lv = d.q_posterior(x0[:2].float(), xt[:2].float(), torch.tensor([0, 1]))
    assert lv[0].item() == lv[1].item()
    np.testing.assert_allclose(lv[0].item(), math.log(1 / (1 / betas[0] + (1 - betas[1]) / betas[1])), rtol=1e-6)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) * 2 for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
                                            torch.distributions.Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(gd.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.3, -4.0), (-0.95, -1.0), (0.99, -3.0), (0.1, 0.5)])
def test_discretized_gaussian_is_a_distribution_over_256_bins(mean, log_scale):
    # the 256 pixel levels x_k = 2k/255 - 1; bins of width 2/255 with the two edge bins open-ended
    x = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    ll = gd.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    p = ll.exp().numpy()
    assert abs(p.sum() - 1) < 1e-4
    # reference: the exact normal CDF (the code's tanh approximation is within 1.8e-4 of it)
    s = math.exp(log_scale)
    hi = np.append(x.numpy()[:-1] + 1 / 255, np.inf)
    lo = np.append(-np.inf, x.numpy()[1:] - 1 / 255)
    np.testing.assert_allclose(p, norm.cdf(hi, mean, s) - norm.cdf(lo, mean, s), atol=5e-4)


@pytest.mark.parametrize("v", [1.0, 0.0, -0.5])
def test_vb_term_is_the_kl_between_posterior_and_learned_variance(v):
    # reference: KL of two Gaussians with equal means, 0.5 (log s2 - log s1 + s1/s2 - 1), in bits, from betas alone
    d = gd.Diffusion(learn_sigma=True)
    betas = _betas("linear")
    abar = np.cumprod(1 - betas)
    t = torch.tensor([1, 5, 20, 60])
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 4, 4, generator=g)
    model = lambda x, tt, y=None: torch.cat([noise, torch.full_like(x, v)], 1)  # true eps, constant v
    vb = d.training_losses(model, x0, t, dict(y=None), noise=noise)["vb"].double().numpy()
    tn = t.numpy()
    post_var = betas[tn] * (1 - abar[tn - 1]) / (1 - abar[tn])
    frac = (v + 1) / 2  # improved DDPM eq. 15: log var = frac log beta + (1 - frac) log post_var
    log_var = frac * np.log(betas[tn]) + (1 - frac) * np.log(post_var)
    ref = 0.5 * (log_var - np.log(post_var) + post_var / np.exp(log_var) - 1) / math.log(2)
    np.testing.assert_allclose(vb, ref, rtol=1e-3, atol=1e-6)
    if v == 1.0:
        assert ref.min() > 1e-4  # the check has teeth: at these t beta and the posterior variance differ


@pytest.mark.parametrize("v", [1.0, -1.0])
def test_vb_term_at_t0_is_the_decoder_nll_in_bits(v):
    # t = 0: -log p(x_0 | x_1) of the 256-bin discretised Gaussian (edge bins open), not a KL. With the true eps
    # the model mean is x_0 itself, so the bin probability depends only on the learned scale; exact normal CDF here.
    d = gd.Diffusion(learn_sigma=True)
    betas = _betas("linear")
    g = torch.Generator().manual_seed(4)
    x0 = (torch.randint(0, 256, (3, 3, 4, 4), generator=g).double() * 2 / 255 - 1).float()  # pixel levels, incl. +-1
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1.0, 1.0
    noise = torch.randn(3, 3, 4, 4, generator=g)
    model = lambda x, tt, y=None: torch.cat([noise, torch.full_like(x, v)], 1)
    vb = d.training_losses(model, x0, torch.zeros(3, dtype=torch.long), dict(y=None), noise=noise)["vb"].double().numpy()
    post_var_1 = betas[1] * betas[0] / (1 - (1 - betas[0]) * (1 - betas[1]))
    frac = (v + 1) / 2
    s = math.exp(0.5 * (frac * math.log(betas[0]) + (1 - frac) * math.log(post_var_1)))
    x = x0.double().numpy()
    p = np.where(np.abs(x) > 0.999, norm.cdf(1 / 255 / s), norm.cdf(1 / 255 / s) - norm.cdf(-1 / 255 / s))
    ref = (-np.log(p)).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(vb, ref, rtol=2e-3)
    assert ref.min() > 0.5  # bits per dim: far from the t = 1 KL, which is ~0 for the true eps


def test_fixed_large_variance_without_learn_sigma():
    # "fixed large": beta_t for t >= 1, and at t = 0 the posterior variance of t = 1 (beta_0 would be too small)
    d = gd.Diffusion(learn_sigma=False)
    betas = _betas("linear")
    t = torch.tensor([0, 1, 10, 500, 999])
    xt = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    _, log_var, _ = d.p_mean_variance(torch.zeros_like(xt), xt, t)
    pv1 = betas[1] * betas[0] / (1 - (1 - betas[0]) * (1 - betas[1]))  # beta_1 (1 - abar_0) / (1 - abar_1)
    ref = np.log(np.append(pv1, betas[t.numpy()[1:]]))
    assert log_var.shape == xt.shape
    np.testing.assert_allclose(log_var.double().numpy()[:, 0, 0, 0], ref, rtol=1e-6)
    assert torch.all(log_var == log_var[:, :1, :1, :1])


def test_cosine_alphas_cumprod_is_the_closed_form():
    # Nichol & Dhariwal eq. 17: abar_t = f(t+1) / f(0) (t = 0..T-1 here); clipping only bites at the very end
    T = 1000
    f = lambda s: np.cos((s / T + 0.008) / 1.008 * np.pi / 2) ** 2
    d = gd.Diffusion(schedule="cosine")
    t = np.arange(991)
    np.testing.assert_allclose(d.alphas_cumprod[t], f(t + 1) / f(0), rtol=1e-9)
    assert gd.get_beta_schedule("cosine", T)[-1] == 0.999  # the last beta (1 - f(T)/f(T-1) = 1) is clipped


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 250])
def test_negative_transfer_alphas_cumprod_mirrors_diffusion(schedule, T):
    ref = np.cumprod(1 - gd.get_beta_schedule(schedule, T))
    np.testing.assert_allclose(nt._alphas_cumprod(schedule, T), ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(nt._alphas_cumprod(schedule, T), np.cumprod(1 - _betas(schedule, T)), rtol=1e-12)


def test_p2_and_min_snr_weights_by_formula():
    abar = np.cumprod(1 - _betas("linear"))
    snr = abar / (1 - abar)
    # k = 2, gamma = 0.5 tells 1 / (k + snr)**gamma apart from 1 / (k + snr**gamma) and from 1 / (k + snr)
    p2 = gd.Diffusion(learn_sigma=False, weighting="p2", p2_k=2.0, p2_gamma=0.5)
    np.testing.assert_allclose(p2.loss_weight, 1 / np.sqrt(2 + snr), rtol=1e-10)
    for gamma in (5.0, 1.0):
        ms = gd.Diffusion(weighting="min-snr", min_snr_gamma=gamma)
        np.testing.assert_allclose(ms.loss_weight, np.minimum(snr, gamma) / snr, rtol=1e-10)
    # the weight training_losses reports, and a respaced diffusion keeps the knobs and the per-timestep weights
    t = torch.tensor([0, 10, 500, 999])
    x0 = torch.zeros(4, 1, 2, 2)
    out = p2.training_losses(lambda x, tt, y=None: torch.zeros_like(x), x0, t, dict(y=None))
    np.testing.assert_allclose(out["weight"].double().numpy(), 1 / np.sqrt(2 + snr[t.numpy()]), rtol=1e-6)
    r = p2.respace("ddim50")
    np.testing.assert_allclose(r.loss_weight, p2.loss_weight[r.timestep_map], rtol=1e-9)


def test_space_timesteps_gives_the_remainder_to_the_first_sections():
    # official respace.py: 10 steps in 3 sections have sizes 4, 3, 3 (the remainder goes first);
    # two steps per section take each section's first and last timestep
    assert gd.space_timesteps(10, "2,2,2") == [0, 3, 4, 6, 7, 9]
    assert gd.space_timesteps(11, "1,3") == [0, 6, 8, 10]  # sizes 6, 5; a single step takes the section start


def test_training_on_a_respaced_diffusion_feeds_the_original_timesteps():
    # ddim10 keeps t = 0, 100, ..., 900; step i is original timestep 100 i, and x_t uses that timestep's abar
    r = gd.Diffusion(learn_sigma=False).respace("ddim10")
    abar = np.cumprod(1 - _betas("linear"))
    seen = []

    def model(x, t, y=None):
        seen.append((x.double(), t.clone()))
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    r.training_losses(model, x0, torch.tensor([0, 3, 9]), dict(y=None), noise=noise)
    x, t = seen[0]
    assert t.tolist() == [0, 300, 900]
    a = torch.tensor(abar[[0, 300, 900]]).view(-1, 1, 1, 1)
    torch.testing.assert_close(x, a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), rtol=0, atol=1e-6)


def test_ddim_with_eta_one_steps_like_ddpm_with_the_posterior_variance():
    # DDIM eq. 16: eta = 1 gives sigma_t^2 = (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev), the DDPM posterior
    # variance, and the deterministic part is then the DDPM posterior mean. With an oracle model and unit step
    # noise every step must be x_prev = posterior mean + sqrt(posterior variance), from Bayes' rule on the respaced chain.
    abar = np.cumprod(1 - _betas("linear"))  # float64, independent of diffusion.py
    target = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = []

    def oracle(x, t):
        seen.append((int(t[0]), x.double()))
        a = torch.tensor(abar)[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    sampler = gd.Diffusion(learn_sigma=False).respace("ddim10")
    out = sampler.ddim_sample(oracle, x_T, clip_denoised=False, eta=1.0, noise_fn=torch.ones_like)
    x0 = target.double()
    assert len(seen) == 10
    for (t, x), (t_prev, x_next) in zip(seen, seen[1:] + [(None, out.double())]):
        if t_prev is None:  # the last step lands on x0 and adds no noise
            torch.testing.assert_close(x_next, x0, rtol=0, atol=1e-4)
            continue
        a_prev = abar[t_prev]
        beta = 1 - abar[t] / a_prev
        var = 1 / (1 / (1 - a_prev) + (1 - beta) / beta)
        mean = var * (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(1 - beta) * x / beta)
        torch.testing.assert_close(x_next, mean + math.sqrt(var), rtol=0, atol=1e-4)


def test_guided_model_fn_returns_the_conditional_half_with_guided_eps():
    # reference from two plain forward passes: eps = uncond + s (cond - uncond) on all 3 epsilon channels, and
    # the learned-variance channels of the conditional pass (the first half, as DiT's sample.py keeps)
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=8, in_channels=3, num_classes=4, depth=1, hidden_size=32, num_heads=2).eval()
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 3])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 4))
        out = gd.guided_model_fn(model, y, 2.5, 4)(x, t)
    assert (cond - uncond)[:, 3:].abs().max() > 1e-3  # the two halves' variance channels differ
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)


def test_respacing_ddim_with_every_step_and_a_respaced_chain_keeps_original_timesteps():
    # official space_timesteps tries strides from 1, so "ddimT" keeps all T steps; respacing an already respaced
    # diffusion (d.respace(..).sample(steps=..)) maps its steps back through both maps to the original timesteps
    assert gd.space_timesteps(40, "ddim40") == list(range(40))
    d = gd.Diffusion(1000, learn_sigma=False)
    twice = d.respace("ddim10").respace("ddim5")
    assert twice.timestep_map.tolist() == [0, 200, 400, 600, 800]
    np.testing.assert_allclose(twice.alphas_cumprod, d.alphas_cumprod[twice.timestep_map], rtol=1e-12)


def test_hybrid_loss_is_the_weighted_mse_plus_the_unweighted_vb():
    # DiT's objective: loss = w(t) mse + vb; Min-SNR / P2 reweight the epsilon MSE only (the VLB term trains the
    # variance and keeps its own scale), and vb is part of the loss, not only reported
    d = gd.Diffusion(learn_sigma=True, weighting="min-snr", min_snr_gamma=1.0)
    t = torch.tensor([0, 3, 50, 900])
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, torch.randn(4, 3, 4, 4, generator=g)
    out = d.training_losses(lambda x, tt, y=None: torch.cat([0.5 * noise, torch.full_like(x, 0.3)], 1), x0, t,
                            dict(y=None), noise=noise)
    w = np.minimum(d.snr[t.numpy()], 1.0) / d.snr[t.numpy()]
    assert w.min() < 0.01 and out["vb"].min() > 1e-3  # the check has teeth: weights far from 1, vb far from 0
    np.testing.assert_allclose(out["loss"].double().numpy(), w * out["mse"].double().numpy() + out["vb"].double().numpy(),
                               rtol=1e-6)


def test_ddim_step_rederives_eps_from_the_clipped_x0():
    # official guided-diffusion ddim_sample: with clip_denoised, x_0 is clamped to [-1, 1] and eps is re-derived from
    # the clamped x_0 and x_t (eps' = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)) before DDIM eq. 12
    betas = np.array([0.1, 0.5])
    abar = np.cumprod(1 - betas)
    d = gd.Diffusion(learn_sigma=False, betas=betas)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return -x  # x_0 = (1 + sqrt(1 - abar)) x / sqrt(abar): far outside [-1, 1] for most pixels

    d.ddim_sample(model, x_T, clip_denoised=True, eta=0.0)
    x0 = ((x_T + math.sqrt(1 - abar[1]) * x_T) / math.sqrt(abar[1])).clamp(-1, 1)
    eps = (x_T - math.sqrt(abar[1]) * x0) / math.sqrt(1 - abar[1])
    assert (x0.abs() == 1).float().mean() > 0.5 and (x0.abs() < 1).any()
    torch.testing.assert_close(seen[1], math.sqrt(abar[0]) * x0 + math.sqrt(1 - abar[0]) * eps, rtol=0, atol=1e-6)  # fp32 model output


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_step_adds_the_standard_deviation_times_the_step_noise(learn_sigma):
    # DDPM alg. 2: x_{t-1} = mu + sigma_t z with sigma_t = exp(0.5 log var): beta_t (fixed large) or, learned,
    # exp of frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2 (improved DDPM eq. 15); z = 1 here
    betas = np.array([0.1, 0.5])
    abar = np.cumprod(1 - betas)
    d = gd.Diffusion(learn_sigma=learn_sigma, betas=betas)
    g = torch.Generator().manual_seed(7)
    x_T, eps = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return torch.cat([eps, torch.full_like(x, 0.2)], 1) if learn_sigma else eps

    d.ddpm_sample(model, x_T, clip_denoised=False, noise_fn=torch.ones_like)
    x0 = (x_T - math.sqrt(1 - abar[1]) * eps) / math.sqrt(abar[1])
    post_var = betas[1] * (1 - abar[0]) / (1 - abar[1])
    mean = post_var * (math.sqrt(abar[0]) * x0 / (1 - abar[0]) + math.sqrt(1 - betas[1]) * x_T / betas[1])
    frac = 0.6 if learn_sigma else 1.0
    std = math.exp(0.5 * (frac * math.log(betas[1]) + (1 - frac) * math.log(post_var)))
    assert std - std ** 2 > 0.2  # std, not the variance: the check has teeth
    torch.testing.assert_close(seen[1], mean + std, rtol=0, atol=1e-6)  # fp32 model output


# ==============================================================================================
#                                   data.py
# ==============================================================================================

def _write_images(folder, n_per_class, classes=("a", "b"), size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_shapes_dataset_is_deterministic():
    a, b = datasets.ShapesDataset(16, 8, seed=3), datasets.ShapesDataset(16, 8, seed=3)
    x, y = a[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == 5 % 4
    assert torch.equal(x, b[5][0]) and not torch.equal(x, datasets.ShapesDataset(16, 8, seed=4)[5][0])


def test_folder_zip_and_npz_datasets(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    ds = datasets.load_dataset(tmp_path / "imgs", 16)
    assert len(ds) == 6 and ds.num_classes == 2 and ds[0][0].shape == (3, 16, 16) and ds[5][1] == 1
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in sorted((tmp_path / "imgs").rglob("*.png")):
            zf.write(p, "train/" + str(p.relative_to(tmp_path / "imgs")))
    dz = datasets.load_dataset(str(tmp_path / "imgs.zip"), 16)
    assert dz.num_classes == 2 and torch.equal(dz[4][0], ds[4][0])
    np.savez(tmp_path / "d.npz", arr_0=np.zeros((5, 16, 16, 3), np.uint8), arr_1=np.arange(5) % 3)
    dn = datasets.load_dataset(str(tmp_path / "d.npz"), 16)
    assert len(dn) == 5 and dn.num_classes == 3


def test_zip_scan_parses_the_directory_once_and_reads_by_position_from_its_threads(tmp_path, monkeypatch):
    # One ZipFile per thread (and per DataLoader worker) held the whole central directory each: 0.73 GB for ImageNet's
    # 1.28M members, 13.5 GB per rank at the peak of the 16-thread scan. A ZipFile shared by threads raced on the file
    # position instead ("Overlapped entries" or a bad CRC on Python >= 3.12). Now: one parse, then os.pread.
    _write_images(tmp_path / "imgs", 20)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in sorted((tmp_path / "imgs").rglob("*.png")):
            zf.write(p, str(p.relative_to(tmp_path / "imgs")))
    parses, readers, real_parse, real_pread = [0], set(), zipfile.ZipFile._RealGetContents, os.pread

    def counting_parse(self):
        parses[0] += 1
        return real_parse(self)

    def tracked_pread(fd, n, offset):
        readers.add(threading.get_ident())
        return real_pread(fd, n, offset)

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", counting_parse)
    monkeypatch.setattr(zipfile.ZipFile, "open", None)  # no member is read through a ZipFile
    monkeypatch.setattr(os, "pread", tracked_pread)
    for skip_bad in (False, True):  # the header check reads a prefix of each member; the full decode reads it whole
        parses[0] = 0
        readers.clear()
        ds = datasets.ImageFiles(tmp_path / "imgs.zip", 16, skip_bad=skip_bad, num_threads=4)
        assert len(ds) == 40 and ds.num_classes == 2 and ds.num_upsized == 0 and ds.skipped == []
        assert parses[0] == 1 and readers and threading.get_ident() not in readers  # the pool's threads read (as many as it started)
        ds[0], ds[39]
        assert parses[0] == 1  # reading items parses nothing either


def test_zip_header_check_reads_only_the_start_of_each_member(tmp_path, monkeypatch):
    # Without --skip-bad-images the start-up check needs only the size, which PIL finds in the header: a member read
    # whole would be the whole dataset read on every rank (140 GB for an ImageNet zip).
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")  # about 200 KB of incompressible pixels
    with zipfile.ZipFile(tmp_path / "big.zip", "w") as zf:
        zf.writestr("a/0.png", buf.getvalue(), compress_type=zipfile.ZIP_STORED)
        zf.writestr("a/1.png", buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    read, real_pread = [0], os.pread

    def counting_pread(fd, n, offset):
        data = real_pread(fd, n, offset)
        read[0] += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    ds = datasets.ImageFiles(tmp_path / "big.zip", 16, num_threads=1)
    assert len(ds) == 2 and ds.num_upsized == 0
    assert read[0] <= 2 * (30 + datasets.ZIP_HEADER_BYTES)  # local header and prefix, not the 2 x 200 KB of pixels
    read[0] = 0
    datasets.ImageFiles(tmp_path / "big.zip", 16, skip_bad=True, num_threads=1)  # --skip-bad-images decodes all
    assert read[0] > 2 * 190_000


def test_zip_header_check_reads_a_member_whole_when_its_header_is_longer_than_the_prefix(tmp_path, monkeypatch):
    # A PNG whose text chunk (or a JPEG whose EXIF) outgrows ZIP_HEADER_BYTES: PIL cannot find the size in the prefix,
    # so the member is read whole, and the (error, upsized) results are those of a full read.
    from PIL.PngImagePlugin import PngInfo
    meta = PngInfo()
    meta.add_text("comment", "x" * (3 * datasets.ZIP_HEADER_BYTES))  # written before the pixels
    with zipfile.ZipFile(tmp_path / "meta.zip", "w") as zf:
        for i, (size, method) in enumerate(((8, zipfile.ZIP_STORED), (20, zipfile.ZIP_DEFLATED), (8, zipfile.ZIP_DEFLATED))):
            buf = io.BytesIO()
            Image.new("RGB", (size, size + 2), (i, 2, 3)).save(buf, format="PNG", pnginfo=meta)
            zf.writestr(f"{i}.png", buf.getvalue(), compress_type=method)
    sizes, real_image_size = [], datasets._image_size
    monkeypatch.setattr(datasets, "_image_size", lambda data: sizes.append(real_image_size(data)) or sizes[-1])
    ds = datasets.ImageFiles(tmp_path / "meta.zip", 16, num_threads=1)
    assert sizes == [None] * 3  # the prefix did not do (deflated: 16 KB of "x" inflated past it) ...
    assert ds.num_upsized == 2 and ds.skipped == [] and ds[1][0].shape == (3, 16, 16)  # ... the whole member did
    with zipfile.ZipFile(tmp_path / "meta.zip", "a") as zf:
        zf.writestr("3.png", b"\x89PNG\r\n\x1a\n" + b"not the rest of a PNG" * 2000)  # a bad file longer than the prefix
    with pytest.raises(datasets.DataError, match=r"meta.zip:3.png: .*Remove it, or pass --skip-bad-images"):
        datasets.ImageFiles(tmp_path / "meta.zip", 16, num_threads=1)
    ds = datasets.ImageFiles(tmp_path / "meta.zip", 16, skip_bad=True, num_threads=1)
    assert ds.names == ["0.png", "1.png", "2.png"] and ds.num_upsized == 2 and ds.skipped == [f"{tmp_path / 'meta.zip'}:3.png"]


def test_zip_members_read_by_position_match_zipfile_byte_for_byte(tmp_path):
    # Stored and deflated members, empty and larger than the header prefix, and one whose local header carries a zip64
    # extra field that the central directory lacks (where the data starts is read from the local header).
    rng = np.random.default_rng(1)
    blobs = {"a/empty.png": b"", "a/small.png": rng.bytes(300), "b/noise.png": rng.bytes(70_000),
             "b/text.png": b"compressible " * 5000}
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        for name, blob in blobs.items():
            for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                zf.writestr(f"{method}/{name}", blob, compress_type=method)
        with zf.open("z64/c/local_extra.png", "w", force_zip64=True) as f:
            f.write(blobs["b/noise.png"])
    names, members, _ = fid.zip_members(str(tmp_path / "m.zip"))
    assert len(names) == 9 and names == sorted(names) and members.dtype == fid.ZIP_MEMBER
    with zipfile.ZipFile(tmp_path / "m.zip") as zf, open(tmp_path / "m.zip", "rb") as f:
        local = zf.getinfo("z64/c/local_extra.png")
        f.seek(local.header_offset + 28)
        assert int.from_bytes(f.read(2), "little") != len(local.extra)  # the local extra field differs indeed
        for name, member in zip(names, members):
            assert fid.read_zip_member(f.fileno(), member, name) == zf.read(name), name
            head = fid.read_zip_member(f.fileno(), member, name, limit=1000)  # deflated: what 1000 bytes inflate to
            assert head == zf.read(name)[:len(head)] and min(900, member["size"]) <= len(head) <= 1000, name


def test_zip_member_with_a_flipped_byte_fails_its_crc_and_is_skipped_on_request(tmp_path):
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")  # about 12 KB; padded past the header prefix below
    big = buf.getvalue() + b"\0" * datasets.ZIP_HEADER_BYTES  # trailing bytes after IEND: PIL ignores them
    small = io.BytesIO()
    Image.fromarray(noise[:20, :20]).save(small, format="PNG")
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        path = tmp_path / f"crc{method}.zip"
        with zipfile.ZipFile(path, "w", compression=method) as zf:
            zf.writestr("a/0.png", big)
            zf.writestr("a/1.png", small.getvalue())
            zf.writestr("b/2.png", big)
            zf.writestr("b/3.png", small.getvalue())  # class b keeps an image when 2.png is skipped
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            at = fid.zip_data_offset(f.fileno(), zf.getinfo("b/2.png").header_offset) + 5000
        raw = bytearray(path.read_bytes())
        raw[at] ^= 0xFF  # in the pixels (deflated: somewhere in the stream), after the header PIL reads
        path.write_bytes(bytes(raw))
        ds = datasets.ImageFiles(path, 16, num_threads=2)  # the header check passes: the CRC is checked at load
        assert len(ds) == 4 and ds[0][0].shape == (3, 16, 16)
        with pytest.raises(datasets.DataError, match=r"crc\d.zip:b/2.png: BadZipFile: Bad CRC-32"):
            ds[2]
        with pytest.raises(ValueError, match=r"cannot decode .*crc\d.zip/b/2.png: Bad CRC-32.*remove or replace"):
            fid.ImageFiles(path)[2]  # fid reads the zip the same way
        ds = datasets.ImageFiles(path, 16, skip_bad=True, num_threads=2)
        assert ds.names == ["a/0.png", "a/1.png", "b/3.png"] and ds.skipped == [f"{path}:b/2.png"]
        assert ds.labels == [0, 0, 1] and ds[2][1] == 1
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:  # a member no longer than the prefix: at start-up
            at = fid.zip_data_offset(f.fileno(), zf.getinfo("a/1.png").header_offset) + 200
        raw[at] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(datasets.DataError, match=r"a/1.png: BadZipFile: Bad CRC-32 .*--skip-bad-images"):
            datasets.ImageFiles(path, 16, num_threads=2)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_members_compressed_other_than_deflate_are_refused(tmp_path, method):
    _write_images(tmp_path / "imgs", 1)
    with zipfile.ZipFile(tmp_path / "bz.zip", "w") as zf:
        zf.write(tmp_path / "imgs" / "a" / "0.png", "a/0.png", compress_type=zipfile.ZIP_DEFLATED)
        zf.write(tmp_path / "imgs" / "b" / "0.png", "b/0.png", compress_type=method)
        zf.writestr("notes.txt", b"not an image: its method does not matter", compress_type=method)
    with pytest.raises(datasets.DataError, match=rf"bz.zip:b/0.png is compressed with method {method}; re-zip the images stored or deflated"):
        datasets.load_dataset(str(tmp_path / "bz.zip"), 16)
    with pytest.raises(ValueError, match=rf"bz.zip:b/0.png is compressed with method {method}; re-zip"):
        fid.ImageFiles(tmp_path / "bz.zip")  # zipfile reads it, but fid reads members as data.py does


def test_zip_name_stored_twice_is_one_image_its_last_entry(tmp_path):
    # A zip appended to again can hold a name twice: it is one image, as in a folder, read from its last entry, which
    # is what ZipFile.read(name) gives
    def png(value):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="PNG")
        return buf.getvalue()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name"
        with zipfile.ZipFile(tmp_path / "dup.zip", "w") as zf:
            zf.writestr("a/x.png", png(1))
            zf.writestr("b/y.png", png(2))
            zf.writestr("a/x.png", png(200))
    ds = datasets.ImageFiles(tmp_path / "dup.zip", 16)
    assert ds.names == ["a/x.png", "b/y.png"] and [int(ds[i][0][0, 0, 0]) for i in range(2)] == [200, 2]
    fx = fid.ImageFiles(tmp_path / "dup.zip")  # FID counted a/x.png twice, both times with the last entry's pixels
    assert fx.names == ["a/x.png", "b/y.png"] and [int(fx[i][0, 0, 0]) for i in range(2)] == [200, 2]


def test_zip_member_flagged_encrypted_is_refused_with_what_to_do(tmp_path):
    # zipfile writes no encrypted members: set bit 0 of the flags in the local and central headers of b/0.png by hand,
    # as `zip -e` does. zipfile itself then refuses to read it without a password.
    _write_images(tmp_path / "imgs", 1)
    with zipfile.ZipFile(tmp_path / "enc.zip", "w") as zf:
        zf.write(tmp_path / "imgs" / "a" / "0.png", "a/0.png", compress_type=zipfile.ZIP_STORED)
        zf.write(tmp_path / "imgs" / "b" / "0.png", "b/0.png", compress_type=zipfile.ZIP_STORED)
    raw = bytearray((tmp_path / "enc.zip").read_bytes())
    local = raw.index(b"b/0.png") - 30  # b/0.png's local header: 30 fixed bytes before the name
    central = raw.rindex(b"b/0.png") - 46  # its central directory record: 46 fixed bytes before the name
    assert raw[local:local + 4] == b"PK\x03\x04" and raw[central:central + 4] == b"PK\x01\x02"
    raw[local + 6] |= 1
    raw[central + 8] |= 1
    (tmp_path / "enc.zip").write_bytes(bytes(raw))
    with zipfile.ZipFile(tmp_path / "enc.zip") as zf:
        assert zf.getinfo("b/0.png").flag_bits & 1 and not zf.getinfo("a/0.png").flag_bits & 1
        with pytest.raises(RuntimeError, match="encrypted"):
            zf.read("b/0.png")
    with pytest.raises(datasets.DataError, match=r"enc.zip:b/0.png is encrypted; re-zip .*no password"):
        datasets.load_dataset(str(tmp_path / "enc.zip"), 16)
    with pytest.raises(ValueError, match=r"enc.zip:b/0.png is encrypted; re-zip .*no password"):
        fid.ImageFiles(tmp_path / "enc.zip")  # was a RuntimeError from zipfile at the first batch


def test_zip_without_images_says_so(tmp_path):
    for members in ({}, {"notes.txt": b"no image here", ".hidden.png": b"x"}):  # empty, or nothing but non-images
        with zipfile.ZipFile(tmp_path / "none.zip", "w") as zf:
            for name, blob in members.items():
                zf.writestr(name, blob)
        names, records, _ = fid.zip_members(str(tmp_path / "none.zip"))
        assert names == [] and len(records) == 0
        with pytest.raises(datasets.DataError, match="no images .* found in"):
            datasets.load_dataset(str(tmp_path / "none.zip"), 16)


def test_zip_skipping_a_bad_member_in_the_middle_keeps_every_later_image_with_its_own_bytes(tmp_path):
    # --skip-bad-images drops a member's record with its name: item i after the gap is still member names[i], as
    # zipfile reads it
    colours = [(10, 0, 0), None, (0, 20, 0), (0, 0, 30)]  # a/1.png is not an image
    with zipfile.ZipFile(tmp_path / "gap.zip", "w") as zf:
        for i, colour in enumerate(colours):
            buf = io.BytesIO()
            if colour is None:
                buf.write(b"not a PNG")
            else:
                Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
            zf.writestr(f"a/{i}.png", buf.getvalue())
    ds = datasets.ImageFiles(tmp_path / "gap.zip", 16, skip_bad=True, num_threads=2)
    assert ds.names == ["a/0.png", "a/2.png", "a/3.png"] and ds.skipped == [f"{tmp_path / 'gap.zip'}:a/1.png"]
    with zipfile.ZipFile(tmp_path / "gap.zip") as zf:
        for i, name in enumerate(ds.names):
            expected = np.array(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))  # (16, 16, 3)
            assert torch.equal(ds[i][0], torch.from_numpy(expected).permute(2, 0, 1)), name


def test_zip_counts_the_images_whose_short_side_is_below_the_target_size(tmp_path):
    # upsized: min(width, height) < image_size, whether the size comes from a member's first ZIP_HEADER_BYTES (a
    # large member) or from the whole member (a small one, or --skip-bad-images)
    sizes = [(12, 40), (40, 12), (16, 16), (16, 40), (15, 15), (40, 40)]  # (width, height); upsized: 1st, 2nd, 5th
    rng = np.random.default_rng(5)
    with zipfile.ZipFile(tmp_path / "sizes.zip", "w") as zf:
        for i, (w, h) in enumerate(sizes):
            for big in (False, True):
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                blob = buf.getvalue() + (b"\0" * 2 * datasets.ZIP_HEADER_BYTES if big else b"")  # PIL ignores a tail
                zf.writestr(f"{'big' if big else 'small'}/{i}.png", blob, compress_type=zipfile.ZIP_STORED)
    for skip_bad in (False, True):
        ds = datasets.ImageFiles(tmp_path / "sizes.zip", 16, skip_bad=skip_bad, num_threads=2)
        assert len(ds) == 12 and ds.num_upsized == 2 * 3, skip_bad


def test_zip_member_cut_short_is_refused_not_returned_short(tmp_path):
    # A zip rewritten or cut after the run listed it: the bytes left of a member are fewer than its size, and its
    # CRC is then not checked, so the length check is what stops them.
    blob = np.random.default_rng(6).bytes(5000)
    with zipfile.ZipFile(tmp_path / "whole.zip", "w") as zf:
        zf.writestr("stored.png", blob, compress_type=zipfile.ZIP_STORED)
        zf.writestr("deflated.png", blob, compress_type=zipfile.ZIP_DEFLATED)
    names, members, _ = fid.zip_members(str(tmp_path / "whole.zip"))
    raw = (tmp_path / "whole.zip").read_bytes()
    with open(tmp_path / "whole.zip", "rb") as f:
        starts = [fid.zip_data_offset(f.fileno(), int(m["offset"])) for m in members]
    for name, member, start in zip(names, members, starts):
        (tmp_path / "cut.zip").write_bytes(raw[:start + int(member["csize"]) // 2])  # half the member's data left
        with open(tmp_path / "cut.zip", "rb") as f:
            with pytest.raises(zipfile.BadZipFile, match=f"{name}' is truncated"):
                fid.read_zip_member(f.fileno(), member, name)


def test_zip_data_offset_refuses_what_is_no_local_header_as_zipfile_does(tmp_path):
    with zipfile.ZipFile(tmp_path / "h.zip", "w") as zf:
        zf.writestr("a.png", b"x" * 100)
        info = zf.getinfo("a.png")
    raw = bytearray((tmp_path / "h.zip").read_bytes())
    (tmp_path / "cut.zip").write_bytes(bytes(raw[:info.header_offset + 20]))  # the header cut after 20 of its 30 bytes
    raw[info.header_offset] ^= 0xFF  # the local header's signature
    (tmp_path / "h.zip").write_bytes(bytes(raw))
    with zipfile.ZipFile(tmp_path / "h.zip") as zf, pytest.raises(zipfile.BadZipFile, match="Bad magic number"):
        zf.read("a.png")
    for name in ("h.zip", "cut.zip"):
        with open(tmp_path / name, "rb") as f, pytest.raises(zipfile.BadZipFile, match="Bad magic number"):
            fid.zip_data_offset(f.fileno(), info.header_offset)


def test_zip_without_os_pread_is_refused_with_what_to_do(tmp_path, monkeypatch):
    _write_images(tmp_path / "imgs", 1)
    with zipfile.ZipFile(tmp_path / "i.zip", "w") as zf:
        zf.write(tmp_path / "imgs" / "a" / "0.png", "a/0.png")
    monkeypatch.delattr(os, "pread")  # as on Windows
    with pytest.raises(datasets.DataError, match="needs os.pread.*unzip it and pass the folder"):
        datasets.load_dataset(str(tmp_path / "i.zip"), 16)
    with pytest.raises(ValueError, match="needs os.pread.*unzip it and pass the folder"):
        fid.ImageFiles(tmp_path / "i.zip")


def test_folder_without_class_folders_is_unconditional(tmp_path):
    _write_images(tmp_path / "u", 2, classes=("only",))
    ds = datasets.load_dataset(tmp_path / "u", 16)
    assert ds.num_classes == 1 and {ds[i][1] for i in range(len(ds))} == {0}


def test_grey_palette_and_rgba_images_become_rgb(tmp_path):
    from PIL import Image
    (tmp_path / "m").mkdir()
    Image.new("L", (16, 16), 100).save(tmp_path / "m" / "grey.png")
    Image.new("RGBA", (16, 16), (10, 20, 30, 128)).save(tmp_path / "m" / "rgba.png")
    pal = Image.new("P", (16, 16), 3)
    pal.putpalette([0, 0, 0] * 3 + [200, 50, 7] + [0, 0, 0] * 252)  # index 3 is (200, 50, 7)
    pal.save(tmp_path / "m" / "pal.png")
    ds = datasets.load_dataset(tmp_path / "m", 16)
    images = [ds[i][0] for i in range(3)]
    assert all(x.shape == (3, 16, 16) and torch.equal(x, x[:, :1, :1].expand(3, 16, 16)) for x in images)  # uniform
    # grey copied to every channel, alpha dropped (not blended), the palette index looked up
    assert sorted(tuple(x[:, 0, 0].tolist()) for x in images) == [(10, 20, 30), (100, 100, 100), (200, 50, 7)]


def test_to_model_input_scales_and_flips():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2)
    out = datasets.to_model_input(x, flip=False)
    assert out.min() >= -1 and out.max() <= 1 and torch.allclose(out, x.float() / 127.5 - 1)
    g = torch.Generator().manual_seed(0)
    flipped = datasets.to_model_input(x.repeat(50, 1, 1, 1), flip=True, generator=g)
    n_flipped = sum(not torch.equal(f, out[i % 2]) for i, f in enumerate(flipped))
    assert 20 < n_flipped < 80


def test_shapes_background_is_the_first_draw_of_the_seed_and_index_generator():
    """Image i is drawn from np.random.default_rng([seed, i]); its first draw is the background,
    which fills the corners of a circle (i % 4 == 0) exactly. A seed + i stream would make seed 3's
    image 8 seed 7's image 4."""
    for seed, i in ((3, 8), (7, 4)):
        x, y = datasets.ShapesDataset(16, 12, seed=seed)[i]
        background = np.random.default_rng([seed, i]).integers(0, 70, 3)
        assert y == 0 and x[:, 0, 0].tolist() == x[:, -1, -1].tolist() == background.tolist()
    assert not torch.equal(datasets.ShapesDataset(16, 12, seed=3)[8][0], datasets.ShapesDataset(16, 12, seed=7)[4][0])


def test_center_crop_arr_follows_adm_step_by_step():
    """ADM's steps with hand-computed sizes: box-halve while the short side is >= 2x the target,
    bicubic to round(side * scale), crop at floor((side - target) / 2) from the top left."""
    rng = np.random.default_rng(8)
    square = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # 64 = 4 x 16: two halvings
    expected = np.asarray(square.resize((32, 32), Image.BOX).resize((16, 16), Image.BOX))
    np.testing.assert_array_equal(datasets.center_crop_arr(square, 16), expected)
    # (H, W) -> bicubic (W, H) size for PIL -> crop offset (top, left); scale 16 / 20 = 0.8
    for (h, w), size, (top, left) in (((20, 27), (22, 16), (0, 3)),    # 27 * 0.8 = 21.6 rounds to 22
                                      ((20, 31), (25, 16), (0, 4)),    # 24.8 -> 25, (25 - 16) // 2 = 4
                                      ((27, 20), (16, 22), (3, 0))):   # portrait: the crop moves down
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        resized = np.asarray(img.resize(size, Image.BICUBIC))
        np.testing.assert_array_equal(datasets.center_crop_arr(img, 16), resized[top:top + 16, left:left + 16])


def test_center_crop_arr_halves_odd_sides_by_floor_and_crops_images_one_side_already_fits(tmp_path):
    """ADM halves with size // 2 (odd sides round down), and an array image whose height already equals the target
    but whose width does not is still centre-cropped to a square."""
    rng = np.random.default_rng(14)
    img = Image.fromarray(rng.integers(0, 256, (67, 99, 3), dtype=np.uint8))  # (W, H) 99x67 -> 49x33 -> 24x16
    halved = img.resize((49, 33), Image.BOX).resize((24, 16), Image.BOX)
    np.testing.assert_array_equal(datasets.center_crop_arr(img, 16), np.asarray(halved)[:, 4:20])
    wide = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)  # H = 16 = the target, W = 24
    np.savez(tmp_path / "wide.npz", arr_0=wide)
    ds = datasets.load_dataset(str(tmp_path / "wide.npz"), 16)
    assert torch.equal(ds[1][0], torch.from_numpy(wide[1, :, 4:20]).permute(2, 0, 1))


def test_to_model_input_mirrors_left_right_with_probability_one_half():
    x = torch.arange(3 * 2 * 3, dtype=torch.uint8).view(1, 3, 2, 3).repeat(2000, 1, 1, 1)  # H != W, no symmetry
    plain = x[0].float() / 127.5 - 1
    out = datasets.to_model_input(x, generator=torch.Generator().manual_seed(0))
    is_plain = (out == plain).flatten(1).all(1)
    is_mirrored = (out == plain.flip(-1)).flatten(1).all(1)  # the width axis
    assert bool((is_plain ^ is_mirrored).all())  # each image as it is or mirrored left-right, nothing else
    assert 0.45 < is_mirrored.double().mean().item() < 0.55  # 2000 fair coins: 0.5 +- 4.5 sigma


def test_to_model_input_flips_are_drawn_from_the_given_generator_only():
    x = torch.arange(3 * 2 * 3, dtype=torch.uint8).view(1, 3, 2, 3).repeat(64, 1, 1, 1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = (datasets.to_model_input(x, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)  # same seed, same flips; global RNG untouched


def test_labels_from_paths_hand_values():
    # classes in case-sensitive sorted order (as torchvision's ImageFolder), under a common "train/" root
    assert datasets._labels_from_paths(["train/b/1.png", "train/a/2.png", "train/B/3.png"]) == ([2, 1, 0], ["B", "a", "b"])
    # an image directly in the root: unconditional, even beside class folders, with a warning that names it
    with pytest.warns(UserWarning, match=r"1 image lies beside the 2 class folders \(e.g. 3.png\)"):
        assert datasets._labels_from_paths(["a/1.png", "b/2.png", "3.png"]) == ([0, 0, 0], [])
    with pytest.warns(UserWarning, match=r"2 images lie beside the 2 class folders \(e.g. 3.png\)"):  # under a root
        assert datasets._labels_from_paths(["train/a/1.png", "train/b/2.png", "train/3.png", "train/4.png"]) == ([0] * 4, [])
    # a folder name that is not UTF-8 (Latin-1 "café"), as os.walk gives it on Linux: a class like any other
    assert datasets._labels_from_paths(["caf\udce9/1.png", "b/2.png"]) == ([1, 0], ["b", "caf\udce9"])


def test_a_class_folder_without_images_is_refused_rather_than_shifting_the_labels_after_it(tmp_path):
    # Labels are indices into the sorted class folders. One left out, because it is empty or because --skip-bad-images
    # skipped all its images, gave every class after it the label of the one before, and the last class's label went
    # unused, silently; torchvision's ImageFolder (the official DiT loader) refuses an empty class folder too.
    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200, 30, 30)).save(path)

    image(tmp_path / "train" / "a" / "1.png")
    image(tmp_path / "train" / "c" / "2.png")
    (tmp_path / "train" / ".cache").mkdir()  # hidden: skipped, as for the images
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(datasets.DataError, match=r"class folder 'train/b' holds no images .*put its images in, or move it out"):
        datasets.ImageFiles(tmp_path, 16)
    (tmp_path / "train" / "b" / "2.png").write_bytes(b"not a png")
    with pytest.raises(datasets.DataError, match=r"cannot read image .*2.png"):
        datasets.ImageFiles(tmp_path, 16)
    with pytest.raises(datasets.DataError, match=r"every image of class 'b' is unreadable and was skipped"):
        datasets.ImageFiles(tmp_path, 16, skip_bad=True)
    (tmp_path / "train" / "b" / "2.png").unlink()
    (tmp_path / "train" / "b").rmdir()
    data = datasets.ImageFiles(tmp_path, 16)
    assert data.classes == ["a", "c"] and data.labels == [0, 1]


def test_a_foreign_list_manifest_beside_a_latents_npy_is_one_data_error(tmp_path):
    # is_latent_folder sends such a folder to LatentFolder "so that it says what is wrong"; it raised AttributeError
    (tmp_path / "manifest.json").write_text('[{"file": "a/0.png"}]')
    np.save(tmp_path / "latents.npy", np.zeros((2, 4, 2, 2), np.float16))
    np.save(tmp_path / "labels.npy", np.zeros(2, np.int64))
    with pytest.raises(datasets.DataError, match="not a readable latent folder.*holds a list"):
        datasets.load_dataset(tmp_path, 16)


def test_zip_skips_macos_resource_forks(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as zf:
        for p in sorted((tmp_path / "imgs").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path / "imgs").as_posix())
            zf.writestr(f"__MACOSX/{p.parent.name}/._{p.name}", b"resource fork, not an image")
    ds = datasets.load_dataset(str(tmp_path / "mac.zip"), 16)
    assert len(ds) == 4 and ds.classes == ["a", "b"] and ds.labels == [0, 0, 1, 1]


def test_hidden_entries_manifest_json_and_upper_case_extensions(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / ".ipynb_checkpoints").mkdir()  # once a class of its own, shifting every label
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / ".ipynb_checkpoints" / "0.png")
    (tmp_path / "imgs" / "a" / "._0.png").write_bytes(b"macOS resource fork")  # once "cannot read image"
    (tmp_path / "imgs" / "manifest.json").write_text('{"name": "my dataset"}')  # once taken for a latent folder
    ds = datasets.load_dataset(tmp_path / "imgs", 16)
    assert len(ds) == 4 and ds.classes == ["a", "b"] and ds.labels == [0, 0, 1, 1]
    with zipfile.ZipFile(tmp_path / "IMGS.ZIP", "w") as zf:
        for p in sorted((tmp_path / "imgs").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path / "imgs").as_posix())
    assert datasets.load_dataset(str(tmp_path / "IMGS.ZIP"), 16).labels == [0, 0, 1, 1]
    for foreign in ('[{"file": "a/0.png"}]', '{"file": "a/0.png"}\n{"file": "a/1.png"}\n'):  # a list, JSON lines
        (tmp_path / "imgs" / "manifest.json").write_text(foreign)  # once "not a readable latent folder"
        assert len(datasets.load_dataset(tmp_path / "imgs", 16)) == 4
    (tmp_path / "imgs" / "manifest.json").write_text('{"format": "latents.py encode v1"}')
    with pytest.raises(datasets.DataError, match="latent folder"):  # a real latents.py manifest still means latents
        datasets.load_dataset(tmp_path / "imgs", 16)
    (tmp_path / "imgs" / "manifest.json").write_text('{"format": "latents.py enc')  # torn, next to the latents
    (tmp_path / "imgs" / "latents.npy").write_bytes(b"")
    with pytest.raises(datasets.DataError, match="not a readable latent folder"):
        datasets.load_dataset(tmp_path / "imgs", 16)


def test_forked_and_spawned_workers_read_the_zip_by_position(tmp_path):
    # A forked DataLoader worker inherits the parent's descriptor once the parent has read an item. Through a ZipFile
    # that raced on the file position and blamed intact images (bad CRC); os.pread has no position to race on. A
    # spawned worker gets the dataset pickled without the open file and opens the zip itself.
    _write_images(tmp_path / "imgs", 8)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in sorted((tmp_path / "imgs").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path / "imgs").as_posix())
    ds = datasets.ImageFiles(tmp_path / "imgs.zip", 16)
    expected = [ds[i][0] for i in range(len(ds))]  # the parent has read from its descriptor
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat([x for x, _ in loader]), torch.stack(expected))
    copy_ = pickle.loads(pickle.dumps(ds))
    assert "_file" in ds.__getstate__() and ds.__getstate__()["_file"] is None and copy_._file is None
    assert torch.equal(torch.stack([copy_[i][0] for i in range(len(ds))]), torch.stack(expected))
    assert copy_._file.fileno() != ds._file.fileno()


def test_npz_images_are_centre_cropped_and_made_rgb_and_labels_are_class_indices(tmp_path):
    rng = np.random.default_rng(9)
    big = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=big, arr_1=np.array([0, 2]))
    with pytest.warns(UserWarning, match="labels 0..2, but 1 of them have no image"):
        ds = datasets.load_dataset(str(tmp_path / "big.npz"), 16)
    assert ds.num_classes == 3  # 0..max label, though class 1 has no image
    for i in range(2):
        x, y = ds[i]
        assert y == [0, 2][i]
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), datasets.center_crop_arr(Image.fromarray(big[i]), 16))
    rgba = rng.integers(0, 256, (1, 16, 16, 4), dtype=np.uint8)
    np.savez(tmp_path / "rgba.npz", arr_0=rgba)
    np.testing.assert_array_equal(datasets.load_dataset(str(tmp_path / "rgba.npz"), 16)[0][0].permute(1, 2, 0).numpy(),
                                  rgba[0, ..., :3])  # alpha dropped, colours kept


def test_npz_and_npy_arrays_are_memory_mapped_where_stored_uncompressed_and_read_as_before(tmp_path):
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8), np.array([2, 0, 1, 2, 0])
    expected = [datasets.center_crop_arr(Image.fromarray(img), 16) for img in images]
    np.savez(tmp_path / "plain.npz", arr_1=labels, arr_0=images)  # ADM's format, uncompressed; arr_0 not first
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images, arr_1=labels)
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(images), arr_1=labels)
    np.save(tmp_path / "images.npy", images)
    for name, mapped in (("plain.npz", True), ("compressed.npz", False), ("fortran.npz", False), ("images.npy", True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = datasets.load_dataset(str(tmp_path / name), 16)
        assert isinstance(ds.images, np.memmap) == mapped, name
        assert any("MB of it into memory" in str(w.message) for w in caught) != mapped, name  # says so, with the size
        for i in range(5):
            x, y = ds[i]
            np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), expected[i], err_msg=name)
            assert y == (0 if name.endswith(".npy") else labels[i])
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))  # refused, as when it was read whole
    with pytest.raises(datasets.DataError, match="uint8"):
        datasets.load_dataset(str(tmp_path / "float.npz"), 16)
    # Only the items asked for are read: numpy reports its allocations to tracemalloc.
    np.savez(tmp_path / "big.npz", arr_0=rng.integers(0, 256, (400, 64, 64, 3), dtype=np.uint8))  # 4.9 MB
    def read_two():
        ds = datasets.load_dataset(str(tmp_path / "big.npz"), 64)
        return ds[7], ds[399]

    _, peak = traced_peak(read_two)
    assert peak < 400 * 64 * 64 * 3 / 10


def test_mapped_array_dataset_is_reopened_not_pickled_and_serves_forked_workers(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=images, arr_1=np.arange(64) % 5)
    ds = datasets.load_dataset(str(tmp_path / "d.npz"), 16)
    expected = [ds[i] for i in range(64)]  # the parent's map is open before the workers fork
    blob = pickle.dumps(ds)  # what a spawned worker receives
    assert len(blob) < images.nbytes / 4
    clone = pickle.loads(blob)
    assert all(torch.equal(clone[i][0], expected[i][0]) for i in range(64)) and isinstance(clone.images, np.memmap)
    sampler = train.StreamSampler(64, 6, 0, 1, seed=0, start_step=5)  # a resumed run's batches
    indices = list(itertools.islice(train.StreamSampler(64, 6, 0, 1, seed=0, start_step=5), 12))  # crosses an epoch
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, multiprocessing_context="fork")
    for idx, (x, y) in zip(indices, loader):
        assert torch.equal(x, torch.stack([expected[i][0] for i in idx])) and y.tolist() == [expected[i][1] for i in idx]


def test_npz_of_object_arrays_is_refused_as_np_load_does_not_mapped(tmp_path):
    # np.savez pickles an object array (a list of images of different sizes): its bytes are no array to map, and
    # elements read from such a map would be raw pointers. npz_array reads it through np.load, which refuses it.
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)
    np.savez(tmp_path / "ragged.npz", arr_0=images)
    with np.load(tmp_path / "ragged.npz") as data, pytest.raises(ValueError, match="allow_pickle"):
        data["arr_0"]
    with pytest.raises(ValueError, match="allow_pickle"):
        fid.npz_array(tmp_path / "ragged.npz")


def test_a_spawned_worker_refuses_an_array_file_rewritten_or_replaced_since_the_parent_mapped_it(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, arr_0=np.zeros((8, 16, 16, 3), np.uint8), arr_1=np.arange(8) % 2)

    def renamed_over():  # the parent keeps its map of the old file
        np.savez(tmp_path / "new.npz", arr_0=np.ones((2, 16, 16, 3), np.uint8))
        os.replace(tmp_path / "new.npz", path)

    def rewritten():  # in place: the parent's map now reads the new bytes too (or dies of SIGBUS past their end)
        np.savez(path, arr_0=np.ones((9, 16, 16, 3), np.uint8), arr_1=np.arange(9) % 2)

    for replace in (renamed_over, rewritten):
        ds = datasets.load_dataset(str(path), 16)
        blob = pickle.dumps(ds)  # what a spawned (or, Python >= 3.14's default, forkserver) worker receives
        replace()
        with pytest.raises(datasets.DataError, match="rewritten or replaced after this run opened it"):
            pickle.loads(blob)[5]  # it once mapped the new file: other images, or an IndexError past its 2
    # np.load reads a member that a zip written by hand names "arr_0" (no .npy): so does ArrayDataset, unmapped
    with zipfile.ZipFile(tmp_path / "hand.npz", "w") as zf:
        with zf.open("arr_0", "w") as f:
            np.lib.format.write_array(f, np.full((3, 16, 16, 3), 9, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert datasets.load_dataset(str(tmp_path / "hand.npz"), 16)[2][0].eq(9).all()


def test_a_data_error_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    _write_images(tmp_path / "imgs", 4)
    png = (tmp_path / "imgs" / "a" / "0.png").read_bytes()
    (tmp_path / "imgs" / "a" / "0.png").write_bytes(png[:len(png) // 2])  # its header reads, its pixels do not
    err = _train_error(tmp_path, capsys, "--data", str(tmp_path / "imgs"), "--num-workers", "1")
    assert "0.png" in err and "--skip-bad-images" in err  # the worker's traceback once came with it


def test_dataset_to_tensor_fills_one_preallocated_tensor(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)  # two loader batches
    np.savez(tmp_path / "d.npz", arr_0=images, arr_1=np.arange(300) % 7)
    ds = datasets.load_dataset(str(tmp_path / "d.npz"), 16)
    x, y = datasets.dataset_to_tensor(ds, device="cpu")
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert y.dtype == torch.int64 and y.tolist() == (np.arange(300) % 7).tolist()
    # Host memory: one copy of the set (the result), not the decoded batches plus their concatenation
    # (and, before memory-mapping, the whole arr_0 besides). Measured in a fresh process.
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((3000, 64, 64, 3), np.uint8))  # 36.9 MB
    script = textwrap.dedent(f"""
        import threading, time, data
        peak = [0]
        def anon():
            return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
        def watch():
            while True:
                peak[0] = max(peak[0], anon())
                time.sleep(0.001)
        start = anon()
        threading.Thread(target=watch, daemon=True).start()
        data.dataset_to_tensor(data.load_dataset({str(tmp_path / "big.npz")!r}, 64))
        time.sleep(0.01)
        print((peak[0] - start) / (3000 * 64 * 64 * 3))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.7  # 1.25 here; 3.1 before, and 2 or more with either half of the fix


def test_images_with_a_short_side_below_the_target_are_counted(tmp_path):
    _write_images(tmp_path / "small", 2, size=12)  # 12 x 16: short side below 16, long side not
    _write_images(tmp_path / "large", 2, size=16)  # 16 x 20
    assert datasets.load_dataset(tmp_path / "small", 16).num_upsized == 4
    assert datasets.load_dataset(tmp_path / "large", 16).num_upsized == 0


# ==============================================================================================
#                                   train.py and sample.py
# ==============================================================================================

def test_training_reduces_loss_on_tiny_data(tmp_path):
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=16, in_channels=3, num_classes=4, depth=2, hidden_size=64, num_heads=2,
                                  learn_sigma=False)
    d = gd.Diffusion(learn_sigma=False)
    ds = datasets.ShapesDataset(16, 16)
    x = datasets.to_model_input(torch.stack([ds[i][0] for i in range(16)]), flip=False)
    y = torch.tensor([ds[i][1] for i in range(16)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t_eval = torch.randint(0, 1000, (16,), generator=gen)
    noise_eval = torch.randn(x.shape, generator=gen)

    def eval_loss():
        with torch.no_grad():
            return d.training_losses(model, x, t_eval, dict(y=y), noise=noise_eval)["loss"].mean().item()

    before = eval_loss()
    for _ in range(60):
        loss = d.training_losses(model, x, torch.randint(0, 1000, (16,)), dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_ddpm_sample_grid_step_noise_is_not_its_starting_noise(tmp_path, monkeypatch):
    # both were drawn from a generator seeded with --global-seed, so the first step's noise was exactly x_T
    drawn = []

    def generate(model, diffusion, labels, noise, noise_fn=None, **kw):
        drawn.append((noise.clone(), noise_fn(noise), noise_fn(noise)))
        return noise.clamp(-1, 1)
    monkeypatch.setattr(train, "generate", generate)
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--sample-every", "1", "--sample-steps", "2")
    (x_T, first, second), again = drawn[0], drawn[1]
    assert not torch.equal(first, x_T) and not torch.equal(second, first)
    assert all(torch.equal(a, b) for a, b in zip(drawn[0], again))  # every grid draws the same noise
    # from one generator seeded with --global-seed: x_T, then the step noise goes on from there (a default-seeded
    # generator for the step noise passed the checks above, and gave every --global-seed the same)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(x_T, torch.randn(x_T.shape, generator=g)) and torch.equal(first, torch.randn(x_T.shape, generator=g))


def test_train_writes_log_metrics_checkpoint_and_grid(tmp_path):
    out = run_train(tmp_path, "--global-batch-size", "8", "--max-steps", "3", "--sample-every", "3", "--sample-steps", "ddim5")
    start, *rec = metrics(out)
    assert start["event"] == "start" and start["step"] == 0 and start["args"]["global_batch_size"] == 8
    assert start["world_size"] == 1 and start["device"] == "cpu"
    assert [r["step"] for r in rec] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rec)
    assert any(k.startswith("loss_t") for k in rec[0])
    assert (out / "samples_0000003.png").exists() and (out / "log.txt").exists()
    ckpt = last_checkpoint(out)
    assert ckpt["step"] == 3 and set(ckpt) >= {"model", "ema", "opt", "args", "rng", "method"}
    model, _, args = load_model(str(sorted((out / "checkpoints").glob("*.pt"))[-1]))
    assert args["method"] == "vanilla" and model.input_size == 16


def test_resume_is_bitwise_identical(tmp_path):
    # with a DDPM grid at the checkpoint step: its step noise must not come from the training RNG
    common = ["--global-batch-size", "4", "--max-steps", "6", "--ckpt-every", "3", "--sample-every", "3", "--sample-steps", "4"]
    straight = run_train(tmp_path, *common, name="straight")
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "3", "--sample-every", "3", "--sample-steps", "4", name="split")
    resumed = run_train(tmp_path, *common, "--resume", "auto", name="split")
    a, b = last_checkpoint(straight), last_checkpoint(resumed)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    # and so are the grids: the same EMA from the same fixed noise (seeded with --global-seed, not the start step)
    assert (straight / "samples_0000006.png").read_bytes() == (resumed / "samples_0000006.png").read_bytes()


def test_device_flag_gets_an_index(monkeypatch):
    # torch.cuda.set_device refuses a bare "cuda" (bench.py --device cuda once failed on an H100).
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert sample.resolve_device("cuda") == torch.device("cuda", 0)
    assert sample.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert sample.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert sample.resolve_device("cuda") == torch.device("cuda", 3)
    assert sample.resolve_device(None) == (torch.device("cuda", 3) if torch.cuda.is_available() else torch.device("cpu"))
    for name, count in (("cuda", 3), ("cuda:5", 4), ("cuda", 0)):  # a GPU this process cannot see: one line, not
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)  # torch's assertion at set_device
        with pytest.raises(ValueError, match=rf"--device {name}: this process sees {count} CUDA GPU\(s\)"):
            sample.resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no flag: a 3rd torchrun process on 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"^LOCAL_RANK 2: this process sees 2 CUDA GPU\(s\), so there is no cuda:2"):
        sample.resolve_device(None)
    with pytest.raises(ValueError, match="--device mps: this code runs on cpu or cuda"):  # was a traceback
        sample.resolve_device("mps")


def test_one_device_index_for_several_processes_is_refused(tmp_path, capsys, monkeypatch):
    # Under torchrun each process takes cuda:LOCAL_RANK; "cuda:0" on every rank would share one GPU.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # as on a 2-GPU machine
    err = _train_error(tmp_path, capsys, "--device", "cuda:0")
    assert "all 2 processes on one device" in err and "--device cuda" in err


def test_sample_py_writes_npz_in_adm_format(tmp_path):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    ckpt = sorted((out / "checkpoints").glob("*.pt"))[-1]
    flags = ["--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--batch-size", "2", "--steps", "ddim3", "--save-png"]
    sample.main(flags + ["--num-samples", "5", "--cfg-scale", "1.5"])
    arr = np.load(tmp_path / "s" / "samples.npz")
    assert arr["arr_0"].shape == (5, 16, 16, 3) and arr["arr_0"].dtype == np.uint8 and arr["arr_1"].shape == (5,)
    assert (tmp_path / "s" / "grid.png").exists()
    pngs = sorted((tmp_path / "s" / "png").iterdir())  # apart from grid.png, so a folder score counts only samples
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(pngs[3])), arr["arr_0"][3])
    saved = (tmp_path / "s" / "samples.npz").read_bytes()
    with pytest.raises(SystemExit, match="holds an earlier run's samples"):  # once overwritten without a word
        sample.main(flags + ["--num-samples", "2"])
    assert (tmp_path / "s" / "samples.npz").read_bytes() == saved
    (tmp_path / "s" / "samples.npz").unlink()
    with pytest.raises(SystemExit, match="already holds PNGs"):  # 2 new ones would sit among 3 stale ones
        sample.main(flags + ["--num-samples", "2"])


def test_retry_rank_abort_reruns_once_in_a_fresh_folder(tmp_path):
    seen = []

    @retry_rank_abort
    def flaky(tmp_path):
        seen.append(tmp_path)
        if len(seen) < 3:
            raise RankAbort(RANK_ABORT)

    with pytest.raises(RankAbort):  # a second abort is a failure
        flaky(tmp_path=tmp_path)
    assert seen == [tmp_path, tmp_path / "retry"]
    @retry_rank_abort
    def failing(tmp_path):
        seen.append(tmp_path)
        raise AssertionError("other")

    with pytest.raises(AssertionError, match="other"):  # any other failure is not retried
        failing(tmp_path=tmp_path / "x")
    assert len(seen) == 3


@retry_rank_abort
def test_two_process_torchrun_keeps_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    r = torchrun("train.py", *TINY, "--global-batch-size", "8", "--max-steps", "4", "--ckpt-every", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("model replicas, EMA and method state identical on 2 ranks") == 2


RECORD_TIMESTEPS = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
real_step = train.train_step
def recording_step(run, x, y, step):
    out = real_step(run, x, y, step)
    torch.save(out[1], os.path.join(os.environ["T_DIR"], f"{{os.environ['RANK']}}_{{step}}.pt"))  # t (B,)
    return out
train.train_step = recording_step
train.main(sys.argv[1:])
"""


@retry_rank_abort
def test_two_process_ranks_draw_their_own_timesteps_and_a_resume_restores_each_ranks_stream(tmp_path):
    # Each rank seeds its generator with global_seed * world + rank, and a checkpoint holds every rank's state. Seeded
    # alike, the ranks drew the same t (and noise) for their different images; both restored to rank 0's state,
    # the resumed run diverged. The one-process tests pass either way.
    script = tmp_path / "record.py"
    script.write_text(RECORD_TIMESTEPS.format(repo=str(REPO)))
    flags = [*TINY, "--global-batch-size", "8", "--max-steps", "4", "--ckpt-every", "2"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t_branch").mkdir()
    r = torchrun(str(script), *flags, "--out", str(tmp_path / "straight"), env={"T_DIR": str(tmp_path / "t")})
    assert r.returncode == 0, r.stderr[-3000:]
    resume = ["--resume", str(tmp_path / "straight" / "checkpoints" / "0000002.pt")]  # a branch into its own --out
    r = torchrun(str(script), *flags, *resume, "--out", str(tmp_path / "branch"), env={"T_DIR": str(tmp_path / "t_branch")})
    assert r.returncode == 0, r.stderr[-3000:]
    t = {(d, rank, s): torch.load(tmp_path / d / f"{rank}_{s}.pt") for d in ("t", "t_branch") for rank in (0, 1)
         for s in range(4) if d == "t" or s >= 2}
    assert not torch.equal(t["t", 0, 0], t["t", 1, 0])
    assert all(torch.equal(t["t", rank, s], t["t_branch", rank, s]) for rank in (0, 1) for s in (2, 3))
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "branch")
    assert a["step"] == b["step"] == 4 and deep_equal(a["model"], b["model"]) == [] and deep_equal(a["ema"], b["ema"]) == []


@retry_rank_abort
def test_resume_on_another_number_of_processes(tmp_path):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "2")
    r = torchrun("train.py", *TINY, "--global-batch-size", "4", "--max-steps", "4", "--ckpt-every", "2",
                 "--out", str(out), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 1 processes, now 2; new random streams from step 2" in r.stdout
    assert last_checkpoint(out)["step"] == 4 and len(last_checkpoint(out)["rng"]) == 2


def test_new_random_streams_after_a_change_of_process_count_are_seeded_with_the_step(tmp_path, monkeypatch):
    # A checkpoint of 2 processes resumed on 1 cannot restore the streams: new ones, seeded with the step too. Seeded
    # with global_seed * world + rank alone, every such resume drew the same timesteps (those of the model's init).
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "1")
    for path in checkpoints(out):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({**ckpt, "rng": ckpt["rng"] * 2}, path)  # as if written by 2 processes
    drawn, real_step = [], train.train_step

    def spy(run, x, y, step):
        terms, t, extra, bad = real_step(run, x, y, step)
        drawn.append(t)
        return terms, t, extra, bad

    monkeypatch.setattr(train, "train_step", spy)
    for s in (1, 2):
        run_train(tmp_path, "--global-batch-size", "4", "--max-steps", str(s + 1), "--resume",
                  str(checkpoints(out)[s - 1]), name=f"from{s}")
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])  # the one step each resume trained
    assert "written by 2 processes, now 1; new random streams from step 2" in (tmp_path / "from2" / "log.txt").read_text()


@retry_rank_abort
def test_two_process_sampling_splits_exactly_and_finishes_a_stopped_one_process_run(tmp_path, monkeypatch):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    ckpt = sorted((out / "checkpoints").glob("*.pt"))[-1]
    with monkeypatch.context() as m:  # samples 0 and 1 are made, then the run stops
        _stop_after_batches(m, 1)
        with pytest.raises(KeyboardInterrupt):
            sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "s2"), "--num-samples", "5", "--steps", "3",
                         "--batch-size", "2"])
    # DDPM, so the steps' noise must come from each sample's own generator too (it once came from the global RNG)
    r = torchrun("sample.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "s2"), "--num-samples", "5", "--steps", "3",
                 "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming: 2 of 5 samples" in r.stdout
    sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "s1"), "--num-samples", "5", "--steps", "3", "--batch-size", "3"])
    two, one = np.load(tmp_path / "s2" / "samples.npz"), np.load(tmp_path / "s1" / "samples.npz")
    assert two["arr_0"].shape[0] == 5
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
    assert np.abs(two["arr_0"].astype(int) - one["arr_0"].astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------- bad input

def _train_error(tmp_path, capsys, *flags):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out", str(tmp_path / "bad"), "--max-steps", "1", "--global-batch-size", "4", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    assert "does not exist" in _train_error(tmp_path, capsys, "--data", str(tmp_path / "nope"))
    assert "0..4293" in _train_error(tmp_path, capsys, "--global-seed", "4294", "--fid-every", "1")  # FID samples use seed + 1
    err = _train_error(tmp_path, capsys, "--global-seed", "4293", "--fid-every", "1", "--fid-samples", "1000000")
    assert "seed 4294" in err and err.endswith("--global-seed 0..4292")  # the range of the flag itself, not of seed + 1
    (tmp_path / "empty").mkdir()
    assert "no images" in _train_error(tmp_path, capsys, "--data", str(tmp_path / "empty"))
    assert "not divisible by the patch size" in _train_error(tmp_path, capsys, "--image-size", "18")
    assert "unknown --model" in _train_error(tmp_path, capsys, "--model", "DiT-M/2")
    assert "unknown method part" in _train_error(tmp_path, capsys, "--method", "dtx")
    assert "no such file" in _train_error(tmp_path, capsys, "--resume", str(tmp_path / "missing.pt"))
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    assert "arr_0" in _train_error(tmp_path, capsys, "--data", str(tmp_path / "x.npz"))
    assert "add --compile" in _train_error(tmp_path, capsys, "--compile-mode", "max-autotune-no-cudagraphs")
    assert "CUDA graphs" in _train_error(tmp_path, capsys, "--compile", "--compile-mode", "reduce-overhead", "--method", "ant-pcgrad",
                                      "--ant-clusters", "4")  # batch 4: one per cluster
    assert "null class" in _train_error(tmp_path, capsys, "--sample-cfg", "4", "--class-dropout-prob", "0")
    assert "--fid-steps ddimx" in _train_error(tmp_path, capsys, "--fid-steps", "ddimx")
    # values that once trained silently: no clipping, no model override, zero loss weights; or ended in a traceback
    for flag, value, says in (("--max-grad-norm", "-1", "0 or more"), ("--nash-max-norm", "-1", "0 or more"),
                              ("--uw-lr", "-1", "0 or more"), ("--max-steps", "0", "positive"), ("--depth", "0", "positive"),
                              ("--num-heads", "0", "positive"), ("--image-size", "0", "positive"),
                              ("--global-seed", "-1", "0 or more")):
        err = _train_error(tmp_path, capsys, flag, value)
        assert err.startswith(f"error: {flag} ") and says in err, err
    for flags in (["--weighting", "min-snr", "--min-snr-gamma", "0"], ["--weighting", "p2", "--p2-k", "-1"],
                  ["--curriculum-patience", "0"], ["--curriculum-stage-steps", "0"], ["--curriculum-smoothing", "1"],
                  ["--method", "curriculum", "--curriculum-clusters", "1001"], ["--ant-clusters", "0"]):  # once named by their parameters
        err = _train_error(tmp_path, capsys, *flags)
        assert err.startswith("error: --") and f"{flags[-2]} " in err, flags
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):  # a copied diffusion.py checks it too
        gd.Diffusion(weighting="min-snr", min_snr_gamma=0)
    with pytest.raises(ValueError, match="p2_gamma and p2_k must be >= 0"):
        gd.Diffusion(weighting="p2", p2_k=-1)


def test_bad_files_seeds_devices_and_fid_settings_give_one_line_errors(tmp_path, capsys, monkeypatch):
    # each once ended in a traceback (KeyError 'step', numpy's 32-bit seed, torch.device, FileNotFoundError, range()
    # step 0 at the first FID) or trained on ignoring the flag (--ant-tas) or scoring no FID (a 10-d reference)
    import fid
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())  # 6-d features
    torch.save({"model": {}}, tmp_path / "weights.pt")
    np.savez(tmp_path / "tas.npz", tas=np.eye(1000))
    np.savez(tmp_path / "ref10.npz", mu=np.zeros(10), sigma=np.eye(10))
    ant = ["--method", "ant-uw", "--ant-clusters", "2", "--ant-objective", "gradient"]
    fid_on = ["--fid-every", "1", "--fid-samples", "2", "--fid-steps", "ddim2"]
    for flags, says in ((["--resume", str(tmp_path / "weights.pt")], "is not a train.py checkpoint (it lacks ['ema', 'opt'"),
                        (["--global-seed", str(2**32)], f"--global-seed {2**32}: must be below {2**32}"),
                        (["--device", "gpu"], "--device gpu: not a device"),
                        (ant + ["--ant-tas", str(tmp_path / "missing.npy")], "cannot read the task affinity matrix"),
                        (ant + ["--ant-tas", str(tmp_path / "tas.npz")], "is an .npz archive, not a task affinity matrix"),
                        (["--ant-tas", str(tmp_path / "tas.npz")], "--ant-tas is read only by an ANT method"),
                        (fid_on + ["--fid-batch-size", "0"], "--fid-batch-size 0: must be a positive number"),
                        (fid_on + ["--fid-samples", str(2**33)], f"--fid-samples {2**33}: at most"),
                        (fid_on + ["--fid-ref", str(tmp_path / "ref10.npz")], "its statistics have mu (10,) and sigma (10, 10)"),
                        (fid_on + ["--fid-ref", str(tmp_path / "ref10.npz"), "--fid-ref-limit", "5"],  # was ignored
                         "--fid-ref-limit takes part of a reference's images, but these statistics are used whole")):
        assert says in _train_error(tmp_path, capsys, *flags), flags
    assert not list((tmp_path / "bad" / "checkpoints").glob("*.pt"))  # refused before the first step


def test_empty_path_flags_are_refused_not_read_as_left_out(tmp_path, capsys):
    # --resume "$CKPT" with CKPT unset started a fresh run; --out '' trained into results/<model>-<method>, --fid-ref ''
    # scored against the training data
    for flag in ("--resume", "--out", "--fid-ref", "--inception", "--ant-tas", "--vae"):
        assert _train_error(tmp_path, capsys, flag, "") == f"error: {flag} is empty; give a path, or leave the flag out"
    assert not (tmp_path / "bad").exists()


def test_fid_flags_without_fid_every_are_refused(tmp_path, capsys):
    # the run trained to the end without a single FID, the reference and weights it was given never read
    np.savez(tmp_path / "ref.npz", mu=np.zeros(6), sigma=np.eye(6))
    for flags in (["--fid-ref", str(tmp_path / "ref.npz")], ["--fid-ref-limit", "100"], ["--inception", "w.pth"]):
        err = _train_error(tmp_path, capsys, *flags)
        assert err.startswith(f"error: {flags[0]} has no effect without --fid-every; add --fid-every N"), err


def test_flags_the_run_does_not_read_are_warned_about(tmp_path):
    # --method dtr --uw-lr 0.1 (a mistyped --method ant-uw, say) trained DTR without a word about the flag
    def unread(*argv):
        return train.unread_flags(train.parse_args(list(argv)))

    assert unread() == [] and unread("--method", "dtr+ant-uw", "--uw-lr", "0.1", "--dtr-beta", "0.5") == []
    assert unread("--method", "rtr", "--dtr-alpha", "2", "--dtr-beta", "0.5", "--nash-every", "10") == [
        ("--dtr-alpha 2.0", "dtr"), ("--nash-every 10", "ant-nash")]
    assert unread("--method", "curriculum", "--curriculum-stage-steps", "60", "--curriculum-patience", "100") == [
        ("--curriculum-stage-steps 60", "a curriculum with fixed pacing")]
    assert unread("--weighting", "min-snr", "--p2-k", "2", "--fid-cfg", "1.5") == [
        ("--p2-k 2.0", "--weighting p2"), ("--fid-cfg 1.5", "FID (--fid-every N)")]
    assert unread("--fid-every", "5", "--fid-cfg", "1.5", "--ant-clusters", "5") == []  # set to its default: not flagged
    out = run_train(tmp_path, "--method", "dtr", "--uw-lr", "0.1", "--max-steps", "1")
    said = [line for line in (out / "log.txt").read_text().splitlines() if "no effect" in line]
    assert said == ["warning: --uw-lr 0.1 has no effect on this run: only ant-uw reads it"], said


def test_infinite_uw_lr_and_loss_weighting_parameters_are_refused(tmp_path, capsys):
    # each trained on: --uw-lr inf (--lr inf was refused) turns the log variances NaN after one step, --p2-gamma inf
    # weights every MSE term 0, --min-snr-gamma inf is the constant weighting
    for flags, says in ((["--uw-lr", "inf"], "--uw-lr inf: must be a finite number"),
                        (["--weighting", "p2", "--p2-gamma", "inf"], "must be finite and >= 0"),
                        (["--weighting", "p2", "--p2-k", "inf"], "must be finite and >= 0"),
                        (["--weighting", "min-snr", "--min-snr-gamma", "inf"], "--min-snr-gamma inf: must be a finite")):
        assert says in _train_error(tmp_path, capsys, *flags), flags


def test_cluster_counts_are_bounded_by_T_only_for_the_method_that_uses_them():
    small = ["--num-timesteps", "4", "--schedule", "cosine"]  # below the defaults: 5 ANT and 20 curriculum clusters
    for method in ("vanilla", "dtr"):
        train.check_flags(train.parse_args(small + ["--method", method]))  # neither count is used: nothing refused
    train.check_flags(train.parse_args(small + ["--method", "ant-uw", "--ant-clusters", "4", "--curriculum-clusters", "0"]))
    for flags, named in ((["--method", "ant-uw"], "--ant-clusters 5"), (["--method", "curriculum"], "--curriculum-clusters 20"),
                         (["--method", "curriculum+ant-uw", "--curriculum-clusters", "0"], "--ant-clusters 5"),
                         (["--ant-clusters", "0"], "--ant-clusters 0"), (["--curriculum-clusters", "-1"], "--curriculum-clusters -1")):
        with pytest.raises(train.ConfigError, match=named):
            train.check_flags(train.parse_args(small + flags))


def test_check_flags_refuses_by_the_process_count_and_at_each_limit():
    # The checks train() made inline moved into check_flags(args, world); each limit is pinned on both sides, and the
    # two refusals that no test reached are here (--curriculum-clusters 0 without ANT, gradient clusters without a TAS)
    def check(world, *flags):
        train.check_flags(train.parse_args(["--model", "DiT-S/4", "--image-size", "16", *flags]), world)

    check(1, "--global-seed", str(2**32 - 1))  # np.random.seed(global_seed * world + rank) takes up to 2^32 - 1
    check(2, "--global-seed", str(2**31 - 1), "--global-batch-size", "4")
    with pytest.raises(train.ConfigError, match=f"--global-seed {2**31}: must be below {2**31} with 2"):
        check(2, "--global-seed", str(2**31), "--global-batch-size", "4")
    fid_on = ["--fid-every", "1", "--fid-samples", "3", "--global-batch-size", "12"]
    check(3, *fid_on)  # one FID sample per process
    with pytest.raises(train.ConfigError, match=r"--fid-samples 3: .*one per process \(4\)"):
        check(4, *fid_on)
    ant = ["--method", "ant-uw", "--ant-clusters", "4", "--global-batch-size", "8"]
    check(2, *ant)  # 4 images a process: one per cluster
    with pytest.raises(train.ConfigError, match="a process gets 2 images"):
        check(4, *ant)
    with pytest.raises(train.ConfigError, match="--image-size 18 is not divisible by the patch size 4"):  # bench too
        train.check_flags(train.parse_args(["--model", "DiT-S/4", "--image-size", "18"]))
    with pytest.raises(train.ConfigError, match="--curriculum-clusters 0 means 'the ANT clusters'"):
        check(1, "--method", "curriculum", "--curriculum-clusters", "0")
    with pytest.raises(train.ConfigError, match="--ant-objective gradient needs --ant-tas"):
        check(1, "--method", "ant-uw", "--ant-objective", "gradient")


def test_corrupt_image_is_named(tmp_path, capsys):
    _write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not an image")
    err = _train_error(tmp_path, capsys, "--data", str(tmp_path / "imgs"))
    assert "broken.png" in err and "--skip-bad-images" in err


@retry_rank_abort
def test_global_batch_must_divide_over_ranks(tmp_path):
    r = torchrun("train.py", *TINY, "--global-batch-size", "5", "--max-steps", "1", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "not divisible by the 2 processes" in r.stderr


def test_resume_with_other_model_config_is_refused(tmp_path, capsys):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    with pytest.raises(SystemExit):
        train.main(TINY[:5] + ["96"] + TINY[6:] + ["--out", str(out), "--max-steps", "2", "--resume", "auto"])
    err = capsys.readouterr().err
    assert "hidden_size=64" in err and "96" in err


def test_resume_with_another_method_or_number_of_timesteps_is_refused(tmp_path, capsys):
    # Both load into the same weights without an error: only the settings check stops DTR masks on vanilla weights,
    # or a model trained on T = 1000 from going on with T = 500
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    for flags, said in ((["--method", "dtr"], "method='vanilla'"), (["--num-timesteps", "500"], "num_timesteps=1000")):
        with pytest.raises(SystemExit):
            train.main(TINY + ["--out", str(out), "--global-batch-size", "4", "--max-steps", "2", "--resume", "auto",
                               *flags])
        assert said in capsys.readouterr().err
    assert last_checkpoint(out)["step"] == 1


def test_counts_rates_and_schedules_are_refused_before_training(tmp_path, capsys):
    # each once reached the loop and failed there with a traceback (ZeroDivisionError, IndexError, ValueError), or
    # trained on: --ema-decay 1.5 extrapolates the EMA; T = 20 with the linear schedule has alpha_bar_T = 0 (NaN loss)
    for flags, says in ((["--log-every", "0"], "--log-every 0: must be a positive"),
                        (["--ckpt-every", "0"], "--ckpt-every 0: must be a positive"),
                        (["--global-batch-size", "0"], "--global-batch-size 0"),
                        (["--fid-every", "-1"], "--fid-every -1: must be 0 or more"),
                        (["--ema-decay", "1.5"], "[0, 1)"),
                        (["--method", "ant-uw"], "use --global-batch-size 5 or more"),  # 4 images, 5 clusters
                        (["--num-timesteps", "20"], "at least 21 timesteps or the cosine schedule"),
                        (["--fid-every", "1", "--fid-samples", "1"], "at least 2 samples")):
        assert says in _train_error(tmp_path, capsys, *flags), flags


def test_check_flags_refuses_nan_norms_and_a_frozen_ema_and_accepts_the_zero_values():
    def refusal(*flags):
        try:
            train.check_flags(train.parse_args(TINY + list(flags)))
        except train.ConfigError as e:
            return str(e)
        return None

    # NaN passes "< 0": clipping to a NaN norm makes every gradient NaN, and every step is skipped
    assert "--max-grad-norm nan" in refusal("--max-grad-norm", "nan")
    assert "--nash-max-norm nan" in refusal("--nash-max-norm", "nan")
    assert "--uw-lr nan" in refusal("--uw-lr", "nan")
    assert "--ema-decay 1.0" in refusal("--ema-decay", "1")  # lerp weight 0: the EMA never leaves its initial weights
    # AdamW named no flag for these ("Invalid learning rate: nan") and took --lr inf and any --uw-weight-decay; NaN
    # guidance trained on and drew NaN grids and an FID of blank images
    for flag, value in (("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "-1"), ("--uw-weight-decay", "nan"),
                        ("--sample-cfg", "nan"), ("--fid-cfg", "inf")):
        assert refusal(flag, value).startswith(f"{flag} {float(value)}:"), flag
    for flags in (["--ema-decay", "0"], ["--uw-lr", "0"], ["--max-grad-norm", "0"], ["--class-dropout-prob", "1"],
                  ["--lr", "0"], ["--sample-cfg", "0"], ["--fid-cfg", "1.5"]):
        assert refusal(*flags) is None, flags


def test_log_record_names_the_curriculum_stage_its_losses_came_from(tmp_path):
    # fixed pacing, 2 steps a stage, a record every 2 steps: the stage changes at steps 2 and 4, and the records
    # there hold the losses of the stage that just ended (only its timestep buckets), so they must name that stage
    out = run_train(tmp_path, "--method", "curriculum", "--curriculum-clusters", "10", "--curriculum-pacing", "fixed",
                    "--curriculum-stage-steps", "2", "--global-batch-size", "4", "--max-steps", "4", "--log-every", "2")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]
    events = [(r["step"], r["stage"]) for r in lines if r.get("event") == "curriculum_stage"]
    assert events == [(0, 1), (2, 2), (4, 3)]
    assert [(r["step"], r["curriculum/stage"], r["curriculum/t_min"]) for r in records] == [(2, 1, 900), (4, 2, 800)]
    assert min(int(k[6:]) for k in records[0] if k.startswith("loss_t")) == 9  # stage 1 drew t in [900, 1000) only


def test_resume_auto_says_when_it_starts_fresh_or_has_nothing_to_do(tmp_path, capsys):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--resume", "auto")
    assert "resume: no checkpoint in" in capsys.readouterr().out  # a mistyped --out would start over silently
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1", "--resume", "auto")
    assert "nothing to train; raise --max-steps" in capsys.readouterr().out
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--resume", "auto")  # already at --max-steps
    assert "nothing to train; raise --max-steps" in capsys.readouterr().out
    assert last_checkpoint(out)["step"] == 2


def test_resume_mismatch_names_flags_that_exist(tmp_path, capsys):
    # the hint once said "pass --num-classes 4" (no such flag) and "pass --learn-sigma True" (argparse refuses it)
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    for flags, says in ((["--learn-sigma", "0"], "pass --learn-sigma 1 "), (["--data", str(tmp_path / "one.npz")], "--data shapes")):
        np.savez(tmp_path / "one.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
        with pytest.raises(SystemExit):
            run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "3", "--resume", "auto", *flags)
        assert says in capsys.readouterr().err, flags


def test_resume_mismatch_with_a_model_override_the_checkpoint_left_unset_says_to_leave_it_out():
    args = types.SimpleNamespace(**{**{k: 0 for k in train.MODEL_SETTINGS}, "method": "vanilla"}, data="d", latent=None)
    for key, flag in (("depth", "--depth"), ("hidden_size", "--hidden-size"), ("num_heads", "--num-heads")):
        with pytest.raises(train.ConfigError, match=f"leave out {flag} or start") as e:  # once "pass --depth None"
            train.check_compatible({**vars(args), key: None}, args)
        assert "None or" not in str(e.value)


def test_resume_of_a_checkpoint_older_than_a_setting_says_so():
    args = types.SimpleNamespace(**{**{k: 0 for k in train.MODEL_SETTINGS}, "method": "vanilla"}, data="d", latent=None)
    args.method = "curriculum"
    saved = {k: v for k, v in vars(args).items() if k != "curriculum_smoothing"}  # saved before that flag existed
    with pytest.raises(train.ConfigError, match="predates the curriculum_smoothing setting") as e:
        train.check_compatible(saved, args)
    assert "None" not in str(e.value)  # once "pass --curriculum-smoothing None"


def test_resume_checks_only_the_settings_the_method_reads():
    # A vanilla checkpoint older than --curriculum-smoothing, or resumed with another --dtr-alpha, was refused
    args = types.SimpleNamespace(**{k: 0 for k in train.MODEL_SETTINGS}, data="d", latent=None)
    for method, unread, read in (("vanilla", train.METHOD_SETTINGS, ()),
                                 ("dtr", ("rtr_seed", "ant_clusters", "curriculum_order"), ("dtr_alpha", "dtr_beta")),
                                 ("rtr", ("dtr_alpha",), ("dtr_beta", "rtr_seed")),
                                 ("curriculum+ant-uw", ("dtr_beta",), ("ant_clusters", "ant_objective", "curriculum_smoothing"))):
        args.method = method
        saved = {k: v for k, v in vars(args).items() if k != "schedule"}
        with pytest.raises(train.ConfigError, match="predates the schedule setting"):  # every method reads it
            train.check_compatible(saved, args)
        saved["schedule"] = 0
        for key in unread:
            train.check_compatible({k: v for k, v in saved.items() if k != key}, args)
            train.check_compatible({**saved, key: 7}, args)
        for key in read:
            with pytest.raises(train.ConfigError, match=f"predates the {key} setting"):
                train.check_compatible({k: v for k, v in saved.items() if k != key}, args)
            with pytest.raises(train.ConfigError, match=f"trained with {key}=7"):
                train.check_compatible({**saved, key: 7}, args)
    # sample.py rebuilds a DTR model from a checkpoint older than --rtr-seed (a KeyError once); R-TR needs the seed
    old = {k: v for k, v in vars(train.parse_args(["--model", "DiT-S/2", "--depth", "1", "--method", "dtr"])).items()
           if k != "rtr_seed"} | {"num_classes": 10, "in_channels": 3}  # set from the data by train.py
    assert sample.build_model(old).router.kind == "dtr"
    with pytest.raises(KeyError, match="rtr_seed"):
        sample.build_model({**old, "method": "rtr"})


def test_resume_onto_another_latent_space_is_refused():
    args = types.SimpleNamespace(**{**{k: 0 for k in train.MODEL_SETTINGS}, "method": "vanilla"}, data="z2",
                                 latent={"vae": "b", "scale": 0.5, "shift": 0.0, "factor": 8, "size": 32, "channels": 4})
    saved = {**vars(args), "data": "z1", "latent": {**args.latent, "vae": "a", "scale": 0.18215}}
    with pytest.raises(train.ConfigError, match="--data z1"):
        train.check_compatible(saved, args)
    train.check_compatible({**saved, "latent": {**args.latent, "vae": "a"}}, args)  # a --vae override of the decoder is fine
    with pytest.raises(train.ConfigError, match="pixels"):
        train.check_compatible({**saved, "latent": None}, args)


def test_sample_py_write_cut_short_leaves_no_samples_npz_that_refuses_the_rerun(tmp_path, monkeypatch):
    flags = ["--ckpt", str(checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1]),
             "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "ddim2"]
    savez = np.savez

    def disk_full(file, **arrays):
        if "samples.npz" in str(getattr(file, "name", file)):  # the merged file, not a batch's part
            (file if hasattr(file, "write") else open(file, "wb")).write(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")
        return savez(file, **arrays)
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        sample.main(flags)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["parts"]  # no temporary file, no samples.npz
    assert sorted(p.name for p in (tmp_path / "s" / "parts").iterdir()) == ["0000000000.npz", "settings.json"]
    monkeypatch.setattr(np, "savez", savez)
    monkeypatch.setattr(sample, "generate", None)  # every sample is in its part: the rerun only merges them
    sample.main(flags)  # a half samples.npz once refused it as "an earlier run's samples"
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grid.png", "samples.npz"]


def _stop_after_batches(monkeypatch, n):
    """sample.generate that raises (as a job's time limit would stop the process) after n batches."""
    calls, real = [], sample.generate

    def generate(*a, **k):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(sample, "generate", generate)
    return calls


def test_sample_py_resumes_a_stopped_run_from_its_saved_batches(tmp_path, monkeypatch, capsys):
    # 50K samples take hours: a run stopped by a job's time limit once lost every sample it had made
    ckpt = str(checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1])
    flags = ["--ckpt", ckpt, "--num-samples", "7", "--batch-size", "2", "--steps", "3", "--cfg-scale", "1.5"]  # DDPM noise
    sample.main(flags + ["--out", str(tmp_path / "whole")])
    want = np.load(tmp_path / "whole" / "samples.npz")
    with monkeypatch.context() as m:
        _stop_after_batches(m, 2)
        with pytest.raises(KeyboardInterrupt):
            sample.main(flags + ["--out", str(tmp_path / "s")])
    parts = tmp_path / "s" / "parts"
    assert sorted(p.name for p in parts.glob("*.npz")) == ["0000000000.npz", "0000000002.npz"]
    for changed in (["--seed", "1"], ["--cfg-scale", "2"], ["--steps", "ddim3"], ["--use-model"], ["--class-labels", "1"]):
        with pytest.raises(SystemExit, match=r"unfinished run with other settings \(\w+ .* -> "):
            sample.main(flags + ["--out", str(tmp_path / "s"), *changed])
    assert not (tmp_path / "s" / "samples.npz").exists()
    capsys.readouterr()
    with monkeypatch.context() as m:
        calls = _stop_after_batches(m, 99)
        sample.main(flags + ["--out", str(tmp_path / "s")])
    assert "resuming: 4 of 7 samples are in" in capsys.readouterr().out
    assert len(calls) == 2  # samples 4, 5 and 6 only
    got = np.load(tmp_path / "s" / "samples.npz")
    np.testing.assert_array_equal(got["arr_0"], want["arr_0"])  # the same batches as the whole run: the same bytes
    np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
    assert not parts.exists()


def test_sample_py_resume_takes_other_counts_batch_sizes_and_a_copied_checkpoint_but_not_other_weights(tmp_path, monkeypatch,
                                                                                                     capsys):
    first, second = checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "1"))
    flags = ["--steps", "ddim2", "--out", str(tmp_path / "s")]
    sample.main(["--ckpt", str(first), *flags, "--num-samples", "3", "--out", str(tmp_path / "whole")])
    with monkeypatch.context() as m:  # a full disk refuses the run before it samples
        def disk_full(path, write, mode="wb"):
            raise OSError(28, "No space left on device")
        m.setattr(latents, "atomic_write", disk_full)
        with pytest.raises(SystemExit, match="cannot write the sampling settings into .*parts .*No space"):
            sample.main(["--ckpt", str(first), *flags, "--num-samples", "3"])
    with monkeypatch.context() as m:
        _stop_after_batches(m, 1)
        with pytest.raises(KeyboardInterrupt):
            sample.main(["--ckpt", str(first), *flags, "--num-samples", "9", "--batch-size", "4"])
    (tmp_path / "s" / "parts" / "0000000099.npz").write_bytes(b"PK\x03\x04 half a zip")  # say, a damaged disk
    with pytest.raises(SystemExit, match="0000000099.npz cannot be read .*; delete it, and the rerun samples its batch"):
        sample.main(["--ckpt", str(first), *flags, "--num-samples", "3"])
    (tmp_path / "s" / "parts" / "0000000099.npz").unlink()
    with pytest.raises(SystemExit, match=r"other settings \(weights '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        sample.main(["--ckpt", str(second), *flags, "--num-samples", "3"])  # the next step's EMA: another model
    copy = tmp_path / "scratch" / "copy.pt"  # as a job that copies the checkpoint to local disk: new path and mtime
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(sample, "generate", None)  # samples 0..3 are saved: 3 of them need no sampling, whatever the batch size
        sample.main(["--ckpt", str(copy), *flags, "--num-samples", "3", "--batch-size", "1"])
    # sample 3 belongs to the stopped run of 9: it once went with the parts folder, removed without a word
    assert "kept " + str(tmp_path / "s" / "parts") + ": it also holds samples numbered 3 and above (1)" in capsys.readouterr().out
    assert (tmp_path / "s" / "grid.png").exists() and (tmp_path / "s" / "parts" / "0000000000.npz").exists()
    got, want = np.load(tmp_path / "s" / "samples.npz"), np.load(tmp_path / "whole" / "samples.npz")
    np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
    assert np.abs(got["arr_0"].astype(int) - want["arr_0"].astype(int)).max() <= 1  # batches of 4 against 3
    with pytest.raises(SystemExit, match="holds an earlier run's samples.*parts can go too, unless it was kept for samples"):
        sample.main(["--ckpt", str(first), *flags, "--num-samples", "3"])
    (tmp_path / "s" / "samples.npz").rename(tmp_path / "three.npz")  # as the message says: finish the larger run
    with monkeypatch.context() as m:
        calls = _stop_after_batches(m, 99)
        def busy(path):  # say, a file another process holds open on NFS
            raise OSError(16, "Device or resource busy")
        m.setattr(sample.shutil, "rmtree", busy)
        sample.main(["--ckpt", str(first), *flags, "--num-samples", "5", "--batch-size", "1"])
    assert len(calls) == 1 and "warning: cannot remove" in capsys.readouterr().err  # sample 4 alone
    got = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(got[:3], np.load(tmp_path / "three.npz")["arr_0"])


def test_sample_py_refuses_batches_without_their_settings_and_replaces_settings_without_batches(tmp_path):
    ckpt = checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1]
    flags = ["--ckpt", str(ckpt), "--num-samples", "2", "--steps", "ddim2"]
    parts = tmp_path / "s" / "parts"
    parts.mkdir(parents=True)
    (parts / "settings.json").write_text(json.dumps({"seed": 5}))  # a run with other flags, stopped before its first batch
    sample.main(flags + ["--out", str(tmp_path / "s")])  # once refused as an unfinished run, with no sample to keep
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape[0] == 2 and not parts.exists()
    parts = tmp_path / "t" / "parts"  # batches whose settings.json is gone: the merge once put them over the new samples
    parts.mkdir(parents=True)
    np.savez(parts / "0000000001.npz", idx=np.array([1]), images=np.zeros((1, 8, 8, 3), np.uint8), labels=np.zeros(1))
    with pytest.raises(SystemExit, match="t/parts holds sampled batches but no settings.json, so how they were sampled"):
        sample.main(flags + ["--out", str(tmp_path / "t")])


class _RunsCode:
    """Unpickled, it creates the folder `marker`: what a checkpoint from elsewhere could do instead."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_checkpoints_load_without_running_code_from_them(tmp_path, capsys):
    # torch.load(weights_only=False) unpickles anything; a checkpoint from a forum or a model hub could run code
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    ckpt = torch.load(checkpoints(out)[-1], weights_only=True)  # every train.py checkpoint loads as weights only
    marker = tmp_path / "code-ran"
    torch.save({**ckpt, "extra": _RunsCode(marker), "step": 2}, out / "checkpoints" / "0000002.pt")
    with pytest.raises(SystemExit, match=r"0000002.pt cannot be loaded \(UnpicklingError: it holds posix.mkdir, an object "
                                         r"other than .* could run code\)"):
        sample.main(["--ckpt", str(out / "checkpoints" / "0000002.pt"), "--out", str(tmp_path / "s")])
    err = _train_error(tmp_path, capsys, "--resume", str(out / "checkpoints" / "0000002.pt"))
    assert "UnpicklingError: it holds posix.mkdir" in err
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--resume", "auto")  # resumes from step 1
    assert "resume: skipping" in capsys.readouterr().out and (out / "checkpoints" / "0000002.pt.unreadable").exists()
    assert not marker.exists()


def test_sample_py_save_png_accepts_an_empty_png_folder(tmp_path):
    # Only PNGs of an earlier run are refused (they would sit among fewer new ones): an empty OUT/png, emptied by
    # hand or left by a run stopped before its first PNG, takes the new ones
    ckpt = str(checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1])
    (tmp_path / "s" / "png").mkdir(parents=True)
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "ddim2", "--save-png"])
    assert sorted(p.name for p in (tmp_path / "s" / "png").iterdir()) == ["000000.png", "000001.png"]


def test_sample_py_checks_counts_steps_checkpoint_and_fid_inputs_before_sampling(tmp_path, capsys, monkeypatch):
    ckpt = str(checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1])
    (tmp_path / "cut.pt").write_bytes(Path(ckpt).read_bytes()[:1000])
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    full = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in full.items() if k != "ema"}, tmp_path / "no_ema.pt")
    torch.save({**full, "args": {k: v for k, v in full["args"].items() if k != "schedule"}}, tmp_path / "old.pt")
    (tmp_path / "file").write_text("x")
    for flags, says in ((["--num-samples", "0"], "--num-samples 0"), (["--batch-size", "0"], "--batch-size 0"),
                        # once tracebacks (KeyError; torch.device; makedirs after the sampling), a NaN sample set, an
                        # ignored flag, or "use a seed in 0..-95705"
                        (["--ckpt", str(tmp_path / "no_ema.pt")], "holds no 'ema' weights"),
                        (["--ckpt", str(tmp_path / "old.pt")], "predates the schedule setting"),
                        (["--cfg-scale", "nan"], "--cfg-scale nan: must be a finite"),
                        (["--num-samples", str(2**33)], f"--num-samples {2**33}: at most 2^32"),
                        (["--vae", "stabilityai/sd-vae-ft-ema"], "was trained on pixels, so drop --vae"),
                        (["--device", "gpu"], "--device gpu: not a device"),
                        (["--steps", "ddimx"], "--steps ddimx"), (["--steps", "5000"], "--steps 5000"),
                        (["--fid-ref", str(tmp_path / "missing.npz")], "does not exist"),
                        (["--fid-ref", str(tmp_path / "ref.npz"), "--num-samples", "1"], "at least 2 samples"),
                        (["--fid-ref", str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "no.pth")], "Inception weights not found"),
                        (["--ckpt", str(tmp_path / "cut.pt")], "cannot be loaded"), (["--ckpt", str(tmp_path)], "is a folder")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "ddim2", *flags])
        assert says in str(e.value.code), (flags, e.value.code)
    assert not (tmp_path / "s").exists()  # nothing was sampled
    calls = []
    monkeypatch.setattr(sample, "sample_indices", lambda *a, **k: calls.append(1))
    with pytest.raises(SystemExit) as e:  # an --out under a file: said before sampling, not by makedirs after it
        sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "file" / "s"), "--num-samples", "2", "--steps", "ddim2"])
    assert "cannot create the output folder" in str(e.value.code) and not calls


def test_cli_refuses_save_stats_over_an_input(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    before = ref.read_bytes()
    with pytest.raises(SystemExit) as e:  # it once overwrote the reference with the samples' statistics: FID 0
        fid.main([str(tmp_path / "samples.npz"), str(ref), "--save-stats", str(ref)])
    assert e.value.code == 2 and "one of the inputs" in capsys.readouterr().err and ref.read_bytes() == before


def test_cli_refuses_no_metrics_and_an_unwritable_save_stats_before_any_features(tmp_path, capsys, monkeypatch):
    # --metrics '' printed nothing after the features; a --save-stats path under a file or without .npz failed
    # after them (the former with a traceback)
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: pytest.fail("the Inception loaded before the flags were checked"))
    (tmp_path / "file").write_text("x")
    np.savez(tmp_path / "old.npz", mu=np.zeros(3), sigma=np.eye(3))  # an earlier reference
    for flags, says in (([str(tmp_path / "ref.npz"), "--metrics", ","], "names no metric"),
                        (["--save-stats", str(tmp_path / "file" / "s.npz")], "cannot make its folder"),
                        (["--save-stats", str(tmp_path / "s.txt")], "statistics files end in .npz"),
                        ([str(tmp_path / "ref.npz"), "--device", "gpu"], "--device gpu: not a device"),
                        ([str(tmp_path / "ref.npz"), "--limit", "1"], "--limit 1: statistics need at least 2 images"),
                        (["--save-stats", str(tmp_path / "old.npz")], "exists; statistics files are not overwritten"),
                        ([str(tmp_path / "ref.npz"), "--device", "cuda:99"], "--device cuda:99: this process sees")):
        with pytest.raises(SystemExit) as e:
            fid.main([str(tmp_path / "samples"), *flags])
        assert e.value.code == 2 and says in capsys.readouterr().err, flags


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    poison_losses(monkeypatch, {4}, float("nan"))  # step 4
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "8", "--ckpt-every", "2")
    err = capsys.readouterr().err
    assert "non-finite loss at step 4" in err
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["0000002.pt"]
    ckpt = last_checkpoint(out)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ==============================================================================================
#                                   dtr.py: Denoising Task Routing
# ==============================================================================================

CONFIGS = [(1000, 384, 4.0, 0.8), (1000, 1152, 4.0, 0.8), (250, 64, 2.0, 0.6), (7, 10, 0.5, 0.5), (2, 5, 1.0, 0.4)]


def reference_starts(T, C, alpha, beta):
    """The official window start, written out with Python floats and Python round (half-to-even)."""
    cb = int(beta * C)
    return [round((t / (T - 1)) ** alpha * (C - cb)) for t in range(T)]


# --------------------------------------------------------------------------- routing_masks


@pytest.mark.parametrize("T,C,alpha,beta", CONFIGS)
def test_dtr_rows_are_one_contiguous_window_of_int_beta_c(T, C, alpha, beta):
    m = routing_masks(T, C, alpha, beta)
    cb = int(beta * C)
    assert m.shape == (T, C) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(m.sum(1) == cb)
    starts = m.argmax(1)  # first active channel per row
    for t in range(T):
        s = int(starts[t])
        assert torch.all(m[t, s : s + cb] == 1)
    assert starts.tolist() == reference_starts(T, C, alpha, beta)


@pytest.mark.parametrize("T,C,alpha,beta", CONFIGS)
def test_dtr_window_slides_monotonically_from_first_to_last_channels(T, C, alpha, beta):
    m = routing_masks(T, C, alpha, beta)
    cb = int(beta * C)
    starts = m.argmax(1)
    assert torch.all(starts[1:] >= starts[:-1])
    assert int(starts[0]) == 0 and int(starts[-1]) == C - cb
    assert torch.all(m[0, :cb] == 1) and torch.all(m[0, cb:] == 0)
    assert torch.all(m[-1, C - cb :] == 1) and torch.all(m[-1, : C - cb] == 0)


def test_dtr_rounding_is_half_to_even_like_the_official_code():
    # T = 3, alpha = 1, C - C_b = 1: the middle start is exactly 0.5 and rounds to 0, not 1.
    m = routing_masks(3, 10, alpha=1.0, beta=0.9)
    assert m.argmax(1).tolist() == [0, 0, 1]
    # t / (T - 1) is the official np.linspace: at T = 11, t = 3 it is 0.30000000000000004, so the start
    # 0.3**2 * 50 lands a hair above the tie and rounds to 5 (3 / 10 lands on 4.5 exactly and gives 4)
    assert routing_masks(11, 100, alpha=2.0, beta=0.5).argmax(1).tolist() == [0, 1, 2, 5, 8, 12, 18, 25, 32, 40, 50]


def test_dtr_default_shares_2cb_minus_c_channels_and_favours_high_t():
    s = mask_stats(routing_masks(1000, 384))
    assert s == {"active": 307, "shared": 230, "task_specific": 77, "unused": 0, "low_t_only": 5, "high_t_only": 72}


def test_dtr_beta_one_gives_all_ones():
    assert torch.equal(routing_masks(1000, 64, alpha=4.0, beta=1.0), torch.ones(1000, 64))


def test_dtr_start_just_above_a_half_rounds_up_in_exact_arithmetic():
    # T = 1000, C = 1152, alpha = 2, beta = 0.7: C_b = 806, and at t = 931 the start is
    # (931 / 999)**2 * 346 = 300.5000055..., a hair above a half: 301 (float32 would give 300.5 -> 300).
    exact = [round(Fraction(t, 999) ** 2 * 346) for t in range(1000)]
    starts = routing_masks(1000, 1152, alpha=2.0, beta=0.7).argmax(1).tolist()
    assert exact[931] == 301 and starts == exact


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(num_timesteps=1, channels=8), "num_timesteps"),
        (dict(num_timesteps=10, channels=0), "channels"),
        (dict(num_timesteps=10.0, channels=8), "num_timesteps"),
        (dict(num_timesteps=10, channels=8, beta=0.0), "beta"),
        (dict(num_timesteps=10, channels=8, beta=1.5), "beta"),
        (dict(num_timesteps=10, channels=8, beta=0.1), "0 active channels"),  # int(0.8) = 0 active channels
        (dict(num_timesteps=10, channels=8, alpha=0.0), "alpha"),
        (dict(num_timesteps=10, channels=8, alpha=float("inf")), "alpha"),
    ],
)
def test_dtr_bad_arguments_raise_value_error(kwargs, named):
    with pytest.raises(ValueError, match=named):  # the error names the bad argument (not some later failure)
        routing_masks(**kwargs)


# --------------------------------------------------------------------------- random_masks


def test_random_masks_have_int_beta_c_ones_and_are_seeded():
    a = random_masks(200, 96, beta=0.8, seed=3)[0]  # (T, C): one block
    assert a.shape == (200, 96) and set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.all(a.sum(1) == int(0.8 * 96))
    assert torch.equal(a, random_masks(200, 96, beta=0.8, seed=3)[0])
    assert not torch.equal(a, random_masks(200, 96, beta=0.8, seed=4)[0])
    assert not torch.equal(a[0], a[1])  # drawn independently per task


def test_random_masks_are_drawn_per_block_as_in_the_official_code():
    # the official DiT builds a TaskRouter per block, each drawing its own random table; one table shared by every
    # block hid the same 20% of the channels (at beta 0.8) from all of them, instead of about 0.2^depth
    tables = random_masks(1000, 64, beta=0.8, seed=0, num_blocks=12)  # (B, T, C)
    assert tables.shape == (12, 1000, 64) and torch.all(tables.sum(2) == int(0.8 * 64))
    assert torch.equal(tables[0], random_masks(1000, 64, beta=0.8, seed=0)[0])  # block 0 whatever the depth
    assert not torch.equal(tables[0], tables[1])
    hidden_from_all = (tables.amax(0) == 0).float().mean()  # (T, C) -> share of channels no block reads
    assert hidden_from_all < 0.01
    router = TaskRouter(64, 1000, kind="random", seed=0, num_blocks=12)
    t = torch.tensor([3, 999, 3])
    assert torch.equal(router(t), tables[:, t])  # (B, N, C)
    dtr = TaskRouter(64, 1000, num_blocks=12)
    assert dtr.masks.shape == (1, 1000, 64) and torch.equal(dtr(t), routing_masks(1000, 64)[t].expand(12, -1, -1))
    with pytest.raises(ValueError, match="must route this DiT's 2 blocks .router.num_blocks., but routes 1; build it with num_blocks=2"):
        DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=2, router=TaskRouter(64))


def test_random_masks_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        random_masks(10, 8, beta=0.8, seed=-1)
    with pytest.raises(ValueError, match=r"beta .* must be in \(0, 1\], got 0.0"):
        random_masks(10, 8, beta=0.0, seed=0)


# --------------------------------------------------------------------------- TaskRouter


@pytest.mark.parametrize("kind", ["dtr", "random"])
def test_router_has_no_parameters_and_empty_state_dict(kind):
    router = TaskRouter(64, num_timesteps=100, kind=kind)
    assert len(list(router.parameters())) == 0
    assert router.state_dict() == {}
    # Inside a model, the router adds no state-dict keys and a plain model's state loads strictly.
    plain = nn.Sequential(nn.Linear(64, 64))
    routed = nn.Sequential(nn.Linear(64, 64))
    routed.router = router
    assert routed.state_dict().keys() == plain.state_dict().keys()
    routed.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(copy.deepcopy(routed).router.masks, router.masks)  # the EMA copy agrees


def test_a_router_with_persistent_buffers_is_refused():
    # no parameters, but a persistent buffer: it would add a key to the DiT state dict, which must stay the official one
    class Router(nn.Module):
        def __init__(self, persistent):
            super().__init__()
            self.register_buffer("table", torch.ones(3), persistent=persistent)
            self.num_blocks = 1

    kw = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match="persistent buffers"):
        DiT(**kw, router=Router(True))
    assert DiT(**kw, router=Router(False)).state_dict().keys() == DiT(**kw).state_dict().keys()


def test_router_forward_picks_rows_by_original_timestep():
    router = TaskRouter(32, num_timesteps=1000, alpha=4.0, beta=0.75)
    table = routing_masks(1000, 32, 4.0, 0.75)
    t = torch.tensor([0, 999, 500, 500, 17])
    assert torch.equal(router(t)[0], table[t])  # (1, N, C): one block
    assert torch.equal(router(t.double())[0], table[t])  # respaced samplers hand over float timesteps
    assert torch.equal(router(t.double() - 1e-4)[0], table[t])  # rounded, not truncated
    assert torch.equal(TaskRouter(32, 1000, beta=0.75, kind="random", seed=1)(t), random_masks(1000, 32, 0.75, 1)[:, t])
    with pytest.raises(ValueError, match="t must be a 1-D tensor of timesteps"):
        router(t[None])


def test_router_called_on_the_embedded_timestep_says_where_to_call_it():
    # The official DiT rebinds t to its (N, D) embedding in forward; a router call placed after that line must say so.
    router = TaskRouter(16, num_timesteps=100)
    with pytest.raises(ValueError, match="before the timestep embedding"):
        router(torch.randn(4, 16))
    assert torch.equal(router(torch.tensor([0, 99], dtype=torch.int32)), router.masks[:, [0, 99]])


def test_router_bad_kind_raises_value_error():
    with pytest.raises(ValueError, match="kind must be 'dtr' .* got 'learned'"):
        TaskRouter(32, kind="learned")


def make_block(C, seed=0):
    """A stand-in DiT block with the official structure: r + g1*f1(r, c), then + g2*f2(., c)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2, wc = (torch.randn(C, C, generator=g) / C**0.5 for _ in range(3))

    def attn(r, c):  # plays gate_msa * attn(modulate(norm1(r)))
        return torch.tanh(r @ w1.to(r.dtype) + (c @ wc.to(c.dtype))[:, None, :])

    def mlp(r, c):  # plays gate_mlp * mlp(modulate(norm2(r)))
        return torch.sin(r @ w2.to(r.dtype)) * c[:, None, :]

    def block(x, c):
        x = x + attn(x, c)
        return x + mlp(x, c)

    return block, attn, mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_equals_the_official_formula(dtype):
    N, L, C = 4, 9, 40
    block, attn, mlp = make_block(C)
    router = TaskRouter(C, num_timesteps=1000, alpha=4.0, beta=0.8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, L, C, generator=g).to(dtype)
    c = torch.randn(N, C, generator=g).to(dtype)
    t = torch.tensor([0, 333, 998, 999])
    m = router(t)[0]  # (N, C) float32
    out = router.route(block, x, c, m)
    assert out.dtype == dtype and out.shape == (N, L, C)
    # Official DTR block, written out.
    mm = m.to(dtype)[:, None, :]
    r = x * mm
    r = r + attn(r, c)
    r = r + mlp(r, c)
    ref = r + x * (1 - mm)
    assert torch.equal(out, ref)  # same ops in the same order: bit for bit


def test_route_hides_masked_channels_from_the_block():
    # Changing the masked-out channels of x moves the output by exactly that change (residual only).
    N, L, C = 4, 9, 40
    block, _, _ = make_block(C)
    router = TaskRouter(C, num_timesteps=1000, alpha=4.0, beta=0.8)
    x, c = torch.randn(N, L, C), torch.randn(N, C)
    m = router(torch.tensor([0, 333, 998, 999]))[0]
    off = (1 - m)[:, None, :].expand(N, L, C)  # (N, L, C)
    bump = router.route(block, x + off, c, m) - router.route(block, x, c, m)
    torch.testing.assert_close(bump, off, rtol=0, atol=1e-6)


def test_route_with_beta_one_equals_the_plain_block_bit_for_bit():
    N, L, C = 3, 5, 24
    block, _, _ = make_block(C, seed=2)
    router = TaskRouter(C, num_timesteps=1000, beta=1.0)
    x, c = torch.randn(N, L, C), torch.randn(N, C)
    out = router.route(block, x, c, router(torch.tensor([0, 500, 999]))[0])
    assert torch.equal(out, block(x, c))


def test_route_rejects_mismatched_shapes():
    router = TaskRouter(8, num_timesteps=10)
    block, _, _ = make_block(8)
    with pytest.raises(ValueError):
        router.route(block, torch.randn(2, 3, 8), torch.randn(2, 8), router(torch.tensor([0, 1, 2]))[0])
    with pytest.raises(ValueError, match=r"give the router channels = the block width, and tokens channels-last"):
        router.route(block, torch.randn(2, 8, 4, 4), torch.randn(2, 8), router(torch.tensor([0, 1]))[0])  # (N, C, H, W)


def test_router_traces_without_graph_breaks():
    C = 16
    block, _, _ = make_block(C)
    router = TaskRouter(C, num_timesteps=100)

    def f(x, c, t):
        return router.route(block, x, c, router(t)[0])

    x, c, t = torch.randn(2, 3, C), torch.randn(2, C), torch.tensor([5.0, 99.0])
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, c, t), f(x, c, t), rtol=0, atol=0)


def test_extra_repr_names_kind_knobs_and_counts():
    text = repr(TaskRouter(384))
    for part in ("kind=dtr", "alpha=4.0", "beta=0.8", "active=307", "shared=230", "task_specific=77"):
        assert part in text


# --------------------------------------------------------------------------- mask_stats and CLI


def test_mask_stats_rejects_non_masks():
    with pytest.raises(ValueError, match="masks must contain only 0 and 1"):
        mask_stats(torch.full((4, 3), 0.5))
    with pytest.raises(ValueError, match="the same number of channels in every task"):
        mask_stats(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="T >= 2"):  # one task has no halves to compare (was a torch RuntimeError)
        mask_stats(torch.ones(1, 3))


def test_mask_stats_hand_table_with_odd_t_splits_at_t_floor_half():
    # T = 3, so the cleaner half is t < 3 // 2 = 1, i.e. only t = 0; the noisier half is t = 1, 2.
    m = torch.tensor([[1, 1, 1, 0, 0, 0],
                      [0, 1, 1, 1, 0, 0],
                      [0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    # channel 0: t = 0 only; 1: t = 0, 1; 2: every t; 3: t = 1, 2; 4: t = 2 only; 5: no t
    assert mask_stats(m) == {"active": 3, "shared": 1, "task_specific": 2, "unused": 1,
                             "low_t_only": 1, "high_t_only": 2}


@pytest.mark.parametrize("kind", ["dtr", "random"])
def test_cli_writes_png_and_prints_counts(tmp_path, capsys, kind):
    from PIL import Image

    out = tmp_path / "masks.png"
    dtr_main(["--channels", "48", "--timesteps", "30", "--kind", kind, "--out", str(out)])
    text = capsys.readouterr().out
    assert "shared by all tasks" in text and "task-specific per task" in text
    assert f"active channels per task : {int(0.8 * 48)} of 48" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and 200 <= im.height <= 700 and 500 <= im.width <= 1400
        assert np.asarray(im.convert("RGB")).std() > 0


def test_cli_defaults_are_the_papers_and_draw_shared_channels_grey(tmp_path, capsys):
    # no knobs given: T = 1000, alpha = 4, beta = 0.8 (paper). For C = 384: C_b = 307, 2 C_b - C = 230 shared,
    # and alpha > 1 gives the noisy half more channels of its own (72) than the clean half (5)
    out = tmp_path / "masks.png"
    dtr_main(["--channels", "384", "--out", str(out)])
    text = capsys.readouterr().out
    assert "num_timesteps=1000, alpha=4.0, beta=0.8" in text
    assert "used only by t <  T/2    : 5" in text and "used only by t >= T/2    : 72" in text
    # the top row is t = 0, channels [0, 307): the 230 shared ones grey, the other 77 blue, 2 pixels per channel
    row = np.asarray(Image.open(out).convert("RGB"))[30, 60:60 + 2 * 384]  # (W, 3) inside the frame
    grey, blue = (row == (150, 150, 150)).all(1), (row == (31, 60, 140)).all(1)
    assert (grey.sum(), blue.sum()) == (2 * 230, 2 * 77) and blue[:2 * 77].all() and grey[2 * 77:2 * 307].all()


@pytest.mark.parametrize("argv,message", [
    (["--channels", "0"], "channels must be an integer >= 1, got 0"),
    (["--channels", "8", "--beta", "1.5"], "beta (fraction of active channels per task) must be in (0, 1]"),
    (["--channels", "8", "--out", "masks.jpg"], "pass a path ending in .png"),
    (["--channels", "8", "--out", "no/such/folder/masks.png"], "No such file or directory"),
    (["--channels", str(10**15)], "Unable to allocate"),  # a MemoryError (7 PiB), once a traceback
    (["--channels", "8", "--kind", "random", "--alpha", "2"], "no effect with --kind random"),
    (["--channels", "8", "--seed", "3"], "no effect with --kind dtr"),
])
def test_cli_bad_input_is_one_usage_error(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = argv if "--out" in argv else argv + ["--out", "masks.png"]
    with pytest.raises(SystemExit) as e:
        dtr_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err and not list(tmp_path.iterdir())


# ==============================================================================================
#                                   negative_transfer.py: ANT
# ==============================================================================================

def linear_alphas_cumprod(T=1000):
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def brute_force(cost, K):
    """Min over all partitions of [0, T) into K non-empty contiguous intervals."""
    T = cost.shape[0]
    best = (np.inf, None)
    for cuts in itertools.combinations(range(1, T), K - 1):
        bounds = (0,) + cuts + (T,)
        total = sum(cost[a, b - 1] for a, b in zip(bounds[:-1], bounds[1:]))
        if total < best[0]:
            best = (total, list(zip(bounds[:-1], bounds[1:])))
    return best


def partition_cost(cost, intervals):
    return sum(cost[a, b - 1] for a, b in intervals)


# -----------------------------------------------------------------------------
# Interval clustering


def test_dp_matches_brute_force_on_random_costs():
    rng = np.random.default_rng(0)
    for T in range(1, 13):
        for K in range(1, min(4, T) + 1):
            for _ in range(3):
                cost = rng.uniform(-1.0, 5.0, size=(T, T))
                intervals, total = nt.interval_clustering(cost, K)
                bf_total, bf_intervals = brute_force(cost, K)
                assert total == pytest.approx(bf_total, abs=1e-9)
                assert intervals == bf_intervals  # random costs: the optimum is unique
                assert intervals[0][0] == 0 and intervals[-1][1] == T
                assert all(a < b for a, b in intervals)
                assert all(p[1] == q[0] for p, q in zip(intervals[:-1], intervals[1:]))


def test_dp_matches_brute_force_for_each_objective_cost():
    rng = np.random.default_rng(1)
    for T in range(1, 13):
        builders = {
            "timestep": nt.deviation_cost_matrix(np.arange(T, dtype=np.float64)),
            "snr-like": nt.deviation_cost_matrix(np.sort(rng.exponential(5.0, T))[::-1]),
            "gradient": nt.affinity_cost_matrix(rng.uniform(-1.0, 1.0, size=(T, T))),
        }
        for K in range(1, min(4, T) + 1):
            for name, cost in builders.items():
                intervals, total = nt.interval_clustering(cost, K)
                bf_total, _ = brute_force(cost, K)
                assert total == pytest.approx(bf_total, abs=1e-9), (name, T, K)
                assert partition_cost(cost, intervals) == pytest.approx(total, abs=1e-9)


def test_dp_ignores_entries_below_the_diagonal():
    cost = np.random.default_rng(2).uniform(size=(8, 8))
    reference = nt.interval_clustering(cost, 3)
    cost[np.tril_indices(8, -1)] = np.nan
    assert nt.interval_clustering(cost, 3) == reference


def test_dp_rejects_bad_input():
    with pytest.raises(ValueError, match="num_clusters"):
        nt.interval_clustering(np.zeros((4, 4)), 5)
    with pytest.raises(ValueError, match="num_clusters"):
        nt.interval_clustering(np.zeros((4, 4)), 0)
    with pytest.raises(ValueError, match="square"):
        nt.interval_clustering(np.zeros((4, 3)), 2)
    bad = np.zeros((4, 4))
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="finite"):
        nt.interval_clustering(bad, 2)


def test_timestep_objective_gives_equal_intervals():
    intervals, total = nt.cluster_timesteps(5, "timestep", num_timesteps=1000)
    assert intervals == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    assert total == 50000.0  # 5 * (sum_{d=1}^{100} d + sum_{d=0}^{99} d)
    # A tie the paper notes: lengths 199, 199, 200, 201, 201 cost the same.
    cost = nt.deviation_cost_matrix(np.arange(1000.0))
    assert partition_cost(cost, [(0, 199), (199, 398), (398, 598), (598, 799), (799, 1000)]) == 50000.0
    for T in range(1, 30):
        for K in range(1, min(6, T) + 1):
            _, total = nt.cluster_timesteps(K, "timestep", num_timesteps=T)
            edges = [k * T // K for k in range(K + 1)]  # lengths differ by at most one
            even = partition_cost(nt.deviation_cost_matrix(np.arange(T, dtype=float)),
                                  list(zip(edges[:-1], edges[1:])))
            assert total == pytest.approx(even)


def test_dp_tie_breaks_by_even_lengths_then_earliest_last_start_then_rounding():
    # every partition of a zero cost ties; the most even ones for T = 5, K = 2 are lengths (2, 3) and (3, 2):
    # the last interval starting earliest wins
    assert nt.interval_clustering(np.zeros((5, 5)), 2)[0] == [(0, 2), (2, 5)]
    assert nt.interval_clustering(np.zeros((7, 7)), 3)[0] == [(0, 2), (2, 4), (4, 7)]  # (2, 2, 3) of the sum-17 ties
    # the timestep cost ties [0,2)+[2,5) (1 + 2) with [0,3)+[3,5) (2 + 1) the same way
    assert nt.interval_clustering(nt.deviation_cost_matrix(np.arange(5.0)), 2) == ([(0, 2), (2, 5)], 3.0)
    # 0.1 + 0.2 != 0.3 in floats: a tie by rounding only (relative 1.9e-16) is still a tie, so lengths (1, 2) and
    # (2, 1) tie again and the earlier start wins over the float-smaller [0, 2) + [2, 3)
    cost = np.zeros((3, 3))
    cost[0, 0], cost[1, 2], cost[0, 1], cost[2, 2] = 0.1, 0.2, 0.3, 0.0
    assert 0.1 + 0.2 > 0.3
    assert nt.interval_clustering(cost, 2)[0] == [(0, 1), (1, 3)]


def test_snr_objective_on_linear_schedule_matches_papers_md():
    intervals, total = nt.cluster_timesteps(5, "snr", alphas_cumprod=linear_alphas_cumprod())
    assert intervals == [(0, 1), (1, 2), (2, 5), (5, 18), (18, 1000)]
    assert round(total, 2) == 8074.75
    assert total == pytest.approx(8074.753865015, abs=1e-6)


def test_dp_optimum_does_not_depend_on_the_costs_scale():
    # the tie tolerance was floored at an absolute 1e-12: costs of that size or below were all "tied", and the
    # evenness tie-break chose the partition (cost 8083.04 at a 1e-13 scale, 9246.29 at 1e-15, for 8074.75)
    abar = linear_alphas_cumprod()
    cost = nt.deviation_cost_matrix(abar / (1 - abar))
    for scale in (1e-15, 1e-13, 1e6):
        intervals, total = nt.interval_clustering(cost * scale, 5)
        assert intervals == [(0, 1), (1, 2), (2, 5), (5, 18), (18, 1000)]
        assert total / scale == pytest.approx(8074.753865015, rel=1e-12)


def test_log_snr_objective_on_linear_schedule():
    intervals, _ = nt.cluster_timesteps(5, "log-snr", alphas_cumprod=linear_alphas_cumprod())
    assert intervals == [(0, 153), (153, 394), (394, 624), (624, 823), (823, 1000)]


def test_cost_builders_match_naive_sums():
    rng = np.random.default_rng(3)
    T = 9
    for v in (np.cumsum(rng.uniform(0, 2, T)), -np.cumsum(rng.uniform(0, 2, T)), np.full(T, 3.0)):
        cost = nt.deviation_cost_matrix(v)
        for l in range(T):
            for r in range(l, T):
                c = (l + r + 1) // 2
                assert cost[l, r] == pytest.approx(np.abs(v[l:r + 1] - v[c]).sum(), abs=1e-12)
    tas = rng.uniform(-1, 1, size=(T, T))
    cost = nt.affinity_cost_matrix(tas)
    for l in range(T):
        for r in range(l, T):
            assert cost[l, r] == pytest.approx(-tas[(l + r + 1) // 2, l:r + 1].sum(), abs=1e-12)
    assert np.all(np.isinf(cost[np.tril_indices(T, -1)]))


def test_deviation_cost_rejects_non_monotone_values():
    with pytest.raises(ValueError, match="monotone"):
        nt.deviation_cost_matrix([0.0, 2.0, 1.0])


def test_deviation_cost_accepts_monotone_values_with_plateaus():
    # non-strictly monotone values (repeated SNRs, say) still fix the sign of every |v_t - v_c|
    for v in (np.array([0.0, 0.0, 1.0, 3.0, 3.0, 4.0]), np.array([5.0, 2.0, 2.0, 2.0, -1.0, -1.0])):
        cost = nt.deviation_cost_matrix(v)
        for l in range(len(v)):
            for r in range(l, len(v)):
                assert cost[l, r] == pytest.approx(np.abs(v[l:r + 1] - v[(l + r + 1) // 2]).sum(), abs=1e-12)


def test_cluster_timesteps_says_what_is_missing():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        nt.cluster_timesteps(5, "snr")
    with pytest.raises(ValueError, match="tas"):
        nt.cluster_timesteps(5, "gradient")
    with pytest.raises(ValueError, match="objective"):
        nt.cluster_timesteps(5, "uniform", num_timesteps=10)
    with pytest.raises(ValueError, match="num_timesteps"):
        nt.cluster_timesteps(5, "snr", alphas_cumprod=linear_alphas_cumprod(), num_timesteps=500)
    with pytest.raises(ValueError, match="disagree"):  # the timestep cost needs no schedule, but one given must agree
        nt.cluster_timesteps(2, "timestep", alphas_cumprod=linear_alphas_cumprod(), num_timesteps=500)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        nt.cluster_timesteps(2, "snr", alphas_cumprod=np.array([1.0, 0.5]))



def test_cluster_timesteps_says_why_a_foreign_schedule_is_refused():
    # a float16 schedule rounds alpha-bar_0 to 1, a zero-terminal-SNR one ends at 0: the error names the step and the fix
    half = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).half()
    with pytest.raises(ValueError, match=r"alphas_cumprod\[0\] = 1.0: compute the schedule in float64"):
        nt.cluster_timesteps(5, "log-snr", alphas_cumprod=half)
    zero_terminal = linear_alphas_cumprod().copy()
    zero_terminal[-1] = 0.0
    with pytest.raises(ValueError, match=r"alphas_cumprod\[999\] = 0.0: a zero-terminal-SNR .* use objective 'timestep'"):
        nt.cluster_timesteps(5, "snr", alphas_cumprod=zero_terminal)
    float32 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)  # a foreign float32 schedule clusters like float64
    assert nt.cluster_timesteps(5, "snr", alphas_cumprod=float32)[0] == [(0, 1), (1, 2), (2, 5), (5, 18), (18, 1000)]
    # a tensor that carries grad (or lives on a GPU) is read as it is; the betas, also in (0, 1), are no longer clustered
    assert nt.cluster_timesteps(5, "snr", alphas_cumprod=float32.requires_grad_())[0][-1] == (18, 1000)
    with pytest.raises(ValueError, match=r"alphas_cumprod\[1\] > alphas_cumprod\[0\]: pass alpha-bar, cumprod\(1 - betas\)"):
        nt.cluster_timesteps(5, "log-snr", alphas_cumprod=torch.linspace(1e-4, 0.02, 1000))


def test_cluster_timesteps_refuses_a_schedule_that_is_not_one_dimensional():
    for abar, shape in ((np.full((2, 3), 0.5), "(2, 3)"), (np.zeros(0), "(0,)")):
        with pytest.raises(ValueError) as e:
            nt.cluster_timesteps(2, "log-snr", alphas_cumprod=abar)
        assert str(e.value) == f"alphas_cumprod must be a 1-D (T,) array, got shape {shape}"


def test_task_gradients_on_a_model_with_a_frozen_parameter_says_what_to_pass():
    model = nn.Linear(3, 2)
    model.pos_embed = nn.Parameter(torch.zeros(2), requires_grad=False)  # like DiT's fixed sin-cos table
    losses = torch.stack([model(torch.randn(4, 3)).pow(2).mean() for _ in range(2)])
    with pytest.raises(ValueError, match=r"pass \[p for p in model.parameters\(\) if p.requires_grad\]"):
        nt.task_gradients(losses, model.parameters())
    assert nt.task_gradients(losses, [p for p in model.parameters() if p.requires_grad]).shape == (2, 8)


# -----------------------------------------------------------------------------
# Sampling, per-cluster losses, UW


def test_stratified_timesteps_counts_ranges_and_remainder():
    intervals = [(0, 1), (1, 2), (2, 5), (5, 18), (18, 1000)]
    gen = torch.Generator().manual_seed(0)
    t, cluster = nt.stratified_timesteps(13, intervals, generator=gen)
    assert t.shape == cluster.shape == (13,) and t.dtype == cluster.dtype == torch.long
    assert torch.bincount(cluster, minlength=5).tolist() == [3, 3, 3, 2, 2]  # leftovers first
    for k, (lo, hi) in enumerate(intervals):
        assert torch.all((t[cluster == k] >= lo) & (t[cluster == k] < hi))
    again, _ = nt.stratified_timesteps(13, intervals, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    t, cluster = nt.stratified_timesteps(5000, [(0, 3), (3, 7)], generator=gen)
    assert torch.bincount(t, minlength=7).tolist() == pytest.approx([833, 833, 833, 625, 625, 625, 625],
                                                                    rel=0.15)  # uniform inside
    with pytest.raises(ValueError, match="batch_size"):
        nt.stratified_timesteps(4, intervals)


def test_cluster_losses_equal_a_loop_and_carry_gradients():
    gen = torch.Generator().manual_seed(1)
    loss = torch.rand(17, generator=gen, requires_grad=True)
    _, cluster = nt.stratified_timesteps(17, [(0, 10), (10, 20), (20, 30)], generator=gen)
    got = nt.cluster_losses(loss, cluster, 3)
    want = torch.stack([loss[cluster == k].mean() for k in range(3)])
    assert torch.allclose(got, want)
    got.sum().backward()
    counts = torch.bincount(cluster, minlength=3).float()
    assert torch.allclose(loss.grad, 1.0 / counts[cluster])


def test_cluster_losses_divide_by_fractional_all_rank_mean_counts():
    # Under DDP a cluster drawn once on one of two ranks has the mean count 0.5: L_k = its loss / 0.5 on that rank,
    # so the ranks' average is its loss, as on one big batch (a count clamped at 1 halved it); no sample: L_k = 0
    L = nt.cluster_losses(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1]), 3, counts=torch.tensor([0.5, 2.5, 0.0]))
    torch.testing.assert_close(L, torch.tensor([2.0, 2.0, 0.0]))


def test_uw_gradients_match_analytic():
    K = 4
    uw = nt.UncertaintyWeighting(K)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.0, 0.5, -1.0, 2.0]))
    L = torch.tensor([1.0, 2.0, 0.3, 4.0], requires_grad=True)
    total = uw(L)
    s = uw.log_vars.detach()
    assert total.item() == pytest.approx((0.5 * (torch.exp(-s) * L.detach() / K + s)).sum().item())
    total.backward()
    assert torch.allclose(uw.log_vars.grad, 0.5 * (1 - torch.exp(-s) * L.detach() / K))
    assert torch.allclose(L.grad, 0.5 * torch.exp(-s) / K)
    assert torch.allclose(uw.weights(), torch.exp(-s))
    assert nt.UW_LR == 0.025 and nt.UW_WEIGHT_DECAY == 0.0


def test_uw_absent_clusters_add_nothing():
    uw = nt.UncertaintyWeighting(3)
    L = torch.tensor([1.0, 0.0, 2.0])
    present = torch.tensor([True, False, True])
    total = uw(L, present)
    assert total.item() == pytest.approx(0.5 * (1.0 + 2.0) / 3)
    total.backward()
    assert uw.log_vars.grad[1] == 0 and uw.log_vars.grad[0] != 0


# -----------------------------------------------------------------------------
# PCGrad


def naive_pcgrad(G, order):
    G = G.double()
    projected = []
    for k in range(G.shape[0]):
        g = G[k].clone()
        for j in order[k]:
            dot = g @ G[j]
            if dot < 0 and G[j] @ G[j] > 0:
                g = g - dot / (G[j] @ G[j]) * G[j]
        projected.append(g)
    return torch.stack(projected)


def test_pcgrad_two_tasks_leave_no_conflict():
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        G = torch.randn(2, 30, generator=gen, dtype=torch.float64)
        G[1] -= 1.5 * G[0]  # make them conflict
        assert G[0] @ G[1] < 0
        C = nt.pcgrad_coefficients(nt.gram_matrix(G), [[1], [0]])
        projected = C @ G  # (2, P)
        assert projected[0] @ projected[1] >= -1e-10
        assert abs(projected[0] @ G[1]) < 1e-10 and abs(projected[1] @ G[0]) < 1e-10
        assert torch.allclose(nt.pcgrad(G, order=[[1], [0]]), projected.sum(0))


def test_pcgrad_three_tasks_by_hand():
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    order = [[1, 2], [2, 0], [0, 1]]
    # g0: vs g1 dot -1 -> (1,0) + 0.5*(-1,1) = (0.5,0.5); vs g2 dot -0.5 -> (0.5,0)
    # g1: vs g2 dot -1 -> (-1,0); vs g0 dot -1 -> (0,0)
    # g2: vs g0 dot 0 -> unchanged; vs g1 dot -1 -> (0,-1) + 0.5*(-1,1) = (-0.5,-0.5)
    C = nt.pcgrad_coefficients(nt.gram_matrix(G), order)
    projected = (C @ G.double()).float()
    assert torch.allclose(projected, torch.tensor([[0.5, 0.0], [0.0, 0.0], [-0.5, -0.5]]))
    assert torch.allclose(nt.pcgrad(G, order=order), torch.tensor([0.0, -0.5]))
    # Order matters: visiting g2 first leaves g0 at (0.5, 0.5).
    assert torch.allclose(nt.pcgrad(G, order=[[2, 1], [2, 0], [0, 1]]), torch.tensor([0.0, 0.0]))


def test_pcgrad_matches_naive_loop_and_is_seeded():
    G = torch.randn(5, 200, generator=torch.Generator().manual_seed(3))
    G[1] = -0.7 * G[0] + 0.3 * G[1]
    G[3] = -0.5 * G[2] + 0.5 * G[3]
    order = [[j for j in (3, 1, 4, 2, 0) if j != k] for k in range(5)]
    want = naive_pcgrad(G, order).sum(0)
    assert torch.allclose(nt.pcgrad(G, order=order).double(), want, atol=1e-5)
    a = nt.pcgrad(G, torch.Generator().manual_seed(7))
    b = nt.pcgrad(G, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == G.dtype


def test_weighted_sum_is_the_exact_row_combination():
    G = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([0.5, -2.0, 0.0, 1.25], dtype=torch.float64)
    got = nt.weighted_sum(G, w)
    assert got.dtype == G.dtype and got.shape == (300,)
    torch.testing.assert_close(got.double(), (w[:, None] * G.double()).sum(0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        nt.weighted_sum(G, w[:3])


def test_gram_matrix_adds_up_every_chunk_of_columns(monkeypatch):
    # A DiT-XL/2 has P = 675M columns, hundreds of float64 chunks; chunks of 7 give a DiT's case at P = 50:
    # several full chunks and a short last one. Products of float32 entries are exact in float64.
    G = torch.randn(3, 50, generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(nt, "_GRAM_CHUNK", 7)
    gram = nt.gram_matrix(G)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, G.double() @ G.double().T, rtol=1e-14, atol=0)


def test_pcgrad_skips_zero_gradients():
    G = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.5]])
    out = nt.pcgrad(G, order=[[1, 2], [0, 2], [1, 0]])
    assert torch.all(torch.isfinite(out))
    assert torch.allclose(out.double(), naive_pcgrad(G, [[1, 2], [0, 2], [1, 0]]).sum(0).double())


# -----------------------------------------------------------------------------
# Nash-MTL


def nash_reference(A):
    """Independent check: alpha_k (A alpha)_k = 1 is the stationary point of
    0.5 a^T A a - sum log a; BFGS over u = log a, unconstrained (the module uses CCP, then Newton)."""
    def f(u):
        return 0.5 * np.exp(u) @ A @ np.exp(u) - u.sum()

    def grad(u):
        return np.exp(u) * (A @ np.exp(u)) - 1.0

    u = scipy.optimize.minimize(f, np.zeros(A.shape[0]), jac=grad, method="BFGS", options=dict(gtol=1e-10, maxiter=10000)).x
    assert np.max(np.abs(grad(u))) < 1e-6
    return np.exp(u)


def test_nash_weights_solve_the_bargaining_equation():
    rng = np.random.default_rng(4)
    for K in (1, 2, 3, 5, 8):
        for kind in ("random", "shared", "conflict"):
            G = rng.standard_normal((K, 400)) * rng.uniform(0.1, 3.0, size=(K, 1))
            if kind == "shared":
                G += 2.0 * rng.standard_normal(400)
            if kind == "conflict" and K >= 2:
                G[1] = -0.5 * G[0] + 0.5 * G[1]
            M = G @ G.T
            alpha, info = nt.nash_mtl_weights(M)
            assert info["success"] and info["converged"], info
            assert np.all(alpha > 0)
            assert np.max(np.abs(alpha * (M @ alpha) - 1.0)) < 1e-3  # the paper's equation, on the raw Gram matrix
            assert np.allclose(alpha, nash_reference(M), rtol=1e-3)
            d = G.T @ alpha  # the update: d . g_k = 1 / alpha_k, so |d|^2 = sum_k alpha_k (M alpha)_k = K
            assert np.allclose(d @ G.T, 1.0 / alpha, rtol=1e-3) and abs(d @ d - K) < 1e-2 * K


def test_nash_weights_follow_the_gradient_scale_as_the_official_constraint():
    # The official cvxpy constraint is -log(alpha_k * |M|_F) - log((M / |M|_F) alpha)_k <= 0, i.e.
    # alpha_k (M alpha)_k >= 1 for the raw M = G G^T: gradients c times larger give alpha 1/c times smaller.
    G = np.random.default_rng(3).standard_normal((4, 300))
    alpha, _ = nt.nash_mtl_weights(G @ G.T)
    for c in (1e-3, 7.0):
        scaled, info = nt.nash_mtl_weights((c * G) @ (c * G).T, prev_alpha=alpha / c)
        assert info["success"] and info["iterations"] == 0  # the rescaled warm start already solves it
        assert np.allclose(scaled, alpha / c, rtol=1e-7)  # up to the start being put exactly on the boundary


def test_nash_point_is_a_fixed_point_of_our_subproblem_not_always_of_the_official_one():
    # Two gradients 24-fold apart in norm, slightly conflicting (one of the 15 in 344 random cases behind the
    # README's sentence). Our subproblem, the linearised objective alone, keeps the exact Nash point.
    M = np.array([[1424.22096309, -15.05617633], [-15.05617633, 2.528491]])
    alpha, _ = nt.nash_mtl_weights(M)  # unnormalised scale: alpha_k (M alpha)_k = 1
    norm = np.linalg.norm(M)
    A = M / norm
    a = alpha * math.sqrt(norm)  # the same point on the normalised scale
    assert np.allclose(nt._nash_subproblem(A, a), a, rtol=1e-5)
    # The official cvxpy objective, sum(A x) + grad_phi(alpha) . (x - alpha) / |M|_F subject to x_k (M x)_k >= 1,
    # has a feasible point below its value at the Nash point: its next iterate leaves it.
    grad_phi = 1.0 / alpha + A @ (1.0 / (A @ alpha))  # (2,)
    official = lambda x: np.sum(A @ x) + grad_phi @ (x - alpha) / norm
    x = np.array([0.0343723, 1.31909751])
    assert np.all(x * (M @ x) >= 1.0 - 1e-6)
    assert official(x) < official(alpha) - 1e-4


def test_nash_falls_back_to_newton_when_a_subproblem_fails(monkeypatch):
    # trust-constr gives up now and then on a badly scaled Gram matrix (one had eigenvalues down to 1e-4
    # and alpha up to 142). Failing every subproblem on purpose keeps the test independent of scipy.
    G = np.random.default_rng(7).standard_normal((6, 200)) * np.array([[5.0], [3.0], [0.3], [1.0], [0.2], [0.5]])
    G[1] = -0.7 * G[0] + 0.3 * G[1]
    monkeypatch.setattr(nt, "_nash_subproblem", lambda A, alpha: None)
    alpha, info = nt.nash_mtl_weights(G @ G.T)
    M = G @ G.T
    assert info["success"] and info["converged"] and info["newton"] and "Newton" in info["message"], info
    assert np.max(np.abs(alpha * (M @ alpha) - 1.0)) < 1e-6
    assert np.allclose(alpha, nash_reference(M), rtol=1e-4)


def test_nash_weights_solve_the_equation_on_ill_conditioned_gram_matrices(monkeypatch):
    # Gradient norms spread over e^6 (0.7 to 114 here) with two clusters in conflict: condition numbers ~1e5. The
    # official stopping rule |A alpha - 1/alpha| < 1e-3 is absolute, so a large alpha passed it 0.69 off the equation
    # (seed 33), and 20 iterations ended 2.8 off (seed 66), both reported as success; Newton's method finishes them.
    for seed in (66, 33):  # 33 last: its M is reused below
        rng = np.random.default_rng(seed)
        G = rng.standard_normal((4, 50)) * np.exp(rng.uniform(-3.0, 3.0, size=(4, 1)))
        G[1] = -0.8 * G[0] + 0.2 * G[1]
        M = G @ G.T
        alpha, info = nt.nash_mtl_weights(M)
        assert info["success"] and info["converged"], info
        assert np.max(np.abs(alpha * (M @ alpha) - 1.0)) < 1e-3, (seed, info)  # the paper's equation
        assert np.allclose(alpha, nash_reference(M), rtol=1e-3)
    # the stopped-short alpha as a warm start (NashMTL passes its last alpha) passes the same absolute residual
    # at iteration 0; without the check it came back as it was
    with monkeypatch.context() as patch:
        patch.setattr(nt, "_nash_polish", lambda A, alpha, tol, info: alpha)
        short, _ = nt.nash_mtl_weights(M)
    assert np.max(np.abs(short * (M @ short) - 1.0)) > 0.5
    alpha, info = nt.nash_mtl_weights(M, prev_alpha=short)
    assert info["iterations"] == 0 and np.max(np.abs(alpha * (M @ alpha) - 1.0)) < 1e-3, info


def test_nash_concave_convex_procedure_alone_solves_the_bargaining_equation(monkeypatch):
    # Newton's method backs up the concave-convex procedure; without it the procedure itself must solve
    # well-conditioned cases (a wrong linearisation would otherwise hide behind the fallback)
    monkeypatch.setattr(nt, "_nash_newton", lambda A, alpha, max_iter=100: None)
    rng = np.random.default_rng(4)
    for K in (3, 5, 8):
        G = rng.standard_normal((K, 400)) * rng.uniform(0.1, 3.0, size=(K, 1))
        M = G @ G.T
        alpha, info = nt.nash_mtl_weights(M)
        assert info["success"] and info["converged"] and not info["newton"], info
        assert np.max(np.abs(alpha * (M @ alpha) - 1.0)) < 1e-3


def test_nash_warm_start_and_tensor_input():
    G = torch.randn(5, 300, generator=torch.Generator().manual_seed(5))
    alpha, info = nt.nash_mtl_weights(nt.gram_matrix(G))
    again, info2 = nt.nash_mtl_weights(nt.gram_matrix(G), prev_alpha=alpha)
    assert info2["success"] and info2["iterations"] == 0  # the warm start already solves it
    assert np.allclose(alpha, again)


def test_nash_reports_failure_instead_of_sticking_at_one():
    alpha, info = nt.nash_mtl_weights(np.array([[1.0, -1.0], [-1.0, 1.0]]))  # opposite gradients
    assert alpha is None and not info["success"] and "conflict" in info["message"]
    # opposed but not equal: A (1/sqrt(diag A)) is rounding noise, ~1e-16 |A| alpha. Where the noise came out
    # positive, that start was taken as feasible and scaled by ~1e8 onto the boundary: alpha ~ 1e7 came back with
    # success, alpha_k (G G^T alpha)_k 1.5 and 1.9
    g = np.random.default_rng(0).normal(size=50)
    for G in (np.array([[1.35437253], [-1.36057826]]), np.stack([g, -1.3 * g]), np.stack([g, g[::-1], -1.0046 * g])):
        alpha, info = nt.nash_mtl_weights(G @ G.T)
        assert alpha is None and not info["success"] and "conflict too strongly" in info["message"]
    alpha, info = nt.nash_mtl_weights(np.zeros((3, 3)))
    assert alpha is None and "zero" in info["message"]
    alpha, info = nt.nash_mtl_weights(np.full((2, 2), np.nan))
    assert alpha is None and "non-finite" in info["message"]
    G = np.random.default_rng(0).normal(size=(3, 8))
    G[1] = 0  # one cluster without gradient: say so, not "conflict too strongly"
    alpha, info = nt.nash_mtl_weights(G @ G.T)
    assert alpha is None and info["message"] == "cluster(s) [1] have a zero gradient"


def test_nash_mtl_state_round_trip_and_loss():
    nash = nt.NashMTL(3)
    assert (nt.NASH_EVERY, nt.NASH_MAX_ITER, nt.NASH_MAX_NORM) == (25, 20, 1.0)  # official recipe (papers.md)
    assert (nash.every, nash.max_iter, nash.max_norm) == (25, 20, 1.0)
    assert nash.should_update(0) and not nash.should_update(24) and nash.should_update(25)
    updates_at = []
    for step in range(51):
        if nash.should_update():
            updates_at.append(step)
        nash.step()
    assert updates_at == [0, 25, 50]
    assert np.array_equal(nash.alpha, np.ones(3))
    G = torch.randn(3, 100, generator=torch.Generator().manual_seed(6))
    assert nash.update(G)["success"] and nash.updates == 1
    L = torch.tensor([1.0, 2.0, 3.0])
    assert nash.loss(L).item() == pytest.approx(float((nash.alpha * L.numpy()).sum() / 3), rel=1e-6)
    assert torch.allclose(nash.alpha_tensor(L), torch.tensor(nash.alpha, dtype=torch.float32))
    failed = nash.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
    assert not failed["success"] and nash.failures == 1  # previous alpha kept
    state = nash.state_dict()
    assert all(isinstance(a, float) for a in state["alpha"])
    other = nt.NashMTL(3)
    other.load_state_dict(state)
    assert np.array_equal(other.alpha, nash.alpha)
    assert (other.steps, other.updates, other.failures) == (51, 1, 1)
    assert other.loss(L).item() == pytest.approx(nash.loss(L).item())
    with pytest.raises(ValueError, match="state has 3 alphas, expected 4"):
        nt.NashMTL(4).load_state_dict(state)


def test_nash_loss_uses_the_alpha_of_the_latest_update_and_load():
    # alpha_tensor caches alpha on the device; an update or a load must replace the cached copy
    nash = nt.NashMTL(3)
    L = torch.tensor([1.0, 2.0, 3.0])
    assert nash.loss(L).item() == pytest.approx(2.0)  # alpha = 1: (1 + 2 + 3) / 3, and alpha is now cached
    G = torch.randn(3, 50, generator=torch.Generator().manual_seed(8))
    assert nash.update(G)["success"] and not np.allclose(nash.alpha, 1.0)
    assert nash.loss(L).item() == pytest.approx(float(nash.alpha @ [1.0, 2.0, 3.0]) / 3, rel=1e-6)
    nash.load_state_dict(dict(alpha=[2.0, 0.5, 1.0], steps=7, updates=1, failures=0))
    assert nash.loss(L).item() == pytest.approx((2.0 + 1.0 + 3.0) / 3)


# -----------------------------------------------------------------------------
# Per-cluster gradients, flat gradients, distributed averaging


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.lin(x)


def test_task_gradients_equal_per_loss_backward():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(6, 3)
    per_sample = (model(x) ** 2).sum(1) * torch.arange(1.0, 7.0)  # (6,)
    losses = nt.cluster_losses(per_sample, torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    params = list(model.parameters())
    G = nt.task_gradients(losses, params)
    assert G.shape == (3, sum(p.numel() for p in params))
    for k in range(3):
        model.zero_grad()
        losses[k].backward(retain_graph=True)
        want = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
                          for p in params])
        assert torch.allclose(G[k], want)
    offset = 0
    for p in params:  # the unused parameter's slice is zero
        if p is model.unused:
            assert torch.all(G[:, offset:offset + p.numel()] == 0)
        offset += p.numel()


def test_sliced_task_gradients_equal_task_gradients_when_samples_do_not_interact():
    # One forward and backward per cluster's slice gives the G of K backward passes through the whole batch (the
    # official route) for a model that treats its samples independently; with batch statistics it does not, as the
    # docstring says. An empty cluster keeps a zero row and its slice is never run.
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64)
    sizes, cluster = [3, 0, 2, 2], torch.tensor([0, 0, 0, 2, 2, 3, 3])
    for layer, same in ((nn.LayerNorm(8), True), (nn.BatchNorm1d(8), False)):
        model = nn.Sequential(nn.Linear(4, 8), layer, nn.GELU(), nn.Linear(8, 2)).double()
        params = list(model.parameters())
        per_sample = lambda rows: (model(x[rows]) ** 2).sum(1) * torch.arange(1.0, 8.0, dtype=torch.float64)[rows]
        calls = []
        G = nt.sliced_task_gradients(lambda k, rows: calls.append((k, rows)) or per_sample(rows).mean(), sizes, params)
        assert calls == [(0, slice(0, 3)), (2, slice(3, 5)), (3, slice(5, 7))]
        every = per_sample(slice(None))  # (7,); cluster_losses would round it to float32
        L = torch.stack([every[cluster == k].sum() / max(1, int((cluster == k).sum())) for k in range(4)])  # (4,)
        want = nt.task_gradients(L, params)
        assert G.shape == want.shape == (4, sum(p.numel() for p in params)) and not G[1].any() and not want[1].any()
        assert torch.allclose(G, want, rtol=1e-12, atol=1e-14) == same, layer
    with pytest.raises(ValueError, match="sizes must be the K slice lengths"):
        nt.sliced_task_gradients(lambda k, rows: None, [2, -1], params)


def test_write_flat_grad_round_trip():
    model = Tiny()
    params = list(model.parameters())
    flat = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
    nt.write_flat_grad(params, flat)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), flat)
    nt.write_flat_grad(params, 2 * flat)  # into existing .grad
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), 2 * flat)
    with pytest.raises(ValueError, match="flat must have shape"):
        nt.write_flat_grad(params, flat[:-1])


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import negative_transfer as nt
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
G = torch.randn(3, 40, generator=torch.Generator().manual_seed(rank))
nt.all_reduce_mean(G)
nash = nt.NashMTL(3)
nash.update(G)
torch.save(dict(G=G, pc=nt.pcgrad(G, torch.Generator().manual_seed(0)),
                alpha=torch.tensor(nash.alpha)), sys.argv[2])
dist.destroy_process_group()
"""


@retry_rank_abort
def test_all_reduce_mean_gives_every_rank_the_same_decision(tmp_path):
    G = torch.randn(2, 3)
    assert nt.all_reduce_mean(G) is G  # no process group: identity
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), store=str(tmp_path / "store")))
    file_store_ranks(script, *[[tmp_path / f"{r}.pt"] for r in range(2)])
    out = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    mean = sum(torch.randn(3, 40, generator=torch.Generator().manual_seed(r)) for r in range(2)) / 2
    assert torch.allclose(out[0]["G"], mean) and torch.equal(out[0]["G"], out[1]["G"])
    assert torch.equal(out[0]["pc"], out[1]["pc"]) and torch.equal(out[0]["alpha"], out[1]["alpha"])


# -----------------------------------------------------------------------------
# Task affinity


def test_gradient_affinity_exact_equals_cosine_by_hand():
    torch.manual_seed(1)
    model = Tiny()
    params = list(model.parameters())
    x = torch.randn(8, 3)
    seen = []

    def grad_fn(t):
        target = torch.stack([torch.sin(t.float() / 7.0), torch.cos(t.float() / 5.0)], 1)  # (n, 2)
        loss = ((model(x[:len(t)]) - target) ** 2).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([torch.zeros(p.numel()) if g is None else g.reshape(-1)
                          for p, g in zip(params, grads)])
        seen.append((t.clone(), flat))
        return flat

    T, groups = 50, 5
    tas = nt.gradient_affinity(grad_fn, T, groups=groups, batch_size=8, sketch_dim=4096, seed=3)
    assert tas.shape == (T, T)
    for g, (t, _) in enumerate(seen):
        assert torch.all((t >= g * 10) & (t < (g + 1) * 10))
    F = np.stack([flat.double().numpy() for _, flat in seen])
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    want = np.kron(F @ F.T, np.ones((10, 10)))
    assert np.allclose(tas, want, atol=1e-12)
    assert np.allclose(np.diag(tas), 1.0)


def test_gradient_affinity_sketch_approximates_exact():
    P, T, groups = 50_000, 40, 8
    rng = np.random.default_rng(7)
    shared = rng.standard_normal(P)
    own = rng.standard_normal((groups, P))
    mix = np.linspace(0.0, 3.0, groups)
    vectors = torch.tensor(shared[None] * (3.0 - mix[:, None]) + own * mix[:, None])  # (groups, P)
    grad_fn = lambda t: vectors[int(t[0]) * groups // T].float()
    exact = nt.gradient_affinity(grad_fn, T, groups=groups, batch_size=2, sketch_dim=P)
    sketch = nt.gradient_affinity(grad_fn, T, groups=groups, batch_size=2, sketch_dim=2048)
    unit = vectors.float().double() / vectors.float().double().norm(dim=1, keepdim=True)  # P <= sketch_dim: exact
    group_of = np.arange(T) * groups // T
    np.testing.assert_allclose(exact, (unit @ unit.T).numpy()[np.ix_(group_of, group_of)], atol=1e-12)
    assert exact.min() < 0.2 and exact.max() == pytest.approx(1.0)  # a real spread of similarities
    assert np.max(np.abs(sketch - exact)) < 0.1


def test_gradient_affinity_with_uneven_groups_follows_the_sampled_ranges():
    # T = 10 in 3 groups: edges 0, 3, 6, 10, so timesteps 0-2, 3-5 and 6-9 share a row; each group's
    # gradient is a fixed vector, so TAS is the cosine of the two vectors of the groups of t1 and t2
    vectors = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    calls = []

    def grad_fn(t):
        g = len(calls)
        calls.append(t.clone())
        return vectors[g]

    tas = nt.gradient_affinity(grad_fn, 10, groups=3, batch_size=16, seed=0)
    for g, (lo, hi) in enumerate([(0, 3), (3, 6), (6, 10)]):
        assert torch.all((calls[g] >= lo) & (calls[g] < hi))
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    group_of = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    want = np.array([[float(unit[a] @ unit[b]) for b in group_of] for a in group_of])
    np.testing.assert_allclose(tas, want, atol=1e-12)


def test_gradient_affinity_sketch_of_nonnegative_gradients_is_unbiased():
    # disjoint all-positive gradients are orthogonal; a sketch without random signs would add up every
    # bucket collision and make them look parallel. a + b has cosine 1/sqrt(2) with each.
    P = 20_000
    a = torch.cat([torch.ones(P // 2), torch.zeros(P // 2)])
    b = torch.cat([torch.zeros(P // 2), torch.ones(P // 2)])
    vectors = [a, b, a + b]
    tas = nt.gradient_affinity(lambda t: vectors[int(t[0])], 3, groups=3, batch_size=1, sketch_dim=1024)
    want = np.array([[1.0, 0.0, 2 ** -0.5], [0.0, 1.0, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1.0]])
    np.testing.assert_allclose(tas, want, atol=0.1)


# -----------------------------------------------------------------------------
# Command line


def test_cli_cluster_prints_intervals_and_writes_plots(tmp_path, capsys):
    png = tmp_path / "snr.png"
    nt.main(["cluster", "--objective", "snr", "-k", "5", "--plot", str(png)])
    out = capsys.readouterr().out
    assert "total cost 8074.75" in out
    assert "     18   1000    982" in out
    assert png.stat().st_size > 1000
    t = np.arange(60)
    np.save(tmp_path / "tas.npy", np.exp(-np.abs(t[:, None] - t[None, :]) / 10.0))
    nt.main(["cluster", "--objective", "gradient", "--tas", str(tmp_path / "tas.npy"), "-k", "3",
             "--plot", str(tmp_path / "grad.png")])
    out = capsys.readouterr().out
    assert "T=60" in out and (tmp_path / "grad.png").stat().st_size > 1000


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    # each once ended in a traceback (ValueError, FileNotFoundError, ZeroDivisionError, torch.device), the affinity
    # --out only after every gradient was computed
    (tmp_path / "file").write_text("x")
    np.savez(tmp_path / "tas.npz", tas=np.eye(10))
    aff = ["affinity", "--ckpt", str(tmp_path / "missing.pt"), "--data", "shapes", "--device", "cpu"]
    for argv, says in ((["cluster", "-k", "0"], "num_clusters must be an integer in [1, T=1000], got 0"),
                       (["cluster", "--timesteps", "5"], "--timesteps 5: the linear schedule needs at least 21"),
                       (["cluster", "--objective", "gradient", "--tas", str(tmp_path / "no.npy")], "cannot read the task affinity"),
                       (["cluster", "--objective", "gradient", "--tas", str(tmp_path / "tas.npz")], "is an .npz archive"),
                       (["cluster", "--plot", str(tmp_path / "file" / "c.png")], "Not a directory"),
                       (aff, "missing.pt does not exist"), (aff + ["--groups", "0"], "--groups 0: must be a positive number"),
                       (aff + ["--out", str(tmp_path / "file" / "tas.npy")], "cannot write there"),
                       (aff + ["--device", "gpu"], "--device gpu: not a device"),
                       (aff + ["--device", "cuda:99"], "--device cuda:99: this process sees")):
        with pytest.raises(SystemExit) as e:
            nt.main(argv)
        err = capsys.readouterr().err
        assert says in (e.value.code if isinstance(e.value.code, str) else err) and "Traceback" not in err, argv


def test_cli_affinity_runs_on_stub_project_modules(tmp_path, monkeypatch, capsys):
    T = 20

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3))
            self.b = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))
            self.unused = nn.Parameter(torch.zeros(2))

        def forward(self, x, t, y):
            return x * self.w[None, :, None, None] + (t.float() / T)[:, None, None, None] ** 2 \
                * self.b[None, :, None, None]

    class Diffusion:
        alphas_cumprod = np.linspace(0.99, 0.01, T)

        def training_losses(self, model, x0, t, model_kwargs=None, noise=None):
            seen.append(x0)
            abar = torch.tensor(self.alphas_cumprod, dtype=torch.float32)[t][:, None, None, None]
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
            return {"loss": ((model(x_t, t, **model_kwargs) - noise) ** 2).mean(dim=(1, 2, 3))}

    sample = types.ModuleType("sample")
    sample.resolve_device = torch.device
    sample.load_model = lambda ckpt, device="cpu", use_ema=True: (Net(), Diffusion(),
                                                                  {"image_size": 4})
    data = types.ModuleType("data")
    gen = torch.Generator().manual_seed(0)
    data.load_dataset = lambda path, image_size: torch.utils.data.TensorDataset(  # uint8, like the real loader
        torch.randint(0, 256, (16, 3, image_size, image_size), generator=gen, dtype=torch.uint8),
        torch.zeros(16, dtype=torch.long))
    data.LatentFolder, data.to_model_input = datasets.LatentFolder, datasets.to_model_input
    seen = []
    monkeypatch.setitem(sys.modules, "sample", sample)
    monkeypatch.setitem(sys.modules, "data", data)
    out = tmp_path / "tas.npy"
    nt.main(["affinity", "--ckpt", "a.pt", "b.pt", "--data", "stub", "--groups", "4",
             "--batch-size", "4", "--batches", "2", "--device", "cpu", "--out", str(tmp_path / "tas")])
    assert f"wrote {out} " in capsys.readouterr().out  # the file np.save wrote, its .npy added
    tas = np.load(out)
    assert tas.shape == (T, T)
    assert np.allclose(tas, tas.T) and np.allclose(np.diag(tas), 1.0)
    assert np.all(tas <= 1.0) and tas.min() < 0.999  # the groups do differ
    intervals, _ = nt.cluster_timesteps(2, "gradient", tas=tas)
    assert intervals[0][0] == 0 and intervals[-1][1] == T
    # the loss sees the training input, images scaled to [-1, 1] (it once got raw uint8 values)
    assert all(x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and x.max() > 0.5 for x in seen)
    # a write cut short (a full disk) leaves no file under the name: a half TAS file was refused by the rerun as one
    # that exists ("TAS files are not overwritten")
    def full_disk(file, array):  # np.save given a path or an open file: a header, then the disk is full
        with open(file, "wb") if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file) as f:
            f.write(b"\x93NUMPY")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(SystemExit):
        nt.main(["affinity", "--ckpt", "a.pt", "--data", "stub", "--groups", "4", "--batch-size", "4", "--batches", "2",
                 "--device", "cpu", "--out", str(tmp_path / "cut.npy")])
    assert "No space left on device" in capsys.readouterr().err and not list(tmp_path.glob("cut*"))


def test_cli_affinity_checks_every_checkpoint_and_its_out_before_any_gradient(tmp_path, monkeypatch, capsys):
    # a missing or unloadable last --ckpt, or one of another T (then a numpy broadcast error), stopped the command only
    # after the gradients of the checkpoints before it; an existing --out (by default tas.npy) was overwritten
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    ckpt = torch.load(checkpoints(out)[-1], map_location="cpu", weights_only=True)
    torch.save({**ckpt, "args": {**ckpt["args"], "num_timesteps": 500}}, tmp_path / "t500.pt")
    torch.save({**ckpt, "args": {**ckpt["args"], "latent": {"size": 16, "channels": 3}}}, tmp_path / "latent.pt")
    (tmp_path / "done.npy").write_bytes(b"an earlier TAS")
    computed = []
    monkeypatch.setattr(nt, "gradient_affinity", lambda *a, **k: computed.append(1))
    first = str(checkpoints(out)[-1])
    args = ["--data", "shapes", "--groups", "2", "--batch-size", "2", "--batches", "1", "--device", "cpu"]
    for ckpts, dest, says in (([first, str(tmp_path / "typo.pt")], "tas.npy", "typo.pt does not exist"),
                              ([first, str(tmp_path / "t500.pt")], "tas.npy", "differ in their number of timesteps"),
                              ([first, str(tmp_path / "latent.pt")], "tas.npy", "trained on VAE latents, but shapes"),
                              ([first], "done.npy", "done.npy exists; TAS files are not overwritten"),
                              ([first], "done", "done.npy exists")):
        with pytest.raises(SystemExit) as e:
            nt.main(["affinity", "--ckpt", *ckpts, *args, "--out", str(tmp_path / dest)])
        err = capsys.readouterr().err
        assert says in (e.value.code if isinstance(e.value.code, str) else err), (ckpts, dest)
    assert not computed and (tmp_path / "done.npy").read_bytes() == b"an earlier TAS"
    with pytest.raises(SystemExit, match="--out is empty"):
        nt.main(["affinity", "--ckpt", first, *args, "--out", ""])


def test_cli_affinity_refuses_data_that_do_not_fit_the_checkpoint(tmp_path):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")  # shapes: 4 classes
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ten.npz", arr_0=rng.integers(0, 255, (10, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(10))
    with pytest.raises(SystemExit) as e:  # labels 4.. would be the null class or an index error
        nt.main(["affinity", "--ckpt", str(checkpoints(out)[-1]), "--data", str(tmp_path / "ten.npz"), "--groups", "2",
                 "--batch-size", "2", "--batches", "1", "--device", "cpu", "--out", str(tmp_path / "tas.npy")])
    assert "trained on 4 classes" in str(e.value.code) and "shapes" in str(e.value.code)
    assert not (tmp_path / "tas.npy").exists()


def test_cli_affinity_refuses_a_checkpoint_trained_on_latents_given_images(tmp_path):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    ckpt = torch.load(checkpoints(out)[-1], map_location="cpu", weights_only=True)
    ckpt["args"]["latent"] = {"size": 16, "channels": 3}  # as a latent run of the same shapes would record
    torch.save(ckpt, tmp_path / "latent.pt")
    with pytest.raises(SystemExit) as e:  # the images would run through a model that denoises VAE latents
        nt.main(["affinity", "--ckpt", str(tmp_path / "latent.pt"), "--data", "shapes", "--groups", "2", "--batch-size", "2",
                 "--batches", "1", "--device", "cpu", "--out", str(tmp_path / "tas.npy")])
    assert "trained on VAE latents, but shapes holds images" in str(e.value.code)
    assert not (tmp_path / "tas.npy").exists()


# ==============================================================================================
#                                   curriculum.py: easy-to-hard curriculum
# ==============================================================================================

def _sample_bounds(cur, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = cur.sample_timesteps(n, generator=g)
    return t, int(t.min()), int(t.max())


def test_equal_clusters_partition_with_floor_boundaries():
    assert timestep_clusters(1000, 20)[:2] == [(0, 50), (50, 100)]
    assert timestep_clusters(1000, 3) == [(0, 333), (333, 666), (666, 1000)]
    sizes = [b - a for a, b in timestep_clusters(10, 4)]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1


def test_one_timestep_per_cluster_is_allowed():
    assert timestep_clusters(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    cur = Curriculum(4, 4, pacing="fixed", stage_steps=1)
    ranges = [cur.active_range]
    for _ in range(3):
        cur.update(1.0)
        ranges.append(cur.active_range)
    assert ranges == [(3, 4), (2, 4), (1, 4), (0, 4)] and cur.finished


def test_fixed_pacing_stage_n_samples_exactly_its_range():
    T, N = 1000, 20
    cur = Curriculum(T, N, pacing="fixed", stage_steps=3)
    for n in range(1, N + 1):
        assert cur.stage == n and cur.active_range == ((N - n) * T // N, T)
        t, lo, hi = _sample_bounds(cur, seed=n)
        assert t.dtype == torch.int64 and t.shape == (20000,)
        assert (lo, hi) == ((N - n) * T // N, T - 1)  # min/max hit the bounds, nothing outside
        if n == 1:
            assert torch.unique(t).numel() == 50  # every timestep of the stage is drawn
        changed = [cur.update(1.0) for _ in range(3)]
        assert changed == ([False, False, True] if n < N else [False, False, False])


def test_after_last_stage_whole_range_and_no_more_changes():
    cur = Curriculum(1000, 20, pacing="fixed", stage_steps=2)
    changes = sum(cur.update(0.5) for _ in range(2 * 19))
    assert changes == 19 and cur.finished and cur.stage == cur.num_stages == 20
    assert cur.active_range == (0, 1000)
    assert not any(cur.update(0.5) for _ in range(100)) and cur.stage == 20
    _, lo, hi = _sample_bounds(cur)
    assert (lo, hi) == (0, 999)


def test_hard_to_easy_mirrors_the_curriculum():
    T, N = 1000, 20
    cur = Curriculum(T, N, pacing="fixed", stage_steps=1, order="hard-to-easy")
    for n in range(1, N + 1):
        assert cur.active_range == (0, n * T // N)
        _, lo, hi = _sample_bounds(cur, n=5000, seed=n)
        assert (lo, hi) == (0, n * T // N - 1)
        cur.update(1.0)
    assert cur.finished and cur.active_range == (0, T)


def test_adaptive_constant_loss_advances_after_warmup_plus_patience():
    cur = Curriculum(1000, 4, patience=50, smoothing=0.9)  # warm-up = 10 updates
    assert cur.warmup == 10
    for stage in (1, 2, 3):
        flags = [cur.update(0.3 * stage) for _ in range(60)]
        assert flags == [False] * 59 + [True] and cur.stage == stage + 1
    assert cur.finished


def test_default_adaptive_stage_lasts_warmup_200_plus_patience_500_on_constant_loss():
    cur = Curriculum()
    assert (cur.warmup, cur.patience, cur.num_stages) == (200, 500, 20)
    flags = [cur.update(0.07) for _ in range(700)]
    assert flags.index(True) == 699 and sum(flags) == 1 and cur.active_range == (900, 1000)


def test_default_pacing_follows_the_documented_rules():
    # fixed pacing: a stage every 1000 updates; adaptive: on a noiseless loss the defaults (patience 500,
    # rel_tol 1e-3) hold the stage while the loss falls more than 0.2% per 1000 updates and advance below that
    cur = Curriculum(pacing="fixed")
    assert [cur.update(1.0) for _ in range(1000)].index(True) == 999
    for per_1000, advance_at in ((0.004, None), (0.001, 699)):
        cur, rate = Curriculum(), -math.log(1.0 - per_1000) / 1000
        flags = [cur.update(0.1 * math.exp(-rate * k)) for k in range(4000)]
        assert (flags.index(True) if any(flags) else None) == advance_at, per_1000


def test_stage_numbers_outside_one_to_n_are_refused():
    # stages are n = 1..N; unchecked, a stage 0 would read clusters[-0] = clusters[0] and give the whole [0, T)
    clusters = timestep_clusters(1000, 20)
    for stage in (0, 21):
        for order in ("easy-to-hard", "hard-to-easy"):
            with pytest.raises(ValueError, match=r"stage must be in \[1, 20\]"):
                stage_interval(clusters, stage, order)
        state = Curriculum(1000, 20).state_dict()
        state["stage"] = stage
        with pytest.raises(ValueError, match="outside"):
            Curriculum(1000, 20).load_state_dict(state)


def test_warmup_rounds_one_over_one_minus_smoothing():
    # 1 / (1 - 0.85) = 6.67 rounds to 7 (truncation would give 6): a constant loss advances at 7 + 5.
    cur = Curriculum(1000, 4, patience=5, smoothing=0.85)
    assert cur.warmup == 7
    assert [cur.update(0.2) for _ in range(12)] == [False] * 11 + [True]


def test_equal_loss_is_no_improvement_even_with_zero_rel_tol():
    # smoothing 0.5 keeps the bias-corrected EMA of a constant 0.5 exact; "improves" is strict (<).
    cur = Curriculum(1000, 4, patience=3, smoothing=0.5, rel_tol=0.0)  # warm-up = 2 updates
    assert [cur.update(0.5) for _ in range(5)] == [False] * 4 + [True]


def test_negative_loss_improvement_threshold_uses_abs_best():
    # "improves" means ema < best - rel_tol * |best|: a flat -1.0 never gets below -1.001, so it advances.
    cur = Curriculum(1000, 4, patience=3, smoothing=0.5)
    assert [cur.update(-1.0) for _ in range(5)] == [False] * 4 + [True]


def test_sampling_traces_in_torch_compile_fullgraph_and_follows_stage_changes():
    cur = Curriculum(1000, 20, pacing="fixed", stage_steps=1)
    draw = torch.compile(lambda n: cur.sample_timesteps(n, device="cpu"), backend="eager",
                         fullgraph=True)  # fullgraph: no graph break, hence no host sync
    assert int(draw(4000).min()) == 950
    cur.update(1.0)
    assert int(draw(4000).min()) == 900  # lo/hi are guarded Python ints: the new stage recompiles


def test_smoothed_loss_is_the_bias_corrected_ema():
    cur = Curriculum(smoothing=0.5, pacing="fixed", stage_steps=100)
    assert cur.smoothed_loss is None
    cur.update(1.0)
    cur.update(3.0)
    assert cur.smoothed_loss == pytest.approx((0.5 * 1.0 + 1.0 * 3.0) / 1.5)  # weights 0.5^age


def test_adaptive_advances_on_noisy_plateau():
    rng = np.random.default_rng(0)
    cur = Curriculum(1000, 20, patience=100, smoothing=0.9)
    steps = 0
    while cur.stage == 1 and steps < 3000:
        cur.update(1.0 + 0.1 * rng.standard_normal())
        steps += 1
    assert cur.stage == 2 and steps < 1000


def test_adaptive_holds_while_loss_steadily_improves():
    rng = np.random.default_rng(0)
    cur = Curriculum(1000, 20, patience=100, smoothing=0.9)
    # 5% lower every 100 steps: far above rel_tol (0.1%) per patience window.
    changed = [cur.update(math.exp(-k / 2000) * (1 + 0.02 * rng.standard_normal()))
               for k in range(3000)]
    assert not any(changed) and cur.stage == 1


def test_loss_jump_at_stage_change_does_not_advance_the_next_stage():
    # Harder clusters raise the loss; a tracker that kept stage 1's best would see "no improvement"
    # and advance after `patience` updates. The reset makes stage 2 judge its own falling loss.
    cur = Curriculum(1000, 20, patience=50, smoothing=0.9)
    while cur.stage == 1:
        cur.update(0.1)
    changed = [cur.update(1.0 * math.exp(-k / 200)) for k in range(500)]
    assert not any(changed) and cur.stage == 2


def test_state_dict_roundtrip_mid_stage_continues_the_same_schedule():
    rng = np.random.default_rng(1)
    losses = (1.0 + 0.1 * rng.standard_normal(2000)).tolist()
    a = Curriculum(1000, 10, patience=40, smoothing=0.9)
    for x in losses[:333]:
        a.update(x)
    state = json.loads(json.dumps(a.state_dict()))  # plain Python types only
    assert a.stage_updates > 0 and a.best is not None  # really mid-stage
    b = Curriculum(1000, 10, patience=40, smoothing=0.9)
    b.load_state_dict(state)
    ga, gb = torch.Generator().manual_seed(7), torch.Generator()
    gb.set_state(ga.get_state())
    decisions_a, decisions_b = [], []
    for x in losses[333:]:
        decisions_a.append(a.update(x))
        decisions_b.append(b.update(x))
        assert torch.equal(a.sample_timesteps(16, generator=ga), b.sample_timesteps(16, generator=gb))
    assert decisions_a == decisions_b and sum(decisions_a) >= 2
    assert a.state_dict() == b.state_dict()


def test_finished_curriculum_state_loads():
    a = Curriculum(1000, 2, pacing="fixed", stage_steps=1)
    a.update(1.0)
    assert a.finished
    b = Curriculum(1000, 2, pacing="fixed", stage_steps=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.finished and b.active_range == (0, 1000) and not b.update(1.0)


def test_curriculum_takes_integer_settings_of_any_integer_type_and_saves_plain_ints():
    # a copier's T or N often comes from numpy or torch; np.int64(1000) was refused as "not a positive int"
    for T, N, patience in ((np.int64(1000), np.int64(20), np.int64(500)), (torch.tensor(1000), 20, torch.tensor(5))):
        cur = Curriculum(T, N, patience=patience)
        assert cur.active_range == (950, 1000) and cur.patience == int(patience)
        json.dumps(cur.state_dict())  # plain Python ints
    assert Curriculum(np.int64(100), clusters=[(0, 50), (50, 100)]).state_dict()["num_timesteps"] == 100
    for bad in (1000.0, "1000", 0):
        with pytest.raises(ValueError, match="num_timesteps must be a positive int"):
            Curriculum(bad, 20)
    with pytest.raises(ValueError, match="patience must be a positive int"):
        Curriculum(1000, 20, patience=2.5)


def test_curriculum_update_with_a_per_sample_loss_says_to_pass_the_mean():
    cur = Curriculum(1000, 20)
    with pytest.raises(ValueError, match=r"got a tensor of shape \(8,\); pass loss.mean\(\)"):
        cur.update(torch.rand(8))
    with pytest.raises(ValueError, match=r"got an array of shape \(8,\); pass loss.mean\(\)"):
        cur.update(np.random.rand(8))
    assert cur.update(torch.tensor(0.5)) is False and cur.stage_updates == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's deprecated float() of a (1,) array is not what takes it
        assert cur.update(np.array([0.5])) is False and cur.update(np.float32(0.5)) is False and cur.stage_updates == 3


def test_load_state_dict_rejects_other_settings():
    state = Curriculum(1000, 20).state_dict()
    with pytest.raises(ValueError, match="different"):
        Curriculum(1000, 10).load_state_dict(state)
    with pytest.raises(ValueError, match="different"):
        Curriculum(1000, 20, order="hard-to-easy").load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        Curriculum(1000, 20).load_state_dict({"stage": 1})


def test_custom_unequal_clusters_like_ant_snr():
    clusters = [(0, 1), (1, 2), (2, 5), (5, 18), (18, 1000)]
    cur = Curriculum(1000, clusters=np.array(clusters), pacing="fixed", stage_steps=1)
    assert cur.num_stages == 5
    expected = [(18, 1000), (5, 1000), (2, 1000), (1, 1000), (0, 1000)]
    for n, rng_ in enumerate(expected, 1):
        assert cur.active_range == rng_
        _, lo, hi = _sample_bounds(cur, n=20000, seed=n)
        assert (lo, hi) == (rng_[0], rng_[1] - 1)
        cur.update(1.0)
    assert [stage_interval(clusters, n, "hard-to-easy") for n in (1, 3, 5)] == [(0, 1), (0, 5), (0, 1000)]


@pytest.mark.parametrize("clusters,says", [
    ([(0, 500), (600, 1000)], r"contiguous .* \(0, 500\) is followed by \(600, 1000\)"),  # gap
    ([(0, 500), (400, 1000)], r"contiguous .* \(0, 500\) is followed by \(400, 1000\)"),  # overlap
    ([(500, 1000), (0, 500)], r"contiguous and in increasing t"),  # wrong order
    ([(1, 500), (500, 1000)], r"must cover \[0, 1000\) exactly, they cover \[1, 1000\)"),  # does not start at 0
    ([(0, 500), (500, 999)], r"must cover \[0, 1000\) exactly, they cover \[0, 999\)"),  # does not end at T
    ([(0, 500), (500, 500), (500, 1000)], r"cluster \(500, 500\) is empty"),
    ([(0, 500.0), (500.0, 1000)], r"a pair of ints .* got \(0, 500.0\)"),  # floats
    ([(0, 500, 1000)], r"a pair of ints .* got \(0, 500, 1000\)"),  # not pairs
    ([], "at least one"),
    (5, "must be a list of"),
])
def test_bad_partitions_raise(clusters, says):
    with pytest.raises(ValueError, match=says):
        check_clusters(clusters, 1000)
    with pytest.raises(ValueError, match=says):
        Curriculum(1000, clusters=clusters)


@pytest.mark.parametrize("kwargs", [
    dict(pacing="linear"), dict(order="random"), dict(patience=0), dict(stage_steps=0),
    dict(smoothing=1.0), dict(rel_tol=-1e-3), dict(num_clusters=1001), dict(num_clusters=0),
])
def test_bad_arguments_raise(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"^{name} .*got {value!r}$"):  # names the argument and its value
        Curriculum(**kwargs)


def test_nonfinite_loss_and_generator_device_mismatch_raise():
    cur = Curriculum()
    with pytest.raises(ValueError, match="finite"):
        cur.update(float("nan"))
    with pytest.raises(ValueError, match="generator"):
        cur.sample_timesteps(4, generator=torch.Generator(), device="meta")


def test_describe_and_log_dict():
    cur = Curriculum(1000, 20)
    assert cur.describe() == "curriculum stage 1/20: t in [950, 1000) (easy-to-hard, adaptive)"
    assert cur.log_dict() == {"curriculum/stage": 1, "curriculum/t_min": 950, "curriculum/t_max": 1000}


def _write_metrics(path, with_events=True, with_logs=True):
    cur = Curriculum(1000, 5, pacing="fixed", stage_steps=100)
    rng = np.random.default_rng(0)
    lines = []
    if with_events:
        lines.append({"event": "curriculum_stage", "step": 0, "stage": 1, "t_min": 800, "t_max": 1000})
    for step in range(1, 601):
        loss = float(0.05 + 0.5 * math.exp(-step / 50) + 0.005 * rng.standard_normal())
        if cur.update(loss) and with_events:
            lo, hi = cur.active_range
            lines.append({"event": "curriculum_stage", "step": step, "stage": cur.stage,
                          "t_min": lo, "t_max": hi})
        if with_logs and step % 10 == 0:
            lines.append({"step": step, "loss": loss, **cur.log_dict()})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.mark.parametrize("with_events,with_logs", [(True, True), (True, False), (False, True)])
def test_plot_cli_writes_png(tmp_path, with_events, with_logs):
    metrics, out = tmp_path / "metrics.jsonl", tmp_path / "stages.png"
    _write_metrics(metrics, with_events, with_logs)
    curriculum_main(["--plot", str(metrics), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out.unlink()
    curriculum_main(["--plot", str(tmp_path), "--out", str(out)])  # the run folder, as fid.py curves takes it
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_tick_labels_tell_close_ticks_apart():
    import curriculum
    for lo, hi in ((0.9992, 1.0003), (0.0, 0.25), (0.1, 7.0), (0.0123, 0.0131)):
        ticks = curriculum._nice_ticks(lo, hi)
        labels = [curriculum._fmt(v, ticks[1] - ticks[0]) for v in ticks]
        assert len(ticks) >= 2 and len(set(labels)) == len(labels), labels  # .3g once drew 0.9995 and 1.0 both as "1"
        assert all(abs(float(s) - v) <= 0.5 * (ticks[1] - ticks[0]) for s, v in zip(labels, ticks))


def test_plot_labels_tell_close_loss_ticks_apart_and_write_thousands_as_k(tmp_path, monkeypatch):
    # plot_stages passes the loss axis's tick spacing to _fmt; steps of 1000 and more read "1k", "1.5k", ...
    from PIL import ImageDraw
    import curriculum
    drawn, real_text = [], ImageDraw.ImageDraw.text

    def text(self, xy, s, *a, **k):
        drawn.append((xy, s))
        return real_text(self, xy, s, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    lines = [{"event": "curriculum_stage", "step": 0, "stage": 1, "t_min": 500, "t_max": 1000}]
    lines += [{"step": s, "loss": 0.9992 + 0.0011 * s / 2000} for s in range(100, 2001, 100)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    curriculum_main(["--plot", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "x.png")])
    ticks = curriculum._nice_ticks(0.9992 + 0.0011 * 100 / 2000, 1.0003)
    step = ticks[1] - ticks[0]
    loss_labels = [s for (x, y), s in drawn if x == 4 and y > 300]  # the lower panel's y axis
    assert len(loss_labels) == len(ticks) >= 2 and len(set(loss_labels)) == len(loss_labels), loss_labels
    assert all(abs(float(s) - v) <= 0.5 * step for s, v in zip(loss_labels, ticks))
    assert {"1k", "1.5k", "2k"} <= {s for _, s in drawn} and not any("e+" in s for _, s in drawn)


def test_plot_cli_skips_the_null_loss_of_a_log_window_of_skipped_steps(tmp_path, monkeypatch):
    # train.py logs "loss": null for a window whose steps were all skipped as non-finite (--skip-nonfinite); it
    # logged NaN, which strict JSON readers (jq) refuse, and the plot stopped with "cannot convert float NaN to integer"
    poison_losses(monkeypatch, {1})
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "3", "--skip-nonfinite", "1", "--method",
                    "curriculum", "--curriculum-clusters", "2", "--curriculum-pacing", "fixed", "--curriculum-stage-steps", "1")
    assert [r["loss"] for r in metrics(out) if "loss" in r][0] is None  # step 1's record
    assert "NaN" not in (out / "metrics.jsonl").read_text()
    curriculum_main(["--plot", str(out / "metrics.jsonl"), "--out", str(tmp_path / "stages.png")])
    assert (tmp_path / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_cli_errors_without_curriculum_records(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in range(5)))
    with pytest.raises(SystemExit, match="no curriculum records"):
        curriculum_main(["--plot", str(metrics), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_plot_clis_refuse_an_out_that_is_not_a_png(tmp_path, capsys):
    # PIL said "unknown file extension: " for a path without one, after the work; dtr.py already refused these
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "fid": 9.0, "fid_samples": 2}) + "\n")
    for cli, argv in ((curriculum_main, ["--plot", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "x")]),
                      (fid.main, ["curves", str(tmp_path), "--out", str(tmp_path / "x")]),
                      (nt.main, ["cluster", "--plot", str(tmp_path / "x")])):
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2 and "pass a path ending in .png" in capsys.readouterr().err, cli
    assert not (tmp_path / "x").exists()


# ==============================================================================================
#                                   fid.py: Inception features and metrics
# ==============================================================================================

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
SHARED_WEIGHTS = DATA / "fid_inception_v3_nofc.pth"


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="shared Inception weights absent")
def test_fid_loading_and_reference_statistics_leave_the_global_rng_alone():
    # train.py loads the Inception after restoring a checkpoint's RNG and computes the reference before step 0: a draw
    # from the global RNG there makes --fid-every runs resume differently from an uninterrupted run (and differ from
    # the same run without FID).
    torch.manual_seed(0)
    before = torch.get_rng_state()
    net = fid.load_inception(SHARED_WEIGHTS)
    fid.extract_features(datasets.ShapesDataset(16, 4), net, keys=("pool",), batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------------------------
# A functional reference of the FID Inception-v3, written from the layer list with plain
# F.conv2d calls, BatchNorm by its formula, and TF's padding rules spelled out.
# ----------------------------------------------------------------------------------------------

def ref_cbr(x, sd, name, stride=1, same=True):
    """conv (no bias) -> BN(eps 1e-3) -> ReLU; `same` pads k//2 (stride-1 convs inside blocks)."""
    w = sd[name + ".conv.weight"]
    pad = (w.shape[2] // 2, w.shape[3] // 2) if same else 0
    y = F.conv2d(x, w, stride=stride, padding=pad)
    g, b, m, v = (sd[f"{name}.bn.{k}"][:, None, None] for k in ("weight", "bias", "running_mean", "running_var"))
    return ((y - m) / torch.sqrt(v + 1e-3) * g + b).clamp_min(0)


def ref_avg_pool_excluding_pad(x):
    total = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    count = F.avg_pool2d(torch.ones_like(x[:, :1]), 3, 1, 1, count_include_pad=True)
    return total / count


def ref_max_pool_same(x):
    return F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), 3, 1)


def ref_a(x, sd, p):
    b1 = ref_cbr(x, sd, p + ".branch1x1")
    b5 = ref_cbr(ref_cbr(x, sd, p + ".branch5x5_1"), sd, p + ".branch5x5_2")
    b3 = x
    for name in ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"):
        b3 = ref_cbr(b3, sd, f"{p}.{name}")
    bp = ref_cbr(ref_avg_pool_excluding_pad(x), sd, p + ".branch_pool")
    return torch.cat([b1, b5, b3, bp], 1)


def ref_b(x, sd, p):
    b3 = ref_cbr(x, sd, p + ".branch3x3", stride=2, same=False)
    d = ref_cbr(ref_cbr(x, sd, p + ".branch3x3dbl_1"), sd, p + ".branch3x3dbl_2")
    d = ref_cbr(d, sd, p + ".branch3x3dbl_3", stride=2, same=False)
    return torch.cat([b3, d, F.max_pool2d(x, 3, 2)], 1)


def ref_c(x, sd, p):
    b1 = ref_cbr(x, sd, p + ".branch1x1")
    b7 = x
    for name in ("branch7x7_1", "branch7x7_2", "branch7x7_3"):
        b7 = ref_cbr(b7, sd, f"{p}.{name}")
    d = x
    for i in range(1, 6):
        d = ref_cbr(d, sd, f"{p}.branch7x7dbl_{i}")
    bp = ref_cbr(ref_avg_pool_excluding_pad(x), sd, p + ".branch_pool")
    return torch.cat([b1, b7, d, bp], 1)


def ref_d(x, sd, p):
    b3 = ref_cbr(ref_cbr(x, sd, p + ".branch3x3_1"), sd, p + ".branch3x3_2", stride=2, same=False)
    b7 = x
    for i in range(1, 4):
        b7 = ref_cbr(b7, sd, f"{p}.branch7x7x3_{i}")
    b7 = ref_cbr(b7, sd, p + ".branch7x7x3_4", stride=2, same=False)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


def ref_e(x, sd, p, pool):
    b1 = ref_cbr(x, sd, p + ".branch1x1")
    t = ref_cbr(x, sd, p + ".branch3x3_1")
    b3 = torch.cat([ref_cbr(t, sd, p + ".branch3x3_2a"), ref_cbr(t, sd, p + ".branch3x3_2b")], 1)
    t = ref_cbr(ref_cbr(x, sd, p + ".branch3x3dbl_1"), sd, p + ".branch3x3dbl_2")
    bd = torch.cat([ref_cbr(t, sd, p + ".branch3x3dbl_3a"), ref_cbr(t, sd, p + ".branch3x3dbl_3b")], 1)
    pooled = ref_avg_pool_excluding_pad(x) if pool == "avg" else ref_max_pool_same(x)
    return torch.cat([b1, b3, bd, ref_cbr(pooled, sd, p + ".branch_pool")], 1)


def ref_inception(x, sd):
    """x: float (N, 3, H, W) in [0, 1] -> (pool, spatial, logits)."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    x = ref_cbr(x, sd, "Conv2d_1a_3x3", stride=2, same=False)
    x = ref_cbr(x, sd, "Conv2d_2a_3x3", same=False)
    x = ref_cbr(x, sd, "Conv2d_2b_3x3")
    x = F.max_pool2d(x, 3, 2)
    x = ref_cbr(x, sd, "Conv2d_3b_1x1")
    x = ref_cbr(x, sd, "Conv2d_4a_3x3", same=False)
    x = F.max_pool2d(x, 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = ref_a(x, sd, name)
    x = ref_b(x, sd, "Mixed_6a")
    x = ref_c(ref_c(x, sd, "Mixed_6b"), sd, "Mixed_6c")
    mixed_6_conv = ref_cbr(x, sd, "Mixed_6d.branch1x1")  # TF's mixed_6/conv: (N, 192, 17, 17)
    spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 17 * 17 * 7), TF's NHWC order
    x = ref_c(x, sd, "Mixed_6d")
    x = ref_c(x, sd, "Mixed_6e")
    x = ref_d(x, sd, "Mixed_7a")
    x = ref_e(x, sd, "Mixed_7b", "avg")
    x = ref_e(x, sd, "Mixed_7c", "max")
    pool = x.mean((2, 3))
    return pool, spatial, pool @ sd["fc.weight"].T


def randomize_(net, seed=0):
    """Random but well-scaled weights and BatchNorm statistics, so activations neither vanish nor
    explode through the 17 blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return net.eval()


def assert_close(a, b, rtol=1e-4):
    scale = b.abs().max().item()
    assert scale > 0
    assert (a - b).abs().max().item() <= rtol * scale + 1e-6, (a - b).abs().max().item() / scale


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block, ref, c_in, size", [
    (lambda: fid.InceptionA(192, pool_features=32), ref_a, 192, 9),
    (lambda: fid.InceptionB(288), ref_b, 288, 9),
    (lambda: fid.InceptionC(768, channels_7x7=160), ref_c, 768, 7),
    (lambda: fid.InceptionD(768), ref_d, 768, 9),
    (lambda: fid.InceptionE(1280, pool="avg"), lambda x, sd, p: ref_e(x, sd, p, "avg"), 1280, 5),
    (lambda: fid.InceptionE(2048, pool="max"), lambda x, sd, p: ref_e(x, sd, p, "max"), 2048, 5),
])
def test_fid_blocks_match_functional_reference(block, ref, c_in, size):
    net = randomize_(block())
    x = torch.randn(2, c_in, size, size, generator=torch.Generator().manual_seed(1))
    sd = {"blk." + k: v for k, v in net.state_dict().items()}
    with torch.no_grad():
        assert_close(net(x), ref(x, sd, "blk"))


def test_mixed_7c_pool_is_max_and_7b_pool_is_average_excluding_padding():
    """The two FID quirks change outputs: swapping the pool type of E blocks is detected."""
    e = randomize_(fid.InceptionE(64, pool="max"))
    x = torch.randn(1, 64, 5, 5, generator=torch.Generator().manual_seed(2))
    sd = {"e." + k: v for k, v in e.state_dict().items()}
    with torch.no_grad():
        assert (e(x) - ref_e(x, sd, "e", "avg")).abs().max() > 1e-3
        e.pool = "avg"
        assert_close(e(x), ref_e(x, sd, "e", "avg"))
        counted = ref_cbr(F.avg_pool2d(x, 3, 1, 1, count_include_pad=True), sd, "e.branch_pool")
        assert (e(x)[:, -192:] - counted).abs().max() > 1e-4


def test_full_network_matches_functional_reference_with_random_weights():
    net = randomize_(fid.FIDInceptionV3()).to(memory_format=torch.channels_last)
    sd = net.state_dict()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    captured = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(b1=o))
    with torch.no_grad():
        out = net(x)
        pool, spatial, logits = ref_inception(x, sd)
    assert out["pool"].shape == (1, 2048) and out["spatial"].shape == (1, 2023) and out["logits"].shape == (1, 1008)
    assert_close(out["pool"], pool)
    assert_close(out["spatial"], spatial)
    assert_close(out["logits"], logits)  # no bias, although fc.bias is random here
    assert torch.equal(out["spatial"], captured["b1"][:, :7].permute(0, 2, 3, 1).reshape(1, -1))


class _StopForward(Exception):
    pass


def bilinear_resize_reference(img, out_h, out_w):
    """numpy bilinear resize of img (..., H, W) with half-pixel centres (align_corners=False) and no
    antialiasing: output pixel o reads the input at (o + 0.5) * in / out - 0.5, clamped to the image."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    (r0, r1, wr), (c0, c1, wc) = taps(img.shape[-2], out_h), taps(img.shape[-1], out_w)
    rows = img[..., r0, :] * (1 - wr)[:, None] + img[..., r1, :] * wr[:, None]  # (..., out_h, W)
    return rows[..., c0] * (1 - wc) + rows[..., c1] * wc  # (..., out_h, out_w)


def test_network_input_is_pytorch_fid_resize_then_2x_minus_1():
    """What reaches Conv2d_1a_3x3: pytorch-fid's F.interpolate to 299x299 (bilinear, half-pixel
    centres, no antialiasing, which would blur a downsizing), then 2x - 1; 299x299 passes as is."""
    net = fid.FIDInceptionV3().eval()
    seen = []

    def stop(module, args):
        seen.append(args[0].double().numpy())
        raise _StopForward

    net.Conv2d_1a_3x3.register_forward_pre_hook(stop)
    g = torch.Generator().manual_seed(4)
    for h, w in ((640, 410), (32, 48), (299, 299)):  # down, up (non-square), unchanged
        x = torch.rand(1, 3, h, w, generator=g)
        with torch.no_grad(), pytest.raises(_StopForward):
            net(x)
        expected = 2 * bilinear_resize_reference(x.double().numpy(), 299, 299) - 1
        assert seen[-1].shape == (1, 3, 299, 299)
        # PyTorch computes the source coordinates in float32: up to ~1e-4 apart at x = 640
        np.testing.assert_allclose(seen[-1], expected, rtol=0, atol=1e-3, err_msg=f"{h}x{w}")


def test_state_dict_has_pytorch_fid_layout():
    shapes = {k: tuple(v.shape) for k, v in fid.FIDInceptionV3().state_dict().items()}
    assert len(shapes) == 566
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    if SHARED_WEIGHTS.is_file():
        file_shapes = {k: tuple(v.shape) for k, v in torch.load(SHARED_WEIGHTS, weights_only=True).items()}
        assert file_shapes == shapes


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="shared Inception weights absent")
def test_shared_weights_load_strictly_and_give_feature_shapes():
    net = fid.load_inception(SHARED_WEIGHTS)
    assert not net.training and not fid.has_classifier(net)  # the shared file's fc is zeroed
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    feats = fid.extract_features(images, net, batch_size=2, progress=False)
    assert feats["pool"].shape == (2, 2048) and feats["spatial"].shape == (2, 2023)
    assert feats["logits"].shape == (2, 1008) and not feats["logits"].any()
    assert (feats["pool"] >= 0).all() and feats["pool"].mean() > 0.05  # post-ReLU average pool
    # pytorch-fid 0.3.0's own InceptionV3([3]) with this weights file on these two images (run once, outside this
    # suite, which cannot depend on it); fid.py matched it to conv rounding (channels_last vs its default layout)
    np.testing.assert_allclose(feats["pool"].sum(axis=1), [516.454069404248, 538.2071577436691], rtol=1e-4)
    np.testing.assert_allclose(feats["pool"][:, :4], [[0.45919302, 0.0, 0.01034413, 0.00845708],
                                                      [0.29717863, 0.0, 0.01441012, 0.01537843]], rtol=1e-3, atol=1e-6)


def test_load_inception_offline_names_the_file_and_flag(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--inception") as err:
        fid.load_inception()
    assert fid.FID_WEIGHTS_FILE in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        fid.load_inception("/nonexistent/pt_inception.pth")


def test_load_inception_refuses_unreadable_or_other_weights_with_what_to_give(tmp_path, capsys, monkeypatch):
    (tmp_path / "text.pth").write_text("not weights")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    torch.save(fid.FIDInceptionV3().state_dict(), tmp_path / "full.pth")  # random weights, the right 566 keys
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:100000])
    for name, says in (("text.pth", "cannot read the Inception weights .*UnpicklingError"),
                       ("cut.pth", "cannot read the Inception weights .*RuntimeError"),
                       ("other.pth", "does not hold the FID Inception-v3 weights \\(566 of its 566 keys missing, 1 unknown\\)")):
        with pytest.raises(ValueError, match=says + f".*give pytorch-fid's {fid.FID_WEIGHTS_FILE}"):
            fid.load_inception(tmp_path / name)
    assert fid.load_inception(tmp_path / "full.pth").training is False

    def denied(path, **kwargs):  # what a file this user may not read gives (not testable as root, who may read any)
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(ValueError) as e:  # it said "not a whole PyTorch weights file"
        fid.load_inception(tmp_path / "full.pth")
    assert str(e.value) == f"cannot read the Inception weights {tmp_path / 'full.pth'}: Permission denied"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:  # train.py says it in one line (it printed a traceback for a missing file)
        run_train(tmp_path, "--max-steps", "1", "--fid-every", "1", "--inception", str(tmp_path / "no.pth"))
    assert e.value.code == 2 and capsys.readouterr().err.strip().startswith("error: Inception weights not found")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def random_spd(d, rng):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_eigenvalue_form_and_is_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), random_spd(5, rng), random_spd(5, rng)
    tr_sqrt = np.sqrt(np.linalg.eigvals(a @ b).real).sum()  # eigenvalues of a product of SPDs are > 0
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-9)
    assert abs(fid.frechet_distance(mu1, a, mu1, a)) < 1e-10
    assert fid.frechet_distance(0.0, 2.0, 1.0, 2.0) == pytest.approx(1.0)  # scalars via atleast_1d/2d


def test_frechet_distance_is_as_accurate_as_pytorch_fids_sqrtm_on_feature_like_statistics():
    """Covariances of correlated features whose spectrum spans six decades (as Inception's does), with more and
    with fewer samples than dimensions. The exact value comes from the features themselves: the nonzero
    eigenvalues of S1 S2 are the squared singular values of X1 X2^T / sqrt((n1 - 1)(n2 - 1)) (X centred), so
    Tr (S1 S2)^{1/2} is that matrix's nuclear norm, which an SVD gives to rounding. pytorch-fid's sqrtm and the
    eigenvalue form are both within about 1e-7 of it, relative (the eigenvalue form 1.0e-7 on the rank-deficient pair);
    the tolerance is what rounding allows for either."""
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(64, 64)) * np.logspace(0, -3, 64)  # (64, 64) column scales over three decades
    for n1, n2 in [(400, 300), (50, 40)]:  # the second: rank-deficient covariances, as FID of few samples
        f1, f2 = rng.normal(size=(n1, 64)) @ mix.T, (rng.normal(size=(n2, 64)) + 0.3) @ mix.T  # (N, 64) features
        (mu1, s1), (mu2, s2) = fid.feature_statistics(f1), fid.feature_statistics(f2)
        x1, x2 = f1 - mu1, f2 - mu2  # (N, 64) centred
        nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
        exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * nuclear
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-6)
        assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(exact, rel=1e-6)  # symmetric in its arguments
        if n1 > 64:  # the full-rank pair only: for a singular product sqrtm's result can need pytorch-fid's eps retry
            pytorch_fid = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
            assert ((mu1 - mu2) ** 2).sum() + pytorch_fid == pytest.approx(exact, rel=1e-6)


def test_frechet_distance_rejects_statistics_that_are_no_covariances():
    rng = np.random.default_rng(3)
    a, b = random_spd(4, rng), random_spd(4, rng)
    with pytest.raises(ValueError, match="NaN or inf"):
        fid.frechet_distance(np.zeros(4), np.full((4, 4), np.nan), np.zeros(4), b)  # never a NaN FID
    skew = a.copy()
    skew[0, 1] += 1.0
    with pytest.raises(ValueError, match="sigma2 is not symmetric"):
        fid.frechet_distance(np.zeros(4), a, np.zeros(4), skew)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fid.frechet_distance(np.zeros(4), a - 2 * np.eye(4) * np.linalg.eigvalsh(a).max(), np.zeros(4), b)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fid.frechet_distance(np.zeros(4), a, np.zeros(4), -b)


def test_frechet_distance_psd_check_holds_at_any_feature_scale():
    """The eigenvalues of sigma1 are in feature units squared and those of sigma1 sigma2 in their fourth power, so each
    is checked against its own scale: a covariance with an eigenvalue of minus half its largest is refused whether the
    features are of size 1e-3 or 1e3 (one shared tolerance let sigma1 through at 1e3 and sigma2 at 1e-3)."""
    rng = np.random.default_rng(4)
    a, b = random_spd(4, rng), random_spd(4, rng)
    w, v = np.linalg.eigh(a)
    bad = (v * np.r_[-0.5 * w.max(), w[1:]]) @ v.T  # (4, 4) symmetric, one eigenvalue of -w.max() / 2
    clean = fid.frechet_distance(np.zeros(4), a, np.zeros(4), b)
    for k in (1e-6, 1.0, 1e6):  # covariances of features scaled by 1e-3, 1, 1e3
        for s1, s2 in ((bad, b), (a, bad)):
            with pytest.raises(ValueError, match="not positive semi-definite"):
                fid.frechet_distance(np.zeros(4), k * s1, np.zeros(4), k * s2)
        assert fid.frechet_distance(np.zeros(4), k * a, np.zeros(4), k * b) == pytest.approx(k * clean, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    u, v = q[:, :1], q[:, 1:2]  # (6, 1) orthogonal directions: sigma1 sigma2 = 0, its eigenvalues rounding noise
    assert fid.frechet_distance(np.zeros(6), u @ u.T, np.zeros(6), 1e-6 * v @ v.T) == pytest.approx(1 + 1e-6)


def test_frechet_distance_of_rank_deficient_covariances_matches_the_eigenvalue_form():
    """Fewer samples than dimensions (FID of a few hundred samples in 2048 dims): singular covariances,
    for which sqrtm returns a complex matrix with a ~1e-8 imaginary part and negative real diagonal
    entries, and pytorch-fid retries with eps on the diagonals. The eigenvalue form needs no retry:
    Tr sqrtm(AB) = sum sqrt(eig(AB)), the zero eigenvalues counting as 0."""
    rng = np.random.default_rng(10)
    a = np.cov(rng.normal(size=(3, 4)), rowvar=False)  # rank 2 of 4
    b = np.cov(rng.normal(size=(3, 4)), rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(a @ b).real.clip(0)).sum()  # two eigenvalues are 0 (+- 1e-17)
    expected = np.trace(a) + np.trace(b) - 2 * tr_sqrt
    assert fid.frechet_distance(np.zeros(4), a, np.zeros(4), b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_samples_is_the_closed_form_with_a_zero_covariance():
    # A collapsed model (every sample the same image) has features with covariance exactly 0: a valid covariance,
    # whose FID is ||mu1 - mu2||^2 + Tr sigma2 (Tr (0 sigma2)^{1/2} = 0), in either order
    rng = np.random.default_rng(11)
    mu1, mu2, b = rng.normal(size=4), rng.normal(size=4), random_spd(4, rng)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(b)
    assert fid.frechet_distance(mu1, np.zeros((4, 4)), mu2, b) == pytest.approx(expected, rel=1e-12)
    assert fid.frechet_distance(mu2, b, mu1, np.zeros((4, 4))) == pytest.approx(expected, rel=1e-12)
    assert fid.frechet_distance(mu1, np.zeros((4, 4)), mu1, np.zeros((4, 4))) == 0


def test_frechet_distance_accepts_rounding_and_refuses_what_is_beyond_it():
    # Statistics rounded at float32's 1e-7 of their scale may be that far from symmetric or positive semi-definite:
    # accepted, with the FID of the matrix they round. 1e-4 of their scale is no rounding: refused.
    rng = np.random.default_rng(12)
    a, b = random_spd(4, rng), random_spd(4, rng)
    w, v = np.linalg.eigh(a)
    singular = (v * np.r_[0.0, w[1:]]) @ v.T  # (4, 4) a with its smallest eigenvalue set to 0
    for rel, refused in ((1e-7, False), (1e-4, True)):
        skew = a.copy()
        skew[0, 1] += rel * np.abs(a).max()
        negative = (v * np.r_[-rel * w.max(), w[1:]]) @ v.T  # (4, 4) singular, an eigenvalue -rel x the largest
        for s1, s2, says, like in ((skew, b, "sigma1 is not symmetric", a), (b, skew, "sigma2 is not symmetric", a),
                                   (negative, b, "not positive semi-definite", singular),
                                   (b, negative, "not positive semi-definite", singular)):
            if refused:
                with pytest.raises(ValueError, match=says):
                    fid.frechet_distance(np.zeros(4), s1, np.zeros(4), s2)
            else:  # the FID of the matrix it rounds (FID is symmetric in its arguments), in the eigenvalue form
                expected = np.trace(like) + np.trace(b) - 2 * np.sqrt(np.linalg.eigvals(like @ b).real.clip(0)).sum()
                assert fid.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_refuses_a_negative_direction_of_sigma2_where_sigma1_is_zero():
    # sigma1 = diag(1, 0) (a feature constant over the samples) and sigma2 = diag(1, -1): the eigenvalues of
    # sigma1 sigma2 are 1 and 0, so their check passes, and the formula gives 1 + 0 - 2 = -1, a negative FID. The
    # same statistics in the other order were refused.
    s1, s2 = np.diag([1.0, 0.0]), np.diag([1.0, -1.0])
    for a, b in ((s1, s2), (s2, s1)):
        with pytest.raises(ValueError, match="not positive semi-definite"):
            fid.frechet_distance(np.zeros(2), a, np.zeros(2), b)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mean vectors"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    feats = np.random.default_rng(4).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = fid.feature_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
    centred = feats.astype(np.float64) - feats.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(feats[:1])


def test_inception_score_of_uniform_logits_is_one_and_of_confident_balanced_logits_is_classes():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    confident = 50.0 * np.tile(np.eye(10), (20, 1))  # each of 10 classes predicted with p ~ 1
    assert fid.inception_score(confident) == pytest.approx(10.0, rel=1e-6)


def test_inception_score_averages_consecutive_splits_of_5000():
    logits = np.random.default_rng(5).normal(size=(12000, 4)) * 2

    def one_split(lg):
        p = np.exp(lg) / np.exp(lg).sum(1, keepdims=True)
        return np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean())

    expected = np.mean([one_split(logits[:5000]), one_split(logits[5000:10000]), one_split(logits[10000:])])
    assert fid.inception_score(logits) == pytest.approx(expected, rel=1e-10)


def brute_force_precision_recall(real, fake, k):
    d_rr = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    d_ff = np.sqrt(((fake[:, None] - fake[None]) ** 2).sum(-1))
    d_rf = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))  # (N, M)
    r_real, r_fake = np.sort(d_rr, 1)[:, k], np.sort(d_ff, 1)[:, k]  # index 0 is the point itself
    precision = np.mean([(d_rf[:, j] <= r_real).any() for j in range(len(fake))])
    recall = np.mean([(d_rf[i] <= r_fake).any() for i in range(len(real))])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_knn(k):
    rng = np.random.default_rng(6)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(loc=0.7, scale=1.4, size=(45, 5))
    expected = brute_force_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that is not trivially 0 or 1
    assert fid.precision_recall(real, fake, k=k, batch_size=7) == pytest.approx(expected)
    assert fid.precision_recall(real.astype(np.float32), fake, k=k) == pytest.approx(expected)


def test_precision_recall_of_identical_sets_is_one_and_small_sets_are_rejected():
    feats = np.random.default_rng(7).normal(size=(20, 4))
    assert fid.precision_recall(feats, feats) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k=3"):
        fid.precision_recall(feats[:3], feats)


def test_precision_recall_counts_points_on_the_ball_boundary_hand_values():
    """A point exactly at the k-NN radius is on the manifold (<=, as ADM and Kynkaanniemi et al.).
    1-d, k = 1, integer points (exact squared distances): reals 0..4 and fakes 5, 6, -1, -2 all have
    radius 1. Fakes 5 and -1 touch the real balls of 4 and 0 (precision 2/4); reals 4 and 0 touch
    the fake balls of 5 and -1 (recall 2/5)."""
    real = np.arange(5.0)[:, None]
    fake = np.array([[5.0], [6.0], [-1.0], [-2.0]])
    assert fid.precision_recall(real, fake, k=1) == (0.5, 0.4)
    assert fid.precision_recall(real, fake, k=1, batch_size=2) == (0.5, 0.4)


def test_precision_recall_distances_are_float64_for_features_far_from_the_origin():
    """The squared distances are |a|^2 - 2 a.b + |b|^2: in float32 that cancels away for features with a large common
    offset (here 1e4: |a|^2 ~ 5e8, float32's rounding ~ 30, the distances ~ 10), in float64 it does not."""
    rng = np.random.default_rng(6)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(loc=0.7, scale=1.4, size=(45, 5))
    expected = brute_force_precision_recall(real, fake, 3)
    assert fid.precision_recall(real + 1e4, fake + 1e4, k=3) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# Inputs, statistics files, CLI (with a tiny stand-in network: the readers and the plumbing are
# under test here, not the Inception network)
# ----------------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    """Same interface as FIDInceptionV3 (float (N, 3, H, W) in [0, 1] -> dict), 6/12/4-d features."""

    def __init__(self, fc_scale=1.0):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(24.0).reshape(4, 6) / 24 * fc_scale)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # (N, 6)
        return {"pool": pool, "spatial": x[:, :, :2, :2].flatten(1), "logits": pool @ self.fc.weight.T}


def make_images(n=7, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        sub = folder / ("a" if i % 2 else "b")  # recursive listing
        sub.mkdir(exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:03d}.png")
    return folder


def test_uint8_images_reach_the_network_as_rgb_rows_by_columns_over_255():
    """ADM's evaluator reads (N, H, W, 3) uint8 RGB in [0, 255]: the network must see image[n, h, w, c] / 255 at
    [n, c, h, w] for both uint8 layouts. Non-square images, so a transposition (rows read as columns) shows, and
    the spatial features, which keep where each pixel is."""
    images = make_images(3)[:, :, :10]  # (3, 16, 10, 3) non-square
    want = TinyNet()(torch.from_numpy(images).double().permute(0, 3, 1, 2).float() / 255)
    for layout in (images, torch.from_numpy(images).permute(0, 3, 1, 2)):  # (N, H, W, 3) and (N, 3, H, W)
        got = fid.extract_features(layout, TinyNet(), keys=("pool", "spatial"), progress=False)
        for key in ("pool", "spatial"):
            np.testing.assert_allclose(got[key], want[key].numpy(), rtol=1e-6, atol=1e-7, err_msg=key)


def test_fid_skips_hidden_entries_and_reads_upper_case_npz(tmp_path):
    # as data.ImageFiles: a notebook's .ipynb_checkpoints/ copy was counted twice, macOS ._x.png failed to decode
    folder = write_folder(tmp_path / "imgs", make_images(4))
    (folder / ".ipynb_checkpoints").mkdir()
    Image.fromarray(make_images(1, seed=9)[0]).save(folder / ".ipynb_checkpoints" / "000.png")
    (folder / "a" / "._001.png").write_bytes(b"macOS resource fork")
    assert sorted(fid.ImageFiles(folder).names) == sorted(str(Path(d) / f"{i:03d}.png") for i, d in enumerate("baba"))
    net = TinyNet()
    with open(tmp_path / "S.NPZ", "wb") as f:  # np.savez would append .npz to the name
        np.savez(f, arr_0=make_images(4))
    np.savez(tmp_path / "s.npz", arr_0=make_images(4))
    upper, lower = (fid.compute_statistics(str(tmp_path / n), net, progress=False) for n in ("S.NPZ", "s.npz"))
    np.testing.assert_array_equal(upper["mu"], lower["mu"])


def test_folder_zip_npz_and_arrays_give_identical_features(tmp_path):
    images = make_images()
    folder = write_folder(tmp_path / "imgs", images)
    order = sorted(range(len(images)), key=lambda i: f"{'a' if i % 2 else 'b'}/{i:03d}.png")  # sorted paths
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder).as_posix())
    np.savez(tmp_path / "samples.npz", arr_0=images[order])
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images[order])
    net = TinyNet()
    expected = fid.extract_features(images[order], net, batch_size=3, progress=False)["pool"]
    for source in (folder, tmp_path / "imgs.zip", tmp_path / "samples.npz", tmp_path / "compressed.npz",
                   torch.from_numpy(images[order]).permute(0, 3, 1, 2),  # uint8 (N, 3, H, W)
                   torch.from_numpy(images[order]).permute(0, 3, 1, 2).float() / 255,
                   torch.utils.data.TensorDataset(torch.from_numpy(images[order]), torch.zeros(len(images)))):
        got = fid.extract_features(source, net, batch_size=3, progress=False)["pool"]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=str(type(source)))


def test_training_and_fid_read_the_same_images_of_a_zip_and_of_its_folder(tmp_path):
    # One rule (fid.is_image_name) for both readers: data.py took .gif but not .ppm, FID the reverse; FID counted a
    # name stored twice twice; a __MACOSX folder was skipped by data.py at the top of a zip only and by FID wherever
    # "__MACOSX" appeared in a name. Unzipped, the folder gives both readers the same names again.
    def image(fmt, value):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (value, 0, 0)).save(buf, format=fmt)
        return buf.getvalue()

    members = [("a/0.png", image("PNG", 0)), (zipfile.ZipInfo("c.png/"), b""),  # a directory named like an image
               ("a/1.GIF", image("GIF", 2)), ("b/2.ppm", image("PPM", 3)), ("b/3.tiff", image("TIFF", 4)),
               ("b/my__MACOSX_4.png", image("PNG", 5)),  # a name, not the folder
               ("__MACOSX/a/5.png", image("PNG", 6)),
               ("sub/__MACOSX/b/6.png", image("PNG", 7)),  # a macOS zip unzipped into sub/ and zipped again
               ("__MACOSX/a/._0.png", b"resource fork"), (".ipynb_checkpoints/0.png", image("PNG", 8)),
               ("notes.txt", b"not an image"), ("a/0.png", image("PNG", 9))]  # a/0.png again: its last entry counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name"
        with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:
            for name, blob in members:
                zf.writestr(name, blob)
    expected = ["a/0.png", "a/1.GIF", "b/2.ppm", "b/3.tiff", "b/my__MACOSX_4.png"]
    # c.png/ and sub/ are folders without an image beside the classes a and b: refused as for the folder below
    with pytest.raises(datasets.DataError, match="class folder 'c.png' holds no images .2 such"):
        datasets.ImageFiles(tmp_path / "mixed.zip", 16, num_threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(tmp_path / "classes.zip", "w") as zf:
            for name, blob in members:
                if not str(getattr(name, "filename", name)).startswith(("c.png", "sub")):
                    zf.writestr(name, blob)
    train = datasets.ImageFiles(tmp_path / "classes.zip", 16, num_threads=2)
    score = fid.ImageFiles(tmp_path / "mixed.zip")
    assert train.names == score.names == expected
    assert [int(score[i][0, 0, 0]) for i in range(len(score))] == [9, 2, 3, 4, 5]
    with zipfile.ZipFile(tmp_path / "mixed.zip") as zf:
        zf.extractall(tmp_path / "mixed")
    (tmp_path / "mixed" / "linked").symlink_to(tmp_path / "mixed" / "a", target_is_directory=True)  # followed by both
    with pytest.raises(datasets.DataError, match="class folder 'c.png' holds no images"):  # nor does sub/: 2 such
        datasets.ImageFiles(tmp_path / "mixed", 16, num_threads=2)
    shutil.rmtree(tmp_path / "mixed" / "c.png")  # folders without an image would shift the labels as classes
    shutil.rmtree(tmp_path / "mixed" / "sub")
    train, score = datasets.ImageFiles(tmp_path / "mixed", 16, num_threads=2), fid.ImageFiles(tmp_path / "mixed")
    assert train.names == score.names == [str(Path(n)) for n in expected + ["linked/0.png", "linked/1.GIF"]]


def test_a_zip_that_lists_an_empty_class_folder_is_refused_and_a_folder_named_x_zip_is_a_folder(tmp_path):
    # zips were not checked for class folders without images: `zip -r` stores an empty folder's entry ("b/"), and
    # every class sorted after it took the label of the one before, as in a plain folder (which was refused)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for name in ("a/0.png", "c/1.png"):
            zf.writestr(name, png.getvalue())
        zf.writestr(zipfile.ZipInfo("b/"), b"")
    with pytest.raises(datasets.DataError, match="class folder 'b' holds no images"):
        datasets.load_dataset(str(tmp_path / "d.zip"), 8)
    folder = write_folder(tmp_path / "images.zip", make_images(4))  # a folder, named like a zip: read as a folder
    ds = datasets.load_dataset(str(folder), 16)
    assert len(ds) == 4 and ds.num_classes == 2 and not ds.is_zip


def test_npz_labels_must_be_class_indices_and_unused_classes_are_named(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    for labels, match in (([0.0, 1.5, 2.0], r"class indices 0, 1, 2, \.\.\., got 1.5 \(image 1, and 0 more\)"),
                          ([0, -1, 2], "got -1"), ([[0], [1], [2]], r"3 labels, one number per image, got shape \(3, 1\)")):
        np.savez(tmp_path / "d.npz", arr_0=images, arr_1=np.array(labels))  # 1.5 was read as class 1
        with pytest.raises(datasets.DataError, match=match):
            datasets.load_dataset(str(tmp_path / "d.npz"), 8)
    np.savez(tmp_path / "d.npz", arr_0=images, arr_1=np.array([0.0, 1.0, 2.0]))  # whole numbers as floats: fine
    assert datasets.load_dataset(str(tmp_path / "d.npz"), 8).labels.tolist() == [0, 1, 2]
    np.savez(tmp_path / "d.npz", arr_0=images, arr_1=np.array([1, 2, 3]))  # numbered from 1: class 0 has no image
    with pytest.warns(UserWarning, match="labels 0..3, but 1 of them have no image"):
        assert datasets.load_dataset(str(tmp_path / "d.npz"), 8).num_classes == 4


def test_image_folders_with_a_symlink_loop_list_each_image_once(tmp_path):
    # os.walk(followlinks=True) went down a/up -> .. again and again: every image ~40 times (the OS's link limit),
    # and two such links never ended. fid.py (pathlib's rglob) had not followed links before the readers were joined.
    write_folder(tmp_path / "imgs" / "a", make_images(2))
    (tmp_path / "imgs" / "a" / "up").symlink_to(tmp_path / "imgs", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    write_folder(tmp_path / "elsewhere", make_images(1))
    (tmp_path / "imgs" / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # no loop: followed
    expected = [str(Path(n)) for n in ("a/a/001.png", "a/b/000.png", "b/b/000.png")]  # write_folder's sub-folders
    assert fid.folder_images(tmp_path / "imgs") == expected
    assert fid.ImageFiles(tmp_path / "imgs").names == datasets.ImageFiles(tmp_path / "imgs", 16, num_threads=1).names == expected


def test_fid_zip_reader_pickles_for_a_spawned_worker_and_closes_its_file(tmp_path):
    # A spawned DataLoader worker gets the dataset pickled: without the open file, which it opens on its first read
    write_folder(tmp_path / "imgs", make_images(6))
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in sorted((tmp_path / "imgs").rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path / "imgs").as_posix())
    ds = fid.ImageFiles(tmp_path / "imgs.zip")
    expected = torch.stack([ds[i] for i in range(len(ds))])  # (6, 16, 16, 3); the zip is open now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clone = pickle.loads(pickle.dumps(ds))
        assert clone._file is None and torch.equal(torch.stack([clone[i] for i in range(len(clone))]), expected)
        assert clone._file.fileno() != ds._file.fileno()
        folder = fid.ImageFiles(tmp_path / "imgs")
        assert torch.equal(torch.stack([folder[i] for i in range(len(folder))]), expected)
        del ds, clone, folder
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # the files were closed, not leaked
    loader = torch.utils.data.DataLoader(fid.ImageFiles(tmp_path / "imgs.zip"), batch_size=3, num_workers=2,
                                         multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(loader)), expected)  # forked workers read by position through one descriptor


def test_train_logs_the_read_whole_warning_once_in_log_txt(tmp_path, recwarn):
    # data.py warns that a compressed array is read whole by every process: train.py says it once, through its log
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images, arr_1=np.arange(8) % 2)
    out = run_train(tmp_path, "--data", str(tmp_path / "compressed.npz"), "--max-steps", "1", "--global-batch-size", "4")
    said = [line for line in (out / "log.txt").read_text().splitlines() if "MB of it into memory" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and "np.savez(" in said[0]
    assert not any("MB of it into memory" in str(w.message) for w in recwarn)  # not also on each rank's stderr


def test_train_logs_each_data_warning_text_once_and_no_deprecations(tmp_path, monkeypatch):
    # PIL warns once per image (here DecompressionBombWarning, the same text for all 8): the captured warnings were
    # logged one line each, so a large dataset filled log.txt. A library's DeprecationWarning is not the user's.
    write_folder(tmp_path / "imgs", make_images(8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 16 x 16 = 256 pixels: above it, under the error at 2x
    load = datasets.load_dataset

    def deprecated_load(*args, **kwargs):
        warnings.warn("old API", DeprecationWarning)
        return load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", deprecated_load)
    out = run_train(tmp_path, "--data", str(tmp_path / "imgs"), "--max-steps", "1", "--global-batch-size", "4")
    said = [line for line in (out / "log.txt").read_text().splitlines() if line.startswith("warning: ")]
    assert len(said) == 1 and "decompression bomb" in said[0]


def test_uncompressed_npz_is_memory_mapped(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=make_images(3), arr_1=np.arange(3))
    arr = fid.npz_array(tmp_path / "s.npz")
    assert isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr, make_images(3))


def test_grey_palette_rgba_and_mixed_sizes_are_read_as_rgb(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (20, 12), 77).save(folder / "grey.png")
    Image.new("RGBA", (16, 16), (10, 20, 30, 0)).save(folder / "rgba.png")
    palette = Image.new("P", (9, 9), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.save(folder / "palette.png", transparency=0)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "rgb.JPG", quality=100)
    Image.new("RGB", (33, 47), (255, 255, 255)).save(folder / "white.png")  # resized alone: 1 + 1e-7 before clamping
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._grey.png").write_bytes(b"resource fork, not an image")
    ds = fid.ImageFiles(folder)
    assert "__MACOSX/._grey.png" not in ds.names
    items = {name: ds[i] for i, name in enumerate(ds.names)}
    assert all(x.dtype == torch.uint8 and x.ndim == 3 and x.shape[-1] == 3 for x in items.values())
    assert items["grey.png"].shape == (12, 20, 3) and (items["grey.png"] == 77).all()
    assert items["rgba.png"][0, 0].tolist() == [10, 20, 30]
    assert items["palette.png"][0, 0].tolist() == [200, 100, 50]
    feats = fid.extract_features(folder, TinyNet(), batch_size=5, progress=False)  # one mixed-size batch
    assert feats["pool"].shape == (5, 6)
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode .*broken.png"):
        fid.extract_features(folder, TinyNet(), batch_size=6, progress=False)


def test_limit_takes_images_spread_evenly(tmp_path):
    assert fid._subset(10, 3).tolist() == [0, 3, 6]
    assert fid._subset(10, None) is None and fid._subset(10, 50) is None
    images = make_images(10)
    feats = fid.extract_features(images, TinyNet(), limit=3, progress=False)["pool"]
    np.testing.assert_allclose(feats, fid.extract_features(images[[0, 3, 6]], TinyNet(), progress=False)["pool"])


def test_limit_indices_are_floor_of_i_n_over_limit():
    assert fid._subset(10, 4).tolist() == [0, 2, 5, 7]  # floor(i * 10 / 4)
    idx = fid._subset(50_000, 30_000)  # FID-30K of a 50K batch reaches the end of the batch
    assert len(np.unique(idx)) == 30_000 and idx[-1] == 49_998


def test_folder_cache_follows_the_limit(tmp_path):
    net = TinyNet()
    write_folder(tmp_path / "ref", make_images(8))
    cache = tmp_path / "run" / "ref_stats.npz"
    assert fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=cache, progress=False)["n"] == 8
    with pytest.warns(UserWarning, match="recomputing"):
        fewer = fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=cache, limit=4, progress=False)
    assert fewer["n"] == 4


def test_evaluate_precision_is_of_the_samples_and_recall_of_the_reference():
    """precision: share of samples on the reference manifold; recall: share of references on the
    sample manifold. Half of the samples are darkened off the reference manifold."""
    net = TinyNet()
    samples, reference = make_images(20, seed=1), make_images(25, seed=2)
    samples[:10] //= 2
    s_pool = fid.extract_features(samples, net, progress=False)["pool"].astype(np.float64)
    r_pool = fid.extract_features(reference, net, progress=False)["pool"].astype(np.float64)
    expected = brute_force_precision_recall(r_pool, s_pool, 3)
    assert expected == pytest.approx((0.4, 0.92))  # unequal, so a swap shows
    result = fid.evaluate(samples, reference, net, metrics=("pr",), progress=False)
    assert (result["precision"], result["recall"]) == pytest.approx(expected)


def test_evaluate_fid_and_sfid_are_the_frechet_distances_of_the_pool_and_spatial_features():
    """FID compares the samples' pool features with the reference's, sFID their spatial features: each the Frechet
    distance of the two sets' (mean, covariance), nonzero for different sets."""
    net = TinyNet()
    samples, reference = make_images(20, seed=1), make_images(25, seed=2)
    samples[:10] //= 2
    s, r = (fid.extract_features(x, net, progress=False) for x in (samples, reference))
    result = fid.evaluate(samples, reference, net, metrics=("fid", "sfid"), progress=False)
    for metric, key in (("fid", "pool"), ("sfid", "spatial")):
        expected = fid.frechet_distance(*fid.feature_statistics(s[key]), *fid.feature_statistics(r[key]))
        assert expected > 1e-3 and result[metric] == pytest.approx(expected, rel=1e-9), metric


def test_a_mixed_size_batch_gives_each_image_the_features_it_gets_alone(tmp_path):
    """Images of different sizes share a batch by being resized to 299x299 first; the network would resize each
    the same way, so every image's features are those of the image on its own (to the clamp's 1e-7)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(13)
    for i, (h, w) in enumerate(((20, 31), (64, 48), (299, 299))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    net = randomize_(fid.FIDInceptionV3())
    together = fid.extract_features(folder, net, keys=("pool", "spatial"), batch_size=3, progress=False)
    alone = fid.extract_features(folder, net, keys=("pool", "spatial"), batch_size=1, progress=False)
    for key in ("pool", "spatial"):
        np.testing.assert_allclose(together[key], alone[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_bad_inputs_give_clear_errors(tmp_path):
    net = TinyNet()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        fid.extract_features(tmp_path / "empty", net)
    with pytest.raises(ValueError, match="no such file"):
        fid.extract_features(tmp_path / "missing.npz", net)
    np.savez(tmp_path / "wrong.npz", images=make_images(2))
    with pytest.raises(ValueError, match="arr_0"):
        fid.extract_features(tmp_path / "wrong.npz", net)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        fid.extract_features(torch.rand(4, 3, 8, 8) * 2 - 1, net)
    with pytest.raises(ValueError, match="RGB"):
        fid.extract_features(np.zeros((2, 8, 8, 4), np.uint8), net)
    with pytest.raises(ValueError, match="unknown metrics"):
        fid.evaluate(make_images(), make_images(), net, metrics=("kid",))


def test_statistics_round_trip_and_stats_only_files_refuse_is_and_pr(tmp_path):
    net = TinyNet()
    stats = fid.compute_statistics(make_images(9), net, keep=("pool",), progress=False)
    assert stats["mu"].dtype == np.float64 and stats["n"] == 9 and stats["pool"].shape == (9, 6)
    fid.save_statistics(tmp_path / "s.npz", stats)
    back = fid.read_statistics(tmp_path / "s.npz")
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(back[key], stats[key])
    np.savez(tmp_path / "mu_only.npz", mu=stats["mu"], sigma=stats["sigma"])  # pytorch-fid's format
    assert fid.evaluate(make_images(9), tmp_path / "mu_only.npz", net, progress=False)["fid"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="statistics only"):
        fid.evaluate(make_images(9), tmp_path / "mu_only.npz", net, metrics=("pr",), progress=False)
    with pytest.raises(ValueError, match="mu_s"):
        fid.evaluate(make_images(9), tmp_path / "mu_only.npz", net, metrics=("sfid",), progress=False)
    with pytest.raises(ValueError, match="statistics only"):
        fid.evaluate(tmp_path / "mu_only.npz", make_images(9), net, metrics=("is",), progress=False)


def test_adm_reference_batch_uses_stored_statistics_and_its_images_for_pr(tmp_path):
    net, images = TinyNet(), make_images(12)
    stored_mu = np.full(6, 0.5)  # e.g. full-train-set statistics, unlike the 12 images in arr_0
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=stored_mu, sigma=np.eye(6), mu_s=np.zeros(12), sigma_s=np.eye(12))
    ref = fid.load_or_compute_stats(tmp_path / "ref.npz", net, keep=("pool",), progress=False)
    np.testing.assert_array_equal(ref["mu"], stored_mu)
    np.testing.assert_allclose(ref["pool"], fid.extract_features(images, net, progress=False)["pool"])


def test_reference_statistics_are_cached_and_reused(tmp_path):
    net = TinyNet()
    write_folder(tmp_path / "ref", make_images(8))
    first = fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=tmp_path / "run" / "ref_stats.npz", progress=False)
    calls = net.calls
    second = fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=tmp_path / "run" / "ref_stats.npz", progress=False)
    assert net.calls == calls  # read from the cache, no forward pass
    np.testing.assert_array_equal(first["sigma"], second["sigma"])
    with pytest.warns(UserWarning, match="recomputing"):  # asking for pool features not in the cache
        third = fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=tmp_path / "run" / "ref_stats.npz",
                                          keep=("pool",), progress=False)
    assert net.calls > calls and third["pool"].shape == (8, 6)
    # an array source (train.py's default reference is its Dataset): the cache follows the limit too
    array_cache = tmp_path / "run" / "array_stats.npz"
    assert fid.load_or_compute_stats(make_images(8), net, cache_path=array_cache, progress=False)["n"] == 8
    with pytest.warns(UserWarning, match="recomputing"):
        assert fid.load_or_compute_stats(make_images(8), net, cache_path=array_cache, limit=4, progress=False)["n"] == 4


def test_reference_cache_is_recomputed_when_the_folder_gains_images(tmp_path):
    net = TinyNet()
    write_folder(tmp_path / "ref", make_images(6))
    assert fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=tmp_path / "c.npz", progress=False)["n"] == 6
    write_folder(tmp_path / "ref2", make_images(4, seed=1))
    for f in (tmp_path / "ref2").rglob("*.png"):  # same path, more images: the cached 6-image statistics are stale
        f.rename(tmp_path / "ref" / f.parent.name / f"new_{f.name}")
    with pytest.warns(UserWarning, match=r"\(6 images, [0-9a-f]{16}; .*\(10 images, [0-9a-f]{16}\).*recomputing"):
        assert fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=tmp_path / "c.npz", progress=False)["n"] == 10
    shutil.rmtree(tmp_path / "ref")  # a reference gone from the disk (a cleaned scratch folder): its cache still serves
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fid.load_or_compute_stats(tmp_path / "ref", net, cache_path=tmp_path / "c.npz", progress=False)["n"] == 10


def test_reference_cache_follows_the_images_not_only_their_count_or_size(tmp_path):
    # the cache once checked a folder's image count, a file's byte size, an array's length: new images of the same
    # count or a statistics file made again from other data (the same size) read the old statistics back
    net, cache = TinyNet(), tmp_path / "c.npz"

    def stats(source, **kwargs):
        return fid.load_or_compute_stats(source, net, cache_path=cache, progress=False, **kwargs)

    write_folder(tmp_path / "ref", make_images(6))
    first = stats(tmp_path / "ref")
    calls = net.calls
    assert stats(tmp_path / "ref")["n"] == 6 and net.calls == calls  # unchanged: read back
    write_folder(tmp_path / "ref", np.full((6, 16, 16, 3), 7, np.uint8))  # the same names, other images
    with pytest.warns(UserWarning, match="recomputing"):
        assert not np.allclose(stats(tmp_path / "ref")["mu"], first["mu"])
    for i, images in enumerate((make_images(6), make_images(6, seed=1))):  # same shape: an .npz of the same size
        np.savez(tmp_path / "ref.npz", arr_0=images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "recomputing"
            np.testing.assert_allclose(stats(tmp_path / "ref.npz")["mu"],
                                       fid.compute_statistics(images, net, progress=False)["mu"], rtol=1e-6)
        fid.save_statistics(tmp_path / f"s{i}.npz", fid.compute_statistics(images, net, progress=False))
    for i in (0, 1):  # statistics files made from other images, with the same size, under one name
        shutil.copy(tmp_path / f"s{i}.npz", tmp_path / "stats.npz")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = stats(tmp_path / "stats.npz")["mu"]
        np.testing.assert_array_equal(got, fid.read_statistics(tmp_path / f"s{i}.npz")["mu"])
    array = make_images(6, seed=2)
    with pytest.warns(UserWarning, match="recomputing"):  # after the statistics file
        stats(array)
    with pytest.warns(UserWarning, match="recomputing"):  # an array of the same length, other images
        stats(make_images(6, seed=3))
    with pytest.raises(ValueError, match="images of a TensorDataset cannot be checked against the cache .*pass key"):
        stats(torch.utils.data.TensorDataset(torch.from_numpy(array)))
    with pytest.warns(UserWarning, match="recomputing"):
        assert stats(torch.utils.data.TensorDataset(torch.from_numpy(array)), key="mine")["n"] == 6


def test_a_damaged_npz_is_named_in_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    np.savez_compressed(tmp_path / "samples.npz", arr_0=make_images(10, seed=1))
    fid.save_statistics(tmp_path / "ref.npz", fid.compute_statistics(make_images(12), TinyNet(), progress=False))
    for name in ("samples.npz", "ref.npz"):
        raw = bytearray((tmp_path / name).read_bytes())
        raw[200] ^= 0xFF  # inside the first member's data: its CRC-32 (or its inflate) fails
        (tmp_path / f"bad_{name}").write_bytes(bytes(raw))
    for samples, reference in (("bad_samples.npz", "ref.npz"), ("samples.npz", "bad_ref.npz")):
        with pytest.raises(SystemExit):
            fid.main([str(tmp_path / samples), str(tmp_path / reference)])
        bad = samples if samples.startswith("bad") else reference
        assert re.search(rf"fid.py: error: .*{bad} is damaged \((BadZipFile|error)", capsys.readouterr().err)


def test_zero_logits_saved_by_weights_without_a_classifier_give_no_inception_score(tmp_path, monkeypatch, capsys):
    # fid.py S --save-stats --metrics is with the zeroed-fc weights kept zero logits, and scoring them later with
    # weights that have a classifier read IS 1.0000
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet(fc_scale=0.0))
    samples = write_folder(tmp_path / "samples", make_images(10, seed=1))
    with pytest.raises(SystemExit):
        fid.main([str(samples), "--save-stats", str(tmp_path / "s.npz"), "--metrics", "fid,is"])
    assert "cannot give an Inception Score" in capsys.readouterr().err and not (tmp_path / "s.npz").exists()
    zero = fid.compute_statistics(make_images(10, seed=1), TinyNet(fc_scale=0.0), keep=("logits",), progress=False)
    reference = fid.compute_statistics(make_images(12), TinyNet(), progress=False)
    with pytest.raises(ValueError, match="logits are all zero.*cannot give an Inception Score"):
        fid.evaluate(zero, reference, TinyNet(), metrics=("fid", "is"))


def test_features_are_fp32_inside_a_callers_autocast_region():
    images = make_images(5)
    plain = fid.extract_features(images, TinyNet(), keys=("logits",), progress=False)["logits"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the logits matmul would run in bf16
        inside = fid.extract_features(images, TinyNet(), keys=("logits",), progress=False)["logits"]
    np.testing.assert_array_equal(inside, plain)


def test_is_is_refused_when_the_classifier_weights_are_zero():
    net = TinyNet(fc_scale=0.0)  # IS would be exactly 1 for any samples: refused before any feature is computed
    with pytest.raises(ValueError, match="all zeros.*cannot give an Inception Score"):
        fid.evaluate(make_images(), make_images(seed=1), net, metrics=("fid", "is"), progress=False)
    assert net.calls == 0


def test_cli_refuses_is_before_featurising_the_samples(tmp_path, monkeypatch, capsys):
    # fid.py SAMPLES REF --metrics fid,is once ran the Inception over every sample before evaluate() refused IS
    net = TinyNet(fc_scale=0.0)
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": net)
    samples = write_folder(tmp_path / "samples", make_images(10, seed=1))
    reference = write_folder(tmp_path / "reference", make_images(12, seed=2))
    with pytest.raises(SystemExit):
        fid.main([str(samples), str(reference), "--metrics", "fid,is"])
    assert "cannot give an Inception Score" in capsys.readouterr().err and net.calls == 0


def test_cli_saved_sample_statistics_keep_the_logits_for_a_later_inception_score(tmp_path, monkeypatch, capsys):
    # fid.py SAMPLES --save-stats S --metrics is once kept no logits, so scoring S later refused IS
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    samples = write_folder(tmp_path / "samples", make_images(10, seed=1))
    reference = write_folder(tmp_path / "reference", make_images(12, seed=2))
    fid.main([str(samples), "--save-stats", str(tmp_path / "s.npz"), "--metrics", "fid,is"])
    assert fid.read_statistics(tmp_path / "s.npz")["logits"].shape[0] == 10
    from_images = fid.main([str(samples), str(reference), "--metrics", "fid,is", "--json"])
    from_stats = fid.main([str(tmp_path / "s.npz"), str(reference), "--metrics", "fid,is", "--json"])
    for key in ("fid", "is"):
        assert from_stats[key] == pytest.approx(from_images[key], rel=1e-6)


def test_cli_save_stats_round_trip(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    samples = write_folder(tmp_path / "samples", make_images(10, seed=1))
    reference = write_folder(tmp_path / "reference", make_images(12, seed=2))
    fid.main([str(reference), "--save-stats", str(tmp_path / "ref.npz"), "--metrics", "pr"])
    saved = fid.read_statistics(tmp_path / "ref.npz")
    direct = fid.compute_statistics(reference, TinyNet(), keep=("pool",), progress=False)
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_allclose(saved[key], direct[key], rtol=1e-6)
    capsys.readouterr()
    from_images = fid.main([str(samples), str(reference), "--metrics", "fid,sfid,pr", "--json"])
    from_stats = fid.main([str(samples), str(tmp_path / "ref.npz"), "--metrics", "fid,sfid,pr", "--json"])
    printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == [from_images, from_stats]
    for key in ("fid", "sfid", "precision", "recall"):
        assert from_stats[key] == pytest.approx(from_images[key], rel=1e-6)
    fid.main([str(samples), str(tmp_path / "ref.npz")])
    assert capsys.readouterr().out.strip().splitlines() == [f"FID: {from_stats['fid']:.4f}", "images: 10 samples, 12 reference"]
    fid.main([str(samples), str(reference), "--limit", "11"])  # above the samples' count: all 10 are used, and it says so
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[1:] == ["images: 10 samples, 11 reference"]
    assert err.strip().splitlines()[-1] == "fid.py: note: --limit 11: SAMPLES has 10 images; all of them were used"


def test_a_statistics_cache_cut_short_is_recomputed_and_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    net, cache = TinyNet(), tmp_path / "run" / "ref_stats.npz"
    first = fid.load_or_compute_stats(make_images(8), net, cache_path=cache, progress=False)
    whole = cache.read_bytes()
    for torn in (whole[: len(whole) // 2], b""):  # BadZipFile, EOFError from np.load: tracebacks in train.py
        cache.write_bytes(torn)
        with pytest.warns(UserWarning, match="cannot be read.*recomputing"):
            again = fid.load_or_compute_stats(make_images(8), net, cache_path=cache, progress=False)
        np.testing.assert_array_equal(again["sigma"], first["sigma"])
    real_savez = np.savez

    def disk_full(file, **arrays):
        real_savez(file, **arrays)
        file.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        fid.save_statistics(tmp_path / "out" / "s.npz", first)
    assert list((tmp_path / "out").iterdir()) == []  # no half file for the next run to read or refuse to overwrite
    with pytest.raises(OSError, match="No space"):
        fid.save_statistics(cache, first)
    assert cache.read_bytes() == whole  # the previous statistics are intact


def test_cli_checks_the_reference_kind_before_featurising_the_samples(tmp_path, monkeypatch, capsys):
    # a reference that exists but holds no images was refused only after every sample's features
    net = TinyNet()
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": net)
    samples = write_folder(tmp_path / "samples", make_images(4))
    (tmp_path / "ref.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "mu.npz", mu=np.zeros(6))
    for ref, says in (("ref.txt", "neither a folder nor a .zip"), ("empty", "no images"), ("mu.npz", "has no arr_0")):
        with pytest.raises(SystemExit):
            fid.main([str(samples), str(tmp_path / ref)])
        assert says in capsys.readouterr().err and net.calls == 0, ref


def test_cli_refuses_negative_workers_and_empty_paths_by_their_flags(tmp_path, capsys):
    # --num-workers -1 ended in the DataLoader's "use num_workers=0"; '' (the working folder) in "no images found in ."
    images = write_folder(tmp_path / "imgs", make_images(4))
    for argv, says in (([str(images), str(images), "--num-workers", "-1"], "--num-workers -1: must be 0 or more"),
                       (["", str(images)], "no such file or folder: ''"), ([str(images), ""], "no such file or folder: ''")):
        with pytest.raises(SystemExit) as e:
            fid.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err, argv


def test_an_npz_that_is_no_zip_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    with open(tmp_path / "samples.npz", "wb") as f:
        np.save(f, make_images(4))  # an .npy under an .npz name: a TypeError traceback from `with np.load(...)`
    (tmp_path / "text.npz").write_text("not numpy at all")  # refused as "pickled data"
    reference = write_folder(tmp_path / "reference", make_images(4, seed=1))
    for bad in ("samples.npz", "text.npz"):
        with pytest.raises(SystemExit):
            fid.main([str(tmp_path / bad), str(reference)])
        assert "is not an .npz" in capsys.readouterr().err
    assert not fid.is_statistics_file(tmp_path / "samples.npz")


def test_cli_checks_the_reference_before_featurising_the_samples(tmp_path, monkeypatch, capsys):
    net = TinyNet()
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": net)
    samples = write_folder(tmp_path / "samples", make_images(10, seed=1))
    stats = fid.compute_statistics(make_images(9), TinyNet(), progress=False)
    np.savez(tmp_path / "mu_only.npz", mu=stats["mu"], sigma=stats["sigma"])  # pytorch-fid's format: no mu_s, no pool
    for reference, metrics, message in ((tmp_path / "typo", "fid", "no such file"),
                                        (tmp_path / "mu_only.npz", "fid,sfid", "mu_s"),
                                        (tmp_path / "mu_only.npz", "pr", "statistics only")):
        with pytest.raises(SystemExit):
            fid.main([str(samples), str(reference), "--metrics", metrics])
        assert message in capsys.readouterr().err and net.calls == 0, reference
    assert fid.main([str(samples), str(tmp_path / "mu_only.npz"), "--json"])["n_reference"] is None


def test_cli_errors_exit_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    with pytest.raises(SystemExit) as exit_info:
        fid.main([str(tmp_path / "missing"), str(tmp_path / "also_missing")])
    assert exit_info.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path)])  # neither REFERENCE nor --save-stats
    assert "--save-stats" in capsys.readouterr().err


def _fid_run(folder, fids, n=2500, resumed_at=None):
    """A run folder whose metrics.jsonl has log records, a start event and {step: fid} records; a
    resumed run re-scores `resumed_at` with a value 1 lower."""
    folder.mkdir()
    lines = [{"event": "start", "step": 0, "args": {"method": folder.name}}]
    for step, value in fids.items():
        lines += [{"step": step, "loss": 0.1}, {"step": step, "fid": value, "fid_samples": n}]
    if resumed_at is not None:
        lines += [{"event": "start", "step": resumed_at}, {"step": resumed_at, "fid": fids[resumed_at] - 1, "fid_samples": n}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_fid_curves_table_and_plot(tmp_path, capsys):
    a = _fid_run(tmp_path / "vanilla", {1000: 90.0, 2000: 60.0, 3000: 50.0}, resumed_at=2000)
    b = _fid_run(tmp_path / "dtr", {1000: 80.0, 2000: 65.0})
    out = tmp_path / "fid.png"
    curves = fid.main(["curves", str(a), str(b / "metrics.jsonl"), "--out", str(out)])
    assert curves["vanilla"] == {1000: (90.0, 2500), 2000: (59.0, 2500), 3000: (50.0, 2500)}  # the re-scored step
    table = capsys.readouterr().out.splitlines()
    assert table[:5] == ["| step | vanilla | dtr |", "|---:|---:|---:|",
                         "| 1000 | 90.00 | **80.00** |", "| 2000 | **59.00** | 65.00 |", "| 3000 | 50.00 | - |"]
    assert "2500 EMA samples" in table[6] and "differ" not in table[6]
    img = Image.open(out)
    assert img.size == (900, 520) and len(img.getcolors(1 << 16)) > 3  # axes, grid and two coloured curves
    c = _fid_run(tmp_path / "c", {1000: 70.0}, n=1000)
    assert "differ in sample count" in fid.fid_table({"a": fid.read_fid_curve(a), "c": fid.read_fid_curve(c)})


def test_fid_during_training_survives_a_failed_distance_and_keys_its_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    real, calls = fid.frechet_distance, []

    def fails_once(*stats):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("the covariances are not positive semi-definite, so they are no covariance matrices")
        return real(*stats)

    monkeypatch.setattr(fid, "frechet_distance", fails_once)
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--fid-every", "1", "--fid-samples", "8",
                    "--fid-steps", "ddim2", "--fid-batch-size", "8", "--fid-ref-limit", "16")
    first, second = [r for r in metrics(out) if "fid" in r]
    assert first["fid"] is None and "not positive semi-definite" in first["fid_error"] and np.isfinite(second["fid"])
    assert last_checkpoint(out)["step"] == 2  # the run went on
    assert fid.read_fid_curve(out) == {2: (second["fid"], 8)}  # curves skip the failed evaluation
    assert fid.read_statistics(out / "fid_ref_stats.npz")["source"].endswith("shapes|16px|seed 0")  # the cache names its data


def test_grids_and_fid_sample_the_ema_with_their_flags_and_the_last_step_gets_both(tmp_path, monkeypatch):
    # --max-steps 3, every 2: grid, FID, record and checkpoint at step 2 and at the last step 3. Each grid and FID
    # draws from the EMA of that step's checkpoint (not the raw weights) with its own sampler, guidance and seed.
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    calls, real_generate, real_indices = [], train.generate, train.sample_indices

    def weights(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def generate(model, diffusion, labels, noise, **kw):
        assert torch.equal(labels, torch.arange(16) % NUM_CLASSES)  # every class in the grid
        calls.append(("grid", weights(model), kw))
        return real_generate(model, diffusion, labels, noise, **kw)

    def sample_indices(model, diffusion, indices, device, **kw):
        calls.append(("fid", weights(model), kw))
        return real_indices(model, diffusion, indices, device, **kw)

    monkeypatch.setattr(train, "generate", generate)
    monkeypatch.setattr(train, "sample_indices", sample_indices)
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "3", "--lr", "1e-2", "--ema-decay", "0.5",
                    "--global-seed", "3", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "2", "--sample-steps",
                    "ddim2", "--sample-cfg", "2", "--fid-every", "2", "--fid-samples", "4", "--fid-steps", "ddim3",
                    "--fid-cfg", "1.5", "--fid-batch-size", "4", "--fid-ref-limit", "8")
    assert [p.name for p in checkpoints(out)] == ["0000002.pt", "0000003.pt"]
    assert sorted(p.name for p in out.glob("samples_*.png")) == ["samples_0000002.png", "samples_0000003.png"]
    assert [r["step"] for r in metrics(out) if "fid" in r] == [2, 3]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [2, 3]
    assert [kind for kind, *_ in calls] == ["grid", "fid", "fid", "grid"]  # step 2's; step 3's FID, then the end's grid
    for (kind, used, kw), ckpt in zip(calls, [checkpoints(out)[i] for i in (0, 0, 1, 1)]):
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert deep_equal(used, ckpt["ema"]) == [] and deep_equal(used, ckpt["model"]) != [], kind
        if kind == "grid":
            assert (kw["steps"], kw["cfg_scale"]) == ("ddim2", 2.0)
        else:  # the same samples at every evaluation: seed global_seed + 1
            assert (kw["steps"], kw["cfg_scale"], kw["seed"]) == ("ddim3", 1.5, 4)


def test_fid_steps_reads_on_past_a_torn_line(tmp_path):
    # a record cut short (disk full) must not hide the FID records after it from the resume's catch-up
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "fid": 5.0, "fid_samples": 4}\n{"step": 3, "lo\n{"step": 4, "loss": 1.0}\n'
                    '{"step": 6, "fid": null, "fid_error": "not PSD"}\n["step", "fid"]\n{"step": 8, "fid": 4.0}\n')
    assert train.fid_steps(str(path)) == {2, 6, 8} and train.fid_steps(str(tmp_path / "none.jsonl")) == set()


def test_a_grid_that_cannot_be_written_is_logged_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def disk_full(images, path, nrow=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "save_grid", disk_full)  # was a traceback, the steps since the checkpoint lost
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--sample-every", "1", "--sample-steps", "2")
    assert "warning: cannot write the sample grid" in capsys.readouterr().out and last_checkpoint(out)["step"] == 2


def test_a_run_killed_after_its_checkpoint_makes_that_steps_grid_and_fid_on_resume(tmp_path, monkeypatch):
    # killed between the step-2 checkpoint and its grid (a time limit's SIGKILL), the resumed run started at step 2
    # and never made that grid or FID: a gap in the FID curve
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        raise Killed

    flags = ["--global-batch-size", "4", "--max-steps", "4", "--fid-every", "2", "--fid-samples", "4", "--fid-steps",
             "ddim2", "--fid-batch-size", "4", "--fid-ref-limit", "8", "--sample-every", "2", "--sample-steps", "ddim2", "--ckpt-every", "2"]
    with monkeypatch.context() as m:
        m.setattr(train, "generate", killed)
        with pytest.raises(Killed):
            run_train(tmp_path, *flags)
    out = tmp_path / "run"
    assert last_checkpoint(out)["step"] == 2 and not (out / "samples_0000002.png").exists()
    run_train(tmp_path, *flags, "--resume", "auto")
    assert [r["step"] for r in metrics(out) if "fid" in r] == [2, 4]
    assert (out / "samples_0000002.png").exists() and (out / "samples_0000004.png").exists()
    assert "resume: making step 2's grid and FID, which the run stopped before" in (out / "log.txt").read_text()
    run_train(tmp_path, *flags, "--resume", "auto")  # finished: nothing is missing, nothing made again
    assert [r["step"] for r in metrics(out) if "fid" in r] == [2, 4]


def test_fid_reference_cache_of_the_shapes_follows_the_seed_of_a_resumed_run(tmp_path, monkeypatch):
    # the built-in shapes are drawn from --global-seed: resumed with another seed, the cache of the old images was reused
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    flags = ["--global-batch-size", "4", "--fid-every", "1", "--fid-samples", "4", "--fid-steps", "ddim2",
             "--fid-batch-size", "4", "--fid-ref-limit", "8"]
    out = run_train(tmp_path, *flags, "--max-steps", "1")
    with pytest.warns(UserWarning, match="recomputing"):
        run_train(tmp_path, *flags, "--max-steps", "2", "--resume", "auto", "--global-seed", "5")
    expected = fid.compute_statistics(datasets.ShapesDataset(16, 10000, seed=5), TinyNet(), limit=8, progress=False)
    np.testing.assert_allclose(fid.read_statistics(out / "fid_ref_stats.npz")["mu"], expected["mu"], rtol=1e-6)


def test_fid_curves_plot_runs_scored_only_at_step_0(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "fid": 300.0, "fid_samples": 100}\n')
    fid.main(["curves", str(run), "--out", str(tmp_path / "c.png")])  # once: a zero-width step axis divided by zero
    assert "| 0 | 300.00 |" in capsys.readouterr().out and (tmp_path / "c.png").is_file()


def test_fid_curves_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.1}) + "\n")
    for argv, message in ((["curves", str(empty)], "--fid-every"),
                          (["curves", str(tmp_path / "nowhere")], "no metrics.jsonl"),
                          (["curves", str(empty), str(empty)], "distinct labels"),
                          (["curves", str(empty), "--labels", "a,b"], "names 2 runs")):
        with pytest.raises(SystemExit) as exit_info:
            fid.main(argv + ["--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ==============================================================================================
#                        The papers' methods inside the DiT and train.py
# ==============================================================================================

def _random_dit(router=None, **kw):
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=16, in_channels=3, num_classes=4, depth=2, hidden_size=64, num_heads=2,
                                  router=router, **kw)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_dtr_beta_one_equals_vanilla_bit_for_bit():
    vanilla, dtr = _random_dit(), _random_dit(TaskRouter(64, beta=1.0, num_blocks=2))
    dtr.load_state_dict(vanilla.state_dict(), strict=True)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 400, 999]), torch.tensor([0, 1, 2])
    assert torch.equal(vanilla(x, t, y), dtr(x, t, y))


def test_dtr_adds_no_parameters_and_loads_a_vanilla_state_dict_strictly():
    vanilla, dtr = _random_dit(), _random_dit(TaskRouter(64, num_blocks=2))
    assert sum(p.numel() for p in dtr.parameters()) == sum(p.numel() for p in vanilla.parameters())
    assert list(dtr.state_dict()) == list(vanilla.state_dict())
    dtr.load_state_dict(vanilla.state_dict(), strict=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([0, 1])
    assert not torch.allclose(dtr(x, t, y), vanilla(x, t, y))


def test_dtr_model_matches_hand_written_official_two_block_formula():
    model = _random_dit(TaskRouter(64, alpha=4.0, beta=0.8, num_blocks=2))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([7, 950]), torch.tensor([3, 0])
    m = routing_masks(1000, 64, 4.0, 0.8)[t][:, None, :]  # (N, 1, C)
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for blk in model.blocks:  # official: r = m*x; r += attn; r += mlp; out = r + (1 - m) * x
        sm, cm, gm, sp, cp, gp = blk.adaLN_modulation(c).chunk(6, dim=1)
        r = m * h
        r = r + gm[:, None] * blk.attn(blk.norm1(r) * (1 + cm[:, None]) + sm[:, None])
        r = r + gp[:, None] * blk.mlp(blk.norm2(r) * (1 + cp[:, None]) + sp[:, None])
        h = r + (1 - m) * h
    ref = model.unpatchify(model.final_layer(h, c))
    torch.testing.assert_close(model(x, t, y), ref, atol=1e-6, rtol=1e-5)


def test_dtr_mask_at_a_respaced_step_is_the_original_timesteps_row():
    router = TaskRouter(64, num_blocks=2)
    seen = []
    original_forward = router.forward
    router.forward = lambda t: (seen.append(t.clone()), original_forward(t))[1]
    model = _random_dit(router)
    d = gd.Diffusion()
    d.sample(lambda x, t: model(x, t, torch.zeros(len(x), dtype=torch.long)), torch.randn(1, 3, 16, 16), steps="ddim4")
    expected = d.respace("ddim4").timestep_map[::-1].tolist()
    assert [int(s[0]) for s in seen] == expected and expected[0] > 3  # original t, not the respaced index


def test_method_parsing_accepts_combinations_and_rejects_meaningless_ones():
    assert train.parse_method("ant-uw+dtr") == "dtr+ant-uw"
    assert train.parse_method("curriculum+ant-uw+dtr") == "dtr+ant-uw+curriculum"
    for bad, why in [("dtr+rtr", "pick one"), ("ant-uw+ant-nash", "pick one"), ("vanilla+dtr", "cannot be combined"),
                     ("curriculum+ant-pcgrad", "ant-uw only"), ("dtr+dtr", "repeats")]:
        with pytest.raises(train.ConfigError, match=why):
            train.parse_method(bad)



def test_default_out_folder_uses_the_canonical_method_spelling(tmp_path, monkeypatch):
    # curriculum+dtr and dtr+curriculum are one method: one default folder, so --resume auto finds the run either way
    monkeypatch.chdir(tmp_path)
    for spelling in ("curriculum+dtr", "dtr+curriculum"):
        train.main(TINY + ["--method", spelling, "--global-batch-size", "4", "--max-steps", "1", "--resume", "auto"])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["DiT-S-4-dtr_curriculum"]
    assert last_checkpoint(tmp_path / "results" / "DiT-S-4-dtr_curriculum")["step"] == 1

METHODS = ["dtr", "rtr", "ant-uw", "ant-pcgrad", "ant-nash", "curriculum", "dtr+ant-uw", "curriculum+ant-uw"]
METHOD_FLAGS = ["--nash-every", "2", "--curriculum-pacing", "fixed", "--curriculum-stage-steps", "2",
                "--curriculum-clusters", "5"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_resumes_bitwise(tmp_path, method):
    common = ["--method", method, "--global-batch-size", "10", *METHOD_FLAGS]
    straight = run_train(tmp_path, *common, "--max-steps", "6", "--ckpt-every", "3", name="straight")
    run_train(tmp_path, *common, "--max-steps", "3", name="split")
    resumed = run_train(tmp_path, *common, "--max-steps", "6", "--ckpt-every", "3", "--resume", "auto", name="split")
    a, b = last_checkpoint(straight), last_checkpoint(resumed)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"{method}: {name} differs after resume"
    assert deep_equal(a["method"], b["method"]) == [] and deep_equal(a["ema"], b["ema"]) == []
    assert a["args"]["method"] == train.parse_method(method)


def test_ant_logs_per_cluster_losses_and_weights(tmp_path):
    out = run_train(tmp_path, "--method", "ant-uw", "--global-batch-size", "10", "--max-steps", "2", "--uw-lr", "0.5")
    rec = metrics(out)[-1]
    assert {f"ant/L{k}" for k in range(5)} <= set(rec) and {f"ant/w{k}" for k in range(5)} <= set(rec)
    s = last_checkpoint(out)["method"]["uw"]["log_vars"]
    assert s.shape == (5,) and torch.count_nonzero(s) == 5  # the log variances trained
    assert last_checkpoint(out)["opt"]["param_groups"][1]["lr"] == 0.5


def test_curriculum_stages_follow_the_fixed_schedule_in_training(tmp_path):
    out = run_train(tmp_path, "--method", "curriculum", "--global-batch-size", "8", "--max-steps", "6",
                    "--curriculum-pacing", "fixed", "--curriculum-stage-steps", "2", "--curriculum-clusters", "4")
    events = [r for r in metrics(out) if r.get("event") == "curriculum_stage"]
    assert [(e["step"], e["stage"], e["t_min"]) for e in events] == [(0, 1, 750), (2, 2, 500), (4, 3, 250), (6, 4, 0)]
    logged = [r for r in metrics(out) if "curriculum/t_min" in r]  # a record per step (--log-every 1)
    assert [r["curriculum/t_min"] for r in logged] == [750, 750, 500, 500, 250, 250]
    for r in logged:  # loss per timestep bucket [100 b, 100 b + 100): only buckets that meet the stage's range appear
        buckets = [int(k[len("loss_t"):]) for k in r if k.startswith("loss_t")]
        assert buckets and min(buckets) >= r["curriculum/t_min"] // 100, r


def test_a_resumed_curriculum_run_records_each_stage_once(tmp_path):
    # the stage-1 record of step 0 is the fresh start's: a resume at step 3 (stage 2) wrote a second "step 0" record
    flags = ["--method", "curriculum", "--global-batch-size", "8", "--curriculum-pacing", "fixed",
             "--curriculum-stage-steps", "2", "--curriculum-clusters", "4"]
    out = run_train(tmp_path, *flags, "--max-steps", "3")
    run_train(tmp_path, *flags, "--max-steps", "6", "--resume", "auto")
    events = [(e["step"], e["stage"], e["t_min"]) for e in metrics(out) if e.get("event") == "curriculum_stage"]
    assert events == [(0, 1, 750), (2, 2, 500), (4, 3, 250), (6, 4, 0)]  # as in the uninterrupted run above


def test_a_resume_with_another_loss_weighting_restarts_the_adaptive_pacers_measurements(tmp_path, capsys):
    # the saved smoothed loss is in the old weighting's scale: judged against min-SNR-weighted losses it would read as a
    # plateau (or a sudden improvement); the stage is kept, its measurements start afresh. The same weighting keeps them.
    flags = ["--method", "curriculum", "--global-batch-size", "8", "--curriculum-clusters", "4",
             "--curriculum-patience", "100"]
    min_snr = ["--weighting", "min-snr"]
    for name, first, then, updates in (("same", [], [], 4), ("other", [], min_snr, 1),
                                       ("gamma", min_snr, min_snr + ["--min-snr-gamma", "1"], 1)):
        out = run_train(tmp_path, *flags, *first, "--max-steps", "3", name=name)
        capsys.readouterr()
        run_train(tmp_path, *flags, *then, "--max-steps", "4", "--resume", "auto", name=name)
        state = last_checkpoint(out)["method"]["curriculum"]
        assert (state["stage"], state["stage_updates"]) == (1, updates), name
        said = "resume: the loss weighting changed, so the curriculum forgets stage 1's smoothed loss"
        assert (said in capsys.readouterr().out) == (name != "same"), name


def test_a_step_skipped_as_non_finite_does_not_count_towards_a_curriculum_stage(tmp_path, monkeypatch):
    # the pacer sees only the steps that trained: step 2 is skipped, so stage 1's two steps are 1 and 3, not 1 and 2
    poison_losses(monkeypatch, {2})
    out = run_train(tmp_path, "--method", "curriculum", "--global-batch-size", "8", "--max-steps", "5",
                    "--skip-nonfinite", "1", "--curriculum-pacing", "fixed", "--curriculum-stage-steps", "2",
                    "--curriculum-clusters", "4")
    events = [(r["step"], r["stage"]) for r in metrics(out) if r.get("event") == "curriculum_stage"]
    assert events == [(0, 1), (3, 2), (5, 3)]


@pytest.mark.parametrize("method", ["vanilla", "curriculum"])
def test_step_flags_are_read_through_an_event_one_step_late_except_under_the_curriculum(tmp_path, monkeypatch, method):
    # On a GPU, flags.tolist() would wait for all the work queued so far: read after step s + 1 is queued, it would
    # wait for step s + 1 too, and the lag would keep nothing fed. train.py copies each step's flags to the host as the
    # step ends (copy_to_host) and waits on that copy's event alone. The fake copy here stands for the CUDA path.
    order = []
    real_step = train.train_step

    def spy_step(run, x, y, step):
        order.append(("queue", step + 1))
        return real_step(run, x, y, step)

    class Event:
        def __init__(self, step):
            self.step = step

        def synchronize(self):
            order.append(("wait", self.step))

    def fake_copy(x):
        return x.clone(), Event(sum(kind == "queue" for kind, _ in order))

    monkeypatch.setattr(train, "train_step", spy_step)
    monkeypatch.setattr(train, "copy_to_host", fake_copy)
    run_train(tmp_path, "--method", method, "--global-batch-size", "4", "--max-steps", "5", "--log-every", "100",
              "--ckpt-every", "100")
    q, w = "queue", "wait"
    if method == "vanilla":  # step s is waited for once step s + 1 is queued; the last at the end, which logs
        expected = [(q, 1), (q, 2), (w, 1), (q, 3), (w, 2), (q, 4), (w, 3), (q, 5), (w, 4), (w, 5)]
    else:  # the pacing decision of step s applies from step s + 1
        expected = [(q, 1), (w, 1), (q, 2), (w, 2), (q, 3), (w, 3), (q, 4), (w, 4), (q, 5), (w, 5)]
    assert order == expected


def test_a_curriculum_stage_change_applies_from_the_next_step_whatever_the_log_interval(tmp_path, monkeypatch):
    # the pacing decision of step s is read at once (not one step late like the other flags), so step s + 1 draws
    # from the new stage with a record every 100 steps as with one every step (TINY): the run does not depend on it
    real_step, ranges = train.train_step, []

    def spy(run, x, y, step):
        ranges.append(run.method.curriculum.active_range)
        return real_step(run, x, y, step)

    monkeypatch.setattr(train, "train_step", spy)
    run_train(tmp_path, "--method", "curriculum", "--global-batch-size", "8", "--max-steps", "5", "--curriculum-pacing",
              "fixed", "--curriculum-stage-steps", "2", "--curriculum-clusters", "4", "--log-every", "100",
              "--ckpt-every", "100")
    assert ranges == [(750, 1000), (750, 1000), (500, 1000), (500, 1000), (250, 1000)]


def test_curriculum_smoothing_flag_reaches_the_pacer():
    args = train.parse_args([*TINY, "--method", "curriculum", "--curriculum-smoothing", "0.9"])
    method = train.Method(args, sample.build_diffusion(vars(args)), torch.device("cpu"))
    assert method.curriculum.smoothing == 0.9 and method.curriculum.warmup == 10  # one EMA time constant


@pytest.mark.parametrize("method", ["ant-pcgrad", "ant-nash", "dtr+curriculum", "ant-uw", "curriculum+ant-uw"])
@retry_rank_abort
def test_two_process_methods_keep_replicas_and_decisions_identical(tmp_path, method):
    r = torchrun("train.py", *TINY, "--method", method, "--global-batch-size", "10", "--max-steps", "4", "--ckpt-every", "2",
                 *METHOD_FLAGS, "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("model replicas, EMA and method state identical on 2 ranks") == 2


RECORD_FID_INDICES = """
import json, os, sys
sys.path.insert(0, {repo!r})
import train
real_indices = train.sample_indices
def recording_indices(model, diffusion, indices, *a, **k):
    with open(os.path.join(os.environ["INDEX_DIR"], os.environ["RANK"] + ".json"), "w") as f:
        json.dump(list(indices), f)
    return real_indices(model, diffusion, indices, *a, **k)
train.sample_indices = recording_indices
train.main(sys.argv[1:])
"""


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="shared Inception weights absent")
@retry_rank_abort
def test_two_process_fid_during_training_with_synced_emas(tmp_path):
    # The EMA once started from each rank's own initialisation (DDP syncs only the model), so rank 1
    # sampled its share of the FID images from a different network; the checksum now covers the EMA.
    out = tmp_path / "fid2"
    script = tmp_path / "record.py"
    script.write_text(RECORD_FID_INDICES.format(repo=str(REPO)))
    r = torchrun(str(script), *TINY, "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "2", "--fid-every", "2",
                 "--fid-samples", "6", "--fid-steps", "ddim2", "--fid-batch-size", "3", "--fid-ref-limit", "12",
                 "--inception", str(SHARED_WEIGHTS), "--out", str(out), env={"INDEX_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("model replicas, EMA and method state identical on 2 ranks") == 1
    assert [rec["step"] for rec in metrics(out) if "fid" in rec] == [2]
    # the ranks split the samples: each of the 6 drawn once (every rank drawing rank 0's share passed)
    shares = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(6))


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="shared Inception weights absent")
@retry_rank_abort
def test_two_process_bad_fid_reference_stops_every_rank_at_once(tmp_path):
    # Rank 0 fails on the reference; rank 1 must leave with it, not sit in the 6-hour gloo barrier
    codes, outs = two_processes_by_hand(
        [sys.executable, "train.py", *TINY, "--global-batch-size", "4", "--max-steps", "2", "--fid-every", "2",
         "--fid-ref", str(tmp_path / "missing.npz"), "--inception", str(SHARED_WEIGHTS), "--out", str(tmp_path / "bad")])
    assert codes == [2, 2]
    assert "FID reference" in outs[0][1] and "no such file" in outs[0][1] and "Traceback" not in outs[1][1]


def two_processes_by_hand(cmd, timeout=120):
    """Run cmd as ranks 0 and 1 of a process group launched by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT), not by
    torchrun, whose agent would end a rank left waiting for one that stopped. ([exit codes], [(stdout, stderr)])."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(RANK_ABORT in err for _, err in outs):
        raise RankAbort(str(outs)[-3000:])
    return [p.returncode for p in procs], outs


# ==============================================================================================
#               Inside train.py: EMA, data stream, the ANT seam, flags (independent references)
# ==============================================================================================

NUM_CLASSES = 4  # the built-in shapes data: circle, square, triangle, cross
CPU = torch.device("cpu")


def checkpoints(out):
    return sorted((Path(out) / "checkpoints").glob("*.pt"))


def make_run(*extra, seed=0, perturb=0.0):
    """train.build_run for TINY + extra on the CPU, as train.train does for the shapes data (num_classes
    from the dataset, canonical method spelling). perturb > 0 replaces the zero-initialised weights
    by N(0, perturb^2) so that every parameter gets a gradient (and EMA == model)."""
    args = train.parse_args(TINY + list(extra))
    args.method = train.parse_method(args.method)
    args.num_classes = NUM_CLASSES
    torch.manual_seed(seed)
    run = train.build_run(args, CPU, distributed=False, log=lambda msg: None)
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in run.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * perturb)
            for e, p in zip(run.ema.parameters(), run.model.parameters()):
                e.copy_(p)
    return run


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def snapshot(params):
    return [p.detach().clone() for p in params]


def flat_grads(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])



def test_deep_equal_sees_what_repr_misses():
    s = torch.Generator().manual_seed(0).get_state()
    t = s.clone()
    t[2000] ^= 1  # a byte in the elided middle of the printed tensor
    assert repr({"g": s}) == repr({"g": t})
    assert deep_equal({"g": s, "x": [1.0, {"y": 2}]}, {"g": t, "x": [1.0, {"y": 2}]}) == ["state.g: tensors differ"]
    assert deep_equal({"x": 0.1 + 0.2}, {"x": 0.3}) == ["state.x: 0.30000000000000004 vs 0.3"]
    assert deep_equal({"x": [1, 2]}, {"x": [1, 2]}) == []


# ---------------------------------------------------------------------------------------------- EMA update and the skipped non-finite step in train.train_step

def test_ema_is_decay_times_old_plus_one_minus_decay_times_new_model():
    # decay 0.75 (not 0.5, where decay and 1 - decay coincide), and an EMA moved away from the model
    # so that "lerp towards the model before the step" or "EMA = model" cannot pass either.
    d = 0.75
    run = make_run("--ema-decay", str(d), "--lr", "1e-2", "--global-batch-size", "6")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for e in run.ema.parameters():
            e.add_(torch.randn(e.shape, generator=g) * 0.1)
    ema_before, model_before = snapshot(run.ema.parameters()), snapshot(run.model.parameters())
    x, y = batch(6)
    torch.manual_seed(0)
    _, _, _, bad = train.train_step(run, x, y, 0)
    assert not bool(bad)
    model_after = snapshot(run.model.parameters())
    assert sum((a - b).abs().sum() for a, b in zip(model_after, model_before)) > 0.1  # the model did move
    for e_after, e0, m1 in zip(run.ema.parameters(), ema_before, model_after):
        torch.testing.assert_close(e_after.detach(), d * e0 + (1 - d) * m1, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_leaves_model_and_ema_unchanged(monkeypatch):
    run = make_run("--ema-decay", "0.75", "--lr", "1e-2", "--global-batch-size", "6")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for e in run.ema.parameters():  # EMA != model, so a lerp with a non-zero weight would move it
            e.add_(torch.randn(e.shape, generator=g) * 0.1)
    original = run.diffusion.training_losses

    def poisoned(*a, **k):
        terms = original(*a, **k)
        return {**terms, "loss": terms["loss"] * math.inf}

    monkeypatch.setattr(run.diffusion, "training_losses", poisoned)
    ema_before, model_before = snapshot(run.ema.parameters()), snapshot(run.model.parameters())
    x, y = batch(6)
    torch.manual_seed(0)
    _, _, _, bad = train.train_step(run, x, y, 0)
    assert bool(bad)
    for p, p0 in zip(run.model.parameters(), model_before):
        assert torch.equal(p.detach(), p0)
    for e, e0 in zip(run.ema.parameters(), ema_before):
        assert torch.equal(e.detach(), e0)
    # and the next, finite step trains normally
    monkeypatch.setattr(run.diffusion, "training_losses", original)
    _, _, _, bad = train.train_step(run, x, y, 1)
    assert not bool(bad)
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(run.model.parameters(), model_before))


def test_non_finite_gradient_with_a_finite_loss_is_skipped_too(monkeypatch):
    # The loss can be finite while a gradient is not (an overflow in backward): the step and the EMA are skipped alike
    run = make_run("--ema-decay", "0.75", "--lr", "1e-2", "--global-batch-size", "6")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for e in run.ema.parameters():
            e.add_(torch.randn(e.shape, generator=g) * 0.1)
    original = run.method.backward

    def poisoned(*a, **k):
        loss, extra = original(*a, **k)
        next(p for p in run.params if p.grad is not None).grad.view(-1)[0] = math.nan
        return loss, extra

    monkeypatch.setattr(run.method, "backward", poisoned)
    ema_before, model_before = snapshot(run.ema.parameters()), snapshot(run.model.parameters())
    x, y = batch(6)
    torch.manual_seed(0)
    terms, _, _, bad = train.train_step(run, x, y, 0)
    assert torch.isfinite(terms["loss"]).all() and bool(bad)
    for p, p0 in zip(run.model.parameters(), model_before):
        assert torch.equal(p.detach(), p0)
    for e, e0 in zip(run.ema.parameters(), ema_before):
        assert torch.equal(e.detach(), e0)


def test_host_sync_log_sees_the_reads_that_stall_a_gpu():
    x = torch.arange(4.0)
    with bench.HostSyncLog() as log:
        float(x[0]), bool(x[1] > 0), x[x > 1], torch.bincount(x.long())
        torch._foreach_lerp_([x.clone()], [x], x[1] * 0.5)  # a 0-d tensor weight is read as a Python number
        x.clone()[x > 1] = torch.ones(2)  # index_put_ with a mask
    assert log.syncs == ["aten._local_scalar_dense.default"] * 2 + ["aten.index.Tensor", "aten.bincount.default",
                                                                    "aten._local_scalar_dense.default", "aten.index_put_.default"]
    assert all(site.startswith("test_all.py:") and site.endswith(" test_host_sync_log_sees_the_reads_that_stall_a_gpu")
               for site in log.sites), log.sites  # where each was called: this test's lines


def test_host_sync_log_sees_data_dependent_shapes_and_leaves_plain_indexing_alone():
    # Each of these needs a value back from the device: its output's size depends on the data (nonzero, unique,
    # masked_select, repeat_interleave by a tensor, a boolean mask beside a slice) or it returns a Python bool (equal).
    # Indexing by integer tensors beside a slice (an index list holding None) waits for nothing and must not crash.
    x, m = torch.arange(4.0), torch.zeros(2, 4)
    with bench.HostSyncLog() as log:
        torch.nonzero(x), torch.equal(x, x), x.unique(), torch.masked_select(x, x > 1)
        x.repeat_interleave(torch.tensor([1, 0, 2, 1]))
        m[:, torch.tensor([0, 2])], m[:, torch.tensor([True, False, True, False])]
    assert log.syncs == ["aten.nonzero.default", "aten.equal.default", "aten._unique2.default",
                         "aten.masked_select.default", "aten.repeat_interleave.Tensor", "aten.index.Tensor"]


def test_call_site_names_our_innermost_frame_then_the_innermost_one_outside():
    frame = traceback.FrameSummary
    ours = frame(os.path.join(bench.HERE, "train.py"), 140, "backward")
    torchs = frame("/venv/lib/python3.11/site-packages/torch/autograd/graph.py", 841, "_engine_run_backward")
    outer = frame("/usr/lib/python3.11/runpy.py", 88, "_run_code")
    warning = frame("/usr/lib/python3.11/warnings.py", 99, "_showwarnmsg")  # the warnings machinery: no call site
    assert bench.call_site([outer, ours, torchs, warning]) == \
        "train.py:140 backward > torch/autograd/graph.py:841 _engine_run_backward"  # the docstring's example
    assert bench.call_site([outer, ours, warning]) == "train.py:140 backward"
    assert bench.call_site([outer, torchs]) == "torch/autograd/graph.py:841 _engine_run_backward"


def test_count_host_syncs_on_cuda_names_the_line_a_warning_names_or_else_our_innermost_frame(monkeypatch):
    # A warning raised with stacklevel=2 names its caller's line, in the same file as the helper that raised it;
    # one whose file and line are on no frame of the stack (warn_explicit, as from C++ with no Python line) is
    # placed at the innermost frame of this repository that made the call.
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    lines = {}

    def helper():
        warnings.warn(bench.SYNC_WARNING, stacklevel=2)

    def step():
        lines["caller"] = sys._getframe().f_lineno + 1
        helper()
        lines["explicit"] = sys._getframe().f_lineno + 1
        warnings.warn_explicit(bench.SYNC_WARNING, UserWarning, "<c++>", 0)

    b = types.SimpleNamespace(device=torch.device("cuda"), steps=lambda n, images, labels, update: step())
    syncs, others = bench.count_host_syncs(b, None, None)
    assert others == [] and [w["site"] for w in syncs] == [f"test_all.py:{lines['caller']} step",
                                                          f"test_all.py:{lines['explicit']} step"]


@pytest.mark.parametrize("method", ["vanilla", "dtr", "rtr", "ant-uw", "ant-pcgrad", "ant-nash", "curriculum",
                                    "dtr+ant-uw", "curriculum+ant-uw"])
def test_train_step_never_waits_for_the_device(method):
    # The step queues its work and returns: no value comes back to the host (train.py reads its flags one step late).
    # The EMA's 0-d weight once went to torch._foreach_lerp_'s Scalar overload, a sync every step. Nash-MTL's
    # update steps are the exception by design (the K x K Gram matrix goes to the CPU solver); step 1 is a plain one.
    for max_norm in ("0", "1"):
        run = make_run("--method", method, "--global-batch-size", "10", "--max-grad-norm", max_norm)
        x, y = batch(10)
        train.train_step(run, x, y, 0)
        with bench.HostSyncLog() as log:
            train.train_step(run, x, y, 1)
        assert log.syncs == [], (method, max_norm)


def test_the_loop_reads_each_steps_flags_only_after_queueing_the_next_step(tmp_path, monkeypatch):
    # the flags (mean loss, bad, stop) of step s are read back after step s + 1 is queued, so on a GPU the host never
    # waits for the step it just queued; at the end (and at log and checkpoint steps) the last one is read at once
    events, real_step, real_tolist = [], train.train_step, torch.Tensor.tolist

    def spy(run, x, y, step):
        events.append(f"step {step}")
        return real_step(run, x, y, step)

    def tolist(self):
        if self.shape == (3,) and self.dtype == torch.float32:  # torch.stack([mean loss, bad, stop])
            events.append("read")
        return real_tolist(self)

    monkeypatch.setattr(train, "train_step", spy)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "4", "--log-every", "100", "--ckpt-every", "100")
    assert events[:8] == ["step 0", "step 1", "read", "step 2", "read", "step 3", "read", "read"], events


def test_plain_backward_writes_the_gradient_of_the_batch_mean_loss():
    # vanilla: grad of (1/B) sum_i loss_i (a sum would scale the gradient by B, which --max-grad-norm would see)
    run = make_run(perturb=0.02, seed=1)
    params = run.params
    torch.manual_seed(0)
    loss_vec, cluster = _forward(run, 6)
    assert cluster is None
    ref = torch.autograd.grad(loss_vec.sum() / 6, params, retain_graph=True, allow_unused=True)
    expected = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(ref, params)])
    loss, extra = run.method.backward(loss_vec, None, 0)
    assert extra == {}
    torch.testing.assert_close(flat_grads(params), expected)
    torch.testing.assert_close(loss, loss_vec.detach().sum() / 6)


# ---------------------------------------------------------------------------------------------- StreamSampler

def _documented_stream(n, seed, epochs):
    """The documented stream: epoch e is torch.randperm(n) from a generator seeded seed * 100_003 + e."""
    return torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + e))
                      for e in range(epochs)]).tolist()


def _take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def test_stream_sampler_interleaves_ranks_into_the_documented_stream():
    n, B, W, seed, steps = 7, 3, 2, 5, 9  # 9 steps x 6 = 54 indices: 7+ epochs, the batches straddle epochs
    stream = _documented_stream(n, seed, 8)
    ranks = [_take(train.StreamSampler(n, B, r, W, seed), steps) for r in range(W)]
    flat = [i for s in range(steps) for r in range(W) for i in ranks[r][s]]
    assert flat == stream[: steps * W * B]
    # by hand: global step 1 holds stream[6:12]; rank 1 gets stream[9:12], which spans epochs 1 and 1
    assert ranks[1][1] == stream[9:12] and ranks[0][1] == stream[6:9]
    # every epoch is a permutation: each index once per 7
    for e in range(7):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    # one process with the whole global batch sees the same global stream
    one = _take(train.StreamSampler(n, W * B, 0, 1, seed), steps)
    assert [i for b in one for i in b] == flat
    # a different seed gives a different stream
    assert _take(train.StreamSampler(n, B, 0, W, seed + 1), steps) != ranks[0]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_stream_sampler_start_step_continues_the_stream(k):
    n, B, W, seed = 7, 3, 2, 5
    stream = _documented_stream(n, seed, 8)
    for r in range(W):
        full = _take(train.StreamSampler(n, B, r, W, seed), 8)
        resumed = _take(train.StreamSampler(n, B, r, W, seed, start_step=k), 8 - k)
        assert resumed == full[k:]
        assert resumed[0] == stream[(k * W + r) * B:(k * W + r + 1) * B]


def test_vanilla_draws_every_timestep_from_0_to_T_minus_1():
    # DiT: t ~ U{0, ..., T-1}. A draw that left out t = 0 (the least noisy step) or t = T - 1 passed every test.
    run = make_run("--num-timesteps", "25")
    torch.manual_seed(0)
    t, cluster = run.method.timesteps(5000)
    assert cluster is None and t.shape == (5000,) and t.dtype == torch.long
    counts = torch.bincount(t, minlength=25)
    assert len(counts) == 25 and (counts > 150).all(), counts  # about 200 of each


def test_curriculum_clusters_zero_paces_through_the_ant_clusters():
    # --curriculum-clusters 0 means "the ANT clusters": here the uneven raw-SNR ones, whose last is stage 1
    run = make_run("--method", "curriculum+ant-uw", "--ant-objective", "snr", "--ant-clusters", "5",
                   "--curriculum-clusters", "0")
    method = run.method
    assert method.intervals == [(0, 1), (1, 2), (2, 5), (5, 18), (18, 1000)]
    assert method.curriculum.clusters == method.intervals and method.curriculum.active_range == (18, 1000)


# ---------------------------------------------------------------------------------------------- ANT inside train.Method.backward

def test_ant_draws_stratified_timesteps_inside_each_cluster():
    # B // K timesteps uniform inside each cluster, the B % K leftovers to the first clusters (ANT, training with clusters)
    run = make_run("--method", "ant-uw", "--ant-objective", "timestep", "--ant-clusters", "5")
    assert run.method.intervals == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    torch.manual_seed(0)
    t, cluster = run.method.timesteps(1003)
    assert torch.equal(cluster, t // 200)
    assert torch.bincount(cluster, minlength=5).tolist() == [201, 201, 201, 200, 200]
    for k in range(5):  # spread over the whole interval, not one end of it
        tk = t[cluster == k] - 200 * k
        assert (tk < 100).any() and (tk >= 100).any()


def test_uw_log_variances_get_their_own_lr_and_no_weight_decay():
    # ANT-UW: the s_k live in their own optimiser group, lr --uw-lr (0.025), weight decay --uw-weight-decay (0),
    # whatever --lr and --weight-decay say for the network
    run = make_run("--method", "ant-uw", "--weight-decay", "0.05", "--lr", "2e-4")
    net, uw = run.opt.param_groups
    assert net["lr"] == 2e-4 and net["weight_decay"] == 0.05 and len(net["params"]) == len(run.params)
    assert len(uw["params"]) == 1 and uw["params"][0] is run.method.uw.log_vars
    assert uw["lr"] == 0.025 and uw["weight_decay"] == 0.0


def _reference_cluster_grads(loss_vec, cluster, K, params):
    """G (K, P) float64: gradients of L_k / K, L_k = mean of the losses of cluster k, one autograd.grad each."""
    rows = []
    for k in range(K):
        Lk = loss_vec[cluster == k].mean() / K
        gs = torch.autograd.grad(Lk, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                               for g, p in zip(gs, params)]))
    return torch.stack(rows)


def _reference_pcgrad(G, gen):
    """PCGrad as the docs of nt.pcgrad describe it, in float64: order[k] = others[randperm(K-1)] drawn
    for k = 0..K-1 from gen; g_k^PC -= (g_k^PC . g_j / |g_j|^2) g_j against the ORIGINAL g_j when
    the dot product is negative; sum over k."""
    K = G.shape[0]
    out = torch.zeros(G.shape[1], dtype=torch.float64)
    orders = []
    for k in range(K):
        others = [j for j in range(K) if j != k]
        orders.append([others[i] for i in torch.randperm(K - 1, generator=gen).tolist()])
    for k in range(K):
        g = G[k].clone()
        for j in orders[k]:
            dot = g @ G[j]
            if dot < 0 and G[j] @ G[j] > 0:
                g = g - dot / (G[j] @ G[j]) * G[j]
        out += g
    return out


def _batch_losses(run, n, seed=0, dtype=torch.float32):
    """(losses, cluster) for a fixed batch of n, its timesteps from the method and fixed noise: losses(rows) gives the
    training_losses terms of the samples in slice `rows` (all by default), as train_step's closure does."""
    x, y = batch(n, seed)
    x = x.to(dtype)
    t, cluster = run.method.timesteps(n)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=dtype)
    return (lambda rows=slice(None): run.diffusion.training_losses(run.model, x[rows], t[rows], dict(y=y[rows]),
                                                                   noise=noise[rows])), cluster


def _forward(run, n, seed=0):
    losses, cluster = _batch_losses(run, n, seed)
    return losses()["loss"], cluster


def test_ant_pcgrad_backward_writes_the_projected_gradient_sum():
    run = make_run("--method", "ant-pcgrad", "--class-dropout-prob", "0", perturb=0.3, seed=2)  # conflicting clusters
    run.model.double()  # float32 rounding, amplified by these large weights, would differ between the two routes by 0.5%
    method, params = run.method, run.params
    K = len(method.intervals)
    torch.manual_seed(0)
    losses, cluster = _batch_losses(run, 10, dtype=torch.float64)
    loss_vec = losses()["loss"]
    assert torch.bincount(cluster, minlength=K).tolist() == [2] * K
    # the official way: K backward passes through the whole batch's graph
    G = _reference_cluster_grads(loss_vec, cluster, K, params)
    gen_copy = torch.Generator()
    gen_copy.set_state(method.order_gen.get_state())
    expected = _reference_pcgrad(G, gen_copy)
    gram = G @ G.T
    assert (gram < 0).any(), "no conflicting pair: the projection would be a no-op"
    assert (expected - G.sum(0)).abs().max() > 1e-3 * G.sum(0).abs().max()  # projection changed the sum
    for p in params:
        p.grad = None
    calls = []
    terms, loss, extra = method.cluster_backward(lambda rows: calls.append(rows) or losses(rows), 10, params, 0)
    assert calls == [slice(2 * k, 2 * k + 2) for k in range(K)]  # one forward per cluster, on its slice alone
    got = flat_grads(params)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    torch.testing.assert_close(terms["loss"], loss_vec.detach())  # the batch's terms, in batch order
    assert all(v.grad_fn is None for v in terms.values())
    # the returned objective is mean_k L_k, and the generator advanced exactly as the reference's copy
    Ls = torch.stack([loss_vec[cluster == k].mean() for k in range(K)])
    torch.testing.assert_close(loss, Ls.mean().detach())
    torch.testing.assert_close(extra["L"], Ls.detach())
    assert torch.equal(method.order_gen.get_state(), gen_copy.get_state())


def test_ant_nash_update_step_writes_the_alpha_weighted_gradient():
    run = make_run("--method", "ant-nash", "--class-dropout-prob", "0", perturb=0.02, seed=1)
    run.model.double()
    method, params = run.method, run.params
    K = len(method.intervals)
    torch.manual_seed(0)
    losses, cluster = _batch_losses(run, 10, dtype=torch.float64)
    loss_vec = losses()["loss"]
    G = _reference_cluster_grads(loss_vec, cluster, K, params)
    assert method.nash.should_update(0)
    for p in params:
        p.grad = None
    with pytest.raises(ValueError, match="needs per-cluster gradients: call cluster_backward"):
        method.backward(loss_vec, cluster, 0)
    _, loss, extra = method.cluster_backward(losses, 10, params, 0)
    alpha = torch.as_tensor(method.nash.alpha, dtype=torch.float64)
    assert method.nash.updates == 1 and not torch.allclose(alpha, torch.ones(K, dtype=torch.float64))  # the solver moved alpha
    # alpha is the Nash bargaining solution alpha_k (M alpha)_k = 1 for the Gram matrix M of the gradients of
    # L_k, as the official NashMTL.compute_grad (G holds those of L_k / K, so M = K^2 G G^T)
    M = K ** 2 * G @ G.T
    torch.testing.assert_close(alpha * (M @ alpha), torch.ones(K, dtype=torch.float64), rtol=1e-3, atol=0)
    expected = (alpha[:, None] * G).sum(0)  # sum_k alpha_k grad(L_k / K)
    got = flat_grads(params).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    Ls = torch.stack([loss_vec[cluster == k].mean() for k in range(K)]).detach().double()
    torch.testing.assert_close(loss.double(), (alpha * Ls).sum() / K, rtol=1e-5, atol=0)
    torch.testing.assert_close(extra["w"].double(), alpha)


def test_ant_nash_off_update_step_uses_the_kept_alpha():
    run = make_run("--method", "ant-nash", "--class-dropout-prob", "0", "--nash-every", "2", perturb=0.02, seed=1)
    method, params = run.method, run.params
    K = len(method.intervals)
    method.nash.alpha = np.array([0.5, 1.0, 2.0, 3.0, 4.0])
    method.nash._alpha_cache = None
    torch.manual_seed(0)
    loss_vec, cluster = _forward(run, 10)
    G = _reference_cluster_grads(loss_vec, cluster, K, params)
    for p in params:
        p.grad = None
    method.backward(loss_vec, cluster, 1)  # not an update step: plain backward of sum alpha_k L_k / K
    assert method.nash.alpha.tolist() == [0.5, 1.0, 2.0, 3.0, 4.0]
    alpha = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = (alpha[:, None] * G).sum(0)
    torch.testing.assert_close(flat_grads(params).double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


class _ClipSpy:
    """Wraps torch.nn.utils.clip_grad_norm_: records max_norm and the total norm after clipping."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.original = torch.nn.utils.clip_grad_norm_
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", self)

    def __call__(self, parameters, max_norm, *a, **k):
        parameters = list(parameters)
        total = self.original(parameters, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double())
                                                      for p in parameters if p.grad is not None]))
        self.calls.append((max_norm, float(total), float(after)))
        return total


def test_nash_clips_the_gradient_to_nash_max_norm(monkeypatch):
    spy = _ClipSpy(monkeypatch)
    # --max-grad-norm 0.5 is not the clip Nash uses: --nash-max-norm wins
    run = make_run("--method", "ant-nash", "--nash-max-norm", "0.01", "--max-grad-norm", "0.5",
                   "--global-batch-size", "10", perturb=0.02, seed=1)
    x, y = batch(10)
    torch.manual_seed(0)
    for step in (0, 1):  # an update step and (nash-every 25) a kept-alpha step
        _, _, _, bad = train.train_step(run, x, y, step)
        assert not bool(bad)
    assert [c[0] for c in spy.calls] == [0.01, 0.01]
    for max_norm, before, after in spy.calls:
        assert before > 0.011  # the clip bit ...
        assert after == pytest.approx(0.01, rel=1e-4)  # ... and the gradient the optimiser saw has norm 0.01


def test_max_grad_norm_clips_plain_training_and_zero_means_off(monkeypatch):
    spy = _ClipSpy(monkeypatch)
    run = make_run("--max-grad-norm", "0.5", "--global-batch-size", "6", perturb=0.02, seed=1)
    x, y = batch(6)
    torch.manual_seed(0)
    train.train_step(run, x, y, 0)
    assert len(spy.calls) == 1 and spy.calls[0][0] == 0.5
    max_norm, before, after = spy.calls[0]
    assert after == pytest.approx(min(before, 0.5), rel=1e-4)
    spy.calls.clear()
    run = make_run("--global-batch-size", "6", perturb=0.02, seed=1)  # default 0: no clipping
    train.train_step(run, x, y, 0)
    assert spy.calls == []


def test_max_grad_norm_reaches_train_main(tmp_path, monkeypatch):
    spy = _ClipSpy(monkeypatch)
    out = run_train(tmp_path, "--max-grad-norm", "0.5", "--global-batch-size", "4", "--max-steps", "1")
    assert [c[0] for c in spy.calls] == [0.5]
    assert last_checkpoint(out)["args"]["max_grad_norm"] == 0.5


def test_training_drops_labels_to_the_null_class(tmp_path):
    # --class-dropout-prob 1: every training label becomes the null class (row 4), so only that row of the table
    # trains. The real classes' rows get no gradient, and AdamW (no weight decay) leaves a zero-gradient row exactly
    # where it was: model and EMA still agree there. (The embedding first gets a gradient at step 2, adaLN-Zero.)
    out = run_train(tmp_path, "--class-dropout-prob", "1", "--global-batch-size", "4", "--max-steps", "3", "--lr", "1e-2",
                    "--ema-decay", "0.5")
    ckpt = last_checkpoint(out)
    m, e = ckpt["model"]["y_embedder.embedding_table.weight"], ckpt["ema"]["y_embedder.embedding_table.weight"]
    assert m.shape == (NUM_CLASSES + 1, 64)
    assert torch.equal(m[:NUM_CLASSES], e[:NUM_CLASSES])
    assert not torch.equal(m[NUM_CLASSES], e[NUM_CLASSES])  # the null row trained, and the EMA lags behind it


def test_the_model_trains_in_train_mode_and_the_ema_samples_in_eval_mode(tmp_path, monkeypatch):
    # label dropout (which trains the null class that guidance needs) happens only in train mode: a model left in eval
    # mode passed the test above, whose dropout probability 1 drops the labels in eval mode too; grids run between steps
    modes, real_step = [], train.train_step

    def spy(run, x, y, step):
        modes.append((run.model.training, run.ema.training))
        return real_step(run, x, y, step)

    monkeypatch.setattr(train, "train_step", spy)
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "3", "--sample-every", "1", "--sample-steps", "ddim2")
    assert modes == [(True, False)] * 3


def test_training_images_are_the_streams_batches_flipped_left_right_at_random(tmp_path, monkeypatch):
    # DiT's one augmentation: each image mirrored with probability 1/2; dropping it passed every other test
    seen, real_step = [], train.train_step

    def spy(run, x, y, step):
        seen.append(x.clone())
        return real_step(run, x, y, step)

    monkeypatch.setattr(train, "train_step", spy)
    run_train(tmp_path, "--global-batch-size", "16", "--max-steps", "2")
    ds = datasets.load_dataset("shapes", 16, seed=0)
    flipped = []
    for x, idx in zip(seen, _take(train.StreamSampler(len(ds), 16, 0, 1, 0), 2)):
        plain = datasets.to_model_input(torch.stack([ds[i][0] for i in idx]), flip=False)  # (16, 3, 16, 16)
        for a, b in zip(x, plain):
            assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
            flipped.append(not torch.equal(a, b))
    assert 8 <= sum(flipped) <= 24, sum(flipped)  # about 16 of 32 (a symmetric shape counts as not flipped)


def test_one_class_data_train_without_label_dropout_and_refuse_guidance(tmp_path, capsys):
    # one class: nothing to guide towards, so no null class to drop labels to (one label row) and no --sample-cfg
    _write_images(tmp_path / "u", 4, classes=("only",))
    out = run_train(tmp_path, "--data", str(tmp_path / "u"), "--global-batch-size", "4", "--max-steps", "1")
    ckpt = last_checkpoint(out)
    assert ckpt["args"]["class_dropout_prob"] == 0.0 and ckpt["model"]["y_embedder.embedding_table.weight"].shape == (1, 64)
    assert "the data have one class" in _train_error(tmp_path, capsys, "--data", str(tmp_path / "u"), "--sample-cfg", "1.5")


def test_metrics_average_the_loss_its_timestep_buckets_and_the_ant_tensors_over_the_logged_steps(tmp_path, monkeypatch):
    # A record at --log-every 2 holds means over its two steps: the loss, the loss of each tenth of [0, T) over the
    # samples that fell in it, and the per-cluster ANT losses and weights; computed here from what train_step returned.
    # The second record's window starts afresh (sums, counts and the step count carried over passed one record).
    # Throughput on a clock that advances 1 s per step, so the checkpoint pauses and the rest take no time.
    seen, clock = [], [0.0]
    real = train.train_step

    def spy(run, x, y, step):
        terms, t, extra, bad = real(run, x, y, step)
        seen.append((terms["loss"].detach().double(), t.clone(), {k: v.detach().double() for k, v in extra.items()}))
        clock[0] += 1.0
        return terms, t, extra, bad

    monkeypatch.setattr(train, "train_step", spy)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    out = run_train(tmp_path, "--method", "ant-uw", "--global-batch-size", "10", "--max-steps", "4", "--log-every", "2")
    records = [r for r in metrics(out) if "loss" in r]
    assert len(seen) == 4 and [r["step"] for r in records] == [2, 4]
    for rec, window in zip(records, (seen[:2], seen[2:])):
        assert (rec["steps_per_s"], rec["images_per_s"]) == (1.0, 10.0)
        assert rec["loss"] == pytest.approx((window[0][0].mean() + window[1][0].mean()).item() / 2, rel=1e-5)
        losses, ts = torch.cat([s[0] for s in window]), torch.cat([s[1] for s in window])
        buckets = ts * 10 // 1000
        counts = torch.bincount(buckets, minlength=10)
        assert (counts[counts > 0] != 2).any()  # a bucket mean is not a bucket sum over the two steps
        assert {k for k in rec if k.startswith("loss_t")} == {f"loss_t{i}" for i in range(10) if counts[i] > 0}
        for i in range(10):
            if counts[i] > 0:
                assert rec[f"loss_t{i}"] == pytest.approx(losses[buckets == i].mean().item(), rel=1e-5)
        for key in ("L", "w"):
            mean = (window[0][2][key] + window[1][2][key]) / 2
            assert not torch.equal(window[0][2][key], window[1][2][key])
            for k in range(5):
                assert rec[f"ant/{key}{k}"] == pytest.approx(mean[k].item(), rel=1e-5)


def test_ant_cluster_losses_are_averaged_over_the_steps_that_drew_the_cluster(tmp_path, monkeypatch):
    # curriculum+ant-uw, stage 1 = [750, 1000): ANT clusters 0-2 get no sample (no ant/L key), cluster 3 = [600, 800)
    # only some steps; its L_k is 0 in the others, which once pulled the logged mean down
    seen = []
    real = train.train_step

    def spy(run, x, y, step):
        terms, t, extra, bad = real(run, x, y, step)
        seen.append({k: v.detach().double() for k, v in extra.items()})
        return terms, t, extra, bad

    monkeypatch.setattr(train, "train_step", spy)
    out = run_train(tmp_path, "--method", "curriculum+ant-uw", "--curriculum-clusters", "4", "--curriculum-pacing", "fixed",
                    "--curriculum-stage-steps", "100", "--global-batch-size", "5", "--max-steps", "8", "--log-every", "8")
    rec = [r for r in metrics(out) if "loss" in r][0]
    present = torch.stack([s["present"] for s in seen])  # (8, 5)
    assert present[:, :3].sum() == 0 and 0 < present[:, 3].sum() < 8 and present[:, 4].all()
    assert not any(f"ant/L{k}" in rec for k in range(3)) and "ant/present0" not in rec
    L = torch.stack([s["L"] for s in seen])
    for k in (3, 4):
        assert rec[f"ant/L{k}"] == pytest.approx(L[present[:, k] > 0, k].mean().item(), rel=1e-5)
    assert rec["ant/w0"] == pytest.approx(torch.stack([s["w"] for s in seen])[:, 0].mean().item(), rel=1e-5)


def test_a_skipped_step_is_left_out_of_the_logged_loss_and_ant_values(tmp_path, monkeypatch):
    # --skip-nonfinite: step 2's losses are inf. The record's loss already left them out, but its ant/L_k came out
    # inf (and the JSON "Infinity"), and its ant/w_k were averaged over a step that did not train.
    real, seen = gd.Diffusion.training_losses, []
    real_step = train.train_step

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        if len(seen) == 1:
            out["loss"] = out["loss"] * float("inf")
        return out

    def spy(run, x, y, step):
        terms, t, extra, bad = real_step(run, x, y, step)
        seen.append(({k: v.detach().double() for k, v in extra.items()}, bool(bad)))
        return terms, t, extra, bad

    monkeypatch.setattr(gd.Diffusion, "training_losses", poisoned)
    monkeypatch.setattr(train, "train_step", spy)
    out = run_train(tmp_path, "--method", "ant-uw", "--global-batch-size", "5", "--max-steps", "3", "--skip-nonfinite", "1",
                    "--log-every", "3")
    assert [bad for _, bad in seen] == [False, True, False]
    rec = [r for r in metrics(out) if "loss" in r][0]
    for name in ("L", "w"):
        kept = torch.stack([extra[name] for extra, bad in seen if not bad])  # (2, K)
        for k in range(5):
            assert rec[f"ant/{name}{k}"] == pytest.approx(kept[:, k].mean().item(), rel=1e-5), (name, k)


def test_a_step_skipped_for_a_non_finite_gradient_is_left_out_of_the_logged_loss(tmp_path, monkeypatch):
    # the second step's losses are finite but a gradient is NaN: the update is skipped, and so are its losses in the
    # record (mean and timestep buckets), which hold only the two steps that trained
    real_backward, real_step, seen, params = train.Method.backward, train.train_step, [], []

    def poisoned(self, loss_vec, cluster, step):
        out = real_backward(self, loss_vec, cluster, step)
        if step == 1:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = math.nan
        return out

    def spy(run, x, y, step):
        params[:] = run.params
        terms, t, extra, bad = real_step(run, x, y, step)
        seen.append((terms["loss"].double(), t.clone(), bool(bad)))
        return terms, t, extra, bad

    monkeypatch.setattr(train.Method, "backward", poisoned)
    monkeypatch.setattr(train, "train_step", spy)
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "3", "--skip-nonfinite", "1", "--log-every", "3")
    assert [bad for *_, bad in seen] == [False, True, False] and all(torch.isfinite(loss).all() for loss, *_ in seen)
    rec = [r for r in metrics(out) if "loss" in r][0]
    loss = torch.cat([loss for loss, _, bad in seen if not bad])  # (8,)
    bucket = torch.cat([t for _, t, bad in seen if not bad]) * 10 // 1000  # (8,)
    assert rec["loss"] == pytest.approx(loss.mean().item(), rel=1e-5)
    assert {k: v for k, v in rec.items() if k.startswith("loss_t")} == pytest.approx(
        {f"loss_t{i}": loss[bucket == i].mean().item() for i in bucket.unique().tolist()}, rel=1e-5)

@retry_rank_abort
def test_two_process_curriculum_paces_on_the_all_rank_mean_loss(tmp_path):
    # The pacer's smoothed loss is the EMA of the all-rank mean loss, which metrics.jsonl logs each step. A rank
    # pacing on its own loss would drift from the others: the mid-stage checkpoint compares the method state too.
    out = tmp_path / "o"
    r = torchrun("train.py", *TINY, "--method", "curriculum", "--global-batch-size", "8", "--max-steps", "3",
                 "--ckpt-every", "3", "--curriculum-pacing", "fixed", "--curriculum-stage-steps", "100",
                 "--curriculum-smoothing", "0.5", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model replicas, EMA and method state identical on 2 ranks" in r.stdout
    losses = [rec["loss"] for rec in metrics(out) if "loss" in rec]
    assert len(losses) == 3
    # throughput counts the images of both ranks: the global batch of 8 per step
    assert all(rec["images_per_s"] == pytest.approx(8 * rec["steps_per_s"]) for rec in metrics(out) if "loss" in rec)
    ema = 0.0
    for value in losses:
        ema = 0.5 * ema + 0.5 * value
    c = last_checkpoint(out)["method"]["curriculum"]
    assert c["stage"] == 1 and c["stage_updates"] == 3
    assert c["ema_sum"] == pytest.approx(ema, rel=1e-6)


# ---------------------------------------------------------------------------------------------- curriculum + ant-uw: cluster labels of the curriculum's timesteps

def test_curriculum_ant_uw_labels_each_timestep_with_its_ant_cluster(monkeypatch):
    run = make_run("--method", "curriculum+ant-uw", "--ant-objective", "timestep", "--ant-clusters", "5")
    method = run.method
    assert method.intervals == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    monkeypatch.setattr(method.curriculum, "sample_timesteps", lambda n, generator=None, device=None: torch.arange(1000))
    t, cluster = method.timesteps(1000)
    assert torch.equal(t, torch.arange(1000))
    assert torch.equal(cluster, torch.arange(1000) // 200)
    # and the first stage (t in [950, 1000) with 20 curriculum clusters) is all in the last ANT cluster
    monkeypatch.undo()
    torch.manual_seed(0)
    t, cluster = method.timesteps(64)
    assert t.min() >= 950 and torch.equal(cluster, torch.full((64,), 4))


def test_curriculum_ant_uw_with_uneven_clusters(monkeypatch):
    # log-SNR clustering gives uneven intervals: every boundary timestep belongs to the cluster it starts
    run = make_run("--method", "curriculum+ant-uw", "--ant-objective", "log-snr", "--ant-clusters", "4")
    method = run.method
    monkeypatch.setattr(method.curriculum, "sample_timesteps", lambda n, generator=None, device=None: torch.arange(1000))
    t, cluster = method.timesteps(1000)
    expected = torch.tensor([next(k for k, (lo, hi) in enumerate(method.intervals) if lo <= int(s) < hi) for s in t])
    assert torch.equal(cluster, expected)


def test_curriculum_ant_uw_leaves_the_log_variances_of_hidden_clusters_alone():
    # Stage 1 (t in [950, 1000)) fills only ANT cluster 4. UW: d/ds_k of 0.5 (exp(-s_k) L_k / K + s_k) is
    # 0.5 (1 - exp(-s_k) L_k / K) for a present cluster; a hidden cluster adds nothing, so its s_k gets 0.
    run = make_run("--method", "curriculum+ant-uw", "--ant-objective", "timestep", "--ant-clusters", "5",
                   perturb=0.02, seed=1)
    torch.manual_seed(0)
    loss_vec, cluster = _forward(run, 10)
    assert torch.equal(cluster, torch.full((10,), 4))
    loss, _ = run.method.backward(loss_vec, cluster, 0)
    L4 = loss_vec.detach().mean()
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5 * (1 - L4.item() / 5)])
    torch.testing.assert_close(run.method.uw.log_vars.grad, expected)
    torch.testing.assert_close(loss, 0.5 * L4 / 5)  # s = 0 at the start


CURRICULUM_UW_RANK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train, sample
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
args = train.parse_args(["--method", "curriculum+ant-uw", "--ant-clusters", "5"])
method = train.Method(args, sample.build_diffusion(vars(args)), torch.device("cpu"), log=lambda m: None)
w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
x, cluster = torch.load(sys.argv[2])
method.backward((x[rank] @ w) ** 2, cluster[rank], 0)
for g in (w.grad, method.uw.log_vars.grad):  # DDP's average of the model's, train_step's of the s_k
    dist.all_reduce(g)
    g.div_(2)
torch.save((w.grad, method.uw.log_vars.grad), sys.argv[3])
dist.destroy_process_group()
"""


NASH_RANK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train, sample
import negative_transfer as nt
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
if rank == 1:  # a CPU whose solver rounds differently
    solve = nt.nash_mtl_weights
    nt.nash_mtl_weights = lambda *a, **k: (lambda alpha, info: (alpha * (1 + 1e-9), info))(*solve(*a, **k))
args = train.parse_args(["--method", "ant-nash", "--ant-clusters", "2"])
method = train.Method(args, sample.build_diffusion(vars(args)), torch.device("cpu"), log=lambda m: None)
w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank))
method.cluster_backward(lambda rows: {{"loss": (x[rows] @ w) ** 2}}, 4, [w], 0)  # clusters 0, 0, 1, 1
torch.save(method.nash.state_dict(), sys.argv[2])
dist.destroy_process_group()
"""


@retry_rank_abort
def test_two_process_nash_alpha_is_rank_0s_on_every_rank(tmp_path):
    # every rank solves for alpha from the same all-reduced gradients; a solver that rounds differently on one node
    # made the replicas drift, and the checkpoint hash stopped the run
    script = tmp_path / "rank.py"
    script.write_text(NASH_RANK.format(repo=str(REPO), store=str(tmp_path / "store")))
    file_store_ranks(script, *[[tmp_path / f"{r}.pt"] for r in range(2)])
    states = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert states[0] == states[1] and states[0]["updates"] == 1 and states[0]["alpha"] != [1.0, 1.0]


def test_ant_nash_loads_the_alpha_and_counters_broadcast_from_rank_0(monkeypatch):
    # The two-process test above sees equal states, which a broadcast from rank 1 also gives: here the broadcast is
    # faked to deliver rank 0's state, and the method must ask for src 0 and then use what arrived
    sent = []

    def broadcast_object_list(box, src):
        sent.append(src)
        box[0] = {"alpha": [0.25, 4.0], "steps": 7, "updates": 3, "failures": 1}  # rank 0's
    monkeypatch.setattr(train, "dist", types.SimpleNamespace(is_initialized=lambda: True,
                                                             broadcast_object_list=broadcast_object_list))
    args = train.parse_args(["--method", "ant-nash", "--ant-clusters", "2"])
    method = train.Method(args, sample.build_diffusion(vars(args)), CPU, log=lambda m: None)
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    method.cluster_backward(lambda rows: {"loss": (x[rows] @ w) ** 2}, 4, [w], 0)  # clusters 0, 0, 1, 1
    assert sent == [0]
    assert method.nash.state_dict() == {"alpha": [0.25, 4.0], "steps": 7, "updates": 3, "failures": 1}


@retry_rank_abort
def test_two_process_curriculum_ant_uw_weighs_clusters_as_one_big_batch(tmp_path):
    # During the curriculum each rank draws t uniformly, so the ranks' cluster counts differ: here rank 1 draws none
    # of cluster 3. L_k was each rank's own mean, so averaging the ranks halved cluster 3's weight (and its s_k step)
    # and weighed cluster 4's samples 1/4 and 1/8; with L_k over the all-rank counts two ranks train as one batch.
    torch.manual_seed(0)
    x, cluster = torch.randn(2, 6, 3), torch.tensor([[3, 3, 4, 4, 4, 4], [4, 4, 4, 4, 4, 4]])
    torch.save((x, cluster), tmp_path / "batch.pt")
    script = tmp_path / "rank.py"
    script.write_text(CURRICULUM_UW_RANK.format(repo=str(REPO), store=str(tmp_path / "store")))
    file_store_ranks(script, *[[tmp_path / "batch.pt", tmp_path / f"{r}.pt"] for r in range(2)])
    args = train.parse_args(["--method", "curriculum+ant-uw", "--ant-clusters", "5"])
    one = train.Method(args, sample.build_diffusion(vars(args)), CPU, log=lambda m: None)
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    one.backward((x.reshape(12, 3) @ w) ** 2, cluster.reshape(12), 0)
    for r in range(2):
        w_grad, s_grad = torch.load(tmp_path / f"{r}.pt")
        torch.testing.assert_close(w_grad, w.grad)
        torch.testing.assert_close(s_grad, one.uw.log_vars.grad)


def test_resume_applies_the_learning_rate_flags_and_refuses_other_ant_clusters(tmp_path):
    common = ["--method", "ant-uw", "--global-batch-size", "10", "--ckpt-every", "1"]
    out = run_train(tmp_path, *common, "--max-steps", "1")
    train.main(TINY + ["--out", str(out), *common, "--max-steps", "2", "--resume", "auto", "--lr", "3e-4", "--uw-lr", "0.5"])
    groups = last_checkpoint(out)["opt"]["param_groups"]
    assert (groups[0]["lr"], groups[1]["lr"]) == (3e-4, 0.5)  # opt.load_state_dict alone would keep 1e-4, 0.025
    changed = [line for line in (out / "log.txt").read_text().splitlines() if line.startswith("resume: flags that differ")]
    assert len(changed) == 1 and "--lr 0.0003 (was 0.0001)" in changed[0] and "--uw-lr 0.5 (was 0.025)" in changed[0]
    assert changed[0].count("(was") == 2  # nothing else is reported as changed
    state = last_checkpoint(out)["method"]
    assert [tuple(iv) for iv in state["intervals"]] == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    args = train.parse_args(TINY + common)
    method = train.Method(args, sample.build_diffusion(vars(args)), torch.device("cpu"), log=lambda m: None)
    method.intervals = [(0, 100), (100, 200), (200, 300), (300, 500), (500, 1000)]  # what another --ant-tas gave
    with pytest.raises(train.ConfigError, match="a different --ant-tas"):
        method.load_state_dict(state)


def test_curriculum_ant_uw_returns_to_stratified_ant_sampling_after_the_last_stage():
    # Raw-SNR clusters are [0,1) [1,2) [2,5) [5,18) [18,1000): ANT-UW puts B/K samples in each, while uniform t
    # would leave the four small ones nearly empty (about 1.8% of the batch in all). After stage N the run is ANT-UW.
    run = make_run("--method", "curriculum+ant-uw", "--ant-objective", "snr", "--ant-clusters", "5",
                   "--curriculum-pacing", "fixed", "--curriculum-stage-steps", "1")
    method = run.method
    assert method.intervals == [(0, 1), (1, 2), (2, 5), (5, 18), (18, 1000)]
    torch.manual_seed(0)
    t, cluster = method.timesteps(40)
    assert t.min() >= 950 and torch.equal(cluster, torch.full((40,), 4))  # stage 1: the curriculum's range
    while not method.curriculum.finished:
        method.curriculum.update(1.0)
    t, cluster = method.timesteps(40)
    assert torch.equal(torch.bincount(cluster, minlength=5), torch.full((5,), 8))
    assert all(lo <= int(s) < hi for s, k in zip(t, cluster) for lo, hi in [method.intervals[int(k)]])


def test_ant_batch_smaller_than_the_clusters_is_refused_at_flag_time(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--method", "curriculum+ant-uw", "--ant-clusters", "5", "--global-batch-size", "4",
                  "--max-steps", "1")
    assert "a process gets 4 images" in capsys.readouterr().err


def test_resume_with_other_curriculum_smoothing_is_refused(tmp_path, capsys):
    # The saved loss EMA is a sum with decay s; normalising it with another decay misreads the loss (x12 here).
    flags = ["--method", "curriculum", "--global-batch-size", "8", "--curriculum-patience", "5"]
    out = run_train(tmp_path, *flags, "--curriculum-smoothing", "0.9", "--max-steps", "2")
    with pytest.raises(SystemExit):
        train.main(TINY + ["--out", str(out), *flags, "--max-steps", "3", "--resume", "auto"])
    assert "curriculum_smoothing=0.9" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- Flags end to end: schedule, weighting, learn-sigma; sample.py labels and --use-model

def _hand_cosine_betas(T):
    f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])


def test_flag_defaults_are_the_papers_settings():
    # papers.md: the DiT recipe (AdamW 1e-4, no weight decay, global batch 256, EMA 0.9999, learned sigma, linear
    # schedule over T = 1000, label dropout 0.1, 400K steps) and each method's defaults. Another EMA decay passed.
    a = train.parse_args([])
    assert (a.lr, a.weight_decay, a.global_batch_size, a.ema_decay, a.max_grad_norm) == (1e-4, 0.0, 256, 0.9999, 0.0)
    assert (a.max_steps, a.learn_sigma, a.schedule, a.num_timesteps) == (400_000, True, "linear", 1000)
    assert (a.class_dropout_prob, a.weighting) == (0.1, "constant")
    assert (a.dtr_alpha, a.dtr_beta, a.ant_clusters, a.uw_lr, a.uw_weight_decay) == (4.0, 0.8, 5, 0.025, 0.0)
    assert (a.nash_every, a.nash_max_norm, a.curriculum_clusters, a.curriculum_order) == (25, 1.0, 20, "easy-to-hard")
    assert a.curriculum_smoothing == 0.995  # ours, named in its flag's error message


def test_schedule_weighting_and_learn_sigma_flags_reach_the_checkpoint(tmp_path):
    out = run_train(tmp_path, "--schedule", "cosine", "--weighting", "p2", "--p2-gamma", "0.5", "--p2-k", "2",
                    "--learn-sigma", "0", "--global-batch-size", "4", "--max-steps", "1")
    model, diffusion, args = sample.load_model(str(checkpoints(out)[-1]))
    ref = gd.Diffusion(schedule="cosine", weighting="p2", p2_gamma=0.5, p2_k=2, learn_sigma=False)
    np.testing.assert_array_equal(diffusion.betas, ref.betas)
    np.testing.assert_array_equal(diffusion.loss_weight, ref.loss_weight)
    # and by hand: cosine betas (Nichol & Dhariwal eq. 17), P2 weight (k + SNR)^-gamma
    betas = _hand_cosine_betas(1000)
    np.testing.assert_allclose(diffusion.betas, betas, rtol=1e-12)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(diffusion.loss_weight, (2 + abar / (1 - abar)) ** -0.5, rtol=1e-9)
    assert diffusion.learn_sigma is False and diffusion.weighting == "p2"
    assert model.in_channels == 3 and model.out_channels == 3
    assert model.final_layer.linear.out_features == 4 * 4 * 3  # patch 4, no variance channels
    # the vb term is zero without learn_sigma: the loss is exactly weight * mse
    x, y = batch(3)
    terms = diffusion.training_losses(model, x, torch.tensor([0, 500, 999]), dict(y=y))
    assert torch.equal(terms["vb"], torch.zeros(3))
    torch.testing.assert_close(terms["weight"], torch.tensor(ref.loss_weight[[0, 500, 999]], dtype=torch.float32))


def test_sample_py_refuses_bad_labels_guided_channels_and_seeds_before_sampling(tmp_path, capsys):
    ckpt = str(checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1])  # 4 classes
    for flags, says in ((["--class-labels", "0,4"], "classes 0..3"), (["--class-labels", "a,b"], "comma-separated integers"),
                        (["--guided-channels", "4"], "3 epsilon channels"), (["--seed", "4295"], "0..4294"),  # 2 samples
                        (["--seed", "-1"], "0..4294")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "ddim2", *flags])
        assert says in str(e.value.code), e.value.code
    assert not (tmp_path / "s").exists()
    ckpt_data = torch.load(ckpt, weights_only=True)  # a diverged run's weights: refused, not sampled as black images
    ckpt_data["ema"]["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save(ckpt_data, tmp_path / "nan.pt")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "ddim2"])
    assert "1 of the 'ema' tensors hold NaN or inf (first: blocks.0.mlp.fc1.weight)" in str(e.value.code), e.value.code
    assert not (tmp_path / "s").exists()
    sample.load_model(str(tmp_path / "nan.pt"), use_ema=False)  # the raw weights are finite


def test_per_sample_generator_seeds_stay_below_two_to_the_32():
    # torch's CPU generator keeps the low 32 bits of a seed: seed 4295's sample 0 would be seed 0's sample 45589
    wrapped = (4295 * sample.SEED_STRIDE) % 2**32
    assert wrapped == 45589 and torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(4295 * sample.SEED_STRIDE)),
                                            torch.randn(4, generator=torch.Generator().manual_seed(wrapped)))
    sample.check_seed(4293, 1_000_000)
    for seed, n in ((4294, 1_000_000), (4295, 1), (-1, 1)):
        with pytest.raises(ValueError, match="below 2\\^32"):
            sample.check_seed(seed, n)
    # the range the message offers is the one that holds for this many samples, and it is accepted
    for seed, n in ((4293, 2_000_000), (4295, 50_000), (4294, 1_000_000)):
        with pytest.raises(ValueError) as e:
            sample.check_seed(seed, n)
        top = int(str(e.value).rsplit("0..", 1)[1])
        assert top == sample.max_seed(n) < seed
        sample.check_seed(top, n)


def test_seed_check_is_exact_at_two_to_the_32_and_sample_indices_applies_it_to_its_largest_index():
    # seed 4294: 4294 * 1_000_003 + 954414 == 2^32, so sample 954414's generator seed would be 2^32, which torch
    # wraps to 0 (seed 0's sample 0); sample 954413's, 2^32 - 1, is the last distinct one
    assert 4294 * sample.SEED_STRIDE + 954414 == 2**32
    assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(2**32)),
                       torch.randn(4, generator=torch.Generator().manual_seed(0)))
    sample.check_seed(4294, 954414)  # samples 0..954413
    with pytest.raises(ValueError, match="below 2\\^32"):
        sample.check_seed(4294, 954415)
    with pytest.raises(ValueError, match="below 2\\^32"):  # one sample, but sample 954414: refused before sampling
        sample.sample_indices(_random_dit(), gd.Diffusion(), [954414], CPU, seed=4294, steps="2")


def test_sample_fid_ref_problems_stop_before_sampling(tmp_path, capsys, monkeypatch):
    import fid
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    common = ["--ckpt", str(checkpoints(out)[-1]), "--num-samples", "4", "--steps", "ddim2"]
    calls = []
    monkeypatch.setattr(sample, "sample_indices", lambda *a, **k: calls.append(1))
    with pytest.raises(SystemExit) as e:  # a missing reference: refused before any sample is drawn
        sample.main(common + ["--out", str(tmp_path / "a"), "--fid-ref", str(tmp_path / "missing.npz")])
    assert "does not exist" in str(e.value.code) and not calls

    def offline(path=None, device="cpu"):
        raise RuntimeError("could not download the FID Inception weights (offline)")
    monkeypatch.setattr(fid, "load_inception", offline)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(6), sigma=np.eye(6))
    with pytest.raises(SystemExit) as e:  # no weights and no internet: said before sampling, in one line
        sample.main(common + ["--out", str(tmp_path / "b"), "--fid-ref", str(tmp_path / "ref.npz")])
    assert "could not download" in str(e.value.code) and not calls


def test_sample_refuses_a_reference_of_the_wrong_kind_before_sampling(tmp_path, monkeypatch):
    # a text file, an empty folder or an .npz without arr_0 as --fid-ref was refused after the sampling (hours for 50K)
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    (tmp_path / "ref.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "mu.npz", mu=np.zeros(6))  # statistics without sigma
    calls = []
    monkeypatch.setattr(sample, "sample_indices", lambda *a, **k: calls.append(1))
    for ref, says in (("ref.txt", "neither a folder nor a .zip"), ("empty", "no images"), ("mu.npz", "has no arr_0")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(checkpoints(out)[-1]), "--num-samples", "4", "--steps", "ddim2",
                         "--out", str(tmp_path / "s"), "--fid-ref", str(tmp_path / ref)])
        assert str(e.value.code).startswith("error: --fid-ref: ") and says in str(e.value.code), ref
    assert not calls and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit, match="--inception has no effect without --fid-ref"):  # the weights were never read
        sample.main(["--ckpt", str(checkpoints(out)[-1]), "--num-samples", "4", "--out", str(tmp_path / "s"),
                     "--inception", str(tmp_path / "w.pth")])


def test_sample_cycles_class_labels_and_use_model_takes_the_raw_weights(tmp_path):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--ema-decay", "0.5", "--lr", "1e-2")
    ckpt_path = str(checkpoints(out)[-1])
    # batches of 3: the second batch holds samples 3 and 4, whose labels are 3 and 1 (cycled by sample index)
    common = ["--ckpt", ckpt_path, "--num-samples", "5", "--batch-size", "3", "--steps", "ddim2", "--class-labels", "1,3"]
    sample.main(common + ["--out", str(tmp_path / "ema")])
    sample.main(common + ["--out", str(tmp_path / "raw"), "--use-model"])
    ema, raw = np.load(tmp_path / "ema" / "samples.npz"), np.load(tmp_path / "raw" / "samples.npz")
    assert ema["arr_1"].tolist() == [1, 3, 1, 3, 1] and raw["arr_1"].tolist() == [1, 3, 1, 3, 1]
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert not np.array_equal(ema["arr_0"], raw["arr_0"])

    # --use-model equals sampling by hand from a network loaded with ckpt["model"]; the default, ckpt["ema"]
    def by_hand(key):
        net = sample.build_model(ckpt["args"])
        net.load_state_dict(ckpt[key])
        images, labels = sample.sample_indices(net.eval(), sample.build_diffusion(ckpt["args"]), list(range(5)), CPU,
                                               seed=0, batch_size=5, steps="ddim2", class_labels=[1, 3])
        return images.numpy(), labels.numpy()

    for key, got in (("model", raw), ("ema", ema)):
        images, labels = by_hand(key)
        assert labels.tolist() == [1, 3, 1, 3, 1]
        assert np.abs(images.astype(int) - got["arr_0"].astype(int)).max() <= 1, key


def test_sample_indices_draws_noise_label_and_step_noise_from_each_samples_generator():
    # Sample i: generator seeded seed * 1_000_003 + i draws the starting noise, then a label uniform over all
    # classes, then the DDPM steps' noise; so a sample is the same in any batch, and the global RNG is left alone
    model, d, seed, idx = _random_dit(), gd.Diffusion(), 4, [5, 0, 3, 7, 2, 9, 11]
    labels = []
    for i in idx:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        torch.randn(3, 16, 16, generator=g)
        labels.append(int(torch.randint(NUM_CLASSES, (1,), generator=g)))
    assert max(labels) == NUM_CLASSES - 1  # the last class is drawn too
    state = torch.get_rng_state()
    images, got = sample.sample_indices(model, d, idx, CPU, seed=seed, batch_size=4, steps="3")
    assert torch.equal(torch.get_rng_state(), state)
    assert got.tolist() == labels
    for j in (0, 4, 6):  # one at a time, each in another position of its batch above
        one, label = sample.sample_indices(model, d, [idx[j]], CPU, seed=seed, batch_size=1, steps="3")
        assert label.tolist() == [labels[j]] and (one[0].int() - images[j].int()).abs().max() <= 1


def test_generate_guides_the_requested_channels_against_the_null_class():
    # eps = uncond + s (cond - uncond) on the first k channels with the null label (row num_classes), cond elsewhere;
    # by hand with two plain forwards, through sample.generate and sample.sample_indices
    model, d, s = _random_dit(), gd.Diffusion(), 3.0
    gens = [torch.Generator().manual_seed(7 * 1_000_003 + i) for i in range(3)]
    noise = torch.stack([torch.randn(3, 16, 16, generator=g) for g in gens])
    y = torch.tensor([1, 3, 0])

    def by_hand(k, null=NUM_CLASSES):
        def fn(x, t):
            cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null))
            out = cond.clone()
            out[:, :k] = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
            return out
        return d.sample(fn, noise, steps="ddim2")

    ref = by_hand(2)
    torch.testing.assert_close(sample.generate(model, d, y, noise, steps="ddim2", cfg_scale=s, guided_channels=2), ref,
                               rtol=1e-4, atol=1e-5)
    images, labels = sample.sample_indices(model, d, [0, 1, 2], CPU, seed=7, steps="ddim2", cfg_scale=s,
                                           guided_channels=2, class_labels=[1, 3, 0])
    assert labels.tolist() == [1, 3, 0]
    assert (images.int() - sample.to_uint8(ref).int()).abs().max() <= 1
    # the test can tell: guiding all three channels, or against a real class, gives other images
    for other in (by_hand(3), by_hand(2, null=NUM_CLASSES - 1)):
        assert (sample.to_uint8(other).int() - images.int()).abs().max() > 1


def _random_dit_checkpoint(tmp_path):
    """A train.py checkpoint of TINY's DiT whose EMA holds _random_dit's weights (strongly label-dependent, unlike a
    barely trained network, whose adaLN-zero output is near 0) and whose raw weights are a trained step's."""
    path = checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["ema"] = _random_dit().state_dict()
    torch.save(ckpt, path)
    return str(path)


def test_sample_py_seed_guidance_and_precision_flags_reach_every_sample(tmp_path, monkeypatch):
    # --seed, --guided-channels, --precision and --compile-mode were checked only for being refused; sample.main with them equals
    # sample_indices by hand (one batch of 17 against main's 8 + 8 + 1), and each changes the samples it should
    ckpt = _random_dit_checkpoint(tmp_path)
    precisions, real_generate = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, precision="bf16", **k: precisions.append(precision)
                        or real_generate(*a, precision=precision, **k))
    modes = []  # and --compile-mode reaches the compile (recorded, the network left eager)
    monkeypatch.setattr(sample, "compile_for_sampling", lambda model, mode="default": modes.append(mode) or model)
    sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "s"), "--num-samples", "17", "--batch-size", "8", "--steps", "ddim2",
                 "--seed", "3", "--cfg-scale", "3", "--guided-channels", "2", "--precision", "fp32", "--compile",
                 "--compile-mode", "max-autotune-no-cudagraphs"])
    got = np.load(tmp_path / "s" / "samples.npz")
    assert precisions == ["fp32"] * 3 and modes == ["max-autotune-no-cudagraphs"]  # CUDA's autocast choice is the flag's
    assert sorted(os.listdir(tmp_path / "s")) == ["grid.png", "samples.npz"]  # the batches' parts are removed
    sample.save_grid(got["arr_0"], tmp_path / "all.png")  # the grid shows every sample up to 64
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / "grid.png")), np.asarray(Image.open(tmp_path / "all.png")))
    model, d = _random_dit(), gd.Diffusion()

    def by_hand(seed=3, guided_channels=2):
        return sample.sample_indices(model, d, list(range(17)), CPU, seed=seed, batch_size=17, steps="ddim2", cfg_scale=3.0,
                                     guided_channels=guided_channels)

    images, labels = by_hand()
    assert got["arr_1"].tolist() == labels.tolist()
    assert np.abs(got["arr_0"].astype(int) - images.numpy().astype(int)).max() <= 1
    for other in (by_hand(seed=0), by_hand(guided_channels=None)):  # the test can tell
        assert np.abs(got["arr_0"].astype(int) - other[0].numpy().astype(int)).max() > 1


def test_generate_autocasts_the_network_to_bf16_only_on_cuda_with_precision_bf16(monkeypatch):
    # CPU samples ignore --precision, so the choice is read off torch.autocast: a stand-in CUDA noise and sampler
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None, enabled=True:
                        seen.append((device_type, dtype, enabled)) or contextlib.nullcontext())
    d = types.SimpleNamespace(sample=lambda model_fn, noise, **kw: noise)
    for device, precision in (("cuda", "bf16"), ("cuda", "fp32"), ("cpu", "bf16")):
        noise = types.SimpleNamespace(device=torch.device(device))
        assert sample.generate(_random_dit(), d, torch.tensor([0]), noise, precision=precision) is noise
    assert seen == [("cuda", torch.bfloat16, True), ("cuda", torch.bfloat16, False), ("cuda", torch.bfloat16, False)]


def test_load_model_gives_eval_mode_and_refuses_inf_and_weights_that_do_not_fit(tmp_path):
    # train mode would drop labels to the null class at random while sampling (LabelEmbedder); an inf weight
    # samples NaN images as a NaN does; a state dict that does not fit must not load partly (strict)
    ckpt_path = checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1"))[-1]
    model, _, _ = sample.load_model(str(ckpt_path))
    assert not model.training
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    bad = copy.deepcopy(ckpt)
    bad["ema"]["final_layer.linear.bias"][0] = float("inf")
    torch.save(bad, tmp_path / "inf.pt")
    with pytest.raises(ValueError, match="1 of the 'ema' tensors hold NaN or inf"):
        sample.load_model(str(tmp_path / "inf.pt"))
    for edit, says in ((lambda sd: sd.pop("final_layer.linear.bias"), 'Missing key(s) in state_dict: "final_layer.linear.bias"'),
                       (lambda sd: sd.update(extra=torch.zeros(1)), 'Unexpected key(s) in state_dict: "extra"')):
        bad = copy.deepcopy(ckpt)
        edit(bad["ema"])
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=r"'ema' weights do not fit the model its arguments describe") as e:
            sample.load_model(str(tmp_path / "bad.pt"))
        assert says in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(SystemExit, match="do not fit"):  # one line from sample.py, not a traceback
            sample.main(["--ckpt", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "s"), "--num-samples", "1"])


def test_rtr_models_are_rebuilt_with_their_saved_seed():
    # R-TR's random masks come from --rtr-seed: a sampler that rebuilt them with seed 0 routed other channels
    args = vars(train.parse_args(["--model", "DiT-S/2", "--depth", "1", "--method", "rtr", "--rtr-seed", "5"])) | {
        "num_classes": 10, "in_channels": 3}
    router = sample.build_model(args).router
    assert router.kind == "random" and router.seed == 5
    assert torch.equal(router.masks, TaskRouter(router.masks.shape[2], kind="random", seed=5).masks)
    assert not torch.equal(router.masks, sample.build_model({**args, "rtr_seed": 0}).router.masks)
    old = {k: v for k, v in args.items() if k != "rtr_per_block"}  # trained when every block shared one table
    with pytest.raises(ValueError, match="one random mask table shared by every block.*commit 3b13113"):
        sample.build_model(old)
    assert sample.build_model({**old, "method": "dtr"}).router.kind == "dtr"  # DTR's masks did not change


def test_a_latent_model_with_no_samples_on_this_rank_gives_empty_images_of_image_size():
    # with fewer FID samples than ranks, a rank's empty share has the decoded image size, as the other ranks' images
    images, labels = sample.sample_indices(_random_dit(), gd.Diffusion(), [], CPU, decode=types.SimpleNamespace(factor=8))
    assert images.shape == (0, 128, 128, 3) and images.dtype == torch.uint8 and labels.shape == (0,)


def test_save_grid_places_each_image_row_by_row_with_white_2_pixel_gaps(tmp_path):
    images = np.stack([np.full((4, 3, 3), 10 * (i + 1), np.uint8) for i in range(5)])  # (5, 4, 3, 3)
    images[:, 0, 0] = 0  # a corner marks each tile's orientation
    sample.save_grid(images, tmp_path / "g.png")  # ceil(sqrt(5)) = 3 per row, 2 rows
    want = np.full((2 * 6 + 2, 3 * 5 + 2, 3), 255, np.uint8)
    for i, (r, c) in enumerate([(2, 2), (2, 7), (2, 12), (8, 2), (8, 7)]):
        want[r: r + 4, c: c + 3] = images[i]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), want)
    sample.save_grid(images[:4], tmp_path / "g4.png", nrow=4)  # train.py's grids: 4 per row
    assert np.asarray(Image.open(tmp_path / "g4.png")).shape == (6 + 2, 4 * 5 + 2, 3)
    real_save = Image.Image.save

    def cut_short(self, f, format=None):  # the PNG written in part, then a full disk
        real_save(self, f, format=format)
        f.truncate(20)
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as m:  # a resumed train.py takes an existing grid for one made
        m.setattr(Image.Image, "save", cut_short)
        with pytest.raises(OSError):
            sample.save_grid(images, tmp_path / "cut.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g4.png"]


def test_sample_py_refuses_guidance_of_a_model_without_a_null_class(tmp_path):
    # --class-dropout-prob 0 leaves no null-class row: any scale but 1, below 1 too, would index past the table
    ckpt = str(checkpoints(run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1", "--class-dropout-prob", "0"))[-1])
    for scale in ("1.5", "0.5", "0"):
        with pytest.raises(SystemExit, match="trained without label dropout"):
            sample.main(["--ckpt", ckpt, "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "ddim2",
                         "--cfg-scale", scale])
    assert not (tmp_path / "s").exists()


def test_latent_sample_py_neither_clips_the_latents_and_decodes_with_the_vae_flag(latent_setup, tmp_path, monkeypatch):
    # latents are not bounded to [-1, 1] (the training path was checked, sample.main not); --vae replaces the
    # checkpoint's decoder (here one with other decoder weights, the same latent space)
    root, vae, images, folder = latent_setup
    other = _tiny_vae(tmp_path / "vae2")
    with torch.no_grad():
        other.post_quant_conv.weight.mul_(-1)
    other.save_pretrained(tmp_path / "vae2")
    train.main(LATENT_TINY + ["--data", str(folder), "--image-size", "16", "--max-steps", "2", "--out", str(tmp_path / "run")])
    ckpt = str(checkpoints(tmp_path / "run")[-1])
    clips, real_generate = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, clip_denoised=True, **k: clips.append(clip_denoised)
                        or real_generate(*a, clip_denoised=clip_denoised, **k))
    flags = ["--ckpt", ckpt, "--num-samples", "3", "--batch-size", "3", "--steps", "ddim2"]
    sample.main(flags + ["--out", str(tmp_path / "own")])
    sample.main(flags + ["--out", str(tmp_path / "vae2"), "--vae", str(tmp_path / "vae2")])
    assert clips == [False, False]
    model, d, args = sample.load_model(ckpt)
    for out, name in (("own", None), ("vae2", str(tmp_path / "vae2"))):
        want, _ = sample.sample_indices(model, d, [0, 1, 2], CPU, steps="ddim2", clip_denoised=False,
                                        decode=latents.load_decoder(args["latent"], "cpu", name))
        got = np.load(tmp_path / out / "samples.npz")["arr_0"]
        assert np.abs(got.astype(int) - want.numpy().astype(int)).max() <= 1, out
    assert np.abs(np.load(tmp_path / "own" / "samples.npz")["arr_0"].astype(int)
                  - np.load(tmp_path / "vae2" / "samples.npz")["arr_0"].astype(int)).max() > 1


# ---------------------------------------------------------------------------------------------- compiled sampling

@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches and counters emptied before and after the test: compiled graphs hang on
    DiT.forward's code object, which every test's DiT shares, so another test's graphs would be reused or counted."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset(), counters.clear()
    yield
    torch._dynamo.reset(), counters.clear()


def record_graphs(monkeypatch, code=None):
    """Make torch.compile trace with Dynamo as usual but run each graph eagerly (fast: no Inductor). Returns a list
    that gets, per graph compiled, ("sampling" or "training" by the grad mode, batch size of the (N, 3, 16, 16) input);
    the list `code`, if given, gets each graph's Python source."""
    graphs = []

    def backend(gm, example_inputs):
        n = [x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor) and tuple(x.shape[1:]) == (3, 16, 16)]
        graphs.append(("training" if torch.is_grad_enabled() else "sampling", *n))
        if code is not None:
            code.append(gm.code)
        return gm.forward
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    return graphs


def test_compiled_sampling_equals_eager_and_reads_the_updated_weights(fresh_dynamo):
    # Inductor (C++ kernels on the CPU) against the eager network: DDIM with guidance on 2 samples and DDPM without on
    # 4 both run the network on a batch of 4, so one graph serves both; an in-place weight update (as the EMA's lerp)
    # reaches the compiled graph without a recompile
    from torch._dynamo.utils import counters
    eager, d = _random_dit(), gd.Diffusion()
    compiled = sample.compile_for_sampling(copy.deepcopy(eager))
    noise, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])

    def run(model, n, **kw):  # DDPM's step noise from a generator seeded afresh: the same draws for both models
        gen = torch.Generator().manual_seed(1)
        return sample.generate(model, d, y[:n], noise[:n], noise_fn=lambda x: torch.randn(x.shape, generator=gen), **kw)

    outs = []
    for _ in range(2):  # before and after an update of the weights
        for n, kw in ((2, dict(steps="ddim3", cfg_scale=1.5)), (4, dict(steps="3"))):
            outs.append(run(compiled, n, **kw))
            torch.testing.assert_close(outs[-1], run(eager, n, **kw), rtol=1e-3, atol=1e-4)
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            for a, b in zip(eager.parameters(), compiled.parameters()):
                delta = 0.02 * torch.randn(a.shape, generator=g)
                a.add_(delta), b.add_(delta)
    assert not torch.allclose(outs[0], outs[2], atol=1e-3)  # the update changed the samples
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_sampling_pads_the_short_last_batch_and_compiles_once(monkeypatch, fresh_dynamo):
    graphs = record_graphs(monkeypatch)
    model, d = _random_dit(), gd.Diffusion()
    eager = copy.deepcopy(model)
    sample.compile_for_sampling(model)
    idx = [5, 0, 3, 7, 2, 9, 11]  # batches of 4 and 3: the last is padded to 4 rows, 8 through the network with guidance
    for steps in ("3", "ddim2"):
        got, labels = sample.sample_indices(model, d, idx, CPU, seed=4, batch_size=4, steps=steps, cfg_scale=1.5)
        want, want_labels = sample.sample_indices(eager, d, idx, CPU, seed=4, batch_size=4, steps=steps, cfg_scale=1.5)
        assert got.shape == (7, 16, 16, 3) and torch.equal(labels, want_labels)
        assert (got.int() - want.int()).abs().max() <= 1
    assert graphs == [("sampling", 8)]  # one graph for every batch of both runs
    # fewer samples than the batch size: the batch shrinks to them rather than padding 2 samples to 64
    sample.sample_indices(model, d, [0, 1], CPU, steps="ddim2")
    assert graphs == [("sampling", 8), ("sampling", 2)]
    images, labels = sample.sample_indices(model, d, [], CPU, steps="ddim2")  # a rank with nothing to do
    assert images.shape == (0, 16, 16, 3) and labels.shape == (0,)



def test_compiled_sampling_specialises_each_batch_size_rather_than_one_symbolic_graph(monkeypatch, fresh_dynamo):
    # dynamic=False: Dynamo's default would turn the second batch size into a graph with a symbolic batch, which the
    # third then reuses, and which Inductor cannot specialise to any batch
    graphs = record_graphs(monkeypatch)
    model = sample.compile_for_sampling(_random_dit())
    for n in (4, 2, 3):
        sample.sample_indices(model, gd.Diffusion(), list(range(n)), CPU, steps="ddim2")
    assert graphs == [("sampling", 4), ("sampling", 2), ("sampling", 3)]

def test_train_compile_samples_from_the_ema_compiled_once_per_batch_size(tmp_path, monkeypatch, fresh_dynamo):
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": TinyNet())
    flags = ["--global-batch-size", "4", "--max-steps", "3", "--fid-every", "1", "--fid-samples", "6", "--fid-batch-size", "4",
             "--fid-steps", "ddim2", "--fid-cfg", "1.5", "--fid-ref-limit", "16", "--sample-every", "2", "--sample-steps", "ddim2",
             "--ema-decay", "0.5", "--lr", "1e-2"]
    eager = [r["fid"] for r in metrics(run_train(tmp_path, *flags, name="eager")) if "fid" in r]
    graphs = record_graphs(monkeypatch)
    out = run_train(tmp_path, *flags, "--compile", name="compiled")
    # three FID evaluations (6 samples: a batch of 4 and one of 2 padded to 4, doubled by guidance); the two grids
    # (16 images) run eager: no graph for them
    assert sorted(graphs) == [("sampling", 8), ("training", 4)]
    assert sorted(p.name for p in out.glob("samples_*.png")) == ["samples_0000002.png", "samples_0000003.png"]
    compiled = [r["fid"] for r in metrics(out) if "fid" in r]
    assert len(compiled) == 3 and compiled == pytest.approx(eager, rel=1e-5)  # the compiled EMA follows the updates


@pytest.mark.parametrize("method", ["vanilla", "dtr", "ant-pcgrad", "rtr+ant-nash", "dtr+ant-uw", "dtr+curriculum",
                                    "curriculum+ant-uw"])
def test_train_compile_traces_each_method_as_one_graph_without_breaks_or_recompiles(tmp_path, monkeypatch, fresh_dynamo,
                                                                                     method):
    # Issue 7: --compile compiles the DiT (with its router) once per batch shape, on its first step. What changes from
    # step to step, the curriculum's stage and t range, ANT's cluster labels, UW's weights, Nash-MTL's update and
    # kept-alpha steps, PCGrad's order, lives outside the compiled model or reaches it as tensors: no graph break and
    # no guard (a Python number that changes per step) that would recompile. PCGrad runs the model on each cluster's
    # slice of the batch (2 of 2 images here), and Nash-MTL on its update steps: a second, static graph for the slice.
    # 4 steps: stages 2 and 3 start after steps 1 and 2 (the last stage hands curriculum+ant-uw back to stratified
    # sampling); Nash-MTL solves at steps 0 and 2.
    from torch._dynamo.utils import counters
    code = []
    graphs = record_graphs(monkeypatch, code)
    out = run_train(tmp_path, "--compile", "--method", method, "--global-batch-size", "4", "--max-steps", "4",
                    "--ant-clusters", "2", "--nash-every", "2", "--curriculum-pacing", "fixed",
                    "--curriculum-stage-steps", "1", "--curriculum-clusters", "3")
    expected = {"ant-pcgrad": [("training", 2)], "rtr+ant-nash": [("training", 2), ("training", 4)]}
    assert graphs == expected.get(method, [("training", 4)])
    assert not counters["graph_break"] and not counters["recompiles"]
    assert counters["stats"]["unique_graphs"] == len(graphs)
    # the router is inside the graph: one lookup of its mask table per forward, shared by the blocks
    routed = "dtr" in method or "rtr" in method
    assert code[0].count("router_buffers_masks_[") == routed
    if "curriculum" in method:
        assert [r["stage"] for r in metrics(out) if r.get("event") == "curriculum_stage"] == [1, 2, 3]
    if "nash" in method:
        nash = last_checkpoint(out)["method"]["nash"]
        assert nash["steps"] == 4 and nash["updates"] + nash["failures"] == 2


def test_sample_py_compile_samples_as_eager(tmp_path, fresh_dynamo, capsys):
    from torch._dynamo.utils import counters
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--ema-decay", "0.5", "--lr", "1e-2")
    flags = ["--ckpt", str(checkpoints(out)[-1]), "--num-samples", "5", "--batch-size", "2", "--steps", "ddim3",
             "--cfg-scale", "1.5"]
    sample.main(flags + ["--out", str(tmp_path / "eager")])
    sample.main(flags + ["--out", str(tmp_path / "compiled"), "--compile"])  # Inductor
    eager, compiled = np.load(tmp_path / "eager" / "samples.npz"), np.load(tmp_path / "compiled" / "samples.npz")
    np.testing.assert_array_equal(compiled["arr_1"], eager["arr_1"])
    assert np.abs(compiled["arr_0"].astype(int) - eager["arr_0"].astype(int)).max() <= 1
    assert len(np.unique(eager["arr_0"])) > 10  # trained weights: the samples are not a flat image
    assert counters["stats"]["unique_graphs"] == 1  # batches of 2, 2 and 1 padded to 2 (4 with guidance)
    with pytest.raises(SystemExit, match="add --compile"):
        sample.main(flags + ["--out", str(tmp_path / "x"), "--compile-mode", "max-autotune-no-cudagraphs"])


def test_to_uint8_rounds_to_nearest_and_puts_channels_last():
    # (x + 1) * 127.5 rounded, as the official DiT sampler's clamp(127.5 x + 128) truncated: 0 -> 128, not 127
    x = torch.tensor([-2.0, -1.0, -0.999, -0.5, 0.0, 0.5, 0.999, 1.0, 1.5]).view(1, 1, 1, 9).expand(1, 3, 1, 9).clone()
    x[:, 1] = 0.0
    out = sample.to_uint8(x)
    assert out.shape == (1, 1, 9, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 64, 128, 191, 255, 255, 255]
    assert out[0, 0, :, 1].tolist() == [128] * 9


def test_min_snr_gamma_flag_reaches_the_diffusion():
    # w = min(SNR, gamma) / SNR with the flag's gamma (2, not the default 5), SNR from float64 linear betas by hand
    args = train.parse_args(TINY + ["--weighting", "min-snr", "--min-snr-gamma", "2"])
    args.num_classes = NUM_CLASSES
    diffusion = sample.build_diffusion(vars(args))
    abar = np.cumprod(1 - _betas("linear"))
    snr = abar / (1 - abar)
    np.testing.assert_allclose(diffusion.loss_weight, np.minimum(snr, 2.0) / snr, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- Resume: the method state after 3 + 3 steps equals an uninterrupted 6-step run's, exactly

@pytest.mark.parametrize("method", ["ant-pcgrad", "ant-nash", "curriculum", "curriculum-adaptive"])
def test_method_state_resumes_exactly(tmp_path, method):
    common = ["--method", method.replace("-adaptive", ""), "--global-batch-size", "10", *METHOD_FLAGS]
    if method == "curriculum-adaptive":  # plateau pacing: the loss EMA, best and patience count carry over
        common += ["--curriculum-pacing", "adaptive", "--curriculum-smoothing", "0.3", "--curriculum-patience", "3"]
    straight = run_train(tmp_path, *common, "--max-steps", "6", "--ckpt-every", "3", name="straight")
    run_train(tmp_path, *common, "--max-steps", "3", name="split")
    resumed = run_train(tmp_path, *common, "--max-steps", "6", "--ckpt-every", "3", "--resume", "auto", name="split")
    a, b = last_checkpoint(straight), last_checkpoint(resumed)
    assert a["step"] == b["step"] == 6
    assert deep_equal(a["method"], b["method"]) == []
    # the state did move in those 6 steps (so equality is not trivially the initial state)
    first = torch.load(checkpoints(straight)[0], map_location="cpu", weights_only=True)
    assert first["step"] == 3 and deep_equal(first["method"], a["method"]) != []
    if method == "ant-pcgrad":
        fresh = torch.Generator().manual_seed(0)
        for _ in range(6):  # 6 steps x K orders of K - 1 tasks from one generator seeded with --global-seed
            for _ in range(5):
                torch.randperm(4, generator=fresh)
        assert torch.equal(a["method"]["order_gen"], fresh.get_state())
    if method == "ant-nash":
        assert a["method"]["nash"]["updates"] + a["method"]["nash"]["failures"] == 3  # steps 0, 2, 4
        assert a["method"]["nash"]["steps"] == 6  # the saved counter follows the run
    if method == "curriculum-adaptive":  # still in stage 1 at step 6, so what was resumed at step 3 reaches the end
        c = a["method"]["curriculum"]
        assert c["stage"] == 1 and c["stage_updates"] == 6 and c["ema_sum"] != 0 and c["best"] is not None
        assert c["bad_updates"] > 0
    if method == "curriculum":
        assert a["method"]["curriculum"]["stage"] == 4  # advanced after steps 2, 4, 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


# ==============================================================================================
#                        Reliability: signals, crashes, bad data
# ==============================================================================================

def _spawn(tmp_path, name, *flags, script=None):
    """A real training process (optionally through a wrapper script), output to a log file."""
    out = tmp_path / name
    cmd = [sys.executable, str(script) if script else "train.py", *TINY, "--out", str(out), *flags]
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}), out


def _wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _steps_logged(out):
    """The last step metrics.jsonl records; read while the run appends, so a line not yet complete is left out."""
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the text after the last newline is incomplete
    return max([json.loads(l).get("step", 0) for l in lines], default=0)


SLOW_AFTER_5 = """
import sys, time
sys.path.insert(0, {repo!r})
import train
real_step = train.train_step
def slow_step(run, x, y, step):
    if step >= 5:
        time.sleep(0.2)  # leaves the test seconds to send SIGTERM before the run could end by itself
    return real_step(run, x, y, step)
train.train_step = slow_step
train.main(sys.argv[1:])
"""


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    # Every leg on one thread, as the subprocess (bit-identical results need the same reduction order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flags = ["--global-batch-size", "4", "--max-steps", "40", "--ckpt-every", "1000"]
        straight = run_train(tmp_path, *flags, name="straight")
        script = tmp_path / "slow_after_5.py"
        script.write_text(SLOW_AFTER_5.format(repo=str(REPO)))
        proc, out = _spawn(tmp_path, "cut", *flags, script=script)
        assert _wait_for(lambda: _steps_logged(out) >= 5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        log = (tmp_path / "cut.log").read_text()
        assert "stopped by a signal" in log and "--resume auto" in log
        stopped_at = last_checkpoint(out)["step"]
        assert 5 <= stopped_at < 40
        run_train(tmp_path, *flags, "--resume", "auto", name="cut")
    finally:
        torch.set_num_threads(threads)
    a, b = last_checkpoint(straight), last_checkpoint(out)
    assert b["step"] == 40 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_stop_signal_during_the_step_before_a_checkpoint_stops_at_that_checkpoint(tmp_path, monkeypatch, capsys):
    # "finishing the step and writing a checkpoint": the signal comes during step 2, whose checkpoint is due anyway;
    # the run stops there, not after one more step and a second checkpoint write (a preemption's grace period is short)
    real_step = train.train_step

    def spy(run, x, y, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by train's handler
        return real_step(run, x, y, step)

    monkeypatch.setattr(train, "train_step", spy)
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "6", "--ckpt-every", "2", "--log-every", "100")
    assert "stopped by a signal at step 2" in capsys.readouterr().out
    assert [p.name for p in checkpoints(out)] == ["0000002.pt"]
    # the steps since the last record are logged before the stop (they were lost: the resumed run starts after them)
    assert [(r["step"], np.isfinite(r["loss"])) for r in metrics(out) if "loss" in r] == [(2, True)]


def test_a_job_wide_sigterm_that_reaches_the_dataloader_workers_still_stops_at_a_checkpoint(tmp_path, monkeypatch, capsys):
    # Slurm signals every process of a job at its time limit (Ctrl-C: the terminal's process group). A worker that died
    # of it failed the next step ("DataLoader worker is killed by signal") and the run ended without its checkpoint.
    import multiprocessing
    before = set(multiprocessing.active_children())
    real_step = train.train_step

    def spy(run, x, y, step):
        if step == 1:
            workers = [str(p.pid) for p in multiprocessing.active_children() if p not in before]
            assert len(workers) == 2
            kill = "import os, signal, sys; [os.kill(int(p), signal.SIGTERM) for p in sys.argv[1:]]"
            subprocess.run([sys.executable, "-c", kill, *workers], check=True)  # from another process, as the job's
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, x, y, step)

    monkeypatch.setattr(train, "train_step", spy)
    out = run_train(tmp_path, "--num-workers", "2", "--global-batch-size", "4", "--max-steps", "20", "--ckpt-every", "100",
                    "--log-every", "100")
    assert "stopped by a signal at step 3" in capsys.readouterr().out
    assert [p.name for p in checkpoints(out)] == ["0000003.pt"]


WORKERS = """
import multiprocessing, os, signal, sys, types
import torch
sys.path.insert(0, {repo!r})
import train

if __name__ == "__main__":
    torch.multiprocessing.set_start_method(sys.argv[1])
    data = torch.utils.data.TensorDataset(torch.arange(8.0), torch.zeros(8, dtype=torch.long))
    if sys.argv[1] == "forkserver":  # an earlier loader, as the FID reference's: the forkserver runs without the mask
        list(torch.utils.data.DataLoader(data, num_workers=1))
    batches = train.batches(data, [[0, 1]] * 1000, types.SimpleNamespace(data_on_device=False, num_workers=2),
                            torch.device("cpu"))
    assert next(batches)[0].tolist() == [0.0, 1.0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the trainer's own mask is given back
    workers = multiprocessing.active_children()
    print(*[w.pid for w in workers], flush=True)
    sys.stdin.readline()  # meanwhile the job's stop signals reach the workers
    assert [w.is_alive() for w in workers] == [True, True]
    assert [next(batches)[0].tolist() for _ in range(10)] == [[0.0, 1.0]] * 10
    os.kill(workers[0].pid, signal.SIGTERM)  # the trainer's own, as its shutdown of a stuck worker
    workers[0].join(timeout=30)
    print(workers[0].exitcode, workers[1].is_alive(), flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_outlive_a_job_wide_sigterm_and_sigint_and_end_on_the_trainers_sigterm(tmp_path, method):
    # Slurm signals every process of a job at its time limit (Ctrl-C: the terminal's process group). Under spawn and
    # forkserver (Python 3.14's default) a worker imports numpy and torch itself, and their thread pools, running before
    # worker_init_fn, took the SIGTERM that it blocks in its own thread: the workers must start with it blocked.
    # The test above stops within the batches the workers had already queued, so it passes with workers that died.
    script = tmp_path / "trainer.py"
    script.write_text(WORKERS.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}  # thread pools in the workers, as usual
    proc = subprocess.Popen([sys.executable, str(script), method], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        workers = proc.stdout.readline().split()
        assert len(workers) == 2
        for pid in workers:  # from another process, as the job's
            assert len(os.listdir(f"/proc/{pid}/task")) > 1 or method == "fork"  # threads that could take a signal
            for task in Path(f"/proc/{pid}/task").iterdir():  # each blocks both (SIGINT is ignored only from worker_init_fn)
                if "sigtimedwait" in (task / "wchan").read_text():  # but the waiter, which takes SIGTERM in sigwaitinfo
                    continue
                blocked = int(re.search(r"SigBlk:\s*(\w+)", (task / "status").read_text()).group(1), 16)
                assert blocked >> (signal.SIGTERM - 1) & 1 and blocked >> (signal.SIGINT - 1) & 1, (task, hex(blocked))
            os.kill(int(pid), signal.SIGTERM)
            os.kill(int(pid), signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "0 True\n"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


DECODE = """
import os, signal, sys, time, types
import torch
sys.path.insert(0, {repo!r})
import train


class Held(torch.utils.data.Dataset):  # each worker says it is decoding, then waits for the test's signals
    def __len__(self):
        return 512  # two of dataset_to_tensor's batches of 256: one for each worker

    def __getitem__(self, i):
        open(os.path.join({folder!r}, f"worker{{os.getpid()}}"), "w").close()
        while not os.path.exists(os.path.join({folder!r}, "go")):
            time.sleep(0.01)
        return torch.full((3, 2, 2), i % 256, dtype=torch.uint8), i


if __name__ == "__main__":
    torch.multiprocessing.set_start_method(sys.argv[1])
    batches = train.batches(Held(), [[3, 1]] * 10, types.SimpleNamespace(data_on_device=True, num_workers=2),
                            torch.device("cpu"))
    print(next(batches)[1].tolist(), signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_data_on_device_decode_workers_outlive_a_job_wide_sigterm_and_sigint(tmp_path, method):
    # --data-on-device decodes the set inside the loop's first step, with the stop handler installed, by workers of its
    # own DataLoader: started without the block, they died of the job's SIGTERM and the run ended in a traceback
    script = tmp_path / "trainer.py"
    script.write_text(DECODE.format(repo=str(REPO), folder=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, str(script), method], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert _wait_for(lambda: len(list(tmp_path.glob("worker*"))) == 2, timeout=60)
        for pid in (int(p.name[len("worker"):]) for p in tmp_path.glob("worker*")):  # from another process, as the job's
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out == "[3, 1] True\n", err[-2000:]
    finally:
        proc.kill()


def test_train_called_directly_gives_back_the_signal_handlers_when_its_loop_ends(tmp_path):
    # a notebook's train.train(args), without main's safety net: Ctrl-C must interrupt the notebook again afterwards
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    args = train.parse_args(TINY + ["--out", str(tmp_path / "run"), "--global-batch-size", "4", "--max-steps", "1"])
    assert train.train(args) == 1
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_run_that_stops_on_an_error_gives_back_the_signal_handlers(tmp_path, monkeypatch):
    # otherwise Ctrl-C in the calling process (pytest itself) only sets the stop flag of a run that has ended
    real_step = train.train_step

    def fail(run, x, y, step):
        if step == 2:
            raise train.ConfigError("non-finite loss at step 3; stopping")
        return real_step(run, x, y, step)

    monkeypatch.setattr(train, "train_step", fail)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "5")
    assert {s: signal.getsignal(s) for s in before} == before


SLOW_SAVE = """
import sys, time, torch
sys.path.insert(0, {repo!r})
import train
real_save = torch.save
def slow_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if isinstance(obj, dict) and obj.get("step") == 4:
        f.flush(); time.sleep(60)   # the checkpoint of step 4 stays half-way (not yet renamed)
torch.save = slow_save
train.main(sys.argv[1:])
"""


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path, capsys):
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(repo=str(REPO)))
    flags = ["--global-batch-size", "4", "--max-steps", "6", "--ckpt-every", "2"]
    proc, out = _spawn(tmp_path, "killed", *flags, script=script)
    assert _wait_for(lambda: any(p.name.startswith("0000004.pt.tmp") for p in (out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else False)
    proc.kill()
    proc.wait()
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["0000002.pt"]
    (out / "checkpoints" / "0000003.pt").write_bytes(b"truncated")  # a newer, broken checkpoint is skipped
    with pytest.raises(SystemExit) as e:  # named explicitly, it is refused with a message, not a traceback
        train.main(TINY + ["--out", str(out), *flags, "--resume", str(out / "checkpoints" / "0000003.pt")])
    refused = capsys.readouterr()
    assert e.value.code == 2 and "cannot be loaded" in refused.err
    assert "a checkpoint write that never finished" in refused.out and not list((out / "checkpoints").glob("*.tmp*"))
    run_train(tmp_path, *flags, "--resume", "auto", name="killed")
    text = capsys.readouterr().out
    assert "skipping" in text and "0000003.pt" in text and "resumed from" in text and "0000002.pt at step 2" in text
    assert (out / "checkpoints" / "0000003.pt.unreadable").read_bytes() == b"truncated"  # kept, out of --keep-last's way
    assert last_checkpoint(out)["step"] == 6


def test_resume_auto_refuses_when_no_checkpoint_loads_and_never_overwrites_a_renamed_one(tmp_path, capsys):
    flags = ["--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "1"]
    out = tmp_path / "run"
    run_train(tmp_path, *flags, "--resume", "auto")  # an empty folder: a fresh start, and it says so
    assert "no checkpoint in" in capsys.readouterr().out and last_checkpoint(out)["step"] == 2
    good = (out / "checkpoints" / "0000001.pt").read_bytes()
    for p in (out / "checkpoints").glob("*.pt"):
        p.write_bytes(b"unreadable right now")
    with pytest.raises(SystemExit) as e:  # not a silent restart from step 0
        run_train(tmp_path, *flags, "--resume", "auto")
    assert e.value.code == 2 and "none of the 2 checkpoint(s)" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0000001.pt", "0000002.pt"]
    (out / "checkpoints" / "0000002.pt.unreadable").write_bytes(b"renamed before")
    (out / "checkpoints" / "0000001.pt").write_bytes(good)
    run_train(tmp_path, *flags, "--resume", "auto")  # resumes from 1, renames the unreadable 2 beside the earlier copy
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["0000001.pt", "0000002.pt", "0000002.pt.unreadable", "0000002.pt.unreadable1"], names
    assert (out / "checkpoints" / "0000002.pt.unreadable").read_bytes() == b"renamed before"


def test_resume_auto_skips_a_newer_checkpoint_that_lacks_a_part(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    full = {"model": {}, "ema": {}, "opt": {}, "step": 1, "args": {}, "method": {}, "rng": []}
    torch.save(full, folder / "0000001.pt")
    for missing in full:  # e.g. no optimiser state (or no rng): resuming it would fail with a traceback (KeyError 'rng')
        torch.save({k: v for k, v in full.items() if k != missing}, folder / "0000002.pt")
        logs = []
        path, ckpt = train.find_resume("auto", str(tmp_path), logs.append)
        assert Path(path).name == "0000001.pt" and ckpt == full, missing
        assert f"missing ['{missing}']" in logs[0]


def test_resume_of_a_file_that_holds_no_dict_is_refused_in_one_line(tmp_path, capsys):
    # `"model" in tensor` raises a RuntimeError: missing_keys must not ask a saved tensor for its keys
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert train.missing_keys(torch.zeros(3)) == list(train.CHECKPOINT_KEYS)
    assert "is not a train.py checkpoint" in _train_error(tmp_path, capsys, "--resume", str(tmp_path / "tensor.pt"))


def test_a_failed_checkpoint_write_stops_with_the_previous_one_intact(tmp_path, monkeypatch, capsys):
    real_save = train.atomic_save

    def disk_full_at_step_4(obj, path):
        if obj["step"] == 4:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(train, "atomic_save", disk_full_at_step_4)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out", str(tmp_path / "full"), "--global-batch-size", "4", "--max-steps", "6", "--ckpt-every", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left" in err and "0000002.pt is intact" in err and "--resume auto" in err
    assert [p.name for p in (tmp_path / "full" / "checkpoints").glob("*.pt")] == ["0000002.pt"]


def test_atomic_save_raises_a_full_disks_oserror_not_torchs_runtime_error(tmp_path):
    # torch.save reports a failed write as RuntimeError("... unexpected pos ..."), which save_checkpoint's
    # `except OSError` missed: a traceback (and under torchrun, every rank's) instead of the one-line stop above.
    # A real write failure: a file-size limit, with SIGXFSZ ignored, fails write() with EFBIG as a full disk does
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            train.atomic_save({"w": torch.zeros(100_000)}, str(tmp_path / "c.pt"))  # 400 KB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert list(tmp_path.iterdir()) == []  # and no half file


@contextlib.contextmanager
def locked_by_another_process(path):
    """Hold fid.lock_folder's lock on `path` from a child process, as a second job writing into the folder would."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_lock_folder_warns_and_goes_on_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    import fcntl

    def no_locks(f, how):
        raise OSError(37, "No locks available")  # ENOLCK, as on an NFS mount without lockd

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    logged = []
    assert fid.lock_folder(str(tmp_path), "x.lock", logged.append) is None
    assert logged == [f"warning: cannot lock {tmp_path / 'x.lock'} ([Errno 37] No locks available); nothing stops a "
                      f"second process from writing into {tmp_path} while this one does"]


def test_a_second_train_py_into_a_running_runs_out_is_refused_and_changes_nothing(tmp_path, capsys):
    # there was no lock: before the first checkpoint two runs trained into one --out, overwriting each other's
    # checkpoints and doubling metrics.jsonl; and a second start, refused later, first removed the running run's
    # checkpoint being written as a stale *.pt.tmp, which stopped that run
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    writing = out / "checkpoints" / "0000004.pt.tmp999"
    writing.write_bytes(b"half a checkpoint")
    with locked_by_another_process(out / "train.lock"):
        with pytest.raises(SystemExit):
            train.main(TINY + ["--out", str(out), "--max-steps", "1"])
        assert "a train.py run is going on: another process is writing into" in capsys.readouterr().err
        assert writing.exists() and not list(out.glob("metrics.jsonl"))
    run_train(tmp_path, "--max-steps", "1")  # the lock went with its process
    assert not writing.exists() and last_checkpoint(out)["step"] == 1
    run_train(tmp_path, "--max-steps", "2", "--resume", "auto")  # a second run in this process is not refused


def test_resume_with_another_batch_size_warns(tmp_path, capsys):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "2")
    run_train(tmp_path, "--global-batch-size", "8", "--max-steps", "3", "--resume", "auto")
    assert "trained with --global-batch-size 4, now 8" in capsys.readouterr().out
    assert last_checkpoint(out)["step"] == 3
    # each start's record says where it started, and the resumed one holds its own flags
    starts = [r for r in metrics(out) if r.get("event") == "start"]
    assert [(r["step"], r["args"]["global_batch_size"]) for r in starts] == [(0, 4), (2, 8)]


def test_resume_on_a_data_set_of_another_size_warns(tmp_path, capsys):
    # the data order continues at step x batch over a permutation of the new set: nothing said so
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=images)
    run_train(tmp_path, "--data", str(tmp_path / "d.npz"), "--global-batch-size", "4", "--max-steps", "1")
    run_train(tmp_path, "--data", str(tmp_path / "d.npz"), "--global-batch-size", "4", "--max-steps", "2", "--resume", "auto")
    assert "training examples" not in capsys.readouterr().out  # the same set: nothing to say
    np.savez(tmp_path / "d.npz", arr_0=images[:10])
    run_train(tmp_path, "--data", str(tmp_path / "d.npz"), "--global-batch-size", "4", "--max-steps", "3", "--resume", "auto")
    out = capsys.readouterr().out
    assert "holds 10 training examples, the checkpoint's run had 12; the data order from step 2" in out
    assert "--data-size" not in out  # not listed as a flag


def test_keep_last_prunes_only_older_checkpoints(tmp_path):
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "5", "--ckpt-every", "1", "--keep-last", "2")
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["0000004.pt", "0000005.pt"]


def test_keep_last_that_cannot_remove_an_old_checkpoint_warns_and_trains_on(tmp_path, monkeypatch, capsys):
    # the new checkpoint is on disk: a failed prune is no failed write, and no reason to stop
    real_remove = os.remove

    def remove(path):
        if str(path).endswith("0000002.pt"):
            raise PermissionError(13, "Permission denied", path)
        real_remove(path)

    monkeypatch.setattr(os, "remove", remove)
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "6", "--ckpt-every", "2", "--keep-last", "1")
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["0000002.pt", "0000006.pt"]
    assert "--keep-last 1: cannot remove" in capsys.readouterr().out


def test_nash_messages_number_steps_like_the_log_metrics_and_checkpoints(tmp_path, monkeypatch):
    # "step s" in log.txt is the s-th step, the one whose metrics record and checkpoint say step s
    real_update = nt.NashMTL.update

    def failing(self, grads):
        return {**real_update(self, grads), "success": False, "message": "forced"}

    monkeypatch.setattr(nt.NashMTL, "update", failing)
    out = run_train(tmp_path, "--method", "ant-nash", "--nash-every", "3", "--global-batch-size", "5", "--max-steps", "4")
    solved = [line.split(":")[0] for line in (out / "log.txt").read_text().splitlines() if "Nash-MTL solver failed" in line]
    assert solved == ["step 1", "step 4"]  # the 1st and 4th steps (0-based 0 and 3) solve


def test_checkpoints_are_ordered_by_step_and_other_files_are_not_ours(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("9999999.pt", "10000000.pt", "0000005.pt", "best.pt", "0000007.pt.unreadable"):
        (folder / name).write_bytes(b"")
    assert [Path(p).name for p in train.checkpoint_paths(str(tmp_path))] == ["10000000.pt", "9999999.pt", "0000005.pt"]


def test_a_start_that_would_overwrite_or_prune_checkpoints_is_refused(tmp_path, capsys):
    flags = ["--global-batch-size", "4", "--ckpt-every", "1", "--keep-last", "2"]
    out = run_train(tmp_path, *flags, "--max-steps", "3")
    kept = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.pt")}
    assert sorted(kept) == ["0000002.pt", "0000003.pt"]
    capsys.readouterr()
    for extra in ([], ["--resume", str(out / "checkpoints" / "0000002.pt")]):  # a fresh run; a branch at step 2
        with pytest.raises(SystemExit) as e:
            run_train(tmp_path, *flags, "--max-steps", "5", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "0000003.pt" in err and "another --out" in err and "--resume auto" in err
        assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.pt")} == kept  # untouched
    # The branch goes to its own folder; the original run continues with --resume auto.
    branch = run_train(tmp_path, *flags, "--max-steps", "4", "--resume", str(out / "checkpoints" / "0000002.pt"), name="branch")
    assert sorted(p.name for p in (branch / "checkpoints").glob("*.pt")) == ["0000003.pt", "0000004.pt"]
    run_train(tmp_path, *flags, "--max-steps", "4", "--resume", "auto")
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["0000003.pt", "0000004.pt"]


def test_claim_checkpoint_folder_counts_the_start_step_and_keeps_every_renamed_copy(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "0000002.pt").write_bytes(b"this run's step 2")
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(b"")
    logs = []
    # another folder's step-2 checkpoint resumed into this one: --keep-last would later prune this run's step 2
    with pytest.raises(train.ConfigError, match="0000002.pt"):
        train.claim_checkpoint_folder(str(tmp_path), 2, str(elsewhere), False, logs.append, True)
    train.claim_checkpoint_folder(str(tmp_path), 2, str(folder / "0000002.pt"), False, logs.append, True)  # itself: fine
    # --resume auto: a rank other than 0 leaves the files alone (rank 0 renames them; two renamers would race)
    train.claim_checkpoint_folder(str(tmp_path), 1, None, True, logs.append, False)
    assert [p.name for p in folder.iterdir()] == ["0000002.pt"]
    # rank 0 renames it beside two earlier renamed copies and overwrites neither
    (folder / "0000002.pt.unreadable").write_bytes(b"first")
    (folder / "0000002.pt.unreadable1").write_bytes(b"second")
    train.claim_checkpoint_folder(str(tmp_path), 1, None, True, logs.append, True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        "0000002.pt.unreadable": b"first", "0000002.pt.unreadable1": b"second", "0000002.pt.unreadable2": b"this run's step 2"}


def test_skip_nonfinite_tolerates_n_bad_steps_without_nan_weights(tmp_path, monkeypatch):
    losses = poison_losses(monkeypatch, {2})
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "4", "--skip-nonfinite", "1", "--log-every", "2")
    ckpt = last_checkpoint(out)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for k in ("model", "ema") for v in ckpt[k].values())
    first = [r for r in metrics(out) if "loss" in r][0]  # steps 1 and 2: only step 1's losses are finite
    assert first["step"] == 2 and first["loss"] == pytest.approx(losses[0].mean().item(), rel=1e-5)  # once halved by zeros


def test_skip_nonfinite_counts_the_steps_skipped_before_a_resume(tmp_path, monkeypatch, capsys):
    # the count restarted at 0 on resume: a run that stopped and resumed tolerated N more bad steps
    poison_losses(monkeypatch, {2, 3})  # step 2, then step 3 after the resume
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--skip-nonfinite", "1")
    assert last_checkpoint(out)["nonfinite"] == 1
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "4", "--skip-nonfinite", "1", "--resume", "auto")
    assert "non-finite loss at step 3; stopping" in capsys.readouterr().err


def test_truncated_jpeg_is_named_and_skipped_on_request(tmp_path, capsys):
    from PIL import Image
    _write_images(tmp_path / "imgs", 4)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "imgs" / "b" / "cut.jpg").write_bytes(data[: len(data) // 2])
    err = _train_error(tmp_path, capsys, "--data", str(tmp_path / "imgs"), "--global-batch-size", "9")
    assert "cut.jpg" in err
    out = run_train(tmp_path, "--data", str(tmp_path / "imgs"), "--skip-bad-images", "--global-batch-size", "4",
                    "--max-steps", "2")
    assert "skipped 1 unreadable images" in (out / "log.txt").read_text()


def test_small_images_are_counted_and_resized_up(tmp_path):
    _write_images(tmp_path / "imgs", 2, size=8)
    out = run_train(tmp_path, "--data", str(tmp_path / "imgs"), "--global-batch-size", "4", "--max-steps", "1")
    assert "4 images are smaller than 16px" in (out / "log.txt").read_text()


def test_unwritable_results_folder_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _train_error(tmp_path, capsys, "--out", str(tmp_path / "file" / "run"))
    assert "cannot write to the results folder" in err


def test_a_full_disk_fails_before_training_and_leaves_no_probe_behind(tmp_path, capsys, monkeypatch):
    # the folder can be made (so the test above passes without the probe), but its 1 MiB probe finds the disk full
    # before any training; the probe, written in part, was left in the folder (on a full disk)
    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    err = _train_error(tmp_path, capsys)
    assert "cannot write to the results folder" in err and "No space left" in err
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["checkpoints"]  # no probe, no metrics.jsonl


CRASH_ONCE = """
import os, sys
sys.path.insert(0, {repo!r})
import train
real_step = train.train_step
def crashing_step(run, x, y, step):
    if step == 5 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ["RANK"] == "1":
        os._exit(1)   # a worker dies mid-run, once
    return real_step(run, x, y, step)
train.train_step = crashing_step
train.main(sys.argv[1:])
"""


DRIFT_ON_RANK_1 = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
real_step = train.train_step
def drifting_step(run, x, y, step):
    out = real_step(run, x, y, step)
    if step == 0 and os.environ["RANK"] == "1":
        with torch.no_grad():  # the EMA of one replica drifts, or its method state (DDP syncs neither)
            next(run.ema.parameters() if run.method.uw is None else run.method.uw.parameters()).add_(1e-3)
    return out
train.train_step = drifting_step
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("method", ["vanilla", "ant-uw"])
@retry_rank_abort
def test_replica_drift_stops_the_run_at_the_checkpoint(tmp_path, method):
    script = tmp_path / "drift.py"
    script.write_text(DRIFT_ON_RANK_1.format(repo=str(REPO)))
    r = torchrun(str(script), *TINY, "--method", method, "--global-batch-size", "10", "--max-steps", "4",
                 "--ckpt-every", "2", "--out", str(tmp_path / "drift"))
    assert r.returncode != 0 and "differs across ranks at step 2" in r.stdout + r.stderr
    assert not list((tmp_path / "drift" / "checkpoints").glob("*.pt"))  # nothing written from drifted replicas


COMPILED_DDP = """
import functools, os, sys, torch
sys.path.insert(0, {repo!r})
import train
torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 50_000  # DDP's (and DDPOptimizer's) first bucket: below the cap below
train.DDP = functools.partial(train.DDP, bucket_cap_mb=0.05)  # several buckets, as DiT-S/2 has at 25 MB
torch.compile = functools.partial(torch.compile, backend="aot_eager")  # fast, same autograd
real_backward = train.Method.backward
def counting_backward(self, loss_vec, cluster, step):
    if step == 1 and os.environ["RANK"] == "0":  # Nash's first plain step
        seen, stack = set(), [loss_vec.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                stack.extend(next_node for next_node, _ in node.next_functions)
        print("compiled backward pieces:", sum("CompiledFunction" in node.name() for node in seen))
    return real_backward(self, loss_vec, cluster, step)
train.Method.backward = counting_backward
train.main(sys.argv[1:])
"""


@retry_rank_abort
def test_two_process_compiled_model_splits_backward_at_ddp_buckets_and_matches_eager(tmp_path):
    # DDP(torch.compile(model)): the compile runs inside DDP's forward, so Dynamo's DDPOptimizer splits the graph at
    # the bucket boundaries and each bucket can all-reduce while backward goes on. ANT-Nash every 2 steps covers both
    # paths: a forward and backward of each cluster's slice under no_sync (steps 0, 2), DDP's all-reduce (step 1).
    script = tmp_path / "compiled_ddp.py"
    script.write_text(COMPILED_DDP.format(repo=str(REPO)))
    flags = [*TINY, "--method", "ant-nash", "--nash-every", "2", "--global-batch-size", "10", "--max-steps", "3",
             "--class-dropout-prob", "0"]
    r = torchrun(str(script), *flags, "--compile", "--out", str(tmp_path / "compiled"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split("compiled backward pieces: ")[1].split()[0]) > 1
    assert "model replicas, EMA and method state identical on 2 ranks" in r.stdout
    r = torchrun("train.py", *flags, "--out", str(tmp_path / "eager"))
    assert r.returncode == 0, r.stderr[-3000:]
    compiled, eager = last_checkpoint(tmp_path / "compiled")["model"], last_checkpoint(tmp_path / "eager")["model"]
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-6)


BUCKET_VIEW_DDP = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
ddp = train.DDP
def recording_ddp(*args, **kwargs):
    if os.environ["RANK"] == "0":  # one rank: two ranks' prints can interleave mid-line
        print("gradient_as_bucket_view:", kwargs.get("gradient_as_bucket_view", False), flush=True)
    if os.environ["GRADIENTS"] == "copies":
        kwargs["gradient_as_bucket_view"] = False  # DDP's default
    return ddp(*args, **kwargs)
train.DDP = recording_ddp
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("method", ["ant-nash", "dtr+ant-uw"])
@retry_rank_abort
def test_two_process_gradients_as_bucket_views_train_exactly_as_copied_gradients(tmp_path, method):
    # train.py's DDP keeps each .grad as a view into its all-reduce bucket (no second copy of the gradients). The
    # same two-process run with DDP's default copies gives the same weights bit for bit: ANT-Nash every 2 steps
    # covers DDP's all-reduce (step 1) and .grad written outside it (steps 0 and 2, under no_sync); ANT-UW the
    # all-reduce of its own parameters next to DDP's.
    script = tmp_path / "bucket_view.py"
    script.write_text(BUCKET_VIEW_DDP.format(repo=str(REPO)))
    flags = [*TINY, "--method", method, "--nash-every", "2", "--global-batch-size", "10", "--max-steps", "3",
             "--max-grad-norm", "1"]
    for name in ("views", "copies"):
        r = torchrun(str(script), *flags, "--out", str(tmp_path / name), env={"GRADIENTS": name})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "gradient_as_bucket_view: True" in r.stdout  # what train.py asks for
    views, copies = last_checkpoint(tmp_path / "views"), last_checkpoint(tmp_path / "copies")
    assert all(torch.equal(views["model"][k], copies["model"][k]) for k in views["model"])
    assert deep_equal(views["method"], copies["method"]) == [] and deep_equal(views["opt"], copies["opt"]) == []


@retry_rank_abort
def test_torchrun_max_restarts_recovers_from_a_crashed_worker(tmp_path):
    script = tmp_path / "crash_once.py"
    script.write_text(CRASH_ONCE.format(repo=str(REPO)))
    r = torchrun("--max-restarts=1", str(script), *TINY, "--global-batch-size", "4", "--max-steps", "8", "--ckpt-every", "2",
                 "--resume", "auto", "--out", str(tmp_path / "el"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "0000004.pt at step 4" in r.stdout
    assert last_checkpoint(tmp_path / "el")["step"] == 8


# ==============================================================================================
#                                   latents.py (latent diffusion)
# ==============================================================================================
# A tiny randomly initialised AutoencoderKL (2 blocks: downsampling factor 2, not the SD VAE's 8)
# saved with save_pretrained stands in for sd-vae-ft-ema, so nothing is downloaded. Tests that need
# diffusers skip without it (pip install diffusers).


LATENT_REPO = Path(latents.__file__).resolve().parent
LATENT_TINY = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--num-workers", "0", "--sample-every", "0", "--log-every", "1", "--global-batch-size", "4",
               "--sample-steps", "ddim2"]
# Stops a process in the middle of a batch: after the latents of batch 2 are written, before its
# labels and its progress record. Counts the images each process encodes.
CRASHING_ENCODE = """
import os, sys
sys.path.insert(0, {repo!r})
import latents
calls, limit = [0], int(os.environ["CRASH_AT_WRITE"])
real_write, real_encode = latents.pwrite_rows, latents.encode_batch

def pwrite_rows(*args):
    if calls[0] == limit:
        os._exit(3)
    calls[0] += 1
    real_write(*args)

def encode_batch(vae, x, rows, *args):
    with open(os.environ["COUNT_FILE"] + os.environ["RANK"], "a") as f:
        f.write(f"{{len(rows) // 2}}\\n")
    return real_encode(vae, x, rows, *args)

latents.pwrite_rows, latents.encode_batch = pwrite_rows, encode_batch
latents.main()
"""


def _tiny_vae(folder, blocks=(8, 16), **config):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), layers_per_block=1, latent_channels=4,
                        sample_size=32, norm_num_groups=8, **config)
    vae.save_pretrained(folder)
    return vae.eval()


def _image_folder(folder, n_per_class=5):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    """(root, VAE folder, image folder, latent folder encoded in this process, flip both)."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("latents")
    _tiny_vae(root / "vae")
    images = _image_folder(root / "images")
    latents.main(["encode", "--data", str(images), "--out", str(root / "lat"), "--vae", str(root / "vae"),
                  "--image-size", "16", "--batch-size", "3", "--num-workers", "0"])
    return root, root / "vae", images, root / "lat"


def _expected_rows(vae_folder, images, flip_rows=True):
    """Latents computed directly: image i at row 2i, its mirror at row 2i + 1."""
    vae = latents.load_vae(str(vae_folder))
    ds = datasets.load_dataset(str(images), 16)
    x = datasets.to_model_input(torch.stack([ds[i][0] for i in range(len(ds))]), flip=False)  # (N, 3, 16, 16)
    x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # (2N, 3, 16, 16)
    return latents.encode_batch(vae, x, np.arange(len(x)), "sample", 0), np.repeat([ds[i][1] for i in range(len(ds))], 2)


def test_latents_cli_refuses_bad_counts_devices_and_files_before_the_vae(tmp_path, capsys):
    # each once got past to the VAE (and then the DataLoader), or ended in a traceback (torch.device, an .npy's array)
    np.save(tmp_path / "z.npy", np.zeros((2, 4, 4, 4), np.float32))
    np.savez(tmp_path / "z.npz", arr_0=np.zeros((2, 4, 4, 4), np.float32))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "images.npz").write_bytes(b"an earlier decode")
    enc = ["encode", "--data", "shapes", "--out", str(tmp_path / "lat"), "--vae", "none"]
    dec = ["decode", "--latents", str(tmp_path / "z.npz"), "--out", str(tmp_path / "rec"), "--vae", "none"]
    for argv, says in ((enc + ["--batch-size", "0"], "--batch-size 0"), (enc + ["--image-size", "0"], "--image-size 0"),
                       (enc + ["--num-workers", "-1"], "--num-workers -1"), (enc + ["--device", "gpu"], "--device gpu: not a device"),
                       (dec + ["--batch-size", "0"], "--batch-size 0"), (dec + ["--device", "gpu"], "--device gpu: not a device"),
                       (dec[:2] + [str(tmp_path / "z.npy")] + dec[3:], "expected an .npz"),
                       (dec[:4] + [str(tmp_path / "done")] + dec[5:], "images.npz exists; decoded images are not overwritten")):
        with pytest.raises(SystemExit) as e:
            latents.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and "Traceback" not in err, argv
    assert not (tmp_path / "lat").exists() and not (tmp_path / "rec").exists()


def test_latents_refuse_an_empty_out_and_an_empty_npz_before_the_vae(tmp_path, monkeypatch, capsys):
    # encode --out '' wrote latents.npy, labels.npy and manifest.json into the working folder, past the check for
    # other files there; decode of zero latents ended in a reshape traceback from the VAE
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "none.npz", arr_0=np.zeros((0, 4, 4, 4), np.float32))
    for argv, says in ((["encode", "--data", "shapes", "--out", "", "--vae", "none"], "--out is empty"),
                       (["decode", "--latents", "none.npz", "--out", "", "--vae", "none"], "--out is empty"),
                       (["decode", "--latents", "none.npz", "--out", "rec", "--vae", "none"], "with N >= 1, got (0, 4, 4, 4)")):
        err = _exit_message(capsys, latents.main, argv)
        assert says in err and "Traceback" not in err, argv
    assert sorted(os.listdir(tmp_path)) == ["none.npz"]
    (tmp_path / "a_file").write_text("x")  # a bare "[Errno 20] Not a directory" or "[Errno 17] File exists" before
    for argv in (["encode", "--data", "shapes", "--out", "a_file", "--vae", "none"],
                 ["decode", "--latents", "none.npz", "--out", "a_file", "--vae", "none"]):
        assert "--out a_file is a file" in _exit_message(capsys, latents.main, argv), argv


def test_missing_diffusers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(latents.LatentError, match="pip install diffusers"):
        latents.load_vae("stabilityai/sd-vae-ft-ema")


def test_factor_scale_and_posterior_follow_the_vae_config(tmp_path):
    pytest.importorskip("diffusers")
    vae2, vae4 = _tiny_vae(tmp_path / "v2"), _tiny_vae(tmp_path / "v4", blocks=(8, 8, 16))
    assert latents.vae_factor(vae2) == 2 and latents.vae_factor(vae4) == 4
    assert latents.vae_scale_shift(vae2) == (pytest.approx(0.18215), 0.0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    q = vae2.encode(x).latent_dist
    mean = latents.encode_batch(vae2, x, [0, 1, 2], "mean")
    torch.testing.assert_close(mean, q.mean * 0.18215)
    drawn = latents.encode_batch(vae2, x, [7, 8, 9], "sample", seed=1)  # (3, 4, 8, 8)
    eps = (drawn / 0.18215 - q.mean) / q.std
    assert eps.std().item() == pytest.approx(1.0, abs=0.25)
    # each row's draw depends only on (seed, row), not on the batch it was encoded in
    torch.testing.assert_close(latents.encode_batch(vae2, x[2:], [9], "sample", seed=1), drawn[2:])
    decoder = latents.Decoder(vae2, 0.18215)
    torch.testing.assert_close(decoder(mean), vae2.decode(q.mean).sample)
    assert decoder.factor == 2


def test_encode_resumes_after_a_torn_progress_record(latent_setup, tmp_path, monkeypatch):
    # A crash mid-append leaves a torn last record; the rerun must cut it before appending, or every
    # later record is shifted by 4 bytes and the folder can never be completed.
    _, vae_folder, images, _ = latent_setup
    out = tmp_path / "lat"
    flags = ["encode", "--data", str(images), "--out", str(out), "--vae", str(vae_folder), "--image-size", "16",
             "--batch-size", "3", "--num-workers", "0"]
    real, calls = latents.encode_batch, []

    def crash_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(latents, "encode_batch", crash_at_the_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        latents.main(flags)
    log = out / "progress" / "rank0.idx"
    assert np.frombuffer(log.read_bytes(), np.int64).tolist() == [0, 1, 2, 3, 4, 5]
    log.write_bytes(log.read_bytes()[:-4])  # images 3, 4 and a torn half of 5
    monkeypatch.setattr(latents, "encode_batch", real)
    latents.main(flags)
    ds = datasets.load_dataset(str(out), 16)
    expected, labels = _expected_rows(vae_folder, images)
    np.testing.assert_allclose(ds.array().astype(np.float32), expected.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.manifest["complete"] and not (out / "progress").exists()


@retry_rank_abort
def test_two_process_encode_resumes_after_a_crash_without_duplicates(tmp_path):
    pytest.importorskip("diffusers")
    _tiny_vae(tmp_path / "vae")
    images = _image_folder(tmp_path / "images")  # 10 images: each process takes 5, in batches of 2, 2, 1
    out = tmp_path / "lat"
    (tmp_path / "crashing.py").write_text(CRASHING_ENCODE.format(repo=str(LATENT_REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "crashing.py"),
           "encode", "--data", str(images), "--out", str(out), "--vae", str(tmp_path / "vae"), "--image-size", "16",
           "--batch-size", "2", "--num-workers", "0"]

    def run(crash_at, count_file):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CRASH_AT_WRITE": str(crash_at), "COUNT_FILE": str(count_file)}
        return subprocess.run(cmd, cwd=LATENT_REPO, capture_output=True, text=True, timeout=300, env=env)

    first = run(3, tmp_path / "first")  # batch 1 complete; batch 2's latents written, then the crash
    assert first.returncode != 0
    assert json.loads((out / datasets.MANIFEST).read_text())["complete"] is False
    np.testing.assert_array_equal(np.flatnonzero(latents.done_images(str(out), 10)), [0, 1, 5, 6])
    with pytest.raises(datasets.DataError, match="resume"):
        datasets.load_dataset(str(out), 16)

    second = run(-1, tmp_path / "second")
    if second.returncode != 0 and RANK_ABORT in second.stderr:
        raise RankAbort(second.stderr[-3000:])
    assert second.returncode == 0, second.stderr[-3000:]
    encoded = sum(int(n) for r in range(2) for n in (tmp_path / f"second{r}").read_text().split())
    assert encoded == 6  # only the 10 - 4 images not recorded; finished batches are not encoded again
    manifest = json.loads((out / datasets.MANIFEST).read_text())
    assert manifest["complete"] and manifest["count"] == 20 and manifest["num_images"] == 10
    assert (manifest["factor"], manifest["latent_size"], manifest["channels"]) == (2, 8, 4)
    assert manifest["scale"] == pytest.approx(0.18215) and manifest["flip"] == "both" and manifest["classes"] == ["a", "b"]
    assert not (out / "progress").exists()
    ds = datasets.load_dataset(str(out), 16)
    stored = ds.array()
    assert isinstance(ds, datasets.LatentFolder) and stored.shape == (20, 4, 8, 8) and stored.dtype == np.float16
    expected, labels = _expected_rows(tmp_path / "vae", images)
    np.testing.assert_allclose(stored.astype(np.float32), expected.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(ds.labels, labels)


def test_latent_folder_yields_float16_and_pickles_without_its_map(latent_setup):
    _, _, _, folder = latent_setup
    ds = datasets.load_dataset(str(folder), 16)
    x, y = ds[3]
    assert x.dtype == torch.float16 and x.shape == (4, 8, 8) and y == 0 and len(ds) == 20 and ds.num_classes == 2
    assert len(pickle.dumps(ds)) < 4096  # DataLoader workers map the file themselves


def test_train_on_latents_vanilla_with_fid_and_dtr_then_sample_decodes(latent_setup, tmp_path, monkeypatch):
    root, vae, images, folder = latent_setup
    import fid

    class PoolNet(torch.nn.Module):  # stands in for Inception: (N, 3, H, W) in [0, 1] -> 6-d pool features
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, x):
            pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
            return {"pool": pool, "spatial": pool, "logits": pool}

    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": PoolNet())
    clips = []
    real_generate = sample.generate

    def generate(*args, clip_denoised=True, **kw):
        clips.append(clip_denoised)
        return real_generate(*args, clip_denoised=clip_denoised, **kw)

    monkeypatch.setattr(train, "generate", generate)
    monkeypatch.setattr(sample, "generate", generate)
    base = LATENT_TINY + ["--data", str(folder), "--image-size", "16", "--max-steps", "2"]
    train.main(base + ["--out", str(tmp_path / "vanilla"), "--fid-every", "2", "--fid-samples", "4", "--fid-steps", "ddim2",
                       "--fid-batch-size", "4", "--fid-ref", str(images)])
    train.main(base + ["--out", str(tmp_path / "dtr"), "--method", "dtr"])
    assert clips and not any(clips)  # latents are never clipped to [-1, 1]
    for name in ("vanilla", "dtr"):
        ckpt = torch.load(tmp_path / name / "checkpoints" / "0000002.pt", map_location="cpu", weights_only=True)
        a = ckpt["args"]
        assert a["in_channels"] == 4 and a["image_size"] == 16
        assert a["latent"]["size"] == 8 and a["latent"]["factor"] == 2 and a["latent"]["vae"] == str(vae)
        assert ckpt["model"]["x_embedder.proj.weight"].shape[1] == 4
        assert Image.open(tmp_path / name / "samples_0000002.png").size == (74, 74)  # 4 x 4 decoded 16 px images
    records = [json.loads(line) for line in (tmp_path / "vanilla" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("fid", np.nan)) for r in records)
    model, _, _ = sample.load_model(str(tmp_path / "dtr" / "checkpoints" / "0000002.pt"))
    assert model.input_size == 8 and model.router is not None
    sample.main(["--ckpt", str(tmp_path / "dtr" / "checkpoints" / "0000002.pt"), "--out", str(tmp_path / "s"),
                 "--num-samples", "3", "--batch-size", "2", "--steps", "ddim2", "--cfg-scale", "1.5"])
    arr = np.load(tmp_path / "s" / "samples.npz")
    assert arr["arr_0"].shape == (3, 16, 16, 3) and arr["arr_0"].dtype == np.uint8 and arr["arr_1"].shape == (3,)


def test_decode_cli_writes_adm_npz_from_a_folder_or_an_npz(latent_setup, tmp_path):
    root, vae, _, folder = latent_setup
    latents.main(["decode", "--latents", str(folder), "--out", str(tmp_path / "rec"), "--num", "4"])
    rec = np.load(tmp_path / "rec" / "images.npz")
    assert rec["arr_0"].shape == (4, 16, 16, 3) and rec["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(rec["arr_1"], np.load(folder / "labels.npy")[:4])
    assert (tmp_path / "rec" / "grid.png").exists()
    z = np.load(folder / "latents.npy")[:3].astype(np.float32)
    np.savez(tmp_path / "z.npz", arr_0=z)
    latents.main(["decode", "--latents", str(tmp_path / "z.npz"), "--vae", str(vae), "--out", str(tmp_path / "rec2")])
    np.testing.assert_array_equal(np.load(tmp_path / "rec2" / "images.npz")["arr_0"], rec["arr_0"][:3])
    z[1, 0, 0, 0] = np.inf  # would decode to a NaN image, saved black
    np.savez(tmp_path / "zinf.npz", arr_0=z)
    with pytest.raises(latents.LatentError, match="1 of the 3 latents hold NaN or inf"):
        latents.decode(latents.parse_args(["decode", "--latents", str(tmp_path / "zinf.npz"), "--vae", str(vae),
                                           "--out", str(tmp_path / "rec3")]))
    assert not (tmp_path / "rec3").exists()
    np.savez(tmp_path / "zlab.npz", arr_0=z[[0, 2]], arr_1=np.arange(3))  # images.npz paired them with other labels
    with pytest.raises(latents.LatentError, match=r"arr_1 must hold one label per latent, \(2,\), got shape \(3,\)"):
        latents.decode(latents.parse_args(["decode", "--latents", str(tmp_path / "zlab.npz"), "--vae", str(vae),
                                           "--out", str(tmp_path / "rec3")]))



def test_decode_write_cut_short_leaves_no_images_npz_that_refuses_the_rerun(latent_setup, tmp_path, monkeypatch):
    # as sample.py's samples.npz: a half images.npz (a full disk) once refused the rerun as "exists"
    argv = ["decode", "--latents", str(latent_setup[3]), "--out", str(tmp_path / "rec"), "--num", "2"]
    savez = np.savez

    def disk_full(file, **arrays):
        if "images.npz" in str(getattr(file, "name", file)):
            (file if hasattr(file, "write") else open(file, "wb")).write(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")
        return savez(file, **arrays)
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(SystemExit):
        latents.main(argv)
    assert [p.name for p in (tmp_path / "rec").iterdir()] == []  # no images.npz, no temporary file
    monkeypatch.setattr(np, "savez", savez)
    latents.main(argv)
    assert np.load(tmp_path / "rec" / "images.npz")["arr_0"].shape == (2, 16, 16, 3)


def _fake_encode_rank(monkeypatch, rank, broadcast, barrier=lambda: None):
    """latents.dist faked as `rank` of a two-process group whose broadcast_object_list is `broadcast`."""
    fake = types.SimpleNamespace(init_process_group=lambda *a, **k: None, get_rank=lambda: rank, get_world_size=lambda: 2,
                                 broadcast_object_list=broadcast, barrier=barrier, destroy_process_group=lambda: None,
                                 is_available=lambda: True, is_initialized=lambda: False)  # main's exit: sys.exit
    monkeypatch.setattr(latents, "dist", fake)
    monkeypatch.setenv("RANK", str(rank))


def test_encode_ranks_all_read_the_progress_logs_before_any_rank_appends(latent_setup, tmp_path, monkeypatch):
    # Each rank splits the images that its own read of the logs leaves. A rank that read them after another had
    # logged its first batch split a shorter list, and images fell between the shares: a fresh two-process encode
    # with a slow rank 0 ended in "2 images are still not encoded". Rank 0 of a faked two-process group:
    root, vae, images, _ = latent_setup
    events = []
    _fake_encode_rank(monkeypatch, 0, lambda box, src: None, barrier=lambda: events.append("barrier"))
    done_images, encode_share = latents.done_images, latents.encode_share
    monkeypatch.setattr(latents, "done_images", lambda *a: events.append("read") or done_images(*a))
    monkeypatch.setattr(latents, "encode_share", lambda *a: events.append("append") or encode_share(*a))
    with pytest.raises(SystemExit):  # rank 1's half is missing at the end
        latents.main(["encode", "--data", str(images), "--out", str(tmp_path / "lat"), "--vae", str(vae),
                      "--image-size", "16", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"])
    assert events[:3] == ["read", "barrier", "append"]


def test_a_second_encode_into_a_folder_being_encoded_is_refused(latent_setup, tmp_path):
    # two encodes into one --out (a job submitted twice) would write the same rows and progress logs
    root, vae, images, _ = latent_setup
    (tmp_path / "lat").mkdir()
    argv = ["encode", "--data", str(images), "--out", str(tmp_path / "lat"), "--vae", str(vae), "--image-size", "16",
            "--num-workers", "0"]
    with locked_by_another_process(tmp_path / "lat" / ".encode.lock"):
        with pytest.raises(latents.LatentError, match="a latents.py encode is going on: another process is writing"):
            latents.encode(latents.parse_args(argv))
        assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == [".encode.lock"]  # nothing else written
    latents.main(argv)  # the lock went with its process
    assert json.loads((tmp_path / "lat" / datasets.MANIFEST).read_text())["complete"]


def test_encode_errors_of_rank_0_reach_the_other_ranks(latent_setup, tmp_path, monkeypatch):
    # rank 0 alone prepares --out and marks it complete; an error there must be broadcast, or the other ranks wait in
    # the next collective (an OSError, e.g. an --out under a file, was raised on rank 0 alone; so was the final check)
    root, vae, images, _ = latent_setup
    sent = []
    _fake_encode_rank(monkeypatch, 0, lambda box, src: sent.append(box[0]))
    (tmp_path / "file").write_text("x")
    argv = ["encode", "--data", str(images), "--vae", str(vae), "--image-size", "16", "--num-workers", "0"]
    with pytest.raises(SystemExit):
        latents.main(argv + ["--out", str(tmp_path / "file" / "o")])
    assert "Not a directory" in sent[-1]
    sent.clear()
    with pytest.raises(SystemExit):  # rank 0 of two encodes its half: the other half is missing at the end
        latents.main(argv + ["--out", str(tmp_path / "lat")])
    assert sent[:3] == [None, None, None] and "still not encoded" in sent[3]  # the VAE, the lock, the folder
    replay = iter(sent)  # rank 1 receives what rank 0 sent
    _fake_encode_rank(monkeypatch, 1, lambda box, src: box.__setitem__(0, next(replay)))
    with pytest.raises(SystemExit) as e:
        latents.main(argv + ["--out", str(tmp_path / "lat")])
    assert e.value.code == 2 and next(replay, "all read") == "all read"  # stopped by the third message (rank 0 prints it)
    sent.clear()  # a bug on rank 0 (not bad input) keeps its traceback there, and the other ranks are told
    _fake_encode_rank(monkeypatch, 0, lambda box, src: sent.append(box[0]))
    monkeypatch.setattr(latents, "prepare_folder", lambda *a: {}["complete"])
    with pytest.raises(KeyError):
        latents.main(argv + ["--out", str(tmp_path / "lat2")])
    assert sent[-1] == "rank 0 stopped (KeyError: 'complete')"


def _exit_message(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def test_latent_mistakes_give_one_line_errors(latent_setup, tmp_path, capsys):
    root, vae, images, folder = latent_setup
    base = LATENT_TINY + ["--max-steps", "1", "--out", str(tmp_path / "o")]
    err = _exit_message(capsys, train.main, base + ["--data", str(folder), "--image-size", "32"])
    assert "holds latents of 16px images" in err and "--image-size 16" in err
    err = _exit_message(capsys, train.main, base + ["--data", str(folder), "--image-size", "16", "--fid-every", "1"])
    assert "--fid-ref" in err
    err = _exit_message(capsys, train.main, base + ["--data", str(images), "--image-size", "16", "--vae", str(vae)])
    assert "--vae is for latent folders" in err
    # a VAE missing on the training machine stops the run before its first step, not at its first grid
    err = _exit_message(capsys, train.main, LATENT_TINY + ["--max-steps", "1", "--out", str(tmp_path / "novae"), "--data", str(folder),
                                                           "--image-size", "16", "--vae", str(tmp_path / "missing-vae")])
    assert "cannot load the VAE" in err and '"loss"' not in (tmp_path / "novae" / "metrics.jsonl").read_text()
    err = _exit_message(capsys, latents.main, ["encode", "--data", str(images), "--out", str(folder), "--vae", str(vae),
                                               "--image-size", "16", "--flip", "none"])
    assert "other settings" in err and "flip" in err
    err = _exit_message(capsys, latents.main, ["decode", "--latents", str(folder), "--out", str(tmp_path / "d"),
                                               "--vae", str(tmp_path / "missing-vae")])
    assert "cannot load the VAE" in err and "internet" in err
    for num in ("0", "-3"):  # 0 once decoded everything, -3 all but the last 3
        err = _exit_message(capsys, latents.main, ["decode", "--latents", str(folder), "--out", str(tmp_path / "d"), "--num", num])
        assert f"--num {num}: give a positive count" in err
    own = _image_folder(tmp_path / "imgs")  # an --out holding other files once got the manifest, which made the
    (own / ".DS_Store").write_bytes(b"")  # hidden: not counted among them
    before = sorted(p.name for p in own.rglob("*"))  # image folder a latent folder for train.py
    err = _exit_message(capsys, latents.main, ["encode", "--data", str(own), "--out", str(own), "--vae", str(vae),
                                               "--image-size", "16", "--num-workers", "0"])
    assert "already holds other files (a, b)" in err and sorted(p.name for p in own.rglob("*")) == before
    (tmp_path / "file").write_text("x")  # an --out under a file: a traceback, for decode after the decoding
    for argv in (["encode", "--data", str(own), "--vae", str(vae), "--image-size", "16", "--num-workers", "0"],
                 ["decode", "--latents", str(folder), "--num", "2"]):
        err = _exit_message(capsys, latents.main, argv + ["--out", str(tmp_path / "file" / "o")])
        assert "Not a directory" in err, argv


def test_latent_size_that_the_patch_does_not_divide_is_refused(latent_setup, tmp_path, capsys):
    # check_flags sees only the image size (12 % 4 = 0); the latent size (6) is checked against the patch after loading
    folder = tmp_path / "lat6"
    folder.mkdir()
    manifest = json.loads((latent_setup[3] / datasets.MANIFEST).read_text())
    (folder / datasets.MANIFEST).write_text(json.dumps({**manifest, "image_size": 12, "latent_size": 6, "count": 4}))
    np.save(folder / "latents.npy", np.zeros((4, manifest["channels"], 6, 6), np.float16))
    np.save(folder / "labels.npy", np.zeros(4, np.int64))
    err = _exit_message(capsys, train.main, LATENT_TINY + ["--max-steps", "1", "--out", str(tmp_path / "o"),
                                                          "--data", str(folder), "--image-size", "12"])
    assert "the latent size 6" in err and "not divisible by the patch size 4" in err


@retry_rank_abort
def test_latents_encode_refused_by_rank_0_stops_every_rank(latent_setup, tmp_path):
    # rank 0 alone prepares --out; when it refused a folder of other files, rank 1 left its barrier with a traceback
    root, vae, images, _ = latent_setup
    (tmp_path / "notes.txt").write_text("x")
    codes, outs = two_processes_by_hand([sys.executable, "latents.py", "encode", "--data", str(images), "--out",
                                         str(tmp_path), "--vae", str(vae), "--image-size", "16", "--num-workers", "0"])
    assert codes == [2, 2], outs
    assert "already holds other files (notes.txt)" in outs[0][1] and outs[1][1] == ""  # one message, from rank 0


def test_pwrite_rows_writes_each_run_at_its_rows_and_done_images_cuts_a_torn_record(tmp_path):
    # pwrite_rows against rows placed by hand in a bytearray: gaps split the runs
    header, row_bytes, rows = 16, 6, np.array([0, 1, 4, 5, 6, 9])
    values = np.arange(len(rows) * 3, dtype=np.float16).reshape(-1, 3) + 1  # (6, 3): 6 bytes a row
    expected = bytearray(header + 10 * row_bytes)
    for row, v in zip(rows, values):
        expected[header + row * row_bytes: header + (row + 1) * row_bytes] = v.tobytes()
    path = tmp_path / "rows.bin"
    path.write_bytes(bytes(len(expected)))
    fd = os.open(path, os.O_WRONLY)
    try:
        latents.pwrite_rows(fd, header, row_bytes, rows, values)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(expected)
    # progress logs: whole int64 records count, a torn last one (a crash mid-append) is cut
    assert not latents.done_images(str(tmp_path), 10).any()  # no progress folder yet
    (tmp_path / "progress").mkdir()
    (tmp_path / "progress" / "rank0.idx").write_bytes(np.array([0, 1, 5, 6], np.int64).tobytes()[:28])
    (tmp_path / "progress" / "rank1.idx").write_bytes(np.array([8], np.int64).tobytes())
    (tmp_path / "progress" / ".DS_Store").write_bytes(np.array([2, 3], np.int64).tobytes())  # not a log: not read
    np.testing.assert_array_equal(np.flatnonzero(latents.done_images(str(tmp_path), 10)), [0, 1, 5, 8])


def test_pwrite_all_finishes_a_partial_write_and_refuses_one_that_writes_nothing(tmp_path, monkeypatch):
    # A full disk or a signal can make os.pwrite write part of the bytes without an error
    data, real_pwrite = bytes(range(1, 24)), os.pwrite
    calls = []

    def partial(fd, view, offset, most=5):  # at most `most` bytes a call, each at the offset it is given
        calls.append(offset)
        if len(calls) > 50:
            raise RuntimeError("pwrite_all loops")
        return real_pwrite(fd, bytes(view[:most]), offset) if most else 0

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(40))
    fd = os.open(path, os.O_WRONLY)
    try:
        monkeypatch.setattr(os, "pwrite", partial)
        latents.pwrite_all(fd, data, 10)
        assert calls == [10, 15, 20, 25, 30]
        monkeypatch.setattr(os, "pwrite", functools.partial(partial, most=0))
        calls.clear()
        with pytest.raises(OSError, match="pwrite wrote nothing at byte 3"):
            latents.pwrite_all(fd, data, 3)
        assert calls == [3]
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(10) + data + bytes(7)


def test_atomic_write_flushes_and_fsyncs_the_whole_file_before_renaming_it(tmp_path, monkeypatch):
    # Durable before it is visible: at fsync the temporary file holds every byte (Python's buffer flushed) and the
    # final name does not exist yet; a rename first would show a file a power cut could leave empty or torn
    path, payload, synced, real_fsync = tmp_path / "x.bin", b"0123456789" * 50, [], os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_size, path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fid.atomic_write(str(path), lambda f: f.write(payload))
    assert synced == [(len(payload), False)] and path.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # no temporary file left


def _bent_posterior_vae(folder, **config):
    """A tiny VAE whose posterior std is about 0.1 (logvar biased down), so std and variance differ."""
    vae = _tiny_vae(folder, **config)
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 4.6  # moments = (mean, logvar) over the 2 x 4 latent channels
    return vae


def test_encode_and_decode_apply_the_configs_shift_and_scale_and_each_seed_draws_its_own_noise(tmp_path):
    pytest.importorskip("diffusers")
    vae = _bent_posterior_vae(tmp_path / "vae", scaling_factor=2.0, shift_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    assert latents.vae_scale_shift(vae) == (2.0, 0.5)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    q = vae.encode(x).latent_dist
    assert 0.05 < q.std.mean().item() < 0.2
    mean = latents.encode_batch(vae, x, [0, 1, 2], "mean")
    torch.testing.assert_close(mean, (q.mean - 0.5) * 2.0)  # z = s * (mu - shift)
    drawn = {seed: latents.encode_batch(vae, x, [7, 8, 9], "sample", seed=seed) for seed in (1, 2)}
    for z in drawn.values():
        eps = (z / 2.0 + 0.5 - q.mean) / q.std  # z = s * (mu + sigma * eps - shift)
        assert eps.mean().item() == pytest.approx(0.0, abs=0.15) and eps.std().item() == pytest.approx(1.0, abs=0.1)
    assert (drawn[1] - drawn[2]).abs().min() > 0  # another seed, other draws in every entry
    # No (seed, row) shares a stream with another: with a 32-bit seed such as seed * 1_000_003 + row,
    # seed 0's row 1_000_003 drew seed 1's row 0 (ImageNet with both flips has 2.6M rows).
    far, near = (latents.encode_batch(vae, x[:1], [row], "sample", seed=seed) for seed, row in ((0, 1_000_003), (1, 0)))
    assert (far - near).abs().min() > 0
    # x = D(z / s + shift), from the values given and from a manifest's
    torch.testing.assert_close(latents.Decoder(vae, 2.0, 0.5)(mean), vae.decode(q.mean).sample)
    manifest = {"vae": str(tmp_path / "vae"), "channels": 4, "factor": 2, "scale": 2.0, "shift": 0.5}
    torch.testing.assert_close(latents.load_decoder(manifest)(mean), vae.decode(q.mean).sample, atol=1e-5, rtol=1e-5)


def test_decoders_take_the_latents_scale_and_shift_and_refuse_a_vae_of_another_latent_space(tmp_path, capsys):
    # A latent folder's (or checkpoint's) decoder divides by the scale its latents were encoded with, even through a
    # VAE whose config says another; an .npz decodes with the --vae config's scale and shift; a VAE of other channels
    # or another factor is refused, and so is an --image-size the encoder's factor does not divide
    pytest.importorskip("diffusers")
    vae = _tiny_vae(tmp_path / "vae", scaling_factor=2.0, shift_factor=0.5)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    manifest = {"vae": str(tmp_path / "vae"), "channels": 4, "factor": 2, "scale": 1.0, "shift": 0.25}
    with torch.no_grad():
        torch.testing.assert_close(latents.load_decoder(manifest)(z), vae.decode(z + 0.25).sample, atol=1e-5, rtol=1e-5)
        pixels = sample.to_uint8(vae.decode(z / 2.0 + 0.5).sample)
    np.savez(tmp_path / "z.npz", arr_0=z.numpy())
    latents.main(["decode", "--latents", str(tmp_path / "z.npz"), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "rec")])
    rec = np.load(tmp_path / "rec" / "images.npz")["arr_0"]
    assert np.abs(rec.astype(int) - pixels.numpy().astype(int)).max() <= 1
    for key, value, says in (("channels", 3, "makes 4-channel latents at 1/2 scale, but these latents are 3-channel at 1/2"),
                             ("factor", 4, "makes 4-channel latents at 1/2 scale, but these latents are 4-channel at 1/4")):
        with pytest.raises(latents.LatentError, match=re.escape(says)):
            latents.load_decoder({**manifest, key: value})
    err = _exit_message(capsys, latents.main, ["encode", "--data", "shapes", "--out", str(tmp_path / "lat"), "--vae",
                                               str(tmp_path / "vae"), "--image-size", "15", "--num-workers", "0"])
    assert "--image-size 15 is not divisible by the VAE's downsampling factor 2" in err and not (tmp_path / "lat").exists()


def test_encode_flip_none_posterior_mean_seed_and_batches_of_mixed_classes(tmp_path, capsys):
    pytest.importorskip("diffusers")
    vae = _tiny_vae(tmp_path / "vae")
    images = _image_folder(tmp_path / "images", n_per_class=3)  # 6 images: a a a b b b; batches of 4 mix them
    ds = datasets.load_dataset(str(images), 16)
    x = datasets.to_model_input(torch.stack([ds[i][0] for i in range(6)]), flip=False)  # (6, 3, 16, 16)
    classes = [0, 0, 0, 1, 1, 1]
    encode = ["encode", "--data", str(images), "--vae", str(tmp_path / "vae"), "--image-size", "16", "--batch-size", "4",
              "--num-workers", "0"]
    # --flip none --posterior mean: row i is image i, s * mu(x_i)
    manifest = latents.main(encode + ["--out", str(tmp_path / "mean"), "--flip", "none", "--posterior", "mean"])
    assert (manifest["count"], manifest["flip"], manifest["posterior"]) == (6, "none", "mean")
    folder = datasets.LatentFolder(tmp_path / "mean")
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean * 0.18215
    np.testing.assert_allclose(folder.array().astype(np.float32), mu.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(folder.labels, classes)
    # decode: the first rows through D(z / s), with their own labels
    latents.main(["decode", "--latents", str(tmp_path / "mean"), "--out", str(tmp_path / "rec"), "--num", "5"])
    rec = np.load(tmp_path / "rec" / "images.npz")
    with torch.no_grad():
        pixels = sample.to_uint8(vae.decode(torch.from_numpy(folder.array()[:5].astype(np.float32)) / 0.18215).sample)
    np.testing.assert_array_equal(rec["arr_0"], pixels.numpy())
    np.testing.assert_array_equal(rec["arr_1"], classes[:5])
    # --flip both --seed 2: rows 2i and 2i + 1 hold image i and its mirror, drawn with seed 2; labels repeated
    latents.main(encode + ["--out", str(tmp_path / "both"), "--seed", "2"])
    folder = datasets.LatentFolder(tmp_path / "both")
    both = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # (12, 3, 16, 16)
    expected = latents.encode_batch(vae, both, np.arange(12), "sample", seed=2)
    np.testing.assert_allclose(folder.array().astype(np.float32), expected.numpy(), atol=2e-3, rtol=2e-3)
    assert not np.allclose(expected.numpy(), latents.encode_batch(vae, both, np.arange(12), "sample", seed=0).numpy(), atol=0.01)
    np.testing.assert_array_equal(folder.labels, np.repeat(classes, 2))
    # a rerun with another seed or posterior would mix draws: refused, even on a complete folder
    for flag, value in (("--seed", "3"), ("--posterior", "mean")):
        err = _exit_message(capsys, latents.main, encode + ["--out", str(tmp_path / "both"), flag, value])
        assert "other settings" in err and f"{flag[2:]}=" in err
    # labels that do not fit the latents are refused
    np.save(tmp_path / "both" / "labels.npy", np.repeat(classes, 2)[:-1])
    with pytest.raises(datasets.DataError, match="do not match the manifest"):
        datasets.LatentFolder(tmp_path / "both")


# ==============================================================================================
#                                   bench.py
# ==============================================================================================

BENCH_TINY = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--image-size", "16",
        "--num-classes", "10", "--device", "cpu"]


def test_flops_match_dit_paper_gflops():
    # DiT paper, Table 4: Gflops (multiply-adds) at 256 px = 32x32x4 latents; ours counts 2 per multiply-add.
    for name, depth, width, patch, gmacs in [("XL/2", 28, 1152, 2, 118.64), ("L/2", 24, 1024, 2, 80.71),
                                             ("B/2", 12, 768, 2, 23.01), ("S/2", 12, 384, 2, 6.06)]:
        flops = bench.dit_forward_flops(32, patch, 4, width, depth, 4 * width, 8)["total"]
        assert flops / 2e9 == pytest.approx(gmacs, rel=2e-3), name


def test_flops_match_torch_flop_counter_on_a_built_model():
    # pixels with the variance channels, and latents without them through patch 2 and a narrower MLP (mlp_ratio 2)
    for kw in (dict(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=2),
               dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=3, num_heads=3, learn_sigma=False,
                    mlp_ratio=2.0)):
        model = DiT(num_classes=10, **kw)
        x, t, y = torch.randn(3, kw["in_channels"], kw["input_size"], kw["input_size"]), torch.randint(0, 1000, (3,)), \
            torch.randint(0, 10, (3,))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA: counted bmm's
            model(x, t, y)
        assert bench.model_flops(model)["total"] * 3 == counter.get_total_flops(), kw


def test_peak_tflops_known_gpus_override_and_unknown():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA H100 NVL") == bench.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None  # a slice: a fraction of the SMs
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", override=123.0) == 123.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090", override=165.0) == 165.0


def test_methods_are_canonicalised_with_vanilla_first():
    assert bench.parse_methods("ant-uw+dtr,rtr") == ["vanilla", "dtr+ant-uw", "rtr"]
    assert bench.parse_methods("dtr,vanilla") == ["vanilla", "dtr"]
    with pytest.raises(ValueError, match="twice"):
        bench.parse_methods("dtr+ant-uw,ant-uw+dtr")
    with pytest.raises(ValueError, match="unknown method part"):
        bench.parse_methods("vanilla,dtrr")


def test_bad_counts_are_refused(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="--steps"):
        bench.parse_args(BENCH_TINY + ["--steps", "0"])
    for value in ("nan", "0"):  # an MFU of NaN or a negative one
        with pytest.raises(ValueError, match="--peak-tflops must be a positive number"):
            bench.parse_args(BENCH_TINY + ["--peak-tflops", value])
        with pytest.raises(ValueError, match="--cfg-scale must be a finite"):  # a NaN row next to the finite ones
            bench.parse_args(BENCH_TINY + ["--cfg-scale", value.replace("0", "inf")])
    with pytest.raises(ValueError, match=r"\(--batch-size 4 over 1\); use --batch-size 5 or more"):  # bench's own flag
        bench.bench(BENCH_TINY + ["--batch-size", "4", "--methods", "vanilla,ant-uw"], log=lambda msg: None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:  # a --json path that cannot be written: one line, not a traceback
        bench.main(BENCH_TINY + ["--methods", "vanilla", "--warmup", "0", "--steps", "1", "--rounds", "1",
                                 "--json", str(tmp_path / "file" / "b.json")])
    assert e.value.code == 2 and "error: --json" in capsys.readouterr().err
    timed = []
    monkeypatch.setattr(bench, "bench_training", lambda *a, **k: timed.append(1))
    for path in (tmp_path / "file" / "b.json", tmp_path, ""):  # said before the timings (once after them), '' not ignored
        with pytest.raises(SystemExit):
            bench.main(BENCH_TINY + ["--methods", "vanilla", "--json", str(path)])
        assert "cannot write a file there" in capsys.readouterr().err and not timed, path
    for flags, says in ((["--sample", "--sample-steps", "ddim50", "foo"], "--sample-steps foo:"),
                        (["--sample", "--cfg-scale", "1.5", "--class-dropout-prob", "0"], "needs the null class")):
        with pytest.raises(SystemExit) as e:  # said before the training timings, not after them
            bench.main(BENCH_TINY + ["--methods", "vanilla", *flags])
        assert e.value.code == 2 and says in capsys.readouterr().err and not timed, flags


def test_bf16_warning_names_gpus_before_ampere_and_each_entry_point_gives_it(tmp_path, monkeypatch, capsys):
    # V100 (7.0) and T4 (7.5) have no bf16 arithmetic: the default --precision bf16 ran emulated there, silently slow
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    cuda = torch.device("cuda", 0)
    for capability, precision, device, want in (((7, 5), "bf16", cuda, True), ((7, 0), "bf16", cuda, True),
                                                ((8, 0), "bf16", cuda, False), ((7, 5), "fp32", cuda, False),
                                                ((7, 5), "bf16", CPU, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        got = sample.bf16_warning(device, precision)
        assert (got is not None) == want, (capability, precision, device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    assert sample.bf16_warning(cuda, "bf16") == ("warning: Tesla T4 (compute capability 7.5) has no bf16 arithmetic "
                                                 "(Ampere, 8.0, brought it): bf16 autocast is emulated there and can run "
                                                 "slower than fp32; pass --precision fp32")
    calls = []  # each entry point asks with its device and --precision, and shows the answer

    def fake(device, precision):
        calls.append((device.type, precision))
        return "warning: fake bf16 warning"
    for module in (train, sample, bench):
        monkeypatch.setattr(module, "bf16_warning", fake)
    out = run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1", "--precision", "fp32")
    assert "warning: fake bf16 warning" in (out / "log.txt").read_text()
    sample.main(["--ckpt", str(checkpoints(out)[-1]), "--out", str(tmp_path / "s"), "--num-samples", "1", "--steps", "ddim2"])
    assert "warning: fake bf16 warning" in capsys.readouterr().err
    logged = []
    bench.bench(BENCH_TINY + ["--methods", "vanilla", "--warmup", "0", "--steps", "1", "--rounds", "1"], log=logged.append)
    assert "warning: fake bf16 warning" in logged
    assert calls == [("cpu", "fp32"), ("cpu", "bf16"), ("cpu", "bf16")]


def test_bench_refuses_the_train_flags_train_py_refuses(capsys):
    # bench builds its runs with train.build_run, not train(): --depth 0 used to bench the config's depth 12 and a
    # negative --max-grad-norm to time steps without clipping
    for flag, value, says in (("--depth", "0", "positive"), ("--max-grad-norm", "-1", "0 or more"),
                              ("--uw-lr", "-1", "0 or more")):
        with pytest.raises(SystemExit):
            bench.main(BENCH_TINY + ["--methods", "vanilla", "--steps", "1", "--rounds", "1", flag, value])
        err = capsys.readouterr().err
        assert f"error: {flag} -" in err or f"error: {flag} 0:" in err, err
        assert says in err, err


def test_bench_refuses_the_train_flags_it_sets_itself():
    # passed through to each run's train.parse_args, they were replaced by bench's own --methods and --batch-size
    # (abbreviated too); --sample-batch-size 0 was read as "the default"
    for flags, says in ((["--global-batch-size", "64"], "--global-batch-size is set by bench.py for each run; use --batch-size"),
                        (["--global-batch", "256"], "use --batch-size"), (["--method=dtr"], "--method is set by bench.py"),
                        (["--sample-batch-size", "0"], "--sample-batch-size must be >= 1")):
        with pytest.raises(ValueError) as e:
            bench.parse_args(BENCH_TINY + flags)
        assert says in str(e.value), flags


def test_bench_times_every_method_and_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    result = bench.bench(BENCH_TINY + ["--batch-size", "10", "--methods", "vanilla,dtr,ant-pcgrad,ant-nash,curriculum,dtr+ant-uw",
                                 "--warmup", "1", "--steps", "2", "--rounds", "2", "--sample", "--sample-steps", "ddim2",
                                 "--sample-batch-size", "2", "--fid", "--json", str(path)], log=lambda msg: None)
    out = capsys.readouterr().out
    assert json.loads(path.read_text())["methods"].keys() == result["methods"].keys()
    methods = result["methods"]
    assert list(methods) == ["vanilla", "dtr", "ant-pcgrad", "ant-nash", "curriculum", "dtr+ant-uw"]
    for name, r in methods.items():
        assert name in out
        assert len(r["ratio_per_round"]) == 2 and all(math.isfinite(v) and v > 0 for v in r["ratio_per_round"])
        assert r["images_per_s"] == pytest.approx(10 / (r["ms_per_step"] / 1000))
        assert r["peak_memory_mib"] is None and r["mfu"] is None  # CPU, no peak given: honest n/a
    assert methods["vanilla"]["ratio"] == 1.0
    # one plain step of each, read for host syncs: none, but the curriculum's pacing read of the loss
    assert {n: r["host_syncs_per_step"] for n, r in methods.items()} == {
        "vanilla": 0, "dtr": 0, "ant-pcgrad": 0, "ant-nash": 0, "curriculum": 1, "dtr+ant-uw": 0}
    line = next(i for i, text in enumerate(open(bench.__file__), 1) if "after_step(step, float(" in text)
    assert [w["site"] for w in methods["curriculum"]["host_syncs"]] == [f"bench.py:{line} one_step"]  # its loss read
    assert f"curriculum: 1 sync at bench.py:{line} one_step" in out
    K = 5  # --ant-clusters default
    assert methods["ant-pcgrad"]["passes"] == K  # one per cluster's slice, which together cover the batch once
    assert {r["train_flops_per_image"] for r in methods.values()} == {3 * result["flops"]["forward_per_image"]}
    nash = methods["ant-nash"]  # update steps timed apart and amortised over the 25-step period
    assert nash["passes_update"] == K and nash["update_every"] == 25
    amortised = (24 * nash["plain_ms"] + nash["update_ms"]) / 25  # exact: the median of 2 rounds is their mean
    assert nash["ms_per_step"] == pytest.approx(amortised, rel=1e-9)
    assert nash["passes"] == pytest.approx((24 + K) / 25)
    assert result["flops"]["forward_per_image"] > 0 and "GFLOP/image" in out
    # sampling once per distinct network: the plain DiT and the DTR-routed one
    assert [s["network"].split(" (")[0] for s in result["sample"]] == ["DiT", "DiT + dtr router"]
    assert all(s["steps"] == 2 and s["images_per_s"] > 0 for s in result["sample"])
    assert result["fid"]["images_per_s"] > 0


def test_bench_counts_only_torchs_sync_warnings_on_cuda_and_says_where_each_was_called(monkeypatch, tmp_path):
    # On CUDA, count_host_syncs counts the warnings of torch.cuda.set_sync_debug_mode("warn"), matched on torch's
    # text, and keeps where each was called. Faked here on the CPU: a syncing op warns with that text (naming the
    # Python line that called it, as torch's C++ warnings do), and set_sync_debug_mode warns once per process with
    # its prototype notice (torch/csrc/cuda/Module.cpp, TORCH_WARN_ONCE), which says "synchronizing" too: counted
    # as a sync, it gave the first method read (vanilla) one sync on an H200 and no other method any.
    notice = "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations"
    mode, noticed = [0], []

    def set_sync_debug_mode(m):
        if not noticed:
            noticed.append(warnings.warn(notice, stacklevel=2))  # named at the caller, as torch does
        mode[0] = {"default": 0, "warn": 1}.get(m, m)

    def isfinite(x, _isfinite=torch.isfinite):  # stands for an op that waits for the device
        if mode[0]:
            warnings.warn(bench.SYNC_WARNING + " (Triggered internally at c10/cuda/CUDAFunctions.cpp:1.)", stacklevel=2)
        return _isfinite(x)

    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode[0])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_sync_debug_mode)
    monkeypatch.setattr(torch, "isfinite", isfinite)
    _, train_argv = bench.parse_args(BENCH_TINY)
    b = bench.MethodBench("vanilla", train_argv, 10, 3, 4, torch.device("cpu"), str(tmp_path))
    b.device = torch.device("cuda")  # count_host_syncs' CUDA path; the step itself runs on the CPU
    images, labels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.randint(10, (4,))
    show = warnings.showwarning
    syncs, others = bench.count_host_syncs(b, images, labels)
    line = next(i for i, text in enumerate(open(train.__file__), 1) if "bad = ~torch.isfinite(gnorm)" in text)
    assert [w["site"] for w in syncs] == [f"train.py:{line} train_step"] * 2  # isfinite of the norm and of the loss
    assert all(w["message"].startswith(bench.SYNC_WARNING) for w in syncs)
    assert [w["message"] for w in others] == [notice] and "synchroniz" in notice  # kept apart, not counted
    assert others[0]["site"].startswith("bench.py:") and " count_host_syncs" in others[0]["site"]
    assert mode[0] == 0 and warnings.showwarning is show  # the mode and the warnings hook are put back
    assert bench.count_host_syncs(b, images, labels) == (syncs, [])  # the next method read: no notice


def test_bench_warms_nash_up_on_an_update_and_a_plain_step(tmp_path):
    # Nash's step 0 is an update: with --warmup 1 its plain step's first call (a compile) landed in round 1
    _, train_argv = bench.parse_args(BENCH_TINY + ["--nash-every", "3"])
    images, labels = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8), torch.randint(10, (5,))
    for method, n, steps in (("ant-nash", 1, 2), ("ant-nash", 0, 0), ("vanilla", 1, 1)):
        b = bench.MethodBench(method, train_argv, 10, 3, 5, torch.device("cpu"), str(tmp_path))
        b.warm_up(n, images, labels)
        assert b.step == steps, method


def test_bench_rounds_medians_ratios_nash_amortisation_mfu_and_json_on_a_scripted_clock(tmp_path, monkeypatch, capsys):
    # Each step advances a fake clock by a scripted time per method and round (update steps by their own),
    # so every summary number has a hand value: rounds 1000/2000/1500 ms for vanilla, etc.
    per_step = {"vanilla": [1.0, 2.0, 1.5], "ant-pcgrad": [4.0, 5.0, 9.0], "ant-nash": [1.2, 2.0, 1.5]}
    nash_update = [5.0, 8.0, 4.5]
    clock, steps, blocks = [0.0], [], []

    def one_step(self, images, labels, step):
        update = self.is_update(step)
        r = min(len(self.update_ms) if update else len(self.plain_ms), 2)  # the round being timed (warm-up: 0)
        clock[0] += nash_update[r] if update else per_step[self.name][r]
        steps.append((self.name, step))

    def timed(fn, device):  # training blocks read the fake clock; sampling takes 1 s
        start, n = clock[0], len(steps)
        fn()
        if len(steps) == n:
            return 1.0
        blocks.append(steps[-1][0])
        return clock[0] - start

    monkeypatch.setattr(bench.MethodBench, "one_step", one_step)
    monkeypatch.setattr(bench, "timed", timed)
    path = tmp_path / "bench.json"
    result = bench.bench(BENCH_TINY + ["--batch-size", "5", "--methods", "vanilla,ant-pcgrad,ant-nash", "--nash-every", "3",
                                       "--warmup", "2", "--steps", "2", "--rounds", "3", "--peak-tflops", "0.5",
                                       "--sample", "--sample-steps", "ddim2", "--sample-batch-size", "2", "--json", str(path)],
                         log=lambda msg: None)
    out = capsys.readouterr().out
    # round-robin, the starting method rotated each round; Nash's update step timed right after its plain block
    assert blocks == ["vanilla", "ant-pcgrad", "ant-nash", "ant-nash", "ant-pcgrad", "ant-nash", "ant-nash", "vanilla",
                      "ant-nash", "ant-nash", "vanilla", "ant-pcgrad"]
    # Nash (every 3): warm-up on the natural counter (0 is an update), plain blocks skip updates, update blocks seek
    # one; after the rounds, one more plain step of each method is read for host syncs (Nash: 13)
    assert [s for name, s in steps if name == "ant-nash"] == [0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13]
    assert [s for name, s in steps if name == "vanilla"] == list(range(9))
    m, fwd = result["methods"], result["flops"]["forward_per_image"]
    amortised = [(2 * 1.2 + 5.0) / 3, (2 * 2.0 + 8.0) / 3, (2 * 1.5 + 4.5) / 3]  # ((every - 1) plain + update) / every
    for name, ms, ratios, passes in [("vanilla", 1500, [1, 1, 1], 1), ("ant-pcgrad", 5000, [4, 2.5, 6], 5),
                                     ("ant-nash", 2500, [a / v for a, v in zip(amortised, [1.0, 2.0, 1.5])], 7 / 3)]:
        r = m[name]
        assert r["ms_per_step"] == pytest.approx(ms) and r["images_per_s"] == pytest.approx(5 / (ms / 1000)), name
        assert r["ratio_per_round"] == pytest.approx(ratios) and r["ratio"] == pytest.approx(sorted(ratios)[1]), name
        assert (r["ratio_min"], r["ratio_max"]) == (pytest.approx(min(ratios)), pytest.approx(max(ratios))), name
        assert r["passes"] == pytest.approx(passes), name
        train_flops = 3 * fwd  # forward + backward of 2 forwards, over the batch once (PCGrad: K slices of it)
        assert r["train_flops_per_image"] == pytest.approx(train_flops), name
        assert r["mfu"] == pytest.approx(train_flops * 5 / (ms / 1000) / 0.5e12), name  # --peak-tflops counts on the CPU
        # the printed row: ms/step, img/s, x vanilla (median), its range, passes, syncs, peak MiB, MFU
        row = next(line.split() for line in out.splitlines() if line.split()[:1] == [name])
        assert row[1:] == [f"{ms:.1f}", f"{5 / (ms / 1000):.1f}", f"{sorted(ratios)[1]:.3f}",
                           f"{min(ratios):.3f}-{max(ratios):.3f}", f"{passes:.2f}", "0", "n/a",
                           f"{100 * train_flops * 5 / (ms / 1000) / 0.5e12:.1f}%"], name
    assert m["ant-nash"]["ratio"] == pytest.approx(2.0)
    assert f"{fwd / 1e9:.4g} GFLOP/image forward, {3 * fwd / 1e9:.4g} per training image" in out
    assert (m["ant-nash"]["plain_ms"], m["ant-nash"]["update_ms"]) == (pytest.approx(1500), pytest.approx(5000))
    # sampling: DDIM-2 with guidance runs the model on a doubled batch, 2 x 2 forwards per image
    for s in result["sample"]:
        assert s["gflops_per_image"] == pytest.approx(2 * 2 * fwd / 1e9) and s["images_per_s"] == pytest.approx(2.0)
        assert s["ms_per_step"] == pytest.approx(500.0)  # per sampler step, whatever guidance doubles
        assert s["mfu"] == pytest.approx(s["gflops_per_image"] * 1e9 * 2.0 / 0.5e12)
    # the JSON holds every number, the optional sections included
    assert json.loads(path.read_text()) == json.loads(json.dumps(result, default=float))


def test_bench_sampling_rows_without_guidance_fid_size_of_latents_and_cpu_precision(monkeypatch):
    # Without guidance each sampler step is one forward per image (with it, two); ms/step is per sampler step; --fid
    # times images of the decoded size (8x the latents); the JSON says fp32 for a CPU run whatever --precision says.
    fids = []
    monkeypatch.setattr(bench, "bench_fid", lambda batch, size, rounds, device: fids.append(size) or {
        "batch": batch, "image_size": size, "seconds": 1.0, "images_per_s": float(batch)})
    result = bench.bench(BENCH_TINY + ["--batch-size", "4", "--methods", "vanilla", "--in-channels", "4", "--warmup", "0",
                                       "--steps", "1", "--rounds", "1", "--sample", "--sample-steps", "ddim2", "ddim3",
                                       "--cfg-scale", "1", "--sample-batch-size", "2", "--fid"], log=lambda msg: None)
    fwd = result["flops"]["forward_per_image"]
    assert fids == [128] and result["config"]["precision"] == "fp32"
    for s, steps in zip(result["sample"], (2, 3)):
        assert s["steps"] == steps and s["gflops_per_image"] == pytest.approx(steps * fwd / 1e9)
        assert s["ms_per_step"] == pytest.approx(1000 * s["seconds"] / steps)


def test_bench_fid_time_is_the_median_round(monkeypatch):
    seconds = iter([3.0, 1.0, 2.0])  # after an untimed warm-up call
    calls = []
    monkeypatch.setattr(bench, "timed", lambda fn, device: next(seconds))
    monkeypatch.setattr(fid, "extract_features", lambda images, net, **kw: calls.append(images.shape))
    r = bench.bench_fid(4, 16, 3, CPU)
    assert calls == [(4, 3, 16, 16)] and r["seconds"] == 2.0 and r["images_per_s"] == 2.0


def test_passes_per_plain_and_update_step_of_each_method():
    # (per plain step, per update step, amortised): PCGrad and Nash updating every step run K on each step
    def passes(ant, every, K=5):
        b = bench.MethodBench.__new__(bench.MethodBench)
        b.run, b.K, b.every = types.SimpleNamespace(method=types.SimpleNamespace(ant=ant)), K, every
        return b.passes()

    assert passes(None, None) == (1, None, 1.0) and passes("ant-uw", None) == (1, None, 1.0)
    assert passes("ant-pcgrad", None) == (5, None, 5.0)
    assert passes("ant-nash", 1) == (5, None, 5.0)
    assert passes("ant-nash", 25) == (1, 5, pytest.approx(29 / 25))


def _fake_cuda_memory(monkeypatch):
    """A CUDA allocator counter the test drives: bench's memory reads see it, syncs do nothing."""
    mem = types.SimpleNamespace(now=0, peak=0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem.now)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem.peak)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(mem, "peak", mem.now))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return mem


@pytest.mark.parametrize("warmup,steps,rounds,graphs,measured", [
    (1, 1, 1, False, True), (0, 2, 1, False, True), (0, 1, 2, False, True), (0, 1, 1, False, False),
    (1, 2, 2, True, False)])
def test_bench_peak_memory_is_each_runs_own_step_with_its_adamw_state_on_a_scripted_allocator(
        monkeypatch, tmp_path, warmup, steps, rounds, graphs, measured):
    # Two live runs on a fake allocator: weights w and EMA w at build, AdamW's moments 2w allocated lazily by the
    # first optimizer step, activations a and grads w inside each step. A method's peak is its own
    # 2w + 2w + w + a, whatever the other run holds, also when the moments appear inside a timed block
    # (--warmup 0); a run's first step alone shows no such peak: n/a, as with CUDA graphs (a private pool).
    mem = _fake_cuda_memory(monkeypatch)
    size = {"vanilla": (100, 1000), "dtr": (50, 3000)}  # (w, a) in bytes
    moments = set()

    def alloc(n):
        mem.now += n
        mem.peak = max(mem.peak, mem.now)

    def build_run(args, device, distributed, log):
        alloc(2 * size[args.method][0])  # weights and EMA
        return types.SimpleNamespace(method=types.SimpleNamespace(intervals=None, nash=None, curriculum=None))

    def one_step(self, images, labels, step):
        w, a = size[self.name]
        alloc(a), alloc(w), alloc(-a)  # forward activations, backward's grads, activations freed
        if self.name not in moments:  # AdamW's exp_avg and exp_avg_sq, at the first optimizer step
            moments.add(self.name), alloc(2 * w)
        alloc(-w)  # zero_grad(set_to_none=True)

    monkeypatch.setattr(train, "build_run", build_run)
    monkeypatch.setattr(bench.MethodBench, "one_step", one_step)
    argv = ["--model", "DiT-S/4", "--image-size", "16"] + (["--compile", "--compile-mode", "reduce-overhead"] if graphs else [])
    benches = [bench.MethodBench(m, argv, 10, 3, 4, torch.device("cuda"), str(tmp_path)) for m in ("vanilla", "dtr")]
    bench.bench_training(benches, None, None, warmup, steps, rounds, log=lambda msg: None)
    for b in benches:
        w, a = size[b.name]
        assert b.peak_bytes == (5 * w + a if measured else None), b.name


def test_bench_memory_check_counts_the_first_runs_adamw_state(monkeypatch):
    # check_memory runs once vanilla's weights and EMA are built; its AdamW moments are still to come, like the
    # other runs' weights, EMA and moments, and one step's grads and PCGrad/Nash's (K, P) matrix. Its
    # arguments come from a real bench call, stopped there.
    check, seen = bench.check_memory, []

    def stop(*args):
        seen.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "check_memory", stop)
    with pytest.raises(KeyboardInterrupt):
        bench.bench(BENCH_TINY + ["--batch-size", "2", "--methods", "vanilla,dtr"], log=lambda msg: None)
    num_params, methods, clusters, _ = seen[0]
    free = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[-1], 80 * 2**30))
    copy = 4 * num_params  # bytes of one fp32 copy of the weights
    for copies, fits in [(7, True), (6.9, False)]:  # vanilla 2 moments, dtr 4 copies, 1 step's grads
        free.append(int(copies * copy))
        if fits:
            check(num_params, methods, clusters, torch.device("cuda"))
        else:
            with pytest.raises(ValueError, match="runs need about"):
                check(num_params, methods, clusters, torch.device("cuda"))
    free.append(16 * copy - 1)  # 3 runs: 4 x 3 - 2, 1 step's grads, one K = 5 matrix at a time
    with pytest.raises(ValueError, match="the 3 runs need"):
        check(num_params, ["vanilla", "ant-pcgrad", "ant-nash"], clusters, torch.device("cuda"))
    free.append(16 * copy)
    check(num_params, ["vanilla", "ant-pcgrad", "ant-nash"], clusters, torch.device("cuda"))


def test_bench_latent_inputs_compile_mode_and_profile(monkeypatch, capsys):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: modes.append(mode) or model)  # the mode reaches it
    result = bench.bench(BENCH_TINY + ["--batch-size", "4", "--methods", "vanilla,dtr", "--in-channels", "4", "--warmup", "0",
                                       "--steps", "1", "--rounds", "1", "--profile", "2", "--compile",
                                       "--compile-mode", "max-autotune-no-cudagraphs"], log=lambda msg: None)
    out = capsys.readouterr().out
    assert modes == ["max-autotune-no-cudagraphs"] * 4  # each run's model, and its EMA for the samplers
    assert result["config"]["in_channels"] == 4 and "16x16x4" in out and "N(0, 1) latents" in out
    assert "compiled (max-autotune-no-cudagraphs)" in out
    for name in ("vanilla", "dtr"):
        p = result["profile"][name]
        assert f"profile of {name}, 2 steps" in out and p["steps"] == 2 and 0 < p["busy_ms_per_step"]
        assert sum(p["families_ms_per_step"].values()) == pytest.approx(p["busy_ms_per_step"])
        assert "matmul/conv" in p["families_ms_per_step"] and p["top"][0]["ms_per_step"] >= p["top"][-1]["ms_per_step"]
    with pytest.raises(ValueError, match="--profile"):
        bench.parse_args(BENCH_TINY + ["--profile", "-1"])


def test_kernel_families_of_usual_kernel_names():
    for name, fam in [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul/conv"),
                      ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT", "matmul/conv"),
                      ("triton_tem_fused_addmm_gelu_3", "matmul/conv"),
                      ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
                      ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
                      ("triton_red_fused_native_layer_norm_mul_add_7", "fused elementwise/norm (Inductor)"),
                      ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
                       "multi-tensor (AdamW, EMA, clip)"),
                      ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "other"),
                      ("aten::addmm", "matmul/conv")]:
        assert bench.family(name) == fam, name


@pytest.mark.parametrize("method", ["ant-pcgrad", "ant-nash"])
def test_compiled_pcgrad_and_nash_train_as_eager_with_donated_buffers(tmp_path, monkeypatch, fresh_dynamo, method):
    # Each cluster's slice is backpropagated once, so AOTAutograd may hand its saved activations to that backward
    # ("donated buffers", torch's default). K backward passes through one graph (the official route) cannot: the
    # second one came out silently wrong, which once made train.py turn them off for these methods.
    import torch._functorch.config as functorch_config
    monkeypatch.setattr(functorch_config, "donated_buffer", True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))  # fast, same autograd
    flags = ["--method", method, "--global-batch-size", "7", "--ant-clusters", "3", "--nash-every", "2", "--max-steps", "3",
             "--class-dropout-prob", "0", "--lr", "1e-2"]  # slices of 3, 2 and 2; Nash solves at steps 0 and 2
    eager = last_checkpoint(run_train(tmp_path, *flags, name="eager"))["model"]
    compiled = last_checkpoint(run_train(tmp_path, *flags, "--compile", name="compiled"))["model"]
    assert eager["final_layer.linear.weight"].abs().max() > 1e-3  # zero at init (adaLN-Zero): the steps trained it
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-6)


def test_data_on_device_gives_the_same_run_as_the_loader(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", arr_0=rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(12) % 3)
    flags = ["--data", str(tmp_path / "d.npz"), "--global-batch-size", "5", "--max-steps", "4"]
    a = last_checkpoint(run_train(tmp_path, *flags, name="loader"))
    b = last_checkpoint(run_train(tmp_path, *flags, "--data-on-device", name="device"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_to_device_copies_to_a_gpu_from_pinned_memory_without_blocking(monkeypatch):
    # A plain host-to-device copy waits for every kernel queued before it (cudaStreamSynchronize in PyTorch's copy_).
    # No GPU here: a CUDA device object and stand-ins for pin_memory and to record the route the tensor takes.
    calls, x = [], torch.arange(3)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin_memory") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", a, k)) or self)
    sample.to_device(x, torch.device("cuda", 0))
    assert calls == ["pin_memory", ("to", (torch.device("cuda", 0),), {"non_blocking": True})]
    calls.clear()
    sample.to_device(x, "cpu")
    assert calls == [("to", (torch.device("cpu"),), {})]  # the CPU has nothing to pin


def test_host_data_reaches_the_device_through_to_device_in_every_loop(tmp_path, monkeypatch):
    # Per step, the --data-on-device batch indices and the DDPM step noise of the sample grid (train.py) and of
    # sample_indices are made on the host: each must go through to_device (pinned, non-blocking on a GPU), not a
    # plain .to(device), which on CUDA would stall the host once per training or sampling step. The grid once did.
    shapes = []

    def recording(x, device):
        shapes.append(tuple(x.shape))
        return x.to(device)

    monkeypatch.setattr(train, "to_device", recording)
    monkeypatch.setattr(sample, "to_device", recording)
    run_train(tmp_path, "--data-on-device", "--global-batch-size", "4", "--max-steps", "2", "--log-every", "2",
              "--sample-every", "2", "--sample-steps", "3")
    assert shapes == [(4,), (4,)] + [(16, 3, 16, 16)] * 3  # 2 steps' indices, then 3 DDPM steps of the grid
    shapes.clear()
    sample.sample_indices(_random_dit(), gd.Diffusion(), [0, 1], CPU, batch_size=2, steps="3")
    assert shapes == [(2, 3, 16, 16)] * 3


def test_ddpm_step_noise_can_come_from_a_noise_fn_and_precision_is_checked():
    d, x_T = gd.Diffusion(learn_sigma=False), torch.randn(2, 3, 4, 4)
    zero = lambda x, t: torch.zeros_like(x)
    torch.manual_seed(0)
    a = d.sample(zero, x_T, steps="5")
    torch.manual_seed(0)
    b = d.sample(zero, x_T, steps="5", noise_fn=lambda x: torch.randn_like(x))
    state = torch.get_rng_state()
    c = d.sample(zero, x_T, steps="5", noise_fn=lambda x: torch.zeros_like(x))  # no step noise: the posterior means
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(torch.get_rng_state(), state)
    model = DiT(input_size=4, patch_size=2, in_channels=3, depth=1, hidden_size=32, num_heads=2, num_classes=2)
    with pytest.raises(ValueError, match="precision"):
        sample.generate(model, d, torch.tensor([0, 1]), x_T, steps="ddim2", precision="fp16")


@pytest.mark.parametrize("steps", ["ddim50", "ddim10", "250", "50"])
def test_samplers_recover_the_data_point_with_an_oracle_model(steps):
    # With a one-image data set the optimal epsilon is known in closed form; both samplers must land on the image.
    d = gd.Diffusion(learn_sigma=True)
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    abar = torch.from_numpy(d.alphas_cumprod)

    def oracle(x, t):
        a = abar[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    torch.manual_seed(0)
    assert (d.sample(oracle, torch.randn(2, 3, 8, 8), steps=steps) - target).abs().max() < 1e-4


def test_sampler_trajectories_with_an_oracle_model_step_by_step():
    # The last step returns the oracle's x0 whatever the earlier coefficients were, so check every step:
    # DDIM (eta = 0) keeps x_t on sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with one fixed eps; DDPM with zero
    # step noise moves x_t to the posterior mean given x0, from Bayes' rule on the respaced chain.
    abar = np.cumprod(1 - _betas("linear"))  # float64, independent of diffusion.py
    target = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for steps in ("ddim10", "10"):
        seen = []

        def oracle(x, t):
            seen.append((int(t[0]), x.double()))
            a = torch.tensor(abar)[t].float().view(-1, 1, 1, 1)
            return (x - a.sqrt() * target) / (1 - a).sqrt()

        out = gd.Diffusion(learn_sigma=False).sample(oracle, x_T, steps=steps, clip_denoised=False,
                                                     noise_fn=torch.zeros_like)
        x0 = target.double()
        ts = [t for t, _ in seen]
        assert ts == sorted(ts, reverse=True) and len(ts) == 10
        if steps == "ddim10":
            eps = (seen[0][1] - math.sqrt(abar[ts[0]]) * x0) / math.sqrt(1 - abar[ts[0]])
            for t, x in seen:
                torch.testing.assert_close(x, math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps, rtol=0, atol=1e-4)
        else:
            for (t, x), (t_prev, x_next) in zip(seen, seen[1:] + [(None, out.double())]):
                a_prev = abar[t_prev] if t_prev is not None else 1.0
                beta = 1 - abar[t] / a_prev  # the respaced chain's beta at this step
                var = 1 / (1 / (1 - a_prev) + (1 - beta) / beta) if t_prev is not None else 0.0
                mean = x0 if t_prev is None else var * (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(1 - beta) * x / beta)
                torch.testing.assert_close(x_next, mean, rtol=0, atol=1e-4)


def test_16_bit_grey_images_keep_their_values(tmp_path):
    # PIL's convert("RGB") clips mode I;16 at 255, turning a 16-bit ramp almost entirely white
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "x16.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "x8.png")
    with Image.open(tmp_path / "x16.png") as img:
        assert img.mode.startswith("I;16")  # Pillow >= 10.3 (requirements.txt); older ones open it as mode I
    ds = datasets.load_dataset(str(tmp_path), 32)
    (x16, _), (x8, _) = ds[ds.names.index("x16.png")], ds[ds.names.index("x8.png")]
    assert torch.equal(x16, x8)
    fx = fid.ImageFiles(tmp_path)
    assert torch.equal(fx[fx.names.index("x16.png")], fx[fx.names.index("x8.png")])


def test_encode_never_logs_a_batch_whose_latents_were_written_short(monkeypatch, tmp_path):
    # A full disk makes pwrite return a short count without an error; the rest must be retried (and
    # then raise ENOSPC) rather than the batch being logged done with zero rows.
    real = os.pwrite
    calls = []

    def short_pwrite(fd, data, offset):
        calls.append(len(data))
        return real(fd, bytes(data)[: max(1, len(data) // 3)], offset)  # a third at a time

    path = tmp_path / "f"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_WRONLY)
    monkeypatch.setattr(os, "pwrite", short_pwrite)
    values = np.arange(4 * 6, dtype=np.float16).reshape(4, 6) + 1  # rows 1, 2, 5, 6 of 12 bytes
    latents.pwrite_rows(fd, 100, 12, np.array([1, 2, 5, 6]), values)
    os.close(fd)
    stored = np.frombuffer(path.read_bytes()[100:100 + 12 * 8], dtype=np.float16).reshape(8, 6)
    assert np.array_equal(stored[[1, 2, 5, 6]], values) and not stored[[0, 3, 4, 7]].any()
    assert len(calls) > 2  # the short writes were continued

    def full_disk(fd, data, offset):
        if offset > 100 + 12:
            raise OSError(28, "No space left on device")
        return real(fd, bytes(data)[:12], offset)

    fd = os.open(path, os.O_WRONLY)
    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space"):
        latents.pwrite_rows(fd, 100, 12, np.array([0, 1, 2]), values[:3])
    os.close(fd)


# ---------------------------------------------------------------------------------------------- Memory at scale: what a step, a resume and sampling hold at once

class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages alive now and at the peak, counting those that ops make while the mode is active:
    a weakref finalizer subtracts each storage when it is freed (torch keeps one Python object per storage). The
    CPU stand-in for torch.cuda.max_memory_allocated, for what the tests below hold at once."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.made = {}, 0, 0, []  # live: id(storage) -> bytes; made: every size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.live:
                storage = t.untyped_storage()
                self.live[id(storage)] = storage.nbytes()
                self.made.append(storage.nbytes())
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, id(storage))
        return out

    def _free(self, key):
        self.now -= self.live.pop(key)


def test_task_gradients_hold_one_pass_of_gradients_besides_G():
    # G (K, P) and the gradients of the pass being copied into it. The previous pass's gradients used to stay alive
    # through the next backward: 4P bytes more at the peak (2.7 GB for DiT-XL/2, 0.52 GB for DiT-B/2).
    torch.manual_seed(0)
    model = nn.Linear(512, 512)  # P = 262,656; the activations (6 x 512) are negligible next to 4P bytes
    losses = nt.cluster_losses((model(torch.randn(6, 512)) ** 2).sum(1), torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    unit = 4 * sum(p.numel() for p in model.parameters())
    with LiveBytes() as mem:
        nt.task_gradients(losses, list(model.parameters()))
    assert mem.peak / unit < 4.2  # 4.0: G (3 units) and one pass (1 unit); 5.0 before


def test_pcgrad_step_frees_G_before_the_update_and_returns_no_autograd_graph(monkeypatch):
    # Once the combined gradient is formed, G (K x 4P bytes, 13.5 GB for DiT-XL/2) is no longer needed while .grad
    # is written and AdamW steps. And train.py keeps the returned terms until the next step returns: a loss with its
    # grad_fn once kept the whole step's saved activations alive (when PCGrad's K backward passes retained the graph)
    # through the next step's forward and backward, about 23 GB for DiT-B/2 at batch 256 on one GPU.
    run = make_run("--method", "ant-pcgrad", perturb=0.02)
    K, P = len(run.method.intervals), sum(p.numel() for p in run.params)
    sizes, real = [], nt.write_flat_grad

    def spy(params, flat):
        sizes.extend(mem.live.values())
        return real(params, flat)

    monkeypatch.setattr(nt, "write_flat_grad", spy)
    x, y = torch.randn(10, 3, 16, 16), torch.randint(0, NUM_CLASSES, (10,))
    with LiveBytes() as mem:
        terms, _, _, _ = train.train_step(run, x, y, 0)
    assert sizes and 4 * K * P not in sizes
    assert all(v.grad_fn is None for v in terms.values())


def test_pcgrad_step_holds_one_clusters_activations_at_a_time():
    # Each cluster's slice goes forward and backward before the next one starts, so a PCGrad step holds about 1/K of
    # a vanilla step's activations, besides G (K x 4P bytes), one slice's gradients and the combined gradient. K
    # backward passes through the whole batch's graph held all of them until the last pass (this test's PCGrad peak
    # was then 63 MB, above vanilla's 60 MB). 200 images of 16 tokens: the activations dwarf the 0.75 MB of weights.
    peaks = {}
    for method in ("vanilla", "ant-pcgrad"):
        run = make_run("--method", method, "--global-batch-size", "200", perturb=0.02)
        x, y = torch.randn(200, 3, 16, 16), torch.randint(0, NUM_CLASSES, (200,))
        train.train_step(run, x, y, 0)  # AdamW's moments exist from here on
        with LiveBytes() as mem:
            train.train_step(run, x, y, 1)
        peaks[method] = mem.peak
    K, unit = 5, 4 * sum(p.numel() for p in run.params)
    assert peaks["vanilla"] > 60 * unit  # activations dominate
    assert peaks["ant-pcgrad"] - (K + 2) * unit < 1.3 * peaks["vanilla"] / K


def test_nash_update_step_makes_no_second_K_by_P_tensor():
    # The combined gradient (alpha @ G) / K once came from (alpha[:, None] * G).sum(0): a second (K, P) float32
    # tensor beside G, 13.5 GB for DiT-XL/2 at K = 5. weighted_sum adds the rows one at a time.
    run = make_run("--method", "ant-nash", perturb=0.02)
    K, P = len(run.method.intervals), sum(p.numel() for p in run.params)
    assert run.method.nash.should_update(0)
    with LiveBytes() as mem:
        train.train_step(run, *batch(10), 0)
    assert mem.made.count(4 * K * P) == 1  # G alone


def test_a_resumed_run_lets_go_of_the_loaded_checkpoint(tmp_path, monkeypatch):
    # Its tensors are copied into the model, EMA and optimiser; kept, they held 16 bytes per parameter of host RAM on
    # every rank for the whole run (10.8 GB per rank for DiT-XL/2).
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "1")
    loaded, alive = [], []
    real_load, real_step = torch.load, train.train_step

    def load(*args, **kwargs):
        ckpt = real_load(*args, **kwargs)
        if isinstance(ckpt, dict) and "model" in ckpt:
            loaded.append(weakref.ref(ckpt["model"]["x_embedder.proj.weight"]))
        return ckpt

    def step(*args, **kwargs):
        gc.collect()
        alive.append(any(ref() is not None for ref in loaded))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(train, "train_step", step)
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--resume", "auto")
    assert len(loaded) == 1 and alive == [False]  # read once: --resume auto's check hands over what it loaded


def test_sample_indices_fill_one_array_instead_of_concatenating_batches():
    # A list of batches and their concatenation held every image twice: 19.7 GB for 50K samples of 256 px.
    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=4,
                learn_sigma=False).eval()
    indices = list(range(1024))
    with LiveBytes() as mem:
        images, labels = sample.sample_indices(model, gd.Diffusion(100, learn_sigma=False), indices, "cpu", batch_size=8,
                                               steps="2")
    assert images.shape == (1024, 32, 32, 3) and labels.shape == (1024,)
    assert mem.peak < 1.5 * images.numel()  # the images, one batch's work and the model's tables; 2.0 more before
    again, again_labels = sample.sample_indices(model, gd.Diffusion(100, learn_sigma=False), indices[::-1][:16], "cpu",
                                                batch_size=8, steps="2")
    assert torch.equal(again, images.flip(0)[:16]) and torch.equal(again_labels, labels.flip(0)[:16])


def test_merge_parts_puts_each_batch_in_place_in_one_array(tmp_path):
    # Rank 0 of sample.py used to hold every rank's samples, their concatenation and its sorted copy at once (3 x 9.8 GB
    # for 50K samples of 256 px); now the result and one part. numpy reports its allocations to tracemalloc.
    rng = np.random.default_rng(0)
    world, n, batch = 4, 403, 40
    images, labels = rng.integers(0, 256, (n + 5, 64, 64, 3), dtype=np.uint8), rng.integers(0, 1000, n + 5)  # 5 MB
    for r in range(world):
        mine = np.arange(r, n + 5, world)  # sample.main's split: rank r makes r, r + W, ...; the last 5 of a longer run
        for idx in np.split(mine, range(batch, len(mine), batch)):
            np.savez(tmp_path / f"{idx[0]:010d}.npz", idx=idx, images=images[idx], labels=labels[idx])
    (got, got_labels), peak = traced_peak(lambda: sample.merge_parts(str(tmp_path), n))
    assert np.array_equal(got, images[:n]) and np.array_equal(got_labels, labels[:n])
    assert peak < images[:n].nbytes + 4 * images[:batch].nbytes  # the result and a few parts (1.3); 2.1 with shards of 1/W
    (tmp_path / "0000000161.npz").unlink()  # a part lost: its samples are named, not left as uninitialised memory
    with pytest.raises(ValueError, match=r"lacks 40 samples \(the first: \[161, 165, 169, 173, 177\]\)"):
        sample.merge_parts(str(tmp_path), n)


def test_merge_parts_names_a_part_whose_images_are_damaged(tmp_path):
    # check_parts reads only a part's idx, so a part with damaged images passed it, and every rerun's merge ended in
    # zipfile's "Bad CRC-32 for file 'images.npy'" traceback, naming no file and sampling nothing again
    for start in (0, 2):
        idx = np.arange(start, start + 2)
        np.savez(tmp_path / f"{start:010d}.npz", idx=idx, images=np.full((2, 4, 4, 3), start, np.uint8), labels=idx)
    raw = bytearray((tmp_path / "0000000002.npz").read_bytes())
    raw[raw.index(b"images.npy") + 200] ^= 0xFF  # inside the images member's data
    (tmp_path / "0000000002.npz").write_bytes(bytes(raw))
    (tmp_path / "settings.json").write_text("{}")
    assert sample.check_parts(str(tmp_path), {}) == {0, 1, 2, 3}  # its idx reads: the rerun makes nothing again
    with pytest.raises(ValueError, match=r"0000000002.npz cannot be read \(BadZipFile: .*\); delete it, and the rerun "
                                         r"samples its batch again"):
        sample.merge_parts(str(tmp_path), 4)


def test_readme_results_tables_are_the_records():
    """Every FID table under README Results is fid_table of a run set kept in records/: no number typed by hand."""
    readme = (REPO / "README.md").read_text()
    order = ("vanilla", "dtr", "ant-uw", "curriculum", "dtr+ant-uw")  # the README's column order
    sets = sorted(p for p in (REPO / "records").iterdir() if p.is_dir())
    assert [p.name for p in sets] == ["cifar10", "cifar10-cosine"]
    for folder in sets:
        curves = {m: fid.read_fid_curve(folder / m) for m in order if (folder / m).is_dir()}
        assert len(curves) == len([p for p in folder.iterdir() if p.is_dir()]), f"{folder}: a run outside {order}"
        table = fid.fid_table(curves).split("\n\n")[0]  # (the sample-count line is said in prose instead)
        assert table in readme, f"README Results lacks the table of {folder.name}:\n{table}"


def test_records_script_and_readme_command_have_the_recorded_settings(tmp_path):
    """records/cifar10.sh and README's train.py command parse to the settings each record's metrics.jsonl starts with
    (paths aside), so rerunning either reproduces the records; only the curriculum adds its fixed pacing, which the
    README names in prose."""
    fake = tmp_path / "bin" / "python"  # stands in for python: writes each call's arguments, one call a line
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\0" "$@" >> "$ARGV_LOG"\necho >> "$ARGV_LOG"\n')
    fake.chmod(0o755)
    log = tmp_path / "argv"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGV_LOG": str(log)}
    usage = subprocess.run(["bash", str(REPO / "records" / "cifar10.sh")], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and usage.stderr.startswith("bash records/cifar10.sh TRAIN_ZIP") and not log.exists()

    def script_args(schedule, method):
        log.unlink(missing_ok=True)
        subprocess.run(["bash", str(REPO / "records" / "cifar10.sh"), "train.zip", "W.pth", str(tmp_path / "runs"),
                        schedule, "0", method], check=True, env=env)
        fid_call, train_call = [line.split("\0")[:-1] for line in log.read_text().splitlines()]
        assert fid_call == [str(REPO / "fid.py"), "train.zip", "--save-stats", str(tmp_path / "runs" / "ref.npz"),
                            "--inception", "W.pth", "--batch-size", "500"]
        assert train_call[0] == str(REPO / "train.py")
        return vars(train.parse_args(train_call[1:]))

    block = (REPO / "README.md").read_text().split("python train.py --data cifar10-train-jpeg.zip", 1)[1]
    command = "--data cifar10-train-jpeg.zip " + block[:block.index("--out runs/METHOD")].replace("\\\n", " ")
    pacing = re.search(r"A curriculum run [^`]*adds `([^`]*)`", " ".join((REPO / "README.md").read_text().split()))[1]
    paths = ("data", "out", "fid_ref", "inception")
    for folder, schedule in (("cifar10", "linear"), ("cifar10-cosine", "cosine")):
        for run in sorted((REPO / "records" / folder).iterdir()):
            recorded = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["args"]
            readme = vars(train.parse_args(command.replace("METHOD", run.name).split()
                                           + ["--schedule", schedule] * (schedule == "cosine")
                                           + pacing.split() * ("curriculum" in run.name)))
            for name, parsed in (("records/cifar10.sh", script_args(schedule, run.name)), ("README", readme)):
                assert set(recorded) - set(parsed) == {"num_classes"}, f"{name}: a recorded flag is gone"
                changed = {k: (recorded[k], parsed[k]) for k in recorded if k not in paths + ("num_classes",)
                           and recorded[k] != parsed[k]}
                assert not changed, f"{name} differs from {folder}/{run.name} (recorded, now): {changed}"
    curriculum = script_args("cosine", "curriculum")
    assert (curriculum["curriculum_pacing"], curriculum["curriculum_stage_steps"]) == ("fixed", 60)
    assert curriculum["out"] == str(tmp_path / "runs" / "cosine-seed0" / "curriculum")


def test_readme_snippets_run_on_a_foreign_model(tmp_path):
    """README's "Using a module in your own code": each snippet runs in a fresh process on a toy MLP and transformer
    that are not our DiT, with only its own module file on the path (no other file of this repo), and warns nothing."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Using a module in your own code\n")[1].split("\n## ")[0]
    snippets = [block.split("\n```")[0] for block in section.split("```python\n")[1:]]
    modules = ["dtr", "negative_transfer", "curriculum"]  # the order of the snippets
    assert [next(m for m in modules if m in s.split("\n")[0]) for s in snippets] == modules
    for m in modules:
        (tmp_path / m).mkdir()
        (tmp_path / m / f"{m}.py").write_text((REPO / f"{m}.py").read_text())
    script = textwrap.dedent("""
        import importlib.util, sys, torch, torch.nn as nn
        assert importlib.util.find_spec("dit") is None  # the repo is not on the path
        folders, snippets = sys.argv[1:4], sys.argv[4:]
        torch.manual_seed(0)
        T, B, steps, width = 100, 10, 3, 16
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.2, T, dtype=torch.float64), 0)
        data = torch.randn(B, 3, 8, 8)

        def setup():  # a user's toy MLP denoiser, its optimiser and per-sample epsilon loss
            model = nn.Sequential(nn.Linear(3 * 64 + 1, 32), nn.SiLU(), nn.Linear(32, 3 * 64))
            def losses(t, rows=slice(None)):  # the images `rows` of the batch at timesteps t (ANT's slices)
                eps = torch.randn_like(data[rows])
                a = abar[t].float()[:, None, None, None]
                x = a.sqrt() * data[rows] + (1 - a).sqrt() * eps
                pred = model(torch.cat([x.flatten(1), t[:, None].float() / T], 1)).view_as(x)
                return ((pred - eps) ** 2).mean(dim=(1, 2, 3))  # (len(t),)
            return dict(T=T, B=B, steps=steps, abar=abar, model=model, losses=losses,
                        opt=torch.optim.AdamW(model.parameters(), lr=1e-3))

        class Block(nn.Module):  # a pre-norm block of the user's transformer: block(x), not DiT's block(x, c)
            def __init__(self):
                super().__init__()
                self.norm, self.mlp = nn.LayerNorm(width), nn.Linear(width, width)
            def forward(self, x):
                return x + self.mlp(self.norm(x))

        sys.path.insert(0, folders[0])
        h0, t = torch.randn(B, 5, width), torch.randint(0, T, (B,))
        ns = dict(nn=nn, T=T, width=width, blocks=nn.ModuleList(Block() for _ in range(2)), h=h0, t=t)
        exec(snippets[0], ns)
        ref = h0  # the paper's z + Block(m_t * z), Block's branch written out
        for block in ns["blocks"]:
            ref = ref + block.mlp(block.norm(ns["m"][:, None] * ref))
        torch.testing.assert_close(ns["h"], ref)
        assert 0 < ns["m"].sum(1).min() < width

        sys.path[0] = folders[1]
        for pcgrad in (False, True):
            ns = dict(setup(), pcgrad=pcgrad)
            before = [p.detach().clone() for p in ns["model"].parameters()]
            exec(snippets[1], ns)
            assert all(not torch.equal(a, p) for a, p in zip(before, ns["model"].parameters()))
            assert (ns["uw"].log_vars.detach() != 0).all() != pcgrad  # UW's s_k learn in the added group

        sys.path[0] = folders[2]
        ns = setup()
        exec(snippets[2], ns)
        assert ns["cur"].stage_updates == steps
    """)
    r = subprocess.run([sys.executable, "-W", "error", "-c", script, *(str(tmp_path / m) for m in modules), *snippets],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1"}.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr


def test_float64_model_outputs_stay_float64_and_shapes_are_checked():
    # a float64 input keeps the model output float64 (the exact-analysis path); a 2N-row output or a broadcastable
    # noise is refused instead of broadcasting
    d = gd.Diffusion(learn_sigma=False)
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    losses = d.training_losses(lambda x, t: torch.full_like(x, 1 / 3), x0, torch.tensor([5, 6]), noise=torch.zeros_like(x0))
    assert losses["mse"].dtype == torch.float64 and losses["mse"][0].item() == (1 / 3) ** 2
    with pytest.raises(ValueError, match="noise must have the shape"):
        d.training_losses(lambda x, t: x, x0, torch.tensor([5, 6]), noise=torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch size and spatial shape"):
        d.sample(lambda x, t: torch.cat([x, x]), torch.zeros(1, 1, 2, 2), steps="ddim5")


def test_a_run_that_ends_before_the_curriculum_finishes_says_so(tmp_path, capsys):
    # fixed pacing: 3 stages of 1000 steps cannot finish in 4 steps; both the start and the end say so
    run_train(tmp_path, "--method", "curriculum", "--global-batch-size", "8", "--max-steps", "4",
              "--curriculum-pacing", "fixed", "--curriculum-stage-steps", "1000", "--curriculum-clusters", "3")
    out = capsys.readouterr().out
    assert "curriculum stage 1/3: t in [666, 1000) (easy-to-hard, fixed)" in out
    assert "reaches the curriculum's last stage at step 2000, not before --max-steps 4" in out
    assert "warning: the run ended in curriculum stage 1/3" in out and "outside [666, 1000)" in out
