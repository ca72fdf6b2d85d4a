"""Renderer: shading against analytic Lambert on a sphere, masks, backgrounds, occluders, albedo features."""

from dataclasses import replace

import numpy as np
import pytest

from data_prep.render import (
    OCCLUDER_SHAPES,
    SCLERA,
    TEETH,
    TEXTURE_KINDS,
    OccluderSettings,
    RenderSettings,
    SkinDetail,
    TextureSettings,
    _in_shadow,
    photographed,
    render,
    texture_image,
    vertex_albedo,
)
from lightning_vrn.geometry.normals import vertex_normals
from lightning_vrn.geometry.pose import model_to_crop
from lightning_vrn.geometry.raster import rasterise

SIZE = 96
CENTRE = np.array([48.0, 48.0, 0.0])
RADIUS = 35.0
POSE = (0.3, -0.4, 0.2)


def model_sphere(num_lat: int = 48, num_lon: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Unit UV sphere in the model frame, triangles counter-clockwise seen from outside (checked here)."""
    polar = np.linspace(0.0, np.pi, num_lat + 1)[:, None]
    azimuth = np.linspace(0.0, 2 * np.pi, num_lon, endpoint=False)[None]
    vertices = np.stack([np.sin(polar) * np.cos(azimuth), np.cos(polar) + 0 * azimuth,
                         np.sin(polar) * np.sin(azimuth)], -1).reshape(-1, 3)
    ring = np.arange(num_lat)[:, None] * num_lon
    a = (ring + np.arange(num_lon)).ravel()
    b = (ring + (np.arange(num_lon) + 1) % num_lon).ravel()
    triangles = np.concatenate([np.stack([a, b, a + num_lon], 1), np.stack([b, b + num_lon, a + num_lon], 1)])
    corners = vertices[triangles]
    outward = np.einsum("tc,tc->t", np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]),
                        corners.mean(1))
    assert (outward >= -1e-12).all() and (outward > 1e-12).sum() > 0.95 * len(triangles)  # poles are degenerate
    return vertices, triangles


@pytest.fixture(scope="module")
def sphere():
    """Posed sphere in crop coordinates: (vertices (V, 3), triangles (T, 3))."""
    vertices, triangles = model_sphere()
    return model_to_crop(vertices, POSE, RADIUS, CENTRE), triangles


def plain_settings(seed: int = 0, **changes) -> RenderSettings:
    """Sampled settings without blur, sensor noise or gamma, so pixel values can be predicted."""
    settings = RenderSettings.sample(np.random.default_rng(seed))
    return replace(settings, blur_sigma=0.0, sensor_noise=0.0, gamma=1.0, **changes)


def uniform_albedo(num_vertices: int, value: float = 0.6) -> np.ndarray:
    return np.full((num_vertices, 3), value)


def test_output_types_and_mask_equals_raster_mask(sphere):
    vertices, triangles = sphere
    settings = RenderSettings.sample(np.random.default_rng(3))
    image, mask = render(vertices, triangles, uniform_albedo(len(vertices)), SIZE, settings)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and mask.dtype == bool
    np.testing.assert_array_equal(mask, rasterise(vertices, triangles, SIZE, SIZE).mask)
    # The sphere's silhouette is a disc of the given radius.
    assert abs(mask.sum() - np.pi * RADIUS**2) < 2 * np.pi * RADIUS


def test_model_frame_ccw_winding_gives_normals_towards_the_camera(sphere):
    vertices, triangles = sphere
    normals = vertex_normals(vertices, triangles)
    outward = (vertices - CENTRE) / RADIUS
    assert np.einsum("vc,vc->v", normals, outward).min() > 0.99
    assert normals[vertices[:, 2].argmin(), 2] < -0.99  # the nearest point faces the camera (-z)


def test_background_pixels_are_the_background_texture(sphere):
    vertices, triangles = sphere
    settings = plain_settings(1)
    image, mask = render(vertices, triangles, uniform_albedo(len(vertices)), SIZE, settings)
    expected = np.round(255 * texture_image(settings.background, SIZE)).astype(np.uint8)
    np.testing.assert_array_equal(image[~mask], expected[~mask])


def test_light_from_behind_leaves_only_ambient(sphere):
    vertices, triangles = sphere
    albedo, ambient = 0.6, 0.3
    front = plain_settings(2, light_direction=np.array([0.0, 0.0, -1.0]), ambient=ambient,
                           light_colour=np.full(3, 0.6))
    behind = replace(front, light_direction=np.array([0.0, 0.0, 1.0]))
    image_front, mask = render(vertices, triangles, uniform_albedo(len(vertices), albedo), SIZE, front)
    image_behind, _ = render(vertices, triangles, uniform_albedo(len(vertices), albedo), SIZE, behind)
    assert image_front[mask].astype(float).mean() > image_behind[mask].astype(float).mean() + 50
    assert np.abs(image_behind[mask].astype(int) - round(255 * albedo * ambient)).max() <= 1


def test_lambert_falloff_matches_cosine_of_the_analytic_normal(sphere):
    vertices, triangles = sphere
    albedo, ambient, light_level = 0.7, 0.15, 0.8
    light = np.array([0.5, -0.4, -0.75])
    light /= np.linalg.norm(light)
    settings = plain_settings(4, light_direction=light, ambient=ambient, light_colour=np.full(3, light_level))
    image, _ = render(vertices, triangles, uniform_albedo(len(vertices), albedo), SIZE, settings)

    rows, cols = np.array([48, 30, 60, 40, 70, 25, 55]), np.array([48, 35, 62, 70, 40, 50, 25])
    dx, dy = cols - CENTRE[0], rows - CENTRE[1]
    normal = np.stack([dx, dy, -np.sqrt(RADIUS**2 - dx**2 - dy**2)], 1) / RADIUS
    cosine = normal @ light
    assert cosine.min() < 0.3 and cosine.max() > 0.9  # the pixels span the falloff
    expected = 255 * albedo * (ambient + light_level * np.maximum(cosine, 0.0))
    np.testing.assert_allclose(image[rows, cols, 0], expected, atol=1.0)
    np.testing.assert_array_equal(image[rows, cols, 0], image[rows, cols, 2])


def test_same_settings_render_identically_and_samples_are_reproducible(sphere):
    vertices, triangles = sphere
    albedo = uniform_albedo(len(vertices))
    settings = RenderSettings.sample(np.random.default_rng(7), occluders=True)
    again = RenderSettings.sample(np.random.default_rng(7), occluders=True)
    first, first_mask = render(vertices, triangles, albedo, SIZE, settings)
    second, second_mask = render(vertices, triangles, albedo, SIZE, again)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first_mask, second_mask)


def test_different_samples_give_different_backgrounds(sphere):
    vertices, triangles = sphere
    albedo = uniform_albedo(len(vertices))
    rng = np.random.default_rng(8)
    images = [render(vertices, triangles, albedo, SIZE, RenderSettings.sample(rng)) for _ in range(3)]
    background = ~images[0][1]
    for (a, _), (b, _) in [(images[0], images[1]), (images[1], images[2]), (images[0], images[2])]:
        assert np.abs(a[background].astype(int) - b[background].astype(int)).mean() > 10


@pytest.mark.parametrize("kind", TEXTURE_KINDS)
def test_texture_kinds_are_in_range_and_not_flat(kind):
    texture = replace(TextureSettings.sample(np.random.default_rng(9)), kind=kind)
    image = texture_image(texture, SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.02


@pytest.mark.parametrize("shape", OCCLUDER_SHAPES)
def test_occluders_hide_part_of_the_face(sphere, shape):
    vertices, triangles = sphere
    albedo = uniform_albedo(len(vertices))
    occluder = replace(OccluderSettings.sample(np.random.default_rng(10)), shape=shape, centre=np.array([0.5, 0.5]))
    plain = plain_settings(11)
    occluded = replace(plain, occluders=[occluder])
    image, mask = render(vertices, triangles, albedo, SIZE, plain)
    image_occluded, mask_occluded = render(vertices, triangles, albedo, SIZE, occluded)
    hidden = mask & ~mask_occluded
    assert not (mask_occluded & ~mask).any()
    assert 0.05 * mask.sum() < hidden.sum() < mask.sum()
    assert np.abs(image_occluded[hidden].astype(int) - image[hidden].astype(int)).mean() > 5
    np.testing.assert_array_equal(image_occluded[mask_occluded], image[mask_occluded])


def test_bad_inputs_raise_clear_errors(sphere):
    vertices, triangles = sphere
    albedo = uniform_albedo(len(vertices))
    settings = plain_settings(12)
    broken = vertices.copy()
    broken[5, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite.*index 5"):
        render(broken, triangles, albedo, SIZE, settings)
    with pytest.raises(ValueError, match="counter-clockwise"):
        render(vertices, triangles[:, ::-1], albedo, SIZE, settings)
    with pytest.raises(ValueError, match="albedo"):
        render(vertices, triangles, albedo[:-1], SIZE, settings)
    with pytest.raises(ValueError, match="triangles"):
        render(vertices, triangles + len(vertices), albedo, SIZE, settings)


# ----------------------------------------------------------------------------- albedo


def face_plane() -> tuple[np.ndarray, np.ndarray]:
    """A flat 1 mm grid in the model x-y plane and (68,) landmark vertex ids on a schematic face."""
    grid = np.arange(-70.0, 70.5, 1.0)
    xx, yy = np.meshgrid(grid, grid)
    vertices = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], 1)

    def ellipse(centre, radii, count):
        angle = np.linspace(0.0, 2 * np.pi, count, endpoint=False)
        return np.stack([centre[0] + radii[0] * np.cos(angle), centre[1] + radii[1] * np.sin(angle)], 1)

    brow = np.stack([np.linspace(-50.0, -15.0, 5), np.full(5, 45.0)], 1)
    landmarks = np.concatenate([
        np.stack([np.linspace(-60, 60, 17), np.full(17, -30.0)], 1),  # jaw (unused)
        brow, brow[::-1] * [-1, 1],                                 # brows 17-21, 22-26
        np.stack([np.zeros(9), np.linspace(30, 0, 9)], 1),          # nose 27-35 (unused)
        ellipse((-32.0, 30.0), (14.0, 5.0), 6),                     # eyes 36-41, 42-47
        ellipse((32.0, 30.0), (14.0, 5.0), 6),
        ellipse((0.0, -35.0), (25.0, 10.0), 12),                    # outer lips 48-59
        ellipse((0.0, -35.0), (18.0, 2.0), 8),                      # inner lips 60-67
    ])
    ids = np.linalg.norm(vertices[None, :, :2] - landmarks[:, None], axis=-1).argmin(1)
    return vertices, ids


def albedo_at(vertices: np.ndarray, albedo: np.ndarray, x: float, y: float) -> np.ndarray:
    """Mean albedo (3,) of vertices within 1.5 mm of model point (x, y)."""
    near = np.linalg.norm(vertices[:, :2] - [x, y], axis=1) <= 1.5
    return albedo[near].mean(0)


def test_vertex_albedo_is_skin_with_noise_and_deterministic():
    vertices, _ = face_plane()
    settings = RenderSettings.sample(np.random.default_rng(13))
    albedo = vertex_albedo(vertices, settings)
    assert albedo.shape == vertices.shape and albedo.min() >= 0.0 and albedo.max() <= 1.0
    np.testing.assert_allclose(albedo.mean(0), settings.skin_tone, atol=0.05)
    assert (albedo.std(0) > 0.005).all()
    np.testing.assert_array_equal(albedo, vertex_albedo(vertices, settings))


def test_vertex_albedo_paints_lips_mouth_eyes_and_brows():
    vertices, landmark_ids = face_plane()
    settings = replace(RenderSettings.sample(np.random.default_rng(14)), skin_tone=np.array([0.8, 0.65, 0.55]),
                       albedo_variation=0.0, albedo_noise=0.0, brow_density=0.9,
                       brow_colour=np.array([0.1, 0.08, 0.06]))
    albedo = vertex_albedo(vertices, settings, landmark_ids)
    skin = albedo_at(vertices, albedo, 40.0, -5.0)  # a cheek
    np.testing.assert_allclose(skin, settings.skin_tone, atol=1e-9)
    lip = albedo_at(vertices, albedo, 0.0, -42.0)
    np.testing.assert_allclose(lip, settings.skin_tone * settings.lip_tint, atol=1e-9)
    assert albedo_at(vertices, albedo, 0.0, -35.0).max() < 0.3 * lip.max()  # mouth opening
    np.testing.assert_allclose(albedo_at(vertices, albedo, -32.0, 30.0), 0.03, atol=0.02)  # pupil
    np.testing.assert_allclose(albedo_at(vertices, albedo, -42.0, 30.0), SCLERA, atol=1e-9)
    assert albedo_at(vertices, albedo, -30.0, 45.0).sum() < 0.5 * skin.sum()  # brow
    # Missing landmarks (-1) skip their feature instead of painting from a wrong vertex.
    no_lips = landmark_ids.copy()
    no_lips[48] = -1
    np.testing.assert_allclose(albedo_at(vertices, vertex_albedo(vertices, settings, no_lips), 0.0, -42.0),
                               settings.skin_tone, atol=1e-9)


def test_the_photographic_camera_draws_last_and_what_it_does_to_an_image():
    basic = RenderSettings.sample(np.random.default_rng(21))
    photographic = RenderSettings.sample(np.random.default_rng(21), camera="photographic")
    for name in ("light_direction", "skin_tone", "noise_seed", "gamma"):
        np.testing.assert_array_equal(getattr(basic, name), getattr(photographic, name))
    assert photographic.white_balance.mean() == pytest.approx(1.0) and 30 <= photographic.jpeg_quality <= 95
    with pytest.raises(ValueError, match="camera must be one of"):
        RenderSettings.sample(np.random.default_rng(0), camera="film")
    # Scaled down 4x and back up, a one-pixel checkerboard averages to grey; JPEG at quality 30 moves pixels.
    checker = np.zeros((32, 32, 3), np.uint8)
    checker[::2, ::2] = checker[1::2, 1::2] = 255
    smoothed = photographed(checker, replace(basic, downscale=4.0))
    assert np.abs(smoothed.astype(float) - 127.5).max() < 20
    assert np.array_equal(photographed(checker, basic), checker)  # the basic camera leaves it as it is
    assert np.abs(photographed(checker, replace(basic, jpeg_quality=30)).astype(float) - checker).mean() > 3


def test_the_face_mask_is_where_the_face_is_in_front_of_the_geometry_rendered_with_it():
    unit_sphere, triangles = model_sphere()
    face = model_to_crop(unit_sphere, (0.0, 0.0, 0.0), 12.0, CENTRE)  # a frontal "face" 24 px across
    ball = model_to_crop(unit_sphere, (0.0, 0.0, 0.0), 6.0, CENTRE + np.array([12.0, 0.0, -20.0]))  # in front, right
    settings = plain_settings(5)
    alone, mask = render(face, triangles, uniform_albedo(len(face)), SIZE, settings)
    both, both_mask = render(np.vstack([face, ball]), np.vstack([triangles, triangles + len(face)]),
                             uniform_albedo(2 * len(face)), SIZE, settings, face_triangles=len(triangles))
    hidden = rasterise(ball, triangles, SIZE, SIZE).mask
    np.testing.assert_array_equal(both_mask, mask & ~hidden)
    assert (mask & hidden).sum() > 40
    np.testing.assert_array_equal(both[~hidden], alone[~hidden])  # elsewhere the image is the face's alone


def test_a_ball_between_the_light_and_a_wall_shadows_exactly_the_wall_behind_it():
    unit_sphere, triangles = model_sphere()
    wall = model_to_crop(unit_sphere, (0.0, 0.0, 0.0), 200.0, CENTRE + [0.0, 0.0, 220.0])  # nearly flat, z = 20 ahead
    ball = model_to_crop(unit_sphere, (0.0, 0.0, 0.0), 8.0, CENTRE + [0.0, 0.0, -5.0])      # 25 px in front of it
    vertices, both = np.vstack([wall, ball]), np.vstack([triangles, triangles + len(wall)])
    raster = rasterise(vertices, both, SIZE, SIZE)
    points = raster.interpolate(vertices, both)[raster.mask & (raster.triangle < len(triangles))]
    assert not _in_shadow(vertices, both, points, np.array([0.0, 0.0, -1.0])).any()  # lit from the camera
    # Lit from 45 degrees to the right: a wall point is in shadow when the ray toward the light meets the ball.
    light = np.array([np.sin(np.pi / 4), 0.0, -np.cos(np.pi / 4)])
    at_ball_depth = points[:, 0] + (points[:, 2] - (CENTRE[2] - 5.0))  # x where that ray crosses the ball's centre z
    miss = np.hypot(at_ball_depth - CENTRE[0], points[:, 1] - CENTRE[1]) / 8.0  # in ball radii (its section is wider)
    shade = _in_shadow(vertices, both, points, light)
    assert (miss < 0.8).sum() > 50 and shade[miss < 0.8].all()
    assert not shade[miss > 1.6].any()


def test_rich_lighting_highlights_where_the_normal_is_halfway_and_grades_the_ambient(sphere):
    vertices, triangles = sphere
    settings = plain_settings(4, light_direction=np.array([0.0, 0.0, -1.0]), light_colour=np.full(3, 0.5),
                              ambient=0.2, skin_tone=np.full(3, 0.5))
    plain, _ = render(vertices, triangles, uniform_albedo(len(vertices), 0.5), SIZE, settings)
    shiny, _ = render(vertices, triangles, uniform_albedo(len(vertices), 0.5), SIZE,
                      replace(settings, specular=0.3, shininess=30.0, shadows=True))
    centre = tuple(np.round(vertices[np.argmin(vertices[:, 2])][:2]).astype(int)[::-1])  # the point facing the camera
    assert int(shiny[centre].max()) - int(plain[centre].max()) > 30  # the highlight, where n = the halfway vector
    assert int(shiny[centre[0], centre[1] + 30].max()) - int(plain[centre[0], centre[1] + 30].max()) <= 2  # off it
    environment = np.array([[0.2, 0.2, 0.2], [0.0, 0.0, 0.0], [-0.2, -0.2, -0.2], [0.0, 0.0, 0.0]])  # bright on top
    graded, _ = render(vertices, triangles, uniform_albedo(len(vertices), 0.5), SIZE,
                       replace(settings, environment=environment, light_colour=np.zeros(3)))
    top, bottom = graded[centre[0] - 25, centre[1]].astype(int), graded[centre[0] + 25, centre[1]].astype(int)
    assert (top - bottom).min() > 10  # y down: a normal pointing up (-y) gets more ambient


def test_rich_lighting_draws_come_last():
    for seed in range(3):
        lambert = RenderSettings.sample(np.random.default_rng(seed))
        rich = RenderSettings.sample(np.random.default_rng(seed), lighting="rich")
        np.testing.assert_array_equal(lambert.light_direction, rich.light_direction)
        assert lambert.background.seed == rich.background.seed and lambert.environment is None
        assert rich.environment.shape == (4, 3) and rich.specular >= 0
    with pytest.raises(ValueError, match="lighting must be one of"):
        RenderSettings.sample(np.random.default_rng(0), lighting="studio")


def test_detailed_skin_paints_teeth_in_an_open_mouth_and_spots_where_asked():
    from data_prep.face_model import load_face_model

    model = load_face_model("builtin")
    still = SkinDetail(pores=0.0, freckles=0, moles=0, blush=0.0, eye_shadow=0.0, shadow_colour=np.zeros(3),
                       stubble=0.0, seed=1)
    settings = RenderSettings.sample(np.random.default_rng(2))
    opened = model.shape(None, np.eye(len(model.expression_names))[model.expression_names.index("mouth_open")])
    for face, mouth_open in ((model.mean, False), (opened, True)):
        plain = vertex_albedo(face, settings, model.landmark_vertices)
        detailed = vertex_albedo(face, replace(settings, skin_detail=still), model.landmark_vertices)
        teeth = (detailed != plain).any(axis=1)
        assert teeth.any() == mouth_open
        np.testing.assert_allclose(detailed[teeth], np.broadcast_to(TEETH, detailed[teeth].shape))
    inner = opened[model.landmark_vertices[60:68]]
    assert (opened[teeth, 1] > inner[:, 1].min()).all() and (opened[teeth, 1] < inner[:, 1].max()).all()
    moles = vertex_albedo(model.mean, replace(settings, skin_detail=replace(still, moles=3)), model.landmark_vertices)
    darker = (vertex_albedo(model.mean, settings, model.landmark_vertices) - moles).sum(axis=1) > 0.3
    assert 3 <= darker.sum() < 200  # three small dark spots


def test_skin_detail_draws_come_last():
    for seed in range(3):
        plain = RenderSettings.sample(np.random.default_rng(seed), lighting="rich")
        detailed = RenderSettings.sample(np.random.default_rng(seed), lighting="rich", skin="detailed")
        np.testing.assert_array_equal(plain.environment, detailed.environment)
        assert plain.skin_detail is None and detailed.skin_detail is not None
    with pytest.raises(ValueError, match="skin must be one of"):
        RenderSettings.sample(np.random.default_rng(0), skin="oily")
