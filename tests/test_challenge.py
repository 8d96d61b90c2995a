"""MICO challenge construction: split invariants, determinism, bundle round trip."""

import os

import numpy as np
import pytest

from mico_jax import challenge as challenge_lib

N, n, m, K = 1000, 500, 50, 6


@pytest.fixture(name="chal")
def _chal():
  seeds = challenge_lib.make_seeds(3, K)
  return challenge_lib.make_challenge(N, n, m, seeds)


def test_split_invariants(chal):
  assert chal.challenge_KxC.shape == (K, 2 * m)
  assert chal.train_KxT.shape == (K, n)
  assert chal.eval_KxE.shape == (K, N - n - m)
  for k in range(K):
    members = set(chal.challenge_KxC[k][chal.member_KxC[k]])
    nonmembers = set(chal.challenge_KxC[k][~chal.member_KxC[k]])
    train, evaluation = set(chal.train_KxT[k]), set(chal.eval_KxE[k])
    assert len(members) == len(nonmembers) == m
    assert not members & nonmembers
    assert members <= train
    assert not nonmembers & train
    assert not evaluation & (train | nonmembers | members)
    assert len(train) == n  # no repeats
    # MICO's training set is members first, then the rest.
    assert set(chal.train_KxT[k][:m]) == members


def test_keep_matrix(chal):
  keep = chal.keep_KxN
  assert keep.shape == (K, N) and keep.sum(1).tolist() == [n] * K
  rows = np.arange(K)[:, None]
  np.testing.assert_array_equal(keep[rows, chal.challenge_KxC], chal.member_KxC)
  assert not (keep & chal.eval_mask_KxN).any()


def test_same_seeds_same_splits_and_different_seeds_differ(chal):
  again = challenge_lib.make_challenge(N, n, m, challenge_lib.make_seeds(3, K))
  np.testing.assert_array_equal(again.train_KxT, chal.train_KxT)
  np.testing.assert_array_equal(again.member_KxC, chal.member_KxC)
  other = challenge_lib.make_challenge(N, n, m, challenge_lib.make_seeds(4, K))
  assert (other.challenge_KxC != chal.challenge_KxC).any()
  # Each seed drives its own split: changing the membership seed alone keeps
  # the challenge points and the non-challenge training points.
  seeds = chal.seeds_Kx3.copy()
  seeds[:, 2] += 1
  flipped = challenge_lib.make_challenge(N, n, m, seeds)
  np.testing.assert_array_equal(flipped.challenge_KxC, chal.challenge_KxC)
  np.testing.assert_array_equal(flipped.train_KxT[:, m:], chal.train_KxT[:, m:])
  assert (flipped.member_KxC != chal.member_KxC).any()


def test_phases_follow_mico_proportions():
  assert challenge_lib.mico_phases(200).count("train") == 100
  assert challenge_lib.mico_phases(200).count("dev") == 50
  assert challenge_lib.mico_phases(5) == ("train", "train", "dev", "final",
                                          "final")


@pytest.mark.parametrize("sizes,match", [
    ((100, 60, 50), "needs 110 points"),
    ((100, 40, 0), "m must be >= 1"),
    ((100, 40, 40), "must exceed"),
])
def test_impossible_sizes_are_refused(sizes, match):
  with pytest.raises(challenge_lib.ChallengeError, match=match):
    challenge_lib.make_challenge(*sizes, challenge_lib.make_seeds(0, 2))


def test_bundle_round_trip(chal, tmp_path):
  predictions = np.random.default_rng(0).random((K, 2 * m))
  challenge_lib.write_bundle(str(tmp_path), "inf", chal, predictions)
  assert os.path.exists(tmp_path / "inf" / "train" / "model_0" / "solution.csv")
  assert os.path.exists(tmp_path / "inf" / "final" / f"model_{K - 1}"
                        / "seed_membership")
  back, back_predictions = challenge_lib.read_bundle(str(tmp_path), "inf", N, n,
                                                     m)
  np.testing.assert_array_equal(back.seeds_Kx3, chal.seeds_Kx3)
  np.testing.assert_array_equal(back.member_KxC, chal.member_KxC)
  assert back.phases == chal.phases
  np.testing.assert_array_equal(back_predictions, predictions)
  solution = np.loadtxt(tmp_path / "inf" / "dev" / f"model_{K // 2}"
                        / "solution.csv")
  np.testing.assert_array_equal(solution, chal.member_KxC[K // 2])


def test_bundle_refuses_predictions_outside_unit_interval(chal, tmp_path):
  with pytest.raises(challenge_lib.ChallengeError, match=r"\[0, 1\]"):
    challenge_lib.write_bundle(str(tmp_path), "inf", chal,
                               np.full((K, 2 * m), 1.5))
