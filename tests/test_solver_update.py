"""The fused solver vector updates against their float64 reference on every backend."""

import pytest
import torch
from conftest import cpu_backends

from unlearn_fast.backend import has_kernel, select_backend
from unlearn_fast.ops import solver_update as su

BACKENDS = cpu_backends()
ALL_BACKENDS = ["reference", *BACKENDS]
SIZES = [1, 7, 97, 1025, 100003]  # 100003: several CPU chunks and Triton programs, odd tail
OPS = ("solver_cg_update", "solver_damped_dots", "solver_xpay")


def vectors(n, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]


def test_auto_backend_on_cpu_is_the_extension():
    assert "cpp" in BACKENDS, "the C++ extension did not build: run `bash scripts/build_ext.sh`"
    assert select_backend("solver_cg_update", torch.device("cpu")) == "cpp"
    for op in OPS:
        assert has_kernel(op, "CPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_cg_update_matches_reference_float64(backend, n, force_backend):
    x, r, p, q = vectors(n, 4, seed=n)
    want_x, want_r = x.clone(), r.clone()
    want = su.reference_cg_update(want_x, want_r, p, q, -0.37)
    force_backend(backend)
    got = su.cg_update(x, r, p, q, -0.37)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(x, want_x, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(r, want_r, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("damping,with_r", [(0.25, True), (0.25, False), (0.0, True), (0.0, False)])
def test_damped_dots_matches_reference_float64(backend, n, damping, with_r, force_backend):
    q, p, r = vectors(n, 3, seed=n + 1)
    want_q = q.clone()
    want = su.reference_damped_dots(want_q, p, r if with_r else None, damping)
    force_backend(backend)
    got = su.damped_dots(q, p, r if with_r else None, damping)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(q, want_q, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-12)
    if not with_r:
        assert got[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_xpay_matches_reference_float64(backend, n, force_backend):
    p, r = vectors(n, 2, seed=n + 2)
    want = p.clone()
    su.reference_xpay(want, r, 0.8)
    force_backend(backend)
    su.xpay(p, r, 0.8)
    torch.testing.assert_close(p, want, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_within_twice_plain_torch_error(backend, force_backend):
    """Outputs from float32 inputs: error against float64 math at most ~2x plain float32 torch's."""
    n = 100003
    x, r, p, q = vectors(n, 4, dtype=torch.float32, seed=3)
    exact = [t.double() for t in (x, r, p, q)]
    plain = [t.clone() for t in (x, r, p, q)]
    want = su.reference_cg_update(*exact[:2], *exact[2:], 0.3)
    plain_x, plain_r = plain[0], plain[1]
    plain_x.add_(plain[2], alpha=0.3)
    plain_r.sub_(plain[3], alpha=0.3)
    plain_rr = torch.dot(plain_r, plain_r).double()
    force_backend(backend)
    got = su.cg_update(x, r, p, q, 0.3)
    assert x.dtype == r.dtype == torch.float32
    for out, ref, base in ((x, exact[0], plain_x), (r, exact[1], plain_r)):
        err, plain_err = (out.double() - ref).abs().max(), (base.double() - ref).abs().max()
        assert err <= 2 * plain_err + 1e-7, (err, plain_err)
    assert (got - want).abs() <= 2 * (plain_rr - want).abs() + 1e-9 * want

    q, p, r = vectors(n, 3, dtype=torch.float32, seed=4)
    exact_q = q.double()
    want = su.reference_damped_dots(exact_q, p.double(), r.double(), 0.1)
    plain_q = q.clone().add_(p, alpha=0.1)
    plain_dots = torch.stack([torch.dot(p, plain_q), torch.dot(p, r)]).double()
    got = su.damped_dots(q, p, r, 0.1)
    assert (q.double() - exact_q).abs().max() <= 2 * (plain_q.double() - exact_q).abs().max() + 1e-7
    assert ((got - want).abs() <= 2 * (plain_dots - want).abs() + 1e-9 * want.abs()).all()

    p, r = vectors(n, 2, dtype=torch.float32, seed=5)
    exact_p = p.double().mul(0.7).add(r.double())
    plain_p = p.clone().mul_(0.7).add_(r)
    su.xpay(p, r, 0.7)
    assert (p.double() - exact_p).abs().max() <= 2 * (plain_p.double() - exact_p).abs().max() + 1e-7


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_vectors(backend, force_backend):
    force_backend(backend)
    e = [torch.empty(0, dtype=torch.float64) for _ in range(4)]
    assert su.cg_update(*e, 1.0) == 0
    assert su.damped_dots(e[0], e[1], e[2], 1.0).tolist() == [0.0, 0.0]
    su.xpay(e[0], e[1], 2.0)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_dots_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            x, r, p, q = vectors(300007, 4, seed=5)
            results.append(su.cg_update(x, r, p, q, 0.5).item())
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_opcheck_compiled_ops():
    ops = torch.ops.unlearn_fast
    for n in (1, 33):
        x, r, p, q = vectors(n, 4, seed=6)
        torch.library.opcheck(ops.solver_cg_update.default, (x, r, p, q, 0.5))
        torch.library.opcheck(ops.solver_damped_dots.default, (q, p, r, 0.5))
        torch.library.opcheck(ops.solver_damped_dots.default, (q, p, None, 0.0))
        torch.library.opcheck(ops.solver_xpay.default, (p, r, -1.5))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compiled_ops_reject_bad_inputs():
    ops = torch.ops.unlearn_fast
    x, r, p, q = vectors(5, 4, seed=7)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.solver_xpay(x.half(), r.half(), 1.0)
    with pytest.raises(RuntimeError, match="r is Float but x is Double"):
        ops.solver_cg_update(x, r.float(), p, q, 1.0)
    with pytest.raises(RuntimeError, match="q has 4 elements"):
        ops.solver_cg_update(x, r, p, q[:4], 1.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.solver_damped_dots(q, p, torch.zeros(5, 2, dtype=torch.float64)[:, 0], 1.0)
    with pytest.raises(RuntimeError, match="x and p must be different"):
        ops.solver_cg_update(x, r, x, q, 1.0)
    with pytest.raises(RuntimeError, match="q and p must be different"):
        ops.solver_damped_dots(q, q, None, 1.0)


def test_public_ops_reject_bad_inputs():
    x, r, p, q = vectors(5, 4, seed=8)
    with pytest.raises(TypeError, match="float32 or float64"):
        su.xpay(x.half(), r.half(), 1.0)
    with pytest.raises(TypeError, match="r is torch.float32"):
        su.cg_update(x, r.float(), p, q, 1.0)
    with pytest.raises(ValueError, match=r"q has shape \(4,\), x \(5,\)"):
        su.cg_update(x, r, p, q[:4], 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        su.damped_dots(q, p, torch.zeros(5, 2, dtype=torch.float64)[:, 0], 1.0)
    with pytest.raises(ValueError, match="x and r must be different"):
        su.cg_update(x, x, p, q, 1.0)
    with pytest.raises(ValueError, match="finite"):
        su.cg_update(x, r, p, q, float("nan"))
    # p and r may be one tensor: both are only read.
    su.damped_dots(q, p, p, 0.5)


def test_forced_backend_errors(force_backend):
    force_backend("cuda")
    with pytest.raises(RuntimeError, match="cannot run solver_cg_update on cpu"):
        su.xpay(*vectors(3, 2), 1.0)
