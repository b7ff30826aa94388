"""The AlexNet regressor, pose loss and weight exchange agree between PyTorch and Chainer."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deeppose_cli.core import weights
from deeppose_cli.engines import chainer_model as cm
from deeppose_cli.engines import torch_model as tm
from deeppose_cli.engines.chainer_compat import import_chainer
from deeppose_cli.core.errors import DeepPoseError

chainer = import_chainer()
with warnings.catch_warnings():
    # chainer.testing (imported by gradient_check) decorates with an unregistered pytest mark.
    warnings.filterwarnings("ignore", message="Unknown pytest.mark.gpu")
    from chainer import gradient_check  # noqa: E402

NUM_JOINTS = 14
TINY = dict(num_joints=NUM_JOINTS, input_size=67, width=0.125)
SMALL = dict(num_joints=NUM_JOINTS, input_size=99, width=0.125)


def make_models(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return tm.AlexNetRegressor(**config).eval(), cm.AlexNetRegressor(**config)


def with_large_fc8(params: dict, seed: int = 0) -> dict:
    """The same parameters with fc8 scaled up, so predictions are O(1) and comparisons mean something."""
    rng = np.random.default_rng(seed)
    params = dict(params)
    params["fc8/W"] = rng.normal(0, 0.3, params["fc8/W"].shape).astype(np.float32)
    params["fc8/b"] = rng.normal(0, 0.3, params["fc8/b"].shape).astype(np.float32)
    return params


def forward_torch(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def forward_chainer(model, x: np.ndarray) -> np.ndarray:
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(x).array


def images(batch: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def full_models():
    """The paper-sized network (227 px, width 1) in both frameworks, built once."""
    return make_models(dict(num_joints=NUM_JOINTS, input_size=227, width=1.0))


# ----------------------------------------------------------------------------- chainer import


def test_import_chainer_works_on_numpy2_without_warnings():
    code = (
        "from deeppose_cli.engines.chainer_compat import import_chainer\n"
        "import numpy as np\n"
        "chainer = import_chainer()\n"
        "import chainer.functions as F\n"
        "x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)\n"  # resize_images reads np.float
        "assert F.resize_images(x, (2, 2)).shape == (1, 1, 2, 2)\n"
        "print(chainer.__version__, np.__version__)\n"
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    chainer_version, numpy_version = result.stdout.split()
    assert chainer_version == "7.8.1"
    assert numpy_version == np.__version__ and int(numpy_version.split(".")[0]) >= 2


# ----------------------------------------------------------------------------- architecture


def test_parameter_shapes_follow_the_canonical_layout(full_models):
    torch_model, chainer_model = full_models
    expected = weights.parameter_shapes(NUM_JOINTS, 227, 1.0)
    assert tuple(expected) == weights.PARAMETER_NAMES
    assert expected["fc6/W"] == (4096, 256 * 6 * 6)
    for model, to_numpy in ((torch_model, tm.to_numpy_params), (chainer_model, cm.to_numpy_params)):
        params = to_numpy(model)
        assert list(params) == list(weights.PARAMETER_NAMES)
        assert {k: v.shape for k, v in params.items()} == expected
        assert all(v.dtype == np.float32 for v in params.values())
    assert sorted(n for n, _ in torch_model.named_children()) == sorted(weights.LAYER_NAMES)
    assert sorted(name.strip("/") for name, _ in chainer_model.namedlinks(skipself=True)) == sorted(weights.LAYER_NAMES)


@pytest.mark.parametrize("config", [TINY, SMALL, dict(num_joints=3, input_size=80, width=0.3)])
def test_tiny_configs_have_identical_parameters_and_output_shape(config):
    torch_model, chainer_model = make_models(config)
    expected = weights.parameter_shapes(**config)
    assert {k: v.shape for k, v in tm.to_numpy_params(torch_model).items()} == expected
    assert {k: v.shape for k, v in cm.to_numpy_params(chainer_model).items()} == expected
    x = images(3, config["input_size"])
    assert forward_torch(torch_model, x).shape == (3, 2 * config["num_joints"])
    assert forward_chainer(chainer_model, x).shape == (3, 2 * config["num_joints"])


def test_full_size_forward_shape(full_models):
    torch_model, chainer_model = full_models
    x = images(1, 227)
    assert forward_torch(torch_model, x).shape == (1, 2 * NUM_JOINTS)
    assert forward_chainer(chainer_model, x).shape == (1, 2 * NUM_JOINTS)


def test_fc8_starts_small_so_the_first_guess_is_the_box_centre():
    torch_model, chainer_model = make_models(TINY)
    for params in (tm.to_numpy_params(torch_model), cm.to_numpy_params(chainer_model)):
        assert params["fc8/W"].std() < 5e-3
        assert not params["fc8/b"].any()
    x = images(2, 67)
    assert np.abs(forward_torch(torch_model, x)).max() < 0.05
    assert np.abs(forward_chainer(chainer_model, x)).max() < 0.05


def test_dropout_only_in_training_mode():
    torch_model, chainer_model = make_models(SMALL)
    params = with_large_fc8(tm.to_numpy_params(torch_model))
    tm.load_numpy_params(torch_model, params)
    cm.load_numpy_params(chainer_model, params)
    x = torch.from_numpy(images(2, 99))
    torch_model.train()
    with torch.no_grad():
        assert not torch.equal(torch_model(x), torch_model(x))
    torch_model.eval()
    with torch.no_grad():
        assert torch.equal(torch_model(x), torch_model(x))
    with chainer.using_config("train", True):
        assert not np.array_equal(chainer_model(x.numpy()).array, chainer_model(x.numpy()).array)
    assert np.array_equal(forward_chainer(chainer_model, x.numpy()), forward_chainer(chainer_model, x.numpy()))


def test_too_small_input_is_a_clear_error():
    with pytest.raises(DeepPoseError, match="too small"):
        weights.feature_map_size(weights.MIN_INPUT_SIZE - 1)
    assert weights.feature_map_size(weights.MIN_INPUT_SIZE) == 1


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("config", [TINY, SMALL])
def test_torch_to_chainer_and_back_gives_the_same_predictions(config):
    torch_model, chainer_model = make_models(config)
    x = images(4, config["input_size"])
    tm.load_numpy_params(torch_model, with_large_fc8(tm.to_numpy_params(torch_model)))
    cm.load_numpy_params(chainer_model, tm.to_numpy_params(torch_model))
    expected = forward_torch(torch_model, x)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(forward_chainer(chainer_model, x), expected, atol=1e-4, rtol=0)

    # chainer -> torch, starting from Chainer's own initialisation
    torch_model, chainer_model = make_models(config, seed=5)
    cm.load_numpy_params(chainer_model, with_large_fc8(cm.to_numpy_params(chainer_model), seed=5))
    tm.load_numpy_params(torch_model, cm.to_numpy_params(chainer_model))
    expected = forward_chainer(chainer_model, x)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(forward_torch(torch_model, x), expected, atol=1e-4, rtol=0)
    for name, value in cm.to_numpy_params(chainer_model).items():
        np.testing.assert_array_equal(tm.to_numpy_params(torch_model)[name], value)


def test_full_size_conversion_both_ways(full_models):
    torch_model, chainer_model = full_models
    x = images(1, 227)
    torch_params = with_large_fc8(tm.to_numpy_params(torch_model))
    chainer_params = with_large_fc8(cm.to_numpy_params(chainer_model), seed=1)

    tm.load_numpy_params(torch_model, torch_params)
    cm.load_numpy_params(chainer_model, torch_params)
    np.testing.assert_allclose(forward_chainer(chainer_model, x), forward_torch(torch_model, x), atol=1e-4, rtol=0)

    cm.load_numpy_params(chainer_model, chainer_params)
    tm.load_numpy_params(torch_model, chainer_params)
    expected = forward_chainer(chainer_model, x)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(forward_torch(torch_model, x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "chainer"])
def test_loading_bad_parameters_raises_and_changes_nothing(backend):
    torch_model, chainer_model = make_models(TINY)
    model, to_numpy, load = {
        "torch": (torch_model, tm.to_numpy_params, tm.load_numpy_params),
        "chainer": (chainer_model, cm.to_numpy_params, cm.load_numpy_params),
    }[backend]
    before = to_numpy(model)
    other = {k: v + 1 for k, v in before.items()}

    missing = dict(other)
    del missing["conv3/b"]
    with pytest.raises(DeepPoseError, match="missing 'conv3/b'"):
        load(model, missing)

    wrong = dict(other)
    wrong["fc8/W"] = np.zeros((2 * NUM_JOINTS + 2, wrong["fc8/W"].shape[1]), np.float32)
    with pytest.raises(DeepPoseError, match=r"'fc8/W' has shape \(30, \d+\), expected \(28, \d+\)") as error:
        load(model, wrong)
    assert "\n" not in str(error.value)

    with pytest.raises(DeepPoseError, match="not real numbers"):
        load(model, {**other, "fc7/b": np.array(["x"] * other["fc7/b"].shape[0])})

    after = to_numpy(model)
    for name in weights.PARAMETER_NAMES:
        np.testing.assert_array_equal(after[name], before[name])

    load(model, {**other, "extra/W": np.zeros(3)})  # extra entries are ignored
    np.testing.assert_array_equal(to_numpy(model)["conv1/W"], other["conv1/W"])


def test_a_larger_model_does_not_fit_a_smaller_one():
    torch_model, _ = make_models(TINY)
    _, chainer_model = make_models(SMALL)
    with pytest.raises(DeepPoseError, match="'fc6/W' has shape"):
        cm.load_numpy_params(chainer_model, tm.to_numpy_params(torch_model))


# ----------------------------------------------------------------------------- loss


def loss_inputs(n: int = 4, j: int = 5, dtype=np.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    pred = rng.normal(0, 0.5, (n, 2 * j)).astype(dtype)
    target = rng.uniform(-0.5, 0.5, (n, j, 2)).astype(dtype)
    visible = (rng.uniform(size=(n, j)) < 0.6).astype(dtype)
    visible[0, 0], visible[0, 1] = 1, 0  # at least one of each
    return pred, target, visible


def reference_loss(pred, target, visible, use_visibility=True) -> float:
    n, j = visible.shape
    mask = visible if use_visibility else np.ones_like(visible)
    sq = (pred.reshape(n, j, 2).astype(np.float64) - target) ** 2
    return float((mask[..., None] * sq).sum() / max(mask.sum(), 1))


def torch_loss_and_grad(loss_fn, pred, target, visible, use_visibility=True):
    p = torch.tensor(pred, requires_grad=True)
    loss = loss_fn(p, torch.tensor(target), torch.tensor(visible), use_visibility)
    loss.backward()
    return loss.item(), p.grad.numpy()


def chainer_loss_and_grad(loss_fn, pred, target, visible, use_visibility=True):
    p = chainer.Variable(pred.copy())
    loss = loss_fn(p, target, visible, use_visibility)
    loss.backward()
    return float(loss.array), p.grad


ALL_LOSSES = {
    "torch": (torch_loss_and_grad, tm.pose_loss),
    "torch_explicit": (torch_loss_and_grad, tm.pose_loss_explicit),
    "chainer": (chainer_loss_and_grad, cm.pose_loss),
    "chainer_explicit": (chainer_loss_and_grad, cm.pose_loss_explicit),
}


def all_losses(pred, target, visible, use_visibility=True) -> dict:
    return {name: run(fn, pred, target, visible, use_visibility) for name, (run, fn) in ALL_LOSSES.items()}


@pytest.mark.parametrize("use_visibility", [True, False])
def test_losses_agree_across_frameworks_and_implementations(use_visibility):
    pred, target, visible = loss_inputs()
    expected = reference_loss(pred, target, visible, use_visibility)
    results = all_losses(pred, target, visible, use_visibility)
    reference_grad = results["torch"][1]
    for name, (value, grad) in results.items():
        assert value == pytest.approx(expected, abs=1e-6), name
        assert grad.dtype == np.float32 and grad.shape == pred.shape
        np.testing.assert_allclose(grad, reference_grad, atol=1e-6, rtol=0, err_msg=name)


def test_torch_explicit_backward_passes_gradcheck():
    pred, target, visible = loss_inputs(3, 4, np.float64, seed=2)
    inputs = (
        torch.tensor(pred, requires_grad=True),
        torch.tensor(target, requires_grad=True),
        torch.tensor(visible),
    )
    for use_visibility in (True, False):
        assert torch.autograd.gradcheck(lambda p, t, v: tm.PoseLossFunction.apply(p, t, v, use_visibility), inputs)
    assert torch.autograd.gradgradcheck(lambda p, t, v: tm.pose_loss(p, t, v), inputs)


def test_chainer_explicit_backward_passes_check_backward():
    pred, target, visible = loss_inputs(3, 4, np.float64, seed=3)
    grad_loss = np.array(0.7, np.float64)
    for use_visibility in (True, False):
        gradient_check.check_backward(
            lambda p, t, v: cm.PoseLossFunction(use_visibility).apply((p, t, v)),
            (pred, target, visible), grad_loss, no_grads=[False, False, True], atol=1e-6, rtol=1e-5,
        )
    # backward is built from Chainer functions, so it differentiates again
    gradient_check.check_double_backward(
        lambda p, t: cm.pose_loss_explicit(p, t, visible),
        (pred, target), grad_loss, (np.ones_like(pred), np.ones_like(target)), atol=1e-6, rtol=1e-5,
    )


def test_target_gradients_agree():
    pred, target, visible = loss_inputs(seed=4)
    grads = {}
    for name, fn in (("autograd", tm.pose_loss), ("explicit", tm.pose_loss_explicit)):
        t = torch.tensor(target, requires_grad=True)
        fn(torch.tensor(pred), t, torch.tensor(visible)).backward()
        grads[name] = t.grad.numpy()
    for name, fn in (("chainer", cm.pose_loss), ("chainer_explicit", cm.pose_loss_explicit)):
        t = chainer.Variable(target.copy())
        fn(chainer.Variable(pred.copy()), t, visible).backward()
        grads[name] = t.grad
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, grads["autograd"], atol=1e-6, rtol=0, err_msg=name)


def test_invisible_joints_do_not_affect_loss_or_gradient():
    pred, target, visible = loss_inputs(seed=5)
    before = all_losses(pred, target, visible)
    moved = target.copy()
    moved[visible == 0] = np.array([3.0, -7.0], np.float32)
    moved[0, 1] = np.nan  # an unlabelled joint may hold NaN
    after = all_losses(pred, moved, visible)
    for name in ALL_LOSSES:
        assert after[name][0] == before[name][0], name
        np.testing.assert_array_equal(after[name][1], before[name][1], err_msg=name)
        invisible_grad = after[name][1].reshape(visible.shape + (2,))[visible == 0]
        assert not invisible_grad.any(), name


def test_use_visibility_false_counts_every_joint():
    pred, target, visible = loss_inputs(seed=6)
    n, j = visible.shape
    mean_sq_distance = float(((pred.reshape(n, j, 2) - target) ** 2).sum() / (n * j))
    moved = target.copy()
    moved[0, 1] += 1.0  # an invisible joint
    for name, (value, grad) in all_losses(pred, target, visible, use_visibility=False).items():
        assert value == pytest.approx(mean_sq_distance, abs=1e-6), name
        assert grad.reshape(n, j, 2)[0, 1].any(), name
    for name, (value, _) in all_losses(pred, moved, visible, use_visibility=False).items():
        assert value != pytest.approx(mean_sq_distance, abs=1e-6), name


def test_no_visible_joint_gives_zero_loss_not_nan():
    pred, target, visible = loss_inputs(seed=7)
    for name, (value, grad) in all_losses(pred, target, np.zeros_like(visible)).items():
        assert value == 0.0 and not grad.any(), name


def test_loss_trains_the_model_end_to_end():
    """One SGD step on each framework's loss lowers it (the pieces fit together)."""
    torch_model, chainer_model = make_models(TINY)
    x = images(2, 67)
    _, target, visible = loss_inputs(2, NUM_JOINTS, seed=8)
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = tm.pose_loss_explicit(torch_model(torch.from_numpy(x)), torch.from_numpy(target), torch.from_numpy(visible))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]

    chainer_optimizer = chainer.optimizers.SGD(lr=0.5)
    chainer_optimizer.setup(chainer_model)
    losses = []
    with chainer.using_config("train", False):
        for _ in range(2):
            loss = cm.pose_loss_explicit(chainer_model(x), target, visible)
            chainer_model.cleargrads()
            loss.backward()
            chainer_optimizer.update()
            losses.append(float(loss.array))
    assert losses[1] < losses[0]


@pytest.mark.parametrize("batch_norm, loss", [(False, "l2"), (True, "laplace")])
def test_one_network_spec_builds_every_model(batch_norm, loss):
    """Both frameworks' regressors and the benchmark's bare references come from
    weights.conv_stack/fc_stack and follow the recipe (batch norm, the laplace scale layer):
    the same trainable parameter counts and output shapes."""
    import torch

    from conftest import tiny_config
    from deeppose_cli.core.weights import parameter_shapes
    from deeppose_cli.engines import chainer_reference, torch_reference
    from deeppose_cli.engines import chainer_model as cm
    from deeppose_cli.engines import torch_model as tm

    uncertainty = loss == "laplace"
    shapes = parameter_shapes(14, 131, 0.25, batch_norm, uncertainty)
    expected = sum(int(np.prod(s)) for name, s in shapes.items()
                   if not name.endswith(("avg_mean", "avg_var")))
    config = tiny_config("pytorch", Path("."), Path("out"), input_size=131, width=0.25,
                         batch_norm=batch_norm, loss=loss)
    torch_bare = torch_reference.Reference(config, 14)
    chainer_bare = chainer_reference.Reference(config, 14)
    counts = {
        "torch model": sum(p.numel() for p in
                           tm.AlexNetRegressor(14, 131, 0.25, batch_norm,
                                               uncertainty=uncertainty).parameters()),
        "chainer model": sum(p.size for p in
                             cm.AlexNetRegressor(14, 131, 0.25, batch_norm,
                                                 uncertainty=uncertainty).params()),
        "torch bare": sum(p.numel() for p in torch_bare.model.parameters()),
        "chainer bare": sum(p.size for p in chainer_bare.model.params()),
    }
    assert counts == dict.fromkeys(counts, expected)
    x = np.zeros((2, 3, 131, 131), np.float32)
    torch_bare.model.eval()
    h = torch_bare.body(torch.from_numpy(x))
    assert torch_bare.head(h).shape == (2, 28)
    with chainer_reference.chainer.using_config("train", False):
        assert chainer_bare.model.head(chainer_bare.model.body(x)).shape == (2, 28)


def test_an_unknown_architecture_is_refused():
    from deeppose_cli.core.config import TrainConfig
    from deeppose_cli.core.weights import architecture

    with pytest.raises(DeepPoseError, match="unknown architecture 'resnet'"):
        architecture({"num_joints": 14, "input_size": 227, "width": 1.0,
                      "architecture": "resnet"})
    with pytest.raises(DeepPoseError, match="--architecture must be one of alexnet"):
        TrainConfig(stage=1, framework="pytorch", dataset="lsp", train_index="x", out="y",
                    architecture="resnet").validate()


# ----------------------------------------------------------------------------- laplace loss


def laplace_inputs(n: int = 4, j: int = 5, seed: int = 0):
    """(N, 4J) predictions: coordinates, then log scales spread over and beyond the clip range."""
    pred, target, visible = loss_inputs(n, j, seed=seed)
    log_scale = np.random.default_rng(seed + 100).uniform(-9.0, 5.0, (n, 2 * j)).astype(np.float32)
    return np.concatenate([pred, log_scale], axis=1), target, visible


def reference_laplace(pred, target, visible) -> float:
    n, j = visible.shape
    d = np.abs(pred[:, :2 * j].reshape(n, j, 2).astype(np.float64) - target)
    s = np.clip(pred[:, 2 * j:].reshape(n, j, 2).astype(np.float64), -7.0, 4.0)
    nll = d / np.exp(s) + np.log(2 * np.exp(s))  # -log of the Laplace density (1 / 2b) e^(-|d| / b)
    return float((visible[..., None] * nll).sum() / max(visible.sum(), 1))


def laplace_loss_and_grad(pred, target, visible) -> dict:
    torch_fn = lambda p, t, v, u: tm.pose_loss(p, t, v, u, norm="laplace")  # noqa: E731
    chainer_fn = lambda p, t, v, u: cm.pose_loss(p, t, v, u, norm="laplace")  # noqa: E731
    return {"torch": torch_loss_and_grad(torch_fn, pred, target, visible),
            "chainer": chainer_loss_and_grad(chainer_fn, pred, target, visible)}


def test_laplace_loss_is_the_negative_log_likelihood_in_both_frameworks():
    pred, target, visible = laplace_inputs()
    n, j = visible.shape
    results = laplace_loss_and_grad(pred, target, visible)
    expected = reference_laplace(pred, target, visible)
    for name, (value, grad) in results.items():
        assert value == pytest.approx(expected, rel=1e-5), name
        np.testing.assert_allclose(grad, results["torch"][1], rtol=1e-4, atol=1e-6, err_msg=name)
    grad = results["torch"][1]
    log_scale = pred[:, 2 * j:].reshape(n, j, 2)
    scale_grad = grad[:, 2 * j:].reshape(n, j, 2)
    clipped = (log_scale < -7.0) | (log_scale > 4.0)
    assert clipped.any() and not scale_grad[clipped].any()  # no pull beyond the clip range
    # d/ds (|d| e^-s + s) = 1 - |d| e^-s: a scale above the error shrinks, below it grows
    d = np.abs(pred[:, :2 * j].reshape(n, j, 2) - target)
    inside = ~clipped & (visible[..., None] > 0)
    expected_scale_grad = (1 - d * np.exp(-log_scale)) / visible.sum()
    np.testing.assert_allclose(scale_grad[inside], expected_scale_grad[inside], rtol=1e-4, atol=1e-7)
    # the coordinates get the L1 gradient weighted by 1 / b
    coord_grad = grad[:, :2 * j].reshape(n, j, 2)
    expected_coord = np.sign(pred[:, :2 * j].reshape(n, j, 2) - target) * np.exp(
        -np.clip(log_scale, -7.0, 4.0)) / visible.sum()
    vis = np.broadcast_to(visible[..., None] > 0, coord_grad.shape)
    np.testing.assert_allclose(coord_grad[vis], expected_coord[vis], rtol=1e-4)


def test_laplace_loss_ignores_invisible_joints_and_needs_the_scale_outputs():
    pred, target, visible = laplace_inputs(seed=3)
    before = laplace_loss_and_grad(pred, target, visible)
    moved = target.copy()
    moved[visible == 0] = np.nan
    after = laplace_loss_and_grad(pred, moved, visible)
    for name in before:
        assert after[name][0] == before[name][0]
        np.testing.assert_array_equal(after[name][1], before[name][1])
    j = visible.shape[1]
    with pytest.raises(DeepPoseError, match="4 \\* num_joints"):
        tm.pose_loss(torch.tensor(pred[:, :2 * j]), torch.tensor(target), torch.tensor(visible),
                     norm="laplace")
    with pytest.raises(DeepPoseError, match="4 \\* num_joints"):
        cm.pose_loss(pred[:, :2 * j], target, visible, norm="laplace")
    for explicit in (tm.pose_loss_explicit, cm.pose_loss_explicit):
        with pytest.raises(DeepPoseError, match="explicit-backward"):
            explicit(torch.tensor(pred) if explicit is tm.pose_loss_explicit else pred,
                     torch.tensor(target) if explicit is tm.pose_loss_explicit else target,
                     torch.tensor(visible) if explicit is tm.pose_loss_explicit else visible,
                     norm="laplace")


def test_uncertainty_models_agree_across_frameworks_and_predict_coordinates_in_eval_mode():
    config = dict(TINY, uncertainty=True)
    torch_model, chainer_model = make_models(config)
    params = with_large_fc8(tm.to_numpy_params(torch_model))
    assert set(params) == set(weights.parameter_names(False, True))
    assert params["fc8_scale/W"].shape == params["fc8/W"].shape
    np.testing.assert_array_equal(params["fc8_scale/b"], weights.LOG_SCALE_INIT)
    np.testing.assert_array_equal(cm.to_numpy_params(chainer_model)["fc8_scale/b"],
                                  weights.LOG_SCALE_INIT)
    params["fc8_scale/W"] = np.random.default_rng(2).normal(0, 0.3, params["fc8/W"].shape
                                                            ).astype(np.float32)
    tm.load_numpy_params(torch_model, params)
    cm.load_numpy_params(chainer_model, params)
    x = images(3, TINY["input_size"])
    coords = forward_torch(torch_model, x)
    assert coords.shape == (3, 2 * NUM_JOINTS)
    np.testing.assert_allclose(forward_chainer(chainer_model, x), coords, atol=1e-4, rtol=0)
    # in training mode the log scales follow the coordinates (batch norm in neither model,
    # no dropout, so the coordinates are the eval-mode ones)
    torch_model.dropout = chainer_model.dropout = 0.0
    with torch.no_grad():
        trained = torch_model.train()(torch.from_numpy(x)).numpy()
    with chainer.using_config("train", True), chainer.no_backprop_mode():
        trained_chainer = chainer_model(x).array
    assert trained.shape == trained_chainer.shape == (3, 4 * NUM_JOINTS)
    np.testing.assert_allclose(trained[:, :2 * NUM_JOINTS], coords, atol=1e-5, rtol=0)
    np.testing.assert_allclose(trained_chainer, trained, atol=1e-4, rtol=0)
    assert np.abs(trained[:, 2 * NUM_JOINTS:] - weights.LOG_SCALE_INIT).max() > 0.1


@pytest.mark.parametrize("backend", [tm, cm])
def test_uncertainty_weights_load_only_where_they_fit(backend):
    """The scale layer may be missing from --init weights (it starts fresh) but not from a model."""
    np.random.seed(0)
    torch.manual_seed(0)
    plain = backend.to_numpy_params(backend.AlexNetRegressor(**TINY))
    model = backend.AlexNetRegressor(**TINY, uncertainty=True)
    fresh = backend.to_numpy_params(model)
    with pytest.raises(DeepPoseError, match="fc8_scale"):
        backend.load_numpy_params(model, plain)
    backend.load_numpy_params(model, plain, optional=weights.SCALE_NAMES)
    loaded = backend.to_numpy_params(model)
    for name, value in plain.items():
        np.testing.assert_array_equal(loaded[name], value)
    for name in weights.SCALE_NAMES:
        np.testing.assert_array_equal(loaded[name], fresh[name])
    backend.load_numpy_params(backend.AlexNetRegressor(**TINY), loaded)  # the extra layer is ignored
