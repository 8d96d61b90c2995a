"""MICO challenge construction: MICO's exact splits, invariants, bundle round trip."""

import hashlib
import os

import numpy as np
import pytest

from mico_jax import challenge as challenge_lib

N, n, m, K = 1000, 500, 50, 6


@pytest.fixture(name="chal")
def _chal():
  seeds = challenge_lib.make_seeds(3, K)
  return challenge_lib.make_challenge(N, n, m, seeds)


def torch_splits(pool_size: int, len_training: int, len_challenge: int,
                 seeds: tuple[int, int, int]):
  """MICO's `ChallengeDataset` splits by torch's own `random_split`.

  Returns the challenge, the training set (members first) and the evaluation
  set as pool indices, independently of mico_jax.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch.utils.data import random_split  # pylint: disable=import-outside-toplevel
  big, m = pool_size, len_challenge
  gen = lambda seed: torch.Generator().manual_seed(int(seed))
  chal, rest = random_split(range(big), [2 * m, big - 2 * m],
                            generator=gen(seeds[0]))
  training, evaluation = random_split(
      rest, [len_training - m, big - len_training - m], generator=gen(seeds[1]))
  _, member = random_split(chal, [m, m], generator=gen(seeds[2]))
  chal_idx, rest_idx = np.asarray(chal.indices), np.asarray(rest.indices)
  return (chal_idx,
          np.concatenate([chal_idx[member.indices],
                          rest_idx[training.indices]]),
          rest_idx[evaluation.indices])


def digest(challenge, train, evaluation) -> str:
  both = np.concatenate([challenge, train, evaluation]).astype("<i8")
  return hashlib.sha256(both.tobytes()).hexdigest()[:16]


# (N, n, m, seeds) -> first 5 challenge points, first 3 members, first 3
# non-challenge training points, first 3 evaluation points, digest of all.
# Recorded with torch 2.14:
#   cd tests && python -c "import test_challenge as t; t.print_recorded()"
RECORDED = {
    (60_000, 50_000, 100, (0, 1, 2)): (
        [36044, 10678, 57327, 55074, 21567], [35096, 23171, 6322],
        [29566, 11438, 41660], [50626, 44775, 2738], "14cd75661fd991b1"),
    (197_324, 150_000, 100, (2**32 + 5, 2**63 + 11, 123456789)): (
        [181167, 11892, 120225, 2393, 109330], [182763, 130573, 133925],
        [104349, 68168, 27871], [126740, 147024, 39250], "0e9991f96ed17fcb"),
}


def summary(challenge, train, evaluation, m):
  return (challenge[:5].tolist(), train[:3].tolist(), train[m:m + 3].tolist(),
          evaluation[:3].tolist(), digest(challenge, train, evaluation))


def print_recorded():
  for (big, n_train, m, seeds) in RECORDED:
    print((big, n_train, m, seeds),
          summary(*torch_splits(big, n_train, m, seeds), m))


def test_splits_equal_recorded_torch_random_split():
  """Torch-free: the recorded output of torch's `random_split` (see above)."""
  for (big, n_train, m, seeds), expected in RECORDED.items():
    got = challenge_lib.make_challenge(big, n_train, m, np.array([seeds],
                                                                 np.uint64))
    assert summary(got.challenge_KxC[0], got.train_KxT[0], got.eval_KxE[0],
                   m) == expected


@pytest.mark.parametrize("pool_size,len_training", [
    (60_000, 50_000), (197_324, 150_000), (68_221, 67_349)])
def test_splits_equal_torch_random_split(pool_size, len_training):
  """MICO's pool sizes; seeds past 2^32 and 2^63 keep only their low bits."""
  pytest.importorskip("torch")
  seeds = np.array([[7, 2**32 + 7, 2**64 - 1], [2**63 + 3, 0, 99],
                    [123456789012, 5, 2**40]], np.uint64)
  got = challenge_lib.make_challenge(pool_size, len_training, 100, seeds)
  for k, seed3 in enumerate(seeds):
    want_chal, want_train, want_eval = torch_splits(
        pool_size, len_training, 100, tuple(int(s) for s in seed3))
    np.testing.assert_array_equal(got.challenge_KxC[k], want_chal)
    np.testing.assert_array_equal(got.train_KxT[k], want_train)
    np.testing.assert_array_equal(got.eval_KxE[k], want_eval)
    np.testing.assert_array_equal(
        got.member_KxC[k], np.isin(want_chal, want_train[:100]))


def test_randperm_mixed_sizes_equal_torch():
  torch = pytest.importorskip("torch")
  seeds, sizes = [3, 2**33, 17, 0], [1, 2, 257, 1000]
  perms = challenge_lib.randperm(np.array(seeds, np.uint64), sizes, block=64)
  for seed, size, perm in zip(seeds, sizes, perms):
    want = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    np.testing.assert_array_equal(perm[:size], want.numpy())
    np.testing.assert_array_equal(perm[size:], np.arange(size, 1000))


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
  solution = challenge_lib.read_values(
      str(tmp_path / "inf" / "dev" / f"model_{K // 2}" / "solution.csv"))
  np.testing.assert_array_equal(solution, chal.member_KxC[K // 2])


def test_bundle_refuses_predictions_outside_unit_interval(chal, tmp_path):
  with pytest.raises(challenge_lib.ChallengeError, match=r"\[0, 1\]"):
    challenge_lib.write_bundle(str(tmp_path), "inf", chal,
                               np.full((K, 2 * m), 1.5))


def test_bundle_csv_is_one_row_as_mico_writes_it(chal, tmp_path):
  predictions = np.random.default_rng(1).random((K, 2 * m))
  challenge_lib.write_bundle(str(tmp_path), "inf", chal, predictions)
  folder = tmp_path / "inf" / "train" / "model_0"
  solution = (folder / "solution.csv").read_text()
  assert solution.count("\n") == 1 and solution.count(",") == 2 * m - 1
  assert set(solution.strip().split(",")) == {"0", "1"}
  # MICO's scorer reads both files with np.loadtxt(..., delimiter=",").
  np.testing.assert_array_equal(
      np.loadtxt(folder / "solution.csv", delimiter=","), chal.member_KxC[0])
  np.testing.assert_array_equal(
      np.loadtxt(folder / "prediction.csv", delimiter=","), predictions[0])


@pytest.mark.parametrize("text", [
    "0.25,1,0,0.5\n", "0.25,1,0,0.5\r\n", "0.25\n1\n0\n0.5\n",
    "0.25\r\n1\r\n0\r\n0.5", "0.25, 1, 0, 0.5"])
def test_read_values_reads_a_row_or_a_column(text, tmp_path):
  path = tmp_path / "prediction.csv"
  path.write_text(text, newline="")
  np.testing.assert_array_equal(challenge_lib.read_values(str(path)),
                                [0.25, 1, 0, 0.5])


@pytest.mark.parametrize("text,match", [
    ("", "no values"), ("0.1,0.2\n0.3,0.4\n", "2x2 table"),
    ("0.1,abc\n", "cannot read numbers")])
def test_read_values_refuses_other_files(text, match, tmp_path):
  path = tmp_path / "prediction.csv"
  path.write_text(text)
  with pytest.raises(challenge_lib.ChallengeError,
                     match=f"prediction.csv: .*{match}"):
    challenge_lib.read_values(str(path))


def test_read_bundle_refuses_predictions_of_wrong_length(chal, tmp_path):
  challenge_lib.write_bundle(str(tmp_path), "inf", chal,
                             np.full((K, 2 * m), 0.5))
  (tmp_path / "inf" / "dev" / "model_3" / "prediction.csv").write_text("0.5\n")
  with pytest.raises(challenge_lib.ChallengeError,
                     match="model_3/prediction.csv: 1 predictions"):
    challenge_lib.read_bundle(str(tmp_path), "inf", N, n, m)
