"""Settings: the example file is the defaults, errors name key and file, secrets never print."""

from dataclasses import asdict
from pathlib import Path

import pytest

from wecomctl import config as cfg
from wecomctl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_documents_exactly_the_defaults():
    example = cfg.load(str(ROOT / "config.example.yaml"))
    defaults = cfg.Settings()
    a, b = asdict(example), asdict(defaults)
    a.pop("source"), b.pop("source")
    assert a == b


def test_unknown_key_and_bad_type_name_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  wrokers: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key `run.wrokers`"):
        cfg.load(str(f))
    f.write_text("retry:\n  max_attempts: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"`retry.max_attempts` must be a number"):
        cfg.load(str(f))
    f.write_text("limits:\n  send_sms: {per_minute: 1}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown API `limits.send_sms`"):
        cfg.load(str(f))
    f.write_text("welcome:\n  provider: carrier_pigeon\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="welcome.provider"):
        cfg.load(str(f))


def test_secret_comes_from_environment_and_never_prints(tmp_path, monkeypatch):
    monkeypatch.setenv("WECOM_CORP_SECRET", "env-secret-xyz")
    s = cfg.load(None, str(tmp_path))
    assert s.corp_secret().get() == "env-secret-xyz"
    assert "env-secret-xyz" not in repr(s.corp_secret()) and "env-secret-xyz" not in str(s.corp_secret())


def test_simulator_config_is_complete_and_loads(tmp_path):
    from wecomctl.simulator import SimConfig

    sc = SimConfig(rate_limit=30, max_concurrency=4)
    f = tmp_path / "sim.yaml"
    f.write_text(cfg.simulator_config("http://127.0.0.1:1234", sc), encoding="utf-8")
    s = cfg.load(str(f))
    assert s.wecom.base_url == s.gateway.base_url == "http://127.0.0.1:1234"
    assert s.corp_secret().get() == sc.corp_secret and s.gateway_key().get() == sc.gateway_key
    assert all(lim.per_second == 30 for lim in s.limits.values())
    assert all(lim.max_concurrency == 4 for lim in s.limits.values())
    assert s.staff == list(sc.staff)


def test_a_campaign_may_have_its_own_staff_list(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("staff: [a, b]\ncampaigns:\n  spring:\n    staff: [c]\n", encoding="utf-8")
    s = cfg.load(str(f))
    assert s.staff_for("spring") == ["c"] and s.staff_for("other") == ["a", "b"]
    f.write_text("campaigns:\n  spring:\n    staf: [c]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="staf"):
        cfg.load(str(f))
