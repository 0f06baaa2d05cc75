"""`obsfeed import coat` on the real files (found through OBSFEED_DATA, which CI sets; skipped without them): the
input contract, the features and the held-out random ratings."""

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.orchestration.cli import main
from pipelines.sources import DATA_ENV, public_data
from pipelines.sources.coat import CROSSES, LOGGED_PROPENSITY, coat_logs, read_coat
from schemas import run_dir as rd

SRC = public_data("coat")
pytestmark = pytest.mark.skipif(not SRC.is_dir(), reason=f"{SRC} not found: set {DATA_ENV} (docs/data.md)")


@pytest.fixture(scope="module")
def logs():
    return coat_logs(read_coat(SRC))


def test_every_cell_is_a_unit_and_the_self_selected_ratings_are_signals(logs):
    imps, signals = logs["impressions"], logs["signals"]
    assert imps.num_rows == 290 * 300 and len(set(imps["impression_id"].to_pylist())) == 87_000
    assert logs["counts"]["train_rating_counts"] == [1901, 1437, 1717, 1275, 630]      # docs/data.md
    values = signals["value"].to_numpy()
    assert signals.num_rows == 6960 and set(np.round(values * 4 + 1).astype(int)) == {1, 2, 3, 4, 5}
    per_user = np.bincount([int(i[6:9]) for i in signals["impression_id"].to_pylist()], minlength=290)
    assert (per_user == 24).all()                                           # every user chose 24 coats
    first = imps.slice(0, 1).to_pylist()[0]
    assert (first["prompt"], first["response"], first["prompt_id"]) == ("user0", "item0", "coat-u000")
    p = imps[LOGGED_PROPENSITY].to_numpy()
    assert p.min() == pytest.approx(0.00253, abs=1e-5) and p.max() == pytest.approx(0.690, abs=1e-3)


def test_features_and_their_crosses(logs):
    imps = logs["impressions"]
    assert {"user_gender", "user_age", "user_location", "user_fashioninterest", "item_gender", "item_jackettype",
            "item_color", "item_onfrontpage"} <= set(imps.schema.names)
    row = imps.slice(0, 1).to_pylist()[0]
    crosses = row[CROSSES].split()
    assert all(len(c.split("_X_")) == 2 and c.replace("_", "").isalnum() for c in crosses)    # one \w+ word each
    assert f"u_gender_{row['user_gender']}_X_i_color_{row['item_color']}" in crosses
    old = imps.filter(pc.equal(imps["user_age"], "over 60"))
    assert old.num_rows > 0 and "u_age_over_60_X_" in old[CROSSES][0].as_py()          # spaces become _


def test_random_ratings_are_the_test_set_only(logs):
    test = logs["test"]
    assert test.num_rows == 4640 and set(test["rating"].to_pylist()) == {1, 2, 3, 4, 5}
    assert (np.bincount(test["user"].to_numpy(), minlength=290) == 16).all()


def test_cli_import_and_ingest(tmp_path: Path, monkeypatch, capsys):
    assert main(["import", "coat", str(SRC), str(tmp_path / "coat")]) == 0
    assert "train_ratings" in capsys.readouterr().out
    config = (Path(__file__).resolve().parents[1] / "configs" / "coat.toml").read_text()
    (tmp_path / "coat.toml").write_text(config.replace("../data/coat", str(tmp_path / "coat")))
    monkeypatch.setenv("OBSFEED_HASH_KEY", "test-key")
    assert main(["run", str(tmp_path / "coat.toml"), str(tmp_path / "run"), "--stages", "ingest"]) == 0
    units = pq.read_table(tmp_path / "run" / rd.UNITS, columns=["observed", "label"])
    assert units.num_rows == 87_000 and sum(units["observed"].to_pylist()) == 6960
    assert main(["import", "coat", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "Coat file not found" in capsys.readouterr().err
