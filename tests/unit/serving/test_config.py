"""Serve app arguments: text from the command line, YAML from config.yaml, refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oppu.errors import ConfigError
from oppu.serving.config import load_serve_config

ROOT = Path(__file__).resolve().parents[3]


def test_command_line_text_values_are_coerced_and_model_id_defaults_to_dir_name():
    config = load_serve_config({"model": "runs/q/base/", "store": "s3://b/adapters", "gpu_slots": "16",
                                "target_modules": "q_proj,v_proj,o_proj", "request_timeout_s": "0.5"})
    assert (config.gpu_slots, config.request_timeout_s) == (16, 0.5)
    assert config.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert config.base_model_id == "base"


@pytest.mark.parametrize("args, named", [
    ({"bogus": 1}, "bogus"),
    ({"gpu_slots": "many"}, "gpu_slots"),
    ({"gpu_slots": 4, "max_batch_size": 8}, "gpu_slots (4) must be >= max_batch_size (8)"),
    ({"model_id": "a:b"}, "must not contain ':'"),
    ({"max_tokens_limit": 8}, "default_max_tokens"),
])
def test_bad_arguments_name_the_key(args, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_serve_config({"model": "m", "store": "s"} | args)


def test_shipped_serve_config_validates():
    shipped = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    (app,) = shipped["applications"]
    assert app["import_path"] == "serve_apps.oppu_serve:build"
    config = load_serve_config(app["args"])
    assert config.gpu_slots >= config.max_batch_size


def test_log_settings_become_ray_serves_logging_config_of_both_deployments():
    from serve_apps.oppu_serve import build

    app = build({"model": "m", "store": "s", "task": "LaMP-2M", "log_level": "DEBUG", "log_encoding": "JSON",
                 "access_log": "false"})
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    for deployment in (ingress, model):
        logging_config = deployment._deployment_config.logging_config
        assert (logging_config["log_level"], logging_config["encoding"]) == ("DEBUG", "JSON")
        assert logging_config["enable_access_log"] is False
    with pytest.raises(ConfigError, match="log_encoding"):
        load_serve_config({"model": "m", "store": "s", "log_encoding": "XML"})


@pytest.mark.parametrize(("args", "model_surge"), [
    ({}, 100),  # one replica: its replacement is ready before it stops
    ({"num_replicas": "2"}, 0),  # one at a time, the other answering; no extra replica needed
    ({"num_replicas": "2", "max_surge_percent": "50"}, 50),
    ({"max_surge_percent": "0"}, 0),
])
def test_an_in_place_redeploy_keeps_a_replica_answering(args, model_surge):
    from serve_apps.oppu_serve import build

    app = build({"model": "m", "store": "s", "task": "LaMP-2M"} | args)
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert model._deployment_config.max_surge_percent == model_surge
    assert ingress._deployment_config.max_surge_percent == 100
    with pytest.raises(ConfigError, match="max_surge_percent"):
        load_serve_config({"model": "m", "store": "s", "max_surge_percent": "150"})
