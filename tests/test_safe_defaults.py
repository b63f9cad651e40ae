"""Safe defaults: checkpoints load without unpickling code, servers bind to 127.0.0.1, ids stay in the output folder."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ribfrac_ray.config import SegmenterConfig
from ribfrac_ray.io.cases import check_public_id
from ribfrac_ray.models.checkpoint import OPTIMIZER_FILE, read_checkpoint, save_checkpoint, segmenter_meta
from ribfrac_ray.models.segmenter import build_segmenter
from ribfrac_ray.prediction.records import output_path, record_path
from ribfrac_ray.runtime import LOOPBACK_ONLY_VARIABLE

PACKAGE = Path(__file__).resolve().parents[1] / "ribfrac_ray"
# Loopback listening addresses as /proc/net/tcp{,6} write them: 127.0.0.1, ::ffff:127.0.0.1 and ::1.
LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
ESCAPING_IDS = ["../evil", "../../evil", "sub/../../evil", "/tmp/evil", "sub/evil"]


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """Return every call in ``tree`` with the dotted name it calls (``torch.load``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found.append((ast.unparse(node.func), node))
    return found


def _package_calls(names: set[str]) -> list[tuple[Path, ast.Call]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        calls.extend((path, call) for name, call in _calls(tree) if name in names)
    return calls


def test_torch_load_always_weights_only():
    unsafe = []
    for path, call in _package_calls({"torch.load", "torch.serialization.load"}):
        value = {keyword.arg: keyword.value for keyword in call.keywords}.get("weights_only")
        if not (isinstance(value, ast.Constant) and value.value is True):
            unsafe.append(f"{path.relative_to(PACKAGE.parent)}:{call.lineno}")
    assert unsafe == []


def test_torch_load_never_imported_bare():
    imports = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
                imports.extend(f"{path.name}:{node.lineno}" for alias in node.names if alias.name == "load")
    assert imports == []


def test_no_pickle_loading_in_package():
    names = {"pickle.load", "pickle.loads", "mlflow.pytorch.load_model", "torch.jit.load", "numpy.load", "np.load"}
    unsafe = []
    for path, call in _package_calls(names):
        allow_pickle = {keyword.arg: keyword.value for keyword in call.keywords}.get("allow_pickle")
        if ast.unparse(call.func) in ("np.load", "numpy.load") and isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False:
            continue
        unsafe.append(f"{path.relative_to(PACKAGE.parent)}:{call.lineno}")
    assert unsafe == []


class _RunsCodeWhenUnpickled:
    """Unpickles by calling os.getcwd, which is harmless but outside torch's allowed globals."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_rejects_pickled_code(tmp_path):
    config = SegmenterConfig(channels=(8, 16, 32))
    save_checkpoint(tmp_path, build_segmenter(config).state_dict(), segmenter_meta(config, (32, 32, 32)))
    torch.save({"state": _RunsCodeWhenUnpickled()}, tmp_path / OPTIMIZER_FILE)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        read_checkpoint(tmp_path)


def test_checkpoint_weights_are_safetensors(tmp_path):
    config = SegmenterConfig(channels=(8, 16, 32))
    save_checkpoint(tmp_path, build_segmenter(config).state_dict(), segmenter_meta(config, (32, 32, 32)))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["meta.json", "model.safetensors"]


@pytest.mark.parametrize("public_id", ESCAPING_IDS)
def test_output_path_rejects_escaping_id(tmp_path, public_id):
    with pytest.raises(ValueError, match="outside"):
        output_path(tmp_path / "out", public_id, ".nii.gz")


@pytest.mark.parametrize("public_id", ESCAPING_IDS)
def test_record_path_rejects_escaping_id(tmp_path, public_id):
    with pytest.raises(ValueError, match="outside"):
        record_path(tmp_path / "out", public_id)


@pytest.mark.parametrize("public_id", [*ESCAPING_IDS, "..", "RibFrac 1", "RibFracé1", ".hidden", ""])
def test_public_id_check_rejects_unsafe_id(public_id):
    assert check_public_id(public_id, f"{public_id}-image.nii.gz") is not None


def test_public_id_check_accepts_ribfrac_id():
    assert check_public_id("RibFrac101", "RibFrac101-image.nii.gz") is None


# Started in a subprocess, because the tests' own Ray instance is already running.
LISTENING_SCRIPT = """
import json, os
from pathlib import Path

import ray

from ribfrac_ray.config import RayConfig
from ribfrac_ray.runtime import init_ray


def session_pids(session_id):
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:
            pids.append(stat.parent.name)
    return pids


init_ray(RayConfig(num_cpus=1), include_dashboard=True)
ray.get(ray.remote(lambda: 1).remote())
inodes = set()
for pid in session_pids(os.getsid(0)):
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
listening = []
for table in ("tcp", "tcp6"):
    for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        columns = line.split()
        if columns[3] == "0A" and columns[9] in inodes:
            listening.append(columns[1])
print(json.dumps(listening))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only():
    temp_dir = tempfile.mkdtemp(prefix="rfb", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", LOOPBACK_ONLY_VARIABLE)}
    env["RAY_TMPDIR"] = temp_dir
    try:
        result = subprocess.run(
            [sys.executable, "-c", LISTENING_SCRIPT], env=env, capture_output=True, text=True, timeout=180, start_new_session=True
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]

    listening = json.loads(result.stdout.strip().splitlines()[-1])
    hosts = {address.split(":")[0] for address in listening}
    assert len(listening) >= 3
    assert hosts <= LOOPBACK_HEX, listening
