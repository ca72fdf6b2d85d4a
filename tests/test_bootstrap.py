"""Bootstrap intervals: they cover a known mean at about their level, paired differences see through shared spread,
and the balanced landmark NME's interval resamples within |yaw| buckets."""

import numpy as np
import pytest

from lightning_vrn.metrics.bootstrap import bootstrap_mean, seeds_and_faces_difference, seeds_and_faces_mean, verdict


def paired_difference(values, reference, **options):
    """The faces-only paired difference: one training of each method."""
    return seeds_and_faces_difference(np.asarray(values)[None], np.asarray(reference)[None], **options)


def balanced_mean(values, yaw_deg, **options):
    """The mean of the |yaw| buckets' means (0-30, 30-60, 60+ degrees), faces drawn within each bucket."""
    return seeds_and_faces_mean(np.asarray(values)[None], strata=np.digitize(np.abs(yaw_deg), [30, 60]), **options)


def test_the_interval_covers_a_known_mean_at_about_its_level():
    rng = np.random.default_rng(1)
    covered = 0
    trials = 300
    for trial in range(trials):
        values = rng.gamma(2.0, 0.05, size=80)  # skewed like NMEs; true mean 0.1
        interval = bootstrap_mean(values, resamples=1000, seed=trial)
        covered += interval.low <= 0.1 <= interval.high
    assert 0.90 <= covered / trials <= 0.98  # nominal 0.95; the percentile bootstrap runs a little narrow


def test_a_paired_difference_sees_a_small_shift_that_unpaired_intervals_miss():
    rng = np.random.default_rng(2)
    faces = rng.gamma(2.0, 0.05, size=100)  # per-face difficulty both methods share
    a = faces + rng.normal(0, 0.002, size=100)
    b = faces + 0.004 + rng.normal(0, 0.002, size=100)
    assert bootstrap_mean(a).high > bootstrap_mean(b).low  # separately, the intervals overlap
    difference = paired_difference(b, a)
    assert verdict(difference) == "worse" and difference.estimate == pytest.approx(0.004, abs=0.001)
    same = paired_difference(a + rng.normal(0, 0.002, size=100), a)
    assert verdict(same) == "within noise"  # no real difference


def test_failed_samples_are_left_out_pairwise():
    a = np.array([0.1, 0.2, np.nan, 0.4])
    b = np.array([0.2, np.nan, 0.3, 0.5])
    assert paired_difference(b, a).estimate == pytest.approx(0.1)  # samples 0 and 3 only
    assert bootstrap_mean(a).estimate == pytest.approx(0.7 / 3)
    with pytest.raises(ValueError, match="same faces"):
        paired_difference(a, a[:3])


def test_the_balanced_mean_is_the_mean_of_bucket_means_and_its_interval_resamples_within_each_bucket():
    rng = np.random.default_rng(3)
    yaw_deg = np.r_[rng.uniform(-29, 29, 30), rng.uniform(31, 59, 12), rng.uniform(-89, -61, 4)]
    values = np.r_[rng.gamma(2.0, 0.02, 30), rng.gamma(2.0, 0.03, 12), rng.gamma(2.0, 0.05, 4)]
    interval = balanced_mean(values, yaw_deg, resamples=500)
    assert interval.estimate == pytest.approx(np.mean([values[:30].mean(), values[30:42].mean(), values[42:].mean()]))
    assert interval.low < interval.estimate < interval.high
    # Resampled within buckets, the 4 profile faces keep their weight of a third: a plain bootstrap would not.
    profile = balanced_mean(np.r_[values[:42], values[42:] + 1.0], yaw_deg, resamples=500)
    assert profile.low > interval.high and profile.estimate == pytest.approx(interval.estimate + 1 / 3)
    frontal = balanced_mean(values[:30], yaw_deg[:30], resamples=500)  # empty buckets are left out
    assert frontal.estimate == pytest.approx(values[:30].mean())


def paired_trainings(rng, training_sd: float, face_sd: float, shift: float = 0.0, trainings: int = 3,
                     faces: int = 190) -> np.ndarray:
    """(trainings, faces) differences between two methods: a true ``shift``, each training pair's own offset (sd
    ``training_sd`` per training), a per-face difference shared by the trainings and one that is not."""
    shared = rng.normal(0, 0.7 * face_sd, faces)
    offsets = rng.normal(0, training_sd * np.sqrt(2), (trainings, 1))
    return shift + offsets + shared + rng.normal(0, 0.7 * face_sd, (trainings, faces))


@pytest.mark.parametrize("training_sd", [0.0, 0.005])
def test_with_no_true_difference_the_two_level_verdict_is_within_noise_about_95_percent_of_the_time(training_sd):
    rng = np.random.default_rng(4)
    verdicts = [verdict(seeds_and_faces_difference(paired_trainings(rng, training_sd, 0.09), np.zeros((3, 190)),
                                                   resamples=1000, seed=trial)) for trial in range(300)]
    assert 0.92 <= verdicts.count("within noise") / len(verdicts) <= 0.98


def test_a_known_difference_is_found_and_named():
    rng = np.random.default_rng(5)
    worse = paired_trainings(rng, 0.003, 0.09, shift=0.03)
    assert verdict(seeds_and_faces_difference(worse, np.zeros_like(worse))) == "worse"
    assert verdict(seeds_and_faces_difference(np.zeros_like(worse), worse)) == "better"
    assert seeds_and_faces_mean(worse).estimate == pytest.approx(worse.mean())


def test_the_two_level_interval_is_wider_than_the_faces_only_one_when_trainings_differ():
    rng = np.random.default_rng(6)
    faces = rng.gamma(2.0, 0.05, size=190)
    same = np.tile(faces, (3, 1))
    differing = same + np.array([[-0.02], [0.0], [0.02]])
    faces_only = bootstrap_mean(differing.mean(axis=0))
    two_level = seeds_and_faces_mean(differing)
    assert two_level.estimate == pytest.approx(faces_only.estimate)
    assert two_level.high - two_level.low > 1.5 * (faces_only.high - faces_only.low)
    # Identical trainings add nothing: the interval is the faces-only one's width.
    assert seeds_and_faces_mean(same).high - seeds_and_faces_mean(same).low == pytest.approx(
        faces_only.high - faces_only.low, rel=0.15)


def test_two_level_statistics_leave_failed_cells_out_and_refuse_unpaired_tables():
    values = np.array([[0.1, np.nan, 0.3], [0.2, 0.2, np.nan]])
    assert seeds_and_faces_mean(values).estimate == pytest.approx(0.2)
    one = seeds_and_faces_mean(values[:1])
    assert one.estimate == pytest.approx(0.2) and one.low >= 0.1 and one.high <= 0.3
    with pytest.raises(ValueError, match="same faces"):
        seeds_and_faces_difference(values, values[:, :2])
    with pytest.raises(ValueError, match="seeds, faces"):
        seeds_and_faces_mean(np.ones(4))


def test_two_level_strata_balance_the_buckets_and_unequal_trainings_are_drawn_apart():
    rng = np.random.default_rng(7)
    strata = np.r_[np.zeros(150), np.ones(10)]   # many frontal faces, few profile ones
    values = np.r_[rng.gamma(2.0, 0.02, 150), 1.0 + rng.gamma(2.0, 0.02, 10)][None].repeat(3, 0)
    values += rng.normal(0, 0.002, values.shape)
    balanced = seeds_and_faces_mean(values, strata=strata)
    assert balanced.estimate == pytest.approx(0.5 * (values[:, :150].mean() + values[:, 150:].mean()))
    assert balanced.low < balanced.estimate < balanced.high < 0.6   # the profile bucket keeps its half weight
    two, five = values[:2], np.r_[values, values[:2]] + 0.01
    difference = seeds_and_faces_difference(five, two)   # 5 trainings against 2: drawn apart, faces shared
    assert difference.estimate == pytest.approx(five.mean() - two.mean())
    assert verdict(difference) == "worse"
