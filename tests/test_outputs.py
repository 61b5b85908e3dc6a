"""A command replaces only what it made (pipeline/outputs.py): every writing command × every kind of target.

For every case: either the command's own artifact is replaced (exit 0), or the command stops with
exit 2 and one line, and every byte of every file under the test's folder is as it was. Plus the
mechanics: one writer at a time, complete or untouched, what a killed writer left, private locks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, make_image_folder, needs_onnx, only_run, write_params
from mixer.errors import MixerError
from pipeline.cli import app
from pipeline.outputs import FIGURES, MODEL, PREDICTIONS, PREPARED, REPORT, Plan, Target, writing

TINY = ["--depth", "1", "--dim", "16", "--batch-size", "8", "--warmup-step", "0", "--num-steps", "1",
        "--no-progress"]


def snapshot(root: Path) -> dict:
    """Every entry under `root` (links not followed, FIFOs never opened): bytes, link target or kind."""
    seen = {}
    for (folder, dirs, files) in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                seen[str(path)] = ("link", os.readlink(path))
            else:
                seen[str(path)] = ("kind", stat.S_IFMT(st.st_mode))
    return seen


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A project after prepare, train and evaluate, plus a timm weights file and an export."""
    from safetensors.torch import save_file

    from reference import as_timm, random_weights

    root = tmp_path_factory.mktemp("outputs") / "p"
    root.mkdir()
    make_image_folder(root / "images", {"a": 10, "b": 10}, size=(8, 8))
    write_params(root / "params.yaml", data="images", image_shape=[8, 8], patch_shape=[2, 2], num_classes=2,
                 num_steps=1)
    save_file({k: v.contiguous() for (k, v) in as_timm(random_weights(3, (2, 2), 16, 8, 8, 32, 1, 2)).items()},
              str(root / "w.safetensors"))
    (root / "notes.txt").write_text("a user's notes")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        runner = CliRunner()
        for args in (["prepare", "--workers", "1"], ["train", *TINY], ["evaluate"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MIXER_LOCKS", str(tmp_path.parent / f"locks-{tmp_path.name}"))
    return root


# ---- the table --------------------------------------------------------------------------------

# How each command is pointed at a target: (its arguments, with {T} for the target; the target when the
# command's path is fixed, else None; whether the target is a folder). {seed} and {cls} make a second
# run's artifact differ from the first's.
COMMANDS = {
    "train": (["train", *TINY, "--seed", "{seed}", "--output-dir", "{T}"], None, True),
    "import-weights": (["import-weights", "w.safetensors", "{T}", "--force"], None, True),
    "predict": (["predict", "images/{cls}", "--model", "output", "--out", "{T}"], None, False),
    "export": (["export", "--model", "output"], "output/model.onnx", False),
    "prepare": (["prepare", "--workers", "1", "--seed", "{seed}"], "prepared", True),
    "evaluate": (["evaluate"], "reports/metrics.json", False),
    "evaluate-figures": (["evaluate"], "reports/figures", True),
    "check": (["check"], "reports/params-check.txt", False),
}
CHOSEN = [c for (c, (_, fixed, _)) in COMMANDS.items() if fixed is None]  # the user names the path

# The kinds of target, made by `make`; the last group only where the user names the path.
KINDS = ["missing", "empty folder", "own artifact", "user's folder", "user's file", "input", "device", "FIFO",
         "socket", "link to user's file", "broken link", "project root", "ancestor", "data", "prepared",
         "checkpoints", "reports", "package source", "user's leftover beside", "own artifact with a user's file",
         "user's file made to look ours"]
ONLY_CHOSEN = {"project root", "ancestor", "data", "prepared", "checkpoints", "reports", "package source"}


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def command_args(command: str, target: str, run: int = 0) -> list[str]:
    args, _, _ = COMMANDS[command]
    return [a.format(T=target, seed=run, cls="ab"[run % 2]) for a in args]


CHOSEN_PATHS = {"project root": ".", "ancestor": "..", "data": "data/model", "prepared": "prepared",
                "checkpoints": "checkpoints/x", "reports": "reports/train", "package source": str(ROOT / "mixer")}
# What makes a target one of the command's inputs: the target to give, and options to add.
INPUTS = {"train": ("output", ["--checkpoint", "output"]), "import-weights": ("w.safetensors", []), "predict": ("images/a/img000.png", []),
          "prepare": ("prepared", ["--data", "prepared"]),
          "evaluate-figures": ("reports/figures", ["--output-dir", "reports/figures"])}


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def make(kind: str, command: str, project: Path) -> tuple[str, list[str], bool]:
    """Put a target of `kind` where `command` writes: the path to give, extra options, and whether success is due."""
    _, fixed, folder = COMMANDS[command]
    target = fixed or "target"
    path = project / target
    if kind in CHOSEN_PATHS:
        return CHOSEN_PATHS[kind], [], False
    if kind == "input":
        if command not in INPUTS:
            pytest.skip(f"no input of {command} can be where it writes")
        return (*INPUTS[command], False)
    if kind.startswith("own artifact"):
        if fixed is None or not path.exists():  # made by running the command once
            code, output = invoke(command_args(command, target, run=1))
            assert code == 0, output
        if kind == "own artifact":
            return target, [], True
        if not folder:
            pytest.skip("a file holds no other file")
        (path / ".notes.tmp").write_text("named like a temporary, but a user's")  # hidden, and ours by no record
        (path / f".{path.name}.mine.partial").mkdir()
        return target, [], False
    if kind == "user's file made to look ours":
        if command != "predict":
            pytest.skip("only predictions files are recognised by a header a user could copy")
        path.write_text("path,notes,error\nmy,important,data\n")
        return target, [], False
    remove(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return target, [], True
    if kind == "user's leftover beside":  # named like what a killed writer leaves, but a user's: never touched
        (path.parent / f".{path.name}.old-2024").mkdir()
        (path.parent / f".{path.name}.old-2024" / "backup.txt").write_text("keep me")
        (path.parent / f".{path.name}.abc.partial").write_text("a user's file")
        return target, [], True
    if kind == "empty folder":
        path.mkdir()
        return target, [], folder
    if kind == "user's folder":
        path.mkdir()
        (path / "thesis.tex").write_text("years of work")
    elif kind == "user's file":
        path.write_text("my own file")
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        try:
            server.bind(os.path.relpath(path))
        except OSError:
            pytest.skip("socket path too long here")
        server.close()
    elif kind == "link to user's file":
        path.symlink_to(project / "notes.txt")
    elif kind == "broken link":
        path.symlink_to(project / "nowhere")
    return target, [], False


CASES = [pytest.param(c, k, marks=needs_onnx) if c == "export" else (c, k)
         for c in COMMANDS for k in KINDS if k not in ONLY_CHOSEN or c in CHOSEN]


@pytest.mark.parametrize(("command", "kind"), CASES)
def test_a_command_replaces_only_what_it_made(project, command, kind):
    target, extra, due = make(kind, command, project)
    before = snapshot(project.parent)
    made = project / target
    inode = os.stat(made).st_ino if os.path.exists(made) else None
    code, output = invoke(command_args(command, target) + extra)
    if due:
        assert code == 0, output
        assert made.exists() and (inode is None or os.stat(made).st_ino != inode), "the artifact was not replaced"
        if kind == "user's leftover beside":
            assert (made.parent / f".{made.name}.old-2024" / "backup.txt").read_text() == "keep me"
            assert (made.parent / f".{made.name}.abc.partial").read_text() == "a user's file"
        return
    assert code == 2, output
    assert output.startswith("error: ") and len(output.strip().splitlines()) == 1, output
    assert WHY.get(kind, "") in output, output
    assert snapshot(project.parent) == before, "a refused command changed files"


# What the one line says, by kind of target (each a different rule of pipeline/outputs.py).
WHY = {"device": "is a character device", "FIFO": "is a FIFO", "socket": "is a socket",
       "broken link": "is a link to nothing", "input": "an input of this command",
       "project root": "is the project folder", "ancestor": "a folder that holds the project",
       **{k: "one of the project's own folders" for k in ("data", "prepared", "checkpoints", "reports",
                                                          "package source")}}


def test_every_writing_command_is_in_the_table():
    """A new writing command must join the table: every call of `writing` is one of these."""
    callers = {p.stem for p in (ROOT / "pipeline").glob("*.py") if "writing(" in p.read_text() and p.stem != "outputs"}
    assert callers == {"train", "weights", "predict", "export", "prepare", "evaluate", "check"}


# ---- through DVC: the params that name paths ----------------------------------------------------

# (in tests/test_e2e.py: dvc exp run -S output_dir=data / =mixer / =reports and -S checkpoint=output)


# ---- a mount point is filled in place ----------------------------------------------------------

def test_a_mount_point_is_filled_in_place(project, monkeypatch):
    """os.rename of a mount point fails (EBUSY); here the rename is made to fail as it would."""
    import pipeline.outputs as outputs

    (project / "mnt").mkdir()
    real = os.path.realpath(project / "mnt")
    ismount = os.path.ismount
    monkeypatch.setattr(outputs.os.path, "ismount", lambda p: os.path.realpath(p) == real or ismount(p))
    rename = os.rename

    def no_rename_of_the_mount(src, dst, *args, **kwargs):
        if real in (os.path.realpath(src), os.path.realpath(dst)):
            raise OSError(16, "Device or resource busy", str(src))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "rename", no_rename_of_the_mount)
    for seed in ("1", "2"):
        code, output = invoke(["train", *TINY, "--seed", seed, "--output-dir", "mnt"])
        assert code == 0, output
    assert sorted(os.listdir(project / "mnt")) == ["config.json", "model.safetensors"]


# ---- the mechanics ---------------------------------------------------------------------------------

HOLD = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.outputs import PREPARED, Plan, Target, writing
with writing("mixer prepare", Plan((Target(Path({target!r}), PREPARED),))) as staging:
    (staging.dir(Path({target!r})) / "images.npy").write_text("new")
    Path({ready!r}).write_text("locked")
    while not Path({release!r}).exists():
        time.sleep(0.02)
    if {crash!r}:
        os.kill(os.getpid(), 9)
"""


def hold(tmp_path: Path, target: Path, crash: bool = False) -> tuple[subprocess.Popen, Path]:
    ready, release = tmp_path / "ready", tmp_path / "release"
    code = HOLD.format(root=str(ROOT), target=str(target), ready=str(ready), release=str(release), crash=crash)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path)
    while not ready.exists():
        assert holder.poll() is None, "the holder died"
        time.sleep(0.02)
    return holder, release


def prepared_plan(target: Path) -> Plan:
    return Plan((Target(target, PREPARED),))


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working directory, with a lock folder of its own."""
    monkeypatch.setenv("MIXER_LOCKS", str(tmp_path / "locks"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_second_writer_stops_at_once_and_names_the_first(here):
    target = here / "prepared"
    holder, release = hold(here, target)
    try:
        with pytest.raises(MixerError) as caught:
            with writing("mixer prepare", prepared_plan(target)):
                pass
        assert str(caught.value) == (f"prepared is being written by another mixer prepare (pid {holder.pid}); "
                                     "wait for it to finish or stop it")
    finally:
        release.write_text("")
        holder.wait(timeout=20)
    with writing("mixer prepare", prepared_plan(target)):  # released with its process
        pass


def test_a_killed_writer_leaves_the_target_whole_and_the_next_removes_only_what_it_listed(here):
    target = here / "prepared"
    target.mkdir()
    (target / "images.npy").write_text("old")
    (here / ".prepared.old-2024").mkdir()  # a user's backup, named like a leftover
    (here / ".prepared.mine.partial").write_text("a user's")
    holder, release = hold(here, target, crash=True)
    release.write_text("")
    assert holder.wait(timeout=20) == -signal.SIGKILL
    assert (target / "images.npy").read_text() == "old"  # untouched by the killed writer
    left = sorted(p.name for p in here.glob(".prepared.*"))
    assert len(left) == 3, left  # the killed writer's staging folder, and the user's two
    with writing("mixer prepare", prepared_plan(target)) as staging:
        (staging.dir(target) / "images.npy").write_text("new")
    assert (target / "images.npy").read_text() == "new"
    assert sorted(p.name for p in here.glob(".prepared.*")) == [".prepared.mine.partial", ".prepared.old-2024"]


def test_a_folder_caught_mid_swap_is_put_back(here, monkeypatch):
    """Killed between its two renames, the target is missing; the next writer renames the old one back."""
    import pipeline.outputs as outputs

    target = here / "prepared"
    target.mkdir()
    (target / "images.npy").write_text("previous")
    rename = os.rename

    def die_after_first(src, dst):
        rename(src, dst)
        if Path(dst).name.startswith(".prepared.old-"):
            raise KeyboardInterrupt  # stands in for the kill: nothing after this runs

    monkeypatch.setattr(outputs.os, "rename", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        with writing("mixer prepare", prepared_plan(target)) as staging:
            (staging.dir(target) / "images.npy").write_text("new")
    monkeypatch.setattr(outputs.os, "rename", rename)
    assert not target.exists()
    with writing("mixer prepare", prepared_plan(target)):
        assert (target / "images.npy").read_text() == "previous"


def test_failure_leaves_the_targets_as_they_were(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_LOCKS", str(tmp_path / "locks"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"format": "mlp-mixer"}')
    with pytest.raises(RuntimeError):
        with writing("test", Plan((Target(target, MODEL),), places=())) as staging:
            (staging.dir(target) / "half.txt").write_text("half")
            raise RuntimeError("the work failed")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locks", "out"]


def test_a_full_disk_is_one_line_and_replaces_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_LOCKS", str(tmp_path / "locks"))
    report = tmp_path / "metrics.json"
    report.write_text('{"accuracy": 0.5}')
    with pytest.raises(MixerError, match="No space left on device; nothing was replaced"):
        with writing("test", Plan((Target(report, REPORT),), places=())) as staging:
            staging.file(report)
            raise OSError(28, "No space left on device", str(report))
    assert report.read_text() == '{"accuracy": 0.5}'


def test_staged_folders_get_the_users_umask_and_keep_dvcs_gitignore(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_LOCKS", str(tmp_path / "locks"))
    target = tmp_path / "figures"
    target.mkdir()
    (target / ".gitignore").write_text("/confusion.png\n")
    old = os.umask(0o022)
    try:
        with writing("test", Plan((Target(target, FIGURES),), places=())) as staging:
            (staging.dir(target) / "confusion.png").write_bytes(b"png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert (target / ".gitignore").read_text() == "/confusion.png\n"


def test_a_linked_output_folder_is_written_where_the_link_points(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_LOCKS", str(tmp_path / "locks"))
    (tmp_path / "big-disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "big-disk")
    with writing("test", Plan((Target(tmp_path / "out", MODEL),), places=())) as staging:
        (staging.dir(tmp_path / "out") / "config.json").write_text("{}")
    assert (tmp_path / "out").is_symlink() and (tmp_path / "big-disk" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("problem", ["open to others", "a link", "another user's"])
def test_a_lock_folder_that_is_not_private_is_refused(tmp_path, monkeypatch, problem):
    folder = tmp_path / "locks"
    if problem == "open to others":
        folder.mkdir(mode=0o777)
        os.chmod(folder, 0o777)
    elif problem == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534)
    monkeypatch.setenv("MIXER_LOCKS", str(folder))
    with pytest.raises(MixerError, match="is not private"):
        with writing("test", Plan((Target(tmp_path / "p.csv", PREDICTIONS),), places=())):
            pass


def test_an_owner_record_that_is_a_link_is_replaced_not_followed(tmp_path, monkeypatch):
    """Someone who could plant a link in the lock folder still cannot make us write through it."""
    import hashlib as h

    folder = tmp_path / "locks"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("MIXER_LOCKS", str(folder))
    target = tmp_path / "p.csv"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    key = h.sha256(os.fsencode(target)).hexdigest()[:20]
    (folder / f"{key}.owner").symlink_to(victim)
    with writing("test", Plan((Target(target, PREDICTIONS),), places=())):
        pass
    assert victim.read_text() == "precious" and not (folder / f"{key}.owner").is_symlink()


def test_a_checkpoint_inside_the_runs_own_folder_is_refused(project):
    """The run writes checkpoints/<output_dir>/<run>/ (best/ too): after a kill it would start from other weights."""
    best = only_run(project / "checkpoints" / "output") / "best"
    assert (best / "model.safetensors").is_file()
    before = snapshot(project.parent)
    for checkpoint in (str(best), "output", str(project / "output")):
        code, output = invoke(["train", *TINY, "--checkpoint", checkpoint])
        assert code == 2 and "an input of this command" in output, output
    assert snapshot(project.parent) == before


# ---- a property: whatever path a user gives, nothing the project did not make changes -------------

PARTS = ["..", ".", "data", "mixer", "reports", "prepared", "checkpoints", "output", "notes.txt", "images", "a",
         "new", "link", "w.safetensors", "x.csv", "reports/train", "/"]
MADE = ("prepared/", "output/", "reports/", "checkpoints/")  # the project's own artifacts (DVC's and git's)


def user_files(root: Path) -> dict:
    return {k: v for (k, v) in snapshot(root).items() if not os.path.relpath(k, root / "p").startswith(MADE)}


def test_for_any_output_path_nothing_the_project_did_not_make_changes(template, tmp_path_factory, monkeypatch):
    from hypothesis import HealthCheck, example, given, settings, strategies as st

    outcomes = []
    monkeypatch.setenv("MIXER_LOCKS", str(tmp_path_factory.mktemp("locks")))
    valid = {("predict", "x.csv"), ("import-weights", "new"), ("check", "output")}  # each command's plain case

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(command=st.sampled_from(["predict", "import-weights", "check"]),
           parts=st.lists(st.sampled_from(PARTS), min_size=1, max_size=3), absolute=st.booleans())
    @example(command="predict", parts=["x.csv"], absolute=False)
    @example(command="import-weights", parts=["new"], absolute=False)
    @example(command="check", parts=["output"], absolute=False)
    def one(command, parts, absolute):
        root = tmp_path_factory.mktemp("case")
        project = root / "p"
        shutil.copytree(template, project, symlinks=True)
        (project / "link").symlink_to("images")
        path = "/".join(parts).replace("//", "/")
        target = str(project / path) if absolute and not path.startswith("/") else path
        args = {"predict": ["predict", "images/a", "--model", "output", "--out", target],
                "import-weights": ["import-weights", "w.safetensors", target, "--force"],
                "check": ["check", "--output-dir", target]}[command]
        before = user_files(root)
        cwd = os.getcwd()
        os.chdir(project)
        try:
            code, output = invoke(args)
        finally:
            os.chdir(cwd)
        assert code in (0, 2), output
        if (command, path) in valid and not absolute:
            assert code == 0, (args, output)  # a path the rule must allow: refusing everything fails here
        if code == 2:
            assert output.startswith("error: ") and len(output.strip().splitlines()) == 1, output
        after = user_files(root)
        assert {k: v for (k, v) in after.items() if k in before} == before, (args, output)
        outcomes.append((command, code))

    one()
    # a rule that refused (or allowed) everything proves nothing: each command both allowed and refused paths
    assert {(c, code) for (c, code) in outcomes} == {(c, code) for c in ("predict", "import-weights", "check")
                                                     for code in (0, 2)}, outcomes


def test_a_killed_export_neither_blocks_nor_is_blocked_by_training(project):
    """export stages model.onnx inside the model folder and locks that folder: the next train removes the leftover."""
    script = f"""
import os, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from pipeline.outputs import ONNX, Plan, Target, writing
with writing("mixer export", Plan((Target(Path("output/model.onnx"), ONNX, "--model"),), locks=(Path("output"),))) as s:
    s.file(Path("output/model.onnx")).write_bytes(b"half")
    os.kill(os.getpid(), 9)
"""
    assert subprocess.run([sys.executable, "-c", script], cwd=project).returncode == -signal.SIGKILL
    assert [p.name for p in (project / "output").glob(".model.onnx.*.partial")]
    code, output = invoke(["train", *TINY, "--seed", "3"])
    assert code == 0, output
    assert sorted(os.listdir(project / "output")) == ["config.json", "model.safetensors"]


def test_export_is_one_of_the_writers_of_the_model_folder(project):
    with writing("mixer export", Plan((Target(project / "output" / "model.onnx", REPORT),),
                                      locks=(project / "output",), places=())):
        code, output = invoke(["train", *TINY])
    assert code == 2 and "being written by another mixer export" in output, output


def test_export_next_to_a_model_in_a_project_folder_is_refused(project):
    shutil.copytree(project / "output", project / "data" / "m")
    before = snapshot(project.parent)
    code, output = invoke(["export", "--model", "data/m"])
    assert code == 2 and "one of the project's own folders" in output, output
    assert snapshot(project.parent) == before


def test_a_params_file_that_is_a_fifo_is_one_line_not_a_hang(project):
    os.mkfifo(project / "params.fifo")
    code, output = invoke(["check", "--params", "params.fifo"])
    assert code == 2 and "is not a regular file" in output, output


@pytest.mark.parametrize("args", [["check", "--output-dir", "a\0b"], ["check", "--checkpoint", "w\0.safetensors"]])
def test_a_nul_byte_in_a_path_is_one_line(project, args):
    code, output = invoke(args)
    assert code == 2 and "holds a NUL byte" in output, output


def test_a_finished_writer_leaves_no_record_that_could_delete_a_users_folder_later(project):
    """A record is the list of what to clean up after a kill: a writer that finished clears it."""
    assert invoke(["evaluate"])[0] == 0
    locks = Path(os.environ["MIXER_LOCKS"])
    assert not list(locks.glob("*.owner"))
    (project / "reports" / ".figures.old-1234").mkdir()  # a user's, named as a swap would name it
    assert invoke(["check"])[0] == 0
    assert (project / "reports" / ".figures.old-1234").is_dir()


def test_a_folder_that_gains_a_users_file_while_the_command_runs_is_not_replaced(project, monkeypatch):
    import pipeline.evaluate as evaluate

    real = evaluate.write_figures

    def and_meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        (project / "reports" / "figures" / "poster.png").write_bytes(b"made while evaluate ran")

    monkeypatch.setattr(evaluate, "write_figures", and_meanwhile)
    code, output = invoke(["evaluate"])
    assert code == 2 and "gained" not in output and "poster.png" in output, output
    assert (project / "reports" / "figures" / "poster.png").read_bytes() == b"made while evaluate ran"


def test_a_model_folder_holding_only_dvcs_gitignore_counts_as_empty(project):
    (project / "models" / "b").mkdir(parents=True)
    (project / "models" / "b" / ".gitignore").write_text("/model.safetensors\n/config.json\n")
    code, output = invoke(["train", *TINY, "--output-dir", "models/b"])
    assert code == 0, output
    assert (project / "models" / "b" / ".gitignore").read_text() == "/model.safetensors\n/config.json\n"


def test_a_class_folder_linked_from_outside_the_data_folder_is_refused(project, tmp_path):
    make_image_folder(tmp_path / "elsewhere", {"secret": 3}, size=(8, 8))
    (project / "images" / "secret").symlink_to(tmp_path / "elsewhere" / "secret")
    code, output = invoke(["prepare", "--workers", "1"])
    assert code == 2 and "is a link out of the data folder" in output, output
