"""The part every node's V3 schema shares: the pack's menu category."""
from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "model_patches/attention"


def node_schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list,
                hidden: list = ()) -> io.Schema:
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=inputs, outputs=outputs, hidden=list(hidden))
