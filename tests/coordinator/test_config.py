"""The coordinator config: defaults, the example file, overrides and every validation case."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from rankfed.coordinator.config import (
    DEFAULT_TIERS,
    CoordinatorConfig,
    RankTier,
    config_from_mapping,
    config_to_dict,
    field_help,
    load_config,
)
from rankfed.coordinator.errors import ConfigError
from rankfed.protocol import AlphaRule, DeviceClass

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "coordinator.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, **kw: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), **kw)  # type: ignore[arg-type]
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.source is None
    assert cfg.server.address == "127.0.0.1:50051"
    assert cfg.server.data_dir == tmp_path / "rankfed-data"
    assert cfg.model.manifest == ""  # the bundled demo manifest
    assert cfg.lora.alpha_rule is AlphaRule.CONSTANT_SCALING
    assert cfg.lora.max_rank == 16
    assert cfg.federation.method == "zero_pad"
    assert cfg.federation.rounds == 5
    assert cfg.rank_policy.tiers == DEFAULT_TIERS
    assert [t.name for t in cfg.rank_policy.tiers] == ["cuda-large", "cuda", "cpu-fast", "cpu", "mobile"]


def test_example_file_equals_defaults_up_to_paths() -> None:
    from_file = load_config(EXAMPLE)
    defaults = load_config()
    assert from_file.source == EXAMPLE
    assert from_file.server.data_dir == EXAMPLE.parent / "rankfed-data"
    assert from_file.model.manifest == ""
    same_paths = dataclasses.replace(
        from_file,
        server=dataclasses.replace(from_file.server, data_dir=defaults.server.data_dir),
        model=dataclasses.replace(from_file.model, manifest=defaults.model.manifest),
        source=None,
    )
    assert same_paths == defaults


def test_example_file_names_every_field_and_only_those() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    cfg = CoordinatorConfig()
    for section, values in data.items():
        obj = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(obj)}
        assert set(values) == names, section
    tier_keys = set().union(*(t.keys() for t in data["rank_policy"]["tiers"]))
    text = EXAMPLE.read_text(encoding="utf-8")
    for f in dataclasses.fields(RankTier):  # every tier condition is at least documented
        assert f.name in tier_keys or f"#   {f.name}" in text, f.name


def test_every_field_has_help() -> None:
    for section in ("server", "model", "lora", "federation", "rank_policy"):
        for f in dataclasses.fields(getattr(CoordinatorConfig(), section)):
            assert field_help(f"{section}.{f.name}"), f"{section}.{f.name}"
    for f in dataclasses.fields(RankTier):
        assert f.metadata["help"], f.name
    assert "host:port" in field_help("server.address")
    assert "megabits" in field_help("rank_policy.tiers.min_upload_mbps")
    with pytest.raises(KeyError, match="server.address"):
        field_help("server.adress")


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.server.data_dir == tmp_path / "rankfed-data"
    assert cfg.federation == load_config().federation


# --------------------------------------------------------------------------- paths, overrides


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = sub / "c.toml"
    path.write_text('[server]\ndata_dir = "../state"\n[model]\nmanifest = "m.json"\n')
    cfg = load_config(path)
    assert cfg.server.data_dir == tmp_path / "state"
    assert cfg.model.manifest == str(sub / "m.json")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, f'[server]\ndata_dir = "{tmp_path / "abs"}"\n'))
    assert cfg.server.data_dir == tmp_path / "abs"


def test_overrides_by_dotted_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        write(tmp_path, "[federation]\nrounds = 9\n"),
        overrides={
            "server.address": "0.0.0.0:0",
            "server.data_dir": "cli-data",  # relative to the CWD, not the file
            "federation.rounds": 3,
            "federation.learning_rate": "0.01",  # strings from the CLI are converted
            "lora.alpha_rule": "fixed",
            "federation.method": None,  # None: not given
        },
    )
    assert cfg.server.address == "0.0.0.0:0"
    assert cfg.server.data_dir == tmp_path / "cli-data"
    assert cfg.federation.rounds == 3
    assert cfg.federation.learning_rate == 0.01
    assert cfg.lora.alpha_rule is AlphaRule.FIXED
    assert cfg.federation.method == "zero_pad"


def test_override_without_a_file() -> None:
    cfg = load_config(overrides={"federation.rounds": "7", "rank_policy.round_budget_bytes": 10})
    assert cfg.federation.rounds == 7
    assert cfg.rank_policy.round_budget_bytes == 10


def test_unknown_override_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError, match=r"'server\.adress'.*did you mean 'server\.address'"):
        load_config(overrides={"server.adress": "x:1"})


def test_bad_override_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"federation\.rounds = 'three'.*integer"):
        load_config(overrides={"federation.rounds": "three"})


# --------------------------------------------------------------------------- tiers


def test_tiers_in_the_file_replace_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[[rank_policy.tiers]]
name = "fast-link"
min_upload_mbps = 100.0
min_cores = 8
rank = 12
""",
        )
    )
    assert cfg.rank_policy.tiers == (
        RankTier("fast-link", 12, None, min_upload_mbps=100.0, min_cores=8),
    )
    assert cfg.rank_policy.default_rank == 2


def test_empty_tier_list(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[rank_policy]\ntiers = []\n"))
    assert cfg.rank_policy.tiers == ()


def test_section_without_tiers_keeps_the_default_tiers(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[rank_policy]\ndefault_rank = 1\n"))
    assert cfg.rank_policy.tiers == DEFAULT_TIERS
    assert cfg.rank_policy.tiers[0].device_class is DeviceClass.CUDA


@pytest.mark.parametrize(
    ("tier", "expected"),
    [
        ('name = "a"\nrank = 0', r"rank_policy\.tiers\[0\]\.rank = 0: must be ≥ 1"),
        ('name = "a"', r"rank_policy\.tiers\[0\]\.rank is required"),
        ("rank = 4", r"rank_policy\.tiers\[0\]\.name is required"),
        ('name = ""\nrank = 4', r"rank_policy\.tiers\[0\]\.name = ''"),
        ('name = "a"\nrank = 4\ndevice_class = "gpu"', r"device_class = 'gpu'.*cpu, cuda, mps, mobile"),
        ('name = "a"\nrank = 4\nmin_memory = 3', r"'rank_policy\.tiers\[0\]\.min_memory'.*did you mean 'min_memory_gb'"),
        ('name = "a"\nrank = 4\nmin_gflops = -1.0', r"min_gflops = -1\.0: must be ≥ 0"),
        ('name = "a"\nrank = "4"', r"tiers\[0\]\.rank = '4' \(str\): expected an integer"),
    ],
)
def test_bad_tier(tmp_path: Path, tier: str, expected: str) -> None:
    assert re.search(expected, error_of(tmp_path, f"[[rank_policy.tiers]]\n{tier}\n"))


def test_duplicate_tier_names(tmp_path: Path) -> None:
    text = '[[rank_policy.tiers]]\nname = "a"\nrank = 2\n[[rank_policy.tiers]]\nname = "a"\nrank = 1\n'
    assert "rank_policy.tiers[1].name = 'a': already used by tier 0" in error_of(tmp_path, text)


def test_tiers_not_a_list(tmp_path: Path) -> None:
    assert "rank_policy.tiers = 3 (int): expected a list" in error_of(
        tmp_path, "[rank_policy]\ntiers = 3\n"
    )


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[sever]\n", "unknown section [sever] (did you mean 'server'?)"),
        ("[server]\nadress = 'x:1'\n", "'server.adress' (did you mean 'address'?)"),
        ("server = 3\n", "[server] must be a table"),
        ("[federation]\nrounds = 0\n", "federation.rounds = 0: must be ≥ 1"),
        ("[federation]\nrounds = 2.5\n", "federation.rounds = 2.5 (float): expected an integer"),
        ("[federation]\nrounds = true\n", "federation.rounds = True (bool): expected an integer"),
        ("[federation]\nmin_clients = 0\n", "federation.min_clients = 0: must be ≥ 1"),
        ("[federation]\nmethod = 'fedavg'\n", "federation.method = 'fedavg': expected one of fedit, zero_pad"),
        ("[federation]\nmethod = 'flexlor'\n", "(did you mean 'flexlora'?)"),
        ("[federation]\nround_deadline_seconds = 0\n", "federation.round_deadline_seconds = 0.0: must be > 0"),
        ("[federation]\nwait_for_clients_seconds = -1\n", "federation.wait_for_clients_seconds = -1.0: must be > 0"),
        ("[federation]\nlearning_rate = nan\n", "federation.learning_rate = nan: expected a finite number"),
        ("[federation]\nlearning_rate = 'fast'\n", "federation.learning_rate = 'fast' (str): expected a number"),
        ("[federation]\nclients_per_round = 1\nmin_clients = 2\n", "federation.clients_per_round = 1: must be 0"),
        ("[federation]\nheartbeat_timeout_seconds = 5\n", "federation.heartbeat_timeout_seconds = 5.0: must exceed"),
        ("[federation]\nmode = 'personal'\n", "federation.mode = 'personal': expected one of rank_heterogeneous, personalized"),
        ("[federation]\nmode = 'personalized'\n", "federation.method = 'zero_pad': federation.mode = 'personalized' averages"),
        ("[lora]\nmax_rank = 0\n", "lora.max_rank = 0: must be ≥ 1"),
        ("[lora]\nalpha_rule = 'const'\n", "lora.alpha_rule = 'const' (str): expected one of constant_scaling, fixed, rslora"),
        ("[lora]\ndropout = 1.0\n", "lora.dropout = 1.0: must be ≥ 0 and < 1"),
        ("[lora]\nscaling = 0\n", "lora.scaling = 0.0: must be > 0"),
        ("[rank_policy]\ndefault_rank = 0\n", "rank_policy.default_rank = 0: must be ≥ 1"),
        ("[rank_policy]\nround_budget_bytes = -1\n", "rank_policy.round_budget_bytes = -1: must be ≥ 0"),
        ("[server]\nmax_chunk_bytes = 10\n", "server.max_chunk_bytes = 10: must be ≥ 1024 and ≤ 67108864"),
        ("[server]\nmax_upload_bytes = 0\n", "server.max_upload_bytes = 0: must be ≥ 1"),
        ("[server]\nlong_poll_seconds = 0\n", "server.long_poll_seconds = 0.0: must be > 0"),
        ("[server]\ntoken_ttl_seconds = 0\n", "server.token_ttl_seconds = 0: must be ≥ 1"),
        ("[server]\nenrollment_secret = 5\n", "server.enrollment_secret = 5 (int): expected a string"),
        ("[server]\ndata_dir = ''\n", "server.data_dir = '' (str): expected a non-empty path"),
        ("[model]\nmanifest = 1\n", "model.manifest = 1 (int): expected a string"),
        (
            "[server]\nmax_receive_message_bytes = 1114112\n",
            "server.max_receive_message_bytes = 1114112: must exceed server.max_chunk_bytes + 64 KiB overhead = 1114112",
        ),
    ],
)
def test_validation_names_the_field(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert expected in message
    assert str(tmp_path / "coordinator.toml") in message


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("127.0.0.1:50051", True),
        ("0.0.0.0:0", True),
        ("[::]:50051", True),
        ("localhost:65535", True),
        ("localhost", False),
        (":50051", False),
        ("host:port", False),
        ("host:70000", False),
        ("::1:50051", False),
        ("my host:1", False),
    ],
)
def test_address(address: str, ok: bool) -> None:
    if ok:
        assert load_config(overrides={"server.address": address}).server.address == address
    else:
        with pytest.raises(ConfigError, match=r"server\.address = .*"):
            load_config(overrides={"server.address": address})


def test_receive_limit_just_above_the_chunk_is_enough() -> None:
    cfg = load_config(overrides={"server.max_receive_message_bytes": 1048576 + 65536 + 1})
    assert cfg.server.max_receive_message_bytes == 1114113


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[federation]\nrounds = 0\nmin_clients = 0\n[lora]\nmax_rank = 0\n")
    assert "3 problems" in message
    for name in ("federation.rounds", "federation.min_clients", "lora.max_rank"):
        assert name in message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist.*coordinator.example.toml"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


# --------------------------------------------------------------------------- dict form


def test_config_to_dict_round_trips_and_redacts(tmp_path: Path) -> None:
    cfg = load_config(overrides={"server.admin_token": "s3cret", "server.data_dir": str(tmp_path)})
    data = config_to_dict(cfg)
    assert data["server"]["admin_token"] == "***"
    assert data["server"]["enrollment_secret"] == ""
    assert data["server"]["data_dir"] == str(tmp_path)
    assert data["lora"]["alpha_rule"] == "constant_scaling"
    assert data["rank_policy"]["tiers"][1] == {"name": "cuda", "rank": 8, "device_class": "cuda"}
    plain = config_to_dict(cfg, redact_secrets=False)
    assert plain["server"]["admin_token"] == "s3cret"
    assert config_from_mapping(plain) == cfg
    json.dumps(data)  # loggable as is


def test_personalized_mode_with_fedit(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nmode = 'personalized'\nmethod = 'fedit'\n")
    cfg = load_config(path)
    assert cfg.federation.mode == "personalized"
    assert load_config(None).federation.mode == "rank_heterogeneous"
