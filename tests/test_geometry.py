import numpy as np
import pytest

from deeppose_cli.core import geometry as g
from deeppose_cli.core.manifests import load_dataset_manifest


def test_normalize_round_trip():
    rng = np.random.default_rng(0)
    joints = rng.uniform(0, 300, (5, 14, 2))
    boxes = np.concatenate([rng.uniform(50, 250, (5, 2)), rng.uniform(20, 200, (5, 2))], axis=1)
    n = g.normalize_pose(joints, boxes)
    np.testing.assert_allclose(g.denormalize_pose(n, boxes), joints, atol=1e-9)


def test_normalize_matches_definition():
    box = np.array([100.0, 50.0, 40.0, 20.0])
    joints = np.array([[120.0, 40.0], [100.0, 50.0]])
    np.testing.assert_allclose(g.normalize_pose(joints, box), [[0.5, -0.5], [0.0, 0.0]])


def test_person_box_is_square_with_margin_and_ignores_invisible():
    joints = np.array([[10.0, 20.0], [30.0, 100.0], [500.0, 500.0]])
    box = g.person_box(joints, np.array([1, 1, 0]), margin=0.25)
    np.testing.assert_allclose(box, [20.0, 60.0, 120.0, 120.0])
    with pytest.raises(ValueError):
        g.person_box(joints, np.zeros(3))


def test_flip_twice_is_identity_and_swaps_left_right():
    manifest = load_dataset_manifest("lsp")
    perm = manifest.flip_permutation
    rng = np.random.default_rng(1)
    joints = rng.uniform(-0.5, 0.5, (14, 2))
    visible = rng.integers(0, 2, 14)
    once, vis_once = g.flip_normalized(joints, visible, perm)
    twice, vis_twice = g.flip_normalized(once, vis_once, perm)
    np.testing.assert_allclose(twice, joints)
    np.testing.assert_array_equal(vis_twice, visible)
    names = manifest.joint_names
    r_wrist, l_wrist = names.index("right_wrist"), names.index("left_wrist")
    # the mirrored right wrist becomes the left wrist of the flipped person
    np.testing.assert_allclose(once[l_wrist], [-joints[r_wrist, 0], joints[r_wrist, 1]])
    assert vis_once[l_wrist] == visible[r_wrist]
    head = names.index("head_top")
    np.testing.assert_allclose(once[head], [-joints[head, 0], joints[head, 1]])


@pytest.mark.parametrize("box", [[80.0, 60.0, 100.0, 100.0], [47.3, 91.2, 63.0, 63.0],
                                 [120.0, 150.0, 300.0, 300.0]])
def test_crop_maps_a_drawn_dot_where_the_normalized_joint_says(box):
    """A dot drawn at a joint ends up in the crop where normalize_pose says it is."""
    box = np.array(box)
    size = 64
    joint = np.array([box[0] + 0.23 * box[2], box[1] - 0.31 * box[3]])
    # a small Gaussian dot, wide enough to survive the resize, centred exactly on the joint
    ys, xs = np.mgrid[0:200, 0:240]
    spread = max(1.0, box[2] / size)
    image = np.exp(-((xs - joint[0]) ** 2 + (ys - joint[1]) ** 2) / (2 * spread ** 2))
    image = image.astype(np.float32)
    crop = g.crop_and_resize(image, box, size)
    uv = g.normalized_to_crop_pixels(g.normalize_pose(joint[None], box)[0], size)
    ys, xs = np.mgrid[0:size, 0:size]
    mass = crop.sum()
    assert mass > 0
    centroid = np.array([(crop * xs).sum() / mass, (crop * ys).sum() / mass])
    np.testing.assert_allclose(centroid, uv, atol=0.1)


def test_flipped_crop_matches_flipped_normalized_coordinates():
    box = np.array([50.5, 50.5, 64.0, 64.0])  # scale 1, joint lands on a pixel centre
    image = np.zeros((100, 100), dtype=np.float32)
    image[40, 30] = 1.0
    crop = g.flip_image(g.crop_and_resize(image, box, 64)[..., None])[..., 0]
    n = g.normalize_pose(np.array([[30.0, 40.0]]), box)
    flipped, _ = g.flip_normalized(n, np.ones(1), [0])
    v, u = np.unravel_index(np.argmax(crop), crop.shape)
    np.testing.assert_allclose([u, v], g.normalized_to_crop_pixels(flipped[0], 64), atol=1e-6)


def test_crop_pixel_round_trip():
    n = np.array([[-0.5, 0.25], [0.1, 0.0]])
    np.testing.assert_allclose(g.crop_pixels_to_normalized(g.normalized_to_crop_pixels(n, 227), 227), n)


def test_joint_boxes_and_torso_diameter():
    joints = np.zeros((2, 14, 2))
    joints[:, 9] = [0.0, 0.0]
    joints[:, 2] = [3.0, 4.0]
    diameter = g.torso_diameter(joints, (9, 2))
    np.testing.assert_allclose(diameter, [5.0, 5.0])
    boxes = g.joint_boxes(joints, diameter, sigma=2.0)
    assert boxes.shape == (2, 14, 4)
    np.testing.assert_allclose(boxes[0, 2], [3.0, 4.0, 10.0, 10.0])


def test_xywh_round_trip():
    np.testing.assert_allclose(g.box_to_xywh(g.box_from_xywh(3, 4, 10, 20)), [3, 4, 10, 20])
