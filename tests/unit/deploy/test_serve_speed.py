"""What keeps `cnnforge serve`'s own cost per request small (issue 26): measured in
benchmarks/serve_load.py, held here by behaviour that a change back would break."""

from __future__ import annotations

import pytest
import serving

from cnnforge.deploy.server import create_app


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving.model(tmp_path_factory.mktemp("speed") / "model.onnx")


def test_the_servers_onnxruntime_threads_do_not_spin_between_batches(model):
    # a spinning intra-op pool holds a core after every batch: the event loop's, on 2 cores
    session = create_app(model).state.service.classifier.session
    spinning = session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning"
    )
    assert spinning == "0"
