"""Denoising Score Distillation's Phase II on the engine (``ambient-ray distill``; seed paper 004, Sec. 3.2, with
SiD's generator loss): three networks in one run, each a copy of the teacher's architecture.

Parts: ``generator`` G (trained, exported, with the run's EMA) and ``fake_score`` f_ψ (trained, no EMA), both
initialised from the teacher's EMA weights, and ``teacher`` f_φ (frozen: no gradients, no optimizer state, under
ZeRO-3 partitioned like the others). G(z) = D_G(σ_init·z; σ_init), σ_init = 2.5. Each step (SiD's 1:1 schedule):

1. the fake score learns G's current samples corrupted as the data were, ỹ = G(z) + σ_n·ε (G frozen): the adjusted
   way (DSD's default) with the Phase-I loss (:func:`ambient_ray.diffusion.dsd.fake_score_loss`: σ > σ_n only,
   ỹ as x_{σ_n}), so f_ψ learns the clean G-distribution's denoiser above σ_n as a Phase-I teacher learned the
   data's; the standard way with the plain EDM loss on ỹ (the noisy G-distribution's score, as a teacher trained
   on the noisy data as if clean). A row of σ_n = 0 is plain SiD either way.
2. G learns from SiD's loss (:func:`ambient_ray.diffusion.dsd.generator_loss`, α = 1.2) at x_t = x + σ·ε, σ on
   SiD's schedule up to ≈24.4, x = G(z) (adjusted) or ỹ = G(z) + σ_n·ε (standard): gradients reach G's output
   directly and through both score networks' inputs (the fake score in eval mode with its parameters out of the
   graph, so its optimizer sees none of G's loss); only the normaliser w is under stop-gradient.

The data (``data``) is used only for the rows' class labels, captions and σ_n (as in the reference); without it
labels are uniform. Every ``distill.eval_every`` steps, proximal FD: the EMA generator's one-step samples re-noised
to σ_n (:func:`ambient_ray.diffusion.dsd.renoise`) against the noisy training rows, in ``distill.features``; the best
is kept in ``OUT/picked/`` (a model folder of its EMA weights, with ``picked.json``: step, proximal FD).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ambient_ray.diffusion import dsd
from ambient_ray.diffusion.edm import bcast
from ambient_ray.models import registry, weights
from ambient_ray.train.parts import Part
from ambient_ray.train.worker import Worker


def generator_meta(cfg, rows) -> dict:
    """The generator's ``model.json``: the teacher's network, marked one-step (what ``sample --one-step`` reads)."""
    meta = {k: v for k, v in rows.teacher_meta.items() if k != "noisy"}
    d = cfg.distill
    meta["one_step"] = {
        "sigma_init": d.sigma_init,
        "teacher": rows.teacher,
        "way": d.way,
        "sigma_n": rows.sigma_n,
        "alpha": d.alpha,
    }
    return meta


class DistillTask:
    name = "distill"

    def __init__(self, cfg, rows):
        self.cfg, self.rows = cfg, rows
        self.tmeta = rows.teacher_meta
        self.model = registry.config_of(self.tmeta)
        self.logvar = False

    # ------------------------------------------------------------------ parts and schedule

    def teacher_net(self) -> torch.nn.Module:
        net = registry.build(self.tmeta)
        return weights.load_into(net, self.rows.teacher, self.cfg.distill.teacher_weights)

    def parts(self) -> dict[str, Part]:
        o, d = self.cfg.optim, self.cfg.distill
        fake = o.model_copy(update={"betas": (0.0, o.betas[1]), "lr": d.fake_lr or o.lr})
        return {
            "generator": Part(self.teacher_net().train(), optim=o, export=True),
            "fake_score": Part(self.teacher_net().train(), optim=fake, ema=False, meta=self.tmeta),
            "teacher": Part(self.teacher_net(), trained=False),
        }

    def schedule(self) -> list[tuple[str, int]]:
        return [("fake_score", 1), ("generator", 1)]

    def meta(self) -> dict:
        return generator_meta(self.cfg, self.rows)

    def setup(self, w: Worker) -> None:
        self.logvar = bool(getattr(w.parts["fake_score"].net, "has_logvar", False))
        r = self.rows
        self.ids = sorted(r.row_sigma_n) if r.row_sigma_n else []
        self.row_sn = torch.tensor([r.row_sigma_n[i] for i in self.ids]) if self.ids else None
        self.row_labels = torch.tensor([r.labels[i] for i in self.ids]) if r.labels and self.ids else None
        self.captions = self.read_captions(w) if registry.takes_captions(registry.arch_of(self.tmeta)) else None
        self.caption_sn = None  # σ_n of this rank's caption rows, in their order (looked up once, not per draw)
        if self.captions is not None and self.row_sn is not None:
            self.caption_sn = torch.tensor([r.row_sigma_n[i] for i in self.captions[0]])
        self.sums = torch.zeros(5, dtype=torch.float64)  # fake loss, fake n, generator loss, generator n, images
        self.best = torch.tensor([float("inf"), -1.0], dtype=torch.float64)  # proximal FD, its step
        self.reference = None

    def read_captions(self, w: Worker):
        """This rank's rows' caption embeddings and masks, with their ids (a teacher of captions)."""
        import ray.train

        from ambient_ray.train.rows import row_rank

        t, dim = self.model.caption_tokens, self.model.caption_dim
        ids, emb, mask = [], [], []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=512, batch_format="numpy"):
            for j in np.nonzero(row_rank(batch["id"], w.world) == w.rank)[0]:
                ids.append(str(batch["id"][j]))
                emb.append(np.asarray(batch["caption_emb"][j], dtype=np.float32).reshape(t, dim))
                mask.append(np.asarray(batch["caption_mask"][j], dtype=np.float32).reshape(t))
        if not ids:
            raise RuntimeError(f"rank {w.rank} of {w.world} got no caption rows")
        order = np.argsort(ids)
        return [ids[i] for i in order], torch.from_numpy(np.stack(emb)[order]), torch.from_numpy(np.stack(mask)[order])

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if "best" in state:
            self.best = state["best"].double()

    # ------------------------------------------------------------------ one micro-batch

    def draw(self, w: Worker) -> tuple[torch.Tensor, tuple]:
        """(σ_n per sample, the networks' conditioning): rows drawn uniformly (their label, caption and σ_n), or
        without data uniform labels and the run's σ_n."""
        b, g = self.cfg.batch_size, w.generator
        sn = torch.full((b,), self.rows.sigma_n)
        labels = None
        if self.captions is not None:
            ids, emb, mask = self.captions
            k = torch.randint(len(ids), (b,), generator=g)
            if self.caption_sn is not None:
                sn = self.caption_sn[k]
            args = (emb[k].to(w.device), mask[k].to(w.device))
        else:
            if self.row_sn is not None:
                k = torch.randint(len(self.ids), (b,), generator=g)
                sn = self.row_sn[k]
                labels = self.row_labels[k] if self.row_labels is not None else None
            if labels is None and getattr(self.model, "label_dim", 0):
                labels = torch.randint(self.model.label_dim, (b,), generator=g)
            args = (labels.to(w.device) if labels is not None else None,)
        return sn.float(), args

    def generate(self, engine, z: torch.Tensor, args: tuple) -> torch.Tensor:
        s = self.cfg.distill.sigma_init
        return engine(s * z, torch.full((len(z),), s, device=z.device), *args).float()

    def loss(self, w: Worker, part: str) -> torch.Tensor:
        g, m = w.generator, self.model
        sn, args = self.draw(w)
        z = torch.randn(len(sn), m.in_channels, m.img_resolution, m.img_resolution, generator=g).to(w.device)
        gen, fake = w.parts["generator"].engine, w.parts["fake_score"]
        sn_d = sn.to(w.device)
        adjusted = self.cfg.distill.way == "adjusted"
        if part == "fake_score":
            with torch.no_grad():
                x_g = self.generate(gen, z, args)
            d = self.cfg.distill
            # ỹ = G(z) + σ_n·ε, corrupted as the data were (σ_n = 0: G(z) itself); the adjusted way grades it with
            # the Phase-I loss at σ > σ_n (drawn above σ_n: the authors' code clamps to σ_n), the standard way with
            # the EDM loss as if ỹ were clean (the score of the noisy distribution, as a standard teacher learned)
            sn_loss = sn if adjusted else torch.zeros_like(sn)
            sigma = dsd.sigma_above(sn_loss, d.p_mean, d.p_std, g)
            e1, e2 = (torch.randn(x_g.shape, generator=g).to(w.device) for _ in range(2))
            y = x_g + bcast(sn_d, x_g) * e1
            x_s = y + bcast((sigma**2 - sn_loss**2).sqrt().to(w.device), y) * e2  # x_σ = ỹ + sqrt(σ² − σ_n²)·ε'
            fake.net.train()
            out = fake.engine(x_s, sigma.to(w.device), *args, **({"return_logvar": True} if self.logvar else {}))
            den, u = out if self.logvar else (out, None)
            sd = self.tmeta.get("sigma_data", 0.5)
            per = dsd.fake_score_loss(den.float(), x_s, y, sigma.to(w.device), sn_loss.to(w.device), sd)
            per = per.flatten(1).mean(1)
            loss = (per / u.reshape(-1).exp() + u.reshape(-1)).mean() if u is not None else per.mean()
            self.sums[0] += float(per.detach().sum())
            self.sums[1] += len(per)
            self.sums[4] += len(per)
            return loss
        x_g = self.generate(gen, z, args)
        if not adjusted:  # the standard way: both score networks model the noisy distribution, so G's samples
            x_g = x_g + bcast(sn_d, x_g) * torch.randn(x_g.shape, generator=g).to(w.device)  # are corrupted first
        sigma = dsd.sid_sigmas(len(sn), g, t_max=self.cfg.distill.t_max).to(w.device)
        x_t = x_g + bcast(sigma, x_g) * torch.randn(x_g.shape, generator=g).to(w.device)
        # both score networks through their modules, not their DeepSpeed engines: an engine's forward hooks its
        # output so that a backward through it runs that engine's gradient epilogue (DeepSpeed 0.19's torch-style
        # backward), and G's backward is G's alone; under ZeRO-3 the modules keep their gather hooks. The fake
        # score's parameters leave the graph (its optimizer sees none of G's loss) and it runs in eval mode.
        fake.net.eval()
        params = list(fake.net.parameters())
        for p in params:
            p.requires_grad_(False)
        try:
            f_fake = fake.net(x_t, sigma, *args).float()
        finally:
            for p in params:
                p.requires_grad_(True)
        f_teacher = w.parts["teacher"].net(x_t, sigma, *args).float()
        per = dsd.generator_loss(f_teacher, f_fake, x_g, self.cfg.distill.alpha)
        self.sums[2] += float(per.detach().sum())
        self.sums[3] += len(per)
        return per.mean()

    # ------------------------------------------------------------------ metrics, proximal FD, grids

    def interval(self, w: Worker, seconds: float) -> tuple[dict, dict]:
        tot = w.all_reduce(self.sums.clone())
        self.sums.zero_()
        metrics = {
            "loss": float(tot[0] / tot[1].clamp(min=1)),
            "loss_generator": float(tot[2] / tot[3].clamp(min=1)),
            "images_per_s": float(tot[4]) / max(seconds, 1e-9),
        }
        every = self.cfg.distill.eval_every
        if every and (w.step % every == 0 or w.step == self.cfg.steps):
            metrics.update(self.proximal_fd(w))  # collective under ZeRO-3 (the EMA is gathered)
        return metrics, {}

    def ema_generator(self, w: Worker) -> torch.nn.Module | None:
        """Collective under ZeRO-3: rank 0's generator of the EMA weights (None elsewhere)."""
        state = w.ema_weights("generator")
        if state is None:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            net = registry.build(self.tmeta)
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(state[n])
        net.meta = self.meta()
        return net.to(w.device).eval()

    def samples(self, net, n: int, device) -> np.ndarray:
        from ambient_ray.sampling import SamplerConfig
        from ambient_ray.sampling.draw import draw

        return draw(net, n, SamplerConfig(name="one-step"), seed=self.cfg.seed, device=device)

    def proximal_fd(self, w: Worker) -> dict:
        """Collective: proximal FD of the EMA generator (seed 004 Sec. 4: samples re-noised to σ_n against the noisy
        training rows), with ``distill.eval_reference`` the FD of the samples themselves against those clean rows,
        the best proximal FD so far and its step; a new best's weights go to ``OUT/picked/``, every evaluation to
        ``OUT/proximal.json``."""
        from ambient_ray.evaluation import metrics as fdm
        from ambient_ray.models import features

        net = self.ema_generator(w)
        out = {}
        if net is not None:
            d = self.cfg.distill
            extract = features.load(d.features)
            if self.reference is None:
                self.reference = extract(self.reference_images())
                self.clean = extract(self.clean_images()) if d.eval_reference else None
            imgs = self.samples(net, d.eval_images, w.device)
            g = torch.Generator().manual_seed(self.cfg.seed + 4242)
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            noisy = dsd.renoise(x, torch.full((len(x),), self.rows.sigma_n), g)
            q = ((noisy.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            fd = fdm.frechet_distance(extract(q), self.reference)
            out = {"proximal_fd": fd}
            if self.clean is not None:
                out["fd"] = fdm.frechet_distance(extract(imgs), self.clean)
            if fd < float(self.best[0]):
                self.best = torch.tensor([fd, float(w.step)], dtype=torch.float64)
                self.save_picked(net, fd, w.step)
            self.record({"step": w.step, **out})
        best = w.all_reduce(self.best.clone() if w.rank == 0 else torch.zeros(2, dtype=torch.float64))
        self.best = best.clone()
        return {**out, "proximal_fd_best": float(best[0]), "proximal_fd_best_step": float(best[1])}

    def record(self, entry: dict) -> None:
        """Rank 0: ``OUT/proximal.json``, every evaluation so far (a restarted run drops the steps it re-runs)."""
        from ambient_ray.io import storage

        path = storage.join(storage.normalize(self.cfg.out), "proximal.json")
        old = json.loads(storage.read_bytes(path)) if storage.exists(path) else []
        rows = [r for r in old if r["step"] < entry["step"]] + [entry]
        storage.write_bytes(path, json.dumps(rows, indent=1).encode())

    def clean_images(self) -> np.ndarray:
        """Up to ``eval_images`` rows of ``distill.eval_reference`` (a fixed pick), uint8 (N, H, W, C)."""
        from ambient_ray.data.images import read_images

        _, imgs = read_images(self.cfg.distill.eval_reference)
        rng = np.random.default_rng(self.cfg.seed)
        pick = rng.choice(len(imgs), size=min(self.cfg.distill.eval_images, len(imgs)), replace=False)
        return imgs[torch.from_numpy(np.sort(pick))].permute(0, 2, 3, 1).numpy()

    def reference_images(self) -> np.ndarray:
        """Up to ``eval_images`` noisy training rows (σ_n > 0), as stored for viewing (clipped, quantised: as the
        re-noised samples are), uint8 (N, H, W, C)."""
        from ambient_ray.data.images import read_images

        noisy = [i for i in self.ids if self.rows.row_sigma_n[i] > 0]
        rng = np.random.default_rng(self.cfg.seed)
        pick = rng.choice(len(noisy), size=min(self.cfg.distill.eval_images, len(noisy)), replace=False)
        _, imgs = read_images(self.rows.reference, {noisy[i] for i in pick})
        return imgs.permute(0, 2, 3, 1).numpy()

    def save_picked(self, net, fd: float, step: int) -> None:
        from safetensors.torch import save

        from ambient_ray.io import storage

        d = storage.join(storage.normalize(self.cfg.out), "picked")
        state = {n: p.detach().float().cpu().contiguous() for n, p in net.named_parameters()}
        blob = save(state)
        storage.write_bytes(storage.join(d, "ema.safetensors"), blob)
        storage.write_bytes(storage.join(d, "model.safetensors"), blob)
        storage.write_bytes(storage.join(d, "model.json"), json.dumps(self.meta(), indent=1).encode())
        storage.write_bytes(storage.join(d, "picked.json"), json.dumps({"step": step, "proximal_fd": fd}).encode())

    def grid(self, w: Worker) -> bytes | None:
        """Collective under ZeRO-3: a PNG of one-step samples of the EMA generator (fixed seed) on rank 0."""
        from ambient_ray.io import plots

        net = self.ema_generator(w)
        if net is None:
            return None
        return plots.image_grid_png(self.samples(net, self.cfg.grid_images, w.device))

    def validation(self, w: Worker) -> dict:
        return {}

    def progress(self, m: dict) -> str:
        fd = f"  proximal FD {m['proximal_fd']:.3f}" if "proximal_fd" in m else ""
        return (
            f"fake-score loss {m['loss']:.4f}  generator loss {m['loss_generator']:+.4f}  "
            f"{m['images_per_s']:.0f} images/s{fd}"
        )

    def state(self) -> dict[str, torch.Tensor]:
        return {"best": self.best.clone()}

    def files(self) -> dict[str, str]:
        return {}
