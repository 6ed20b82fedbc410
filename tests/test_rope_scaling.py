"""RoPE scaling law, the ``instella rope`` CLI, theta schedules and the resume rule (no model)."""
import math

import pytest

from instella_plugin.cli import main as instella_main
from instella_plugin.rope.apply import check_resume_theta, rope_meta, theta_on_resume
from instella_plugin.rope.scaling import rope_base_for_context
from instella_plugin.rope.schedule import RopeSchedule


def test_instella_long_thetas():
    assert rope_base_for_context(65536) == pytest.approx(514640.3, abs=0.05)
    assert rope_base_for_context(262144) == pytest.approx(3691949.2, abs=0.05)
    assert round(rope_base_for_context(65536, 4096, 10000)) == 514640
    assert round(rope_base_for_context(262144, 4096, 10000)) == 3691949


def test_scaling_law_closed_form_for_other_settings():
    # independent evaluation: log(theta') = log(theta) * ln(T'/2pi) / ln(T/2pi)
    for target, train, base in [(8192, 2048, 500000.0), (32768, 4096, 10000.0), (1024, 4096, 10000.0)]:
        want = math.exp(math.log(base) * math.log(target / (2 * math.pi)) / math.log(train / (2 * math.pi)))
        assert rope_base_for_context(target, train, base) == pytest.approx(want, rel=1e-12)
    assert rope_base_for_context(4096, 4096, 10000) == pytest.approx(10000, rel=1e-12)
    assert rope_base_for_context(1024) < 10000 < rope_base_for_context(8192)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target=0), "target context"), (dict(target=65536, train_context=4), "train context"),
    (dict(target=65536, base=1.0), "RoPE base"), (dict(target=float("nan")), "target context"),
])
def test_scaling_law_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rope_base_for_context(**kwargs)


def test_cli_prints_the_thetas(capsys):
    assert instella_main(["rope", "--train-context", "4096", "--base", "10000", "--target", "65536"]) == 0
    assert capsys.readouterr().out.strip() == "514640"
    assert instella_main(["rope", "--target", "256K"]) == 0
    assert capsys.readouterr().out.strip() == "3691949"
    assert instella_main(["rope", "--target", "64K", "256K"]) == 0
    table = capsys.readouterr().out
    assert "514640.3" in table and "3691949.2" in table
    with pytest.raises(SystemExit):
        instella_main(["rope", "--target", "lots"])


def test_geometric_schedule_closed_form_at_chosen_steps():
    s = RopeSchedule.parse("geometric:10000:3691950:100:1100")
    t0, t1 = 10000.0, 3691950.0
    for it in (0, 50, 100):
        assert s.theta_at(it) == t0
    for it in (101, 350, 600, 1099):
        assert s.theta_at(it) == pytest.approx(t0 * (t1 / t0) ** ((it - 100) / 1000), rel=1e-12)
    assert s.theta_at(600) == pytest.approx(math.sqrt(t0 * t1), rel=1e-12)  # the geometric midpoint
    assert s.theta_at(1100) == t1 and s.theta_at(10 ** 6) == t1
    assert s.final_theta == t1 and RopeSchedule.parse(s.describe()) == s


def test_stepwise_and_constant_schedules():
    phase = RopeSchedule.parse("stepwise", recipe_theta=514640)
    assert {phase.theta_at(i) for i in (0, 1, 4999)} == {514640.0}
    inrun = RopeSchedule.parse("stepwise:0=10000,200=514640,400=3691950")
    assert [inrun.theta_at(i) for i in (0, 199, 200, 399, 400, 9999)] == [1e4, 1e4, 514640, 514640, 3691950, 3691950]
    assert RopeSchedule.parse("constant:1e6").theta_at(7) == 1e6
    assert RopeSchedule.parse(None, recipe_theta=10000).theta_at(3) == 10000
    assert RopeSchedule.from_recipe({"rotary_base": 514640, "rope_schedule": "stepwise"}).theta_at(9) == 514640
    assert RopeSchedule.from_recipe({"rotary_base": 1e4}, cli_spec="constant:2e4").theta_at(0) == 2e4


@pytest.mark.parametrize("spec,match", [
    ("geometric:10000:514640:600:100", "out of order"),
    ("geometric:10000:514640:100:100", "out of order"),
    ("stepwise:0=10000,300=2e5,200=3e5", "out of order"),
    ("stepwise:5=10000", "start at step 0"),
    ("stepwise:0=10000,100", "STEP=THETA"),
    ("geometric:10000:514640:100", "4 fields"),
    ("geometric:10000:-5:0:10", "> 1"),
    ("constant:theta", "not a number"),
    ("cosine:1:2", "unknown schedule kind"),
    ("stepwise", "none was given"),
])
def test_bad_schedules_are_refused_with_the_forms(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        RopeSchedule.parse(spec)
    assert "geometric:THETA0:THETA1:START:END" in str(e.value)


def test_resume_with_a_different_theta_is_refused_unless_overridden():
    assert check_resume_theta(514640.0, 514640.0) == 514640.0
    assert check_resume_theta(None, 514640.0) == 514640.0  # checkpoints from before theta was stored
    with pytest.raises(ValueError, match="--override-rope-theta"):
        check_resume_theta(10000.0, 514640.0)
    assert check_resume_theta(10000.0, 514640.0, override=True) == 514640.0
    ramp = RopeSchedule.parse("geometric:10000:514640:0:100")
    meta = rope_meta(ramp.theta_at(49), 49, ramp.describe())
    assert theta_on_resume(meta, ramp, 50) == ramp.theta_at(50)
    with pytest.raises(ValueError, match="trained with RoPE theta"):
        theta_on_resume(meta, RopeSchedule.parse("constant:514640"), 50)
