"""cluster.yaml / cluster-onprem.yaml / .rayignore checked with Ray's own code: the schema that ships inside
Ray, the config preparation `ray up` runs before launching anything, and the packaging `ray job submit
--working-dir` uses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray._private.runtime_env.packaging import create_package

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster-onprem.yaml"]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def pinned(requirement_prefix: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [d for d in deps if re.match(rf"{re.escape(requirement_prefix)}(\[|==)", d)]
    return req.split("==", 1)[1]


def all_commands(cfg: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]  # fmt: skip
    return [c for k in keys for c in cfg.get(k) or []]


@pytest.mark.parametrize("name", CONFIGS)
def test_validates_against_ray_schema(name):
    cfg = load(name)
    jsonschema.validate(cfg, SCHEMA)
    # What `ray up` does before it touches a cloud: merge provider defaults, then validate the result.
    prepared = prepare_config(cfg)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_rejects_a_broken_config():
    cfg = load("cluster.yaml")
    cfg["available_node_types"]["head.cpu"]["min_wrokers"] = 0  # typo'd key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", CONFIGS)
def test_versions_match_the_project(name):
    cmds = "\n".join(all_commands(load(name)))
    assert pinned("ray") == ray.__version__
    assert f'"ray[default,train,tune]=={ray.__version__}"' in cmds
    # The GPU build of the project's exact torch pin, from PyTorch's CUDA wheel index.
    torch_line = next(c for c in all_commands(load(name)) if f'"torch=={pinned("torch")}"' in c)
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+", torch_line), torch_line
    assert "-e ~/looplaw" in cmds


@pytest.mark.parametrize("name", CONFIGS)
def test_token_auth_on_and_dashboard_not_exposed(name):
    cfg = load(name)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    # Every node gets the same token the user's `ray job submit` / `ray dashboard` use.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # No extra inbound rules: Ray's AWS security group then allows SSH and intra-cluster traffic only.
    extra = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(r.get("IpRanges") for r in extra)


def test_aws_node_types():
    cfg = load("cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert re.match(r"^[mcr]\d", head["node_config"]["InstanceType"]), "head must be a CPU instance"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert re.match(r"^(g|p)\d", t["node_config"]["InstanceType"]), f"{name} must be a GPU instance"
        # Workers write results/checkpoints to S3 themselves.
        assert "IamInstanceProfile" in t["node_config"], name


@pytest.mark.parametrize("name,scheme", [("cluster.yaml", "s3://"), ("cluster-onprem.yaml", "/")])
def test_shared_storage_named_once(name, scheme):
    text = (REPO / name).read_text()
    values = re.findall(r"LOOPLAW_STORAGE=(\S+?)'", text)
    assert len(values) == 1, values
    assert values[0].startswith(scheme)


@pytest.mark.parametrize("name", CONFIGS)
def test_code_mounts_are_what_pip_install_needs(name):
    """Every package of the project plus its pyproject/readme is mounted, and nothing else of the checkout: `ray up`
    hashes all mounted files, so mounting "." would hash (and resync on every change of) .venv and results."""
    cfg = load(name)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", project["project"]["readme"], *packages]
    code = {remote: local for remote, local in cfg["file_mounts"].items() if remote.startswith("~/looplaw")}
    assert code == {f"~/looplaw/{n}": f"./{n}" for n in needed}
    for local in code.values():
        assert (REPO / local).exists(), local
    assert "**/__pycache__" in cfg["rsync_exclude"]


@pytest.mark.parametrize("name", CONFIGS)
def test_env_file_reaches_login_shells(name, tmp_path):
    """The first two setup commands, run as the autoscaler runs them (bash --login -i), must export the
    storage and auth variables even behind Ubuntu's 'not interactive: return' guard."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text('if [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ]; then . "$HOME/.bashrc"; fi\n')
    (home / ".bashrc").write_text("case $- in\n  *i*) ;;\n  *) return;;\nesac\n")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for cmd in load(name)["setup_commands"][:2]:
        subprocess.run(["bash", "-c", cmd], env=env, check=True)
    for flags in (["--login", "-c"], ["--login", "-c", "-i"]):
        out = subprocess.run(["bash", *flags, "echo $RAY_AUTH_MODE $LOOPLAW_STORAGE $LOOPLAW_DATA_ROOT"],
                             env=env, capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "token" and out[1], out
        if name == "cluster-onprem.yaml":  # prepared data on the shared mount, so every node's workers find it
            assert out[2] == out[1] + "/data", out


def _package(root: Path, tmp_path: Path, include_gitignore: bool) -> list[str]:
    target = tmp_path / "pkg.zip"
    create_package(str(root), target, include_gitignore=include_gitignore)
    with zipfile.ZipFile(target) as z:
        return z.namelist()


def test_rayignore_keeps_outputs_and_envs_out(tmp_path):
    tree = tmp_path / "tree"
    keep = ["tuning/sweep.py", "tuning/configs/laptop.yaml", "training/results_store.py", "cluster.yaml"]
    drop = [".venv/lib/site.py", ".git/HEAD", "results/runs/a.parquet", "runs/x/events.out", "checkpoints/c.pt",
            "models/__pycache__/m.cpython-311.pyc", "looplaw.egg-info/PKG-INFO", ".pytest_cache/v"]
    for p in keep + drop:
        (tree / p).parent.mkdir(parents=True, exist_ok=True)
        (tree / p).write_text("x")
    (tree / ".rayignore").write_text((REPO / ".rayignore").read_text())
    names = _package(tree, tmp_path, include_gitignore=False)  # .rayignore alone must do the job
    for p in keep:
        assert p in names, p
    for p in drop:
        assert p not in names, p


def test_repo_working_dir_package_is_small(tmp_path):
    names = _package(REPO, tmp_path, include_gitignore=True)
    assert "cluster.yaml" in names and "pyproject.toml" in names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)
    size = (tmp_path / "pkg.zip").stat().st_size
    assert size < 20 * 2**20, f"working-dir package is {size / 2**20:.1f} MiB"


def test_reference_spec_data_is_where_aws_nodes_sync_it():
    """Train workers read the prepared data from local disk; cluster.yaml copies it to the same path on every
    node, which must be where the reference sweep spec looks for it."""
    spec_path = REPO / "tuning" / "configs" / "reference.yaml"
    if not spec_path.exists():
        pytest.skip("tuning/configs/reference.yaml not present")
    data = yaml.safe_load(spec_path.read_text())["data"]
    (sync,) = [c for c in load("cluster.yaml")["setup_commands"] if c.startswith("aws s3 sync")]
    target = sync.split()[4]
    assert data.startswith(target.rstrip("/") + "/"), (data, sync)
