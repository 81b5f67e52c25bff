"""The functional inner loop: forward_with, gradients, inner_loop, map_tasks and select_params."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta import Conv4
from lightning_meta.functional import (
    SGD,
    Adam,
    MetaSGD,
    Momentum,
    adaptation_curve_steps,
    forward_with,
    gradients,
    in_function_transform,
    inner_loop,
    map_tasks,
    select_params,
)

A = torch.tensor([1.0, 2.0], dtype=torch.float64)  # the quadratic 0.5 * sum(A * p^2), gradient A * p


def quadratic(params):
    return 0.5 * (A * params["p"] ** 2).sum()


def start(requires_grad=False):
    return {"p": torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=requires_grad)}


def test_the_docstring_example_is_maml_in_five_lines():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    support_x, support_y, query_x, query_y = (
        torch.randn(6, 4),
        torch.arange(3).repeat(2),
        torch.randn(6, 4),
        torch.arange(3).repeat(2),
    )
    params = dict(net.named_parameters())
    support_loss = lambda p: F.cross_entropy(forward_with(net, p, support_x), support_y)  # noqa: E731
    adapted = inner_loop(support_loss, params, SGD(lr=0.4), steps=5, create_graph=True).params
    F.cross_entropy(forward_with(net, adapted, query_x), query_y).backward()
    assert support_loss(adapted) < support_loss(params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_sgd_steps_by_hand():
    # p <- p - 0.1 * A * p: (1 - 0.1 * A)^k * p0 = [0.9^k, -0.8^k]
    result = inner_loop(quadratic, start(), SGD(lr=0.1), steps=3)
    torch.testing.assert_close(result.params["p"], torch.tensor([0.729, -0.512], dtype=torch.float64))


def test_meta_sgd_steps_by_hand_and_learns_its_step_sizes():
    opt = MetaSGD(lr=0.1, per="element").double()
    opt.bind(start())
    with torch.no_grad():
        opt.lrs["p"].copy_(torch.tensor([0.1, 0.2]))
    result = inner_loop(quadratic, start(), opt, steps=2)
    # element 0: 1 -> 0.9 -> 0.81; element 1: -1 -> -1 + 0.2 * 2 = -0.6 -> -0.6 + 0.2 * 1.2 = -0.36
    torch.testing.assert_close(result.params["p"], torch.tensor([0.81, -0.36], dtype=torch.float64))
    (grad,) = torch.autograd.grad(quadratic(result.params), [opt.lrs["p"]])
    assert grad.shape == (2,) and torch.all(grad != 0)
    tensor = MetaSGD(lr=0.1, per="tensor")
    tensor.bind(start())
    assert tensor.lrs["p"].shape == () and tensor.lrs["p"].item() == pytest.approx(0.1)
    torch.testing.assert_close(inner_loop(quadratic, start(), tensor.double(), steps=3).params["p"],
                               torch.tensor([0.729, -0.512], dtype=torch.float64))  # fmt: skip


def test_meta_sgd_without_bind_says_so():
    with pytest.raises(RuntimeError, match="call bind"):
        inner_loop(quadratic, start(), MetaSGD(lr=0.1), steps=1)


def test_momentum_steps_by_hand():
    # v <- 0.5 v + g; p <- p - 0.1 v, from p = [1, -1]:
    # t=1: g=[1, -2]      v=[1, -2]        p=[0.9, -0.8]
    # t=2: g=[0.9, -1.6]  v=[1.4, -2.6]    p=[0.76, -0.54]
    # t=3: g=[0.76, -1.08] v=[1.46, -2.38] p=[0.614, -0.302]
    result = inner_loop(quadratic, start(), Momentum(lr=0.1, momentum=0.5), steps=3)
    torch.testing.assert_close(result.params["p"], torch.tensor([0.614, -0.302], dtype=torch.float64))
    torch.testing.assert_close(result.state["p"], torch.tensor([1.46, -2.38], dtype=torch.float64))


def adam_by_hand(p, steps, lr, beta2, eps, v=0.0, t=0):
    """Scalar Adam with beta1 = 0 on 0.5 * a * p^2 (a = 1 here): returns p, v and t after ``steps`` steps."""
    for _ in range(steps):
        t += 1
        g = p
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * g / ((v / (1 - beta2**t)) ** 0.5 + eps)
    return p, v, t


def test_adam_steps_by_hand():
    one = {"p": torch.tensor([2.0], dtype=torch.float64)}
    result = inner_loop(lambda q: 0.5 * (q["p"] ** 2).sum(), one, Adam(lr=0.1), steps=3)
    expected, v, t = adam_by_hand(2.0, 3, 0.1, 0.999, 1e-8)
    # The first step of Adam is lr * sign(g) (bias-corrected v is g^2): 2 -> 1.9.
    assert adam_by_hand(2.0, 1, 0.1, 0.999, 1e-8)[0] == pytest.approx(1.9, abs=1e-9)
    assert result.params["p"].item() == pytest.approx(expected, abs=1e-12)
    assert result.state.exp_avg_sq["p"].item() == pytest.approx(v, abs=1e-15) and result.state.step_count == t == 3
    with_beta1 = inner_loop(lambda q: 0.5 * (q["p"] ** 2).sum(), one, Adam(lr=0.1, betas=(0.9, 0.999)), steps=1)
    assert with_beta1.params["p"].item() == pytest.approx(1.9, abs=1e-9)  # bias correction: still lr * sign(g)


def test_adam_persistent_state_carries_over_tasks_and_fresh_state_does_not():
    loss = lambda q: 0.5 * (q["p"] ** 2).sum()  # noqa: E731
    task_a, task_b = ({"p": torch.tensor([x], dtype=torch.float64)} for x in (2.0, -1.0))
    for persistent in (False, True):
        opt = Adam(lr=0.1, persistent=persistent).double()
        opt.bind(task_a)
        opt.keep(inner_loop(loss, task_a, opt, steps=2).state)  # what the modules do after a training task
        got = inner_loop(loss, task_b, opt, steps=2).params["p"].item()
        if persistent:  # task B starts from task A's second moment and step count
            _, v, t = adam_by_hand(2.0, 2, 0.1, 0.999, 1e-8)
            expected = adam_by_hand(-1.0, 2, 0.1, 0.999, 1e-8, v=v, t=t)[0]
        else:
            expected = adam_by_hand(-1.0, 2, 0.1, 0.999, 1e-8)[0]
        assert got == pytest.approx(expected, abs=1e-12), persistent
    assert opt.count == 2
    # The persistent state is saved and restored with the module.
    restored = Adam(lr=0.1, persistent=True).double()
    restored.bind(task_a)
    restored.load_state_dict(opt.state_dict())
    assert restored.count == 2 and restored.exp_avg_sq.get("p").item() == opt.exp_avg_sq.get("p").item() != 0


@pytest.mark.parametrize(
    "make",
    [lambda: SGD(0.1), lambda: MetaSGD(0.1), lambda: Momentum(0.1, 0.5), lambda: Adam(0.1, (0.9, 0.999))],
    ids=["sgd", "metasgd", "momentum", "adam"],
)
def test_second_order_through_the_inner_optimisers_matches_finite_differences(make):
    opt = make().double()
    opt.bind(start())

    def meta_loss(p0):
        return quadratic(inner_loop(quadratic, {"p": p0}, opt, steps=3, create_graph=True).params)

    p0 = start(requires_grad=True)["p"]
    (grad,) = torch.autograd.grad(meta_loss(p0), [p0])
    eps, numeric = 1e-6, torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[i] = eps
        numeric[i] = (meta_loss(p0.detach() + step) - meta_loss(p0.detach() - step)) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-9)
    if isinstance(opt, SGD):  # by hand: p_k = (1 - lr A)^k p0, so d/dp0 0.5 A p_3^2 = A (1 - lr A)^6 p0
        torch.testing.assert_close(grad, A * (1 - 0.1 * A) ** 6 * p0.detach())


def test_first_order_keeps_the_path_but_not_the_inner_gradient():
    p0 = start(requires_grad=True)["p"]
    adapted = inner_loop(quadratic, {"p": p0}, SGD(0.1), steps=3).params["p"]
    (grad,) = torch.autograd.grad(quadratic({"p": adapted}), [p0])
    torch.testing.assert_close(grad, A * adapted.detach())  # FOMAML: the query gradient at the adapted point


def test_detached_params_give_detached_results_and_evaluation_adapts_under_no_grad():
    result = inner_loop(quadratic, start(), SGD(0.1), steps=2)
    assert not result.params["p"].requires_grad
    with torch.no_grad():
        evaluated = inner_loop(quadratic, start(requires_grad=True), SGD(0.1), steps=2).params["p"]
    torch.testing.assert_close(evaluated, result.params["p"])


@pytest.mark.parametrize("steps, points", [(3, [0, 1, 2, 3]), (12, [0, 1, 2, 4, 8, 12])])
def test_inner_loop_curve_is_the_loss_at_the_measured_steps(steps, points):
    query = lambda p: quadratic(p) * 2  # noqa: E731  (any function of the parameters)
    result = inner_loop(quadratic, start(requires_grad=True), SGD(0.1), steps=steps, curve_loss=query)
    assert adaptation_curve_steps(steps) == points and result.curve.shape == (len(points),)
    p0 = start()["p"]
    expected = torch.stack([(A * ((1 - 0.1 * A) ** k * p0) ** 2).sum() for k in points])
    torch.testing.assert_close(result.curve, expected)
    assert not result.curve.requires_grad
    assert inner_loop(quadratic, start(), SGD(0.1), steps=steps).curve is None


def test_step_data_gives_each_step_its_own_mini_batch():
    seen = []

    def loss(p, index):
        seen.append(int(index))
        return quadratic(p) * index

    result = inner_loop(loss, start(), SGD(0.1), steps=3, step_data=torch.tensor([1.0, 0.0, 1.0]))
    assert seen == [1, 0, 1]
    torch.testing.assert_close(result.params["p"], torch.tensor([0.81, -0.64], dtype=torch.float64))


def test_gradients_use_autograd_in_a_loop_and_func_grad_under_vmap():
    x = torch.randn(3, 2, dtype=torch.float64)

    def per_task(xt):
        assert in_function_transform()
        return gradients(lambda p: (p["w"] * xt).sum() ** 2, {"w": torch.ones(2, dtype=torch.float64)})["w"]

    batched = torch.func.vmap(per_task)(x)
    assert not in_function_transform()
    looped = torch.stack(
        [
            gradients(lambda p, xt=xt: (p["w"] * xt).sum() ** 2, {"w": torch.ones(2, dtype=torch.float64)})["w"]
            for xt in x
        ]
    )
    torch.testing.assert_close(batched, looped)
    torch.testing.assert_close(looped, 2 * x.sum(1, keepdim=True) * x)
    unused = gradients(lambda p: p["a"].sum(), {"a": torch.ones(2), "b": torch.ones(3)})
    assert torch.equal(unused["b"], torch.zeros(3))


def tiny_tasks(tasks=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(tasks, 6, 1, 16, 16, generator=g, dtype=dtype), torch.arange(3).repeat(2).expand(tasks, -1),
            torch.randn(tasks, 6, 1, 16, 16, generator=g, dtype=dtype), torch.arange(3).repeat(2).expand(tasks, -1),
            torch.stack([torch.randperm(6, generator=g)[:4].view(2, 2) for _ in range(tasks)]))  # fmt: skip


@pytest.mark.parametrize("make", [lambda: SGD(0.3), lambda: Momentum(0.3, 0.9), lambda: Adam(0.01)],
                         ids=["sgd", "momentum", "adam"])  # fmt: skip
@pytest.mark.parametrize("create_graph", [False, True])
def test_loop_and_vmap_agree_in_float64(make, create_graph):
    torch.manual_seed(0)
    net = Conv4(hidden=4, image_size=16, out_features=3, track_running_stats=False).double()
    opt = make().double()
    params = select_params(net)

    def task(support_x, support_y, query_x, query_y, batches):
        def support_loss(p, index):
            return F.cross_entropy(forward_with(net, p, support_x[index]), support_y[index])

        def query_loss(p):
            return F.cross_entropy(forward_with(net, p, query_x), query_y)

        result = inner_loop(support_loss, params, opt, steps=2, create_graph=create_graph, step_data=batches,
                            curve_loss=query_loss)  # fmt: skip
        return query_loss(result.params), result.curve, result.params["head.weight"], None

    out = {}
    for mode in ("loop", "vmap"):
        loss, curve, head, none = map_tasks(task, tiny_tasks(), mode)
        grads = torch.autograd.grad(loss.mean(), list(params.values()))
        out[mode] = (loss, curve, head, torch.cat([g.flatten() for g in grads]))
        assert none is None and curve.shape == (3, 3) and head.shape == (3, 3, net.head.in_features)
    for got, expected in zip(out["vmap"], out["loop"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_map_tasks_per_task_backward_gives_the_mean_meta_gradient():
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)

    def task(xt):
        adapted = inner_loop(lambda p: forward_with(net, p, xt).pow(2).mean(), dict(net.named_parameters()), SGD(0.1),
                             steps=2, create_graph=True).params  # fmt: skip
        return forward_with(net, adapted, xt).pow(2).mean(), forward_with(net, adapted, xt)

    plain, _ = map_tasks(task, [x], "loop")
    expected = torch.autograd.grad(plain.mean(), list(net.parameters()))
    losses, predictions = map_tasks(task, [x], "loop", backward=list(net.parameters()), backward_scale=8.0)
    torch.testing.assert_close(losses, plain.detach())  # the stand-in is zero
    assert not predictions.requires_grad and predictions.shape == (4, 5, 1)
    got = torch.autograd.grad(losses.mean(), list(net.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="'loop', 'vmap' or 'batched'"):
        map_tasks(task, [x], "serial")


def test_select_params_all_head_groups_and_regular_expressions():
    net = Conv4(hidden=4, image_size=16, out_features=3, track_running_stats=False)
    assert list(select_params(net)) == [name for name, _ in net.named_parameters()]
    assert list(select_params(net, "head")) == ["head.weight", "head.bias"]
    assert list(select_params(net, ["features.0", "head.bias"])) == [
        "features.0.weight",
        "features.0.bias",
        "head.bias",
    ]
    assert list(select_params(net, r"features\.\d+\.bias")) == [
        f"features.{i}.bias" for i in (0, 1, 4, 5, 8, 9, 12, 13)
    ]
    net.features[0].weight.requires_grad_(False)  # frozen parameters do not adapt
    assert "features.0.weight" not in select_params(net)
    with pytest.raises(ValueError, match=r"adapt='classifier' selects none .* groups are \['features', 'head'\]"):
        select_params(net, "classifier")


def test_inner_loop_hooks_see_each_step_and_sum_the_step_losses():
    seen = []
    result = inner_loop(quadratic, start(), SGD(0.5), steps=3, on_step=seen.append,
                        step_loss=lambda p, u: u * quadratic(p) if u < 3 else None,
                        curve_loss=quadratic)  # fmt: skip
    # curve at 0 (step 0's), support of step 0, step loss after update 1 (step 0's), ...; the final curve point last.
    assert seen == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    a = start()["p"]  # after u updates of SGD(0.5), p is (1 - 0.5 A)^u a
    after = [0.5 * (A * ((1 - 0.5 * A) ** u * a) ** 2).sum() for u in (1, 2)]
    torch.testing.assert_close(result.extra, 1 * after[0] + 2 * after[1])


def test_task_runner_batched_gives_the_function_its_chunk():
    from lightning_meta.functional import TaskRunner
    from lightning_meta.task_batched import together

    sizes = []

    def fn(x):
        sizes.append(together())
        return x * 2

    x = torch.arange(5.0).view(5, 1)
    torch.testing.assert_close(map_tasks(fn, [x], TaskRunner("batched", chunk=2)), x * 2)
    assert sizes == [2, 2, 1] and together() is None
    map_tasks(fn, [x], "loop")
    assert sizes[3:] == [None] * 5
    with pytest.raises(ValueError, match="'loop', 'vmap' or 'batched'"):
        TaskRunner("serial")
