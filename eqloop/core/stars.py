"""Spectral-radius estimation and the STARS stability penalty (JSRR).

A looped model iterates ``z <- f(z)``; a fixed point ``z*`` is asymptotically stable
when the spectral radius ``rho(J)`` of the Jacobian ``J = df/dz`` at ``z*`` is below
one. ``f`` maps a tensor of shape ``(B, ...)`` to the same shape and samples are
independent along dimension 0, so ``J`` is block diagonal with one ``(n, n)`` block per
sample, ``n = prod(z.shape[1:])`` (for a LoopLM the whole ``(T, d)`` sequence state).

Three tools:

* :func:`spectral_radius` estimates ``rho`` per sample without building ``J``: power
  iteration or a small Arnoldi (Krylov) basis, both matrix-free. Every step is one
  Jacobian-vector product of the batched ``f`` that serves all samples at once.
* :func:`jacobian_eigvals` builds each sample's ``J`` densely (``n`` Jacobian-vector
  products) and returns all its eigenvalues; the reference for small maps.
* :func:`jsrr_penalty` is the differentiable STARS term added to the training loss.

Attention note: PyTorch's fused scaled-dot-product-attention kernels have neither a
forward-mode derivative nor a double backward (CPU, torch 2.13), and both are needed
here. Every evaluation of ``f`` in this module therefore runs under
``sdpa_kernel(SDPBackend.MATH)``, which computes attention from differentiable
primitives. Only these evaluations are affected; the model's own forward keeps its
fast kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from solvers import checks

Map = Callable[[Tensor], Tensor]
"""A batched map ``(B, ...) -> (B, ...)`` whose samples are independent along dim 0."""

METHODS: tuple[str, ...] = ("power", "arnoldi")
"""Valid ``method`` names of :func:`spectral_radius`."""

PRODUCTS: tuple[str, ...] = ("vjp", "jvp")
"""Valid ``product`` names of :func:`jsrr_penalty`."""


class JSRRResult(NamedTuple):
    """What :func:`jsrr_penalty` returns when ``return_details=True``.

    Attributes:
        penalty: Scalar loss term, differentiable with respect to the parameters of ``f``.
        rho: ``(B,)`` detached per-sample estimate ``||J v||`` (``||J^T v||`` for the
            ``"vjp"`` product) with ``v`` of unit norm.
        v: ``(B, ...)`` detached unit vectors, the direction of the last product. Pass
            them back as ``v`` at the next call to warm-start the power iteration.
    """

    penalty: Tensor
    rho: Tensor
    v: Tensor


@dataclass(frozen=True)
class PenaltySchedule:
    """When to add the penalty during training.

    The paper switches the penalty on after a warm-up (2000 of 10000 steps) and applies
    it at every step after that: ``PenaltySchedule(start_step=2000)``.

    Attributes:
        start_step: First optimisation step (0-based) at which the penalty is active.
        every: Apply the penalty at every ``every``-th step from ``start_step`` on.
    """

    start_step: int = 0
    every: int = 1

    def __post_init__(self) -> None:
        checks.integer("start_step", self.start_step, low=0)
        checks.integer("every", self.every, low=1)

    def active(self, step: int) -> bool:
        """Whether the penalty is applied at optimisation step ``step`` (0-based)."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0


# ---------------------------------------------------------------------------------------
# Per-sample vector helpers. ``x`` has shape (B, ...); norms are over all non-batch dims.
# ---------------------------------------------------------------------------------------


def _sample_norm(x: Tensor) -> Tensor:
    """Euclidean norm of each sample: ``(B, ...) -> (B,)``."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape ``(B,)`` values so they broadcast against ``like`` of shape ``(B, ...)``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _work_dtype(z: Tensor) -> torch.dtype:
    """The dtype of the estimators' bookkeeping: at least float32 (``torch.linalg.eig``
    has no bfloat16/float16 kernels, and Gram-Schmidt in half precision loses the basis)."""
    return torch.promote_types(z.dtype, torch.float32)


def _normalize(x: Tensor) -> Tensor:
    """Scale each sample of ``x`` (shape ``(B, ...)``) to unit norm; zero samples stay 0."""
    tiny = torch.finfo(x.dtype).tiny
    return x / _per_sample(_sample_norm(x).clamp_min(tiny), x)


def random_unit(z: Tensor, generator: torch.Generator | None) -> Tensor:
    """Random unit vectors shaped like ``z`` ``(B, ...)``, uniform on each sample's sphere."""
    noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
    return _normalize(noise)


def _start_vectors(z: Tensor, v0: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """Unit start vectors ``(B, ...)``: ``v0`` normalised, random where ``v0`` is absent or 0."""
    fresh = random_unit(z, generator)
    if v0 is None:
        return fresh
    if v0.shape != z.shape:
        raise ValueError(f"v0 must have the shape of z {tuple(z.shape)}, got {tuple(v0.shape)}")
    v0 = v0.detach().to(dtype=z.dtype, device=z.device)
    usable = _per_sample(_sample_norm(v0) > 0, z)
    return torch.where(usable, _normalize(v0), fresh)


# ---------------------------------------------------------------------------------------
# Jacobian products. Each evaluates the batched f once for all samples.
# ---------------------------------------------------------------------------------------


def _check_same_shape(out: Tensor, z: Tensor) -> None:
    """Raise ``ValueError`` unless ``f`` kept the shape of its input."""
    if out.shape != z.shape:
        raise ValueError(
            "f must map a tensor of shape (B, ...) to the same shape; "
            f"got {tuple(z.shape)} -> {tuple(out.shape)}"
        )


def _jvp(f: Map, z: Tensor, v: Tensor) -> Tensor:
    """Forward-mode product ``J(z) v`` for every sample; ``z``, ``v``: ``(B, ...)``.

    Differentiable with respect to the parameters of ``f`` (reverse over forward) when
    called with gradients enabled. The layer norms of ``f`` run as primitive ops here
    (:class:`_PrimitiveLayerNorm`), eagerly and compiled.
    """
    with sdpa_kernel(SDPBackend.MATH), _PrimitiveLayerNorm():
        out, jv = torch.func.jvp(f, (z,), (v,))
    _check_same_shape(out, z)
    return jv


class _PrimitiveLayerNorm(TorchFunctionMode):
    """Runs ``F.layer_norm`` (so ``nn.LayerNorm``) as mean, variance, rsqrt and affine ops.

    The same function as the fused kernel up to rounding (biased variance, ``eps`` inside
    the square root, statistics in at least float32, output in the input's dtype), for
    two faults of ``native_layer_norm``'s forward-mode derivative formula (torch 2.13):

    * Reverse over forward is wrong: the formula reads the kernel's saved mean and
      inverse standard deviation, outputs autograd treats as non-differentiable, so the
      gradient of ``J v`` with respect to the parameters before the norm misses every
      path through the statistics (on a tiny LayerNorm LoopLM the jvp penalty's gradient
      for the attention's qkv bias came out 3.6e-6 at most where the vjp penalty, with
      the same value, gives 9.6e-3; with this rewrite the two agree to rounding).
    * Traced by ``torch.compile``, the formula's "efficient" zero tangent of the weight
      (which has no tangent in a JVP with respect to the state) escapes the fake tensor
      mode ("Please convert all Tensors to FakeTensors first", surfacing as a
      ``_fw_primal`` INTERNAL ASSERT).

    Every other function passes through unchanged.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.layer_norm:
            return func(*args, **kwargs)
        # F.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        given = {**dict(zip(names[: len(args)], args, strict=True)), **kwargs}
        x = given["input"]
        dims = tuple(range(-len(given["normalized_shape"]), 0))
        h = x.to(_work_dtype(x))
        centred = h - h.mean(dims, keepdim=True)
        var = centred.pow(2).mean(dims, keepdim=True)
        y = centred * torch.rsqrt(var + given.get("eps", 1e-5))
        if given.get("weight") is not None:
            y = y * given["weight"]
        if given.get("bias") is not None:
            y = y + given["bias"]
        return y.to(x.dtype)


def _vjp(f: Map, z: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    """Reverse-mode product ``v^T J(z)`` (that is ``J^T v``) for every sample.

    Args:
        f: The batched map.
        z: ``(B, ...)`` state; must require grad.
        v: ``(B, ...)`` cotangent.
        create_graph: Keep the graph so the result is differentiable (double backward).

    Returns:
        ``(B, ...)`` products.
    """
    with sdpa_kernel(SDPBackend.MATH):
        out = f(z)
    _check_same_shape(out, z)
    (vj,) = torch.autograd.grad(
        out, z, v, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return vj


# ---------------------------------------------------------------------------------------
# Spectral radius.
# ---------------------------------------------------------------------------------------


def spectral_radius(
    f: Map,
    z: Tensor,
    method: str = "power",
    iters: int = 20,
    *,
    v0: Tensor | None = None,
    return_vectors: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate the spectral radius of ``df/dz`` at ``z``, per sample, matrix-free.

    Each iteration costs one Jacobian-vector product (``torch.func.jvp``) of the batched
    ``f``, which serves all samples at once; nothing synchronises with the host inside
    the loops. The result carries no graph (it is a diagnostic, not a loss).

    Methods:
        ``"power"``: power iteration ``v <- J v / ||J v||``. The estimate is the
        geometric mean of the norm ratios ``||J v||`` over the last (even) half of the
        steps, ``||J^K v||^(1/K)``, which damps the oscillation of the single-step ratio
        when a complex pair or a ``+-lambda`` pair dominates (the Rayleigh quotient would
        only see the real part). Converges at the rate ``|lambda_2 / lambda_1|``, so it is
        slow when the top eigenvalues are close in modulus.

        ``"arnoldi"``: ``iters`` Krylov vectors, orthonormalised by classical
        Gram-Schmidt with one re-orthogonalisation pass (batched with ``bmm``); the
        estimate is the largest ``|eigenvalue|`` of the small Hessenberg matrix, so it
        handles complex and ``+-lambda`` pairs. When a sample's Krylov space becomes
        invariant (breakdown: the new vector vanishes relative to ``||J v||``), its
        eigenvalues so far are exact; the basis continues with a fresh random direction
        orthogonal to it, decoupled in the Hessenberg matrix. ``iters`` is capped at
        ``n``. Passing the returned vectors back as ``v0`` restarts the basis from the
        dominant Ritz vector (an explicit restart).

    Args:
        f: Map from ``(B, ...)`` to the same shape, samples independent along dim 0.
        z: ``(B, ...)`` point at which to linearise, e.g. a fixed point ``f(z*) = z*``.
        method: One of :data:`METHODS`.
        iters: Number of Jacobian-vector products (the Krylov dimension for
            ``"arnoldi"``), at least 1.
        v0: Optional ``(B, ...)`` start vectors, e.g. the vectors returned by the
            previous call (warm start). Normalised per sample; samples with a zero
            ``v0`` start from a random vector.
        return_vectors: Also return the ``(B, ...)`` unit vectors to warm-start the next
            call: the last power iterate, or the real part of the dominant Ritz vector
            (a vector of the dominant real invariant subspace).
        generator: Random generator for the start vectors (and Arnoldi breakdowns).

    Returns:
        ``rho`` of shape ``(B,)``, or ``(rho, v)`` when ``return_vectors`` is true. The
        Jacobian products run in the dtype of ``z``; everything else (norms, the Krylov
        basis, the eigenvalues) in at least float32, so ``rho`` is float32 for bfloat16
        or float16 states (``torch.linalg.eig`` has no half-precision kernels) and ``v``
        has the dtype of ``z``.

    Raises:
        ValueError: Unknown ``method``, ``iters < 1``, ``v0`` of the wrong shape, or ``f``
            changing the shape of its input.
        TypeError: ``iters`` is not an integer (or is a bool).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    checks.integer("iters", iters, low=1)
    if z.dim() < 1:
        raise ValueError("z must have a batch dimension: shape (B, ...)")
    z = z.detach()
    with torch.no_grad():
        v = _start_vectors(z, v0, generator)
        if method == "power":
            rho, v = _power_iteration(f, z, v, iters)
        else:
            rho, v = _arnoldi(f, z, v, iters, generator)
    return (rho, v) if return_vectors else rho


def _power_iteration(f: Map, z: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Power iteration from unit vectors ``v`` ``(B, ...)``; returns ``rho (B,)`` and ``v``.

    The estimate is the geometric mean of the norm ratios ``||J v_i||`` over the last
    ``K`` steps (about half of them), i.e. ``||J^K v||^(1/K)`` for the unit iterate ``v``
    entering that window (Gelfand's formula on the iterate). Once the iterate lies in the
    dominant invariant subspace this is exact up to a factor ``kappa^(1/K)``, where
    ``kappa`` is the condition number of that subspace's eigenvector basis, whereas the
    single-step ratio oscillates by up to ``kappa`` around the answer whenever a complex
    pair or a ``+-lambda`` pair dominates. ``K`` is even (for ``iters >= 2``), which
    cancels the period-2 oscillation of a ``+-lambda`` pair exactly.
    """
    window = max(1, 2 * ((iters + 2) // 4))
    log_sum = z.new_zeros(z.shape[0], dtype=_work_dtype(z))
    for i in range(iters):
        jv = _jvp(f, z, v)
        if i >= iters - window:
            log_sum = log_sum + _sample_norm(jv.to(log_sum.dtype)).log()
        v = _normalize(jv)
    return (log_sum / window).exp(), v


def _orthogonalize(basis: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``w`` off an orthonormal basis: classical Gram-Schmidt run twice.

    Args:
        basis: ``(B, k, n)`` orthonormal rows.
        w: ``(B, n)`` vectors.

    Returns:
        The ``(B, n)`` remainder and the ``(B, k)`` total coefficients ``basis @ w``.
    """
    coeffs = torch.zeros(basis.shape[:2], dtype=w.dtype, device=w.device)
    for _ in range(2):
        c = torch.bmm(basis, w.unsqueeze(-1)).squeeze(-1)
        w = w - torch.bmm(c.unsqueeze(1), basis).squeeze(1)
        coeffs = coeffs + c
    return w, coeffs


def _arnoldi(
    f: Map, z: Tensor, v: Tensor, iters: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Batched Arnoldi from unit vectors ``v`` ``(B, ...)``; returns ``rho (B,)`` and ``v``.

    The products ``J v`` run in the dtype of ``z``; the basis and the Hessenberg matrix
    are kept in :func:`_work_dtype` (Gram-Schmidt and ``eig`` need at least float32).
    """
    batch, n = z.shape[0], z[0].numel()
    m = min(iters, n)
    work = _work_dtype(z)
    # Breakdown is judged at the precision of the products, not of the bookkeeping.
    breakdown_tol = torch.finfo(z.dtype).eps ** 0.5
    basis = z.new_zeros(batch, m, n, dtype=work)
    hess = z.new_zeros(batch, m, m, dtype=work)
    basis[:, 0] = v.flatten(1)
    for j in range(m):
        w = _jvp(f, z, basis[:, j].view_as(z).to(z.dtype)).flatten(1).to(work)
        scale = torch.linalg.vector_norm(w, dim=1)
        w, coeffs = _orthogonalize(basis[:, : j + 1], w)
        hess[:, : j + 1, j] = coeffs
        if j + 1 == m:
            break
        beta = torch.linalg.vector_norm(w, dim=1)
        broken = beta <= breakdown_tol * scale
        noise = torch.randn(w.shape, dtype=w.dtype, device=w.device, generator=generator)
        fresh, _ = _orthogonalize(basis[:, : j + 1], noise)
        basis[:, j + 1] = _normalize(torch.where(broken.unsqueeze(1), fresh, w))
        hess[:, j + 1, j] = beta.masked_fill(broken, 0.0)
    rho, ritz = _dominant_eigpair(hess)
    vectors = _normalize(torch.bmm(ritz.unsqueeze(1), basis).squeeze(1).view_as(z))
    return rho, vectors.to(z.dtype)


def _dominant_eigpair(mat: Tensor) -> tuple[Tensor, Tensor]:
    """Largest-modulus eigenvalue of each matrix and a real vector of its eigenspace.

    Args:
        mat: ``(B, m, m)`` real matrices.

    Returns:
        ``(B,)`` spectral radii and ``(B, m)`` real vectors in the (real) invariant
        subspace of the dominant eigenvalue: the real part of its eigenvector after a
        phase rotation that makes the largest entry real, so the result is never zero.
    """
    eigvals, eigvecs = torch.linalg.eig(mat)
    modulus = eigvals.abs()
    rho, idx = modulus.max(dim=1)
    vec = torch.gather(eigvecs, 2, idx.view(-1, 1, 1).expand(-1, mat.shape[1], 1)).squeeze(2)
    pivot = torch.gather(vec, 1, vec.abs().argmax(dim=1, keepdim=True))
    vec = vec * (pivot.conj() / pivot.abs())
    return rho, vec.real


def jacobian_eigvals(f: Map, z: Tensor) -> Tensor:
    """All eigenvalues of each sample's dense Jacobian ``df/dz`` at ``z``.

    Builds the ``(B, n, n)`` per-sample Jacobians column by column with ``n``
    Jacobian-vector products of the batched ``f`` (one per basis direction, shared by
    all samples), then calls ``torch.linalg.eigvals``. Exact up to round-off; meant for
    small states (``n`` up to a few thousand) and for checking the estimators.

    Args:
        f: Map from ``(B, ...)`` to the same shape, samples independent along dim 0.
        z: ``(B, ...)`` point at which to linearise.

    Returns:
        ``(B, n)`` complex eigenvalues (of at least complex64: the Jacobian of a bfloat16
        or float16 map is decomposed in float32); ``.abs().amax(dim=1)`` is the
        spectral radius.
    """
    z = z.detach()
    n = z[0].numel()
    with torch.no_grad():
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        columns = [
            _jvp(f, z, eye[i].expand(z.shape[0], n).reshape(z.shape)).flatten(1) for i in range(n)
        ]
    return torch.linalg.eigvals(torch.stack(columns, dim=2).to(_work_dtype(z)))


# ---------------------------------------------------------------------------------------
# The STARS penalty.
# ---------------------------------------------------------------------------------------


def jsrr_penalty(
    f: Map,
    z: Tensor,
    *,
    product: str = "vjp",
    power_steps: int = 1,
    v: Tensor | None = None,
    target: float | None = None,
    detach_state: bool = True,
    generator: torch.Generator | None = None,
    return_details: bool = False,
    compile_options: Mapping[str, Any] | None = None,
) -> Tensor | JSRRResult:
    """The STARS Jacobian spectral-radius regulariser (JSRR), a differentiable scalar.

    Defaults reproduce the paper: at the detached state ``z`` (after the sampled number
    of loops) draw a random unit vector ``v`` per sample, compute the vector-Jacobian
    product ``v^T J`` with ``create_graph=True`` and return the batch mean of
    ``||v^T J||^2``. Its gradient reaches the parameters of ``f`` through one extra
    application of the block. One power step is not the spectral radius: for ``v``
    uniform on the unit sphere ``E ||v^T J||^2 = E ||J v||^2 = ||J||_F^2 / n``, a
    scaled Hutchinson estimate of the squared Frobenius norm, which bounds ``rho^2``
    from above only after multiplying by ``n``.

    Going further than the paper:

    * ``power_steps=k`` runs ``k - 1`` power steps without graph (``v`` normalised and
      detached after each), and only the last product carries the graph; together
      with ``v`` from the previous call (``return_details=True``) the vector follows
      the dominant direction across training steps and the term approaches ``rho^2``.
    * ``target`` switches to the hinge ``mean(relu(||J v|| - target)^2)``, which leaves
      samples whose estimate is already below ``target`` alone.
    * Evaluation at a fixed point instead of on the trajectory: pass ``z = z*`` from a
      solver (e.g. ``eqloop.fixed_point``); with ``detach_state=True`` no gradient flows
      into the solve.

    Args:
        f: Map from ``(B, ...)`` to the same shape, samples independent along dim 0; the
            recurrent block with its input injection bound in.
        z: ``(B, ...)`` state at which the Jacobian is taken.
        product: ``"vjp"`` (paper code: reverse mode ``v^T J``, needs a double backward)
            or ``"jvp"`` (forward mode ``J v``, then one ordinary backward; cheaper in
            memory, and ``J v`` is the product power iteration on ``J`` uses). Both have
            the same expectation for one step from a random ``v`` and the same spectral
            radius when iterated (``J^T`` and ``J`` share eigenvalues).
        power_steps: Number of Jacobian products, at least 1.
        v: Optional ``(B, ...)`` start vectors (normalised per sample; zero samples get a
            random vector). Default: random unit vectors.
        target: If given (``>= 0``), use the hinge form with this threshold on the
            per-sample estimate ``||J v||``.
        detach_state: Cut the graph at ``z`` (paper behaviour). With ``False`` the
            penalty's gradient also flows back through whatever produced ``z``.
        generator: Random generator for the start vectors.
        return_details: Return a :class:`JSRRResult` with the per-sample estimates and
            the vectors for a warm start instead of the bare scalar.
        compile_options: ``None`` runs the products eagerly. A mapping (``{}``: inductor)
            runs each forward-mode product, ``J v`` with the forward pass of ``f`` and
            (with gradients) its backward to the parameters, as one compiled graph:
            keywords of :func:`torch.compile` (``fullgraph=True`` unless given) through
            :func:`eqloop.core.compiling.compile_function`. Same value and gradients as
            eager up to rounding; the random start vectors stay eager. Only with
            ``product="jvp"``: torch.compile cannot take the double backward of ``"vjp"``.

    Returns:
        The scalar penalty, or a :class:`JSRRResult` when ``return_details`` is true.

    Raises:
        ValueError: Unknown ``product``, ``power_steps < 1``, negative ``target``, ``v``
            of the wrong shape, ``f`` changing the shape of its input, or
            ``compile_options`` with ``product="vjp"``.
        TypeError: ``power_steps`` or ``target`` of the wrong type, ``compile_options``
            not a mapping.
    """
    if product not in PRODUCTS:
        raise ValueError(f"unknown product {product!r}; valid products: {', '.join(PRODUCTS)}")
    jvp = _jvp
    if compile_options is not None:
        if not isinstance(compile_options, Mapping):
            raise TypeError(
                f"compile_options must be a mapping of torch.compile keywords or None, "
                f"got {type(compile_options).__name__}"
            )
        if product != "jvp":
            raise ValueError(
                f"compile_options needs product='jvp', got product={product!r}: torch.compile "
                "cannot take the double backward of the vjp product"
            )
        jvp = _compiled_jvp(compile_options)
    checks.integer("power_steps", power_steps, low=1)
    if target is not None:
        checks.number("target", target, low=0)
    if z.dim() < 1:
        raise ValueError("z must have a batch dimension: shape (B, ...)")

    state = z.detach()
    v = _start_vectors(state, v, generator)
    for _ in range(power_steps - 1):
        v = _normalize(_jacobian_product(f, state, v, product, jvp, differentiable=False))
    if not detach_state:
        state = z
    jv = _jacobian_product(f, state, v, product, jvp, differentiable=True)

    rho = _sample_norm(jv)
    if target is None:
        penalty = jv.flatten(1).pow(2).sum(dim=1).mean()
    else:
        penalty = torch.relu(rho - target).pow(2).mean()
    if return_details:
        return JSRRResult(penalty, rho.detach(), _normalize(jv.detach()))
    return penalty


def _jacobian_product(
    f: Map, z: Tensor, v: Tensor, product: str, jvp: Callable[..., Tensor], differentiable: bool
) -> Tensor:
    """``J v`` (``product="jvp"``, computed by ``jvp``) or ``v^T J`` (``"vjp"``) at ``z``.

    ``z`` and ``v`` are ``(B, ...)``; so is the result. With ``differentiable`` it
    carries the graph to the parameters of ``f`` (and to ``z`` if it requires grad);
    otherwise it is detached.
    """
    if product == "jvp":
        if differentiable:
            return jvp(f, z, v)
        with torch.no_grad():
            return jvp(f, z.detach(), v)
    if not z.requires_grad:
        z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        vj = _vjp(f, z, v, create_graph=differentiable)
    return vj if differentiable else vj.detach()


_COMPILED_JVPS: dict[str, Callable[..., Tensor]] = {}
"""Compiled :func:`_jvp` per ``compile_options`` (by ``repr``), so calls share graphs."""


def _compiled_jvp(compile_options: Mapping[str, Any]) -> Callable[..., Tensor]:
    """:func:`_jvp` compiled with ``compile_options`` (``fullgraph=True`` unless given)."""
    from eqloop.core.compiling import compile_function  # compiling imports the models

    options = {"fullgraph": True, **compile_options}
    key = repr(sorted(options.items()))
    if key not in _COMPILED_JVPS:
        _COMPILED_JVPS[key] = compile_function(_jvp, **options)
    return _COMPILED_JVPS[key]
