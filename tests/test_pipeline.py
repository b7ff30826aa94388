import numpy as np
import pytest

from deeppose_cli.core.records import PoseRecord
from deeppose_cli.core.geometry import (crop_and_resize, flip_image, flip_normalized,
                                   normalize_pose, normalized_to_crop_pixels, person_box)
from deeppose_cli.core.manifests import load_dataset_manifest
from deeppose_cli.core.images import IMAGE_MEAN, IMAGE_STD, to_network_input
from deeppose_cli.data.pipeline import (Augmentation, ImageCache, PoseDataset, epoch_order,
                                        jitter_box, make_sample)

PERM = load_dataset_manifest("lsp").flip_permutation


@pytest.fixture
def records(tmp_path):
    """Three images, each with 14 bright dots exactly at the joints."""
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        image = np.zeros((120, 100, 3), dtype=np.uint8)
        joints = rng.uniform(20, 80, (14, 2)).round()
        for x, y in joints.astype(int):
            image[y, x] = 255
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), image)
        visible = np.ones(14, dtype=bool)
        visible[3] = False
        out.append(PoseRecord(id=str(i), image=path, joints=joints, visible=visible,
                              box=person_box(joints, visible, 0.2)))
    return out


def test_sample_shapes_and_types(records):
    ds = PoseDataset(records, 67, PERM)
    image, joints, visible = ds[0]
    assert image.shape == (3, 67, 67) and image.dtype == np.float32
    assert joints.shape == (14, 2) and joints.dtype == np.float32
    assert visible.dtype == np.float32 and visible[3] == 0 and visible.sum() == 13


def test_evaluation_samples_have_no_randomness(records):
    ds = PoseDataset(records, 67, PERM, Augmentation.none(), seed=0)
    a = ds.get(1, epoch=0)
    b = ds.get(1, epoch=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_same_seed_same_samples_other_seed_or_epoch_differs(records):
    aug = Augmentation(0.1, 0.2, True, 0.2)
    first = PoseDataset(records, 67, PERM, aug, seed=7)
    second = PoseDataset(records, 67, PERM, aug, seed=7)
    for i in range(3):
        for x, y in zip(first.get(i, 2), second.get(i, 2)):
            np.testing.assert_array_equal(x, y)
    other_seed = PoseDataset(records, 67, PERM, aug, seed=8)
    assert not all(np.array_equal(first.get(i, 2)[1], other_seed.get(i, 2)[1]) for i in range(3))
    assert not all(np.array_equal(first.get(i, 2)[1], first.get(i, 3)[1]) for i in range(3))


def test_cached_images_give_the_same_samples_and_stay_within_budget(records, monkeypatch):
    import deeppose_cli.data.pipeline as pipeline

    aug = Augmentation(0.1, 0.2, True, 0.2, rotation=20.0, occlusion=0.5)
    plain = PoseDataset(records, 67, PERM, aug, seed=3)
    one_image = 120 * 100 * 3
    cache = ImageCache(2 * one_image + one_image // 2)  # room for two of the three images
    cached = PoseDataset(records, 67, PERM, aug, seed=3, images=cache)
    expected = [[plain.get(i, epoch) for i in range(3)] for epoch in range(3)]
    decodes = []
    real_load = pipeline.read_rgb
    monkeypatch.setattr(pipeline, "read_rgb", lambda path: decodes.append(path) or real_load(path))
    for epoch in range(3):
        for i in range(3):
            for x, y in zip(expected[epoch][i], cached.get(i, epoch)):
                np.testing.assert_array_equal(x, y)
    assert cache.used_bytes == 2 * one_image <= cache.budget_bytes
    assert sorted(cache.images) == [str(records[0].image), str(records[1].image)]
    # images 0 and 1 are decoded once; image 2, past the budget, every epoch
    assert [str(p) for p in decodes] == [str(records[i].image) for i in (0, 1, 2, 2, 2)]
    assert all(not image.flags.writeable for image in cache.images.values())
    assert ImageCache.of_gib(0) is None


def test_sample_key_selects_the_randomness(records):
    ds = PoseDataset(records, 67, PERM, Augmentation(0.1, 0.2, True, 0.0), seed=1)
    np.testing.assert_array_equal(ds[(4, 2)][1], ds.get(2, 4)[1])
    np.testing.assert_array_equal(ds[2][1], ds.get(2, 0)[1])  # a plain index: epoch 0


@pytest.mark.parametrize("aug", [Augmentation.none(), Augmentation(0.1, 0.2, False, 0.0),
                                 Augmentation(0.1, 0.2, True, 0.0)])
def test_augmented_labels_still_point_at_the_dots(records, aug):
    """Whatever jitter/flip did to the crop, each visible joint's label sits on its dot."""
    ds = PoseDataset(records, 227, PERM, aug, seed=3)
    for epoch in range(4):
        for i in range(3):
            image, joints, visible = ds.get(i, epoch)
            # undo the ImageNet normalization of channel 0 to find bright pixels
            red = image[0] * 0.229 + 0.485
            for (u, v), vis in zip(normalized_to_crop_pixels(joints, 227), visible):
                if not vis:
                    continue
                r, c = int(round(v)), int(round(u))
                patch = red[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3]
                assert patch.max() > 0.1, (epoch, i, u, v)


def test_flip_happens_about_half_the_time(records):
    ds = PoseDataset(records, 67, PERM, Augmentation(0.0, 0.0, True, 0.0), seed=0)
    plain = PoseDataset(records, 67, PERM, Augmentation.none(), seed=0)
    flips = sum(not np.array_equal(ds.get(0, e)[0], plain.get(0, 0)[0]) for e in range(40))
    assert 10 < flips < 30


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, epoch_order(50, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=1))


def test_network_input_normalization():
    crop = np.full((4, 4, 3), 255, dtype=np.uint8)
    x = to_network_input(crop)
    assert x.shape == (3, 4, 4)
    np.testing.assert_allclose(x[:, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6)


def unfused_input(crop, gain, shift):
    """The reference maths: normalize in float32, then colour gain and shift, per channel."""
    x = ((crop.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1)
    return (x * np.reshape(gain, (3, 1, 1)) + np.reshape(shift, (3, 1, 1))).astype(np.float32)


def test_fused_colour_noise_matches_normalize_then_noise_then_flip():
    rng = np.random.default_rng(5)
    crop = rng.integers(0, 256, (31, 29, 3), dtype=np.uint8)
    gain, shift = 1.0 + rng.uniform(-0.2, 0.2, 3), rng.uniform(-0.2, 0.2, 3)
    x = to_network_input(crop, gain, shift)
    assert x.dtype == np.float32 and x.shape == (3, 31, 29) and x.flags.c_contiguous
    np.testing.assert_allclose(x, unfused_input(crop, gain, shift), atol=1e-5, rtol=0)
    flipped = to_network_input(flip_image(crop), gain, shift)
    np.testing.assert_allclose(flipped, unfused_input(crop, gain, shift)[:, :, ::-1],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(to_network_input(crop), unfused_input(crop, np.ones(3), np.zeros(3)),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("box", [[61.3, 47.9, 80.0, 80.0], [20.0, 90.0, 150.0, 110.0]])
def test_flipped_warp_equals_flipped_crop(box):
    """Mirroring inside the warp gives the mirrored crop, up to interpolation rounding."""
    image = np.random.default_rng(6).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    flipped = crop_and_resize(image, np.array(box), 57, flip=True).astype(int)
    expected = flip_image(crop_and_resize(image, np.array(box), 57)).astype(int)
    assert np.abs(flipped - expected).max() <= 1


def test_make_sample_matches_the_unfused_pipeline_draw_for_draw(records):
    """Same generator seed, same jitter, flip and colour draws as crop -> flip -> normalize ->
    noise done step by step, so samples stay a function of (seed, epoch, index)."""
    import cv2

    aug = Augmentation(0.1, 0.2, True, 0.2)
    record = records[0]
    image = cv2.cvtColor(cv2.imread(str(record.image)), cv2.COLOR_BGR2RGB)
    flips = 0
    for seed in range(8):
        x, joints, visible = make_sample(image, record.box, record.joints, record.visible, 67,
                                         aug, np.random.default_rng(seed), PERM)
        rng = np.random.default_rng(seed)
        box = jitter_box(record.box, aug, rng)
        crop = crop_and_resize(image, box, 67)
        want_joints, want_visible = normalize_pose(record.joints, box), record.visible
        if rng.random() < 0.5:
            flips += 1
            crop = flip_image(crop)
            want_joints, want_visible = flip_normalized(want_joints, want_visible, PERM)
        gain = 1.0 + rng.uniform(-0.2, 0.2, 3)
        shift = rng.uniform(-0.2, 0.2, 3)
        np.testing.assert_allclose(joints, want_joints, atol=1e-6)
        np.testing.assert_array_equal(visible, want_visible)
        # one grey level of warp rounding, at most, where the flip moved into the warp
        one_level = gain.max() / (255.0 * IMAGE_STD.min())
        np.testing.assert_allclose(x, unfused_input(crop, gain, shift), atol=one_level + 1e-5,
                                   rtol=0)
    assert 0 < flips < 8


def test_jitter_off_epochs_crop_the_exact_box_and_keep_flip_and_colour(records):
    """From ``jitter_off_epoch`` on a sample is the one the jitter-free augmentation draws for
    the same key; before it, the recipe's own augmentation's."""
    aug = Augmentation(0.1, 0.2, True, 0.2, rotation=20.0)
    scheduled = PoseDataset(records, 67, PERM, aug, seed=3, jitter_off_epoch=4)
    jittered = PoseDataset(records, 67, PERM, aug, seed=3)
    plain = PoseDataset(records, 67, PERM, aug.without_jitter(), seed=3)
    assert plain.aug.flip and plain.aug.colour_noise == 0.2
    assert (plain.aug.jitter_translation, plain.aug.jitter_scale, plain.aug.rotation) == (0, 0, 0)
    for i in range(3):
        for epoch, expected in ((3, jittered), (4, plain), (9, plain)):
            for x, y in zip(scheduled.get(i, epoch), expected.get(i, epoch)):
                np.testing.assert_array_equal(x, y)
    # Without jitter the targets are the evaluation's (mirrored when the draw flips).
    evaluation = PoseDataset(records, 67, PERM, Augmentation.none())
    for i in range(3):
        joints = scheduled.get(i, 5)[1]
        expected, expected_visible = evaluation.get(i)[1:]
        mirrored = flip_normalized(expected, expected_visible, PERM)[0]
        assert (np.allclose(joints, expected, atol=1e-5)
                or np.allclose(joints, mirrored, atol=1e-5))
    assert not any(np.allclose(scheduled.get(i, 3)[1], evaluation.get(i)[1], atol=1e-3)
                   for i in range(3))


@pytest.mark.parametrize("epochs, max_iterations, fraction, expected", [
    (10, None, 0.0, None), (10, None, 0.2, 8), (10, None, 1.0, 0), (220, None, 0.1, 198),
    (10, 25, 0.2, 2),  # 25 of 10-iteration epochs: the last 5 iterations are epoch 2's
])
def test_jitter_off_epoch_follows_the_iterations_that_will_run(epochs, max_iterations, fraction,
                                                               expected):
    from deeppose_cli.training.stages import jitter_off_epoch

    recipe = {"batch_size": 4, "epochs": epochs, "max_iterations": max_iterations,
              "jitter_off_fraction": fraction}
    assert jitter_off_epoch(recipe, 40) == expected


def test_the_engines_device_normalization_equals_the_host_path(synthetic_dataset):
    """Loaders move uint8 crops with their per-channel scale and bias; each engine
    normalizes them on its device with the host path's float32 arithmetic, bit for bit
    (augmented samples, so every sample has its own colour noise)."""
    import torch

    from deeppose_cli.data.annotations import read_index
    from deeppose_cli.data.pipeline import collate_raw, normalized_batch
    from deeppose_cli.engines import chainer_engine, torch_engine

    _, index_dir = synthetic_dataset
    records = read_index(index_dir / "train.jsonl")[:6]
    dataset = PoseDataset(records, 67, list(range(14)),
                          Augmentation(colour_noise=0.2, rotation=10.0), seed=3)
    raw = collate_raw([dataset.raw(i, epoch=2) for i in range(6)])
    host = normalized_batch(raw)
    assert host.dtype == np.float32 and host.shape == (6, 3, 67, 67)
    np.testing.assert_array_equal(host, np.stack([dataset.get(i, 2)[0] for i in range(6)]))
    as_tensors = type(raw)(*(torch.from_numpy(a) for a in raw))
    x, joints, visible = torch_engine.normalize_on_device(as_tensors, torch.device("cpu"))
    np.testing.assert_array_equal(x.numpy(), host)
    np.testing.assert_array_equal(joints.numpy(), raw.joints)
    x, _, _ = chainer_engine.normalize_on_device(raw, chainer_engine.get_device("cpu"))
    np.testing.assert_array_equal(x, host)
    assert raw.crops.dtype == np.uint8  # a quarter of the float bytes travel
