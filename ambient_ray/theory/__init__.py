"""The theory of Ambient-o as a tool (pure numpy/scipy, no Ray, DeepSpeed or MLflow).

The paper's Section 4 and its theory appendix (seed 000, "A Theoretical Results"; the main text of 001/002) compare
two ways of estimating the noised target density p_σ = p₀ ⊛ N(0, σ²) from data:

- **Algorithm 1**: a Gaussian kernel density estimate (what a perfectly trained diffusion model is, Eq. 4.1) from
  the n₁ clean samples of p₀ alone;
- **Algorithm 2**: the same from all N = n₁ + n₂ samples, n₂ of them from a corrupted density q₀, so it estimates
  the mixture p̃₀ = (n₁/N)·p₀ + (n₂/N)·q₀ and pays a bias that noise contracts (Theorem 4.2).

Modules:

- :mod:`~ambient_ray.theory.bounds`: the bounds U₁(σ), U₂(σ) (Theorem 4.1 with the proof's explicit constants, or
  its ≲ rate with constants 1), Theorem 4.2's contraction, and the crossover σ* where U₂ < U₁.
- :mod:`~ambient_ray.theory.densities`: 1-D densities (triangles, truncated Gaussian mixtures, blurred versions),
  noising, kernel density estimates and total variations by quadrature over the whole line.
- :mod:`~ambient_ray.theory.simulation`: the simulated TVs of both algorithms over many seeds, the observed
  crossover, and the checks of Theorem 4.2, the Lipschitz lemmas and the classifier link.
- :mod:`~ambient_ray.theory.annotation`: from the classifier curves that ``annotate`` stores to d_TV(p_σ, q_σ) per
  σ, a fitted contraction, and what that says about σ_min.

``ambient-ray theory`` (:mod:`ambient_ray.stages.theory`) prints all of it and draws ``theory.png``.
"""
