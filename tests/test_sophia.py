"""The fused Sophia update against its float64 reference on every backend, and the optimizer."""

import copy
import io

import pytest
import torch
from conftest import cpu_backends

from unlearn_fast.backend import select_backend
from unlearn_fast.ops.sophia_update import reference_sophia_update, sophia_update, state_dtype
from unlearn_fast.optim import Sophia

BACKENDS = cpu_backends()
ALL_BACKENDS = ["reference", *BACKENDS]
SIZES = [1, 7, 97, 1025, (33, 65), 40000]  # 40000: several chunks on every backend
# (hessian_from_grad, soul_reference)
FLAGS = [(False, False), (True, False), (False, True), (True, True)]
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.95, rho=0.04, bs=50.0, weight_decay=0.1, eps=1e-15)


def make_lists(sizes=SIZES, dtype=torch.float64, negative_h=True, seed=None):
    """params, grads, exp_avgs, hessians with zero m, zero g and (optionally) negative h entries."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    sdtype = state_dtype(dtype)
    out = ([], [], [], [])
    for size in sizes:
        shape = size if isinstance(size, tuple) else (size,)
        p = torch.randn(shape, generator=g, dtype=torch.float64)
        grad = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
        m = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        h = torch.randn(shape, generator=g, dtype=torch.float64).abs() * 0.05
        if negative_h:
            h -= 0.01  # a Hutchinson EMA can be negative
        flat_m, flat_g = m.view(-1), grad.view(-1)
        flat_m[::5] = 0  # zero momentum (with its gradient too: no step at all there)
        flat_g[::10] = 0
        for lst, t, dt in zip(out, (p, grad, m, h), (dtype, dtype, sdtype, sdtype)):
            lst.append(t.to(dt))
    return out


def clone_lists(lists):
    return tuple([t.clone() for t in lst] for lst in lists)


def max_abs_error(got_lists, want_lists):
    return max(
        (got.double() - want.double()).abs().max().item()
        for got_list, want_list in zip(got_lists, want_lists)
        for got, want in zip(got_list, want_list)
    )


def test_auto_backend_on_cpu_is_the_extension():
    assert "cpp" in BACKENDS, "the C++ extension did not build: run `bash scripts/build_ext.sh`"
    assert select_backend("sophia_update", torch.device("cpu")) == "cpp"


# ---------------------------------------------------------------------------------------------
# The op.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hessian_from_grad,soul_reference", FLAGS)
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference_float64(backend, hessian_from_grad, soul_reference, maximize, force_backend):
    # The additive denominator of soul_reference is only meant for h >= 0 (an EMA of g*g).
    lists = make_lists(negative_h=not soul_reference)
    want = clone_lists(lists)
    h_before = [h.clone() for h in lists[3]]
    flags = dict(maximize=maximize, hessian_from_grad=hessian_from_grad, soul_reference=soul_reference)
    force_backend(backend)
    for _ in range(3):  # the state carries over
        sophia_update(*lists, **HYPER, **flags)
        reference_sophia_update(*want, *HYPER.values(), maximize, hessian_from_grad, soul_reference)
    for got_list, want_list in zip(lists, want):
        for got, ref in zip(got_list, want_list):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    if not hessian_from_grad:  # h is only read
        assert all(torch.equal(a, b) for a, b in zip(lists[3], h_before))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_clipping_rule(backend, force_backend):
    """Negative and zero h give the full step lr*sign(m) (never a flipped one); m = 0 gives none;
    a large h gives the Newton-like step lr*m/(rho*bs*h); soul_reference divides by rho*bs*h + eps."""
    force_backend(backend)
    m = torch.tensor([0.5, -0.5, 0.0, 0.5, -1e-3, 2e-3], dtype=torch.float64)
    h = torch.tensor([-1.0, -1e-30, -1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    hyper = dict(HYPER, weight_decay=0.0, rho=0.5, bs=2.0, beta1=0.0)  # beta1 = 0: m = g
    p = torch.zeros(6, dtype=torch.float64)
    sophia_update([p], [m.clone()], [torch.zeros(6, dtype=torch.float64)], [h.clone()], **hyper)
    lr = hyper["lr"]
    want = torch.tensor([-lr, lr, 0.0, -lr, lr * 1e-3, -lr * 2e-3], dtype=torch.float64)
    torch.testing.assert_close(p, want, rtol=1e-14, atol=0)
    # The SOUL form with h >= 0: identical up to the eps in the denominator.
    p = torch.zeros(3, dtype=torch.float64)
    m3, h3 = torch.tensor([0.5, 1e-3, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    sophia_update([p], [m3], [torch.zeros(3, dtype=torch.float64)], [h3], **hyper, soul_reference=True)
    # m after the double update with beta1 = 0 is still g.
    torch.testing.assert_close(p, torch.tensor([-lr, -lr * 1e-3 / (1.0 + 1e-15), 0.0], dtype=torch.float64))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("soul_reference", [False, True])
def test_nan_curvature_propagates(backend, soul_reference, force_backend):
    """A NaN in h reaches the param (as torch.clamp lets it), never a silent finite step."""
    force_backend(backend)
    p, g, m, h = make_lists(sizes=[5], dtype=torch.float32, negative_h=False, seed=8)
    h[0][2] = float("nan")
    sophia_update(p, g, m, h, **HYPER, soul_reference=soul_reference)
    assert torch.isnan(p[0]).tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_torch_error(backend, dtype, force_backend):
    """Error against float64 at most ~2x that of plain torch keeping everything in `dtype`."""
    force_backend(backend)
    lists = make_lists(sizes=[97, 1025, 3000], dtype=dtype, negative_h=True, seed=7)
    exact = tuple([t.double() for t in lst] for lst in lists)
    plain = tuple([t.to(dtype) for t in lst] for lst in lists)  # state in the param dtype too
    for _ in range(3):
        sophia_update(*lists, **HYPER, hessian_from_grad=True)
        reference_sophia_update(*exact, *HYPER.values(), False, True, False)
        reference_sophia_update(*plain, *HYPER.values(), False, True, False)
    assert all(t.dtype == dtype for t in lists[0]) and all(t.dtype == state_dtype(dtype) for t in lists[2])
    for k in (0, 2, 3):  # params, m, h
        err = max_abs_error([lists[k]], [exact[k]])
        plain_err = max_abs_error([plain[k]], [exact[k]])
        assert err <= 2 * plain_err + 1e-7, (k, err, plain_err)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_lists_and_empty_tensors(backend, force_backend):
    force_backend(backend)
    sophia_update([], [], [], [], **HYPER)
    lists = make_lists(sizes=[0, 5], seed=1)
    want = clone_lists(lists)
    sophia_update(*lists, **HYPER)
    reference_sophia_update(*want, *HYPER.values(), False, False, False)
    torch.testing.assert_close(lists[0][1], want[0][1], rtol=1e-12, atol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_is_one_launch_for_all_tensors(monkeypatch):
    from unlearn_fast.kernels import sophia_update as k

    grids = []
    kernel = k._sophia_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(k, "_sophia_kernel", Spy())
    lists = make_lists(sizes=[1, 7, 97, 5000, 9000], seed=2)
    want = clone_lists(lists)
    k.sophia_update(*lists, *HYPER.values(), False, False, False)
    reference_sophia_update(*want, *HYPER.values(), False, False, False)
    assert k.CHUNK == 4096  # the interpreter's launch
    assert grids == [(1 + 1 + 1 + 2 + 3,)]  # one program per 4096-element chunk, one launch
    assert max_abs_error(lists, want) < 1e-12


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_chunk_table_built_once_per_sizes():
    """One row [tensor, start] per chunk, made once for a list of sizes and reused by every later step."""
    from unlearn_fast.kernels import sophia_update as k

    numels, cpu = (1, 4096, 4097, 9000, 0, 5), torch.device("cpu")
    table = k.chunk_table(numels, 4096, cpu)
    assert table.tolist() == [[i, s] for i, n in enumerate(numels) for s in range(0, n, 4096)]
    assert k.chunk_table(numels, 4096, cpu) is table


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_opcheck_compiled_op():
    for flags in FLAGS:
        lists = make_lists(sizes=[3, 17], negative_h=False, seed=3)
        torch.library.opcheck(torch.ops.unlearn_fast.sophia_update.default, (*lists, *HYPER.values(), False, *flags))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compiled_op_rejects_bad_inputs():
    op = torch.ops.unlearn_fast.sophia_update
    p, g, m, h = make_lists(sizes=[4, 6], seed=4)
    scalars = list(HYPER.values())
    with pytest.raises(RuntimeError, match="same length"):
        op(p, g[:1], m, h, *scalars, False, False, False)
    with pytest.raises(RuntimeError, match="must be Float"):
        op([t.float() for t in p], [t.float() for t in g], m, h, *scalars, False, False, False)
    with pytest.raises(RuntimeError, match="params\\[1\\] must be contiguous"):
        op([p[0], torch.zeros(3, 2, dtype=torch.float64).t()], g, m, h, *scalars, False, False, False)
    with pytest.raises(RuntimeError, match="lr must be finite"):
        op(p, g, m, h, float("nan"), *scalars[1:], False, False, False)
    with pytest.raises(RuntimeError, match="rho must be finite"):
        op(p, g, m, h, *scalars[:3], -1.0, *scalars[4:], False, False, False)


def test_public_op_rejects_bad_inputs():
    p, g, m, h = make_lists(sizes=[4, 6], seed=5)
    with pytest.raises(ValueError, match="same length"):
        sophia_update(p, g, m[:1], h, **HYPER)
    with pytest.raises(TypeError, match="grads\\[1\\] is torch.float32"):
        sophia_update(p, [g[0], g[1].float()], m, h, **HYPER)
    with pytest.raises(TypeError, match="exp_avgs\\[0\\] is torch.bfloat16 but must be torch.float64"):
        sophia_update(p, g, [m[0].bfloat16(), m[1]], h, **HYPER)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        sophia_update([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], m[:1], h[:1], **HYPER)
    with pytest.raises(ValueError, match="shape"):
        sophia_update(p, [g[1], g[0]], m, h, **HYPER)
    with pytest.raises(ValueError, match="contiguous"):
        sophia_update([p[1].view(2, 3).t()], [g[1].view(2, 3).t()], [m[1].view(3, 2)], [h[1].view(3, 2)], **HYPER)
    for name, bad in (
        ("lr", float("nan")),
        ("lr", -1.0),
        ("rho", -0.1),
        ("beta1", 1.0),
        ("beta2", -0.5),
        ("bs", 0.0),
        ("weight_decay", float("inf")),
        ("eps", 0.0),
    ):
        with pytest.raises(ValueError, match=name):
            sophia_update(p, g, m, h, **dict(HYPER, **{name: bad}))


def test_forced_backend_errors(force_backend):
    force_backend("cuda")
    with pytest.raises(RuntimeError, match="cannot run sophia_update on cpu"):
        sophia_update(*make_lists(sizes=[3], seed=6), **HYPER)


# ---------------------------------------------------------------------------------------------
# The SOUL reference rule (the must-show test).

SOUL_LR, SOUL_STEPS = 1e-2, 20


def recorded_gradients(shapes, steps=SOUL_STEPS, seed=20240428):
    """A fixed gradient sequence: seeded, heavy-tailed, with exact zeros and scales that put some
    coordinates in the clipped regime (|g| < ~0.02 at bs 5120) and others in the Newton one."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(steps):
        step = []
        for shape in shapes:
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            x = x * torch.rand(shape, generator=g, dtype=torch.float64).pow(3) * (0.2 if t % 3 else 0.05)
            x.view(-1)[:: 7 + t] = 0
            step.append(x)
        seq.append(step)
    return seq


def soul_reference_transcription(params, grad_seq, lr, weight_decays):
    """docs/METHODS.md's SOUL reference rule, straight-line, independent of the library's code."""
    beta1, beta2, rho, bs = 0.9, 0.95, 0.04, 5120
    exp_avg = [torch.zeros_like(p) for p in params]
    hess = [torch.zeros_like(p) for p in params]
    for grads in grad_seq:
        for p, g, m, h, wd in zip(params, grads, exp_avg, hess, weight_decays):
            h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            p.mul_(1 - lr * wd)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp(None, 1)
            p.addcmul_(m.sign(), ratio, value=-lr)
    return params, exp_avg, hess


SOUL_SHAPES = [(1,), (7,), (97,), (33, 31), (1025,)]


def run_preset(params, grad_seq, two_groups=True):
    """The preset, with the reference's two groups: decay (wd 0.1) and no-decay (wd 0)."""
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}] if two_groups else params
    opt = Sophia.soul_reference(groups, lr=SOUL_LR)
    for grads in grad_seq:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_soul_reference_preset_reproduces_the_reference_rule(backend, force_backend):
    force_backend(backend)
    torch.manual_seed(0)
    init = [torch.randn(s, dtype=torch.float64) for s in SOUL_SHAPES]
    grad_seq = recorded_gradients(SOUL_SHAPES)
    weight_decays = [0.1] * 3 + [0.0] * (len(SOUL_SHAPES) - 3)
    want_p, want_m, want_h = soul_reference_transcription([p.clone() for p in init], grad_seq, SOUL_LR, weight_decays)

    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = run_preset(params, grad_seq)
    for p, p0, wp, m, h in zip(params, init, want_p, want_m, want_h):
        state = opt.state[p]
        # The displacement, not just the params: a wrong update would hide inside large params.
        torch.testing.assert_close(p.detach() - p0, wp - p0, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(state["exp_avg"], m, rtol=1e-6, atol=1e-15)
        torch.testing.assert_close(state["hessian"], h, rtol=1e-6, atol=1e-15)
    moved = torch.cat([(p.detach() - p0).view(-1) for p, p0 in zip(params, init)])
    assert moved.abs().max() > 0.05  # the run really moved the params (clipped and Newton steps)

    # Float32 params: the reference code run in float32, to 1e-6 relative in the displacement.
    params32 = [torch.nn.Parameter(p.float()) for p in init]
    run_preset(params32, grad_seq)
    grads32 = [[g.float() for g in grads] for grads in grad_seq]
    want32, _, _ = soul_reference_transcription([p.float() for p in init], grads32, SOUL_LR, weight_decays)
    got = torch.cat([(p.detach() - p0.float()).view(-1) for p, p0 in zip(params32, init)]).double()
    want = torch.cat([(wp - p0.float()).view(-1) for wp, p0 in zip(want32, init)]).double()
    assert (got - want).norm() <= 1e-6 * want.norm(), ((got - want).norm() / want.norm()).item()


def test_soul_reference_quirk_matters_and_is_preset_only():
    """The second momentum update changes the result, and plain Sophia does not do it."""
    init = [torch.randn(s, dtype=torch.float64) for s in SOUL_SHAPES]
    grad_seq = recorded_gradients(SOUL_SHAPES, steps=5)
    quirk = [torch.nn.Parameter(p.clone()) for p in init]
    run_preset(quirk, grad_seq, two_groups=False)
    plain = [torch.nn.Parameter(p.clone()) for p in init]
    opt = Sophia(plain, lr=SOUL_LR, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1, estimator="empirical", bs=5120)
    assert not any(g["soul_reference"] for g in opt.param_groups)
    for grads in grad_seq:
        for p, g in zip(plain, grads):
            p.grad = g
        opt.step()
    assert max((a - b).abs().max().item() for a, b in zip(quirk, plain)) > 1e-4


# ---------------------------------------------------------------------------------------------
# The optimizer.


def tiny_params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in [(1,), (7,), (5, 19), (97,)]]


def set_grads(params, step, dtype=None, skip=()):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1
        p.grad = None if i in skip else grad.to(dtype or p.dtype)


def test_grad_none_is_skipped():
    params = tiny_params()
    before = [p.detach().clone() for p in params]
    opt = Sophia(params, lr=1e-2, estimator="empirical", bs=100)
    set_grads(params, 0, skip={1, 3})
    opt.step()
    assert torch.equal(params[1], before[1]) and torch.equal(params[3], before[3])
    assert params[1] not in opt.state and params[3] not in opt.state
    assert not torch.equal(params[0], before[0])


def test_param_groups_with_different_lr_match_the_reference():
    params = tiny_params()
    init = [p.detach().clone() for p in params]
    opt = Sophia(
        [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 1e-3, "weight_decay": 0.0}],
        estimator="empirical",
        bs=64,
        betas=(0.9, 0.99),
    )
    want = [p.clone() for p in init]
    m = [torch.zeros_like(p) for p in init]
    h = [torch.zeros_like(p) for p in init]
    for step in range(4):
        set_grads(params, step)
        grads = [p.grad.clone() for p in params]
        opt.step()
        for lo, hi, lr, wd in ((0, 2, 1e-2, 0.1), (2, 4, 1e-3, 0.0)):
            reference_sophia_update(
                want[lo:hi], grads[lo:hi], m[lo:hi], h[lo:hi], lr, 0.9, 0.99, 0.04, 64.0, wd, 1e-15, False, True, False
            )
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


def run_steps(opt, params, steps, **step_kwargs):
    for step in steps:
        set_grads(params, step)
        opt.step(**step_kwargs)
        opt.zero_grad()
        if opt.hessian_due():
            set_grads(params, 500 + step)  # the sampled-label gradient
            opt.update_hessian()
            opt.zero_grad()


@pytest.mark.parametrize("estimator", ["gnb", "empirical"])
def test_state_dict_round_trip_mid_run(estimator):
    params = tiny_params()
    opt = Sophia(params, lr=1e-2, estimator=estimator, hessian_interval=3, bs=80)
    run_steps(opt, params, range(5))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved_params = [p.detach().clone() for p in params]
    run_steps(opt, params, range(5, 10))

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = Sophia(resumed, lr=1e-2, estimator=estimator, hessian_interval=3, bs=80)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    assert opt2.param_groups[0]["step"] == 5
    run_steps(opt2, resumed, range(5, 10))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed):
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
        assert torch.equal(opt.state[a]["hessian"], opt2.state[b]["hessian"])


def test_gnb_updates_h_only_in_update_hessian_and_the_step_uses_it():
    params = tiny_params()
    opt = Sophia(params, lr=1e-2, betas=(0.9, 0.99), estimator="gnb", hessian_interval=2, bs=30)
    assert not opt.hessian_due()
    set_grads(params, 0)
    opt.step()
    for p in params:
        assert torch.count_nonzero(opt.state[p]["hessian"]) == 0  # no estimate yet: h stays 0
    assert not opt.hessian_due()
    set_grads(params, 1)
    opt.step()
    assert opt.hessian_due()  # after the k-th step
    for p in params:
        assert torch.count_nonzero(opt.state[p]["hessian"]) == 0
    set_grads(params, 99)
    sampled = [p.grad.clone() for p in params]
    opt.update_hessian()
    for p, s in zip(params, sampled):
        torch.testing.assert_close(opt.state[p]["hessian"], 0.01 * s * s, rtol=1e-14, atol=0)

    # The next step uses that h (and leaves it alone).
    before = [p.detach().clone() for p in params]
    m = [opt.state[p]["exp_avg"].clone() for p in params]
    h = [opt.state[p]["hessian"].clone() for p in params]
    set_grads(params, 2)
    grads = [p.grad.clone() for p in params]
    opt.step()
    reference_sophia_update(before, grads, m, h, 1e-2, 0.9, 0.99, 0.04, 30.0, 0.1, 1e-15, False, False, False)
    for p, w, hh in zip(params, before, h):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
        assert torch.equal(opt.state[p]["hessian"], hh)
    assert not opt.hessian_due()


def test_hutchinson_takes_estimates_and_negative_curvature_never_flips_the_step():
    params = tiny_params()
    opt = Sophia(params, lr=1e-2, betas=(0.0, 0.5), weight_decay=0.0, estimator="hutchinson", hessian_interval=1)
    with pytest.raises(ValueError, match="needs estimates"):
        opt.update_hessian()
    with pytest.raises(ValueError, match="4 parameters"):
        opt.update_hessian([torch.ones(1)])
    estimates = [-torch.ones_like(p) for p in params]
    estimates[1] = None  # skipped: its h stays 0
    opt.update_hessian(estimates)
    assert torch.equal(opt.state[params[0]]["hessian"], -0.5 * torch.ones_like(params[0]))
    assert params[1] not in opt.state
    before = [p.detach().clone() for p in params]
    set_grads(params, 0)
    grads = [p.grad.clone() for p in params]
    opt.step()  # bs defaults to 1 for hutchinson
    for p, b, g in zip(params, before, grads):
        # beta1 = 0: m = g; h < 0 (or 0): the full step against the gradient.
        torch.testing.assert_close(p.detach(), b - 1e-2 * g.sign(), rtol=1e-14, atol=0)


def test_maximize_ascends():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = Sophia([p], lr=0.1, weight_decay=0.0, estimator="empirical", bs=1.0, maximize=True)
    p.grad = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach().sign(), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))


def test_bs_per_step_overrides_the_group_and_is_required():
    params = tiny_params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Sophia(params, lr=1e-2, estimator="gnb")
    opt_twin = Sophia(twin, lr=1e-2, estimator="gnb", bs=5000)
    for o, ps in ((opt, params), (opt_twin, twin)):
        set_grads(ps, 0)
        o.update_hessian()  # a curvature, so that bs matters
        set_grads(ps, 1)
    with pytest.raises(ValueError, match="needs bs"):
        opt.step()
    opt.step(bs=5000)
    opt_twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin))
    opt_twin.step(bs=50)
    assert not all(torch.equal(p, q) for p, q in zip(params, twin))
    with pytest.raises(ValueError, match="bs must be"):
        opt.step(bs=-3)


def test_low_precision_params_keep_float32_state():
    params = tiny_params(dtype=torch.bfloat16)
    opt = Sophia(params, lr=1e-2, estimator="empirical", bs=10)
    set_grads(params, 0)
    opt.step()
    for p in params:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["hessian"].dtype == torch.float32


def test_update_hessian_rejects_empirical():
    params = tiny_params()
    opt = Sophia(params, lr=1e-2, estimator="empirical", bs=10)
    with pytest.raises(ValueError, match="inside step"):
        opt.update_hessian()
    assert not opt.hessian_due()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=float("nan")), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(rho=-0.04), "rho"),
        (dict(betas=(1.0, 0.99)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(eps=0.0), "eps"),
        (dict(estimator="newton"), "estimator"),
        (dict(hessian_interval=0), "hessian_interval"),
        (dict(bs=0), "bs"),
    ],
)
def test_constructor_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sophia(tiny_params(), **kwargs)


def test_bad_param_group_is_rejected_and_not_added():
    params = tiny_params()
    opt = Sophia(params[:2], lr=1e-2, bs=10)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": params[2:], "rho": float("nan")})
    assert len(opt.param_groups) == 1


def test_hf_trainer_runs_a_few_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (8, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    opt = Sophia.soul_reference(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    assert opt.param_groups[0]["step"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    restored = Sophia.soul_reference(model.parameters(), lr=1e-3)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.param_groups[0]["soul_reference"]


def test_state_dict_round_trip_keeps_the_float32_state_of_bfloat16_params():
    """torch's load_state_dict casts state to the param dtype; Sophia's keeps its own (exact resumes)."""
    p = torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16))
    opt = Sophia([p], lr=1e-2, estimator="empirical", bs=1.0)
    p.grad = torch.randn(7, dtype=torch.bfloat16)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    fresh = Sophia([p], lr=1e-2, estimator="empirical", bs=1.0)
    fresh.load_state_dict(opt.state_dict())
    for key, value in state.items():
        assert fresh.state[p][key].dtype == torch.float32
        assert torch.equal(fresh.state[p][key], value), key
    assert fresh.param_groups[0]["step"] == 1
