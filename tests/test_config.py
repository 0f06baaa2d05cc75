import tomllib
from pathlib import Path

import pytest

from schemas.config import Config, ScoreConfig, load_config, parse_config
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
    cfg = parse_config(MINIMAL + "[weights]\nclip = 0.05\n[ingest]\nlabels = { up = 1, edit = '1 - value' }\n"
                       "explicit = ['up']\n")
    again = parse_config(cfg.to_toml())
    assert again == cfg and again.digest() == cfg.digest()
    assert isinstance(again.ingest.labels["up"], float) and again.ingest.labels["edit"] == "1 - value"
    assert parse_config(MINIMAL + "[weights]\nclip = 0.06\n").digest() != cfg.digest()


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on assignment
        cfg.fit = None  # type: ignore[misc]
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(("key", "new"), [("clip = 0.05", "weights.clip"), ("clip = 'auto'", "weights.clip"),
                                          ("min_ess_share = 0.3", "weights.min_ess_share"),
                                          ("ips_min_ess_share = 0.05", "weights.ips_min_ess_share"),
                                          ("ess_floor = 0.05", "weights.ips_min_ess_share"),
                                          ("stabilize = 'snips'", "weights.stabilize"),
                                          ("max_weight_variance = 2.0", "weights.max_weight_variance")])
def test_a_weight_setting_left_in_score_is_read_where_it_moved(key, new, caplog):
    """The floor and the ESS settings are decided by fit, so they live in [weights]. A config from before (a run
    directory's frozen config.toml) still reads: the [score] key is taken as its [weights] key, with a warning
    naming the new place; set in both places it is refused, since which one holds cannot be guessed."""
    with caplog.at_level("WARNING", logger="schemas.config"):
        old = parse_config(MINIMAL + f"[score]\n{key}\n", path="cfg.toml")
    assert f"score.{key.split(' ')[0]} read as {new}" in caplog.text
    moved = key.replace("ess_floor", "ips_min_ess_share")
    assert old == parse_config(MINIMAL + f"[weights]\n{moved}\n")
    with pytest.raises(ConfigError, match=f"{new} is set twice"):
        parse_config(MINIMAL + f"[weights]\n{moved}\n[score]\n{key}\n", path="cfg.toml")
    with pytest.raises(ValueError, match=f"score.{key.split(' ')[0]} is now {new}"):    # the section alone refuses
        ScoreConfig.model_validate(tomllib.loads(key))


def test_each_stage_digest_counts_the_sections_it_reads():
    base = parse_config(MINIMAL)
    changed = {"weights": parse_config(MINIMAL + "[weights]\nclip = 0.05\n"),
               "score": parse_config(MINIMAL + "[score]\nmin_margin = 0.3\n"),
               "fit": parse_config(MINIMAL + "[fit]\nfolds = 3\n")}
    stale = {section: {s for s in ("ingest", "fit", "score", "train", "report")
                       if cfg.stage_digest(s) != base.stage_digest(s)} for section, cfg in changed.items()}
    assert stale == {"weights": {"fit", "score"}, "score": {"score"}, "fit": {"fit", "score"}}


def test_an_old_config_with_both_names_of_the_ess_floor_is_refused():
    with pytest.raises(ConfigError, match="score.ess_floor is the old name of score.ips_min_ess_share"):
        parse_config(MINIMAL + "[score]\ness_floor = 0.05\nips_min_ess_share = 0.03\n", path="cfg.toml")
