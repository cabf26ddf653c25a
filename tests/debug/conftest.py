"""The operator-view deployment (helpers.operator), started once for this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.deployment import Deployment
from helpers.operator import operator_deployment


@pytest.fixture(scope="session")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with operator_deployment(tmp_path_factory.mktemp("ops")) as d:
        yield d
