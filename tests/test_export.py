"""`deeppose export`: tiny cascades trained in each framework, exported to ONNX and
TorchScript, predict and evaluate the same joints as their source runs (within 0.5 px, with
and without the flip test, 1-3 stages, on synthetic and, when present, real LSPET images);
and every refusal is one line that leaves nothing behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deeppose_cli.cli import main
from deeppose_cli.core.cascade import run_cascade, with_flip_test
from deeppose_cli.core.errors import DeepPoseError
from deeppose_cli.core.files import sha256_of
from deeppose_cli.core.images import read_rgb
from deeppose_cli.core.manifests import load_dataset_manifest
from deeppose_cli.data.annotations import read_index
from deeppose_cli.training.rundir import RunDirectory
from deeppose_cli.training.runs import load_cascade

from conftest import (CALIBRATED, LSPET_MINI, assert_no_escaped_exception, needs_lspet_mini,
                      subset_index, tiny_config)


def needs_onnx():
    """Skip the calling test where the export extra is not installed (TorchScript tests and
    the refusals run without it); returns the onnx module."""
    for package in ("onnxscript", "onnxruntime"):
        pytest.importorskip(package, reason="the export extra is not installed")
    return pytest.importorskip("onnx", reason="the export extra is not installed")

TOLERANCE_PX = 0.5
MANIFEST = load_dataset_manifest("synthetic")
TINY = dict(input_size=67, width=0.0625, batch_size=8, optimizer="Adam", lr=1e-3,
            weight_decay=0.0, max_iterations=2, checkpoint_every=100, dropout=0.0)


# ----------------------------------------------------------------------------- tiny runs


def spread_weights(path: Path, seed: int) -> Path:
    """A PyTorch model file of the tiny network with the scale layer whose outputs spread
    over the crop (trained runs start from it with --init): a freshly initialized fc8
    predicts the box centre for every image, and two such networks agree whatever their
    inputs, so a comparison of them could not fail.

    The gains keep the networks as calm as trained ones: crops are rounded to uint8, so a
    refinement stage amplifies any difference in the boxes the previous stage gives it (a
    1e-4 px shift of the person box moved a trained stage-1 network's LSPET joints by up to
    0.08 px), and He-scaled random convolutions (gain 2) amplified it a hundredfold more
    than gain 1 does."""
    from deeppose_cli.core.weights import parameter_shapes
    from deeppose_cli.engines import get_engine

    rng = np.random.default_rng(seed)
    meta = {"num_joints": 14, "input_size": TINY["input_size"], "width": TINY["width"],
            "batch_norm": True, "uncertainty": True}
    params = {}
    for name, shape in parameter_shapes(**meta).items():
        layer, array = name.split("/")
        if array in ("W",):
            fan_in = int(np.prod(shape[1:]))
            gain = 1.0
            params[name] = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
        elif array == "b":
            params[name] = np.full(shape, -3.0 if layer == "fc8_scale" else 0.0)
        elif array in ("gamma", "avg_var"):
            params[name] = np.ones(shape)
        else:
            params[name] = np.zeros(shape)
    get_engine("pytorch").write_model({k: v.astype(np.float32) for k, v in params.items()},
                                      meta, path)
    return path


def train(framework, index_dir, out, stage, init, previous=None, **overrides):
    from deeppose_cli.core.config import TrainConfig
    from deeppose_cli.core.manifests import load_stage_recipe
    from deeppose_cli.training.stages import train_stage

    settings = dict(TINY, init=str(init), **overrides)
    if stage == 1:
        config = tiny_config(framework, index_dir, out, **settings)
    else:
        recipe = load_stage_recipe(stage)
        recipe.update(CALIBRATED)
        recipe.update(settings, sigma=1.5)
        config = TrainConfig.from_recipe(
            recipe, stage=stage, framework=framework, dataset="synthetic",
            train_index=str(index_dir / "train.jsonl"), val_index=str(index_dir / "val.jsonl"),
            out=str(out), previous=str(previous))
    return train_stage(config, show_progress=False)[0].path


@pytest.fixture(scope="module")
def runs(synthetic_dataset, tmp_path_factory):
    """A 2-stage PyTorch run, a 2-stage Chainer run and a 3-stage run on top of the
    Chainer one (Chainer, Chainer, PyTorch). Stage losses and recipes vary so the exports
    meet batch norm or not, the scale layer or not, and stages trained without mirrors."""
    _, full_index = synthetic_dataset
    root = tmp_path_factory.mktemp("export-runs")
    index_dir = subset_index(full_index, root / "index", 24, 8)
    init = spread_weights(root / "init.pt", seed=1)
    pt1 = train("pytorch", index_dir, root / "pt1", 1, init, loss="laplace", batch_norm=False)
    pt2 = train("pytorch", index_dir, root / "pt2", 2, init, pt1, loss="l1", batch_norm=True)
    ch1 = train("chainer", index_dir, root / "ch1", 1, init, loss="l2", batch_norm=True,
                flip=False)
    ch2 = train("chainer", index_dir, root / "ch2", 2, init, ch1, loss="laplace",
                batch_norm=False)
    ch3 = train("pytorch", index_dir, root / "ch3", 3, init, ch2, loss="laplace",
                batch_norm=True)
    return {"pt2": pt2, "ch2": ch2, "ch3": ch3, "index": index_dir, "root": root}


@pytest.fixture(scope="module")
def exports(runs):
    """Exports made on first use: (run name, format, flip test) -> directory."""
    from deeppose_cli.apps.export import export_run

    made = {}

    def get(name, model_format="onnx", flip_test=None):
        key = (name, model_format, flip_test)
        if model_format == "onnx":
            needs_onnx()
        if key not in made:
            out = runs["root"] / f"{name}-{model_format}-{flip_test}"
            made[key] = export_run(runs[name], model_format, out, flip_test=flip_test).out
        return made[key]

    return get


def cascade_joints(model_dir, images, boxes, stages=None, flip_test=None):
    """Joints (N, J, 2) after each stage, as `deeppose predict` computes them."""
    cascade, _ = load_cascade(model_dir, "cpu", stages)
    cascade = with_flip_test(cascade, MANIFEST.flip_permutation, flip_test)
    return run_cascade(cascade, images, boxes, MANIFEST.torso_diameter)


def val_images(runs, count=8):
    records = read_index(runs["index"] / "val.jsonl")[:count]
    return [read_rgb(r.image) for r in records], np.stack([r.box for r in records])


def assert_same_joints(source, exported, context):
    """Within the tolerance after every stage; the largest difference is printed (pytest -s:
    docs/export.md quotes them)."""
    assert len(source) == len(exported)
    for k, (a, b) in enumerate(zip(source, exported), 1):
        worst = float(np.abs(a - b).max())
        print(f"{context}, stages 1-{k}: {worst:.5f} px")
        assert worst <= TOLERANCE_PX, f"{context}, stages 1-{k}: {worst:.4f} px apart"


def assert_informative(joints, boxes):
    """The predictions vary from image to image by much more than the tolerance, so equal
    predictions mean equal networks."""
    normalized = (joints - boxes[:, None, :2]) / boxes[:, None, 2:]
    assert normalized.std(axis=0).mean() > 0.02, normalized.std(axis=0).mean()
    assert np.abs(joints - joints.mean(axis=0)).max() > 20 * TOLERANCE_PX


# ----------------------------------------------------------------------------- the export


@pytest.mark.slow
def test_onnx_export_is_checked_and_described_by_cascade_json(runs, exports):
    onnx = needs_onnx()
    out = exports("ch3")
    cascade = json.loads((out / "cascade.json").read_text())
    assert cascade["format"] == "deeppose-export" and cascade["model_format"] == "onnx"
    assert cascade["opset"] == 20
    assert [s["stage"] for s in cascade["stages"]] == [1, 2, 3]
    assert cascade["source"]["frameworks"] == ["chainer", "chainer", "pytorch"]
    meta = RunDirectory(runs["ch3"]).meta()
    recorded = [e["model_sha256"] for e in meta["chain"]] + [meta["model_sha256"]]
    assert cascade["source"]["model_sha256"] == recorded
    assert [s["source"]["model_sha256"] for s in cascade["stages"]] == recorded
    assert cascade["joint_names"] == list(MANIFEST.joint_names)
    assert cascade["flip_permutation"] == MANIFEST.flip_permutation
    assert cascade["torso_pair"] == list(MANIFEST.torso_diameter)
    assert cascade["mean_pose"] == meta["mean_pose"]
    assert cascade["input"]["mean"] == [0.485, 0.456, 0.406]
    assert cascade["input"]["std"] == [0.229, 0.224, 0.225]
    # stage 1 was trained without mirrored images: no flip test in its graph by default
    assert [s["flip_in_graph"] for s in cascade["stages"]] == [False, True, True]
    assert [s["has_log_scales"] for s in cascade["stages"]] == [False, True, True]
    assert [s["sigma"] for s in cascade["stages"]] == [None, 1.5, 1.5]
    for stage in cascade["stages"]:
        path = out / stage["file"]
        assert sha256_of(path) == stage["sha256"]
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        (graph_input,) = model.graph.input
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value  # the batch is dynamic
        assert [d.dim_value for d in dims[1:]] == [3, 67, 67]
        assert [o.name for o in model.graph.output] == stage["outputs"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.slow
@pytest.mark.parametrize("model_format", ["onnx", "torchscript"])
def test_exported_stages_take_any_batch(runs, exports, model_format):
    cascade, _ = load_cascade(exports("pt2", model_format), "cpu")
    source, _ = load_cascade(runs["pt2"], "cpu")
    for exported, original in zip(cascade, source):
        for batch in (1, 5, 70):  # 70: more than one of the predictor's batches
            x = np.random.default_rng(batch).standard_normal((batch, 3, 67, 67))
            x = x.astype(np.float32)
            got = exported.predictor(x)
            want = with_flip_test([original], MANIFEST.flip_permutation)[0].predictor(x)
            assert got.coords.shape == (batch, 14, 2) and got.coords.dtype == np.float64
            np.testing.assert_allclose(got.coords, want.coords, atol=2e-5)
            assert (got.log_scales is None) == (want.log_scales is None)
            if want.log_scales is not None:
                np.testing.assert_allclose(got.log_scales, want.log_scales, atol=2e-5)
    # the protocol's crops(): images and boxes, crops cut on the host
    from deeppose_cli.core.cascade import host_network_inputs

    images, boxes = val_images(runs, 3)
    boxes = np.stack([boxes, boxes * [1.0, 1.0, 0.5, 0.5]], axis=1)  # (N, K=2, 4)
    flipped = with_flip_test(source[:1], MANIFEST.flip_permutation)[0].predictor
    for mirror in (False, True):
        got = cascade[0].predictor.crops(images, boxes, mirror)
        want = flipped(np.stack(host_network_inputs(images, boxes, 67, mirror)))
        assert got.coords.shape == (3, 2, 14, 2)
        np.testing.assert_allclose(got.coords, want.coords.reshape(3, 2, 14, 2), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, model_format, exported_with, predicted_with", [
    ("pt2", "onnx", None, None),           # flip test in every graph, as predict's default
    ("pt2", "torchscript", False, False),  # no flip test anywhere
    ("pt2", "torchscript", False, True),   # plain graphs, deeppose flips them
    ("ch3", "onnx", None, None),           # stage 1 without mirrors: no flip there
    ("ch3", "onnx", False, False),
    ("ch3", "onnx", False, True),
    ("ch3", "torchscript", True, True),    # the flip test built into all three graphs
])
def test_export_predicts_the_source_runs_joints(runs, exports, name, model_format,
                                                exported_with, predicted_with):
    images, boxes = val_images(runs)
    out = exports(name, model_format, exported_with)
    source = cascade_joints(runs[name], images, boxes, flip_test=predicted_with)
    assert_informative(source[-1], boxes)
    assert_same_joints(source, cascade_joints(out, images, boxes, flip_test=predicted_with),
                       f"{name} {model_format}")
    stages = len(source)
    assert_same_joints(source[:1], cascade_joints(out, images, boxes, 1, predicted_with),
                       f"{name} {model_format} --stages 1")
    if predicted_with is not False:  # the flip test changes the joints: it is compared too
        plain = cascade_joints(runs[name], images, boxes, flip_test=False)
        assert np.abs(plain[-1] - source[-1]).max() > 1.0
    assert stages == {"pt2": 2, "ch3": 3}[name]


def predict_json(model_dir, images, extra=()):
    result = CliRunner().invoke(main, ["predict", *map(str, images), "--model", str(model_dir),
                                       "--json", *extra])
    assert result.exit_code == 0, result.output
    return np.array([[[k["x"], k["y"]] for k in r["keypoints"]]
                     for r in json.loads(result.stdout)])


@pytest.mark.slow
@pytest.mark.parametrize("name, model_format", [("pt2", "onnx"), ("ch3", "torchscript")])
def test_predict_command_from_an_export(runs, exports, name, model_format):
    records = read_index(runs["index"] / "val.jsonl")[:4]
    paths = [r.image for r in records]
    out = exports(name, model_format)
    for extra in ([], ["--stages", "1"], ["--bbox", "5,4,50,55"]):
        source = predict_json(runs[name], paths, extra)
        exported = predict_json(out, paths, extra)
        # the JSON rounds to 0.01 px
        assert np.abs(source - exported).max() <= TOLERANCE_PX, extra
    assert np.abs(source - source.mean(axis=0)).max() > 10 * TOLERANCE_PX


@pytest.mark.slow
def test_evaluate_command_from_an_export(runs, exports, tmp_path):
    index = runs["index"] / "val.jsonl"
    scores = {}
    for label, model in (("source", runs["ch3"]), ("export", exports("ch3"))):
        metrics = tmp_path / f"{label}.json"
        predictions = tmp_path / f"{label}-predictions.json"
        result = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--index",
                                           str(index), "--json", str(metrics), "--plot",
                                           str(tmp_path / f"{label}.png"),
                                           "--save-predictions", str(predictions)])
        assert result.exit_code == 0, result.output
        scores[label] = (json.loads(metrics.read_text()), json.loads(predictions.read_text()))
    (source, source_pred), (exported, exported_pred) = scores["source"], scores["export"]
    assert exported["flip_test_stages"] == source["flip_test_stages"] == [2, 3]
    assert [r["name"] for r in exported["rows"]] == [r["name"] for r in source["rows"]]
    for a, b in zip(source_pred, exported_pred):
        np.testing.assert_allclose(a["stages"], b["stages"], atol=TOLERANCE_PX)
    assert [r["stage"] for r in exported["refinement"]] == [2, 3]


@needs_lspet_mini
@pytest.mark.slow
@pytest.mark.parametrize("name", ["pt2", "ch3"])
def test_export_predicts_the_source_runs_joints_on_real_lspet_images(runs, exports, name,
                                                                     tmp_path_factory):
    from deeppose_cli.data.annotations import build_index
    from deeppose_cli.data.fetch import fetch_dataset

    root = tmp_path_factory.mktemp("lspet")
    manifest = load_dataset_manifest("lspet")
    fetched = fetch_dataset(manifest, root, archive=LSPET_MINI, progress=False)
    report = build_index(manifest, fetched.dataset_dir)
    records = read_index(report.index_dir / "train.jsonl")[:24]
    images = [read_rgb(r.image) for r in records]
    boxes = np.stack([r.box for r in records])
    for model_format, exported_with, predicted_with in (("onnx", None, None),
                                                        ("onnx", False, False),
                                                        ("torchscript", False, True)):
        out = exports(name, model_format, exported_with)
        source = cascade_joints(runs[name], images, boxes, flip_test=predicted_with)
        assert_informative(source[-1], boxes)
        assert_same_joints(source, cascade_joints(out, images, boxes, flip_test=predicted_with),
                           f"{name} {model_format} on LSPET")


# ----------------------------------------------------------------------------- refusals


def invoke(argv):
    result = CliRunner().invoke(main, argv)
    assert_no_escaped_exception(result)
    return result


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def nothing_beside(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.slow
def test_export_refuses_a_damaged_run_in_one_line(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["pt2"], run)
    model = run / "chain" / "stage1" / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    out = tmp_path / "export"
    ts = ["--format", "torchscript"]  # the refusals need no optional package
    one_line_error(invoke(["export", str(run), "--out", str(out), *ts]), "model.pt does not match")
    nothing_beside(out)
    (run / "run.json").write_text("{not json")
    one_line_error(invoke(["export", str(run), "--out", str(out), *ts]), "run.json is corrupt")
    one_line_error(invoke(["export", str(tmp_path / "nowhere"), *ts]),
                   "not a deeppose run directory")
    nothing_beside(out)


@pytest.mark.slow
def test_export_refuses_an_unfinished_run(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["pt2"], run)
    meta = json.loads((run / "run.json").read_text())
    meta["complete"] = False
    (run / "run.json").write_text(json.dumps(meta))
    one_line_error(invoke(["export", str(run), "--out", str(tmp_path / "e"), "--format",
                           "torchscript"]), "training did not finish")


def test_export_refuses_an_unknown_format_and_a_misplaced_opset(tmp_path):
    one_line_error(invoke(["export", str(tmp_path), "--format", "tflite"]),
                   "export format must be one of onnx, torchscript, got 'tflite'")
    one_line_error(invoke(["export", str(tmp_path), "--format", "torchscript", "--opset", "20"]),
                   "--opset applies to --format onnx only")


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_export_without_the_extra_says_which_to_install(tmp_path, monkeypatch, missing):
    import importlib

    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError

    def absent(package):
        try:
            importlib.import_module(package)
        except ImportError:
            return True
        return False

    named = next(p for p in ("onnx", "onnxscript", "onnxruntime") if absent(p))  # the first
    assert named == missing or absent(missing)
    result = invoke(["export", str(tmp_path / "run"), "--out", str(tmp_path / "e")])
    one_line_error(result, f"needs the package {named}", "pip install -e '.[export]'")
    nothing_beside(tmp_path / "e")


@pytest.mark.slow
def test_predicting_an_onnx_export_without_onnxruntime_says_which_extra(exports, monkeypatch,
                                                                       runs):
    out = exports("pt2")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    image = read_index(runs["index"] / "val.jsonl")[0].image
    one_line_error(invoke(["predict", str(image), "--model", str(out)]),
                   "running onnx needs the package onnxruntime", "'.[export]'")


@pytest.mark.slow
def test_export_output_refusals_and_replacement(runs, exports, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    one_line_error(invoke(["export", str(runs["pt2"]), "--format", "torchscript", "--out",
                           str(occupied)]), "is not empty and is not an export")
    assert (occupied / "notes.txt").read_text() == "mine"
    one_line_error(invoke(["export", str(runs["pt2"]), "--format", "torchscript", "--out",
                           str(runs["pt2"] / "x")]), "--out must lie outside the run")
    one_line_error(invoke(["export", str(exports("pt2", "torchscript")), "--format",
                           "torchscript"]), "is an export already")
    out = tmp_path / "again"
    for flip in ("--flip-test", "--no-flip-test"):  # an export replaces an earlier one
        result = invoke(["export", str(runs["pt2"]), "--format", "torchscript", "--out",
                         str(out), flip])
        assert result.exit_code == 0, result.output
        in_graph = [s["flip_in_graph"] for s in
                    json.loads((out / "cascade.json").read_text())["stages"]]
        assert in_graph == [flip == "--flip-test"] * 2
    assert sorted(p.name for p in out.iterdir()) == ["cascade.json", "stage1.torchscript",
                                                    "stage2.torchscript"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "occupied"]


@pytest.mark.slow
def test_an_opset_the_exporter_cannot_write_is_refused(runs, tmp_path):
    needs_onnx()
    out = tmp_path / "export"
    one_line_error(invoke(["export", str(runs["pt2"]), "--opset", "30", "--out", str(out)]),
                   "wrote opset 18 when asked for opset 30")
    nothing_beside(out)


def test_onnx_on_cuda_needs_an_onnxruntime_with_the_cuda_provider(monkeypatch):
    needs_onnx()
    import onnxruntime

    from deeppose_cli.engines import onnx_runtime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeepPoseError, match="no CUDA provider .*onnxruntime-gpu"):
        onnx_runtime.providers("cuda:1")
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_runtime.providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}),
                                                "CPUExecutionProvider"]
    assert onnx_runtime.providers("cpu") == ["CPUExecutionProvider"]


@pytest.mark.slow
def test_predicting_an_export_refuses_what_its_graphs_cannot_do(runs, exports):
    out = exports("pt2", "torchscript")
    image = str(read_index(runs["index"] / "val.jsonl")[0].image)
    one_line_error(invoke(["predict", image, "--model", str(out), "--no-flip-test"]),
                   "inside its exported graph", "--no-flip-test")
    one_line_error(invoke(["predict", image, "--model", str(out), "--flip-weights", "equal"]),
                   "--flip-weights scales")
    one_line_error(invoke(["predict", image, "--model", str(out), "--stages", "3"]),
                   "--stages must be between 1 and 2")


@pytest.mark.slow
def test_a_damaged_export_is_refused_in_one_line(runs, exports, tmp_path):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(exports("pt2", "torchscript", False), out)
    image = str(read_index(runs["index"] / "val.jsonl")[0].image)
    stage = out / "stage2.torchscript"
    stage.write_bytes(stage.read_bytes()[:-10])
    one_line_error(invoke(["predict", image, "--model", str(out)]),
                   "stage2.torchscript does not match the checksum")
    stage.unlink()
    one_line_error(invoke(["predict", image, "--model", str(out)]), "stage2.torchscript not found")
    cascade = json.loads((out / "cascade.json").read_text())
    cascade["stages"][0]["file"] = "../elsewhere.torchscript"
    (out / "cascade.json").write_text(json.dumps(cascade))
    one_line_error(invoke(["evaluate", "--model", str(out), "--index",
                           str(runs["index"] / "val.jsonl")]), "file must be a .torchscript")
    cascade["version"] = 99
    (out / "cascade.json").write_text(json.dumps(cascade))
    one_line_error(invoke(["predict", image, "--model", str(out)]), "version 99")


# ----------------------------------------------------------------------------- the graph


@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("weights", ["scales", "equal"])
def test_the_flip_test_in_a_graph_is_deeppose_flip_test(uncertainty, weights):
    """StageGraph's in-graph flip test (torch) gives what FlipAveraged (NumPy) gives on the
    same network, log scales included: one formula, two array modules."""
    import torch

    from deeppose_cli.core.cascade import StageModel, flip_averaged
    from deeppose_cli.core.weights import parameter_shapes
    from deeppose_cli.engines.export_graph import graph_outputs, stage_graph
    from deeppose_cli.engines.torch_engine import TorchPredictor

    meta = {"num_joints": 14, "input_size": 67, "width": 0.0625, "batch_norm": True,
            "uncertainty": uncertainty}
    rng = np.random.default_rng(0)
    params = {name: (rng.standard_normal(shape) * (0.3 if len(shape) > 1 else 0.5)
                     + (1.5 if name.endswith("avg_var") else 0.0)).astype(np.float32)
              for name, shape in parameter_shapes(**meta).items()}
    perm = MANIFEST.flip_permutation
    graph = stage_graph(params, meta, perm, True, weights)
    plain = stage_graph(params, meta, perm, False)
    x = torch.from_numpy(rng.standard_normal((4, 3, 67, 67)).astype(np.float32))
    got = graph_outputs(graph, x)
    reference = flip_averaged(StageModel(1, "pytorch", TorchPredictor(plain.network,
                                                                      torch.device("cpu"))),
                              perm, weights).predictor(x.numpy())
    np.testing.assert_allclose(got[0], reference.coords, atol=1e-5)
    assert len(got) == (2 if uncertainty else 1)
    if uncertainty:
        np.testing.assert_allclose(got[1], reference.log_scales, atol=1e-4)
        # the two views disagree: otherwise weighting could not be told from the mean
        assert np.abs(graph_outputs(plain, x)[1] - graph_outputs(plain, x.flip(3))[1]
                      [:, perm]).max() > 0.1
    assert np.abs(got[0] - graph_outputs(plain, x)[0]).max() > 1e-3


def test_cascade_json_is_read_back_checked(tmp_path):
    from deeppose_cli.core.exports import read_export

    with pytest.raises(DeepPoseError, match="no cascade.json"):
        read_export(tmp_path)
    (tmp_path / "cascade.json").write_text("[]")
    with pytest.raises(DeepPoseError, match="not a deeppose export description"):
        read_export(tmp_path)


# ----------------------------------------------------------------------------- the docs


def docs_example() -> dict:
    """The functions of docs/export.md's example of running an export without deeppose
    (its last lines, which read a photo, left out)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    start = text.index("```python\n", text.index("## Running an export without deeppose"))
    code = text[start + len("```python\n"):text.index("```", start + 3)]
    code = code[:code.index("spec, sessions = load_export(")]
    namespace: dict = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_the_docs_example_runs_an_export_as_deeppose_does(runs, exports):
    """NumPy, OpenCV and onnxruntime alone, reading cascade.json, give deeppose's joints
    (the default export: stage 1 of this run plain, stages 2-3 with the flip test inside)."""
    needs_onnx()
    example = docs_example()
    images, boxes = val_images(runs)
    out = exports("ch3")
    spec, sessions = example["load_export"](out)
    mine = np.stack([example["predict_joints"](spec, sessions, image, box)
                     for image, box in zip(images, boxes)])
    assert_same_joints(cascade_joints(runs["ch3"], images, boxes)[-1:], [mine], "docs example")
