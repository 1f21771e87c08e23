"""The demo's and the incident's cluster files (scripts/demo.sh, scripts/cascade.py) load and validate as one batch, with nothing merely accepted."""
import os

import pytest

from mesh.config.load import parse_paths
from mesh.config.validate import validate_batch

LOCAL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "deploy", "local")


@pytest.mark.parametrize("files", [("demo.yaml", "shop.yaml"), ("cascade.yaml",)])
def test_cluster_files_are_valid_without_warnings(files):
    batch = parse_paths([os.path.join(LOCAL, f) for f in files])
    validate_batch(batch, {})
    assert [w for item in batch for w in item.warnings] == []
    for item in batch:   # every app the pods run is in the repository
        for c in getattr(item.resource, "containers", ()):
            script = next((a for a in c.command if a.startswith("apps/")), None)
            assert script is None or os.path.exists(os.path.join(LOCAL, script)), (item.resource.key, script)
