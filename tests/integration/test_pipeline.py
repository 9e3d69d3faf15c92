"""``cnnforge.run`` end to end on small real data: the data is read once and handed to every
stage (search, export, evaluation, report), and the run directory holds every artifact."""

from __future__ import annotations

import pytest

import cnnforge
from cnnforge.core.rundir import ARTIFACTS

READS: list[str | None] = []


@pytest.mark.slow
def test_a_run_reads_its_data_once_and_leaves_every_artifact(small_npz, tmp_path):
    @cnnforge.dataset("counted_npz")
    def counted(path):
        """The small .npz, counting its reads."""
        READS.append(path)
        return cnnforge.read_npz(small_npz)

    config = cnnforge.SearchConfig(
        data="counted_npz", run_dir=tmp_path / "run", max_trials=1, epochs=1, patience=0
    )
    result = cnnforge.run(config, bench_iterations=5, bench_min_duration_s=0.01)
    assert len(READS) == 1
    assert sorted(p.name for p in result.artifacts().values() if p.is_file()) == sorted(ARTIFACTS)
    assert result.evaluation.images == 200 and 0 <= result.evaluation.accuracy <= 1
    html = (result.run_dir / "report.html").read_text()
    assert "misclassified test images" in html or "classified every test image" in html
    assert "filters and feature maps for test image" in html
    assert result.export.parity.passed
    assert result.export.calibration["probability_calibration"]["temperature"] > 0  # by default
    assert result.export.parity.calibration["argmax_unchanged"] == 1.0
