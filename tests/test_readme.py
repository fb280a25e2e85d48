"""The README's Python snippets run as written, without network, and what the package ships."""
import importlib.resources
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import timm
from safetensors.torch import save_file

import vitadapter  # noqa: F401  (registers the models with timm)
from local_server import LocalServer

README = Path(__file__).parents[1] / "README.md"
SNIPPET = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def python_snippets() -> list[str]:
    return [textwrap.dedent(code) for _, code in SNIPPET.findall(README.read_text())]


def test_readme_snippets_run_offline(tmp_path):
    """All snippets in order in one fresh interpreter, as a reader pastes them. Downloads go to a
    stand-in Hub on 127.0.0.1 that serves the timm DeiT-T file the default tag of vit_adapter_t
    names (random values, timm's layout)."""
    snippets = python_snippets()
    assert len(snippets) >= 3
    trunk = timm.models.get_pretrained_cfg("vit_adapter_t").hf_hub_id
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), tmp_path / "deit.safetensors")
    files = {f"/{trunk}/resolve/main/model.safetensors": (tmp_path / "deit.safetensors").read_bytes()}
    script = tmp_path / "readme.py"
    script.write_text("namespace = {}\n" + "".join(
        f"exec(compile({code!r}, 'README.md snippet {i + 1}', 'exec'), namespace)\n" for i, code in enumerate(snippets)
    ))
    with LocalServer(files) as server:
        env = dict(
            os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
            TORCH_HOME=str(tmp_path / "torch"), HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1",
        )
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("GET", f"/{trunk}/resolve/main/model.safetensors") in server.requests
    assert (tmp_path / "my-vit-adapter-t" / "config.json").is_file()


def test_package_ships_type_hints_catalog_and_sample_image():
    package = importlib.resources.files("vitadapter")
    for name in ("py.typed", "catalog.json", "assets/chelsea.png"):
        assert (package / name).is_file(), name
