"""The README says what the code does: its architecture matrix is the table's, its YAML examples parse."""

from __future__ import annotations

import re

import yaml

from pipeline import archs
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_architecture_matrix_is_generated_from_the_table():
    shown = README.split("<!-- archs:begin -->\n", 1)[1].split("<!-- archs:end -->", 1)[0]
    assert shown.strip() == archs.matrix().strip()  # refresh it with: python -m pipeline.archs


def test_every_yaml_block_parses(tmp_path):
    from pipeline.recipe import load_recipe

    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        data = yaml.safe_load(block)
        if isinstance(data, dict) and {"name", "source", "targets"} <= set(data):
            path = tmp_path / "recipe.yaml"
            path.write_text(block)
            load_recipe(path)  # a recipe example is a valid recipe
