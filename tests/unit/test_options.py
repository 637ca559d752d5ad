"""One home for options and limits: the models in ``lipsync.options``, the settings that nest
them, and the HTTP form and CLI options derived from them; bad settings are clean errors."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from fastapi import Query

from lipsync.cli import main as cli_main
from lipsync.errors import ConfigError, InvalidInput
from lipsync.options import (
    MAX_OUTPUT_SIZE,
    X264_PRESETS,
    EncoderOptions,
    MotionOptions,
    field_spec,
    option_names,
)
from lipsync.server.schemas import option_param
from lipsync.settings import Settings, env_var, load_settings

BAD_SETTINGS = [
    ("LIPSYNC_SIZE", "1536"),  # within the old settings limit (2048), beyond what requests accept
    ("LIPSYNC_SIZE", "333"),  # odd: H.264 4:2:0 needs even sides
    ("LIPSYNC_PRESET", "bogus"),
    ("LIPSYNC_CRF", "99"),
    ("LIPSYNC_AUDIO_BITRATE", "5"),
    ("LIPSYNC_WORKERS", "0"),
    ("LIPSYNC_FPS", "0"),
    ("LIPSYNC_EXPRESSION_SCALE", "9"),
    ("LIPSYNC_STILL", "maybe"),
    ("LIPSYNC_PORT", "70000"),
]


@pytest.fixture
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.upper().startswith("LIPSYNC_")]:
        monkeypatch.delenv(key)
    return monkeypatch


# --- the models ------------------------------------------------------------------------------
def test_models_validate_on_construction_and_replace():
    assert MotionOptions().size == 512 and EncoderOptions().preset == "ultrafast"
    for bad in ({"size": MAX_OUTPUT_SIZE + 2}, {"size": 511}, {"size": 62}, {"fps": 61}, {"seed": -1},
                {"seed": 2**32}, {"lip_scale": 3.5}, {"expression_scale": -0.1}, {"nope": 1}):
        with pytest.raises(ValueError):
            MotionOptions(**bad)
    with pytest.raises(ValueError):
        dataclasses.replace(MotionOptions(), size=1536)  # replace goes through validation too
    for bad in ({"crf": 52}, {"preset": "turbo"}, {"audio_bitrate": 0}):
        with pytest.raises(ValueError):
            EncoderOptions(**bad)
    assert X264_PRESETS[0] == "ultrafast" and X264_PRESETS[-1] == "veryslow" and len(X264_PRESETS) == 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        MotionOptions().size = 256  # type: ignore[misc]


def test_field_spec_reads_the_model():
    size = field_spec(MotionOptions, "size")
    assert (size.default, size.ge, size.le, size.multiple_of) == (512, 64, MAX_OUTPUT_SIZE, 2)
    assert size.value_type is int and size.range_text() == f"64..{MAX_OUTPUT_SIZE}, even"
    assert field_spec(MotionOptions, "seed").value_type is int  # int | None
    assert field_spec(EncoderOptions, "preset").value_type is str
    assert field_spec(MotionOptions, "still").value_type is bool


# --- settings nest them, flat names keep working ---------------------------------------------------
def test_flat_environment_variables_reach_the_nested_models(clean_env):
    clean_env.setenv("LIPSYNC_SIZE", "256")
    clean_env.setenv("LIPSYNC_SEED", "7")
    clean_env.setenv("LIPSYNC_CRF", "20")
    clean_env.setenv("lipsync_preset", "veryfast")  # case-insensitive, like every other setting
    s = load_settings()
    assert (s.request.size, s.request.seed, s.encoder.crf, s.encoder.preset) == (256, 7, 20, "veryfast")
    # explicit keywords (CLI options) win over the environment
    s = load_settings(size=128, crf=30)
    assert (s.request.size, s.request.seed, s.encoder.crf) == (128, 7, 30)
    # a nested model given whole wins too
    assert Settings(request=MotionOptions(size=64)).request.size == 64


def test_every_option_has_its_flat_variable(clean_env):
    for model, group in ((MotionOptions, "request"), (EncoderOptions, "encoder")):
        for name in option_names(model):
            spec = field_spec(model, name)
            samples = {bool: "false", int: str(int(spec.ge or 0) + 2), float: "0.5", str: "slow"}
            value = samples[spec.value_type]
            clean_env.setenv(env_var(name), value)
            got = getattr(getattr(load_settings(), group), name)
            assert str(got).lower() == value, (name, got)
            clean_env.delenv(env_var(name))


@pytest.mark.parametrize("variable,value", BAD_SETTINGS)
def test_a_bad_setting_is_a_config_error_naming_the_variable(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert f"{variable}={value}" in e.value.message
    assert e.value.detail["variable"] == variable
    assert "\n" not in e.value.message


def test_the_pipeline_refuses_bad_overrides_as_config_errors(clean_env, tmp_path):
    from lipsync.pipeline import LipSyncPipeline

    with pytest.raises(ConfigError, match="LIPSYNC_SIZE=1536"):
        LipSyncPipeline.from_settings(cache_dir=tmp_path, size=1536)
    with pytest.raises(ConfigError, match="LIPSYNC_PRESET=bogus"):
        LipSyncPipeline.from_settings(load_settings(cache_dir=tmp_path), preset="bogus")


def test_request_options_are_validated_by_the_same_model(clean_env, tmp_path):
    from lipsync.pipeline import LipSyncPipeline

    pipe = LipSyncPipeline.from_settings(cache_dir=tmp_path, size=256, seed=3)
    assert pipe.motion_options() == pipe.settings.request == MotionOptions(size=256, seed=3)
    assert pipe.motion_options(lip_scale=2.0, still=None) == MotionOptions(size=256, seed=3, lip_scale=2.0)
    for bad in ({"size": 1536}, {"size": 255}, {"fps": 0}, {"lip_scale": 4.0}):
        with pytest.raises(InvalidInput) as e:
            pipe.motion_options(**bad)
        assert e.value.detail["field"] == next(iter(bad))
    with pytest.raises(InvalidInput, match="unknown option"):
        pipe.motion_options(crf=10)


def test_the_enhancer_setting_is_gone():
    assert "enhancer" not in Settings.model_fields


# --- derived shells: HTTP form and CLI agree with the model ----------------------------------------
def _generate_form_schema() -> dict:
    from lipsync.server.app import create_app

    schema = create_app(Settings(), pipeline_factory=lambda s: None).openapi()
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    return schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]


def test_form_fields_carry_the_model_limits(clean_env):
    from lipsync.server.routes import FORM_OPTIONS

    props = _generate_form_schema()
    assert set(FORM_OPTIONS) == {p for p in props if p in option_names(MotionOptions)}
    for name in FORM_OPTIONS:
        spec, prop = field_spec(MotionOptions, name), props[name]
        assert prop.get("minimum") == spec.ge and prop.get("maximum") == spec.le, name
        assert prop.get("multipleOf") == spec.multiple_of, name
        assert prop["description"] == spec.description
        assert prop["type"] == {bool: "boolean", int: "integer", float: "number"}[spec.value_type]
    assert "fps" not in props  # the HTTP contract: the frame rate is the server's setting


def test_cli_options_carry_the_model_defaults_and_limits():
    params = {p.name: p for p in cli_main.commands["generate"].params}
    for model in (MotionOptions, EncoderOptions):
        for name in option_names(model):
            spec, param = field_spec(model, name), params[name]
            assert isinstance(param, click.Option) and param.default is None  # unset: settings decide
            assert env_var(name) in param.help
            if spec.range_text():
                assert spec.range_text() in param.help
            if spec.value_type is bool:
                assert param.secondary_opts == [f"--no-{name.replace('_', '-')}"]
            else:
                assert param.type.name == {int: "integer", float: "float", str: "text"}[spec.value_type]


@pytest.mark.parametrize("args,needle", [
    (["--size", str(MAX_OUTPUT_SIZE + 2)], f"size (--size {MAX_OUTPUT_SIZE + 2}): must be 64..{MAX_OUTPUT_SIZE}, even"),
    (["--size", "9" * 20], f"must be 64..{MAX_OUTPUT_SIZE}, even"),  # pydantic alone: "multiple of 2"
    (["--expression-scale", "nan"], "must be 0.0..3.0"),  # pydantic alone: "<= 3"
    (["--crf", "99"], "crf (--crf 99): must be 0..51"),
    (["--preset", "bogus"], "preset (--preset bogus)"),
    (["--seed", "-1"], "seed (--seed -1)"),
])
def test_cli_option_beyond_the_model_limit_is_one_error_line(clean_env, tmp_path, args, needle):
    r = CliRunner().invoke(cli_main, ["generate", "--sample", "-o", str(tmp_path / "x.mp4"),
                                      "--cache-dir", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting ") and needle in lines[0], r.stderr
    assert not (tmp_path / "x.mp4").exists()


# --- bad settings at start: CLI and server -----------------------------------------------------------
@pytest.mark.parametrize("variable,value", BAD_SETTINGS[:6])
@pytest.mark.parametrize("command", [["generate", "--sample", "-o", "x.mp4"], ["precompute"], ["serve"]])
def test_cli_refuses_a_bad_variable_with_one_line_and_exit_2(clean_env, tmp_path, variable, value, command):
    clean_env.setenv(variable, value)
    clean_env.chdir(tmp_path)
    r = CliRunner().invoke(cli_main, [*command, "--cache-dir", str(tmp_path)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert f"{variable}={value}" in lines[0], r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize("variable,value", [("LIPSYNC_SIZE", "1536"), ("LIPSYNC_PRESET", "bogus"),
                                            ("LIPSYNC_CRF", "99"), ("LIPSYNC_WORKERS", "0")])
def test_server_process_refuses_to_start(tmp_path, variable, value):
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LIPSYNC_")}
    # port 1 cannot be bound: were the setting let through, the server would fail fast, not hang
    env.update({variable: value, "LIPSYNC_CACHE_DIR": str(tmp_path), "LIPSYNC_PORT": "1"})
    proc = subprocess.run([sys.executable, "-m", "lipsync.server"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"{variable}={value}" in lines[0], proc.stderr


def test_create_app_refuses_bad_environment(clean_env):
    from lipsync.server.app import create_app

    clean_env.setenv("LIPSYNC_SIZE", "1536")
    with pytest.raises(ConfigError, match="LIPSYNC_SIZE=1536"):
        create_app()


SizeQuery = option_param("size", Query)  # module level: annotations here are strings
StillQuery = option_param("still", Query)


def test_option_param_derives_query_parameters_too():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.get("/probe")
    def probe(size: SizeQuery = None, still: StillQuery = None) -> dict:
        return {"size": size, "still": still}

    params = {p["name"]: p for p in app.openapi()["paths"]["/probe"]["get"]["parameters"]}
    spec = field_spec(MotionOptions, "size")
    schema = params["size"]["schema"]
    limits = next((v for v in schema.get("anyOf", []) if v.get("type") == "integer"), schema)
    assert (limits["minimum"], limits["maximum"], limits["multipleOf"]) == (spec.ge, spec.le, spec.multiple_of)
    client = TestClient(app)
    assert client.get("/probe", params={"size": 256, "still": "false"}).json() == {"size": 256, "still": False}
    assert client.get("/probe", params={"size": MAX_OUTPUT_SIZE + 2}).status_code == 422
    assert client.get("/probe").json() == {"size": None, "still": None}
