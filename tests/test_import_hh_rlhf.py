"""`obsfeed import hh-rlhf` on the real file (found through OBSFEED_DATA, which CI sets; skipped without it):
parsing, the simulated feedback, determinism, and that the pipeline's ingest accepts what it writes."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.orchestration.cli import main
from pipelines.sources import DATA_ENV, public_data
from pipelines.sources.hh_rlhf import HHSettings, import_hh_rlhf, read_pairs, semi_synthetic, split_dialogue
from schemas import run_dir as rd
from schemas import truth as tr

SRC = public_data("hh-rlhf")
pytestmark = pytest.mark.skipif(not SRC.is_dir(), reason=f"{SRC} not found: set {DATA_ENV} (docs/data.md)")


@pytest.fixture(scope="module")
def pairs():
    return read_pairs(SRC / "harmless-base-test.jsonl.gz")


def test_pairs_are_a_shared_prompt_and_two_final_turns(pairs):
    rows, counts = pairs
    assert counts == {"lines": 2312, "pairs": 2312, "prefix_differs": 5, "skipped_malformed": 0,
                      "skipped_identical": 0}                              # as docs/data.md describes the file
    first = rows[0]
    assert first["prompt"].startswith("Human:") and first["prompt"].rstrip().endswith(first["prompt"].split()[-1])
    assert "\n\nAssistant:" not in first["chosen"] and first["chosen"] != first["rejected"]
    assert split_dialogue("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant: sure") == (
        "Human: hi\n\nAssistant: yo\n\nHuman: ok?", "sure")
    with pytest.raises(ValueError):
        split_dialogue("Human: no answer")


def test_simulated_feedback_follows_its_settings(pairs):
    rows, _ = pairs
    out = semi_synthetic(rows, HHSettings(seed=1))
    truth = out["truth"].to_pandas()
    imps = out["impressions"].to_pandas()
    assert len(truth) == 2 * out["counts"]["train_pairs"] and out["counts"]["test_pairs"] + out["counts"][
        "train_pairs"] == 2312
    assert set(imps["prompt_id"]).isdisjoint(out["test_pairs"].column("pair_id").to_pylist())
    assert (imps.groupby("prompt_id")["impression_id"].count() == 2).all()
    clean, noisy = truth[tr.LABEL_CLEAN], truth[tr.LABEL_NOISY]
    assert abs((noisy[clean == 1] == 0).mean() - 0.2) < 0.03 and abs((noisy[clean == 0] == 1).mean() - 0.1) < 0.03
    obs = truth[tr.OBSERVED_TRUE] == 1
    assert obs[clean == 1].mean() / obs[clean == 0].mean() > 1.5             # α = 0.5: good answers rated more
    words = np.log(np.maximum(imps["response"].str.split().str.len(), 1))
    assert np.corrcoef(words, obs)[0, 1] > 0.05                               # and longer ones
    signals = out["signals"].to_pandas()
    assert (signals["type"].isin(["upvote", "downvote"])).sum() == obs.sum() and out["counts"]["gold"] > 300


def test_import_is_deterministic_and_ingest_accepts_it(tmp_path: Path, monkeypatch):
    a = import_hh_rlhf(SRC, tmp_path / "a", HHSettings(seed=3), limit=300)
    import_hh_rlhf(SRC, tmp_path / "b", HHSettings(seed=3), limit=300)
    for f in ("impressions/part-00000.parquet", "signals.jsonl.gz", "truth.parquet", "test_pairs.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a["lines"] == 300 and json.loads((tmp_path / "a" / "import.json").read_text())["settings"]["seed"] == 3
    config = (Path(__file__).resolve().parents[1] / "configs" / "hh_rlhf.toml").read_text()
    (tmp_path / "hh.toml").write_text(config.replace("../data/hh-rlhf", str(tmp_path / "a")))
    monkeypatch.setenv("OBSFEED_HASH_KEY", "test-key")
    assert main(["run", str(tmp_path / "hh.toml"), str(tmp_path / "run"), "--stages", "ingest"]) == 0
    units = pq.read_table(tmp_path / "run" / rd.UNITS)
    assert units.num_rows == a["units"] and sum(units["observed"].to_pylist()) == a["observed"]
    assert pq.read_table(tmp_path / "run" / rd.QUARANTINE).num_rows == 0


def test_cli_import_and_bad_input(tmp_path: Path, capsys):
    assert main(["import", "hh-rlhf", str(SRC), str(tmp_path / "out"), "--limit", "40", "--seed", "2"]) == 0
    assert "train_pairs" in capsys.readouterr().out
    assert main(["import", "hh-rlhf", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "HH-RLHF file not found" in capsys.readouterr().err
    assert main(["import", "hh-rlhf", str(SRC), str(tmp_path / "x"), "--alpha", "0"]) == 2
