"""ServerSettings from flags, VAESERVE_* variables and defaults, in that order of precedence."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vaeserve.server.settings import BatchingSettings, ServerSettings, build_parser


def test_defaults_hold_a_4096_by_784_float32_answer():
    s = ServerSettings.from_env({}, repository="models")
    assert s.repository == Path("models") and s.models == ()
    assert (s.host, s.port, s.device) == ("127.0.0.1", 8001, "auto")
    assert s.batching == BatchingSettings()
    assert s.max_message_bytes > 4096 * 784 * 4 + 4096 * 8  # samples + labels


def test_environment_variables_are_read_and_parsed():
    env = {
        "VAESERVE_REPOSITORY": "/srv/models",
        "VAESERVE_MODELS": "digits, fashion",
        "VAESERVE_PORT": "9000",
        "VAESERVE_DEVICE": "cpu",
        "VAESERVE_MAX_BATCH_SIZE": "256",
        "VAESERVE_MAX_QUEUE_DELAY_MS": "2.5",
        "VAESERVE_GRACE_PERIOD_S": "3",
        "VAESERVE_INTRA_OP_THREADS": "",  # empty means unset
    }
    s = ServerSettings.from_env(env)
    assert s.repository == Path("/srv/models") and s.models == ("digits", "fashion")
    assert (s.port, s.device, s.grace_period_s, s.intra_op_threads) == (9000, "cpu", 3.0, 0)
    assert s.batching == BatchingSettings(max_batch_size=256, max_queue_delay_ms=2.5)


def test_flags_win_over_environment_variables():
    env = {"VAESERVE_REPOSITORY": "/from/env", "VAESERVE_PORT": "9000"}
    argv = ["--port", "0", "--max-batch-size", "1", "--max-queue-delay-ms", "0"]
    s = ServerSettings.from_args(argv, environ=env)
    assert s.repository == Path("/from/env") and s.port == 0
    assert s.batching == BatchingSettings(max_batch_size=1, max_queue_delay_ms=0.0)


# One non-default value per flag, as text and as parsed; a new flag must be added here.
EVERY_FLAG = {
    "repository": ("/srv/models", Path("/srv/models")),
    "models": ("a,b", ("a", "b")),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9001", 9001),
    "device": ("cpu", "cpu"),
    "intra_op_threads": ("2", 2),
    "inter_op_threads": ("3", 3),
    "max_samples_per_request": ("100", 100),
    "max_stream_samples": ("1000", 1000),
    "default_stream_chunk_size": ("10", 10),
    "max_stream_chunk_size": ("2000", 2000),
    "max_score_samples": ("50", 50),
    "max_score_rows": ("5000", 5000),
    "max_message_bytes": ("2000000", 2_000_000),
    "grace_period_s": ("1.5", 1.5),
    "log_level": ("DEBUG", "DEBUG"),
    "max_batch_size": ("7", 7),
    "max_queue_delay_ms": ("0.5", 0.5),
    "max_queue_size": ("8", 8),
    "queue_delay_policy": ("always", "always"),
    "instances": ("3", 3),
    "log_format": ("json", "json"),
    "metrics_port": ("9090", 9090),
    "tls_cert": ("/etc/tls/server.pem", Path("/etc/tls/server.pem")),
    "tls_key": ("/etc/tls/server.key", Path("/etc/tls/server.key")),
    "tls_client_ca": ("/etc/tls/ca.pem", Path("/etc/tls/ca.pem")),
    "auth_token_file": ("/run/secrets/token", Path("/run/secrets/token")),
    "reload_interval_s": ("30", 30.0),
    "http_port": ("8080", 8080),
    "model_control_mode": ("explicit", "explicit"),
    "workers": ("2", 2),
    "max_small_request_bytes": ("1024", 1024),
    "max_request_fields": ("100", 100),
    "max_inflight_calls": ("7", 7),
    "max_waiting_calls": ("9", 9),
    "max_inflight_request_bytes": ("1000000", 1_000_000),
    "max_pending_answer_bytes": ("2000000", 2_000_000),
    "stream_stall_timeout_s": ("5", 5.0),
    "max_concurrent_streams": ("9", 9),
    "min_ping_interval_s": ("2.5", 2.5),
    "max_connection_idle_s": ("60", 60.0),
    "max_connection_age_s": ("0", 0.0),
    "max_connection_age_grace_s": ("4", 4.0),
}


def _value(settings: ServerSettings, name: str):
    return getattr(settings.batching if hasattr(settings.batching, name) else settings, name)


def test_every_flag_has_an_environment_variable_and_both_are_read():
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == set(EVERY_FLAG)
    for name, (text, parsed) in EVERY_FLAG.items():
        env = {"VAESERVE_REPOSITORY": "r", f"VAESERVE_{name.upper()}": text}
        assert _value(ServerSettings.from_env(env), name) == parsed, name
        argv = ["--" + name.replace("_", "-"), text]
        assert (
            _value(ServerSettings.from_args(argv, environ={"VAESERVE_REPOSITORY": "r"}), name)
            == parsed
        ), name


@pytest.mark.parametrize(
    "env, message",
    [
        pytest.param({"VAESERVE_PORT": "eighty"}, "VAESERVE_PORT='eighty'", id="not-a-number"),
        pytest.param({"VAESERVE_PORT": "70000"}, "port: expected 0..65535", id="port-range"),
        pytest.param({"VAESERVE_MAX_BATCH_SIZE": "0"}, "max_batch_size", id="batch-size"),
        pytest.param({"VAESERVE_DEVICE": "tpu"}, "device: expected one of", id="device"),
        pytest.param(
            {"VAESERVE_DEFAULT_STREAM_CHUNK_SIZE": "99999"},
            "default_stream_chunk_size",
            id="chunk-over-max",
        ),
        pytest.param({"VAESERVE_LOG_FORMAT": "xml"}, "log_format", id="log-format"),
        pytest.param({"VAESERVE_METRICS_PORT": "-1"}, "metrics_port", id="metrics-port"),
        pytest.param({"VAESERVE_RELOAD_INTERVAL_S": "-5"}, "reload_interval_s", id="reload"),
        pytest.param({"VAESERVE_WORKERS": "0"}, "workers: expected", id="workers"),
        pytest.param({"VAESERVE_INSTANCES": "-1"}, "instances: expected", id="instances"),
        pytest.param(
            {"VAESERVE_QUEUE_DELAY_POLICY": "never"},
            "queue_delay_policy: expected adaptive or always",
            id="queue-delay-policy",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_setting(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerSettings.from_env({"VAESERVE_REPOSITORY": "models", **env})


def test_the_repository_is_required(capsys):
    with pytest.raises(SystemExit):
        ServerSettings.from_args([], environ={})
    assert "--repository is required" in capsys.readouterr().err


def test_bad_flags_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        ServerSettings.from_args(["--repository", "m", "--device", "tpu"], environ={})
    assert "invalid choice" in capsys.readouterr().err


def test_reload_interval_has_the_short_flag_too():
    s = ServerSettings.from_args(["--reload-interval", "15"], environ={"VAESERVE_REPOSITORY": "r"})
    assert s.reload_interval_s == 15.0
    assert ServerSettings.from_env({"VAESERVE_REPOSITORY": "r"}).metrics_port is None


def test_help_shows_every_default_and_its_variable():
    # The installed console script, as an operator reads it; a wide COLUMNS keeps argparse from
    # wrapping inside a "[default: ...; env ...]" note.
    script = shutil.which("vae-serve", path=str(Path(sys.executable).parent))
    assert script, "vae-serve is not installed beside this interpreter"
    out = subprocess.run(
        [script, "--help"], capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    ).stdout  # fmt: skip
    # An option whose name is long gets its help on the next line: match up to the next option.
    note = r"^  --([a-z-]+)(?:(?!^  -).)*?\[default: ([^;\]]*); env ([A-Z_]+)\]"
    notes = re.findall(note, out, re.M | re.S)
    assert sorted(flag for flag, _, _ in notes) == sorted(n.replace("_", "-") for n in EVERY_FLAG)
    defaults = ServerSettings.from_env({}, repository="r")
    for flag, shown, variable in notes:
        name = flag.replace("-", "_")
        assert variable == "VAESERVE_" + name.upper()
        value = None if name == "repository" else _value(defaults, name)
        expected = "none" if value is None else "all" if value == () else str(value)
        assert shown == expected, f"--{flag}: help says {shown!r}, the default is {value!r}"


def test_rest_port_is_tritons_8000_for_the_command_off_in_code_and_can_be_switched_off():
    assert ServerSettings.from_args(["--repository", "r"], environ={}).http_port == 8000
    assert ServerSettings(repository="r").http_port is None
    off = ServerSettings.from_args(["--repository", "r", "--http-port", "off"], environ={})
    assert off.http_port is None
    with pytest.raises(ValueError, match="http_port: expected 0..65535 or off, got 70000"):
        ServerSettings(repository="r", http_port=70000)


def test_triton_flag_spellings_set_the_same_settings():
    argv = ["--model-repository", "m", "--grpc-port", "9001", "--http-port", "9000",
            "--load-model", "a,b", "--repository-poll-secs", "15"]  # fmt: skip
    s = ServerSettings.from_args(argv, environ={})
    assert (s.repository, s.port, s.http_port, s.models) == (Path("m"), 9001, 9000, ("a", "b"))
    assert (s.reload_interval_s, s.model_control_mode) == (15.0, "poll")


def test_model_control_modes_and_polling_must_agree():
    assert ServerSettings(repository="r").model_control_mode == "none"
    assert ServerSettings(repository="r", reload_interval_s=5).model_control_mode == "poll"
    with pytest.raises(ValueError, match="reload_interval_s: expected seconds > 0 with model_"):
        ServerSettings(repository="r", model_control_mode="poll")
    with pytest.raises(ValueError, match="reload_interval_s: expected 0 with model_control_mod"):
        ServerSettings(repository="r", model_control_mode="explicit", reload_interval_s=5)
    with pytest.raises(ValueError, match="workers: expected 1 with model_control_mode explicit"):
        ServerSettings(repository="r", model_control_mode="explicit", workers=2)
    with pytest.raises(ValueError, match="model_control_mode: expected none | poll | explicit"):
        ServerSettings(repository="r", model_control_mode="auto")
