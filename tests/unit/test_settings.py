"""One settings object: product defaults, LIPSYNC_ environment, clear errors; lazy engines."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lipsync.engines.base import available_engines, engine_class
from lipsync.errors import ConfigError
from lipsync.pipeline import LipSyncPipeline
from lipsync.settings import Settings


def test_defaults_are_the_product_description(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("LIPSYNC_")]:
        monkeypatch.delenv(key)
    s = Settings()
    assert (s.request.size, s.request.fps, s.encoder.crf, s.encoder.preset) == (512, 25, 26, "ultrafast")
    r = s.request
    assert (r.expression_scale, r.lip_scale, r.still, r.blink) == (0.3, 1.0, True, True)
    assert (s.engine, s.port, s.host) == ("classic", 7002, "127.0.0.1")
    assert s.chunk_seconds <= 3.0


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("LIPSYNC_EXPRESSION_SCALE", "0.7")
    monkeypatch.setenv("LIPSYNC_STILL", "false")
    s = Settings()
    assert s.request.expression_scale == 0.7 and s.request.still is False


@pytest.mark.parametrize("overrides,needle", [
    ({"size": 333}, "size"),
    ({"chunk_seconds": 5.0}, "chunk_seconds"),
    ({"port": 0}, "port"),
])
def test_invalid_settings_are_config_errors(tmp_path, overrides, needle):
    with pytest.raises(ConfigError) as e:
        LipSyncPipeline.from_settings(cache_dir=tmp_path, **overrides)
    assert needle in e.value.message


def test_unknown_engine_names_the_choices():
    with pytest.raises(ConfigError) as e:
        engine_class("nope")
    assert "classic" in e.value.message and "sadtalker" in e.value.message
    assert set(available_engines()) >= {"classic", "sadtalker"}


def test_classic_path_never_imports_torch(tmp_path):
    code = (
        "import sys\n"
        "from lipsync.pipeline import LipSyncPipeline, bundled_sample\n"
        f"p = LipSyncPipeline.from_settings(cache_dir={str(tmp_path)!r})\n"
        f"p.generate(bundled_sample('speech.wav'), {str(tmp_path / 'o.mp4')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
