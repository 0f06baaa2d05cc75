"""Drift statistics (estimators.drift) against their formulas, and the root lock's holder checks."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from estimators.drift import PSI_FLOOR, bin_shares, breaches, compare, profile, psi, quantile_edges, total_variation
from pipelines.orchestration.lock import lock_path, root_lock, unlock
from schemas.errors import LockError


def test_psi_and_total_variation_match_their_formulas():
    e, a = [0.25, 0.25, 0.5], [0.5, 0.25, 0.25]
    assert psi(e, a) == pytest.approx((0.5 - 0.25) * np.log(2) + 0 + (0.25 - 0.5) * np.log(0.5))
    assert psi(e, e) == 0.0
    assert psi([1.0, 0.0], [0.0, 1.0]) == pytest.approx(2 * (1 - PSI_FLOOR) * np.log(1 / PSI_FLOOR))
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.2, "c": 0.8}) == pytest.approx(0.8)


def test_profiles_bin_on_the_reference_deciles():
    rng = np.random.default_rng(0)
    p = rng.beta(2, 8, size=50_000)
    edges = quantile_edges(p, 10)
    assert len(edges) == 9
    np.testing.assert_allclose(bin_shares(p, edges), 0.1, atol=0.002)
    o = rng.random(p.size) < p
    ref = profile(p, o, np.where(o, rng.random(p.size) < 0.6, np.nan), {"upvote": 30, "downvote": 10, "click": 0})
    assert ref["signal_mix"] == {"downvote": 0.25, "upvote": 0.75} and ref["label_rate"] == pytest.approx(0.6, abs=0.02)
    same = profile(rng.beta(2, 8, size=20_000), o[:20_000], np.where(o[:20_000], 1.0, np.nan),
                   {"upvote": 3, "downvote": 1}, edges=edges)
    shifted = profile(rng.beta(4, 6, size=20_000), o[:20_000], np.where(o[:20_000], 1.0, np.nan),
                      {"upvote": 1, "downvote": 3}, edges=edges)
    calm, moved = compare(ref, same), compare(ref, shifted)
    assert calm["propensity_psi"] < 0.01 < 0.25 < moved["propensity_psi"]
    assert calm["signal_mix_shift"] == 0.0 and moved["signal_mix_shift"] == pytest.approx(0.5)
    assert calm["label_rate_shift"] == pytest.approx(0.4, abs=0.02)
    bounds = {"propensity_psi": 0.25, "label_rate_shift": None, "signal_mix_shift": 0.2}
    assert breaches(calm, bounds) == []
    assert [b.split(" ")[0] for b in breaches(moved, bounds)] == ["propensity_psi", "signal_mix_shift"]
    assert breaches({"label_rate_shift": float("nan")}, {"label_rate_shift": 0.1}) != []
    with pytest.raises(ValueError, match="edges"):
        compare(ref, profile(p ** 2, o, o.astype(float), {}))          # binned on its own deciles


def test_lock_refuses_a_live_holder_and_clears_only_a_stale_one(tmp_path):
    with root_lock(tmp_path):
        holder = json.loads(lock_path(tmp_path).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(LockError, match="another run holds"), root_lock(tmp_path):
            pass
        with pytest.raises(LockError, match="running process"):
            unlock(tmp_path)
    assert not lock_path(tmp_path).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(tmp_path).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                               "started_at": "earlier", "command": "obsfeed run"}))
    with pytest.raises(LockError, match="stale lock"), root_lock(tmp_path):
        pass
    assert "removed" in unlock(tmp_path) and not lock_path(tmp_path).exists()
    lock_path(tmp_path).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "obsfeed run"}))
    with pytest.raises(LockError, match="--force"):
        unlock(tmp_path)
    assert "removed" in unlock(tmp_path, force=True)
