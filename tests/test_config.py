"""Settings (service/config.py): defaults, CONVSERVE_* environment overrides, validation."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from service.config import BatchingConfig, Limits, MiB, ServeConfig
from service.serve_config import (
    DEFAULT_SERVE_CONFIG,
    ServeConfigError,
    load_serve_config,
    validate_serve_config,
)


def test_defaults_validate():
    cfg = ServeConfig()
    assert cfg.bundle_path is None
    assert cfg.batching.max_batch_size == 32
    assert cfg.batching.batch_wait_timeout_s == pytest.approx(0.004)
    assert cfg.limits.max_body_bytes == 8 * MiB
    assert cfg.limits.max_image_pixels == 40_000_000
    assert ServeConfig.model_validate(cfg.model_dump()) == cfg  # round-trips
    assert ServeConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_no_environment_gives_the_defaults():
    assert ServeConfig.from_env(environ={}) == ServeConfig()
    assert ServeConfig.from_env(environ={"PATH": "/usr/bin", "MAX_BATCH_SIZE": "3"}) == ServeConfig()


def test_env_overrides_land_in_nested_fields():
    cfg = ServeConfig.from_env(
        environ={
            "CONVSERVE_MAX_BATCH_SIZE": "16",
            "CONVSERVE_BATCH_WAIT_TIMEOUT_S": "0.01",
            "CONVSERVE_MAX_BODY_BYTES": "100",
            "CONVSERVE_BUNDLE_PATH": "/x",
            "UNRELATED": "1",
        }
    )
    assert cfg.batching.max_batch_size == 16 and isinstance(cfg.batching.max_batch_size, int)
    assert cfg.batching.batch_wait_timeout_s == pytest.approx(0.01)
    assert cfg.limits.max_body_bytes == 100
    assert cfg.bundle_path == "/x"
    # Everything else stays at its default.
    defaults = ServeConfig()
    assert cfg.limits.max_image_pixels == defaults.limits.max_image_pixels
    assert cfg.device == defaults.device
    assert cfg.port == defaults.port


def test_env_values_are_parsed_to_field_types():
    cfg = ServeConfig.from_env(
        environ={
            "CONVSERVE_CHANNELS_LAST": "false",
            "CONVSERVE_DEVICE": "cpu",
            "CONVSERVE_PORT": "9001",
            "CONVSERVE_REQUEST_TIMEOUT_S": "12.5",
            "CONVSERVE_WARMUP_BATCH_SIZES": "1,2,8",
            "CONVSERVE_MAX_IMAGE_PIXELS": "1000000",
        }
    )
    assert cfg.channels_last is False
    assert cfg.device == "cpu"
    assert cfg.port == 9001
    assert cfg.request_timeout_s == pytest.approx(12.5)
    assert cfg.warmup_batch_sizes == [1, 2, 8]
    assert cfg.limits.max_image_pixels == 1_000_000


def test_env_overrides_base_and_base_is_not_modified():
    base = {
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "port": 9000,
        "limits": {"default_top_k": 3},
    }
    snapshot = copy.deepcopy(base)
    cfg = ServeConfig.from_env(base, environ={"CONVSERVE_MAX_BATCH_SIZE": "16", "CONVSERVE_DEFAULT_TOP_K": "2"})
    assert cfg.batching.max_batch_size == 16  # the environment wins
    assert cfg.batching.batch_wait_timeout_s == pytest.approx(0.05)  # the rest of base stays
    assert cfg.port == 9000
    assert cfg.limits.default_top_k == 2
    assert base == snapshot


def test_from_env_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("CONVSERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CONVSERVE_BUNDLE_PATH", "/bundles/b")
    cfg = ServeConfig.from_env()
    assert (cfg.batching.max_batch_size, cfg.bundle_path) == (4, "/bundles/b")


@pytest.mark.parametrize(
    "environ",
    [
        {"CONVSERVE_MAX_BATCH_SIZE": "0"},
        {"CONVSERVE_MAX_BATCH_SIZE": "sixteen"},
        {"CONVSERVE_MAX_BATCH_SIZE": "100000"},
        {"CONVSERVE_BATCH_WAIT_TIMEOUT_S": "-1"},
        {"CONVSERVE_MAX_BODY_BYTES": "0"},
        {"CONVSERVE_DEVICE": "tpu"},
        {"CONVSERVE_PORT": "70000"},
    ],
)
def test_invalid_env_values_are_rejected(environ):
    with pytest.raises(ValidationError):
        ServeConfig.from_env(environ=environ)


@pytest.mark.parametrize("key", ["CONVSERVE_MAX_BATCHSIZE", "CONVSERVE_TORCH_THREAD", "CONVSERVE_BATCHING"])
def test_unknown_convserve_env_vars_are_refused_by_name(key):
    with pytest.raises(ValueError, match=f"{key} is not a convserve setting; known: .*CONVSERVE_MAX_BATCH_SIZE"):
        ServeConfig.from_env(environ={key: "1"})


def test_serve_exits_with_a_clear_message_on_a_bad_setting(monkeypatch):
    from service.server import main

    monkeypatch.setenv("CONVSERVE_MAX_BATCHSIZE", "16")
    with pytest.raises(SystemExit, match="convserve: invalid configuration: CONVSERVE_MAX_BATCHSIZE is not"):
        main(["--port", "18999"])
    monkeypatch.delenv("CONVSERVE_MAX_BATCHSIZE")
    monkeypatch.setenv("CONVSERVE_MAX_BATCH_SIZE", "sixteen")
    with pytest.raises(SystemExit, match="(?s)convserve: invalid configuration: .*max_batch_size"):
        main(["--port", "18999"])


def test_replica_settings_are_not_app_settings():
    """max_ongoing_requests and replica counts are Ray Serve's, in the Serve config file's deployment."""
    for key in ("max_ongoing_requests", "num_replicas", "num_gpus"):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            ServeConfig(**{key: 1})


#############################################
#    The Serve config file and invariants   #
#############################################


@pytest.fixture
def serve_doc() -> dict:
    return load_serve_config(DEFAULT_SERVE_CONFIG)  # validates the shipped file on the way


def _deployment(doc: dict) -> dict:
    return doc["applications"][0]["deployments"][0]


def test_shipped_serve_config_is_valid(serve_doc):
    dep = _deployment(serve_doc)
    assert dep["name"] == "ConvServe"
    assert dep["max_ongoing_requests"] >= dep["user_config"]["max_batch_size"]
    ServeConfig.model_validate(serve_doc["applications"][0]["args"])


def test_max_ongoing_requests_below_max_batch_size_is_rejected(serve_doc):
    dep = _deployment(serve_doc)
    dep["max_ongoing_requests"] = 8
    dep["user_config"] = {"max_batch_size": 16}
    with pytest.raises(ServeConfigError, match=r"max_ongoing_requests \(8\) must be at least max_batch_size \(16\)"):
        validate_serve_config(serve_doc)
    dep["max_ongoing_requests"] = 16  # equal is enough
    validate_serve_config(serve_doc)
    del dep["max_ongoing_requests"]  # Ray Serve's default (5) is below 16
    with pytest.raises(ServeConfigError, match="max_ongoing_requests"):
        validate_serve_config(serve_doc)


@pytest.mark.parametrize(
    ("where", "patch"),
    [("args", {"bogus": 1}), ("args", {"max_batch_size": 8}), ("user_config", {"max_batch_sise": 8})],
)
def test_unknown_keys_in_the_serve_config_file_are_rejected(serve_doc, where, patch):
    target = serve_doc["applications"][0]["args"] if where == "args" else _deployment(serve_doc)["user_config"]
    target.update(patch)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        validate_serve_config(serve_doc)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bogus": 1},
        {"max_batch_size": 16},  # a batching field at the top level
        {"batching": {"max_batch_size": 16, "bogus": 1}},
        {"limits": {"max_pixels": 10}},
    ],
)
def test_unknown_keys_are_rejected(kwargs):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ServeConfig(**kwargs)


def test_unknown_keys_in_base_are_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ServeConfig.from_env({"batching": {"max_batch_sise": 8}}, environ={})
    with pytest.raises(ValidationError):
        BatchingConfig(bogus=1)
    with pytest.raises(ValidationError):
        Limits(bogus=1)


def test_command_line_replica_resources_reach_the_deployment_options():
    """`--replica-gpus 0.5` (fractional GPUs: two replicas share one card), `--replicas` fixes the count."""
    from service.server import config_from_args, options_from_args, parse_args

    args = parse_args(["--replica-gpus", "0.5", "--replica-cpus", "0.5", "--replicas", "2"])
    opts = options_from_args(args, config_from_args(args))
    assert opts["ray_actor_options"]["num_gpus"] == 0.5
    assert opts["ray_actor_options"]["num_cpus"] == 0.5
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["user_config"]["max_batch_size"] >= 1
    default = options_from_args(parse_args([]), config_from_args(parse_args([])))
    assert "autoscaling_config" in default and "num_replicas" not in default


def test_the_deployment_version_ignores_only_the_batching_settings():
    """Same version -> Serve applies a redeploy by reconfigure(), without restarting replicas: right
    for user_config (batching), wrong for anything the constructor reads (a new token, a bundle)."""
    from service.app import code_version

    base = ServeConfig.from_env({"auth_token": "a"}, environ={})
    same = ServeConfig.from_env({"auth_token": "a", "batching": {"max_batch_size": 8}}, environ={})
    assert code_version(base) == code_version(same)
    for changed in ({"auth_token": "b"}, {"auth_token": "a", "torch_threads": 1}, {"auth_token": "a", "port": 9}):
        assert code_version(ServeConfig.from_env(changed, environ={})) != code_version(base), changed


def test_an_optional_setting_is_turned_off_with_none_and_a_required_one_is_not():
    assert ServeConfig.from_env(environ={"CONVSERVE_INGRESS_GROUP_WAIT_S": "none"}).ingress_group_wait_s is None
    assert ServeConfig.from_env(environ={"CONVSERVE_INGRESS_GROUP_WAIT_S": "0.005"}).ingress_group_wait_s == 0.005
    assert ServeConfig.from_env(environ={}).ingress_group_wait_s == 0.002
    with pytest.raises(ValueError):
        ServeConfig.from_env(environ={"CONVSERVE_REQUEST_TIMEOUT_S": "none"})
