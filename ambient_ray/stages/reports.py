"""What a stage says about a finished run: the lines ``ambient-ray STAGE`` prints, and the headline figures a
workflow keeps in its report (``pipeline.json``). Each takes the stage's config and what its ``run()`` returned.

The stage registry (:mod:`ambient_ray.stages.registry`) names them per stage; a stage without a ``report``
gets :func:`done`, one without ``figures`` keeps none.
"""

from __future__ import annotations

from typing import Any


def done(name: str, s: Any) -> None:
    """The line of a stage that registered no report of its own."""
    out = s.get("out") if isinstance(s, dict) else getattr(s, "out", None)
    print(f"{name}: done" + (f"; output in {out}" if out else ""))
    if isinstance(s, dict):
        mlflow_line(s)


def mlflow_where(run_id: str, uri: str | None, tree: bool = False) -> str:
    """``: <link>`` to the run in the MLflow UI (the model-training view), or `` at <store>`` for a local store."""
    from ambient_ray.io.tracking import run_link

    link = run_link(run_id, uri, tree=tree)
    return f": {link}" if link else f" at {uri}"


def mlflow_line(s: dict, tree: bool = False) -> None:
    """The run's line; ``tree``: its link lists the runs nested under it too (an experiment's arms and stages)."""
    if s.get("mlflow_run_id"):
        print(f"  MLflow run {s['mlflow_run_id']}{mlflow_where(s['mlflow_run_id'], s.get('mlflow_uri'), tree)}")


# ------------------------------------------------------------------------------ the command line's lines


def corrupt(cfg, r) -> None:
    print(r.summary())
    if r.rows_quarantined:
        print(f"  quarantined rows (with reasons): {r.out}/quarantine/")
    print(f"  data: {r.out}/data/   preview: {r.out}/preview.png   config: {r.out}/config.yaml")


def precompute(cfg, s) -> None:
    lat = s["latents"]
    print(
        f"precompute: {s['rows_in']} rows in, {s['rows_out']} out, {s['rows_quarantined']} quarantined; "
        f"{s['shards_run']} shards run, {s['shards_skipped']} already done; {s['images_per_s']:.1f} images/s"
    )
    print(
        f"  latents {'x'.join(map(str, lat['latent_shape']))} (mean, std) at {lat['resolution']}px; "
        f"normalisation {lat['how']}" + (f"; caption embeddings {lat['emb_shape']}" if lat["emb_shape"] else "")
    )
    print(f"  data: {s['out']}/data/   report: {s['out']}/latents.json")


def train_classifier(cfg, s) -> None:
    m = s["metrics"]
    loss, acc = m.get("loss", float("nan")), m.get("accuracy", float("nan"))
    print(f"train-classifier: done in {s['seconds']:.0f}s; final loss {loss:.4f}, accuracy {acc:.3f}")
    print(f"  classifier (safetensors): {s['out']}/model/   probability curves: {s['out']}/curves.png")
    mlflow_line(s)


def locality(cfg, s) -> None:
    t = s["table"]
    print("locality: crop(σ) = " + ", ".join(f"{c}px@σ≤{x:.3g}" for x, c in zip(t["sigmas"], t["crop"])))
    print(f"  table: {s['out']}/locality.json   plot: {s['out']}/locality.png")


def annotate(cfg, s) -> None:
    print(
        f"annotate: {s['rows_in']} rows in, {s['rows_out']} out, {s['rows_quarantined']} quarantined; "
        f"{s['shards_run']} shards run, {s['shards_skipped']} already done; mean σ_min {s['mean_sigma_min']:.3f}"
    )
    for g, v in s["mean_sigma_min_by_group"].items():
        print(f"  mean σ_min {g}: {v:.3f}")
    if s["never_crossed"]:
        print(
            f"  {s['never_crossed']} rows never crossed τ={cfg.tau}: σ_min = top of the grid (classifier:never-crossed)"
        )
    print(f"  data: {s['out']}/data/   report: {s['out']}/annotation.json   plots: sigma_min.png, curves.png")


def train(cfg, s) -> None:
    print(f"train: done in {s['seconds']:.0f}s; final loss {s['metrics'].get('loss', float('nan')):.4f}")
    print(f"  weights (safetensors): {s['out']}/model/   checkpoint: {s['checkpoint']}")
    print(f"  σ coverage: {s['out']}/coverage.png   samples: {s['out']}/samples.png")
    mlflow_line(s)


def distill(cfg, s) -> None:
    m = s["metrics"]
    print(
        f"distill: done in {s['seconds']:.0f}s; fake-score loss {m.get('loss', float('nan')):.4f}, "
        f"generator loss {m.get('loss_generator', float('nan')):+.4f}"
    )
    print(f"  one-step generator (safetensors): {s['out']}/model/   samples: {s['out']}/samples.png")
    if s.get("picked"):
        p = s["picked"]
        print(f"  picked by proximal FD: step {p['step']} (proximal FD {p['proximal_fd']:.4g}) in {s['out']}/picked/")
    print(f"  draw from it: ambient-ray sample --checkpoint {s['out']} --one-step --out SAMPLES")
    mlflow_line(s)


def distill_figures(cfg, r) -> dict:
    return _pick(r["metrics"], ("loss", "loss_generator", "proximal_fd", "proximal_fd_best", "proximal_fd_best_step"))


def sample(cfg, s) -> None:
    print(f"sample: {cfg.num} images -> {s['samples']}  grid: {s['grid']}")
    if "nfe" in s:
        print(
            f"  sampler {s['sampler']}: {s['nfe']} network evaluations per image, "
            f"{s['seconds_per_1000_images']:.2f} s per 1,000 images"
        )


def phema(cfg, s) -> None:
    print(
        f"phema: σ_rel {s['std']} (γ {s['gamma']:.3f}) at step {s['at']} from {len(s['weights'])} snapshots; "
        f"relative residual of the profile fit {s['residual']:.2e}"
    )
    for w in s["weights"]:
        print(f"  {w['weight']:+.6f}  σ_rel {w['std']:g} at step {w['step']}")
    print(f"  weights: {s['out']}/ema.safetensors  (ambient-ray sample --checkpoint {s['out']})")


def features(cfg, s) -> None:
    print(f"features: trained on {s['task']}, held-out accuracy {s['accuracy']:.3f}; use --features {s['spec']}")


def evaluate(cfg, s) -> None:
    d = s["details"]
    print(
        f"evaluate: {d['samples']} samples vs {d['reference']} reference images, "
        f"features {d['features']} ({d['dim']}-d)"
    )
    for k, v in s["metrics"].items():
        print(f"  {k:14s} {v:.4f}")
    print(f"  report: {s['out']}/metrics.json")
    mlflow_line(s)


def experiment(cfg, s) -> None:
    print(f"experiment: {s['minutes']:.0f} min; table: {s['out']}/results.md, results.json, results.png")
    mlflow_line(s, tree=True)


def pipeline(cfg, s) -> None:
    print(f"pipeline: done in {s['minutes']:.1f} min; report {s['out']}/pipeline.json")
    for name, st in s["stages"].items():
        print(f"  {name:10s} {st['out']}" + (f"   MLflow run {st['mlflow_run_id']}" if st.get("mlflow_run_id") else ""))
    if s["mlflow_run_id"]:  # its link lists the pipeline's run and its stages' runs
        print(
            f"  MLflow: pipeline run {s['mlflow_run_id']}{mlflow_where(s['mlflow_run_id'], s['mlflow_uri'], tree=True)}"
        )


def plan(cfg, p) -> None:
    from ambient_ray.train import planner

    print(planner.format_plan(p))


# ------------------------------------------------------------------------------ a workflow's headline figures


def _pick(values: dict, keys: tuple[str, ...]) -> dict:
    return {k: values[k] for k in keys if k in values}


def corrupt_figures(cfg, r) -> dict:
    return {"rows_in": r["rows_in"], "rows_out": r["rows_out"], "rows_quarantined": r["rows_quarantined"]}


def precompute_figures(cfg, r) -> dict:
    return {k: r[k] for k in ("rows_out", "rows_quarantined", "images_per_s")}


def train_classifier_figures(cfg, r) -> dict:
    return _pick(r["metrics"], ("loss", "accuracy"))


def annotate_figures(cfg, r) -> dict:
    return {k: r[k] for k in ("rows_out", "rows_quarantined", "mean_sigma_min")}


def train_figures(cfg, r) -> dict:
    return _pick(r["metrics"], ("loss",))


def sample_figures(cfg, r) -> dict:
    return {"num": cfg.num, **{k: r[k] for k in ("nfe", "seconds_per_1000_images") if k in r}}


def evaluate_figures(cfg, r) -> dict:
    return dict(r["metrics"])


def theory(cfg, s) -> None:
    """The theory's numbers: the setting, both crossovers (bound and simulated), how far the bounds are from the
    simulation, and, with --curves, what the theory reads from the annotated dataset."""
    st, sim = s["setting"], s["simulated"]
    src = s["measured_on"]
    print(
        f"theory: n₁={st['n1']} clean + n₂={st['n2']} corrupted; p₀ = {s['p0']}, q₀ = {s['q0']}\n"
        f"  λ₁={st['lambda1']:.4g} ({src['lambda1']}), λ₂={st['lambda2']:.4g} ({src['lambda2']}), "
        f"λ̄={st['lambda_mix']:.4g}, d_TV(p₀, q₀)={st['d_tv']:.4g} ({src['d_tv']}), D={st['diameter']:.4g} "
        f"({src['diameter']}), δ={st['delta']:g}"
    )
    print(f"  {'σ':>9} {'U₁':>9} {'U₂':>9} {'TV₁ sim':>9} {'TV₂ sim':>9} {'bias':>9}   ({s['form']} bounds)")
    n = len(s["sigmas"])
    for i in sorted({*range(0, n, max(1, n // 10)), n - 1}):  # about ten rows, the last σ included
        row = (s["sigmas"][i], s["u1"][i], s["u2"][i], sim["tv1"][i], sim["tv2"][i], sim["bias"][i])
        print("  " + " ".join(f"{v:9.3g}" for v in row))
    for form, at in s["crossover"].items():
        print(f"  bound crossover σ* ({form}): {_sigma_text(at)}  (U₂ < U₁ for every σ above it)")
    print(
        f"  simulated crossover ({sim['seeds']} seeds): {_sigma_text(sim['crossover'])}  "
        "(Algorithm 2's mean TV below Algorithm 1's above it)"
    )
    print(
        f"  {s['form']} bounds are vacuous (≥ 1) up to σ = {s['vacuous_below']['u1']:.3g} (U₁), "
        f"{s['vacuous_below']['u2']:.3g} (U₂)"
    )
    for key, name in (("u1_over_tv1", "U₁ ÷ simulated TV₁"), ("u2_over_tv2", "U₂ ÷ simulated TV₂")):
        if sim[key]:
            print(f"  {name}: {sim[key][0]:.3g}..{sim[key][1]:.3g} where the bound is not vacuous")
    print(
        f"  Theorem 4.1 (explicit) violated in at most {sim['kde_bound_violations']:.1%} of seeds at any σ "
        f"(δ = {st['delta']:g})"
    )
    if "curves" in s:
        c = s["curves"]
        print(
            f"  {c['dataset']}: d_TV(p_σ, q_σ) from the classifier curves ({c['estimator']}; "
            f"{c['clean_rows']} clean rows), τ = {c['tau']:g}"
        )
        for t in c["sets"]:
            power = f", TV̂ ≈ {t['power'][0]:.3g}·σ^-{t['power'][1]:.2f}" if t["power"] else ""
            diameter = 2 * t["contraction"] / t["d0"] if t["d0"] else 0.0
            print(
                f"    {t['name']} ({t['rows']} rows): TV̂ at σ={c['grid'][0]:.3g}: {t['tv'][0]:.3f}; contraction "
                f"min({t['d0']:.3f}, {t['contraction']:.3g}/σ) (effective D {diameter:.3g})"
                f"{power}\n"
                f"      σ where TV̂ = 1 − 2τ: {_sigma_text(t['sigma_tv'])} (fit: {_sigma_text(t['sigma_fit'])}); "
                f"annotation: set curve crosses τ at {_sigma_text(t['sigma_annotation'])}, rows' σ_min mean "
                f"{t['sigma_min_mean']:.3g}, median {t['sigma_min_median']:.3g}"
            )
    print(f"  figure: {s['out']}/theory.png" + (f", {s['out']}/theory-curves.png" if "curves" in s else ""))
    mlflow_line(s)


def _sigma_text(v) -> str:
    """A σ of the theory's summary: 'none' for inf (never), 'everywhere' for 0."""
    if isinstance(v, str) or v is None or v != v or v == float("inf"):
        return "none"
    return "everywhere (σ* = 0)" if v == 0 else f"{v:.4g}"
