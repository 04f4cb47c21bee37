"""What the public operational routes say about the host (the routes themselves run against
real servers in test_demo_model.py, test_lifecycle.py and test_metrics.py)."""

from __future__ import annotations

import pytest

from server.api.ops import weights_name


@pytest.mark.parametrize(
    ("folder", "real", "shown"),
    [
        ("/srv/models/shotstream-v1", True, "shotstream-v1"),
        ("/weights/", True, "weights"),
        ("weights", True, "weights"),
        (None, True, "bundled demo weights"),
        (None, False, "random (seed 3)"),
    ],
)
def test_models_names_the_weights_without_a_path(folder, real, shown):
    source = folder or ("/opt/app/model/demo_weights" if real else "random (seed 3)")
    assert weights_name(folder, "demo", source, real) == shown
