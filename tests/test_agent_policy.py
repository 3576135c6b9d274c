"""The agent's security decisions as pure functions: no server, every rule an assertion."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from agentd.configfile import edit_config_text, set_config_keys
from agentd.jobenv import build_environment
from agentd.seals import UsedSeals
from agentd.trust import (
    Grant,
    Refused,
    RunAs,
    control_refusal,
    env_refusal,
    load_trust,
    resolve_identity,
)
from bus import SealBinding, SignatureError, Signer, UsageError, generate_seed, seal_for
from bus.signing import seal_expiry, sign_control, verify_control
from schemas import ArgvCommand, ControlRequest, JobRequest

KEY = Signer(generate_seed()).public_key


def grant(**fields: object) -> Grant:
    return Grant.model_validate({"key": KEY, "name": "alice", **fields})


def request(**fields: object) -> JobRequest:
    return JobRequest(command=ArgvCommand(argv=["true"]), **fields)  # type: ignore[arg-type]


def decide(g: Grant, r: JobRequest, mode: str = "root", default: str | None = "nobody") -> object:
    return resolve_identity(g, r, mode=mode, agent_user="root", default_user=default)  # type: ignore[arg-type]


SEALED = b"\x01" + b"\0" * 100  # a credential's presence is what the decision looks at


def test_no_grant_for_a_user_means_no_run_as_whatever_the_credential() -> None:
    g = grant(users=["deploy"])
    assert decide(g, request(run_as="www", credential=SEALED)) == Refused(
        "alice may not run jobs as www"
    )
    assert decide(g, request(run_as="deploy")) == RunAs("deploy", switch=True, password=False)


def test_root_must_be_named_a_glob_never_matches_it() -> None:
    for fields in ({"users": ["*"]}, {"password_users": ["*"]}, {"users": ["r*"]}):
        refused = decide(grant(**fields), request(run_as="root", credential=SEALED))
        assert refused == Refused("alice may not run jobs as root"), fields
    named = decide(grant(password_users=["root"]), request(run_as="root", credential=SEALED))
    # Root is the agent's own user here: PAM still runs for a password job.
    assert named == RunAs("root", switch=False, password=True)


def test_a_password_job_always_goes_through_pam_even_when_the_key_suffices() -> None:
    g = grant(users=["deploy"])
    assert decide(g, request(run_as="deploy", credential=SEALED)) == RunAs(
        "deploy", switch=True, password=True
    )
    # password_users allow a user only together with a password.
    p = grant(password_users=["deploy"])
    assert decide(p, request(run_as="deploy")) == Refused("alice may not run jobs as deploy")


def test_root_mode_runs_a_job_naming_no_user_as_the_default_user() -> None:
    assert decide(grant(users=["*"]), request()) == RunAs("nobody", switch=True, password=False)
    assert decide(grant(users=["root"]), request()) == RunAs("root", switch=False, password=False)
    unset = decide(grant(), request(), default=None)
    assert isinstance(unset, Refused)
    assert "no default_run_as" in unset.reason
    assert isinstance(decide(grant(), request(credential=SEALED)), Refused)


def test_self_mode_runs_as_the_agent_only() -> None:
    assert decide(grant(), request(), mode="self") == RunAs("root", switch=False, password=False)
    other = decide(grant(users=["deploy"]), request(run_as="deploy"), mode="self")
    assert isinstance(other, Refused)
    assert "run_as_mode = self" in other.reason


@pytest.mark.parametrize(
    "name", ["BASH_ENV", "ENV", "LD_PRELOAD", "LD_LIBRARY_PATH", "PATH", "PYTHONPATH",
             "PYTHONSTARTUP", "PERL5OPT", "RUBYOPT", "NODE_OPTIONS", "IFS", "BASH_FUNC_x%%",
             "HOME", "FLEET_JOB_ID", "GCONV_PATH"],
)  # fmt: skip
def test_loader_shell_and_interpreter_variables_never_come_from_a_request(name: str) -> None:
    reason = env_refusal(grant(env=["*"]), request(env={name: "/tmp/evil"}), module_env=["*"])
    assert reason == f"alice may not set {name}: this agent never takes it from a request"
    env = build_environment({"PATH": "/bin", "HOME": "/root"}, {name: "/tmp/evil"}, "J1")
    assert env.get(name) != "/tmp/evil"
    assert env["FLEET_JOB_ID"] == "J1"


def test_only_names_the_grant_or_module_allows_are_taken() -> None:
    g = grant(env=["APP_*"])
    assert env_refusal(g, request(env={"APP_MODE": "x"})) is None
    assert env_refusal(g, request(env={"OTHER": "x"})) == (
        "alice may not set the environment variable OTHER"
    )
    assert env_refusal(grant(), request(env={"LEVEL": "3"}), module_env=["LEVEL"]) is None


@pytest.mark.parametrize("bad", ['env = ["LD_PRELOAD"]', 'env = ["PYTHON*"]', 'env = ["PATH"]'])
def test_a_trust_file_granting_a_forbidden_variable_is_refused(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "trust.toml"
    path.write_text(f'[[grant]]\nkey = "{KEY}"\n{bad}\n')
    with pytest.raises(UsageError, match="can never be set by a request"):
        load_trust(path)


def test_control_needs_a_grant_per_operation(tmp_path: Path) -> None:
    path = tmp_path / "trust.toml"
    path.write_text(f'[[grant]]\nname = "ops"\nkey = "{KEY}"\ncontrol = ["status", "log"]\n')
    trust = load_trust(path)
    assert control_refusal(trust, KEY, "status") is None
    assert control_refusal(trust, KEY, "config-set") == "ops may not call config-set on this agent"
    assert "must be signed" in (control_refusal(trust, None, "status") or "")
    stranger = Signer(generate_seed()).public_key
    assert "not trusted" in (control_refusal(trust, stranger, "status") or "")
    assert "no trust file" in (control_refusal(None, KEY, "status") or "")
    path.write_text(f'[[grant]]\nkey = "{KEY}"\ncontrol = ["shutdown"]\n')
    with pytest.raises(UsageError, match="unknown control operation shutdown"):
        load_trust(path)


def test_a_signed_control_request_is_bound_to_its_subject_and_time() -> None:
    signer = Signer(generate_seed())
    signed = sign_control(ControlRequest(args={"lines": 5}), "fleet.ctl.a.log", signer)
    assert verify_control(signed, "fleet.ctl.a.log", window_s=60) == signer.public_key
    with pytest.raises(SignatureError, match=r"signed for fleet\.ctl\.a\.log"):
        verify_control(signed, "fleet.ctl.b.log", window_s=60)
    altered = signed.model_copy(update={"args": {"lines": 5000}})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_control(altered, "fleet.ctl.a.log", window_s=60)
    old = sign_control(ControlRequest(), "fleet.ctl.a.log", signer, now_ns=time.time_ns() - 10**12)
    with pytest.raises(SignatureError, match="outside the 60s window"):
        verify_control(old, "fleet.ctl.a.log", window_s=60)


def test_a_sealed_password_opens_only_for_its_job_agent_and_submitter() -> None:
    agent = Signer(generate_seed())
    expires = time.time_ns() + 60 * 10**9
    sealed = seal_for(agent.public_key, b"hunter2", SealBinding("J1", "web-1", "alice", expires))
    assert agent.open_sealed(sealed, SealBinding("J1", "web-1", "alice", 0)) == b"hunter2"
    assert seal_expiry(sealed) == expires
    for other in (("J2", "web-1", "alice"), ("J1", "web-2", "alice"), ("J1", "web-1", "eve")):
        with pytest.raises(SignatureError, match="cannot be opened here"):
            agent.open_sealed(sealed, SealBinding(*other, 0))
    extended = sealed[:1] + (expires + 10**12).to_bytes(8, "big") + sealed[9:]
    with pytest.raises(SignatureError, match="cannot be opened here"):
        agent.open_sealed(extended, SealBinding("J1", "web-1", "alice", 0))
    with pytest.raises(SignatureError, match="expired"):
        agent.open_sealed(sealed, SealBinding("J1", "web-1", "alice", 0), now_ns=expires + 1)
    with pytest.raises(SignatureError, match="old or unknown format"):
        agent.open_sealed(b"\x00" * 100, SealBinding("J1", "web-1", "alice", 0))


def test_used_seals_are_remembered_across_restarts_until_they_expire(tmp_path: Path) -> None:
    path = tmp_path / "data" / "seals.jsonl"
    later = time.time_ns() + 60 * 10**9
    seals = UsedSeals(path)
    assert seals.claim("abc", later)
    assert seals.claim("old", time.time_ns() - 1)  # already expired: forgotten on reload
    assert not seals.claim("abc", later)
    again = UsedSeals(path)
    assert not again.claim("abc", later)
    assert again.claim("old", later)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


CONFIG = """# web agent
id = "web-1"  # fixed
max_jobs = 4  # small box

# what operators target
[labels]
role = "web"  # the role

[modules.hi]
argv = ["echo", "hi"]
"""


def test_config_set_edits_the_file_keeping_comments(tmp_path: Path) -> None:
    new = edit_config_text(CONFIG, {"max_jobs": 7, "labels": {"role": "db"}, "log_level": "DEBUG"})
    assert "max_jobs = 7  # small box" in new
    assert "# web agent" in new
    assert "# what operators target\n[labels]" in new
    assert 'argv = ["echo", "hi"]' in new
    path = tmp_path / "agentd.toml"
    path.write_text(CONFIG)
    os.chmod(path, 0o640)
    set_config_keys(path, {"max_jobs": 9})
    assert path.read_text() == CONFIG.replace("max_jobs = 4", "max_jobs = 9")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["agentd.toml"]  # no temporary left


def test_config_set_refuses_what_it_cannot_edit_safely(tmp_path: Path) -> None:
    text = 'release_keys = [\n  "A",\n]\nmax_jobs = 1\n'
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match="cannot change release_keys"):
        set_config_keys(path, {"release_keys": []})
    assert path.read_text() == text
