"""The built-in visual world and its checker: determinism, ground truth, captions, and
the checker's accuracy on rendered scenes (it scores generation, so it must be right)."""

from __future__ import annotations

import pytest
import torch
from tessera.modalities.world.checker import check_image, check_video, read_image, read_video
from tessera.modalities.world.visual import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    render_image,
    render_video,
    sample_image_scene,
    sample_video_scene,
)


def test_palette_is_well_separated() -> None:
    objects = torch.tensor(list(COLOURS.values()))
    backgrounds = torch.tensor(list(BACKGROUNDS.values()))
    d = torch.cdist(objects, objects) + torch.eye(len(objects)) * 9
    assert len(COLOURS) >= 8 and float(d.min()) > 0.35
    bg = torch.cdist(objects, backgrounds)
    names = list(COLOURS)
    for j, b in enumerate(BACKGROUNDS):  # object colours allowed on background b are far from it
        allowed = [i for i, c in enumerate(names) if c != b]
        assert float(bg[allowed, j].min()) > 0.4


def test_scenes_are_deterministic_and_carry_ground_truth() -> None:
    a, b = sample_image_scene(123), sample_image_scene(123)
    assert a == b and a.caption == b.caption
    assert torch.equal(render_image(a), render_image(b))
    assert sample_image_scene(124) != a
    for seed in range(60):
        s = sample_image_scene(seed)
        assert 1 <= len(s.attributes) <= 2 and s.background in BACKGROUNDS
        for o in s.attributes:
            assert o.shape in SHAPES and o.colour in COLOURS and o.position in POSITIONS
            assert o.colour != s.background
            assert o.shape in s.caption and o.colour in s.caption and o.size in s.caption
        assert s.background in s.caption


def test_world_covers_every_attribute() -> None:
    seen = {"shape": set(), "colour": set(), "position": set(), "n": set(), "motion": set()}
    for seed in range(300):
        s = sample_image_scene(seed)
        seen["n"].add(len(s.attributes))
        for o in s.attributes:
            seen["shape"].add(o.shape)
            seen["colour"].add(o.colour)
            seen["position"].add(o.position)
        seen["motion"].update(o.motion for o in sample_video_scene(seed).attributes)
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS)
    assert seen["position"] == set(POSITIONS) and seen["n"] == {1, 2} and seen["motion"] == set(MOTIONS)


def test_render_image_shape_range_and_non_square() -> None:
    img = render_image(sample_image_scene(5), size=(48, 80))
    assert img.shape == (3, 48, 80) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    with pytest.raises(ValueError, match="size="):
        render_image(sample_image_scene(5), size=(4, 64))


def test_checker_reads_rendered_images_at_least_99_percent() -> None:
    n, correct = 200, 0
    for seed in range(50_000, 50_000 + n):
        scene = sample_image_scene(seed)
        correct += check_image(render_image(scene), scene)["all"]
    assert correct / n >= 0.99, f"checker got {correct}/{n} images fully right"


def test_checker_notices_wrong_attributes() -> None:
    scene = next(s for s in map(sample_image_scene, range(100)) if len(s.attributes) == 1)
    img = render_image(scene)
    truth = read_image(img).objects[0]
    wrong_shape = next(s for s in SHAPES if s != truth.shape)
    wrong_colour = next(c for c in COLOURS if c != truth.colour)
    score = check_image(img, [{"shape": wrong_shape, "colour": wrong_colour, "position": truth.position}])
    assert score["shape"] == 0.0 and score["colour"] == 0.0 and score["position"] == 1.0 and score["all"] == 0.0
    empty = torch.tensor(BACKGROUNDS["black"])[:, None, None].expand(3, 64, 64).clone()
    assert read_image(empty).objects == () and check_image(empty, scene)["count"] == 0.0
    assert check_image(empty, scene)["objects"] == 0.0
    two = next(s for s in map(sample_image_scene, range(100)) if len(s.attributes) == 2)
    one_expected = check_image(render_image(two), two.attributes[:1], background=two.background)
    assert one_expected["objects"] == 2.0 and one_expected["count"] == 0.0 and one_expected["shape"] == 1.0


def test_checker_rejects_bad_images() -> None:
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        read_image(torch.zeros(64, 64, 3))
    with pytest.raises(ValueError, match="NaN"):
        read_image(torch.full((3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="at least one expected object"):
        check_image(torch.zeros(3, 64, 64), [])


@pytest.mark.slow
def test_videos_are_deterministic_and_checker_reads_motion() -> None:
    scene = sample_video_scene(3)
    clip = render_video(scene, frames=8)
    assert clip.shape == (8, 3, 64, 64) and torch.equal(clip, render_video(sample_video_scene(3), frames=8))
    n, correct = 12, 0
    for seed in range(70_000, 70_000 + n):
        scene = sample_video_scene(seed)
        correct += check_video(render_video(scene, frames=8), scene)["all"]
    assert correct == n, f"checker got {correct}/{n} clips fully right"
    reversed_clip = render_video(scene, frames=8).flip(0)  # reversed: moving objects change direction
    moving = [o for o in scene.attributes if o.motion == "moving"]
    if moving:
        assert check_video(reversed_clip, scene)["direction"] < 1.0
    assert read_video(clip).background == sample_video_scene(3).background
