import subprocess
import sys

import pytest

from ioi.cli import main, run_pipe_main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ioi", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("simulate", "reduce", "calib", "config"):
        assert cmd in r.stdout


def test_no_files_is_exit_3_one_line_no_traceback(tmp_path):
    (tmp_path / "data").mkdir()
    r = run_cli("reduce", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ioi: error")]
    assert len(errors) == 1 and str(tmp_path / "data") in errors[0]
    assert (tmp_path / "out" / "res.log").exists()


def test_config_show_prints_effective_settings(tmp_path, capsys):
    ini = tmp_path / "p.toml"
    ini.write_text('[pipeline.stacking]\nmethod = "COADD"\n')
    assert main(["config", "--show", "--config", str(ini)]) == 0
    out = capsys.readouterr().out
    assert "[stacking]" in out and "method = COADD" in out and "[flatfielding]" in out


def test_config_bad_setting_exit_code(tmp_path, capsys):
    ini = tmp_path / "p.toml"
    ini.write_text('[pipeline.reference_subtraction]\nmethod = "SIDEWAYS"\n')
    assert main(["config", "--config", str(ini)]) == 5
    err = capsys.readouterr().err
    assert "SIDEWAYS" in err and "RAMP" in err


def test_run_pipe_working_directory_must_not_exist(tmp_path, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    rc = run_pipe_main(["--p", str(tmp_path), "--wd", str(wd)])
    assert rc == 1
    assert "--o" in capsys.readouterr().err


def test_run_pipe_clobber_and_res_log(tmp_path, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "res.log").write_text("old run\n")
    data = tmp_path / "data"
    data.mkdir()
    rc = run_pipe_main(["--p", str(data), "--wd", str(wd), "--o", "--d", "20150227"])
    assert rc == 3  # nothing to reduce
    log = (wd / "res.log").read_text()
    assert "old run" not in log
    assert "run_pipe" in log


def test_run_pipe_accepts_original_flags_with_equals(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rc = run_pipe_main([f"--p={data}", f"--wd={tmp_path / 'wd'}", "--rlo=1", "--rhi=3", "--elo=1", "--ehi=4",
                        "--log=debug", "--f", "--d=20150227", "--dlo=1", "--dhi=999", "--glo=0", "--ghi=1"])
    assert rc == 3


@pytest.mark.parametrize("flags", [["--rlo", "3", "--rhi", "1"], ["--dlo", "5", "--dhi", "2"]])
def test_run_pipe_validates_ranges(tmp_path, capsys, flags):
    rc = run_pipe_main(["--p", str(tmp_path), "--wd", str(tmp_path / "wd"), *flags])
    assert rc == 2
    assert "above high" in capsys.readouterr().err


def test_run_pipe_bad_date_is_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_pipe_main(["--p", str(tmp_path), "--wd", str(tmp_path / "wd"), "--d", "2015-02-27"])
    assert exc.value.code == 2


def test_missing_pipeline_ini_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rc = run_pipe_main(["--p", str(data), "--wd", str(tmp_path / "wd"), "--pi", str(tmp_path / "nope.ini")])
    assert rc == 8
    assert "nope.ini" in capsys.readouterr().err


def _run_python(code: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_fast_exit_keeps_status_output_and_exit_handlers():
    r = _run_python("import atexit, sys\n"
                    "from ioi.cli import exit_without_teardown\n"
                    "atexit.register(lambda: print('handler ran'))\n"
                    "print('buffered line', end='')\n"
                    "sys.stderr.write('to stderr')\n"
                    "exit_without_teardown(7)\n"
                    "print('not reached')\n")
    assert r.returncode == 7
    assert r.stdout == "buffered linehandler ran\n"
    assert r.stderr == "to stderr"


def test_fast_exit_waits_for_a_live_non_daemon_thread(tmp_path):
    flag = tmp_path / "joined"
    r = _run_python("import threading, time\n"
                    "from ioi.cli import exit_without_teardown\n"
                    f"def late():\n    time.sleep(0.3)\n    open({str(flag)!r}, 'w').write('x')\n"
                    "threading.Thread(target=late).start()\n"
                    "exit_without_teardown(4)\n")
    assert r.returncode == 4
    assert flag.exists()  # the thread was joined, not killed


def test_console_entry_turns_usage_errors_into_exit_2():
    r = run_cli("reduce")
    assert r.returncode == 2 and "required" in r.stderr


def test_one_blas_thread_keeps_a_users_setting_and_cli_imports_no_numpy():
    from ioi._parallel import BLAS_THREAD_VARIABLES, one_blas_thread

    env = {"OPENBLAS_NUM_THREADS": "4"}
    one_blas_thread(env)
    assert env["OPENBLAS_NUM_THREADS"] == "4"
    assert all(env[name] == "1" for name in BLAS_THREAD_VARIABLES if name != "OPENBLAS_NUM_THREADS")
    # the entry points set it before numpy's first import, which must come later
    code = "import sys, ioi.cli; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
