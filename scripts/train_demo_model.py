#!/usr/bin/env python
"""Train the embedded demo model: a tiny Latent Consistency Model for captioned coloured shapes.

Everything runs on a CPU and is seeded: 24 + 45 + 20 = 89 minutes by default on a 2-core machine (the shipped
model: each stage on one thread; the teacher and distill stages of two candidate UNets ran side by side, one core
each). ``--device cuda`` trains on a GPU instead (a recipe search at the CPU's step counts: ``--steps-*``). Four
stages, each resumable from its own checkpoint in ``--work``:

1. ``vae``      AutoencoderKL, 64x64 RGB -> 4x16x16 latents (4x downscale: three levels, 16/32/32 channels).
                Loss: L1 + L2 on RGB (what the judge looks at is colour) + a KL weight of 1e-6 on the
                posterior, whose samples are decoded (so the decoder tolerates latent noise). At the end the
                latent ``scaling_factor`` is set to 1/std of the latents of 1,024 training images.
2. ``teacher``  A plain UNet2DConditionModel (no ``time_cond_proj_dim``) trained jointly with a small
                CLIPTextModel (hidden 32, 2 layers, the real 49,408-token CLIP vocabulary): epsilon
                prediction on the SD-1.5 ``scaled_linear`` betas (0.00085-0.012, 1000 steps), the caption
                replaced by "" 10% of the time (classifier-free guidance), learning rate 2e-3. The later
                stages use an exponential moving average of its weights (decay 0.999, warmed up). In a GPU
                recipe search at 2,056 steps the two together made the teacher 94% fully correct, against
                86% at the first model's 1e-3 with or without the EMA (see the model card).
3. ``distill``  Latent consistency distillation (LCM paper, Algorithm 1): the student is the teacher's UNet
                plus a guidance embedding (``time_cond_proj_dim`` 64, ``cond_proj`` zero-initialised) and the
                text encoder is frozen. Each step draws n from the 50-step DDIM grid (t = 20n - 1, skipping
                k = 20), t' = t - 20, a guidance w ~ U[1, 3] (= pipeline guidance_scale - 1), noises the
                latents to t, runs one DDIM step t -> t' with the teacher under CFG (x0 and eps mixed as
                cond + w (cond - uncond)), and regresses the student's boundary-conditioned prediction
                f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) on the EMA target's f(z_t', t') (Huber
                loss, c = 1e-3). c_skip/c_out are LCMScheduler's (timestep_scaling 10, sigma_data 0.5).
                The target network is an EMA (decay 0.95) of the student.
4. ``export``   Writes a diffusers folder (LatentConsistencyModelPipeline) to ``--out`` (default
                ``nodes/data/demo``): unet/ (student), teacher_unet/ (teacher), vae/, text_encoder/
                (``text_model.*`` layout), tokenizer/ (the shipped CLIP files), scheduler/ (the LCMScheduler
                config of LCM_Dreamshaper_v7). UNets and text encoder are stored as float16 safetensors.

Optional, experimental (``--stages lcm_lora,export_lora``): ``lcm_lora`` distils the teacher into LoRA layers the
same way (no guidance embedding; the guidance is baked in), ``export_lora`` writes them as a diffusers LoRA file
to ``--lora-out``. Not shipped: 14 minutes (467 steps) did not beat the teacher alone at 4 steps (see the card).

Data: :mod:`nodes.demo.shapes`, generated on the fly; batch i of a stage is drawn from
``numpy.random.default_rng([seed, stage, i])``, so a resumed run sees the same data as an uninterrupted
one. The held-out (shape, colour, background) triples of ``nodes.demo.shapes.HELD_OUT`` are never drawn.
Stages stop after ``--minutes-<stage>`` of wall-clock (or ``--steps-<stage>``), with a cosine learning-rate
decay over that budget; step counts therefore depend on the machine's speed.

Usage::

    python scripts/train_demo_model.py --work /tmp/demo_work            # all stages
    python scripts/train_demo_model.py --work /tmp/demo_work --resume   # continue after an interruption
    python scripts/train_demo_model.py --work /tmp/demo_work --stages export
    python scripts/train_demo_model.py --work /tmp/demo_work --stages lcm_lora,export_lora

Progress goes to ``<work>/train.log`` and stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.demo import shapes  # noqa: E402
from nodes.testing.tiny import tiny_text_encoder  # noqa: E402

SHIPPED_TOKENIZER = ROOT / "nodes" / "data" / "clip_tokenizer"
DEFAULT_OUT = ROOT / "nodes" / "data" / "demo"
STAGES = ("vae", "teacher", "distill", "export", "lcm_lora", "export_lora")
STAGE_ID = {"vae": 1, "teacher": 2, "distill": 3, "lcm_lora": 4}

TEXT_HIDDEN = 32
COND_PROJ_DIM = 64
NUM_TRAIN_TIMESTEPS = 1000
ORIGINAL_INFERENCE_STEPS = 50
SKIP = NUM_TRAIN_TIMESTEPS // ORIGINAL_INFERENCE_STEPS  # k = 20
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5
UNCOND_PROB = 0.1
# w = guidance_scale - 1, around the teacher's best (g 3). A range up to w = 7 (g 8), as LCM_Dreamshaper uses,
# made every further sampling step shrink and darken the shape: 4 steps 30% correct instead of 40%.
W_RANGE = (1.0, 3.0)
EMA_DECAY = 0.95
HUBER_C = 1e-3
LORA_W_RANGE = (1.5, 3.5)  # LCM-LoRA bakes in one guidance: w = g - 1 around the teacher's best (g 3)
LORA_RANK = 8
# The layers diffusers' LCM-LoRA training script adapts (attention, feed-forward, resnets, resamplers).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]

LOG_FILE: Path | None = None
# Where the stages compute (--device). The script's own random draws come from torch's CPU generator and are then
# moved, so the CPU results do not depend on this option's existence (the VAE's posterior samples use the device's).
DEVICE = torch.device("cpu")


def log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    if LOG_FILE is not None:
        with LOG_FILE.open("a") as f:
            f.write(line + "\n")


# --------------------------------------------------------------------------------------------
# Model configurations
# --------------------------------------------------------------------------------------------


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),  # three levels: 2 downsamplings, 64 px -> 16x16 latents
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by 1/std of the latents at the end of the vae stage
    )


#: Which UNet levels have cross-attention (--attention): "8x8,4x4" (the first demo models) or "4x4".
ATTENTION = {"8x8,4x4": (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
             "4x4": (("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                     ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"))}
UNET_ATTENTION = "4x4"


def make_unet(*, lcm: bool):
    from diffusers import UNet2DConditionModel

    down, up = ATTENTION[UNET_ATTENTION]
    return UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        # Cross-attention at 4x4 (and in the 4x4 mid block) only: a 4-step image fits in 50 ms on one core, and
        # with the teacher's learning rate 2e-3 it learns colours and shapes. Attention at 8x8 too draws better
        # (92% vs 84% at 4 steps) but costs ~25% more per step; two-level UNets with attention only at 8x8 never
        # learnt background colours at the first teacher's 1e-3 (model card).
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
        time_cond_proj_dim=COND_PROJ_DIM if lcm else None,
    )


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(SHIPPED_TOKENIZER))


def make_text_encoder(tokenizer):
    return tiny_text_encoder(tokenizer, hidden=TEXT_HIDDEN, intermediate=64)


def make_scheduler():
    """The LCMScheduler configuration of SimianLuo/LCM_Dreamshaper_v7."""
    from diffusers import LCMScheduler

    return LCMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=ORIGINAL_INFERENCE_STEPS,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
        timestep_scaling=TIMESTEP_SCALING,
    )


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(DEVICE)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def batch_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGE_ID[stage], step])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (what VaeImageProcessor.preprocess gives)."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(DEVICE)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (what the pipelines' postprocess gives)."""
    x = (x * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def lr_at(base: float, frac: float, warmup_frac: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base`` at the end of the budget."""
    frac = min(max(frac, 0.0), 1.0)
    if frac < warmup_frac:
        return base * max(frac / warmup_frac, 0.02)
    p = (frac - warmup_frac) / (1 - warmup_frac)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def save_ckpt(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class Budget:
    """Wall-clock budget of a stage, carried across resumes (``elapsed`` is stored in the checkpoint)."""

    def __init__(self, minutes: float, max_steps: int | None, elapsed: float = 0.0):
        self.seconds = minutes * 60
        self.max_steps = max_steps
        self.start = time.time() - elapsed

    @property
    def elapsed(self) -> float:
        return time.time() - self.start

    def frac(self, step: int) -> float:
        f = self.elapsed / self.seconds
        if self.max_steps:
            f = max(f, step / self.max_steps)
        return f

    def done(self, step: int) -> bool:
        return self.frac(step) >= 1.0


class StageLoop:
    """What every stage shares: resume from ``<work>/<name>.pt``, the wall-clock budget with its learning-rate
    schedule, a log line every 30 s and a checkpoint every 2 minutes.

    ``modules`` maps checkpoint keys to the modules whose weights are saved. Iterating yields step numbers
    until the budget is spent; call :meth:`record` with each step's loss.
    """

    def __init__(self, name: str, args, work: Path, modules: dict, opt, *, lr: float, minutes: float,
                 max_steps: int | None):
        self.name, self.modules, self.opt, self.base_lr = name, modules, opt, lr
        self.path = work / f"{name}.pt"
        self.step, elapsed, self.already_finished = 0, 0.0, False
        if args.resume and self.path.exists():
            state = torch.load(self.path, weights_only=False, map_location=DEVICE)
            if state.get("finished"):
                self.already_finished = True
                log(f"{name}: already finished")
            else:
                for key, module in modules.items():
                    module.load_state_dict(state[key])
                opt.load_state_dict(state["opt"])
                self.step, elapsed = state["step"], state["elapsed"]
                torch.set_rng_state(state["torch_rng"].cpu())
                log(f"{name}: resumed at step {self.step}")
        self.budget = Budget(minutes, max_steps, elapsed)
        self.ema_loss: float | None = None
        self.lr = lr

    def __iter__(self):
        if self.already_finished:
            return
        last_save = t_log = time.time()
        while not self.budget.done(self.step):
            self.lr = lr_at(self.base_lr, self.budget.frac(self.step))
            for g in self.opt.param_groups:
                g["lr"] = self.lr
            yield self.step
            self.step += 1
            if time.time() - t_log > 30:
                log(f"{self.name}: step {self.step} loss {self.ema_loss:.4f} lr {self.lr:.2e} "
                    f"elapsed {self.budget.elapsed / 60:.1f} min")
                t_log = time.time()
            if time.time() - last_save > 120:
                self.save()
                last_save = time.time()

    def record(self, loss: torch.Tensor) -> None:
        value = loss.item()
        self.ema_loss = value if self.ema_loss is None else 0.98 * self.ema_loss + 0.02 * value

    def save(self, finished: bool = False, **extra) -> None:
        state = {key: m.state_dict() for key, m in self.modules.items()}
        save_ckpt(self.path, {**state, "opt": self.opt.state_dict(), "step": self.step,
                              "elapsed": self.budget.elapsed, "torch_rng": torch.get_rng_state(),
                              "finished": finished, **extra})

    def finish(self, **extra) -> None:
        log(f"{self.name}: done, {self.step} steps, {self.budget.elapsed / 60:.1f} min, loss {self.ema_loss}")
        self.save(finished=True, **extra)


def optimise(opt, params, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Prompt embeddings as the pipelines compute them (padded to 77, last_hidden_state)."""
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    emb = text_encoder(ids.to(DEVICE))[0]
    index = torch.tensor([unique.index(c) for c in captions], device=DEVICE)
    return emb[index]


# --------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------


def vae_score(vae, seed: int, n: int = 200) -> dict:
    """Judge accuracy of VAE reconstructions (posterior mean) of n dataset images, all triples."""
    rng = np.random.default_rng([seed, 99])
    images, captions = shapes.sample_batch(rng, n, shapes.all_combos())
    with torch.no_grad():
        x = to_tensor(images)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return shapes.score(to_uint8(rec), captions)


def stage_vae(args, work: Path) -> None:
    torch.manual_seed(args.seed)
    vae = make_vae().to(DEVICE)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae, weight_decay=0.0)
    loop = StageLoop("vae", args, work, {"model": vae}, opt, lr=args.lr_vae, minutes=args.minutes_vae,
                     max_steps=args.steps_vae)
    if loop.already_finished:
        return
    vae.train()
    for step in loop:
        images, _ = shapes.sample_batch(batch_rng(args.seed, "vae", step), args.batch_vae)
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        err = rec - x
        loss = err.abs().mean() + err.pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimise(opt, vae.parameters(), loss)
        loop.record(loss)

    vae.eval()
    with torch.no_grad():
        images, _ = shapes.sample_batch(np.random.default_rng([args.seed, 98]), 1024)
        latents = vae.encode(to_tensor(images)).latent_dist.sample()
        scaling = float(1.0 / latents.flatten().std())
    vae.register_to_config(scaling_factor=scaling)
    score = vae_score(vae, args.seed)
    log(f"vae: scaling_factor {scaling:.5f}, latent mean {latents.mean():.3f}, recon judge {score}")
    loop.finish(scaling_factor=scaling, score=score)


def load_vae(work: Path):
    state = torch.load(work / "vae.pt", weights_only=False, map_location="cpu")
    if not state.get("finished"):
        raise SystemExit("the vae stage has not finished")
    vae = make_vae()
    vae.load_state_dict(state["model"])
    vae.to(DEVICE)
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    vae.eval().requires_grad_(False)
    return vae


def encode_latents(vae, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(to_tensor(images)).latent_dist.sample() * vae.config.scaling_factor


# --------------------------------------------------------------------------------------------
# Stage 2: teacher
# --------------------------------------------------------------------------------------------


def stage_teacher(args, work: Path) -> None:
    vae = load_vae(work)
    tokenizer = make_tokenizer()
    torch.manual_seed(args.seed + 1)
    unet = make_unet(lcm=False).to(DEVICE)
    text_encoder = make_text_encoder(tokenizer).to(DEVICE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr_teacher, weight_decay=0.0)
    modules = {"unet": unet, "text_encoder": text_encoder}
    if args.teacher_ema:
        # An exponential moving average of the weights (what the later stages use): smoother samples for free.
        ema = {f"ema_{k}": copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
        modules.update(ema)
        ema_pairs = [(pe, p) for k in ("unet", "text_encoder")
                     for pe, p in zip(ema[f"ema_{k}"].parameters(), modules[k].parameters())]
    loop = StageLoop("teacher", args, work, modules, opt,
                     lr=args.lr_teacher, minutes=args.minutes_teacher, max_steps=args.steps_teacher)
    if loop.already_finished:
        return
    ac = alphas_cumprod()
    unet.train()
    text_encoder.train()
    for step in loop:
        rng = batch_rng(args.seed, "teacher", step)
        images, captions = shapes.sample_batch(rng, args.batch_teacher)
        captions = ["" if rng.random() < UNCOND_PROB else c for c in captions]
        x0 = encode_latents(vae, images)
        noise = torch.randn_like(x0, device="cpu").to(DEVICE)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],)).to(DEVICE)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = encode_text(tokenizer, text_encoder, captions)
        eps = unet(zt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(eps, noise)
        optimise(opt, params, loss)
        if args.teacher_ema:
            decay = min(args.teacher_ema, (1 + step) / (10 + step))  # warm-up: early weights are forgotten
            with torch.no_grad():
                for pe, p in ema_pairs:
                    pe.lerp_(p, 1 - decay)
        loop.record(loss)
    loop.finish(ema=bool(args.teacher_ema))


def load_teacher(work: Path):
    state = torch.load(work / "teacher.pt", weights_only=False, map_location="cpu")
    if not state.get("finished"):
        raise SystemExit("the teacher stage has not finished")
    prefix = "ema_" if state.get("ema") else ""
    tokenizer = make_tokenizer()
    unet = make_unet(lcm=False)
    unet.load_state_dict(state[prefix + "unet"])
    text_encoder = make_text_encoder(tokenizer)
    text_encoder.load_state_dict(state[prefix + "text_encoder"])
    unet.to(DEVICE)
    text_encoder.to(DEVICE)
    return tokenizer, unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Stage 3: latent consistency distillation
# --------------------------------------------------------------------------------------------


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's w-embedding (sin first), as LatentConsistencyModelPipeline computes it for w = g - 1."""
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's c_skip, c_out at integer timesteps t (timestep_scaling 10, sigma_data 0.5)."""
    st = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
    c_out = st / (st**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def make_student(teacher):
    student = make_unet(lcm=True).to(DEVICE)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == [] and missing == ["time_embedding.cond_proj.weight"], (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (torch.sqrt((pred.float() - target.float()) ** 2 + HUBER_C**2) - HUBER_C).mean()


def consistency_pair(x0, cond, uncond, teacher, *, w_range, student, target, ac):
    """One latent consistency distillation sample (LCM paper, Algorithm 1) for latents ``x0``: the student's
    boundary-conditioned prediction f(z_t, t) with gradients, and the target network's f(z_t', t') after one DDIM
    step of the teacher under classifier-free guidance w ~ U(w_range) (cond + w (cond - uncond)).

    Skipping-step schedule: t on the 50-step DDIM grid (19, 39, ..., 999), t' = t - k. ``student`` and ``target``
    map (z, t, w) to the predicted noise. Random draws: n, w, then the noise."""
    b = x0.shape[0]
    n = torch.randint(1, ORIGINAL_INFERENCE_STEPS + 1, (b,)).to(DEVICE)
    t = n * SKIP - 1
    t_prev = (t - SKIP).clamp(min=0)
    w = (w_range[0] + (w_range[1] - w_range[0]) * torch.rand(b)).to(DEVICE)
    noise = torch.randn_like(x0, device="cpu").to(DEVICE)
    a_t = ac[t].view(-1, 1, 1, 1)
    a_p = ac[t_prev].view(-1, 1, 1, 1)
    zt = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

    c_skip, c_out = boundary_scalings(t)
    eps_s = student(zt, t, w)
    x0_s = (zt - (1 - a_t).sqrt() * eps_s) / a_t.sqrt()
    pred = c_skip * zt + c_out * x0_s

    with torch.no_grad():
        eps_tu = teacher(torch.cat([zt, zt]), torch.cat([t, t]),
                         encoder_hidden_states=torch.cat([cond, uncond.expand(b, -1, -1)])).sample
        eps_c, eps_u = eps_tu.chunk(2)
        wv = w.view(-1, 1, 1, 1)
        eps_g = eps_c + wv * (eps_c - eps_u)
        x0_g = (zt - (1 - a_t).sqrt() * eps_g) / a_t.sqrt()
        z_prev = a_p.sqrt() * x0_g + (1 - a_p).sqrt() * eps_g
        c_skip_p, c_out_p = boundary_scalings(t_prev)
        eps_p = target(z_prev, t_prev, w)
        x0_p = (z_prev - (1 - a_p).sqrt() * eps_p) / a_p.sqrt()
        tgt = c_skip_p * z_prev + c_out_p * x0_p
    return pred, tgt


def distillation_batches(loop: StageLoop, args, vae, tokenizer, text_encoder):
    """Each step's (latents, caption embeddings, empty-caption embedding) from the frozen VAE and text encoder."""
    with torch.no_grad():
        uncond = encode_text(tokenizer, text_encoder, [""])
    for step in loop:
        images, captions = shapes.sample_batch(batch_rng(args.seed, loop.name, step), args.batch_distill)
        x0 = encode_latents(vae, images)
        with torch.no_grad():
            cond = encode_text(tokenizer, text_encoder, captions)
        yield x0, cond, uncond


def stage_distill(args, work: Path) -> None:
    vae = load_vae(work)
    tokenizer, teacher, text_encoder = load_teacher(work)
    torch.manual_seed(args.seed + 2)
    student = make_student(teacher)
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr_distill, weight_decay=0.0)
    loop = StageLoop("distill", args, work, {"student": student, "target": target}, opt,
                     lr=args.lr_distill, minutes=args.minutes_distill, max_steps=args.steps_distill)
    if loop.already_finished:
        return
    ac = alphas_cumprod()
    student.train()
    for x0, cond, uncond in distillation_batches(loop, args, vae, tokenizer, text_encoder):
        pred, tgt = consistency_pair(
            x0, cond, uncond, teacher, w_range=(args.w_min, args.w_max), ac=ac,
            student=lambda z, t, w: student(z, t, encoder_hidden_states=cond,
                                            timestep_cond=guidance_embedding(w, COND_PROJ_DIM)).sample,
            target=lambda z, t, w: target(z, t, encoder_hidden_states=cond,
                                          timestep_cond=guidance_embedding(w, COND_PROJ_DIM)).sample)
        loss = pseudo_huber(pred, tgt)
        optimise(opt, student.parameters(), loss)
        with torch.no_grad():
            for p_t, p_s in zip(target.parameters(), student.parameters()):
                p_t.mul_(EMA_DECAY).add_(p_s.detach(), alpha=1 - EMA_DECAY)
        loop.record(loss)
    loop.finish()


# --------------------------------------------------------------------------------------------
# Stage 4: export
# --------------------------------------------------------------------------------------------


def _save_fp16_unet(unet, folder: Path) -> None:
    unet = copy.deepcopy(unet).to(torch.float16)
    unet.save_pretrained(folder, safe_serialization=True)


def _save_text_encoder(text_encoder, folder: Path) -> None:
    """config.json + model.safetensors with keys in the ``text_model.*`` layout (float16)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    text_encoder.config.architectures = [type(text_encoder).__name__]
    text_encoder.config.save_pretrained(folder)
    # Weights are stored as float16 to halve the 49,408 x 32 embedding; transformers 5 would then load the
    # model in float16 (dtype "auto"), so the config names float32, the dtype the pipelines run in.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = {}
    for k, v in text_encoder.state_dict().items():
        key = k if k.startswith("text_model.") else "text_model." + k
        weights[key] = v.detach().to(torch.float16).contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def stage_export(args, work: Path) -> None:
    from diffusers import LatentConsistencyModelPipeline

    out = Path(args.out)
    vae = load_vae(work)
    tokenizer, teacher, text_encoder = load_teacher(work)
    state = torch.load(work / "distill.pt", weights_only=False, map_location="cpu")
    if not state.get("finished"):
        log("export: WARNING the distill stage has not finished; exporting its last checkpoint")
    student = make_unet(lcm=True)
    student.load_state_dict(state["student"])
    scheduler = make_scheduler()

    for sub in ("unet", "teacher_unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _save_fp16_unet(student, out / "unet")
    _save_fp16_unet(teacher, out / "teacher_unet")
    vae.save_pretrained(out / "vae", safe_serialization=True)  # float32: small, and colour-critical
    _save_text_encoder(text_encoder, out / "text_encoder")
    (out / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(SHIPPED_TOKENIZER / name, out / "tokenizer" / name)
    scheduler.save_pretrained(out / "scheduler")
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=student,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_config(out)
    stages = {s: torch.load(work / f"{s}.pt", weights_only=False, map_location="cpu") for s in ("vae", "teacher")}
    stages["distill"] = state
    info = {**{f"{s}_steps": st["step"] for s, st in stages.items()},
            "minutes": {s: round(st["elapsed"] / 60, 1) for s, st in stages.items()},
            "attention": UNET_ATTENTION, "teacher_ema": bool(stages["teacher"].get("ema")), "seed": args.seed}
    (work / "export_info.json").write_text(json.dumps(info, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    log(f"export: wrote {out} ({size / 1e6:.2f} MB of weights) {info}")


# --------------------------------------------------------------------------------------------
# Optional stages 5-6: an LCM-LoRA for the teacher
# --------------------------------------------------------------------------------------------


def make_lora_student(teacher):
    """The teacher with LoRA layers (rank LORA_RANK, alpha = rank, B zero-initialised) on LORA_TARGETS."""
    from peft import LoraConfig

    student = copy.deepcopy(teacher).requires_grad_(False)
    student.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                   target_modules=LORA_TARGETS))
    return student


def stage_lcm_lora(args, work: Path) -> None:
    """LCM-LoRA (Luo et al., 2023): latent consistency distillation into LoRA layers on the frozen teacher, as
    diffusers' LCM-LoRA training script does it: no guidance embedding (one guidance, drawn per sample from
    LORA_W_RANGE, is baked in), and the target is the LoRA student itself without gradients (no EMA copy)."""
    vae = load_vae(work)
    tokenizer, teacher, text_encoder = load_teacher(work)
    torch.manual_seed(args.seed + 3)
    student = make_lora_student(teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr_lora, weight_decay=0.0)
    loop = StageLoop("lcm_lora", args, work, {"student": student}, opt, lr=args.lr_lora,
                     minutes=args.minutes_lora, max_steps=args.steps_lora)
    if loop.already_finished:
        return
    ac = alphas_cumprod()
    student.train()
    for x0, cond, uncond in distillation_batches(loop, args, vae, tokenizer, text_encoder):

        def unet(z, t, w):
            return student(z, t, encoder_hidden_states=cond).sample

        pred, tgt = consistency_pair(x0, cond, uncond, teacher, w_range=LORA_W_RANGE, ac=ac, student=unet,
                                     target=unet)
        loss = pseudo_huber(pred, tgt)
        optimise(opt, params, loss)
        loop.record(loss)
    loop.finish()


def stage_export_lora(args, work: Path) -> None:
    """Writes the LoRA layers as a diffusers/peft LoRA file (``unet.*.lora_A/lora_B``, float16)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    _, teacher, _ = load_teacher(work)
    state = torch.load(work / "lcm_lora.pt", weights_only=False, map_location="cpu")
    if not state.get("finished"):
        log("export_lora: WARNING the lcm_lora stage has not finished; exporting its last checkpoint")
    student = make_lora_student(teacher)
    student.load_state_dict(state["student"])
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(student))
    layers = {k: v.detach().to(torch.float16).contiguous() for k, v in layers.items()}
    out = Path(args.lora_out or work / "demo-lcm-lora.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out.parent, unet_lora_layers=layers, weight_name=out.name,
                                              safe_serialization=True)
    log(f"export_lora: wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(layers)} tensors, "
        f"{state['step']} steps)")


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    global LOG_FILE, DEVICE, UNET_ATTENTION
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="checkpoint and log folder")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="exported diffusers folder")
    p.add_argument("--stages", default="vae,teacher,distill,export",
                   help="comma-separated subset of " + ",".join(STAGES) + " (the LCM-LoRA stages are optional)")
    p.add_argument("--resume", action="store_true", help="continue each stage from its checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is robust when the CPU is shared")
    p.add_argument("--device", default="cpu",
                   help="where to train (cpu, cuda, ...); the shipped model and the time budgets are the CPU's")
    p.add_argument("--attention", choices=sorted(ATTENTION), default=UNET_ATTENTION,
                   help="the UNet levels with cross-attention")
    p.add_argument("--teacher-ema", type=float, default=0.999,
                   help="keep an EMA of the teacher's weights with this decay (0: none) and distil from it")
    p.add_argument("--minutes-vae", type=float, default=24)
    p.add_argument("--minutes-teacher", type=float, default=45)
    p.add_argument("--minutes-distill", type=float, default=20)
    p.add_argument("--steps-vae", type=int, default=None, help="stop after this many steps (overrides minutes)")
    p.add_argument("--steps-teacher", type=int, default=None)
    p.add_argument("--steps-distill", type=int, default=None)
    p.add_argument("--batch-vae", type=int, default=32)
    p.add_argument("--batch-teacher", type=int, default=64)
    p.add_argument("--batch-distill", type=int, default=48)
    p.add_argument("--lr-vae", type=float, default=2e-3)
    p.add_argument("--lr-teacher", type=float, default=2e-3)
    p.add_argument("--lr-distill", type=float, default=3e-4)
    p.add_argument("--w-min", type=float, default=W_RANGE[0], help="distillation guidance range, w = g - 1")
    p.add_argument("--w-max", type=float, default=W_RANGE[1])
    p.add_argument("--minutes-lora", type=float, default=15)
    p.add_argument("--steps-lora", type=int, default=None)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lora-out", type=Path, default=None,
                   help="the exported LCM-LoRA file (default: <work>/demo-lcm-lora.safetensors)")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    LOG_FILE = args.work / "train.log"
    torch.set_num_threads(args.threads)
    DEVICE = torch.device(args.device)
    UNET_ATTENTION = args.attention
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}")
    log(f"start: stages {stages} args {vars(args)}")
    for s in STAGES:
        if s in stages:
            globals()[f"stage_{s}"](args, args.work)
    log("all requested stages finished")


if __name__ == "__main__":
    main()
