from pathlib import Path

import pytest

from schemas.config import Config, load_config, parse_config
from schemas.errors import ConfigError

MINIMAL = '[input]\nimpressions = "imps/*.parquet"\nsignals = "signals.jsonl"\n'


def test_minimal_config_gets_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.input.impressions == ["imps/*.parquet"]
    assert cfg.fit.folds == 5 and cfg.ingest.observe_types == ["upvote", "downvote", "edit"]


@pytest.mark.parametrize(("text", "message"), [
    (MINIMAL + "[fit]\nfoldz = 3\n", "unknown key 'fit.foldz'"),
    (MINIMAL + "[fitt]\nfolds = 3\n", "unknown key 'fitt'"),
    (MINIMAL + "[fit]\nfolds = 1\n", "key 'fit.folds'"),
    (MINIMAL + "[fit]\ncalibration = 'platt'\n", "key 'fit.calibration'"),
    (MINIMAL + "[ingest]\nexplicit = ['thumbs']\n", "thumbs"),
    (MINIMAL + "[ingest]\nlabels = { up = 2 }\nexplicit = ['up']\n", "ingest.labels.up"),
    (MINIMAL + "[ingest]\ngold = 'upvote'\n", "ingest.gold type 'upvote'"),
    (MINIMAL + "[fit]\nnoise = 'oracle'\n", "key 'fit.noise'"),
    ("[input]\nimpressions = 'a'\n", "missing key 'input.signals'"),
    ("[input\n", "malformed TOML"),
])
def test_bad_config_is_one_clear_error(text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(text, path="cfg.toml")
    assert str(err.value).startswith("cfg.toml: ") and message in str(err.value)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "run.toml"
    path.write_text(MINIMAL + 'truth = "../truth.parquet"\n')
    cfg = load_config(path)
    assert cfg.input.impressions == [str(tmp_path / "conf" / "imps" / "*.parquet")]
    assert cfg.input.truth == str(tmp_path / "truth.parquet")


def test_frozen_copy_round_trips_and_hash_is_stable(tmp_path: Path):
    cfg = parse_config(MINIMAL + "[score]\nclip = 0.05\n[ingest]\nlabels = { up = 1, edit = '1 - value' }\n"
                       "explicit = ['up']\n")
    again = parse_config(cfg.to_toml())
    assert again == cfg and again.digest() == cfg.digest()
    assert isinstance(again.ingest.labels["up"], float) and again.ingest.labels["edit"] == "1 - value"
    assert parse_config(MINIMAL + "[score]\nclip = 0.06\n").digest() != cfg.digest()


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on assignment
        cfg.fit = None  # type: ignore[misc]
    assert isinstance(cfg, Config)
