"""The console script on a tiny model: generation works, and bad input gives a clear error."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplex.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_on_tiny_model(tiny_model_factory):
    path = tiny_model_factory("llama")
    r = _run("generate", "--model", str(path), "--max-model-len", "128", "--max-tokens", "5",
             "--raw", "hello")
    assert r.returncode == 0, r.stderr
    assert "### hello" in r.stdout
    assert "5 tokens" in r.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    r = _run("generate", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "neither a model folder nor a .gguf file" in r.stderr
    assert "Traceback" not in r.stderr


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    r = _run("generate", "--model", str(tmp_path))
    assert r.returncode == 2
    assert "unsupported architecture" in r.stderr and "LlamaForCausalLM" in r.stderr
