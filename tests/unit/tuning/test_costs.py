"""Rung 0 planned from each candidate's own cost: FLOPs counted on the Keras model, a pace
from the probe's, and a plan (and oracle) that uses each candidate's."""

from __future__ import annotations

import time

import keras
import pytest

from cnnforge.tuning import plan as planning
from cnnforge.tuning.costs import MIN_COST_RATIO, forward_flops, pace_ratio


def test_forward_flops_count_convolutions_and_dense_layers():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8*4 outputs, 3*3*3 each
    x = keras.layers.DepthwiseConv2D(3, padding="valid")(x)  # 6*6*4 outputs, 3*3 each
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10)(x)  # 144 inputs, 10 outputs
    model = keras.Model(inputs, outputs)
    assert forward_flops(model) == 2 * (8 * 8 * 4 * 27 + 6 * 6 * 4 * 9 + 144 * 10)


def test_a_candidates_pace_follows_its_flops_from_the_probes():
    probe = planning.Probe(per_example=3 * 10e6 / 100e9, trial_overhead=3.0, val_examples=0)
    # the probe trained at 100 GFLOP/s: three times its FLOPs take about three times as long
    assert pace_ratio(30_000_000, 10_000_000, probe) == pytest.approx(3.0)
    assert pace_ratio(10_000_000, 10_000_000, probe) == pytest.approx(1.0)
    # dispatch has a floor: no candidate planned faster than half the probe's pace
    assert pace_ratio(1_000_000, 10_000_000, probe) == MIN_COST_RATIO
    # a probe too small to show a rate (0.6 GFLOP/s): the extra FLOPs at the nominal rate
    tiny = planning.Probe(per_example=1.5e-4, trial_overhead=3.0, val_examples=0)
    extra = 3 * (33e6 - 28e3) / (planning.NOMINAL_TRAIN_GFLOPS * 1e9)
    assert pace_ratio(33_000_000, 28_000, tiny) == pytest.approx(1 + extra / 1.5e-4)
    assert pace_ratio(0, 10_000_000, probe) == 1.0  # not counted: the probe's pace


def test_a_budget_plan_costs_each_candidate_of_rung_0():
    pace = planning.Probe(per_example=1 / 4000, trial_overhead=2.0, val_examples=800)
    common = dict(train_examples=7200, final_examples=8000, batch_size=128, paired=2, basis="x")
    flat = planning.budget_plan(230, pace, **common)
    wide = planning.budget_plan(230, pace, costs=[1.0, 3.0, 0.5, 3.0], **common)
    assert flat.rung0_epoch_seconds is None
    base = pace.epoch_seconds(7200)
    each = wide.rung0_epoch_seconds
    assert len(each) == wide.rungs[0].candidates
    assert each[:4] == pytest.approx([base, 3 * base, 0.5 * base, 3 * base])
    assert each[4:] == pytest.approx([1.875 * base] * (len(each) - 4))  # the mean past them
    search = planning._cost(wide.rungs, wide.paired, wide.seconds_per_epoch, 2.0)
    assert search + wide.final_seconds() <= 230
    # candidates dearer than the probe's 1.3x margin: a smaller search than the flat plan's
    assert planning._cost(wide.rungs, wide.paired, 1.0, 0) < planning._cost(
        flat.rungs, flat.paired, 1.0, 0
    )


def test_rung_0_trials_start_at_their_own_planned_cost(tmp_path):
    """The first trial ended; the deadline is 20 s away. Candidate 1 costs 3 s an epoch and
    candidate 2 costs 12 s: with a 2 s overhead, two epochs of the first fit, not the second's."""
    from test_auto import _auto_oracle, _run_trial

    plan = planning.SearchPlan(
        [planning.Rung(3, 2)],
        0,
        8,
        32,
        100,
        "probe",
        seconds_per_epoch=5,
        trial_overhead_s=2,
        rung0_epoch_seconds=[5.0, 3.0, 12.0],
    )
    oracle = _auto_oracle(tmp_path, plan)
    _run_trial(oracle, tmp_path, 0.5, duration_s=12.0, epochs=2)
    oracle.deadline = time.time() + 20
    second = oracle.create_trial("tuner0")
    assert second.status == "RUNNING" and second.hyperparameters.values["tuner/candidate"] == 1
    oracle.end_trial(second)
    assert oracle.create_trial("tuner0").status == "STOPPED"  # 2 + 24 s would overrun
