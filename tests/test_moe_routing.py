"""The fused expert-routing ops of UOE against their float64 reference on every backend, and the
reference against transformers' own routers for every MoE family."""

import pytest
import torch
from conftest import cpu_backends

from unlearn_fast.backend import select_backend
from unlearn_fast.models.moe import MOE_FAMILIES, _family_config, moe_layers, routing_spec
from unlearn_fast.ops.moe_routing import (
    Routing,
    expert_attribution,
    reference_anchor_residual,
    reference_expert_attribution,
    reference_routing_gates,
    router_anchor_loss,
    routing_gates,
)

BACKENDS = cpu_backends()
ALL_BACKENDS = ["reference", *BACKENDS]

# (T, E, routing, with bias): odd shapes over every feature of the routing.
CASES = {
    "softmax_k1": (1, 4, Routing(top_k=1), False),
    "mixtral": (7, 8, Routing(top_k=2, renormalize=True), False),
    "qwen_no_renorm": (130, 60, Routing(top_k=6), False),
    "renorm_k1": (130, 8, Routing(top_k=1, renormalize=True), False),
    "deepseek_v2": (130, 64, Routing(top_k=6, scaling=16.0, n_group=8, topk_group=3), False),
    "deepseek_v3": (
        130,
        64,
        Routing(
            top_k=6,
            score="sigmoid",
            renormalize=True,
            scaling=2.5,
            n_group=8,
            topk_group=4,
            group_score="top2_sum",
            renorm_eps=1e-20,
        ),
        True,
    ),
    "sigmoid_bias_plain": (7, 60, Routing(top_k=2, score="sigmoid", scaling=0.5), True),
    "v3_tiny_groups": (
        7,
        4,
        Routing(top_k=2, score="sigmoid", renormalize=True, n_group=2, topk_group=1, group_score="top2_sum"),
        True,
    ),
    "softmax_bias_groups_renorm": (
        130,
        60,
        Routing(top_k=2, renormalize=True, scaling=1.5, n_group=6, topk_group=2),
        True,
    ),
}


def make_inputs(T, E, with_bias, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    logits = (torch.randn(T, E, generator=g, dtype=torch.float64) * 2).to(dtype)
    weights = torch.rand(T, generator=g, dtype=torch.float64) + 0.1
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.2 if with_bias else None
    return logits, weights, bias


def residuals_and_loss(logits, target, weights, routing, bias):
    """The loss and, as its gradient w.r.t. the token weights, the per-token residuals."""
    weights = weights.clone().requires_grad_(True)
    loss = router_anchor_loss(logits, target, weights, routing, bias)
    (residual,) = torch.autograd.grad(loss, weights, retain_graph=True)
    return loss, residual


def test_auto_backend_on_cpu_is_the_extension():
    assert "cpp" in BACKENDS, "the C++ extension did not build: run `bash scripts/build_ext.sh`"
    for op in ("moe_expert_attribution", "moe_anchor_residual"):
        assert select_backend(op, torch.device("cpu")) == "cpp"


def test_reference_gates_by_hand():
    """One row worked by hand: sigmoid + bias selection, top-2-sum groups, renormalised, scaled."""
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5, 0.3]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    routing = Routing(
        top_k=2, score="sigmoid", renormalize=True, scaling=3.0, n_group=3, topk_group=1, group_score="top2_sum"
    )
    s = torch.sigmoid(logits[0])
    # Groups {0,1}, {2,3}, {4,5}; group 1's biased top-2 sum s2 + 2 + s3 wins: experts 2 and 3,
    # weighted by their *unbiased* scores.
    want = torch.zeros(6, dtype=torch.float64)
    want[2], want[3] = 3.0 * s[2] / (s[2] + s[3]), 3.0 * s[3] / (s[2] + s[3])
    torch.testing.assert_close(reference_routing_gates(logits, routing, bias)[0], want, rtol=1e-15, atol=0)
    # Without the bias: s = .500 .731 | .269 .881 | .622 .574, group sums 1.231, 1.150, 1.196.
    got = reference_routing_gates(logits, routing)[0]
    assert got.nonzero().flatten().tolist() == [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_float64(backend, case, force_backend):
    T, E, routing, with_bias = CASES[case]
    logits, weights, bias = make_inputs(T, E, with_bias)
    target = E // 3
    want_attr = reference_expert_attribution(logits, weights, routing, bias)
    x_ref = logits.clone().requires_grad_(True)
    want_res = reference_anchor_residual(x_ref, target, routing, bias)
    (want_grad,) = torch.autograd.grad((weights * want_res).sum(), x_ref)

    force_backend(backend)
    got_attr = expert_attribution(logits, weights, routing, bias)
    assert got_attr.dtype == torch.float64 and got_attr.shape == (E,)
    torch.testing.assert_close(got_attr, want_attr, rtol=1e-12, atol=1e-13)
    x = logits.clone().requires_grad_(True)
    loss, residual = residuals_and_loss(x, target, weights, routing, bias)
    torch.testing.assert_close(residual, want_res.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(loss, (weights * want_res).sum().detach(), rtol=1e-12, atol=1e-13)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, want_grad, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["qwen_no_renorm", "deepseek_v2", "deepseek_v3"])
def test_low_precision_within_twice_plain_torch_error(backend, dtype, case, force_backend):
    """Error against float64 (on the same rounded inputs) at most ~2x that of plain torch in float32,
    the precision transformers' routers compute in."""
    T, E, routing, with_bias = CASES[case]
    logits, weights, bias = make_inputs(T, E, with_bias, dtype=dtype, seed=11)
    target = 5
    exact_x = logits.double().requires_grad_(True)
    exact_res = reference_anchor_residual(exact_x, target, routing, bias)
    (exact_grad,) = torch.autograd.grad((weights * exact_res).sum(), exact_x)
    exact_attr = reference_expert_attribution(logits.double(), weights, routing, bias)
    plain_x = logits.clone().requires_grad_(True)
    plain_res = reference_anchor_residual(plain_x, target, routing, bias)  # float32 math
    (plain_grad,) = torch.autograd.grad((weights.float() * plain_res).sum(), plain_x)
    plain_attr = reference_expert_attribution(logits, weights.float(), routing, bias)

    force_backend(backend)
    got_attr = expert_attribution(logits, weights, routing, bias)
    assert got_attr.dtype == torch.float32
    x = logits.clone().requires_grad_(True)
    _, residual = residuals_and_loss(x, target, weights.float(), routing, bias)
    (grad,) = torch.autograd.grad(router_anchor_loss(x, target, weights.float(), routing, bias), x)
    assert grad.dtype == dtype
    # dlogits is rounded to `dtype` last: one ulp of it on top (either side of a rounding boundary).
    grad_ulp = torch.finfo(dtype).eps * exact_grad.abs().max().item()
    for got, plain, exact, slack in (
        (got_attr, plain_attr, exact_attr, 1e-6),
        (residual, plain_res, exact_res, 1e-6),
        (grad, plain_grad, exact_grad, grad_ulp),
    ):
        err = (got.double() - exact.detach()).abs().max().item()
        plain_err = (plain.double() - exact.detach()).abs().max().item()
        assert err <= 2 * plain_err + slack, (err, plain_err)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3", "softmax_bias_groups_renorm", "sigmoid_bias_plain"])
def test_gradcheck_anchor_loss(backend, case, force_backend):
    T, E, routing, with_bias = CASES[case]
    logits, weights, bias = make_inputs(5, E, with_bias, seed=3)
    force_backend(backend)
    target = 1
    logits.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: router_anchor_loss(x, target, w, routing, bias), (logits, weights), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ties_go_to_the_lower_index(backend, force_backend):
    """Equal scores: the lower expert index is chosen first (groups too), on every backend."""
    force_backend(backend)
    logits = torch.zeros(3, 8, dtype=torch.float64)
    routing = Routing(top_k=3, renormalize=True)
    want = torch.tensor([1.0, 1.0, 1.0, 0, 0, 0, 0, 0], dtype=torch.float64)  # 3 rows x 1/3 each
    torch.testing.assert_close(expert_attribution(logits, torch.ones(3, dtype=torch.float64), routing), want)
    # Groups {0..3}, {4..7} tie on every score: group 0 is kept, then experts 0 and 1.
    grouped = Routing(top_k=2, n_group=2, topk_group=1, group_score="top2_sum", score="sigmoid")
    want = torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(expert_attribution(logits[:1], torch.ones(1, dtype=torch.float64), grouped), want)
    torch.testing.assert_close(routing_gates(logits[:1], grouped)[0], want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_rows_poison_only_themselves_per_token(backend, force_backend):
    """A NaN logit, or +inf under softmax, makes its row's gates NaN: the attribution and the loss
    are NaN, the residual and gradient of the other rows are unaffected."""
    force_backend(backend)
    logits, weights, _ = make_inputs(6, 8, False, seed=5)
    logits[1, 3] = float("nan")
    logits[4, 0] = float("inf")
    routing = Routing(top_k=2, renormalize=True)
    assert torch.isnan(expert_attribution(logits, weights, routing)).all()
    x = logits.clone().requires_grad_(True)
    loss, residual = residuals_and_loss(x, 2, weights, routing, None)
    assert torch.isnan(loss)
    assert torch.isnan(residual).tolist() == [False, True, False, False, True, False]
    (grad,) = torch.autograd.grad(router_anchor_loss(x, 2, torch.ones(6, dtype=torch.float64), routing), x)
    assert torch.isnan(grad).all(dim=1).tolist() == [False, True, False, False, True, False]
    assert not torch.isnan(grad[[0, 2, 3, 5]]).any()
    # A NaN bias entry invalidates every row (it enters every selection score).
    bias = torch.zeros(8, dtype=torch.float64)
    bias[7] = float("nan")
    sigmoid = Routing(top_k=2, score="sigmoid")
    assert torch.isnan(expert_attribution(logits[[0]], weights[[0]], sigmoid, bias)).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_input(backend, force_backend):
    force_backend(backend)
    logits = torch.zeros(0, 8)
    routing = Routing(top_k=2)
    assert torch.equal(expert_attribution(logits, torch.zeros(0), routing), torch.zeros(8))
    assert router_anchor_loss(logits, 0, torch.zeros(0), routing).item() == 0.0


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_attribution_is_deterministic_across_thread_counts(force_backend):
    force_backend("cpp")
    logits, weights, _ = make_inputs(3000, 64, False, dtype=torch.float32, seed=9)
    routing = Routing(top_k=8, renormalize=True)
    default = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = expert_attribution(logits, weights, routing)
        torch.set_num_threads(2)
        two = expert_attribution(logits, weights, routing)
    finally:
        torch.set_num_threads(default)
    assert torch.equal(one, two)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_opcheck_compiled_ops(case):
    T, E, routing, with_bias = CASES[case]
    logits, weights, bias = make_inputs(T, E, with_bias, seed=4)
    args = routing.op_args()
    ops = torch.ops.unlearn_fast
    torch.library.opcheck(ops.moe_expert_attribution.default, (logits, weights, bias, *args))
    torch.library.opcheck(ops.moe_anchor_residual.default, (logits, bias, 1, *args))
    grad = torch.rand(T, dtype=torch.float64)
    torch.library.opcheck(ops.moe_anchor_residual_backward.default, (grad, logits, bias, 1, *args))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_compiled_ops_reject_bad_inputs():
    op = torch.ops.unlearn_fast.moe_expert_attribution
    logits = torch.randn(5, 8)
    w = torch.ones(5)
    args = Routing(top_k=2).op_args()
    with pytest.raises(RuntimeError, match="token_weights must be Float"):
        op(logits, w.double(), None, *args)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(torch.randn(8, 5).t(), w, None, *args)
    with pytest.raises(RuntimeError, match="top_k must lie"):
        op(logits, w, None, *Routing(top_k=9).op_args())
    with pytest.raises(RuntimeError, match="n_group must divide"):
        op(logits, w, None, *Routing(top_k=2, n_group=3).op_args())
    with pytest.raises(RuntimeError, match="exceeds the 4 experts"):
        op(logits, w, None, *Routing(top_k=5, n_group=2).op_args())
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(logits, w, torch.zeros(7), *args)
    with pytest.raises(RuntimeError, match="target must be"):
        torch.ops.unlearn_fast.moe_anchor_residual(logits, None, 8, *args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=2, score="relu"), "score"),
        (dict(top_k=2, n_group=2, topk_group=3), "topk_group"),
        (dict(top_k=2, group_score="mean"), "group_score"),
        (dict(top_k=2, scaling=float("nan")), "scaling"),
        (dict(top_k=2, renorm_eps=-1.0), "renorm_eps"),
        (dict(top_k=2, renormalize=1), "renormalize"),
    ],
)
def test_routing_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Routing(**kwargs)


def test_public_ops_reject_bad_inputs():
    logits, weights = torch.randn(5, 8), torch.ones(5)
    with pytest.raises(ValueError, match="top_k=9 exceeds"):
        expert_attribution(logits, weights, Routing(top_k=9))
    with pytest.raises(ValueError, match="n_group=3 must divide"):
        routing_gates(logits, Routing(top_k=2, n_group=3))
    with pytest.raises(ValueError, match="raise topk_group"):
        router_anchor_loss(logits, 0, weights, Routing(top_k=5, n_group=2))
    with pytest.raises(ValueError, match="needs groups of >= 2"):
        routing_gates(logits, Routing(top_k=1, n_group=8, topk_group=2, group_score="top2_sum"))
    with pytest.raises(ValueError, match="bias must have shape \\[8\\]"):
        expert_attribution(logits, weights, Routing(top_k=2), torch.zeros(7))
    with pytest.raises(ValueError, match="token_weights must have shape \\[5\\]"):
        expert_attribution(logits, torch.ones(4), Routing(top_k=2))
    with pytest.raises(ValueError, match="target must be"):
        router_anchor_loss(logits, 8, weights, Routing(top_k=2))
    with pytest.raises(ValueError, match="\\[T, E\\]"):
        routing_gates(logits[None], Routing(top_k=2))
    with pytest.raises(TypeError, match="float32, float64"):
        routing_gates(logits.long(), Routing(top_k=2))


# ---------------------------------------------------------------------------------------------
# Against transformers' routers.

# (family, config overrides): the tiny defaults plus the other branches of each router.
FAMILY_VARIANTS = [(family, {}) for family in MOE_FAMILIES] + [
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("olmoe", {"norm_topk_prob": True}),
    ("deepseek_v2", {"topk_method": "greedy", "routed_scaling_factor": 2.0}),
    ("deepseek_v2", {"routed_scaling_factor": 16.0, "n_group": 4, "topk_group": 2}),
    ("deepseek_v3", {"norm_topk_prob": False, "routed_scaling_factor": 2.5}),
    ("deepseek_v3", {"n_group": 4, "topk_group": 2}),
]


def variant_model(family, overrides):
    config = _family_config(family, num_layers=3, hidden_size=32, num_experts=8, top_k=2, vocab_size=64)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MOE_FAMILIES[family].model_class(config)
        for _, block in moe_layers(model):
            if hasattr(block.gate, "e_score_correction_bias"):
                block.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model.eval()


def captured_routing(model, input_ids):
    """{layer: (router logits, transformers' gates scattered to [T, E])} from one forward."""
    out, handles = {}, []
    for layer_idx, block in moe_layers(model):

        def hook(module, args, output, layer_idx=layer_idx):
            logits, weights, index = output
            dense = torch.zeros(logits.shape, dtype=weights.dtype).scatter(1, index, weights)
            out[layer_idx] = (logits.detach(), dense)

        handles.append(block.gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return out


@pytest.mark.parametrize("family,overrides", FAMILY_VARIANTS, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_routing_gates_equal_transformers(family, overrides, force_backend):
    model = variant_model(family, overrides)
    input_ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    captured = captured_routing(model, input_ids)
    assert captured and set(captured) == {i for i, _ in moe_layers(model)}
    for layer_idx, (logits, want) in captured.items():
        routing, bias = routing_spec(model, layer_idx)
        assert routing.top_k == model.config.num_experts_per_tok
        gates = routing_gates(logits, routing, bias)
        # The same torch ops in the same order as the router: the same bits.
        assert torch.equal(gates, want.to(gates.dtype)), (gates - want).abs().max()
        weights = torch.rand(logits.shape[0], generator=torch.Generator().manual_seed(layer_idx))
        onehot = torch.zeros_like(want)
        onehot[:, 1] = 1.0
        want_res = ((want - onehot) ** 2).sum(-1)
        for backend in BACKENDS:
            force_backend(backend)
            torch.testing.assert_close(
                expert_attribution(logits, weights, routing, bias), (weights[:, None] * want).sum(0)
            )
            _, residual = residuals_and_loss(logits, 1, weights, routing, bias)
            torch.testing.assert_close(residual, want_res)


def test_routing_spec_per_family():
    mixtral = variant_model("mixtral", {})
    assert routing_spec(mixtral, 0) == (Routing(top_k=2, renormalize=True), None)
    qwen = variant_model("qwen2_moe", {"norm_topk_prob": True})
    assert routing_spec(qwen, 1)[0] == Routing(top_k=2, renormalize=True)
    v2 = variant_model("deepseek_v2", {"routed_scaling_factor": 16.0})
    assert routing_spec(v2, 1) == (Routing(top_k=2, scaling=16.0, n_group=2, topk_group=1), None)
    with pytest.raises(ValueError, match="not an MoE layer"):
        routing_spec(v2, 0)  # DeepSeek's first layer is dense
    v3 = variant_model("deepseek_v3", {})
    routing, bias = routing_spec(v3, 2)
    assert routing == Routing(
        top_k=2,
        score="sigmoid",
        renormalize=True,
        scaling=v3.config.routed_scaling_factor,
        n_group=2,
        topk_group=1,
        group_score="top2_sum",
        renorm_eps=1e-20,
    )
    assert bias is dict(moe_layers(v3))[2].gate.e_score_correction_bias
