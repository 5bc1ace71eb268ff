import json

import pytest

from toolkit.config import ConfigError, PipelineConfig, load_config, parse_overrides, record_run
from toolkit.cli import main


def test_defaults_match_the_study():
    cfg = PipelineConfig()
    assert (cfg.data.grid.start, cfg.data.grid.stop, cfg.data.grid.num) == (0.0, 15.0, 1501)
    assert cfg.data.log_floor == 2.0 and cfg.data.onset_threshold == 4.0
    assert (cfg.graph.cutoff, cfg.graph.max_neighbors) == (8.0, 12)
    assert (cfg.model.alignn_layers, cfg.model.gcn_layers, cfg.model.hidden_features) == (4, 4, 256)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\ndata:\n  source: jsonl\n  path: /x.jsonl\n")
    cfg = load_config(p, ["train.epochs=3", "data.grid.num=11", "analyze.n_clusters=5"])
    assert cfg.train.epochs == 3 and cfg.data.grid.num == 11 and cfg.analyze.n_clusters == 5
    assert cfg.data.source == "jsonl" and str(cfg.data.path) == "/x.jsonl"


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1.5", "a.c=true", "d=[1, 2]"]) == {"a": {"b": 1.5, "c": True}, "d": [1, 2]}


@pytest.mark.parametrize("bad, needle", [
    (["train.epochz=3"], "train.epochz"),
    (["model.backend=tensorflow"], "model.backend"),
    (["train.split=[0.5, 0.5, 0.5]"], "train.split"),
    (["data.grid.stop=-1"], "grid.stop"),
    (["data.source=alignn"], "needs data.path"),  # the schema knows which sources read data.path
    (["data.log_floor=.nan"], "data.log_floor"),  # non-finite numbers are refused
    (["data.grid.stop=.inf"], "finite"),
    (["data.onset_threshold=-.inf"], "data.onset_threshold"),
])
def test_invalid_config_names_the_field(bad, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, bad)
    assert needle in str(e.value)


def test_missing_file_and_cli_exit_code(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    rc = main(["prepare", "--run-dir", str(tmp_path / "r"), "--set", "data.sourc=x"])
    assert rc == 2
    assert "data.sourc" in capsys.readouterr().err


def test_record_run_writes_config_versions_and_seeds(tmp_path):
    cfg = load_config(None, ["seed=5", "train.seed=9"])
    record_run(cfg, tmp_path, stage="prepare")
    assert load_config(tmp_path / "config.yaml") == cfg
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["seeds"]["train"] == 9 and info["versions"]["torch"]
    assert "prepare" in info["stages"]


def test_cli_prints_toolkit_errors_without_traceback(tmp_path, capsys):
    # embedding a run directory that has no trained model: a clear EmbedError/StoreError, exit 1
    rc = main(["embed", "--run-dir", str(tmp_path / "empty"), "--verify"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err and str(tmp_path / "empty") in err


def test_top_level_seed_seeds_every_stage_not_set_explicitly():
    cfg = load_config(None, ["seed=5", "train.seed=9"])
    assert (cfg.data.benchmark.seed, cfg.train.seed, cfg.analyze.seed) == (5, 9, 5)
    default = load_config(None)
    assert default.seed is None and (default.data.benchmark.seed, default.train.seed, default.analyze.seed) == (0, 123, 0)


def test_rbf_cutoff_is_not_the_graph_cutoff_and_old_name_is_read():
    cfg = load_config(None, ["model.cutoff=6.5", "graph.cutoff=9"])
    assert cfg.model.rbf_cutoff == 6.5 and cfg.graph.cutoff == 9
    assert "rbf_cutoff" in cfg.model.model_dump() and "cutoff" not in cfg.model.model_dump()
    assert load_config(None, ["model.rbf_cutoff=7"]).model.rbf_cutoff == 7


def test_every_toolkit_error_is_a_spectrolens_error():
    from toolkit.errors import SpectrolensError

    assert issubclass(ConfigError, SpectrolensError) and issubclass(ConfigError, ValueError)
